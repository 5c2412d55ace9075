-- migrun.qa on a real lab: tables copied from the source to the target compare
-- equal (source, and the replica that follows it, against the target); a
-- changed row, a missing row and a row moved to another month are each found.
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local catalog = require "migrun.catalog"
local qa = require "migrun.qa"

local SMALL = 12 -- small tables s01..s12

local DDL = [[
  create schema qa;
  create table qa.big (id int primary key, created_at timestamptz not null, amount float8,
                       ratio real, doc jsonb, note text, period interval, day date);
  create table qa.nocreated (id int primary key, label text);
]]
for i = 1, SMALL do
  DDL = DDL .. ("create table qa.s%02d (id int primary key, created_at timestamp, v text);\n"):format(i)
end

local DATA = [[
  insert into qa.big
    select g, timestamptz '2026-01-01 00:00:00+00' + (g * interval '3 hours'),
           g / 7.0, g / 3.0, jsonb_build_object('g', g, 'pad', repeat('x', g % 30)),
           case when g % 5 = 0 then null else 'note ' || g end, g * interval '1 minute',
           date '2026-01-01' + g % 90
      from generate_series(1, 2000) g;
  -- the last half hour of January in UTC is February in Tokyo: months are taken in UTC
  insert into qa.big values (100000, '2026-01-31 23:30:00+00', 0.1, 0.1, '{}', 'edge', '1 day', '2026-01-31');
  insert into qa.nocreated select g, 'l' || g from generate_series(1, 40) g;
]]
for i = 1, SMALL do
  DATA = DATA .. ("insert into qa.s%02d select g, timestamp '2026-03-01' + g * interval '1 day', 'v' || g "
    .. "from generate_series(1, %d) g;\n"):format(i, 10 + i)
end

