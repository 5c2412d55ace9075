-- playbooks/partial_restart.lua and playbooks/full_restart.lua end to end on
-- the lab and the DMS emulator: one group's task is made to fail after a full
-- run and only that group is migrated again under writes (twice), with the
-- healthy groups' tasks never stopped; a slot that is not migrun's is refused
-- with nothing changed; a failed run is scrapped by a full restart that ends
-- equal with the previous journal kept in attempt-1/. The migration's main
-- playbook is a team's copy of full.lua under another name (billing.lua,
-- playbook "billing"): the restarts and cutover.lua follow it.
local H = require "helpers.rehearsal"
local emulator = require "migrun.rehearsal.emulator"
local cdc = require "migrun.cdc"
local aws = require "migrun.aws"
local cjson = require "cjson"

local NAME = "e2e-restart"
local RATE = 30

describe("restart playbooks", function()
  local R, client, MAIN

  setup(function()
    -- page_views has no primary key: its updates cannot replicate, the cutover counts its rows
    R = H.rehearsal(NAME, { config = { cutover = { count_only = { "public.page_views" } } } })
    client = assert(R.lab:dms_client())
    MAIN = H.copy_main(R, "billing")
  end)
  teardown(function()
    if R then
      R:stop_workload()
      R:close()
    end
  end)

  local function plan() return H.journal(R).playbooks.billing.steps.groups.facts.groups end
  local function group_with(table_name)
    for _, g in ipairs(plan()) do
      for _, t in ipairs(g.tables) do
        if t.schema .. "." .. t.name == table_name then return g end
      end
    end
  end
  local function task_of(g)
    local list = assert(client:describe_replication_tasks{ Filters = { ["replication-task-id"] = cdc.task_id(NAME, g) } })
    return list[1]
  end
  local function fail_task(g, message)
    assert(emulator.control(client, "SetFaults", { fail_tasks = { [cdc.task_id(NAME, g)] = message } }))
    local deadline = aws.monotonic() + 30
    while task_of(g).Status ~= "failed" and aws.monotonic() < deadline do aws.sleep(0.2) end
    assert.equal("failed", task_of(g).Status)
    assert(emulator.control(client, "SetFaults", {})) -- a replacement task must be able to run
  end
  local function ends_equal()
    R:stop_workload()
    assert.is_true(H.wait_applied(R, 120), "the tasks did not apply the last changes")
    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))
  end

  it("partial_restart.lua migrates one failed group again under writes; the others are never touched", function()
    R:start_workload{ rate = RATE }
    local r1 = H.run(R, MAIN, { "--yes" })
    assert.is_true(r1.ok, r1.output)
    assert.truthy(r1.output:find("READY FOR CUTOVER", 1, true), r1.output)

    local bad = assert(group_with("public.events"))
    fail_task(bad, "injected: the task of events failed")
    local r2 = H.run(R, MAIN, { "--yes" })
    assert.is_falsy(r2.ok, r2.output)
    assert.truthy(r2.output:find("catch_up failed", 1, true), r2.output)
    assert.truthy(r2.output:find("partial_restart.lua " .. bad.slot, 1, true), r2.output)

    -- the healthy groups, as they are before the partial restart
    local healthy = {}
    for _, g in ipairs(plan()) do
      if g.slot ~= bad.slot then
        local t = task_of(g)
        assert.equal("running", t.Status)
        healthy[#healthy + 1] = { g = g, arn = t.ReplicationTaskArn, started = t.ReplicationTaskStartDate }
      end
    end
    assert.is_true(#healthy >= 2)
    local old_arn = task_of(bad).ReplicationTaskArn

    local r3 = H.run(R, "partial_restart.lua", { bad.slot, "--yes" })
    assert.is_true(r3.ok, r3.output)
    assert.truthy(r3.output:find(bad.slot .. " has caught up", 1, true), r3.output)

    local J = H.journal(R)
    local section = J.playbooks["partial_restart-" .. bad.slot]
    assert.equal("done", section.steps.catch_up.status)
    local new_lsn = section.steps.pause_replica.facts.lsn
    local t = task_of(bad)
    assert.equal("running", t.Status)
    assert.are_not.equal(old_arn, t.ReplicationTaskArn)
    assert.equal(new_lsn, t.CdcStartPosition)
    -- the main playbook's facts follow the new task
    assert.equal(t.ReplicationTaskArn, J.playbooks.billing.steps.dms_setup.facts.tasks[bad.slot])
    -- the failure state is in the report
    local report = assert(io.open(R.config.state_dir .. "/report.md")):read("a")
    assert.truthy(report:find("Failure state: tasks", 1, true), report)
    assert.truthy(report:find("injected: the task of events failed", 1, true), report)

    -- a second partial restart of the same slot: a section of its own, from the top
    local r4 = H.run(R, "partial_restart.lua", { bad.slot, "--yes" })
    assert.is_true(r4.ok, r4.output)
    J = H.journal(R)
    assert.equal("done", J.playbooks["partial_restart-" .. bad.slot .. "-2"].steps.catch_up.status)
    assert.are_not.equal(t.ReplicationTaskArn, task_of(bad).ReplicationTaskArn)

    -- full.lua watches the new task and is ready again
    local r5 = H.run(R, MAIN, { "--yes" })
    assert.is_true(r5.ok, r5.output)
    assert.truthy(r5.output:find("READY FOR CUTOVER", 1, true), r5.output)

    -- the healthy tasks: the same tasks, running, never stopped or restarted
    for _, h in ipairs(healthy) do
      local now = task_of(h.g)
      assert.equal(h.arn, now.ReplicationTaskArn)
      assert.equal("running", now.Status)
      assert.equal(h.started, now.ReplicationTaskStartDate)
      assert.is_nil(now.ReplicationTaskStats.StopDate)
    end
    ends_equal()
  end)

  it("partial_restart.lua refuses a slot that is not migrun's and changes nothing", function()
    local src = H.connect(R.lab.source, "source")
    assert(src:exec("select pg_create_logical_replication_slot('dms_slot_99', 'test_decoding')"))
    finally(function()
      src:exec("select pg_drop_replication_slot('dms_slot_99')")
      src:close()
    end)
    local before_world = H.world(R)
    local before_tasks = {}
    for _, t in ipairs(assert(client:describe_replication_tasks())) do
      before_tasks[t.ReplicationTaskArn] = t.Status .. " " .. tostring(t.ReplicationTaskStartDate)
    end
    local before_rows = H.differences(R, { count_only = { ["public.page_views"] = true } })

    for _, slot in ipairs{ "dms_slot_99", "other_tool_slot" } do
      local r = H.run(R, "partial_restart.lua", { slot, "--yes" })
      assert.is_falsy(r.ok, r.output)
      assert.equal(1, r.code, r.output)
      assert.truthy(r.output:find("is not a slot of this migration", 1, true), r.output)
    end
    local r = H.run(R, "partial_restart.lua", { "--yes" })
    assert.equal(2, r.code, r.output)

    assert.same(before_world, H.world(R))
    local after_tasks = {}
    for _, t in ipairs(assert(client:describe_replication_tasks())) do
      after_tasks[t.ReplicationTaskArn] = t.Status .. " " .. tostring(t.ReplicationTaskStartDate)
    end
    assert.same(before_tasks, after_tasks)
    assert.same(before_rows, H.differences(R, { count_only = { ["public.page_views"] = true } }))
  end)

  it("full_restart.lua scraps a failed attempt, keeps its journal in attempt-1/, and ends equal", function()
    R:start_workload{ rate = RATE, seed = 2 }
    local bad = assert(group_with("public.calls"))
    fail_task(bad, "injected: the task of calls failed")
    local r1 = H.run(R, MAIN, { "--yes" })
    assert.is_falsy(r1.ok, r1.output)
    local old = H.journal(R)

    local r2 = H.run(R, "full_restart.lua", { "--yes" })
    assert.is_true(r2.ok, r2.output)
    assert.truthy(r2.output:find("READY FOR CUTOVER", 1, true), r2.output)

    -- the previous attempt, set aside whole
    local f = assert(io.open(R.config.state_dir .. "/attempt-1/journal.json"))
    local aside = cjson.decode(f:read("a"))
    f:close()
    assert.equal(cjson.encode(old.playbooks.billing.steps.pause_replica), cjson.encode(aside.playbooks.billing.steps.pause_replica))
    assert.equal("done", aside.playbooks.full_restart.steps.empty_target.status)
    assert.truthy(io.open(R.config.state_dir .. "/attempt-1/report.md"))
    -- the new journal: full.lua from the top, the schema step carried over (truncate)
    local J = H.journal(R)
    assert.is_nil(J.playbooks.full_restart)
    assert.equal("done", J.playbooks.billing.steps.catch_up.status)
    assert.are_not.equal(old.playbooks.billing.steps.pause_replica.facts.lsn, J.playbooks.billing.steps.pause_replica.facts.lsn)
    assert.truthy(J.playbooks.billing.steps.schema.facts.carried_from:find("attempt%-1$"))

    -- nothing twice: one task per group, one endpoint per group plus the target
    assert.equal(#plan(), #assert(client:describe_replication_tasks()))
    assert.equal(#plan() + 1, #assert(client:describe_endpoints()))
    for _, g in ipairs(plan()) do assert.equal("running", task_of(g).Status) end
    ends_equal()
  end)
  it("full_restart.lua with restart.target = \"drop_schema\" drops the schemas, restores them, ends equal", function()
    R:start_workload{ rate = RATE, seed = 3 }
    local cfg = {}
    for k, v in pairs(R.config) do cfg[k] = v end
    cfg.restart = { target = "drop_schema" }
    local path = R.dir .. "/drop-schema.lua"
    assert(require("migrun.host").write_file(path, "return " .. require("migrun.rehearsal.demo").literal(cfg) .. "\n"))
    local variant = setmetatable({ config_path = path }, { __index = R })
    local before = H.journal(R)
    local r = H.run(variant, "full_restart.lua", { "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    assert.truthy(io.open(R.config.state_dir .. "/attempt-2/journal.json"))
    -- the schema was restored again rather than carried over
    local J = H.journal(R)
    assert.is_nil(J.playbooks.billing.steps.schema.facts.carried_from)
    assert.are_not.equal(before.playbooks.billing.steps.pause_replica.facts.lsn, J.playbooks.billing.steps.pause_replica.facts.lsn)
    assert.equal(#plan(), #assert(client:describe_replication_tasks()))
    ends_equal()
  end)

  it("cutover.lua ends the migration whose main playbook is the copy", function()
    -- cutover.stop_writes is "none" here: the application has stopped writing
    local r = H.run(R, "cutover.lua", { "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("cutover: done", 1, true), r.output)
    assert.equal("done", H.step_status(R, "checklist", "cutover"))
    ends_equal()
  end)
end)
