--[[
migrun.rehearsal.demo: a sample database shaped like the runbook's, and a write
workload to keep it busy, for `make demo` and the end-to-end tests.

  demo.load_sample(conn, { scale = 1, small_tables = 20 })     -- on the source primary
  demo.workload(conn, { seconds =, rate =, seed =, stop_file = })  -- writes until told to stop
  demo.sample_tables()                       -- the table names, with what each is for

The shape (scale 1, ~60 MB): one dominant table (events: ~60% of the bytes,
jsonb payloads), a few big ones (calls, sessions), many small ones
(ref_01..ref_20), a table with a primary key and a separate unique constraint
(accounts.email), one without a primary key (page_views: its updates and
deletes cannot replicate through pglogical), and a json column with values
above DMS's default LOB limit of 32 KB (documents.body, up to ~48 KB).
Every table has a created_at spread over the last six months, for the
per-month QA counts.
]]
local pg = require "migrun.pg"

local demo = {}

demo.SMALL_TABLES = 20

function demo.sample_tables()
  local t = {
    { "public.events", "dominant table (jsonb payloads)" },
    { "public.calls", "big table" },
    { "public.sessions", "big table" },
    { "public.accounts", "primary key and a separate unique constraint (email)" },
    { "public.page_views", "no primary key: updates and deletes do not replicate" },
    { "public.documents", "json values above the 32 KB LOB limit" },
  }
  for i = 1, demo.SMALL_TABLES do t[#t + 1] = { ("public.ref_%02d"):format(i), "small table" } end
  return t
end

local function exec(conn, sql, ...)
  return assert(conn:exec(sql, ...))
end

function demo.load_sample(conn, opts)
  opts = opts or {}
  local scale = opts.scale or 1
  local n = function(x) return math.max(1, math.floor(x * scale)) end
  exec(conn, [[
    create table accounts (id bigserial primary key, email text not null unique,
      name text not null, created_at timestamptz not null default now());
    create table events (id bigserial primary key, account_id bigint not null,
      kind text not null, payload jsonb not null, created_at timestamptz not null default now());
    create index events_account_idx on events (account_id);
    create table calls (id bigserial primary key, account_id bigint not null,
      duration_s int not null, caller text not null, created_at timestamptz not null default now());
    create table sessions (id bigserial primary key, account_id bigint not null,
      token text not null, created_at timestamptz not null default now());
    create table page_views (account_id bigint, url text not null,
      created_at timestamptz not null default now());
    create table documents (id bigserial primary key, title text not null, body json not null,
      created_at timestamptz not null default now());
  ]])
  local spread = "now() - (random() * interval '180 days')"
  exec(conn, ([[insert into accounts (email, name, created_at)
    select 'user' || g || '@example.com', 'User ' || g, %s from generate_series(1, %d) g]]):format(spread, n(5000)))
  exec(conn, ([[insert into events (account_id, kind, payload, created_at)
    select 1 + (g %% %d), (array['click','call','form','chat'])[1 + g %% 4],
      jsonb_build_object('seq', g, 'source', 'web', 'tags', jsonb_build_array('a', 'b', g %% 7),
        'note', repeat(md5(g::text), 4)), %s
    from generate_series(1, %d) g]]):format(n(5000), spread, n(150000)))
  exec(conn, ([[insert into calls (account_id, duration_s, caller, created_at)
    select 1 + (g %% %d), g %% 3600, '+1555' || lpad((g %% 10000000)::text, 7, '0'), %s
    from generate_series(1, %d) g]]):format(n(5000), spread, n(60000)))
  exec(conn, ([[insert into sessions (account_id, token, created_at)
    select 1 + (g %% %d), md5(g::text) || md5((g * 7)::text), %s from generate_series(1, %d) g]])
    :format(n(5000), spread, n(50000)))
  exec(conn, ([[insert into page_views (account_id, url, created_at)
    select 1 + (g %% %d), '/page/' || (g %% 500), %s from generate_series(1, %d) g]])
    :format(n(5000), spread, n(20000)))
  -- a few documents far above 32 KB, the rest small
  exec(conn, ([[insert into documents (title, body, created_at)
    select 'doc ' || g, json_build_object('id', g, 'text',
      repeat(md5(g::text), case when g %% 50 = 0 then 1500 else 8 end)), %s
    from generate_series(1, %d) g]]):format(spread, n(1000)))
  for i = 1, opts.small_tables or demo.SMALL_TABLES do
    exec(conn, ([[create table ref_%02d (id serial primary key, code text not null, label text,
        created_at timestamptz not null default now());
      insert into ref_%02d (code, label, created_at)
        select 'c' || g, 'label ' || g, %s from generate_series(1, %d) g]])
      :format(i, i, spread, n(50 + 40 * i)))
  end
  exec(conn, "analyze")
  return true
end

--[[ demo.drive(conn, opts, transaction): a write workload's loop, for any
sample: transaction(run, done) runs inside BEGIN/COMMIT, run(sql, ...)
returning the rows affected, until opts.seconds pass or opts.stop_file
exists; opts.rate transactions per second (default 20), opts.seed makes it
repeatable. Returns done = { transactions, inserts, updates, deletes } as
the transactions counted them; done.refused (the error) when it stopped
because the source refused its writes (read-only, or its session terminated). ]]
function demo.drive(conn, opts, transaction)
  opts = opts or {}
  local host = require "migrun.host"
  math.randomseed(opts.seed or 1)
  local rate = opts.rate or 20
  local deadline = opts.seconds and (host.monotonic() + opts.seconds) or math.huge
  local done = { transactions = 0, inserts = 0, updates = 0, deletes = 0 }
  local function stop_requested()
    if host.monotonic() >= deadline then return true end
    if opts.stop_file then
      local f = io.open(opts.stop_file, "r")
      if f then f:close() return true end
    end
    return false
  end
  -- A cutover makes the source read-only (25006) or terminates this session
  -- (57P01, or the connection is gone): the workload stops cleanly then.
  local function refused(err)
    return err.sqlstate == "25006" or err.sqlstate == "57P01" or err.kind == "connection"
  end
  local function exec(sql, ...)
    local res, err = conn:exec(sql, ...)
    if not res then error(refused(err) and { refused = err } or err, 0) end
    return res
  end
  local function run(sql, ...)
    return exec(sql, ...).affected or 0
  end
  local function one_transaction()
    exec("begin")
    transaction(run, done)
    exec("commit")
  end
  while not stop_requested() do
    local ok, err = pcall(one_transaction)
    if not ok then
      if type(err) == "table" and err.refused then
        done.refused = tostring(err.refused)
        break
      end
      error(err, 0)
    end
    done.transactions = done.transactions + 1
    host.sleep(1 / rate)
  end
  return done
end

--[[ demo.workload(conn, opts): inserts, updates and deletes on the sample
tables (demo.drive's loop and options); opts.no_pk_changes = false skips
updates/deletes of page_views. ]]
function demo.workload(conn, opts)
  opts = opts or {}
  -- as many small tables as the sample was loaded with (demo.load_sample's small_tables)
  local small = assert(conn:exec([[select count(*) as n from pg_class
    where relkind = 'r' and relnamespace = 'public'::regnamespace and relname ~ '^ref_[0-9]+$']]))[1].n
  return demo.drive(conn, opts, function(run, done)
    local r = math.random(100)
    if r <= 40 then
      done.inserts = done.inserts + run([[insert into events (account_id, kind, payload)
        values ($1, 'click', jsonb_build_object('live', true, 'n', $2::int))]], math.random(5000), math.random(1000))
    elseif r <= 55 then
      done.updates = done.updates + run(
        "update events set payload = payload || '{\"seen\": true}' where id = $1", math.random(150000))
    elseif r <= 62 then
      done.deletes = done.deletes + run("delete from events where id = $1", math.random(150000))
    elseif r <= 72 then
      done.inserts = done.inserts + run(
        "insert into calls (account_id, duration_s, caller) values ($1, $2, '+15550000000')",
        math.random(5000), math.random(600))
      done.updates = done.updates + run("update calls set duration_s = duration_s + 1 where id = $1",
        math.random(60000))
    elseif r <= 78 then
      local id = math.random(1000000, 9999999)
      done.inserts = done.inserts + run("insert into accounts (email, name) values ($1, 'live') on conflict do nothing",
        "live" .. id .. "@example.com")
      done.updates = done.updates + run("update accounts set email = 'moved' || id || '@example.com' where id = $1",
        math.random(5000))
    elseif r <= 84 then
      done.inserts = done.inserts + run("insert into sessions (account_id, token) values ($1, md5(random()::text))",
        math.random(5000))
      done.deletes = done.deletes + run("delete from sessions where id = $1", math.random(50000))
    elseif r <= 90 then
      done.inserts = done.inserts + run("insert into page_views (account_id, url) values ($1, '/live')",
        math.random(5000))
      if opts.no_pk_changes ~= false and r == 90 then
        done.updates = done.updates + run(
          "update page_views set url = '/changed' where ctid = (select ctid from page_views limit 1)")
      end
    elseif r <= 94 then
      done.inserts = done.inserts + run([[insert into documents (title, body)
        values ('live', json_build_object('text', repeat(md5(random()::text), $1::int)))]],
        r == 94 and 1400 or 4)
    else
      local t = ("ref_%02d"):format(math.random(math.max(1, small)))
      done.inserts = done.inserts + run(("insert into %s (code, label) values ('live', 'x')"):format(t))
      done.updates = done.updates + run(("update %s set label = 'changed' where id = $1"):format(t),
        math.random(50))
    end
  end)
end

-- Entry point for a workload child process: connection from MIGRUN_WORKLOAD_CONNINFO
-- (environment, never argv), options from MIGRUN_WORKLOAD_* variables.
function demo.workload_main()
  local conn = assert(pg.connect(assert(os.getenv("MIGRUN_WORKLOAD_CONNINFO"), "MIGRUN_WORKLOAD_CONNINFO"),
    { name = "workload" }))
  -- the sample's own workload (MIGRUN_WORKLOAD_SAMPLE names its module)
  local sample = require(os.getenv("MIGRUN_WORKLOAD_SAMPLE") or "migrun.rehearsal.demo")
  local done = sample.workload(conn, {
    rate = tonumber(os.getenv("MIGRUN_WORKLOAD_RATE")),
    seconds = tonumber(os.getenv("MIGRUN_WORKLOAD_SECONDS")),
    seed = tonumber(os.getenv("MIGRUN_WORKLOAD_SEED")),
    stop_file = os.getenv("MIGRUN_WORKLOAD_STOP_FILE"),
    no_pk_changes = os.getenv("MIGRUN_WORKLOAD_NO_PK_CHANGES") ~= "0",
  })
  io.stdout:write(("workload: %d transactions, %d inserts, %d updates, %d deletes%s\n")
    :format(done.transactions, done.inserts, done.updates, done.deletes,
      done.refused and ("; stopped, writes refused: " .. done.refused) or ""))
  conn:close()
end

---------------------------------------------------------------------------
-- A rehearsal: the lab, the sample, a migration config and the workload
---------------------------------------------------------------------------

-- A Lua literal for a config value (keys sorted, readable).
local function literal(v, indent)
  indent = indent or ""
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) ~= "table" then return tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if type(a) == type(b) then return a < b end
    return type(a) == "number"
  end)
  local inner = indent .. "  "
  local parts = {}
  for _, k in ipairs(keys) do
    local key = (type(k) == "number" and "") or
      (k:match("^[%a_][%w_]*$") and (k .. " = ")) or ("[%q] = "):format(k)
    parts[#parts + 1] = inner .. key .. literal(v[k], inner)
  end
  if #parts == 0 then return "{}" end
  return "{\n" .. table.concat(parts, ",\n") .. ",\n" .. indent .. "}"
end
demo.literal = literal

local function merge(into, from)
  for k, v in pairs(from or {}) do
    if type(v) == "table" and type(into[k]) == "table" and #v == 0 then merge(into[k], v) else into[k] = v end
  end
  return into
end

local Rehearsal = {}
Rehearsal.__index = Rehearsal

-- The config of a rehearsal of this sample, before the caller's overrides.
function demo.config_defaults()
  return {
    schemas = { "public" },
    groups = { largest_alone = 3 },
    lobs = { tables = { ["public.documents"] = { max_kb = 64, truncation_ok = false } } },
    qa = { timestamp_column = "created_at", large_tables = 3, small_sample = 5 },
    -- page_views has no primary key and the workload updates it: DMS carries only its inserts,
    -- which the team accepts by its row count
    cutover = { count_only = { "public.page_views" } },
  }
end

--[[ demo.rehearsal{ dir = (state and config live here; required), scale = 1,
       sample_options = { given to the sample's load_sample, e.g. small_tables = 94 },
       name = "demo", config = { overrides }, dms = { delays=, faults= },
       lab = { lab.start options }, sample = "migrun.rehearsal.demo" } -> R | nil, err
     Starts a lab with the DMS emulator, loads the sample on the source, and
     writes R.config_path: a migration config for it whose connection strings
     name the lab's passfile (no password in the file). R.env holds what the
     playbook's process needs in its environment (the emulator's keys).
     opts.sample names another sample's module: one with load_sample(conn,
     {scale}), workload(conn, opts) (usually on demo.drive) and
     config_defaults() (schemas, lobs, qa ... for its tables), such as
     migrun.rehearsal.awkward. The lab's target role is RDS-like (no
     superuser: migrun.rehearsal.lab). ]]
