-- migrun.catalog on a real lab: what the tables are, their sizes, LOBs, write
-- rates, and which indexes and constraints a target lacks.
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local catalog = require "migrun.catalog"
local host = require "migrun.host"

local function by_key(list)
  local m = {}
  for _, t in ipairs(list) do m[t.schema .. "." .. t.name] = t end
  return m
end

-- A backend flushes its statistics as it exits, after its psql has returned:
-- wait until the table's counter shows what psql did.
local function await_stats(source, name, counter, at_least)
  local deadline = host.monotonic() + 15
  repeat
    local res = assert(source:query(([[select %s as n from pg_stat_user_tables
                                        where schemaname = 'cat' and relname = '%s']]):format(counter, name)))
    for row in res:rows() do if row.n >= at_least then return end end
    host.sleep(0.05)
  until host.monotonic() > deadline
  error(("the statistics of cat.%s never showed %s >= %d"):format(name, counter, at_least))
end

describe("migrun.catalog", function()
  local L, source, target

  setup(function()
    local err
    L, err = lab.start{}
    assert(L, tostring(err))
    source = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    target = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    assert(L.source:psql([[
      create schema cat;
      create table cat.big (id bigint primary key, email text not null, code int,
                            doc jsonb, note varchar, short varchar(20), blob bytea,
                            created_at timestamptz default now());
      alter table cat.big add constraint big_email_key unique (email);
      create unique index big_code_idx on cat.big (code) where code is not null;
      create table cat.nopk (x int, label varchar(10));
      create table cat.plain (id int primary key, n int);
      create index plain_n_idx on cat.plain (n);
      create domain cat.doc as json;
      create table cat.dom (id int primary key, d cat.doc, tags text[]);
      create table cat.parted (id int, k int, primary key (id, k)) partition by range (k);
      create table cat.parted_a partition of cat.parted for values from (0) to (100);
      create table cat.parted_b partition of cat.parted for values from (100) to (200);
      create schema other;
      create table other.t (id int primary key);
      insert into cat.big (id, email, code, doc, note, short, blob)
        select g, 'user' || g || '@example.com', case when g % 2 = 0 then g end,
               jsonb_build_object('pad', repeat('x', g)), repeat('n', g % 50), 'short',
               decode(repeat('ab', g), 'hex')
          from generate_series(1, 3000) g;
      update cat.big set doc = jsonb_build_object('pad', repeat('z', 70000)) where id = 17;
      insert into cat.nopk select g, 'l' from generate_series(1, 10) g;
      insert into cat.parted select g, g % 200 from generate_series(1, 400) g;
      analyze cat.big;
    ]]))
    await_stats(source, "nopk", "n_live_tup", 10)
  end)

  teardown(function()
    if source then source:close() end
    if target then target:close() end
    if L then L:stop() end
  end)

  it("lists the tables of the schemas, largest first, with their facts", function()
    local list = assert(catalog.tables(source, { schemas = { "cat" } }))
    local t = by_key(list)
    assert.same({ "cat.big", "cat.dom", "cat.nopk", "cat.parted_a", "cat.parted_b", "cat.plain" },
      (function() local ks = {} for k in pairs(t) do ks[#ks + 1] = k end table.sort(ks) return ks end)())
    assert.equal("cat.big", list[1].schema .. "." .. list[1].name)
    for i = 2, #list do assert.is_true(list[i - 1].bytes >= list[i].bytes) end

    local big = t["cat.big"]
    assert.equal('"cat"."big"', big.qualified)
    assert.is_true(big.bytes > big.table_bytes) -- indexes and TOAST count in bytes
    assert.is_true(big.table_bytes > 0)
    assert.equal(3000, big.rows_estimate)       -- analyzed: reltuples
    assert.is_true(big.has_pk)
    assert.same({ "id" }, big.pk_columns)
    assert.is_true(big.separate_unique)
    table.sort(big.unique, function(a, b) return a.name < b.name end)
    assert.equal("big_code_idx", big.unique[1].name)
    assert.is_false(big.unique[1].is_constraint)
    assert.is_true(big.unique[1].partial)
    assert.matches("^CREATE UNIQUE INDEX big_code_idx ON cat.big USING btree %(code%)", big.unique[1].definition)
    assert.same({ name = "big_email_key", columns = { "email" }, is_constraint = true,
                  definition = "UNIQUE (email)", partial = false }, big.unique[2])
    local lobs = {}
    for _, c in ipairs(big.lob_columns) do lobs[#lobs + 1] = c.name .. ":" .. c.type end
    -- varchar without a length is a LOB for DMS, varchar(20) is not
    assert.same({ "email:text", "doc:jsonb", "note:character varying", "blob:bytea" }, lobs)
    assert.equal(8, #big.columns)
    assert.same({ name = "short", type = "character varying(20)", not_null = false, generated = false },
      big.columns[6])

    local nopk = t["cat.nopk"]
    assert.is_false(nopk.has_pk)
    assert.is_false(nopk.separate_unique)
    assert.same({}, nopk.lob_columns)
    assert.equal(10, nopk.rows_estimate) -- never analyzed: the live tuple count

    local plain = t["cat.plain"]
    assert.is_true(plain.has_pk)
    assert.same({}, plain.unique) -- a plain index is not a unique one
    assert.is_false(plain.separate_unique)

    local dom = t["cat.dom"]  -- a domain over json and an array are LOBs too
    assert.same({ { name = "d", type = "cat.doc", bytea = false }, { name = "tags", type = "text[]", bytea = false } },
      dom.lob_columns)

    assert.equal("cat.parted", t["cat.parted_a"].partition_of)
    assert.same({ "id", "k" }, t["cat.parted_a"].pk_columns)
  end)

  it("never lists system schemas, and honours exclude (a partitioned parent excludes its partitions)", function()
    local list = assert(catalog.tables(source, { exclude = { "cat.nopk", "cat.parted" } }))
    local t = by_key(list)
    assert.truthy(t["other.t"])
    assert.truthy(t["cat.big"])
    assert.is_nil(t["cat.nopk"])
    assert.is_nil(t["cat.parted_a"])
    assert.is_nil(t["cat.parted_b"])
    for _, x in ipairs(list) do
      assert.is_falsy(x.schema:match("^pg_") or x.schema == "pglogical" or x.schema == "information_schema",
        x.schema)
    end
    local found = false -- pglogical's own tables exist on the source, and are not listed
    for row in assert(source:query("select count(*) as n from pg_tables where schemaname = 'pglogical'")):rows() do
      found = row.n > 0
    end
    assert.is_true(found)
  end)

  it("reports a schema that does not exist", function()
    local list, err = catalog.tables(source, { schemas = { "cat", "nosuch" } })
    assert.is_nil(list)
    assert.equal("catalog", err.kind)
    assert.matches("nosuch", tostring(err))
  end)

  it("measures the largest LOB of each column", function()
    local list = assert(catalog.tables(source, { schemas = { "cat" } }))
    local calls = {}
    assert(catalog.measure_lobs(source, list, { on_progress = function(done, total, name)
      calls[#calls + 1] = ("%d/%d %s"):format(done, total, name)
    end }))
    local big = by_key(list)["cat.big"]
    local max = {}
    for _, c in ipairs(big.lob_columns) do max[c.name] = c.max_bytes end
    assert.equal(#'{"pad": ""}' + 70000, max.doc)  -- jsonb text form of row 17
    assert.equal(3000, max.blob)                   -- bytea: its own length
    assert.equal(49, max.note)
    assert.equal(#"user3000@example.com", max.email)
    assert.equal(70011, big.lob_max_bytes)
    assert.equal(69, big.lob_max_kb)               -- ceil(70011 / 1024)
    assert.equal(0, by_key(list)["cat.dom"].lob_max_kb) -- empty table
    assert.same({ "1/2 cat.big", "2/2 cat.dom" }, calls)
  end)

  it("sees writes in the write rates", function()
    local list = assert(catalog.tables(source, { schemas = { "cat" } }))
    local slept
    assert(catalog.write_rates(source, list, 0.5, function(seconds)
      slept = seconds
      -- the workload runs "while we sleep"
      assert(L.source:psql([[
        insert into cat.plain select g, g from generate_series(1, 300) g;
        update cat.plain set n = n + 1 where id <= 100;
        delete from cat.plain where id <= 50;]]))
      await_stats(source, "plain", "n_tup_del", 50)
    end))
    assert.equal(0.5, slept)
    local t = by_key(list)
    local r = t["cat.plain"].write_rate
    assert.is_true(r.seconds > 0)
    assert.near(300 / r.seconds, r.inserts, 1e-6)
    assert.near(100 / r.seconds, r.updates, 1e-6)
    assert.near(50 / r.seconds, r.deletes, 1e-6)
    assert.near(450 / r.seconds, r.total, 1e-6)
    assert.equal(0, t["cat.nopk"].write_rate.total)
  end)

  it("finds what the target lacks: a missing index and a missing constraint", function()
    local ddl = [[
      create schema ver;
      create table ver.a (id int primary key, email text, n int, ref int);
      create table ver.b (id int primary key);
      alter table ver.a add constraint a_email_key unique (email);
      alter table ver.a add constraint a_ref_fkey foreign key (ref) references ver.b (id);
      alter table ver.a add constraint a_n_check check (n > 0);
      create index a_n_idx on ver.a (n);
    ]]
    assert(L.source:psql(ddl))
    assert(L.target:psql(ddl .. [[
      drop index ver.a_n_idx;
      create index a_n_other_name on ver.a (n);   -- renamed: still the same index
      alter table ver.a drop constraint a_email_key;
      alter table ver.a drop constraint a_n_check;
      create index extra_on_target on ver.a (ref);
    ]]))
    local tables = { { schema = "ver", name = "a" }, { schema = "ver", name = "b" } }
    local src = assert(catalog.constraints_and_indexes(source, tables))
    local tgt = assert(catalog.constraints_and_indexes(target, tables))
    local kinds = {}
    for _, item in ipairs(src) do kinds[#kinds + 1] = item.kind .. " " .. item.name end
    assert.same({ "constraint a_email_key", "constraint a_n_check", "constraint a_pkey",
                  "constraint a_ref_fkey", "index a_n_idx", "constraint b_pkey" }, kinds)
    local missing = catalog.missing_on_target(src, tgt)
    local names = {}
    for _, item in ipairs(missing) do names[#names + 1] = item.kind .. " " .. item.name end
    assert.same({ "constraint a_email_key", "constraint a_n_check" }, names)

    assert(L.target:psql("drop index ver.a_n_other_name"))
    tgt = assert(catalog.constraints_and_indexes(target, tables))
    missing = catalog.missing_on_target(src, tgt)
    assert.equal(3, #missing)
    assert.equal("index", missing[3].kind)
    assert.equal("a_n_idx", missing[3].name)
    assert.same({}, catalog.missing_on_target(src, src))
  end)

  it("gives the separate unique indexes with SQL that drops and recreates them", function()
    assert(L.source:psql([[
      create schema uq;
      create table uq.t (id int primary key, a int, b int);
      alter table uq.t add constraint t_a_key unique (a);
      create unique index t_b_idx on uq.t (b);
      create table uq.r (id int primary key, t_a int references uq.t (a));
      create table uq.nopk (a int unique);  -- no PK: nothing to drop
    ]]))
    local list = assert(catalog.tables(source, { schemas = { "uq" } }))
    local items = assert(catalog.separate_unique_indexes(source, list))
    assert.equal(2, #items)
    local c, i = items[1], items[2]
    assert.same({ "constraint", "t_a_key", "uq.t" }, { c.kind, c.name, c.table })
    assert.equal('ALTER TABLE "uq"."t" DROP CONSTRAINT "t_a_key"', c.drop_sql)
    assert.equal('ALTER TABLE "uq"."t" ADD CONSTRAINT "t_a_key" UNIQUE (a)', c.create_sql)
    assert.equal(1, #c.referenced_by)
    assert.equal("r_t_a_fkey", c.referenced_by[1].name)
    assert.same({ "index", "t_b_idx" }, { i.kind, i.name })
    assert.equal('DROP INDEX "uq"."t_b_idx"', i.drop_sql)
    assert.equal("CREATE UNIQUE INDEX t_b_idx ON uq.t USING btree (b)", i.create_sql)
    assert.same({}, i.referenced_by)

    -- The SQL really drops and recreates them (on the target, as the playbook does).
    assert(L.target:psql([[
      create schema uq;
      create table uq.t (id int primary key, a int, b int);
      alter table uq.t add constraint t_a_key unique (a);
      create unique index t_b_idx on uq.t (b);
      create table uq.r (id int primary key, t_a int references uq.t (a));]]))
    local before = assert(catalog.constraints_and_indexes(target, list))
    for _, item in ipairs(items) do
      for _, ref in ipairs(item.referenced_by) do assert(target:write(ref.drop_sql)) end
      assert(target:write(item.drop_sql))
    end
    local after_drop = catalog.missing_on_target(before, assert(catalog.constraints_and_indexes(target, list)))
    assert.equal(3, #after_drop) -- the constraint, the index and the foreign key
    for _, item in ipairs(items) do
      assert(target:write(item.create_sql))
      for _, ref in ipairs(item.referenced_by) do assert(target:write(ref.create_sql)) end
    end
    assert.same({}, catalog.missing_on_target(before, assert(catalog.constraints_and_indexes(target, list))))
  end)
end)
