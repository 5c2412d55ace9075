-- The fault campaign of the world (make test-faults; issue 24, docs/faults.md):
-- not migrun killed, but the servers, the network and the disks failing under
-- it, under a write workload, at the points of full.lua, partial_restart.lua
-- and cutover.lua where they cost most: the target restarted, its path
-- stalled and its disk filled in the middle of the full load, the state
-- directory's disk filled, the primary restarted while CDC is watched and
-- while the cutover waits for the tasks, a DMS task failed and a change it
-- could not apply, the target restarted while a group reloads. migrun rides
-- out what it can and stops cleanly, with what to do, where it cannot; then
-- the same command again, without options, goes on. At the end every table
-- is equal, nothing was created twice, and no process is left behind. The
-- time from each fault to the recovery is printed.
local H = require "helpers.rehearsal"
local demo = require "migrun.rehearsal.demo"
local faults = require "migrun.rehearsal.faults"
local emulator = require "migrun.rehearsal.emulator"
local cdc = require "migrun.cdc"
local pg = require "migrun.pg"
local host = require "migrun.host"
local proc = require "migrun.proc"

local NAME = "faults-world"
local MiB = 1024 * 1024

local function is_root()
  local _, _, _, out = proc.run{ "id", "-u" }
  return out == "0\n"
end

-- "HH:MM:SS step: title", the line the runner prints when a step starts
local function starts(step) return "^%d%d:%d%d:%d%d " .. step:gsub("%p", "%%%0") .. ": " end

