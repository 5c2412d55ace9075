--[[
migrun.fullload_worker: the worker side of the full load (migrun.fullload):
one task of the parent's, run in a child process by migrun.pool, which gives
it the task's job (JSON on its stdin: connection strings, which may hold
passwords, never go in argv) and turns what it emits into the parent's
events. See migrun.fullload for why the load is shaped this way.

  worker.task(job, emit) -> true | nil, err     run by migrun.pool (internal)
      job = { replica =, target = (conninfo), expect_replay_lsn = "0/3000060",
              progress_interval = s, ack_class = the run's advisory lock class,
              application_name = the run's (migrun.playbook.sessions),
              reconnect_timeout = s (300), attempts = n (5), stall_timeout = s
              (the COPY stall bound, default pg's), items = { item... } },
      the items run in order, each one of
        { op = "copy", table = "s.t", schema =, name = }      a whole table
        { op = "chunk", table =, schema =, name =, chunk = i, of = n,
          from_sql =, to_sql =, ack = k }                      one chunk
        { op = "index", table =, schema =, name =, index =, sql = {...},
          parallel_workers = n (the build's max_parallel_maintenance_workers, 0 if absent) }
        { op = "analyze", table =, schema =, name = }
        { op = "hash", table =, schema =, name =, part =, sides = {"replica", "target"},
          where = (SQL, nil: the whole table), chunk = } (migrun.loadhash; job.hash_method)
      emit(event): { event = "start", op =, table =, chunk =, index =, started = }
        then for a copy or a chunk { event = "progress", table =, chunk =,
        bytes =, rows = } as it goes, and at its end one of
        { event = "loaded", table =, rows =, bytes =, started =, ended =, seconds = }
        { event = "commit", table =, chunk =, ack =, xid =, rows =, bytes =, started = }
          (before a chunk commits: the parent journals xid, then holds the
          advisory lock (ack_class, ack) that lets the worker commit)
        { event = "chunk", ... as "commit", ended =, seconds = [, recovered = true] }
        { event = "indexed", table =, index =, started =, ended =, seconds =, parallel_workers = }
        { event = "analyzed", table =, started =, ended =, seconds = }
        { event = "hashed", table =, part =, chunk =, replica = { rows =, hash = },
          target = { ... } (the sides hashed), started =, ended =, seconds = }
      and when the world fails (docs/faults.md):
        { event = "retry", op =, table =, chunk =, index =, attempt =, attempts =,
          message =, side = }   a connection was lost (err.lost, a stall too)
        { event = "recovered", op =, table =, chunk =, index =, attempt =,
          seconds = (waited for the servers), lost_at = (host.now() when the
          attempt failed), lost_seconds = (from then until going again),
          outcome = "redo" | "committed" }
        { event = "failed", kind =, where =, message =, hint =, sqlstate =,
          disk_full =, lost =, table =, chunk = }   the error the task ends with
  worker.check_replica(replica, names, expected, what) -> true | nil, err
      the replica still in recovery, paused, at the expected replay LSN
      (names: lsn.names of its version), before loading `what`; a replica
      that lost its pause (a restart) but replayed nothing is paused again
  worker.whole_sql(t) -> copy_from, copy_to, truncate   a whole table's statements
  worker.ACK_STRIDE   a redone chunk's advisory lock key: ack + (attempt - 1) x it

Riding out a lost connection (err.lost: a server restarted, a network
failed, a COPY stalled): the item's connections are closed, the sessions
they had on the servers are ended (a stalled path may leave them alive,
holding locks and an open transaction), both servers are connected again
every 2 s up to reconnect_timeout, the replica is checked again (paused, at
the captured LSN), and the item runs again in a new transaction, up to
`attempts` times. A chunk whose COMMIT may have reached the target is asked
about first (txid_status): committed, it counts as loaded, never twice. A
whole table is emptied again by its own TRUNCATE; an index already built by
the lost session is taken as built. A full disk (err.disk_full) is never
tried again.
]]
local pg = require "migrun.pg"
local db = require "migrun.db"
local errors = require "migrun.error"
local host = require "migrun.host"
local lsn = require "migrun.lsn"
local replica_ = require "migrun.replica"

local worker = {}

-- How long a worker waits for the parent to journal a chunk before it commits.
local ACK_TIMEOUT, ACK_POLL = 600, 0.005
worker.ACK_STRIDE = 1 << 24
-- sqlstates of an index or constraint the lost session had already made
local EXISTS = { ["42P07"] = true, ["42710"] = true }

-- The short statements (BEGIN, TRUNCATE, a lock poll, COMMIT) are bounded
-- like a stall (x this): a path that stalls while the server still holds
-- the TCP connection (a frozen proxy) gets no keepalive answer wrong, so
-- only a timeout ends the wait; its cancel unanswered, the connection is
-- closed and counts as lost. The COPY has its stall bound; an index build
-- or an ANALYZE takes what it takes.
local SHORT = 3

-- conn:exec of a short statement, bounded.
local function short(c, timeout, sql, ...)
  return c:exec{ sql, n = select("#", ...) + 1, timeout = timeout, ... }
end

function worker.whole_sql(t)
  local name = pg.qualify(t.schema, t.name)
  return ("COPY %s TO STDOUT (FORMAT binary)"):format(name),
    ("COPY %s FROM STDIN (FORMAT binary, FREEZE)"):format(name), ("TRUNCATE %s"):format(name)
end

local function fail(where, message, extra)
  local e = { kind = "fullload", where = where, message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return nil, errors.new(e)
end

-- Is the replica still in recovery, paused, at the expected replay LSN?
function worker.check_replica(replica, names, expected, what, timeout)
  -- a primary (promoted) refuses the pause functions: asked only in recovery
  local paused_expr = names.wal_replay_pause_state
    and ("case when pg_is_in_recovery() then " .. names.wal_replay_pause_state .. "()::text end")
    or ("case when not pg_is_in_recovery() then null when " .. names.is_wal_replay_paused
      .. "() then 'paused' else 'not paused' end")
  local res, err = replica:exec{ ("select pg_is_in_recovery() as in_recovery, %s as pause_state, %s() as replay_lsn")
    :format(paused_expr, names.last_wal_replay_lsn), timeout = timeout }
  if not res then return nil, err end
  local row = res[1]
  local where = replica:name() .. " " .. tostring(replica:backend_pid())
  local before = " before loading " .. what
  if row.in_recovery and row.pause_state == "paused" then
    if rawequal(row.replay_lsn, pg.null) or row.replay_lsn ~= expected then
      return fail(where, ("the replica's replay LSN is %s, expected %s"):format(tostring(row.replay_lsn),
        tostring(expected)) .. before,
        { hint = "the replica replayed WAL since the LSN was captured; capture it again" })
    end
    return true
  end
  -- a restart lifts the pause; nothing lost while replay stayed at the captured LSN
  local ok, perr = replica_.repause(db.wrap(replica), expected)
  if ok then return true end
  if errors.is(perr) and (perr.moved or perr.promoted) then
    return fail(where, perr.message .. before, { hint = perr.hint, promoted = perr.promoted, moved = perr.moved })
  end
  return nil, perr
end

local function progress_fn(emit, tname, chunk)
  return function(bytes, rows) emit{ event = "progress", table = tname, chunk = chunk, bytes = bytes, rows = rows } end
end

-- Waits until the parent holds the advisory lock (ack.class, ack.key) on the
-- target: the sign that it has journaled this chunk's transaction.
local function wait_ack(c, ack, tname, chunk, timeout)
  local deadline = host.monotonic() + ACK_TIMEOUT
  while true do
    local res, err = short(c, timeout, [[select exists (select 1 from pg_locks where locktype = 'advisory'
      and classid = $1::int8::oid and objid = $2::int8::oid and objsubid = 2 and granted) as ok]], ack.class, ack.key)
    if not res then return nil, err end
    if res[1].ok then return true end
    if host.monotonic() > deadline then
      return fail("target", ("the parent migrun did not journal chunk %d of %s within %d s: not committed"):format(
        chunk, tname, ACK_TIMEOUT))
    end
    host.sleep(ACK_POLL)
  end
end

-- The transaction of a chunk whose connection was lost, as the target knows
-- it: "committed" | "aborted" (its session was ended first: not in progress).
local function xact_status(c, xid, timeout)
  local deadline = host.monotonic() + 60
  while true do
    local res, err = short(c, timeout, "select txid_status($1::bigint) as s", xid)
    if not res then return nil, err end
    local s = res[1].s
    if s == "committed" or s == "aborted" then return s end
    if s ~= "in progress" or host.monotonic() > deadline then
      return fail("target", ("the transaction %s of the lost connection is %s on the target"):format(xid,
        s == pg.null and "unknown" or s), { hint = "wait until the target has ended that session, then run again" })
    end
    host.sleep(0.2)
  end
end

---------------------------------------------------------------------------
-- A worker: its two sessions, opened when an item first needs them, and
-- what it does for each kind of item.
---------------------------------------------------------------------------

local Worker = {}
Worker.__index = Worker

-- A connection to one side (with a backoff after a loss); the session a lost
-- connection left there, if any, ended from the new one.
function Worker:open(side)
  local conninfo, timeout = self.job[side], self.job.reconnect_timeout
  local open = function() return pg.connect(conninfo, { name = side, application_name = self.job.application_name,
    stall_timeout = self.job.stall_timeout }) end
  -- the parent has just connected with the same conninfo: a refusal now is the world's (a restart)
  local conn, err = db.reconnect(open, { timeout = timeout })
  if not conn then return nil, err end
  if self.stale[side] then
    local ended, eerr = db.end_backend(conn, self.stale[side])
    if not ended then conn:close() return nil, eerr end
    self.stale[side] = nil
  end
  local b
  b, err = db.backend(conn)
  if not b then conn:close() return nil, err end
  self.backends[side] = b
  return conn
end

function Worker:need_target()
  if self.target then return true end
  local err
  self.target, err = self:open("target")
  return self.target ~= nil, err
end

function Worker:need_replica()
  if not self.replica then
    local replica, err = self:open("replica")
    if not replica then return nil, err end
    self.replica = replica
  end
  if not self.names then
    self.names, self.expected = lsn.names(self.replica:server_version()), lsn(self.job.expect_replay_lsn)
  end
  return true
end

-- The replica, checked before a table or a chunk is read from it.
function Worker:checked_replica(item)
  local ok, err = self:need_replica()
  if not ok then return nil, err end
  return worker.check_replica(self.replica, self.names, self.expected,
    item.chunk and (("%s (chunk %d)"):format(item.table, item.chunk)) or item.table, self.short)
end

-- Both connections closed after a loss; their sessions are ended at the next connect.
function Worker:drop_connections()
  for _, side in ipairs{ "target", "replica" } do
    if self[side] then
      self[side]:close()
      self[side] = nil
      self.stale[side] = self.backends[side]
    end
  end
end

-- Ends the transaction an item left open on a connection that still works.
local function rollback(c, timeout)
  if c and not c:is_closed() then
    local s = c:transaction_status()
    if s == "intrans" or s == "inerror" then short(c, timeout, "ROLLBACK") end
  end
end

local OPS = {}

-- A whole table: one transaction, emptied and written frozen. Done again
-- after a loss, it empties the table again whatever the lost one did.
function OPS.copy(w, item, started, t0)
  local from_sql, to_sql, truncate = worker.whole_sql(item)
  local c, t = w.target, w.short
  local ok, err = short(c, t, "BEGIN")
  if ok then ok, err = short(c, t, truncate) end
  local r
  if ok then
    r, err = pg.copy{ from = w.replica, from_sql = from_sql, to = c, to_sql = to_sql,
      progress_interval = w.job.progress_interval, on_progress = progress_fn(w.emit, item.table) }
  end
  if r then ok, err = short(c, t, "COMMIT") end
  if not (r and ok) then rollback(c, t) return nil, err end
  w.emit{ event = "loaded", table = item.table, rows = r.rows, bytes = r.bytes, started = started,
          ended = host.now(), seconds = host.monotonic() - t0 }
  return true
end

-- A chunk: one transaction, committed only once the parent has journaled its
-- transaction id. w.pending keeps what a lost connection leaves to ask about.
function OPS.chunk(w, item, started, t0, attempt)
  local tname, job, emit, c, t = item.table, w.job, w.emit, w.target, w.short
  local ok, err = short(c, t, "BEGIN")
  local x
  if ok then x, err = short(c, t, "select txid_current()::text as xid") end
  if not x then rollback(c, t) return nil, err end
  local xid = x[1].xid
  local copied, cerr = pg.copy{ from = w.replica, from_sql = item.from_sql, to = c, to_sql = item.to_sql,
    progress_interval = job.progress_interval, on_progress = progress_fn(emit, tname, item.chunk) }
  if not copied then rollback(c, t) return nil, cerr end
  local ack = item.ack + (attempt - 1) * worker.ACK_STRIDE -- a new key: a held one may be the lost attempt's
  w.pending = { xid = xid, rows = copied.rows, bytes = copied.bytes, ack = ack }
  emit{ event = "commit", table = tname, chunk = item.chunk, ack = ack, xid = xid, rows = copied.rows,
        bytes = copied.bytes, started = started }
  ok, err = wait_ack(c, { class = job.ack_class, key = ack }, tname, item.chunk, t)
  if ok then ok, err = short(c, t, "COMMIT") end
  if not ok then rollback(c, t) return nil, err end
  w.pending = nil
  emit{ event = "chunk", table = tname, chunk = item.chunk, ack = ack, rows = copied.rows, bytes = copied.bytes,
        xid = xid, started = started, ended = host.now(), seconds = host.monotonic() - t0 }
  return true
end

-- An index item; redone after a loss, what the lost session made counts as made.
-- item.parallel_workers: the streams idle while it builds (the parent's
-- share_idle), the build's max_parallel_maintenance_workers.
function OPS.index(w, item, started, t0, attempt)
  local workers = math.tointeger(item.parallel_workers) or 0
  local res, err = w.target:exec(("SET max_parallel_maintenance_workers = %d"):format(workers))
  if not res then return nil, err end
  for _, sql in ipairs(item.sql) do
    res, err = w.target:exec(sql)
    if not res and not (attempt > 1 and err.sqlstate and EXISTS[err.sqlstate]) then return nil, err end
  end
  w.emit{ event = "indexed", table = item.table, index = item.index, started = started, ended = host.now(),
          seconds = host.monotonic() - t0, parallel_workers = workers }
  return true
end

-- A part of a table hashed on the sides named (migrun.loadhash), as
-- qa.compare hashes: the replica checked first, like a copy.
function OPS.hash(w, item, started, t0)
  local qa = require "migrun.qa" -- only the tasks that hash load it
  local ev = { event = "hashed", table = item.table, part = item.part, chunk = item.chunk, started = started }
  for _, side in ipairs(item.sides) do
    local conn = side == "replica" and w.replica or w.target
    local r, err = qa.row_hash(db.wrap(conn), { schema = item.schema, name = item.name },
      { where = item.where, method = w.job.hash_method })
    if not r then return nil, err end
    ev[side] = { rows = r.rows, hash = r.hash }
  end
  ev.ended, ev.seconds = host.now(), host.monotonic() - t0
  w.emit(ev)
  return true
end

local function reads_replica(item)
  if item.op == "copy" or item.op == "chunk" then return true end
  if item.op ~= "hash" then return false end
  for _, side in ipairs(item.sides) do if side == "replica" then return true end end
  return false
end

function OPS.analyze(w, item, started, t0)
  local res, err = w.target:exec("ANALYZE " .. pg.qualify(item.schema, item.name))
  if not res then return nil, err end
  w.emit{ event = "analyzed", table = item.table, started = started, ended = host.now(),
          seconds = host.monotonic() - t0 }
  return true
end

-- One attempt at an item: its sessions, "start", the replica checked before
-- data is read, the work.
function Worker:attempt(item, attempt)
  local started, t0 = host.now(), host.monotonic()
  local ok, err = self:need_target()
  if not ok then return nil, err end
  if attempt == 1 then
    self.emit{ event = "start", op = item.op, table = item.table, chunk = item.chunk, index = item.index,
               started = started }
  end
  if reads_replica(item) then
    ok, err = self:checked_replica(item)
    if not ok then return nil, err end
  end
  local op = OPS[item.op] or error("fullload.task: unknown item " .. tostring(item.op))
  return op(self, item, started, t0, attempt)
end

local function one_line(err)
  return (tostring(type(err) == "table" and err.message or err):gsub("%s+", " "))
end

-- After a lost connection: both servers again, and what became of a chunk
-- whose COMMIT may have gone through. -> "redo" | "committed" | nil, err
function Worker:recover(item)
  self:drop_connections()
  local t0 = host.monotonic()
  local ok, err = self:need_target()
  if not ok then return nil, err end
  local outcome = "redo"
  local p = self.pending
  if item.op == "chunk" and p then
    local s, serr = xact_status(self.target, p.xid, self.short)
    if not s then return nil, serr end
    if s == "committed" then
      outcome = "committed"
      self.emit{ event = "chunk", table = item.table, chunk = item.chunk, ack = p.ack, rows = p.rows,
        bytes = p.bytes, xid = p.xid, started = self.started, ended = host.now(),
        seconds = host.monotonic() - self.t0, recovered = true }
    end
  end
  self.pending = nil
  return outcome, host.monotonic() - t0
end

-- An item, done again after each lost connection, up to job.attempts times.
function Worker:run(item)
  local attempts = self.job.attempts or 5
  self.started, self.t0 = host.now(), host.monotonic()
  local attempt = 1
  while true do
    local ok, err = self:attempt(item, attempt)
    if ok then return true end
    if not db.is_lost(err) or err.disk_full or attempt >= attempts then return nil, err end
    local lost_at, lost_t = host.now(), host.monotonic()
    self.emit{ event = "retry", op = item.op, table = item.table, chunk = item.chunk, index = item.index,
      attempt = attempt, attempts = attempts, message = one_line(err), side = err.side }
    local outcome, waited = self:recover(item)
    if not outcome then return nil, waited end
    self.emit{ event = "recovered", op = item.op, table = item.table, chunk = item.chunk, index = item.index,
      attempt = attempt + 1, seconds = waited, outcome = outcome, lost_at = lost_at,
      lost_seconds = host.monotonic() - lost_t }
    if outcome == "committed" then return true end
    attempt = attempt + 1
  end
end

-- The error a task ends with, as an event the parent rebuilds it from.
local function failed(emit, err, item)
  if type(err) ~= "table" then err = errors.new{ kind = "fullload", message = tostring(err) } end
  err.table = err.table or item.table
  emit{ event = "failed", kind = err.kind, where = err.where, message = err.message, hint = err.hint,
    sqlstate = err.sqlstate or err.code, disk_full = err.disk_full, lost = err.lost, promoted = err.promoted,
    moved = err.moved, table = item.table, chunk = item.chunk, op = item.op, index = item.index }
  return nil, err
end

-- The sessions a task leaves for the next one its process runs (migrun.pool's
-- workers serve task after task): the next task of the same run does not pay
-- for connecting, nor the servers for a backend's start. { key =, target =,
-- replica =, backends = }, or nil.
local kept

-- Same servers, same settings: the key of the sessions a task can take over.
local function session_key(job)
  return table.concat({ job.target or "", job.replica or "", job.application_name or "",
    tostring(job.stall_timeout) }, "\0")
end

-- The kept sessions, if they are this job's and still answer. One lost
-- while idle (a server restarted between tasks) is no loss of work: it is
-- dropped without a retry, its session ended at the next connect.
function Worker:take_kept()
  local k = kept
  kept = nil
  if not k or k.key ~= session_key(self.job) then
    for _, side in ipairs{ "target", "replica" } do if k and k[side] then k[side]:close() end end
    return
  end
  for _, side in ipairs{ "target", "replica" } do
    local c = k[side]
    if c and short(c, self.short, "select") then
      self[side], self.backends[side] = c, k.backends[side]
    elseif c then
      c:close()
      self.stale[side] = k.backends[side]
    end
  end
end

-- The sessions kept for the next task: only idle ones (no transaction open).
function Worker:keep()
  kept = { key = session_key(self.job), backends = self.backends }
  for _, side in ipairs{ "target", "replica" } do
    local c = self[side]
    if c and not c:is_closed() and c:transaction_status() == "idle" then
      kept[side] = c
    elseif c then
      c:close()
    end
  end
end

function worker.task(job, emit)
  local w = setmetatable({ job = job, emit = emit, stale = {}, backends = {},
    short = SHORT * (job.stall_timeout or pg.STALL_TIMEOUT) }, Worker)
  w:take_kept()
  for _, item in ipairs(job.items) do
    local ok, err = w:run(item)
    if not ok then return failed(emit, err, item) end
  end
  w:keep()
  return true
end

return worker
