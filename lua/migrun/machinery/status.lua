--[[
migrun.status: what a migration is doing, from anywhere and at any time, for
`migrun playbooks/status.lua`. A migration runs for days; the terminal that
runs it is rarely the one a person looks at.

It only reads: the journal (opened read-only, never saved), progress.json and
samples.jsonl (migrun.playbook.live), the lock file (looked at through
/proc/locks: never taken, so a playbook starting at that moment is never
refused), the primary and the target over read-only sessions
(default_transaction_read_only), and DMS with Describe calls. Safe while a
playbook runs, after it stopped, or before anything ran.

  local status = require "migrun.status"
  local s = status.collect{ config = cfg, state_dir = dir, offline = false }
  print(status.format(s))           -- for people
  print(status.json(s))             -- docs/status.md: stable, with status_version
  status.main(argv) -> exit code     the script's main: --config, --state-dir, --json, --offline

status.VERSION is the JSON's status_version: it changes only when a field
changes meaning or goes away (new fields may appear without a change).
]]
local host = require "migrun.host"
local pg = require "migrun.pg"
local db = require "migrun.db"
local json = require "migrun.json"
local text = require "migrun.text"
local cli = require "migrun.playbook.cli"
local config = require "migrun.playbook.config"
local journal = require "migrun.playbook.journal"
local live = require "migrun.playbook.live"
local progress = require "migrun.playbook.progress"
local cdc = require "migrun.cdc"
local verify = require "migrun.verify"
local loadprogress = require "migrun.loadprogress"

local status = {}

status.VERSION = 1

local epoch = live.epoch

-- A value read from a server as JSON can hold it: NULL (pg.null) is absent,
-- an LSN or any other userdata its text. cdc.status hands rows over as the
-- server gave them (source_timestamp_applied is NULL until a task applied
-- something).
local function plain(v)
  if v == nil or rawequal(v, pg.null) then return nil end
  if type(v) == "userdata" then return tostring(v) end
  return v
end

local function read_only_db(conninfo, name)
  local conn, err = pg.connect(conninfo, { name = name, connect_timeout = 5 })
  if not conn then return nil, journal.mask(err and err.message or err, conninfo) end
  local ok, serr = conn:exec("set default_transaction_read_only = on; set application_name = 'migrun status'")
  if not ok then conn:close() return nil, journal.mask(serr, conninfo) end
  conn:set_timeout(15)
  return db.wrap(conn)
end

-- The steps of a playbook section, in the order they ran.
local function step_list(steps)
  local list = {}
  for name, s in pairs(steps or {}) do
    list[#list + 1] = { name = name, status = s.status or "pending", started_at = s.started_at,
      ended_at = s.ended_at, duration = s.duration, error = s.error }
  end
  table.sort(list, function(a, b)
    local x, y = a.started_at or "~", b.started_at or "~"
    if x ~= y then return x < y end
    return a.name < b.name
  end)
  return list
end

