--[[
migrun.playbook.watchdog: watchers that run in a process of their own (the
WAL guard), so that they keep checking while a step is blocked for hours in
one statement, a child process or a sleep. The runner starts one per process
watcher before any step and closes it when the run ends.

  P:watch{ "guard", interval = 30, process = { module = "migrun.guard",
           job = function(ctx) return { ... } end } }

The child is the worker (host.worker_spec) running
`-e "require(module).main()"`, given job(ctx) as JSON on stdin (never on
argv), dying with migrun, with the environment a child that connects to
PostgreSQL needs: migrun.proc's allow-list and libpq's variables
(proc.LIBPQ_ENV: a passfile, SSL settings), never a password or the AWS keys
(the job carries the conninfos; the guard calls no AWS API).
It writes one JSON line per check on stdout ({ level = "ok"|"warn"|"stop",
message, ... }), prints its warnings itself, and on a stop asks migrun to
stop (SIGUSR1): while a step runs the runner keeps it armed (host.arm_stop),
so the step is interrupted with an error of kind "guard", whose message the
runner replaces with the child's. This state listens to its own guard only
(host.listen_stop with the guard's pid): in a host running several states,
another state's guard never stops this one.

  watchdog.start(ctx, w) -> Watchdog | nil, err    waits for the first check
  Watchdog.last           the last line ({ level, message, ... })
  Watchdog:stopped([timeout]) -> message | nil     the child's stop message:
      collects what it wrote (waiting up to timeout seconds, default 0)
  Watchdog:drain(ctx)     the levels reached (warn, stop) as ctx:notify events
                          "<notify_as or name>_warn" / "_stop", once each while they last
  Watchdog:close()
]]
local host = require "migrun.host"
local proc = require "migrun.proc"
local errors = require "migrun.error"
local json = require "migrun.json"

local watchdog = {}

local Watchdog = {}
Watchdog.__index = Watchdog

local FIRST_CHECK_TIMEOUT = 120

function watchdog.start(ctx, w)
  local job = w.process.job(ctx)
  local self = setmetatable({ name = w.name, lines = {}, stderr = {}, events = {} }, Watchdog)
  host.listen_stop(true)
  local spec, err = host.worker_spec{ "-e", ("require(%q).main()"):format(w.process.module),
    stdin = json.encode(job), die_with_parent = true, env = { table.unpack(proc.LIBPQ_ENV) },
    stdout = function(line)
      local v = json.decode(line) -- nil for a line that is not JSON
      if type(v) == "table" then
        self.last = v
        if v.level == "stop" then self.stop_message = v.message end
        -- a level reached is a notification, once (not every check while it lasts);
        -- sent later, at a safe point (Watchdog:drain), not from inside a wait
        if v.level ~= "ok" and v.level ~= self.notified then
          self.events[#self.events + 1] = { event = (w.notify_as or w.name) .. "_" .. v.level, message = v.message,
            details = { held_bytes = v.held_bytes, rate = v.rate, eta_stop = v.eta_stop, eta_full = v.eta_full,
              warn_bytes = v.warn_bytes, stop_bytes = v.stop_bytes, keep_bytes = v.keep_bytes,
              slots_at_risk = v.slots_at_risk } }
        end
        self.notified = v.level ~= "ok" and v.level or nil
      end
    end }
  local h
  if spec then h, err = proc.spawn(spec) end
  if not h then
    host.listen_stop(false)
    return nil, errors.new{ kind = "watch", where = w.name, message = ("cannot start the %s: %s"):format(w.name,
      tostring(err)) }
  end
  self.h = h
  host.listen_stop(true, h.pid)
  -- the first check, before any step runs: a stop now stops the run at once
  local deadline = host.monotonic() + FIRST_CHECK_TIMEOUT
  while not self.last do
    local _, how, code = h:wait(0.1)
    if how ~= "timeout" then
      if self.last then break end
      self:close()
      return nil, errors.new{ kind = "watch", where = w.name,
        message = ("the %s ended before its first check (%s %s)"):format(w.name, tostring(how), tostring(code)) }
    end
    if host.monotonic() > deadline then
      self:close()
      return nil, errors.new{ kind = "watch", where = w.name,
        message = ("the %s made no check within %d s"):format(w.name, FIRST_CHECK_TIMEOUT) }
    end
  end
  return self
end

function Watchdog:stopped(timeout)
  if not self.stop_message and self.h then
    -- the child writes its line, then signals, then exits: reading to its end
    local _, how = self.h:wait(timeout or 0)
    if how ~= "timeout" then self.h:close() self.h = nil end
  end
  return self.stop_message
end

-- The levels reached since the last drain, as notifications (ctx:notify).
function Watchdog:drain(ctx)
  local events = self.events
  self.events = {}
  for _, e in ipairs(events) do ctx:notify(e.event, e.message, e.details) end
end

function Watchdog:close()
  if self.h then
    self.h:close()
    self.h = nil
  end
  host.listen_stop(false)
end

return watchdog
