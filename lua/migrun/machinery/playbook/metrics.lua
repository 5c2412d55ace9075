--[[
migrun.playbook.metrics: an OpenMetrics (Prometheus) endpoint served while a
playbook runs, when the configuration has metrics = { listen = "127.0.0.1:9187" }.
docs/metrics.md lists every metric, with alerts and Grafana queries.

Scraping never slows the run: the server is a child process (this same
migrun, `die_with_parent`) that reads what the run leaves in the state
directory (journal.json, progress.json, samples.jsonl: migrun.playbook.live)
and reads the primary over a connection of its own, made read-only
(default_transaction_read_only) and named "migrun metrics". The run never
waits for it; it only learns the address it listens on.

  local metrics = require "migrun.playbook.metrics"
  local m, err = metrics.start{ listen = "127.0.0.1:9187", state_dir =, source = conninfo,
    prefix = "dms_slot_", migration =, guard = config.wal_guard, interval = 5 }
  m.url  -- "http://127.0.0.1:9187/metrics";  m:close()
  metrics.families(state) -> { family, ... }     what a scrape shows (pure; see collect)
  metrics.render(families, openmetrics) -> text   the exposition format: OpenMetrics 1.0
      (when the scraper accepts it) or Prometheus text 0.0.4
  metrics.main()     the child's main (internal): its job as JSON on stdin
  metrics.parse_listen("127.0.0.1:9187") -> host, port | nil, why
]]
local host = require "migrun.host"
local proc = require "migrun.proc"
local json = require "migrun.json"
local pg = require "migrun.pg"
local db = require "migrun.db"
local live = require "migrun.playbook.live"
local journal = require "migrun.playbook.journal"

local metrics = {}

function metrics.parse_listen(s)
  local h, p = tostring(s):match("^%[([%x:]+)%]:(%d+)$")
  if not h then h, p = tostring(s):match("^([%w.-]+):(%d+)$") end
  p = tonumber(p)
  if not h or not p or p > 65535 then return nil, ('expected "host:port", found %q'):format(tostring(s)) end
  return h, math.tointeger(p)
end

---------------------------------------------------------------------------
-- What a scrape shows
---------------------------------------------------------------------------

local epoch = live.epoch

