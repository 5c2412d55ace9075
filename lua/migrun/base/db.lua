--[[
migrun.db: a connection as a playbook step sees it, with reads and writes
told apart so that --dry-run can run every read and show every write; and
connections made again when the world took them away (issue 24).

  local db = require "migrun.db"
  local target = db.wrap(conn, { dry_run = true, echo = print })
  local res = assert(target:query("select count(*) as n from t"))   -- always runs
  assert(target:write("truncate t"))    -- dry run: echo("target: truncate t") instead

  db.wrap(conn, opts) -> Db          opts.dry_run (boolean), opts.echo(line)
      called with "<name>: <sql>" (and the parameters) for every write when
      dry_run is set, and for every write actually run when opts.echo_writes.
      opts.reopen: a function that connects again (-> conn | nil, err); with
      it the Db rides out a lost connection (below). opts.reconnect_timeout
      (seconds, default db.RECONNECT_TIMEOUT), opts.on_reconnect(line) (what
      happened, for the log), opts.sleep(seconds) (default host.sleep).
  Db:query(sql, ...) | Db:query{sql, ..., timeout=} -> Result | nil, err
      conn:exec for statements that change nothing.
  Db:write(sql, ...) | Db:write{...} -> Result | db.DRY | nil, err
      conn:exec for statements that change something; in a dry run the
      statement is echoed and db.DRY (a result with no rows, affected = 0,
      dry_run = true) is returned.
  Db:copy_to(from_db, from_sql, to_sql, opts) -> {bytes, rows} | db.DRY | nil, err
      pg.copy from another Db's connection into this one (a write here).
  Db.conn, Db.dry_run, Db:name(), Db:is_local(), tostring(Db), Db:close()
  Db.reconnects: how many times it connected again

A lost connection (err.lost: the server restarted or crashed, the network
or a stall ended it; docs/faults.md), with opts.reopen:
  - a statement run outside a transaction: the Db connects again (every
    db.RECONNECT_INTERVAL seconds until reconnect_timeout) and a read, or a
    BEGIN, runs once more on the new connection; a write's outcome is not
    known (it may have committed), so its error is returned and the next
    statement runs on the new connection;
  - a statement inside a transaction (after BEGIN): nothing is retried. The
    transaction is gone and the Db refuses its next statements with the
    loss until the caller's ROLLBACK, which it answers at once, so that a
    COMMIT after a lost statement fails instead of committing half of it
    on a new connection in autocommit.

Reconnecting, for code that holds its own connections (the full load's
workers):
  db.is_lost(err) -> whether err says the connection is gone
  db.reconnect(open, { timeout =, interval =, sleep =, on_wait = fn(attempt, err) })
      -> conn, seconds waited | nil, err   open() every interval seconds until
      it gives a connection or timeout seconds have passed (a restarting
      server refuses connections, then says it is starting up, 57P03); a
      login refused (28xxx) or a database that does not exist is not waited for
  db.backend(conn) -> { pid =, started = } | nil, err   a session as the
      server knows it (a pid alone may be reused after a restart)
  db.end_backend(conn, b [, timeout]) -> "ended" | "gone" | nil, err
      ends session b from another one: an earlier connection lost on this
      side may still live on the server (a stalled path, a frozen proxy)
      holding its locks and its transaction open; waits until it is gone
      (timeout, default 15 s)
]]
local pg = require "migrun.pg"
local host = require "migrun.host"
local errors = require "migrun.error"

local db = {}

db.RECONNECT_TIMEOUT = 300 -- seconds: a restart, a Multi-AZ failover, a short network outage
db.RECONNECT_INTERVAL = 2

local Db = {}
Db.__index = Db
Db.__name = "migrun.db.Db"

db.DRY = setmetatable({ affected = 0, dry_run = true, command = "DRY RUN" }, {
  __len = function() return 0 end,
  __index = { rows = function() return function() return nil end end,
              columns = function() return {} end },
  __tostring = function() return "(dry run: not executed)" end,
})

