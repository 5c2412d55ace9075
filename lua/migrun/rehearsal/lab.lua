-- migrun.rehearsal.lab: the local rehearsal lab. lab.start{} builds, under one temporary
-- directory, three real PostgreSQL clusters on 127.0.0.1 that stand in for the
-- runbook's machines: a source primary configured for pglogical, a streaming hot
-- standby of it (the maintenance replica) and a separate target (RDS). Every
-- process goes through migrun.proc; the servers run as the unprivileged
-- `postgres` user when migrun runs as root. The lab owns its servers and its
-- directory: L:stop(), <close> or garbage collection stops them and removes it.
--
--   local lab = require "migrun.rehearsal.lab"
--   local L <close> = assert(lab.start{})
--   print(L.source.conninfo)       --> host=127.0.0.1 port=41234 dbname=app user=postgres
local proc = require "migrun.proc"
local host = require "migrun.host"
local errors = require "migrun.error"
local lsn = require "migrun.lsn"
local pgbin = require "migrun.pgbin"
local pgversion = require "migrun.pgversion"
local faults = require "migrun.rehearsal.faults"

local lab = {}

local HOST = "127.0.0.1"
local SUPERUSER = "postgres"
local ROLE = "migrun" -- the password-authenticated role (L.password)

local has_socket, socket = pcall(require, "socket")

---------------------------------------------------------------------------
-- Small helpers
---------------------------------------------------------------------------

local function lab_error(where, message, detail, extra)
  local e = { kind = "lab", where = where, message = message, detail = detail }
  for k, v in pairs(extra or {}) do e[k] = v end
  return errors.new(e)
end

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

local sleep = host.sleep

local now = host.monotonic

local read_file = host.read_file

