-- Issue 23: every query whose SQL depends on the server's version
-- (migrun.pgversion), run against real servers of 13 (Debian 11, pglogical
-- 2.3), 15 (Debian 12, pglogical 2.4) and 17 (npm's embedded-postgres, no
-- pglogical, as RDS), each printing the version it ran against; and
-- preflight's answer for a source newer than the target. `make test-matrix`
-- (the servers: tools/install-pg-versions).
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local pgversion = require "migrun.pgversion"
local catalog = require "migrun.catalog"
local chunks = require "migrun.chunks"
local fidelity = require "migrun.fidelity"
local rowhash = require "migrun.rowhash"
local replica = require "migrun.replica"
local pgl = require "migrun.pglogical"
local watch = require "migrun.watch"
local schema = require "migrun.schema"
local preflight = require "migrun.preflight"

-- Partitioned, generated, identity, a covering key, and a text key big enough to split.
local SCHEMA = [[
  create schema v;
  create table v.items (id int generated always as identity, qty int not null, price int not null,
                        total int generated always as (qty * price) stored, note text,
                        primary key (id) include (note));
  insert into v.items (qty, price, note) select g, 2, 'n' || g from generate_series(1, 100) g;
  create table v.events (id bigint not null, at date not null, primary key (id, at)) partition by range (at);
  create table v.events_old partition of v.events for values from ('2000-01-01') to ('2020-01-01');
  insert into v.events values (1, '2010-01-01');
  create table v.words (w text primary key, pad text);
  insert into v.words select 'w' || g, repeat('x', 200) from generate_series(1, 2000) g;
  analyze;
]]