-- What the Db answers to the ROLLBACK of a transaction its lost connection took.
local ROLLED_BACK = setmetatable({ command = "ROLLBACK" }, {
  __len = function() return 0 end,
  __index = { rows = function() return function() return nil end end,
              columns = function() return {} end },
  __tostring = function() return "ROLLBACK (the transaction was lost with its connection)" end,
})

function db.wrap(conn, opts)
  assert(conn ~= nil, "db.wrap: connection expected")
  opts = opts or {}
  assert(opts.reopen == nil or type(opts.reopen) == "function", "db.wrap: opts.reopen must be a function")
  return setmetatable({ conn = conn, dry_run = opts.dry_run and true or false,
                        echo = opts.echo, echo_writes = opts.echo_writes, reopen = opts.reopen,
                        reconnect_timeout = opts.reconnect_timeout, on_reconnect = opts.on_reconnect,
                        sleep = opts.sleep, reconnects = 0 }, Db)
end

function Db:name() return self.conn:name() end

-- Whether the server runs on this machine (loopback or a Unix socket), so
-- that its data directory can be looked at directly (free disk, WAL size).
function Db:is_local()
  local h = self.conn:info().host
  return h == nil or h == "" or h == "127.0.0.1" or h == "localhost" or h == "::1" or h:sub(1, 1) == "/"
end
function Db:__tostring() return "db " .. tostring(self.conn) end
function Db:close() return self.conn:close() end

