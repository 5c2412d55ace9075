-- migrun.groups: the slot-group plan (pure functions, no lab); the groups it
-- makes are checked against migrun.dms.builders.
local groups = require "migrun.groups"
local builders = require "migrun.dms.builders"

local MB = 2 ^ 20

-- A catalog-shaped table.
local function T(key, mb, opts)
  opts = opts or {}
  local schema, name = key:match("^(.-)%.(.+)$")
  local lobs = {}
  for i, c in ipairs(opts.lobs or {}) do lobs[i] = { name = c, type = "jsonb" } end
  return { schema = schema, name = name, bytes = math.floor(mb * MB),
           has_pk = opts.pk ~= false, separate_unique = opts.unique or false,
           lob_columns = lobs, lob_max_kb = opts.lob_kb }
end

local function keys(g)
  local out = {}
  for i, t in ipairs(g.tables) do out[i] = t.schema .. "." .. t.name end
  return out
end

local function sample_tables()
  return {
    T("public.small1", 1), T("public.events", 5000, { lobs = { "payload" }, lob_kb = 300 }),
    T("public.orders", 900), T("public.users", 300, { unique = true }),
    T("public.log", 50, { pk = false }), T("public.accounts", 20, { unique = true }),
    T("public.items", 700), T("public.small2", 2, { lobs = { "note" }, lob_kb = 3 }),
  }
end

