--[[
bench/fullload.lua: the full load three ways, on one lab, in one run.

  migrun bench/fullload.lua [scale]        (make bench [BENCH_SCALE=0.2])

Builds a lab, loads the skewed dataset of postgres-notes.md on the source
(scale 1 is about 1 GB: one table with ~60% of the data, 2M rows, a primary
key, a separate unique column and jsonb; 4 tables of 300k rows; 100 small
tables; one table without a primary key), pauses the replica, then measures
into fresh databases on the target:
  migrun    schema.dump + pre-data restore, fullload.run jobs=2 from the paused
            replica, post-data restore -j 2
  runbook   the whole schema restored, separate unique constraints of primary-key
            tables dropped, `pg_dump -a -t` | psql for the 5 largest tables each
            alone plus one pipeline for the rest, all at once, constraints re-added
  pgcopydb  pgcopydb clone --table-jobs 2 --index-jobs 2 (skipped when absent)
Each method runs in a child `migrun bench/fullload.lua --method NAME` under
/usr/bin/time, which gives wall seconds and the peak RSS of the largest client
process of the method (servers not counted). Row counts are checked after each.
]]
local lab = require "migrun.rehearsal.lab"
local proc = require "migrun.proc"
local host = require "migrun.host"
local pg = require "migrun.pg"
local cjson = require "cjson"

local function die(...) io.stderr:write(table.concat({ ... }, " "), "\n") os.exit(1) end
local function q(conn, sql, ...) local r = assert(conn:exec(sql, ...)) return r end
local function bin(name) return assert(require("migrun.schema").tools(150000)).bindir .. "/" .. name end

---------------------------------------------------------------------------
-- The methods (each runs in its own child process)
---------------------------------------------------------------------------

local methods = {}

function methods.migrun(job)
  local schema = require "migrun.schema"
  local fullload = require "migrun.fullload"
  local tools = assert(schema.tools(job.target_version))
  local dump = assert(schema.dump(job.source, job.dir, { tools = tools }))
  assert(schema.restore("pre-data", job.target, dump, {}))
  assert(fullload.run{ replica = job.replica, target = job.target, tables = job.tables, jobs = 2,
    expect_replay_lsn = job.lsn })
  assert(schema.restore("post-data", job.target, dump, { jobs = 2 }))
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
  for _, h in ipairs(handles) do
    local hok, hhow, hcode = h:wait()
    if not hok then die("runbook load:", hhow, hcode, h.stderr) end
  end
  for _, u in ipairs(uniques) do
    q(t, ("alter table %s add constraint %s %s"):format(u.tbl, pg.quote_ident(u.conname), u.def))
  end
  t:close()
end

function methods.pgcopydb(job)
  local ok, how, code, _, err = proc.run{ "pgcopydb", "clone", "--source", job.copydb_source,
    "--target", job.target, "--table-jobs", "2", "--index-jobs", "2", "--skip-extensions",
    "--dir", job.dir, stdout = "capture", stderr = "capture" }
  if not ok then die("pgcopydb:", how, code, (err or ""):sub(-3000)) end
end

if arg[1] == "--method" then
  local job = cjson.decode(io.read("a"))
  methods[arg[2]](job)
  os.exit(0)
end

---------------------------------------------------------------------------
-- The orchestration
---------------------------------------------------------------------------

local scale = tonumber(arg[1] or os.getenv("BENCH_SCALE") or "1") or die("scale must be a number")
local function rows(n) return math.max(1, math.floor(n * scale)) end

print(("bench/fullload: scale %g (about %d MB of data), 2 parallel streams"):format(scale, math.floor(1000 * scale)))
local L <close> = assert(lab.start{ settings = { all = { max_wal_size = "8GB", checkpoint_timeout = "30min" } } })
local src = assert(pg.connect(L.source.conninfo, { name = "source" }))

local t0 = host.monotonic()
q(src, [[create table big (id bigint primary key, email text not null unique, body jsonb, pad text,
  created_at timestamptz not null default now())]])
q(src, ([[insert into big select g, 'user' || g || '@example.com',
  jsonb_build_object('n', g, 'tags', jsonb_build_array('a' || (g %% 97), 'b' || (g %% 13)), 'note', md5(g::text)),
  repeat(md5((g * 7)::text), 3), timestamptz '2020-01-01' + g * interval '13 seconds'
  from generate_series(1, %d) g]]):format(rows(2000000)))
for i = 1, 4 do
  q(src, ("create table mid%d (id bigint primary key, account int, amount numeric(12,2), note text, at timestamptz)"):format(i))
  q(src, ([[insert into mid%d select g, g %% 5000, (g * 31 %% 100000) / 100.0, repeat(md5(g::text), 2),
    timestamptz '2021-01-01' + g * interval '1 minute' from generate_series(1, %d) g]]):format(i, rows(300000)))
