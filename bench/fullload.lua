--[[
bench/fullload.lua: the full load several ways, on one lab, in one run, with
ANALYZE included in every method (a target that serves needs statistics).

  migrun bench/fullload.lua [--scale S] [--shape standard|dominant] [--jobs N]
                            [--more-jobs N] [--skip m1,m2] [--wait-idle SECONDS]
                            [--repeat N] [--apart]
  (make bench [BENCH_SCALE=0.2] [BENCH_SHAPE=dominant])

Datasets (scale 1 is about 1 GB; row counts scale):
  standard  one table with ~60% of the data (2M rows, bigint key, a separate
            unique column, jsonb); 4 tables of 300k rows; 100 small tables; one
            table without a primary key.
  dominant  one table with ~90% of the bytes (bigint key, a separate unique
            column); 4 mid-sized tables; 100 small ones; a small table without a
            primary key and a large one without (split by block ranges).
The replica is paused, then each method fills a fresh database on the target:
  migrun    schema.dump + pre-data, fullload.run (chunks, indexes and ANALYZE per
            table as each completes), then the rest of post-data
  floor     the target alone: pre-data, binary files of the same data (written by
            the replica before the clock starts; the largest table cut in as many
            equal parts as migrun cuts it) loaded by server-side COPY FROM over the
            same number of streams (TRUNCATE + FREEZE for whole tables), then
            pg_restore -j N post-data, vacuumdb --analyze-only -j N
  runbook   whole schema, separate unique constraints dropped, pg_dump -a | psql
            for the 5 largest tables each alone plus one for the rest, constraints
            re-added, vacuumdb --analyze-only -j N
  pgcopydb  Debian's 0.10 (clone --table-jobs N --index-jobs N), and 0.18 from
            shared/peers (--use-copy-binary --split-tables-larger-than), both
            reading the primary (nothing writes to it) and running their VACUUM
            ANALYZE
Then, on the migrun database:
  resume    migrun killed (SIGKILL) once ~80% of the largest table's chunks are
            journaled, then run again: the rerun's time against a full migrun run
  verify    the final QA's full comparison (typed row hashes by key ranges, both
            sides at once over N workers) against count(*) of every table on both
            sides at once, and against every value read out by both servers
            (COPY TO '/dev/null', binary): what any comparison of values costs
  --more-jobs N: migrun and the floor again with N streams.
  --repeat N: migrun and the floor N times in all, each pair one right after
            the other; the ratio of each pair and their median.
  --apart:  the runbook's topology on one machine: in production the
            maintenance replica, the target and the host migrun runs on are
            three machines, so the replica's reading and the client's relaying
            do not take the target's cores. The target's cluster is pinned
            (taskset) to the first half of the cores, the source, the replica
            and every method's client processes to the others, for every
            method alike.
  Every method's CPU seconds (each cluster and the client) are printed; on a
  machine whose cores are all busy, a method's wall time cannot fall below
  its CPU seconds over the cores, whatever it does.
The floor runs once first, not counted: a fresh target creates and zero-fills
every WAL segment the first method writes, the later ones recycle them.
Each method runs as a child `migrun bench/fullload.lua --method NAME` under
/usr/bin/time: wall seconds, and the peak RSS of the largest process of the
method's tree (servers not counted). Row counts are checked after each.
]]
local lab = require "migrun.rehearsal.lab"
local proc = require "migrun.proc"
local host = require "migrun.host"
local pg = require "migrun.pg"
local json = require "migrun.json"

local function die(...) io.stderr:write(table.concat({ ... }, " "), "\n") os.exit(1) end
local function q(conn, sql, ...) local r = assert(conn:exec(sql, ...)) return r end
local function bin(name) return assert(require("migrun.schema").tools(150000)).bindir .. "/" .. name end
local function now() return host.monotonic() end

local PGCOPYDB_018 = (os.getenv("MIGRUN_SOURCE_DIR") or ".") .. "/../shared/peers/pgcopydb-0.18/pgcopydb"
if not io.open(PGCOPYDB_018) then PGCOPYDB_018 = "/work/shared/peers/pgcopydb-0.18/pgcopydb" end

