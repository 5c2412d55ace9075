-- migrun.fullload when the world fails (issue 24; docs/faults.md): the target
-- restarted in the middle of the load, a path to the target that stalls, a
-- connection lost while its COMMIT went through, a full disk, the
-- maintenance replica restarted or promoted. The load rides out what it can
-- (each chunk or table in flight done again in a new transaction, nothing
-- twice) and stops with what to do where it cannot. Faults come from the
-- lab's harness (migrun.rehearsal.faults); times from the fault to the
-- recovery are printed.
local lab = require "migrun.rehearsal.lab"
local fullload = require "migrun.fullload"
local schema = require "migrun.schema"
local db = require "migrun.db"
local pg = require "migrun.pg"
local host = require "migrun.host"
local proc = require "migrun.proc"

local MiB = 1024 * 1024
local S = "ff"
local NAMES = { "big", "whole", "small" }

local function is_root()
  local _, _, _, out = proc.run{ "id", "-u" }
  return out == "0\n"
end

describe("migrun.fullload under faults", function()
  local L, at, tables

  local function q(cluster, sql) return assert(cluster:psql(sql)) end
  local function fingerprint(cluster, name)
    return q(cluster, ("select count(*) || ':' || md5(coalesce(string_agg(t::text, E'\\n' order by t::text), '')) "
      .. "from %s.%s t"):format(S, name))
  end
  local function all_equal()
    for _, n in ipairs(NAMES) do assert.equal(fingerprint(L.replica, n), fingerprint(L.target, n), n) end
  end
  local function with_password(cluster) return cluster.migrun_conninfo .. " password='" .. L.password .. "'" end
  -- the target as the pre-data restore leaves it: empty tables without keys or indexes
  local function fresh_target()
    q(L.target, ([[do $$ declare r record; begin
      for r in select conrelid::regclass as t, conname from pg_constraint
               where connamespace = '%s'::regnamespace and contype in ('p', 'u') loop
        execute format('alter table %%s drop constraint %%I', r.t, r.conname); end loop;
      for r in select indexrelid::regclass as i from pg_index i join pg_class c on c.oid = i.indrelid
               where c.relnamespace = '%s'::regnamespace loop
        execute format('drop index %%s', r.i); end loop; end $$;
      truncate %s.big, %s.whole, %s.small]]):format(S, S, S, S, S))
  end
  local function post()
    local r <close> = setmetatable({ d = db.wrap(assert(pg.connect(L.replica.direct_conninfo, { name = "replica" }))),
      t = db.wrap(assert(pg.connect(L.target.direct_conninfo, { name = "target" }))) },
      { __close = function(x) x.d:close() x.t:close() end })
    return assert(schema.table_post_data(r.d, r.t, tables))
  end
  local function run(o)
    o.replica, o.target, o.tables = with_password(L.replica), with_password(L.target), tables
    o.jobs, o.expect_replay_lsn = o.jobs or 2, at
    o.chunk_bytes, o.split_bytes = o.chunk_bytes or 2 * MiB, o.split_bytes or 2 * MiB
    o.progress_interval, o.reconnect_timeout = 0.01, o.reconnect_timeout or 60
    o.state = o.state or {}
    o.post = o.post or post()
    o.save = function() end
    local lines = {}
    o.echo = function(line) lines[#lines + 1] = line end
    local r, err = fullload.run(o)
    return r, err, table.concat(lines, "\n"), o.state
  end
  -- fault to recovery: from t_fault until the last item lost was going again
  local function recovered_after(r, t_fault)
    local last = 0
    for _, x in ipairs(r.recoveries) do last = math.max(last, x.lost_at + x.seconds - t_fault) end
    return last
  end

  setup(function()
    L = assert(lab.start{ password = "fullload-faults-s3cret", target_superuser = true,
      proxy = { "replica", "target" }, small_disk = is_root() and { size = "160M" } or nil })
    local ddl = ([[create schema %s; set search_path = %s;
      create table big (id int primary key, pad text);
      create table whole (id int primary key, pad text);
      create table small (id int primary key, t text);]]):format(S, S)
    q(L.source, ddl .. [[
      insert into big select g, repeat(md5(g::text), 3) from generate_series(1, 120000) g;
      insert into whole select g, repeat(md5(g::text), 2) from generate_series(1, 40000) g;
      insert into small select g, 's' || g from generate_series(1, 500) g;
      analyze;]])
    q(L.target, (ddl:gsub(" primary key", "")))
    q(L.target, "grant all on schema " .. S .. " to migrun")
    -- a slow target: each COPY runs long enough for a fault to land in it
    q(L.target, ([[create function %s.slow() returns trigger language plpgsql as $$
      begin if new.id %% 4000 = 0 then perform pg_sleep(0.05); end if; return new; end $$;
      create trigger slow before insert on %s.big for each row execute function %s.slow();
      create trigger slow before insert on %s.whole for each row execute function %s.slow();]]):format(S, S, S, S, S))
    at = assert(L:pause_replica(60))
    tables = {}
    for _, n in ipairs(NAMES) do
      tables[#tables + 1] = { schema = S, name = n,
        bytes = tonumber(q(L.source, ("select pg_table_size('%s.%s')"):format(S, n))) }
    end
  end)

  teardown(function()
    if L then L:stop() end
  end)

  after_each(function()
    for _, name in ipairs{ "replica", "target" } do assert(L[name].proxy:pass()) end
  end)

  it("rides out a target restarted mid-load: what was in flight is done again, nothing twice", function()
    fresh_target()
    local cue, t_fault
    -- chunks of 6 MiB, the restart at 3 MiB: both streams are well inside a
    -- COPY then (with chunks of 2 MiB and their halves the restart could
    -- find every worker between tasks, and nothing in flight to do again)
    local function restart_once(bytes)
      if not cue and bytes > 3 * MiB then
        t_fault = host.now()
        cue = assert(L.target:restart{ mode = "immediate", after = 0 })
      end
    end
    local r, err, said, state = run{ chunk_bytes = 6 * MiB, split_bytes = 6 * MiB, on_progress = restart_once }
    assert(cue and cue:wait(60))
    assert(r, tostring(err) .. "\n" .. said)
    assert.is_true(#r.recoveries >= 1, said)
    assert.truthy(said:find("connection lost", 1, true), said)
    assert.truthy(said:find("done again", 1, true), said)
    all_equal()
    local cs = state.chunks[S .. ".big"]
    local n = 0
    for _ in pairs(cs.done) do n = n + 1 end
    assert.equal(cs.plan.count, n)
    assert.equal(0, #(next(cs.committing) and { 1 } or {}))
    assert.equal(q(L.replica, "select count(*) from pg_indexes where schemaname = 'ff'"),
      q(L.target, "select count(*) from pg_indexes where schemaname = 'ff'"))
    print(("\ntarget restarted (immediate) mid-load: %d item(s) done again, going again %.1f s after the fault")
      :format(#r.recoveries, recovered_after(r, t_fault)))
  end)

  it("detects a stalled path to the target within the stall bound and does the chunk again", function()
    fresh_target()
    local t_fault
    -- chunks of 6 MiB (5.1 each, the last two halves): early in one of the
    -- first three, more is left to send than the client's and the proxy's
    -- kernels take in, so the fault lands in a COPY that is still sending
    local function stall_once(_, _, _, d)
      if not t_fault and d.table == S .. ".big" and d.chunk and d.chunk <= 3 and (d.bytes or 0) > 128 * 1024
          and d.bytes < 2 * MiB then
        t_fault = host.now()
        -- longer than a short statement's bound (3 x 2 s) and the cancel it
        -- then sends (5 s): a worker that was between COPYs (BEGIN, COMMIT,
        -- waiting for its acknowledgement) when it began is stopped too, not
        -- let through when it ends
        assert(L.target.proxy:blackhole{ duration = 12 })
      end
    end
    local r, err, said = run{ stall_timeout = 2, chunk_bytes = 6 * MiB, split_bytes = 6 * MiB, on_progress = stall_once }
    assert(r, tostring(err) .. "\n" .. said)
    assert.is_true(#r.recoveries >= 1, said)
    all_equal()
    local detected = math.huge
    for _, x in ipairs(r.recoveries) do detected = math.min(detected, x.lost_at - t_fault) end
    -- a COPY in flight (the fault lands inside one): noticed by the stall
    -- bound (2 s) from its last byte, a moment before the blackhole
    assert.truthy(said:find("COPY stalled on the target side", 1, true), said)
    assert.is_true(detected < 5, ("the stall was noticed %.1f s after the blackhole"):format(detected))
    print(("\ntarget path stalled (blackhole 12 s, stall bound 2 s): noticed after %.1f s in a COPY, going again %.1f s "
      .. "after the fault"):format(detected, recovered_after(r, t_fault)))
  end)

  it("counts a chunk whose COMMIT went through before its connection was lost once", function()
    fresh_target()
    -- at COMMIT, a deferred trigger sleeps 1 s; the connection is reset meanwhile: the
    -- transaction commits all the same, and the worker learns it from txid_status
    q(L.target, ([[create table %s.commit_flag (x int); insert into %s.commit_flag values (1);
      create function %s.slow_commit() returns trigger language plpgsql as $$ begin
        if current_setting('ff.slept', true) is distinct from 'y' then
          perform set_config('ff.slept', 'y', true);
          if exists (select 1 from %s.commit_flag) then perform pg_sleep(1); end if;
        end if; return null; end $$;
      create constraint trigger slow_commit after insert on %s.big deferrable initially deferred
        for each row execute function %s.slow_commit();]]):format(S, S, S, S, S, S))
    finally(function()
      q(L.target, ("drop trigger slow_commit on %s.big; drop function %s.slow_commit(); drop table %s.commit_flag")
        :format(S, S, S))
    end)
    local script = [[
      local pg, host = require "migrun.pg", require "migrun.host"
      local c = assert(pg.connect(os.getenv("FF_TARGET")))
      local deadline = host.monotonic() + 120
      while host.monotonic() < deadline do
        local r = assert(c:exec("select count(*) as n from pg_stat_activity where query = 'COMMIT' and wait_event = 'PgSleep'"))
        if r[1].n > 0 then
          local s = require("socket").tcp()
          s:settimeout(5)
          assert(s:connect("127.0.0.1", tonumber(os.getenv("FF_PROXY"))))
          s:send("set reset duration=1.000\n")
          s:receive("*l")
          s:close()
          assert(c:exec("delete from ff.commit_flag"))
          os.exit(0)
        end
        host.sleep(0.02)
      end
      os.exit(1)]]
    local t0 = host.monotonic()
    local cue = assert(require("migrun.rehearsal.faults").cue({ { host.exe, "-e", script, timeout = 150,
      env = { FF_TARGET = L.target.direct_conninfo, FF_PROXY = tostring(L.target.proxy.control_port) } } },
      { logfile = L.dir .. "/commit-cue.log" }))
    local r, err, said = run{ jobs = 2 }
    assert(cue:wait(60))
    assert(r, tostring(err) .. "\n" .. said)
    local committed
    for _, x in ipairs(r.recoveries) do if x.outcome == "committed" then committed = x end end
    assert.truthy(committed, said)
    assert.truthy(said:find("its COMMIT had gone through: not loaded again", 1, true), said)
    all_equal() -- nothing twice
    print(("\nconnection lost during a COMMIT that went through: counted once, going again %.1f s after the loss "
      .. "(run %.1f s)"):format(committed.seconds, host.monotonic() - t0))
  end)

  it("stops at once on a full target disk, saying what to do; after room is made a rerun finishes", function()
    if not L.target.disk then
      pending("not root: a small disk mounts a tmpfs")
      return
    end
    fresh_target()
    assert(L.target.disk:fill{ leave = 3 * MiB })
    local state = {}
    local r, err, said = run{ state = state }
    L.target.disk:unfill()
    assert.is_nil(r)
    assert.is_true(err.disk_full, tostring(err))
    assert.matches("the target's storage is full", err.message, 1, true)
    assert.truthy(tostring(err):find("grow the target's storage", 1, true), tostring(err))
    assert.is_nil(said:find("connection lost", 1, true), said) -- never tried again
    r, err, said = run{ state = state }
    assert(r, tostring(err) .. "\n" .. said)
    all_equal()
  end)

  it("stops when the replica restarts and replays past the captured LSN, saying so", function()
    fresh_target()
    q(L.source, ("insert into %s.small values (100000, 'written after the pause')"):format(S)) -- replayed on restart
    local cue
    local r, err, said = run{ on_progress = function(bytes)
      if not cue and bytes > 2 * MiB then cue = assert(L.replica:restart{ mode = "fast", after = 0 }) end
    end }
    assert(cue:wait(60))
    assert.is_nil(r, said)
    local text = tostring(err)
    assert.truthy(err.moved, text .. "\n" .. said)
    assert.truthy(text:find("has replayed past the captured LSN", 1, true), text)
    assert.truthy(text:find("does not keep a pause across a restart", 1, true), text)
    assert.truthy(text:find("full_restart.lua", 1, true), text)
  end)

  it("stops when the replica was promoted: the capture point is gone", function()
    q(L.replica, "select pg_promote()")
    local deadline = host.monotonic() + 30
    while q(L.replica, "select pg_is_in_recovery()") == "t" and host.monotonic() < deadline do host.sleep(0.1) end
    fresh_target()
    local r, err = run{}
    assert.is_nil(r)
    local text = tostring(err)
    assert.truthy(err.promoted, text)
    assert.truthy(text:find("it was promoted", 1, true), text)
    assert.truthy(text:find("rebuild the maintenance replica", 1, true), text)
  end)
end)
