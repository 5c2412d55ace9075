-- migrun.repair's plan, without a server: the differences a verification
-- named by key become rows to copy again; a table without a key is refused,
-- with its group's partial restart as what to do instead. (The repair itself
-- runs in e2e_store_spec: named by key, shown in a dry run, mended, verified.)
local repair = require "migrun.repair"

describe("migrun.repair.plan", function()
  local groups = { { slot = "dms_slot_01", tables = { { schema = "public", name = "orders" } } },
                   { slot = "dms_slot_02", tables = { { schema = "public", name = "audit_log" } } } }

  it("takes every key a difference names", function()
    local key = { columns = { "id" }, types = { "bigint" }, integer = true }
    local p = repair.plan({ { table = "public.orders", key = key, complete = true,
      keys = { { key = "[7]", what = "differs" }, { key = "[9]", what = "only in a" } } } }, groups)
    assert.equal(1, #p.tables)
    assert.same({ "[7]", "[9]" }, p.tables[1].keys)
    assert.equal(2, p.rows)
    assert.same({}, p.refused)
  end)

  it("refuses a table without a key, naming its group's partial restart", function()
    local p = repair.plan({ { table = "public.audit_log", detail = "5 vs 4 rows", complete = true } }, groups)
    assert.equal(0, #p.tables)
    assert.equal(1, #p.refused)
    assert.equal("public.audit_log", p.refused[1].table)
    assert.matches("no primary or unique key", p.refused[1].why)
    assert.equal("restart its group: migrun playbooks/partial_restart.lua dms_slot_02", p.refused[1].what_to_do)
  end)

  it("misuse raises", function()
    assert.has_error(function() repair.plan(nil, groups) end)
  end)
end)
