--[[
migrun.fullload: the full load (issue step 9): every table copied from the
paused maintenance replica into the target, in parallel streams; the largest
tables cut into chunks that load side by side and resume one by one; each
table's indexes built and its statistics taken as soon as it is complete.

Why it is shaped this way:
- Consistency comes from the replica being paused: while replay is stopped,
  every session sees the same frozen data, so the streams need no exported
  snapshot and a table can be read in pieces by several sessions. Before
  each table or chunk its worker checks that the replica is still in
  recovery, paused and at the expected replay LSN; if not, it stops with an
  error rather than load data from another point in time.
- Real parallelism: tasks run in `jobs` child processes of this same migrun
  binary (migrun.pool), each given its task as JSON on its stdin (connection
  strings, which may hold passwords, never go in argv), reporting JSON lines.
  The parent decides what runs next as tasks finish: chunks and tables
  largest first (LPT: the makespan is within 4/3 of the best static split),
  chunks on all streams but one while other work is queued (the other
  tables load beside a dominant table's chunks: a run killed in them
  leaves the rest done), a table's index builds as soon as its last chunk
  commits, so they overlap with the load of the others, within the same
  `jobs` budget, given the streams nothing else uses as parallel workers;
  the last `jobs` chunks of a table are half size (a short tail).
- A table above `split_bytes` is cut into chunks of about `chunk_bytes`
  (migrun.chunks: integer-key ranges, else block ranges). Each chunk is one
  transaction on the target: COPY (SELECT ... WHERE <range>) TO STDOUT
  (FORMAT binary) on the replica into COPY ... FROM STDIN, server to server
  with flat memory (pg.copy). The table is emptied once, before its first
  chunk; the chunk plan is journaled before any chunk runs, so a rerun cuts
  the table the same way whatever the configuration says by then.
- Resume by chunk, exactly: before a chunk commits, its worker reports its
  transaction id and waits until the parent has journaled it (the parent
  then takes an advisory lock on the target that the worker looks for in
  pg_locks: a parent that died never takes it, so a worker never commits a
  chunk the journal does not know of). A rerun asks the target what became
  of each journaled transaction (txid_status): committed chunks count as
  loaded, the others left nothing (a chunk is one transaction) and load
  again; no range has to be deleted and no table rescanned.
- A table below the threshold stays one transaction: BEGIN; TRUNCATE; COPY
  ... (FORMAT binary, FREEZE); COMMIT. FREEZE writes the rows frozen and
  all-visible (PostgreSQL allows it because the table was truncated in the
  same transaction), so the target's first vacuums do not rewrite every
  page. Chunks cannot be frozen: they are concurrent transactions on one
  table. Small tables share a task (a process start costs more than they do).
- After a table is complete: its indexes and key/unique/exclusion
  constraints (opts.post, from schema.table_post_data: only what the target
  lacks), each statement a task of its own for a split table so that they
  build side by side, then ANALYZE (after the indexes, so that expression
  indexes get statistics), so the target serves with statistics from the
  start. Foreign keys and the rest of post-data come after the load.
- Progress is in COPY bytes (binary rows as sent) against the expected size
  (the tables' `bytes`): a close estimate, not a promise.
- The world failing (issue 24, docs/faults.md): a worker whose connection is
  lost (a server restarted, a network failed, a COPY stalled: err.lost)
  connects again every 2 s up to opts.reconnect_timeout, ends the sessions
  the lost connections may have left on the servers, checks the replica
  again and does its item again in a new transaction, up to opts.attempts
  times (migrun.fullload_worker); a chunk whose COMMIT may have gone through
  is asked about first, so nothing loads twice. The parent's own session on
  the target (the acknowledgements) is made again the same way, its
  advisory locks taken again: they are keyed by a class of this run's, not
  by a session. A full disk (err.disk_full) is never tried again: the run
  stops with the target's storage named, what to do, and the journal to
  resume from. Each loss and recovery is said through opts.echo (with the
  seconds it took) and listed in the result's `recoveries`.

  local fullload = require "migrun.fullload"
  local state = {}                       -- journaled by the caller: see opts.state
  local result = assert(fullload.run{
    replica = replica_conninfo, target = target_conninfo,
    tables = { { schema = "public", name = "orders", bytes = 123456 }, ... },
    jobs = 2, expect_replay_lsn = "0/3000060",
    state = state, save = function(fields) journal(fields, state) end,
    post = assert(schema.table_post_data(replica_db, target_db, tables)),
    on_progress = function(bytes_done, bytes_total, rows_done, detail) end,
    on_table = function(r) end,          -- as each table is complete
  })

  fullload.run(opts) -> { tables = {r...}, chunks = {c...}, bytes=, rows=, seconds=,
                          streams=, skipped = {"s.t"}, split = {["s.t"] = plan},
                          recoveries = {r...} } | nil, err
      opts.replica, opts.target: conninfo strings; opts.tables: list of
      { schema=, name=, bytes= }; opts.jobs (default 2); opts.expect_replay_lsn
      (required: an LSN string or migrun.lsn value).
      opts.chunk_bytes, opts.split_bytes: tables above split_bytes (default
      2 x chunk_bytes) are cut into chunks of chunk_bytes (default: the
      pending bytes / (4 x jobs), between 64 MiB and 1 GiB), the last `jobs`
      of them in halves (chunks.plan's tail).
      opts.state: what is done so far, kept up to date as it changes:
        loaded["s.t"] = r (a table complete; r as on_table's),
        chunks["s.t"] = { plan = chunks.plan's, done = { ["i"] = c },
                          committing = { ["i"] = { xid =, rows =, bytes = } } },
        indexed["s.t"] = { started =, ended =, seconds =, indexes = n, stream =,
                           parallel_workers = (the most one of its builds was given) },
        analyzed["s.t"] = { started =, ended =, seconds =, stream = }
      opts.save(paths): persist what is now in state at each path, a list
      of keys ({"chunks", "s.t", "done", "7"}; a path of one key is a whole
      field), nil there meaning removed; one call for the list. Each change
      is saved by its own path, so a save costs what changed, not the
      state's size (a load of thousands of chunks). Called before the run
      depends on it (a chunk is acknowledged only after the save of its
      committing entry returned); what only
      records work done is saved at most every opts.save_interval seconds
      (default 1) and when the run ends, however it ends, but a whole
      table of opts.save_at_once_bytes or more (default 8 MiB) is saved as
      soon as it is loaded, with whatever waited; on_table,
      on_chunk and on_post are called once what they tell is saved.
      opts.done: a set of "s.t" already loaded (as state.loaded).
      opts.post: { ["s.t"] = schema.table_post_data items }.
      opts.reconnect_timeout (seconds, default 300), opts.attempts (default
      5): a lost connection (above); opts.stall_timeout: the COPY stall
      bound of the workers' connections (default pg.STALL_TIMEOUT, 20 s);
      the short statements of the workers and the parent (BEGIN, COMMIT,
      locks) are bounded by 3 x it. opts.on_recovery(r): r = { table =,
      chunk =, index =, op =, attempt =, message =, seconds = (lost to
      going again), outcome = "redo" | "committed", lost_at = host.now() when
      the worker lost it }.
      opts.hash (default false): what has just committed hashed in a lane of
      its own beside the streams (migrun.loadhash: a split table's chunks on
      the replica, its target side whole once complete; a whole table on
      both sides), the table judged once its last part is in:
      state.hashed, on_hashed(verdict) = { table =, equal =,
      rows = {replica, target}, hash = {...}, parts = n }, result.hashed
      (the verdicts of this run); a table found different is not an error
      of the load (the caller says what it means).
      opts.analyze (default true). opts.dry_run with opts.echo(line): print
      the split, the expected streams and every statement, run nothing;
      opts.progress_interval (seconds between progress reports, default 1).
      on_table(r): r = { table="s.t", rows=, bytes=, started=epoch, ended=epoch,
      seconds=, stream=k [, chunks = n] }. on_chunk(c): c = { table=, chunk=i,
      of=n, range=, rows=, bytes=, started=, ended=, seconds=, stream=, xid= }.
      on_post(what, r): what = "indexed" | "analyzed", r = { table=, ... }.
      on_progress(bytes_done, bytes_total, rows_done, detail) with detail =
      { table=, chunk=, stream=, pid=, bytes=, rows= } (what moved).
      Callbacks run in the parent, between reads.
      err: kind "fullload", where "stream k" or the server, table = "s.t";
      err.disk_full: the target's storage is full (the message says what to do).
  fullload.plan(tables, jobs) -> { {tables = {...}, bytes = n}, ... }   the LPT split
      (what the streams are expected to do; the run itself schedules as tasks end)
  fullload.chunk_size(bytes, jobs) -> the default chunk_bytes
  fullload.task(job, emit)   a worker's task: migrun.fullload_worker.task (internal)

How the code is laid out: fullload.run makes a Load (the run's state, its
sessions and its journal) and calls its steps in order: plan (what is
pending, how the large tables are cut), resume (what became of the chunks
journaled as committing), schedule (the tasks on migrun.pool), describe (the
split and the streams; every statement in a dry run), execute (the pool run,
its events handled by Load:on_event, a table finished by Load:table_complete
and Load:enqueue_post). Journal writes and the callbacks they gate go
through a Saver. What a worker does is migrun.fullload_worker.
]]
local pg = require "migrun.pg"
local db = require "migrun.db"
local pool = require "migrun.pool"
local chunks = require "migrun.chunks"
local errors = require "migrun.error"
local host = require "migrun.host"
local lsn = require "migrun.lsn"
local text = require "migrun.text"
local worker = require "migrun.fullload_worker"
local loadhash = require "migrun.loadhash"
local rowhash = require "migrun.rowhash"

local fullload = {}

-- The fields of opts.state (each a table, keyed by "s.t").
local STATE_FIELDS = { "loaded", "chunks", "indexed", "analyzed", "hashed" }
fullload.STATE_FIELDS = STATE_FIELDS

local key = text.key
local MiB = 1024 * 1024
local MIN_CHUNK, MAX_CHUNK = 64 * MiB, 1024 * MiB
-- Tables below this share a task: starting a worker (a process, two
-- connections) costs some tens of milliseconds, more than a small table does.
local BATCH_BYTES, BATCH_TABLES = 32 * MiB, 25
-- What an index build or an ANALYZE weighs in the queue, against COPY bytes.
local INDEX_WEIGHT, ANALYZE_WEIGHT = 0.3, 0.05
-- The pool's entry: the module whose task() a worker process runs.
local WORKER = "migrun.fullload_worker"

local function fail(where, message, extra)
  local e = { kind = "fullload", where = where, message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return nil, errors.new(e)
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

fullload.task = worker.task -- the pool's entry before the worker had a module of its own

---------------------------------------------------------------------------
-- The split
---------------------------------------------------------------------------

function fullload.plan(tables, jobs)
  assert(type(tables) == "table", "fullload.plan: a list of tables expected")
  jobs = jobs or 2
  assert(math.type(jobs) == "integer" and jobs >= 1, "fullload.plan: jobs must be a positive integer")
  local sorted = table.move(tables, 1, #tables, 1, {})
  -- Largest first; equal sizes in name order so the plan is the same every run.
  table.sort(sorted, function(a, b)
    local x, y = a.bytes or 0, b.bytes or 0
    if x ~= y then return x > y end
    return key(a) < key(b)
  end)
  local streams = {}
  for k = 1, math.min(jobs, #sorted) do streams[k] = { stream = k, tables = {}, bytes = 0 } end
  for _, t in ipairs(sorted) do
    local least = streams[1]
    for _, s in ipairs(streams) do if s.bytes < least.bytes then least = s end end
    least.tables[#least.tables + 1] = t
    least.bytes = least.bytes + (t.bytes or 0)
  end
  return streams
end

function fullload.chunk_size(bytes, jobs)
  local size = (bytes or 0) / (4 * (jobs or 2))
  return math.tointeger(math.floor(math.max(MIN_CHUNK, math.min(MAX_CHUNK, size))))
end

---------------------------------------------------------------------------
-- The journal: a Saver
---------------------------------------------------------------------------
-- A chunk's transaction is saved before it may commit (a rerun asks the
-- target what became of it). Everything else that is done (a table, a
-- chunk, indexes, statistics) is saved at most every opts.save_interval
-- seconds and at the end: each save is a write and an fsync, which on a
-- schema of thousands of small tables costs more than their loads. What is
-- saved is named by its path in the state, so a save costs what changed
-- (a chunk's record), never the whole state: with the state rewritten at
-- each chunk, a load of N chunks cost O(N^2). A kill loses at most that
-- interval's records, and what they said is
-- done again by the rerun, the same way: a whole table truncated and loaded,
-- a chunk's journaled transaction asked about, the indexes listed from the
-- target, ANALYZE run. A whole table whose load again would cost more than
-- a save (SAVE_AT_ONCE_BYTES: some 50 ms of a stream, where a save is a
-- write and an fsync) is saved as soon as it is loaded: a rerun after a kill
-- loaded again the tables of the second before it (six in one of the
-- bench's reruns). What is done is said (on_table, on_chunk, on_post) once
-- it is saved: a table said loaded is never loaded again.

local SAVE_AT_ONCE_BYTES = 8 * 1024 * 1024

local Saver = {}
Saver.__index = Saver

-- save: opts.save or nil; off: a dry run (nothing saved, everything told at once)
local function new_saver(save, interval, off)
  return setmetatable({ write = save, interval = interval or 1, off = off or not save,
    dirty = {}, dirty_set = {}, saved_at = host.monotonic(), untold = {} }, Saver)
end

-- A path in the state: a field's name alone, or a list of keys.
local function as_path(path)
  if type(path) == "string" then return { path } end
  return path
end

-- Writes what is dirty (one call), then tells what waited for it.
function Saver:flush()
  local paths = self.dirty
  self.dirty, self.dirty_set = {}, {}
  if #paths > 0 then self.write(paths) end
  self.saved_at = host.monotonic()
  local list = self.untold
  self.untold = {}
  for _, t in ipairs(list) do t[1](table.unpack(t, 2, t.n)) end
end

-- Calls fn(...) once what is dirty now is saved (at once without a journal).
function Saver:tell(fn, ...)
  if not fn then return end
  if self.off then return fn(...) end
  self.untold[#self.untold + 1] = table.pack(fn, ...)
end

function Saver:flush_due()
  if (#self.dirty > 0 or #self.untold > 0) and host.monotonic() - self.saved_at >= self.interval then self:flush() end
end

-- Marks what is at path (a field's name or a list of keys) in the state to be
-- saved; now: saved before this returns (alone).
function Saver:save(path, now)
  if self.off then return end
  path = as_path(path)
  if now then
    self.write{ path }
  else
    local id = table.concat(path, "\0")
    if not self.dirty_set[id] then
      self.dirty_set[id] = true
      self.dirty[#self.dirty + 1] = path
    end
    self:flush_due()
  end
end

-- The same for a list of paths (now: one write for them all).
function Saver:save_all(paths, now)
  if self.off or #paths == 0 then return end
  if now then
    local list = {}
    for i, p in ipairs(paths) do list[i] = as_path(p) end
    self.write(list)
  else
    for _, p in ipairs(paths) do self:save(p) end
  end
end

---------------------------------------------------------------------------
-- The parent: a Load
---------------------------------------------------------------------------

local function check_opts(opts)
  assert(type(opts) == "table", "fullload.run: options table expected")
  assert(type(opts.replica) == "string", "fullload.run: opts.replica (a conninfo string) is required")
  assert(type(opts.target) == "string", "fullload.run: opts.target (a conninfo string) is required")
  assert(type(opts.tables) == "table", "fullload.run: opts.tables (a list) is required")
  for i, t in ipairs(opts.tables) do
    assert(type(t) == "table" and type(t.schema) == "string" and type(t.name) == "string",
      ("fullload.run: tables[%d] must be { schema=, name=, bytes= }"):format(i))
  end
  local jobs = opts.jobs or 2
  assert(math.type(jobs) == "integer" and jobs >= 1, "fullload.run: jobs must be a positive integer")
  assert(opts.expect_replay_lsn ~= nil, "fullload.run: opts.expect_replay_lsn (the captured replay LSN) is required")
  local expected = opts.expect_replay_lsn
  if type(expected) == "string" then expected = assert(lsn.parse(expected)) end
  for _, f in ipairs{ "on_progress", "on_table", "on_chunk", "on_post", "on_hashed", "echo", "save" } do
    assert(opts[f] == nil or type(opts[f]) == "function", "fullload.run: opts." .. f .. " must be a function")
  end
  for _, f in ipairs{ "chunk_bytes", "split_bytes" } do
    assert(opts[f] == nil or (type(opts[f]) == "number" and opts[f] > 0), "fullload.run: opts." .. f
      .. " must be a number of bytes > 0")
  end
  assert(opts.save_interval == nil or (type(opts.save_interval) == "number" and opts.save_interval >= 0),
    "fullload.run: opts.save_interval must be a number of seconds >= 0")
  assert(opts.save_at_once_bytes == nil or (type(opts.save_at_once_bytes) == "number" and opts.save_at_once_bytes >= 0),
    "fullload.run: opts.save_at_once_bytes must be a number of bytes >= 0")
  assert(opts.reconnect_timeout == nil or (type(opts.reconnect_timeout) == "number" and opts.reconnect_timeout > 0),
    "fullload.run: opts.reconnect_timeout must be a number of seconds > 0")
  assert(opts.attempts == nil or (math.type(opts.attempts) == "integer" and opts.attempts >= 1 and opts.attempts < 128),
    "fullload.run: opts.attempts must be a whole number from 1 to 127")
  assert(opts.on_recovery == nil or type(opts.on_recovery) == "function", "fullload.run: opts.on_recovery must be a function")
  assert(opts.stall_timeout == nil or (type(opts.stall_timeout) == "number" and opts.stall_timeout > 0),
    "fullload.run: opts.stall_timeout must be a number of seconds > 0")
  return jobs, tostring(expected)
end

local function chunk_label(plan, i)
  return ("%s chunk %d/%d (%s)"):format(plan.table, i, plan.count, chunks.label(plan, i))
end

-- The transaction of a chunk journaled as committing, as the target knows it
-- now: "committed" | "aborted", waiting while the old session still ends.
local function xact_status(target, xid)
  local deadline = host.monotonic() + 60
  while true do
    local res, err = target:exec("select txid_status($1::bigint) as s", xid)
    if not res then return nil, err end
    local s = res[1].s
    if s == "committed" or s == "aborted" then return s end
    if s ~= "in progress" or host.monotonic() > deadline then
      return nil, ("transaction %s is %s on the target"):format(xid, s == pg.null and "unknown (too old?)" or s)
    end
    host.sleep(0.2)
  end
end

local Load = {}
Load.__index = Load

function Load.new(opts)
  local jobs, expected = check_opts(opts)
  local state = opts.state or {}
  for _, f in ipairs(STATE_FIELDS) do state[f] = state[f] or {} end
  local given = {}
  for k, v in pairs(opts.done or {}) do
    if v and not state.loaded[k] then state.loaded[k], given[#given + 1] = v, { "loaded", k } end
  end
  local by_key = {}
  for _, t in ipairs(opts.tables) do by_key[key(t)] = t end
  local saver = new_saver(opts.save, opts.save_interval, opts.dry_run)
  saver:save_all(given)
  return setmetatable({
    opts = opts, jobs = jobs, expected = expected, state = state, by_key = by_key,
    echo = opts.echo or function() end, dry = opts.dry_run,
    saver = saver,
    post = opts.post or {}, analyze = opts.analyze ~= false, t0 = host.monotonic(),
    hashes = opts.hash and loadhash.new(state.hashed) or nil, -- what has just committed, hashed (opts.hash)
    verdicts = {},        -- loadhash's, as tables are judged
    to_hash = {},         -- task -> the hash items of the whole tables it loaded
    split = {},           -- "s.t" -> state.chunks["s.t"], the tables loaded in chunks
    notes = {},           -- why a large table stays whole
    truncates = {},       -- split tables with no chunk loaded yet: emptied once, before the run
    complete_now = {},    -- split tables whose every chunk is loaded already
    results = {}, chunk_results = {}, bytes_done = 0, rows_done = 0, bytes_total = 0,
    moving = {},          -- "s.t" or "s.t#i" -> { bytes, rows } of a copy under way
    post_left = {},       -- "s.t" -> index items not yet built
    loads_open = 0,       -- copy and chunk items queued or under way (0: the load's tail)
    post_times = {},      -- "s.t" -> { started, ended, stream }
    parallel_post = {},   -- "s.t" -> true: its index items are tasks of their own, ANALYZE after them
    acked = {},           -- ack key -> true while the parent holds it
    chunk_ack = {},       -- "s.t#i" -> the ack key last taken for that chunk
    ack_serial = 0,       -- the last chunk's advisory lock key: unique in this run
    -- the advisory lock class of this run's acknowledgements: a session of
    -- the parent's that is lost and made again takes its locks again
    ack_class = math.random(1, 0x7fffffff),
    reconnect_timeout = opts.reconnect_timeout or db.RECONNECT_TIMEOUT, attempts = opts.attempts or 5,
    short = 3 * (opts.stall_timeout or pg.STALL_TIMEOUT), -- the parent's statements are short (as the workers')
    recoveries = {},      -- each lost connection a worker rode out
    lost_message = {},    -- "s.t[#i]/op" -> how its connection was lost
    batch = {}, batch_bytes = 0,
  }, Load)
end

function Load:save(path, now) self.saver:save(path, now) end
function Load:save_all(paths, now) self.saver:save_all(paths, now) end
function Load:tell(fn, ...) self.saver:tell(fn, ...) end

-- The parent's sessions: the replica to plan the split, the target to
-- empty split tables, acknowledge chunks and ask what became of them.
function Load:connect()
  local err
  self.replica, err = pg.connect(self.opts.replica, { name = "replica" })
  if not self.replica then return nil, err end
  self.target, err = pg.connect(self.opts.target, { name = "target" })
  if not self.target then self.replica:close() return nil, err end
  if self.hashes then
    self.hash_method, err = rowhash.method(self.replica, self.target)
    if not self.hash_method then self:close() return nil, err end
  end
  self.target_backend, err = db.backend(self.target)
  if not self.target_backend then self:close() return nil, err end
  return true
end

-- A statement on the parent's target session, which is made again when it
-- is lost (the statements sent here may run twice: locks, unlocks, status
-- questions, a TRUNCATE before anything loads); the locks it held are taken
-- again, and the session it had is ended.
function Load:target_exec(sql, ...)
  local stmt = { sql, n = select("#", ...) + 1, timeout = self.short, ... }
  local res, err = self.target:exec(stmt)
  if res or not db.is_lost(err) then return res, err end
  self.target:close()
  local opts = self.opts
  local conn, waited = db.reconnect(function() return pg.connect(opts.target, { name = "target" }) end,
    { timeout = self.reconnect_timeout })
  if not conn then return nil, waited end
  self.target = conn
  local ok, eerr = db.end_backend(conn, self.target_backend)
  if not ok then return nil, eerr end
  self.target_backend, eerr = db.backend(conn)
  if not self.target_backend then return nil, eerr end
  self.echo(("the full load's own target session was lost (%s); connected again after %.1f s"):format(
    tostring(err.message), waited))
  for ack in pairs(self.acked) do
    local r, lerr = conn:exec{ "select pg_advisory_lock($1::int, $2::int)", self.ack_class, ack, timeout = self.short }
    if not r then return nil, lerr end
  end
  return conn:exec(stmt)
end

function Load:close()
  if self.replica then self.replica:close() end
  if self.target then self.target:close() end
end

-- What is pending, largest first, and the sizes that follow from it.
function Load:select()
  local pending, skipped, pending_bytes = {}, {}, 0
  for _, t in ipairs(self.opts.tables) do
    if self.state.loaded[key(t)] then
      skipped[#skipped + 1] = key(t)
    else
      pending[#pending + 1] = t
      pending_bytes = pending_bytes + (t.bytes or 0)
    end
  end
  table.sort(pending, function(a, b)
    if (a.bytes or 0) ~= (b.bytes or 0) then return (a.bytes or 0) > (b.bytes or 0) end
    return key(a) < key(b)
  end)
  self.pending, self.skipped = pending, skipped
  self.chunk_bytes = self.opts.chunk_bytes or fullload.chunk_size(pending_bytes, self.jobs)
  self.split_bytes = self.opts.split_bytes or 2 * self.chunk_bytes
  -- Small tables share a task, up to a share of the load small enough to
  -- keep every stream busy.
  self.batch_limit = math.min(BATCH_BYTES, pending_bytes / (4 * self.jobs))
end

-- The replica checked once before anything is planned from it.
function Load:check_replica()
  local pending = self.pending
  if self.dry or #pending == 0 then return true end
  local first = key(pending[1]) .. (#pending > 1 and (" (and %d other table%s)"):format(#pending - 1,
    #pending > 2 and "s" or "") or "")
  local replica = self.replica
  local ok, err = worker.check_replica(replica, lsn.names(replica:server_version()), lsn(self.expected), first)
  if not ok then err.table = key(pending[1]) return nil, err end
  return true
end

-- The split: journaled plans first (a rerun cuts a table the way it was cut).
function Load:plan()
  local state, planned = self.state, {}
  for _, t in ipairs(self.pending) do
    local k = key(t)
    local cs = state.chunks[k]
    if cs then
      self.split[k] = cs
    elseif (t.bytes or 0) > self.split_bytes then
      -- the last `jobs` chunks in halves: those in flight at the end (or at a
      -- kill) are shorter, and the table's indexes may start sooner
      local plan, why = chunks.plan(self.replica, t, { chunk_bytes = self.chunk_bytes, split_bytes = self.split_bytes,
        tail = self.jobs })
      if plan == nil then return nil, why end
      if plan then
        state.chunks[k] = { plan = plan, done = {}, committing = {} }
        self.split[k] = state.chunks[k]
        planned[#planned + 1] = { "chunks", k }
      else
        self.notes[#self.notes + 1] = ("%s stays whole: %s"):format(k, why)
      end
    end
  end
  self:save_all(planned, true)
  return true
end

-- Chunks journaled as committing: what became of their transactions.
function Load:resume()
  local asked = {}
  for k, cs in pairs(self.split) do
    for i, c in pairs(cs.committing) do
      asked[#asked + 1] = { "chunks", k, "done", i }
      asked[#asked + 1] = { "chunks", k, "committing", i }
      if not cs.done[i] then
        local s, serr = xact_status(self.target, c.xid)
        if not s then return nil, errors.new{ kind = "fullload", where = "target", table = k,
          message = ("chunk %s of %s: %s"):format(i, k, serr),
          hint = "wait until the target has ended that session, then run again" } end
        if s == "committed" then
          cs.done[i] = { chunk = tonumber(i), rows = c.rows, bytes = c.bytes, xid = c.xid,
            started = c.started, stream = c.stream, recovered = true }
          self.echo(("%s chunk %s committed before the interruption (transaction %s): not loaded again"):format(
            k, i, c.xid))
        else
          self.echo(("%s chunk %s did not commit (transaction %s): loaded again"):format(k, i, c.xid))
        end
      end
      cs.committing[i] = nil
    end
  end
  self:save_all(asked, true)
  return true
end

---------------------------------------------------------------------------
-- The tasks
---------------------------------------------------------------------------

function Load:new_pool()
  -- Chunks on every stream but one while anything else is queued: the
  -- other tables load beside a dominant table's chunks (a run killed in its
  -- chunks leaves them done), and the stream goes back to the chunks once
  -- nothing else waits for it.
  local limits = self.jobs >= 2 and { chunk = self.jobs - 1 } or nil
  -- What has just committed is hashed in a lane of its own beside the
  -- streams, not in them: where cores are to spare it costs the load nothing.
  self.pool = pool.new{ jobs = self.jobs, entry = WORKER, limits = limits, soft = { chunk = true },
    lanes = self.hashes and { hash = 1 } or nil,
    on_tick = function() self.saver:flush_due() end,
    on_start = function(task, idle) return self:share_idle(task, idle) end,
    on_done = function(task) return self:hash_after(task) end }
  self.pool.on_event = function(task, ev) return self:on_event(task, ev) end
  self.job_base = { replica = self.opts.replica, target = self.opts.target, expect_replay_lsn = self.expected,
    progress_interval = self.opts.progress_interval or 1.0, ack_class = self.ack_class,
    reconnect_timeout = self.reconnect_timeout, attempts = self.attempts, stall_timeout = self.opts.stall_timeout,
    application_name = pg.application_name("fullload"), -- the run's identity (migrun.playbook.sessions)
    hash_method = self.hash_method }
end

-- An index build is given the streams nothing else will use as parallel
-- workers (the tail of a load: a split table's indexes once its last chunk
-- is in), and none while every stream is busy: the server's own default
-- (2 per build) would put three processes per stream on cores the loads use.
--
-- At the tail (nothing left to load) a build gets every other stream as
-- workers, whatever the other builds took: they share the cores, and when the
-- short ones end the longest goes on in all its processes, not in one while
-- the others idle. Measured on a rerun's two builds of `big` side by side,
-- its `email` key took 1.7-2.1 s alone in one process, 1.3-1.9 s in the
-- floor's three (docs/benchmarks.md). They take no more of the pool's share.
function Load:share_idle(task, idle)
  local used, workers = 0, idle
  if self.loads_open == 0 then workers = math.max(idle, self.jobs - 1) end
  for _, it in ipairs(task.job.items) do
    if it.op == "index" then it.parallel_workers, used = workers, idle end
  end
  return used
end

-- A task's job: what every task is told, and its items.
function Load:job(items)
  local j = {}
  for k, v in pairs(self.job_base) do j[k] = v end
  j.items = items
  return j
end

function Load:add(items, cost, label, group)
  for _, it in ipairs(items) do
    if it.op == "copy" or it.op == "chunk" then self.loads_open = self.loads_open + 1 end
  end
  self.pool:add{ job = self:job(items), cost = cost, label = label, group = group }
end

-- The work after a table is complete: its index items, then ANALYZE.
function Load:post_items(k)
  local t = self.by_key[k]
  local items = {}
  for _, it in ipairs(self.post[k] or {}) do
    items[#items + 1] = { op = "index", table = k, schema = t.schema, name = t.name, index = it.name,
      sql = it.sql, kind = it.kind }
  end
  return items
end

function Load:analyze_item(k)
  local t = self.by_key[k]
  return { op = "analyze", table = k, schema = t.schema, name = t.name }
end

function Load:needs_analyze(k) return self.analyze and not self.state.analyzed[k] end

-- Tasks added for a table just completed (or found complete on a rerun):
-- each index item alone for a split table (they build side by side), then
-- ANALYZE once they are done; one task for the others.
function Load:enqueue_post(k, parallel)
  local items = self:post_items(k)
  local bytes = (self.by_key[k].bytes or 0)
  self.post_left[k] = #items
  if #items == 0 then
    if self:needs_analyze(k) then self:add({ self:analyze_item(k) }, bytes * ANALYZE_WEIGHT, "analyzing " .. k) end
    return
  end
  if parallel then
    self.parallel_post[k] = true -- ANALYZE once the last of them is built
    for _, it in ipairs(items) do
      self:add({ it }, bytes * INDEX_WEIGHT, ("building %s of %s"):format(it.index, k))
    end
  else
    if self:needs_analyze(k) then items[#items + 1] = self:analyze_item(k) end
    self:add(items, bytes * (INDEX_WEIGHT + ANALYZE_WEIGHT), "indexing " .. k)
  end
end

-- A split table: a task for each chunk not loaded yet.
function Load:schedule_chunks(t, cs)
  local k, plan, left = key(t), cs.plan, 0
  if self.hashes then
    self.hashes:expect(k, plan)
    local again = {}
    for i = 1, plan.count do if not cs.done[tostring(i)] then again[#again + 1] = "c" .. i end end
    self.hashes:forget(k, again)
    self:save{ "hashed", k }
    self:add_hash_tasks(t, self.hashes:missing_items(t, plan, cs.done), plan)
  end
  for i = 1, plan.count do
    if not cs.done[tostring(i)] then
      left = left + 1
      local from_sql, to_sql = chunks.copy_sql(plan, i)
      self.ack_serial = self.ack_serial + 1
      local bytes = plan.bytes * chunks.share(plan, i)
      self:add({ { op = "chunk", table = k, schema = t.schema, name = t.name, chunk = i, of = plan.count,
        from_sql = from_sql, to_sql = to_sql, ack = self.ack_serial } }, bytes, "loading " .. chunk_label(plan, i),
        "chunk")
      self.bytes_total = self.bytes_total + bytes
    end
  end
  if next(cs.done) == nil then self.truncates[#self.truncates + 1] = t end
  if left == 0 then self.complete_now[k] = true end
end

function Load:flush_batch()
  if #self.batch > 0 then
    self:add(self.batch, self.batch_bytes, "loading " .. self.batch[1].table)
    self.batch, self.batch_bytes = {}, 0
  end
end

-- A whole table: copy, indexes, ANALYZE in one task; small tables together.
function Load:schedule_whole(t)
  local k, bytes = key(t), t.bytes or 0
  local items = { { op = "copy", table = k, schema = t.schema, name = t.name } }
  if self.hashes then
    self.hashes:expect(k, nil)
    self.hashes:forget(k, { "whole" }) -- loaded again: judged again
    self:save{ "hashed", k }
  end
  for _, it in ipairs(self:post_items(k)) do items[#items + 1] = it end
  self.post_left[k] = #items - 1
  if self:needs_analyze(k) then items[#items + 1] = self:analyze_item(k) end
  self.bytes_total = self.bytes_total + bytes
  if bytes >= self.batch_limit then
    self:add(items, bytes, "loading " .. k)
    return
  end
  local batch = self.batch
  for _, it in ipairs(items) do batch[#batch + 1] = it end
  self.batch_bytes = self.batch_bytes + bytes
  local tables_in = 0
  for _, it in ipairs(batch) do if it.op == "copy" then tables_in = tables_in + 1 end end
  if self.batch_bytes >= self.batch_limit or tables_in >= BATCH_TABLES then self:flush_batch() end
end

-- Hash items as tasks of their own in the hash lane: a chunk just
-- committed, a part an earlier run loaded without its sums, the target's
-- side of a split table once complete (beside its index builds).
function Load:add_hash_tasks(t, items, plan)
  for _, it in ipairs(items) do
    local bytes = (t.bytes or 0) * (it.chunk and chunks.share(plan, it.chunk) or 1)
    self:add({ it }, bytes, ("hashing %s%s"):format(key(t), it.chunk and (" #" .. it.chunk) or ""), "hash")
  end
end

-- The whole tables a task has loaded, hashed by one task in the hash lane
-- once it is done (a batch of small tables: one process, not one each).
function Load:hash_after(task)
  local items = self.to_hash[task]
  if not items then return true end
  self.to_hash[task] = nil
  local bytes = 0
  for _, it in ipairs(items) do bytes = bytes + (self.by_key[it.table].bytes or 0) end
  self:add(items, bytes, "hashing " .. items[1].table, "hash")
  return true
end

-- A table an earlier run loaded whole or in chunks: what of it is not hashed yet.
function Load:hash_skipped(k)
  local t, cs = self.by_key[k], self.state.chunks[k]
  if not t then return end
  local plan = cs and cs.plan or nil
  self.hashes:expect(k, plan)
  self:save{ "hashed", k }
  local done = {}
  if plan then for i = 1, plan.count do done[tostring(i)] = true end end
  self:add_hash_tasks(t, self.hashes:missing_items(t, plan, done), plan)
  if plan then self:add_hash_tasks(t, self.hashes:complete_items(t, plan), plan) end
end

-- Tasks for what remains, and for tables loaded by an earlier run whose
-- indexes or statistics are not done.
function Load:schedule()
  self:new_pool()
  for _, t in ipairs(self.pending) do
    local cs = self.split[key(t)]
    if cs then self:schedule_chunks(t, cs) else self:schedule_whole(t) end
  end
  self:flush_batch()
  if self.hashes then for _, k in ipairs(self.skipped) do self:hash_skipped(k) end end
  for _, k in ipairs(self.skipped) do
    if #(self.post[k] or {}) > 0 or self:needs_analyze(k) then
      self:enqueue_post(k, self.split[k] ~= nil or self.state.chunks[k] ~= nil)
    end
  end
end

---------------------------------------------------------------------------
-- What will run: the split, the expected streams; every statement in a dry run
---------------------------------------------------------------------------

function Load:describe()
  local echo = self.echo
  if #self.skipped > 0 then echo("already loaded (skipped): " .. table.concat(self.skipped, ", ")) end
  for _, t in ipairs(self.pending) do
    local cs = self.split[key(t)]
    if cs then
      local plan = cs.plan
      local first, last = chunks.share(plan, 1), chunks.share(plan, plan.count)
      local size = text.bytes(plan.bytes * first)
      if last < first * 0.9 then size = size .. (", the last ones %s"):format(text.bytes(plan.bytes * last)) end
      echo(("split %s (%s) into %d chunks by %s, about %s each%s"):format(plan.table, text.bytes(plan.bytes),
        plan.count, plan.method == "key" and ("ranges of its key " .. plan.column) or "block ranges (ctid)",
        size, next(cs.done) and (", %d already loaded"):format(count(cs.done)) or ""))
    end
  end
  for _, line in ipairs(self.notes) do echo(line) end
  local est = {}
  for _, task in ipairs(self.pool.queue) do
    est[#est + 1] = { key = task.label:gsub("^%a+ ", ""), bytes = task.cost, task = task }
  end
  self.streams = fullload.plan(est, self.jobs)
  for _, s in ipairs(self.streams) do
    local labels = {}
    for _, e in ipairs(s.tables) do labels[#labels + 1] = e.key end
    echo(("stream %d (%s expected): %s"):format(s.stream, text.bytes(s.bytes), table.concat(labels, ", ")))
  end
end

local function item_statement(it)
  if it.op == "copy" then
    local from_sql, to_sql, truncate = worker.whole_sql(it)
    return ("target: BEGIN; %s; %s  <=  replica: %s; COMMIT"):format(truncate, to_sql, from_sql)
  elseif it.op == "chunk" then
    return ("target: BEGIN; %s  <=  replica: %s; COMMIT"):format(it.to_sql, it.from_sql)
  elseif it.op == "index" then
    return ("target: %s"):format(table.concat(it.sql, "; "))
  elseif it.op == "hash" then
    return ("%s: the row hash of %s%s (read only)"):format(table.concat(it.sides, " and "),
      pg.qualify(it.schema, it.name), it.where and (" where " .. it.where) or "")
  end
  return ("target: ANALYZE %s"):format(pg.qualify(it.schema, it.name))
end

function Load:split_plans()
  local out = {}
  for k, cs in pairs(self.split) do out[k] = cs.plan end
  return out
end

-- A dry run's statements, and its result.
function Load:dry_run()
  local echo = self.echo
  for _, t in ipairs(self.truncates) do
    echo(("target: TRUNCATE %s  (once, before its first chunk)"):format(pg.qualify(t.schema, t.name)))
  end
  for _, s in ipairs(self.streams) do
    for _, e in ipairs(s.tables) do
      for _, it in ipairs(e.task.job.items) do echo(("stream %d: %s"):format(s.stream, item_statement(it))) end
    end
  end
  for k in pairs(self.split) do
    local t = self.by_key[k]
    for _, it in ipairs(self:post_items(k)) do
      echo(("after %s is complete: target: %s"):format(k, table.concat(it.sql, "; ")))
    end
    if self.analyze then echo(("after %s is complete: target: ANALYZE %s"):format(k, pg.qualify(t.schema, t.name))) end
  end
  self:close()
  return { dry_run = true, tables = {}, chunks = {}, bytes = 0, rows = 0, seconds = 0,
           streams = self.streams, skipped = self.skipped, split = self:split_plans() }
end

---------------------------------------------------------------------------
-- The run: the pool's events
---------------------------------------------------------------------------

-- A split table complete: its record, then its indexes.
function Load:table_complete(k)
  local cs = self.split[k]
  local r = { table = k, rows = 0, bytes = 0, chunks = cs.plan.count }
  for _, c in pairs(cs.done) do
    r.rows, r.bytes = r.rows + (c.rows or 0), r.bytes + (c.bytes or 0)
    if c.started and (not r.started or c.started < r.started) then r.started = c.started end
    if c.ended and (not r.ended or c.ended > r.ended) then r.ended, r.stream = c.ended, c.stream end
  end
  r.seconds = r.started and r.ended and (r.ended - r.started) or nil
  self.state.loaded[k] = r
  self:save{ "loaded", k }
  self.results[#self.results + 1] = r
  self:tell(self.opts.on_table, r)
  if self.hashes then self:add_hash_tasks(self.by_key[k], self.hashes:complete_items(self.by_key[k], cs.plan), cs.plan) end
  self:enqueue_post(k, true)
end

-- Split tables with no chunk loaded yet are emptied once, now; those
-- complete already (a rerun) go on to their indexes.
function Load:prepare_target()
  for _, t in ipairs(self.truncates) do
    local res, err = self:target_exec("TRUNCATE " .. pg.qualify(t.schema, t.name))
    if not res then err.table = key(t) return nil, err end
  end
  for k in pairs(self.split) do
    if self.complete_now[k] then self.complete_now[k] = nil self:table_complete(k) end
  end
  return true
end

function Load:progress(ev, task)
  if not self.opts.on_progress then return end
  local b, r = self.bytes_done, self.rows_done
  for _, m in pairs(self.moving) do b, r = b + m.bytes, r + m.rows end
  self.opts.on_progress(b, self.bytes_total, r, { table = ev.table, chunk = ev.chunk, stream = task.stream,
    pid = task.pid, bytes = ev.bytes, rows = ev.rows })
end

-- Handlers of the workers' events (migrun.fullload_worker), by ev.event:
-- (load, task, ev, k = the table, mkey = "s.t" or "s.t#i") -> true | nil, err
local EVENTS = {}

function EVENTS.start(load, task, ev, k, mkey)
  if ev.op == "copy" then task.label = "loading " .. k
  elseif ev.op == "chunk" then task.label = "loading " .. chunk_label(load.split[k].plan, ev.chunk)
  elseif ev.op == "index" then task.label = ("building %s of %s"):format(ev.index, k)
  else task.label = "analyzing " .. k end
  if ev.op == "index" and not load.post_times[k] then load.post_times[k] = { started = ev.started } end
  if ev.op == "copy" or ev.op == "chunk" then
    -- a table under way shows at once, before its first bytes (its TRUNCATE may wait for a lock)
    load.moving[mkey] = { bytes = 0, rows = 0 }
    load:progress({ table = k, chunk = ev.chunk, bytes = 0, rows = 0 }, task)
  end
  return true
end

function EVENTS.progress(load, task, ev, _, mkey)
  load.moving[mkey] = { bytes = ev.bytes, rows = ev.rows }
  load:progress(ev, task)
  return true
end

-- A whole table loaded.
function EVENTS.loaded(load, task, ev, k, mkey)
  load.moving[mkey] = nil
  load.loads_open = load.loads_open - 1
  local r = { table = k, rows = ev.rows, bytes = ev.bytes, started = ev.started, ended = ev.ended,
              seconds = ev.seconds, stream = task.stream }
  load.bytes_done, load.rows_done = load.bytes_done + r.bytes, load.rows_done + r.rows
  load.state.loaded[k] = r
  load:save{ "loaded", k }
  load.results[#load.results + 1] = r
  load:tell(load.opts.on_table, r)
  if r.bytes >= (load.opts.save_at_once_bytes or SAVE_AT_ONCE_BYTES) then load.saver:flush() end
  if load.hashes then -- once the task is done (Load:hash_after)
    local list = load.to_hash[task] or {}
    list[#list + 1] = load.hashes:whole_item(load.by_key[k])
    load.to_hash[task] = list
  end
  return true
end

-- The lock that let a chunk commit, released (its chunk committed, or its
-- attempt was lost).
function Load:release_ack(mkey)
  local ack = self.chunk_ack[mkey]
  if not ack then return true end
  self.chunk_ack[mkey] = nil
  if not self.acked[ack] then return true end
  -- still held if the session is made again meanwhile: the unlock then finds it
  local res, err = self:target_exec("select pg_advisory_unlock($1::int, $2::int)", self.ack_class, ack)
  if not res then return nil, err end
  self.acked[ack] = nil
  return true
end

-- A chunk about to commit: journaled, then allowed (the advisory lock its worker waits for).
function EVENTS.commit(load, task, ev, k, mkey)
  local ok, err = load:release_ack(mkey) -- an earlier attempt's, lost
  if not ok then return nil, err end
  local i = tostring(ev.chunk)
  load.split[k].committing[i] = { xid = ev.xid, rows = ev.rows, bytes = ev.bytes,
    started = ev.started, stream = task.stream }
  load:save({ "chunks", k, "committing", i }, true) -- the journal knows the transaction before it may commit
  load.chunk_ack[mkey] = ev.ack
  local res
  res, err = load:target_exec("select pg_advisory_lock($1::int, $2::int)", load.ack_class, ev.ack)
  if not res then return nil, err end
  load.acked[ev.ack] = true -- taken again if the session is lost and made again
  return true
end

-- A chunk committed.
function EVENTS.chunk(load, task, ev, k, mkey)
  load.moving[mkey] = nil
  load.loads_open = load.loads_open - 1
  local cs, i = load.split[k], ev.chunk
  local c = { table = k, chunk = i, of = cs.plan.count, range = chunks.label(cs.plan, i), rows = ev.rows,
              bytes = ev.bytes, started = ev.started, ended = ev.ended, seconds = ev.seconds,
              stream = task.stream, xid = ev.xid }
  cs.done[tostring(i)] = { chunk = i, rows = c.rows, bytes = c.bytes, started = c.started, ended = c.ended,
                           seconds = c.seconds, stream = c.stream, xid = c.xid }
  cs.committing[tostring(i)] = nil
  load:save_all{ { "chunks", k, "done", tostring(i) }, { "chunks", k, "committing", tostring(i) } }
  local ok, err = load:release_ack(mkey)
  if not ok then return nil, err end
  load.bytes_done, load.rows_done = load.bytes_done + c.bytes, load.rows_done + c.rows
  load.chunk_results[#load.chunk_results + 1] = c
  load:tell(load.opts.on_chunk, c)
  if load.hashes then load:add_hash_tasks(load.by_key[k], { load.hashes:chunk_item(load.by_key[k], cs.plan, i) }, cs.plan) end
  if count(cs.done) == cs.plan.count then load:table_complete(k) end
  return true
end

-- A part hashed on its sides: once the table's last part is in, its verdict.
function EVENTS.hashed(load, task, ev, k)
  local verdict = load.hashes:add(ev)
  if verdict then
    load:save{ "hashed", k } -- judged: the record whole, once
  else
    for _, side in ipairs{ "replica", "target" } do
      if ev[side] then load:save{ "hashed", k, side, ev.part } end
    end
  end
  if verdict then
    load.verdicts[#load.verdicts + 1] = verdict
    load:tell(load.opts.on_hashed, verdict)
  end
  return true
end

-- An index item built: once the table's last one is, its record (and a
-- split table's ANALYZE, which waited for them).
function EVENTS.indexed(load, task, ev, k)
  local pt = load.post_times[k] or { started = ev.started }
  load.post_times[k] = pt
  pt.ended = math.max(pt.ended or 0, ev.ended)
  pt.stream = task.stream
  pt.parallel_workers = math.max(pt.parallel_workers or 0, ev.parallel_workers or 0)
  load.post_left[k] = (load.post_left[k] or 1) - 1
  if load.post_left[k] > 0 then return true end
  local r = { table = k, started = pt.started, ended = pt.ended, seconds = pt.ended - pt.started,
              indexes = #(load.post[k] or {}), stream = pt.stream, parallel_workers = pt.parallel_workers }
  load.state.indexed[k] = r
  load:save{ "indexed", k }
  load:tell(load.opts.on_post, "indexed", r)
  if load.parallel_post[k] and load:needs_analyze(k) then
    load:add({ load:analyze_item(k) }, (load.by_key[k].bytes or 0) * ANALYZE_WEIGHT, "analyzing " .. k)
  end
  return true
end

function EVENTS.analyzed(load, task, ev, k)
  local r = { table = k, started = ev.started, ended = ev.ended, seconds = ev.seconds, stream = task.stream }
  load.state.analyzed[k] = r
  load:save{ "analyzed", k }
  load:tell(load.opts.on_post, "analyzed", r)
  return true
end

-- What an item is, in a line.
local function item_label(load, ev, k)
  if ev.op == "chunk" and load.split[k] then return chunk_label(load.split[k].plan, ev.chunk) end
  if ev.op == "index" then return ("%s of %s"):format(ev.index, k) end
  if ev.op == "analyze" then return "ANALYZE of " .. k end
  return k
end

-- A worker lost a connection: what it was doing is thrown away, and said.
function EVENTS.retry(load, task, ev, k, mkey)
  load.moving[mkey] = nil
  load.lost_message[mkey .. "/" .. (ev.index or ev.op)] = ev.message
  load.echo(("%s: connection lost (%s): connecting again, attempt %d of %d next"):format(item_label(load, ev, k),
    ev.message, ev.attempt + 1, ev.attempts))
  if ev.op == "chunk" then return load:release_ack(mkey) end
  return true
end

-- ... and connected again: the item is done again (or its lost COMMIT went through).
function EVENTS.recovered(load, task, ev, k, mkey)
  local rkey = mkey .. "/" .. (ev.index or ev.op)
  local seconds = ev.lost_seconds or ev.seconds
  local r = { table = k, chunk = ev.chunk, index = ev.index, op = ev.op, attempt = ev.attempt, seconds = seconds,
    outcome = ev.outcome, message = load.lost_message[rkey], stream = task.stream, lost_at = ev.lost_at }
  load.recoveries[#load.recoveries + 1] = r
  load.echo(("%s: connected again after %.1f s (lost %.1f s ago); %s"):format(item_label(load, ev, k), ev.seconds,
    seconds, ev.outcome == "committed" and "its COMMIT had gone through: not loaded again"
      or ("done again (attempt %d)"):format(ev.attempt)))
  if load.opts.on_recovery then load.opts.on_recovery(r) end
  return true
end

-- The error a worker ends with, whole (the pool passes on its message only).
function EVENTS.failed(load, task, ev)
  load.worker_error = ev
  return true
end

-- The pool's on_event: one worker event. -> true | nil, err (stops the run)
function Load:on_event(task, ev)
  local handler = EVENTS[ev.event]
  if not handler then return true end
  local k = ev.table
  return handler(self, task, ev, k, ev.chunk and (k .. "#" .. ev.chunk) or k)
end

-- A worker's error rebuilt from its "failed" event; a full disk said as what to do.
local function worker_error(ev, stream)
  local what = ev.table and (ev.chunk and ("chunk %d of %s"):format(ev.chunk, ev.table)
    or ev.index and ("%s of %s"):format(ev.index, ev.table) or ev.table) or "the load"
  if ev.disk_full then
    return errors.new{ kind = "fullload", where = "target", table = ev.table, chunk = ev.chunk, disk_full = true,
      sqlstate = ev.sqlstate, stream = stream,
      message = ("the target's storage is full: %s (while loading %s; what it was writing was rolled back)")
        :format(tostring(ev.message), what),
      hint = "grow the target's storage (RDS: modify the instance's allocated storage, or turn on storage "
        .. "autoscaling) and wait until it is available, then run the same command again: the tables and chunks "
        .. "already committed are kept, the rest loads from where it stopped; migrun never retries a full disk" }
  end
  local message = tostring(ev.message)
  if ev.table and not message:find(ev.table, 1, true) then message = ("loading %s: %s"):format(what, message) end
  return errors.new{ kind = ev.kind or "fullload", where = ev.where or ("stream " .. tostring(stream)),
    table = ev.table, chunk = ev.chunk, sqlstate = ev.sqlstate, lost = ev.lost, promoted = ev.promoted,
    moved = ev.moved, stream = stream, message = message, hint = ev.hint }
end

-- The pool's failure as fullload.run's error.
function Load:failure(f)
  local tname = f.table or (f.task and f.task.label and f.task.label:match("^%a+ ([^%s]+)")) or nil
  if f.error and errors.is(f.error) then return nil, f.error end
  if self.worker_error then return nil, worker_error(self.worker_error, f.stream) end
  local msg = f.message or "failed"
  if tname and not msg:find(tname, 1, true) then msg = ("loading %s: %s"):format(tname, msg) end
  return fail(f.where or ("stream " .. tostring(f.stream)), msg, {
    table = tname, stream = f.stream, detail = f.detail ~= "" and f.detail or nil, loaded = self.results })
end

-- Runs the pool; what was done is saved however it ends.
function Load:execute()
  local ran, ok, failure = pcall(self.pool.run, self.pool)
  if ran and ok then
    self.saver:flush()
  else
    -- what was done is saved if it can be; what stopped the run is what is reported
    pcall(self.saver.flush, self.saver)
    if not ran then error(ok, 0) end
  end
  self:close()
  if not ok then return self:failure(failure) end
  local bytes, rows = 0, 0
  for _, r in ipairs(self.results) do bytes, rows = bytes + (r.bytes or 0), rows + (r.rows or 0) end
  return { tables = self.results, chunks = self.chunk_results, bytes = bytes, rows = rows,
           seconds = host.monotonic() - self.t0, streams = self.streams, skipped = self.skipped,
           split = self:split_plans(), recoveries = self.recoveries, hashed = self.hashes and self.verdicts or nil }
end

function fullload.run(opts)
  local load = Load.new(opts)
  local ok, err = load:connect()
  if not ok then return nil, err end
  load:select()
  for _, step in ipairs{ Load.check_replica, Load.plan, Load.resume } do
    ok, err = step(load)
    if not ok then load:close() return nil, err end
  end
  load:schedule()
  load:describe()
  if load.dry then return load:dry_run() end
  ok, err = load:prepare_target()
  if not ok then load:close() return nil, err end
  return load:execute()
end

-- Rows for the report's full-load table from { ["s.t"] = on_table result }.
function fullload.report_rows(loaded)
  local names = {}
  for k, r in pairs(loaded or {}) do if type(r) == "table" then names[#names + 1] = k end end
  table.sort(names, function(a, b) return (loaded[a].started or 0) < (loaded[b].started or 0) end)
  local rows = {}
  local function at(t) return t and os.date("!%H:%M:%S", math.floor(t)) or "" end
  for _, k in ipairs(names) do
    local r = loaded[k]
    rows[#rows + 1] = { k, tostring(r.rows or ""), tostring(r.bytes or ""), at(r.started), at(r.ended),
      r.seconds and ("%.2f"):format(r.seconds) or "", r.chunks and ("%s (%d chunks)"):format(tostring(r.stream or ""),
      r.chunks) or tostring(r.stream or "") }
  end
  return rows
end

-- Rows for the report's table of split tables from state.chunks.
function fullload.split_rows(split)
  local names = {}
  for k in pairs(split or {}) do names[#names + 1] = k end
  table.sort(names)
  local rows = {}
  for _, k in ipairs(names) do
    local cs = split[k]
    local n, r, b, first, last = 0, 0, 0, nil, nil
    for _, c in pairs(cs.done or {}) do
      n, r, b = n + 1, r + (c.rows or 0), b + (c.bytes or 0)
      if c.started and (not first or c.started < first) then first = c.started end
      if c.ended and (not last or c.ended > last) then last = c.ended end
    end
    local plan = cs.plan
    rows[#rows + 1] = { k, ("%d/%d"):format(n, plan.count),
      plan.method == "key" and ("key " .. plan.column) or "blocks", tostring(r), tostring(b),
      first and last and ("%.2f"):format(last - first) or "" }
  end
  return rows
end

return fullload
