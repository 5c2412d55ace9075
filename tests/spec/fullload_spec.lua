-- migrun.fullload: parallel full load from the paused replica, on a real lab.
local lab = require "migrun.rehearsal.lab"
local fullload = require "migrun.fullload"
local proc = require "migrun.proc"

local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"
local BIG_ROWS = SANITIZE and 20000 or 60000

describe("migrun.fullload", function()
  local L, at, tables
  local S = "fl"
  local NAMES = { "big", "mid", "small1", "small2", "small3", "nopk" }

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
  local function run(o)
    o.replica = o.replica or (L.replica.migrun_conninfo .. " password='" .. L.password .. "'")
    o.target = o.target or (L.target.migrun_conninfo .. " password='" .. L.password .. "'")
    o.tables = o.tables or tables
    o.jobs = o.jobs or 2
    o.expect_replay_lsn = o.expect_replay_lsn or at
    o.progress_interval = o.progress_interval or 0.01
    return fullload.run(o)
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
    ]]):format(S, S)
    q(L.source, ddl .. ([[
      insert into big select g, 'u' || g || '@x', jsonb_build_object('k', g, 'a', array[g, -g]),
        repeat(md5(g::text), 4), '2024-01-01'::timestamptz + g * interval '1 minute' from generate_series(1, %d) g;
      insert into mid select g, g / 7.0, decode(md5(g::text), 'hex') from generate_series(1, %d) g;
      insert into small1 select g, 'a' || g from generate_series(1, 100) g;
      insert into small2 select g, E'tab\there ''quote'' \\ back' || g from generate_series(1, 50) g;
      insert into nopk select g %% 10, null from generate_series(1, 300) g;
      insert into nopk values (1, 'dup'), (1, 'dup');
    ]]):format(BIG_ROWS, BIG_ROWS // 4))
    q(L.target, ddl)
    q(L.target, "grant all on schema " .. S .. " to migrun")
    assert(L:wait_replica_caught_up(60))
    q(L.replica, "select pg_wal_replay_pause()")
    local deadline = os.time() + 30
    while q(L.replica, "select pg_get_wal_replay_pause_state()") ~= "paused" do
      assert(os.time() < deadline, "the replica did not pause")
    end
    at = q(L.replica, "select pg_last_wal_replay_lsn()")
    -- a write on the primary after the pause: must not reach the load
    q(L.source, ("insert into %s.small1 values (1000, 'after the pause')"):format(S))
    tables = {}
    for _, n in ipairs(NAMES) do
      tables[#tables + 1] = { schema = S, name = n,
        bytes = tonumber(q(L.source, ("select pg_table_size('%s.%s')"):format(S, n))) }
    end
  end)

  teardown(function()
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
  end)

  it("prints the streams and every COPY pair in a dry run and loads nothing", function()
    local lines = {}
    local r = assert(run{ dry_run = true, echo = function(l) lines[#lines + 1] = l end })
    assert.is_true(r.dry_run)
    local text = table.concat(lines, "\n")
    assert.truthy(text:find("stream 1 (", 1, true), text)
    assert.truthy(text:find("stream 2 (", 1, true), text)
    for _, n in ipairs(NAMES) do
      assert.truthy(text:find(('COPY "fl"."%s" FROM STDIN (FORMAT binary)  <=  replica: COPY "fl"."%s" TO STDOUT'):format(n, n),
        1, true), n)
    end
    assert.falsy(text:find(L.password, 1, true))
    assert.is_true(target_empty())
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
    local r = assert(run{
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
    -- two workers really ran, and their command lines hold no password
    assert.is_true(#cmdlines >= 1)
    for _, c in ipairs(cmdlines) do
      assert.truthy(c:find("migrun.fullload", 1, true))
      assert.falsy(c:find(L.password, 1, true))
      assert.falsy(c:find("password", 1, true))
    end
    for _, n in ipairs(NAMES) do
      assert.equal(fingerprint(L.replica, n), fingerprint(L.target, n), n)
    end
    -- the write made on the primary after the pause is not there
    assert.equal("0", q(L.target, "select count(*) from fl.small1 where id = 1000"))
    assert.equal(BIG_ROWS, count(L.target, "big"))
    local rows = 0
    for _, t in ipairs(r.tables) do rows = rows + t.rows end
    assert.equal(rows, r.rows)
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
    q(L.target, "drop trigger slow on fl.big") -- waits for the killed COPY to roll back
    assert.equal(0, count(L.target, "big"))
    r = assert(run{ done = finished })
    for _, t in ipairs(r.tables) do finished[t.table] = true end
    assert.is_true(finished["fl.big"])
    for _, n in ipairs(NAMES) do
      assert.equal(fingerprint(L.replica, n), fingerprint(L.target, n), n)
    end
  end)

  it("stops when the replica is no longer paused, naming the table and the server", function()
    truncate_target()
    q(L.replica, "select pg_wal_replay_resume()")
    local r, err = run{ jobs = 1 }
    assert.is_nil(r)
    local text = tostring(err)
    assert.truthy(text:find("the replica is not paused", 1, true), text)
    assert.truthy(text:find("before loading fl.big", 1, true), text)
    assert.truthy(text:find("[replica ", 1, true), text)
    assert.is_true(target_empty())
  end)
end)
