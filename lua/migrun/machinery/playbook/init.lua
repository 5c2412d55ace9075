--[[
migrun.playbook: the machinery every playbook stands on, so that a playbook is
only named steps calling the library. It owns the command line, the journal
(resume), --dry-run, --from/--only, confirmation, watchers, progress, the log
and the report (state_dir/report.md, the latest run's; every run's kept as
state_dir/reports/<started>-<playbook>.md).

  local playbook = require "migrun.playbook"
  local P = playbook.new{ name = "full", title = "The whole two-phase migration",
    main = true,                 -- the migration's main playbook (see below)
    args = { { "slot", "a slot of this migration, e.g. dms_slot_02" } }, -- positional
    section = function(args) return "partial_restart-" .. args.slot end,
    new_section_after = "catch_up", -- once that step is done, the next run gets "<section>-2"
  }
  P:step{ "preflight", "Preflight on all three servers",
    always = true,                                    -- reruns even when done
    destructive = function(ctx) return "truncate 12 tables on the target" end, -- or nil
    run = function(ctx) ... return facts end,         -- or nil, err: the step fails
    dry_run = function(ctx) return "would verify ..." end, -- optional: what a dry run
                                  -- prints instead of running (a line, or a list of them)
    check = function(ctx, facts) return true end,     -- or nil, "what no longer matches"
  }
  P:watch{ "wal_guard", interval = 30,                -- seconds, or function(ctx) -> seconds
           run = function(ctx) ... end }              -- raising or nil, err stops the run
  P:watch{ "guard", process = { module = "migrun.guard", job = function(ctx) ... end } }
      -- a watcher in a process of its own, checking while any step runs and
      -- stopping it (interrupted, left resumable): migrun.playbook.watchdog
  P:then_run{ "main", fresh_journal = true,           -- after a successful run: the main
    carry = function(ctx) return { "schema" } end }   -- playbook again (see below)
  os.exit(P:main(arg))

The main playbook. One playbook of a migration is its main one (the stock
full.lua): the others (cutover, the restarts, the console) read what it found
out by ctx.main, never by a file or playbook name, so a team can copy full.lua
to billing.lua, name it "billing", and everything follows it. Its run records
its name and script path in the journal.

Command line (P:main(argv) -> exit code, see playbook.EXIT), parsed by
migrun.playbook.cli from one declaration (and --help generated from it):
  --config FILE (default ./migration.lua)  --state-dir DIR (default: the config's)
  --dry-run  --from STEP  --only STEP  --yes  --list  --help   and positional args.
  Exit codes: 0 ok, 1 a step (or a check, or a watcher) failed, 2 usage or
  configuration error, 3 not confirmed / aborted, 4 another migrun holds the
  state directory.

One run at a time, and never against a killed one (migrun.playbook.sessions):
a run takes state_dir/lock (host.lock; another migrun holding it: exit 4),
then, before its first step (before its watchers and checks too), ends on
each server what an earlier run of the migration left working there: a
killed run's backends go on with their CREATE INDEX, TRUNCATE or COPY after
their client died. It finds them by application_name: every session of a
run, its pool workers' and its pg_dump's included, is named
migrun/<config name>/<run id>[/<role>] (the run id is also the journal's
runs[i].id), and ends them with pg_terminate_backend, waiting until they are
gone (sessions.TIMEOUT); each one is said (pid, what it ran, since when). One
that cannot be ended fails the run before anything ran. A dry run says what
it would end, and ends nothing.

Resume: done steps are skipped after their check passes ("skipped preflight:
done 12:01:03"); every check runs before any step does, and a failing one
stops the run. running/failed steps rerun, and see what they recorded before
(ctx.facts[ctx.step]); `always` steps rerun with fresh facts. --from S reruns S
and everything after it (the steps before must be done); --only S runs just S.

then_run: after every step succeeded (not for --dry-run, --only, --list), the
journal, report and log are set aside into state_dir/attempt-<n>/, a fresh
journal starts with the main playbook's steps named by carry(ctx) done as
they were, and the main playbook's script runs as a child of this migrun
(with the same --config, --state-dir and --yes; it dies with its parent); its
exit status is this playbook's.

The step context (migrun.playbook.context; one per run; passed to run, check
and watchers)
  ctx.config, ctx.dry_run, ctx.yes, ctx.args (ctx.args.slot: by declared name),
  ctx.state_dir, ctx.resuming, ctx.playbook, ctx.step (the running step),
  ctx.run_id (this run's id: its sessions are named migrun/<name>/<run id>),
  ctx.plan (the names of the steps this run runs),
  ctx.journal, ctx.main (the main playbook's name, or nil before it ran)
  ctx.source / ctx.replica / ctx.target   migrun.db wrappers, connected on first
      use; an unreachable server raises an error naming it and its config key.
  ctx:connect(name) -> Db | nil, err      the same, without raising
  ctx:dms() -> migrun.dms client (config.dms; dry run and call echo)
  ctx.facts[step] -> facts of that step (this playbook); ctx:facts_of(playbook);
      ctx:main_facts() -> the main playbook's facts by step ({} before it ran)
      Facts come back from the journal as JSON values: LSNs and other
      values JSON cannot hold as their tostring, secrets masked.
  ctx:record(key, value)   into the running step's facts, journal saved at once
  ctx:record{ key = value, ... }   several facts, one save
  ctx:record_changes{ path, ... }   parts of the facts changed in place, each a
      list of keys into them ({"chunks", "public.t", "done", "7"}): each saved
      alone, at the cost of its value rather than of the whole journal
  ctx:record_main(step, key, value)  into a step of the main playbook (a task
      replaced by a partial restart); nothing is written in a dry run
  ctx:began(step [, playbook]) -> whether it has begun (running, failed or done)
  ctx:done(step [, playbook]) -> whether the journal has that step done;
      ctx:main_done(step) -> the same for the main playbook
  ctx:say(fmt, ...), ctx:warn(fmt, ...)   timestamped lines, also in state_dir/migrun.log
  ctx.print                a line printer (function(line)) to hand to library calls
  ctx:progress{ label =, total =, unit =, interval = } -> migrun.playbook.progress bar
  ctx:confirm(what) -> true | false
  ctx:command(argv, opts) -> ok, how, code, stdout, stderr (proc.run);
      opts.writes = true: in a dry run printed, not run
  ctx:report_table(title, columns, rows)   shown under the step in the report;
      columns { key, title } and rows of records keyed by column key, or
      positional rows (migrun.text.markdown)
  ctx:sleep(seconds)        runs due watchers while waiting
  ctx:notify(event, message [, details])   a notification (config notify;
      migrun.playbook.notify): the runner sends step_failed and run_failed
  ctx:first_time(what)      true the first time this run sees `what` (say a thing once)
  ctx:sample_slots(kind [, extra])   the slots' lag into samples.jsonl

Watching a run from elsewhere (migrun.playbook.live): the progress bars save
state_dir/progress.json, playbooks/status.lua reads it with the journal and
the lock; with config metrics.listen a child serves OpenMetrics for the
run's length (migrun.playbook.metrics); state_dir/report.html is written
beside report.md (migrun.playbook.html).
]]
local host = require "migrun.host"
local proc = require "migrun.proc"
local errors = require "migrun.error"
local text = require "migrun.text"
local cli = require "migrun.playbook.cli"
local config = require "migrun.playbook.config"
local context = require "migrun.playbook.context"
local journal = require "migrun.playbook.journal"
local report = require "migrun.playbook.report"
local html = require "migrun.playbook.html"
local metrics = require "migrun.playbook.metrics"
local watchdog = require "migrun.playbook.watchdog"
local sessions = require "migrun.playbook.sessions"
local live = require "migrun.playbook.live"
local pg = require "migrun.pg"

local playbook = {}

playbook.EXIT = { ok = 0, failed = 1, usage = 2, aborted = 3, locked = 4 }
local EXIT = playbook.EXIT

---------------------------------------------------------------------------
-- Declaring a playbook
---------------------------------------------------------------------------

local Playbook = {}
Playbook.__index = Playbook
Playbook.__name = "migrun.playbook.Playbook"

function playbook.new(opts)
  assert(type(opts) == "table" and type(opts.name) == "string", "playbook.new{ name = ..., title = ... }")
  assert(opts.args == nil or type(opts.args) == "table", "playbook.new: args = { {name, help}, ... } expected")
  return setmetatable({ name = opts.name, declared_name = opts.name, title = opts.title or opts.name,
                        is_main = opts.main and true or false, arg_specs = opts.args or {},
                        min_args = opts.min_args, section = opts.section,
                        new_section_after = opts.new_section_after,
                        steps = {}, by_name = {}, watchers = {}, args = {} }, Playbook)
end

function Playbook:step(spec)
  local name, title = spec[1] or spec.name, spec[2] or spec.title
  assert(type(name) == "string" and name:match("^[%w_%-]+$"), "step: a name of letters, digits, _ and - expected")
  assert(not self.by_name[name], "step: " .. name .. " declared twice")
  assert(type(spec.run) == "function", "step " .. name .. ": run = function(ctx) expected")
  assert(spec.dry_run == nil or type(spec.dry_run) == "function" or type(spec.dry_run) == "string",
    "step " .. name .. ": dry_run = function(ctx) or a string expected")
  local step = { name = name, title = title or name, run = spec.run, check = spec.check,
                 always = spec.always and true or false, destructive = spec.destructive,
                 dry_run = spec.dry_run }
  self.steps[#self.steps + 1] = step
  self.by_name[name] = step
  return step
end

function Playbook:watch(spec)
  local name = spec[1] or spec.name
  assert(type(name) == "string", "watch: a name expected")
  assert(type(spec.run) == "function" or (type(spec.process) == "table" and type(spec.process.module) == "string"
    and type(spec.process.job) == "function"),
    "watch " .. name .. ": run = function(ctx) or process = { module =, job = function(ctx) } expected")
  local w = { name = name, interval = spec.interval or 30, run = spec.run, process = spec.process, next_due = 0,
              notify_as = spec.notify_as }
  self.watchers[#self.watchers + 1] = w
  return w
end

function Playbook:then_run(spec)
  assert(type(spec) == "table" and spec[1] == "main", 'then_run{ "main", ... } expected')
  assert(spec.carry == nil or type(spec.carry) == "function", "then_run: carry = function(ctx) expected")
  self.after = { fresh_journal = spec.fresh_journal and true or false, carry = spec.carry }
end

---------------------------------------------------------------------------
-- The command line
---------------------------------------------------------------------------

local OPTIONS = {
  { "--config", "FILE", "the migration's configuration", default = "migration.lua" },
  { "--state-dir", "DIR", "journal, report and log (default: state_dir of the config)" },
  { "--dry-run", nil, "run the reads, print every write, change nothing" },
  { "--from", "STEP", "rerun STEP and every step after it" },
  { "--only", "STEP", "run STEP only" },
  { "--yes", nil, "do destructive steps without asking" },
  { "--list", nil, "list the steps with their status in the journal" },
}

function Playbook:cli_spec()
  return { usage = "migrun " .. (self.script or (self.name .. ".lua")), about = self.title,
           options = OPTIONS, args = self.arg_specs, min_args = self.min_args }
end

function Playbook:help()
  local lines = { "steps:" }
  for i, s in ipairs(self.steps) do
    local notes = {}
    if s.always then notes[#notes + 1] = "always runs" end
    if s.destructive then notes[#notes + 1] = "asks before destructive work" end
    lines[#lines + 1] = ("  %2d. %-20s %s%s"):format(i, s.name, s.title,
      #notes > 0 and " (" .. table.concat(notes, ", ") .. ")" or "")
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "exit status: 0 done, 1 a step failed, 2 usage or configuration error, " ..
                      "3 not confirmed, 4 state directory in use"
  return cli.help(self:cli_spec(), table.concat(lines, "\n"))
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
  local spec = self:cli_spec()
  -- --list and --help need no positional argument
  for _, a in ipairs(argv) do
    if a == "--list" or a == "--help" or a == "-h" then spec.min_args = 0 end
  end
  local opts, err = cli.parse(spec, argv)
  if not opts then return nil, err end
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
-- Running
---------------------------------------------------------------------------

local function traceback(e)
  if type(e) == "table" or type(e) == "userdata" then return e end
  return debug.traceback(tostring(e), 2)
end

-- An error as one line for the terminal and the journal: without the
-- traceback a raised string carries (that goes to the log), and with the
-- lines of a multi-line message (the places the AWS credential chain looked)
-- joined rather than cut.
local function one_line(e)
  local s = tostring(e)
  s = s:gsub("\nstack traceback:.*$", "")
  s = s:gsub(":%s*\n%s*%-?%s*", ": ")
  s = s:gsub("%s*\n%s*%-?%s*", "; ")
  return s
end

-- Runs fn(...) protected; -> true, results... | false, err (err keeps its traceback text for the log)
local function protect(fn, ...)
  return xpcall(fn, traceback, ...)
end

local function is_file(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

function Playbook:_finish_report(ctx, run)
  local md = report.render{ playbook = self, journal = ctx.journal, run = run,
                              config_path = ctx.config.config_path, state_dir = ctx.state_dir }
  if ctx.dry_run then
    io.stdout:write("\n", md)
    return
  end
  -- Every run keeps its own report (a failure's is not replaced by the next
  -- playbook's refusal): reports/<started>-<playbook>.md; report.md is the latest.
  local dir = ctx.state_dir .. "/reports"
  local stamp = tostring(run.started_at or journal.timestamp()):gsub("[-:]", "")
  local kept = ("%s/%s-%s.md"):format(dir, stamp, self.name)
  local n = 1
  while is_file(kept) do
    n = n + 1
    kept = ("%s/%s-%s-%d.md"):format(dir, stamp, self.name, n)
  end
  local ok, err = journal.make_dir(dir)
  if ok then ok, err = host.write_file(kept, md, journal.FILE_MODE) end
  if not ok then ctx:warn("could not keep this run's report in %s: %s", dir, tostring(err)) end
  local path = ctx.state_dir .. "/report.md"
  local latest, lerr = host.write_file(path, md, journal.FILE_MODE)
  if latest then
    ctx:say("report: %s%s", path, ok and (" (this run's: reports/" .. kept:match("[^/]+$") .. ")") or "")
  else
    ctx:warn("could not write the report: %s", tostring(lerr))
  end
end

-- report.html: the whole migration from the journal and samples.jsonl, for a browser
function Playbook:_finish_html(ctx)
  if ctx.dry_run then return end
  local okr, page = pcall(html.render, { journal = ctx.journal, playbook = self, state_dir = ctx.state_dir,
                                         config = ctx.config })
  local path = ctx.state_dir .. "/report.html"
  local ok, err = okr, page
  if okr then ok, err = host.write_file(path, page, journal.FILE_MODE) end
  if ok then ctx:say("report: %s", path) else ctx:warn("could not write the HTML report: %s", one_line(err)) end
end

-- The notification of a run that failed: the failed step's, or the run's.
function Playbook:_notify_failure(ctx, run, failure)
  ctx.step = run.failed_step
  pcall(ctx.notify, ctx, run.failed_step and "step_failed" or "run_failed", one_line(failure),
    { step = run.failed_step, run_started_at = run.started_at })
  ctx.step = nil
end

-- config metrics.listen: the OpenMetrics server, a child for this run's length
function Playbook:_start_metrics(ctx, run)
  local m = ctx.config.metrics
  if ctx.dry_run or not (m and m.listen) then return nil end
  local server, err = metrics.start{ listen = m.listen, interval = m.interval, state_dir = ctx.state_dir,
    source = ctx.config.source.conninfo, prefix = ctx.config.slots.prefix, migration = ctx.config.name,
    guard = ctx.config.wal_guard }
  if not server then
    ctx:warn("metrics: %s; the run goes on without them", one_line(err))
    return nil
  end
  run.metrics = server.url
  ctx:say("metrics: %s", server.url)
  return server
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

-- The journal section of this run: the declared name, or section(args) and,
-- once its new_section_after step is done there, "<section>-2", "-3", ...
function Playbook:_section(J, args)
  if not self.section then return self.declared_name end
  local base = self.section(args)
  local n = 1
  while true do
    local name = n == 1 and base or ("%s-%d"):format(base, n)
    local rec = self.new_section_after and J:steps(name)[self.new_section_after]
    if not (rec and rec.status == "done") then return name end
    n = n + 1
  end
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  return assert(host.cwd()) .. "/" .. path
end

-- The identity of this run's sessions (set for every connection this
-- process makes from now on), and what ctx.sessions needs to end an earlier
-- run's: -> ctx.sessions, or nil and the pid of the migrun holding the state
-- directory (a dry run does not take the lock: the sessions of the run that
-- holds it are that run's own).
local function name_sessions(cfg, state_dir, dry_run, run_id)
  local own = sessions.identity(cfg.name, run_id, dry_run)
  pg.identity(own)
  if dry_run then
    local lock = live.lock_state(state_dir)
    if lock.held and lock.alive ~= false then return nil, lock.pid or "?" end
  end
  return { prefix = sessions.prefix(cfg.name), own = own }
end

function Playbook:main(argv)
  local previous = pg.identity()
  local code = self:_main(argv)
  pg.identity(previous or false)
  return code
end

-- A run, in phases: the command line and the configuration, the state
-- directory, the run's context and record, the steps, then the ending.
function Playbook:_main(argv)
  local S, code = self:_read_command(argv)
  if not S then return code end
  if S.opts.list then return self:_list(S) end
  code = self:_open_state(S)
  if code then return code end
  local ctx, run = self:_begin_run(S)
  if not ctx then return run end
  local failure
  code, failure = self:_run(ctx, S.opts, run)
  for _, w in ipairs(ctx._watchdogs or {}) do w:drain(ctx) w:close() end
  return self:_end_run(S, ctx, run, code, failure)
end

-- The command line and the configuration; children's environment set. ->
-- S = { opts, cfg, plain, state_dir, dry_run } | nil, exit code
function Playbook:_read_command(argv)
  argv = argv or {}
  local plain = {}
  for i = 1, #argv do plain[i] = argv[i] end
  self.script = argv[0]
  local opts, perr = self:parse(plain)
  if not opts then stderr("migrun: " .. tostring(perr)) return nil, EXIT.usage end
  if opts.help then io.stdout:write(self:help()) return nil, EXIT.ok end
  self.args = opts.args

  local cfg, cerr = config.load(opts.config)
  if not cfg then stderr("migrun: " .. tostring(cerr)) return nil, EXIT.usage end
  -- Children (pg_dump, psql, workers) get what they need passed explicitly;
  -- the secrets this run holds are never inherited.
  proc.withhold(playbook.withheld_env(cfg))
  local allowed, aerr = pcall(proc.allow, cfg.children_env) -- beyond the allow-list: docs/environment.md
  if not allowed then
    stderr("migrun: children_env: " .. tostring(aerr):gsub("^bad argument #1 to '[%w.]+' %((.*)%)$", "%1")
      .. " (" .. (cfg.config_path or "the configuration") .. ")")
    return nil, EXIT.usage
  end
  return { opts = opts, cfg = cfg, plain = plain, dry_run = opts.dry_run and true or false,
           state_dir = opts.state_dir and absolute(opts.state_dir) or cfg.state_dir }
end

function Playbook:_list(S)
  local J, jerr = journal.open(S.state_dir, { read_only = true })
  if not J then stderr("migrun: " .. tostring(jerr)) return EXIT.usage end
  self.name = self.section and #S.opts.args > 0 and self:_section(J, S.opts.args) or self.declared_name
  io.stdout:write(self:list(J))
  return EXIT.ok
end

-- The state directory locked (not for a dry run), its journal open, of this
-- migration, this playbook's section named. -> nil | an exit code
function Playbook:_open_state(S)
  local state_dir, cfg = S.state_dir, S.cfg
  if not S.dry_run then
    local ok, err = journal.make_dir(state_dir)
    if not ok then stderr("migrun: state directory: " .. tostring(err)) return EXIT.usage end
    S.lock, err = host.lock(state_dir .. "/lock")
    if not S.lock then
      stderr(("migrun: %s is in use: %s"):format(state_dir, tostring(err)))
      return EXIT.locked
    end
  end
  local J, jerr = journal.open(state_dir, { read_only = S.dry_run })
  if not J then stderr("migrun: " .. tostring(jerr)) return EXIT.usage end
  if J.data.migration and J.data.migration ~= cfg.name then
    stderr(("migrun: %s belongs to the migration %q, the config names %q: use another state_dir")
      :format(state_dir, J.data.migration, cfg.name))
    return EXIT.usage
  end
  J.data.migration = cfg.name
  self.name = self:_section(J, S.opts.args)
  if self.is_main then
    local recorded = J.data.main
    if recorded and recorded.playbook ~= self.name then
      stderr(("migrun: the main playbook of %s is %q (%s), this one is %q: use another state_dir, "
        .. "or name this playbook %q"):format(state_dir, recorded.playbook, tostring(recorded.script),
        self.name, recorded.playbook))
      return EXIT.usage
    end
    J.data.main = { playbook = self.name, script = self.script and absolute(self.script) or nil }
  end
  S.journal = J
  return nil
end

-- The run's context (its log, the facts so far), its record in the journal,
-- its sessions named, the metrics server. -> ctx, run | nil, exit code
function Playbook:_begin_run(S)
  local J, cfg, dry_run, state_dir = S.journal, S.cfg, S.dry_run, S.state_dir
  local run_id = sessions.run_id()
  local named, holder = name_sessions(cfg, state_dir, dry_run, run_id)
  local ctx = context.new(self, {
    config = cfg, dry_run = dry_run, yes = S.opts.yes and true or false, args = S.opts.args,
    state_dir = state_dir, journal = J, resuming = J:done_count(self.name) > 0, facts = {},
    main = J.data.main and J.data.main.playbook or nil, run_id = run_id, sessions = named,
  })
  if not dry_run then
    local logpath = state_dir .. "/migrun.log"
    local f = io.open(logpath, "r")
    if f then f:close() else host.write_file(logpath, "", journal.FILE_MODE) end
    ctx._logfile = io.open(logpath, "a")
  end
  for name, rec in pairs(J:steps(self.name)) do ctx.facts[name] = rec.facts or {} end

  local run = { id = run_id, playbook = self.name, started_at = journal.timestamp(), dry_run = dry_run or nil,
                argv = S.plain, outcome = "running", ran = {}, skipped = {} }
  if not dry_run then
    J.data.runs[#J.data.runs + 1] = run
    local ok, err = J:save()
    if not ok then stderr("migrun: " .. tostring(err)) return nil, EXIT.failed end
  end
  ctx:say("%s: %s (migration %s)%s", self.name, self.title, cfg.name, dry_run and ", DRY RUN" or "")
  ctx:_log(("this run's sessions are named %s"):format(pg.application_name()))
  if holder then
    ctx:say("dry run: migrun pid %s holds %s: the sessions of this migration are its own, none would be ended",
      holder, state_dir)
  end
  S.metrics_server = self:_start_metrics(ctx, run)
  return ctx, run
end

-- After the steps: the run recorded, a failure said and notified, the
-- reports written, then what runs next (then_run). -> exit code
function Playbook:_end_run(S, ctx, run, code, failure)
  local J, dry_run = S.journal, S.dry_run
  run.ended_at = journal.timestamp()
  run.outcome = code == EXIT.ok and "ok" or code == EXIT.aborted and "aborted" or "failed"
  run.error = failure and one_line(failure) or nil
  if failure then
    ctx:_emit("FAILED: " .. one_line(failure), true)
    if type(failure) == "string" and failure:find("\n") then ctx:_log(failure) end
  end
  if not dry_run then J:save() end
  if failure and code == EXIT.failed then self:_notify_failure(ctx, run, failure) end
  self:_finish_report(ctx, run)
  self:_finish_html(ctx)
  if S.metrics_server then S.metrics_server:close() end
  if code == EXIT.ok then ctx:say("%s: done", self.name) end
  local next_run
  if code == EXIT.ok and self.after and not S.opts.only then
    local okp, planned = protect(self._plan_next, self, ctx, S.opts)
    if not okp or not planned then
      ctx:_emit("FAILED: " .. one_line(okp and "no main playbook to run" or planned), true)
      code = EXIT.failed
    else
      next_run = planned
    end
  end
  for _, d in pairs(ctx._dbs) do d:close() end
  if ctx._logfile then ctx._logfile:close() ctx._logfile = nil end
  if next_run and not dry_run then
    local okn, nerr = self:_begin_next(ctx, next_run)
    if not okn then
      stderr("migrun: " .. tostring(nerr))
      if S.lock then S.lock:unlock() end
      return EXIT.failed
    end
  end
  if S.lock then S.lock:unlock() end
  if next_run then return self:_run_next(ctx, next_run) end
  return code
end

-- The environment variables no child of a playbook inherits: the AWS
-- secrets and the variables the configuration read.
playbook.SECRET_ENV = { "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
  "MIGRUN_DMS_EMULATOR_SECRET" }
function playbook.withheld_env(cfg)
  local names = { table.unpack(playbook.SECRET_ENV) }
  for _, n in ipairs(cfg.env_read or {}) do names[#names + 1] = n end
  return names
end

-- then_run: what comes next -> { argv =, carry = { step names } }
function Playbook:_plan_next(ctx, opts)
  local main = ctx.journal.data.main
  if not (main and main.script) then
    error(errors.new{ kind = "usage", message = "the journal names no main playbook to run again",
      hint = "run the migration's main playbook (playbooks/full.lua) itself" }, 0)
  end
  -- the main playbook again, in the worker (host.worker_spec): whatever program hosts this run
  local args = { main.script, "--config", absolute(ctx.config.config_path or opts.config) }
  if opts.state_dir then args[#args + 1], args[#args + 2] = "--state-dir", ctx.state_dir end
  if opts.yes then args[#args + 1] = "--yes" end
  if ctx.dry_run then args[#args + 1] = "--dry-run" end
  local argv, werr = host.worker_spec(args)
  if not argv then error(werr, 0) end
  local carry = self.after.carry and self.after.carry(ctx) or {}
  if ctx.dry_run then
    ctx:say("dry run: would set the journal, report and log aside into %s/attempt-<n>/%s, then run %s",
      ctx.state_dir, #carry > 0 and (", carrying " .. table.concat(carry, ", ") .. " of " .. main.playbook) or "",
      proc.quote(argv))
  end
  return { argv = argv, carry = carry, main = main }
end

-- then_run, with the state directory still locked: the attempt set aside, a
-- fresh journal with the carried steps.
function Playbook:_begin_next(ctx, next_run)
  if not self.after.fresh_journal then return true end
  local old = ctx.journal
  local aside, err = journal.set_aside(ctx.state_dir)
  if aside == nil then return nil, err end
  if not aside then return true end
  ctx:say("the previous attempt's journal, report and log are in %s", aside)
  local J, jerr = journal.open(ctx.state_dir)
  if not J then return nil, jerr end
  J.data.migration, J.data.main = old.data.migration, old.data.main
  local from = old:steps(next_run.main.playbook)
  local carried = {}
  for _, name in ipairs(next_run.carry) do
    local rec = from[name]
    if rec and rec.status == "done" then
      local copy = J:step(next_run.main.playbook, name)
      for k, v in pairs(rec) do copy[k] = v end
      copy.facts = copy.facts or {}
      copy.facts.carried_from = aside
      carried[#carried + 1] = name
    end
  end
  local ok, serr = J:save()
  if not ok then return nil, serr end
  if #carried > 0 then
    ctx:say("the new journal starts with %s's %s done", next_run.main.playbook, table.concat(carried, ", "))
  end
  return true
end

-- then_run: the main playbook as a child that dies with this migrun; its exit code.
function Playbook:_run_next(ctx, next_run)
  if ctx.dry_run then return EXIT.ok end
  io.stdout:write(os.date("%H:%M:%S "), "starting again from the beginning: ", proc.quote(next_run.argv), "\n")
  io.stdout:flush()
  -- the next playbook is migrun again: it needs the secrets the children don't
  local env = {}
  for k, v in pairs(next_run.argv.env) do env[k] = v end -- the worker's (its Lua paths)
  for _, name in ipairs(proc.withheld()) do env[name] = os.getenv(name) or false end
  local spec = { die_with_parent = true, env = env, inherit_env = true }
  for i, a in ipairs(next_run.argv) do spec[i] = a end
  local h, err = proc.spawn(spec)
  if not h then
    stderr("migrun: " .. tostring(err))
    return EXIT.failed
  end
  local ok, how, code = h:wait()
  h:close()
  if ok then return EXIT.ok end
  return how == "exit" and code or EXIT.failed
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
  ctx.plan = {}
  for _, p in ipairs(plan) do if p.action == "run" then ctx.plan[#ctx.plan + 1] = p.step.name end end

  -- What an earlier run left working on the servers ends before anything of
  -- this one runs (its watchers included).
  local cleared, cerr = ctx:clear_earlier()
  if not cleared then return EXIT.failed, cerr end

  -- Watchers in a process of their own start first; their first check
  -- (before any step) may stop the run.
  ctx._watchdogs = {}
  for _, w in ipairs(self.watchers) do
    if w.process then
      local d, derr = watchdog.start(ctx, w)
      if not d then return EXIT.failed, derr end
      ctx._watchdogs[#ctx._watchdogs + 1] = d
      if d:stopped() then return EXIT.failed, d:stopped() .. " Nothing was run." end
    end
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
      local stop = self:_guard_stop(ctx, 0)
      if stop then return EXIT.failed, stop end
    end
  end
  return EXIT.ok
end

-- A process watcher's stop message, if one stopped (waiting up to timeout s for its line).
function Playbook:_guard_stop(ctx, timeout)
  for _, d in ipairs(ctx._watchdogs or {}) do
    local m = d:stopped(timeout)
    d:drain(ctx)
    if m then return m end
  end
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
  local body = s.run
  if ctx.dry_run and s.dry_run then
    body = function(c)
      local said = s.dry_run
      if type(said) == "function" then said = said(c) end
      for _, line in ipairs(type(said) == "table" and said or { said }) do c:say("dry run: %s", line) end
      return {}
    end
  end
  -- A process watcher's stop interrupts the body only (armed): the runner's
  -- bookkeeping around it is never cut in half.
  local armed = #(ctx._watchdogs or {}) > 0
  local ok, res, err = protect(function(c)
    if armed then host.arm_stop(true) end
    return body(c)
  end, ctx)
  if armed then host.arm_stop(false) end
  local failure
  if not ok then
    failure = res
  elseif res == nil and err ~= nil then
    failure = err
  elseif type(res) == "table" and getmetatable(res) == nil then
    for k, v in pairs(res) do ctx.facts[s.name][k] = v end
  end
  if failure and errors.is(failure) and failure.kind == "guard" then
    -- the guard's own words; handles the interrupted body left behind (a
    -- pg_restore, a worker) are collected now, which ends their processes
    failure = self:_guard_stop(ctx, 10) or failure
    collectgarbage()
    collectgarbage()
  end
  -- a bar of work that did not finish says where it stopped, never "done"
  if ctx._bar then
    if failure then ctx._bar:abandon() else ctx._bar:finish() end
    ctx._bar = nil
  end
  local now = host.now()
  ctx.step, ctx._record = nil, nil
  if ctx.dry_run then
    if failure then run.failed_step = s.name return EXIT.failed, failure end
    ctx:say("%s: dry run done (%s)", s.name, text.duration(now - t0))
    return EXIT.ok
  end
  rec.facts = ctx.facts[s.name]
  set_status(rec, failure and "failed" or "done", t0, now, failure)
  if failure then run.failed_step = s.name end
  local saved, serr = J:save()
  if failure then return EXIT.failed, ("%s failed: %s"):format(s.name, tostring(failure)) end
  if not saved then return EXIT.failed, serr end
  ctx:say("%s: done in %s", s.name, text.duration(rec.duration))
  return EXIT.ok
end


playbook.Playbook = Playbook
playbook.Context = context.Context
return playbook
