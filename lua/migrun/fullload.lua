--[[
migrun.fullload: the full load (issue step 9): every table copied from the
paused maintenance replica into the target, in parallel streams.

Why it is shaped this way:
- Consistency comes from the replica being paused: while replay is stopped,
  every session sees the same frozen data, so the streams need no exported
  snapshot. Before each table every stream checks that the replica is still in
  recovery, still paused and still at the expected replay LSN; if not, it stops
  with an error rather than load data from another point in time.
- Real parallelism: `jobs` child processes of this same migrun binary
  (host.exe -e "require('migrun.fullload').worker()"). Each gets its share as
  JSON on its stdin (connection strings, which may hold passwords, never go in
  argv) and reports JSON lines on stdout: start, progress, done, error. The
  parent reads them, calls on_progress/on_table, and on the first failure stops
  the other streams and returns the error naming the table and the server.
- One table = one transaction on the target: BEGIN; TRUNCATE; COPY FROM STDIN
  (FORMAT binary) fed server to server (pg.copy) by COPY TO STDOUT (FORMAT
  binary) on the replica; COMMIT. An interrupted table (killed worker, lost
  connection, Ctrl-C) leaves nothing behind, and loading it again is safe.
- Scheduling is longest-processing-time first (LPT) over the tables' sizes:
  tables sorted by bytes, largest first, each given to the stream with the
  least work so far. So the `jobs` largest tables each start their own stream
  and the rest fill the streams that will finish first; the makespan is within
  4/3 of the best static split, and no stream waits for another. The split is
  fixed when the streams start (each stream loads its tables largest first).
- Progress is in COPY bytes (binary rows as sent) against the expected size
  (the tables' `bytes`, usually pg_table_size): a close estimate, not a promise.

  local fullload = require "migrun.fullload"
  local result = assert(fullload.run{
    replica = replica_conninfo, target = target_conninfo,
    tables = { { schema = "public", name = "orders", bytes = 123456, rows_estimate = 1000 }, ... },
    jobs = 2, done = { ["public.small"] = true },      -- from the journal: skipped
    expect_replay_lsn = "0/3000060",
    on_progress = function(bytes_done, bytes_total, rows_done, detail) end,
    on_table = function(r) journal(r) end,             -- as each table commits
  })

  fullload.run(opts) -> { tables = {r...}, bytes=, rows=, seconds=, streams=, skipped = {"s.t"} } | nil, err
      opts.replica, opts.target: conninfo strings; opts.tables: list of
      { schema=, name=, bytes=, rows_estimate= }; opts.jobs (default 2);
      opts.done: set of "s.t" to skip; opts.expect_replay_lsn (required: an
      LSN string or migrun.lsn value); opts.dry_run with opts.echo(line): print
      the streams and every COPY pair, run nothing; opts.progress_interval
      (seconds between progress reports of a stream, default 1).
      on_table(r): r = { table="s.t", rows=, bytes=, started=epoch, ended=epoch,
      seconds=, stream=k }. on_progress(bytes_done, bytes_total, rows_done,
      detail) with detail = { table=, stream=, pid=, bytes=, rows= } (the
      table that moved). Callbacks run in the parent, between reads.
      err: kind "fullload", where "stream k" or the server, table = "s.t".
  fullload.plan(tables, jobs) -> { {tables = {...}, bytes = n}, ... }   the LPT split
  fullload.worker()   the child's main: reads its job from stdin (internal)
]]
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local errors = require "migrun.error"
local host = require "migrun.host"
local lsn = require "migrun.lsn"
local text = require "migrun.text"

local fullload = {}

local key = text.key

local function copy_sql(t)
  local name = pg.qualify(t.schema, t.name)
  return ("COPY %s TO STDOUT (FORMAT binary)"):format(name), ("COPY %s FROM STDIN (FORMAT binary)"):format(name),
    ("TRUNCATE %s"):format(name)
end

local function fail(where, message, extra)
  local e = { kind = "fullload", where = where, message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return nil, errors.new(e)
end

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

---------------------------------------------------------------------------
-- The worker (a child process)
---------------------------------------------------------------------------

-- Is the replica still in recovery, paused, at the expected replay LSN?
local function check_replica(replica, names, expected, tname)
  local paused_expr = names.wal_replay_pause_state and (names.wal_replay_pause_state .. "()::text")
    or ("case when " .. names.is_wal_replay_paused .. "() then 'paused' else 'not paused' end")
  local res, err = replica:exec(("select pg_is_in_recovery() as in_recovery, %s as pause_state, %s() as replay_lsn")
    :format(paused_expr, names.last_wal_replay_lsn))
  if not res then return nil, err end
  local row = res[1]
  local where = replica:name() .. " " .. tostring(replica:backend_pid())
  local before = " before loading " .. tname
  if not row.in_recovery then
    return fail(where, "the replica is not in recovery (promoted?)" .. before,
      { table = tname, hint = "the full load reads the paused maintenance replica; check the replica conninfo" })
  end
  if row.pause_state ~= "paused" then
    return fail(where, ("the replica is not paused (pause state: %s)"):format(row.pause_state) .. before,
      { table = tname, hint = "replay was resumed during the full load: its data no longer matches the "
        .. "captured LSN; pause the replica again and restart from the LSN capture" })
  end
  if rawequal(row.replay_lsn, pg.null) or row.replay_lsn ~= expected then
    return fail(where, ("the replica's replay LSN is %s, expected %s"):format(tostring(row.replay_lsn),
      tostring(expected)) .. before,
      { table = tname, hint = "the replica replayed WAL since the LSN was captured; capture it again" })
  end
  return true
end

local function load_table(replica, target, t, interval, emit)
  local from_sql, to_sql, truncate = copy_sql(t)
  local tname = key(t)
  local ok, result_or_err = target:transaction(function(c)
    local res, err = c:exec(truncate)
    if not res then return nil, err end
    return pg.copy{ from = replica, from_sql = from_sql, to = c, to_sql = to_sql,
      progress_interval = interval,
      on_progress = function(bytes, rows) emit{ event = "progress", table = tname, bytes = bytes, rows = rows } end }
  end)
  if not ok then return nil, result_or_err end
  return ok
end

function fullload.worker()
  local cjson = require "cjson"
  local function emit(t)
    io.stdout:write(cjson.encode(t), "\n")
    io.stdout:flush()
  end
  local function die(err, tname)
    emit{ event = "error", table = tname, message = tostring(err),
          where = type(err) == "table" and err.where or nil }
    os.exit(1)
  end
  local job = cjson.decode(io.read("a"))
  local replica, err = pg.connect(job.replica, { name = "replica" })
  if not replica then die(err) end
  local target
  target, err = pg.connect(job.target, { name = "target" })
  if not target then die(err) end
  local names = lsn.names(replica:server_version())
  local expected = lsn(job.expect_replay_lsn)
  for _, t in ipairs(job.tables) do
    local tname = key(t)
    local ok
    ok, err = check_replica(replica, names, expected, tname)
    if not ok then die(err, tname) end
    local started, t0 = host.now(), host.monotonic()
    emit{ event = "start", table = tname, started = started }
    local r
    r, err = load_table(replica, target, t, job.progress_interval, emit)
    if not r then die(err, tname) end
    emit{ event = "done", table = tname, rows = r.rows, bytes = r.bytes, started = started,
          ended = host.now(), seconds = host.monotonic() - t0 }
  end
  replica:close()
  target:close()
  os.exit(0)
end

---------------------------------------------------------------------------
-- The parent
---------------------------------------------------------------------------

local function int(v) return math.tointeger(v) or v end

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
  for _, f in ipairs{ "on_progress", "on_table", "echo" } do
    assert(opts[f] == nil or type(opts[f]) == "function", "fullload.run: opts." .. f .. " must be a function")
  end
  return jobs, tostring(expected)
end

local function print_plan(streams, echo, skipped)
  if #skipped > 0 then echo("already loaded (skipped): " .. table.concat(skipped, ", ")) end
  for _, s in ipairs(streams) do
    local names = {}
    for _, t in ipairs(s.tables) do names[#names + 1] = key(t) end
    echo(("stream %d (%d bytes expected): %s"):format(s.stream, s.bytes, table.concat(names, ", ")))
  end
end

function fullload.run(opts)
  local jobs, expected = check_opts(opts)
  local done = opts.done or {}
  local pending, skipped, bytes_total = {}, {}, 0
  for _, t in ipairs(opts.tables) do
    if done[key(t)] then
      skipped[#skipped + 1] = key(t)
    else
      pending[#pending + 1] = t
      bytes_total = bytes_total + (t.bytes or 0)
    end
  end
  local streams = fullload.plan(pending, jobs)
  local echo = opts.echo

  if opts.dry_run then
    if echo then
      print_plan(streams, echo, skipped)
      for _, s in ipairs(streams) do
        for _, t in ipairs(s.tables) do
          local from_sql, to_sql, truncate = copy_sql(t)
          echo(("stream %d: target: BEGIN; %s; %s  <=  replica: %s; COMMIT"):format(s.stream, truncate, to_sql, from_sql))
        end
      end
    end
    return { dry_run = true, tables = {}, bytes = 0, rows = 0, seconds = 0, streams = streams, skipped = skipped }
  end
  if echo then print_plan(streams, echo, skipped) end

  local cjson = require "cjson"
  local t0 = host.monotonic()
  local events = {}           -- decoded worker lines, dispatched outside the output callbacks
  local workers = {}          -- stream -> { handle=, stderr lines, current = table }
  local handles = {}
  for _, s in ipairs(streams) do
    local w = { stream = s.stream, stderr = {} }
    local share = { replica = opts.replica, target = opts.target, expect_replay_lsn = expected,
      progress_interval = opts.progress_interval or 1.0, tables = {} }
    for i, t in ipairs(s.tables) do share.tables[i] = { schema = t.schema, name = t.name } end
    local h, err = proc.spawn{ host.exe, "-e", "require('migrun.fullload').worker()",
      stdin = cjson.encode(share), die_with_parent = true,
      stdout = function(line)
        local ok, ev = pcall(cjson.decode, line)
        if ok and type(ev) == "table" then
          ev.stream = s.stream
          events[#events + 1] = ev
        else
          w.stderr[#w.stderr + 1] = line
        end
      end,
      stderr = function(line)
        w.stderr[#w.stderr + 1] = line
        if #w.stderr > 20 then table.remove(w.stderr, 1) end
      end }
    if not h then
      for _, other in ipairs(handles) do other:close() end
      return fail("stream " .. s.stream, "cannot start a full-load worker: " .. tostring(err))
    end
    w.handle, w.pid = h, h.pid
    workers[s.stream] = w
    handles[#handles + 1] = h
  end

  local results = {}
  local moving = {}               -- table -> {bytes, rows} of the COPY under way
  local bytes_done, rows_done = 0, 0
  local failure

  local function dispatch()
    local i = 1
    while i <= #events do
      local ev = events[i]
      i = i + 1
      local w = workers[ev.stream]
      if ev.event == "start" then
        w.current = ev.table
        -- a table under way shows at once, before its first bytes (its TRUNCATE may wait for a lock)
        moving[ev.table] = { bytes = 0, rows = 0 }
        if opts.on_progress then
          local b, r = bytes_done, rows_done
          for _, m in pairs(moving) do b, r = b + m.bytes, r + m.rows end
          opts.on_progress(b, bytes_total, r, { table = ev.table, stream = ev.stream, pid = w.pid, bytes = 0, rows = 0 })
        end
      elseif ev.event == "progress" then
        moving[ev.table] = { bytes = int(ev.bytes), rows = int(ev.rows) }
        if opts.on_progress then
          local b, r = bytes_done, rows_done
          for _, m in pairs(moving) do b, r = b + m.bytes, r + m.rows end
          opts.on_progress(b, bytes_total, r, { table = ev.table, stream = ev.stream, pid = w.pid,
            bytes = int(ev.bytes), rows = int(ev.rows) })
        end
      elseif ev.event == "done" then
        moving[ev.table] = nil
        w.current = nil
        local r = { table = ev.table, rows = int(ev.rows), bytes = int(ev.bytes), started = ev.started,
          ended = ev.ended, seconds = ev.seconds, stream = ev.stream }
        results[#results + 1] = r
        bytes_done, rows_done = bytes_done + r.bytes, rows_done + r.rows
        if opts.on_table then opts.on_table(r) end
      elseif ev.event == "error" then
        failure = failure or { stream = ev.stream, table = ev.table, message = ev.message, where = ev.where }
      end
    end
    events = {}
  end

  local function stop_all()
    for _, h in ipairs(handles) do
      if h.running then h:kill("TERM") end
    end
    for _, h in ipairs(handles) do h:wait(10) h:close() end
  end

  local running = table.move(handles, 1, #handles, 1, {})
  local ok, raised = pcall(function()
    while #running > 0 and not failure do
      local h, wok, how, code = proc.wait_any(running, 0.05) -- short: progress is dispatched between waits
      dispatch()
      if h then
        for i, r in ipairs(running) do if r == h then table.remove(running, i) break end end
        if not wok and not failure then
          local w
          for _, x in pairs(workers) do if x.handle == h then w = x end end
          local what = how == "signal" and ("was killed by signal " .. tostring(code))
            or ("exited with " .. tostring(how) .. " " .. tostring(code))
          failure = { stream = w.stream, table = w.current,
            message = ("the worker of stream %d %s%s"):format(w.stream, what,
              w.current and (" while loading " .. w.current) or ""),
            detail = table.concat(w.stderr, "\n") }
        end
      end
    end
  end)
  if not ok or failure then
    stop_all()
    dispatch() -- tables that committed before the stop are reported
    if not ok then error(raised, 0) end
    local tname = failure.table
    local msg = failure.message or "failed"
    if tname and not msg:find(tname, 1, true) then msg = ("loading %s: %s"):format(tname, msg) end
    return fail(failure.where or ("stream " .. failure.stream), msg, {
      table = tname, stream = failure.stream, detail = failure.detail ~= "" and failure.detail or nil,
      loaded = results })
  end
  for _, h in ipairs(handles) do h:close() end

  local bytes, rows = 0, 0
  for _, r in ipairs(results) do bytes, rows = bytes + r.bytes, rows + r.rows end
  return { tables = results, bytes = bytes, rows = rows, seconds = host.monotonic() - t0,
           streams = streams, skipped = skipped }
end

-- Rows for the report's full-load table from { ["s.t"] = on_table result }.
function fullload.report_rows(loaded)
  local names = {}
  for k in pairs(loaded or {}) do names[#names + 1] = k end
  table.sort(names, function(a, b) return (loaded[a].started or 0) < (loaded[b].started or 0) end)
  local rows = {}
  local function at(t) return t and os.date("!%H:%M:%S", math.floor(t)) or "" end
  for _, k in ipairs(names) do
    local r = loaded[k]
    rows[#rows + 1] = { k, tostring(r.rows or ""), tostring(r.bytes or ""), at(r.started), at(r.ended),
      r.seconds and ("%.2f"):format(r.seconds) or "", tostring(r.stream or "") }
  end
  return rows
end

return fullload