local function describe(name, first, ...)
  local sql, params
  if type(first) == "table" then
    sql, params = first[1], { table.unpack(first, 2, first.n and first.n + 1 or #first) }
  else
    sql, params = first, table.pack(...)
    params.n = nil
  end
  local line = ("%s: %s"):format(name, (tostring(sql):gsub("%s+$", "")))
  if #params > 0 then
    local shown = {}
    for i, p in ipairs(params) do shown[i] = ("$%d=%s"):format(i, tostring(p)) end
    line = line .. "  -- " .. table.concat(shown, ", ")
  end
  return line
end

---------------------------------------------------------------------------
-- Reconnecting
---------------------------------------------------------------------------

function db.is_lost(err)
  return type(err) == "table" and err.lost == true
end

function db.reconnect(open, opts)
  assert(type(open) == "function", "db.reconnect: a function that connects expected")
  opts = opts or {}
  local timeout, interval = opts.timeout or db.RECONNECT_TIMEOUT, opts.interval or db.RECONNECT_INTERVAL
  local sleep = opts.sleep or host.sleep
  local t0 = host.monotonic()
  local attempt = 0
  while true do
    attempt = attempt + 1
    local conn, err = open()
    if conn then return conn, host.monotonic() - t0 end
    local waited = host.monotonic() - t0
    -- refused for who it is (28xxx), or no such database: waiting changes nothing
    local code = type(err) == "table" and tostring(err.code or err.sqlstate or "") or ""
    if code:match("^28") or code == "3D000" then return nil, err end
    if waited + interval > timeout then
      return nil, errors.new{ kind = "connection", where = type(err) == "table" and err.where or "reconnect",
        code = type(err) == "table" and err.code or nil, unreachable = true,
        message = ("could not connect again within %d s (%d attempts): %s"):format(math.floor(timeout + 0.5),
          attempt, tostring(type(err) == "table" and err.message or err)),
        hint = "the server is still down or unreachable: once it is back, run the same command again" }
    end
    if opts.on_wait then opts.on_wait(attempt, err) end
    sleep(interval)
  end
end

function db.backend(conn)
  local res, err = conn:exec("select pg_backend_pid() as pid, backend_start::text as started "
    .. "from pg_stat_activity where pid = pg_backend_pid()")
  if not res then return nil, err end
  return { pid = res[1] and res[1].pid or conn:backend_pid(), started = res[1] and res[1].started or nil }
end

function db.end_backend(conn, b, timeout)
  if not (b and b.pid) then return "gone" end
  local alive = "select 1 from pg_stat_activity where pid = $1 and backend_start::text = $2"
  local res, err = conn:exec("select pg_terminate_backend(pid) as ended from pg_stat_activity "
    .. "where pid = $1 and backend_start::text = $2", b.pid, b.started or "")
  if not res then return nil, err end
  if #res == 0 then return "gone" end
  local deadline = host.monotonic() + (timeout or 15)
  while true do
    res, err = conn:exec(alive, b.pid, b.started or "")
    if not res then return nil, err end
    if #res == 0 then return "ended" end
    if host.monotonic() > deadline then
      return nil, errors.new{ kind = "connection", where = conn:name(),
        message = ("session %d of the lost connection is still there %d s after it was told to end"):format(b.pid,
          math.floor((timeout or 15) + 0.5)),
        hint = "end it (select pg_terminate_backend(" .. b.pid .. ")), then run the same command again" }
    end
    host.sleep(0.1)
  end
end

local function first_sql(first)
  local sql = type(first) == "table" and first[1] or first
  return type(sql) == "string" and sql:match("^%s*(%a+)") or ""
end

-- The connection again, after a loss (the old one closed).
function Db:_reconnect(cause)
  local name = self.conn:name()
  self.conn:close()
  local conn, waited = db.reconnect(self.reopen, { timeout = self.reconnect_timeout, sleep = self.sleep })
  if not conn then
    self.lost = waited -- still lost: the next statement tries again
    return nil, waited
  end
  self.conn, self.lost = conn, nil
  self.reconnects = self.reconnects + 1
  if self.on_reconnect then
    self.on_reconnect(("the %s's connection was lost (%s); connected again after %.1f s"):format(name,
      tostring(cause and cause.message or cause), waited))
  end
  return true
end

-- conn:exec, riding out a lost connection as the header says.
function Db:_exec(read, ...)
  local verb = first_sql(...):lower()
  if self.broken then
    if verb == "rollback" or verb == "abort" then
      self.broken = nil
      return ROLLED_BACK
    end
    return nil, self.broken
  end
  if self.lost or self.conn:is_closed() then -- lost, or closed by migrun after a stall
    local ok, err = self:_reconnect(self.lost or "closed")
    if not ok then return nil, err end
  end
  local status = self.conn:transaction_status()
  local res, err = self.conn:exec(...)
  if res or not self.reopen or not db.is_lost(err) then return res, err end
  self.lost = err
  if status ~= "idle" then
    self.broken = errors.new{ kind = "connection", where = err.where, lost = true,
      message = "connection lost in a transaction: " .. tostring(err.message),
      hint = "the transaction did not commit (unless its COMMIT was under way); roll it back and do it again" }
    return nil, err
  end
  if not (read or verb == "begin" or verb == "start") then return nil, err end
  local ok, rerr = self:_reconnect(err)
  if not ok then return nil, rerr end
  return self.conn:exec(...)
end

function Db:query(...)
  if not self.reopen then return self.conn:exec(...) end
  return self:_exec(true, ...)
end

function Db:write(...)
  if self.dry_run then
    if self.echo then self.echo(describe(self:name(), ...)) end
    return db.DRY
  end
  if self.echo and self.echo_writes then self.echo(describe(self:name(), ...)) end
  if not self.reopen then return self.conn:exec(...) end
  return self:_exec(false, ...)
end

function Db:copy_to(from, from_sql, to_sql, opts)
  opts = opts or {}
  if self.dry_run then
    if self.echo then
      self.echo(("%s: %s  <=  %s: %s"):format(self:name(), to_sql, from:name(), from_sql))
    end
    return db.DRY
  end
  return pg.copy{ from = from.conn, from_sql = from_sql, to = self.conn, to_sql = to_sql,
                  on_progress = opts.on_progress, progress_interval = opts.progress_interval }
end

db.Db = Db
return db
