--[[
migrun.fullload_worker: the worker side of the full load (migrun.fullload):
one task of the parent's, run in a child process by migrun.pool, which gives
it the task's job (JSON on its stdin: connection strings, which may hold
passwords, never go in argv) and turns what it emits into the parent's
events. See migrun.fullload for why the load is shaped this way.

  worker.task(job, emit) -> true | nil, err     run by migrun.pool (internal)
      job = { replica =, target = (conninfo), expect_replay_lsn = "0/3000060",
              progress_interval = s, ack_pid = the parent's target backend,
              application_name = the run's (migrun.playbook.sessions),
              items = { item... } }, the items run in order, each one of
        { op = "copy", table = "s.t", schema =, name = }      a whole table
        { op = "chunk", table =, schema =, name =, chunk = i, of = n,
          from_sql =, to_sql =, ack = k }                      one chunk
        { op = "index", table =, schema =, name =, index =, sql = {...} }
        { op = "analyze", table =, schema =, name = }
      emit(event): { event = "start", op =, table =, chunk =, index =, started = }
        then for a copy or a chunk { event = "progress", table =, chunk =,
        bytes =, rows = } as it goes, and at its end one of
        { event = "loaded", table =, rows =, bytes =, started =, ended =, seconds = }
        { event = "commit", table =, chunk =, ack =, xid =, rows =, bytes =, started = }
          (before a chunk commits: the parent journals xid, then holds the
          advisory lock (ack_pid, ack) that lets the worker commit)
        { event = "chunk", ... as "commit", ended =, seconds = }
        { event = "indexed", table =, index =, started =, ended =, seconds = }
        { event = "analyzed", table =, started =, ended =, seconds = }
  worker.check_replica(replica, names, expected, what) -> true | nil, err
      the replica still in recovery, paused, at the expected replay LSN
      (names: lsn.names of its version), before loading `what`
  worker.whole_sql(t) -> copy_from, copy_to, truncate   a whole table's statements
]]
local pg = require "migrun.pg"
local errors = require "migrun.error"
local host = require "migrun.host"
local lsn = require "migrun.lsn"

local worker = {}

-- How long a worker waits for the parent to journal a chunk before it commits.
local ACK_TIMEOUT, ACK_POLL = 600, 0.005

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
function worker.check_replica(replica, names, expected, what)
  local paused_expr = names.wal_replay_pause_state and (names.wal_replay_pause_state .. "()::text")
    or ("case when " .. names.is_wal_replay_paused .. "() then 'paused' else 'not paused' end")
  local res, err = replica:exec(("select pg_is_in_recovery() as in_recovery, %s as pause_state, %s() as replay_lsn")
    :format(paused_expr, names.last_wal_replay_lsn))
  if not res then return nil, err end
  local row = res[1]
  local where = replica:name() .. " " .. tostring(replica:backend_pid())
  local before = " before loading " .. what
  if not row.in_recovery then
    return fail(where, "the replica is not in recovery (promoted?)" .. before,
      { hint = "the full load reads the paused maintenance replica; check the replica conninfo" })
  end
  if row.pause_state ~= "paused" then
    return fail(where, ("the replica is not paused (pause state: %s)"):format(row.pause_state) .. before,
      { hint = "replay was resumed during the full load: its data no longer matches the "
        .. "captured LSN; pause the replica again and restart from the LSN capture" })
  end
  if rawequal(row.replay_lsn, pg.null) or row.replay_lsn ~= expected then
    return fail(where, ("the replica's replay LSN is %s, expected %s"):format(tostring(row.replay_lsn),
      tostring(expected)) .. before,
      { hint = "the replica replayed WAL since the LSN was captured; capture it again" })
  end
  return true
end

local function progress_fn(emit, tname, chunk)
  return function(bytes, rows) emit{ event = "progress", table = tname, chunk = chunk, bytes = bytes, rows = rows } end
end

-- Waits until the parent holds the advisory lock (ack.pid, ack.key) on the
-- target: the sign that it has journaled this chunk's transaction.
local function wait_ack(c, ack, tname, chunk)
  local deadline = host.monotonic() + ACK_TIMEOUT
  while true do
    local res, err = c:exec([[select exists (select 1 from pg_locks where locktype = 'advisory' and pid = $1
      and classid = $1::int8::oid and objid = $2::int8::oid and objsubid = 2 and granted) as ok]], ack.pid, ack.key)
    if not res then return nil, err end
    if res[1].ok then return true end
    if host.monotonic() > deadline then
      return fail("target", ("the parent migrun did not journal chunk %d of %s within %d s: not committed"):format(
        chunk, tname, ACK_TIMEOUT))
    end
    host.sleep(ACK_POLL)
  end
end

---------------------------------------------------------------------------
-- A worker: its two sessions, opened when an item first needs them, and
-- what it does for each kind of item.
---------------------------------------------------------------------------

