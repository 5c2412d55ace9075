--[[
migrun.matviews: the materialized views of the migrated schemas, populated on
the target. Nothing else carries their rows: the schema is restored with
`pg_dump --schema-only`, which writes each one's definition (created WITH NO
DATA) and no MATERIALIZED VIEW DATA; the full load copies tables only;
logical replication, pglogical and DMS carry tables only. Left alone, every
query of one on the target fails with `55000 materialized view "..." has not
been populated`. So full.lua refreshes them once the data is loaded (the
application's reads work on the target from the start) and the cutover
refreshes them again once the last change has been applied (then
CONCURRENTLY where a unique index allows: readers are not locked out).

Reads go through Db:query, every REFRESH through Db:write, so a dry run
prints the statements and runs none.

  local matviews = require "migrun.matviews"
  local list = assert(matviews.list(source, { schemas = cfg.schemas, exclude = cfg.exclude_tables }))
  local r = assert(matviews.refresh_all(target, list, { say = print }))
  ctx:report_table("Materialized views", matviews.REFRESH_COLUMNS, r.rows)
  print(matviews.checklist_line(list, r))
  local c = assert(matviews.compare(source, target, list[1]))   -- c.equal

matviews.list(db, { schemas = {...} | nil, exclude = {"s.v", ...} }) -> list | nil, err
    The materialized views of the schemas (nil: every schema but the system
    ones and migrun's own, as catalog.tables chooses them), those excluded
    left out (pg_dump --exclude-table leaves them out of the schema too),
    those of an extension too (the extension creates them). In dependency
    order: each after every materialized view it reads, directly or through
    views (pg_rewrite's dependencies in pg_depend), then by name. Each:
      schema, name, key ("s.v"), qualified, populated (on db: false for one
      created or refreshed WITH NO DATA), bytes (pg_total_relation_size),
      owner, unique_index (the name of a unique index REFRESH ... CONCURRENTLY
      can use: btree, valid, immediate, no WHERE, no expression; else nil),
      depends_on = {"s.v"} (the materialized views it reads).
    Reads only. Run it on the source: `populated` is then what the target
    must match.
matviews.refresh(target, mv, opts) -> row | nil, err
    One materialized view of a list, as refresh_all does it.
matviews.refresh_all(target, list, opts) -> { rows = { row }, seconds = total,
    refreshed = n, concurrently = n, plain = n, unpopulated = n } | nil, err
    In the list's order, each as the target has it now (read just before):
      populated on the source, populated on the target and a usable unique
        index on the target: REFRESH MATERIALIZED VIEW CONCURRENTLY (readers
        go on reading the old rows; opts.concurrently = false: never);
      populated on the source otherwise: REFRESH MATERIALIZED VIEW (locks
        its readers out until it commits);
      not populated on the source: left unpopulated on the target (made so
        with REFRESH ... WITH NO DATA if the target's is populated).
    row = { name = "s.v", mode = "concurrently" | "plain" | "unpopulated" |
    "with no data", seconds (the REFRESH alone; nil in a dry run or when
    nothing ran), rows (count(*) after it, unless opts.count == false; nil
    in a dry run or unpopulated), dry_run = true in a dry run }.
    A materialized view missing on the target is an error (restore the
    schema first), except in a dry run, where the schema may not be there
    yet. The first REFRESH that fails stops it: the error says which were
    refreshed before and which are left (running it again is safe).
    opts.say(line) gets a line per view.
    CONCURRENTLY costs more than a plain REFRESH (it builds the new rows,
    then diffs and applies them): 7.5 s against 1.5 s here for views of
    1M and 200k rows. Inside a cutover window, before the application reads
    the target, opts.concurrently = false is the faster choice.
matviews.REFRESH_COLUMNS: the report's columns for those rows.
matviews.compare(a_db, b_db, mv) -> { name, equal, a = state, b = state, detail } | nil, err
    Whether the materialized view has the same contents on both: populated
    on both and the same row count and order-independent row hash
    (qa.row_hash, the verification's), or unpopulated on both. state =
    { populated, rows, hash } (missing = true where it does not exist).
    Reads only. A difference after a refresh from equal tables means the
    source's is older than its tables (the application refreshes it on its
    own schedule): detail says so.
matviews.COMPARE_COLUMNS, matviews.compare_rows(results): for a report table.
matviews.summary(list) -> { count, refreshed = {"s.v"} (populated on the
    source), concurrent = {"s.v"}, without_unique = {"s.v"},
    without_unique_bytes = n, unpopulated = {"s.v"} }
matviews.preflight(list) -> nil (no materialized views) | { severity =
    "warning" | "note", message, hint } -- a warning when a populated one has
    no usable unique index: the cutover's plain REFRESH locks readers out.
matviews.checklist_line(list [, result]) -> text, for the cutover checklist
    (result: refresh_all's, or the facts saved from it: the time it took).
]]
local pg = require "migrun.pg"
local host = require "migrun.host"
local errors = require "migrun.error"
local text = require "migrun.text"
local catalog = require "migrun.catalog"
local qa = require "migrun.qa"
local pgversion = require "migrun.pgversion"

local matviews = {}

local function is_null(v) return v == nil or v == pg.null end

-- A unique index of the materialized view c that REFRESH ... CONCURRENTLY
-- accepts (PostgreSQL's is_usable_unique_index, matview.c: unique, btree,
-- valid, immediate, not partial, plain columns only), its name or NULL.
local USABLE_INDEX = [[
  (select ic.relname from pg_index i
     join pg_class ic on ic.oid = i.indexrelid
     join pg_am am on am.oid = ic.relam
    where i.indrelid = c.oid and i.indisunique and i.indisvalid and i.indimmediate
      and am.amname = 'btree' and i.indpred is null and i.indexprs is null
      and 0 < all (i.indkey::int2[])
    order by ic.relname limit 1)]]

-- The materialized views each view or materialized view reads directly:
-- the dependencies of its rewrite rule ({ [oid] = {oids} }).
local function direct_reads(db)
  local res, err = db:query([[
    select distinct r.ev_class::bigint as oid, d.refobjid::bigint as ref, rc.relkind::text as kind
      from pg_rewrite r
      join pg_depend d on d.classid = 'pg_rewrite'::regclass and d.objid = r.oid
                      and d.refclassid = 'pg_class'::regclass and d.refobjid <> r.ev_class
      join pg_class rc on rc.oid = d.refobjid and rc.relkind in ('m', 'v')
      join pg_class c on c.oid = r.ev_class and c.relkind in ('m', 'v')]])
  if not res then return nil, err end
  local reads = {}
  for row in res:rows() do
    reads[row.oid] = reads[row.oid] or {}
    table.insert(reads[row.oid], { oid = row.ref, kind = row.kind })
  end
  return reads
end

-- The materialized views oid reads, through plain views too (a view's rows
-- are its query's, run at refresh time; a materialized view's are stored).
local function matviews_read(reads, oid)
  local found, seen = {}, { [oid] = true }
  local function walk(o)
    for _, r in ipairs(reads[o] or {}) do
      if not seen[r.oid] then
        seen[r.oid] = true
        if r.kind == "m" then found[#found + 1] = r.oid else walk(r.oid) end
      end
    end
  end
  walk(oid)
  return found
end

-- Kahn's order, the ready ones by key: each after every one it reads that is
-- in the list (none can be a cycle: PostgreSQL refuses to create one).
local function dependency_order(list)
  local by_key, waiting, readers = {}, {}, {}
  for _, mv in ipairs(list) do by_key[mv.key] = mv end
  for _, mv in ipairs(list) do
    waiting[mv.key] = 0
    for _, dep in ipairs(mv.depends_on) do
      if by_key[dep] then
        waiting[mv.key] = waiting[mv.key] + 1
        readers[dep] = readers[dep] or {}
        table.insert(readers[dep], mv.key)
      end
    end
  end
  local ordered, ready = {}, {}
  for _, mv in ipairs(list) do if waiting[mv.key] == 0 then ready[#ready + 1] = mv.key end end
  while #ready > 0 do
    table.sort(ready, function(a, b) return a > b end)
    local k = table.remove(ready)
    ordered[#ordered + 1] = by_key[k]
    for _, r in ipairs(readers[k] or {}) do
      waiting[r] = waiting[r] - 1
      if waiting[r] == 0 then ready[#ready + 1] = r end
    end
  end
  assert(#ordered == #list, "matviews: a cycle among materialized views")
  return ordered
end

function matviews.list(db, opts)
  assert(db and db.query, "matviews.list: a Db expected")
  opts = opts or {}
  local wanted, exclude = nil, {}
  if opts.schemas then
    wanted = {}
    for _, s in ipairs(opts.schemas) do wanted[s] = true end
  end
  for _, k in ipairs(opts.exclude or {}) do
    assert(type(k) == "string", "matviews.list: exclude entries are \"schema.name\" strings")
    exclude[k] = true
  end
  local res, err = db:query([[
    select c.oid::bigint as oid, n.nspname as schema, c.relname as name, c.relispopulated as populated,
           pg_total_relation_size(c.oid) as bytes, pg_get_userbyid(c.relowner) as owner,
           ]] .. USABLE_INDEX .. [[ as unique_index
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relkind = 'm'
       and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass
                         and d.objid = c.oid and d.deptype = 'e')]])
  if not res then return nil, err end
  local reads
  reads, err = direct_reads(db)
  if not reads then return nil, err end
  local all, list = {}, {}
  for row in res:rows() do all[row.oid] = row end
  for oid, row in pairs(all) do
    local key = text.key(row.schema, row.name)
    if not catalog.is_system_schema(row.schema) and (not wanted or wanted[row.schema]) and not exclude[key] then
      local deps = {}
      for _, o in ipairs(matviews_read(reads, oid)) do
        if all[o] then deps[#deps + 1] = text.key(all[o].schema, all[o].name) end
      end
      table.sort(deps)
      list[#list + 1] = { schema = row.schema, name = row.name, key = key,
        qualified = pg.qualify(row.schema, row.name), populated = row.populated, bytes = row.bytes,
        owner = row.owner, unique_index = not is_null(row.unique_index) and row.unique_index or nil,
        depends_on = deps }
    end
  end
  return dependency_order(list)
end

-- The target's materialized view now: nil when it is not there.
local function target_state(db, mv)
  local res, err = db:query([[
    select c.relispopulated as populated, ]] .. USABLE_INDEX .. [[ as unique_index
      from pg_class c where c.oid = to_regclass($1) and c.relkind = 'm']], mv.qualified)
  if not res then return nil, err end
  if #res == 0 then return false end
  return { populated = res[1].populated, unique_index = not is_null(res[1].unique_index) and res[1].unique_index or nil }
end

local function fail(target, message, detail, hint, cause)
  return nil, errors.new{ kind = "matviews", where = target.name and target:name() or "target",
    code = cause and cause.code, message = message, detail = detail, hint = hint }
end

local HINTS = {
  ["42501"] = "the role migrun connects to the target as must own the materialized view or be a member of "
    .. "its owner (schema.copy_roles makes it a member of the roles it creates)",
  ["55000"] = "a materialized view it reads is not populated on the target: populate that one first",
}

function matviews.refresh(target, mv, opts)
  assert(target and target.write, "matviews.refresh: a Db expected")
  assert(type(mv) == "table" and mv.qualified and mv.key, "matviews.refresh: an entry of matviews.list expected")
  opts = opts or {}
  local state, err = target_state(target, mv)
  if state == nil then return nil, err end
  if not state then
    if not target.dry_run then
      return fail(target, ("materialized view %s is not on the target"):format(mv.key), nil,
        "restore the schema first (full.lua's schema step), or list it in exclude_tables")
    end
    state = { populated = false } -- a dry run before the schema is restored
  end
  local row = { name = mv.key, dry_run = target.dry_run or nil }
  local sql
  if not mv.populated then
    row.mode = state.populated and "with no data" or "unpopulated"
    if state.populated then sql = "REFRESH MATERIALIZED VIEW " .. mv.qualified .. " WITH NO DATA" end
  elseif opts.concurrently ~= false and state.populated and state.unique_index then
    row.mode = "concurrently"
    sql = "REFRESH MATERIALIZED VIEW CONCURRENTLY " .. mv.qualified
  else
    row.mode = "plain"
    sql = "REFRESH MATERIALIZED VIEW " .. mv.qualified
  end
  if sql then
    local t0 = host.monotonic()
    local ok, werr = target:write(sql)
    if not ok then return nil, werr end
    if not target.dry_run then row.seconds = host.monotonic() - t0 end
  end
  if mv.populated and not target.dry_run and opts.count ~= false then
    local res, cerr = target:query("select count(*)::bigint as n from " .. mv.qualified)
    if not res then return nil, cerr end
    row.rows = res[1].n
  end
  return row
end

local function names(list, from, to)
  local out = {}
  for i = from, to do out[#out + 1] = list[i].key end
  return #out > 0 and table.concat(out, ", ") or "none"
end

function matviews.refresh_all(target, list, opts)
  assert(target and target.write, "matviews.refresh_all: a Db expected")
  assert(type(list) == "table", "matviews.refresh_all: a list from matviews.list expected")
  opts = opts or {}
  local t0 = host.monotonic()
  local out = { rows = {}, refreshed = 0, concurrently = 0, plain = 0, unpopulated = 0 }
  for i, mv in ipairs(list) do
    local row, err = matviews.refresh(target, mv, opts)
    if not row then
      local done = ("done before it: %s; not done: %s"):format(names(list, 1, i - 1), names(list, i, #list))
      if type(err) == "table" and err.kind == "matviews" then
        err.detail = done
        return nil, err
      end
      local code = type(err) == "table" and (err.sqlstate or err.code) or nil
      return fail(target, ("refreshing materialized view %s failed: %s"):format(mv.key,
        type(err) == "table" and err.message or tostring(err)), done,
        (HINTS[code] or "fix the cause") .. "; then run the step again (refreshing again is safe)", { code = code })
    end
    out.rows[#out.rows + 1] = row
    if row.mode == "concurrently" or row.mode == "plain" then
      out.refreshed = out.refreshed + 1
      out[row.mode] = out[row.mode] + 1
    else
      out.unpopulated = out.unpopulated + 1
    end
    if opts.say then
      opts.say(("%s: %s%s%s"):format(mv.key, row.mode == "concurrently" and "REFRESH CONCURRENTLY"
        or row.mode == "plain" and "REFRESH" or row.mode == "with no data" and "REFRESH WITH NO DATA (as on the source)"
        or "left unpopulated (as on the source)",
        row.seconds and (" in " .. text.duration(row.seconds)) or "",
        row.rows and (", " .. text.thousands(row.rows) .. " rows") or ""))
    end
  end
  out.seconds = host.monotonic() - t0
  return out
end

local function or_dash(format)
  return function(v) if v == nil then return "-" end return format and format(v) or tostring(v) end
end

matviews.REFRESH_COLUMNS = { { "name", "materialized view" }, { "mode", "refresh" },
  { "seconds", "took", format = or_dash(text.duration) }, { "rows", "rows", format = or_dash(text.thousands) } }

local function state_of(db, mv)
  local res, err = db:query("select c.relispopulated as populated from pg_class c "
    .. "where c.oid = to_regclass($1) and c.relkind = 'm'", mv.qualified)
  if not res then return nil, err end
  if #res == 0 then return { missing = true, populated = false } end
  return { populated = res[1].populated }
end

local function side(db)
  return db.name and db:name() or "?"
end

-- The qa.row_hash method both sides can use: its "typed" hashes need
-- PostgreSQL 11 or later, "md5" works everywhere; each side choosing its own
-- would make a 10 and a 15 differ on equal rows.
local function hash_method(a_db, b_db)
  for _, d in ipairs{ a_db, b_db } do
    local v, err = pgversion.of(d)
    if not v then return nil, err end
    if not pgversion.has(v, "typed_hashes") then return "md5" end
  end
  return "typed"
end

function matviews.compare(a_db, b_db, mv)
  assert(a_db and a_db.query and b_db and b_db.query, "matviews.compare: two Dbs expected")
  assert(type(mv) == "table" and mv.qualified and mv.key, "matviews.compare: an entry of matviews.list expected")
  local a, err = state_of(a_db, mv)
  if not a then return nil, err end
  local b
  b, err = state_of(b_db, mv)
  if not b then return nil, err end
  local r = { name = mv.key, a = a, b = b }
  if a.missing or b.missing then
    r.equal, r.detail = false, ("missing on the %s"):format(a.missing and side(a_db) or side(b_db))
  elseif not a.populated and not b.populated then
    r.equal, r.detail = true, "not populated on either (WITH NO DATA)"
  elseif a.populated ~= b.populated then
    r.equal, r.detail = false, ("populated on the %s only"):format(a.populated and side(a_db) or side(b_db))
  else
    local method, merr = hash_method(a_db, b_db)
    if not method then return nil, merr end
    for _, s in ipairs{ { a_db, a }, { b_db, b } } do
      local h, herr = qa.row_hash(s[1], mv, { method = method })
      if not h then return nil, herr end
      s[2].rows, s[2].hash = h.rows, h.hash
    end
    r.equal = a.rows == b.rows and a.hash == b.hash
    if not r.equal then
      r.detail = ("%s rows on the %s, %s on the %s%s: the same query over the same tables gives the same rows, so "
        .. "one of them was refreshed before its tables last changed (the source's, if the application has not "
        .. "refreshed it since)"):format(text.thousands(a.rows), side(a_db), text.thousands(b.rows), side(b_db),
        a.rows == b.rows and ", different contents" or "")
    end
  end
  return r
end

matviews.COMPARE_COLUMNS = { "materialized view", "a rows", "b rows", "equal", "detail" }

function matviews.compare_rows(results)
  local rows = {}
  for i, c in ipairs(results) do
    rows[i] = { c.name, c.a.rows and text.thousands(c.a.rows) or (c.a.populated and "?" or "unpopulated"),
      c.b.rows and text.thousands(c.b.rows) or (c.b.populated and "?" or "unpopulated"),
      c.equal and "yes" or "NO", c.detail or "" }
  end
  return rows
end

function matviews.summary(list)
  local s = { count = #list, refreshed = {}, concurrent = {}, without_unique = {}, without_unique_bytes = 0,
              unpopulated = {} }
  for _, mv in ipairs(list) do
    if not mv.populated then
      s.unpopulated[#s.unpopulated + 1] = mv.key
    else
      s.refreshed[#s.refreshed + 1] = mv.key
      if mv.unique_index then
        s.concurrent[#s.concurrent + 1] = mv.key
      else
        s.without_unique[#s.without_unique + 1] = mv.key
        s.without_unique_bytes = s.without_unique_bytes + (mv.bytes or 0)
      end
    end
  end
  return s
end

local function some(keys, n)
  n = n or 5
  local shown = {}
  for i = 1, math.min(#keys, n) do shown[i] = keys[i] end
  return table.concat(shown, ", ") .. (#keys > n and (", and %d more"):format(#keys - n) or "")
end

function matviews.preflight(list)
  local s = matviews.summary(list)
  if s.count == 0 then return nil end
  local msg = ("%d materialized view(s): refreshed after the load and at cutover; %d without a unique index"):format(
    s.count, #s.without_unique)
  if #s.without_unique > 0 then
    msg = msg .. (" (plain REFRESH at cutover: locks readers out, takes as long as rebuilding %s: %s)"):format(
      text.bytes(s.without_unique_bytes), some(s.without_unique))
  end
  if #s.unpopulated > 0 then
    msg = msg .. ("; %d WITH NO DATA on the source, left unpopulated: %s"):format(#s.unpopulated, some(s.unpopulated))
  end
  if #s.without_unique == 0 then return { severity = "note", message = msg } end
  return { severity = "warning", message = msg,
    hint = "a unique index on plain columns (no WHERE) on the source lets the cutover refresh CONCURRENTLY, "
      .. "without locking readers out; or accept that their readers wait during the cutover's refresh" }
end

function matviews.checklist_line(list, result)
  local s = matviews.summary(list)
  if s.count == 0 then return "No materialized views to refresh." end
  local line = ("Materialized views refreshed on the target from its own tables (DMS carries none): %d"):format(
    #s.refreshed)
  local parts = {}
  if result and result.concurrently then
    parts[#parts + 1] = ("%d CONCURRENTLY"):format(result.concurrently)
    parts[#parts + 1] = ("%d plain"):format(result.plain)
  else
    parts[#parts + 1] = ("%d CONCURRENTLY"):format(#s.concurrent)
    parts[#parts + 1] = ("%d plain"):format(#s.without_unique)
  end
  line = line .. " (" .. table.concat(parts, ", ") .. ")"
  if #s.without_unique > 0 then
    line = line .. "; without a unique index, readers wait during the refresh of " .. some(s.without_unique)
  end
  if #s.unpopulated > 0 then
    line = line .. ("; %d left unpopulated as on the source (%s)"):format(#s.unpopulated, some(s.unpopulated))
  end
  if result and result.seconds then
    line = line .. ("; the refresh took %s of the cutover window"):format(text.duration(result.seconds))
  end
  return line .. "."
end

return matviews
