-- migrun.fullload and migrun.qa on tables their own specs were not written
-- around, every one of them cut into chunks: quoted names with spaces and
-- capitals, a reserved word, an identity ALWAYS key, a stored generated column
-- and a dropped one, enums, arrays, intervals; a smallint key over its whole
-- range and a bigint key at both of its extremes; a domain over int and a uuid
-- as keys (block ranges); TOASTed values; a table whose rows are mostly dead;
-- the leaves of a partitioned table. Each loads equal, resumes after a kill
-- equal and with no row twice, and the chunked verification finds one changed
-- row at the very ends of the key types.
local lab = require "migrun.rehearsal.lab"
local fullload = require "migrun.fullload"
local chunks = require "migrun.chunks"
local catalog = require "migrun.catalog"
local qa = require "migrun.qa"
local db = require "migrun.db"
local pg = require "migrun.pg"
local fullload_child = require "helpers.fullload_child"

local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"
local N = SANITIZE and 1500 or 4000
local CH = 48 * 1024 -- every table below is a few times this
local S = "Odd Load"

local DDL = [[
  create schema "Odd Load";
  set search_path = "Odd Load";
  create type mood as enum ('sad', 'ok', 'happy');
  create domain pos_id as int check (value > 0);
  create table "Order Lines" (
    "Id" bigint generated always as identity (start with 1000000) primary key,
    "select" text, gone int, "Qty" int not null, unit numeric(30, 12),
    total numeric generated always as ("Qty" * unit) stored,
    mood mood, tags int[], span interval, raw bytea, at timestamptz);
  alter table "Order Lines" drop column gone;
  create table neg (k smallint primary key, v text);
  create table sparse (id bigint primary key, v text);
  create table dom (id pos_id primary key, v text);
  create table docs (id uuid primary key, body text);
  create table ghost (id int primary key, pad text) with (autovacuum_enabled = false);
  create table ev (id bigint not null, at timestamptz not null, kind text, primary key (id, at))
    partition by range (at);
  create table ev_a partition of ev for values from (minvalue) to ('2024-06-01');
  create table ev_b partition of ev for values from ('2024-06-01') to (maxvalue);
]]

