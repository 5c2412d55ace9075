-- The guard through a real run of playbooks/full.lua on the lab and the DMS
-- emulator (5 slots, a workload of 50 tx/s, a bulk writer on the primary):
--  - during the full load (a table held by a lock on the target) the stop
--    ends the workers, the progress says where it stopped, never "done";
--  - during the index step (an index build held up by a lock on the target,
--    as a long one would be) the warning's figure is the WAL held back as a
--    DBA computes it by hand, with the rate's prediction; the stop comes
--    within one check interval, interrupts the blocked build and leaves
--    nothing running on the target; the step is failed, resumable;
--  - a rerun with a raised threshold resumes there, and is stopped again
--    during DMS setup (waiting for the endpoints' connection tests);
--  - a third run reaches READY FOR CUTOVER;
--  - an ALTER TABLE ... ADD COLUMN on the source during catch-up (blocked in
--    a query on the target's control table) stops it with what changed and
--    what to do; cutover.lua then refuses before any step.
local H = require "helpers.rehearsal"
local procs = require "helpers.procs"
local proc = require "migrun.proc"
local host = require "migrun.host"
local demo = require "migrun.rehearsal.demo"
local text = require "migrun.text"

local MiB = 1024 * 1024
local INTERVAL = 2

describe("the guard in playbooks/full.lua", function()
  local R, src, tgt

  -- The config with these wal_guard keys (the rest stays).
  local function set_guard(keys)
    for k, v in pairs(keys) do R.config.wal_guard[k] = v end
    assert(host.write_file(R.config_path, "return " .. demo.literal(R.config) .. "\n", tonumber("600", 8)))
  end

  -- The WAL migrun's slots hold back, typed by hand.
  local function held_by_hand()
    return assert(src:exec([[select (pg_current_wal_lsn() - min(restart_lsn))::int8 as b from pg_replication_slots
      where slot_name like 'dms\_slot\_%']]))[1].b
  end

  local function bulk(mib)
    assert(src:exec(("insert into scratch.bulk select g, repeat(md5(g::text), 30) from generate_series(1, %d) g")
      :format(mib * 1050)))
  end

  -- "57.6 MiB" -> bytes
  local function bytes_of(n, unit)
    return tonumber(n) * ({ B = 1, KiB = 1024, MiB = MiB, GiB = 1024 * MiB })[unit]
  end

  -- Runs a playbook; on_line(line, state) is called for every line of its
  -- output (stdout and stderr) as it comes, with the time it came.
  local running_pid -- of the playbook run() runs
  local function run(playbook, on_line)
    local argv = { H.MIGRUN, H.ROOT .. "/playbooks/" .. playbook, "--config", R.config_path, "--yes" }
    argv.env, argv.stdin, argv.stderr = { [procs.MARK] = R.dir }, false, "stdout"
    for k, v in pairs(R.env) do argv.env[k] = v end
    local lines, at = {}, {}
    argv.stdout = function(line)
      lines[#lines + 1] = line
      at[#lines] = host.monotonic()
      if os.getenv("MIGRUN_E2E_VERBOSE") then io.stderr:write(line, "\n") end
      if on_line then on_line(line, #lines) end
    end
    local h = assert(proc.spawn(argv))
    running_pid = h.pid
    local ok, how, code = h:wait(300)
    if how == "timeout" then h:kill("KILL") h:wait() end
    h:close()
    return { ok = ok, how = how, code = code, output = table.concat(lines, "\n"), lines = lines, at = at }
  end

  local function line_matching(r, pattern)
    for i, l in ipairs(r.lines) do
      if l:find(pattern) then return l, i end
    end
  end

  setup(function()
    R = H.rehearsal("guard", { scale = 0.05,
      config = { wal_guard = { interval = INTERVAL, warn_bytes = 16 * MiB, stop_bytes = 56 * MiB,
                               replica_min_free_bytes = MiB, warn_ahead = 1 },
                 dms = { start_pause = 0 } },
      dms = { delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, connection = 8, cdc_poll = 0.1,
        endpoint_delete = 0.1, task_delete = 0.1, task_modify = 0.1 } } })
    src = H.connect(R.lab.source, "source")
    tgt = H.connect(R.lab.target, "target")
    -- the bulk writer's table: WAL like any other, in no migrated schema
    assert(src:exec("create schema scratch; create table scratch.bulk (id int, pad text)"))
    R:start_workload{ rate = 50 }
  end)

  teardown(function()
    if R then R:stop_workload() end
    if src then src:close() end
    if tgt then tgt:close() end
    if R then R:close() end
  end)

  -- Sessions on the target running what the load or the index build sent.
  local function busy_on_target()
    return assert(tgt:exec([[select count(*) as n from pg_stat_activity where pid <> pg_backend_pid()
      and state = 'active' and (query ilike 'create%index%' or query ilike 'truncate%' or query ilike 'copy%')]]))[1].n
  end
  local function settles(fn)
    for _ = 1, 100 do
      if fn() == 0 then return 0 end
      host.sleep(0.1)
    end
    return fn()
  end
  local function workers() -- the load workers of this spec's runs (tests/helpers/procs.lua)
    return #procs.marked(R.dir, "migrun.pool")
  end

  it("stops the full load mid-way: the workers end, the progress says where it stopped, never done", function()
    local locker = H.connect(R.lab.target, "target")
    local written_at, workers_during
    local locked_empty
    local r = run("full.lua", function(line)
      if line:find("^%S+ schema: done") then
        -- the last table of the second stream will wait for it: taken as soon
        -- as the table exists, steps before the load (under CI's load this
        -- spec may see a line seconds after it was written; taken at the
        -- load's start, the lock once came after the table was loaded)
        locked_empty = assert(locker:exec([[begin; lock table public.ref_20 in access exclusive mode;
          select count(*) as n from public.ref_20]]))[1].n == 0
      elseif line:find("loaded public%.events") and not written_at then
        -- (the one waiting on ref_20's lock at least, once the pool has started
        -- it: a process per task, and events' last chunk may have just ended)
        local deadline = host.monotonic() + 10
        repeat
          workers_during = #procs.descendants(running_pid, "migrun.pool")
          if workers_during == 0 then host.sleep(0.05) end
        until workers_during > 0 or host.monotonic() > deadline
        bulk(64)
        written_at = host.monotonic()
      end
    end)
    assert.is_true(locked_empty, "public.ref_20 was loaded before the test locked it")
    assert.is_true(workers_during > 0, "no load worker seen during the load")
    assert.equal(1, r.code, r.output)
    local failed, i = line_matching(r, "FAILED: full_load failed: WAL guard STOP: migrun's 5 slots hold back")
    assert.truthy(failed, r.output)
    assert.is_true(r.at[i] - written_at <= INTERVAL + 2, ("stopped %.1f s after the write"):format(r.at[i] - written_at))
    assert.truthy(r.output:find("Full load: stopped at [%d.]+ %a+ of [%d.]+ %a+ %(%d+%%%)"), r.output)
    assert.falsy(r.output:find("Full load: done", 1, true), r.output)
    local status, rec = H.step_status(R, "full_load")
    assert.equal("failed", status)
    assert.truthy(rec.facts.loaded["public.events"])
    assert.is_nil(rec.facts.loaded["public.ref_20"])
    assert.equal(0, workers())
    -- nothing of the run lives on (its processes carry the mark: tests/helpers/procs.lua)
    assert.equal(0, settles(function() return #procs.marked(R.dir) end))
    assert(locker:exec("rollback"))
    locker:close()
    assert.equal(0, settles(busy_on_target))
  end)

  it("warns with the true figure, stops within an interval during the index step and DMS setup, resumes", function()
    -- 1. the index step, held up by a lock on a table the first run loaded
    local base = held_by_hand()
    local warn_at, stop_at = base + 16 * MiB, base + 56 * MiB
    set_guard{ warn_bytes = warn_at, stop_bytes = stop_at }
    -- The index step reads events' catalog entries: events locked, it waits.
    -- The lock can only be taken once preflight (which reads events) is
    -- done; so that the load cannot end and the index step begin before the
    -- test has taken it, however late the test reads the load's line, the
    -- load's one table left (ref_20) waits at a gate until then (ROW
    -- EXCLUSIVE: preflight reads ref_20; the load's TRUNCATE waits)
    local gate, locker = H.connect(R.lab.target, "target"), H.connect(R.lab.target, "target")
    assert(gate:exec("begin; lock table public.ref_20 in row exclusive mode"))
    local warning, stop_written_at, hand
    local r1 = run("full.lua", function(line)
      if line:find("^%S+ full_load: ") then
        assert(locker:exec("begin; lock table public.events in access exclusive mode"))
        assert(gate:exec("commit"))
      elseif line:find("^%S+ indexes: Restore") then
        bulk(28)                        -- over warn_bytes, under stop_bytes
      elseif line:find("WAL guard warning: migrun's") and not warning then
        warning, hand = line, held_by_hand()
        bulk(32)                        -- over stop_bytes
        stop_written_at = host.monotonic()
      end
    end)
    assert.equal(1, r1.code, r1.output)
    assert.truthy(warning, r1.output)
    -- the figure is what a DBA computes by hand (within a WAL segment), not once per slot
    local n, unit = warning:match("migrun's 5 slots hold back ([%d.]+) (%a+) of WAL on the primary")
    assert.truthy(n, warning)
    assert.is_true(math.abs(bytes_of(n, unit) - hand) <= 16 * MiB, ("%s %s vs %d"):format(n, unit, hand))
    assert.truthy(warning:find(("above the warning threshold %s (the run stops at %s)"):format(text.bytes(warn_at),
      text.bytes(stop_at)), 1, true), warning)
    -- the child's warning is in the log too (the parent was blocked in the index build)
    local log = assert(io.open(R.config.state_dir .. "/migrun.log")):read("a")
    assert.truthy(log:find("WARNING: WAL guard warning: migrun's 5 slots hold back", 1, true))
    -- the prediction from the rate
    assert.truthy(warning:find("at this rate %([%d.]+ %a+/min held back more, over the last [%d.]+ s%) the stop"
      .. " threshold " .. text.bytes(stop_at):gsub("%p", "%%%0") .. " is reached in about [^;]- and the primary's disk"
      .. " is full in about "), warning)
    -- the stop: within one interval of the write (plus the check itself), in the index step
    local failed, i = line_matching(r1, "FAILED: indexes failed: WAL guard STOP: migrun's 5 slots hold back")
    assert.truthy(failed, r1.output)
    assert.is_true(r1.at[i] - stop_written_at <= INTERVAL + 2, ("stopped %.1f s after the write"):format(
      r1.at[i] - stop_written_at))
    -- advice for the phase: no task yet; the threshold to raise and the rerun; the full restart
    assert.truthy(failed:find("no DMS task reads the slots before phase II", 1, true), failed)
    assert.truthy(failed:find("raise wal_guard.stop_bytes (now " .. text.bytes(stop_at) .. ") in " .. R.config_path, 1,
      true), failed)
    assert.truthy(failed:find("then run `migrun " .. H.ROOT .. "/playbooks/full.lua --config " .. R.config_path
      .. "`: it resumes at the step that stopped", 1, true), failed)
    assert.truthy(failed:find("playbooks/full_restart.lua --config", 1, true), failed)
    assert.falsy(failed:find("partial_restart", 1, true), failed)
    assert.falsy(failed:find("replica", 1, true), failed)
    assert.equal("done", (H.step_status(R, "full_load")))
    assert.truthy(r1.output:find("loaded public.ref_20", 1, true), r1.output)   -- the rest of the load
    assert.falsy(r1.output:find("loaded public.events", 1, true), r1.output)    -- not loaded twice
    assert.equal("failed", (H.step_status(R, "indexes")))
    assert.falsy(r1.output:find("Full load: stopped", 1, true))
    -- the interrupted build left nothing running on the target
    assert.equal(0, settles(busy_on_target))
    -- nothing of the run lives on (its processes carry the mark: tests/helpers/procs.lua)
    assert.equal(0, settles(function() return #procs.marked(R.dir) end))
    assert(locker:exec("rollback"))
    locker:close()
    gate:close()

    -- 2. a raised threshold: the run resumes at the index step; stopped again in DMS setup
    local base2 = held_by_hand()
    set_guard{ warn_bytes = base2 + 16 * MiB, stop_bytes = base2 + 40 * MiB }
    local setup_written_at
    local r2 = run("full.lua", function(line)
      if line:find("^%S+ dms_setup: DMS endpoints") then
        bulk(64)
        setup_written_at = host.monotonic()
      end
    end)
    assert.equal(1, r2.code, r2.output)
    assert.truthy(r2.output:find("skipped full_load", 1, true), r2.output)
    assert.truthy(r2.output:find("indexes: done", 1, true), r2.output)
    local failed2, i2 = line_matching(r2, "FAILED: dms_setup failed: WAL guard STOP: ")
    assert.truthy(failed2, r2.output)
    assert.is_true(r2.at[i2] - setup_written_at <= INTERVAL + 2, ("stopped %.1f s after the write"):format(
      r2.at[i2] - setup_written_at))
    assert.equal("failed", (H.step_status(R, "dms_setup")))
    assert.equal("done", (H.step_status(R, "resume_replica")))

    -- 3. room enough: to the end
    set_guard{ warn_bytes = 1024 * MiB, stop_bytes = 2048 * MiB }
    local r3 = run("full.lua")
    assert.equal(0, r3.code, r3.output)
    assert.truthy(r3.output:find("READY FOR CUTOVER", 1, true), r3.output)
  end)

  it("stops catch-up on an ALTER TABLE on the source, and cutover.lua before any step", function()
    -- catch-up held in a query on the target's control table
    local locker = H.connect(R.lab.target, "target")
    assert(locker:exec("begin; lock table public.awsdms_apply_exceptions in access exclusive mode"))
    local altered_at
    local r = run("full.lua", function(line)
      if line:find("^%S+ catch_up: Watch") then
        host.sleep(0.5)
        assert(src:exec("alter table public.ref_01 add column note text"))
        altered_at = host.monotonic()
      end
    end)
    assert(locker:exec("rollback"))
    locker:close()
    assert.equal(1, r.code, r.output)
    local failed, i = line_matching(r, "FAILED: catch_up failed: schema drift STOP: ")
    assert.truthy(failed, r.output)
    assert.is_true(r.at[i] - altered_at <= INTERVAL + 2, ("stopped %.1f s after the change"):format(r.at[i] - altered_at))
    assert.truthy(failed:find("public.ref_01: column note text added", 1, true), failed)
    assert.truthy(failed:find("DMS does not carry DDL through pglogical", 1, true), failed)
    assert.truthy(failed:find("ALTER TABLE public.ref_01 ADD COLUMN note text", 1, true), failed)
    local slot
    for _, g in ipairs(H.journal(R).playbooks.full.steps.groups.facts.groups) do
      for _, t in ipairs(g.tables) do
        if t.schema == "public" and t.name == "ref_01" then slot = g.slot end
      end
    end
    assert.truthy(failed:find("playbooks/partial_restart.lua " .. slot .. " --config", 1, true), failed)
    assert.truthy(failed:find("--only know_data", 1, true), failed)
    assert.equal("failed", (H.step_status(R, "catch_up")))

    -- the cutover refuses at once: the guard's first check, before any step
    local c = run("cutover.lua")
    assert.equal(1, c.code, c.output)
    assert.truthy(c.output:find("FAILED: schema drift STOP: .*public%.ref_01: column note text added.*Nothing was run%."),
      c.output)
    assert.is_nil(next((H.journal(R).playbooks.cutover or {}).steps or {}))
  end)
end)