describe("migrun.qa", function()
  local L, source, replica, target, tables

  local function copy_all()
    assert(L.target:psql("drop schema if exists qa cascade;" .. DDL))
    for _, t in ipairs(tables) do
      -- reversed, so that the physical order differs from the source's
      assert(target:copy_to(source, ("COPY (select * from %s order by id desc) TO STDOUT (FORMAT binary)"):format(
        t.qualified), ("COPY %s FROM STDIN (FORMAT binary)"):format(t.qualified)))
    end
  end

  local function check_of(result, table_key, method)
    for _, c in ipairs(result.checks) do
      if c.table == table_key and (not method or c.method == method) then return c end
    end
  end

  local function monthly_set(result)
    local set = {}
    for _, c in ipairs(result.checks) do
      if c.method:match("^monthly:") then set[#set + 1] = c.table end
    end
    table.sort(set)
    return table.concat(set, " ")
  end

  setup(function()
    local err
    L, err = lab.start{}
    assert(L, tostring(err))
    assert(L.source:psql(DDL .. DATA))
    -- the target's sessions print times in another zone; QA must not care
    assert(L.target:psql("alter database app set timezone = 'Asia/Tokyo'; alter database app set datestyle = 'SQL, DMY'"))
    source = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    target = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    tables = assert(catalog.tables(source, { schemas = { "qa" } }))
    assert.equal(SMALL + 2, #tables)
    copy_all()
    assert(L:wait_replica_caught_up(30))
    replica = db.wrap(assert(pg.connect(L.replica.conninfo, { name = "replica" })))
  end)

  teardown(function()
    for _, d in ipairs{ source, replica, target } do if d then d:close() end end
    if L then L:stop() end
  end)

  before_each(function()
    -- a test that changed the target gets a fresh copy
    if qa.compare(source, target, tables, {}, { mode = "full" }).differences > 0 then copy_all() end
  end)

  it("counts rows per month in UTC", function()
    assert(target:query("set timezone = 'Asia/Tokyo'"))
    local m = assert(qa.monthly_counts(target, tables[1], "created_at"))
    assert.equal("qa.big", tables[1].key)
    -- 2000 rows every 3 hours from 2026-01-01 03:00 UTC: 247 in January (+1 edge row), 224 in February...
    assert.equal(248, m["2026-01"])
    assert.equal(224, m["2026-02"])
    local total = 0
    for _, n in pairs(m) do total = total + n end
    assert.equal(2001, total)
    assert.same(m, assert(qa.monthly_counts(source, "qa.big", "created_at")))
    -- the session's setting is back as it was
    assert.equal("Asia/Tokyo", assert(target:query("show timezone"))[1].TimeZone)
    local d = assert(qa.monthly_counts(source, "qa.big", "day"))
    assert.equal(2001, d["2026-01"] + d["2026-02"] + d["2026-03"])
  end)

  it("leaves rows newer than `before` out of the monthly counts", function()
    local m = assert(qa.monthly_counts(source, "qa.big", "created_at", "2026-02-01 00:00:00+00"))
    assert.equal(248, m["2026-01"])
    assert.is_nil(m["2026-02"])
    -- a difference only among newer rows is not one for such a comparison
    assert(target:write("delete from qa.big where created_at >= '2026-03-01'"))
    local r = assert(qa.compare(source, target, { tables[1] }, { large_tables = 1, timestamp_column = "created_at" },
      { before = "2026-02-01 00:00:00+00" }))
    assert.equal(0, r.differences)
    r = assert(qa.compare(source, target, { tables[1] }, { large_tables = 1, timestamp_column = "created_at" }))
    assert.equal(1, r.differences)
  end)

  it("hashes equal contents equally whatever the physical order and server settings", function()
    local a = assert(qa.row_hash(source, "qa.big"))
    local b = assert(qa.row_hash(target, tables[1]))
    assert.equal(2001, a.rows)
    assert.matches("^%d+$", a.hash)
    assert.same(a, b)
    assert.same(a, assert(qa.row_hash(replica, "qa.big")))
    assert.are_not.same(a.hash, assert(qa.row_hash(source, "qa.s01")).hash)
    local empty = assert(qa.row_hash(source, "qa.nocreated"))
    assert.same({ rows = 40 }, { rows = empty.rows })
  end)

  it("finds no difference after a real copy, source and replica against the target", function()
    local cfg = { timestamp_column = "created_at", large_tables = 2, small_sample = 3,
                  queries = { { name = "big amounts", sql = "select count(*), sum(amount)::numeric(20,4) from qa.big" } } }
    for _, a in ipairs{ source, replica } do
      local quick = qa.compare(a, target, tables, cfg, { seed = 7 })
      assert.equal(0, quick.differences, qa.format(quick))
      assert.equal(SMALL + 2 + 1, #quick.checks)
      assert.equal("monthly:created_at", check_of(quick, "qa.big").method)
      assert.equal("count", check_of(quick, "qa.nocreated").method) -- large, but no created_at
      local _, monthly = monthly_set(quick):gsub("%S+", "")
      assert.equal(1 + 3, monthly) -- qa.big and 3 sampled small tables
      assert.is_true(check_of(quick, "query:big amounts").equal)
      local full = qa.compare(a, target, tables, cfg, { mode = "full" })
      assert.equal(0, full.differences, qa.format(full))
      assert.equal(SMALL + 2, #full.checks)
      for _, c in ipairs(full.checks) do assert.equal("hash", c.method) end
    end
    assert.matches("^QA %(quick, source vs target, seed 7%): 15 checks, 0 differences$",
      qa.format(qa.compare(source, target, tables, cfg, { seed = 7 })))
  end)

  it("detects a changed row (hash), not seen by counts", function()
    assert(target:write("update qa.big set note = 'changed' where id = 1234"))
    local full = qa.compare(source, target, tables, {}, { mode = "full" })
    assert.equal(1, full.differences)
    local c = check_of(full, "qa.big", "hash")
    assert.is_false(c.equal)
    -- narrowed to its key, whatever the table's size
    assert.equal("same row count (2001), different contents: id 1234 differs (1 key)", c.detail)
    assert.same({ { key = "[1234]", what = "differs" } }, { { key = c.keys[1].key, what = c.keys[1].what } })
    assert.is_true(c.keys_complete)
    local quick = qa.compare(source, target, tables, { timestamp_column = "created_at" }, { seed = 1 })
    assert.equal(0, quick.differences)
    -- a float changed in its last bit is a change too
    assert(target:write("update qa.big set note = 'note 1234' where id = 1234"))
    assert.equal(0, qa.compare(source, target, tables, {}, { mode = "full" }).differences)
    assert(target:write("update qa.big set amount = amount + amount * 1e-15 where id = 10"))
    assert.equal(1, qa.compare(source, target, tables, {}, { mode = "full" }).differences)
  end)

  it("hashes large tables by key ranges on both sides at once and names the chunk and the keys that differ", function()
    local function opts(extra)
      local o = { mode = "full", chunk_bytes = 64 * 1024, jobs = 2, a_conninfo = L.source.conninfo,
                  b_conninfo = L.target.conninfo }
      for k, v in pairs(extra or {}) do o[k] = v end
      return o
    end
    local equal = assert(qa.compare(source, target, tables, {}, opts()))
    assert.equal(0, equal.differences, qa.format(equal))
    local big = check_of(equal, "qa.big", "hash")
    assert.is_true(big.a.chunks >= 3, "qa.big was not cut into key ranges")
    assert.equal(2001, big.a.rows)
    assert.is_string(check_of(equal, "qa.s01", "hash").a.hash) -- small tables whole

    -- one changed row: found in its chunk, narrowed to its key, whichever way it runs
    assert(target:write("update qa.big set note = 'changed' where id = 1234"))
    for _, o in ipairs{ opts(), opts{ jobs = 1 } } do
      local r = assert(qa.compare(source, target, tables, {}, o))
      assert.equal(1, r.differences)
      local c = check_of(r, "qa.big", "hash")
      assert.equal(1, #c.chunks)
      local chunk = c.chunks[1]
      assert.same({ "id 1234 differs" }, chunk.keys)
      assert.matches(("^same row count %%(2001%%), different contents in chunk %d/%d %%(id [^)]+%%): id 1234 differs$")
        :format(chunk.chunk, chunk.of), c.detail)
      -- the range named holds the key
      local lo, hi = chunk.range:match("^id (%d+)%.%.(%d+)$")
      if not lo then lo, hi = chunk.range:match("^id >= (%d+)$"), math.maxinteger end
      if not lo then lo, hi = 0, chunk.range:match("^id < (%d+)$") - 1 end
      assert.is_true(tonumber(lo) <= 1234 and 1234 <= tonumber(hi), chunk.range)
    end
    -- a row missing and a row too many, in other chunks
    assert(target:write("update qa.big set note = 'note 1234' where id = 1234"))
    assert(target:write("delete from qa.big where id = 7"))
    assert(target:write("insert into qa.big (id, created_at) values (1999999, now())"))
    local r = assert(qa.compare(source, target, tables, {}, opts()))
    local c = check_of(r, "qa.big", "hash")
    assert.matches("^same row count %(2001%), different contents in chunk ", c.detail)
    local keys = {}
    for _, ch in ipairs(c.chunks) do for _, k in ipairs(ch.keys) do keys[#keys + 1] = k end end
    table.sort(keys)
    assert.same({ "id 1999999 only in b", "id 7 only in a" }, keys)
  end)

  it("detects a missing row (monthly, count and hash)", function()
    assert(target:write("delete from qa.big where id = 500"))   -- 2026-03-03 12:00 UTC
    assert(target:write("delete from qa.s05 where id = 1"))
    assert(target:write("delete from qa.nocreated where id = 2"))
    local cfg = { timestamp_column = "created_at", large_tables = 2, small_sample = 0 }
    local quick = qa.compare(source, target, tables, cfg, { seed = 1 })
    assert.equal(3, quick.differences)
    assert.equal("2026-03: 248 vs 247", check_of(quick, "qa.big").detail)
    assert.equal("40 vs 39 rows", check_of(quick, "qa.nocreated").detail)
    assert.equal("count", check_of(quick, "qa.s05").method)
    assert.equal("15 vs 14 rows", check_of(quick, "qa.s05").detail)
    local full = qa.compare(source, target, tables, cfg, { mode = "full" })
    assert.equal(3, full.differences)
    assert.equal("2001 vs 2000 rows: id 500 only in source (1 key)", check_of(full, "qa.big").detail)
    local text = qa.format(quick)
    assert.matches("^QA %(quick, source vs target, seed 1%): 14 checks, 3 differences\n", text)
    assert.matches("\nqa.big%s+monthly:created_at%s+2001 rows, 9 months%s+2000 rows, 9 months%s+2026%-03: 248 vs 247", text)
    assert.matches("\nqa.nocreated%s+count%s+40%s+39%s+40 vs 39 rows", text)
  end)

  it("detects a row moved to another month, with the same count", function()
    assert(target:write("update qa.big set created_at = created_at - interval '40 days' where id = 1000"))
    local cfg = { timestamp_column = "created_at", large_tables = 1, small_sample = 0 }
    local quick = qa.compare(source, target, tables, cfg, { seed = 1 })
    assert.equal(1, quick.differences)
    assert.equal("2026-03: 248 vs 249; 2026-05: 248 vs 247", check_of(quick, "qa.big").detail)
    local full = qa.compare(source, target, tables, cfg, { mode = "full" })
    assert.equal("same row count (2001), different contents: id 1000 differs (1 key)", check_of(full, "qa.big").detail)
  end)

  it("uses a table's own timestamp column when configured", function()
    local cfg = { timestamp_column = "created_at", timestamp_columns = { ["qa.big"] = "day",
                  ["qa.nocreated"] = "nosuch" }, large_tables = 2, small_sample = 0 }
    local quick = qa.compare(source, target, tables, cfg, { seed = 1 })
    assert.equal("monthly:day", check_of(quick, "qa.big").method)
    assert.equal("count", check_of(quick, "qa.nocreated").method)
    assert.matches("configured timestamp column nosuch not in the table", check_of(quick, "qa.nocreated").detail)
  end)

  it("takes a partitioned table's configuration, size and sampling for its partitions", function()
    local ddl = [[create schema qp;
      create table qp.m (id int primary key, at timestamptz not null, at2 timestamptz not null, v text)
        partition by range (id);
      create table qp.m_1 partition of qp.m for values from (0) to (1000);
      create table qp.m_2 partition of qp.m for values from (1000) to (2000);
      create table qp.one (id int primary key, at timestamptz not null, pad text);]]
    local data = [[
      insert into qp.m select g, timestamptz '2026-01-01 00:00+00' + g * interval '2 hours',
          timestamptz '2025-01-01 00:00+00', 'v' || g
        from generate_series(1, 1998) g;
      insert into qp.one select g, timestamptz '2026-01-01 00:00+00', repeat('p', 80) from generate_series(1, 1000) g;
      analyze;]]
    assert(L.source:psql(ddl .. data))
    assert(L.target:psql(ddl .. data))
    finally(function()
      L.source:psql("drop schema qp cascade")
      L.target:psql("drop schema qp cascade")
    end)
    local parts = assert(catalog.tables(source, { schemas = { "qp" } }))
    local by = {}
    for _, t in ipairs(parts) do by[t.key] = t end
    assert.equal("qp.m", by["qp.m_1"].partition_of)
    assert.is_true(by["qp.one"].bytes > math.max(by["qp.m_1"].bytes, by["qp.m_2"].bytes)
      and by["qp.one"].bytes < by["qp.m_1"].bytes + by["qp.m_2"].bytes,
      ("sizes: one %d, m_1 %d, m_2 %d"):format(by["qp.one"].bytes, by["qp.m_1"].bytes, by["qp.m_2"].bytes))

    -- the largest unit is qp.m (its partitions together); its column is named by the parent,
    -- a partition's own entry comes first
    local cfg = { timestamp_column = "created_at", timestamp_columns = { ["qp.m"] = "at", ["qp.m_2"] = "at2" },
      large_tables = 1, small_sample = 0 }
    local r = qa.compare(source, target, parts, cfg, { seed = 1 })
    assert.equal("monthly:at", check_of(r, "qp.m_1").method)
    assert.equal("monthly:at2", check_of(r, "qp.m_2").method)
    assert.equal("count", check_of(r, "qp.one").method)
    assert.equal("qp.m", check_of(r, "qp.m_1").partition_of)
    assert.equal(0, r.differences)
    -- a sample of one unit is either the partitioned table (both partitions) or the other table
    for seed = 1, 8 do
      local set = monthly_set(qa.compare(source, target, parts, { timestamp_columns = { ["qp.m"] = "at" },
        timestamp_column = "at", large_tables = 0, small_sample = 1 }, { seed = seed }))
      assert.truthy(set == "qp.m_1 qp.m_2" or set == "qp.one", set)
    end

    -- a row changed in a partition: found by the hashes, named by key
    assert(target:write("update qp.m set v = 'changed' where id = 1500"))
    local full = qa.compare(source, target, parts, cfg, { mode = "full" })
    assert.equal(1, full.differences)
    assert.equal("same row count (999), different contents: id 1500 differs (1 key)", check_of(full, "qp.m_2").detail)
  end)

  it("never calls a comparison of nothing equal", function()
    local cfg = { timestamp_column = "created_at", large_tables = 1, small_sample = 0 }
    -- every row newer than the cut-off: nothing compared
    local r = assert(qa.compare(source, target, tables, cfg, { seed = 1, before = "2000-01-01" }))
    local big = check_of(r, "qa.big")
    assert.is_true(big.equal)
    assert.equal("nothing compared", qa.verdict(big))
    for _, row in ipairs(qa.report_rows(r)) do
      if row[1] == "qa.big" then assert.equal("nothing compared", row[5]) end
    end
    -- an empty table on both sides says so; one with rows says yes
    assert(L.source:psql("create table qa.empty (id int primary key)"))
    assert(L.target:psql("create table qa.empty (id int primary key)"))
    finally(function()
      L.source:psql("drop table qa.empty")
      L.target:psql("drop table qa.empty")
    end)
    local e = assert(qa.compare(source, target, { "qa.empty", "qa.s01" }, {}, { mode = "full" }))
    assert.equal("empty on both", qa.verdict(check_of(e, "qa.empty")))
    assert.equal("yes", qa.verdict(check_of(e, "qa.s01")))
  end)

  it("samples small tables reproducibly by seed", function()
    local cfg = { timestamp_column = "created_at", large_tables = 1, small_sample = 4 }
    local a = monthly_set(qa.compare(source, target, tables, cfg, { seed = 12345 }))
    local b = monthly_set(qa.compare(source, target, tables, cfg, { seed = 12345 }))
    assert.equal(a, b)
    local _, n = a:gsub("%S+", "")
    assert.equal(5, n) -- qa.big and 4 of the others
    local seen = { [a] = true }
    for seed = 1, 5 do seen[monthly_set(qa.compare(source, target, tables, cfg, { seed = seed }))] = true end
    local distinct = 0
    for _ in pairs(seen) do distinct = distinct + 1 end
    assert.is_true(distinct >= 3, "different seeds should pick different samples")
    -- the sample does not depend on the order the tables come in
    local reversed = {}
    for i = #tables, 1, -1 do reversed[#reversed + 1] = tables[i] end
    assert.equal(a, monthly_set(qa.compare(source, target, reversed, cfg, { seed = 12345 })))
    assert.same(qa._sample({ 1, 2, 3, 4, 5, 6 }, 3, 99), qa._sample({ 1, 2, 3, 4, 5, 6 }, 3, 99))
    assert.equal(6, #qa._sample({ 1, 2, 3, 4, 5, 6 }, 10, 99))
  end)

  it("compares the configured queries and reports a table missing on one side", function()
    assert(target:write("update qa.big set amount = 0 where id = 3"))
    local cfg = { large_tables = 0, small_sample = 0,
                  queries = { { name = "sum", sql = "select sum(amount)::numeric(20,4) as s from qa.big" } } }
    local quick = qa.compare(source, target, tables, cfg, { seed = 1 })
    local c = check_of(quick, "query:sum")
    assert.is_false(c.equal)
    assert.matches("^row 1: %d+%.%d+ vs %d+%.%d+$", c.detail)
    local gone = { { schema = "qa", name = "not_on_target" } }
    assert(L.source:psql("create table qa.not_on_target (id int)"))
    local r = qa.compare(source, target, gone, {}, { mode = "full" })
    assert.equal(1, r.differences)
    assert.matches("not_on_target", r.checks[1].detail)
    assert.equal("sql", r.checks[1].error.kind)
  end)
end)
