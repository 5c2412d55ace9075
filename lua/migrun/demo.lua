--[[
migrun.demo: a sample database shaped like the runbook's, and a write
workload to keep it busy, for `make demo` and the end-to-end tests.

  demo.load_sample(conn, { scale = 1 })     -- on the source primary
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
  for i = 1, demo.SMALL_TABLES do
    exec(conn, ([[create table ref_%02d (id serial primary key, code text not null, label text,
        created_at timestamptz not null default now());
      insert into ref_%02d (code, label, created_at)
        select 'c' || g, 'label ' || g, %s from generate_series(1, %d) g]])
      :format(i, i, spread, n(50 + 40 * i)))
  end
  exec(conn, "analyze")
  return true
end

--[[ demo.workload(conn, opts): inserts, updates and deletes on the sample
tables until opts.seconds pass or opts.stop_file exists; opts.rate is the
number of transactions per second (default 20), opts.seed makes it
repeatable, opts.no_pk_changes = false skips updates/deletes of page_views.
Returns the counts of what it did. ]]
function demo.workload(conn, opts)
  opts = opts or {}
  local aws = require "migrun.aws"
  math.randomseed(opts.seed or 1)
  local rate = opts.rate or 20
  local deadline = opts.seconds and (aws.monotonic() + opts.seconds) or math.huge
  local done = { transactions = 0, inserts = 0, updates = 0, deletes = 0 }
  local function stop_requested()
    if aws.monotonic() >= deadline then return true end
    if opts.stop_file then
      local f = io.open(opts.stop_file, "r")
      if f then f:close() return true end
    end
    return false
  end
  local function run(sql, ...)
    local res = assert(conn:exec(sql, ...))
    return res.affected or 0
  end
  while not stop_requested() do
    local r = math.random(100)
    assert(conn:exec("begin"))
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
      local t = ("ref_%02d"):format(math.random(demo.SMALL_TABLES))
      done.inserts = done.inserts + run(("insert into %s (code, label) values ('live', 'x')"):format(t))
      done.updates = done.updates + run(("update %s set label = 'changed' where id = $1"):format(t),
        math.random(50))
    end
    assert(conn:exec("commit"))
    done.transactions = done.transactions + 1
    aws.sleep(1 / rate)
  end
  return done
end

-- Entry point for a workload child process: connection from MIGRUN_WORKLOAD_CONNINFO
-- (environment, never argv), options from MIGRUN_WORKLOAD_* variables.
function demo.workload_main()
  local conn = assert(pg.connect(assert(os.getenv("MIGRUN_WORKLOAD_CONNINFO"), "MIGRUN_WORKLOAD_CONNINFO"),
    { name = "workload" }))
  local done = demo.workload(conn, {
    rate = tonumber(os.getenv("MIGRUN_WORKLOAD_RATE")),
    seconds = tonumber(os.getenv("MIGRUN_WORKLOAD_SECONDS")),
    seed = tonumber(os.getenv("MIGRUN_WORKLOAD_SEED")),
    stop_file = os.getenv("MIGRUN_WORKLOAD_STOP_FILE"),
    no_pk_changes = os.getenv("MIGRUN_WORKLOAD_NO_PK_CHANGES") ~= "0",
  })
  io.stdout:write(("workload: %d transactions, %d inserts, %d updates, %d deletes\n")
    :format(done.transactions, done.inserts, done.updates, done.deletes))
  conn:close()
end

return demo
