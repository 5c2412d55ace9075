--[[
bench/fullload.lua: the full load, its rerun after a kill and its
verification, each measured against a floor in the same run, in pairs of
alternating order, so that the ratios hold on a shared machine.

  migrun bench/fullload.lua [--scale S] [--shape standard|dominant] [--jobs N]
                            [--pairs N] [--apart] [--skip load,rerun,verify,pgcopydb,hash]
                            [--before MIGRUN_BINARY] [--with runbook,pgcopydb-0.10]
                            [--wait-idle SECONDS]
  (make bench [BENCH_SCALE=0.2] [BENCH_ARGS="--apart --pairs 7"])

Datasets (scale 1 is about 1 GB; row counts scale):
  standard  `big` (2M rows, bigint key, a separate unique column, jsonb: 76%
            of the bytes); 4 tables of 300k rows; 100 small tables; one table
            without a primary key.
  dominant  `big` with 3M rows (90% of the bytes); 4 tables of 50k rows; 100
            small ones; a small table without a primary key and a large one
            without (log_nopk).
The replica is paused, then:

The load (--pairs rounds; each round runs every method once, the order
reversed every other round: A B C, C B A, ...):
  migrun    schema.dump + pre-data, fullload.run (chunks, each table's
            indexes and ANALYZE as it completes), the rest of post-data
  floor     the target alone: pre-data, then binary files of the same data
            (written by the replica before the clock starts, every split
            table cut into migrun's own chunks) loaded by server-side COPY
            FROM over the same number of streams (TRUNCATE + FREEZE for whole
            tables), pg_restore -j N post-data, vacuumdb --analyze-only -j N
  pgcopydb 0.18 (shared/peers): clone --table-jobs N --index-jobs N
            --use-copy-binary --split-tables-larger-than <migrun's chunk
            size>, reading the primary (it does not split a standby's
            tables; nothing writes to the primary: the same data), its
            VACUUM ANALYZE included
  migrun hashing  migrun with each part hashed on both sides as it
            commits (full_load.hash; --skip hash), compared with migrun's
            load and then the verification's full QA (medians)
  --before BIN: that migrun binary too (its own embedded library): the
            same method before a change, in the same rounds.
The rerun (--pairs pairs): migrun is killed (SIGKILL) once the target holds
  80% of the largest table's bytes (its heap, polled every 50 ms: the chunks
  in flight count, as loaded bytes do), the killed run's sessions ended, and
  the database copied twice (CREATE DATABASE ... TEMPLATE); then, in an
  order that turns each round, the rerun on the killed database and its
  floor on the copy: what was not committed at the kill (the chunks and
  tables with no rows on the copy), loaded from the same files by
  server-side COPY over N streams, then
  the indexes and constraints the copy lacks (their statements over N
  streams), then ANALYZE of the tables without statistics. What is missing is
  found before the floor's clock starts (as the rerun finds it in its
  journal; on a third copy, dropped, as the first scan of the killed run's
  rows sets their hint bits, which the rerun pays). Its relay floor, on a
  second copy, in the same rounds (each of the three first, second and
  last in turn: use 3 or 6 pairs): the same work with the rows
  relayed from the replica (pg.copy, one process per stream), as the rerun
  reads them, in place of the files.
The verification (--pairs rounds, alternating), on the last migrun target
  against the replica:
  qa        the final QA's full comparison (qa.compare mode "full": units
            hashed by N worker processes on each side)
  hash floor  the typed row hash of every table by one sequential scan per
            table, one session per side, both sides at once, no parallel
            workers: the servers' work of a comparison of every value, and
            nothing else (the SQL is built before the clock)
  pgcopydb compare data (0.18, its 4 processes), against the same two
Every run is a child `migrun bench/fullload.lua --method NAME` under
/usr/bin/time (wall seconds, the peak RSS of the largest process of its
tree), from a clean disk (a checkpoint of the target, then sync), with each
cluster's CPU seconds over it (the postmaster and its children, from /proc)
and the client's (the method's process and every child it waited for: for
migrun its workers and the PostgreSQL tools, which the child reports apart).
A warm-up runs first and is not counted (a fresh target creates and
zero-fills the WAL segments the first run writes; the page cache; the first
reader of a page the load wrote sets its rows' hint bits).
--apart: the runbook's topology on one machine (in production the
  maintenance replica, the target and migrun's host are three machines):
  the target's cluster pinned to the first half of the cores, the source,
  the replica and every method's client to the other half, alike for every
  method. The target runs without autovacuum (every method ANALYZEs).
]]
local lab = require "migrun.rehearsal.lab"
local proc = require "migrun.proc"
local host = require "migrun.host"
local pg = require "migrun.pg"
local json = require "migrun.json"
local journal = require "migrun.playbook.journal"

local function die(...)
  local words = table.pack(...)
  for i = 1, words.n do words[i] = tostring(words[i]) end
  io.stderr:write(table.concat(words, " ", 1, words.n), "\n")
  os.exit(1)
end
local function q(conn, sql, ...) local r = assert(conn:exec(sql, ...)) return r end
local function bin(name) return assert(require("migrun.schema").tools(150000)).bindir .. "/" .. name end
local function now() return host.monotonic() end

local PGCOPYDB_018 = (os.getenv("MIGRUN_SOURCE_DIR") or ".") .. "/../shared/peers/pgcopydb-0.18/pgcopydb"
if not io.open(PGCOPYDB_018) then PGCOPYDB_018 = "/work/shared/peers/pgcopydb-0.18/pgcopydb" end