describe("the queries that differ by PostgreSQL version", function()
  local A, B -- A: 13 primary and replica, 17 target; B: 15 everywhere
  local servers = {}
  local conns = {}

  local function wrap(cluster, name)
    local c = assert(pg.connect(cluster.conninfo, { name = name }))
    conns[#conns + 1] = c
    return db.wrap(c)
  end

  setup(function()
    local err
    A, err = lab.start{ source = 13, target = 17 }
    assert(A, tostring(err) .. "\n(the servers of other majors: tools/install-pg-versions)")
    B = assert(lab.start{})
    for _, c in ipairs{ A.source, B.source, A.target } do assert(c:psql(SCHEMA)) end
    servers = {
      { name = "13 primary", cluster = A.source, writable = true, pglogical = true },
      { name = "15 primary", cluster = B.source, writable = true, pglogical = true },
      { name = "17 target", cluster = A.target, writable = true },
    }
    for _, s in ipairs(servers) do
      s.db = wrap(s.cluster, s.name)
      s.version = assert(pgversion.of(s.db))
    end
    assert.equal(13, pgversion.major(servers[1].version))
    assert.equal(15, pgversion.major(servers[2].version))
    assert.equal(17, pgversion.major(servers[3].version))
  end)
  teardown(function()
    for _, c in ipairs(conns) do c:close() end
    if A then A:stop() end
    if B then B:stop() end
  end)

  local function ran(s, what) print(("\n%s ran against %s (%s)"):format(what, pgversion.label(s.version), s.name)) end

  it("catalog.tables: generated columns (12+), covering keys (indnkeyatts, 11+), partitions (10+)", function()
    for _, s in ipairs(servers) do
      local by = {}
      for _, t in ipairs(assert(catalog.tables(s.db, { schemas = { "v" } }))) do by[t.key] = t end
      assert.same({ "id" }, by["v.items"].pk_columns) -- note is INCLUDEd, not a key column
      local total
      for _, c in ipairs(by["v.items"].columns) do if c.name == "total" then total = c end end
      assert.is_true(total.generated)
      assert.equal("v.events", by["v.events_old"].partition_of)
      ran(s, "catalog.tables")
    end
  end)

  it("chunks.plan: generated columns left out (12+), block ranges only with TID range scans (14+)", function()
    for _, s in ipairs(servers) do
      local d = assert(chunks.describe(s.db, { schema = "v", name = "items" }))
      assert.same({ "id", "qty", "price", "note" }, d.columns)
      local plan, why = chunks.plan(s.db, { schema = "v", name = "words" }, { chunk_bytes = 8192 * 8, split_bytes = 8192 * 8 })
      if pgversion.has(s.version, "tid_range_scan") then
        assert.is_table(plan, tostring(why))
        assert.equal("blocks", plan.method)
        assert.is_true(plan.count >= 2)
      else
        assert.is_false(plan)
        assert.truthy(why:find("TID range scans (PostgreSQL 14; this is PostgreSQL 13.", 1, true), why)
      end
      ran(s, "chunks.plan")
    end
  end)

  it("fidelity.inspect: generated (12+) and identity (10+) columns", function()
    for _, s in ipairs(servers) do
      local plan = assert(fidelity.inspect(s.db, { schemas = { "v" } }))
      local seen = {}
      for _, f in ipairs(plan.findings) do seen[f.feature] = (seen[f.feature] or 0) + 1 end
      assert.equal(1, seen["generated column"])
      assert.equal(1, seen["identity column"])
      ran(s, "fidelity.inspect")
    end
  end)

  it("rowhash.method: typed 64-bit hashes (11+) on both sides, the same hash on every version", function()
    local hashes = {}
    for _, s in ipairs(servers) do
      assert.equal("typed", assert(rowhash.method(s.db, servers[1].db)))
      local qa = require "migrun.qa"
      hashes[#hashes + 1] = assert(qa.row_hash(s.db, { schema = "v", name = "words" })).hash
      ran(s, "rowhash.method and qa.row_hash")
    end
    assert.equal(hashes[1], hashes[2])
    assert.equal(hashes[1], hashes[3])
  end)

  it("watch: a pglogical slot's position (wal_status, 13+) and its changes through pglogical's JSON", function()
    for _, s in ipairs(servers) do
      if s.pglogical then
        local slot = "v_watch"
        assert(pgl.ensure_node(s.db, "migrun_provider", pgl.node_dsn(s.cluster.conninfo)))
        assert(watch.ensure(s.db, slot))
        assert(pgl.create_sets(s.db, slot))
        assert(pgl.add_tables(s.db, slot, { "v.items" }))
        local pos = assert(watch.position(s.db, slot))
        assert.equal(pgversion.has(s.version, "wal_status") and "reserved" or nil, pos.wal_status)
        assert(s.db:write("update v.items set qty = qty + 1 where id in (3, 7)"))
        local seen = assert(watch.changes(s.db, slot, table.concat({ pgl.set_names(slot) }, ","), { ["v.items"] = { "id" } }))
        table.sort(seen.tables["v.items"].keys)
        assert.same({ "[3]", "[7]" }, seen.tables["v.items"].keys)
        assert(watch.advance(s.db, slot, seen.upto, table.concat({ pgl.set_names(slot) }, ",")))
        assert.equal("dropped", watch.drop(s.db, slot))
        assert(pgl.drop_sets(s.db, slot))
        ran(s, ("watch.position, watch.changes (pglogical %s)"):format(
          assert(s.db:query("select extversion as v from pg_extension where extname = 'pglogical'"))[1].v))
      end
    end
  end)

  it("replica: status, pause (pause state 14+; before, the flag and a replay LSN that holds still) and resume", function()
    for _, r in ipairs{ { cluster = A.replica, name = "13 replica" }, { cluster = B.replica, name = "15 replica" } } do
      local d = wrap(r.cluster, r.name)
      r.version = assert(pgversion.of(d))
      local st = assert(replica.status(d))
      assert.is_true(st.in_recovery)
      assert.equal("not paused", st.pause_state)
      assert.truthy(st.upstream and st.upstream.port) -- sender_port (11+)
      local at = assert(replica.pause(d, { timeout = 30 }))
      assert.equal("paused", assert(replica.status(d)).pause_state)
      assert.equal(tostring(at), tostring(assert(replica.status(d)).replay_lsn))
      assert(replica.resume(d))
      assert.equal("not paused", assert(replica.status(d)).pause_state)
      ran(r, "replica.status, replica.pause, replica.resume")
    end
  end)

  it("schema.tools: the pg_dump PostgreSQL's rule gives each pair", function()
    local cases = {
      { 13, 15, "15", "the target's major" }, { 13, 17, "15", "older than the target" },
      { 15, 17, "15", "older than the target" }, { 15, 15, "15", "the target's major" },
      { 13, 13, "13", "the target's major" },
    }
    for _, c in ipairs(cases) do
      local t = assert(schema.tools(c[2], { source = c[1] }))
      assert.equal(c[3], t.major, ("%d -> %d"):format(c[1], c[2]))
      assert.equal(c[4], t.rule)
      -- the tool runs (Debian 11's 13 through its LD_LIBRARY_PATH)
      local ok, _, _, out = require("migrun.proc").run{ t.pg_dump, "--version", env = t.env }
      assert.is_true(ok)
      assert.truthy(out:find("PostgreSQL) " .. c[3] .. ".", 1, true), out)
    end
    local none, err = schema.tools(15, { source = 17 }) -- no pg_dump serves 17 -> 15
    assert.is_nil(none)
    assert.truthy(tostring(err):find("newer than the target's 15", 1, true), tostring(err))
  end)

  it("preflight refuses a source newer than the target, and says why", function()
    -- B's 15 as the source, A's 13 primary as the target
    local r = preflight.run{ source = servers[2].db, replica = wrap(B.replica, "15 replica"),
      target = servers[1].db, config = { schemas = { "v" } } }
    local f
    for _, x in ipairs(r.findings) do if x.server == "target" and x.check == "version" then f = x end end
    assert.is_false(f.ok)
    assert.equal("error", f.severity)
    assert.equal("source PostgreSQL 15." .. (servers[2].version % 100)
      .. " is newer than target PostgreSQL 13." .. (servers[1].version % 100)
      .. ": a migration never goes to an older major", f.message)
    assert.truthy(f.hint:find("pg_dump refuses a server newer than itself", 1, true), f.hint)
    assert.truthy(f.hint:find("PostgreSQL 15 or later", 1, true), f.hint)
    assert.is_true(r.errors > 0)
    -- and no pg_dump is chosen for a pair that is refused
    for _, x in ipairs(r.findings) do assert.are_not.equal("pg_dump", x.check) end
    print("\n" .. f.message .. "\n  " .. f.hint)
  end)
end)
