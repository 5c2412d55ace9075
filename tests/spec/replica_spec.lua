-- migrun.replica against the lab's real streaming replica (PostgreSQL 15), and
-- the SQL text of older versions (9.6, 13) that only the name mapping can test.
local pg = require "migrun.pg"
local db = require "migrun.db"
local lsn = require "migrun.lsn"
local replica = require "migrun.replica"

describe("migrun.replica", function()
  local L, src, rep

  local function count_on(d, tbl)
    return assert(d:query("select count(*) as n from " .. tbl))[1].n
  end

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    rep = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
    assert(src:write("create table replica_t (id int primary key)"))
    assert(L:wait_replica_caught_up(30))
  end)

  teardown(function()
    if rep then rep:close() end
    if src then src:close() end
    if L then assert(L:stop()) end
  end)

  it("reports a streaming standby of the source", function()
    local st = assert(replica.status(rep))
    assert.is_true(st.in_recovery)
    assert.equal("not paused", st.pause_state)
    assert.truthy(lsn.is(st.replay_lsn))
    assert.truthy(lsn.is(st.receive_lsn))
    assert.equal("streaming", st.upstream.status)
    assert.equal("127.0.0.1", st.upstream.host)
    assert.equal(L.source.port, st.upstream.port)
    local sst = assert(replica.status(src))
    assert.is_false(sst.in_recovery)
    assert.is_nil(sst.pause_state)
    assert.equal(sst.system_identifier, st.system_identifier)
    assert.truthy(st.system_identifier:match("^%d+$"))
  end)

  it("pauses, captures the replay LSN once paused, hides later writes, and resumes", function()
    assert(src:write("insert into replica_t select generate_series(1, 10)"))
    assert(L:wait_replica_caught_up(30))
    local at = assert(replica.pause(rep, { timeout = 30, poll = 0.05 }))
    assert.truthy(lsn.is(at))
    local st = assert(replica.status(rep))
    assert.equal("paused", st.pause_state)
    assert.is_true(at == st.replay_lsn)

    -- Writes on the source after the pause do not reach the replica's data.
    assert(src:write("insert into replica_t select generate_series(11, 20)"))
    local source_lsn = assert(src:query("select pg_current_wal_lsn() as l"))[1].l
    assert.is_true(source_lsn > at)
    local socket = require "socket"
    socket.sleep(0.3)
    assert.equal(10, count_on(rep, "replica_t"))
    assert.is_true(at == assert(replica.status(rep)).replay_lsn)

    -- Pausing again (a resumed run) returns the same LSN and writes nothing.
    local echoed = {}
    local again = assert(replica.pause(db.wrap(rep.conn, { dry_run = true, echo = function(l) echoed[#echoed + 1] = l end })))
    assert.is_true(again == at)
    assert.same({}, echoed)

    assert.is_true(assert(replica.resume(rep)))
    assert(L:wait_replica_caught_up(30))
    assert.equal(20, count_on(rep, "replica_t"))
    assert.equal("not paused", assert(replica.status(rep)).pause_state)
    -- resume is idempotent
    assert.is_true(assert(replica.resume(rep)))
  end)

  it("refuses a primary with a message saying what to do", function()
    local at, err = replica.pause(src)
    assert.is_nil(at)
    assert.equal("replica", err.kind)
    assert.truthy(tostring(err):find("is not in recovery: it is a primary", 1, true))
    assert.truthy(tostring(err):find("replica.conninfo", 1, true))
    local ok, err2 = replica.resume(src)
    assert.is_nil(ok)
    assert.truthy(tostring(err2):find("it is a primary", 1, true))
  end)

  it("with after, pauses only once replay has passed that LSN, and refuses an earlier pause", function()
    assert(src:write("insert into replica_t select g from generate_series(1000, 1999) g"))
    local written = assert(src:query("select pg_current_wal_lsn() as l"))[1].l
    local at = assert(replica.pause(rep, { after = written, timeout = 30 }))
    assert.is_true(at >= written)
    assert.equal(1000, count_on(rep, "replica_t where id >= 1000 and id < 2000"))
    -- already paused, but before a later point: someone else's pause, refused
    assert(src:write("insert into replica_t values (2000)"))
    local later = assert(src:query("select pg_current_wal_lsn() as l"))[1].l
    local again, err = replica.pause(rep, { after = later })
    assert.is_nil(again)
    assert.truthy(tostring(err):find("where the replication slots begin", 1, true))
    assert(replica.resume(rep))
  end)

  it("in a dry run echoes the pause and leaves replay running", function()
    local echoed = {}
    local dry = db.wrap(rep.conn, { dry_run = true, echo = function(l) echoed[#echoed + 1] = l end })
    local at = assert(replica.pause(dry))
    assert.truthy(lsn.is(at))
    assert.same({ "replica: select pg_wal_replay_pause()" }, echoed)
    assert.equal("not paused", assert(replica.status(rep)).pause_state)
  end)

  it("times out with a clear error when replay does not stop", function()
    -- Stability needs two polls; with no time for a second one the wait gives up.
    local at, err = replica.pause(rep, { timeout = 0, poll = 0.01 })
    assert.is_nil(at)
    assert.equal("timeout", err.kind)
    assert.truthy(tostring(err):find("replay did not stop within 0s", 1, true))
    assert(replica.resume(rep))
  end)

  describe("SQL of older servers", function()
    it("uses the xlog/location names and the pause flag on 9.6", function()
      local s = replica.sql(90624)
      assert.equal("select pg_xlog_replay_pause()", s.pause)
      assert.equal("select pg_xlog_replay_resume()", s.resume)
      assert.equal("select case when pg_is_xlog_replay_paused() then 'paused' else 'not paused' end as pause_state,"
        .. " pg_last_xlog_replay_location() as replay_lsn, pg_last_xlog_receive_location() as receive_lsn", s.standby)
      assert.truthy(s.receiver:find("null::text as sender_host", 1, true))
    end)
    it("uses the wal names but the pause flag on 13, the pause state on 14+", function()
      local s13 = replica.sql(130010)
      assert.equal("select pg_wal_replay_pause()", s13.pause)
      assert.truthy(s13.standby:find("case when pg_is_wal_replay_paused()", 1, true))
      assert.truthy(s13.receiver:find("sender_host, sender_port", 1, true))
      local s15 = replica.sql(150020)
      assert.truthy(s15.standby:find("^select pg_get_wal_replay_pause_state%(%) as pause_state"))
    end)
  end)
end)
