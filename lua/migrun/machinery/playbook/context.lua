--[[
migrun.playbook.context: the step context, the one value a step, a check and
a watcher are given (see migrun.playbook for the whole list). It owns the
connections, the DMS client, the log, progress bars, confirmation, commands,
report tables and the cooperative sleep that runs watchers while it waits.

  context.new(P, fields) -> ctx      (the runner's; fields: config, dry_run,
      yes, args, state_dir, journal, resuming, facts, main, run_id, sessions)

An earlier run's sessions (migrun.playbook.sessions): with fields.sessions =
{ prefix =, own = [, timeout =] }, the first connection to each server ends
what an earlier run of the migration left working there (a dry run says what
it would end) before ctx:connect returns it; ctx:clear_earlier() does that on
every server at once (the runner, before the first step).

What other processes see of a run (migrun.playbook.live): every progress bar
saves its snapshot to state_dir/progress.json at most every 2 seconds;
ctx:sample_slots(kind, extra) appends the primary's WAL position and the
slots' lag to state_dir/samples.jsonl; ctx:notify(event, message, details)
sends a notification (migrun.playbook.notify). None of them writes in a dry
run, and none of them can stop the run.
]]
local host = require "migrun.host"
local proc = require "migrun.proc"
local pg = require "migrun.pg"
local db = require "migrun.db"
local errors = require "migrun.error"
local journal = require "migrun.playbook.journal"
local progress = require "migrun.playbook.progress"
local live = require "migrun.playbook.live"
local notify = require "migrun.playbook.notify"
local sessions = require "migrun.playbook.sessions"

local context = {}

local SERVERS = { source = true, replica = true, target = true }

local Ctx = {}
Ctx.__name = "migrun.playbook.Context"

local function clock() return os.date("%H:%M:%S") end

function Ctx:_emit(line, is_warning)
  if self._bar then self._bar:clear() end
  local out = is_warning and io.stderr or io.stdout
  io.stdout:flush()
  out:write(clock(), " ", line, "\n")
  out:flush()
  self:_log(line)
end

function Ctx:_log(line)
  if self._logfile then
    self._logfile:write(os.date("%Y-%m-%d %H:%M:%S "), line, "\n")
    self._logfile:flush()
  end
end

function Ctx:say(fmt, ...)
  self:_emit(select("#", ...) > 0 and fmt:format(...) or tostring(fmt))
end

function Ctx:warn(fmt, ...)
  self:_emit("WARNING: " .. (select("#", ...) > 0 and fmt:format(...) or tostring(fmt)), true)
end

local mask = require("migrun.mask").message

function Ctx:connect(name)
  assert(SERVERS[name], "ctx:connect: source, replica or target expected")
  if self._dbs[name] then return self._dbs[name] end
  local conninfo = self.config[name].conninfo
  local conn, err = pg.connect(conninfo, { name = name })
  if not conn then
    return nil, errors.new{ kind = "connection", where = name, code = err and err.code,
      message = ("cannot connect to the %s (%s.conninfo): %s"):format(name, name,
        mask(err and err.message or err, conninfo)),
      hint = ("check %s.conninfo in %s and that the server is up"):format(name,
        self.config.config_path or "the config") }
  end
  local ctx = self
  local wrapped = db.wrap(conn, {
    dry_run = self.dry_run, echo_writes = true,
    echo = function(line)
      if ctx.dry_run then ctx:say("dry run: %s", mask(line, conninfo)) else ctx:_log("write " .. mask(line, conninfo)) end
    end,
    -- a server that restarted, a network that failed: connect again and go
    -- on where that is safe (migrun.db says where; docs/faults.md)
    reopen = function() return pg.connect(conninfo, { name = name }) end,
    reconnect_timeout = self.config.full_load and self.config.full_load.reconnect_timeout,
    on_reconnect = function(line) ctx:warn("%s", mask(line, conninfo)) end,
  })
  if self.sessions and not self._cleared[name] then
    local ok, serr = self:_clear_earlier(name, wrapped)
    if not ok then wrapped:close() return nil, serr end
  end
  self._dbs[name] = wrapped
  return wrapped
end

-- What an earlier run left working on one server, ended before this run uses it.
function Ctx:_clear_earlier(name, d)
  local ctx, conninfo = self, self.config[name].conninfo
  local ended, err = sessions.clear(d, { server = name, prefix = self.sessions.prefix, own = self.sessions.own,
    dry_run = self.dry_run, timeout = self.sessions.timeout,
    mask = function(s) return mask(s, conninfo) end,
    say = function(line) ctx:say("%s", line) end })
  if not ended then
    if errors.is(err) and err.kind == "sessions" then return nil, err end
    return nil, errors.new{ kind = "sessions", where = name, code = err and err.code,
      message = ("cannot look for an earlier run's sessions on the %s: %s"):format(name,
        mask(err and err.message or err, conninfo)),
      hint = "the configured role must be able to read pg_stat_activity (it can, for its own sessions)" }
  end
  self._cleared[name] = true
  return true