local function family(list, name, kind, help, unit)
  local f = { name = name, type = kind, help = help, unit = unit, samples = {} }
  list[#list + 1] = f
  return f
end

local function add(f, labels, value)
  if value == nil then return end
  if type(value) == "boolean" then value = value and 1 or 0 end
  f.samples[#f.samples + 1] = { labels = labels or {}, value = value }
end

-- The full load of a playbook section: the step whose facts hold `loaded`
-- (migrun.steps.load records each table there as it commits), the latest begun.
local function full_load_of(steps)
  local best, best_name
  for name, s in pairs(steps or {}) do
    if type(s.facts) == "table" and type(s.facts.loaded) == "table" then
      if not best or (s.started_at or "") > (best.started_at or "") then best, best_name = s, name end
    end
  end
  return best, best_name
end
metrics.full_load_of = full_load_of

--[[ state: { migration =, journal = journal data, progress = progress.json record,
     lock = live.lock_state, slots = live.slots result | nil, source_error =,
     history = { {t, wal_lsn} }, sample = the newest samples.jsonl record with tasks,
     guard = config.wal_guard, now = epoch } ]]

-- The run: which, since when, whether a migrun holds the state directory.
local function run_families(out, state, J, run)
  local f = family(out, "migrun_run", "info", "The migration and the playbook run now (or last)")
  add(f, { migration = state.migration or J.migration or "", playbook = run and run.playbook or "",
           main = J.main and J.main.playbook or "", outcome = run and run.outcome or "" }, 1)
  f = family(out, "migrun_run_started_timestamp_seconds", "gauge", "When the run began (Unix time)", "seconds")
  add(f, {}, run and epoch(run.started_at))
  f = family(out, "migrun_running", "gauge", "1 while a migrun holds the state directory")
  add(f, {}, state.lock and state.lock.held or false)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- The steps of every playbook section: running, failed, counted by status, the last success.
local function step_families(out, playbooks)
  local running = family(out, "migrun_step_running", "gauge", "1 for the step running now")
  local started = family(out, "migrun_step_started_timestamp_seconds", "gauge",
    "When the running step began (Unix time)", "seconds")
  local failed = family(out, "migrun_step_failed", "gauge", "1 for each step whose last attempt failed")
  local counts = family(out, "migrun_steps", "gauge", "Steps of each playbook section by status")
  local last_ok
  for _, pname in ipairs(sorted_keys(playbooks)) do
    local by_status = {}
    local steps = playbooks[pname].steps or {}
    for _, sname in ipairs(sorted_keys(steps)) do
      local s = steps[sname]
      local status = s.status or "pending"
      by_status[status] = (by_status[status] or 0) + 1
      if status == "running" then
        add(running, { playbook = pname, step = sname }, 1)
        add(started, { playbook = pname, step = sname }, epoch(s.started_at))
      elseif status == "failed" then
        add(failed, { playbook = pname, step = sname }, 1)
      elseif status == "done" then
        local t = epoch(s.ended_at)
        if t and (not last_ok or t > last_ok) then last_ok = t end
      end
    end
    for _, status in ipairs{ "running", "done", "failed" } do
      add(counts, { playbook = pname, status = status }, by_status[status] or 0)
    end
  end
  local f = family(out, "migrun_last_success_timestamp_seconds", "gauge",
    "When a step last ended well (Unix time)", "seconds")
  add(f, {}, last_ok)
end

-- The full load of the playbook run now (or last), else of the main
-- playbook -> { section, step, rec, planned_tables } (rec nil: none).
local function full_load_now(J, playbooks, run)
  local section = run and playbooks[run.playbook] and run.playbook or (J.main and J.main.playbook)
  local fl, fl_step = full_load_of(section and playbooks[section] and playbooks[section].steps)
  if not fl and J.main and playbooks[J.main.playbook] then
    section = J.main.playbook
    fl, fl_step = full_load_of(playbooks[section].steps)
  end
  local planned_tables
  local know = J.main and playbooks[J.main.playbook] and (playbooks[J.main.playbook].steps or {}).know_data
  if know and know.facts and type(know.facts.tables) == "table" then planned_tables = know.facts.tables end
  return { section = section, step = fl_step, rec = fl, planned_tables = planned_tables }
end

local function full_load_families(out, load, p)
  local fl, planned_tables = load.rec, load.planned_tables
  local f = family(out, "migrun_full_load_tables", "gauge", "Tables the full load copies")
  add(f, {}, planned_tables and #planned_tables)
  local loaded_n, loaded_rows = 0, 0
  for _, r in pairs(fl and fl.facts.loaded or {}) do
    loaded_n = loaded_n + 1
    loaded_rows = loaded_rows + (tonumber(r.rows) or 0)
  end
  -- bytes in the plan's unit, the source's on-disk sizes (as migrun.loadprogress counts):
  -- the tables committed whole, and while the load runs its progress record,
  -- which adds the tables under way by their share of rows
  local disk_bytes
  if fl and planned_tables then
    disk_bytes = 0
    for _, t in ipairs(planned_tables) do
      if fl.facts.loaded[t.key or (tostring(t.schema) .. "." .. tostring(t.name))] then
        disk_bytes = disk_bytes + (tonumber(t.bytes) or 0)
      end
    end
  end
  local moving_rows = 0
  if p and p.progress and fl and p.playbook == load.section and p.step == load.step and fl.status == "running" then
    local snap = p.progress
    -- (a record saved before the last commit says less than the journal)
    disk_bytes = math.max(tonumber(snap.done) or 0, disk_bytes or 0)
    moving_rows = math.max(0, (tonumber(snap.rows) or 0) - loaded_rows)
  end
  f = family(out, "migrun_full_load_tables_loaded", "counter", "Tables the full load has committed")
  add(f, {}, fl and loaded_n)
  f = family(out, "migrun_full_load_bytes", "counter",
    "The full load's progress in the source's on-disk bytes: tables committed whole, tables under way by their share of rows",
    "bytes")
  add(f, {}, disk_bytes)
  local total_bytes
  for _, t in ipairs(planned_tables or {}) do total_bytes = (total_bytes or 0) + (tonumber(t.bytes) or 0) end
  f = family(out, "migrun_full_load_expected_bytes", "gauge",
    "The tables' size on the source's disk (heap, TOAST, indexes): migrun_full_load_bytes_total's whole", "bytes")
  add(f, {}, total_bytes)
  f = family(out, "migrun_full_load_rows", "counter", "Rows the full load has copied")
  add(f, {}, fl and (loaded_rows + moving_rows))
end

-- The running step's progress record.
local function progress_families(out, p)
  local f = family(out, "migrun_progress_ratio", "gauge", "Share done of the running step's progress (0 to 1)")
  local eta = family(out, "migrun_progress_remaining_seconds", "gauge",
    "Time left of the running step's progress at the recent rate", "seconds")
  local upd = family(out, "migrun_progress_updated_timestamp_seconds", "gauge",
    "When the progress was last saved (Unix time)", "seconds")
  if p and p.progress and not p.progress.finished then
    local snap = p.progress
    local labels = { playbook = p.playbook or "", step = p.step or "", label = snap.label or "" }
    if tonumber(snap.total) and snap.total > 0 then add(f, labels, math.min(1, (snap.done or 0) / snap.total)) end
    add(eta, labels, snap.eta_seconds)
    add(upd, labels, snap.updated_at)
  end
end

-- migrun's slots on the primary, read now; the WAL they keep and hold back,
-- and the WAL guard's thresholds.
local function slot_families(out, state, now)
  local f = family(out, "migrun_source_up", "gauge", "1 when the metrics server's last reading of the primary worked")
  add(f, {}, state.slots ~= nil)
  local lag_b = family(out, "migrun_slot_lag_bytes", "gauge",
    "WAL between the primary's current position and what the slot has confirmed", "bytes")
  local lag_s = family(out, "migrun_slot_lag_seconds", "gauge",
    "How long ago the primary was where the slot has confirmed", "seconds")
  local ret = family(out, "migrun_slot_retained_wal_bytes", "gauge", "WAL the slot keeps on the primary", "bytes")
  local act = family(out, "migrun_slot_active", "gauge", "1 when a consumer (a DMS task) reads the slot")
  local safe = family(out, "migrun_slot_safe_wal_size_bytes", "gauge",
    "WAL the primary may still write before max_slot_wal_keep_size invalidates the slot (PostgreSQL 13+)", "bytes")
  local wstat = family(out, "migrun_slot_wal_status", "gauge",
    "1 for the slot's wal_status (reserved, extended, unreserved: lost at the next checkpoint, lost)")
  local total_retained
  if state.slots then
    total_retained = 0
    for _, s in ipairs(state.slots.slots) do
      if s.owned then
        local l = { slot = s.name }
        add(lag_b, l, s.lag_bytes)
        local secs = s.replay_lag_seconds
        if secs == nil and s.confirmed_flush_lsn then
          local exact
          secs, exact = live.lag_seconds(state.history, s.confirmed_flush_lsn, state.slots.at or now, state.slots.wal_lsn)
          if not exact then secs = nil end -- older than what we saw: unknown, not a guess
        end
        add(lag_s, l, secs)
        add(ret, l, s.retained_bytes)
        add(act, l, s.active)
        add(safe, l, s.safe_wal_size)
        if s.wal_status then add(wstat, { slot = s.name, status = s.wal_status }, 1) end
        total_retained = total_retained + (s.retained_bytes or 0)
      end
    end
  end
  f = family(out, "migrun_wal_retained_bytes", "gauge", "WAL migrun's slots keep on the primary, added up slot by slot",
    "bytes")
  add(f, {}, total_retained)
  f = family(out, "migrun_wal_held_bytes", "gauge",
    "WAL migrun's slots hold back on the primary, from their oldest restart_lsn (what the WAL guard's thresholds are about)",
    "bytes")
  add(f, {}, state.slots and (live.held(state.slots.slots) or 0) or nil)
  local guard = state.guard or {}
  f = family(out, "migrun_wal_guard_warn_bytes", "gauge", "The WAL guard warns at this much WAL held back", "bytes")
  add(f, {}, guard.warn_bytes)
  f = family(out, "migrun_wal_guard_stop_bytes", "gauge", "The WAL guard stops the run at this much", "bytes")
  add(f, {}, guard.stop_bytes)
end

-- DMS tasks as the run last saw them (samples.jsonl): the server never calls AWS
local function task_families(out, sample)
  local st = family(out, "migrun_dms_task_state", "gauge", "1 for each task's state as migrun last saw it")
  local up = family(out, "migrun_dms_task_running", "gauge", "1 when the task was running at migrun's last look")
  local exc = family(out, "migrun_dms_apply_exceptions", "gauge", "Rows in awsdms_apply_exceptions for the task")
  local seen = family(out, "migrun_dms_tasks_seen_timestamp_seconds", "gauge",
    "When migrun last looked at the tasks (Unix time)", "seconds")
  if sample and type(sample.tasks) == "table" then
    for _, t in ipairs(sample.tasks) do
      local l = { slot = t.slot or "", task = t.task or "" }
      add(st, { slot = l.slot, task = l.task, state = tostring(t.status or "unknown"):lower() }, 1)
      add(up, l, tostring(t.status):lower() == "running")
      add(exc, l, tonumber(t.exceptions) or 0)
    end
    add(seen, {}, sample.t)
  end
end

function metrics.families(state)
  local out = {}
  local J = state.journal or {}
  local playbooks = J.playbooks or {}
  local runs = J.runs or {}
  local run = runs[#runs]
  run_families(out, state, J, run)
  step_families(out, playbooks)
  full_load_families(out, full_load_now(J, playbooks, run), state.progress)
  progress_families(out, state.progress)
  slot_families(out, state, state.now or host.now())
  task_families(out, state.sample)
  return out
end

---------------------------------------------------------------------------
-- The exposition formats
---------------------------------------------------------------------------

local function label_value(v)
  return (tostring(v):gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub('"', '\\"'))
end

local function number(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if math.type(v) == "integer" or (v == math.floor(v) and math.abs(v) < 2 ^ 53) then
    return ("%d"):format(v)
  end
  return ("%.17g"):format(v)
end

local function sample_line(name, labels, value)
  local keys = {}
  for k in pairs(labels) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = ('%s="%s"'):format(k, label_value(labels[k])) end
  return ("%s%s %s\n"):format(name, #parts > 0 and ("{" .. table.concat(parts, ",") .. "}") or "", number(value))
end

local function help_text(s) return (s:gsub("\\", "\\\\"):gsub("\n", "\\n")) end

function metrics.render(families, openmetrics)
  local out = {}
  for _, f in ipairs(families) do
    local base, sample_name, kind = f.name, f.name, f.type
    if f.type == "counter" then
      sample_name = f.name .. "_total"
      if not openmetrics then base = sample_name end
    elseif f.type == "info" then
      sample_name = f.name .. "_info"
      if not openmetrics then base, kind = sample_name, "gauge" end
    end
    out[#out + 1] = ("# TYPE %s %s\n"):format(base, kind)
    if openmetrics and f.unit then out[#out + 1] = ("# UNIT %s %s\n"):format(base, f.unit) end
    out[#out + 1] = ("# HELP %s %s\n"):format(base, help_text(f.help))
    for _, s in ipairs(f.samples) do out[#out + 1] = sample_line(sample_name, s.labels, s.value) end
  end
  if openmetrics then out[#out + 1] = "# EOF\n" end
  return table.concat(out)
end

metrics.CONTENT_TYPE = {
  openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8",
  prometheus = "text/plain; version=0.0.4; charset=utf-8",
}

---------------------------------------------------------------------------
-- The server (a child process)
---------------------------------------------------------------------------

-- The journal as a reader sees it (journal.json and the changes logged since).
local function read_journal(state_dir)
  local J = journal.open(state_dir, { read_only = true })
  return J and J.existed and J.data or nil
end

local Server = {}
Server.__index = Server

function Server:_source()
  if self.src then return self.src end
  local conn, err = pg.connect(self.job.source, { name = "source", connect_timeout = 5 })
  if not conn then return nil, err end
  -- nothing this connection runs can write, whatever a later change adds
  local ok, serr = conn:exec("set default_transaction_read_only = on; set application_name = 'migrun metrics'")
  if not ok then conn:close() return nil, serr end
  conn:set_timeout(10)
  self.src = db.wrap(conn)
  return self.src
end

-- One reading of the primary; the WAL position joins the history.
function Server:read_source()
  local src, err = self:_source()
  local r
  if src then r, err = live.slots(src, { prefix = self.job.prefix }) end
  if not r then
    if self.src then self.src:close() self.src = nil end -- reconnect next time
    self.source_error = tostring(err)
    return nil
  end
  self.source_error = nil
  local h = self.history
  h[#h + 1] = { t = r.at, wal_lsn = tostring(r.wal_lsn) }
  if #h > 2000 then table.remove(h, 1) end
  return r
end

-- New lines of samples.jsonl: the run's readings (with the tasks) join ours.
function Server:read_samples()
  local list
  list, self.offset = live.read_samples(self.job.state_dir, { offset = self.offset })
  for _, s in ipairs(list) do
    if s.wal_lsn then self.history[#self.history + 1] = { t = s.t, wal_lsn = s.wal_lsn } end
    if type(s.tasks) == "table" then self.sample = s end
  end
  if #list > 0 then table.sort(self.history, function(a, b) return a.t < b.t end) end
  while #self.history > 2000 do table.remove(self.history, 1) end
end

function Server:scrape(openmetrics)
  self:read_samples()
  local slots = self:read_source()
  local state = { migration = self.job.migration, journal = read_journal(self.job.state_dir),
    progress = live.read_progress(self.job.state_dir), lock = live.lock_state(self.job.state_dir),
    slots = slots, history = self.history, sample = self.sample, guard = self.job.guard, now = host.now() }
  return metrics.render(metrics.families(state), openmetrics)
end

local REASONS = { [200] = "OK", [404] = "Not Found", [405] = "Method Not Allowed" }

function Server:answer(conn)
  conn:settimeout(5)
  local line = conn:receive("*l")
  if not line then return end
  local method, path = line:match("^(%S+)%s+(%S+)")
  local headers = {}
  while true do
    local h = conn:receive("*l")
    if not h or h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.-)%s*$")
    if k then headers[k:lower()] = v end
  end
  local status, ctype, body = 200, "text/plain; charset=utf-8"
  path = (path or ""):gsub("%?.*$", "")
  if method ~= "GET" and method ~= "HEAD" then
    status, body = 405, "only GET\n"
  elseif path == "/metrics" then
    local om = (headers.accept or ""):find("application/openmetrics-text", 1, true) ~= nil
    local ok, text = pcall(self.scrape, self, om)
    if ok then
      body, ctype = text, om and metrics.CONTENT_TYPE.openmetrics or metrics.CONTENT_TYPE.prometheus
    else
      status, body = 200, "# the scrape failed: " .. tostring(text):gsub("\n", " ") .. "\n"
    end
  elseif path == "/" then
    body = "migrun metrics of " .. tostring(self.job.migration) .. ": /metrics\n"
  else
    status, body = 404, "not found: try /metrics\n"
  end
  conn:send(("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s")
    :format(status, REASONS[status], ctype, #body, method == "HEAD" and "" or body))
end

function metrics.main()
  local socket = require "socket"
  local job = json.decode(io.read("a"))
  local function say(t) io.stdout:write(json.encode(t), "\n") io.stdout:flush() end
  local h, port = metrics.parse_listen(job.listen)
  if not h then say{ error = port } os.exit(2) end
  local server, err = socket.bind(h, port)
  if not server then
    say{ error = ("cannot listen on %s: %s"):format(job.listen, tostring(err)) }
    os.exit(1)
  end
  local _, bound = server:getsockname()
  local shown = h:find(":", 1, true) and ("[" .. h .. "]") or h
  say{ url = ("http://%s:%s/metrics"):format(shown, tostring(bound)) }
  local S = setmetatable({ job = job, history = {} }, Server)
  local interval = job.interval or 5
  local next_reading = 0
  while true do
    local now = host.monotonic()
    if now >= next_reading then
      -- the lag in time needs readings between scrapes too
      S:read_samples()
      S:read_source()
      next_reading = now + interval
    end
    server:settimeout(math.max(0.05, math.min(1, next_reading - host.monotonic())))
    local conn = server:accept()
    if conn then
      pcall(S.answer, S, conn)
      conn:close()
    end
  end
end

---------------------------------------------------------------------------
-- Starting it (the runner)
---------------------------------------------------------------------------

local Handle = {}
Handle.__index = Handle

function Handle:close()
  if self.h then self.h:close() self.h = nil end
end

function metrics.start(o)
  assert(type(o) == "table" and o.listen and o.state_dir and o.source, "metrics.start{ listen =, state_dir =, source = } expected")
  local ok, perr = metrics.parse_listen(o.listen)
  if not ok then return nil, perr end
  local logpath = o.state_dir .. "/metrics.log"
  host.write_file(logpath, "", tonumber("600", 8))
  local said
  -- the connection string (it may hold a password) goes on stdin, never in argv
  local spec, err = host.worker_spec{ "-e", "require('migrun.playbook.metrics').main()",
    stdin = json.encode{ listen = o.listen, state_dir = o.state_dir, source = o.source, prefix = o.prefix,
      migration = o.migration, guard = o.guard, interval = o.interval },
    -- what a child that connects to PostgreSQL needs, never a password (migrun.proc)
    die_with_parent = true, env = { table.unpack(proc.LIBPQ_ENV) },
    stdout = function(line)
      local v = json.decode(line)
      if type(v) == "table" then said = said or v end
    end,
    stderr = { file = logpath, append = true } }
  local h
  if spec then h, err = proc.spawn(spec) end
  if not h then return nil, err end
  local deadline = host.monotonic() + 10
  while not said and h.running and host.monotonic() < deadline do h:wait(0.05) end
  if not said or not said.url then
    h:close()
    return nil, said and said.error or "the metrics server did not start (see " .. logpath .. ")"
  end
  return setmetatable({ h = h, url = said.url, pid = h.pid }, Handle)
end

return metrics
