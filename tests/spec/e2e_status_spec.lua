-- `status --json` never breaks: while full.lua and then cutover.lua run under
-- a write workload, another process asks `migrun playbooks/status.lua --json`
-- every half second, as a team's script or dashboard would; every answer is
-- read back and must be a status (exit 0, JSON with status_version 1), in
-- every state of every step: before the first step, during the load, while a
-- task has started but applied nothing yet (source_timestamp_applied NULL:
-- the answer that used to be "json: cannot encode a userdata", exit 1), during
-- catch-up and the cutover, after it. The WAL guard's readings are in
-- samples.jsonl through the whole run.
local H = require "helpers.rehearsal"
local proc = require "migrun.proc"
local host = require "migrun.host"
local live = require "migrun.playbook.live"
local cjson = require "cjson"

describe("status --json through a whole run", function()
  local R, poller, answers_path, stop_file

  setup(function()
    R = H.rehearsal("e2e-status", { config = {
      wal_guard = { interval = 1 },
      -- phase I lasts a second at the sanitizer build's scale: know_data's write rates are
      -- sampled over 3 s, so the guard (every second) has readings in phase I whatever the scale
      know_data = { write_rate_seconds = 3 },
      -- the tasks start 3 s apart (not the rehearsal's 0.2 s): with the emulator's
      -- 3 s between slot reads (below), a task that applied nothing yet is there
      -- for some 15 s of answers
      dms = { start_pause = 3 },
      cutover = { stop_writes = "read_only", existing_sessions = "terminate", sessions_timeout = 30,
        apply_timeout = 300, count_only = { "public.page_views" } } },
      -- the emulator's tasks read their slot every 3 s: a task that started has applied
      -- nothing for a while (awsdms_status.source_timestamp_applied NULL), as with real DMS
      dms = { delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, connection = 0.1, cdc_poll = 3,
        endpoint_delete = 0.1, task_delete = 0.1, task_modify = 0.1 } } })
    answers_path, stop_file = R.dir .. "/answers.jsonl", R.dir .. "/poller.stop"
  end)
  teardown(function()
    if poller then
      host.write_file(stop_file, "")
      poller:wait(30)
      poller:close()
    end
    if R then R:close() end
  end)

  local function answers()
    local list = {}
    local f = io.open(answers_path)
    for line in (f and f:read("a") or ""):gmatch("[^\n]+") do list[#list + 1] = cjson.decode(line) end
    if f then f:close() end
    return list
  end

  it("answers every poll with a status, from the first step to after the cutover", function()
    poller = assert(proc.spawn{ H.MIGRUN, H.ROOT .. "/tests/helpers/status_poller.lua", H.MIGRUN,
      H.ROOT .. "/playbooks/status.lua", R.config_path, answers_path, stop_file, "0.5",
      env = R.env, stdin = false, stdout = "null", stderr = "null", die_with_parent = true })
    R:start_workload{ rate = 20 }
    local full = H.run(R, "full.lua", { "--yes" })
    assert.is_true(full.ok, full.output)
    local cut = H.run(R, "cutover.lua", { "--yes" })
    assert.is_true(cut.ok, cut.output)
    R:stop_workload()
    host.sleep(1.5) -- a few answers after the run
    assert(host.write_file(stop_file, ""))
    assert.is_true((poller:wait(60)))
    poller:close()
    poller = nil

    local list = answers()
    assert.is_true(#list >= 20, ("only %d answers"):format(#list))
    local steps, pending_apply, running_answers = {}, 0, 0
    for i, a in ipairs(list) do
      local where = ("answer %d of %d (%.1f s): exit %s %s\n%s"):format(i, #list, a.seconds, tostring(a.how),
        tostring(a.code), a.err)
      assert.is_true(a.ok, where)
      local ok, s = pcall(cjson.decode, a.out)
      assert.is_true(ok, where .. "\nnot JSON: " .. tostring(s) .. "\n" .. a.out:sub(1, 300))
      assert.equal(1, s.status_version, where)
      if s.running then running_answers = running_answers + 1 end
      if s.step then steps[s.step.playbook .. "." .. s.step.name] = true end
      for _, t in ipairs(s.tasks or {}) do
        if t.status == "running" and t.applied_at == nil and t.source == "dms" then pending_apply = pending_apply + 1 end
      end
    end
    -- the states the answers went through: the load, the tasks starting, the cutover
    for _, step in ipairs{ "full.full_load", "full.dms_start", "full.catch_up" } do
      assert.truthy(steps[step], step .. " never seen; seen: " .. table.concat((function()
        local k = {}
        for n in pairs(steps) do k[#k + 1] = n end
        table.sort(k)
        return k
      end)(), ", "))
    end
    local cutover_seen = false
    for name in pairs(steps) do if name:match("^cutover%.") then cutover_seen = true end end
    assert.is_true(cutover_seen, "no answer during the cutover")
    assert.is_true(running_answers > 10, running_answers .. " answers while a playbook ran")
    -- the state that broke --json: a task running that has applied nothing yet
    assert.is_true(pending_apply > 0, "no answer saw a task that had applied nothing yet")

    -- the guard's readings, through the whole run: the charts have the load too
    local guard, steps_sampled = 0, {}
    for _, smp in ipairs(live.read_samples(R.config.state_dir)) do
      if smp.kind == "guard" then
        guard = guard + 1
        if smp.step then steps_sampled[smp.step] = true end
      end
    end
    assert.is_true(guard >= 5, guard .. " guard readings")
    -- a reading in phase I (know_data lasts 3 s; the load itself may last less than a second)
    local phase1 = false
    for _, st in ipairs{ "know_data", "pause_replica", "verify_lsn", "hold_indexes", "full_load", "indexes", "matviews",
        "fidelity", "qa", "resume_replica" } do
      phase1 = phase1 or steps_sampled[st] or false
    end
    assert.is_true(phase1, "no guard reading during the load")
  end)
end)
