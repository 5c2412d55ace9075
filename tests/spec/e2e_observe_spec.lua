-- Watching a migration from elsewhere, end to end on the lab and the DMS
-- emulator under writes: playbooks/status.lua (a second migrun) while
-- full.lua runs and after it stopped; the metrics endpoint scraped during the
-- run, its values checked against the primary; the notify command and a
-- webhook receiver (a luasocket listener in this test) getting the run's
-- events, a WAL-guard stop, the cutover and a task failed through the
-- emulator; report.html of the whole migration rendered in headless Chromium.
-- The full load is held in the middle (the target's events table locked by
-- this test) so that there is a moment to look at.
local H = require "helpers.rehearsal"
local demo = require "migrun.rehearsal.demo"
local emulator = require "migrun.rehearsal.emulator"
local cdc = require "migrun.cdc"
local live = require "migrun.playbook.live"
local host = require "migrun.host"
local proc = require "migrun.proc"
local socket = require "socket"
local cjson = require "cjson"

local NAME = "e2e-observe"

describe("watching a migration", function()
  local R, hooks, events_file, state, metrics_url, run_pid

  -- The webhook receiver: served whenever this test waits (pump), answers 200.
  local received = {}
  local function serve_hooks(timeout)
    hooks:settimeout(timeout)
    local c = hooks:accept()
    if not c then return end
    c:settimeout(5)
    local line = c:receive("*l")
    local len = 0
    while true do
      local h = c:receive("*l")
      if not h or h == "" then break end
      local v = h:lower():match("^content%-length:%s*(%d+)")
      if v then len = tonumber(v) end
    end
    local body = len > 0 and c:receive(len) or ""
    received[#received + 1] = { line = line, body = body }
    c:send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    c:close()
  end

  -- Waits for a process while serving the webhook; -> ok, how, code
  local function pump(h, seconds)
    local deadline = host.monotonic() + (seconds or 600)
    while true do
      local ok, how, code = h:wait(0.02)
      serve_hooks(0.02)
      if how ~= "timeout" then return ok, how, code end
      if host.monotonic() > deadline then h:kill("KILL") h:wait() return nil, "timeout" end
    end
  end

  -- A playbook started as a team starts it; lines collected as they come.
  local function start(playbook, args, config_path)
    local argv = { H.MIGRUN, H.ROOT .. "/playbooks/" .. playbook, "--config", config_path or R.config_path }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local r = { lines = {} }
    argv.env, argv.stdin, argv.stderr = R.env, false, "stdout"
    argv.stdout = function(line)
      r.lines[#r.lines + 1] = line
      if os.getenv("MIGRUN_E2E_VERBOSE") then io.stderr:write(line, "\n") end
    end
    r.h = assert(proc.spawn(argv))
    function r.output() return table.concat(r.lines, "\n") end
    function r.saw(pattern)
      for _, l in ipairs(r.lines) do if l:match(pattern) then return l end end
    end
    -- serves the webhook until cond() or the process ends
    function r.wait_for(cond, seconds)
      local deadline = host.monotonic() + (seconds or 300)
      while not cond() do
        local _, how = r.h:wait(0.02)
        serve_hooks(0.02)
        if how ~= "timeout" then error("the playbook ended first:\n" .. r.output()) end
        if host.monotonic() > deadline then error("timed out waiting:\n" .. r.output()) end
      end
    end
    function r.finish()
      local ok, how, code = pump(r.h, 600)
      r.h:close()
      r.ok, r.code = ok, how == "exit" and code or nil
      return r
    end
    return r
  end

  local function run(playbook, args, config_path) return start(playbook, args, config_path).finish() end

  local function status_json(...)
    local argv = { H.MIGRUN, H.ROOT .. "/playbooks/status.lua", "--config", R.config_path, ... }
    argv.env, argv.stdin, argv.stdout, argv.stderr = R.env, false, "capture", "capture"
    local h = assert(proc.spawn(argv))
    local ok = pump(h, 60)
    local out, err = h.stdout, h.stderr
    h:close()
    assert(ok, "status failed: " .. tostring(err))
    return out
  end

  local function events()
    local out = {}
    local f = io.open(events_file)
    for line in (f and f:read("a") or ""):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
    if f then f:close() end
    return out
  end
  local function names(list)
    local out = {}
    for _, e in ipairs(list) do out[#out + 1] = e.event end
    return table.concat(out, ",")
  end
  local function hook_events()
    local out = {}
    for _, r in ipairs(received) do
      assert.matches("^POST /hook/T0KEN%-PATH HTTP/1%.1", r.line)
      out[#out + 1] = cjson.decode(r.body)
    end
    return out
  end

  local function journal() return H.journal(R) end
  local function loaded_count()
    local j = journal()
    local fl = j and j.playbooks.full and j.playbooks.full.steps.full_load
    local n = 0
    for _ in pairs(fl and fl.facts and fl.facts.loaded or {}) do n = n + 1 end
    return n
  end

  -- The truth, straight from the primary: each migrun slot's lag and retained WAL.
  local function truth()
    local src = H.connect(R.lab.source, "truth")
    local out = {}
    for row in assert(src:exec([[select slot_name, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 as lag,
        (pg_current_wal_lsn() - restart_lsn)::int8 as retained from pg_replication_slots
        where slot_name like 'dms_slot_%' order by 1]])):rows() do
      out[row.slot_name] = { lag = row.lag, retained = row.retained }
    end
    src:close()
    return out
  end

  local function scrape(url)
    local h, port, path = url:match("^http://([^:/]+):(%d+)(/.*)$")
    local c = assert(socket.connect(h, tonumber(port)))
    c:settimeout(10)
    c:send(("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):format(path))
    local all = assert(c:receive("*a"))
    c:close()
    local body = all:match("\r\n\r\n(.*)$")
    local v = { _text = body }
    for name, labels, value in body:gmatch("\n?([%w_]+)(%b{}) (%S+)") do
      v[name] = v[name] or {}
      v[name][labels] = tonumber(value)
    end
    for name, value in body:gmatch("\n([%w_]+) (%S+)") do v[name] = tonumber(value) end
    return v
  end

  setup(function()
    hooks = assert(socket.bind("127.0.0.1", 0))
    local _, port = hooks:getsockname()
    local dir = H.tmpdir("e2e-observe-events")
    events_file = dir .. "/events.jsonl"
    R = H.rehearsal(NAME, { config = {
      -- page_views has no primary key: its updates do not replicate (see e2e_cutover)
      cutover = { count_only = { "public.page_views" } },
      metrics = { listen = "127.0.0.1:0", interval = 1 },
      notify = { command = { "tee", "-a", events_file },
                 webhook = ("http://127.0.0.1:%s/hook/T0KEN-PATH"):format(port), timeout = 3 },
      -- warns as soon as a slot keeps any WAL: a warning to be notified of
      wal_guard = { interval = 2, warn_bytes = 1 },
    } })
    state = R.config.state_dir
  end)
  teardown(function()
    if R then
      R:stop_workload()
      R:close()
    end
    if hooks then hooks:close() end
  end)

  it("status of a migration that never ran, without creating anything", function()
    local s = cjson.decode(status_json("--json"))
    assert.equal(1, s.status_version)
    assert.is_false(s.running)
    assert.is_nil(s.run)
    assert.same({}, s.slots)
    assert.is_nil(io.open(state), "status created the state directory")
  end)

  it("status and metrics while full.lua runs, checked against the primary; the events of the run", function()
    R:start_workload{ rate = 20 }
    local r = start("full.lua", { "--yes" })
    finally(function() if r.h.running then r.h:kill("KILL") r.h:wait() end end)
    -- once the target has the schema, hold its events table: the full load will wait on it
    r.wait_for(function() return r.saw("schema: done") end)
    local blocker = H.connect(R.lab.target, "blocker")
    assert(blocker:exec("begin; lock table public.events in access exclusive mode"))
    local released = false
    finally(function() if not released then blocker:exec("rollback") blocker:close() end end)
    -- (the test's premise: a lock taken after the load of events began would say so here)
    assert.equal(0, assert(blocker:exec("select count(*) as n from public.events"))[1].n,
      "public.events was loaded before the test locked it")
    -- every other table loads; events waits
    r.wait_for(function() return r.saw("full_load: Full load") end)
    local total = #journal().playbooks.full.steps.know_data.facts.tables
    r.wait_for(function() return loaded_count() == total - 1 end)
    metrics_url = r.saw("metrics: (http://%S+)"):match("(http://%S+)")
    run_pid = r.h.pid

    -- status from another terminal
    local before = truth()
    local s = cjson.decode(status_json("--json"))
    local after = truth()
    assert.is_true(s.running)
    assert.same({ held = true, pid = run_pid, alive = true }, s.lock)
    assert.equal("full_load", s.step.name)
    assert.equal("running", s.step.state)
    assert.is_true(s.progress.current)
    assert.equal("bytes", s.progress.unit)
    assert.equal(total - 1, s.full_load.tables_loaded)
    assert.equal(total, s.full_load.tables)
    local loaded_bytes = 0
    for _, t in pairs(journal().playbooks.full.steps.full_load.facts.loaded) do loaded_bytes = loaded_bytes + t.bytes end
    assert.equal(loaded_bytes, s.full_load.bytes_loaded)
    -- the progress counts on-disk bytes, like its total: the tables loaded, events not begun
    assert.is_true(s.progress.done <= s.full_load.disk_bytes_loaded)
    assert.is_true(s.full_load.disk_bytes_loaded < s.full_load.bytes_expected)
    local waiting
    for _, st in ipairs(s.full_load.streams) do if st.table then waiting = st end end
    assert.equal("public.events", waiting and waiting.table)
    assert.equal(0, waiting.table_bytes_done)
    assert.is_true(#s.slots >= 3)
    for _, sl in ipairs(s.slots) do
      -- nothing consumes the slots yet: their lag only grows
      assert.is_true(before[sl.slot].lag <= sl.lag_bytes and sl.lag_bytes <= after[sl.slot].lag,
        ("%s: %d <= %d <= %d"):format(sl.slot, before[sl.slot].lag, sl.lag_bytes, after[sl.slot].lag))
    end
    assert.equal(1, s.wal.warn_bytes)
    assert.equal("warn", s.wal.level)
    local text = status_json()
    assert.matches("RUNNING: full %(pid " .. run_pid .. "%)", text)
    assert.matches("step: full · full_load running since", text)
    assert.matches("public%.events 0 B of [%d.]+ [KM]iB", text)

    -- the metrics, against the primary read just before and just after
    local slots_step = journal().playbooks.full.steps.slots
    before = truth()
    local t_scrape = host.now()
    local m = scrape(metrics_url)
    after = truth()
    assert.equal(1, m.migrun_running)
    assert.equal(1, m.migrun_source_up)
    assert.equal(1, m.migrun_step_running['{playbook="full",step="full_load"}'])
    assert.equal(total - 1, m.migrun_full_load_tables_loaded_total)
    assert.equal(total, m.migrun_full_load_tables)
    assert.is_true(m.migrun_full_load_bytes_total >= s.full_load.disk_bytes_loaded)
    assert.equal(s.full_load.bytes_expected, m.migrun_full_load_expected_bytes)
    local retained = 0
    for slot, t in pairs(after) do
      local lag = m.migrun_slot_lag_bytes[('{slot="%s"}'):format(slot)]
      assert.is_true(before[slot].lag <= lag and lag <= t.lag, ("%s: %d <= %d <= %d"):format(slot, before[slot].lag, lag, t.lag))
      local ret = m.migrun_slot_retained_wal_bytes[('{slot="%s"}'):format(slot)]
      assert.is_true(before[slot].retained <= ret and ret <= t.retained)
      retained = retained + ret
      -- the slot has confirmed its creation point: its lag in time is the time since the slots step
      local secs = m.migrun_slot_lag_seconds[('{slot="%s"}'):format(slot)]
      local from, to = live.epoch(slots_step.started_at), live.epoch(slots_step.ended_at) + 1
      assert.is_true(t_scrape - to - 2 <= secs and secs <= t_scrape - from + 2,
        ("%s: lag %.1f s, slots step %s to %s, scraped at %.1f"):format(slot, secs, slots_step.started_at,
          slots_step.ended_at, t_scrape))
    end
    assert.equal(retained, m.migrun_wal_retained_bytes)
    assert.equal(1, m.migrun_wal_guard_warn_bytes)

    -- let the load go on; the run ends ready for cutover
    assert(blocker:exec("rollback"))
    blocker:close()
    released = true
    r.finish()
    assert.is_true(r.ok, r.output())
    assert.truthy(r.output():find("READY FOR CUTOVER", 1, true))
    assert.is_nil(io.open("/proc/" .. run_pid .. "/cmdline"), "the run outlived itself")
    local dead = socket.connect(metrics_url:match("//([^:]+):(%d+)"))
    assert.is_nil(dead, "the metrics server outlived the run")

    -- the events, by the command and by the webhook alike: the warning once, then ready
    local by_command, by_hook = events(), hook_events()
    assert.equal("wal_guard_warn,ready_for_cutover", names(by_command))
    assert.equal(names(by_command), names(by_hook))
    assert.same(by_command, by_hook)
    assert.equal(NAME, by_command[2].migration)
    assert.equal("full", by_command[2].playbook)
    assert.equal("catch_up", by_command[2].step)
    assert.matches("tasks running, largest lag", by_command[2].message)
    assert.equal(1, by_command[1].details.warn_bytes)
    for _, secret in ipairs{ R.lab.password, R.lab.dms.secret_key, "T0KEN-PATH" } do
      assert.falsy(cjson.encode(by_command):find(secret, 1, true))
      assert.falsy(r.output():find(secret, 1, true), secret .. " in the output")
    end

    -- after the run: nobody holds it; the tasks as DMS says. Nothing changes for looking.
    local function files()
      local out = {}
      for _, name in ipairs{ "journal.json", "progress.json", "samples.jsonl", "report.html", "migrun.log" } do
        local fh = assert(io.open(state .. "/" .. name))
        out[name] = fh:read("a")
        fh:close()
      end
      return out
    end
    local before_world, before_files = H.world(R), files()
    s = cjson.decode(status_json("--json"))
    assert.is_false(s.running)
    assert.equal("ok", s.run.outcome)
    assert.is_nil(s.step)
    assert.equal(#journal().playbooks.full.steps.groups.facts.groups, #s.tasks)
    for _, t in ipairs(s.tasks) do
      assert.equal("dms", t.source)
      assert.equal("running", t.status)
    end
    assert.equal(0, s.apply_exceptions)
    assert.same(before_world, H.world(R))
    assert.same(before_files, files())
    -- the samples behind the charts: the catch-up's, and the WAL guard's through every step
    local kinds = {}
    for _, smp in ipairs(live.read_samples(state)) do kinds[smp.kind] = (kinds[smp.kind] or 0) + 1 end
    assert.is_true(kinds.cdc > 0)
    assert.is_true((kinds.guard or 0) > 3, "the guard's readings: " .. tostring(kinds.guard))
  end)

  it("the WAL guard's stop is notified, with the run's failure, and nothing runs", function()
    local cfg = {}
    for k, v in pairs(R.config) do cfg[k] = v end
    cfg.wal_guard = { interval = 2, warn_bytes = 1, stop_bytes = 1 }
    local path = R.dir .. "/guarded.lua"
    assert(host.write_file(path, "return " .. demo.literal(cfg) .. "\n", tonumber("600", 8)))
    local n = #events()
    local r = run("full.lua", { "--yes" }, path)
    assert.equal(1, r.code, r.output())
    assert.truthy(r.output():find("WAL guard STOP", 1, true), r.output())
    local new = table.move(events(), n + 1, #events(), 1, {})
    assert.equal("wal_guard_stop,run_failed", names(new))
    assert.matches("WAL guard STOP", new[1].message)
    assert.matches("WAL guard STOP", new[2].message)
    assert.same({}, journal().runs[#journal().runs].ran)
  end)

  it("the cutover is notified; report.html of the migration renders in Chromium", function()
    R:stop_workload()
    local r = run("cutover.lua", { "--yes" })
    assert.is_true(r.ok, r.output())
    local e = events()
    assert.equal("cutover_done", e[#e].event)
    assert.equal("cutover", e[#e].playbook)
    assert.equal(names(events()), names(hook_events()))

    local page = state .. "/report.html"
    local f = assert(io.open(page))
    f:close()
    local _, _, _, mode = proc.run{ "stat", "-c", "%a", page }
    assert.equal("600", mode:gsub("%s+", ""))
    local shot = H.tmpdir("e2e-observe-chromium")
    local function chromium(...)
      local argv = { "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--user-data-dir=" .. shot .. "/profile",
        "--window-size=1280,2000", ... }
      argv[#argv + 1] = "file://" .. page
      argv.timeout, argv.stdin = 120, false
      local ok, _, _, out, err = proc.run(argv)
      assert(ok, "chromium failed: " .. tostring(err))
      return out
    end
    local dom = chromium("--dump-dom")
    chromium("--screenshot=" .. shot .. "/report.png")

    -- the DOM the browser built (the parser adds <tbody> where the page has none)
    assert.truthy(dom:find("<title>" .. NAME .. ": migration report</title>", 1, true))
    for _, id in ipairs{ "summary", "timeline", "full-load", "cdc", "checklist", "tables" } do
      assert.truthy(dom:find('<section id="' .. id .. '">', 1, true), "no section " .. id)
    end
    local j = journal()
    local tables = #j.playbooks.full.steps.know_data.facts.tables
    assert.equal(tables, select(2, dom:gsub('<rect class="table"', "")))
    local checklist
    for _, t in ipairs(j.playbooks.cutover.steps.checklist.tables) do
      if t.title == "Cutover checklist" then checklist = t end
    end
    local items = dom:match('<ol class="checklist">(.-)</ol>')
    assert.equal(#checklist.rows, select(2, items:gsub("<li>", "")))
    assert.truthy(dom:find("cutover: ok", 1, true))
    assert.truthy(dom:find(#j.playbooks.full.steps.groups.facts.groups .. " stopped", 1, true))
    assert.truthy(dom:find("Verification at the cutover (primary vs target)", 1, true))
    assert.is_nil(dom:find('<tr class="diff">', 1, true))
    assert.truthy(dom:find('data-series="dms_slot_01"', 1, true))
    for _, secret in ipairs{ R.lab.password, R.lab.dms.secret_key } do assert.falsy(dom:find(secret, 1, true)) end

    -- a picture of real size with something on it (a blank page is a few KB)
    local png = assert(io.open(shot .. "/report.png", "rb")):read("a")
    assert.equal("\137PNG\r\n\26\n", png:sub(1, 8))
    local w, h = string.unpack(">I4>I4", png, 17)
    assert.same({ 1280, 2000 }, { w, h })
    assert.is_true(#png > 60 * 1024, ("the screenshot is %d bytes: blank?"):format(#png))
    -- MIGRUN_E2E_KEEP=DIR keeps the page and its picture to look at
    local keep = os.getenv("MIGRUN_E2E_KEEP")
    if keep then proc.run{ "cp", page, shot .. "/report.png", keep } end
    proc.run{ "rm", "-rf", shot }
  end)

  it("a task failed through the emulator: task_failed and step_failed, by the command and the webhook", function()
    local client = assert(R.lab:dms_client())
    local plan = journal().playbooks.full.steps.groups.facts.groups
    -- the cutover stopped the tasks: they run again, then one fails
    for _, g in ipairs(plan) do
      local arn = journal().playbooks.full.steps.dms_setup.facts.tasks[g.slot]
      assert.equal("stopped", assert(client:describe_task(arn)).Status)
      assert(client:start_replication_task(arn, "resume-processing"))
      assert(client:wait_for_task(arn, "running", 60, 0.2))
    end
    local bad = plan[2]
    local id = cdc.task_id(NAME, bad)
    assert(emulator.control(client, "SetFaults", { fail_tasks = { [id] = "boom: injected by the test" } }))
    local n = #events()
    local r = run("full.lua", { "--yes" })
    assert.equal(1, r.code, r.output())
    local new = table.move(events(), n + 1, #events(), 1, {})
    -- a new run: the WAL guard's warning once more, then the failure
    assert.equal("wal_guard_warn,task_failed,step_failed", names(new))
    local tf
    for _, e in ipairs(new) do if e.event == "task_failed" then tf = e end end
    assert.equal(id, tf.details.task)
    assert.equal(bad.slot, tf.details.slot)
    assert.matches("boom: injected by the test", tf.message)
    assert.equal("catch_up", tf.step)
    assert.equal(names(events()), names(hook_events()))
    assert.same(events(), hook_events())
    -- status says which and why
    local s = cjson.decode(status_json("--json"))
    assert.equal("catch_up", s.last_error.step)
    local failed
    for _, t in ipairs(s.tasks) do if t.task == id then failed = t end end
    assert.equal("failed", failed.status)
    assert.matches("boom", failed.failure)
    assert(emulator.control(client, "SetFaults", {}))
  end)
end)