-- CPU seconds of this process and of the children it has waited for (stat(5) utime stime cutime cstime)
local TICKS = tonumber((select(4, proc.run{ "getconf", "CLK_TCK" }) or ""):match("%d+")) or 100
local function stat_fields(pid)
  local stat = host.read_file("/proc/" .. pid .. "/stat")
  local f = {}
  for x in (stat and stat:match("%) (.*)") or ""):gmatch("%S+") do f[#f + 1] = tonumber(x) or 0 end
  return f -- f[1] is field 3
end
local function my_cpu()
  local f = stat_fields("self")
  return (f[12] + f[13]) / TICKS, (f[14] + f[15]) / TICKS
end

-- A method's client CPU by part, and the part's wall time: parts[name] =
-- { self =, children =, wall = }, written to job.cpu_out.
local function cpu_parts()
  local parts, order = {}, {}
  local s0, c0 = my_cpu()
  local w0 = host.monotonic()
  return function(name)
    local s, c = my_cpu()
    local w = host.monotonic()
    parts[name] = { self = s - s0, children = c - c0, wall = w - w0 }
    order[#order + 1] = name
    s0, c0, w0 = s, c, w
  end, function(job)
    if job.cpu_out then assert(host.write_file(job.cpu_out, json.encode{ parts = parts, order = order })) end
  end
end

---------------------------------------------------------------------------
-- The methods (each runs in its own child process)
---------------------------------------------------------------------------

local methods = {}

-- migrun: the library calls full.lua's steps make, journaled in job.dir by
-- the playbooks' journal, each change saved by its path as the load step
-- saves it (a rerun reads it).
function methods.migrun(job)
  local schema = require "migrun.schema"
  local fullload = require "migrun.fullload"
  local db = require "migrun.db"
  local part, report = cpu_parts()
  local tools = assert(schema.tools(job.target_version))
  -- a rerun finds the dump of its first run, as full.lua's schema step is done then
  local dump
  if io.open(job.dir .. "/schema.list") then
    dump = { file = job.dir .. "/schema.dump", list = job.dir .. "/schema.list", tools = tools }
  else
    dump = assert(schema.dump(job.source, job.dir, { tools = tools }))
  end
  local target = db.wrap(assert(pg.connect(job.target, { name = "target" })))
  local replica = db.wrap(assert(pg.connect(job.replica, { name = "replica" })))
  assert(schema.restore_pre_data(job.target, dump, target, job.tables, {}))
  local J = assert(journal.open(job.dir))
  local step = J:step("bench", "full_load")
  step.facts = step.facts or {}
  local state = step.facts
  local function save(paths)
    -- the library of a --before binary may predate save_changes: it saved the
    -- whole journal, as its playbooks did
    if not J.save_changes then return assert(J:save()) end
    assert(J:save_changes(paths, { "playbooks", "bench", "steps", "full_load", "facts" }))
  end
  local post = assert(schema.table_post_data(replica, target, job.tables))
  part("schema")
  local t_start = host.now()
  assert(fullload.run{ replica = job.replica, target = job.target, tables = job.tables,
    jobs = math.tointeger(job.jobs), chunk_bytes = job.chunk_bytes, split_bytes = job.split_bytes,
    expect_replay_lsn = job.lsn, post = post, state = state, save = save, hash = job.hash })
  part("load")
  local t_rest = host.now()
  assert(schema.restore_missing(job.target, dump, replica, target, job.tables, { jobs = math.tointeger(job.jobs) }))
  part("post-data")
  report(job)
  if job.profile then
    -- where the time went, from the journal's own per-table and per-chunk times
    local p = { start = t_start, rest = t_rest, done = host.now(), tables = {} }
    for k, r in pairs(state.loaded or {}) do
      if type(r) == "table" then
        local ix, an = (state.indexed or {})[k], (state.analyzed or {})[k]
        p.tables[k] = { load = { r.started, r.ended }, chunks = r.chunks, index = ix and { ix.started, ix.ended },
                        analyze = an and { an.started, an.ended }, bytes = r.bytes }
        -- the chunks this run loaded (a rerun's), each { i, started, ended, stream }
        local cs = (state.chunks or {})[k]
        if cs then
          local list = {}
          for i, c in pairs(cs.done or {}) do
            if c.started and c.started >= t_start then list[#list + 1] = { tonumber(i), c.started, c.ended, c.stream } end
          end
          table.sort(list, function(a, b) return a[2] < b[2] end)
          p.tables[k].this_run = list
        end
      end
    end
    assert(host.write_file(job.profile, json.encode(p)))
  end
end

-- A process per stream that has work, spec_of(stream) its proc.spawn spec, all at once; waits for every one.
local function run_streams(streams, what, spec_of)
  local handles = {}
  for _, stream in ipairs(streams) do
    if #stream > 0 then handles[#handles + 1] = assert(proc.spawn(spec_of(stream))) end
  end
  for _, h in ipairs(handles) do
    local ok, how, code = h:wait()
    if not ok then die(what .. ":", how, code, h.stderr) end
  end
end

-- psql sessions, one per stream, each running its list of statements
local function psql_streams(conninfo, streams)
  run_streams(streams, "psql", function(sqls)
    return { bin("psql"), "-X", "-q", "--dbname=" .. conninfo,
      stdin = "\\set ON_ERROR_STOP 1\n" .. table.concat(sqls, "\n") .. "\n", stdout = "null", stderr = "capture" }
  end)
end

-- items { sql =, cost = } over n streams, largest first, each to the least
-- loaded: the streams are lists of the items' `field` (default "sql")
local function spread(items, n, field)
  field = field or "sql"
  table.sort(items, function(a, b) return a.cost > b.cost end)
  local streams, loads = {}, {}
  for k = 1, n do streams[k], loads[k] = {}, 0 end
  for _, it in ipairs(items) do
    local least = 1
    for k = 2, n do if loads[k] < loads[least] then least = k end end
    table.insert(streams[least], it[field])
    loads[least] = loads[least] + it.cost
  end
  return streams
end

-- job.files' rows relayed from the replica (methods.relay_stream) over n
-- streams, the entries spread as the floor spreads their statements.
local function relay_streams(job, n)
  local items = {}
  for _, f in ipairs(job.files) do items[#items + 1] = { file = f, cost = f.bytes } end
  local k = 0
  run_streams(spread(items, n, "file"), "relay stream", function(stream)
    k = k + 1
    return { host.exe, arg[0], "--method", "relay_stream",
      stdin = json.encode{ replica = job.replica, target = job.target, items = stream,
                           timeline = job.timeline and (job.timeline .. "." .. k), stream = k },
      stdout = "null", stderr = "capture" }
  end)
end

-- the files' COPY statements: whole tables truncated and frozen in one transaction
local function load_sql(files)
  local items = {}
  for _, f in ipairs(files) do
    local name = pg.qualify(f.schema, f.name)
    local sql = f.whole
      and ("begin; truncate %s; copy %s from '%s' (format binary, freeze); commit;"):format(name, name, f.path)
      or ("copy %s from '%s' (format binary);"):format(name, f.path)
    items[#items + 1] = { sql = sql, cost = f.bytes }
  end
  return items
end

-- A floor around its load(n): the pre-data restore, then the load over n
-- streams, then `pg_restore -j n --section=post-data` and `vacuumdb --analyze-only -j n`.
local function floor_around(job, load)
  local schema = require "migrun.schema"
  local part, report = cpu_parts()
  local n = math.tointeger(job.jobs)
  local tools = assert(schema.tools(job.target_version))
  local dump = assert(schema.dump(job.source, job.dir, { tools = tools }))
  assert(schema.restore("pre-data", job.target, dump, {}))
  part("schema")
  load(n)
  part("load")
  assert(schema.restore("post-data", job.target, dump, { jobs = n }))
  local ok, how, code, _, err = proc.run{ bin("vacuumdb"), "--analyze-only", "--jobs=" .. n,
    "--dbname=" .. job.target, stdout = "null", stderr = "capture" }
  if not ok then die("vacuumdb:", how, code, err) end
  part("post-data")
  report(job)
end

function methods.floor(job)
  floor_around(job, function(n) psql_streams(job.target, spread(load_sql(job.files), n)) end)
end

-- The floor of a rerun: what the killed run had not committed, from the files
-- (job.files), then the post-data items the copy lacks (job.post: statements
-- with a cost), then ANALYZE of the tables without statistics (job.analyze).
-- relay: the same rows relayed from the replica instead (methods.relay_rest).
local function rest_floor(job, relay)
  local part, report = cpu_parts()
  local n = math.tointeger(job.jobs)
  if relay then relay_streams(job, n) else psql_streams(job.target, spread(load_sql(job.files), n)) end
  part("load")
  psql_streams(job.target, spread(job.post, n))
  part("post-data")
  local items = {}
  for _, t in ipairs(job.analyze) do items[#items + 1] = { sql = "analyze " .. t.name .. ";", cost = t.bytes } end
  psql_streams(job.target, spread(items, n))
  part("analyze")
  report(job)
end

function methods.floor_rest(job) rest_floor(job, false) end

-- The relay's floor: the floor's work with the files' rows relayed instead,
-- from the replica to the target by the client (pg.copy: C, whole buffers),
-- one process per stream living for the whole load. What any client that
-- carries the data itself spends (the two sockets' copies, the wakeups), and
-- nothing of migrun's own machinery (workers per task, events, journal).
function methods.relay_stream(job)
  local replica = assert(pg.connect(job.replica, { name = "replica" }))
  local target = assert(pg.connect(job.target, { name = "target" }))
  local timeline = {} -- each item's { table, chunk (0: whole), started, ended, stream } (job.timeline: where to write it)
  for _, it in ipairs(job.items) do
    local name, started = pg.qualify(it.schema, it.name), host.now()
    if it.whole then q(target, "begin") q(target, "truncate " .. name) end
    assert(pg.copy{ from = replica, from_sql = it.out_sql, to = target,
      to_sql = ("copy %s from stdin (format binary%s)"):format(name, it.whole and ", freeze" or "") })
    if it.whole then q(target, "commit") end
    timeline[#timeline + 1] = { it.name, it.chunk or 0, started, host.now(), job.stream }
  end
  if job.timeline then assert(host.write_file(job.timeline, json.encode(timeline))) end
  replica:close()
  target:close()
end

function methods.relay(job)
  floor_around(job, function(n) relay_streams(job, n) end)
end

-- The relay floor of a rerun: the rest floor's work, its rows relayed from the
-- replica as the killed run's rerun reads them, not loaded from files.
function methods.relay_rest(job) rest_floor(job, true) end

local function pgcopydb(exe, extra)
  return function(job)
    local argv = { exe, "clone", "--source", job.copydb_source, "--target", job.target,
      "--table-jobs", tostring(math.tointeger(job.jobs)), "--index-jobs", tostring(math.tointeger(job.jobs)),
      "--skip-extensions", "--dir", job.dir, stdout = "capture", stderr = "capture" }
    for _, a in ipairs(extra(job)) do argv[#argv + 1] = a end
    local ok, how, code, _, err = proc.run(argv)
    if not ok then die("pgcopydb:", how, code, (err or ""):sub(-3000)) end
  end
end
methods["pgcopydb-0.10"] = pgcopydb("pgcopydb", function() return {} end)
methods["pgcopydb-0.18"] = pgcopydb(PGCOPYDB_018, function(job)
  return { "--use-copy-binary", "--split-tables-larger-than", ("%dMB"):format(math.floor(job.chunk_bytes / 2 ^ 20)) }
end)

function methods.runbook(job)
  -- The target schema, whole (as the runbook restores it).
  local h = assert(proc.pipeline{ { bin("pg_dump"), "--schema-only", "--no-subscriptions",
    "--schema=public", "--dbname=" .. job.source },
    -- as a person runs it: "schema public already exists" is expected and passed over
    { bin("psql"), "-X", "-q", "--dbname=" .. job.target }, stdout = "null", stderr = "null" })
  local ok, how, code = h:wait()
  if not ok then die("runbook schema:", how, code, h.stderr) end
  local t = assert(pg.connect(job.target, { name = "target" }))
  -- Separate unique constraints of tables that have a primary key: drop, remember.
  local uniques = {}
  for row in q(t, [[select c.conrelid::regclass::text as tbl, c.conname, pg_get_constraintdef(c.oid) as def
      from pg_constraint c where c.contype = 'u' and c.connamespace = 'public'::regnamespace and exists
      (select 1 from pg_constraint p where p.conrelid = c.conrelid and p.contype = 'p')]]):rows() do
    uniques[#uniques + 1] = row
    q(t, ("alter table %s drop constraint %s"):format(row.tbl, pg.quote_ident(row.conname)))
  end
  -- The 5 largest alone, the rest together, all at once.
  local groups = {}
  for i, tb in ipairs(job.tables) do
    local g = math.min(i, 6)
    groups[g] = groups[g] or {}
    table.insert(groups[g], tb)
  end
  local handles = {}
  for _, g in ipairs(groups) do
    local dump = { bin("pg_dump"), "--data-only", "--dbname=" .. job.replica }
    for _, tb in ipairs(g) do dump[#dump + 1] = "--table=" .. pg.qualify(tb.schema, tb.name) end
    handles[#handles + 1] = assert(proc.pipeline{ dump,
      { bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--dbname=" .. job.target },
      stdout = "null", stderr = "capture" })
  end
  for _, hd in ipairs(handles) do
    local hok, hhow, hcode = hd:wait()
    if not hok then die("runbook load:", hhow, hcode, hd.stderr) end
  end
  for _, u in ipairs(uniques) do
    q(t, ("alter table %s add constraint %s %s"):format(u.tbl, pg.quote_ident(u.conname), u.def))
  end
  t:close()
  local vok, vhow, vcode, _, err = proc.run{ bin("vacuumdb"), "--analyze-only", "--jobs=" .. math.tointeger(job.jobs),
    "--dbname=" .. job.target, stdout = "null", stderr = "capture" }
  if not vok then die("vacuumdb:", vhow, vcode, err) end
end

function methods.qa(job)
  local qa = require "migrun.qa"
  local db = require "migrun.db"
  local a = db.wrap(assert(pg.connect(job.replica, { name = "replica" })))
  local b = db.wrap(assert(pg.connect(job.target, { name = "target" })))
  local r = assert(qa.compare(a, b, job.tables, {}, { mode = "full", jobs = math.tointeger(job.jobs),
    chunk_bytes = job.chunk_bytes, a_conninfo = job.replica, b_conninfo = job.target }))
  if r.differences > 0 then die(qa.format(r)) end
end

-- the typed hash of every table on one side, one sequential scan each (job.side_conninfo, job.hash_sql)
function methods.hash_side(job)
  local c = assert(pg.connect(job.side_conninfo, { name = "hash" }))
  local rowhash = require "migrun.rowhash"
  for _, kv in ipairs(rowhash.STABLE_TEXT) do q(c, "select set_config($1, $2, false)", kv[1], kv[2]) end
  q(c, "set max_parallel_workers_per_gather = 0")
  local out = {}
  for _, sql in ipairs(job.hash_sql) do out[#out + 1] = q(c, sql)[1].h end
  c:close()
  io.write(table.concat(out, "\n"), "\n")
end

-- both sides at once: a child per side; their hashes must agree
function methods.hash_floor(job)
  local hs = {}
  for _, conninfo in ipairs{ job.replica, job.target } do
    local side = { side_conninfo = conninfo, hash_sql = job.hash_sql }
    hs[#hs + 1] = assert(proc.spawn{ host.exe, arg[0], "--method", "hash_side", stdin = json.encode(side),
      stdout = "capture", stderr = "capture" })
  end
  for _, h in ipairs(hs) do
    local ok, how, code = h:wait()
    if not ok then die("hash_side:", how, code, h.stderr) end
  end
  if hs[1].stdout ~= hs[2].stdout then die("hash floor: the two sides differ") end
end

function methods.compare(job)
  local ok, how, code, _, err = proc.run{ PGCOPYDB_018, "compare", "data", "--source", job.replica,
    "--target", job.target, "--dir", job.dir, stdout = "capture", stderr = "capture" }
  if not ok then die("pgcopydb compare data:", how, code, (err or ""):sub(-3000)) end
end

local cli = require "migrun.playbook.cli"
local opt = cli.run({ usage = "migrun bench/fullload.lua",
  about = "The full load, its rerun and its verification against their floors (docs/benchmarks.md)",
  options = {
    { "--scale", "S", "size of the dataset (1 = about 1 GB)", default = 1, number = true },
    { "--shape", "NAME", "standard or dominant", default = "standard" },
    { "--jobs", "N", "parallel streams of every method", default = 2, number = true },
    { "--pairs", "N", "rounds of each measure, the order reversed every other round (at least 2)", default = 5,
      number = true },
    { "--skip", "M1,M2", "measures left out (load, rerun, verify, pgcopydb, hash, relay)" },
    { "--before", "BINARY", "another migrun binary measured in the same load rounds (before a change)" },
    { "--with", "M1,M2", "peers measured once after the load rounds (runbook, pgcopydb-0.10)" },
    { "--wait-idle", "SECONDS", "wait up to this long for a 1-minute load under 0.5", number = true },
    { "--perf", nil, "one more migrun run (not counted) under perf record: where its client's CPU goes" },
    { "--apart", nil, "the runbook's topology: the target's cluster on half the cores, the replica, the source and "
      .. "the client on the others" },
    { "--method", "NAME", "(internal) run one method on the job read from stdin" },
  },
  args = { { "scale", "the same as --scale" } }, min_args = 0 }, arg)

if opt.method then
  local job = json.decode(io.read("a"))
  methods[opt.method](job)
  os.exit(0)
end

---------------------------------------------------------------------------
-- The orchestration: the lab and its dataset
---------------------------------------------------------------------------

if opt.args.scale then opt.scale = tonumber(opt.args.scale) or die("<scale>: a number") end
opt.jobs = math.tointeger(opt.jobs) or die("--jobs: a whole number")
opt.pairs = math.tointeger(opt.pairs) or die("--pairs: a whole number")
if opt.pairs < 2 then die("--pairs: at least 2 (one round of each order)") end
local function set_of(list)
  local set = {}
  for m in (list or ""):gmatch("[^,]+") do set[m] = true end
  return set
end
local skipped, with = set_of(opt.skip), set_of(opt.with)
for m in pairs(with) do if not methods[m] then die("--with: no method " .. m) end end
if opt.before and not io.open(opt.before) then die("--before: no file " .. opt.before) end
if opt.shape ~= "standard" and opt.shape ~= "dominant" then die("--shape: standard or dominant") end
local scale = opt.scale
local function rows(n) return math.max(1, math.floor(n * scale)) end

local function loadavg()
  local s = host.read_file("/proc/loadavg") or ""
  return tonumber(s:match("^(%S+)")) or 0
end
if opt.wait_idle then
  local deadline = now() + opt.wait_idle
  while loadavg() >= 0.5 and now() < deadline do host.sleep(10) end
end
local load_start = loadavg()

print(("bench/fullload: shape %s, scale %g (about %d MB of data), %d streams, %d pairs%s, 1-minute load %.2f at start")
  :format(opt.shape, scale, math.floor(1000 * scale), opt.jobs, opt.pairs, opt.apart and ", --apart" or "", load_start))
-- The target's bootstrap superuser is named postgres, as the source's: every
-- method restores ownership to the source's roles. Autovacuum off on the
-- target: a background vacuum of the tables just loaded lands at random on
-- one method's clock, and every method ends with ANALYZE of its own.
local L <close> = assert(lab.start{ target_superuser = true,
  settings = { all = { max_wal_size = "8GB", checkpoint_timeout = "30min" }, target = { autovacuum = false } } })
local src = assert(pg.connect(L.source.conninfo, { name = "source" }))

local t0 = now()
local big_rows = opt.shape == "dominant" and 3000000 or 2000000
q(src, [[create table big (id bigint primary key, email text not null unique, body jsonb, pad text,
  created_at timestamptz not null default now())]])
q(src, ([[insert into big select g, 'user' || g || '@example.com',
  jsonb_build_object('n', g, 'tags', jsonb_build_array('a' || (g %% 97), 'b' || (g %% 13)), 'note', md5(g::text)),
  repeat(md5((g * 7)::text), 3), timestamptz '2020-01-01' + g * interval '13 seconds'
  from generate_series(1, %d) g]]):format(rows(big_rows)))
local mid_rows = opt.shape == "dominant" and 50000 or 300000
for i = 1, 4 do
  q(src, ("create table mid%d (id bigint primary key, account int, amount numeric(12,2), note text, at timestamptz)"):format(i))
  q(src, ([[insert into mid%d select g, g %% 5000, (g * 31 %% 100000) / 100.0, repeat(md5(g::text), 2),
    timestamptz '2021-01-01' + g * interval '1 minute' from generate_series(1, %d) g]]):format(i, rows(mid_rows)))
end
for i = 1, 100 do
  q(src, ("create table small%03d (id int primary key, name text, v int)"):format(i))
  q(src, ("insert into small%03d select g, 'n' || g, g * %d from generate_series(1, %d) g"):format(i, i, math.max(10, rows(2000))))
end
q(src, "create table events_nopk (at timestamptz, kind text, payload text)")
q(src, ([[insert into events_nopk select timestamptz '2022-01-01' + g * interval '1 second', 'k' || (g %% 10),
  md5(g::text) from generate_series(1, %d) g]]):format(rows(100000)))
if opt.shape == "dominant" then
  q(src, "create table log_nopk (at timestamptz, level text, message text)")
  q(src, ([[insert into log_nopk select timestamptz '2023-01-01' + g * interval '1 second', 'l' || (g %% 5),
    repeat(md5(g::text), 2) from generate_series(1, %d) g]]):format(rows(400000)))
end
q(src, "vacuum analyze")
local total = q(src, "select pg_database_size(current_database()) as b")[1].b
print(("dataset generated in %.1fs: database %.0f MB"):format(now() - t0, tonumber(total) / 2^20))

-- The tables, largest first, with their sizes.
local tables, data_bytes = {}, 0
for row in q(src, [[select n.nspname, c.relname, pg_table_size(c.oid) as bytes, c.reltuples::bigint as est
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.relkind = 'r' and n.nspname = 'public' order by 3 desc, 2]]):rows() do
  tables[#tables + 1] = { schema = row.nspname, name = row.relname, bytes = row.bytes, rows_estimate = row.est }
  data_bytes = data_bytes + row.bytes
end
local BIG = tables[1]
print(("largest table: %s, %.0f%% of the data"):format(BIG.name, 100 * BIG.bytes / data_bytes))

-- Pause the replica where it has everything.
assert(L:wait_replica_caught_up(600))
local rep = assert(pg.connect(L.replica.conninfo, { name = "replica" }))
q(rep, "select pg_wal_replay_pause()")
while q(rep, "select pg_get_wal_replay_pause_state() as s")[1].s ~= "paused" do host.sleep(0.05) end
local at = tostring(q(rep, "select pg_last_wal_replay_lsn() as l")[1].l)
local tgt = assert(pg.connect(L.target.conninfo:gsub("dbname=%S+", "dbname=postgres"), { name = "target" }))
local rdb = require("migrun.db").wrap(rep)

local fullload = require "migrun.fullload"
local chunks = require "migrun.chunks"
local CHUNK_BYTES = fullload.chunk_size(data_bytes, opt.jobs)
local SPLIT_BYTES = 2 * CHUNK_BYTES
-- migrun's own split (the replica is paused: the same plan every run)
local plans = {}
for _, t in ipairs(tables) do
  local plan = chunks.plan(rdb, t, { chunk_bytes = CHUNK_BYTES, split_bytes = SPLIT_BYTES, tail = opt.jobs })
  if plan then plans[t.name] = plan end
end

local n_db = 0
local function target_db(name)
  n_db = n_db + 1
  local dbname = ("bench_%s_%d"):format(name:gsub("%W", "_"), n_db)
  q(tgt, "create database " .. dbname)
  return (L.target.conninfo:gsub("dbname=%S+", "dbname=" .. dbname)), dbname
end
local function conninfo_of(dbname) return (L.target.conninfo:gsub("dbname=%S+", "dbname=" .. dbname)) end

local function check_counts(conninfo)
  local c = assert(pg.connect(conninfo, { name = "check" }))
  for _, t in ipairs(tables) do
    local name = pg.qualify(t.schema, t.name)
    local a = q(rep, "select count(*) as n from " .. name)[1].n
    local b = q(c, "select count(*) as n from " .. name)[1].n
    if a ~= b then c:close() return false, ("%s: %d rows on the replica, %d on the target"):format(name, a, b) end
  end
  local idx = q(c, "select count(*) as n from pg_indexes where schemaname = 'public'")[1].n
  local unanalyzed = q(c, [[select count(*) as n from pg_class c where c.relnamespace = 'public'::regnamespace
    and c.relkind = 'r' and not exists (select 1 from pg_statistic s where s.starelid = c.oid)]])[1].n
  c:close()
  local want = q(rep, "select count(*) as n from pg_indexes where schemaname = 'public'")[1].n
  if idx ~= want then return false, ("%d indexes, the replica has %d"):format(idx, want) end
  if unanalyzed > 0 then return false, ("%d tables without statistics"):format(unanalyzed) end
  return true, ("%d indexes, every table with statistics"):format(idx)
end

-- The floor's files, written by the replica (server side) before any clock:
-- every table whole, a split table in migrun's chunks (the same ranges).
local files_dir = L.dir .. "/floor-files"
proc.run{ "mkdir", "-p", files_dir }
proc.run{ "chown", "postgres", files_dir }
local FILES = {}
for _, t in ipairs(tables) do
  local name, plan = pg.qualify(t.schema, t.name), plans[t.name]
  if plan then
    for i = 1, plan.count do
      local path = ("%s/%s.%d.bin"):format(files_dir, t.name, i)
      q(rep, ("copy (select * from %s where %s) to '%s' (format binary)"):format(name, chunks.where(plan, i), path))
      FILES[#FILES + 1] = { schema = t.schema, name = t.name, path = path, bytes = t.bytes * chunks.share(plan, i), chunk = i,
        out_sql = ("copy (select * from %s where %s) to stdout (format binary)"):format(name, chunks.where(plan, i)) }
    end
  else
    local path = ("%s/%s.bin"):format(files_dir, t.name)
    q(rep, ("copy %s to '%s' (format binary)"):format(name, path))
    FILES[#FILES + 1] = { schema = t.schema, name = t.name, path = path, bytes = t.bytes, whole = true,
      out_sql = ("copy %s to stdout (format binary)"):format(name) }
  end
end
print(("floor files: %d, %s cut in %d chunks of about %d MiB (migrun's plan)"):format(#FILES, BIG.name,
  plans[BIG.name] and plans[BIG.name].count or 1, CHUNK_BYTES // 2^20))

---------------------------------------------------------------------------
-- Where the cores go
---------------------------------------------------------------------------

-- CPU seconds a cluster has used since it started: its postmaster, the
-- children it has reaped (cutime, cstime: every backend that has exited) and
-- the children alive (backends, the WAL receiver, the checkpointer...); and
-- of those, the seconds in the kernel (stime, cstime).
local function ticks_of(pid)
  local f = stat_fields(pid)
  local sys = (f[13] or 0) + (f[15] or 0)
  return (f[12] or 0) + (f[14] or 0) + sys, sys
end
local function children_of(pid)
  local out = {}
  for child in (host.read_file(("/proc/%d/task/%d/children"):format(pid, pid)) or ""):gmatch("%d+") do
    out[#out + 1] = child
  end
  return out
end
local function cluster_cpu(c)
  local pm = c:pid()
  if not pm then return 0, 0 end
  local ticks, sys = ticks_of(pm)
  for _, child in ipairs(children_of(pm)) do
    local t, k = ticks_of(child)
    ticks, sys = ticks + t, sys + k
  end
  return ticks / TICKS, sys / TICKS
end
local CLUSTERS = { "source", "replica", "target" }
local CORES = tonumber((select(4, proc.run{ "nproc" }) or ""):match("%d+")) or 1

-- --apart: the target's cluster on the first half of the cores, the other
-- clusters and the client on the rest. A backend inherits its postmaster's
-- affinity when it is forked; the processes already running are pinned too.
local client_cpus
if opt.apart then
  if CORES < 2 then die("--apart: needs at least 2 cores") end
  local half = CORES // 2
  local target_cpus, other_cpus = ("0-%d"):format(half - 1), ("%d-%d"):format(half, CORES - 1)
  for _, name in ipairs(CLUSTERS) do
    local pm = L[name]:pid()
    local pids = children_of(pm)
    pids[#pids + 1] = pm
    for _, pid in ipairs(pids) do
      local ok, how, code, _, err = proc.run{ "taskset", "-a", "-p", "-c", name == "target" and target_cpus or other_cpus,
        tostring(pid), stdout = "null", stderr = "capture" }
      if not ok then die("taskset:", how, code, err) end
    end
  end
  client_cpus = other_cpus
  print(("--apart: the target on cores %s; the source, the replica and the client on cores %s"):format(target_cpus,
    other_cpus))
end
-- argv, run on the client's cores (with --apart)
local function on_client_cpus(argv)
  if not client_cpus then return argv end
  local out = { "taskset", "-c", client_cpus }
  for k, v in pairs(argv) do
    if math.type(k) == "integer" then out[k + 3] = v else out[k] = v end
  end
  return out
end
-- { source =, replica =, target = } CPU seconds, and target_sys: the target's in the kernel
local function cpu_now()
  local t = {}
  for _, name in ipairs(CLUSTERS) do t[name], t[name .. "_sys"] = cluster_cpu(L[name]) end
  return t
end
local function cpu_since(before)
  -- a backend that has just exited is in neither of its postmaster's counts
  -- until the postmaster reaps it: give it the time to
  host.sleep(0.3)
  local t = cpu_now()
  for k, v in pairs(before) do t[k] = t[k] - v end
  return t
end
local function client_text(r)
  local parts = {}
  for _, name in ipairs(r.client_parts and r.client_parts.order or {}) do
    local p = r.client_parts.parts[name]
    parts[#parts + 1] = ("%s %.2f+%.2f in %.1fs"):format(name, p.self, p.children, p.wall or 0)
  end
  return #parts > 0 and (" (own+children, and the part's wall time: " .. table.concat(parts, ", ") .. ")") or ""
end
local function cpu_text(r)
  local cpu = r.cpu
  return ("CPU s: replica %.1f, target %.1f (%.1f in the kernel), source %.1f, client %.2f%s"):format(cpu.replica,
    cpu.target, cpu.target_sys or 0, cpu.source, cpu.client or 0, client_text(r))
end

---------------------------------------------------------------------------
-- One measured run
---------------------------------------------------------------------------

-- Every run starts from the same state: what the earlier ones wrote is on
-- disk (a checkpoint of the target, then sync), so that none pays for the
-- kernel writing back another's gigabytes while its clock runs.
--
-- And what a run writes goes, as far as the bench can see to it, into
-- memory freed a moment before it starts. This machine is a VM whose kernel
-- gives memory that has been free for a second or two back to its host
-- (virtio-balloon free page reporting), and writing into it again costs 2-3
-- times the kernel's time: 1 GiB into the page cache took 0.18 s of system
-- time right after another GiB was deleted, 0.38-0.54 s after a pause of
-- 1.5 s or more. So a database is dropped only once everything else is on
-- disk (settle(), then the drop), and the next run's settle() has little
-- left to write. The first run of a rerun round, which came after seconds of
-- writing back the killed database's copies, paid 1.34-1.43 times its
-- method's median kernel time; it now pays 1.22-1.36, the rest not located
-- (docs/benchmarks.md). The rounds print it by place.
local last_drop -- when the last database was dropped (now())
local function settle()
  q(tgt, "checkpoint")
  proc.run{ "sync" }
end
local function drop_db(name)
  q(tgt, "drop database " .. name)
  last_drop = now()
end

local results = {}
local function prepare(label, job)
  job.source, job.replica, job.tables, job.lsn = L.source.conninfo, L.replica.conninfo, tables, at
  job.jobs = job.jobs or opt.jobs
  job.chunk_bytes, job.split_bytes = CHUNK_BYTES, SPLIT_BYTES
  job.target_version = tgt:server_version()
  n_db = n_db + 1
  job.dir = job.dir or (L.dir .. "/bench-" .. label:gsub("%W", "_") .. "-" .. n_db)
  proc.run{ "mkdir", "-p", job.dir }
  job.cpu_out = job.dir .. "/cpu-" .. n_db .. ".json"
  if not job.target then job.target, job.dbname = target_db(label) end
  settle()
  return job
end

-- opts.exe: another migrun binary, with its own embedded library (-E: MIGRUN_LUA_PATH not read);
-- opts.perf: a file for `perf record` of the method's process tree
local function argv_of(method, job, opts)
  opts = opts or {}
  local argv = { "/usr/bin/time", "-f", "BENCH %e %M %U %S" }
  if opts.perf then
    for _, a in ipairs{ "perf", "record", "-q", "-g", "-o", opts.perf, "--" } do argv[#argv + 1] = a end
  end
  argv[#argv + 1] = opts.exe or host.exe
  if opts.exe then argv[#argv + 1] = "-E" end
  for _, a in ipairs{ arg[0], "--method", method } do argv[#argv + 1] = a end
  argv.stdin, argv.stdout, argv.stderr = json.encode(job), "capture", "capture"
  return on_client_cpus(argv)
end

-- What a finished run says: r.seconds, r.rss_mb, r.cpu (clusters and client), r.client_parts.
local function finish(r, err, cpu_before)
  r.cpu = cpu_since(cpu_before)
  local secs, rss, user, sys = (err or ""):match("BENCH ([%d.]+) (%d+) ([%d.]+) ([%d.]+)")
  r.seconds, r.rss_mb = tonumber(secs), rss and tonumber(rss) / 1024
  r.cpu.client = (tonumber(user) or 0) + (tonumber(sys) or 0)
  local f = r.job.cpu_out and io.open(r.job.cpu_out)
  if f then r.client_parts = json.decode(f:read("a")) f:close() end
  return r
end

local function measure(label, method, job, opts)
  opts = opts or {}
  prepare(label, job)
  io.stdout:write(("%-26s ... "):format(label)) io.stdout:flush()
  local r = { name = label, method = method, job = job, load = loadavg(), group = opts.group or label }
  local cpu_before = cpu_now()
  r.after_drop = last_drop and now() - last_drop
  local ok, how, code, _, err = proc.run(argv_of(method, job, opts))
  finish(r, err, cpu_before)
  results[#results + 1] = r
  if not ok or not r.seconds then
    print("FAILED: " .. tostring(how) .. " " .. tostring(code) .. "\n" .. (err or ""):sub(-2000))
    r.failed = true
    return r
  end
  local info = ""
  if not opts.no_check then
    local good
    good, info = check_counts(job.target)
    if not good then r.failed = true print("CHECK FAILED: " .. info) end
    info = ", " .. info
  end
  -- a database no later measure reads is dropped: the runs after it must
  -- not have less memory for the page cache
  if not job.keep and job.dbname then
    settle()
    drop_db(job.dbname)
  end
  local gap = r.after_drop and ("; started %.1f s after a drop"):format(r.after_drop) or ""
  print(("%.1fs, peak RSS %.0f MB%s (load %.2f%s)\n    %s"):format(r.seconds, r.rss_mb, info, r.load, gap, cpu_text(r)))
  return r
end

-- migrun killed (SIGKILL) once the target's heap of the largest table holds
-- `share` of the replica's: its child's migrun (under /usr/bin/time), its
-- workers die with it. Returns the run, with r.at (seconds) and r.share.
local BIG_HEAP = q(rep, "select pg_relation_size($1::regclass) as b", pg.qualify(BIG.schema, BIG.name))[1].b
local function measure_killed(label, job, share)
  prepare(label, job)
  io.stdout:write(("%-26s ... "):format(label)) io.stdout:flush()
  local r = { name = label, method = "migrun", job = job, load = loadavg(), group = "killed" }
  local cpu_before = cpu_now()
  local h = assert(proc.spawn(argv_of("migrun", job)))
  local watch = assert(pg.connect(job.target, { name = "watch" }))
  local started = now()
  while h.running do
    local heap = q(watch, "select coalesce(pg_relation_size(to_regclass($1)), 0) as b", pg.qualify(BIG.schema, BIG.name))[1].b
    if heap >= share * BIG_HEAP then
      for _, pid in ipairs(children_of(h.pid)) do proc.run{ "kill", "-KILL", pid } end
      r.at, r.share = now() - started, heap / BIG_HEAP
      break
    end
    h:wait(0.05)
  end
  watch:close()
  local ok = h:wait()
  finish(r, h.stderr, cpu_before)
  if ok or not r.at then die(label .. ": finished before the kill (the largest table has too few chunks?)") end
  print(("killed at %.1fs, %s's heap at %.0f%% of the replica's"):format(r.at, BIG.name, 100 * r.share))
  return r
end

local function median(xs)
  local s = table.move(xs, 1, #xs, 1, {})
  table.sort(s)
  if #s == 0 then return nil end
  return #s % 2 == 1 and s[(#s + 1) // 2] or (s[#s // 2] + s[#s // 2 + 1]) / 2
end
-- "1.07 (0.98-1.21; 1.02, 1.07, ...)": the median, the spread, every value
local function summary(xs)
  if #xs == 0 then return "-" end
  local s = table.move(xs, 1, #xs, 1, {})
  table.sort(s)
  local listed = {}
  for i, x in ipairs(xs) do listed[i] = ("%.2f"):format(x) end
  return ("%.2f (%.2f-%.2f; %s)"):format(median(xs), s[1], s[#s], table.concat(listed, ", "))
end

-- Rounds of methods, the order reversed every other round (A B C, C B A...):
-- a drift of the machine over the run weighs on every method alike.
-- runs: { {label =, method =, job = function(i) end, opts =} }; -> by label: {r...}
local function rounds(runs)
  local by = {}
  for i = 1, opt.pairs do
    local order = {}
    for k = 1, #runs do order[k] = runs[i % 2 == 1 and k or #runs + 1 - k] end
    for _, run in ipairs(order) do
      local r = measure(("%s #%d"):format(run.label, i), run.method, run.job(i), run.opts)
      by[run.label] = by[run.label] or {}
      table.insert(by[run.label], r)
    end
  end
  return by
end

-- x / y of the runs of each round, where both succeeded; f picks the number
local function ratios(xs, ys, f)
  local out = {}
  for i = 1, math.min(#(xs or {}), #(ys or {})) do
    if not xs[i].failed and not ys[i].failed then
      local y = f(ys[i])
      if y and y > 0 then out[#out + 1] = f(xs[i]) / y end
    end
  end
  return out
end
local function wall(r) return r.seconds end
local function target_cpu(r) return r.cpu.target end
local function client_cpu(r) return r.cpu.client end
local function all_cpu(r) return r.cpu.replica + r.cpu.target + r.cpu.source + r.cpu.client end
local goals = {} -- { measure, now, goal }
local function goal(measure_, xs, want)
  goals[#goals + 1] = { measure_, summary(xs), want, median(xs) }
  print(("  %s: %s (goal %s)"):format(measure_, summary(xs), want))
end

-- Where migrun's time went (job.profile): the largest table's load, index
-- builds and ANALYZE, the last table loaded, the rest of post-data.
local function profile_of(r)
  local f = r and not r.failed and r.job.profile and io.open(r.job.profile)
  if not f then return end
  local p = json.decode(f:read("a"))
  f:close()
  local big = p.tables[BIG.schema .. "." .. BIG.name]
  local last_load, sum_index, sum_analyze = p.start, 0, 0
  for _, t in pairs(p.tables) do
    if t.load[2] > last_load then last_load = t.load[2] end
    if t.index then sum_index = sum_index + (t.index[2] - t.index[1]) end
    if t.analyze then sum_analyze = sum_analyze + (t.analyze[2] - t.analyze[1]) end
  end
  local function span(x) return x and ("%.1f-%.1fs"):format(x[1] - p.start, x[2] - p.start) or "-" end
  print(("  profile %s: %s load %s (%s chunks), its indexes %s, its ANALYZE %s; last table loaded at %.1fs; "
    .. "index builds %.1fs and ANALYZE %.1fs of worker time in all; rest of post-data %.1fs; total %.1fs")
    :format(r.name, BIG.name, big and span(big.load) or "-", big and tostring(big.chunks or 1) or "-",
      big and span(big.index) or "-", big and span(big.analyze) or "-", last_load - p.start, sum_index, sum_analyze,
      p.done - p.rest, p.done - p.start))
  if big and big.this_run and #big.this_run < (big.chunks or 0) then
    local list = {}
    for _, c in ipairs(big.this_run) do
      list[#list + 1] = ("%d: %.1f-%.1fs on %s"):format(c[1], c[2] - p.start, c[3] - p.start, tostring(c[4]))
    end
    print(("  %s's chunks this run: %s"):format(BIG.name, table.concat(list, ", ")))
  end
end

-- The items a relay floor loaded (job.timeline: a file per stream), beside
-- the rerun's chunks that profile_of prints.
local function relay_timeline_of(r)
  if not (r and not r.failed and r.job.timeline) then return end
  local items, t0 = {}, math.huge
  for k = 1, math.tointeger(r.job.jobs) or 0 do
    local f = io.open(r.job.timeline .. "." .. k)
    if f then
      for _, it in ipairs(json.decode(f:read("a"))) do items[#items + 1] = it t0 = math.min(t0, it[3]) end
      f:close()
    end
  end
  table.sort(items, function(a, b) return a[3] < b[3] end)
  local list = {}
  for _, it in ipairs(items) do
    list[#list + 1] = ("%s%s: %.1f-%.1fs on %d"):format(it[1] == BIG.name and "" or it[1] .. " ",
      it[2] > 0 and tostring(it[2]) or "whole", it[3] - t0, it[4] - t0, it[5])
  end
  print(("  %s loaded: %s"):format(r.name, table.concat(list, ", ")))
end

---------------------------------------------------------------------------
-- The load
---------------------------------------------------------------------------

local loads -- by label: the runs of each method
local verify_target -- the last migrun run's database, kept for the verification

-- Not counted: a fresh target creates and zero-fills the WAL segments the
-- first run writes (the later ones recycle them); the page cache; the first
-- reader of a replica's page sets its rows' hint bits (a rerun without the
-- load's rounds before it paid that in its first round: its copies about 1.5
-- times the relay's after it).
local warmed = false
local function warm_up()
  if warmed then return end
  warmed = true
  for _, m in ipairs{ "floor", "migrun" } do
    measure("warm-up " .. m .. " (not counted)", m, { files = FILES }, { group = "warm-up" })
  end
end

local function load_rounds()
  print("\n== the load: " .. opt.pairs .. " rounds")
  warm_up()
  local runs = {
    { label = "migrun", method = "migrun", job = function(i)
      return { profile = i == 1 and (L.dir .. "/profile-migrun.json") or nil, keep = i == opt.pairs } end },
    { label = "floor", method = "floor", job = function() return { files = FILES } end },
  }
  if not skipped.relay then
    runs[#runs + 1] = { label = "relay", method = "relay", job = function() return { files = FILES } end }
  end
  if not skipped.pgcopydb then
    if not io.open(PGCOPYDB_018) then die("pgcopydb 0.18 not found at " .. PGCOPYDB_018 .. " (--skip pgcopydb)") end
    runs[#runs + 1] = { label = "pgcopydb 0.18", method = "pgcopydb-0.18",
      job = function() return { copydb_source = L.source.conninfo } end }
  end
  if not skipped.hash then
    -- each part hashed on both sides as it commits (full_load.hash): against
    -- migrun's load and then the full QA (the verification's rounds)
    runs[#runs + 1] = { label = "migrun hashing", method = "migrun", job = function() return { hash = true } end }
  end
  if opt.before then
    runs[#runs + 1] = { label = "migrun before", method = "migrun", job = function() return {} end,
      opts = { exe = opt.before, embedded = true } }
  end
  loads = rounds(runs)
  profile_of(loads.migrun[1])
  local last = loads.migrun[#loads.migrun]
  if not last.failed then verify_target = last.job.target end
  print()
  goal("migrun / floor, wall", ratios(loads.migrun, loads.floor, wall), opt.apart and "<= 1.05" or "<= 1.20")
  goal("migrun / floor, target CPU", ratios(loads.migrun, loads.floor, target_cpu), "<= 1.05")
  goal("migrun / floor, CPU of every cluster and the client", ratios(loads.migrun, loads.floor, all_cpu), "-")
  goal("migrun client CPU / floor client CPU", ratios(loads.migrun, loads.floor, client_cpu), "<= 2")
  if loads.relay then
    -- what carrying the data costs a client at the least, and what migrun adds to it
    goal("relay client CPU / floor client CPU", ratios(loads.relay, loads.floor, client_cpu), "-")
    goal("migrun client CPU / relay client CPU", ratios(loads.migrun, loads.relay, client_cpu), "-")
    goal("migrun / relay, wall", ratios(loads.migrun, loads.relay, wall), "-")
    goal("relay / floor, wall", ratios(loads.relay, loads.floor, wall), "-")
  end
  if loads["pgcopydb 0.18"] then
    goal("pgcopydb 0.18 clone / migrun, wall", ratios(loads["pgcopydb 0.18"], loads.migrun, wall), ">= 1.20")
  end
  if loads["migrun hashing"] then
    goal("migrun hashing as it loads / migrun, wall", ratios(loads["migrun hashing"], loads.migrun, wall), "-")
  end
  if loads["migrun before"] then
    goal("migrun / migrun before, wall", ratios(loads.migrun, loads["migrun before"], wall), "-")
    goal("migrun before client CPU / migrun client CPU", ratios(loads["migrun before"], loads.migrun, client_cpu), "-")
    goal("migrun before client CPU / floor client CPU", ratios(loads["migrun before"], loads.floor, client_cpu), "-")
  end
  for m in pairs(with) do
    if m == "pgcopydb-0.10" and not proc.run{ "sh", "-c", "command -v pgcopydb" } then
      print("pgcopydb 0.10: skipped, not installed (apt-get install pgcopydb)")
    else
      measure(m .. " (once)", m, { copydb_source = L.source.conninfo })
    end
  end
  if opt.perf then
    local file = L.dir .. "/client.perf"
    measure("migrun under perf (not counted)", "migrun", {}, { perf = file, group = "perf" })
    -- where the client's CPU went: by program, then the workers' symbols
    for _, sort in ipairs{ { "comm,dso", 14 }, { "sym", 25 } } do
      local ok, _, _, out = proc.run{ "perf", "report", "-i", file, "--stdio", "--no-children", "--sort", sort[1],
        "-g", "none", "--percent-limit", "0.5", stdout = "capture", stderr = "null" }
      print(("  perf of migrun's client, by %s:"):format(sort[1]))
      local n = 0
      for line in ((ok and out) or ""):gmatch("[^\n]+") do
        if not line:match("^#") and line:match("%%") and n < sort[2] then print("    " .. line) n = n + 1 end
      end
    end
  end
end

---------------------------------------------------------------------------
-- The rerun after a kill
---------------------------------------------------------------------------

-- Ends every session of a database (the killed run's: a SIGKILLed client's
-- COPY sessions end by themselves, an index build would go on) and waits.
local function end_sessions(dbname)
  local deadline = now() + 60
  repeat
    local n = q(tgt, [[select count(pg_terminate_backend(pid)) as n from pg_stat_activity
      where datname = $1 and pid <> pg_backend_pid()]], dbname)[1].n
    if n > 0 then host.sleep(0.1) end
  until n == 0 or now() > deadline
end

-- The chunks of a split table that have rows on a target (one scan):
-- { [i] = true }; a whole table: whether it has rows.
local function present(c, t)
  local name, plan = pg.qualify(t.schema, t.name), plans[t.name]
  if not plan then return q(c, ("select exists (select 1 from %s) as e"):format(name))[1].e end
  if plan.method ~= "key" then die(name .. ": a rerun floor of a table split by blocks is not measured") end
  local cases = {}
  for i = 1, plan.count do cases[i] = ("when %s then %d"):format(chunks.where(plan, i), i) end
  local out = {}
  for row in q(c, ("select case %s end as i from %s group by 1"):format(table.concat(cases, " "), name)):rows() do
    if row.i ~= pg.null then out[row.i] = true end
  end
  return out
end

-- The floor of a rerun on a copy of the killed database: the files of what
-- has no rows there, the post-data items it lacks, ANALYZE where it has no
-- statistics; found before the clock. What has rows is read on a third copy
-- (probe_dbname), dropped after: the first scan of the killed run's rows sets
-- their hint bits, which the rerun and the relay floor pay in their index
-- builds (0.2-0.5 s per scan of big measured alone), so the floor pays it too.
local function floor_rest_job(conninfo, dbname, probe_dbname)
  local probe = assert(pg.connect(conninfo_of(probe_dbname), { name = "probe" }))
  local done = {}
  for _, t in ipairs(tables) do done[t.name] = present(probe, t) end
  probe:close()
  -- the copies written back now, not between this drop and the first run (settle())
  settle()
  drop_db(probe_dbname)
  local c = assert(pg.connect(conninfo, { name = "copy" }))
  local files, left = {}, { chunks = 0, tables = 0 }
  for _, f in ipairs(FILES) do
    local d = done[f.name]
    if (f.chunk and not d[f.chunk]) or (not f.chunk and not d) then
      files[#files + 1] = f
      if f.chunk then left.chunks = left.chunks + 1 else left.tables = left.tables + 1 end
    end
  end
  local bytes = {}
  for _, t in ipairs(tables) do bytes[t.schema .. "." .. t.name] = t.bytes end
  local items = assert(require("migrun.schema").table_post_data(rdb, require("migrun.db").wrap(c), tables))
  local post, n_items = {}, 0
  for k, list in pairs(items) do
    for _, item in ipairs(list) do
      post[#post + 1] = { sql = table.concat(item.sql, ";\n") .. ";", cost = bytes[k] or 0 }
      n_items = n_items + 1
    end
  end
  local analyze = {}
  for row in q(c, [[select c.oid::regclass::text as name, pg_table_size(c.oid) as bytes from pg_class c
      where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
        and not exists (select 1 from pg_statistic s where s.starelid = c.oid)]]):rows() do
    analyze[#analyze + 1] = row
  end
  c:close()
  print(("    left at the kill: %d of %s's %d chunks, %d other tables; %d index/constraint items, %d tables to analyze")
    :format(left.chunks, BIG.name, plans[BIG.name] and plans[BIG.name].count or 1, left.tables, n_items, #analyze))
  return { target = conninfo, dbname = dbname, files = files, post = post, analyze = analyze }
end

local reruns, rest_floors, rest_relays = {}, {}, {}
local function rerun_pairs()
  print(("\n== the rerun after a kill at 80%% of %s's bytes: %d pairs"):format(BIG.name, opt.pairs))
  warm_up()
  for i = 1, opt.pairs do
    local killed = measure_killed(("killed #%d"):format(i), {}, 0.8)
    end_sessions(killed.job.dbname)
    local copy = killed.job.dbname .. "_copy"
    local strategy = tgt:server_version() >= 150000 and " strategy file_copy" or ""
    q(tgt, ("create database %s template %s%s"):format(copy, killed.job.dbname, strategy))
    -- a second copy for the relay floor: the same work, its rows read from the replica
    local relay_copy = killed.job.dbname .. "_relay"
    q(tgt, ("create database %s template %s%s"):format(relay_copy, killed.job.dbname, strategy))
    local probe = killed.job.dbname .. "_probe"
    q(tgt, ("create database %s template %s%s"):format(probe, killed.job.dbname, strategy))
    local rest = floor_rest_job(conninfo_of(copy), copy, probe)
    local relay = {}
    for k, v in pairs(rest) do relay[k] = v end
    relay.target, relay.dbname = conninfo_of(relay_copy), relay_copy
    relay.timeline = i == 1 and (L.dir .. "/timeline-relay") or nil
    local rerun_job = { target = killed.job.target, dbname = killed.job.dbname, dir = killed.job.dir,
                        profile = i == 1 and (L.dir .. "/profile-rerun.json") or nil }
    local round = {
      function() reruns[i] = measure(("rerun #%d"):format(i), "migrun", rerun_job) return reruns[i] end,
      function()
        rest_floors[i] = measure(("floor of the rerun #%d"):format(i), "floor_rest", rest)
        return rest_floors[i]
      end,
      function()
        rest_relays[i] = measure(("relay of the rerun #%d"):format(i), "relay_rest", relay)
        return rest_relays[i]
      end,
    }
    -- each of the three in each place in turn: the first run after the kill
    -- and the copies is the slowest of its round more often than not
    for k = 1, 3 do round[(i + k - 2) % 3 + 1]().place = k end
    reruns[i].at, reruns[i].share = killed.at, killed.share
  end
  profile_of(reruns[1])
  relay_timeline_of(rest_relays[1])
  print()
  goal("rerun after a kill at 80% / its floor", ratios(reruns, rest_floors, wall), "<= 1.15")
  goal("rerun / its floor, target CPU", ratios(reruns, rest_floors, target_cpu), "-")
  goal("rerun / its relay floor (its rows read from the replica)", ratios(reruns, rest_relays, wall), "-")
  goal("relay floor of the rerun / its floor", ratios(rest_relays, rest_floors, wall), "-")
  -- The first run of a round pays more target CPU, whichever method it is,
  -- and that excess is in the kernel (docs/benchmarks.md): each method's
  -- target CPU in the kernel by its place in the round, over the method's
  -- median in the kernel.
  local by_place = { {}, {}, {} }
  for _, runs in ipairs{ reruns, rest_floors, rest_relays } do
    local sys = {}
    for _, r in ipairs(runs) do if not r.failed then sys[#sys + 1] = r.cpu.target_sys end end
    local mid = median(sys)
    for _, r in ipairs(runs) do
      if not r.failed and mid and mid > 0 then table.insert(by_place[r.place], r.cpu.target_sys / mid) end
    end
  end
  print(("  target CPU in the kernel / the method's median, by place in the round: first %s; second %s; last %s")
    :format(summary(by_place[1]), summary(by_place[2]), summary(by_place[3])))
  if loads then
    local secs = {}
    for _, r in ipairs(loads.migrun) do if not r.failed then secs[#secs + 1] = r.seconds end end
    local full = median(secs)
    if full then
      local xs, ys = {}, {}
      for i, r in ipairs(reruns) do
        if not r.failed then xs[#xs + 1] = r.seconds / full end
        if rest_floors[i] and not rest_floors[i].failed then ys[#ys + 1] = rest_floors[i].seconds / full end
      end
      print(("  rerun / migrun's median full load: %s; its floor / the same: %s"):format(summary(xs), summary(ys)))
    end
  end
end

---------------------------------------------------------------------------
-- The verification
---------------------------------------------------------------------------

local function verify_rounds()
  local target = verify_target
  if not target then
    local job = measure("migrun (for the verification)", "migrun", { keep = true })
    if job.failed then die("no migrun target to verify") end
    target = job.job.target
  end
  print("\n== the verification: " .. opt.pairs .. " rounds")
  -- the floor's SQL: the typed row hash (the QA's own expression) of every table, built before the clock
  local rowhash = require "migrun.rowhash"
  local hash_sql = {}
  for _, t in ipairs(tables) do
    local name = pg.qualify(t.schema, t.name)
    local expr = rowhash.expr(assert(rowhash.columns(rdb, name)), "typed")
    hash_sql[#hash_sql + 1] = ("select count(*)::text || ' ' || coalesce(sum(%s), 0)::text as h from %s"):format(expr,
      name)
  end
  -- not counted: the first reader of a page the load wrote sets its rows' hint bits (writes it)
  measure("warm-up hash floor (not counted)", "hash_floor", { target = target, hash_sql = hash_sql },
    { no_check = true, group = "warm-up" })
  local runs = {
    { label = "full QA", method = "qa", job = function() return { target = target } end, opts = { no_check = true } },
    { label = "hash floor", method = "hash_floor", job = function() return { target = target, hash_sql = hash_sql } end,
      opts = { no_check = true } },
  }
  if not skipped.pgcopydb then
    runs[#runs + 1] = { label = "pgcopydb compare data", method = "compare", job = function() return { target = target } end,
      opts = { no_check = true } }
  end
  local by = rounds(runs)
  print()
  goal("full QA / typed-hash sequential-scan floor", ratios(by["full QA"], by["hash floor"], wall), "<= 1.10")
  goal("full QA / hash floor, CPU of both clusters", ratios(by["full QA"], by["hash floor"], function(r)
    return r.cpu.replica + r.cpu.target end), "-")
  if by["pgcopydb compare data"] then
    goal("full QA / pgcopydb compare data", ratios(by["full QA"], by["pgcopydb compare data"], wall), "<= 0.40")
  end
  if loads and loads["migrun hashing"] then
    -- the medians of other rounds: the load's and the verification's are not paired
    local function med(list)
      local xs = {}
      for _, r in ipairs(list) do if not r.failed then xs[#xs + 1] = r.seconds end end
      return median(xs)
    end
    local hashing, plain, qa_ = med(loads["migrun hashing"]), med(loads.migrun), med(by["full QA"])
    if hashing and plain and qa_ then
      print(("  migrun hashing as it loads / (migrun's load + the full QA), medians: %.2f (%.1f s / %.1f + %.1f s)")
        :format(hashing / (plain + qa_), hashing, plain, qa_))
      goals[#goals + 1] = { "migrun hashing as it loads / (load + full QA), medians",
        ("%.2f"):format(hashing / (plain + qa_)), "< 1", hashing / (plain + qa_) }
    end
  end
end

---------------------------------------------------------------------------
-- The run
---------------------------------------------------------------------------

if not skipped.load then load_rounds() end
if not skipped.rerun then rerun_pairs() end
if not skipped.verify then verify_rounds() end

print("\n| run | seconds | peak RSS (MB) | 1-min load before | CPU s: replica | target | source | client |")
print("|---|---|---|---|---|---|---|---|")
local peak = 0
for _, r in ipairs(results) do
  if r.failed then
    print(("| %s | failed | | | | | | |"):format(r.name))
  else
    print(("| %s | %.1f | %.0f | %.2f | %.1f | %.1f | %.1f | %.2f |"):format(r.name, r.seconds or 0, r.rss_mb or 0, r.load,
      r.cpu.replica, r.cpu.target, r.cpu.source, r.cpu.client))
    if r.method == "migrun" and r.group ~= "perf" and (r.rss_mb or 0) > peak then peak = r.rss_mb end
  end
end
print("\n| measure | median (spread; each pair) | goal |")
print("|---|---|---|")
for _, g in ipairs(goals) do print(("| %s | %s | %s |"):format(g[1], g[2], g[3])) end
print(("| peak RSS of migrun and its workers (MB) | %.0f | < 32 MiB |"):format(peak))
print(("\nshape %s, scale %g, %d streams, %d pairs%s, chunks of %d MiB, lab %s, %s, 1-minute load %.2f at start, "
  .. "%.2f at the end"):format(opt.shape, scale, opt.jobs, opt.pairs, opt.apart and ", --apart" or "",
  CHUNK_BYTES // 2^20, L.version or "", os.date("!%Y-%m-%d %H:%M UTC"), load_start, loadavg()))
rep:close() tgt:close() src:close()
