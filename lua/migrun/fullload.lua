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
  and a table's index builds as soon as its last chunk commits, so they
  overlap with the load of the others, within the same `jobs` budget.
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
                          streams=, skipped = {"s.t"}, split = {["s.t"] = plan} } | nil, err
      opts.replica, opts.target: conninfo strings; opts.tables: list of
      { schema=, name=, bytes= }; opts.jobs (default 2); opts.expect_replay_lsn
      (required: an LSN string or migrun.lsn value).
      opts.chunk_bytes, opts.split_bytes: tables above split_bytes (default
      2 x chunk_bytes) are cut into chunks of chunk_bytes (default: the
      pending bytes / (4 x jobs), between 64 MiB and 1 GiB).
      opts.state: what is done so far, kept up to date as it changes:
        loaded["s.t"] = r (a table complete; r as on_table's),
        chunks["s.t"] = { plan = chunks.plan's, done = { ["i"] = c },
                          committing = { ["i"] = { xid =, rows =, bytes = } } },
        indexed["s.t"] = { started =, ended =, seconds =, indexes = n, stream = },
        analyzed["s.t"] = { started =, ended =, seconds =, stream = }
      opts.save(fields): persist state[f] for each name f in the list
      fields (one call, one write). Called before the run depends on it (a
      chunk is acknowledged only after save{"chunks"} returned); what only
      records work done is saved at most every opts.save_interval seconds
      (default 1) and when the run ends, however it ends; on_table,
      on_chunk and on_post are called once what they tell is saved.
      opts.done: a set of "s.t" already loaded (as state.loaded).
      opts.post: { ["s.t"] = schema.table_post_data items }.
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
      err: kind "fullload", where "stream k" or the server, table = "s.t".
  fullload.plan(tables, jobs) -> { {tables = {...}, bytes = n}, ... }   the LPT split
      (what the streams are expected to do; the run itself schedules as tasks end)
  fullload.chunk_size(bytes, jobs) -> the default chunk_bytes
  fullload.task(job, emit)   a worker's task (internal, run by migrun.pool)
]]
local pg = require "migrun.pg"
local pool = require "migrun.pool"
local chunks = require "migrun.chunks"
local errors = require "migrun.error"
local host = require "migrun.host"
local lsn = require "migrun.lsn"
local text = require "migrun.text"

local fullload = {}

local STATE_FIELDS = { "loaded", "chunks", "indexed", "analyzed" }

local key = text.key
local MiB = 1024 * 1024
local MIN_CHUNK, MAX_CHUNK = 64 * MiB, 1024 * MiB
-- Tables below this share a task: starting a worker (a process, two
-- connections) costs some tens of milliseconds, more than a small table does.
local BATCH_BYTES, BATCH_TABLES = 32 * MiB, 25
-- What an index build or an ANALYZE weighs in the queue, against COPY bytes.
local INDEX_WEIGHT, ANALYZE_WEIGHT = 0.3, 0.05
-- How long a worker waits for the parent to journal a chunk before it commits.
local ACK_TIMEOUT, ACK_POLL = 600, 0.005

local function whole_sql(t)
  local name = pg.qualify(t.schema, t.name)
  return ("COPY %s TO STDOUT (FORMAT binary)"):format(name),
    ("COPY %s FROM STDIN (FORMAT binary, FREEZE)"):format(name), ("TRUNCATE %s"):format(name)
end