describe("the world failing under migrun", function()
  local R, client, state_disk
  local report = {} -- one line per fault: where, what migrun did, how long

  setup(function()
    local dir = H.tmpdir(NAME)
    local root = is_root()
    if root then
      -- the state directory on a disk of its own, which a fault fills
      state_disk = assert(faults.small_disk{ path = dir .. "/state", size = "64M" })
    end
    R = assert(demo.rehearsal{ dir = dir, scale = H.SANITIZE and 0.05 or 0.2, name = NAME,
      lab = { proxy = { "target" }, small_disk = root and { size = "320M" } or nil },
      config = { full_load = { chunk_bytes = MiB, split_bytes = MiB, reconnect_timeout = 120 } },
      dms = { delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, connection = 0.1, cdc_poll = 0.1,
        endpoint_delete = 0.1, task_delete = 0.1, task_modify = 0.1 } } })
    client = assert(R.lab:dms_client())
  end)

  teardown(function()
    io.stderr:write("\nfaults of the world:\n  ", table.concat(report, "\n  "), "\n")
    if R then
      R:stop_workload()
      R:close()
    end
    if state_disk then state_disk:unmount() end
  end)

  -- A playbook run as a team runs it; on_line(line, t) sees each line of its
  -- output as it comes and may return a function, run soon after outside the
  -- output callback (a fault: it may start processes).
  local function run(playbook, args, on_line)
    local argv = { H.MIGRUN, H.ROOT .. "/playbooks/" .. playbook, "--config", R.config_path }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    argv.env, argv.stdin, argv.stderr = R.env, false, "stdout"
    local lines, actions = {}, {}
    argv.stdout = function(line)
      lines[#lines + 1] = line
      if os.getenv("MIGRUN_E2E_VERBOSE") then io.stderr:write(line, "\n") end
      local act = on_line and on_line(line, host.monotonic())
      if act then actions[#actions + 1] = act end
    end
    local h = assert(proc.spawn(argv))
    local t0 = host.monotonic()
    local ok, how
    repeat
      ok, how = h:wait(0.1)
      while #actions > 0 do table.remove(actions, 1)() end
    until how ~= "timeout" or host.monotonic() - t0 > 900
    if how == "timeout" then h:kill("KILL") h:wait() end
    h:close()
    local orphans
    for _ = 1, 30 do
      orphans = H.orphans()
      if #orphans == 0 then break end
      host.sleep(0.1)
    end
    assert.same({}, orphans, "left behind by " .. playbook)
    return { ok = ok, output = table.concat(lines, "\n"), seconds = host.monotonic() - t0, ended = host.monotonic() }
  end

  local function target_sql(sql)
    local c <close> = assert(pg.connect(R.lab.target.direct_conninfo, { name = "target" }))
    return assert(c:exec(sql))
  end

  -- A fault at the first line matching `pattern` (after `after`, a fault's
  -- name, has recovered); recovered at the first line matching `back` after it.
  local Plan = {}
  Plan.__index = Plan
  local function plan() return setmetatable({ faults = {} }, Plan) end
  function Plan:add(f) self.faults[#self.faults + 1] = f return f end
  function Plan:on_line(line, t)
    local actions = {}
    for _, f in ipairs(self.faults) do
      if f.at and not f.back_at and f.back and line:match(f.back) then
        f.back_at, f.back_line = t, line
      end
      if not f.at and line:match(f.when) and (not f.after or f.after.back_at) then
        f.at = t
        actions[#actions + 1] = f.inject
      end
    end
    if #actions > 0 then return function() for _, a in ipairs(actions) do a() end end end
  end
  function Plan:say(f, how)
    report[#report + 1] = ("%-58s %s"):format(f.name, how or (f.back_at and ("rode it out: going again %.1f s after "
      .. "the fault (%s)"):format(f.back_at - f.at, f.back_line:gsub("^%d%d:%d%d:%d%d ", ""):sub(1, 90))
      or f.at and "injected, no recovery line seen" or "NOT REACHED"))
  end

  local slow_made = false
  -- A slow target while the full load runs (a trigger sleeping now and then
  -- on the largest tables), so that each fault lands in a COPY; dropped after it.
  local function slow_target(on)
    local list = { "events", "calls", "sessions" }
    if on and not slow_made then
      slow_made = true
      local sql = { [[create function public.lab_slow() returns trigger language plpgsql as $$
        begin if random() < 0.015 then perform pg_sleep(0.05); end if; return new; end $$]] }
      for _, t in ipairs(list) do
        sql[#sql + 1] = ("create trigger lab_slow before insert on public.%s for each row execute function public.lab_slow()")
          :format(t)
      end
      target_sql(table.concat(sql, ";\n"))
    elseif not on and slow_made then
      slow_made = false
      local sql = {}
      for _, t in ipairs(list) do sql[#sql + 1] = ("drop trigger if exists lab_slow on public.%s"):format(t) end
      sql[#sql + 1] = "drop function if exists public.lab_slow()"
      target_sql(table.concat(sql, ";\n"))
    end
  end

  it("full.lua: the target restarted, stalled and full in the load, the state disk full, the primary restarted "
    .. "in CDC; each ridden out or stopped cleanly and resumed by a plain rerun", function()
    R:start_workload{ rate = 20 }
    local P = plan()
    local chunk = "^%d%d:%d%d:%d%d chunk %d+/%d+ of public%."
    local back = "connected again after"
    local restart = P:add{ name = "target restarted (immediate) in a chunk", when = chunk, back = back,
      inject = function() assert(R.lab.target:restart{ mode = "immediate", after = 0 }) end }
    local stall = P:add{ name = "target path stalled (blackhole 25 s) in a chunk", when = chunk, after = restart,
      back = back, inject = function() assert(R.lab.target.proxy:blackhole{ duration = 25 }) end }
    local full
    if R.lab.target.disk then
      full = P:add{ name = "target disk full in the load", when = chunk, after = stall,
        inject = function() assert(R.lab.target.disk:fill{ leave = MiB }) end }
    end
    local function lines(line, t)
      if line:match(starts("know_data")) then return function() slow_target(true) end end
      if line:match("^%d%d:%d%d:%d%d full_load: done") then return function() slow_target(false) end end
      return P:on_line(line, t)
    end

    local r = run("full.lua", { "--yes" }, lines)
    P:say(restart)
    P:say(stall)
    assert.truthy(restart.back_at, r.output)
    assert.truthy(stall.back_at, r.output)
    -- the stall is noticed within the COPY's stall bound (20 s) and the chunk done again
    assert.truthy(r.output:find("COPY stalled on the target side", 1, true), r.output)
    if full then
      assert.falsy(r.ok, r.output)
      assert.truthy(r.output:find("the target's storage is full", 1, true), r.output)
      assert.truthy(r.output:find("grow the target's storage", 1, true), r.output)
      R.lab.target.disk:unfill()
      P:say(full, ("stopped cleanly %.1f s after the fault (the target's storage is full); a plain rerun goes on")
        :format(r.ended - full.at))
      -- the rest of the load, then the state directory's disk fills: the journal cannot be written
      local P2 = plan()
      local journal_full = P2:add{ name = "state directory's disk full (the journal)", when = starts("matviews"),
        inject = function() assert(state_disk:fill{ leave = 0 }) end }
      r = run("full.lua", { "--yes" }, function(line, t)
        if line:match("^%d%d:%d%d:%d%d full_load: done") then return function() slow_target(false) end end
        return P2:on_line(line, t)
      end)
      state_disk:unfill()
      assert.falsy(r.ok, r.output)
      assert.truthy(r.output:find("cannot write the journal", 1, true), r.output)
      assert.truthy(r.output:find("state directory's disk is full or failing", 1, true), r.output)
      P2:say(journal_full, ("stopped cleanly %.1f s after the fault (cannot write the journal); a plain rerun goes on")
        :format(r.ended - journal_full.at))
    end
    slow_target(false)

    -- CDC watched while the primary restarts: the tasks reconnect (a recoverable error), migrun's sessions too
    local P3 = plan()
    local primary = P3:add{ name = "primary restarted (fast) as CDC is watched", when = starts("catch_up"),
      back = "READY FOR CUTOVER", inject = function() assert(R.lab.source:restart{ mode = "fast", after = 0 }) end }
    r = run("full.lua", { "--yes" }, function(line, t) return P3:on_line(line, t) end)
    if not r.ok then -- stopped cleanly: the same command again
      P3:say(primary, "stopped cleanly: " .. (r.output:match("FAILED: ([^\n]+)") or "?"):sub(1, 100))
      r = run("full.lua", { "--yes" })
    else
      P3:say(primary)
    end
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    H.assert_single_world(R)
    -- the workload's own session died with the primary: the application writes again
    R:stop_workload()
    R:start_workload{ rate = 20 }
  end)

  -- the group that holds public.calls
  local function calls_group()
    for _, g in ipairs(H.journal(R).playbooks.full.steps.groups.facts.groups) do
      for _, t in ipairs(g.tables) do if t.name == "calls" then return g end end
    end
  end

  it("an apply exception and a failed task are said with what to do; partial_restart.lua rides out a target "
    .. "restart in its reload", function()
    local g = calls_group()
    -- a change DMS cannot apply: the target refuses new calls rows
    target_sql("alter table public.calls add constraint lab_refuse check (duration_s < 0) not valid")
    local deadline = host.monotonic() + 60
    local n = 0
    while n == 0 and host.monotonic() < deadline do
      host.sleep(1)
      n = target_sql("select count(*) as n from public.awsdms_apply_exceptions")[1].n
    end
    assert.is_true(n > 0, "no apply exception landed")
    local r = run("full.lua", { "--yes" })
    assert.truthy(r.output:find("could not apply are in public.awsdms_apply_exceptions", 1, true), r.output)
    assert.truthy(r.output:find("public.calls", 1, true), r.output)
    assert.truthy(r.output:find("partial_restart.lua " .. g.slot, 1, true), r.output)
    report[#report + 1] = ("%-58s %s"):format("apply exception on public.calls", r.ok and "said, with what to do"
      or "said, with what to do; the verification stopped the run: " .. (r.output:match("FAILED: ([^\n]+)") or "?")
      :sub(1, 80))
    target_sql("alter table public.calls drop constraint lab_refuse")

    -- the group's task fails mid-CDC
    local id = cdc.task_id(NAME, g)
    assert(emulator.control(client, "SetFaults", { fail_tasks = { [id] = "injected by the fault campaign" } }))
    deadline = host.monotonic() + 30
    local function status()
      return assert(client:describe_replication_tasks{ Filters = { ["replication-task-id"] = id } })[1].Status
    end
    while status() ~= "failed" and host.monotonic() < deadline do host.sleep(0.2) end
    assert.equal("failed", status())
    assert(emulator.control(client, "SetFaults", {}))
    r = run("full.lua", { "--yes" })
    assert.falsy(r.ok, r.output)
    assert.truthy(r.output:find("injected by the fault campaign", 1, true), r.output)
    assert.truthy(r.output:find("partial_restart.lua " .. g.slot, 1, true), r.output)
    report[#report + 1] = ("%-58s %s"):format("DMS task of " .. g.slot .. " failed mid-CDC",
      "stopped cleanly, naming the task and partial_restart.lua " .. g.slot)

    -- the partial restart, the target restarted in its reload
    local P = plan()
    local restart = P:add{ name = "target restarted (fast) in partial_restart's reload", when = starts("reload"),
      back = "connected again after",
      inject = function() assert(R.lab.target:restart{ mode = "fast", after = 2 }) end }
    local function lines(line, t)
      if line:match(starts("slot")) then return function() slow_target(true) end end
      if line:match("^%d%d:%d%d:%d%d reload: done") then return function() slow_target(false) end end
      return P:on_line(line, t)
    end
    r = run("partial_restart.lua", { g.slot, "--yes" }, lines)
    slow_target(false)
    if not r.ok then
      P:say(restart, "stopped cleanly: " .. (r.output:match("FAILED: ([^\n]+)") or "?"):sub(1, 100))
      r = run("partial_restart.lua", { g.slot, "--yes" })
    else
      P:say(restart)
    end
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find(g.slot .. " has caught up", 1, true), r.output)
    -- the main playbook's catch_up again, which the cutover needs done
    r = run("full.lua", { "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    H.assert_single_world(R)
  end)

  it("cutover.lua: the primary restarted while it waits for the tasks; every table equal at the end", function()
    R:stop_workload()
    local P = plan()
    local primary = P:add{ name = "primary restarted (immediate) in the cutover's wait", when = starts("wait_applied"),
      back = "every task has applied the fence",
      inject = function() assert(R.lab.source:restart{ mode = "immediate" }) end }
    local r = run("cutover.lua", { "--yes" }, function(line, t) return P:on_line(line, t) end)
    if not r.ok then
      P:say(primary, "stopped cleanly: " .. (r.output:match("FAILED: ([^\n]+)") or "?"):sub(1, 100))
      r = run("cutover.lua", { "--yes" })
    else
      P:say(primary)
    end
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("cutover: done", 1, true), r.output)
    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))
  end)
end)
