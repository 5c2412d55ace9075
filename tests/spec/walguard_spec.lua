-- migrun.walguard against the lab: WAL retained by migrun's slots on the real
-- source grows with writes; thresholds give warn and stop with the runbook's advice.
local pg = require "migrun.pg"
local db = require "migrun.db"
local pgl = require "migrun.pglogical"
local walguard = require "migrun.walguard"

describe("migrun.walguard", function()
  local L, src, rep
  local BIG = 2 ^ 50

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    rep = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
    assert(pgl.ensure_node(src, "migrun_provider", L.source.conninfo))
    assert(pgl.create_slot(src, "dms_slot_01"))
    assert(pgl.create_slot(src, "dms_slot_02"))
    -- not migrun's: never counted
    assert(src:write("select pg_create_logical_replication_slot('someone_else', 'test_decoding')"))
    assert(src:write("create table wg (id int, pad text)"))
  end)

  teardown(function()
    if rep then rep:close() end
    if src then src:close() end
    if L then assert(L:stop()) end
  end)

  local function guard(warn, stop, min_free)
    return { warn_bytes = warn or BIG, stop_bytes = stop or BIG, replica_min_free_bytes = min_free or 1 }
  end

  it("measures WAL retained by migrun's slots, growing with writes", function()
    local g1 = assert(walguard.check(src, rep, guard(), { prefix = "dms_slot_" }))
    assert.equal("ok", g1.level)
    assert.equal(2, #g1.slots)
    assert.same({ "dms_slot_01", "dms_slot_02" }, { g1.slots[1].name, g1.slots[2].name })
    assert.equal(g1.slots[1].retained_bytes + g1.slots[2].retained_bytes, g1.retained_bytes)
    assert.is_true(g1.replica_wal_bytes > 0)
    assert.is_true(g1.replica_free_bytes > 0)
    assert.truthy(g1.message:find("^WAL guard ok: migrun's 2 slots retain "))

    assert(src:write("insert into wg select g, repeat('x', 200) from generate_series(1, 20000) g"))
    local g2 = assert(walguard.check(src, rep, guard(), { prefix = "dms_slot_" }))
    -- two slots each hold back the ~5 MB just written
    assert.is_true(g2.retained_bytes - g1.retained_bytes > 2 * 4 * 1024 * 1024,
      ("%d -> %d"):format(g1.retained_bytes, g2.retained_bytes))
  end)

  it("warns above warn_bytes and stops above stop_bytes, with the advice and human units", function()
    local now = assert(walguard.check(src, nil, guard(), { prefix = "dms_slot_" })).retained_bytes
    local w = assert(walguard.check(src, nil, guard(now // 2, BIG), { prefix = "dms_slot_" }))
    assert.equal("warn", w.level)
    assert.truthy(w.message:find("^WAL guard warning: migrun's 2 slots retain [%d.]+ MiB of WAL on the primary"))
    assert.truthy(w.message:find("above the warning threshold", 1, true))
    assert.truthy(w.message:find("monitor free space on the primary", 1, true))
    assert.truthy(w.message:find("drop the stuck slot and redo its tables", 1, true))
    assert.truthy(w.message:find("partial restart", 1, true))
    assert.is_nil(w.replica_free_bytes)

    local s = assert(walguard.check(src, nil, guard(now // 4, now // 2), { prefix = "dms_slot_" }))
    assert.equal("stop", s.level)
    assert.truthy(s.message:find("^WAL guard STOP: "))
    assert.truthy(s.message:find("at or above the stop threshold", 1, true))

    -- another prefix: nothing of migrun's, nothing retained
    local none = assert(walguard.check(src, nil, guard(1, 1), { prefix = "nobody_" }))
    assert.equal(0, #none.slots)
    assert.equal(0, none.retained_bytes)
    assert.equal("ok", none.level) -- 0 < 1
  end)

  it("stops when the paused replica's disk is below its minimum", function()
    local r = assert(walguard.check(src, rep, guard(BIG, BIG, 2 ^ 61), { prefix = "dms_slot_" }))
    assert.equal("stop", r.level)
    assert.truthy(r.message:find("the paused replica has [%d.]+ %a+ free %(minimum 2%.0 EiB%)"))
    assert.truthy(r.message:find("finish the full load and resume the replica", 1, true))
    local near = assert(walguard.check(src, rep, guard(BIG, BIG, r.replica_free_bytes // 3 * 2),
      { prefix = "dms_slot_" }))
    assert.equal("warn", near.level)
    assert.truthy(near.message:find("near the minimum", 1, true))
  end)

  it("reads the WAL directory of 9.6 through pg_ls_dir('pg_xlog')", function()
    assert.truthy(walguard.sql(90624).wal_dir_bytes:find("pg_ls_dir('pg_xlog')", 1, true))
    assert.truthy(walguard.sql(150020).wal_dir_bytes:find("pg_ls_waldir()", 1, true))
    assert.has_error(function() walguard.check(src, nil, { warn_bytes = 2, stop_bytes = 1 }) end,
      "walguard.check: warn_bytes must not exceed stop_bytes")
  end)
end)