---------------------------------------------------------------------------
-- The methods (each runs in its own child process)
---------------------------------------------------------------------------

local methods = {}

-- migrun: the library calls full.lua's steps make, journaled to a file when
-- job.journal is set (and killed on cue: job.die_at, a share of the largest
-- table's chunks).
function methods.migrun(job)
  local schema = require "migrun.schema"
  local fullload = require "migrun.fullload"
  local db = require "migrun.db"
  local tools = assert(schema.tools(job.target_version))
  -- a rerun (job.journal) finds the dump of its first run, as full.lua's schema step is done then
  local dump
  if job.journal and io.open(job.dir .. "/schema.list") then
    dump = { file = job.dir .. "/schema.dump", list = job.dir .. "/schema.list", tools = tools }
  else
    dump = assert(schema.dump(job.source, job.dir, { tools = tools }))
  end
  local target = db.wrap(assert(pg.connect(job.target, { name = "target" })))
  local replica = db.wrap(assert(pg.connect(job.replica, { name = "replica" })))
  assert(schema.restore_pre_data(job.target, dump, target, job.tables, {}))
  local state = {}
  if job.journal then
    local f = io.open(job.journal)
    if f then state = json.decode(f:read("a")) f:close() end
  end
  local largest = job.tables[1].schema .. "." .. job.tables[1].name
  local function save()
    if not job.journal then return end
    assert(host.write_file(job.journal, json.encode(state), tonumber("600", 8)))
    local cs = state.chunks and state.chunks[largest]
    if job.die_at and cs then
      local n = 0
      for _ in pairs(cs.done) do n = n + 1 end
      if n >= job.die_at * cs.plan.count then
        local f = assert(io.open("/proc/self/stat"))
        local pid = f:read("a"):match("^(%d+)")
        f:close()
        proc.run{ "kill", "-KILL", pid }
      end
    end
  end
  local t_start = host.now()
  local post = assert(schema.table_post_data(replica, target, job.tables))
  assert(fullload.run{ replica = job.replica, target = job.target, tables = job.tables,
    jobs = math.tointeger(job.jobs), chunk_bytes = job.chunk_bytes, split_bytes = job.split_bytes,
    expect_replay_lsn = job.lsn, post = post, state = state, save = save })
  local t_rest = host.now()
  assert(schema.restore_missing(job.target, dump, replica, target, job.tables, { jobs = math.tointeger(job.jobs) }))
  if job.profile then
    -- where the time went, from the journal's own per-table and per-chunk times
    local p = { start = t_start, rest = t_rest, done = host.now(), tables = {}, largest_chunk_ends = {} }
    for _, c in pairs((state.chunks[largest] or {}).done or {}) do
      if c.ended then p.largest_chunk_ends[#p.largest_chunk_ends + 1] = c.ended end
    end
    table.sort(p.largest_chunk_ends)
    for k, r in pairs(state.loaded or {}) do
      if type(r) == "table" then
        local ix, an = (state.indexed or {})[k], (state.analyzed or {})[k]
        p.tables[k] = { load = { r.started, r.ended }, chunks = r.chunks, index = ix and { ix.started, ix.ended },
                        analyze = an and { an.started, an.ended }, bytes = r.bytes }
      end
    end
    assert(host.write_file(job.profile, json.encode(p)))
  end
end

local function analyze_all(job)
  local ok, how, code, _, err = proc.run{ bin("vacuumdb"), "--analyze-only", "--jobs=" .. math.tointeger(job.jobs),
    "--dbname=" .. job.target, stdout = "null", stderr = "capture" }
  if not ok then die("vacuumdb:", how, code, err) end
end

function methods.floor(job)
  local schema = require "migrun.schema"
  local fullload = require "migrun.fullload"
  local tools = assert(schema.tools(job.target_version))
  local dump = assert(schema.dump(job.source, job.dir, { tools = tools }))
  assert(schema.restore("pre-data", job.target, dump, {}))
  -- the files, over the streams (largest first, each to the least loaded)
  local streams = fullload.plan(job.files, math.tointeger(job.jobs))
  local handles = {}
  for _, s in ipairs(streams) do
    local sql = { "\\set ON_ERROR_STOP 1" }
    for _, f in ipairs(s.tables) do
      local name = pg.qualify(f.schema, f.name)
      if f.whole then
        sql[#sql + 1] = ("begin; truncate %s; copy %s from '%s' (format binary, freeze); commit;"):format(name, name, f.path)
      else
        sql[#sql + 1] = ("copy %s from '%s' (format binary);"):format(name, f.path)
      end
    end
    handles[#handles + 1] = assert(proc.spawn{ bin("psql"), "-X", "-q", "--dbname=" .. job.target_super,
      stdin = table.concat(sql, "\n") .. "\n", stdout = "null", stderr = "capture" })
  end
  for _, h in ipairs(handles) do
    local ok, how, code = h:wait()
    if not ok then die("floor load:", how, code, h.stderr) end
  end
  assert(schema.restore("post-data", job.target, dump, { jobs = math.tointeger(job.jobs) }))
  analyze_all(job)
end

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
  analyze_all(job)
end

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

-- count(*) of every table, on one side (a process per side, both at once)
function methods.count(job)
  local c = assert(pg.connect(job.conninfo, { name = "count" }))
  for _, t in ipairs(job.tables) do q(c, "select count(*) from " .. pg.qualify(t.schema, t.name)) end
  c:close()
end

-- every value of every table read out by the server and thrown away, on one
-- side: the least any comparison of the values can cost
function methods.readout(job)
  local c = assert(pg.connect(job.conninfo, { name = "readout" }))
  for _, t in ipairs(job.tables) do q(c, ("copy %s to '/dev/null' (format binary)"):format(pg.qualify(t.schema, t.name))) end
  c:close()
end

function methods.verify(job)
  local qa = require "migrun.qa"
  local db = require "migrun.db"
  local a = db.wrap(assert(pg.connect(job.replica, { name = "replica" })))
  local b = db.wrap(assert(pg.connect(job.target, { name = "target" })))
  local r = assert(qa.compare(a, b, job.tables, {}, { mode = "full", jobs = math.tointeger(job.jobs),
    chunk_bytes = job.chunk_bytes, a_conninfo = job.replica, b_conninfo = job.target }))
  if r.differences > 0 then die(qa.format(r)) end
end

local cli = require "migrun.playbook.cli"
local opt = cli.run({ usage = "migrun bench/fullload.lua",
  about = "The full load several ways on one lab (docs/benchmarks.md)",
  options = {
    { "--scale", "S", "size of the dataset (1 = about 1 GB)", default = 1, number = true },
    { "--shape", "NAME", "standard or dominant", default = "standard" },
    { "--jobs", "N", "parallel streams of every method", default = 2, number = true },
    { "--more-jobs", "N", "migrun and the floor again with N streams" },
    { "--skip", "M1,M2", "methods left out (migrun, floor, runbook, pgcopydb, jobs, resume, verify)" },
    { "--wait-idle", "SECONDS", "wait up to this long for a 1-minute load under 0.5", number = true },
    { "--repeat", "N", "migrun and the floor N times in all, one after the other: the median ratio", default = 1,
      number = true },
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
-- The orchestration
---------------------------------------------------------------------------

if opt.args.scale then opt.scale = tonumber(opt.args.scale) or die("<scale>: a number") end
opt.jobs = math.tointeger(opt.jobs) or die("--jobs: a whole number")
if opt.more_jobs then opt.more_jobs = math.tointeger(tonumber(opt.more_jobs)) or die("--more-jobs: a whole number") end
opt["repeat"] = math.tointeger(opt["repeat"]) or die("--repeat: a whole number")
local skipped = {}
for m in (opt.skip or ""):gmatch("[^,]+") do skipped[m] = true end
opt.skip = skipped
if opt.shape ~= "standard" and opt.shape ~= "dominant" then die("--shape: standard or dominant") end
local scale = opt.scale
local function rows(n) return math.max(1, math.floor(n * scale)) end

local function loadavg()
  local f = io.open("/proc/loadavg")
  local s = f and f:read("a") or ""
  if f then f:close() end
  return tonumber(s:match("^(%S+)")) or 0
end
if opt.wait_idle then
  local deadline = now() + opt.wait_idle
  while loadavg() >= 0.5 and now() < deadline do host.sleep(10) end
end
local load_start = loadavg()

print(("bench/fullload: shape %s, scale %g (about %d MB of data), %d streams, 1-minute load %.2f at start")
  :format(opt.shape, scale, math.floor(1000 * scale), opt.jobs, load_start))
-- The target's bootstrap superuser is named postgres, as the source's: every
-- method restores ownership to the source's roles, and only migrun's playbook
-- (not measured here) copies roles first.
-- autovacuum off on the target: a background vacuum of the tables just
-- loaded lands at random on one method's clock (it was seen vacuuming all 106
-- tables of one floor run and none of the next), and every method ends with
-- ANALYZE of its own, so none relies on it.
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
  -- large and without a key: cut by block ranges
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
print(("largest table: %s, %.0f%% of the data"):format(tables[1].name, 100 * tables[1].bytes / data_bytes))

-- Pause the replica where it has everything.
assert(L:wait_replica_caught_up(600))
local rep = assert(pg.connect(L.replica.conninfo, { name = "replica" }))
q(rep, "select pg_wal_replay_pause()")
while q(rep, "select pg_get_wal_replay_pause_state() as s")[1].s ~= "paused" do end
local at = tostring(q(rep, "select pg_last_wal_replay_lsn() as l")[1].l)
local tgt = assert(pg.connect(L.target.conninfo:gsub("dbname=%S+", "dbname=postgres"), { name = "target" }))

local fullload = require "migrun.fullload"
local chunks = require "migrun.chunks"
local function sizes(jobs)
  local chunk_bytes = fullload.chunk_size(data_bytes, jobs)
  return chunk_bytes, 2 * chunk_bytes
end

local n_db = 0
local function target_db(name)
  n_db = n_db + 1
  local dbname = ("bench_%s_%d"):format(name:gsub("%W", "_"), n_db)
  q(tgt, "create database " .. dbname)
  return (L.target.conninfo:gsub("dbname=%S+", "dbname=" .. dbname)), dbname
end

local function check_counts(conninfo)
  local c = assert(pg.connect(conninfo, { name = "check" }))
  for _, t in ipairs(tables) do
    local name = pg.qualify(t.schema, t.name)
    local a = q(rep, "select count(*) as n from " .. name)[1].n
    local b = q(c, "select count(*) as n from " .. name)[1].n
    if a ~= b then c:close() return false, ("%s: %d rows on the replica, %d on the target"):format(name, a, b) end
  end
  local idx = q(c, "select count(*) as n from pg_indexes where schemaname = 'public'")[1].n
  local unanalyzed = q(c, [[select count(*) as n from pg_stat_user_tables where schemaname = 'public'
    and last_analyze is null and last_autoanalyze is null]])[1].n
  -- the server's own work during the method: autovacuum took cores too
  local auto = q(c, [[select coalesce(sum(autovacuum_count), 0)::int as v, coalesce(sum(autoanalyze_count), 0)::int as a
    from pg_stat_user_tables where schemaname = 'public']])[1]
  c:close()
  return true, ("%d indexes, %d tables without statistics, autovacuum %d, autoanalyze %d"):format(idx, unanalyzed,
    auto.v, auto.a)
end

-- The floor's files: written by the replica (server side) before the clock,
-- once for each number of streams (which sets how many parts the largest
-- table is cut into), in a directory of their own.
local files_of = {}
local function floor_files(jobs)
  if files_of[jobs] then return table.unpack(files_of[jobs]) end
  local files_dir = ("%s/floor-files-%d"):format(L.dir, jobs)
  proc.run{ "mkdir", "-p", files_dir }
  proc.run{ "chown", "postgres", files_dir }
  local chunk_bytes, split_bytes = sizes(jobs)
  local rdb = require("migrun.db").wrap(rep)
  local plan = chunks.plan(rdb, tables[1], { chunk_bytes = chunk_bytes, split_bytes = split_bytes })
  local parts = plan and plan.count or 1
  local files = {}
  for i, t in ipairs(tables) do
    local name = pg.qualify(t.schema, t.name)
    if i == 1 and parts > 1 then
      -- equal parts of the largest table (by key: every part the same number of keys)
      local mm = q(rep, ("select min(id) as lo, max(id) as hi from %s"):format(name))[1]
      local width = (mm.hi - mm.lo + parts) // parts
      for p = 1, parts do
        local path = ("%s/%s.%d.bin"):format(files_dir, t.name, p)
        local lo = mm.lo + (p - 1) * width
        q(rep, ("copy (select * from %s where id >= %d and id < %d) to '%s' (format binary)"):format(name, lo,
          lo + width, path))
        files[#files + 1] = { schema = t.schema, name = t.name, path = path, bytes = t.bytes / parts }
      end
    else
      local path = ("%s/%s.bin"):format(files_dir, t.name)
      q(rep, ("copy %s to '%s' (format binary)"):format(name, path))
      files[#files + 1] = { schema = t.schema, name = t.name, path = path, bytes = t.bytes, whole = true }
    end
  end
  files_of[jobs] = { files, parts }
  return files, parts
end

-- CPU seconds a cluster has used since it started: its postmaster, the
-- children it has reaped (cutime, cstime: every backend that has exited) and
-- the children alive (backends, the WAL receiver, the checkpointer...). The
-- difference over a method is where the machine's cores went.
local TICKS = tonumber((select(4, proc.run{ "getconf", "CLK_TCK" }) or ""):match("%d+")) or 100
local function ticks_of(pid)
  local stat = host.read_file("/proc/" .. pid .. "/stat")
  local f = {}
  for x in (stat and stat:match("%) (.*)") or ""):gmatch("%S+") do f[#f + 1] = x end
  -- fields 14-17 of stat(5): utime stime cutime cstime; f[1] is field 3
  return (tonumber(f[12]) or 0) + (tonumber(f[13]) or 0) + (tonumber(f[14]) or 0) + (tonumber(f[15]) or 0)
end
local function cluster_cpu(c)
  local pm = c:pid()
  if not pm then return 0 end
  local ticks = ticks_of(pm)
  for child in (host.read_file(("/proc/%d/task/%d/children"):format(pm, pm)) or ""):gmatch("%d+") do
    ticks = ticks + ticks_of(child)
  end
  return ticks / TICKS
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
    local cpus = name == "target" and target_cpus or other_cpus
    local pids = { pm }
    for child in (host.read_file(("/proc/%d/task/%d/children"):format(pm, pm)) or ""):gmatch("%d+") do
      pids[#pids + 1] = child
    end
    for _, pid in ipairs(pids) do
      local ok, how, code, _, err = proc.run{ "taskset", "-a", "-p", "-c", cpus, tostring(pid), stdout = "null",
        stderr = "capture" }
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
local function cpu_now()
  local t = {}
  for _, name in ipairs(CLUSTERS) do t[name] = cluster_cpu(L[name]) end
  return t
end
local function cpu_since(before)
  -- a backend that has just exited is in neither of its postmaster's counts
  -- until the postmaster reaps it: give it the time to
  host.sleep(0.3)
  local t = cpu_now()
  for _, name in ipairs(CLUSTERS) do t[name] = t[name] - before[name] end
  return t
end
local function cpu_text(cpu, seconds)
  return ("CPU s: replica %.1f, target %.1f, source %.1f, client %.1f (%d cores x %.1f s = %.1f)"):format(
    cpu.replica, cpu.target, cpu.source, cpu.client or 0, CORES, seconds, CORES * seconds)
end

local results = {}
local function measure(label, method, job)
  job.source, job.replica, job.tables, job.lsn = L.source.conninfo, L.replica.conninfo, tables, at
  job.jobs = job.jobs or opt.jobs
  job.chunk_bytes, job.split_bytes = sizes(job.jobs)
  job.target_version = tgt:server_version()
  job.dir = job.dir or (L.dir .. "/bench-" .. label:gsub("%W", "_") .. "-" .. n_db)
  if not job.target then job.target, job.dbname = target_db(label) end
  job.target_super = job.target
  -- Every method starts from the same state: what the earlier ones wrote is
  -- on disk (a checkpoint of the target, then sync), so that none pays for
  -- the kernel writing back another's gigabytes while its clock runs.
  q(tgt, "checkpoint")
  proc.run{ "sync" }
  io.stdout:write(("%-22s ... "):format(label)) io.stdout:flush()
  local load_before = loadavg()
  local cpu_before = cpu_now()
  local ok, how, code, _, err = proc.run(on_client_cpus{ "/usr/bin/time", "-f", "BENCH %e %M %U %S", host.exe, arg[0],
    "--method", method, stdin = json.encode(job), stdout = "capture", stderr = "capture" })
  local cpu = cpu_since(cpu_before)
  local secs, rss, user, sys = (err or ""):match("BENCH ([%d.]+) (%d+) ([%d.]+) ([%d.]+)")
  cpu.client = (tonumber(user) or 0) + (tonumber(sys) or 0) -- migrun (or the peer) and every child it waited for
  local r = { name = label, method = method, seconds = tonumber(secs), rss_mb = rss and tonumber(rss) / 1024,
              load = load_before, job = job, cpu = cpu }
  results[#results + 1] = r
  if job.expect_kill then
    r.killed = (err or ""):find("terminated by signal 9", 1, true) ~= nil
    if not r.killed then
      print(ok and "finished before the kill: the largest table has too few chunks at this scale"
        or ("FAILED before the kill: " .. tostring(how) .. " " .. tostring(code) .. "\n" .. (err or ""):sub(-2000)))
      r.failed = true
      return r
    end
    print(("killed after %.1fs (%s %s), peak RSS %.0f MB"):format(r.seconds or 0, tostring(how), tostring(code),
      r.rss_mb or 0))
    return r
  end
  if not ok or not secs then
    print("FAILED: " .. tostring(how) .. " " .. tostring(code) .. "\n" .. (err or ""):sub(-2000))
    r.failed = true
    return r
  end
  if job.no_check then
    print(("%.1fs, peak RSS %.0f MB\n    %s"):format(r.seconds, r.rss_mb, cpu_text(cpu, r.seconds)))
    return r
  end
  local good, info = check_counts(job.target)
  r.ok = good
  -- a database no later measure reads is dropped: methods that ran before
  -- must not leave the ones after them less memory for the page cache
  if not job.keep and job.dbname then q(tgt, "drop database " .. job.dbname) end
  print(("%.1fs, peak RSS %.0f MB, %s (load %.2f)\n    %s"):format(r.seconds, r.rss_mb,
    good and ("counts equal, " .. info) or ("COUNTS DIFFER: " .. info), load_before, cpu_text(cpu, r.seconds)))
  return r
end

local function skip(m) return opt.skip[m] end

-- Where migrun's time went (job.profile): the largest table's load, index
-- builds and ANALYZE, everything else, the rest of post-data.
local function profile_of(r)
  local f = r and r.job.profile and io.open(r.job.profile)
  if not f then return end
  local p = json.decode(f:read("a"))
  f:close()
  r.profile = p
  local big = p.tables[tables[1].schema .. "." .. tables[1].name]
  local last_load, sum_index, sum_analyze = p.start, 0, 0
  for _, t in pairs(p.tables) do
    if t.load[2] > last_load then last_load = t.load[2] end
    if t.index then sum_index = sum_index + (t.index[2] - t.index[1]) end
    if t.analyze then sum_analyze = sum_analyze + (t.analyze[2] - t.analyze[1]) end
  end
  local function span(x) return x and ("%.1f-%.1fs"):format(x[1] - p.start, x[2] - p.start) or "-" end
  print(("  profile %s: %s load %s (%s chunks), its indexes %s, its ANALYZE %s; last table loaded at %.1fs; "
    .. "index builds %.1fs and ANALYZE %.1fs of worker time in all; rest of post-data %.1fs; total %.1fs")
    :format(r.name, tables[1].name, big and span(big.load) or "(earlier run)", big and tostring(big.chunks or 1) or "-",
      big and span(big.index) or "-", big and span(big.analyze) or "-", last_load - p.start, sum_index, sum_analyze,
      p.done - p.rest, p.done - p.start))
end

-- A fresh target has no WAL segments to recycle: the first method run would
-- create and zero-fill every segment it writes (some 2 GB at scale 1, system
-- CPU of the target's backends) and the ones after it would not. The floor
-- runs once first, not counted, so that every measured method finds them.
if not (skip("floor") and skip("migrun")) then
  local warm = measure("warm-up (not counted)", "floor", { files = floor_files(opt.jobs) })
  if warm.failed then die("the warm-up (the floor) failed") end
  table.remove(results)
end

-- every migrun run journals to a file, as a playbook does
local mig = not skip("migrun") and measure("migrun", "migrun", { profile = L.dir .. "/profile-migrun.json",
  journal = L.dir .. "/bench-migrun-journal.json", keep = true }) or nil -- verified at the end
profile_of(mig)
local floor
if not skip("floor") then
  local files, parts = floor_files(opt.jobs)
  io.stdout:write(("(floor: %d files, the largest table in %d parts)\n"):format(#files, parts))
  floor = measure("floor", "floor", { files = files })
end
-- The same pair again, one right after the other: on a machine shared with
-- other work, one pair is one sample of a ratio that moves by some 10%.
local pairs_measured = {}
if mig and floor then
  pairs_measured[1] = { mig, floor }
  for i = 2, opt["repeat"] do
    local m = measure(("migrun #%d"):format(i), "migrun", { journal = ("%s/bench-migrun-journal-%d.json"):format(L.dir, i) })
    local f = measure(("floor #%d"):format(i), "floor", { files = floor_files(opt.jobs) })
    pairs_measured[#pairs_measured + 1] = { m, f }
  end
end
if not skip("runbook") then measure("runbook", "runbook", {}) end
if not skip("pgcopydb") then
  if proc.run{ "sh", "-c", "command -v pgcopydb" } then
    -- pgcopydb 0.10 cannot read a standby (it asks for a SERIALIZABLE DEFERRABLE snapshot);
    -- it reads the primary, which takes no writes during the benchmark: the same data.
    measure("pgcopydb 0.10", "pgcopydb-0.10", { copydb_source = L.source.conninfo })
  else
    print("pgcopydb 0.10          skipped: not installed (apt-get install pgcopydb)")
  end
  if io.open(PGCOPYDB_018) then
    -- 0.18 skips its split when it reads a standby: it reads the primary too
    measure("pgcopydb 0.18", "pgcopydb-0.18", { copydb_source = L.source.conninfo })
  else
    print("pgcopydb 0.18          skipped: not found at " .. PGCOPYDB_018)
  end
end
if opt.more_jobs and not skip("jobs") then
  measure(("migrun, %d streams"):format(opt.more_jobs), "migrun", { jobs = opt.more_jobs,
    journal = L.dir .. "/bench-migrun-more-journal.json" })
  measure(("floor, %d streams"):format(opt.more_jobs), "floor", { files = floor_files(opt.more_jobs),
    jobs = opt.more_jobs })
end
local resume
if not skip("resume") then
  local journal = L.dir .. "/bench-resume-journal.json"
  local killed = measure("migrun killed at 80%", "migrun", { journal = journal, die_at = 0.8, expect_kill = true })
  local rerun = measure("migrun rerun", "migrun", { journal = journal, target = killed.job.target,
    dbname = killed.job.dbname, dir = killed.job.dir, profile = L.dir .. "/profile-rerun.json" })
  profile_of(rerun)
  resume = { killed = killed, rerun = rerun }
end
local verify
if mig and not mig.failed and not skip("verify") then
  local v = measure("verify (row hashes)", "verify", { target = mig.job.target, no_check = true })
  -- a method on every table of both sides at once: a process per side
  local function both_sides(label, method)
    io.stdout:write(("%-22s ... "):format(label)) io.stdout:flush()
    local c0, cpu_before = now(), cpu_now()
    local hs = {}
    for _, conninfo in ipairs{ L.replica.conninfo, mig.job.target } do
      hs[#hs + 1] = assert(proc.spawn(on_client_cpus{ host.exe, arg[0], "--method", method, stdout = "null",
        stderr = "capture", stdin = json.encode{ conninfo = conninfo, tables = tables } }))
    end
    for _, h in ipairs(hs) do local ok = h:wait() if not ok then die(method .. " failed: " .. tostring(h.stderr)) end end
    local secs = now() - c0
    print(("%.1fs\n    %s"):format(secs, cpu_text(cpu_since(cpu_before), secs)))
    return secs
  end
  verify = { hash = v.seconds, count = both_sides("count(*) both sides", "count"),
             readout = both_sides("read out both sides", "readout") }
end

local base = floor and not floor.failed and floor.seconds or nil
print()
print(("| method | seconds | vs floor | peak RSS (MB) | 1-min load before | CPU s: replica | target | source | client |"))
print("|---|---|---|---|---|---|---|---|---|")
for _, r in ipairs(results) do
  if r.failed then
    print(("| %s | failed | | | | | | | |"):format(r.name))
  elseif r.seconds then
    print(("| %s | %.1f | %s | %.0f | %.2f | %.1f | %.1f | %.1f | %.1f |"):format(r.name, r.seconds,
      base and ("%.2f×"):format(r.seconds / base) or "", r.rss_mb or 0, r.load, r.cpu.replica, r.cpu.target,
      r.cpu.source, r.cpu.client))
  end
end
print()
if mig and not mig.failed and base then print(("migrun / floor: %.2f"):format(mig.seconds / base)) end
if #pairs_measured > 1 then
  -- and the CPU each of the pair used, servers and client: where the cores
  -- are the limit, the wall-time ratio follows this one
  local function total(r) return r.cpu.replica + r.cpu.target + r.cpu.source + r.cpu.client end
  local ratios, listed, cpu = {}, {}, {}
  for _, pr in ipairs(pairs_measured) do
    if not pr[1].failed and not pr[2].failed then
      ratios[#ratios + 1] = pr[1].seconds / pr[2].seconds
      listed[#listed + 1] = ("%.2f"):format(ratios[#ratios])
      cpu[#cpu + 1] = ("%.2f"):format(total(pr[1]) / total(pr[2]))
    end
  end
  table.sort(ratios)
  local median = #ratios % 2 == 1 and ratios[(#ratios + 1) // 2] or (ratios[#ratios // 2] + ratios[#ratios // 2 + 1]) / 2
  print(("migrun / floor, %d pairs one after the other: %s; median %.2f"):format(#ratios, table.concat(listed, ", "),
    median))
  print(("  CPU seconds of migrun / of the floor (every cluster and the client), pair by pair: %s"):format(
    table.concat(cpu, ", ")))
end
if resume and mig and not mig.failed and resume.killed.killed and not resume.rerun.failed then
  print(("rerun after a kill at 80%% of %s / full migrun: %.2f (%.1fs / %.1fs)"):format(tables[1].name,
    resume.rerun.seconds / mig.seconds, resume.rerun.seconds, mig.seconds))
  -- what the full run still had to do once 80% of the largest table's chunks
  -- had committed (the point the kill comes at), from its own profile
  local ends = mig.profile and mig.profile.largest_chunk_ends or {}
  local at80 = ends[math.ceil(0.8 * #ends)]
  if at80 then
    local left = mig.profile.done - at80
    print(("  the full run's work after that point: %.1fs (%.2f of it): the rerun took %.2f× that "
      .. "(the chunks in flight at the kill loaded again, and its start)"):format(left, left / mig.seconds,
      resume.rerun.seconds / left))
  end
end
if verify then
  print(("full row-hash verification / count(*) of both sides: %.2f (%.1fs / %.1fs)"):format(verify.hash / verify.count,
    verify.hash, verify.count))
  print(("  every value read out by the servers (COPY TO /dev/null, no comparison) / count(*): %.2f (%.1fs): "
    .. "the least a comparison of the values costs"):format(verify.readout / verify.count, verify.readout))
end
print(("\nshape %s, scale %g, %d streams, lab %s, %s, 1-minute load %.2f at start, %.2f at the end"):format(opt.shape,
  scale, opt.jobs, L.version or "", os.date("!%Y-%m-%d %H:%M UTC"), load_start, loadavg()))
rep:close() tgt:close() src:close()