end

--[[ ctx:clear_earlier() -> true | nil, err
     On each server, what an earlier run left working is ended before this
     run does anything. A server that cannot be reached now is warned about
     and cleared when the run first connects to it; one where an earlier
     run's sessions cannot be ended fails the run. The session that looked
     is closed: the steps connect when they need a server, as before. ]]
function Ctx:clear_earlier()
  if not self.sessions then return true end
  for _, name in ipairs{ "source", "replica", "target" } do
    if self.config[name] and not self._cleared[name] then
      local had = self._dbs[name]
      local d, err = self:connect(name)
      if d and not had then
        d:close()
        self._dbs[name] = nil
      elseif not d then
        if errors.is(err) and err.kind == "sessions" then return nil, err end
        self:warn("%s; an earlier run's sessions there are looked for when this run connects to it",
          tostring(err and err.message or err))
      end
    end
  end
  return true
end

function Ctx:dms()
  if self._dms then return self._dms end
  local dms = require "migrun.dms"
  local c = self.config.dms
  local ctx = self
  local client, err = dms.client{ region = c.region, endpoint_url = c.endpoint_url, dry_run = self.dry_run,
    max_attempts = c.max_attempts,
    on_call = function(line)
      if ctx.dry_run then ctx:say("dry run: %s", line) else ctx:_log(line) end
    end,
    on_retry = function(line) ctx:warn("%s", line) end }
  if not client then error(err, 0) end
  self._dms = client
  return client
end

function Ctx:facts_of(playbook_name)
  local out = {}
  for name, s in pairs(self.journal:steps(playbook_name)) do out[name] = s.facts or {} end
  return out
end

-- Whether a step of this playbook (or of another one) is done in the journal.
function Ctx:done(step, playbook_name)
  local rec = self.journal:steps(playbook_name or self.playbook.name)[step]
  return rec ~= nil and rec.status == "done"
end

-- Whether a step has begun in the journal (running, failed or done).
function Ctx:began(step, playbook_name)
  local rec = self.journal:steps(playbook_name or self.playbook.name)[step]
  return rec ~= nil and rec.status ~= nil
end

function Ctx:main_facts()
  if not self.main then return {} end
  return self:facts_of(self.main)
end

function Ctx:main_done(step)
  return self.main ~= nil and self:done(step, self.main)
end

-- A fact of a step of the main playbook, changed by another playbook (a task
-- replaced by a partial restart): the main playbook and the ones after it
-- follow it. Nothing is written in a dry run.
function Ctx:record_main(step, key, value)
  assert(self.main, "ctx:record_main: no main playbook in the journal")
  if self.dry_run then return true end
  local rec = self.journal:step(self.main, step)
  rec.facts = rec.facts or {}
  rec.facts[key] = value
  local ok, err = self.journal:save()
  if not ok then error(err, 0) end
  return true
end

function Ctx:record(key, value)
  assert(self.step, "ctx:record outside a step")
  local facts = self.facts[self.step]
  if type(key) == "table" then
    for k, v in pairs(key) do facts[k] = v end
  else
    facts[key] = value
  end
  self._record.facts = facts
  if not self.dry_run then
    local ok, err = self.journal:save()
    if not ok then error(err, 0) end
  end
end

-- Changes to this step's facts, each a path into them (a list of keys): the
-- value now there saved alone (journal:save_change), at the cost of that
-- value. For facts that grow by many small parts, like a full load's chunks.
function Ctx:record_changes(paths)
  assert(self.step, "ctx:record_changes outside a step")
  local facts = self.facts[self.step]
  self._record.facts = facts
  if self.dry_run then return end
  local ok, err = self.journal:save_changes(paths, { "playbooks", self.playbook.name, "steps", self.step, "facts" })
  if not ok then error(err, 0) end
end

function Ctx:progress(opts)
  local ctx = self
  local bar = progress.new{ label = opts.label, total = opts.total, unit = opts.unit,
    interval = opts.interval, tty = opts.tty,
    say = function(line) ctx:_emit(line) end,
    on_record = function(b, now) ctx:_save_progress(b, now) end,
    on_tick = function() ctx:run_watchers() end }
  self._bar = bar
  return bar