end
for i = 1, 100 do
  q(src, ("create table small%03d (id int primary key, name text, v int)"):format(i))
  q(src, ("insert into small%03d select g, 'n' || g, g * %d from generate_series(1, %d) g"):format(i, i, math.max(10, rows(2000))))
end
q(src, "create table events_nopk (at timestamptz, kind text, payload text)")
q(src, ([[insert into events_nopk select timestamptz '2022-01-01' + g * interval '1 second', 'k' || (g %% 10),
  md5(g::text) from generate_series(1, %d) g]]):format(rows(100000)))
q(src, "vacuum analyze")
local total = q(src, "select pg_database_size(current_database()) as b")[1].b
print(("dataset generated in %.1fs: database %.0f MB"):format(host.monotonic() - t0, tonumber(total) / 2^20))

-- The tables, largest first, with their sizes.
local tables = {}
for row in q(src, [[select n.nspname, c.relname, pg_table_size(c.oid) as bytes, c.reltuples::bigint as est
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.relkind = 'r' and n.nspname = 'public' order by 3 desc, 2]]):rows() do
  tables[#tables + 1] = { schema = row.nspname, name = row.relname, bytes = row.bytes, rows_estimate = row.est }
end

-- Pause the replica where it has everything.
assert(L:wait_replica_caught_up(600))
local rep = assert(pg.connect(L.replica.conninfo, { name = "replica" }))
q(rep, "select pg_wal_replay_pause()")
while q(rep, "select pg_get_wal_replay_pause_state() as s")[1].s ~= "paused" do end
local at = tostring(q(rep, "select pg_last_wal_replay_lsn() as l")[1].l)
local tgt = assert(pg.connect(L.target.conninfo:gsub("dbname=%S+", "dbname=postgres"), { name = "target" }))

local function target_db(name)
  q(tgt, "create database " .. name)
  return (L.target.conninfo:gsub("dbname=%S+", "dbname=" .. name))
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
  c:close()
  return true, idx
end

local have_pgcopydb = proc.run{ "sh", "-c", "command -v pgcopydb" }
local results = {}
local function measure(name, job)
  job.source, job.replica, job.tables, job.lsn = L.source.conninfo, L.replica.conninfo, tables, at
  job.target_version = tgt:server_version()
  job.dir = L.dir .. "/bench-" .. name
  job.target = target_db("bench_" .. name)
  io.stdout:write(("%-9s ... "):format(name)) io.stdout:flush()
  local ok, how, code, _, err = proc.run{ "/usr/bin/time", "-f", "BENCH %e %M", host.exe, arg[0], "--method", name,
    stdin = cjson.encode(job), stdout = "capture", stderr = "capture" }
  local secs, rss = (err or ""):match("BENCH ([%d.]+) (%d+)")
  if not ok or not secs then
    print("FAILED: " .. tostring(how) .. " " .. tostring(code) .. "\n" .. (err or ""):sub(-2000))
    results[#results + 1] = { name = name, failed = true }
    return
  end
  local good, info = check_counts(job.target)
  print(("%.1fs, peak RSS %.0f MB, %s"):format(tonumber(secs), tonumber(rss) / 1024,
    good and ("counts equal, " .. info .. " indexes") or ("COUNTS DIFFER: " .. info)))
  results[#results + 1] = { name = name, seconds = tonumber(secs), rss_mb = tonumber(rss) / 1024, ok = good }
end

measure("migrun", {})
measure("runbook", {})
if have_pgcopydb then
  -- pgcopydb 0.10 cannot read a standby (it asks for a SERIALIZABLE DEFERRABLE snapshot), so it
  -- reads the primary, which takes no writes during the benchmark: the same data.
  measure("pgcopydb", { copydb_source = L.source.conninfo })
else
  print("pgcopydb  skipped: not installed (apt-get install pgcopydb)")
end

local base = results[1].seconds
print()
print(("| method | seconds | vs migrun | peak RSS (MB) |"))
print("|---|---|---|---|")
for _, r in ipairs(results) do
  if r.failed then
    print(("| %s | failed | | |"):format(r.name))
  else
    print(("| %s | %.1f | %s | %.0f |"):format(r.name, r.seconds,
      base and ("%.2f×"):format(r.seconds / base) or "", r.rss_mb))
  end
end
print(("\nscale %g, lab %s, %s"):format(scale, L.version or "", os.date("!%Y-%m-%d %H:%M UTC")))
rep:close() tgt:close() src:close()
