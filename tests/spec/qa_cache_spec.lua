-- The full comparison and the servers' buffer cache (issue 25): a table
-- larger than a quarter of a side's shared_buffers is hashed on that side by
-- one sequential scan with parallel workers, which PostgreSQL reads through
-- a small ring, not by block ranges (TID range scans read through the whole
-- pool, and would push out of it what the source's application or DMS on the
-- target had cached). A difference is still narrowed to its key.
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local qa = require "migrun.qa"

local ROWS = 120000 -- about 1,900 blocks: above a quarter of the lab's 32 MB (1,024)

describe("migrun.qa and the servers' cache", function()
  local L, source, target

  local function connect()
    for _, d in ipairs{ source, target } do if d then d:close() end end
    source = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    target = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
  end
  local function tables()
    return { { schema = "public", name = "wide", bytes = source:query("select pg_table_size('wide') b")[1].b },
             { schema = "public", name = "small", bytes = 8192 } }
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
      create table small (id int primary key);]]
    assert(L.source:psql(ddl .. ([[
      insert into wide select g, md5(g::text), md5((-g)::text) from generate_series(1, %d) g;
      insert into small select generate_series(1, 10);
      vacuum analyze;]]):format(ROWS)))
    assert(L.target:psql(ddl))
    connect()
    for _, t in ipairs{ "wide", "small" } do
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
    -- table's ~1,900 blocks would be in the pool
    local blocks = source:query("select pg_relation_size('wide') / 8192 n")[1].n
    for side, d in pairs{ source = source, target = target } do
      local n = cached(d)
      assert.is_true(n <= 4 * 32, ("%d of wide's %d blocks in the %s's buffer pool"):format(n, blocks, side))
    end
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
