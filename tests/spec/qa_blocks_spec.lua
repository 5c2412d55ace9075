-- The full comparison at the cost of a scan (issue 25): a table larger than
-- chunk_bytes is hashed by block ranges of each side (sequential reads, no
-- index scan), each side under one exported snapshot, so that rows moving
-- while the units are read are counted once; a difference is still narrowed
-- by key ranges to the keys that differ.
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local qa = require "migrun.qa"
local proc = require "migrun.proc"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local ROWS = 60000

describe("migrun.qa by block ranges", function()
  local L, source, source2, target

  local function tables()
    return { { schema = "public", name = "keyed", bytes = source:query("select pg_table_size('keyed') b")[1].b },
             { schema = "public", name = "loose", bytes = source:query("select pg_table_size('loose') b")[1].b } }
  end
  local function opts(a, b, extra)
    local o = { mode = "full", jobs = 2, chunk_bytes = 256 * 1024, a_conninfo = a, b_conninfo = b }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end
  local function idx_scans(d)
    return d:query("select coalesce(sum(idx_scan), 0)::bigint n from pg_stat_user_tables where relname = 'keyed'")[1].n
  end

  setup(function()
    -- tables below a quarter of shared_buffers, even once the mover below
    -- has bloated loose: above it a side reads a table by one scan
    -- (qa_cache_spec), not by block ranges
    L = assert(lab.start{ replica = false, settings = { all = { shared_buffers = "128MB" } } })
    local ddl = [[
      create table keyed (id bigint primary key, note text, at timestamptz) with (fillfactor = 100);
      create table loose (n int, note text) with (fillfactor = 100);]]
    assert(L.source:psql(ddl .. ([[
      insert into keyed select g, md5(g::text), timestamptz '2024-01-01' + g * interval '1 minute'
        from generate_series(1, %d) g;
      insert into loose select g, md5(g::text) from generate_series(1, %d) g;
      vacuum analyze;]]):format(ROWS, ROWS)))
    assert(L.target:psql(ddl))
    source = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    source2 = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source again" })))
    target = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    for _, t in ipairs{ "keyed", "loose" } do
      assert(target:copy_to(source, ("copy (select * from %s order by 1 desc) to stdout (format binary)"):format(t),
        ("copy %s from stdin (format binary)"):format(t)))
    end
    assert(target:query("analyze"))
    -- the copy above read keyed by its index on the source; a backend sends
    -- its counters at most once a second, so make it send them now, before a
    -- test takes its baseline
    for _, d in ipairs{ source, target } do
      assert(d:query("select pg_stat_force_next_flush()"))
      assert(d:query("select 1"))
    end
  end)

  teardown(function()
    for _, d in ipairs{ source, source2, target } do if d then d:close() end end
    if L then L:stop() end
  end)

  it("reads a table with an integer key by block ranges of each side, not by its index", function()
    local a0, b0 = idx_scans(source), idx_scans(target)
    local r = assert(qa.compare(source, target, tables(), {}, opts(L.source.conninfo, L.target.conninfo)))
    assert.equal(0, r.differences, qa.format(r))
    local keyed = r.checks[1]
    assert.equal("public.keyed", keyed.table)
    assert.is_true(keyed.a.chunks >= 3 and keyed.b.chunks >= 3, "keyed was not cut")
    assert.equal(ROWS, keyed.a.rows)
    -- the statistics collector may take a moment to count a scan
    require("migrun.host").sleep(0.7)
    assert.equal(a0, idx_scans(source), "index scans on the source")
    assert.equal(b0, idx_scans(target), "index scans on the target")
  end)

  it("still names the key range and the key of a difference", function()
    assert(target:write("update keyed set note = 'changed' where id = 4321"))
    local r = assert(qa.compare(source, target, tables(), {}, opts(L.source.conninfo, L.target.conninfo)))
    assert(target:write("update keyed set note = md5('4321') where id = 4321"))
    assert.equal(1, r.differences)
    local c = r.checks[1]
    assert.equal(1, #c.chunks)
    assert.same({ "id 4321 differs" }, c.chunks[1].keys)
    assert.matches("^same row count %(" .. ROWS .. "%), different contents in chunk %d+/%d+ %(id [^)]+%): id 4321 differs$",
      c.detail)
  end)

  it("says a table missing on one side, and compares the others of its worker", function()
    assert(source:write("create table only_here (id int primary key)"))
    local list = tables()
    list[#list + 1] = { schema = "public", name = "only_here", bytes = 0 }
    local r = assert(qa.compare(source, target, list, {}, opts(L.source.conninfo, L.target.conninfo)))
    assert(source:write("drop table only_here"))
    assert.equal(1, r.differences, qa.format(r))
    assert.equal("public.only_here", r.checks[3].table)
    assert.matches("only_here", r.checks[3].detail)
    assert.is_true(r.checks[1].equal and r.checks[2].equal)
  end)

  it("counts once, on each side, the rows that move while the units are read", function()
    -- updates that change nothing but move rows to the end of the table, all
    -- the time the comparison runs: a side read in parts at different moments
    -- would miss some and count others twice
    local mover = assert(proc.spawn{ MIGRUN, "-e", ([[
      local c = assert(require("migrun.pg").connect(%q))
      for i = 1, 400 do assert(c:exec("update loose set note = note where n %% 97 = " .. i %% 97)) end
    ]]):format(L.source.conninfo), stdout = "null", stderr = "capture" })
    local compared = 0
    while mover.running and compared < 20 do
      local r = assert(qa.compare(source, source2, { tables()[2] }, {}, opts(L.source.conninfo, L.source.conninfo,
        { narrow = false })))
      assert.equal(0, r.differences, qa.format(r))
      assert.is_true(r.checks[1].a.chunks >= 3, "loose was not cut")
      compared = compared + 1
    end
    mover:kill("TERM")
    mover:wait()
    assert.is_true(compared >= 2, "the rows stopped moving before two comparisons ran")
  end)
end)