describe("migrun.groups", function()
  it("by default: the N largest alone, PK+unique together, the rest packed", function()
    local plan = assert(groups.plan(sample_tables(), { largest_alone = 2 }))
    assert.equal(4, #plan)
    assert.same({ "dms_slot_01", "dms_slot_02", "dms_slot_03", "dms_slot_04" },
      { plan[1].slot, plan[2].slot, plan[3].slot, plan[4].slot })
    assert.same({ "public.events" }, keys(plan[1]))
    assert.same({ "public.orders" }, keys(plan[2]))
    assert.equal("largest", plan[1].reason)
    assert.same({ "public.users", "public.accounts" }, keys(plan[3]))
    assert.equal("pk+unique", plan[3].reason)
    assert.same({ "public.items", "public.log", "public.small2", "public.small1" }, keys(plan[4]))
    assert.equal("rest", plan[4].reason)
    assert.equal(math.floor(700 * MB) + 50 * MB + 2 * MB + 1 * MB, plan[4].bytes)
    assert.is_true(plan[3].tables[1].has_separate_unique)
    assert.is_false(plan[4].tables[2].has_pk)
    assert.equal(plan[1].slot, plan[1].name)
    -- the warning about the table without a PK is on its group
    assert.equal(1, #plan[4].warnings)
    assert.matches("public.log has no primary key", plan[4].warnings[1])
    for _, g in ipairs(plan) do
      assert.is_true(#g.tables > 0)
      builders.replication_task(g, { name = "app", source_endpoint_arn = "arn:s", target_endpoint_arn = "arn:t",
        replication_instance_arn = "arn:r", start_lsn = "0/16B3748" })
    end
  end)

  it("a big PK+unique table among the largest goes alone; no empty groups", function()
    local plan = assert(groups.plan({ T("a.big", 100, { unique = true }), T("a.small", 1) }, { largest_alone = 5 }))
    assert.equal(2, #plan)
    assert.same({ "largest", "largest" }, { plan[1].reason, plan[2].reason })
    assert.same({}, assert(groups.plan({}, {})))
    plan = assert(groups.plan({ T("a.x", 3), T("a.y", 2) }, { largest_alone = 0 }))
    assert.equal(1, #plan)
    assert.equal("rest", plan[1].reason)
  end)

  it("explicit groups come first and override the policy", function()
    local plan = assert(groups.plan(sample_tables(), { largest_alone = 1, prefix = "mig_",
      explicit = { { name = "billing", tables = { "public.accounts", "public.small1" } },
                   { name = "big events", tables = { "public.events" } } } }))
    assert.same({ "billing", "big events" }, { plan[1].label, plan[2].label })
    assert.same({ "explicit", "explicit" }, { plan[1].reason, plan[2].reason })
    assert.same({ "public.accounts", "public.small1" }, keys(plan[1]))
    assert.same({ "mig_01", "mig_02", "mig_03", "mig_04", "mig_05" },
      { plan[1].slot, plan[2].slot, plan[3].slot, plan[4].slot, plan[5].slot })
    assert.same({ "public.orders" }, keys(plan[3]))   -- largest of what remains
    assert.same({ "public.users" }, keys(plan[4]))    -- accounts went to billing
    assert.same({ "public.items", "public.log", "public.small2" }, keys(plan[5]))
  end)

  it("refuses unknown tables and tables in two explicit groups, naming them", function()
    local plan, err = groups.plan(sample_tables(), { explicit = { { name = "g", tables = { "public.nope" } } } })
    assert.is_nil(plan)
    assert.equal("config", err.kind)
    assert.matches('explicit group "g": table public.nope is not among the tables to migrate', tostring(err))
    plan, err = groups.plan(sample_tables(), { explicit = {
      { name = "one", tables = { "public.orders" } }, { name = "two", tables = { "public.items", "public.orders" } } } })
    assert.is_nil(plan)
    assert.matches('table public.orders is in two explicit groups: "one" and "two"', tostring(err))
    plan, err = groups.plan(sample_tables(), { explicit = { { name = "empty", tables = {} } } })
    assert.is_nil(plan)
    assert.matches('explicit group "empty" has no tables', tostring(err))
  end)

  it("applies the LOB policy: per-table override as is, default raised to the measured size", function()
    local lobs = { default = { max_kb = 32, truncation_ok = true },
                   tables = { ["public.events"] = { max_kb = 128, truncation_ok = false } } }
    local plan = assert(groups.plan(sample_tables(), { largest_alone = 0, lobs = lobs }))
    local by = {}
    for _, g in ipairs(plan) do for _, t in ipairs(g.tables) do by[t.schema .. "." .. t.name] = t end end
    assert.same({ "payload" }, by["public.events"].lob_columns)
    assert.equal(128, by["public.events"].lob_max_kb)      -- configured, though 300 KB measured
    assert.is_false(by["public.events"].lob_truncation_ok)
    -- default: a margin over the measured 3 KB, max(2 x 3 KB, 3 KB + 1 MiB)
    assert.equal(1027, by["public.small2"].lob_max_kb)
    assert.is_true(by["public.small2"].lob_truncation_ok)
    assert.is_nil(by["public.orders"].lob_max_kb)          -- no LOB columns
    assert.same({}, by["public.orders"].lob_columns)
    local warned = false
    for _, g in ipairs(plan) do
      for _, w in ipairs(g.warnings) do
        if w:match("public.events: largest LOB measured 300 KB, above its configured max_kb 128") then warned = true end
      end
    end
    assert.is_true(warned)

    plan = assert(groups.plan(sample_tables(), { largest_alone = 1, lobs = { default = { max_kb = 64 } } }))
    assert.equal(300 + 1024, plan[1].tables[1].lob_max_kb)  -- raised above the measured largest LOB
    assert.is_true(plan[1].tables[1].lob_truncation_ok)
    plan = assert(groups.plan({ T("a.x", 1, { lobs = { "d" } }) }, {}))
    assert.equal(32, plan[1].tables[1].lob_max_kb)          -- unmeasured: DMS's default
  end)

  it("makes slot names PostgreSQL accepts, and refuses a prefix it would not", function()
    local plan = assert(groups.plan({ T("a.x", 1) }, { prefix = "app_2026_" }))
    assert.equal("app_2026_01", plan[1].slot)
    assert.error_matches(function() groups.plan({ T("a.x", 1) }, { prefix = "DMS-slot" }) end,
      "lowercase letters, digits and underscores")
    assert.error_matches(function() groups.plan({ T("a.x", 1) }, { prefix = ("s"):rep(62) }) end,
      "longer than 63 bytes")
    local many = {}
    for i = 1, 12 do many[i] = T("a.t" .. i, i) end
    plan = assert(groups.plan(many, { largest_alone = 11 }))
    assert.equal("dms_slot_12", plan[12].slot)
  end)

  it("prints the plan as an aligned table with warnings", function()
    local plan = assert(groups.plan(sample_tables(), { largest_alone = 2,
      explicit = { { name = "billing", tables = { "public.small1" } } } }))
    local text = groups.format(plan)
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.matches("^slot%s+size%s+reason%s+batch apply%s+tables$", lines[1])
    assert.matches("^dms_slot_01  1%.0 MiB%s+explicit %(billing%)  on%s+1: public%.small1$", lines[2])
    assert.matches("^dms_slot_02  4%.9 GiB%s+largest%s+on%s+1: public%.events$", lines[3])
    assert.matches("^dms_slot_04  320%.0 MiB%s+pk%+unique%s+off%s+2: public%.users, public%.accounts$", lines[5])
    assert.matches("^dms_slot_05  752%.0 MiB%s+rest%s+on%s+3: public%.items, public%.log, public%.small2$", lines[6])
    -- columns line up
    assert.equal(lines[2]:find("1%.0 MiB"), lines[3]:find("4%.9 GiB"))
    assert.equal("5 groups, 8 tables, 6.8 GiB", lines[7])
    assert.matches("^batch apply off", lines[8])
    assert.equal("  dms_slot_04: primary key and separate unique constraint: public.users, public.accounts", lines[9])
    assert.equal("warnings:", lines[10])
    assert.matches("dms_slot_05: public.log has no primary key: only its inserts replicate, its updates and deletes will not",
      lines[11], 1, true)
  end)

  it("leaves a margin over the largest LOB measured: max(2 x largest, largest + 1 MiB), in whole KB", function()
    -- the issue's case: 200,012 bytes measured; the old limit (196 KB, 200,704 bytes) cut a value
    -- that grew by 1 KB during CDC
    local kb = groups.lob_limit_kb(200012)
    assert.equal(math.ceil((200012 + 1048576) / 1024), kb)
    assert.is_true(kb * 1024 >= 200012 + 1024)
    assert.equal(4 * 1024, groups.lob_limit_kb(2 * 1048576))     -- 2 MiB: twice it
    assert.equal(1024, groups.lob_limit_kb(0))
    assert.equal(builders.MAX_LOB_MAX_KB, groups.lob_limit_kb(80 * 1048576)) -- DMS's largest
    local t = T("a.doc", 1, { lobs = { "body" }, lob_kb = 196 })
    t.lob_max_bytes = 200012
    local plan = assert(groups.plan({ t }, {}))
    assert.equal(kb, plan[1].tables[1].lob_max_kb)
  end)

  it("switches batch apply off for a group with a full-LOB-mode table, and says so", function()
    local lobs = { tables = { ["public.events"] = { max_kb = 128, truncation_ok = false } } }
    local plan = assert(groups.plan(sample_tables(), { largest_alone = 1, lobs = lobs }))
    assert.same({ "public.events" }, keys(plan[1]))
    assert.equal("full LOB mode: public.events", plan[1].batch_note)
    local on = builders.batch_apply(plan[1])
    assert.is_false(on)
    assert.is_false(builders.task_settings(plan[1]).TargetMetadata.BatchApplyEnabled)
    assert.is_nil(plan[#plan].batch_note)                   -- the rest: batch apply on
    assert.truthy(groups.format(plan):find("dms_slot_01: full LOB mode: public.events", 1, true))
    -- forced on by the config: refused before anything exists, naming the table
    local p2, err = groups.plan(sample_tables(), { largest_alone = 1, lobs = lobs, batch_apply = true })
    assert.is_nil(p2)
    assert.equal("config", err.kind)
    assert.matches("batch apply was asked for %(dms%.task%.batch_apply = true%).*full LOB mode: public%.events",
      tostring(err))
    -- forced off is always allowed
    plan = assert(groups.plan(sample_tables(), { largest_alone = 1, lobs = lobs, batch_apply = false }))
    assert.equal("configured", plan[#plan].batch_note)
  end)
end)