function demo.rehearsal(opts)
  local lab = require "migrun.rehearsal.lab"
  local host = require "migrun.host"
  assert(opts and opts.dir, "demo.rehearsal: dir expected")
  assert(host.mkdir(opts.dir, tonumber("700", 8)))
  local lab_opts = merge({ dms = opts.dms or true }, opts.lab)
  local L, err = lab.start(lab_opts)
  if not L then return nil, err end
  local sample_name = opts.sample or "migrun.rehearsal.demo"
  local sample = require(sample_name)
  local conn = assert(pg.connect(L.source.conninfo, { name = "source" }))
  sample.load_sample(conn, merge({ scale = opts.scale or 1 }, opts.sample_options))
  conn:close()
  local client = assert(L:dms_client())
  local instance = assert(client:describe_replication_instances())[1]
  local function conninfo(c) return c.migrun_conninfo .. " passfile=" .. L.passfile end
  local cfg = merge({
    name = opts.name or "demo",
    state_dir = opts.dir .. "/state",
    source = { conninfo = conninfo(L.source) },
    replica = { conninfo = conninfo(L.replica) },
    target = { conninfo = conninfo(L.target) },
    full_load = { jobs = 2 },
    -- the lab's WAL is megabytes: the production minimums (20 GiB free on
    -- the replica's disk) would stop it on a machine whose disk is merely full
    wal_guard = { interval = 5, replica_min_free_bytes = 64 * 1024 * 1024 },
    preflight = { min_free_bytes = 64 * 1024 * 1024 },
    dms = {
      region = L.dms.region, endpoint_url = L.dms.url,
      replication_instance_arn = instance.ReplicationInstanceArn,
      start_pause = 1,
      catch_up = { lag_bytes = 4 * 1024 * 1024, poll = 1, timeout = 600 },
    },
  }, sample.config_defaults())
  merge(cfg, opts.config)
  local path = opts.dir .. "/migration.lua"
  assert(host.write_file(path, "-- written by migrun.rehearsal.demo for the local lab\nreturn " .. literal(cfg) .. "\n", tonumber("600", 8)))
  return setmetatable({ lab = L, config = cfg, config_path = path, dir = opts.dir, sample = sample_name,
    -- a rehearsal's credentials are the emulator's; never look for an instance's (169.254.169.254)
    env = { AWS_ACCESS_KEY_ID = L.dms.access_key, AWS_SECRET_ACCESS_KEY = L.dms.secret_key,
            AWS_REGION = L.dms.region, AWS_EC2_METADATA_DISABLED = "true" } }, Rehearsal)
