-- migrun.matviews on a real lab: materialized views arrive empty through a
-- pg_dump --schema-only restore and a load of their tables; refresh_all
-- populates them, equal to the source's, bases before what reads them,
-- CONCURRENTLY exactly where PostgreSQL allows it; a dry run runs nothing.
local lab = require "migrun.rehearsal.lab"
local schema = require "migrun.schema"
local matviews = require "migrun.matviews"
local db = require "migrun.db"
local pg = require "migrun.pg"

describe("migrun.matviews", function()
  local L, source, target, written
  local conns = {}

  local function connect(conninfo, name, opts)
    local c = assert(pg.connect(conninfo, { name = name }))
    c:on_notice(function() end)
    conns[#conns + 1] = c
    return db.wrap(c, opts)
  end
  local function with_password(c) return c.migrun_conninfo .. " password='" .. L.password .. "'" end

  local function keys(list)
    local out = {}
    for i, mv in ipairs(list) do out[i] = mv.key end
    return out
  end
  local function by_name(rows)
    local out = {}
    for _, r in ipairs(rows) do out[r.name] = r end
    return out
  end
  local function populated(cluster, name)
    return assert(cluster:psql(("select relispopulated from pg_class where oid = '%s'::regclass"):format(name)))
  end
  local function load_orders(from, to)
    assert(to:write("truncate shop.orders"))
    assert(to:copy_to(from, "COPY shop.orders TO STDOUT", "COPY shop.orders FROM STDIN"))
  end

  setup(function()
    -- the target role is RDS's (no superuser): the refresh runs as a member of the owner
    L = assert(lab.start{ password = "matviews-spec-s3cret" })
    assert(L.source:psql([[
      create role shop_owner nologin;
      create schema shop authorization shop_owner;
      set role shop_owner;
      create table shop.orders (id int primary key, customer text not null, total numeric(10,2) not null,
                                placed date not null);
      insert into shop.orders
        select g, 'customer ' || (g % 37), (g % 500) / 7.0, date '2024-01-01' + (g % 90) from generate_series(1, 3000) g;
      -- CONCURRENTLY allowed: a unique index on a plain column
      create materialized view shop.daily as
        select placed, count(*) as orders, sum(total) as revenue from shop.orders group by placed;
      create unique index daily_placed on shop.daily (placed);
      -- not allowed: the only unique indexes are on an expression and partial
      create materialized view shop.customers as
        select customer, count(*) as orders, sum(total) as spent from shop.orders group by customer;
      create unique index customers_lower on shop.customers (lower(customer));
      create unique index customers_big on shop.customers (customer) where spent > 1000;
      -- reads daily through a plain view: refreshed after it, though its name sorts first
      create view shop.busy_days as select * from shop.daily where orders > 30;
      create materialized view shop.busy_summary as
        select count(*) as days, coalesce(sum(orders), 0) as orders from shop.busy_days;
      create unique index busy_summary_days on shop.busy_summary (days);
      -- reads customers directly
      create materialized view shop.best_customers as
        select customer, spent from shop.customers order by spent desc, customer limit 10;
      create unique index best_customers_customer on shop.best_customers (customer);
      -- empty on the source: stays so
      create materialized view shop.archive as select * from shop.orders where placed < date '2024-02-01'
        with no data;
      reset role;
      -- migrun's own schema is never the user's
      create schema migrun;
      create materialized view migrun.own as select 1 as one;
    ]]))
    source = connect(L.source.conninfo, "source")
    written = {}
    target = connect(with_password(L.target), "target",
      { echo_writes = true, echo = function(line) written[#written + 1] = line end })
    -- the schema as full.lua copies it: roles, pre-data, the tables' rows, post-data
    local tools = assert(schema.tools(target.conn:server_version()))
    local dump = assert(schema.dump(L.source.conninfo, L.dir .. "/state", { tools = tools, schemas = { "shop" } }))
    assert(schema.copy_roles(L.source.conninfo, target, { tools = tools, schemas = { "shop" } }))
    assert(schema.restore("pre-data", with_password(L.target), dump, {}))
    load_orders(source, target)
    assert(schema.restore("post-data", with_password(L.target), dump, {}))
  end)

  teardown(function()
    for _, c in ipairs(conns) do c:close() end
    if L then L:stop() end
  end)

  it("lists them in dependency order with their state on the source", function()
    local list = assert(matviews.list(source))
    assert.same({ "shop.archive", "shop.customers", "shop.best_customers", "shop.daily", "shop.busy_summary" },
      keys(list))
    local mv = {}
    for _, m in ipairs(list) do mv[m.key] = m end
    assert.equal("daily_placed", mv["shop.daily"].unique_index)
    assert.is_nil(mv["shop.customers"].unique_index) -- an expression and a partial index do not count
    assert.same({ "shop.daily" }, mv["shop.busy_summary"].depends_on)
    assert.same({ "shop.customers" }, mv["shop.best_customers"].depends_on)
    assert.is_false(mv["shop.archive"].populated)
    assert.is_true(mv["shop.daily"].populated)
    assert.equal("shop_owner", mv["shop.daily"].owner)
    assert.truthy(mv["shop.daily"].bytes > 0)
    assert.same({ "shop.customers", "shop.best_customers", "shop.daily", "shop.busy_summary" },
      keys(assert(matviews.list(source, { schemas = { "shop" }, exclude = { "shop.archive" } }))))
    assert.same({}, keys(assert(matviews.list(source, { schemas = { "public" } }))))
  end)

  it("finds them unpopulated on the target after the schema-only restore and the load", function()
    for _, name in ipairs{ "shop.daily", "shop.customers", "shop.busy_summary", "shop.best_customers", "shop.archive" } do
      assert.equal("f", populated(L.target, name), name)
    end
    local res, err = target:query("select count(*) from shop.daily")
    assert.is_nil(res)
    assert.equal("55000", err.code)
    -- the unique indexes came with the post-data section
    assert.equal("1", L.target:psql("select count(*) from pg_indexes where indexname = 'daily_placed'"))
  end)

  it("runs nothing in a dry run, printing each REFRESH", function()
    local printed = {}
    local dry = connect(with_password(L.target), "target",
      { dry_run = true, echo = function(line) printed[#printed + 1] = line end })
    local r = assert(matviews.refresh_all(dry, assert(matviews.list(source))))
    assert.same({
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"customers\"",
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"best_customers\"",
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"daily\"",
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"busy_summary\"",
    }, printed)
    for _, row in ipairs(r.rows) do
      assert.is_nil(row.seconds, row.name)
      assert.is_nil(row.rows, row.name)
    end
    for _, name in ipairs{ "shop.daily", "shop.customers", "shop.busy_summary", "shop.best_customers" } do
      assert.equal("f", populated(L.target, name), name)
    end
  end)

  it("populates them after the load (plain REFRESH: none is populated yet), equal to the source's", function()
    local list = assert(matviews.list(source))
    written = {}
    local said = {}
    local r = assert(matviews.refresh_all(target, list, { say = function(l) said[#said + 1] = l end }))
    assert.same({
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"customers\"",
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"best_customers\"",
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"daily\"",
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"busy_summary\"",
    }, written)
    local order = {}
    for i, row in ipairs(r.rows) do order[i] = row.name end
    assert.same({ "shop.archive", "shop.customers", "shop.best_customers", "shop.daily", "shop.busy_summary" }, order)
    local rows = by_name(r.rows)
    assert.equal("unpopulated", rows["shop.archive"].mode)
    assert.equal("plain", rows["shop.daily"].mode)
    assert.equal(90, rows["shop.daily"].rows)
    assert.equal(37, rows["shop.customers"].rows)
    assert.truthy(rows["shop.daily"].seconds >= 0)
    assert.same({ refreshed = 4, plain = 4, concurrently = 0, unpopulated = 1 },
      { refreshed = r.refreshed, plain = r.plain, concurrently = r.concurrently, unpopulated = r.unpopulated })
    assert.truthy(r.seconds >= rows["shop.daily"].seconds)
    assert.equal(5, #said)
    for _, mv in ipairs(list) do
      local c = assert(matviews.compare(source, target, mv))
      assert.is_true(c.equal, mv.key .. ": " .. tostring(c.detail))
    end
    assert.equal("f", populated(L.target, "shop.archive"))
  end)

  it("refreshes again at cutover: CONCURRENTLY exactly where a usable unique index allows", function()
    -- what CDC and the application did since: new orders on both sides, the
    -- source's views refreshed by the application
    assert(L.source:psql([[
      insert into shop.orders
        select g, 'customer ' || (g % 41), (g % 300) / 3.0, date '2024-03-01' + (g % 60) from generate_series(3001, 4000) g;
      refresh materialized view shop.customers; refresh materialized view shop.best_customers;
      refresh materialized view shop.daily; refresh materialized view shop.busy_summary;]]))
    load_orders(source, target)
    local list = assert(matviews.list(source))
    local stale = assert(matviews.compare(source, target, list[4]))
    assert.is_false(stale.equal)
    assert.truthy(stale.detail:find("refreshed before its tables last changed", 1, true), stale.detail)

    written = {}
    local r = assert(matviews.refresh_all(target, list))
    assert.same({
      "target: REFRESH MATERIALIZED VIEW \"shop\".\"customers\"",
      "target: REFRESH MATERIALIZED VIEW CONCURRENTLY \"shop\".\"best_customers\"",
      "target: REFRESH MATERIALIZED VIEW CONCURRENTLY \"shop\".\"daily\"",
      "target: REFRESH MATERIALIZED VIEW CONCURRENTLY \"shop\".\"busy_summary\"",
    }, written)
    assert.same({ refreshed = 4, plain = 1, concurrently = 3, unpopulated = 1 },
      { refreshed = r.refreshed, plain = r.plain, concurrently = r.concurrently, unpopulated = r.unpopulated })
    for _, mv in ipairs(list) do
      local c = assert(matviews.compare(source, target, mv))
      assert.is_true(c.equal, mv.key .. ": " .. tostring(c.detail))
    end
    local line = matviews.checklist_line(list, r)
    assert.truthy(line:find("4 (3 CONCURRENTLY, 1 plain)", 1, true), line)
    assert.truthy(line:find("readers wait during the refresh of shop.customers", 1, true), line)
    assert.truthy(line:find("1 left unpopulated as on the source (shop.archive)", 1, true), line)
    assert.truthy(line:find("of the cutover window", 1, true), line)
    local compared = {}
    for i, mv in ipairs(list) do compared[i] = assert(matviews.compare(source, target, mv)) end
    local shown = matviews.compare_rows(compared)
    assert.same({ "shop.archive", "unpopulated", "unpopulated", "yes", "not populated on either (WITH NO DATA)" }, shown[1])
    assert.same({ "shop.daily", "120", "120", "yes", "" }, shown[4]) -- 90 days, then 30 more
  end)

  it("empties one the source holds WITH NO DATA, and says what was done when one fails", function()
    assert(target:write("refresh materialized view shop.archive"))
    local list = assert(matviews.list(source))
    local c = assert(matviews.compare(source, target, list[1]))
    assert.is_false(c.equal)
    assert.equal("populated on the target only", c.detail)
    written = {}
    local r = assert(matviews.refresh_all(target, list))
    assert.equal("with no data", r.rows[1].mode)
    assert.same("target: REFRESH MATERIALIZED VIEW \"shop\".\"archive\" WITH NO DATA", written[1])
    assert.equal("f", populated(L.target, "shop.archive"))
    assert.is_true(assert(matviews.compare(source, target, list[1])).equal)

    assert(L.target:psql("drop materialized view shop.busy_summary"))
    local ok, err = matviews.refresh_all(target, list)
    assert.is_nil(ok)
    assert.equal("matviews", err.kind)
    assert.truthy(err.message:find("shop.busy_summary is not on the target", 1, true), tostring(err))
    assert.equal("done before it: shop.archive, shop.customers, shop.best_customers, shop.daily; "
      .. "not done: shop.busy_summary", err.detail)
  end)

  it("names them for preflight and the checklist", function()
    local list = assert(matviews.list(source, { schemas = { "shop" } }))
    local f = matviews.preflight(list)
    assert.equal("warning", f.severity)
    assert.truthy(f.message:find("^5 materialized view%(s%): refreshed after the load and at cutover; "
      .. "1 without a unique index %(plain REFRESH at cutover: locks readers out, takes as long as rebuilding "
      .. "[%d.]+ %a+: shop.customers%); 1 WITH NO DATA on the source, left unpopulated: shop.archive$"), f.message)
    local without = {}
    for _, mv in ipairs(list) do if mv.key ~= "shop.customers" then without[#without + 1] = mv end end
    assert.equal("note", matviews.preflight(without).severity)
    assert.is_nil(matviews.preflight({}))
    assert.equal("No materialized views to refresh.", matviews.checklist_line({}))
  end)

  it("raises on misuse", function()
    assert.has_error(function() matviews.list(nil) end)
    assert.has_error(function() matviews.refresh_all(target, nil) end)
    assert.has_error(function() matviews.refresh(target, { key = "x" }) end)
  end)
end)
