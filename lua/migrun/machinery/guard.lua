--[[
migrun.guard: the guard of a running playbook, a process of its own. A
playbook declares it (P:watch(guard.watcher())); the runner starts it as a
child of migrun that dies with it, and it checks, every wal_guard.interval
seconds, on its own read-only connections, whatever step runs (an index
build, the QA, DMS setup, catch-up, a restart, a cutover):
  - the WAL migrun's slots hold back on the primary, its WAL disk, and the
    rate they grow at (migrun.walguard);
  - the paused replica's disk;
  - the source's schema against the fingerprint full.lua took at know_data
    (migrun.drift).
Slot invalidation too: from PostgreSQL 13, with max_slot_wal_keep_size set,
each slot's wal_status and safe_wal_size say how much more WAL the primary
may write before it removes what the slot needs; the guard warns, then stops
while the slot can still be saved (walguard.slot_limits; the watch slot only
warns: losing it costs a verification, not CDC).
Each round is a reading in state_dir/samples.jsonl (kind "guard", the same
shape as the playbook's own: migrun.playbook.live), so the report's charts,
`status` and the metrics see the whole run, whatever step runs.
A warning goes straight to the terminal and to state_dir/migrun.log (the
parent may be blocked for hours in one statement). A stop is written on the
pipe to the parent, then the parent is asked to stop (host.request_stop:
SIGUSR1, which interrupts the running step with an error of kind "guard",
cancelling a running query or wait); the step is left failed, so running the
playbook again resumes it. Reads only, and never a secret on argv: the job
(connection strings included) comes on stdin.

  P:watch(guard.watcher())                 -- full.lua, cutover.lua, partial_restart.lua
  P:watch(guard.watcher{ drift = false })  -- full_restart.lua: it tears the attempt down

  guard.watcher(opts) -> a watch spec for migrun.playbook (a process watcher)
  guard.job(ctx, opts) -> the job the child is given (JSON-able)
  guard.new(job) -> Guard; Guard:round() -> { level, message, wal = report }   one check
  Guard:sample(round [, now]) -> sample | nil, err   the round appended to samples.jsonl
      (job.samples; nil without a WAL reading)
  guard.main()     the child's entry point: reads the job from stdin, loops

The child's stdout carries one JSON line per round: { level, message,
held_bytes, rate, eta_stop, eta_full, warn_bytes, stop_bytes, keep_bytes,
slots_at_risk = { { slot, wal_status, safe_wal_size } } } (plain values only).
]]
local host = require "migrun.host"
local pg = require "migrun.pg"
local db = require "migrun.db"
local text = require "migrun.text"
local walguard = require "migrun.walguard"
local drift = require "migrun.drift"
local journal = require "migrun.playbook.journal"
local live = require "migrun.playbook.live"
local json = require "migrun.json"

local guard = {}

local LEVELS = { ok = 0, warn = 1, stop = 2 }

local function dirname(path)
  return path and path:match("^(.*)/[^/]*$") or "playbooks"
end

