-- migrun.pool: tasks over child processes, largest first, and at most
-- limits[group] of a group at once (qa.compare's two sides each get their
-- share of the processes). The pool runs in a migrun process of its own whose
-- LUA_PATH finds tests/helpers/pool_probe.lua, as its worker processes do.
local proc = require "migrun.proc"
local json = require "migrun.json"
local cli = require "helpers.cli"

-- Runs a pool of `jobs` over `tasks` ({ group =, cost = } each, every task
-- waiting `seconds`) -> the order tasks started in (their groups), the most
-- of each group that ran at once, and the most at once in all.
-- later: { ["n"] = { n = m } }: once task n is done, a task m is added (as
-- the full load adds a table's index builds when its last chunk is in).
-- use: each task takes the idle processes it is offered (they count as busy).
-- soft: { [group] = true }, the pool's soft limits; lanes: its lanes.
-- Runs a script in a migrun of its own, its input JSON on stdin -> its output, decoded.
local function run_lua(script, input)
  local ok, how, code, out, err = proc.run{ cli.bin, "-e", script, timeout = cli.timeout,
    stdin = json.encode(input), stdout = "capture", stderr = "capture",
    env = { LUA_PATH = cli.source .. "/tests/?.lua;;", LUA_INIT = false, LUA_INIT_5_4 = false, MIGRUN_LUA_PATH = false } }
  assert(ok, ("the pool process %s %s: %s"):format(tostring(how), tostring(code), tostring(err)))
  return json.decode(out)
end

local function run_pool(jobs, limits, tasks, seconds, later, use, soft, lanes)
  local script = [[
    local pool, json = require "migrun.pool", require "migrun.json"
    local spec = json.decode(io.read("a"))
    local limits = spec.limits or {}
    local running, most, order, all, most_all, idle = {}, {}, {}, 0, 0, {}
    local p
    p = pool.new{ jobs = spec.jobs, limits = limits, soft = spec.soft, lanes = spec.lanes, entry = "helpers.pool_probe",
      on_start = function(task, n) idle[#idle + 1] = { task.job.n, n } return spec.use and n or 0 end,
      on_event = function(task, ev)
        if ev.event == "started" then
          local g = task.group or "-"
          running[g] = (running[g] or 0) + 1
          most[g] = math.max(most[g] or 0, running[g])
          all = all + 1
          most_all = math.max(most_all, all)
          order[#order + 1] = g
        end
        return true
      end,
      on_done = function(task)
        local g = task.group or "-"
        running[g] = running[g] - 1
        all = all - 1
        local later = spec.later and spec.later[tostring(task.job.n)]
        if later then p:add{ job = { n = later.n, seconds = spec.seconds }, cost = 1 } end
        return true
      end }
    for i, t in ipairs(spec.tasks) do
      p:add{ job = { n = i, group = t.group, seconds = t.seconds or spec.seconds }, cost = t.cost, group = t.group }
    end
    assert(p:run())
    io.write(json.encode{ order = order, most = most, most_all = most_all, idle = idle })
  ]]
  return run_lua(script, { jobs = jobs, limits = limits, tasks = tasks, seconds = seconds, later = later, use = use,
      soft = soft, lanes = lanes })
end

local function tasks_of(spec)
  local t = {}
  for _, s in ipairs(spec) do
    for _ = 1, s[1] do t[#t + 1] = { group = s[2], cost = s[3] } end
  end
  return t
end

describe("migrun.pool", function()
  it("runs the largest tasks first, as many at once as it has processes", function()
    -- one process: the order they start in is the order they are taken in;
    -- the small ones were added first, and still start last
    local r = run_pool(1, nil, tasks_of{ { 2, "small", 1 }, { 3, "big", 5 } }, 0.05)
    assert.same({ "big", "big", "big", "small", "small" }, r.order)
    assert.equal(3, run_pool(3, nil, tasks_of{ { 6, nil, 1 } }, 0.2).most_all)
  end)

  it("runs at most limits[group] tasks of a group at once, and the other group alongside", function()
    -- a's tasks are the larger: without limits all 4 processes would take a's
    -- first, and b would wait for the last of them
    local r = run_pool(4, { a = 2, b = 2 }, tasks_of{ { 6, "a", 10 }, { 6, "b", 1 } }, 0.3)
    assert.same({ a = 2, b = 2 }, r.most)
    assert.equal(4, r.most_all)
    local first_b, last_a
    for i, g in ipairs(r.order) do
      if g == "b" and not first_b then first_b = i end
      if g == "a" then last_a = i end
    end
    assert.is_true(first_b < last_a, "b started only once a had nearly finished: " .. table.concat(r.order, " "))
  end)

  it("bounds a group without a limit by the processes only", function()
    local r = run_pool(3, { b = 1 }, tasks_of{ { 4, "a", 10 }, { 3, "b", 20 } }, 0.2)
    assert.equal(1, r.most.b)
    assert.equal(2, r.most.a) -- the third process: b is at its limit, a takes it
    assert.equal(3, r.most_all)
  end)

  it("tells a task as it starts how many processes nothing else is queued for", function()
    -- three tasks for three processes: each starts with the others queued or running
    local r = run_pool(3, nil, tasks_of{ { 3, nil, 1 } }, 0.1)
    assert.same({ { 1, 0 }, { 2, 0 }, { 3, 0 } }, r.idle)
    -- one long task and one short on three processes: the spare one offered
    -- to each (none takes it); once the short one is done, the task it adds
    -- starts beside the long one, offered it too
    r = run_pool(3, nil, { { cost = 2, seconds = 1.5 }, { cost = 1, seconds = 0.1 } }, 0.1, { ["2"] = { n = 3 } })
    assert.same({ { 1, 1 }, { 2, 1 }, { 3, 1 } }, r.idle)
    -- alone on an idle pool: every other process
    assert.same({ { 1, 3 } }, run_pool(4, nil, tasks_of{ { 1, nil, 1 } }, 0).idle)
    -- two tasks on five processes share the three spare ones, the first the odd one
    assert.same({ { 1, 2 }, { 2, 1 } }, run_pool(5, nil, tasks_of{ { 2, nil, 1 } }, 0.3, nil, true).idle)
    -- what a running task took counts as busy for a task added while it runs
    r = run_pool(3, nil, { { cost = 2, seconds = 1.5 }, { cost = 1, seconds = 0.1 } }, 0.1, { ["2"] = { n = 3 } }, true)
    assert.same({ { 1, 1 }, { 2, 0 }, { 3, 0 } }, r.idle)
  end)

  it("lets a soft limit give way when nothing else queued can run", function()
    -- c's tasks are the larger; with a soft limit of 1 they run one at a time
    -- beside d's, and on both processes once d's are done
    local tasks = tasks_of{ { 4, "c", 10 }, { 2, "d", 1 } }
    for _, t in ipairs(tasks) do t.seconds = t.group == "c" and 0.5 or 0.1 end
    local r = run_pool(2, { c = 1 }, tasks, nil, nil, nil, { c = true })
    local started = {} -- in the order the pool started them (c's are 1-4, d's 5 and 6)
    for i, x in ipairs(r.idle) do started[i] = x[1] end
    assert.same({ 1, 5, 6, 2, 3, 4 }, started)
    assert.equal(2, r.most.c)
    -- a hard limit holds: one process stays empty
    r = run_pool(2, { c = 1 }, tasks_of{ { 3, "c", 10 } }, 0.1)
    assert.equal(1, r.most.c)
  end)

  it("runs a lane's group in processes of its own, beside the others and never in their place", function()
    -- one process for the load, a lane of one for h: each runs one at a time, side by side
    local r = run_pool(1, nil, tasks_of{ { 3, nil, 5 }, { 3, "h", 1 } }, 0.3, nil, nil, nil, { h = 1 })
    assert.same({ ["-"] = 1, h = 1 }, r.most)
    assert.equal(2, r.most_all)
    -- nothing but the lane's tasks: the other process stays empty
    r = run_pool(1, nil, tasks_of{ { 3, "h", 1 } }, 0.1, nil, nil, nil, { h = 1 })
    assert.same({ h = 1 }, r.most)
  end)

  it("runs a slot's tasks one after another in one worker process, which exits at the end", function()
    local script = [[
      local pool, json, proc = require "migrun.pool", require "migrun.json", require "migrun.proc"
      local spec = json.decode(io.read("a"))
      local seen, done = {}, {}
      local p = pool.new{ jobs = 2, entry = "helpers.pool_probe",
        on_event = function(task, ev)
          if ev.event == "started" then seen[#seen + 1] = { n = ev.n, pid = ev.pid, served = ev.served, task_pid = task.pid } end
          return true
        end,
        on_done = function(task) done[#done + 1] = task.job.n return true end }
      for n = 1, spec.tasks do p:add{ job = { n = n, seconds = 0.05, fail = n == spec.fail or nil }, cost = 1 } end
      local ok, failure = p:run()
      local alive = {}
      for _, s in ipairs(seen) do
        alive[#alive + 1] = proc.run{ "kill", "-0", tostring(s.pid), stderr = "null" } or false
      end
      io.write(json.encode{ seen = seen, done = done, ok = ok or false, failure = failure and failure.message,
        alive = alive })
    ]]
    local r = run_lua(script, { tasks = 8 })
    assert.is_true(r.ok)
    assert.equal(8, #r.seen)
    assert.equal(8, #r.done)
    local pids, most = {}, 0
    for _, s in ipairs(r.seen) do
      assert.equal(s.pid, s.task_pid) -- task.pid is the worker that runs it
      pids[s.pid] = (pids[s.pid] or 0) + 1
      most = math.max(most, s.served)
    end
    local workers = 0
    for _, n in pairs(pids) do workers = workers + 1 assert.is_true(n >= 2, require("migrun.json").encode(r.seen)) end
    assert.equal(2, workers) -- two slots, two processes for eight tasks
    assert.is_true(most >= 2) -- module state lives on between a worker's tasks
    for _, a in ipairs(r.alive) do assert.is_false(a) end -- the workers exited with the run
    -- a task that fails ends the run with its message, its worker and the other stopped
    r = run_lua(script, { tasks = 8, fail = 5 })
    assert.is_false(r.ok)
    assert.truthy(r.failure:find("task 5 failed", 1, true), r.failure)
    for _, a in ipairs(r.alive) do assert.is_false(a) end
  end)

  it("hands a stop request on however busy it is with its workers' events", function()
    -- the guard's stop (SIGUSR1) while the tasks talk without a pause: the
    -- parent is decoding their lines (a stop waits while migrun.proc hands a
    -- line to its callback) or waiting for more; either way the pool stops
    local script = [[
      local pool, host = require "migrun.pool", require "migrun.host"
      host.listen_stop(true)
      local said
      local p = pool.new{ jobs = 2, entry = "helpers.pool_probe", on_event = function(_, ev)
        if ev.event == "chatter" and not said then said = true io.stdout:write("ready\n") io.stdout:flush() end
        return true
      end }
      for n = 1, 2 do p:add{ job = { n = n, seconds = 30, chatter = true }, cost = 1 } end
      local t0 = host.monotonic()
      local ok, e = pcall(function() host.arm_stop(true) return p:run() end)
      host.arm_stop(false)
      print(ok, type(e) == "table" and e.kind or tostring(e), host.monotonic() - t0 < 20)
    ]]
    for _ = 1, 5 do
      local h = assert(proc.spawn{ cli.bin, "-e", script, stdout = "capture", stderr = "capture",
        env = { LUA_PATH = cli.source .. "/tests/?.lua;;", LUA_INIT = false, LUA_INIT_5_4 = false,
                MIGRUN_LUA_PATH = false } })
      for _ = 1, 200 do
        if h.stdout:find("ready\n", 1, true) then break end
        h:wait(0.05)
      end
      h:wait(0.5) -- deep in the chatter by now
      h:kill("USR1")
      local ok, how = h:wait(40)
      assert(how ~= "timeout", "the pool did not stop: " .. h.stdout .. h.stderr)
      assert.equal("ready\nfalse\tguard\ttrue\n", h.stdout, h.stderr)
      assert.is_true(ok, h.stderr)
      h:close()
    end
  end)

  it("raises on misuse of limits and groups", function()
    local pool = require "migrun.pool"
    assert.has_error(function() pool.new{ jobs = 2, entry = "x", limits = { a = 0 } } end,
      "pool.new: limits must map group names to positive integers")
    assert.has_error(function() pool.new{ jobs = 2, entry = "x", limits = "a" } end,
      "pool.new: limits must be a table { [group] = n }")
    local p = pool.new{ jobs = 1, entry = "x" }
    assert.has_error(function() p:add{ job = {}, group = 1 } end, "pool:add: task.group must be a string")
  end)
end)