local function full_load(J, section, prog, current)
  local P = J.playbooks or {}
  local best, best_step, best_section
  for _, name in ipairs{ section, J.main and J.main.playbook } do
    for sname, s in pairs(name and P[name] and P[name].steps or {}) do
      if type(s.facts) == "table" and type(s.facts.loaded) == "table"
          and (not best or (s.started_at or "") > (best.started_at or "")) then
        best, best_step, best_section = s, sname, name
      end
    end
    if best then break end
  end
  if not best then return nil end
  local main = J.main and P[J.main.playbook] and P[J.main.playbook].steps or {}
  local planned = main.know_data and main.know_data.facts and main.know_data.facts.tables
  local out = { playbook = best_section, step = best_step, status = best.status, tables = planned and #planned or nil,
                tables_loaded = 0, bytes_loaded = 0, rows_loaded = 0, streams = json.array() }
  local streams = {}
  for _, r in pairs(best.facts.loaded) do
    out.tables_loaded = out.tables_loaded + 1
    out.bytes_loaded = out.bytes_loaded + (tonumber(r.bytes) or 0)
    out.rows_loaded = out.rows_loaded + (tonumber(r.rows) or 0)
    local k = tonumber(r.stream) or 0
    streams[k] = streams[k] or { stream = k, tables_loaded = 0, bytes_loaded = 0 }
    streams[k].tables_loaded = streams[k].tables_loaded + 1
    streams[k].bytes_loaded = streams[k].bytes_loaded + (tonumber(r.bytes) or 0)
  end
  -- like with like: the plan's sizes are on-disk bytes, bytes_loaded is COPY text
  local rows_expected = {}
  if planned then
    local b = 0
    for _, t in ipairs(planned) do
      b = b + (tonumber(t.bytes) or 0)
      rows_expected[text.key(t)] = tonumber(t.rows_estimate)
    end
    out.bytes_expected = b
    out.disk_bytes_loaded = loadprogress.loaded(planned, best.facts.loaded)
  end
  -- the tables being copied now: the progress record of this very step
  if current and prog and prog.playbook == best_section and prog.step == best_step and prog.progress then
    for _, p in ipairs(prog.progress.parts or {}) do
      local k = tonumber(tostring(p.key):match("(%d+)$")) or 0
      streams[k] = streams[k] or { stream = k, tables_loaded = 0, bytes_loaded = 0 }
      local finished = best.facts.loaded[p.name] ~= nil
      if not finished then
        streams[k].table = p.name
        streams[k].table_bytes_done, streams[k].table_bytes_expected = p.done, p.total
        streams[k].table_rows_done = p.rows
        streams[k].table_rows_expected = rows_expected[p.name]
        streams[k].bytes_per_second, streams[k].rows_per_second = p.per_second, p.rows_per_second
        streams[k].eta_seconds = p.eta_seconds
      end
    end
  end
  local keys = {}
  for k in pairs(streams) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do out.streams[#out.streams + 1] = streams[k] end
  return out
end

-- The WAL guard's level as the guard would say it: the WAL held back (the
-- oldest restart_lsn: what wal_guard's thresholds are about), and a slot past
-- max_slot_wal_keep_size (unreserved: lost at the next checkpoint; lost).
local function wal_level(held, slots, guard)
  local level = held >= guard.stop_bytes and "stop" or held >= guard.warn_bytes and "warn" or "ok"
  for _, sl in ipairs(slots) do
    if sl.wal_status == "unreserved" or sl.wal_status == "lost" then level = "stop" end
  end
  return level
end

-- The live verification as it last stood (state_dir/verification.json):
-- its position, the differences named by key (the first ten keys of each,
-- and how many), what is still pending for the cutover.
local function verification_summary(state_dir, problem)
  local state, err = verify.load(state_dir)
  if state == nil then problem("%s", tostring(err)) return nil end
  if not state then return nil end
  local out = { position = state.position, verified_at = state.verified_at, cutover_at = state.cutover_at,
                differences = json.array(), pending_keys = 0, pending_tables = json.array() }
  for _, d in ipairs(state.differences or {}) do
    local keys = json.array()
    for i = 1, math.min(10, #(d.keys or {})) do keys[i] = { key = d.keys[i].key, what = d.keys[i].what } end
    out.differences[#out.differences + 1] = { table = d.table, key_columns = d.key and d.key.columns or nil,
      keys = keys, count = d.keys and #d.keys or nil, complete = d.complete, detail = d.detail }
  end
  local pending = state.pending or {}
  for _, keys in pairs(pending.keys or {}) do out.pending_keys = out.pending_keys + #keys end
  for k in pairs(pending.whole or {}) do out.pending_tables[#out.pending_tables + 1] = k end
  table.sort(out.pending_tables)
  return out
end

-- The journal's part: the migration, the last run, every section's steps ->
-- J, the last run.
local function from_journal(s, cfg, state_dir, problem)
  local Jh, jerr = journal.open(state_dir, { read_only = true })
  local J = Jh and Jh.data or { playbooks = {}, runs = {} }
  if not Jh then problem("%s", tostring(jerr)) end
  if J.migration and J.migration ~= cfg.name then
    problem("%s belongs to the migration %q, the config names %q", state_dir, J.migration, cfg.name)
  end
  s.main = J.main and J.main.playbook or nil

  local run = (J.runs or {})[#(J.runs or {})]
  if run then
    s.run = { playbook = run.playbook, outcome = run.outcome, started_at = run.started_at, ended_at = run.ended_at,
              error = run.error, metrics = run.metrics }
    -- "running" in a journal no migrun holds: that run was killed
    if run.outcome == "running" and not s.lock.held then s.run.outcome = "interrupted" end
  end
  s.running = s.lock.held and true or false

  s.playbooks = {}
  for name, p in pairs(J.playbooks or {}) do s.playbooks[name] = json.array(step_list(p.steps)) end
  return J, run
end

-- The step under way (or the one a killed run left).
local function step_now(s, J, section, now)
  for name, p in pairs(section and { [section] = (J.playbooks or {})[section] } or {}) do
    for sname, st in pairs(p and p.steps or {}) do
      if st.status == "running" then
        local t0 = epoch(st.started_at)
        s.step = { playbook = name, name = sname, state = s.lock.held and "running" or "interrupted",
                   started_at = st.started_at, seconds = t0 and math.max(0, now - t0) or nil }
      end
    end
  end
end

-- The progress record -> it, and whether it is the running step's.
local function progress_now(s, state_dir, now)
  local prog = live.read_progress(state_dir)
  local current = prog and s.step and s.lock.held and prog.playbook == s.step.playbook and prog.step == s.step.name
    and (not s.lock.pid or prog.pid == s.lock.pid)
  if prog and prog.progress then
    local p = prog.progress
    s.progress = { playbook = prog.playbook, step = prog.step, pid = prog.pid, current = current and true or false,
      label = p.label, unit = p.unit, done = p.done, total = p.total, rows = p.rows,
      percent = (tonumber(p.total) and p.total > 0) and math.min(100, p.done * 100 / p.total) or nil,
      per_second = p.per_second, rows_per_second = p.rows_per_second, eta_seconds = p.eta_seconds,
      updated_at = p.updated_at and journal.timestamp(p.updated_at) or nil,
      age_seconds = p.updated_at and math.max(0, now - p.updated_at) or nil, finished = p.finished and true or false }
    if current and p.eta_seconds and p.updated_at then
      s.progress.expected_end = journal.timestamp(p.updated_at + p.eta_seconds)
    end
  end
  return prog, current
end

-- The last error: the latest failed step, else the last run's.
local function last_error(s, J, run)
  for name, p in pairs(J.playbooks or {}) do
    for sname, st in pairs(p.steps or {}) do
      if st.status == "failed" and st.error and (not s.last_error or (st.ended_at or "") > s.last_error.at) then
        s.last_error = { playbook = name, step = sname, at = st.ended_at or "", message = st.error }
      end
    end
  end
  if not s.last_error and run and run.error then
    s.last_error = { playbook = run.playbook, at = run.ended_at or "", message = run.error }
  end
end

-- migrun's slots on the primary, read now.
local function slots_now(s, src, cfg, samples, now, problem)
  local r, rerr = live.slots(src, { prefix = cfg.slots.prefix })
  if not r then
    problem("the source's slots: %s", journal.mask(rerr, cfg.source.conninfo))
    return
  end
  s.wal.lsn = tostring(r.wal_lsn)
  s.wal.retained_bytes = 0
  for _, sl in ipairs(r.slots) do
    if sl.owned then
      local secs, exact = sl.replay_lag_seconds, true
      if secs == nil and sl.confirmed_flush_lsn then
        secs, exact = live.lag_seconds(samples, sl.confirmed_flush_lsn, r.at or now, r.wal_lsn)
      end
      s.slots[#s.slots + 1] = { slot = sl.name, lag_bytes = sl.lag_bytes, lag_seconds = exact and secs or nil,
        lag_seconds_at_least = (not exact) and secs or nil, retained_bytes = sl.retained_bytes,
        active = sl.active, confirmed_flush_lsn = sl.confirmed_flush_lsn and tostring(sl.confirmed_flush_lsn),
        wal_status = sl.wal_status, safe_wal_size = sl.safe_wal_size }
      s.wal.retained_bytes = s.wal.retained_bytes + (sl.retained_bytes or 0)
    end
  end
  s.wal.held_bytes = live.held(r.slots) or 0
  s.wal.level = wal_level(s.wal.held_bytes, s.slots, cfg.wal_guard)
end

-- The DMS tasks, read now (Describe calls; the apply exceptions on the
-- target) -> the target's Db when it was opened.
local function tasks_now(s, cfg, main_facts, src, problem)
  local groups = main_facts.groups and main_facts.groups.groups
  local tasks = main_facts.dms_setup and main_facts.dms_setup.tasks
  if not (groups and tasks) then return nil end
  local tgt, err = read_only_db(cfg.target.conninfo, "target")
  if not tgt then problem("the target: %s", tostring(err)) end
  local okc, client, cerr = pcall(require("migrun.dms").client, { region = cfg.dms.region,
    endpoint_url = cfg.dms.endpoint_url, max_attempts = 2 })
  if not okc or not client then
    problem("DMS: %s", tostring(okc and cerr or client))
  elseif src and tgt then
    local st, serr = cdc.status(client, groups, tasks, { source = src, target = tgt, name = cfg.name,
      control_schema = cfg.dms.task and cfg.dms.task.control_schema })
    if not st then
      problem("DMS: %s", tostring(serr))
    else
      s.tasks = json.array()
      s.apply_exceptions = plain(st.exceptions)
      for _, r in ipairs(st.rows) do
        s.tasks[#s.tasks + 1] = { slot = plain(r.slot), task = plain(r.task), status = plain(r.status),
          apply_exceptions = plain(r.exceptions), applied_at = plain(r.applied_at),
          pending_changes = plain(r.pending), failure = plain(r.failure), seen_at = s.generated_at, source = "dms" }
      end
    end
  end
  return tgt
end

-- What the run saw last (offline, or DMS out of reach).
local function tasks_sampled(s, last_tasks)
  s.tasks = json.array()
  s.apply_exceptions = 0
  for _, t in ipairs(last_tasks.tasks) do
    s.tasks[#s.tasks + 1] = { slot = t.slot, task = t.task, status = t.status, apply_exceptions = t.exceptions,
      seen_at = last_tasks.at or journal.timestamp(last_tasks.t), source = "sample" }
    s.apply_exceptions = s.apply_exceptions + (tonumber(t.exceptions) or 0)
  end
end

-- Offline, or the primary out of reach: the slots as the run last sampled them.
local function slots_sampled(s, last, guard)
  local at = last.at or journal.timestamp(last.t)
  for _, sl in ipairs(type(last.slots) == "table" and last.slots or {}) do
    s.slots[#s.slots + 1] = { slot = sl.slot, lag_bytes = sl.lag_bytes, lag_seconds = sl.lag_seconds,
      retained_bytes = sl.retained_bytes, active = sl.active, confirmed_flush_lsn = sl.confirmed_flush_lsn,
      wal_status = sl.wal_status, safe_wal_size = sl.safe_wal_size, seen_at = at }
  end
  s.wal.retained_bytes = last.retained_bytes
  s.wal.held_bytes = tonumber(last.held_bytes) or live.held(last.slots)
  if s.wal.held_bytes then s.wal.level = wal_level(s.wal.held_bytes, s.slots, guard) end
  s.wal.seen_at = at
end

-- status.collect{ config =, state_dir =, offline =, now = } -> the status (see docs/status.md)
function status.collect(o)
  assert(type(o) == "table" and o.config, "status.collect{ config = cfg, state_dir = ... } expected")
  local cfg = o.config
  local state_dir = o.state_dir or cfg.state_dir
  local now = o.now or host.now()
  local s = { status_version = status.VERSION, migration = cfg.name, state_dir = state_dir,
              generated_at = journal.timestamp(now), problems = json.array() }
  local function problem(fmt, ...)
    s.problems[#s.problems + 1] = (fmt:format(...):gsub("%s*\n%s*", "; "):gsub("[;%s]+$", ""))
  end

  s.lock = live.lock_state(state_dir)
  local J, run = from_journal(s, cfg, state_dir, problem)
  local section = run and run.playbook
  step_now(s, J, section, now)
  local prog, current = progress_now(s, state_dir, now)
  s.full_load = full_load(J, section, prog, current)
  last_error(s, J, run)

  local guard = cfg.wal_guard
  s.wal = { warn_bytes = guard.warn_bytes, stop_bytes = guard.stop_bytes,
            replica_min_free_bytes = guard.replica_min_free_bytes, interval = guard.interval }
  local samples = live.read_samples(state_dir, { limit = 5000 })
  local last_tasks
  for i = #samples, 1, -1 do
    if type(samples[i].tasks) == "table" then last_tasks = samples[i] break end
  end

  -- the servers and DMS, read now
  s.slots = json.array()
  local main_facts = {}
  for sname, st in pairs(J.main and (J.playbooks or {})[J.main.playbook] and J.playbooks[J.main.playbook].steps or {}) do
    main_facts[sname] = st.facts or {}
  end
  local src, tgt
  if not o.offline then
    local err
    src, err = read_only_db(cfg.source.conninfo, "source")
    if not src then problem("the source: %s", tostring(err)) end
    if src then slots_now(s, src, cfg, samples, now, problem) end
    tgt = tasks_now(s, cfg, main_facts, src, problem)
  end
  if not s.tasks and last_tasks then tasks_sampled(s, last_tasks) end
  if not s.slots[1] and not s.wal.lsn and #samples > 0 then slots_sampled(s, samples[#samples], guard) end
  s.verification = verification_summary(state_dir, problem)
  if src then src:close() end
  if tgt then tgt:close() end
  return s
end

---------------------------------------------------------------------------
-- Output
---------------------------------------------------------------------------

-- Text JSON readers take: valid UTF-8 (a server's message in another
-- encoding keeps its ASCII, the rest becomes U+FFFD).
local function utf8_text(str)
  if utf8.len(str) then return str end
  local out, i = {}, 1
  while i <= #str do
    local ok, cp = pcall(utf8.codepoint, str, i)
    if ok and cp then
      local ch = utf8.char(cp)
      out[#out + 1] = ch
      i = i + #ch
    else
      out[#out + 1] = "\u{FFFD}"
      i = i + 1
    end
  end
  return table.concat(out)
end

-- Every value as JSON can hold it, whatever a collector put in: NaN, inf,
-- NULL (pg.null), functions are left out; LSNs and other userdata are their
-- text; keys are strings (or an array's indexes); text is UTF-8.
local function clean(v)
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return nil end
    return v
  elseif t == "string" then
    return utf8_text(v)
  elseif t == "boolean" then
    return v
  elseif t == "userdata" then
    if rawequal(v, pg.null) then return nil end
    return utf8_text(tostring(v))
  elseif t ~= "table" or v == json.null then
    return nil
  end
  local array = json.is_array(v)
  local out = array and json.array() or {}
  for k, x in pairs(v) do
    local key = k
    if not (array and math.type(k) == "integer") then key = utf8_text(tostring(k)) end
    out[key] = clean(x)
  end
  return out
end
status.clean = clean

function status.json(s)
  return json.encode(clean(s), { indent = "  " }) .. "\n"
end

local function ago(iso, now)
  local t = epoch(iso)
  if not t then return "" end
  return (" (%s ago)"):format(text.duration(math.max(0, now - t)))
end

local function clock(iso) return iso and iso:gsub("T", " "):gsub("Z$", " UTC") or "?" end

-- Who runs what: the first lines.
local function header_lines(add, s)
  local who
  if s.lock.held then
    who = ("RUNNING: %s (pid %s)"):format(s.run and s.run.playbook or "a playbook", tostring(s.lock.pid or "?"))
  elseif s.run then
    who = ("not running; the last run (%s) %s"):format(s.run.playbook,
      s.run.outcome == "ok" and "ended well" or s.run.outcome == "interrupted" and "was interrupted (killed?)"
        or s.run.outcome)
  else
    who = "nothing has run yet"
  end
  add("migration %s: %s", s.migration, who)
  add("  state directory %s", s.state_dir)
  if s.run then
    add("  last run: %s, %s to %s", s.run.playbook, clock(s.run.started_at),
      s.run.ended_at and clock(s.run.ended_at) or "now")
  end
  if s.step then
    add("step: %s · %s %s since %s%s", s.step.playbook, s.step.name, s.step.state, clock(s.step.started_at),
      s.step.seconds and (" (" .. text.duration(s.step.seconds) .. ")") or "")
  end
end

local function progress_line(add, s)
  local p = s.progress
  if not (p and (p.current or (not s.lock.held and not p.finished))) then return end
  local parts = { ("%s: %s"):format(p.label or "progress", progress.amount(p.done, p.unit)) }
  if p.total then parts[#parts + 1] = (" of %s (%d%%)"):format(progress.amount(p.total, p.unit), math.floor(p.percent or 0)) end
  if p.current then
    if p.per_second then parts[#parts + 1] = ", " .. progress.speed(p.per_second, p.unit) end
    if p.rows_per_second and p.unit ~= "rows" then parts[#parts + 1] = ", " .. progress.speed(p.rows_per_second, "rows") end
    if p.expected_end then
      parts[#parts + 1] = (", ends ~%s (%s)"):format(clock(p.expected_end), text.duration(p.eta_seconds))
    elseif not p.finished then
      parts[#parts + 1] = ", no estimate yet (nothing moved in the last 30 s)"
    end
    parts[#parts + 1] = (" [saved %s ago]"):format(text.duration(p.age_seconds or 0))
  else
    parts[#parts + 1] = (" when it stopped, %s"):format(clock(p.updated_at))
  end
  add("progress: %s", table.concat(parts))
end

local function full_load_lines(add, fl)
  if not fl then return end
  -- on-disk bytes against on-disk bytes; what was sent as COPY apart
  local bytes = fl.disk_bytes_loaded and fl.bytes_expected
    and ("%s of %s on disk (%s sent as COPY)"):format(text.bytes(fl.disk_bytes_loaded), text.bytes(fl.bytes_expected),
      text.bytes(fl.bytes_loaded))
    or (text.bytes(fl.bytes_loaded) .. " sent as COPY")
  add("full load (%s · %s, %s): %d%s tables, %s, %s rows", fl.playbook, fl.step, fl.status or "?",
    fl.tables_loaded, fl.tables and ("/" .. fl.tables) or "", bytes, text.thousands(fl.rows_loaded))
  local rows = {}
  for _, st in ipairs(fl.streams) do
    local now_doing = "-"
    if st.table then
      now_doing = ("%s %s%s%s%s%s"):format(st.table, text.bytes(st.table_bytes_done or 0),
        st.table_bytes_expected and (" of " .. text.bytes(st.table_bytes_expected)) or "",
        st.table_rows_done and (" (%s of ~%s rows)"):format(text.thousands(st.table_rows_done),
          st.table_rows_expected and text.thousands(st.table_rows_expected) or "?") or "",
        st.bytes_per_second and (", " .. text.bytes(st.bytes_per_second) .. "/s") or "",
        st.eta_seconds and (", " .. text.duration(st.eta_seconds) .. " left") or "")
    end
    rows[#rows + 1] = { stream = st.stream, loaded = st.tables_loaded, bytes = text.bytes(st.bytes_loaded), now = now_doing }
  end
  if #rows > 0 then
    add("%s", tostring(text.columns({ { "stream", align = "right" }, { "loaded", "tables", align = "right" },
      { "bytes", align = "right" }, { "now", "copying now" } }, rows)))
  end
end

local function slot_lines(add, slots)
  if #slots == 0 then return end
  local rows = {}
  for _, sl in ipairs(slots) do
    rows[#rows + 1] = { slot = sl.slot, lag = text.bytes(sl.lag_bytes),
      time = sl.lag_seconds and text.duration(sl.lag_seconds)
        or sl.lag_seconds_at_least and ("> " .. text.duration(sl.lag_seconds_at_least)) or "?",
      retained = text.bytes(sl.retained_bytes), active = sl.active,
      -- max_slot_wal_keep_size (13+): how much more WAL before the slot is lost
      limit = sl.wal_status == "lost" and "LOST" or sl.wal_status == "unreserved" and "UNRESERVED: lost at the next checkpoint"
        or sl.safe_wal_size and (text.bytes(sl.safe_wal_size) .. " more") or "-" }
  end
  add("slots%s:", slots[1].seen_at and (" (as sampled " .. clock(slots[1].seen_at) .. ")") or "")
  local columns = { { "slot" }, { "lag", align = "right" }, { "time", "lag (time)", align = "right" },
    { "retained", "retained WAL", align = "right" }, { "active" } }
  for _, sl in ipairs(slots) do
    if sl.safe_wal_size or sl.wal_status == "lost" or sl.wal_status == "unreserved" then
      columns[#columns + 1] = { "limit", "before lost (max_slot_wal_keep_size)" }
      break
    end
  end
  add("%s", tostring(text.columns(columns, rows)))
end

local function wal_line(add, w)
  add("WAL guard: warn at %s, stop at %s held back, replica free >= %s, every %s%s", text.bytes(w.warn_bytes),
    text.bytes(w.stop_bytes), text.bytes(w.replica_min_free_bytes), text.duration(w.interval),
    w.held_bytes and ("; migrun's slots hold back %s %s%s"):format(text.bytes(w.held_bytes),
      w.seen_at and ("(as sampled " .. clock(w.seen_at) .. ")") or "now",
      w.level and w.level ~= "ok" and (" (" .. w.level:upper() .. ")") or "") or "")
end

local function task_lines(add, s)
  if not (s.tasks and #s.tasks > 0) then return end
  local rows = {}
  for _, t in ipairs(s.tasks) do
    rows[#rows + 1] = { slot = t.slot, task = t.task, status = t.status, exc = t.apply_exceptions,
      applied = t.applied_at or "-", failure = t.failure or "" }
  end
  add("DMS tasks%s: %d apply exception(s)", s.tasks[1].source == "sample"
    and (" (as the run last saw them, " .. clock(s.tasks[1].seen_at) .. ")") or "", s.apply_exceptions or 0)
  add("%s", tostring(text.columns({ { "slot" }, { "task" }, { "status" }, { "exc", "apply exceptions", align = "right" },
    { "applied", "applied up to" }, { "failure", "" } }, rows)))
end

-- The last error, the live verification, the metrics' address, what could not be read.
local function closing_lines(add, s, now)
  if s.last_error then
    add("last error (%s%s, %s%s): %s", s.last_error.playbook or "?", s.last_error.step and (" · " .. s.last_error.step) or "",
      clock(s.last_error.at), ago(s.last_error.at, now), s.last_error.message)
  end
  local v = s.verification
  if v then
    add("verification: %s at %s (position %s): %d difference(s); %d key(s) and %d table(s) left for the cutover",
      v.cutover_at and "at the cutover" or "live", clock(v.cutover_at or v.verified_at), tostring(v.position),
      #v.differences, v.pending_keys, #v.pending_tables)
    for _, d in ipairs(v.differences) do add("  %s: %s", d.table, d.detail or "") end
  end
  if s.lock.held and s.run and s.run.metrics then add("metrics: %s", s.run.metrics) end
  for _, pr in ipairs(s.problems) do add("could not look: %s", pr) end
end

function status.format(s)
  local now = epoch(s.generated_at) or host.now()
  local out = {}
  local function add(fmt, ...) out[#out + 1] = select("#", ...) > 0 and fmt:format(...) or fmt end
  header_lines(add, s)
  progress_line(add, s)
  full_load_lines(add, s.full_load)
  slot_lines(add, s.slots)
  wal_line(add, s.wal)
  task_lines(add, s)
  closing_lines(add, s, now)
  return table.concat(out, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- The script
---------------------------------------------------------------------------

status.CLI = {
  usage = "migrun playbooks/status.lua",
  about = "What the migration is doing: step, progress and ETA, slots' lag, WAL, tasks, errors. Reads only.",
  options = {
    { "--config", "FILE", "the migration's configuration", default = "migration.lua" },
    { "--state-dir", "DIR", "journal and progress (default: state_dir of the config)" },
    { "--json", nil, "JSON for scripts (docs/status.md)" },
    { "--offline", nil, "the state directory only: no server, no DMS" },
  },
  args = {}, max_args = 0,
}

function status.main(argv)
  local plain = {}
  for i = 1, #(argv or {}) do plain[i] = argv[i] end
  local opts, err = cli.parse(status.CLI, plain)
  if not opts then io.stderr:write("migrun: ", tostring(err), " (see --help)\n") return 2 end
  if opts.help then io.stdout:write(cli.help(status.CLI, "exit status: 0 shown, 2 usage or configuration error\n")) return 0 end
  local cfg, cerr = config.load(opts.config)
  if not cfg then io.stderr:write("migrun: ", tostring(cerr), "\n") return 2 end
  local dir = opts.state_dir
  if dir and dir:sub(1, 1) ~= "/" then dir = assert(host.cwd()) .. "/" .. dir end
  local ok, s = pcall(status.collect, { config = cfg, state_dir = dir or cfg.state_dir, offline = opts.offline })
  if not ok then
    io.stderr:write("migrun: status: ", tostring(s), "\n")
    return 1
  end
  local okw, out = pcall(opts.json and status.json or status.format, s)
  if not okw then
    -- still an answer a script can read, saying what went wrong
    io.stderr:write("migrun: status: ", tostring(out), "\n")
    if not opts.json then return 1 end
    out = json.encode({ status_version = status.VERSION, migration = cfg.name, generated_at = s.generated_at,
      problems = json.array{ "the status could not be written: " .. tostring(out) } }, { indent = "  " }) .. "\n"
  end
  io.stdout:write(out)
  return 0
end

return status
