-- migrun.lobs.compare on real clusters of the lab (source and target): which
-- LOB columns are checked, equal long values, a value cut on the target, a
-- row missing there, a composite primary key, a bytea column (its own
-- threshold) and a settle that repairs what was in flight.
local lab = require "migrun.rehearsal.lab"
local db = require "migrun.db"
local pg = require "migrun.pg"
local catalog = require "migrun.catalog"
local lobs = require "migrun.lobs"

describe("migrun.lobs", function()
  local L, src, tgt

  setup(function()
    L = assert(lab.start{})
    local ddl = [[
      create table public.docs (a int, b bigint, body text, bin bytea, primary key (a, b));
      create table public.full_lob (id int primary key, body text);
      create table public.plain (id int primary key, n int);]]
    assert(L.source:psql(ddl))
    assert(L.target:psql(ddl))
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    tgt = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
  end)
  teardown(function()
    if src then src.conn:close() end
    if tgt then tgt.conn:close() end
    if L then L:stop() end
  end)

  local function both(sql)
    assert(src:query(sql))
    assert(tgt:query(sql))
  end

  it("names every long value that differs, by key, and nothing else", function()
    -- limit 4 KB: text values over 2 KB and bytea values over 4 KB can be cut
    both([[insert into docs select g, 10 * g, repeat('x', 1000 * g), decode(repeat('ab', 1000 * g), 'hex')
           from generate_series(1, 6) g;
           insert into full_lob values (1, repeat('z', 50000));
           insert into plain values (1, 1)]])
    local tables = assert(catalog.tables(src, { schemas = { "public" } }))
    local groups = { { name = "g", slot = "g", lob_max_kb = 4, tables = {
      { schema = "public", name = "docs", has_pk = true, lob_columns = { "body", "bin" }, lob_max_kb = 4 },
      { schema = "public", name = "full_lob", has_pk = true, lob_columns = { "body" }, lob_max_kb = 4,
        lob_truncation_ok = false },
      { schema = "public", name = "plain", has_pk = true } } } }
    local cols = lobs.columns(groups, tables)
    local names = {}
    for i, c in ipairs(cols) do names[i] = ("%s.%s>%d"):format(c.table, c.column, c.threshold) end
    table.sort(names)
    -- full_lob is in full LOB mode (never cut) and plain has no LOB
    assert.same({ "public.docs.bin>4096", "public.docs.body>2048" }, names)

    local r = assert(lobs.compare(src, tgt, cols))
    assert.same({}, r.truncated)
    for _, row in ipairs(r.rows) do assert.is_true(row.same) end

    -- cut on the target, missing on the target, and a short value that differs (not a LOB problem)
    assert(tgt:query("update docs set body = left(body, 4096) where a = 5"))
    assert(tgt:query("delete from docs where a = 6"))
    assert(tgt:query("update docs set body = 'short' where a = 1"))
    r = assert(lobs.compare(src, tgt, cols))
    local found = {}
    for _, t in ipairs(r.truncated) do
      found[#found + 1] = ("%s.%s %s %s/%s"):format(t.table, t.column, t.key, t.source_bytes, tostring(t.target_bytes))
    end
    table.sort(found)
    assert.same({ "public.docs.bin a=6, b=60 6000/nil", "public.docs.body a=5, b=50 5000/4096",
      "public.docs.body a=6, b=60 6000/nil" }, found)
    assert.truthy(lobs.format({ truncated = r.truncated, log = {} }):find("a=5, b=50: 5000 bytes on the source, "
      .. "4096 bytes on the target", 1, true))

    -- a settle that brings the target up to date: compared again, nothing left
    local settled = 0
    r = assert(lobs.compare(src, tgt, cols, { settle = function()
      settled = settled + 1
      assert(tgt:query("update docs set body = repeat('x', 5000) where a = 5"))
      assert(tgt:query("insert into docs values (6, 60, repeat('x', 6000), decode(repeat('ab', 6000), 'hex'))"))
      return true
    end }))
    assert.equal(1, settled)
    assert.same({}, r.truncated)
  end)
end)
