-- migrun.walguard against the lab: the WAL migrun's slots hold back, counted
-- as a DBA does (the current LSN minus their oldest restart_lsn, not once per
-- slot), against pg_wal and free disk; thresholds in bytes and percent; the
-- rate and what it predicts; advice that depends on the phase; the replica's
-- disk, a stop only while it is paused.
local pg = require "migrun.pg"
local db = require "migrun.db"
local pgl = require "migrun.pglogical"
local text = require "migrun.text"
local walguard = require "migrun.walguard"

describe("migrun.walguard", function()
  local L, src, rep
  local BIG = 2 ^ 50
  local MiB = 1024 * 1024

  -- what a DBA types: the oldest restart_lsn of migrun's slots against the current LSN
  local function by_hand()
    return assert(src:query([[select (pg_current_wal_lsn() - min(restart_lsn))::int8 as held,
      sum(pg_current_wal_lsn() - restart_lsn)::int8 as per_slot_sum
      from pg_replication_slots where slot_name like 'dms\_slot\_%' and plugin = 'pglogical']]))[1]
  end

  local function write_wal(mib)
    assert(src:write(("insert into wg select g, repeat('x', 1000) from generate_series(1, %d) g"):format(mib * 900)))
  end

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    rep = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
    assert(src:write("create table wg (id int, pad text)"))
    assert(pgl.ensure_node(src, "migrun_provider", L.source.conninfo))
    -- three slots created apart: each holds back a different amount of the same WAL
    for i = 1, 3 do
      assert(pgl.create_slot(src, "dms_slot_0" .. i))
      write_wal(4)
    end
    -- not migrun's: never counted
    assert(src:write("select pg_create_logical_replication_slot('someone_else', 'test_decoding')"))
  end)

  teardown(function()
    if rep then rep:close() end
    if src then src:close() end
    if L then assert(L:stop()) end
  end)

  local function guard(t)
    t = t or {}
    return { warn_bytes = t.warn or math.min(BIG, t.stop or BIG), stop_bytes = t.stop or BIG, replica_min_free_bytes = t.min_free or 1,
      warn_free_percent = t.warn_pct, stop_free_percent = t.stop_pct, replica_min_free_percent = t.replica_pct,
      warn_ahead = t.ahead, interval = 1, replica_free_command = t.replica_command }
  end

  it("counts the shared WAL once: from the oldest restart_lsn of migrun's slots, as by hand", function()
    local r = assert(walguard.check(src, rep, guard(), { prefix = "dms_slot_" }))
    local hand = by_hand()
    assert.equal("ok", r.level)
    assert.equal(3, #r.slots)
    assert.equal("dms_slot_01", r.holder)
    -- nothing is written meanwhile: the same figure to the byte (a checkpoint record at most)
    assert.is_true(math.abs(r.held_bytes - hand.held) < 64 * 1024, ("%d vs %d"):format(r.held_bytes, hand.held))
    -- the old figure (every slot's retained WAL added up) is about twice as much here
    assert.is_true(hand.per_slot_sum > 1.5 * hand.held, ("%d %d"):format(hand.per_slot_sum, hand.held))
    assert.is_true(r.held_bytes > 10 * MiB, tostring(r.held_bytes))
    -- the per-slot view: each slot's own retained and behind figures
    assert.equal(r.held_bytes, r.slots[1].retained_bytes)
    assert.is_true(r.slots[1].retained_bytes > r.slots[2].retained_bytes)
    assert.is_true(r.slots[2].retained_bytes > r.slots[3].retained_bytes)
    assert.is_true(r.slots[3].behind_bytes > 0)
    -- against the real pg_wal, and free disk (the lab runs here)
    assert.is_true(r.wal_dir_bytes >= r.held_bytes, ("%d %d"):format(r.wal_dir_bytes, r.held_bytes))
    assert.truthy(r.source.how:find("^statvfs .*/pg_wal$"))
    assert.is_true(r.source.free > 0 and r.source.total >= r.source.free)
    assert.is_true(r.replica.free > 0)
    assert.equal(false, r.replica_paused)
    assert.truthy(r.message:find("^WAL guard ok: migrun's 3 slots hold back " .. text.bytes(r.held_bytes)
      :gsub("%p", "%%%0") .. " of WAL on the primary %(from dms_slot_01's restart_lsn %x+/%x+ to %x+/%x+; "
      .. "pg_wal holds [%d.]+ MiB; [%d.]+ %a+ free of [%d.]+ %a+%)"), r.message)
  end)

  it("warns and stops on the WAL held back, naming the commands that fit the phase", function()
    local held = assert(walguard.check(src, nil, guard(), { prefix = "dms_slot_" })).held_bytes
    local advice = { config = "/srv/m/migration.lua", rerun = "migrun playbooks/full.lua --config /srv/m/migration.lua",
      playbooks = "playbooks" }
    local w = assert(walguard.check(src, nil, guard{ warn = held // 2 }, { prefix = "dms_slot_", advice = advice }))
    assert.equal("warn", w.level)
    assert.truthy(w.message:find("^WAL guard warning: migrun's 3 slots hold back [%d.]+ MiB of WAL"))
    assert.truthy(w.message:find("above the warning threshold", 1, true))
    -- before phase II: no task to blame, the threshold to raise, the real commands
    assert.truthy(w.message:find("no DMS task reads the slots before phase II", 1, true))
    assert.truthy(w.message:find("raise wal_guard.stop_bytes (now 1.0 PiB) in /srv/m/migration.lua", 1, true))
    assert.truthy(w.message:find("then run `migrun playbooks/full.lua --config /srv/m/migration.lua`: it resumes", 1, true))
    assert.truthy(w.message:find("`migrun playbooks/full_restart.lua --config /srv/m/migration.lua`", 1, true))
    assert.falsy(w.message:find("partial_restart", 1, true))
    assert.falsy(w.message:find("replica", 1, true))

    local s = assert(walguard.check(src, nil, guard{ warn = held // 4, stop = held // 2 },
      { prefix = "dms_slot_", advice = advice }))
    assert.equal("stop", s.level)
    assert.truthy(s.message:find("^WAL guard STOP: "))
    assert.truthy(s.message:find("at or above the stop threshold", 1, true))

    -- phase II: the slot that holds the most and has confirmed nothing for long is named,
    -- with the partial restart that redoes its group
    local tracker = walguard.tracker(600)
    assert(walguard.check(src, nil, guard(), { prefix = "dms_slot_", tracker = tracker, now = 0 }))
    local t = assert(walguard.check(src, nil, guard{ warn = held // 4, stop = held // 2 },
      { prefix = "dms_slot_", tracker = tracker, now = 1200, tasks = true, advice = advice }))
    assert.equal(1200, t.slots[1].stalled_seconds)
    assert.truthy(t.message:find("dms_slot_01 holds back the most", 1, true), t.message)
    assert.truthy(t.message:find("has confirmed nothing for 20 min 00 s: its DMS task stopped reading it", 1, true))
    assert.truthy(t.message:find("`migrun playbooks/partial_restart.lua dms_slot_01 --config /srv/m/migration.lua`",
      1, true))
    assert.falsy(t.message:find("no DMS task", 1, true))

    -- another prefix: nothing of migrun's, nothing held
    local none = assert(walguard.check(src, nil, guard{ warn = 1, stop = 1 }, { prefix = "nobody_" }))
    assert.equal(0, #none.slots)
    assert.equal(0, none.held_bytes)
    assert.equal("ok", none.level)
  end)

  it("says of migrun's watch slot holding the most that the verification moves it, not a restart", function()
    assert(pgl.create_slot(src, "wg_watch"))
    write_wal(4)
    assert(pgl.create_slot(src, "wg_01"))
    finally(function()
      src:write("select pg_drop_replication_slot('wg_watch')")
      src:write("select pg_drop_replication_slot('wg_01')")
    end)
    local advice = { config = "/srv/m/migration.lua", playbooks = "playbooks" }
    local w = assert(walguard.check(src, nil, guard{ warn = 1 }, { prefix = "wg_", tasks = true, advice = advice }))
    assert.equal("wg_watch", w.holder)
    assert.truthy(w.message:find("wg_watch, migrun's watch slot, holds back the most", 1, true), w.message)
    assert.truthy(w.message:find("`migrun playbooks/verify.lua --config /srv/m/migration.lua`", 1, true), w.message)
    assert.falsy(w.message:find("partial_restart.lua wg_watch", 1, true), w.message)
  end)

  it("measures the rate and says when the stop and a full disk come; warns ahead of them", function()
    local tracker = walguard.tracker(600)
    local a = assert(walguard.check(src, nil, guard(), { prefix = "dms_slot_", tracker = tracker, now = 100 }))
    assert.is_nil(a.rate)
    write_wal(8)
    local stop = a.held_bytes + 1024 * MiB
    local b = assert(walguard.check(src, nil, guard{ stop = stop, ahead = 3600 },
      { prefix = "dms_slot_", tracker = tracker, now = 110 }))
    assert.near((b.held_bytes - a.held_bytes) / 10, b.rate, 1)
    assert.is_true(b.rate > 0.5 * MiB, tostring(b.rate))
    assert.near((stop - b.held_bytes) / b.rate, b.eta_stop, 1)
    assert.near(b.source.free / b.rate, b.eta_full, 1)
    -- about a thousand seconds to the stop: within warn_ahead, so a warning before any threshold
    assert.equal("warn", b.level)
    local line = ("at this rate (%s/min held back more, over the last 10.0 s) the stop threshold %s is reached in about %s"
      .. " and the primary's disk is full in about %s"):format(text.bytes(b.rate * 60), text.bytes(stop),
      text.duration(b.eta_stop), text.duration(b.eta_full))
    assert.truthy(b.message:find(line, 1, true), b.message .. "\n" .. line)
    -- far away: the same line in the ok message, no warning
    local c = assert(walguard.check(src, nil, guard{ stop = stop, ahead = 60 },
      { prefix = "dms_slot_", tracker = tracker, now = 111 }))
    assert.equal("ok", c.level)
    assert.truthy(c.message:find("at this rate", 1, true))
  end)

  it("stops on the primary's free space in percent", function()
    local r = assert(walguard.check(src, nil, guard(), { prefix = "dms_slot_" }))
    local pct = 100 * r.source.free / r.source.total
    local w = assert(walguard.check(src, nil, guard{ warn_pct = pct + 1 }, { prefix = "dms_slot_" }))
    assert.equal("warn", w.level)
    assert.truthy(w.message:find("the primary's WAL disk is [%d.]+%% free, below wal_guard.warn_free_percent"))
    local s = assert(walguard.check(src, nil, guard{ warn_pct = 100, stop_pct = pct + 1 }, { prefix = "dms_slot_" }))
    assert.equal("stop", s.level)
    assert.truthy(s.message:find("below wal_guard.stop_free_percent", 1, true))
  end)

  it("stops on the replica's disk only while it is paused, and says so", function()
    local r = assert(walguard.check(src, rep, guard{ min_free = 2 ^ 61 }, { prefix = "dms_slot_" }))
    assert.equal("warn", r.level)
    assert.truthy(r.message:find("the replica has [%d.]+ %a+ free %(minimum 2%.0 EiB%) %(not paused%)"), r.message)
    assert.truthy(r.message:find("the replica is not paused, so migrun is not what fills its disk", 1, true))
    assert.falsy(r.message:find("resume", 1, true))
    assert(rep:write("select pg_wal_replay_pause()"))
    local ok, err = pcall(function()
      local p = assert(walguard.check(src, rep, guard{ min_free = 2 ^ 61 }, { prefix = "dms_slot_" }))
      assert.equal("stop", p.level)
      assert.is_true(p.replica_paused)
      assert.truthy(p.message:find("free (minimum 2.0 EiB) while paused", 1, true))
      assert.truthy(p.message:find("the paused replica keeps every WAL segment it receives", 1, true))
      -- a command of the team's measures it (a replica elsewhere); percent minimum
      local c = assert(walguard.check(src, rep, guard{ replica_command = { "echo", "100", "1000" }, replica_pct = 20 },
        { prefix = "dms_slot_" }))
      assert.same({ free = 100, total = 1000, how = "command" }, c.replica)
      assert.equal("stop", c.level)
      assert.truthy(c.message:find("the replica's WAL disk is 10.0% free (minimum 20%) while paused", 1, true))
    end)
    assert(rep:write("select pg_wal_replay_resume()"))
    assert(ok, err)
  end)

  it("says why pg_wal cannot be read without pg_monitor, and checks on", function()
    assert(src:write("create role wg_reader login"))
    local conninfo = L.source.conninfo:gsub("user=%S+", "user=wg_reader")
    local weak = db.wrap(assert(pg.connect(conninfo, { name = "source" })))
    local r = assert(walguard.check(weak, nil, guard(), { prefix = "dms_slot_" }))
    weak:close()
    assert.is_nil(r.wal_dir_bytes)
    assert.equal("the size of pg_wal cannot be read: pg_ls_waldir() needs pg_monitor or superuser"
      .. " (GRANT pg_monitor TO wg_reader)", r.wal_dir_note)
    assert.truthy(r.message:find(r.wal_dir_note, 1, true), r.message)
    -- data_directory is not visible to it either: said, with the way out
    assert.truthy(r.message:find("free disk not measured: data_directory is not visible to this role", 1, true), r.message)
    assert.is_true(r.held_bytes > 0)
  end)

  it("reads the WAL directory of 9.6 through pg_ls_dir('pg_xlog'), and raises on misuse", function()
    assert.truthy(walguard.sql(90624).wal_dir_bytes:find("pg_ls_dir('pg_xlog')", 1, true))
    assert.truthy(walguard.sql(90624).current_lsn:find("pg_current_xlog_location", 1, true))
    assert.truthy(walguard.sql(150020).wal_dir_bytes:find("pg_ls_waldir()", 1, true))
    assert.has_error(function() walguard.check(src, nil, { warn_bytes = 2, stop_bytes = 1 }) end,
      "walguard.check: warn_bytes must not exceed stop_bytes")
  end)
end)

-- Slot invalidation (PostgreSQL 13+): with max_slot_wal_keep_size set, the
-- slots' wal_status and safe_wal_size say how much WAL may still be written
-- before PostgreSQL removes what a slot needs; the guard warns, then stops
-- while the slot can still be saved, and says what to do once one is lost.
describe("migrun.walguard and max_slot_wal_keep_size", function()
  local L, src
  local MiB = 1024 * 1024
  local advice = { config = "/srv/m/migration.lua", rerun = "migrun playbooks/full.lua --config /srv/m/migration.lua",
    playbooks = "playbooks" }

  -- ALTER SYSTEM, then a reload, as a DBA changes it on a running primary; the
  -- session sees the new value once it has processed the reload
  local function set(name, value)
    assert(src:write(("alter system set %s = %s"):format(name, value)))
    assert(src:write("select pg_reload_conf()"))
    local want = value:gsub("'", "")
    for _ = 1, 100 do
      if assert(src:query("select current_setting($1) as v", name))[1].v == want then return end
      require("migrun.host").sleep(0.05)
    end
    error(name .. " was not reloaded")
  end

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    assert(src:write("create table wg (id int, pad text)"))
    assert(pgl.ensure_node(src, "migrun_provider", L.source.conninfo))
    -- the live verification's watch slot, then a group's slot 20 MiB of WAL later
    -- (another WAL segment): neither is read
    assert(pgl.create_slot(src, "dms_slot_watch"))
    assert(src:write("insert into wg select g, repeat('x', 1000) from generate_series(1, 18000) g"))
    assert(pgl.create_slot(src, "dms_slot_01"))
    set("max_slot_wal_keep_size", "'64MB'")
    set("wal_keep_size", "'16MB'") -- the lab keeps 256 MB for its replica
  end)

  teardown(function()
    if src then src:close() end
    if L then assert(L:stop()) end
  end)

  local function status_of(name)
    return assert(src:query("select wal_status from pg_replication_slots where slot_name = $1", name))[1].wal_status
  end

  -- 2 MiB of WAL, then a checkpoint: the moment PostgreSQL invalidates what is past the limit
  local function round(tracker, t)
    assert(src:write("insert into wg select g, repeat('x', 1000) from generate_series(1, 1800) g"))
    assert(src:write("checkpoint"))
    return assert(walguard.check(src, nil, { warn_bytes = 2 ^ 50, stop_bytes = 2 ^ 50, interval = 1, warn_ahead = 1,
      replica_min_free_bytes = 1 }, { prefix = "dms_slot_", tracker = tracker, now = t, advice = advice }))
  end

  it("warns, then stops before the slot is lost; a lost slot is said, with what to do", function()
    local tracker = walguard.tracker(600)
    local r = round(tracker, 0)
    assert.equal(64 * MiB, r.keep_bytes)
    assert.equal("ok", r.level, r.message)
    assert.truthy(r.message:find("max_slot_wal_keep_size 64.0 MiB: dms_slot_watch may take [%d.]+ MiB more WAL before it "
      .. "is lost"), r.message)
    local levels, watch_alone, stopped = {}, nil, nil
    for t = 1, 60 do
      r = round(tracker, t)
      levels[#levels + 1] = r.level
      local by = {}
      for _, s in ipairs(r.slots) do by[s.name] = s end
      -- the watch slot near its end while the group's slot is not: a warning only
      if not watch_alone and by.dms_slot_watch.safe_wal_size <= 64 * MiB / 5
          and by.dms_slot_01.safe_wal_size > 64 * MiB / 5 then
        watch_alone = r
      end
      if r.level == "stop" then stopped = r break end
    end
    assert(stopped, "the guard never stopped: " .. table.concat(levels, " "))
    -- warned first, and stopped while nothing is lost yet
    local first
    for _, l in ipairs(levels) do if l ~= "ok" then first = first or l end end
    assert.equal("warn", first, table.concat(levels, " "))
    assert.is_not.equal("lost", status_of("dms_slot_01"))
    assert.truthy(watch_alone, "the watch slot was never the only one near its end")
    assert.equal("warn", watch_alone.level, watch_alone.message)
    assert.truthy(watch_alone.message:find("dms_slot_watch would be lost after [%d.]+ MiB more WAL %(safe_wal_size; wal_status "
      .. "%a+%): max_slot_wal_keep_size 64%.0 MiB caps what a slot keeps.-%(the live verification's watch slot%)"),
      watch_alone.message)
    assert.truthy(stopped.message:find("^WAL guard STOP: .*dms_slot_01 would be lost after [%d.]+ MiB more WAL"), stopped.message)
    assert.truthy(stopped.message:find("at this rate (", 1, true), stopped.message)
    assert.truthy(stopped.message:find("What to do: raise max_slot_wal_keep_size on the primary before the slot is "
      .. "lost, for example `ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'` then `SELECT pg_reload_conf()`", 1, true),
      stopped.message)
    assert.truthy(stopped.message:find("then run `migrun playbooks/full.lua --config /srv/m/migration.lua`: it resumes",
      1, true), stopped.message)
    assert.truthy(stopped.message:find("no DMS task reads the slots before phase II", 1, true), stopped.message)

    -- what the stop was for: more WAL and a checkpoint lose the slots
    local lost
    for t = 100, 140 do
      r = round(tracker, t)
      if status_of("dms_slot_01") == "lost" then lost = r break end
    end
    assert(lost, "the slot was never lost: the test proves nothing")
    assert.equal("stop", lost.level)
    assert.truthy(lost.message:find("dms_slot_01 is lost: PostgreSQL removed WAL it needs (wal_status lost", 1, true),
      lost.message)
    assert.truthy(lost.message:find("no DMS task can read dms_slot_01 any more: redo its group alone with "
      .. "`migrun playbooks/partial_restart.lua dms_slot_01 --config /srv/m/migration.lua`", 1, true), lost.message)
    assert.truthy(lost.message:find("nothing of the migration is lost with dms_slot_watch: the next verification "
      .. "compares every table whole (`migrun playbooks/verify.lua --config /srv/m/migration.lua`)", 1, true),
      lost.message)
  end)

  it("says nothing of a limit when there is none", function()
    assert(src:write("select pg_drop_replication_slot(slot_name) from pg_replication_slots"))
    assert(pgl.create_slot(src, "dms_slot_01"))
    set("max_slot_wal_keep_size", "-1")
    local r = assert(walguard.check(src, nil, { warn_bytes = 2 ^ 50, stop_bytes = 2 ^ 50, replica_min_free_bytes = 1 },
      { prefix = "dms_slot_" }))
    assert.is_nil(r.keep_bytes)
    assert.falsy(r.message:find("max_slot_wal_keep_size", 1, true), r.message)
    assert.is_nil(walguard.limits_sql(120000))
    assert.truthy(walguard.limits_sql(130000):find("safe_wal_size", 1, true))
    assert.truthy(walguard.limits_sql(170000):find("invalidation_reason", 1, true))
  end)
end)
