-- migrun.fullload: parallel full load from the paused replica, on a real lab:
-- whole tables and tables cut into chunks, resumed by chunk after a kill,
-- indexed and analyzed as each table is complete.
local lab = require "migrun.rehearsal.lab"
local fullload = require "migrun.fullload"
local chunks = require "migrun.chunks"
local schema = require "migrun.schema"
local qa = require "migrun.qa"
local db = require "migrun.db"
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local host = require "migrun.host"
local fullload_child = require "helpers.fullload_child"

local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"
local BIG_ROWS = SANITIZE and 20000 or 60000
local MiB = 1024 * 1024
-- the chunk size of the split tests: several chunks of the largest tables at either scale
local CH = SANITIZE and 256 * 1024 or MiB

describe("migrun.fullload", function()
  local L, at, tables, replica_db, target_db
  local S = "fl"
  local NAMES = { "big", "mid", "small1", "small2", "small3", "nopk", "tkey", "events" }
  local n_journal = 0

  local function q(cluster, sql) return assert(cluster:psql(sql)) end
  local function count(cluster, name) return tonumber(q(cluster, ("select count(*) from %s.%s"):format(S, name))) end
  local function fingerprint(cluster, name)
    return q(cluster, ("select count(*) || ':' || md5(coalesce(string_agg(t::text, E'\\n' order by t::text), '')) "
      .. "from %s.%s t"):format(S, name))
  end
  local function truncate_target()
    local list = {}
    for i, n in ipairs(NAMES) do list[i] = S .. "." .. n end
    q(L.target, "truncate " .. table.concat(list, ", "))
  end
  local function target_empty()
    for _, n in ipairs(NAMES) do if count(L.target, n) ~= 0 then return false, n end end
    return true
  end
  -- The target as after the pre-data restore: tables without indexes or keys.
  local function drop_target_indexes()
    q(L.target, ([[do $$ declare r record; begin
      for r in select conrelid::regclass as t, conname from pg_constraint
               where connamespace = '%s'::regnamespace and contype in ('p', 'u') loop
        execute format('alter table %%s drop constraint %%I', r.t, r.conname); end loop;
      for r in select indexrelid::regclass as i from pg_index i join pg_class c on c.oid = i.indrelid
               where c.relnamespace = '%s'::regnamespace loop
        execute format('drop index %%s', r.i); end loop; end $$]]):format(S, S))
  end
  local function with_password(cluster) return cluster.migrun_conninfo .. " password='" .. L.password .. "'" end
  local function run(o)
    o.replica = o.replica or with_password(L.replica)
    o.target = o.target or with_password(L.target)
    o.tables = o.tables or tables
    o.jobs = o.jobs or 2
    o.expect_replay_lsn = o.expect_replay_lsn or at
    o.progress_interval = o.progress_interval or 0.01
    return fullload.run(o)
  end
  local function all_equal()
    for _, n in ipairs(NAMES) do
      assert.equal(fingerprint(L.replica, n), fingerprint(L.target, n), n)
    end
  end
  local function indexes(cluster)
    return q(cluster, ("select string_agg(indexdef, E'\\n' order by indexdef) from pg_indexes where schemaname = '%s'")
      :format(S))
  end
  local function keys(t) local out = {} for k in pairs(t or {}) do out[#out + 1] = k end table.sort(out) return out end

  -- fullload.run killed on cue in a child migrun, none of its workers left
  -- (tests/helpers/fullload_child.lua); -> the journal as it was left, its path
  local function run_child(die, chunk_bytes, save_interval, post)
    n_journal = n_journal + 1
    local path = L.dir .. "/fl-journal-" .. n_journal
    return fullload_child.run_killed({ replica = with_password(L.replica), target = with_password(L.target),
      tables = tables, jobs = 2, lsn = at, chunk_bytes = chunk_bytes, journal = path, die = die,
      save_interval = save_interval, post = post }, L.dir), path
  end

  setup(function()
    local err
    -- a superuser on the target: this spec is about loading, the e2e specs run as an RDS-like role
    L, err = lab.start{ password = "fullload-spec-s3cret", target_superuser = true }
    assert(L, tostring(err))
    local ddl = ([[
      create schema %s;
      set search_path = %s;
      create table big (id int primary key, email text unique, body jsonb, pad text, at timestamptz);
      create table mid (id int primary key, v numeric, b bytea);
      create table small1 (id int primary key, t text);
      create table small2 (id int primary key, t text);
      create table small3 (id int primary key, t text);
      create table nopk (a int, b text);
      create table tkey (k text primary key, v int, pad text);
      create table events (at timestamptz, kind text, payload text);
    ]]):format(S, S)
    q(L.source, ddl .. ([[
      insert into big select g, 'u' || g || '@x', jsonb_build_object('k', g, 'a', array[g, -g]),
        repeat(md5(g::text), 4), '2024-01-01'::timestamptz + g * interval '1 minute' from generate_series(1, %d) g;
      insert into mid select g, g / 7.0, decode(md5(g::text), 'hex') from generate_series(1, %d) g;
      insert into small1 select g, 'a' || g from generate_series(1, 100) g;
      insert into small2 select g, E'tab\there ''quote'' \\ back' || g from generate_series(1, 50) g;
      insert into nopk select g %% 10, null from generate_series(1, 300) g;
      insert into nopk values (1, 'dup'), (1, 'dup');
      insert into tkey select md5(g::text), g, repeat('p', 60) from generate_series(1, %d) g;
      insert into events select '2024-01-01'::timestamptz + g * interval '1 second', 'k' || (g %% 7),
        repeat(md5(g::text), 2) from generate_series(1, %d) g;
      insert into events select * from events where kind = 'k1'; -- whole duplicate rows, no key
      analyze;
    ]]):format(BIG_ROWS, BIG_ROWS // 4, BIG_ROWS // 4, BIG_ROWS // 3))
    -- the target as the pre-data restore leaves it: no keys, no indexes
    q(L.target, (ddl:gsub(" primary key", ""):gsub(" unique", "")))
    q(L.target, "grant all on schema " .. S .. " to migrun")
    at = assert(L:pause_replica(60))
    -- a write on the primary after the pause: must not reach the load
    q(L.source, ("insert into %s.small1 values (1000, 'after the pause')"):format(S))
    tables = {}
    for _, n in ipairs(NAMES) do
      tables[#tables + 1] = { schema = S, name = n,
        bytes = tonumber(q(L.source, ("select pg_table_size('%s.%s')"):format(S, n))) }
    end
    replica_db = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
    target_db = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
  end)

  teardown(function()
    if replica_db then replica_db:close() end
    if target_db then target_db:close() end
    if L then L:stop() end
  end)

  it("splits largest first: the biggest tables each start a stream", function()
    local streams = fullload.plan({ { schema = "s", name = "a", bytes = 100 }, { schema = "s", name = "b", bytes = 60 },
      { schema = "s", name = "c", bytes = 50 }, { schema = "s", name = "d", bytes = 10 },
      { schema = "s", name = "e", bytes = 5 } }, 2)
    assert.equal(2, #streams)
    local function names(s) local r = {} for i, t in ipairs(s.tables) do r[i] = t.name end return table.concat(r) end
    -- a:100 | b:60, c:50 (110) | d:10 goes to the lighter stream 1 (110), e:5 to the first of equals
    assert.equal("ade", names(streams[1]))
    assert.equal("bc", names(streams[2]))
    assert.same({ 115, 110 }, { streams[1].bytes, streams[2].bytes })
    assert.equal(1, #fullload.plan({ { schema = "s", name = "a", bytes = 1 } }, 4))
    -- the default chunk size: the data over 4 chunks a stream, 64 MiB to 1 GiB
    assert.equal(64 * MiB, fullload.chunk_size(100 * MiB, 2))
    assert.equal(128 * MiB, fullload.chunk_size(1024 * MiB, 2))
    assert.equal(1024 * MiB, fullload.chunk_size(2 ^ 42, 8))
  end)

  it("cuts a table by ranges of its integer key, else by ranges of blocks", function()
    -- pure: equal widths, a histogram's quantiles, blocks
    local function bounds(ranges)
      local out = {}
      for i, r in ipairs(ranges) do out[i] = { lo = r.lo, hi = r.hi } end
      return out
    end
    local function shares(ranges)
      local out = {}
      for i, r in ipairs(ranges) do out[i] = math.floor(r.share * 1000 + 0.5) / 1000 end
      return out
    end
    assert.same({ { hi = "26" }, { lo = "26", hi = "51" }, { lo = "51", hi = "76" }, { lo = "76" } },
      bounds(chunks.key_ranges(1, 100, 4)))
    assert.same({ 0.25, 0.25, 0.25, 0.25 }, shares(chunks.key_ranges(1, 100, 4)))
    assert.same({ { hi = "15" }, { lo = "15" } }, bounds(chunks.key_ranges(1, 1000, 2, { 1, 10, 20, 1000 })))
    -- a histogram that does not reach the table's max (rows added since ANALYZE) is not used
    assert.same({ { hi = "501" }, { lo = "501" } }, bounds(chunks.key_ranges(1, 1000, 2, { 1, 10, 20, 100 })))
    assert.same({ { hi = "4" }, { lo = "4", hi = "7" }, { lo = "7" } }, bounds(chunks.block_ranges(10, 3)))
    assert.same({ { share = 1 } }, chunks.block_ranges(0, 3))
    -- the tail: the last `tail` parts in halves, so that the chunks in flight
    -- when the table ends (or a run is killed) are half as long
    assert.same({ 1 / 4, 2 / 4, 5 / 8, 3 / 4, 7 / 8 }, chunks.fractions(4, 2))
    assert.same({ 1 / 2, 3 / 4 }, chunks.fractions(2, 5)) -- the first part stays whole
    assert.same({ { hi = "26" }, { lo = "26", hi = "51" }, { lo = "51", hi = "63" }, { lo = "63", hi = "76" },
      { lo = "76", hi = "88" }, { lo = "88" } }, bounds(chunks.key_ranges(1, 100, 4, nil, 2)))
    assert.same({ 0.25, 0.25, 0.125, 0.125, 0.125, 0.125 }, shares(chunks.key_ranges(1, 100, 4, nil, 2)))
    assert.same({ { hi = "25" }, { lo = "25", hi = "50" }, { lo = "50", hi = "63" }, { lo = "63", hi = "75" },
      { lo = "75", hi = "88" }, { lo = "88" } }, bounds(chunks.block_ranges(100, 4, 2)))
    -- a cut that falls on another (few blocks) is left out, and its share goes to the next range
    local few = chunks.block_ranges(4, 4, 2)
    assert.same({ { hi = "1" }, { lo = "1", hi = "2" }, { lo = "2", hi = "3" }, { lo = "3" } }, bounds(few))
    assert.same({ 0.25, 0.25, 0.25, 0.25 }, shares(few))
    assert.equal(1 / 3, chunks.share({ table = "s.t", count = 3, ranges = { {}, {}, {} } }, 2)) -- a plan journaled before shares

    local function rows_per_chunk(plan)
      local counts, total = {}, 0
      for i = 1, plan.count do
        counts[i] = tonumber(q(L.replica, ("select count(*) from %s where %s"):format(
          pg.qualify(plan.schema, plan.name), chunks.where(plan, i))))
        total = total + counts[i]
      end
      return counts, total
    end
    local function check_contiguous(plan)
      assert.is_nil(plan.ranges[1].lo)
      assert.is_nil(plan.ranges[plan.count].hi)
      for i = 2, plan.count do assert.equal(plan.ranges[i - 1].hi, plan.ranges[i].lo) end
    end

    -- an integer primary key: key ranges, about even (the histogram follows the rows)
    local big = assert(chunks.plan(replica_db, tables[1], { chunk_bytes = 2 * CH, split_bytes = 2 * CH }))
    assert.equal("key", big.method)
    assert.equal("id", big.column)
    assert.equal(math.ceil(big.bytes / (2 * CH)), big.count)
    assert.is_true(big.count >= 4)
    assert.same({ "id", "email", "body", "pad", "at" }, big.columns)
    check_contiguous(big)
    local counts, total = rows_per_chunk(big)
    assert.equal(BIG_ROWS, total)
    for i = 1, big.count do assert.is_true(counts[i] > BIG_ROWS / big.count / 2, "chunk " .. i .. " is thin") end
    assert.equal(("id < %s"):format(big.ranges[1].hi), chunks.label(big, 1))
    assert.equal(('"id" >= %s AND "id" < %s'):format(big.ranges[2].lo, big.ranges[2].hi), chunks.where(big, 2))
    local from_sql, to_sql = chunks.copy_sql(big, 2)
    assert.equal(('COPY (SELECT "id", "email", "body", "pad", "at" FROM "fl"."big" WHERE %s) TO STDOUT (FORMAT binary)')
      :format(chunks.where(big, 2)), from_sql)
    assert.equal('COPY "fl"."big" ("id", "email", "body", "pad", "at") FROM STDIN (FORMAT binary)', to_sql)

    -- a text key and no key at all: block ranges that cover every row once
    for _, name in ipairs{ "tkey", "events" } do
      local t = { schema = S, name = name }
      local plan = assert(chunks.plan(replica_db, t, { chunk_bytes = CH / 2, split_bytes = CH / 2 }))
      assert.equal("blocks", plan.method, name)
      assert.is_nil(plan.column)
      assert.is_true(plan.count >= 3, name)
      check_contiguous(plan)
      local _, n = rows_per_chunk(plan)
      assert.equal(count(L.replica, name), n, name)
      assert.matches("^ctid >= '%(%d+,0%)'::tid AND ctid < '%(%d+,0%)'::tid$", chunks.where(plan, 2))
    end
    -- small or empty: whole
    local whole, why = chunks.plan(replica_db, { schema = S, name = "small1" }, { chunk_bytes = 2 * MiB })
    assert.is_false(whole)
    assert.matches("is not above ", why)
    assert.is_false((chunks.plan(replica_db, { schema = S, name = "small3" }, { chunk_bytes = 1, split_bytes = 0 })))
  end)

  it("prints the split, the streams and every statement in a dry run and loads nothing", function()
    truncate_target()
    local lines = {}
    local r = assert(run{ dry_run = true, chunk_bytes = CH, split_bytes = CH, echo = function(l) lines[#lines + 1] = l end,
      post = assert(schema.table_post_data(replica_db, target_db, tables)) })
    assert.is_true(r.dry_run)
    local text = table.concat(lines, "\n")
    assert.truthy(text:find("stream 1 (", 1, true), text)
    assert.truthy(text:find("stream 2 (", 1, true), text)
    assert.matches("split fl%.big %([%d.]+ %a+%) into %d+ chunks by ranges of its key id", text)
    assert.matches("split fl%.events %([%d.]+ %a+%) into %d+ chunks by block ranges %(ctid%)", text)
    assert.truthy(text:find('target: TRUNCATE "fl"."big"  (once, before its first chunk)', 1, true), text)
    for i = 1, r.split["fl.big"].count do
      local from_sql, to_sql = chunks.copy_sql(r.split["fl.big"], i)
      assert.truthy(text:find(("target: BEGIN; %s  <=  replica: %s; COMMIT"):format(to_sql, from_sql), 1, true), i)
    end
    for _, n in ipairs{ "small1", "small2", "nopk" } do
      assert.truthy(text:find(('TRUNCATE "fl"."%s"; COPY "fl"."%s" FROM STDIN (FORMAT binary, FREEZE)  <=  replica: '
        .. 'COPY "fl"."%s" TO STDOUT (FORMAT binary); COMMIT'):format(n, n, n), 1, true), n)
      assert.truthy(text:find(('target: ANALYZE "fl"."%s"'):format(n), 1, true), n)
    end
    assert.truthy(text:find('after fl.big is complete: target: CREATE UNIQUE INDEX IF NOT EXISTS big_pkey ON fl.big '
      .. 'USING btree (id); ALTER TABLE "fl"."big" ADD CONSTRAINT "big_pkey" PRIMARY KEY USING INDEX "big_pkey"',
      1, true), text)
    assert.truthy(text:find('CREATE UNIQUE INDEX IF NOT EXISTS small1_pkey ON fl.small1 USING btree (id)', 1, true), text)
    assert.falsy(text:find(L.password, 1, true))
    assert.is_true(target_empty())
    assert.equal("", indexes(L.target))
  end)

  it("refuses a replica that is not at the expected LSN, loading nothing", function()
    local r, err = run{ expect_replay_lsn = "0/1" }
    assert.is_nil(r)
    assert.equal("fullload", err.kind)
    assert.truthy(tostring(err):find("replay LSN is " .. at .. ", expected 0/1", 1, true), tostring(err))
    assert.truthy(tostring(err):find("replica", 1, true))
    assert.is_true(target_empty())
  end)

  it("loads every table in parallel, equal to the replica, reporting each table and the progress", function()
    truncate_target()
    local done, progress, pids, cmdlines = {}, 0, {}, {}
    local last_bytes = 0
    local r = assert(run{ analyze = false,
      on_table = function(t) done[#done + 1] = t end,
      on_progress = function(bytes, total, rows, detail)
        progress = progress + 1
        assert.is_true(bytes >= last_bytes) -- monotonic
        last_bytes = bytes
        assert.is_true(total > 0)
        assert.is_number(rows)
        if not pids[detail.pid] then
          pids[detail.pid] = true
          local f = io.open("/proc/" .. detail.pid .. "/cmdline", "rb")
          if f then cmdlines[#cmdlines + 1] = f:read("a") f:close() end
        end
      end })
    assert.equal(#NAMES, #done)
    assert.equal(#NAMES, #r.tables)
    assert.same({}, r.split) -- small tables stay whole with the default sizes
    local streams = {}
    for _, t in ipairs(done) do
      assert.is_true(t.ended >= t.started)
      assert.is_true(t.seconds >= 0)
      assert.is_true(t.bytes > 0 or t.table == "fl.small3")
      streams[t.stream] = true
      assert.equal(count(L.replica, t.table:match("%.(.+)$")), t.rows)
    end
    assert.is_true(streams[1] and streams[2])
    assert.is_true(progress > 0)
    -- workers really ran, and their command lines hold no password
    assert.is_true(#cmdlines >= 1)
    for _, c in ipairs(cmdlines) do
      assert.truthy(c:find("migrun.pool", 1, true))
      assert.falsy(c:find(L.password, 1, true))
      assert.falsy(c:find("password", 1, true))
    end
    all_equal()
    -- the write made on the primary after the pause is not there
    assert.equal("0", q(L.target, "select count(*) from fl.small1 where id = 1000"))
    assert.equal(BIG_ROWS, count(L.target, "big"))
    local rows = 0
    for _, t in ipairs(r.tables) do rows = rows + t.rows end
    assert.equal(rows, r.rows)
  end)

  it("loads split tables chunk by chunk, equal, each table indexed and analyzed as soon as it is complete", function()
    truncate_target()
    drop_target_indexes()
    q(L.target, "select pg_stat_reset()")
    -- mid's load waits (one row's trigger) on an advisory lock this spec
    -- holds, and is let go only once big is analyzed and mid is seen waiting:
    -- big's chunks, indexes and statistics must not wait for mid. No timing:
    -- a full load that made them wait would never get there (the trigger's
    -- lock_timeout then fails it).
    local LOCK = 7361
    local holder = assert(pg.connect(L.target.conninfo, { name = "holder" }))
    finally(function() holder:close() end)
    assert(holder:exec("select pg_advisory_lock($1::bigint)", LOCK))
    q(L.target, ([[
      create function fl.held() returns trigger language plpgsql as $$
      begin if new.id = 10 then
        perform set_config('lock_timeout', '120s', true);
        perform pg_advisory_xact_lock_shared(%d);
      end if; return new; end $$;
      create trigger held before insert on fl.mid for each row execute function fl.held();]]):format(LOCK))
    local function mid_waits()
      local res = assert(holder:exec("select count(*)::int as n from pg_locks where locktype = 'advisory' "
        .. "and objid = $1::bigint::oid and objsubid = 1 and not granted", LOCK))
      return res[1].n > 0
    end
    local told, mid_waited = {}, nil -- what the callbacks said, in order
    local function at(what)
      for i, w in ipairs(told) do if w == what then return i end end
      error(what .. " was never told: " .. table.concat(told, ", "))
    end
    local state, saves, loaded_chunks = {}, {}, {}
    local post = assert(schema.table_post_data(replica_db, target_db, tables))
    assert.same({ "big_email_key", "big_pkey" }, (function()
      local n = {} for _, it in ipairs(post["fl.big"]) do n[#n + 1] = it.name end table.sort(n) return n end)())
    -- what is said done was saved first (the journal is saved at most every second)
    local saved_loaded, told_unsaved = {}, {}
    local r = assert(run{ chunk_bytes = CH, split_bytes = CH, post = post, state = state,
      save = function(paths)
        saves.calls = (saves.calls or 0) + 1
        for _, path in ipairs(paths) do
          local field = path[1]
          saves[field] = (saves[field] or 0) + 1
          saves.depth = saves.depth or {}
          saves.depth[#path] = (saves.depth[#path] or 0) + 1
          if field == "chunks" and #path < 4 then saves.chunk_tables = (saves.chunk_tables or 0) + 1 end
          if field == "loaded" and path[2] then saved_loaded[path[2]] = state.loaded[path[2]] ~= nil end
        end
      end,
      on_table = function(t)
        told[#told + 1] = "loaded " .. t.table
        if not saved_loaded[t.table] then told_unsaved[#told_unsaved + 1] = t.table end
      end,
      on_post = function(what, t)
        told[#told + 1] = what .. " " .. t.table
        if what == "analyzed" and t.table == "fl.big" then
          -- mid's task is queued before big's ANALYZE (it costs more): it gets to the lock
          local deadline = host.monotonic() + 60
          while not mid_waits() and host.monotonic() < deadline do host.sleep(0.05) end
          mid_waited = mid_waits()
          assert(holder:exec("select pg_advisory_unlock($1::bigint)", LOCK))
        end
      end,
      on_chunk = function(c) loaded_chunks[#loaded_chunks + 1] = c end })
    assert.same({}, told_unsaved)
    q(L.target, "drop trigger held on fl.mid; drop function fl.held()")
    local above = {}
    for _, t in ipairs(tables) do if t.bytes > CH then above[S .. "." .. t.name] = true end end
    assert.same(keys(above), keys(r.split))
    assert.truthy(above["fl.big"] and above["fl.events"] and above["fl.tkey"])
    local big = r.split["fl.big"]
    local n_chunks = 0
    for _, plan in pairs(r.split) do n_chunks = n_chunks + plan.count end
    assert.equal(n_chunks, #loaded_chunks)
    for _, c in ipairs(loaded_chunks) do assert.matches("^%d+$", c.xid) end
    assert.equal(big.count, #keys(state.chunks["fl.big"].done))
    -- the last `jobs` (2) chunks in halves
    local whole = math.ceil(big.bytes / CH)
    assert.equal(whole + 2, big.count)
    assert.is_true(math.abs(chunks.share(big, big.count) - 0.5 / whole) < 1e-9)
    assert.is_true(math.abs(chunks.share(big, 1) - 1 / whole) < 0.02)
    assert.same({}, state.chunks["fl.big"].committing)
    assert.equal(big.count, state.loaded["fl.big"].chunks)
    assert.equal(BIG_ROWS, state.loaded["fl.big"].rows)
    -- every chunk journaled as committing before it may commit (the rest is
    -- saved at most every second: fewer saves than tables and chunks)
    assert.is_true(saves.chunks >= n_chunks, "every chunk journaled as committing")
    -- what is due together is written together: one write, not one per field
    assert.is_true(saves.calls < saves.chunks + saves.loaded + saves.indexed + saves.analyzed)
    -- each change saved by its own path, never a whole field: a chunk's save
    -- costs its record, not the state of every chunk so far (O(chunks^2) in
    -- all). Only the plan names a table's whole chunk state, once per table.
    assert.is_nil(saves.depth[1], "a whole field was saved")
    assert.equal(#keys(r.split), saves.chunk_tables)

    -- equal: every row once, and the same contents (count and row hash)
    all_equal()
    for _, n in ipairs(NAMES) do
      assert.same(assert(qa.row_hash(replica_db, S .. "." .. n)), assert(qa.row_hash(target_db, S .. "." .. n)), n)
    end
    -- the same indexes and keys as the source's
    assert.equal(indexes(L.replica), indexes(L.target))
    assert.equal(2, tonumber(q(L.target, "select count(*) from pg_constraint where conrelid = 'fl.big'::regclass "
      .. "and contype in ('p', 'u')")))

    -- each table indexed after its data, then analyzed; big's while mid's load waited
    -- (mid's load is under way then unless slower workers were still busy with other tables,
    -- as under ASan: then one of those tables was loaded after big's ANALYZE, which proves the same)
    local later_load = false
    for i = at("analyzed fl.big") + 1, #told do
      if told[i]:match("^loaded ") then later_load = true end
    end
    assert.is_true(mid_waited or later_load,
      "big was analyzed only once every table was loaded: " .. table.concat(told, ", "))
    assert.is_true(at("loaded fl.big") < at("indexed fl.big"))
    assert.is_true(at("indexed fl.big") < at("analyzed fl.big"))
    assert.is_true(at("analyzed fl.big") < at("loaded fl.mid"), "big was indexed and analyzed while mid loaded")
    assert.is_true(at("loaded fl.mid") < at("indexed fl.mid"))
    assert.is_true(at("indexed fl.mid") < at("analyzed fl.mid"))
    local ld, ix, an = state.loaded, state.indexed, state.analyzed
    -- the records agree (each time taken after what it follows, in another process)
    assert.is_true(ix["fl.big"].started >= ld["fl.big"].ended)
    assert.is_true(an["fl.big"].started >= ix["fl.big"].ended)
    assert.is_true(ix["fl.mid"].started >= ld["fl.mid"].ended)
    assert.equal(2, ix["fl.big"].indexes)
    for _, n in ipairs(NAMES) do
      assert.truthy(an[S .. "." .. n], n)
      assert.equal("t", q(L.target, ("select last_analyze is not null from pg_stat_user_tables "
        .. "where relid = 'fl.%s'::regclass"):format(n)), n)
    end
    -- whole tables are written frozen: every page all-visible at once (mid,
    -- with its row trigger, was written row by row, which PostgreSQL does not
    -- mark so); chunks of a split table are not
    for _, n in ipairs{ "small1", "small2", "nopk" } do
      assert.equal("t", q(L.target, ("select relallvisible = relpages and relpages > 0 from pg_class "
        .. "where oid = 'fl.%s'::regclass"):format(n)), n)
    end
    -- (unless autovacuum came by meanwhile, as on a slow machine: it marks them)
    assert.equal("t", q(L.target, [[select relallvisible < relpages
      or (select autovacuum_count + vacuum_count > 0 from pg_stat_user_tables where relid = 'fl.big'::regclass)
      from pg_class where oid = 'fl.big'::regclass]]))
  end)

  it("resumes after a kill: only the chunks not committed load again, and no row twice", function()
    truncate_target()
    local state, path = run_child({ chunks_done = 5 }, CH) -- chunks of every split table count
    local done = keys(state.chunks["fl.big"].done)
    assert.is_true(#done >= 1, "the kill came too early")
    local plan = state.chunks["fl.big"].plan
    assert.is_true(#done < plan.count, "the kill came too late")
    -- on the target: what the journal says is loaded, and the chunks it
    -- journaled as committing whose transactions did commit; nothing else
    local rows = 0
    for _, c in pairs(state.chunks["fl.big"].done) do rows = rows + c.rows end
    for i, c in pairs(state.chunks["fl.big"].committing) do
      if not state.chunks["fl.big"].done[i] and q(L.target, ("select txid_status(%s)"):format(c.xid)) == "committed" then
        rows = rows + c.rows
      end
    end
    assert.equal(rows, count(L.target, "big"))

    -- exactly the chunks that did not commit load again
    local expect = {}
    for i = 1, plan.count do
      local c = state.chunks["fl.big"].committing[tostring(i)]
      local committed = c and q(L.target, ("select txid_status(%s)"):format(c.xid)) == "committed"
      if not state.chunks["fl.big"].done[tostring(i)] and not committed then expect[#expect + 1] = tostring(i) end
    end
    table.sort(expect)
    local reloaded, said = {}, {}
    local r = assert(run{ state = state, chunk_bytes = 64 * MiB, echo = function(l) said[#said + 1] = l end,
      on_chunk = function(c) if c.table == "fl.big" then reloaded[#reloaded + 1] = tostring(c.chunk) end end })
    table.sort(reloaded)
    -- the journaled plan is kept (64 MiB would not split anything now)
    assert.equal(plan.count, r.split["fl.big"].count)
    assert.same(expect, reloaded)
    assert.equal(BIG_ROWS, count(L.target, "big"))
    assert.equal(BIG_ROWS, tonumber(q(L.target, "select count(distinct id) from fl.big")))
    all_equal()
    assert.truthy(io.open(path .. "/journal.json")):close()
  end)

  it("resumes a chunk whose transaction was journaled: aborted loads again, committed does not", function()
    -- 1. killed right after journaling a chunk as about to commit: its worker
    --    never got the go-ahead and died with the parent; nothing of it is there
    truncate_target()
    local state = run_child({ committing = 1 }, CH)
    local pending = {}
    for k, cs in pairs(state.chunks) do
      for i, c in pairs(cs.committing) do pending[#pending + 1] = { table = k, chunk = i, xid = c.xid } end
    end
    assert.equal(1, #pending)
    local said = {}
    assert(run{ state = state, echo = function(l) said[#said + 1] = l end })
    local text = table.concat(said, "\n")
    assert.truthy(text:find(("%s chunk %s did not commit (transaction %s): loaded again"):format(pending[1].table,
      pending[1].chunk, pending[1].xid), 1, true), text)
    all_equal()

    -- 2. killed after the chunk committed on the target, before the journal
    --    said so: its transaction says committed, so it is not loaded again
    --    (loading it again would put its rows in twice)
    truncate_target()
    state = run_child({ before_done = 2 }, CH)
    pending = {}
    for k, cs in pairs(state.chunks) do
      for i, c in pairs(cs.committing) do
        if not cs.done[i] then pending[#pending + 1] = { table = k, chunk = i, xid = c.xid, rows = c.rows } end
      end
    end
    assert.is_true(#pending >= 1)
    local committed
    for _, p in ipairs(pending) do
      if q(L.target, ("select txid_status(%s)"):format(p.xid)) == "committed" then committed = p end
    end
    assert.truthy(committed, "no journaled chunk had committed")
    said = {}
    local reloaded = {}
    assert(run{ state = state, echo = function(l) said[#said + 1] = l end,
      on_chunk = function(c) reloaded[c.table .. "#" .. c.chunk] = true end })
    text = table.concat(said, "\n")
    assert.truthy(text:find(("%s chunk %s committed before the interruption (transaction %s): not loaded again")
      :format(committed.table, committed.chunk, committed.xid), 1, true), text)
    assert.is_nil(reloaded[committed.table .. "#" .. committed.chunk])
    assert.equal(BIG_ROWS, tonumber(q(L.target, "select count(distinct id) from fl.big")))
    all_equal()
  end)

  it("resumes from a journal that lags behind the run: what it does not say is done is done again, once", function()
    -- Only a chunk's transaction is saved at once; the rest at most every
    -- save_interval, and at the end. With that interval at an hour, killed at
    -- that last save (every table loaded, indexed and analyzed on the target):
    -- the file holds the chunks' transactions, no table, no index, no statistics.
    truncate_target()
    drop_target_indexes()
    local state = run_child({ loaded = #NAMES }, CH, 3600, assert(schema.table_post_data(replica_db, target_db, tables)))
    assert.equal(indexes(L.replica), indexes(L.target)) -- built before the kill
    assert.same({}, state.loaded or {})
    assert.same({}, state.indexed or {})
    assert.same({}, state.analyzed or {})
    local on_target = {}
    for _, n in ipairs(NAMES) do
      if count(L.target, n) > 0 and not (state.chunks and state.chunks[S .. "." .. n]) then
        on_target[#on_target + 1] = n
      end
    end
    assert.is_true(#on_target >= 1, "no whole table was loaded before the kill: the lag is not exercised")
    local post = assert(schema.table_post_data(replica_db, target_db, tables))
    local loaded = {}
    assert(run{ state = state, post = post, on_table = function(t) loaded[t.table] = true end })
    for _, n in ipairs(on_target) do assert.truthy(loaded[S .. "." .. n], n .. " was not loaded again") end
    assert.equal(BIG_ROWS, tonumber(q(L.target, "select count(distinct id) from fl.big")))
    all_equal()
    assert.equal(indexes(L.replica), indexes(L.target))
    for _, n in ipairs(NAMES) do assert.truthy(state.analyzed[S .. "." .. n], n) end
  end)

  it("saves a whole table's load at once when loading it again would cost more than a save", function()
    -- save_interval at an hour: what is not saved at once waits for the end
    local function run_saving(at_once)
      truncate_target()
      local writes, told = {}, {}
      assert(run{ state = {}, save_interval = 3600, save_at_once_bytes = at_once,
        save = function(paths) writes[#writes + 1] = paths end,
        on_table = function(t) if not t.chunks then told[t.table] = { at = #writes, bytes = t.bytes } end end })
      return writes, told
    end
    local function written_by(writes, n, k)
      for i = 1, n do
        for _, p in ipairs(writes[i]) do if p[1] == "loaded" and p[2] == k then return true end end
      end
      return false
    end
    -- every whole table at or above the bound: its record written, then said, as each is loaded
    local writes, told = run_saving(0)
    local moments, n = {}, 0
    for k, t in pairs(told) do
      n = n + 1
      assert.is_true(written_by(writes, t.at, k), k .. " was said loaded before its record was written")
      moments[t.at] = true
    end
    local distinct = 0
    for _ in pairs(moments) do distinct = distinct + 1 end
    assert.is_true(n >= 2, "too few whole tables to tell")
    assert.equal(n, distinct, "whole tables saved together, not each as it was loaded")
    -- below the bound (8 MiB by default) a table waits for the interval (here
    -- the end) or for a larger one's save: not an fsync each
    writes, told = run_saving(nil)
    local whole, large = 0, 0
    for _, t in pairs(told) do
      whole = whole + 1
      if t.bytes >= 8 * 1024 * 1024 then large = large + 1 end
    end
    assert.is_true(whole - large >= 2, "too few small tables to tell")
    assert.is_true(#writes <= large + 1, ("%d writes for %d whole tables, %d of them of 8 MiB or more")
      :format(#writes, whole, large))
    all_equal()
  end)

  it("builds and analyzes on a rerun what a stopped run left undone of complete tables", function()
    truncate_target()
    drop_target_indexes()
    local state = {}
    assert(run{ chunk_bytes = CH, split_bytes = CH, state = state, analyze = false }) -- as if stopped there
    assert.truthy(state.loaded["fl.big"].chunks)
    assert.equal("", indexes(L.target))
    local post = assert(schema.table_post_data(replica_db, target_db, tables))
    local r = assert(run{ state = state, post = post })
    assert.same({}, r.tables) -- nothing loaded again
    assert.equal(#NAMES, #r.skipped)
    assert.equal(indexes(L.replica), indexes(L.target))
    for _, n in ipairs(NAMES) do assert.truthy(state.analyzed[S .. "." .. n], n) end
    -- the split table's indexes built side by side, then its ANALYZE
    assert.is_true(state.analyzed["fl.big"].started >= state.indexed["fl.big"].ended)
    all_equal()
  end)

  it("hashes each part on both sides as it commits, and judges each table once its last part is in", function()
    truncate_target()
    -- one row of small1 changed on its way into the target: the table must be judged different
    q(L.target, [[create function fl.skew() returns trigger language plpgsql as $$
      begin if new.id = 7 then new.t := 'skewed'; end if; return new; end $$;
      create trigger skew before insert on fl.small1 for each row execute function fl.skew();]])
    finally(function() q(L.target, "drop trigger if exists skew on fl.small1; drop function if exists fl.skew()") end)
    local state, told = {}, {}
    local r = assert(run{ hash = true, chunk_bytes = CH, split_bytes = CH, state = state,
      on_hashed = function(v) told[v.table] = v end })
    assert.equal(#NAMES, #r.hashed)
    for _, n in ipairs(NAMES) do
      local k, v = S .. "." .. n, told[S .. "." .. n]
      assert.truthy(v, k .. " was not judged")
      assert.equal(n ~= "small1", v.equal, k)
      assert.equal(count(L.replica, n), v.rows[1], k)
      assert.equal(count(L.target, n), v.rows[2], k)
      assert.equal(v.equal, state.hashed[k].equal, k)
    end
    -- the parts: every chunk on the replica (by its key range or its blocks)
    -- and the target whole once complete; whole tables whole (which tables
    -- are split depends on their sizes, a little different from run to run)
    assert.equal("key", r.split["fl.big"].method)
    assert.equal("blocks", r.split["fl.events"].method)
    assert.is_nil(r.split["fl.small1"])
    for _, n in ipairs(NAMES) do
      local plan = r.split[S .. "." .. n]
      assert.same({ replica = plan and plan.count or 1, target = 1 }, state.hashed[S .. "." .. n].need, n)
    end
    -- the same sums as a comparison of the whole tables
    local whole = assert(qa.row_hash(replica_db, "fl.big"))
    assert.equal(whole.hash, told["fl.big"].hash[1])
    assert.equal(whole.hash, told["fl.big"].hash[2])
    local loadhash = require "migrun.loadhash"
    local equal, differ = loadhash.proven(state.hashed)
    assert.same({ "fl.small1" }, differ)
    assert.is_nil(equal["fl.small1"])
    assert.truthy(equal["fl.events"])
    -- loaded again (as a partial restart reloads a table): judged again, not by the old verdict
    q(L.target, "drop trigger skew on fl.small1")
    state.loaded["fl.small1"] = nil
    told = {}
    assert(run{ hash = true, chunk_bytes = CH, split_bytes = CH, state = state,
      on_hashed = function(v) told[v.table] = v end })
    assert.is_true(told["fl.small1"] and told["fl.small1"].equal)
    assert.is_true(state.hashed["fl.small1"].equal)
  end)

  it("hashes on a rerun what an earlier run loaded without its sums", function()
    truncate_target()
    local state = {}
    assert(run{ chunk_bytes = CH, split_bytes = CH, state = state }) -- no hashing: as if its sums were lost
    local hashed = {}
    local r = assert(run{ hash = true, state = state, on_hashed = function(v) hashed[v.table] = v.equal end })
    assert.same({}, r.tables) -- nothing loaded again
    for _, n in ipairs(NAMES) do assert.is_true(hashed[S .. "." .. n], n) end
  end)

  it("loads the other tables beside a split table's chunks, not after them", function()
    truncate_target()
    local some = {}
    for _, t in ipairs(tables) do
      if t.name == "big" or t.name == "small1" or t.name == "small2" or t.name == "nopk" then some[#some + 1] = t end
    end
    local told = {}
    assert(run{ tables = some, chunk_bytes = CH, split_bytes = CH,
      on_table = function(t) told[#told + 1] = t.table end,
      on_chunk = function(c) told[#told + 1] = ("%s #%d"):format(c.table, c.chunk) end })
    -- big's chunks are the larger tasks: without a stream kept for the
    -- others, every one of them would run before the small tables
    local first_small, chunks_after = nil, 0
    for i, w in ipairs(told) do
      if w:match("^fl%.small") or w == "fl.nopk" then first_small = first_small or i end
      if first_small and w:match("^fl%.big #") then chunks_after = chunks_after + 1 end
    end
    assert.is_true(first_small ~= nil and chunks_after > 0,
      "the small tables loaded after big's chunks: " .. table.concat(told, ", "))
    for _, n in ipairs{ "big", "small1", "small2", "nopk" } do
      assert.equal(fingerprint(L.replica, n), fingerprint(L.target, n), n)
    end
  end)


  it("keeps a stream's sessions from task to task: the servers see a connection per stream, not per chunk", function()
    truncate_target()
    -- sessions to the database as the server counts them, once every other
    -- client's session has ended (a backend's count is in once it exits)
    local function sessions(conn)
      local deadline = host.monotonic() + 30
      while true do
        local r = assert(conn:query([[select count(*)::int as others from pg_stat_activity
          where backend_type = 'client backend' and pid <> pg_backend_pid()]]))
        if r[1].others == 0 then break end
        assert(host.monotonic() < deadline, "other sessions still open on " .. conn:name())
        host.sleep(0.05)
      end
      local r = assert(conn:query([[select sessions::int as n from pg_stat_database
        where datname = current_database()]]))
      return r[1].n
    end
    local before = { target = sessions(target_db), replica = sessions(replica_db) }
    local tasks = 0
    assert(run{ chunk_bytes = CH, split_bytes = CH,
      on_table = function(t) if not t.chunks then tasks = tasks + 1 end end,
      on_chunk = function() tasks = tasks + 1 end })
    local made = { target = sessions(target_db) - before.target, replica = sessions(replica_db) - before.replica }
    -- two streams, a session on each side each, and the parent's own few;
    -- a session per task would be one per chunk and per table
    assert.is_true(tasks >= 12, "too few tasks to tell: " .. tasks)
    for side, n in pairs(made) do
      assert.is_true(n <= 6, ("%d sessions on the %s for %d tasks"):format(n, side, tasks))
    end
    all_equal()
  end)
  it("gives an index build the streams nothing else will use as its parallel workers, and none on one stream", function()
    -- what the target's session building it was set to, read by a post item of its own
    local function probe(jobs)
      q(L.target, "drop table if exists fl.probe; truncate fl.small1")
      local post = { ["fl.small1"] = { { name = "probe", kind = "index",
        sql = { "create table fl.probe as select current_setting('max_parallel_maintenance_workers')::int as v" } } } }
      local small1
      for _, t in ipairs(tables) do if t.name == "small1" then small1 = t end end
      local state = {}
      assert(run{ jobs = jobs, tables = { small1 }, post = post, state = state })
      return { tonumber(q(L.target, "select v from fl.probe")), state.indexed["fl.small1"].parallel_workers }
    end
    assert.same({ 2, 2 }, probe(3)) -- alone on three streams: the two others
    assert.same({ 0, 0 }, probe(1)) -- not the server's default (2) on a stream that is the machine's only one
    q(L.target, "drop table fl.probe")
  end)

  it("gives each index build at the load's tail every other stream, though the builds run side by side", function()
    -- a split table's index items are tasks of their own, built side by
    -- side once its last chunk is in: on two streams the pool's share of the
    -- idle ones gives neither a worker, and the longer build went on alone
    -- in one process once the shorter had ended
    truncate_target()
    q(L.target, "drop table if exists fl.probe_a, fl.probe_b")
    local function probe(name)
      return { name = name, kind = "index", sql = { ("create table fl.%s as select "
        .. "current_setting('max_parallel_maintenance_workers')::int as v"):format(name) } }
    end
    local big
    for _, t in ipairs(tables) do if t.name == "big" then big = t end end
    local state = {}
    assert(run{ jobs = 2, tables = { big }, chunk_bytes = CH, split_bytes = CH, state = state,
      post = { ["fl.big"] = { probe("probe_a"), probe("probe_b") } } })
    assert.is_true(state.chunks["fl.big"].plan.count > 1, "fl.big was not split")
    assert.equal(1, tonumber(q(L.target, "select v from fl.probe_a")))
    assert.equal(1, tonumber(q(L.target, "select v from fl.probe_b")))
    assert.equal(1, state.indexed["fl.big"].parallel_workers)
    q(L.target, "drop table fl.probe_a, fl.probe_b")
  end)

  it("skips the tables already done and loads a table again cleanly", function()
    truncate_target()
    q(L.target, "insert into fl.small2 values (-1, 'stale')") -- a previous partial attempt
    local loaded = {}
    local r = assert(run{ done = { ["fl.small1"] = true, ["fl.big"] = true },
      on_table = function(t) loaded[t.table] = true end })
    assert.same({ "fl.big", "fl.small1" }, (function() table.sort(r.skipped) return r.skipped end)())
    assert.is_nil(loaded["fl.big"])
    assert.equal(0, count(L.target, "big"))
    assert.equal(0, count(L.target, "small1"))
    assert.equal(fingerprint(L.replica, "small2"), fingerprint(L.target, "small2"))
    assert.equal(fingerprint(L.replica, "mid"), fingerprint(L.target, "mid"))
  end)

  it("leaves a table whose worker is killed mid-COPY empty, and a rerun loads it", function()
    truncate_target()
    -- Hold the COPY into big in the middle (a slow row on the target), then kill its worker.
    q(L.target, [[
      create function fl.slow() returns trigger language plpgsql as $$
      begin if new.id = 5000 then perform pg_sleep(2); end if; return new; end $$;
      create trigger slow before insert on fl.big for each row execute function fl.slow();]])
    local finished, killed, other_pids = {}, nil, {}
    local r, err = run{
      on_table = function(t) finished[t.table] = true end,
      on_progress = function(_, _, _, detail)
        if detail.table == "fl.big" and not killed and detail.rows > 0 then
          killed = detail.pid
          assert(proc.run{ "kill", "-KILL", tostring(detail.pid) })
        elseif detail.table ~= "fl.big" then
          other_pids[detail.pid] = true
        end
      end }
    assert.is_nil(r)
    assert.is_number(killed)
    assert.truthy(tostring(err):find("killed by signal 9 while loading fl.big", 1, true), tostring(err))
    assert.equal("fl.big", err.table)
    assert.is_nil(finished["fl.big"])
    assert.equal(0, count(L.target, "big"))
    -- every worker is gone when run returns
    for pid in pairs(other_pids) do
      local f = io.open("/proc/" .. pid .. "/stat")
      local alive = f and not f:read("a"):match("%) Z") and true
      if f then f:close() end
      assert.falsy(alive, "worker " .. pid .. " still runs")
    end
    q(L.target, "drop trigger slow on fl.big; drop function fl.slow()") -- waits for the killed COPY to roll back
    assert.equal(0, count(L.target, "big"))
    r = assert(run{ done = finished })
    for _, t in ipairs(r.tables) do finished[t.table] = true end
    assert.is_true(finished["fl.big"])
    all_equal()
  end)

  it("stops when the replica is no longer paused, naming the table and the server", function()
    truncate_target()
    -- (replica.resume: replay can cancel the resuming statement itself for a conflict)
    assert(require("migrun.replica").resume(replica_db))
    -- replay moves on: a replica that replayed nothing would be paused again (issue 24)
    q(L.source, ("insert into %s.small1 values (1001, 'replayed')"):format(S))
    local deadline = host.monotonic() + 30
    while q(L.replica, ("select pg_last_wal_replay_lsn() > '%s'"):format(tostring(at))) ~= "t"
        and host.monotonic() < deadline do host.sleep(0.1) end
    local r, err = run{ jobs = 1 }
    assert.is_nil(r)
    local text = tostring(err)
    assert.truthy(text:find("is no longer paused", 1, true), text)
    assert.truthy(text:find("has replayed past the captured LSN", 1, true), text)
    assert.truthy(err.moved, text)
    assert.truthy(text:find("before loading fl.big", 1, true), text)
    assert.truthy(text:find("[replica ", 1, true), text)
    assert.is_true(target_empty())
  end)
end)
