-- migrun.db when a server restarts under it (issue 24; docs/faults.md): a Db
-- given a way to connect again rides out what is safe (a read, a BEGIN) and
-- refuses what is not (a write whose outcome is unknown is not run twice; a
-- transaction whose connection was lost cannot commit half of itself). And
-- the journal that cannot be written says where and what to do.
local lab = require "migrun.rehearsal.lab"
local db = require "migrun.db"
local pg = require "migrun.pg"
local fence = require "migrun.fence"
local journal = require "migrun.playbook.journal"

describe("migrun.db under faults", function()
  local L

  setup(function()
    L = assert(lab.start{})
    assert(L.target:psql("create table t (x int)"))
  end)

  teardown(function()
    if L then L:stop() end
  end)

  local function wrap(said)
    local open = function() return pg.connect(L.target.conninfo, { name = "target" }) end
    return db.wrap(assert(open()), { reopen = open, reconnect_timeout = 60,
      on_reconnect = function(line) said[#said + 1] = line end })
  end
  local function count() return tonumber(assert(L.target:psql("select count(*) from t"))) end

  it("runs a read lost to a restart again on a new connection, and says so", function()
    local said = {}
    local d = wrap(said)
    local cue = assert(L.target:restart{ mode = "fast", after = 0.3 })
    local res = assert(d:query("select pg_sleep(2), 42 as x"))
    assert(cue:wait(60))
    assert.equal(42, res[1].x)
    assert.equal(1, d.reconnects)
    assert.matches("the target's connection was lost %(connection lost: .*%); connected again after", said[1])
    d:close()
  end)

  it("does not run a write lost outside a transaction again; the next statement runs on a new connection", function()
    local d = wrap({})
    local cue = assert(L.target:restart{ mode = "immediate", after = 0.3 })
    local res, err = d:write("insert into t select 1 from pg_sleep(2)")
    assert(cue:wait(60))
    assert.is_nil(res)
    assert.is_true(err.lost)
    assert.equal(0, count()) -- never run twice
    assert(d:write("insert into t values (2)"))
    assert.equal(1, count())
    assert(d:write("truncate t"))
    d:close()
  end)

  it("refuses the rest of a transaction whose connection was lost until its ROLLBACK", function()
    local d = wrap({})
    assert(d:write("begin"))
    assert(d:write("insert into t values (1)"))
    local cue = assert(L.target:restart{ mode = "fast", after = 0.3 })
    local res, err = d:write("insert into t select 2 from pg_sleep(2)")
    assert(cue:wait(60))
    assert.is_nil(res)
    assert.is_true(err.lost)
    res, err = d:write("insert into t values (3)")
    assert.is_nil(res)
    assert.matches("connection lost in a transaction", err.message)
    res, err = d:write("commit")
    assert.is_nil(res, "a COMMIT after a lost statement must fail, not commit half")
    assert.is_true(err.lost)
    assert(d:query("rollback"))
    assert.equal(0, count())
    assert.equal(1, assert(d:query("select 1 as x"))[1].x)
    d:close()
  end)

  it("writes a fence again when its connection is lost in the middle", function()
    local d = wrap({})
    assert(fence.create(d))
    local cue = assert(L.target:restart{ mode = "immediate", after = 0.2 })
    -- the fence's transaction waits a moment (a lock) so that the restart lands in it
    local locker <close> = assert(pg.connect(L.target.direct_conninfo))
    assert(locker:exec("begin; lock table migrun.fence in exclusive mode"))
    local w, err = fence.write(d, { "slot_a" })
    locker:close()
    assert(cue:wait(60))
    assert(w, tostring(err))
    assert.is_true(d.reconnects >= 1)
    assert.equal(tostring(w.seq), assert(L.target:psql("select max(seq) from migrun.fence where slot = 'slot_a'")))
    d:close()
  end)

  it("says what to do when the journal cannot be written", function()
    local J = assert(journal.open(L.dir .. "/no-such-dir"))
    local ok, err = J:save()
    assert.is_nil(ok)
    assert.equal("journal", err.kind)
    assert.matches("cannot write the journal .*no%-such%-dir/journal%.json", err.message)
    assert.matches("state directory's disk is full or failing", err.hint, 1, true)
    assert.matches("run the same command again", err.hint, 1, true)
  end)
end)