local DATA = ([[
  set search_path = "Odd Load";
  insert into "Order Lines" ("select", "Qty", unit, mood, tags, span, raw, at)
    select case when g %% 11 = 0 then null else E'tab\there ''q'' "dq" \\ back\nline ' || g end, g %% 9,
      g / 7.0, (array['sad', 'ok', 'happy']::mood[])[1 + g %% 3], array[g, -g, null],
      g * interval '1 minute 3 seconds', decode(md5(g::text), 'hex'), '2024-01-01'::timestamptz + g * interval '1 hour'
    from generate_series(1, %d) g;
  insert into neg select k, 'k' || k from generate_series(-32768, 32767, 16) k;
  insert into neg values (32767, 'the last');
  insert into sparse values (-9223372036854775808, 'min'), (9223372036854775807, 'max'), (-1, 'minus one');
  insert into sparse select g, repeat('s', 40) from generate_series(1, %d) g;
  insert into dom select g, repeat('d', 60) from generate_series(1, %d) g;
  insert into docs select gen_random_uuid(),
      (select string_agg(md5((g * 1000 + i)::text), '') from generate_series(1, 200) i)
    from generate_series(1, %d) g;
  insert into ghost select g, repeat('g', 80) from generate_series(1, %d) g;
  delete from ghost where id %% 40 <> 0;
  insert into ev select g, '2024-01-01'::timestamptz + (g %% 360) * interval '1 day', 'kind ' || (g %% 5)
    from generate_series(1, %d) g;
  analyze;
]]):format(N, 2 * N, 2 * N, N // 4, N * 2, 2 * N)

local LEAVES = { "Order Lines", "neg", "sparse", "dom", "docs", "ghost", "ev_a", "ev_b" }

describe("migrun.fullload on awkward tables, all of them split", function()
  local L, at, tables, replica_db, target_db
  local n_journal = 0

  local function q(cluster, sql) return assert(cluster:psql(sql)) end
  local function qualified(name) return pg.qualify(S, name) end
  local function count(cluster, name) return tonumber(q(cluster, "select count(*) from " .. qualified(name))) end
  local function fingerprint(cluster, name)
    return q(cluster, ("select count(*) || ':' || md5(coalesce(string_agg(t::text, E'\\n' order by t::text), '')) "
      .. "from %s t"):format(qualified(name)))
  end
  local function all_equal()
    for _, n in ipairs(LEAVES) do assert.equal(fingerprint(L.replica, n), fingerprint(L.target, n), n) end
  end
  local function truncate_target()
    local list = {}
    for i, n in ipairs(LEAVES) do list[i] = qualified(n) end
    q(L.target, "truncate " .. table.concat(list, ", "))
  end
  local function with_password(cluster) return cluster.migrun_conninfo .. " password='" .. L.password .. "'" end
  local function run(o)
    o.replica, o.target = with_password(L.replica), with_password(L.target)
    o.tables, o.jobs, o.expect_replay_lsn = tables, 2, at
    o.chunk_bytes, o.split_bytes = CH, CH
    return fullload.run(o)
  end

  setup(function()
    local err
    L, err = lab.start{ password = "awkward-split-s3cret", target_superuser = true }
    assert(L, tostring(err))
    q(L.source, DDL .. DATA)
    -- the target as the pre-data restore leaves it: the tables, no keys
    q(L.target, DDL)
    q(L.target, [[do $$ declare r record; begin
      for r in select conrelid::regclass as t, conname from pg_constraint
               where connamespace = '"Odd Load"'::regnamespace and contype = 'p' and conparentid = 0 loop
        execute format('alter table %s drop constraint %I', r.t, r.conname); end loop; end $$]])
    at = assert(L:pause_replica(60))
    replica_db = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
    target_db = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    tables = assert(catalog.tables(replica_db, { schemas = { S } }))
    local names = {}
    for i, t in ipairs(tables) do names[i] = t.name end
    table.sort(names)
    local want = { table.unpack(LEAVES) }
    table.sort(want)
    assert.same(want, names) -- the leaves, not the partitioned parent
  end)

  teardown(function()
    if replica_db then replica_db:close() end
    if target_db then target_db:close() end
    if L then L:stop() end
  end)

  it("cuts each of them, by key where the key is an integer type, else by blocks", function()
    local method = { ["Order Lines"] = "key", neg = "key", sparse = "key", ghost = "key",
                     dom = "blocks", docs = "blocks", ev_a = "blocks", ev_b = "blocks" }
    for _, t in ipairs(tables) do
      local plan = assert(chunks.plan(replica_db, t, { chunk_bytes = CH, split_bytes = CH }))
      assert.equal(method[t.name], plan.method, t.name)
      assert.is_true(plan.count >= 2, t.name .. " is not split")
      -- every row in exactly one chunk
      local total = 0
      for i = 1, plan.count do
        total = total + tonumber(q(L.replica, ("select count(*) from %s where %s"):format(qualified(t.name),
          chunks.where(plan, i))))
      end
      assert.equal(count(L.replica, t.name), total, t.name)
      if t.name == "Order Lines" then -- the generated column is left to the target
        assert.same({ "Id", "select", "Qty", "unit", "mood", "tags", "span", "raw", "at" }, plan.columns)
      end
    end
    -- the ends of the key types: a histogram from the least bigint to the
    -- greatest cuts where it says (the span of two bounds overflows an integer)
    assert.same({ { hi = "-4611686018427387904", share = 0.25 }, { lo = "-4611686018427387904", hi = "0", share = 0.25 },
      { lo = "0", hi = "4611686018427387904", share = 0.25 }, { lo = "4611686018427387904", share = 0.25 } },
      chunks.key_ranges(math.mininteger, math.maxinteger, 4, { math.mininteger, 0, math.maxinteger }))
    local sparse = assert(chunks.plan(replica_db, { schema = S, name = "sparse" }, { chunk_bytes = CH, split_bytes = CH }))
    assert.is_true(sparse.count >= 3)
    for i = 2, sparse.count do
      assert.is_true(math.tointeger(sparse.ranges[i].lo) > math.tointeger(sparse.ranges[i - 1].lo or math.mininteger))
    end
    -- the histogram puts the cuts among the rows, not between the extremes
    local rows = {}
    for i = 1, sparse.count do
      rows[i] = tonumber(q(L.replica, ("select count(*) from %s where %s"):format(qualified("sparse"),
        chunks.where(sparse, i))))
    end
    for i = 1, sparse.count do assert.is_true(rows[i] > 0, "chunk " .. i .. " of sparse is empty") end
  end)

  it("loads every one of them equal, chunk by chunk", function()
    truncate_target()
    local r = assert(run{ state = {} })
    for _, n in ipairs(LEAVES) do
      assert.truthy(r.split[S .. "." .. n], n .. " was loaded whole")
    end
    all_equal()
    -- the generated column computed by the target, the identity's values kept
    assert.equal(q(L.replica, [[select sum(total)::text || '/' || min("Id") from "Odd Load"."Order Lines"]]),
      q(L.target, [[select sum(total)::text || '/' || min("Id") from "Odd Load"."Order Lines"]]))
    for _, n in ipairs(LEAVES) do
      assert.same(assert(qa.row_hash(replica_db, S .. "." .. n)), assert(qa.row_hash(target_db, S .. "." .. n)), n)
    end
  end)

  it("resumes after a kill in the middle with every row once", function()
    truncate_target()
    n_journal = n_journal + 1
    local path = L.dir .. "/awkward-journal-" .. n_journal
    local state = fullload_child.run_killed({ replica = with_password(L.replica), target = with_password(L.target),
      tables = tables, jobs = 2, lsn = at, chunk_bytes = CH, journal = path, die = { chunks_done = 7 } }, L.dir)
    local left = 0
    for _, n in ipairs(LEAVES) do
      local cs = state.chunks[S .. "." .. n]
      local done = 0
      for _ in pairs(cs and cs.done or {}) do done = done + 1 end
      if not cs or done < cs.plan.count then left = left + 1 end
    end
    assert.is_true(left >= 1, "the kill came after the load")
    assert(run{ state = state })
    all_equal()
    assert.equal(count(L.replica, "sparse"), tonumber(q(L.target, [[select count(distinct id) from "Odd Load".sparse]])))
    assert.equal(count(L.replica, "neg"), tonumber(q(L.target, [[select count(distinct k) from "Odd Load".neg]])))
  end)

  it("verifies them by chunks and names a changed row at the ends of the key types", function()
    local opts = { mode = "full", chunk_bytes = CH, jobs = 2, a_conninfo = L.replica.conninfo,
                   b_conninfo = L.target.conninfo }
    local function check_of(r, name)
      for _, c in ipairs(r.checks) do if c.table == S .. "." .. name then return c end end
    end
    local r = assert(qa.compare(replica_db, target_db, tables, {}, opts))
    assert.equal(0, r.differences, qa.format(r))
    -- tables without an integer key: by block ranges, each side its own,
    -- whose hashes add up to the whole table's
    for _, n in ipairs{ "dom", "docs", "ev_a", "ev_b" } do
      local c = check_of(r, n)
      assert.is_true(c.a.chunks >= 2 and c.b.chunks >= 2, n .. " was hashed whole")
      assert.equal(assert(qa.row_hash(replica_db, S .. "." .. n)).hash, c.a.hash, n)
      assert.equal(c.a.hash, c.b.hash, n)
    end
    q(L.target, [[update "Odd Load".sparse set v = 'changed' where id = 9223372036854775807;
                  update "Odd Load".neg set v = 'changed' where k = -32768;
                  update "Odd Load"."Order Lines" set "select" = 'changed' where "Id" = 1000001;
                  update "Odd Load".dom set v = 'changed' where id = 77]])
    r = assert(qa.compare(replica_db, target_db, tables, {}, opts))
    assert.equal(4, r.differences, qa.format(r))
    -- hashed by block ranges (a domain key), then narrowed over its whole key order
    assert.matches("^same row count %(%d+%), different contents: id 77 differs %(1 key%)$", check_of(r, "dom").detail)
    local found = {}
    for _, c in ipairs(r.checks) do
      for _, ch in ipairs(c.chunks or {}) do
        for _, k in ipairs(ch.keys or {}) do found[#found + 1] = k end
      end
    end
    table.sort(found)
    assert.same({ "Id 1000001 differs", "id 9223372036854775807 differs", "k -32768 differs" }, found, qa.format(r))
  end)
end)