local function fail(where, message, extra)
  local e = { kind = "fullload", where = where, message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return nil, errors.new(e)
end

local function int(v) return math.tointeger(v) or v end

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
-- The worker (a child process, one task)
---------------------------------------------------------------------------

-- Is the replica still in recovery, paused, at the expected replay LSN?
local function check_replica(replica, names, expected, what)
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

-- A whole table: one transaction, emptied and written frozen.
local function load_whole(replica, target, item, interval, emit)
  local from_sql, to_sql, truncate = whole_sql(item)
  return target:transaction(function(c)
    local res, err = c:exec(truncate)
    if not res then return nil, err end
    return pg.copy{ from = replica, from_sql = from_sql, to = c, to_sql = to_sql,
      progress_interval = interval, on_progress = progress_fn(emit, item.table) }
  end)
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

-- A chunk: one transaction, committed only once the parent has journaled its
-- transaction id.
local function load_chunk(replica, target, item, job, emit)
  local tname = item.table
  return target:transaction(function(c)
    local x, err = c:exec("select txid_current()::text as xid")
    if not x then return nil, err end
    local xid = x[1].xid
    local r
    r, err = pg.copy{ from = replica, from_sql = item.from_sql, to = c, to_sql = item.to_sql,
      progress_interval = job.progress_interval, on_progress = progress_fn(emit, tname, item.chunk) }
    if not r then return nil, err end
    emit{ event = "commit", table = tname, chunk = item.chunk, ack = item.ack, xid = xid, rows = r.rows,
          bytes = r.bytes, started = item.started }
    local ok
    ok, err = wait_ack(c, { pid = job.ack_pid, key = item.ack }, tname, item.chunk)
    if not ok then return nil, err end
    r.xid = xid
    return r
  end)
end

local function failed(err, tname)
  if type(err) == "table" then
    err.table = err.table or tname
    return nil, err
  end
  return nil, errors.new{ kind = "fullload", message = tostring(err), table = tname }
end

function fullload.task(job, emit)
  local replica, target, names, expected
  local function need_replica()
    if replica then return true end
    local err
    replica, err = pg.connect(job.replica, { name = "replica", application_name = job.application_name })
    if not replica then return nil, err end
    names, expected = lsn.names(replica:server_version()), lsn(job.expect_replay_lsn)
    return true
  end
  local function need_target()
    if target then return true end
    local err
    target, err = pg.connect(job.target, { name = "target", application_name = job.application_name })
    return target ~= nil, err
  end
  for _, item in ipairs(job.items) do
    local tname = item.table
    local started, t0 = host.now(), host.monotonic()
    local ok, err = need_target()
    if not ok then return failed(err, tname) end
    emit{ event = "start", op = item.op, table = tname, chunk = item.chunk, index = item.index, started = started }
    if item.op == "copy" or item.op == "chunk" then
      ok, err = need_replica()
      if not ok then return failed(err, tname) end
      ok, err = check_replica(replica, names, expected, item.chunk and (("%s (chunk %d)"):format(tname, item.chunk))
        or tname)
      if not ok then return failed(err, tname) end
    end
    if item.op == "copy" then
      local r
      r, err = load_whole(replica, target, item, job.progress_interval, emit)
      if not r then return failed(err, tname) end
      emit{ event = "loaded", table = tname, rows = r.rows, bytes = r.bytes, started = started,
            ended = host.now(), seconds = host.monotonic() - t0 }
    elseif item.op == "chunk" then
      item.started = started
      local r
      r, err = load_chunk(replica, target, item, job, emit)
      if not r then return failed(err, tname) end
      emit{ event = "chunk", table = tname, chunk = item.chunk, ack = item.ack, rows = r.rows, bytes = r.bytes, xid = r.xid,
            started = started, ended = host.now(), seconds = host.monotonic() - t0 }
    elseif item.op == "index" then
      for _, sql in ipairs(item.sql) do
        local res
        res, err = target:exec(sql)
        if not res then return failed(err, tname) end
      end
      emit{ event = "indexed", table = tname, index = item.index, started = started, ended = host.now(),
            seconds = host.monotonic() - t0 }
    elseif item.op == "analyze" then
      local res
      res, err = target:exec("ANALYZE " .. pg.qualify(item.schema, item.name))
      if not res then return failed(err, tname) end
      emit{ event = "analyzed", table = tname, started = started, ended = host.now(),
            seconds = host.monotonic() - t0 }
    else
      error("fullload.task: unknown item " .. tostring(item.op))
    end
  end
  if replica then replica:close() end
  if target then target:close() end
  return true
end

---------------------------------------------------------------------------
-- The parent
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
  for _, f in ipairs{ "on_progress", "on_table", "on_chunk", "on_post", "echo", "save" } do
    assert(opts[f] == nil or type(opts[f]) == "function", "fullload.run: opts." .. f .. " must be a function")
  end
  for _, f in ipairs{ "chunk_bytes", "split_bytes" } do
    assert(opts[f] == nil or (type(opts[f]) == "number" and opts[f] > 0), "fullload.run: opts." .. f
      .. " must be a number of bytes > 0")
  end
  assert(opts.save_interval == nil or (type(opts.save_interval) == "number" and opts.save_interval >= 0),
    "fullload.run: opts.save_interval must be a number of seconds >= 0")
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

function fullload.run(opts)
  local jobs, expected = check_opts(opts)
  local echo = opts.echo or function() end
  local dry = opts.dry_run
  local state = opts.state or {}
  for _, f in ipairs(STATE_FIELDS) do state[f] = state[f] or {} end
  for k, v in pairs(opts.done or {}) do if v then state.loaded[k] = state.loaded[k] or v end end
  -- The journal: a chunk's transaction is saved before it may commit (a rerun
  -- asks the target what became of it). Everything else that is done (a
  -- table, a chunk, indexes, statistics) is saved at most every
  -- opts.save_interval seconds and at the end: each save rewrites and fsyncs
  -- the whole journal, which on a schema of thousands of small tables costs
  -- more than their loads. A kill loses at most that interval's records, and
  -- what they said is done again by the rerun, the same way: a whole table
  -- truncated and loaded, a chunk's journaled transaction asked about, the
  -- indexes listed from the target, ANALYZE run.
  -- What is done is said (on_table, on_chunk, on_post) once it is saved:
  -- a table said loaded is never loaded again.
  local dirty, saved_at, untold = {}, host.monotonic(), {}
  local save_interval = opts.save_interval or 1
  local function flush()
    local fields = {}
    for _, f in ipairs(STATE_FIELDS) do
      if dirty[f] then fields[#fields + 1] = f end
    end
    dirty = {}
    if #fields > 0 then opts.save(fields) end
    saved_at = host.monotonic()
    local list = untold
    untold = {}
    for _, t in ipairs(list) do t[1](table.unpack(t, 2, t.n)) end
  end
  local function tell(fn, ...)
    if not fn then return end
    if dry or not opts.save then return fn(...) end
    untold[#untold + 1] = table.pack(fn, ...)
  end
  local function flush_due()
    if (next(dirty) or #untold > 0) and host.monotonic() - saved_at >= save_interval then flush() end
  end
  local function save(field, now)
    if dry or not opts.save then return end
    if now then
      dirty[field] = nil
      opts.save{ field }
    else
      dirty[field] = true
      flush_due()
    end
  end
  local post = opts.post or {}
  local analyze = opts.analyze ~= false
  local t0 = host.monotonic()

  local pending, skipped, pending_bytes = {}, {}, 0
  for _, t in ipairs(opts.tables) do
    if state.loaded[key(t)] then
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
  local chunk_bytes = opts.chunk_bytes or fullload.chunk_size(pending_bytes, jobs)
  local split_bytes = opts.split_bytes or 2 * chunk_bytes
  -- Small tables share a task, up to a share of the load small enough to
  -- keep every stream busy.
  local batch_limit = math.min(BATCH_BYTES, pending_bytes / (4 * jobs))

  -- The parent's sessions: the replica to plan the split, the target to
  -- empty split tables, acknowledge chunks and ask what became of them.
  local replica, err = pg.connect(opts.replica, { name = "replica" })
  if not replica then return nil, err end
  local target
  target, err = pg.connect(opts.target, { name = "target" })
  if not target then replica:close() return nil, err end
  local function close_all() replica:close() target:close() end
  local function stop(e) close_all() return nil, e end

  if not dry and #pending > 0 then
    local ok
    local first = key(pending[1]) .. (#pending > 1 and (" (and %d other table%s)"):format(#pending - 1,
      #pending > 2 and "s" or "") or "")
    ok, err = check_replica(replica, lsn.names(replica:server_version()), lsn(expected), first)
    if not ok then err.table = key(pending[1]) return stop(err) end
  end

  -- The split: journaled plans first (a rerun cuts a table the way it was cut).
  local split, notes = {}, {}
  for _, t in ipairs(pending) do
    local k = key(t)
    local cs = state.chunks[k]
    if cs then
      split[k] = cs
    elseif (t.bytes or 0) > split_bytes then
      local plan, why = chunks.plan(replica, t, { chunk_bytes = chunk_bytes, split_bytes = split_bytes })
      if plan == nil then return stop(why) end
      if plan then
        state.chunks[k] = { plan = plan, done = {}, committing = {} }
        split[k] = state.chunks[k]
      else
        notes[#notes + 1] = ("%s stays whole: %s"):format(k, why)
      end
    end
  end
  if next(split) then save("chunks", true) end

  -- Chunks journaled as committing: what became of their transactions.
  for k, cs in pairs(split) do
    for i, c in pairs(cs.committing) do
      if not cs.done[i] then
        local s, serr = xact_status(target, c.xid)
        if not s then return stop(errors.new{ kind = "fullload", where = "target", table = k,
          message = ("chunk %s of %s: %s"):format(i, k, serr),
          hint = "wait until the target has ended that session, then run again" }) end
        if s == "committed" then
          cs.done[i] = { chunk = math.tointeger(tonumber(i)), rows = c.rows, bytes = c.bytes, xid = c.xid,
            started = c.started, stream = c.stream, recovered = true }
          echo(("%s chunk %s committed before the interruption (transaction %s): not loaded again"):format(k, i, c.xid))
        else
          echo(("%s chunk %s did not commit (transaction %s): loaded again"):format(k, i, c.xid))
        end
      end
      cs.committing[i] = nil
    end
  end
  if next(split) then save("chunks", true) end

  local results, chunk_results = {}, {}
  local bytes_done, rows_done, bytes_total = 0, 0, 0
  local moving = {}
  local p = pool.new{ jobs = jobs, entry = "migrun.fullload", on_tick = flush_due }
  local job_base = { replica = opts.replica, target = opts.target, expect_replay_lsn = expected,
    progress_interval = opts.progress_interval or 1.0, ack_pid = target:backend_pid(),
    application_name = pg.application_name("fullload") } -- the run's identity (migrun.playbook.sessions)
  local function job(items)
    local j = {}
    for k, v in pairs(job_base) do j[k] = v end
    j.items = items
    return j
  end
  local by_key = {}
  for _, t in ipairs(opts.tables) do by_key[key(t)] = t end

  -- The work after a table is complete: its index items, then ANALYZE.
  local post_left = {}    -- "s.t" -> index items not yet built
  local post_times = {}   -- "s.t" -> { started, ended, stream }
  local function post_items(k)
    local t = by_key[k]
    local items = {}
    for _, it in ipairs(post[k] or {}) do
      items[#items + 1] = { op = "index", table = k, schema = t.schema, name = t.name, index = it.name,
        sql = it.sql, kind = it.kind }
    end
    return items
  end
  local function analyze_item(k)
    local t = by_key[k]
    return { op = "analyze", table = k, schema = t.schema, name = t.name }
  end
  local function needs_analyze(k) return analyze and not state.analyzed[k] end
  local parallel_post = {}

  -- Tasks added for a table just completed (or found complete on a rerun):
  -- each index item alone for a split table (they build side by side), then
  -- ANALYZE once they are done; one task for the others.
  local function enqueue_post(k, parallel)
    local items = post_items(k)
    local bytes = (by_key[k].bytes or 0)
    post_left[k] = #items
    if #items == 0 then
      if needs_analyze(k) then
        p:add{ job = job{ analyze_item(k) }, cost = bytes * ANALYZE_WEIGHT, label = "analyzing " .. k }
      end
      return
    end
    if parallel then
      parallel_post[k] = true -- ANALYZE once the last of them is built
      for _, it in ipairs(items) do
        p:add{ job = job{ it }, cost = bytes * INDEX_WEIGHT, label = ("building %s of %s"):format(it.index, k) }
      end
    else
      if needs_analyze(k) then items[#items + 1] = analyze_item(k) end
      p:add{ job = job(items), cost = bytes * (INDEX_WEIGHT + ANALYZE_WEIGHT), label = "indexing " .. k }
    end
  end

  -- Tasks for what remains.
  local batch, batch_bytes = {}, 0
  local function flush_batch()
    if #batch > 0 then
      p:add{ job = job(batch), cost = batch_bytes, label = "loading " .. batch[1].table }
      batch, batch_bytes = {}, 0
    end
  end
  local truncates = {}
  local ack_serial = 0
  for _, t in ipairs(pending) do
    local k = key(t)
    local cs = split[k]
    if cs then
      local plan, left = cs.plan, 0
      for i = 1, plan.count do
        if not cs.done[tostring(i)] then
          left = left + 1
          local from_sql, to_sql = chunks.copy_sql(plan, i)
          ack_serial = ack_serial + 1 -- the chunk's advisory lock key: unique in this run
          p:add{ job = job{ { op = "chunk", table = k, schema = t.schema, name = t.name, chunk = i, of = plan.count,
            from_sql = from_sql, to_sql = to_sql, ack = ack_serial } },
            cost = plan.bytes / plan.count, label = "loading " .. chunk_label(plan, i) }
          bytes_total = bytes_total + plan.bytes / plan.count
        end
      end
      if next(cs.done) == nil then truncates[#truncates + 1] = t end
      if left == 0 then cs.complete_now = true end
    else
      local items = { { op = "copy", table = k, schema = t.schema, name = t.name } }
      for _, it in ipairs(post_items(k)) do items[#items + 1] = it end
      post_left[k] = #items - 1
      if needs_analyze(k) then items[#items + 1] = analyze_item(k) end
      bytes_total = bytes_total + (t.bytes or 0)
      if (t.bytes or 0) >= batch_limit then
        p:add{ job = job(items), cost = t.bytes or 0, label = "loading " .. k }
      else
        for _, it in ipairs(items) do batch[#batch + 1] = it end
        batch_bytes = batch_bytes + (t.bytes or 0)
        local tables_in = 0
        for _, it in ipairs(batch) do if it.op == "copy" then tables_in = tables_in + 1 end end
        if batch_bytes >= batch_limit or tables_in >= BATCH_TABLES then flush_batch() end
      end
    end
  end
  flush_batch()

  -- A split table complete: its record, then its indexes.
  local function table_complete(k)
    local cs = split[k]
    local r = { table = k, rows = 0, bytes = 0, chunks = cs.plan.count }
    for _, c in pairs(cs.done) do
      r.rows, r.bytes = r.rows + (c.rows or 0), r.bytes + (c.bytes or 0)
      if c.started and (not r.started or c.started < r.started) then r.started = c.started end
      if c.ended and (not r.ended or c.ended > r.ended) then r.ended, r.stream = c.ended, c.stream end
    end
    r.seconds = r.started and r.ended and (r.ended - r.started) or nil
    state.loaded[k] = r
    save("loaded")
    results[#results + 1] = r
    tell(opts.on_table, r)
    enqueue_post(k, true)
  end

  -- Tables loaded by an earlier run whose indexes or statistics are not done.
  for _, k in ipairs(skipped) do
    if #(post[k] or {}) > 0 or needs_analyze(k) then enqueue_post(k, split[k] ~= nil or state.chunks[k] ~= nil) end
  end

  ---------------------------------------------------------------------------
  -- A dry run: the split, the expected streams, every statement.
  ---------------------------------------------------------------------------
  if #skipped > 0 then echo("already loaded (skipped): " .. table.concat(skipped, ", ")) end
  for _, t in ipairs(pending) do
    local cs = split[key(t)]
    if cs then
      local plan = cs.plan
      echo(("split %s (%s) into %d chunks by %s, about %s each%s"):format(plan.table, text.bytes(plan.bytes),
        plan.count, plan.method == "key" and ("ranges of its key " .. plan.column) or "block ranges (ctid)",
        text.bytes(plan.bytes / plan.count), next(cs.done) and (", %d already loaded"):format(
        (function() local n = 0 for _ in pairs(cs.done) do n = n + 1 end return n end)()) or ""))
    end
  end
  for _, line in ipairs(notes) do echo(line) end
  local expected_streams
  do
    local est = {}
    for _, task in ipairs(p.queue) do
      est[#est + 1] = { key = task.label:gsub("^%a+ ", ""), bytes = task.cost, task = task }
    end
    expected_streams = fullload.plan(est, jobs)
    for _, s in ipairs(expected_streams) do
      local labels = {}
      for _, e in ipairs(s.tables) do labels[#labels + 1] = e.key end
      echo(("stream %d (%s expected): %s"):format(s.stream, text.bytes(s.bytes), table.concat(labels, ", ")))
    end
  end
  if dry then
    for _, t in ipairs(truncates) do
      echo(("target: TRUNCATE %s  (once, before its first chunk)"):format(pg.qualify(t.schema, t.name)))
    end
    for _, s in ipairs(expected_streams) do
      for _, e in ipairs(s.tables) do
        for _, it in ipairs(e.task.job.items) do
          if it.op == "copy" then
            local from_sql, to_sql, truncate = whole_sql(it)
            echo(("stream %d: target: BEGIN; %s; %s  <=  replica: %s; COMMIT"):format(s.stream, truncate, to_sql, from_sql))
          elseif it.op == "chunk" then
            echo(("stream %d: target: BEGIN; %s  <=  replica: %s; COMMIT"):format(s.stream, it.to_sql, it.from_sql))
          elseif it.op == "index" then
            echo(("stream %d: target: %s"):format(s.stream, table.concat(it.sql, "; ")))
          else
            echo(("stream %d: target: ANALYZE %s"):format(s.stream, pg.qualify(it.schema, it.name)))
          end
        end
      end
    end
    for k in pairs(split) do
      local t = by_key[k]
      for _, it in ipairs(post_items(k)) do
        echo(("after %s is complete: target: %s"):format(k, table.concat(it.sql, "; ")))
      end
      if analyze then echo(("after %s is complete: target: ANALYZE %s"):format(k, pg.qualify(t.schema, t.name))) end
    end
    close_all()
    return { dry_run = true, tables = {}, chunks = {}, bytes = 0, rows = 0, seconds = 0,
             streams = expected_streams, skipped = skipped, split = (function()
               local out = {} for k, cs in pairs(split) do out[k] = cs.plan end return out end)() }
  end

  -- Split tables with no chunk loaded yet are emptied once, now.
  for _, t in ipairs(truncates) do
    local res, terr = target:exec("TRUNCATE " .. pg.qualify(t.schema, t.name))
    if not res then terr.table = key(t) return stop(terr) end
  end
  for k, cs in pairs(split) do
    if cs.complete_now then cs.complete_now = nil table_complete(k) end
  end

  ---------------------------------------------------------------------------
  -- The run
  ---------------------------------------------------------------------------
  local acked = {} -- ack key -> true while the parent holds it
  local function progress(ev, task)
    if not opts.on_progress then return end
    local b, r = bytes_done, rows_done
    for _, m in pairs(moving) do b, r = b + m.bytes, r + m.rows end
    opts.on_progress(b, bytes_total, r, { table = ev.table, chunk = ev.chunk, stream = task.stream, pid = task.pid,
      bytes = int(ev.bytes), rows = int(ev.rows) })
  end
  p.on_event = function(task, ev)
    local k = ev.table
    local mkey = ev.chunk and (k .. "#" .. ev.chunk) or k
    if ev.event == "start" then
      if ev.op == "copy" then task.label = "loading " .. k
      elseif ev.op == "chunk" then task.label = "loading " .. chunk_label(split[k].plan, int(ev.chunk))
      elseif ev.op == "index" then task.label = ("building %s of %s"):format(ev.index, k)
      else task.label = "analyzing " .. k end
      if ev.op == "index" and not post_times[k] then post_times[k] = { started = ev.started } end
      if ev.op == "copy" or ev.op == "chunk" then
        -- a table under way shows at once, before its first bytes (its TRUNCATE may wait for a lock)
        moving[mkey] = { bytes = 0, rows = 0 }
        progress({ table = k, chunk = ev.chunk, bytes = 0, rows = 0 }, task)
      end
    elseif ev.event == "progress" then
      moving[mkey] = { bytes = int(ev.bytes), rows = int(ev.rows) }
      progress(ev, task)
    elseif ev.event == "loaded" then
      moving[mkey] = nil
      local r = { table = k, rows = int(ev.rows), bytes = int(ev.bytes), started = ev.started, ended = ev.ended,
                  seconds = ev.seconds, stream = task.stream }
      bytes_done, rows_done = bytes_done + r.bytes, rows_done + r.rows
      state.loaded[k] = r
      save("loaded")
      results[#results + 1] = r
      tell(opts.on_table, r)
    elseif ev.event == "commit" then
      local cs = split[k]
      cs.committing[tostring(int(ev.chunk))] = { xid = ev.xid, rows = int(ev.rows), bytes = int(ev.bytes),
        started = ev.started, stream = task.stream }
      save("chunks", true) -- the journal knows the transaction before it may commit
      local ackkey = int(ev.ack)
      local res, lerr = target:exec("select pg_advisory_lock($1::int, $2::int)", job_base.ack_pid, ackkey)
      if not res then return nil, lerr end
      acked[ackkey] = true
    elseif ev.event == "chunk" then
      moving[mkey] = nil
      local cs = split[k]
      local i = int(ev.chunk)
      local c = { table = k, chunk = i, of = cs.plan.count, range = chunks.label(cs.plan, i), rows = int(ev.rows),
                  bytes = int(ev.bytes), started = ev.started, ended = ev.ended, seconds = ev.seconds,
                  stream = task.stream, xid = ev.xid }
      cs.done[tostring(i)] = { chunk = i, rows = c.rows, bytes = c.bytes, started = c.started, ended = c.ended,
                               seconds = c.seconds, stream = c.stream, xid = c.xid }
      cs.committing[tostring(i)] = nil
      save("chunks")
      local ackkey = int(ev.ack)
      if acked[ackkey] then
        local res, lerr = target:exec("select pg_advisory_unlock($1::int, $2::int)", job_base.ack_pid, ackkey)
        if not res then return nil, lerr end
        acked[ackkey] = nil
      end
      bytes_done, rows_done = bytes_done + c.bytes, rows_done + c.rows
      chunk_results[#chunk_results + 1] = c
      tell(opts.on_chunk, c)
      local n = 0
      for _ in pairs(cs.done) do n = n + 1 end
      if n == cs.plan.count then table_complete(k) end
    elseif ev.event == "indexed" then
      local pt = post_times[k] or { started = ev.started }
      post_times[k] = pt
      pt.ended = math.max(pt.ended or 0, ev.ended)
      pt.stream = task.stream
      post_left[k] = (post_left[k] or 1) - 1
      if post_left[k] <= 0 then
        local r = { table = k, started = pt.started, ended = pt.ended, seconds = pt.ended - pt.started,
                    indexes = #(post[k] or {}), stream = pt.stream }
        state.indexed[k] = r
        save("indexed")
        tell(opts.on_post, "indexed", r)
        -- a split table's index builds ran as tasks of their own: ANALYZE now
        if parallel_post[k] and needs_analyze(k) then
          p:add{ job = job{ analyze_item(k) }, cost = (by_key[k].bytes or 0) * ANALYZE_WEIGHT,
                 label = "analyzing " .. k }
        end
      end
    elseif ev.event == "analyzed" then
      local r = { table = k, started = ev.started, ended = ev.ended, seconds = ev.seconds, stream = task.stream }
      state.analyzed[k] = r
      save("analyzed")
      tell(opts.on_post, "analyzed", r)
    end
    return true
  end

  local ran, ok, failure = pcall(p.run, p)
  if ran and ok then
    flush()
  else
    -- what was done is saved if it can be; what stopped the run is what is reported
    pcall(flush)
    if not ran then error(ok, 0) end
  end
  if not ok then
    close_all()
    local f = failure
    local tname = f.table or (f.task and f.task.label and f.task.label:match("^%a+ ([^%s]+)")) or nil
    if f.error and errors.is(f.error) then return nil, f.error end
    local msg = f.message or "failed"
    if tname and not msg:find(tname, 1, true) then msg = ("loading %s: %s"):format(tname, msg) end
    return fail(f.where or ("stream " .. tostring(f.stream)), msg, {
      table = tname, stream = f.stream, detail = f.detail ~= "" and f.detail or nil, loaded = results })
  end
  close_all()

  local bytes, rows = 0, 0
  for _, r in ipairs(results) do bytes, rows = bytes + (r.bytes or 0), rows + (r.rows or 0) end
  local split_plans = {}
  for k, cs in pairs(split) do split_plans[k] = cs.plan end
  return { tables = results, chunks = chunk_results, bytes = bytes, rows = rows, seconds = host.monotonic() - t0,
           streams = expected_streams, skipped = skipped, split = split_plans }
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