end

-- Starts the write workload on the primary as a child process.
function Rehearsal:start_workload(opts)
  opts = opts or {}
  local proc = require "migrun.proc"
  local host = require "migrun.host"
  self.stop_file = self.dir .. "/workload.stop"
  os.remove(self.stop_file)
  self.workload_output = {}
  self.workload = assert(proc.spawn(assert(host.worker_spec{ "-e", "require('migrun.rehearsal.demo').workload_main()",
    env = { MIGRUN_WORKLOAD_CONNINFO = self.lab.source.conninfo, MIGRUN_WORKLOAD_RATE = tostring(opts.rate or 20),
            MIGRUN_WORKLOAD_SEED = tostring(opts.seed or 1), MIGRUN_WORKLOAD_STOP_FILE = self.stop_file,
            MIGRUN_WORKLOAD_NO_PK_CHANGES = opts.no_pk_changes == false and "0" or "1",
            MIGRUN_WORKLOAD_SAMPLE = self.sample },
    stdin = false, die_with_parent = true,
    stdout = function(line) self.workload_output[#self.workload_output + 1] = line end,
    stderr = "stdout" })))
  return self.workload
end

-- Stops the workload and returns its summary line.
function Rehearsal:stop_workload()
  if not self.workload then return nil end
  local f = assert(io.open(self.stop_file, "w"))
  f:close()
  local ok, how, code = self.workload:wait(30)
  if not ok and how == "timeout" then self.workload:kill("KILL") end
  self.workload:close()
  self.workload = nil
  return table.concat(self.workload_output, "\n"), ok, how, code
end

function Rehearsal:close()
  if self.workload then self.workload:close() self.workload = nil end
  if self.lab then self.lab:stop() self.lab = nil end
end
Rehearsal.__close = Rehearsal.close
Rehearsal.__gc = Rehearsal.close

return demo
