--[[
migrun.drift: schema drift on the source during the migration. DMS does not
carry DDL through pglogical: a column added on the primary while the tasks
run breaks a task or silently loses that column's data on the target. So the
migrated schemas' shape (every table, its columns with their types and NOT
NULL, its constraints, its replica identity) is fingerprinted when the data
is got to know (full.lua's know_data), and compared again by the guard
through the run and before the cutover. Reads only.

  local drift = require "migrun.drift"
  local fp = assert(drift.fingerprint(source_db, { schemas = cfg.schemas, exclude = cfg.exclude_tables }))
  ... later ...
  local changes = assert(drift.compare(fp, assert(drift.fingerprint(source_db, same_opts))))
  if #changes > 0 then error(drift.message(changes, { ... })) end

  drift.fingerprint(db, { schemas, exclude }) -> fp | nil, err
      fp = { taken_at = "YYYY-MM-DD HH:MM:SS", tables = { { key = "s.t",
        columns = { { name, type }, ... } (type: "bigint not null"),
        constraints = { { name, definition }, ... }, identity = "default" | "full" | "nothing" | "index" } } }
      A plain value that goes into the journal as JSON: a list (the journal
      masks values under keys that look secret, and a table may be called
      user_passwords), with password=... in definitions masked as the
      journal would, on both sides of a comparison.
  drift.compare(old, new) -> { { table, what, sql (the same change for the target, when one
      statement says it) } ... }, in table order; {} when nothing changed.
  drift.check(db, old, opts) -> changes | nil, err   fingerprint now (opts as fingerprint's) and compare
  drift.message(changes, opts) -> text: what changed and what to do. opts: level ("stop" |
      "warn"), taken_at, config (path), rerun (the command), playbooks (their directory),
      slot_of = function("s.t") -> slot | nil
]]
local pg = require "migrun.pg"
local text = require "migrun.text"
local catalog = require "migrun.catalog"
local mask = require "migrun.mask"
local json = require "migrun.json"

local drift = {}

local SQL = ([[
select n.nspname as schema, c.relname as name,
       case c.relreplident when 'd' then 'default' when 'f' then 'full' when 'n' then 'nothing'
         when 'i' then 'index' end as identity,
       (select json_agg(json_build_array(a.attname, format_type(a.atttypid, a.atttypmod)
                 || case when a.attnotnull then ' not null' else '' end) order by a.attnum)
          from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped)::text as columns,
       (select json_agg(json_build_array(co.conname, pg_get_constraintdef(co.oid)) order by co.conname)
          from pg_constraint co where co.conrelid = c.oid)::text as constraints
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where c.relkind in ('r', 'p') and %s
 order by 1, 2]]):format(catalog.not_system_sql("n.nspname"))

local function decode_pairs(doc)
  if doc == nil or rawequal(doc, pg.null) then return {} end
  local out = {}
  for i, p in ipairs(assert(json.decode(doc))) do out[i] = { p[1], mask.string(p[2]) } end
  return out
end

function drift.fingerprint(db, opts)
  assert(type(db) == "table" and db.query, "drift.fingerprint: a migrun.db Db expected")
  opts = opts or {}
  local schemas, excluded = nil, {}
  if opts.schemas then
    schemas = {}
    for _, s in ipairs(opts.schemas) do schemas[s] = true end
  end
  for _, t in ipairs(opts.exclude or {}) do excluded[t] = true end
  local res, err = db:query(SQL)
  if not res then return nil, err end
  local fp = { taken_at = os.date("%Y-%m-%d %H:%M:%S"), tables = {} }
  for row in res:rows() do
    local key = text.key(row)
    if (not schemas or schemas[row.schema]) and not excluded[key] then
      fp.tables[#fp.tables + 1] = { key = key, columns = decode_pairs(row.columns),
        constraints = decode_pairs(row.constraints), identity = row.identity }
    end
  end
  return fp
end

local function by_name(list)
  local out = {}
  for _, p in ipairs(list or {}) do out[p[1]] = p[2] end
  return out
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- An identifier for a statement shown to the operator (quoted unless plain).
local function ident(name)
  if name:match("^[a-z_][a-z0-9_]*$") then return name end
  return '"' .. name:gsub('"', '""') .. '"'
end

function drift.compare(old, new)
  assert(type(old) == "table" and type(old.tables) == "table", "drift.compare: a fingerprint expected (old)")
  assert(type(new) == "table" and type(new.tables) == "table", "drift.compare: a fingerprint expected (new)")
  local changes = {}
  local function add(tbl, what, sql) changes[#changes + 1] = { table = tbl, what = what, sql = sql } end
  local olds, news, all = {}, {}, {}
  for _, t in ipairs(old.tables) do olds[t.key], all[t.key] = t, true end
  for _, t in ipairs(new.tables) do news[t.key], all[t.key] = t, true end
  for _, key in ipairs(sorted_keys(all)) do
    local a, b = olds[key], news[key]
    local schema, name = text.split_key(key)
    local qualified = ident(schema) .. "." .. ident(name)
    if not a then
      add(key, "table created (it is in no replication set: DMS does not migrate it)")
    elseif not b then
      add(key, "table dropped or renamed")
    else
      local ac, bc = by_name(a.columns), by_name(b.columns)
      for _, p in ipairs(b.columns) do
        local col, ty = p[1], p[2]
        if ac[col] == nil then
          add(key, ("column %s %s added"):format(col, ty),
            ("ALTER TABLE %s ADD COLUMN %s %s"):format(qualified, ident(col), (ty:gsub(" not null$", ""))))
        elseif ac[col] ~= ty then
          local from_t, to_t = ac[col]:gsub(" not null$", ""), ty:gsub(" not null$", "")
          add(key, ("column %s changed: %s -> %s"):format(col, ac[col], ty), from_t ~= to_t
            and ("ALTER TABLE %s ALTER COLUMN %s TYPE %s"):format(qualified, ident(col), to_t) or nil)
        end
      end
      for _, p in ipairs(a.columns) do
        if bc[p[1]] == nil then
          add(key, ("column %s %s dropped (or renamed)"):format(p[1], p[2]))
        end
      end
      local ak, bk = by_name(a.constraints), by_name(b.constraints)
      for _, p in ipairs(b.constraints) do
        if ak[p[1]] ~= p[2] then
          add(key, ("constraint %s %s %s"):format(p[1], p[2], ak[p[1]] and "changed" or "added"),
            ak[p[1]] == nil and ("ALTER TABLE %s ADD CONSTRAINT %s %s"):format(qualified, ident(p[1]), p[2]) or nil)
        end
      end
      for _, p in ipairs(a.constraints) do
        if bk[p[1]] == nil then add(key, ("constraint %s %s dropped"):format(p[1], p[2])) end
      end
      if a.identity ~= b.identity then
        add(key, ("replica identity %s -> %s"):format(tostring(a.identity), tostring(b.identity)))
      end
    end
  end
  return changes
end

function drift.check(db, old, opts)
  local new, err = drift.fingerprint(db, opts)
  if not new then return nil, err end
  return drift.compare(old, new)
end

function drift.message(changes, opts)
  opts = opts or {}
  local lines, sqls, slots, seen = {}, {}, {}, {}
  for _, c in ipairs(changes) do
    lines[#lines + 1] = c.table .. ": " .. c.what
    if c.sql then sqls[#sqls + 1] = c.sql end
    local slot = opts.slot_of and opts.slot_of(c.table)
    if slot and not seen[slot] then seen[slot] = true slots[#slots + 1] = slot end
  end
  local cfg, dir = opts.config or "migration.lua", opts.playbooks or "playbooks"
  local todo = {}
  todo[#todo + 1] = "DMS does not carry DDL through pglogical, so the target and the tasks no longer match the source"
  if #sqls > 0 then
    todo[#todo + 1] = "make the same change on the target (" .. table.concat(sqls, "; ") .. ")"
  else
    todo[#todo + 1] = "make the same change on the target"
  end
  if #slots > 0 then
    local cmds = {}
    for i, s in ipairs(slots) do
      cmds[i] = ("`migrun %s/partial_restart.lua %s --config %s`"):format(dir, s, cfg)
    end
    todo[#todo + 1] = "then redo the affected group" .. (#slots > 1 and "s" or "") .. " so rows written since"
      .. " the change are carried whole: " .. table.concat(cmds, ", ")
  end
  todo[#todo + 1] = ("once source and target agree, take the new schema as the reference: `migrun %s/full.lua"
    .. " --config %s --only know_data`"):format(dir, cfg)
  if opts.rerun then todo[#todo + 1] = "then run `" .. opts.rerun .. "` again" end
  return ("schema drift %s: the source's schema changed since know_data%s: %s. What to do: %s."):format(
    opts.level == "warn" and "warning" or "STOP",
    opts.taken_at and (" (" .. opts.taken_at .. ")") or "",
    table.concat(lines, "; "), table.concat(todo, "; "))
end

return drift
