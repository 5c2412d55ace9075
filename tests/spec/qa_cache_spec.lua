-- The full comparison on servers others use (issue 25): the live
-- verification reads the primary while the application runs, and the target
-- while DMS applies. A table larger than a quarter of a side's
-- shared_buffers is hashed there by one sequential scan with parallel
-- workers, which PostgreSQL reads through a small ring, not by block ranges
-- (TID range scans read through the whole pool, and would push out of it
-- what the application or DMS had cached). The snapshot the block ranges of
-- the smaller tables share is let go once they are hashed (an open snapshot
-- holds back VACUUM in the whole cluster). A difference is still narrowed to
-- its key.
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local qa = require "migrun.qa"
local proc = require "migrun.proc"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

local ROWS = 120000 -- about 1,600 blocks: above a quarter of the lab's 32 MB (1,024)

describe("migrun.qa on servers others use", function()
  local L, source, target

  local function connect()
    for _, d in ipairs{ source, target } do if d then d:close() end end
    source = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    target = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
  end
  local function tables(with)
    local list = { { schema = "public", name = "wide", bytes = source:query("select pg_table_size('wide') b")[1].b },
                   { schema = "public", name = "small", bytes = 8192 } }
    if with and with.mid then
      table.insert(list, 2, { schema = "public", name = "mid", bytes = source:query("select pg_table_size('mid') b")[1].b })
    end
    return list
  end
  local function opts()
    return { mode = "full", jobs = 2, chunk_bytes = 256 * 1024, a_conninfo = L.source.conninfo,
             b_conninfo = L.target.conninfo }
  end
  -- the table's heap blocks in the server's buffer pool
  local function cached(d)
    return d:query([[
      select count(*)::bigint n from pg_buffercache b
       where b.relfilenode = pg_relation_filenode('wide') and b.relforknumber = 0
         and b.reldatabase = (select oid from pg_database where datname = current_database())]])[1].n
  end

  setup(function()
    L = assert(lab.start{ replica = false })
    local ddl = [[
      create extension pg_buffercache;
      create table wide (id bigint primary key, a text, b text) with (fillfactor = 100);
      create table small (id int primary key);
      create table mid (id int primary key, a text);]]
    assert(L.source:psql(ddl .. ([[
      insert into wide select g, md5(g::text), md5((-g)::text) from generate_series(1, %d) g;
      insert into small select generate_series(1, 10);
      insert into mid select g, md5(g::text) from generate_series(1, 10000) g;
      vacuum analyze;]]):format(ROWS)))
    assert(L.target:psql(ddl))
    connect()
    for _, t in ipairs{ "wide", "small", "mid" } do
      assert(target:copy_to(source, ("copy %s to stdout (format binary)"):format(t),
        ("copy %s from stdin (format binary)"):format(t)))
    end
    assert(target:query("vacuum analyze"))
    local blocks = source:query("select pg_relation_size('wide') / 8192 n")[1].n
    local buffers = source:query("select setting::bigint n from pg_settings where name = 'shared_buffers'")[1].n
    assert(blocks > buffers // 4, ("wide has %d blocks, not above a quarter of %d buffers"):format(blocks, buffers))
  end)

  teardown(function()
    for _, d in ipairs{ source, target } do if d then d:close() end end
    if L then L:stop() end
  end)

  it("hashes it by one scan of each side, and leaves the buffer pool to what was cached", function()
    -- empty pools: what the comparison leaves in them is what it read into them
    assert(L.source:restart())
    assert(L.target:restart())
    connect()
    assert.equal(0, cached(source))
    assert.equal(0, cached(target))
    local r = assert(qa.compare(source, target, tables(), {}, opts()))
    assert.equal(0, r.differences, qa.format(r))
    local wide = r.checks[1]
    assert.equal("public.wide", wide.table)
    assert.equal(ROWS, wide.a.rows)
    assert.same({ 1, 1 }, { wide.a.chunks, wide.b.chunks })
    -- a ring of 32 buffers per process of the scan; by block ranges the
    -- table's ~1,600 blocks would be in the pool
    local blocks = source:query("select pg_relation_size('wide') / 8192 n")[1].n
    for side, d in pairs{ source = source, target = target } do
      local n = cached(d)
      assert.is_true(n <= 4 * 32, ("%d of wide's %d blocks in the %s's buffer pool"):format(n, blocks, side))
    end
  end)

  it("runs the scan with the parallel worker its share of the jobs gives it", function()
    -- the plans the source's QA sessions ran, in its log (auto_explain,
    -- loaded for them alone: the source's role is a superuser in the lab)
    local o = opts()
    o.a_conninfo = L.source.conninfo .. " options='-c session_preload_libraries=auto_explain"
      .. " -c auto_explain.log_min_duration=0 -c auto_explain.log_analyze=on -c auto_explain.log_timing=off'"
    local f = assert(io.open(L.source.logfile))
    local start = f:seek("end")
    local r = assert(qa.compare(source, target, tables(), {}, o))
    assert.equal(0, r.differences, qa.format(r))
    f:seek("set", start)
    local log = f:read("a")
    f:close()
    local plan = log:match("Finalize Aggregate.-Parallel Seq Scan on wide")
    assert.truthy(plan, "no parallel scan of wide in the source's log:\n" .. log)
    assert.truthy(plan:find("Workers Launched: 1", 1, true), plan)
  end)

  it("lets go of the block ranges' snapshot once they are hashed, not after the largest scans", function()
    -- an open snapshot on a primary holds back what VACUUM may remove in the
    -- whole cluster: it must not last while the scans of the largest tables
    -- go on (hours at a terabyte). The scan of wide waits on a lock held by
    -- the session the comparison plans on (a session does not wait on
    -- itself); the server ends that session once it has idled 5 s in its
    -- transaction, and the scan goes on.
    local list = tables{ mid = true } -- their sizes, before the lock
    local locker = db.wrap(assert(pg.connect(L.source.conninfo, { name = "locker" })))
    assert(locker:query("begin"))
    assert(locker:query("lock table wide in access exclusive mode"))
    assert(locker:query("set local idle_in_transaction_session_timeout = '5s'"))
    local mine = { locker.conn:backend_pid(), source.conn:backend_pid() }
    -- the sessions of the comparison on the source, while the scan waits:
    -- one idle in a transaction is the ranges' snapshot, still held
    local watcher = assert(proc.spawn{ MIGRUN, "-e", ([[
      local c = assert(require("migrun.pg").connect(%q))
      local host = require "migrun.host"
      local seen = "the scan never waited"
      for _ = 1, 80 do
        local r = assert(c:exec([=[
          select count(*) filter (where state = 'idle in transaction') as held,
                 count(*) filter (where wait_event_type = 'Lock') as waiting
            from pg_stat_activity
           where datname = current_database() and backend_type = 'client backend'
             and pid <> pg_backend_pid() and pid not in (%d, %d)]=]))
        if r[1].waiting > 0 then
          seen = r[1].held > 0 and "held" or "let go"
          if seen == "let go" then break end
        end
        host.sleep(0.05)
      end
      print(seen)
    ]]):format(L.source.conninfo, mine[1], mine[2]), stdout = "capture", stderr = "capture" })
    local r = assert(qa.compare(locker, target, list, {}, opts()))
    local _, how = watcher:wait()
    locker:close()
    assert.equal(0, r.differences, qa.format(r))
    assert.is_true(r.checks[2].a.chunks >= 2, "mid was not cut")
    assert.equal("let go", (watcher.stdout or ""):match("[^\n]*"), tostring(how) .. " " .. tostring(watcher.stderr))
  end)

  it("still names the key of a difference", function()
    assert(target:write("update wide set a = 'changed' where id = 98765"))
    local r = assert(qa.compare(source, target, tables(), {}, opts()))
    assert(target:write("update wide set a = md5('98765') where id = 98765"))
    assert.equal(1, r.differences, qa.format(r))
    local c = r.checks[1]
    assert.same({ "id 98765 differs" }, c.chunks[1].keys)
    assert.matches("^same row count %(" .. ROWS .. "%), different contents in chunk %d+/%d+ %(id [^)]+%): id 98765 differs$",
      c.detail)
  end)
end)

describe("migrun.qa's tasks of a side", function()
  local function units(costs)
    local list = {}
    for i, c in ipairs(costs) do
      list[i] = { id = i, side = c.side or "a", scan = c.scan, ranged = c.ranged, cost = c.cost,
                  entry = { schema = "public", name = "t" .. i } }
    end
    return list
  end
  local function workers(bins)
    local out = {}
    for _, b in ipairs(bins) do
      for _, u in ipairs(b.units) do out[u.unit] = u.workers or false end
    end
    return out
  end

  it("gives a scan parallel workers for its share of the side's jobs", function()
    -- 76% of the side with two jobs: two processes, one a worker
    local bins = qa._side_tasks(units{ { scan = true, cost = 76 }, { cost = 24 } }, "a", 2)
    assert.same({ 1, false }, workers(bins))
    -- 40% with eight jobs: three processes
    bins = qa._side_tasks(units{ { scan = true, cost = 40 }, { cost = 30 }, { cost = 30 } }, "a", 8)
    assert.same({ 2, false, false }, workers(bins))
    -- many scans, each a small share: each alone, the jobs read them side by side
    local many = {}
    for i = 1, 10 do many[i] = { scan = true, cost = 10 } end
    assert.same({ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }, workers(qa._side_tasks(units(many), "a", 4)))
    -- never more processes than jobs
    assert.same({ 1 }, workers(qa._side_tasks(units{ { scan = true, cost = 100 } }, "a", 2)))
  end)

  it("puts the block ranges under the snapshot first in a task, and the other side's units in none", function()
    local bins = qa._side_tasks(units{ { scan = true, cost = 50 }, { ranged = true, cost = 6 },
      { ranged = true, cost = 5 }, { side = "b", scan = true, cost = 50 } }, "a", 1)
    assert.equal(1, #bins)
    assert.same({ 2, 3, 1 }, { bins[1].units[1].unit, bins[1].units[2].unit, bins[1].units[3].unit })
    assert.same({ true, true }, { bins[1].units[1].snapshot, bins[1].units[2].snapshot })
    assert.is_nil(bins[1].units[3].snapshot)
    assert.is_true(bins[1].ranged)
  end)
end)