local function is_file(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- The last n lines of text.
local function last_lines(text, n)
  n = n or 20
  local lines = {}
  for line in (text or ""):gmatch("[^\n]*") do lines[#lines + 1] = line end
  while #lines > 0 and lines[#lines] == "" do lines[#lines] = nil end
  return table.concat(lines, "\n", math.max(1, #lines - n + 1))
end

-- "exit 1" / "signal 9" / "timeout" from a proc wait result.
local function describe_exit(how, code)
  if how == "timeout" then return "timed out" end
  if how == "spawn" then return "could not be started" end
  return ("%s %s"):format(tostring(how), tostring(code))
end

-- A postgresql.conf value: numbers and booleans bare, anything else quoted.
local function conf_value(v)
  if type(v) == "number" then return tostring(v) end
  if type(v) == "boolean" then return v and "on" or "off" end
  return "'" .. tostring(v):gsub("\\", "\\\\"):gsub("'", "''") .. "'"
end

local function sql_literal(s)
  return "'" .. tostring(s):gsub("'", "''") .. "'"
end

local function sql_identifier(s)
  return '"' .. tostring(s):gsub('"', '""') .. '"'
end

-- Is process pid alive (a zombie counts as gone)?
local function pid_alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if not stat then return false end
  local state = stat:match("%) (%a)")
  return state ~= "Z" and state ~= "X"
end

-- Waits until none of the pids runs any more; false when one still does at
-- the deadline.
local function wait_gone(pids, deadline)
  for _, p in ipairs(pids) do
    while pid_alive(p) do
      if now() > deadline then return false, p end
      sleep(0.02)
    end
  end
  return true
end

-- Runs the jobs ({argv..., stdin=, env=, cwd=, timeout=}) at the same time and
-- waits for all of them; each result is { ok=, how=, code=, output= } where
-- output is stdout and stderr together.
local function run_all(jobs)
  local handles = {}
  for i, job in ipairs(jobs) do
    local spec = table.move(job, 1, #job, 1, {})
    spec.stdin = job.stdin or false -- false: /dev/null
    spec.env, spec.cwd = job.env, job.cwd
    spec.stdout, spec.stderr = "capture", "stdout"
    handles[i] = table.pack(proc.spawn(spec))
  end
  local results = {}
  for i, h in ipairs(handles) do
    if not h[1] then
      results[i] = { ok = nil, how = "spawn", output = tostring(h[2]) }
    else
      local ok, how, code = h[1]:wait(jobs[i].timeout)
      results[i] = { ok = ok, how = how, code = code,
                     output = (h[1].stdout or "") .. (h[1].stderr or "") }
      h[1]:close()
    end
  end
  return results
end

local function run1(job)
  return run_all{ job }[1]
end

-- A port nobody listens on now: ask the kernel for one (bind to port 0). Other
-- labs run on this machine at the same time, so a server start that still
-- loses the race is retried with another port (see Lab:_start_clusters).
local function free_port(taken)
  for _ = 1, 100 do
    local port
    if has_socket then
      local s = socket.bind(HOST, 0)
      if s then
        local _, p = s:getsockname()
        port = tonumber(p)
        s:close()
      end
    else
      port = math.random(20000, 30000)
    end
    if port and not taken[port] then
      taken[port] = true
      return port
    end
  end
  error("migrun.rehearsal.lab: no free port found")
end

-- The directory holding initdb, pg_ctl, postgres, psql, pg_basebackup of the
-- installed major version: pg_config --bindir, else the highest
-- /usr/lib/postgresql/<major>/bin. Never /usr/local (an unrelated build there
-- has no pglogical).
local function find_bindir(opts)
  local function usable(dir)
    return dir and not dir:match("^/usr/local/") and is_file(dir .. "/initdb")
      and is_file(dir .. "/postgres") and is_file(dir .. "/pg_ctl")
  end
  if opts.bindir then
    if usable(opts.bindir) then return opts.bindir end
    return nil, lab_error("lab", "no PostgreSQL server binaries in opts.bindir " .. opts.bindir)
  end
  for _, pg_config in ipairs{ "/usr/bin/pg_config", "pg_config" } do
    local ok, _, _, out = proc.run{ pg_config, "--bindir" }
    if ok and usable(trim(out or "")) then return trim(out) end
  end
  local ok, _, _, out = proc.run{ "ls", "-1", "/usr/lib/postgresql" }
  local best
  for major in (ok and out or ""):gmatch("[^\n]+") do
    local n = tonumber(major)
    if n and (not best or n > best) and usable(("/usr/lib/postgresql/%s/bin"):format(major)) then
      best = n
    end
  end
  if best then return ("/usr/lib/postgresql/%d/bin"):format(best) end
  return nil, lab_error("lab", "no PostgreSQL server found (pg_config --bindir, /usr/lib/postgresql/*/bin)",
    nil, { hint = "apt-get install postgresql-15 postgresql-15-pglogical" })
end

-- The environment of psql: the caller's PGOPTIONS, PGSERVICE... must not
-- change what the lab connects to or how.
local function psql_env(password)
  return { PGOPTIONS = false, PGSERVICE = false, PGSERVICEFILE = false, PGPASSFILE = false,
           PGSSLMODE = false, PGTARGETSESSIONATTRS = false, PGPASSWORD = password or false }
end

local function random_password()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(18)
  if f then f:close() end
  if not bytes then
    bytes = {}
    for i = 1, 18 do bytes[i] = string.char(math.random(0, 255)) end
    bytes = table.concat(bytes)
  end
  return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

---------------------------------------------------------------------------
-- Cluster: one server of the lab
---------------------------------------------------------------------------

local Cluster = {}
Cluster.__index = Cluster
Cluster.__name = "migrun.rehearsal.lab.Cluster"

function Cluster.__tostring(c)
  return ("migrun.rehearsal.lab %s %s (%s)"):format(c.name, c.conninfo, c:pid() and "running" or "stopped")
end

local function new_cluster(L, name)
  local c = setmetatable({
    lab = L, name = name, dbname = L.dbname,
    -- RDS keeps its superuser (rdsadmin) to itself; the lab's target names its
    -- bootstrap superuser the same, so a source role named postgres is an
    -- ordinary role there, as it would be on RDS.
    superuser = (name == "target" and L.rds_target) and lab.RDS_ADMIN or SUPERUSER,
    datadir = L.dir .. "/" .. name, logfile = L.dir .. "/" .. name .. ".log",
  }, Cluster)
  return c
end

-- port: the server's. The conninfos are the clients' way in: the server's
-- port, or its proxy's once it has one (Cluster:start_proxy); direct_* always
-- the server's (the lab's own psql, the replica's streaming, go direct).
function Cluster:_set_port(port)
  self.port = port
  local function conninfos(p)
    return ("host=%s port=%d dbname=%s user=%s"):format(HOST, p, self.dbname, self.superuser),
      ("postgresql://%s@%s:%d/%s"):format(self.superuser, HOST, p, self.dbname),
      -- The password-authenticated role: the password is in L.password / L.passfile, never here.
      ("host=%s port=%d dbname=%s user=%s"):format(HOST, p, self.dbname, ROLE)
  end
  self.direct_conninfo, self.direct_url, self.direct_migrun_conninfo = conninfos(port)
  self.conninfo, self.url, self.migrun_conninfo = conninfos(self.proxy and self.proxy.port or port)
end

-- A TCP proxy in front of the server (migrun.rehearsal.faults), from now on
-- in the cluster's conninfo, url and migrun_conninfo. Returns it (the same
-- one when it has one already) or nil, err.
function Cluster:start_proxy()
  if self.proxy then return self.proxy end
  local p, err = faults.proxy{ upstream_port = self.port, name = self.name,
    logfile = self.lab.dir .. "/" .. self.name .. "-proxy.log" }
  if not p then return nil, err end
  self.proxy = p
  self:_set_port(self.port)
  return p
end

-- Restarts the server: opts.mode "fast" (the default: sessions are ended,
-- a checkpoint, as RDS maintenance does) or "immediate" (no checkpoint, crash
-- recovery at the start: as a crash or a failover looks to the clients);
-- opts.down seconds between the stop and the start. With opts.after
-- (seconds from now) it happens in a child process and a Cue returns at once
-- (cue:wait() -> true | nil, err): the caller may be in a query meanwhile.
-- Without it, here and now: true | nil, err.
function Cluster:restart(opts)
  opts = opts or {}
  local mode = opts.mode or "fast"
  assert(mode == "fast" or mode == "immediate", "restart: mode \"fast\" or \"immediate\" expected")
  local stop = self:_server_job{ self.inst.bindir .. "/pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "30",
    "stop", timeout = 40 }
  if opts.after == nil then
    local r = run1(stop)
    if not r.ok and self:pid() then
      return nil, lab_error(self.name, "pg_ctl stop -m " .. mode .. " failed", last_lines(r.output, 10))
    end
    if opts.down then sleep(opts.down) end
    return self:start()
  end
  local start = self:_pg_ctl_start_job(60)
  start.retries, start.retry_delay = 25, 0.2 -- an immediate stop may leave shared memory behind a moment
  local cue, err = faults.cue({ { sleep = opts.after }, stop, { sleep = opts.down or 0 }, start },
    { logfile = self.lab.dir .. "/" .. self.name .. "-restart.log" })
  if not cue then return nil, err end
  self.lab._cues[#self.lab._cues + 1] = cue
  return cue
end

-- The postmaster's pid from postmaster.pid, or nil when it is not running.
function Cluster:pid()
  local text = read_file(self.datadir .. "/postmaster.pid")
  local pid = text and tonumber(text:match("^(%d+)"))
  if pid and pid_alive(pid) then return pid end
  return nil
end

-- The last n (default 30) lines of the server log.
function Cluster:log_tail(n)
  return last_lines(read_file(self.logfile) or "", n or 30)
end

-- Runs SQL with psql (as postgres, or as the password role with
-- {user="migrun"}); returns psql's unaligned, tuples-only output without the
-- final newline, or nil, err. opts: dbname, user, timeout.
function Cluster:psql(sql, opts)
  opts = opts or {}
  local user = opts.user or self.superuser
  local env = psql_env(user == ROLE and self.lab.password or nil)
  local r = run1{ self.lab.bin .. "/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
    "-h", HOST, "-p", tostring(self.port), "-U", user, "-d", opts.dbname or self.dbname,
    stdin = sql, env = env, timeout = opts.timeout or 60 }
  if r.ok then return (r.output:gsub("\n$", "")) end
  return nil, errors.new{ kind = "sql", where = ("%s %d"):format(self.name, self.port),
    message = trim(r.output) ~= "" and trim(r.output) or ("psql " .. describe_exit(r.how, r.code)) }
end

-- argv of one of this cluster's server programs (initdb, pg_ctl, postgres),
-- with the environment its installation needs, as the servers' owner.
function Cluster:_server_job(job)
  return self.lab:_as_owner(pgbin.argv(self.inst, job))
end

function Cluster:_pg_ctl_start_job(timeout)
  self._log_size = #(read_file(self.logfile) or "")
  return self:_server_job{ self.inst.bindir .. "/pg_ctl", "-D", self.datadir, "-l", self.logfile,
    "-w", "-t", tostring(timeout or 60), "start", timeout = (timeout or 60) + 10 }
end

-- What the server wrote to its log since the last start attempt.
function Cluster:_new_log()
  return (read_file(self.logfile) or ""):sub((self._log_size or 0) + 1)
end

function Cluster:_start_error(r)
  local detail = last_lines(self:_new_log(), 20)
  if detail == "" then detail = last_lines(r.output, 20) end
  return lab_error(self.name, ("server did not start on port %d (pg_ctl %s)"):format(
    self.port, describe_exit(r.how, r.code)), detail, { logfile = self.logfile })
end

-- Did the last start fail because the port is taken?
function Cluster:_port_taken()
  local log = self:_new_log()
  return log:find("could not bind", 1, true) or log:find("Address already in use", 1, true)
end

-- Starts the server (again, after :stop() or :kill()). Returns true or nil, err.
function Cluster:start(timeout)
  if self:pid() then return true end
  local deadline = now() + (timeout or 60)
  while true do
    local r = run1(self:_pg_ctl_start_job(timeout))
    if r.ok then return true end
    -- Right after :kill(), orphaned backends may still hold the old shared
    -- memory for a moment: wait and try again.
    local log = self:_new_log()
    if not (log:find("pre-existing shared memory block", 1, true) or log:find("lock file", 1, true))
        or now() > deadline then
      return nil, self:_start_error(r)
    end
    sleep(0.2)
  end
end

-- Stops the server (fast shutdown; SIGKILL when that does not finish).
-- Stopped means the postmaster's process is gone, not only its pid file:
-- the postmaster removes postmaster.pid (and pg_ctl -w returns) a moment
-- before it exits.
function Cluster:stop(timeout)
  local pid = self:pid()
  if not pid then return true end
  local r = run1(self:_server_job{ self.inst.bindir .. "/pg_ctl", "-D", self.datadir, "-m", "fast",
    "-w", "-t", tostring(timeout or 30), "stop", timeout = (timeout or 30) + 10 })
  if (r.ok or not self:pid()) and wait_gone({ pid }, now() + 10) then return true end
  local ok, err = self:_kill_postmaster(pid)
  if ok then return true end
  return nil, err
end

-- SIGKILLs the postmaster (a crash, for fault tests) and waits until it and
-- its children are gone, so :start() can follow at once.
function Cluster:kill()
  local pid = self:pid()
  if not pid then return true end
  return self:_kill_postmaster(pid)
end

-- SIGKILLs the postmaster pid and its children and waits until they are gone.
function Cluster:_kill_postmaster(pid)
  local pids = { pid }
  local r = run1{ "pgrep", "-P", tostring(pid) }
  for child in (r.ok and r.output or ""):gmatch("%d+") do pids[#pids + 1] = tonumber(child) end
  run1{ "kill", "-KILL", tostring(pid) }
  local gone, p = wait_gone(pids, now() + 15)
  if not gone then
    return nil, lab_error(self.name, ("process %d still alive after SIGKILL of the postmaster"):format(p))
  end
  return true
end

-- Is the server in recovery (a standby)?
function Cluster:in_recovery()
  local out, err = self:psql("select pg_is_in_recovery()")
  if not out then return nil, err end
  return out == "t"
end

-- Appends settings to postgresql.conf (later lines win).
function Cluster:_configure(settings, comment)
  local f = assert(io.open(self.datadir .. "/postgresql.conf", "a"))
  f:write("\n# ", comment or "migrun lab", "\n")
  local names = {}
  for k in pairs(settings) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do f:write(k, " = ", conf_value(settings[k]), "\n") end
  f:close()
end

-- Loopback only: trust, except the password role, which must authenticate.
function Cluster:_write_hba()
  local f = assert(io.open(self.datadir .. "/pg_hba.conf", "w"))
  f:write(([[
# migrun lab: loopback only. The role %s must give its password; everyone else is trusted.
local   all             all                             trust
local   replication     all                             trust
host    all             %s          127.0.0.1/32        scram-sha-256
host    replication     %s          127.0.0.1/32        scram-sha-256
host    all             all             127.0.0.1/32        trust
host    replication     all             127.0.0.1/32        trust
]]):format(ROLE, ROLE, ROLE))
  f:close()
end

---------------------------------------------------------------------------
-- Lab
---------------------------------------------------------------------------

local Lab = {}
Lab.__index = Lab
Lab.__name = "migrun.rehearsal.lab.Lab"

function Lab.__tostring(L)
  local parts = {}
  for _, c in ipairs(L.clusters) do parts[#parts + 1] = ("%s %s:%s"):format(c.name, HOST, tostring(c.port)) end
  return ("migrun.rehearsal.lab %s (%s)%s"):format(L.dir, table.concat(parts, ", "), L.stopped and " (stopped)" or "")
end

-- Stopping never raises: it runs from __gc and __close too.
local function finalize(L)
  if not L.stopped then pcall(L.stop, L) end
end
Lab.__close = finalize
Lab.__gc = finalize

-- argv run as the unprivileged owner of the lab when migrun runs as root.
function Lab:_as_owner(job)
  job.cwd = job.cwd or self.dir
  if not self.runas then return job end
  local wrapped = { "runuser", "-u", self.runas, "--" }
  table.move(job, 1, #job, 5, wrapped)
  for k, v in pairs(job) do
    if type(k) ~= "number" then wrapped[k] = v end
  end
  return wrapped
end

-- Stops every server (all at once) and removes the lab directory unless
-- opts.keep. Idempotent. Returns true, or nil, err when a server would not stop.
function Lab:stop()
  if self.stopped then return true end
  if self.dms then self.dms.process:close() end
  for _, cue in ipairs(self._cues or {}) do cue:close() end
  for _, c in ipairs(self.clusters) do
    if c.proxy then c.proxy:close() end
  end
  local first_err
  local jobs, running, postmasters = {}, {}, {}
  for _, c in ipairs(self.clusters) do
    local pid = c:pid()
    if pid then
      running[#running + 1], postmasters[#postmasters + 1] = c, pid
      jobs[#jobs + 1] = c:_server_job{ c.inst.bindir .. "/pg_ctl", "-D", c.datadir, "-m", "fast", "-w",
        "-t", "30", "stop", timeout = 40 }
    end
  end
  run_all(jobs)
  -- pg_ctl returns when the pid file is gone, a moment before the process is
  -- gone; one still there after that is killed like one pg_ctl could not stop
  wait_gone(postmasters, now() + 10)
  for i, c in ipairs(running) do
    if pid_alive(postmasters[i]) then
      local ok, err = c:_kill_postmaster(postmasters[i])
      if not ok then first_err = first_err or err end
    end
  end
  self.stopped = true
  for _, c in ipairs(self.clusters) do
    if c.disk and not first_err then
      local ok, err = c.disk:unmount()
      if not ok then first_err = err end
    end
  end
  if not self.keep and self._own_dir and not first_err then
    local r = run1{ "rm", "-rf", "--", self.dir }
    if not r.ok then
      first_err = lab_error("lab", "could not remove " .. self.dir, last_lines(r.output, 5))
    end
  end
  if first_err then return nil, first_err end
  return true
end

-- Waits until the replica has replayed everything the source has written so
-- far. Returns the source LSN it waited for, or nil, err (kind "timeout").
function Lab:wait_replica_caught_up(timeout)
  local src, err = self.source:psql("select pg_current_wal_lsn()")
  if not src then return nil, err end
  local want = lsn(src)
  local deadline = now() + (timeout or 30)
  local last
  while true do
    local got
    got, err = self.replica:psql("select pg_last_wal_replay_lsn()")
    if got and got ~= "" then
      last = lsn(got)
      if last >= want then return want end
    end
    if now() > deadline then
      return nil, errors.new{ kind = "timeout", where = "replica",
        message = ("replica has not replayed up to %s within %gs (replay at %s)"):format(
          tostring(want), timeout or 30, tostring(last or "?")),
        detail = err and tostring(err) or self.replica:log_tail(10) }
    end
    sleep(0.05)
  end
end

-- For a spec of the full load: the replica caught up with the source, its
-- replay paused (waited for: the pause is asynchronous), and its replay LSN
-- as text, or nil, err. Before 14 no function tells when replay has really
-- stopped: the pause counts once the replay LSN holds still for 0.2 s.
function Lab:pause_replica(timeout)
  local ok, err = self:wait_replica_caught_up(timeout)
  if not ok then return nil, err end
  ok, err = self.replica:psql("select pg_wal_replay_pause()")
  if not ok then return nil, err end
  local names = lsn.names(self.replica.version_num)
  local state_sql = names.wal_replay_pause_state and ("select %s()"):format(names.wal_replay_pause_state)
  local deadline = now() + (timeout or 30)
  local last
  while true do
    local state
    if state_sql then
      state, err = self.replica:psql(state_sql)
    else
      state, err = self.replica:psql("select pg_last_wal_replay_lsn()")
      if state and state == last then return state end
      last, state = state, nil
      sleep(0.2)
    end
    if state == "paused" then return self.replica:psql("select pg_last_wal_replay_lsn()") end
    if now() > deadline then
      return nil, errors.new{ kind = "timeout", where = "replica",
        message = ("replica did not pause within %gs (%s)"):format(timeout or 30, tostring(state or err)) }
    end
    sleep(0.05)
  end
end

-- Human-readable connection strings and psql commands (no password).
function Lab:describe()
  local lines = { ("migrun lab in %s (%s)"):format(self.dir, self.version or "PostgreSQL") }
  local roles = { source = "primary, pglogical", replica = "streaming hot standby (maintenance replica)",
                  target = self.rds_target and ("stands in for RDS (role %s: no superuser, in %s)"):format(ROLE,
                    lab.RDS_SUPERUSER) or "stands in for RDS" }
  for _, c in ipairs(self.clusters) do
    lines[#lines + 1] = ("  %-8s %s   -- %s, %s"):format(c.name, c.conninfo, pgversion.label(c.version_num),
      roles[c.name] or "")
    lines[#lines + 1] = "           " .. proc.quote{ self.bin .. "/psql", c.conninfo }
  end
  lines[#lines + 1] = ("  role %s authenticates with a password, kept in %s:"):format(ROLE, self.passfile)
  lines[#lines + 1] = "           " .. proc.quote{ "env", "PGPASSFILE=" .. self.passfile, self.bin .. "/psql",
    self.source.migrun_conninfo }
  lines[#lines + 1] = ("  logs: %s/{source,replica,target}.log"):format(self.dir)
  return table.concat(lines, "\n")
end

-- Creates the lab directory (owned by the server user) or fails.
function Lab:_make_dir(opts)
  local r
  if opts.dir then
    self.dir = opts.dir:gsub("/+$", "")
    r = run1{ "mkdir", "-p", "--", self.dir }
    if r.ok then
      local listing = run1{ "ls", "-A", "--", self.dir }
      if not listing.ok or trim(listing.output) ~= "" then
        return nil, lab_error("lab", "opts.dir is not an empty directory: " .. self.dir)
      end
    end
  else
    local parent = os.getenv("TMPDIR")
    if not parent or parent == "" then parent = "/tmp" end
    r = run1{ "mktemp", "-d", "-p", parent, "migrun-lab.XXXXXX" }
    if r.ok then self.dir = trim(r.output) end
  end
  if not r.ok then
    return nil, lab_error("lab", "could not create the lab directory", last_lines(r.output, 5))
  end
  self._own_dir = true -- from now on, stop() removes it (unless keep)
  if self.runas then
    r = run1{ "chown", self.runas .. ":", "--", self.dir }
    if not r.ok then return nil, lab_error("lab", "could not chown " .. self.dir, last_lines(r.output, 5)) end
  end
  return true
end

-- Starts source and target together, moving to another port when one was
-- taken between choosing it and binding it.
function Lab:_start_clusters(clusters)
  local pending = clusters
  for attempt = 1, 5 do
    local jobs = {}
    for i, c in ipairs(pending) do jobs[i] = c:_pg_ctl_start_job(60) end
    local results = run_all(jobs)
    local again = {}
    for i, c in ipairs(pending) do
      local r = results[i]
      if not r.ok then
        if attempt < 5 and c:_port_taken() then
          c:_set_port(free_port(self._ports))
          c:_configure({ port = c.port }, "migrun lab: port was taken, another one")
          again[#again + 1] = c
        else
          return nil, c:_start_error(r)
        end
      end
    end
    if #again == 0 then return true end
    pending = again
  end
  return true
end

-- The settings of each cluster. fsync=off and initdb/pg_basebackup --no-sync:
-- a lab is thrown away, durability would only make it slow.
function Lab:_settings(c, opts)
  local s = {
    listen_addresses = HOST, port = c.port, unix_socket_directories = self.dir,
    cluster_name = c.name, fsync = false, shared_buffers = "32MB",
    log_line_prefix = "%m [%p] %q%u@%d ",
    -- pg_hba asks the role migrun for SCRAM: 13 and older would store an md5 hash
    password_encryption = "scram-sha-256",
  }
  if c.name == "source" then
    -- As the runbook's prerequisite steps require (the values or higher).
    s.wal_level = "logical"
    s.shared_preload_libraries = "pglogical"
    s.track_commit_timestamp = true
    s.max_replication_slots = 20
    s.max_wal_senders = 20
    s.max_worker_processes = 20
    s.wal_sender_timeout = 0
    -- the replica can be stopped for a while without a slot
    if pgversion.has(c.version_num, "wal_keep_size") then
      s.wal_keep_size = "256MB"
    else
      s.wal_keep_segments = 16
    end
    if self.has_output_plugin_libraries then
      s.output_plugin_libraries = "pgoutput, test_decoding, pglogical"
    end
  elseif c.name == "replica" then
    s.hot_standby = true
    s.shared_preload_libraries = "" -- the maintenance replica does not need pglogical
  end
  -- Debian 11's 13 comes without its JIT's libLLVM (tools/install-pg-versions)
  if c.inst.origin ~= "system" then s.jit = false end
  for _, group in ipairs{ "all", c.name } do
    for k, v in pairs((opts.settings or {})[group] or {}) do s[k] = v end
  end
  return s
end

-- The role migrun on the target, as RDS gives its master user: no SUPERUSER
-- and no REPLICATION, but CREATEROLE, CREATEDB, the owner of the database, and
-- member of a group role standing in for rds_superuser (a few predefined pg_*
-- roles, and SET on session_replication_role, which RDS lets rds_superuser set
-- and DMS's afterConnectScript needs). Whatever migrun does on the target is
-- then proven to work without superuser. opts.target_superuser = true gives
-- the old superuser role instead (for tests of something else).
lab.RDS_SUPERUSER = "rds_superuser"
lab.RDS_ADMIN = "rdsadmin"

local function target_role_sql(password, dbname, superuser, version)
  local sql
  if superuser then
    sql = { ("create role %s login superuser replication password %s;"):format(sql_identifier(ROLE), sql_literal(password)) }
    if dbname ~= "postgres" then sql[2] = ("create database %s;"):format(sql_identifier(dbname)) end
    return sql
  end
  local group = sql_identifier(lab.RDS_SUPERUSER)
  -- lab.start refuses a target older than 15 with this role (Lab:_resolve)
  assert(pgversion.has(version, "set_on_parameter") and pgversion.has(version, "pg_checkpoint_role"))
  sql = {
    ("create role %s nologin;"):format(group),
    ("grant pg_monitor, pg_signal_backend, pg_read_all_settings, pg_checkpoint to %s;"):format(group),
    ("grant set on parameter session_replication_role to %s;"):format(group),
    ("create role %s login nosuperuser noreplication createdb createrole password %s in role %s;"):format(
      sql_identifier(ROLE), sql_literal(password), group),
  }
  if dbname ~= "postgres" then
    sql[#sql + 1] = ("create database %s owner %s;"):format(sql_identifier(dbname), sql_identifier(ROLE))
  end
  return sql
end

function Lab:_setup_sql(c, opts)
  local sql = { "set client_min_messages = warning;" }
  if c.name == "target" then
    for _, line in ipairs(target_role_sql(self.password, self.dbname, opts.target_superuser, c.version_num)) do
      sql[#sql + 1] = line
    end
  else
    sql[#sql + 1] = ("create role %s login superuser replication password %s;"):format(
      sql_identifier(ROLE), sql_literal(self.password))
    if self.dbname ~= "postgres" then
      sql[#sql + 1] = ("create database %s;"):format(sql_identifier(self.dbname))
    end
  end
  if self.dbname ~= "postgres" then
    sql[#sql + 1] = ("\\connect %s"):format(sql_identifier(self.dbname))
  end
  if c.name == "source" and opts.pglogical ~= false then
    sql[#sql + 1] = "create extension pglogical;"
  end
  return table.concat(sql, "\n") .. "\n"
end

function Lab:_psql_job(c, sql)
  return { self.bin .. "/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST,
    "-p", tostring(c.port), "-U", c.superuser, "-d", "postgres", stdin = sql, env = psql_env(), timeout = 60 }
end

-- Waits until the source has a streaming walsender for the replica.
function Lab:_wait_streaming(timeout)
  local deadline = now() + timeout
  while true do
    local n = self.source:psql("select count(*) from pg_stat_replication where state = 'streaming'")
    if n and tonumber(n) and tonumber(n) > 0 then return true end
    if now() > deadline then
      return nil, lab_error("replica", "replica is not streaming from the source", self.replica:log_tail(20),
        { logfile = self.replica.logfile })
    end
    sleep(0.05)
  end
end

-- The installation of each cluster (migrun.pgbin) and L.bin, the client
-- programs (psql, pg_basebackup, pg_recvlogical) used against all of them:
-- without opts.source and opts.target, all from find_bindir (15 -> 15, nothing
-- fetched); with them, each major from the system or the cache of
-- tools/install-pg-versions, and L.bin the default installation's (psql of
-- any major talks to servers of other majors; the npm servers have none).
function Lab:_resolve(opts)
  local default_bin, err = find_bindir(opts)
  local default = default_bin and { bindir = default_bin, origin = "system", pglogical = true, client_tools = true }
  local insts = {}
  for _, role in ipairs{ "source", "target" } do
    if opts[role] ~= nil then
      insts[role], err = pgbin.find(opts[role])
      if not insts[role] then return nil, err end
    elseif default then
      insts[role] = default
    else
      return nil, err
    end
  end
  self.bin = default_bin or (insts.source.client_tools and insts.source.bindir)
  if not self.bin then return nil, err end
  if opts.pglogical ~= false and not insts.source.pglogical then
    return nil, lab_error("source", ("PostgreSQL %s here (%s) has no pglogical: a source needs it"):format(
      tostring(insts.source.major), insts.source.origin), nil,
      { hint = "a source of 13 (tools/install-pg-versions 13) or 15 (tools/install-deps)" })
  end
  insts.replica = insts.source
  return insts
end

-- Each cluster's server version, and whether the source knows output_plugin_libraries.
function Lab:_versions(insts)
  local jobs, roles = {}, { "source", "target" }
  for i, role in ipairs(roles) do
    jobs[i] = pgbin.argv(insts[role], { insts[role].bindir .. "/postgres", "--version", timeout = 30 })
  end
  jobs[3] = self:_as_owner(pgbin.argv(insts.source, { insts.source.bindir .. "/postgres", "--describe-config",
    timeout = 30 }))
  local results = run_all(jobs)
  for i, role in ipairs(roles) do
    local text = trim(results[i].output or "")
    local v = results[i].ok and text:match("%(PostgreSQL%)%s+(%d+[%.%d]*)")
    if not v then
      return nil, lab_error(role, "cannot run " .. insts[role].bindir .. "/postgres --version", last_lines(text, 5))
    end
    local c = self[role]
    c.inst, c.version, c.version_num = insts[role], v, pgversion.number(v)
    c.version_text = text:gsub("^postgres %(", "("):gsub("^%(PostgreSQL%) ", "PostgreSQL ")
  end
  self.replica.inst, self.replica.version = insts.source, self.source.version
  self.replica.version_num, self.replica.version_text = self.source.version_num, self.source.version_text
  self.has_output_plugin_libraries = results[3].output:find("\noutput_plugin_libraries\t") ~= nil
    or results[3].output:find("^output_plugin_libraries\t") ~= nil
  self.version = self.source.version_text
  return true
end

function Lab:_build(opts)
  local t0 = now()
  local insts, err = self:_resolve(opts)
  if not insts then return nil, err end

  local id = run1{ "id", "-u" }
  if id.ok and trim(id.output) == "0" then
    self.runas = opts.user or SUPERUSER
  end
  local ok
  ok, err = self:_make_dir(opts)
  if not ok then return nil, err end

  -- The password of the role migrun, in a passfile only the caller reads.
  self.passfile = self.dir .. "/pgpass"
  local f = assert(io.open(self.passfile, "w"))
  f:close()
  run1{ "chmod", "600", self.passfile }
  f = assert(io.open(self.passfile, "w"))
  f:write(("%s:*:*:%s:%s\n"):format(HOST, ROLE, (self.password:gsub("[\\:]", "\\%0"))))
  f:close()

  local source, target = new_cluster(self, "source"), new_cluster(self, "target")
  local replica = new_cluster(self, "replica")
  self.source, self.replica, self.target = source, replica, target
  self.clusters = { source, replica, target }
  for _, c in ipairs(self.clusters) do c:_set_port(free_port(self._ports)) end
  ok, err = self:_versions(insts)
  if not ok then return nil, err end
  ok, err = self:_small_disk(opts.small_disk, "datadir")
  if not ok then return nil, err end
  if target.version_num < pgversion.since("set_on_parameter") and not opts.target_superuser then
    return nil, lab_error("target", ("an RDS-like target role needs PostgreSQL 15 or later (GRANT SET ON PARAMETER "
      .. "session_replication_role); the target is %s"):format(pgversion.label(target.version_num)), nil,
      { hint = "lab.start{ target_superuser = true } for a target of 13 or 14" })
  end

  -- initdb of source and target at once
  local function initdb(c)
    local job = c:_server_job{ c.inst.bindir .. "/initdb", "-D", c.datadir, "-U", c.superuser, "-A", "trust",
      "-E", "UTF8", "--locale=" .. (opts.locale or "C"), "--no-sync", timeout = 120 }
    if pgversion.has(c.version_num, "initdb_no_instructions") then job[#job + 1] = "--no-instructions" end
    return job
  end
  local results = run_all{ initdb(source), initdb(target) }
  for i, c in ipairs{ source, target } do
    if not results[i].ok then
      return nil, lab_error(c.name, "initdb failed (" .. describe_exit(results[i].how, results[i].code) .. ")",
        last_lines(results[i].output, 20))
    end
  end

  for _, c in ipairs{ source, target } do
    c:_configure(self:_settings(c, opts), "migrun lab")
    c:_write_hba()
  end
  ok, err = self:_start_clusters{ source, target }
  if not ok then return nil, err end

  -- Role, database and extension on both, at once.
  results = run_all{ self:_psql_job(source, self:_setup_sql(source, opts)),
                     self:_psql_job(target, self:_setup_sql(target, opts)) }
  for i, c in ipairs{ source, target } do
    if not results[i].ok then
      return nil, lab_error(c.name, "setup SQL failed: " .. trim(results[i].output), c:log_tail(10))
    end
  end
  ok, err = self:_small_disk(opts.small_disk, "tablespace")
  if not ok then return nil, err end

  -- The maintenance replica: a base backup of the running source, streaming.
  local basebackup = source.inst.client_tools and pgbin.argv(source.inst, { source.inst.bindir .. "/pg_basebackup" })
    or { self.bin .. "/pg_basebackup" }
  for _, a in ipairs{ "-D", replica.datadir, "-R", "-X", "stream", "-c", "fast", "--no-sync", "-h", HOST,
      "-p", tostring(source.port), "-U", SUPERUSER } do
    basebackup[#basebackup + 1] = a
  end
  basebackup.timeout = 300
  local r = run1(self:_as_owner(basebackup))
  if not r.ok then
    return nil, lab_error("replica", "pg_basebackup failed (" .. describe_exit(r.how, r.code) .. ")",
      last_lines(r.output, 20))
  end
  replica:_configure(self:_settings(replica, opts), "migrun lab: the replica")
  ok, err = self:_start_clusters{ replica }
  if not ok then return nil, err end
  ok, err = self:_wait_streaming(opts.timeout or 60)
  if not ok then return nil, err end

  ok, err = self:_start_proxies(opts.proxy)
  if not ok then return nil, err end
  if opts.dms then
    ok, err = self:_start_dms(opts.dms)
    if not ok then return nil, err end
  end
  self.startup_seconds = now() - t0
  return true
end

-- opts.proxy: true (every cluster) or a list of cluster names, each given
-- a TCP proxy (Cluster:start_proxy) once the lab is up.
function Lab:_start_proxies(which)
  if not which then return true end
  local names = which == true and { "source", "replica", "target" } or which
  assert(type(names) == "table", "lab.start: proxy must be true or a list of cluster names")
  for _, name in ipairs(names) do
    local c = assert(self[name] and self[name].start_proxy and self[name], "lab.start: no cluster " .. tostring(name))
    local ok, err = c:start_proxy()
    if not ok then return nil, err end
  end
  return true
end

-- opts.small_disk = { cluster = "target", size = "64M", as = "tablespace" | "datadir" }: a
-- tmpfs of that size (root only; migrun.rehearsal.faults) as the cluster's
-- data directory (mounted before initdb: WAL fills it too, and PostgreSQL
-- stops) or, the default, as the tablespace of its database (mounted once the
-- database exists, which then moves there: relations fill it, WAL does not).
-- Cluster.disk is the faults Disk (disk:fill{ leave = bytes } fills it on cue).
function Lab:_small_disk(o, phase)
  if not o or (o.as or "tablespace") ~= phase then return true end
  local c = self[o.cluster or "target"]
  assert(c and c.datadir and c.name ~= "replica", "lab.start: small_disk.cluster must be source or target")
  assert(phase == "tablespace" or phase == "datadir", "lab.start: small_disk.as must be tablespace or datadir")
  local path = phase == "datadir" and c.datadir or (self.dir .. "/" .. c.name .. "-disk")
  local disk, err = faults.small_disk{ path = path, size = o.size or "64M", owner = self.runas }
  if not disk then return nil, err end
  c.disk = disk
  if phase == "datadir" then return true end
  local ts = "migrun_small_disk"
  local sql = ("create tablespace %s location %s;\ngrant create on tablespace %s to %s;\n"
    .. "alter database %s set tablespace %s;\n"):format(ts, sql_literal(path), ts, sql_identifier(ROLE),
    sql_identifier(self.dbname), ts)
  local job = self:_psql_job(c, sql)
  for i, a in ipairs(job) do
    if a == "-d" then job[i + 1] = "template1" end
  end
  local r = run1(job)
  if not r.ok then
    return nil, lab_error(c.name, "could not move the database to the small disk: " .. trim(r.output), c:log_tail(10))
  end
  disk.tablespace = ts
  return true
end

-- The DMS emulator, as a child migrun serving on a free loopback port. The
-- secret key travels in the child's environment, never in its argv.
local DMS_ACCESS_KEY, DMS_REGION = "AKIDMIGRUNLAB", "us-east-1"

function Lab:_start_dms(dms_opts)
  local secret = random_password()
  -- faults and delays (emulator options) travel as JSON in the environment
  -- (migrun.json: a fault's seed or count stays an integer)
  local extra = type(dms_opts) == "table" and require("migrun.json").encode{
    faults = dms_opts.faults, delays = dms_opts.delays } or "{}"
  local script = ([[
    local o = assert(require("migrun.json").decode(os.getenv("MIGRUN_DMS_EMULATOR_OPTS")))
    local emu = assert(require("migrun.rehearsal.emulator").start{ port = 0, access_key = %q,
      secret_key = os.getenv("MIGRUN_DMS_EMULATOR_SECRET"), region = %q,
      faults = o.faults, delays = o.delays })
    io.stdout:write(emu.url, "\n") io.stdout:flush()
    emu:serve()]]):format(DMS_ACCESS_KEY, DMS_REGION)
  local logfile = self.dir .. "/dms-emulator.log"
  local url
  -- the worker executable of libmigrun, whatever program hosts this state (migrun, lua5.4, a C host)
  local spec, serr = require("migrun.host").worker_spec{ "-e", script,
    env = { MIGRUN_DMS_EMULATOR_SECRET = secret, MIGRUN_DMS_EMULATOR_OPTS = extra },
    stdout = function(line) url = url or line end, stderr = { file = logfile } }
  if not spec then return nil, lab_error("dms", "cannot start the DMS emulator: " .. tostring(serr)) end
  local h, err = proc.spawn(spec)
  if not h then return nil, lab_error("dms", "cannot start the DMS emulator: " .. tostring(err)) end
  local deadline = now() + 30
  while not url and h.running and now() < deadline do h:wait(0.05) end
  if not url then
    h:close()
    return nil, lab_error("dms", "the DMS emulator did not start", last_lines(read_file(logfile) or "", 20))
  end
  self.dms = { url = url, access_key = DMS_ACCESS_KEY, secret_key = secret, region = DMS_REGION,
    logfile = logfile, process = h }
  return true
end

-- A migrun.dms client for the lab's emulator (lab.start{ dms = true }).
function Lab:dms_client(opts)
  assert(self.dms, "this lab has no DMS emulator: start it with lab.start{ dms = true }")
  local o = { endpoint_url = self.dms.url, access_key = self.dms.access_key,
    secret_key = self.dms.secret_key, region = self.dms.region }
  for k, v in pairs(opts or {}) do o[k] = v end
  return require("migrun.dms").client(o)
end

-- lab.start(opts) -> L | nil, err. opts (all optional):
--   dir       the lab directory (created, must be empty; default: a new one under $TMPDIR or /tmp)
--   keep      keep the directory when the lab stops (the servers are stopped all the same)
--   dbname    database created on source and target (default "app")
--   pglogical false to skip CREATE EXTENSION pglogical on the source
--   password  the password of the role migrun (default: random); see L.password, L.passfile
--   settings  { all = {...}, source = {...}, replica = {...}, target = {...} } extra postgresql.conf
--   bindir    PostgreSQL binaries (default: pg_config --bindir, else /usr/lib/postgresql/<max>/bin)
--   source, target  a major version each (13, 17...): the source and its replica of one, the
--             target of another, from /usr/lib/postgresql/<major>/bin or the cache of
--             tools/install-pg-versions (migrun.pgbin); the one not given is bindir's. The
--             source needs pglogical (13 and 15 have it here); an RDS-like target 15 or later.
--             Each cluster has .version ("13.16"), .version_num (130016) and .inst.
--   locale    initdb locale (default "C");  timeout  seconds to wait for streaming (default 60)
--   target_superuser  true: the role migrun is a superuser on the target too (default: an
--             RDS-like master user, and the target's own superuser is named rdsadmin)
--   dms       true to also start the DMS emulator (L.dms.url, L:dms_client()), or a
--             table of emulator options: { faults = {...}, delays = {...} }
--   proxy     true or a list of cluster names: a TCP proxy in front of each, in its
--             conninfo, url and migrun_conninfo (Cluster.proxy; docs/faults.md)
--   small_disk { cluster = "target", size = "64M", as = "tablespace" | "datadir" }:
--             that cluster on a small tmpfs that fills (root only; Cluster.disk)
function lab.start(opts)
  opts = opts or {}
  local L = setmetatable({
    dbname = opts.dbname or "app", keep = opts.keep and true or false,
    password = opts.password or random_password(), clusters = {}, _ports = {}, _cues = {},
    rds_target = not opts.target_superuser,
  }, Lab)
  -- Anything raised half-way (Ctrl-C included) still stops what was started.
  local ok, built, err = pcall(L._build, L, opts)
  if not ok or not built then
    L:stop()
    if not ok then error(built, 0) end
    return nil, err
  end
  return L
end

-- Starts a lab, prints how to connect, and waits for Ctrl-C or end of input,
-- then stops it:  migrun -l migrun.rehearsal.lab -e 'lab.shell()'
function lab.shell(opts)
  local L <close>, err = lab.start(opts)
  if not L then error(err, 0) end
  print(L:describe())
  print(("Started in %.1fs. Press Ctrl-C or Ctrl-D (end of input) to stop the lab."):format(L.startup_seconds))
  io.stdout:flush()
  local ok, raised = pcall(function()
    while true do
      local line, msg = io.read("L")
      if not line and not (msg and msg:find("nterrupted")) then break end
    end
  end)
  io.stdout:write("\nStopping the lab...\n")
  assert(L:stop())
  if not ok and not errors.is_interrupt(raised) then error(raised, 0) end
end

return lab
