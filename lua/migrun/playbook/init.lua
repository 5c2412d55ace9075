--[[
migrun.playbook: the machinery every playbook stands on, so that a playbook is
only named steps calling the library. It owns the command line, the journal
(resume), --dry-run, --from/--only, confirmation, watchers, progress, the log
and the report.

  local playbook = require "migrun.playbook"
  local P = playbook.new{ name = "full", title = "The whole two-phase migration",
                          args = "[<slot>]" }          -- positional args, for --help
  P:step{ "preflight", "Preflight on all three servers",
    always = true,                                    -- reruns even when done
    destructive = function(ctx) return "truncate 12 tables on the target" end, -- or nil
    run = function(ctx) ... return facts end,         -- or nil, err: the step fails
    check = function(ctx, facts) return true end,     -- or nil, "what no longer matches"
  }
  P:watch{ "wal_guard", interval = 30,                -- seconds, or function(ctx) -> seconds
           run = function(ctx) ... end }              -- raising or nil, err stops the run
  os.exit(P:main(arg))

Command line (P:main(argv) -> exit code, see playbook.EXIT)
  --config FILE (default ./migration.lua)  --state-dir DIR (default: the config's)
  --dry-run  --from STEP  --only STEP  --yes  --list  --help   and positional args.
  Exit codes: 0 ok, 1 a step (or a check, or a watcher) failed, 2 usage or
  configuration error, 3 not confirmed / aborted, 4 another migrun holds the
  state directory.

Resume: done steps are skipped after their check passes ("skipped preflight:
done 12:01:03"); every check runs before any step does, and a failing one
stops the run. running/failed steps rerun, and see what they recorded before
(ctx.facts[ctx.step]); `always` steps rerun with fresh facts. --from S reruns S
and everything after it (the steps before must be done); --only S runs just S.

The step context (one per run; passed to run, check and watchers)
  ctx.config, ctx.dry_run, ctx.yes, ctx.args, ctx.state_dir, ctx.resuming,
  ctx.playbook, ctx.step (name of the running step), ctx.journal
  ctx.source / ctx.replica / ctx.target   migrun.db wrappers, connected on first
      use; an unreachable server raises an error naming it and its config key.
  ctx:connect(name) -> Db | nil, err      the same, without raising
  ctx:dms() -> migrun.dms client (config.dms; dry run and call echo)
  ctx.facts[step] -> facts of that step (this playbook); ctx:facts_of(playbook)
      Facts come back from the journal as JSON values: LSNs and other
      values JSON cannot hold as their tostring, secrets masked.
  ctx:record(key, value)   into the running step's facts, journal saved at once
  ctx:done(step [, playbook]) -> whether the journal has that step done
  ctx:say(fmt, ...), ctx:warn(fmt, ...)   timestamped lines, also in state_dir/migrun.log
  ctx:progress{ label =, total =, unit =, interval = } -> migrun.playbook.progress bar
  ctx:confirm(what) -> true | false
  ctx:command(argv, opts) -> ok, how, code, stdout, stderr (proc.run);
      opts.writes = true: in a dry run printed, not run
  ctx:report_table(title, columns, rows)   shown under the step in the report
  ctx:sleep(seconds)        runs due watchers while waiting
]]
local host = require "migrun.host"
local proc = require "migrun.proc"
local pg = require "migrun.pg"
local db = require "migrun.db"
local errors = require "migrun.error"
local config = require "migrun.playbook.config"
local journal = require "migrun.playbook.journal"
local progress = require "migrun.playbook.progress"
local report = require "migrun.playbook.report"
local text = require "migrun.text"
local aws = require "migrun.aws"

local playbook = {}

playbook.EXIT = { ok = 0, failed = 1, usage = 2, aborted = 3, locked = 4 }
local EXIT = playbook.EXIT

local SERVERS = { source = true, replica = true, target = true }

---------------------------------------------------------------------------
-- Declaring a playbook
---------------------------------------------------------------------------

local Playbook = {}
Playbook.__index = Playbook
Playbook.__name = "migrun.playbook.Playbook"

function playbook.new(opts)
  assert(type(opts) == "table" and type(opts.name) == "string", "playbook.new{ name = ..., title = ... }")
  return setmetatable({ name = opts.name, title = opts.title or opts.name, usage_args = opts.args,
                        steps = {}, by_name = {}, watchers = {}, args = {} }, Playbook)
end

function Playbook:step(spec)
  local name, title = spec[1] or spec.name, spec[2] or spec.title
  assert(type(name) == "string" and name:match("^[%w_%-]+$"), "step: a name of letters, digits, _ and - expected")
  assert(not self.by_name[name], "step: " .. name .. " declared twice")
  assert(type(spec.run) == "function", "step " .. name .. ": run = function(ctx) expected")
  local step = { name = name, title = title or name, run = spec.run, check = spec.check,
                 always = spec.always and true or false, destructive = spec.destructive }
  self.steps[#self.steps + 1] = step
  self.by_name[name] = step
  return step
end

function Playbook:watch(spec)
  local name = spec[1] or spec.name
  assert(type(name) == "string", "watch: a name expected")
  assert(type(spec.run) == "function", "watch " .. name .. ": run = function(ctx) expected")
  local w = { name = name, interval = spec.interval or 30, run = spec.run, next_due = 0 }
  self.watchers[#self.watchers + 1] = w
  return w
end

---------------------------------------------------------------------------
-- The command line
---------------------------------------------------------------------------

local OPTIONS = {
  { "--config", "FILE", "the migration's configuration (default: ./migration.lua)" },
  { "--state-dir", "DIR", "journal, report and log (default: state_dir of the config)" },
  { "--dry-run", nil, "run the reads, print every write, change nothing" },
  { "--from", "STEP", "rerun STEP and every step after it" },
  { "--only", "STEP", "run STEP only" },
  { "--yes", nil, "do destructive steps without asking" },
  { "--list", nil, "list the steps with their status in the journal" },
  { "--help", nil, "this help" },
}

function Playbook:help()
  local lines = { ("usage: migrun %s [options]%s"):format(self.script or (self.name .. ".lua"),
                                                        self.usage_args and " " .. self.usage_args or ""),
                  "", self.title, "", "steps:" }
  for i, s in ipairs(self.steps) do
    local notes = {}
    if s.always then notes[#notes + 1] = "always runs" end
    if s.destructive then notes[#notes + 1] = "asks before destructive work" end
    lines[#lines + 1] = ("  %2d. %-20s %s%s"):format(i, s.name, s.title,
      #notes > 0 and " (" .. table.concat(notes, ", ") .. ")" or "")
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "options:"
  for _, o in ipairs(OPTIONS) do
    lines[#lines + 1] = ("  %-20s %s"):format(o[1] .. (o[2] and " " .. o[2] or ""), o[3])
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "exit status: 0 done, 1 a step failed, 2 usage or configuration error, " ..
                      "3 not confirmed, 4 state directory in use"
  return table.concat(lines, "\n") .. "\n"
end

local function usage_error(message)
  return errors.new{ kind = "usage", message = message }
end

function Playbook:step_names()
  local names = {}
  for _, s in ipairs(self.steps) do names[#names + 1] = s.name end
  return table.concat(names, ", ")
end

-- argv -> opts | nil, err
function Playbook:parse(argv)
  local opts = { config = "migration.lua", args = {} }
  local takes = {}
  for _, o in ipairs(OPTIONS) do takes[o[1]] = o[2] ~= nil end
  local i = 1
  while i <= #argv do
    local a = argv[i]
    local name, value = a:match("^(%-%-[%w-]+)=(.*)$")
    name = name or a
    if a == "--" then
      for j = i + 1, #argv do opts.args[#opts.args + 1] = argv[j] end
      break
    elseif name:sub(1, 2) == "--" then
      if takes[name] == nil then
        return nil, usage_error(("unknown option %s (see --help)"):format(name))
      end
      local key = name:sub(3):gsub("-", "_")
      if takes[name] then
        if value == nil then
          i = i + 1
          value = argv[i]
          if value == nil then return nil, usage_error(name .. " needs a value") end
        end
        opts[key] = value
      else
        if value then return nil, usage_error(name .. " takes no value") end
        opts[key] = true
      end
    else
      opts.args[#opts.args + 1] = a
    end
    i = i + 1
  end
  for _, key in ipairs{ "from", "only" } do
    if opts[key] and not self.by_name[opts[key]] then
      return nil, usage_error(("--%s %s: no such step; the steps are: %s"):format(
        key, opts[key], self:step_names()))
    end
  end
  if opts.from and opts.only then return nil, usage_error("--from and --only cannot be combined") end
  return opts
end

---------------------------------------------------------------------------
-- The step context
---------------------------------------------------------------------------

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

local mask = journal.mask

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
  })
  self._dbs[name] = wrapped
  return wrapped
end

function Ctx:dms()
  if self._dms then return self._dms end
  local dms = require "migrun.dms"
  local c = self.config.dms
  local ctx = self
  local client, err = dms.client{ region = c.region, endpoint_url = c.endpoint_url, dry_run = self.dry_run,
    on_call = function(line)
      if ctx.dry_run then ctx:say("dry run: %s", line) else ctx:_log(line) end
    end }
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

function Ctx:record(key, value)
  assert(self.step, "ctx:record outside a step")
  local facts = self.facts[self.step]
  facts[key] = value
  self._record.facts = facts
  if not self.dry_run then
    local ok, err = self.journal:save()
    if not ok then error(err, 0) end
  end
end

function Ctx:progress(opts)
  local ctx = self
  local bar = progress.new{ label = opts.label, total = opts.total, unit = opts.unit,
    interval = opts.interval, tty = opts.tty,
    say = function(line) ctx:_emit(line) end,
    on_tick = function() ctx:run_watchers() end }
  self._bar = bar
  return bar
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

function Ctx:report_table(title, columns, rows)
  assert(self.step, "ctx:report_table outside a step")
  local rec = self._record
  rec.tables = rec.tables or {}
  local t = { title = title, columns = columns, rows = rows }
  for i, old in ipairs(rec.tables) do
    if old.title == title then rec.tables[i] = t return end
  end
  rec.tables[#rec.tables + 1] = t
end

function Ctx:run_watchers(force)
  if self._in_watch then return end
  local now = host.monotonic()
  for _, w in ipairs(self.playbook.watchers) do
    if force or now >= w.next_due then
      self._in_watch = true
      local ok, res, err = pcall(w.run, self)
      self._in_watch = false
      local interval = type(w.interval) == "function" and w.interval(self) or w.interval
      w.next_due = host.monotonic() + interval
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
      wait = math.min(wait, math.max(0.01, w.next_due - now))
    end
    aws.sleep(wait)
  end
end

local function new_ctx(P, fields)
  local ctx = fields
  ctx._dbs = {}
  ctx.playbook = P
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

---------------------------------------------------------------------------
-- Running
---------------------------------------------------------------------------

local function traceback(e)
  if type(e) == "table" or type(e) == "userdata" then return e end
  return debug.traceback(tostring(e), 2)
end

local function one_line(e)
  local s = tostring(e)
  if type(e) == "string" then s = s:match("^[^\n]*") end
  return s
end

-- Runs fn(...) protected; -> true, results... | false, err (err keeps its traceback text for the log)
local function protect(fn, ...)
  return xpcall(fn, traceback, ...)
end

function Playbook:_finish_report(ctx, run)
  local text = report.render{ playbook = self, journal = ctx.journal, run = run,
                              config_path = ctx.config.config_path, state_dir = ctx.state_dir }
  if ctx.dry_run then
    io.stdout:write("\n", text)
    return
  end
  local path = ctx.state_dir .. "/report.md"
  local ok, err = host.write_file(path, text, 384)
  if ok then ctx:say("report: %s", path) else ctx:warn("could not write the report: %s", tostring(err)) end
end

function Playbook:list(J)
  local steps = J:steps(self.name)
  local lines = {}
  for i, s in ipairs(self.steps) do
    local r = steps[s.name] or {}
    local status = r.status or "pending"
    local when = r.ended_at or r.started_at or ""
    lines[#lines + 1] = ("%2d. %-20s %-8s %-20s %s"):format(i, s.name, status, when, s.title)
  end
  return table.concat(lines, "\n") .. "\n"
end

local function stderr(line) io.stderr:write(line, "\n") end

local function set_status(rec, status, t0, now, err)
  rec.status = status
  rec.ended_at = journal.timestamp(now)
  rec.duration = math.floor((now - t0) * 10 + 0.5) / 10
  rec.error = err and one_line(err) or nil
end

function Playbook:main(argv)
  argv = argv or {}
  local plain = {}
  for i = 1, #argv do plain[i] = argv[i] end
  self.script = argv[0]
  local opts, perr = self:parse(plain)
  if not opts then stderr("migrun: " .. tostring(perr)) return EXIT.usage end
  if opts.help then io.stdout:write(self:help()) return EXIT.ok end
  self.args = opts.args

  local cfg, cerr = config.load(opts.config)
  if not cfg then stderr("migrun: " .. tostring(cerr)) return EXIT.usage end
  local state_dir = cfg.state_dir
  if opts.state_dir then
    state_dir = opts.state_dir:sub(1, 1) == "/" and opts.state_dir
                or assert(host.cwd()) .. "/" .. opts.state_dir
  end

  if opts.list then
    local J, jerr = journal.open(state_dir, { read_only = true })
    if not J then stderr("migrun: " .. tostring(jerr)) return EXIT.usage end
    io.stdout:write(self:list(J))
    return EXIT.ok
  end

  local dry_run = opts.dry_run and true or false
  local lock
  if not dry_run then
    local ok, err = true, nil
    local prefix = ""
    for part in state_dir:gmatch("[^/]+") do -- the parents too, like mkdir -p
      prefix = prefix .. "/" .. part
      ok, err = host.mkdir(prefix, 448) -- 0700
      if not ok then break end
    end
    if not ok then stderr("migrun: state directory: " .. tostring(err)) return EXIT.usage end
    lock, err = host.lock(state_dir .. "/lock")
    if not lock then
      stderr(("migrun: %s is in use: %s"):format(state_dir, tostring(err)))
      return EXIT.locked
    end
  end
  local J, jerr = journal.open(state_dir, { read_only = dry_run })
  if not J then stderr("migrun: " .. tostring(jerr)) return EXIT.usage end
  if J.data.migration and J.data.migration ~= cfg.name then
    stderr(("migrun: %s belongs to the migration %q, the config names %q: use another state_dir")
      :format(state_dir, J.data.migration, cfg.name))
    return EXIT.usage
  end
  J.data.migration = cfg.name

  local ctx = new_ctx(self, {
    config = cfg, dry_run = dry_run, yes = opts.yes and true or false, args = opts.args,
    state_dir = state_dir, journal = J, resuming = J:done_count(self.name) > 0, facts = {},
  })
  if not dry_run then
    local logpath = state_dir .. "/migrun.log"
    local f = io.open(logpath, "r")
    if f then f:close() else host.write_file(logpath, "", 384) end
    ctx._logfile = io.open(logpath, "a")
  end
  local steps = J:steps(self.name)
  for name, rec in pairs(steps) do ctx.facts[name] = rec.facts or {} end

  local run = { playbook = self.name, started_at = journal.timestamp(), dry_run = dry_run or nil,
                argv = plain, outcome = "running", ran = {}, skipped = {} }
  if not dry_run then
    J.data.runs[#J.data.runs + 1] = run
    local ok, err = J:save()
    if not ok then stderr("migrun: " .. tostring(err)) return EXIT.failed end
  end
  ctx:say("%s: %s (migration %s)%s", self.name, self.title, cfg.name, dry_run and ", DRY RUN" or "")

  local code, failure = self:_run(ctx, opts, run)

  run.ended_at = journal.timestamp()
  run.outcome = code == EXIT.ok and "ok" or code == EXIT.aborted and "aborted" or "failed"
  run.error = failure and one_line(failure) or nil
  if failure then
    ctx:_emit("FAILED: " .. one_line(failure), true)
    if type(failure) == "string" and failure:find("\n") then ctx:_log(failure) end
  end
  if not dry_run then J:save() end
  self:_finish_report(ctx, run)
  if code == EXIT.ok then ctx:say("%s: done", self.name) end
  for _, d in pairs(ctx._dbs) do d:close() end
  if ctx._logfile then ctx._logfile:close() ctx._logfile = nil end
  if lock then lock:unlock() end
  return code
end

-- Decides and runs; -> exit code, failure (message or error value) | nil
function Playbook:_run(ctx, opts, run)
  local J = ctx.journal
  local steps = J:steps(self.name)
  local plan = {}       -- { step =, action = "run" | "skip" }
  local from_index = opts.from and self:_index(opts.from)
  for i, s in ipairs(self.steps) do
    local rec = steps[s.name]
    local done = rec and rec.status == "done"
    local action
    if opts.only then
      action = s.name == opts.only and "run" or nil
    elseif from_index then
      if i >= from_index then
        action = "run"
      elseif not done then
        return EXIT.usage, ("--from %s: the earlier step %s is not done (%s)"):format(
          opts.from, s.name, rec and rec.status or "never run")
      else
        action = "skip"
      end
    else
      action = (done and not s.always) and "skip" or "run"
    end
    if action then plan[#plan + 1] = { step = s, action = action } end
  end

  -- Every check first: nothing runs when the world no longer matches.
  local ok, err = protect(function() ctx:run_watchers(true) end)
  if not ok then return EXIT.failed, err end
  for _, p in ipairs(plan) do
    if p.action == "skip" then
      local rec = steps[p.step.name]
      if p.step.check then
        ctx.step = p.step.name
        local ok2, res, why = protect(p.step.check, ctx, rec.facts or {})
        ctx.step = nil
        if not ok2 or not res then
          local reason = ok2 and (why or "check failed") or res
          return EXIT.failed, ("%s was done (%s), but its check fails: %s; nothing was run"):format(
            p.step.name, rec.ended_at or "?", one_line(reason))
        end
      end
      ctx:say("skipped %s: done %s", p.step.name, rec.ended_at or "")
      run.skipped[#run.skipped + 1] = p.step.name
    end
  end

  for _, p in ipairs(plan) do
    if p.action == "run" then
      local code, failure = self:_run_step(ctx, p.step, run)
      if code ~= EXIT.ok then return code, failure end
      local okw, werr = protect(function() ctx:run_watchers() end)
      if not okw then return EXIT.failed, werr end
    end
  end
  return EXIT.ok
end

function Playbook:_index(name)
  for i, s in ipairs(self.steps) do if s.name == name then return i end end
end

function Playbook:_run_step(ctx, s, run)
  local J = ctx.journal
  local steps = J:steps(self.name)
  local rec = steps[s.name] or {} -- into the journal when it starts running
  -- an interrupted attempt's facts stay visible; a step done before starts afresh
  if rec.status == "done" or rec.status == nil then
    ctx.facts[s.name] = {}
    rec.tables = nil
  else
    ctx.facts[s.name] = rec.facts or {}
  end
  ctx.step, ctx._record = s.name, rec

  if s.destructive then
    local okd, what = protect(s.destructive, ctx)
    if not okd then ctx.step = nil return EXIT.failed, what end
    if what then
      local okc, yes = protect(ctx.confirm, ctx, what)
      if not okc then
        ctx.step = nil
        return errors.is(yes) and yes.kind == "aborted" and EXIT.aborted or EXIT.failed, yes
      end
      if not yes then
        ctx.step = nil
        return EXIT.aborted, ("%s: not confirmed, nothing done"):format(s.name)
      end
    end
  end

  local t0 = host.now()
  ctx:say("%s: %s", s.name, s.title)
  if not ctx.dry_run then
    rec.status, rec.started_at, rec.ended_at, rec.duration, rec.error = "running", journal.timestamp(t0), nil, nil, nil
    rec.facts = ctx.facts[s.name]
    steps[s.name] = rec
    local ok, err = J:save()
    if not ok then return EXIT.failed, err end
  end
  run.ran[#run.ran + 1] = s.name
  local ok, res, err = protect(s.run, ctx)
  if ctx._bar then ctx._bar:finish() ctx._bar = nil end
  local failure
  if not ok then
    failure = res
  elseif res == nil and err ~= nil then
    failure = err
  elseif type(res) == "table" and getmetatable(res) == nil then
    for k, v in pairs(res) do ctx.facts[s.name][k] = v end
  end
  local now = host.now()
  ctx.step, ctx._record = nil, nil
  if ctx.dry_run then
    if failure then return EXIT.failed, failure end
    ctx:say("%s: dry run done (%s)", s.name, text.duration(now - t0))
    return EXIT.ok
  end
  rec.facts = ctx.facts[s.name]
  set_status(rec, failure and "failed" or "done", t0, now, failure)
  local saved, serr = J:save()
  if failure then return EXIT.failed, ("%s failed: %s"):format(s.name, tostring(failure)) end
  if not saved then return EXIT.failed, serr end
  ctx:say("%s: done in %s", s.name, text.duration(rec.duration))
  return EXIT.ok
end

playbook.Playbook = Playbook
playbook.Context = Ctx
return playbook