local Worker = {}
Worker.__index = Worker

function Worker:need_target()
  if self.target then return true end
  local err
  self.target, err = pg.connect(self.job.target, { name = "target", application_name = self.job.application_name })
  return self.target ~= nil, err
end

function Worker:need_replica()
  if self.replica then return true end
  local replica, err = pg.connect(self.job.replica, { name = "replica", application_name = self.job.application_name })
  if not replica then return nil, err end
  self.replica = replica
  self.names, self.expected = lsn.names(replica:server_version()), lsn(self.job.expect_replay_lsn)
  return true
end

-- The replica, checked before a table or a chunk is read from it.
function Worker:checked_replica(item)
  local ok, err = self:need_replica()
  if not ok then return nil, err end
  return worker.check_replica(self.replica, self.names, self.expected,
    item.chunk and (("%s (chunk %d)"):format(item.table, item.chunk)) or item.table)
end

local OPS = {}

-- A whole table: one transaction, emptied and written frozen.
function OPS.copy(w, item, started, t0)
  local from_sql, to_sql, truncate = worker.whole_sql(item)
  local r, err = w.target:transaction(function(c)
    local res, terr = c:exec(truncate)
    if not res then return nil, terr end
    return pg.copy{ from = w.replica, from_sql = from_sql, to = c, to_sql = to_sql,
      progress_interval = w.job.progress_interval, on_progress = progress_fn(w.emit, item.table) }
  end)
  if not r then return nil, err end
  w.emit{ event = "loaded", table = item.table, rows = r.rows, bytes = r.bytes, started = started,
          ended = host.now(), seconds = host.monotonic() - t0 }
  return true
end

-- A chunk: one transaction, committed only once the parent has journaled its
-- transaction id.
function OPS.chunk(w, item, started, t0)
  local tname, job, emit = item.table, w.job, w.emit
  local r, err = w.target:transaction(function(c)
    local x, xerr = c:exec("select txid_current()::text as xid")
    if not x then return nil, xerr end
    local xid = x[1].xid
    local copied, cerr = pg.copy{ from = w.replica, from_sql = item.from_sql, to = c, to_sql = item.to_sql,
      progress_interval = job.progress_interval, on_progress = progress_fn(emit, tname, item.chunk) }
    if not copied then return nil, cerr end
    emit{ event = "commit", table = tname, chunk = item.chunk, ack = item.ack, xid = xid, rows = copied.rows,
          bytes = copied.bytes, started = started }
    local ok, aerr = wait_ack(c, { pid = job.ack_pid, key = item.ack }, tname, item.chunk)
    if not ok then return nil, aerr end
    copied.xid = xid
    return copied
  end)
  if not r then return nil, err end
  emit{ event = "chunk", table = tname, chunk = item.chunk, ack = item.ack, rows = r.rows, bytes = r.bytes, xid = r.xid,
        started = started, ended = host.now(), seconds = host.monotonic() - t0 }
  return true
end

function OPS.index(w, item, started, t0)
  for _, sql in ipairs(item.sql) do
    local res, err = w.target:exec(sql)
    if not res then return nil, err end
  end
  w.emit{ event = "indexed", table = item.table, index = item.index, started = started, ended = host.now(),
          seconds = host.monotonic() - t0 }
  return true
end

function OPS.analyze(w, item, started, t0)
  local res, err = w.target:exec("ANALYZE " .. pg.qualify(item.schema, item.name))
  if not res then return nil, err end
  w.emit{ event = "analyzed", table = item.table, started = started, ended = host.now(),
          seconds = host.monotonic() - t0 }
  return true
end

-- One item: its sessions, "start", the replica checked before data is read, the work.
function Worker:run(item)
  local started, t0 = host.now(), host.monotonic()
  local ok, err = self:need_target()
  if not ok then return nil, err end
  self.emit{ event = "start", op = item.op, table = item.table, chunk = item.chunk, index = item.index,
             started = started }
  if item.op == "copy" or item.op == "chunk" then
    ok, err = self:checked_replica(item)
    if not ok then return nil, err end
  end
  local op = OPS[item.op] or error("fullload.task: unknown item " .. tostring(item.op))
  return op(self, item, started, t0)
end

local function failed(err, tname)
  if type(err) == "table" then
    err.table = err.table or tname
    return nil, err
  end
  return nil, errors.new{ kind = "fullload", message = tostring(err), table = tname }
end

function worker.task(job, emit)
  local w = setmetatable({ job = job, emit = emit }, Worker)
  for _, item in ipairs(job.items) do
    local ok, err = w:run(item)
    if not ok then return failed(err, item.table) end
  end
  if w.replica then w.replica:close() end
  if w.target then w.target:close() end
  return true
end

return worker
