-- Issue 23: the migration across PostgreSQL versions, on real clusters of each
-- (`make test-matrix`, one pair a run: MIGRUN_MATRIX_PAIR=13-17). The awkward
-- schema (migrun.rehearsal.awkward) under a write workload, from a source of
-- one major (and its maintenance replica, with pglogical) into an RDS-like
-- target of another: full.lua to READY FOR CUTOVER (schema, full load, DMS
-- CDC through the emulator, which reads the source's pglogical), cutover.lua
-- to the end; then, with our own SQL: every table equal by count and row
-- hash, every sequence ahead of the source, the definitions full.lua changed
-- for DMS as on the source again, and the versions the clusters really ran.
local demo = require "migrun.rehearsal.demo"
local H = require "helpers.rehearsal"
local pg = require "migrun.pg"
local pgversion = require "migrun.pgversion"
local awkward = require "migrun.rehearsal.awkward"

local pair = os.getenv("MIGRUN_MATRIX_PAIR") or "13-17"
local SOURCE, TARGET = pair:match("^(%d+)%-(%d+)$")
assert(SOURCE, "MIGRUN_MATRIX_PAIR is <source major>-<target major>, e.g. 13-17; got " .. pair)
SOURCE, TARGET = tonumber(SOURCE), tonumber(TARGET)

describe(("the migration from PostgreSQL %d into PostgreSQL %d"):format(SOURCE, TARGET), function()
  local R

  setup(function()
    local dir = H.tmpdir("matrix-" .. pair)
    local err
    R, err = demo.rehearsal{ dir = dir, scale = 0.2, name = "matrix", sample = "migrun.rehearsal.awkward",
      lab = { source = SOURCE, target = TARGET },
      config = { cutover = { stop_writes = "read_only", existing_sessions = "terminate", sessions_timeout = 30,
        sequence_margin = 1000, apply_timeout = 300 } },
      dms = { delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, connection = 0.1, cdc_poll = 0.1,
        endpoint_delete = 0.1, task_delete = 0.1, task_modify = 0.1 } } }
    assert(R, tostring(err) .. "\n(the servers of other majors: tools/install-pg-versions)")
  end)
  teardown(function() if R then R:close() end end)

  local function rows(cluster, sql, ...)
    local c = H.connect(cluster, "test")
    local res = assert(c:exec(sql, ...))
    local out = {}
    for r in res:rows() do out[#out + 1] = r end
    c:close()
    return out
  end
  local function one(cluster, sql, ...) return rows(cluster, sql, ...)[1] end

  local function fingerprint(cluster, schema, name)
    return one(cluster, ([[select count(*) as n, coalesce(md5(string_agg(h, '' order by h)), '') as hash
      from (select md5(t::text) as h from %s t) x]]):format(pg.qualify(schema, name)))
  end
  -- What full.lua changes for DMS (identities, generated columns, triggers,
  -- row-level security) and the foreign keys, as the catalog says it now.
  local function definitions(cluster)
    local out = {}
    for _, r in ipairs(rows(cluster, [[
      select n.nspname || '.' || c.relname || '.' || a.attname as k,
             a.attidentity::text || '/' || a.attgenerated::text || '/' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') as v
        from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
       where n.nspname in ('Sales Ops', 'public') and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped
         and (a.attidentity <> '' or a.attgenerated <> '')
      union all
      select n.nspname || '.' || c.relname || ' trigger ' || t.tgname, t.tgenabled::text
        from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
       where n.nspname in ('Sales Ops', 'public') and not t.tgisinternal
      union all
      select n.nspname || '.' || c.relname || ' rls', c.relrowsecurity::text || '/' || c.relforcerowsecurity::text
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where n.nspname in ('Sales Ops', 'public') and c.relkind in ('r', 'p') and c.relname not like 'awsdms%'
      union all
      select n.nspname || '.' || con.conname, con.convalidated::text || '/' || pg_get_constraintdef(con.oid)
        from pg_constraint con join pg_namespace n on n.oid = con.connamespace
       where n.nspname = 'Sales Ops' and con.contype = 'f']])) do
      out[r.k] = r.v
    end
    return out
  end

  it(("carries the awkward schema under writes from %d into %d, every table equal"):format(SOURCE, TARGET), function()
    -- the clusters are of the versions asked for
    local versions = {}
    for _, c in ipairs{ R.lab.source, R.lab.replica, R.lab.target } do
      local v = one(c, "select current_setting('server_version_num')::int as v").v
      versions[c.name] = pgversion.major(v)
      print(("\n%s: %s"):format(c.name, pgversion.label(v)))
    end
    assert.same({ source = SOURCE, replica = SOURCE, target = TARGET }, versions)
    assert.is_false(one(R.lab.target, "select rolsuper from pg_roles where rolname = 'migrun'").rolsuper)

    R:start_workload{ rate = 20 }
    local full = H.run(R, "full.lua", { "--yes" })
    assert.is_true(full.ok, full.output)
    assert.truthy(full.output:find("READY FOR CUTOVER", 1, true), full.output)
    -- preflight named both versions
    assert.truthy(full.output:find(("PostgreSQL %d%%.%%d+"):format(SOURCE)), full.output)
    assert.truthy(full.output:find(("PostgreSQL %d%%.%%d+"):format(TARGET)), full.output)

    local c = H.run(R, "cutover.lua", { "--yes" })
    assert.is_true(c.ok, c.output)
    local workload = R:stop_workload()
    assert.is_true(tonumber(workload:match("workload: (%d+) transactions") or 0) > 20, workload)

    -- every table and partition: the same rows
    local checked, differ = 0, {}
    for _, t in ipairs(awkward.tables()) do
      local a, b = fingerprint(R.lab.source, t[1], t[2]), fingerprint(R.lab.target, t[1], t[2])
      checked = checked + 1
      if a.n ~= b.n or a.hash ~= b.hash then
        differ[#differ + 1] = ("%s.%s: source %d rows %s, target %d rows %s"):format(t[1], t[2], a.n, a.hash, b.n, b.hash)
      end
      assert.is_true(a.n > 0, t[1] .. "." .. t[2] .. " has no rows")
    end
    assert.equal(0, #differ, table.concat(differ, "\n"))
    assert.equal(11, checked)
    print(("%d tables equal by count and hash"):format(checked))

    -- every sequence ahead of the source
    local seqs = rows(R.lab.source, [[select schemaname || '.' || sequencename as s, last_value as v from pg_sequences
      where schemaname in ('Sales Ops', 'public')]])
    assert.is_true(#seqs >= 4)
    for _, s in ipairs(seqs) do
      local t = one(R.lab.target, [[select last_value as v from pg_sequences where schemaname || '.' || sequencename = $1]], s.s)
      assert.truthy(t and t.v ~= pg.null, s.s .. " not set on the target")
      if s.v ~= pg.null then assert.is_true(t.v > s.v, ("%s: target %s, source %s"):format(s.s, tostring(t.v), tostring(s.v))) end
    end
    print(("%d sequences ahead of the source"):format(#seqs))

    -- the definitions as on the source
    local src_defs, tgt_defs = definitions(R.lab.source), definitions(R.lab.target)
    assert.same(src_defs, tgt_defs)
    assert.equal("a//", tgt_defs["Sales Ops.Order.id"])
    print("definitions equal")

    assert.equal(0, one(R.lab.target, "select count(*) as n from awsdms_apply_exceptions").n)
  end)
end)