end

-- progress.json: the bar's snapshot with who and where, for `status` and the metrics
function Ctx:_save_progress(bar, now)
  if self.dry_run then return end
  self._progress_writer = self._progress_writer or live.progress_writer(self.state_dir)
  local rec = self._record or {}
  local ok, err = self._progress_writer:save({ pid = host.pid, migration = self.config.name,
    playbook = self.playbook.name, step = self.step, step_started_at = rec.started_at,
    progress = bar:snapshot() }, now or bar.finished)
  if not ok and not self._progress_warned then
    self._progress_warned = true
    self:warn("could not save the progress for `status`: %s", tostring(err))
  end
end

--[[ ctx:sample_slots(kind, extra) -> sample | nil
     One reading of the primary's WAL position and migrun's slots (lag, retained
     WAL, lag in time) appended to samples.jsonl with extra's fields (tasks,
     exceptions, level...); at most one a second of each kind. A failed reading is logged and
     skipped: sampling never stops a run. ]]
function Ctx:sample_slots(kind, extra)
  if self.dry_run then return nil end
  local now = host.now()
  -- at most one a second of each kind: one kind never hides another's reading
  self._last_sample = self._last_sample or {}
  if self._last_sample[kind] and now - self._last_sample[kind] < 1 then return nil end
  local src, cerr = self:connect("source")
  local r, err = nil, cerr
  if src then r, err = live.slots(src, { prefix = self.config.slots.prefix }) end
  if not r then
    self:_log("sample: could not read the slots: " .. tostring(err))
    return nil
  end
  self._last_sample[kind] = now
  if not self._history then
    self._history = {}
    for _, s in ipairs(live.read_samples(self.state_dir, { limit = 500 })) do
      self._history[#self._history + 1] = { t = s.t, wal_lsn = s.wal_lsn }
    end
  end
  local sample = { t = r.at or now, at = journal.timestamp(r.at or now), kind = kind, playbook = self.playbook.name,
                   step = self.step, wal_lsn = tostring(r.wal_lsn), retained_bytes = 0, slots = {} }
  for _, sl in ipairs(r.slots) do
    if sl.owned then
      local secs = sl.replay_lag_seconds
      if secs == nil and sl.confirmed_flush_lsn then
        local exact
        secs, exact = live.lag_seconds(self._history, sl.confirmed_flush_lsn, sample.t, r.wal_lsn)
        if not exact then secs = nil end
      end
      sample.slots[#sample.slots + 1] = { slot = sl.name, lag_bytes = sl.lag_bytes, lag_seconds = secs,
        retained_bytes = sl.retained_bytes, active = sl.active,
        confirmed_flush_lsn = sl.confirmed_flush_lsn and tostring(sl.confirmed_flush_lsn) or nil }
      sample.retained_bytes = sample.retained_bytes + (sl.retained_bytes or 0)
    end
  end
  for k, v in pairs(extra or {}) do sample[k] = v end
  self._history[#self._history + 1] = { t = sample.t, wal_lsn = sample.wal_lsn }
  if #self._history > 1000 then table.remove(self._history, 1) end
  local ok, werr = live.append_sample(self.state_dir, sample)
  if not ok then self:_log("sample: " .. tostring(werr)) end
  return sample
end

--[[ ctx:notify(event, message [, details]) -> what notify.send did
     An event of notify.EVENTS for the people watching: logged, and sent as
     the config's notify section says. Never raises for the world failing. ]]
-- Whether this run sees `what` for the first time (a notification said once
-- per run, however many polls see the same failed task).
function Ctx:first_time(what)
  self._said = self._said or {}
  if self._said[what] then return false end
  self._said[what] = true
  return true
end

function Ctx:notify(event, message, details)
  assert(notify.KNOWN[event], "ctx:notify: unknown event " .. tostring(event))
  self:_log(("event %s: %s"):format(event, mask(message)))
  self._events = self._events or {}
  self._events[event] = (self._events[event] or 0) + 1
  local cfg = self.config.notify
  if not notify.wanted(cfg, event) then return {} end
  local secrets = {}
  for _, name in ipairs{ "source", "replica", "target" } do
    if self.config[name] then secrets[#secrets + 1] = self.config[name].conninfo end
  end
  local body = notify.body{ event = event, migration = self.config.name, playbook = self.playbook.name,
    step = self.step, message = message, details = details, secrets = secrets }
  local ctx = self
  return notify.send(cfg, body, { dry_run = self.dry_run,
    say = function(line) ctx:say("%s", line) end,
    warn = function(line) ctx:warn("%s", line) end,
    log = function(line) ctx:_log(line) end })
end

function Ctx:confirm(what)
  if self.yes then
    self:_log("confirmed by --yes: " .. what)
    return true
  end
  if self.dry_run then
    self:say("dry run: would ask: %s. Go ahead?", what)
    return true
  end
  if not host.isatty(io.stdin) then
    error(errors.new{ kind = "aborted", message = ("not confirmed: %s"):format(what),
      hint = "no terminal to ask on: run again with --yes to confirm" }, 0)
  end
  io.stdout:write(clock(), " ", what, ". Go ahead? [y/N] ")
  io.stdout:flush()
  local answer = io.read("l") or ""
  local yes = answer:match("^%s*[yY]") ~= nil
  self:_log(("asked: %s -> %s"):format(what, yes and "yes" or "no"))
  return yes
end

function Ctx:command(argv, opts)
  opts = opts or {}
  local spec = {}
  for i, a in ipairs(argv) do spec[i] = a end
  for k, v in pairs(argv) do if type(k) ~= "number" then spec[k] = v end end
  for k, v in pairs(opts) do if k ~= "writes" then spec[k] = v end end
  local shown = proc.quote(spec)
  if opts.writes and self.dry_run then
    self:say("dry run: %s", mask(shown))
    return true, "dry-run", 0, "", ""
  end
  self:_log("run " .. mask(shown))
  return proc.run(spec)
end

-- Report tables live in the journal (JSON), so columns with a format
-- function are rendered here, into plain cells, while the functions exist.
local function plain_table(columns, rows)
  local formatted = false
  for _, c in ipairs(columns) do
    if type(c) == "table" and c.format then formatted = true end
  end
  if not formatted then return columns, rows end
  local titles, cells = {}, {}
  for j, c in ipairs(columns) do titles[j] = type(c) == "table" and (c[2] or c[1]) or c end
  for i, row in ipairs(rows) do
    cells[i] = {}
    for j, c in ipairs(columns) do
      local key = type(c) == "table" and c[1] or c
      local v = row[j]
      if v == nil then v = row[key] end
      if type(c) == "table" and c.format then v = c.format(v) end
      cells[i][j] = v
    end
  end
  return titles, cells
end

function Ctx:report_table(title, columns, rows)
  assert(self.step, "ctx:report_table outside a step")
  local rec = self._record
  rec.tables = rec.tables or {}
  columns, rows = plain_table(columns, rows)
  local t = { title = title, columns = columns, rows = rows }
  for i, old in ipairs(rec.tables) do
    if old.title == title then rec.tables[i] = t return end
  end
  rec.tables[#rec.tables + 1] = t
end

function Ctx:run_watchers(force)
  if self._in_watch then return end
  for _, d in ipairs(self._watchdogs or {}) do d:drain(self) end
  local now = host.monotonic()
  for _, w in ipairs(self.playbook.watchers) do
    if not w.process and (force or now >= w.next_due) then
      self._in_watch = true
      local ok, res, err = pcall(w.run, self)
      self._in_watch = false
      local interval = type(w.interval) == "function" and w.interval(self) or w.interval
      w.next_due = host.monotonic() + interval
      if not ok and errors.is_interrupt(res) then error(res, 0) end -- Ctrl-C or the guard: as they are
      if not ok or (res == nil and err ~= nil) then
        local e = ok and err or res
        error(errors.new{ kind = "watch", where = w.name,
          message = ("watcher %s stopped the run: %s"):format(w.name, tostring(e)) }, 0)
      end
    end
  end
end

function Ctx:sleep(seconds)
  local deadline = host.monotonic() + seconds
  while true do
    self:run_watchers()
    local now = host.monotonic()
    if now >= deadline then return end
    local wait = deadline - now
    for _, w in ipairs(self.playbook.watchers) do
      if not w.process then wait = math.min(wait, math.max(0.01, w.next_due - now)) end
    end
    host.sleep(wait)
  end
end

function context.new(P, fields)
  local ctx = fields
  ctx._dbs, ctx._cleared = {}, {}
  ctx.playbook = P
  -- ctx.print: a line printer to hand to library calls (say = ctx.print)
  ctx.print = function(line) Ctx.say(ctx, "%s", line) end
  return setmetatable(ctx, {
    __name = Ctx.__name,
    __index = function(t, k)
      if SERVERS[k] then
        local d, err = Ctx.connect(t, k)
        if not d then error(err, 2) end
        return d
      end
      return Ctx[k]
    end,
  })
end

context.Context = Ctx
return context
