-- The fault campaign (make test-faults): migrun killed with SIGKILL at the
-- start of every step of full.lua in turn, and in the middle of the long ones,
-- under a write workload; after each kill the same command again, without
-- options, resumes. Then the same for partial_restart.lua and full_restart.lua
-- at their steps, and cutover.lua to the end: every table equal by count and
-- row hash, nothing created twice, no process left behind.
local H = require "helpers.rehearsal"
local emulator = require "migrun.rehearsal.emulator"
local cdc = require "migrun.cdc"
local aws = require "migrun.aws"

local NAME = "faults-kill"
local RATE = 20

-- "HH:MM:SS step: title", the line the runner prints when a step starts
local function starts(step) return "^%d%d:%d%d:%d%d " .. step:gsub("%p", "%%%0") .. ": " end

describe("kill it anywhere", function()
  local R, client
  local log = {}

  setup(function()
    -- page_views has no primary key: its updates cannot replicate, its rows are counted
    -- chunks of 1 MiB: the larger tables load (and are hashed by the final QA) in chunks
    R = H.rehearsal(NAME, { config = { cutover = { count_only = { "public.page_views" } },
      full_load = { chunk_bytes = 1048576, split_bytes = 1048576 } } })
    client = assert(R.lab:dms_client())
  end)
  teardown(function()
    io.stderr:write("\nkills:\n  ", table.concat(log, "\n  "), "\n")
    if R then
      R:stop_workload()
      R:close()
    end
  end)

  local function steps_of(playbook, args)
    local argv = { "--list" }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local r = H.run(R, playbook, argv)
    assert.is_true(r.ok, r.output)
    local names = {}
    for name in r.output:gmatch("%s*%d+%. ([%w_]+)") do names[#names + 1] = name end
    assert.is_true(#names > 3, r.output)
    return names
  end

  -- One kill: run until the pattern, SIGKILL, then no orphan may remain.
  local function kill_at(playbook, args, pattern, delay)
    local argv = { "--yes" }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local r = H.run(R, playbook, argv, { kill_when = pattern, kill_delay = delay })
    log[#log + 1] = ("%s %s: %s"):format(playbook, pattern, r.killed and "killed" or ("ran to the end: " .. tostring(r.code)))
    -- the kernel reaps a dead parent's children at once; give their exit a moment
    local orphans
    for _ = 1, 20 do
      orphans = H.orphans()
      if #orphans == 0 then break end
      aws.sleep(0.1)
    end
    assert.same({}, orphans, "left behind after killing " .. playbook .. " at " .. pattern)
    return r
  end

  local function plan() return H.journal(R).playbooks.full.steps.groups.facts.groups end

  it("full.lua: killed at every step and inside the long ones, resumed each time by a plain rerun", function()
    R:start_workload{ rate = RATE }
    local points = {}
    for _, step in ipairs(steps_of("full.lua")) do
      points[#points + 1] = { starts(step) }
      if step == "schema" then points[#points + 1] = { "%-%-section=pre%-data" } end
      if step == "full_load" then
        points[#points + 1] = { "^%d%d:%d%d:%d%d chunk %d+/%d+ of public%." }
        points[#points + 1] = { "^%d%d:%d%d:%d%d loaded public%." }
      end
      if step == "indexes" then points[#points + 1] = { "%-%-section=post%-data" } end
      if step == "dms_setup" then points[#points + 1] = { starts("dms_setup"), 0.5 } end
      if step == "catch_up" then points[#points + 1] = { "tasks caught up:" } end
    end
    for _, p in ipairs(points) do kill_at("full.lua", {}, p[1], p[2]) end
    local r = H.run(R, "full.lua", {})
    assert.is_true(r.ok, table.concat(log, "\n") .. "\n" .. r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    H.assert_single_world(R)
  end)

  it("partial_restart.lua: killed at every step, resumed each time", function()
    local bad = plan()[1]
    local id = cdc.task_id(NAME, bad)
    assert(emulator.control(client, "SetFaults", { fail_tasks = { [id] = "injected by the fault campaign" } }))
    local deadline = aws.monotonic() + 30
    local function status()
      return assert(client:describe_replication_tasks{ Filters = { ["replication-task-id"] = id } })[1].Status
    end
    while status() ~= "failed" and aws.monotonic() < deadline do aws.sleep(0.2) end
    assert.equal("failed", status())
    assert(emulator.control(client, "SetFaults", {}))
    for _, step in ipairs(steps_of("partial_restart.lua", { bad.slot })) do
      kill_at("partial_restart.lua", { bad.slot }, starts(step))
    end
    local r = H.run(R, "partial_restart.lua", { bad.slot, "--yes" })
    assert.is_true(r.ok, table.concat(log, "\n") .. "\n" .. r.output)
    assert.truthy(r.output:find(bad.slot .. " has caught up", 1, true), r.output)
    H.assert_single_world(R)
  end)

  it("full_restart.lua: killed at every step, resumed; then cutover.lua; every table equal", function()
    for _, step in ipairs(steps_of("full_restart.lua")) do kill_at("full_restart.lua", {}, starts(step)) end
    -- once the restart has handed over to full.lua, full.lua is what resumes
    local r = kill_at("full_restart.lua", {}, "starting again from the beginning")
    assert.is_true(r.killed, r.output)
    kill_at("full.lua", {}, starts("full_load"))
    r = H.run(R, "full.lua", { "--yes" })
    assert.is_true(r.ok, table.concat(log, "\n") .. "\n" .. r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    H.assert_single_world(R)

    -- the cutover, killed once in its middle (its stop_writes is "none" here: the application stops first)
    R:stop_workload()
    kill_at("cutover.lua", {}, starts("verify"))
    r = H.run(R, "cutover.lua", { "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("cutover: done", 1, true), r.output)
    -- (cutover.lua waited for every slot to apply the last changes, then stopped the tasks)
    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))
  end)
end)