-- The command that runs this playbook again, as the operator typed it.
local function rerun_command(ctx)
  local P = ctx.playbook
  local parts = { "migrun", P.script or (P.declared_name .. ".lua") }
  for _, spec in ipairs(P.arg_specs or {}) do
    local v = ctx.args and ctx.args[spec[1]]
    if v then parts[#parts + 1] = tostring(v) end
  end
  parts[#parts + 1] = "--config"
  parts[#parts + 1] = ctx.config.config_path or "migration.lua"
  return table.concat(parts, " ")
end

function guard.job(ctx, opts)
  opts = opts or {}
  local cfg = ctx.config
  local planned = {}
  for _, name in ipairs(ctx.plan or {}) do planned[name] = true end
  return {
    parent = host.pid, interval = cfg.wal_guard.interval, started_at = journal.timestamp(),
    source = cfg.source.conninfo, replica = cfg.replica.conninfo,
    wal_guard = cfg.wal_guard, drift = opts.drift ~= false and cfg.schema_drift.on_change or "off",
    -- a run of the main playbook that retakes the fingerprint compares nothing until it has
    retaking = ctx.playbook.is_main and planned.know_data or false,
    schemas = cfg.schemas, exclude_tables = cfg.exclude_tables, prefix = cfg.slots.prefix,
    state_dir = ctx.state_dir, log = not ctx.dry_run and (ctx.state_dir .. "/migrun.log") or nil,
    -- its readings join the run's in samples.jsonl (a dry run writes nothing)
    samples = not ctx.dry_run, playbook = ctx.playbook.name,
    advice = { config = cfg.config_path, rerun = rerun_command(ctx), playbooks = dirname(ctx.playbook.script) },
  }
end

function guard.watcher(opts)
  return { "guard", notify_as = "wal_guard", interval = function(ctx) return ctx.config.wal_guard.interval end,
    process = { module = "migrun.guard", job = function(ctx) return guard.job(ctx, opts) end } }
end

---------------------------------------------------------------------------
-- One round
---------------------------------------------------------------------------

local Guard = {}
Guard.__index = Guard

function guard.new(job)
  assert(type(job) == "table" and job.source, "guard.new: a job expected")
  return setmetatable({ job = job, tracker = walguard.tracker(job.wal_guard.rate_window or 600), dbs = {} },
    Guard)
end

-- A read-only session of the guard's own.
function Guard:db(name)
  if self.dbs[name] then return self.dbs[name] end
  local conninfo = self.job[name]
  local conn, err = pg.connect(conninfo, { name = name, connect_timeout = 10, statement_timeout = 60 })
  if not conn then return nil, ("the guard cannot reach the %s: %s"):format(name, journal.mask(tostring(err), conninfo)) end
  conn:exec("set application_name = 'migrun guard'")
  conn:exec("set default_transaction_read_only = on")
  local d = db.wrap(conn, { dry_run = true })
  self.dbs[name] = d
  return d
end

function Guard:forget(name)
  local d = self.dbs[name]
  self.dbs[name] = nil
  if d then d:close() end
end

-- What the migration's journal says now: the main playbook's facts and steps,
-- and the step of this run's playbook that runs.
function Guard:journal()
  local J = journal.open(self.job.state_dir, { read_only = true })
  local main = J and J.data.main and J.data.main.playbook
  local running
  for name, st in pairs(J and self.job.playbook and J:steps(self.job.playbook) or {}) do
    if st.status == "running" then running = name end
  end
  if not main then return { steps = {}, running = running } end
  return { steps = J:steps(main), running = running }
end

function Guard:round()
  local job = self.job
  local src, err = self:db("source")
  if not src then return { level = "warn", message = "WAL guard warning: " .. err .. "; it tries again" } end
  local rep, rerr = self:db("replica") -- the replica's disk is watched when it can be reached
  local j = self:journal()
  self.step = j.running
  local function step(name) return j.steps[name] or {} end
  local tasks = step("dms_setup").status == "done"
  local r
  r, err = walguard.check(src, rep, job.wal_guard, { prefix = job.prefix, tracker = self.tracker, tasks = tasks,
    advice = job.advice })
  if not r then
    self:forget("source")
    self:forget("replica")
    return { level = "warn", message = "WAL guard warning: the check failed: " .. tostring(err) .. "; it tries again" }
  end
  local out = { level = r.level, message = r.message, wal = r }
  if not rep then
    -- never silently unwatched: the paused replica's disk is what fills during the load
    out.level = out.level == "ok" and "warn" or out.level
    out.message = out.message:gsub("^WAL guard ok", "WAL guard warning") .. "; " .. rerr
      .. ": its disk is not watched until it can be"
  end

  -- schema drift against know_data's fingerprint
  local kd = step("know_data")
  local fp = kd.status == "done" and kd.facts and kd.facts.schema_fingerprint
  if job.retaking and not (kd.status == "done" and (kd.ended_at or "") >= job.started_at) then fp = nil end
  if fp and job.drift ~= "off" then
    local changes, derr = drift.check(src, fp, { schemas = job.schemas, exclude = job.exclude_tables })
    if changes and #changes > 0 then
      local plan = (step("groups").facts or {}).groups or {}
      local slot_of = {}
      for _, g in ipairs(plan) do
        for _, t in ipairs(g.tables or {}) do slot_of[text.key(t)] = g.slot end
      end
      local msg = drift.message(changes, { level = job.drift, taken_at = fp.taken_at, config = job.advice.config,
        rerun = job.advice.rerun, playbooks = job.advice.playbooks, slot_of = function(k) return slot_of[k] end })
      out.drift = changes
      if LEVELS[job.drift] > LEVELS[out.level] then out.level = job.drift end
      out.message = out.message:match("^WAL guard ok") and msg or (out.message .. " " .. msg)
    elseif not changes then
      out.message = out.message .. " (schema not compared: " .. tostring(derr) .. ")"
    end
  end
  return out
end

-- The lag in time needs the primary's WAL positions over time: the run's
-- earlier readings, then the guard's own.
function Guard:_history()
  if not self.history then
    self.history = {}
    for _, s in ipairs(live.read_samples(self.job.state_dir, { limit = 500 })) do
      self.history[#self.history + 1] = { t = s.t, wal_lsn = s.wal_lsn }
    end
  end
  return self.history
end

function Guard:sample(r, now)
  local w = r and r.wal
  if not (w and w.current_lsn and self.job.state_dir) then return nil end
  now = now or host.now()
  local history = self:_history()
  local sample = { t = now, at = journal.timestamp(now), kind = "guard", playbook = self.job.playbook,
    step = self.step, level = r.level, wal_lsn = tostring(w.current_lsn), retained_bytes = 0,
    held_bytes = w.held_bytes, keep_bytes = w.keep_bytes, slots = {} }
  for _, sl in ipairs(w.slots) do
    local secs
    if sl.confirmed_flush_lsn then
      local exact
      secs, exact = live.lag_seconds(history, sl.confirmed_flush_lsn, now, w.current_lsn)
      if not exact then secs = nil end -- older than what was seen: unknown, not a guess
    end
    sample.slots[#sample.slots + 1] = { slot = sl.name, lag_bytes = sl.behind_bytes, lag_seconds = secs,
      retained_bytes = sl.retained_bytes, active = sl.active,
      confirmed_flush_lsn = sl.confirmed_flush_lsn and tostring(sl.confirmed_flush_lsn) or nil,
      wal_status = sl.wal_status, safe_wal_size = sl.safe_wal_size }
    sample.retained_bytes = sample.retained_bytes + (sl.retained_bytes or 0)
  end
  history[#history + 1] = { t = now, wal_lsn = sample.wal_lsn }
  if #history > 1000 then table.remove(history, 1) end
  local ok, err = live.append_sample(self.job.state_dir, sample)
  if not ok then return nil, err end
  return sample
end

-- The slots near or past max_slot_wal_keep_size, for the parent's line.
local function at_risk(w)
  local out
  for _, sl in ipairs(w and w.slots or {}) do
    if sl.wal_status == "unreserved" or sl.wal_status == "lost" or sl.eta_lost
        or (sl.safe_wal_size and w.keep_bytes and sl.safe_wal_size < w.keep_bytes / 2) then
      out = out or {}
      out[#out + 1] = { slot = sl.name, wal_status = sl.wal_status, safe_wal_size = sl.safe_wal_size }
    end
  end
  return out
end

---------------------------------------------------------------------------
-- The child
---------------------------------------------------------------------------

local function line_for(level, message)
  return (level == "ok" and "" or "WARNING: ") .. message
end

-- To the terminal (stderr, which the child shares with migrun) and the log.
local function tell(job, message)
  local err = io.stderr
  if host.isatty(err) then err:write("\r\27[K") end -- over a live progress line
  err:write(os.date("%H:%M:%S "), message, "\n")
  err:flush()
  if job.log then
    local f = io.open(job.log, "a")
    if f then
      f:write(os.date("%Y-%m-%d %H:%M:%S "), message, "\n")
      f:close()
    end
  end
end

function guard.main()
  local job = assert(json.decode(io.read("a")))
  local g = guard.new(job)
  local last_told, last_level = nil, "ok"
  local repeat_every = math.max(300, 10 * job.interval)
  local sample_warned
  while true do
    local r = g:round()
    local w = r.wal or {}
    if job.samples then
      local ok, serr = g:sample(r)
      if not ok and serr and not sample_warned then
        sample_warned = true -- once: a reading lost never stops the guard
        tell(job, "WARNING: the guard could not record its reading in samples.jsonl: " .. tostring(serr))
      end
    end
    io.stdout:write(json.encode{ level = r.level, message = r.message, held_bytes = w.held_bytes,
      rate = w.rate, eta_stop = w.eta_stop, eta_full = w.eta_full,
      warn_bytes = job.wal_guard.warn_bytes, stop_bytes = job.wal_guard.stop_bytes,
      keep_bytes = w.keep_bytes, slots_at_risk = at_risk(w) }, "\n")
    io.stdout:flush()
    if r.level == "stop" then
      -- the parent prints and journals the message; it only has to be told
      -- (a stop waits while the parent hands a line to its callback: migrun.proc)
      local ok, rerr = host.request_stop(job.parent)
      if not ok then tell(job, "WARNING: the guard could not stop migrun: " .. tostring(rerr)) end
      os.exit(0)
    elseif r.level == "warn" then
      local now = host.monotonic()
      if last_level ~= "warn" or not last_told or now - last_told >= repeat_every then
        tell(job, line_for(r.level, r.message))
        last_told = now
      end
    end
    last_level = r.level
    host.sleep(job.interval)
  end
end

return guard
