-- A schema nobody here designed around (migrun.rehearsal.store: an online
-- store with a booking side: domains, enums, every kind of array, full-text
-- columns kept by triggers, partitions, a view, a function, materialized
-- views, sequences no column owns, a keyless table without any timestamp
-- column), a default configuration (no `schemas`), and a workload that
-- writes every table from before full.lua until cutover.lua makes the source
-- read-only. A row changed on the target behind DMS's back (where not even
-- the sentinel sees it) is named by key by the live verification and mended
-- by repair.lua; READY is reached under writes; the cutover completes; every
-- table, array and materialized view is equal.
local H = require "helpers.rehearsal"

describe("a store under writes that never stop, migrated with a default configuration", function()
  local R

  setup(function()
    R = H.rehearsal("e2e-store", { sample = "migrun.rehearsal.store", config = { cutover = {
      stop_writes = "read_only", existing_sessions = "terminate", sessions_timeout = 30, apply_timeout = 300 } } })
  end)
  teardown(function() if R then R:close() end end)

  local function sql(cluster, q, ...)
    local c = H.connect(cluster, "test")
    local res = assert(c:exec(q, ...))
    local rows = {}
    for r in res:rows() do rows[#rows + 1] = r end
    c:close()
    return rows
  end
  local function text_of(cluster, q)
    local out = {}
    for _, r in ipairs(sql(cluster, q)) do out[#out + 1] = r.x end
    return table.concat(out, "\n")
  end

  it("reaches READY and cuts over, every table equal, a difference named and repaired on the way", function()
    assert.is_nil(R.config.schemas)
    R:start_workload{ rate = 25 }

    -- up to the live verification, then a row changed on the target where the sentinel does not look
    local first = H.run(R, "full.lua", { "--yes" }, { kill_when = "catch_up: Watch" })
    assert.is_true(first.killed, first.output)
    sql(R.lab.target, "set session_replication_role = replica; update products set title = 'changed on the target' "
      .. "where sku = 'sku-7'")
    local found = H.run(R, "full.lua", { "--yes" })
    assert.falsy(found.ok, found.output)
    assert.truthy(found.output:find("public.products: sku sku-7 differs (1 key)", 1, true), found.output)
    assert.truthy(found.output:find("playbooks/repair.lua", 1, true), found.output)
    -- no difference that is only changes in flight
    assert.falsy(found.output:find("public.orders:", 1, true), found.output)

    -- the repair shown first: every statement, nothing changed
    local shown = H.run(R, "repair.lua", { "--dry-run" })
    assert.is_true(shown.ok, shown.output)
    assert.truthy(shown.output:find("would ask: replace 1 row(s) on the target with the source's: public.products (1)",
      1, true), shown.output)
    assert.truthy(shown.output:find('delete from "public"."products" where "sku" in', 1, true), shown.output)
    assert.truthy(shown.output:find("jsonb_populate_recordset", 1, true), shown.output)
    assert.equal("changed on the target", sql(R.lab.target, "select title from products where sku = 'sku-7'")[1].title)
    local mended = H.run(R, "repair.lua", { "--yes" })
    assert.is_true(mended.ok, mended.output)
    assert.truthy(mended.output:find("public.products: 1 key(s): 1 row(s) deleted on the target, 1 copied again",
      1, true), mended.output)
    assert.truthy(mended.output:find("repaired: every table verified equal again", 1, true), mended.output)

    local full = H.run(R, "full.lua", { "--yes" })
    assert.is_true(full.ok, full.output)
    assert.truthy(full.output:find("READY FOR CUTOVER", 1, true), full.output)
    -- migrun's own objects are not the user's drift (no `schemas`: the guard watches every schema)
    assert.falsy(full.output:find("schema drift", 1, true), full.output)

    local c = H.run(R, "cutover.lua", { "--yes" })
    assert.is_true(c.ok, c.output)
    local workload = R:stop_workload()
    assert.truthy(workload:find("writes refused", 1, true), workload)
    assert.truthy(c.output:find("the cutover window: ", 1, true), c.output)

    -- the source's materialized views as the application would refresh them now (its database is read-only)
    sql(R.lab.source, "begin read write; refresh materialized view daily_sales; refresh materialized view top_products; commit")
    local diffs = H.differences(R)
    assert.equal(0, #diffs, H.describe_diffs(diffs))
    -- arrays as they were ('{}' empty, NULL elements, 2-D, jsonb[]), compared as text
    for _, q in ipairs{
      "select sku || ' ' || category_ids::text || ' ' || coalesce(dims::text, '-') as x from products order by sku",
      "select id || ' ' || tags::text as x from customers order by id",
      "select id || ' ' || coalesce(notes::text, '-') as x from orders order by id",
      "select id || ' ' || amenities::text || ' ' || features::text || ' ' || coalesce(beds::text, '-') as x "
        .. "from booking.rooms order by id",
      "select id || ' ' || coalesce(labels::text, '-') as x from events order by id",
      -- the materialized views populated as the source's
      "select day || ' ' || orders || ' ' || revenue as x from daily_sales order by day",
      "select sku || ' ' || sold as x from top_products order by sku",
    } do
      assert.equal(text_of(R.lab.source, q), text_of(R.lab.target, q), q)
    end
    assert.truthy(text_of(R.lab.target, "select count(*) as x from customers where tags = '{}'") ~= "0")
  end)
end)
