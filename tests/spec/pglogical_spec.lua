-- migrun.pglogical against the lab's real source (PostgreSQL 15 + pglogical):
-- node, slots, sets, tables, decoding through the sets, LSN verification, and
-- the destructive helpers; plus the SQL text of 9.6.
local pg = require "migrun.pg"
local db = require "migrun.db"
local lsn = require "migrun.lsn"
local pgl = require "migrun.pglogical"
local replica = require "migrun.replica"

describe("migrun.pglogical", function()
  local L, src, rep

  local function one(sql, ...)
    return assert(src:query(sql, ...))[1]
  end

  local function count(sql, ...)
    return one(sql, ...).n
  end

  local function sets_of(table_name)
    local res = assert(src:query("select rs.set_name from pglogical.replication_set_table t"
      .. " join pglogical.replication_set rs using (set_id) where t.set_reloid = $1::regclass order by 1", table_name))
    local out = {}
    for row in res:rows() do out[#out + 1] = row.set_name end
    return out
  end

  local function dry(echoed)
    return db.wrap(src.conn, { dry_run = true, echo = function(line) echoed[#echoed + 1] = line end })
  end

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    rep = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
    assert(src:write([[
      create schema s1;
      create table s1.t1 (id int primary key, email text unique, body jsonb);
      create table s1.t2 (v text);  -- no primary key
    ]]))
  end)

  teardown(function()
    if rep then rep:close() end
    if src then src:close() end
    if L then assert(L:stop()) end
  end)

  it("creates the node once, with a dsn that holds no password", function()
    local r1 = assert(pgl.ensure_node(src, "migrun_provider", L.source.conninfo .. " password=hunter2 sslmode=prefer"))
    assert.same({ node = "migrun_provider", created = true }, r1)
    local r2 = assert(pgl.ensure_node(src, "migrun_provider", L.source.conninfo))
    assert.same({ node = "migrun_provider", created = false }, r2)
    assert.equal(1, count("select count(*) as n from pglogical.node"))
    local dsn = one("select if_dsn from pglogical.node_interface").if_dsn
    assert.is_nil(dsn:find("hunter2", 1, true))
    assert.equal(("host='127.0.0.1' port='%d' dbname='app' user='postgres' sslmode='prefer'"):format(L.source.port), dsn)

    local none, err = pgl.ensure_node(src, "someone_else", L.source.conninfo)
    assert.is_nil(none)
    assert.truthy(tostring(err):find('already has the pglogical node "migrun_provider"', 1, true))
  end)

  it("creates a slot once and refuses a same-named slot of another plugin", function()
    local s1 = assert(pgl.create_slot(src, "dms_slot_01"))
    assert.equal("dms_slot_01", s1.slot)
    assert.is_true(s1.created)
    assert.truthy(lsn.is(s1.lsn))
    local s2 = assert(pgl.create_slot(src, "dms_slot_01"))
    assert.is_false(s2.created)
    assert.is_true(s2.lsn == s1.lsn)
    assert.equal(1, count("select count(*) as n from pg_replication_slots where slot_name = 'dms_slot_01'"))

    assert(src:write("select pg_create_logical_replication_slot('dms_slot_td', 'test_decoding')"))
    local bad, err = pgl.create_slot(src, "dms_slot_td")
    assert.is_nil(bad)
    assert.truthy(tostring(err):find("exists with plugin test_decoding, not pglogical", 1, true))
    assert.has_error(function() pgl.create_slot(src, "Bad-Name") end)
  end)

  it("creates the update/delete and insert/truncate sets once", function()
    local r1 = assert(pgl.create_sets(src, "dms_slot_01"))
    assert.same({ { name = "dms_slot_01", created = true }, { name = "idms_slot_01", created = true } }, r1)
    local r2 = assert(pgl.create_sets(src, "dms_slot_01"))
    assert.same({ { name = "dms_slot_01", created = false }, { name = "idms_slot_01", created = false } }, r2)
    local rows = assert(src:query("select set_name, replicate_insert as i, replicate_update as u,"
      .. " replicate_delete as d, replicate_truncate as t from pglogical.replication_set"
      .. " where set_name like '%dms_slot_01' order by 1"))
    assert.equal(2, #rows)
    assert.same({ set_name = "dms_slot_01", i = false, u = true, d = true, t = false }, rows[1])
    assert.same({ set_name = "idms_slot_01", i = true, u = false, d = false, t = true }, rows[2])
  end)

  it("adds tables to both sets, a table without a primary key only to the insert set, with a warning", function()
    local said = {}
    local r = assert(pgl.add_tables(src, "dms_slot_01", { "s1.t1", { schema = "s1", name = "t2" } },
      { say = function(l) said[#said + 1] = l end }))
    assert.same({ "s1.t1", "s1.t2" }, r.added)
    assert.same({ "s1.t2" }, r.insert_only)
    assert.same({}, r.already)
    assert.same({ "dms_slot_01", "idms_slot_01" }, sets_of("s1.t1"))
    assert.same({ "idms_slot_01" }, sets_of("s1.t2"))
    assert.equal(1, #said)
    assert.truthy(said[1]:find("s1.t2 has no primary key", 1, true))
    assert.truthy(said[1]:find("UPDATEs and DELETEs will not replicate", 1, true))

    local again = assert(pgl.add_tables(src, "dms_slot_01", { "s1.t1", "s1.t2" }))
    assert.same({}, again.added)
    assert.same({ "s1.t1", "s1.t2" }, again.already)
    assert.same({ "dms_slot_01", "idms_slot_01" }, sets_of("s1.t1"))

    local missing, err = pgl.add_tables(src, "dms_slot_01", { "s1.nope" })
    assert.is_nil(missing)
    assert.truthy(tostring(err):find("table s1.nope does not exist", 1, true))
  end)

  it("decodes changes through the slot with both set names", function()
    assert(src:write("insert into s1.t1 values (1, 'a@x', '{\"k\": 1}'), (2, 'b@x', null)"))
    assert(src:write("update s1.t1 set email = 'aa@x' where id = 1"))
    assert(src:write("delete from s1.t1 where id = 2"))
    assert(src:write("insert into s1.t2 values ('no pk')"))
    local res = assert(src:query("select data from pg_logical_slot_peek_changes('dms_slot_01', null, null,"
      .. " 'min_proto_version', '1', 'max_proto_version', '1', 'startup_params_format', '1',"
      .. " 'proto_format', 'json', 'pglogical.replication_set_names', 'dms_slot_01,idms_slot_01')"))
    local seen = {}
    for row in res:rows() do
      local action = row.data:match('"action":%s*"(%a)"')
      local rel = row.data:match('"relation":%s*%["([^"]+)",%s*"([^"]+)"%]') and
        table.concat({ row.data:match('"relation":%s*%["([^"]+)",%s*"([^"]+)"%]') }, ".")
      if rel then seen[#seen + 1] = action .. " " .. rel end
    end
    assert.same({ "I s1.t1", "I s1.t1", "U s1.t1", "D s1.t1", "I s1.t2" }, seen)
  end)

  it("verifies a replay LSN captured on the paused replica with a bounded peek", function()
    assert(L:wait_replica_caught_up(30))
    local at = assert(replica.pause(rep, { timeout = 30, poll = 0.05 }))
    local ok, v = pcall(pgl.verify_lsn, src, "dms_slot_01", at, { max_changes = 100 })
    assert(replica.resume(rep))
    assert.is_true(ok, tostring(v))
    assert.truthy(v, "verify_lsn failed")
    assert.is_true(v.ok)
    assert.is_true(v.confirmed_flush_lsn <= at)
    assert.is_true(v.peeked >= 6) -- startup row, B/C pairs and the five changes
    -- The string form works too and max_changes bounds the rows returned.
    local small = assert(pgl.verify_lsn(src, "dms_slot_01", tostring(at), { max_changes = 1 }))
    assert.is_true(small.peeked < v.peeked)
  end)

  it("fails clearly for an LSN before confirmed_flush_lsn and for a missing slot", function()
    local v, err = pgl.verify_lsn(src, "dms_slot_01", lsn("0/10"))
    assert.is_nil(v)
    assert.truthy(tostring(err):find("after the captured LSN 0/10", 1, true))
    assert.truthy(tostring(err):find("CDC from this LSN would miss them", 1, true))
    v, err = pgl.verify_lsn(src, "dms_slot_77", lsn("0/10"))
    assert.is_nil(v)
    assert.truthy(tostring(err):find("replication slot dms_slot_77 does not exist", 1, true))
    -- sets missing: the peek itself fails, and says why
    assert(pgl.create_slot(src, "dms_slot_02"))
    local here = one("select pg_current_wal_lsn() as l").l
    v, err = pgl.verify_lsn(src, "dms_slot_02", here)
    assert.is_nil(v)
    assert.truthy(tostring(err):find("does not decode up to", 1, true))
    assert(pgl.drop_slot(src, "dms_slot_02"))
  end)

  it("lists slots with ownership and retained bytes", function()
    local before = assert(pgl.slots(src, { prefix = "dms_slot_" }))
    local by = {}
    for _, s in ipairs(before) do by[s.name] = s end
    assert.is_true(by.dms_slot_01.owned)
    assert.equal("pglogical", by.dms_slot_01.plugin)
    assert.is_false(by.dms_slot_01.active)
    assert.equal("app", by.dms_slot_01.database)
    assert.is_false(by.dms_slot_td.owned) -- the prefix, but not pglogical
    assert.equal("integer", math.type(by.dms_slot_01.retained_bytes))
    assert(src:write("insert into s1.t2 select repeat('x', 100) from generate_series(1, 2000)"))
    local after = assert(pgl.slots(src, { prefix = "other_" }))
    for _, s in ipairs(after) do
      assert.is_false(s.owned)
      if s.name == "dms_slot_01" then assert.is_true(s.retained_bytes > by.dms_slot_01.retained_bytes) end
    end
  end)

  it("drops slot, sets and node idempotently, and refuses an active slot", function()
    assert(pgl.create_slot(src, "dms_slot_09"))
    assert(pgl.create_sets(src, "dms_slot_09"))
    assert(pgl.add_tables(src, "dms_slot_09", { "s1.t1" }))
    assert.equal("dropped", assert(pgl.drop_slot(src, "dms_slot_09")))
    assert.equal("absent", assert(pgl.drop_slot(src, "dms_slot_09")))
    assert.equal(2, assert(pgl.drop_sets(src, "dms_slot_09")))
    assert.equal(0, assert(pgl.drop_sets(src, "dms_slot_09")))
    assert.equal(0, count("select count(*) as n from pglogical.replication_set where set_name like '%dms_slot_09'"))
    assert.same({ "dms_slot_01", "idms_slot_01" }, sets_of("s1.t1"))

    -- an active slot: a walsender streaming it (pg_recvlogical) holds it
    assert(src:write("select pg_create_logical_replication_slot('dms_slot_08', 'test_decoding')"))
    local proc = require "migrun.proc"
    local h = assert(proc.spawn{ L.bin .. "/pg_recvlogical", "-h", "127.0.0.1", "-p", tostring(L.source.port),
      "-U", "postgres", "-d", "app", "-S", "dms_slot_08", "--start", "-f", "/dev/null", stdout = "null", stderr = "null" })
    local deadline = require("migrun.host").monotonic() + 20
    while not one("select active from pg_replication_slots where slot_name = 'dms_slot_08'").active do
      assert(require("migrun.host").monotonic() < deadline, "pg_recvlogical did not attach")
      require("socket").sleep(0.05)
    end
    local dropped, err = pgl.drop_slot(src, "dms_slot_08")
    h:close()
    assert.is_nil(dropped)
    assert.truthy(tostring(err):find("replication slot dms_slot_08 is active", 1, true))
  end)

  it("in a dry run creates nothing and echoes every write", function()
    local echoed = {}
    local d = dry(echoed)
    local s = assert(pgl.create_slot(d, "dms_slot_05"))
    assert.is_false(s.created)
    assert.is_nil(s.lsn)
    assert(pgl.create_sets(d, "dms_slot_05"))
    -- table membership is read from the catalog: the dry-run sets do not exist, every add is echoed
    local r = assert(pgl.add_tables(d, "dms_slot_05", { "s1.t1", "s1.t2" }))
    assert.same({ "s1.t2" }, r.insert_only)
    assert.equal("absent", assert(pgl.drop_node(d, "not_there")))
    assert.equal("would drop", assert(pgl.drop_node(d, "migrun_provider")))
    assert.equal(2, assert(pgl.drop_sets(d, "dms_slot_01")))
    assert.equal("would drop", assert(pgl.drop_slot(d, "dms_slot_01")))
    assert.equal(0, count("select count(*) as n from pg_replication_slots where slot_name = 'dms_slot_05'"))
    assert.equal(0, count("select count(*) as n from pglogical.replication_set where set_name like '%dms_slot_05'"))
    assert.equal(1, count("select count(*) as n from pglogical.node"))
    assert.equal(1, count("select count(*) as n from pg_replication_slots where slot_name = 'dms_slot_01'"))
    assert.equal(2, count("select count(*) as n from pglogical.replication_set where set_name like '%dms_slot_01'"))
    assert.equal(10, #echoed)
    assert.equal("source: select slot_name, lsn from pg_create_logical_replication_slot($1, 'pglogical')  -- $1=dms_slot_05",
      echoed[1])
    assert.truthy(echoed[2]:find("pglogical.create_replication_set(set_name := $1", 1, true))
    assert.truthy(echoed[2]:find("$1=dms_slot_05, $2=false, $3=true, $4=true, $5=false", 1, true))
    assert.truthy(echoed[3]:find("$1=idms_slot_05, $2=true, $3=false, $4=false, $5=true", 1, true))
    assert.truthy(echoed[4]:find("replication_set_add_table", 1, true))
    assert.truthy(echoed[6]:find("$1=idms_slot_05, $2=\"s1\".\"t2\"", 1, true))
    assert.truthy(echoed[7]:find("pglogical.drop_node", 1, true))
  end)

  it("drops the node idempotently", function()
    assert(pgl.drop_slot(src, "dms_slot_01"))
    assert(pgl.drop_sets(src, "dms_slot_01"))
    assert.equal("dropped", assert(pgl.drop_node(src, "migrun_provider")))
    assert.equal("absent", assert(pgl.drop_node(src, "migrun_provider")))
    assert.equal(0, count("select count(*) as n from pglogical.node"))
  end)

  it("writes the 9.6 SQL with the xlog/location names", function()
    local s = pgl.sql(90624)
    assert.equal("select slot_name, xlog_position as lsn from pg_create_logical_replication_slot($1, 'pglogical')",
      s.create_slot)
    assert.truthy(s.slots:find("pg_xlog_location_diff(pg_current_xlog_location(), restart_lsn)", 1, true))
    assert.equal("location", s.peek_lsn_column)
    assert.truthy(s.peek:find("pg_logical_slot_peek_changes($1, $2::pg_lsn, $3::int,", 1, true))
    local s15 = pgl.sql(150020)
    assert.truthy(s15.slots:find("pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)", 1, true))
    assert.equal("select slot_name, lsn from pg_create_logical_replication_slot($1, 'pglogical')", s15.create_slot)
  end)

  it("builds node dsns without secrets", function()
    assert.equal("host='db.example' port='5432' dbname='app' user='mig\\'r'",
      assert(pgl.node_dsn("postgresql://mig%27r:pw@db.example:5432/app?application_name=x")))
  end)
end)
