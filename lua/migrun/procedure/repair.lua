--[[
migrun.repair: rows the verification found different, copied again from the
source to the target by key, without restarting their group.

Each table is mended in one target transaction: the rows with those keys are
deleted and the source's rows inserted again (the columns the target computes
left out), in a session with session_replication_role = replica, as DMS
writes: the schema's triggers and foreign keys do not fire, and migrun's
sentinel does not take the repair for a stray write. The source's rows are
read just before; if the application changes one of them meanwhile, DMS
carries that change as usual, and the verification that follows the repair
(migrun.verify, which rechecks every difference it named) says whether the
row is equal now. A table without a key cannot be mended by row: it is
refused, with what to do instead (restart its group).

  local repair = require "migrun.repair"
  local p = repair.plan(state.differences, groups)   -- { tables = {...}, refused = {...}, rows = n }
  local r = assert(repair.run(source, target, p, { say = print }))

repair.plan(differences, groups) -> { tables = { {table, key, keys = {canonical}, complete} },
    refused = { {table, why, what_to_do} }, rows = n }
    differences: a verification's (verify.load(state_dir).differences).
repair.run(source, target, plan, opts) -> { tables = { {table, keys, deleted, inserted, seconds} }, rows = n } | nil, err
    Through target:write (a dry run shows each statement and changes nothing).
repair.REPORT_COLUMNS, repair.report_rows(result)
]]
local pg = require "migrun.pg"
local text = require "migrun.text"
local host = require "migrun.host"
local rowhash = require "migrun.rowhash"
local pgversion = require "migrun.pgversion"

local repair = {}

local function group_of(groups, k)
  for _, g in ipairs(groups or {}) do
    for _, t in ipairs(g.tables or {}) do
      if text.key(t) == k then return g end
    end
  end
end

function repair.plan(differences, groups)
  assert(type(differences) == "table", "repair.plan: a verification's differences expected")
  local out = { tables = {}, refused = {}, rows = 0 }
  for _, d in ipairs(differences) do
    if d.key and d.keys and #d.keys > 0 then
      local keys = {}
      for i, x in ipairs(d.keys) do keys[i] = x.key end
      out.tables[#out.tables + 1] = { table = d.table, key = d.key, keys = keys, complete = d.complete }
      out.rows = out.rows + #keys
    else
      local g = group_of(groups, d.table)
      out.refused[#out.refused + 1] = { table = d.table,
        why = "it has no primary or unique key: its rows cannot be named, nor copied again one by one",
        what_to_do = g and ("restart its group: migrun playbooks/partial_restart.lua %s"):format(g.slot)
          or "restart its group (playbooks/partial_restart.lua <slot>)" }
    end
  end
  return out
end

-- The columns the target stores itself (not generated), in the table's order.
local function stored_columns(db, qualified)
  local version, verr = pgversion.of(db)
  if not version then return nil, verr end
  local res, err = db:query(([[
    select a.attname as name from pg_attribute a
     where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped and %s
     order by a.attnum]]):format(pgversion.pick(version, "attgenerated", "a.attgenerated = ''", "true")), qualified)
  if not res then return nil, err end
  local cols = {}
  for row in res:rows() do cols[#cols + 1] = pg.quote_ident(row.name) end
  return cols
end

-- key row value, and the typed values of the key texts in $1 (a jsonb array of arrays)
local function key_match(key)
  local cols, vals = {}, {}
  for i, c in ipairs(key.columns) do
    cols[i] = pg.quote_ident(c)
    vals[i] = ("(_e.e->>%d)::%s"):format(i - 1, key.types[i])
  end
  local row = #cols == 1 and cols[1] or ("(" .. table.concat(cols, ", ") .. ")")
  local typed = #vals == 1 and vals[1] or ("(" .. table.concat(vals, ", ") .. ")")
  return row, typed
end

local function mend_table(source, target, t)
  local schema, name = text.split_key(t.table)
  local qualified = pg.qualify(schema, name)
  local t0 = host.monotonic()
  local cols, err = stored_columns(target, qualified)
  if not cols then return nil, err end
  local row, typed = key_match(t.key)
  local keys = "[" .. table.concat(t.keys, ",") .. "]"
  -- the source's rows, as jsonb (every type comes back through jsonb_populate_recordset)
  local res
  res, err = rowhash.with_stable(source, function()
    return source:query(("select coalesce(jsonb_agg(to_jsonb(s)), '[]')::text as rows from %s s where %s in "
      .. "(select %s from jsonb_array_elements($1::jsonb) _e(e))"):format(qualified, row, typed), keys)
  end)
  if not res then return nil, err end
  local rows = res[1].rows
  local list = table.concat(cols, ", ")
  local statements = {
    { "begin" },
    { "set local session_replication_role = replica" },
    { ("delete from %s where %s in (select %s from jsonb_array_elements($1::jsonb) _e(e))"):format(qualified, row,
      typed), keys },
    { ("insert into %s (%s) select %s from jsonb_populate_recordset(null::%s, $1::jsonb)"):format(qualified, list,
      list, qualified), rows },
    { "commit" },
  }
  local done = { table = t.table, keys = #t.keys }
  for i, st in ipairs(statements) do
    local r, werr = target:write(table.unpack(st))
    if not r then
      if i > 1 then target:write("rollback") end
      return nil, werr
    end
    if i == 3 then done.deleted = r.affected or 0 end
    if i == 4 then done.inserted = r.affected or 0 end
  end
  done.seconds = host.monotonic() - t0
  return done
end

function repair.run(source, target, plan, opts)
  assert(source and source.query and target and target.write, "repair.run: source and target Dbs expected")
  assert(type(plan) == "table" and plan.tables, "repair.run: a repair.plan expected")
  opts = opts or {}
  local out = { tables = {}, rows = 0 }
  for _, t in ipairs(plan.tables) do
    local done, err = mend_table(source, target, t)
    if not done then return nil, err end
    out.tables[#out.tables + 1] = done
    out.rows = out.rows + (done.inserted or 0)
    if opts.say then
      opts.say(("%s: %d key(s): %d row(s) deleted on the target, %d copied again from the source"):format(
        t.table, #t.keys, done.deleted or 0, done.inserted or 0))
    end
  end
  return out
end

repair.REPORT_COLUMNS = { "table", "keys", "deleted", "copied", "seconds" }

function repair.report_rows(result)
  local rows = {}
  for _, t in ipairs(result.tables) do
    rows[#rows + 1] = { t.table, tostring(t.keys), tostring(t.deleted or 0), tostring(t.inserted or 0),
      text.duration(t.seconds or 0) }
  end
  return rows
end

return repair
