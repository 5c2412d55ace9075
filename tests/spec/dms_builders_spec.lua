-- migrun.dms.builders against the runbook's example documents (Phase II steps 2-3).
local builders = require "migrun.dms.builders"
local json = require "migrun.json"

local root = os.getenv("MIGRUN_SOURCE_DIR") or "."
local function fixture(name)
  local f = assert(io.open(root .. "/tests/fixtures/dms/" .. name))
  local s = f:read("a")
  f:close()
  return s
end

-- The runbook's sample replication set: three tables, the first with LOBs that
-- must not be truncated.
local function runbook_group()
  return {
    name = "dms_slot_01", slot = "dms_slot_01", lob_max_kb = 132,
    tables = {
      { schema = "public", name = "some_table_001", has_pk = true, lob_columns = { "payload" },
        lob_max_kb = 1200, lob_truncation_ok = false },
      { schema = "public", name = "some_table_002", has_pk = true, has_separate_unique = true },
      { schema = "public", name = "some_table_003", has_pk = true, lob_columns = { "doc" },
        lob_max_kb = 325, lob_truncation_ok = true },
    },
  }
end

describe("dms builders", function()
  it("gives the source endpoint the runbook's extra connection attributes", function()
    local p = builders.source_endpoint(runbook_group(), { host = "10.0.1.25", port = 5432,
      dbname = "appdb", user = "dms_user", password = "secret", ssl_mode = "require" })
    assert.are.equal((fixture("runbook_source_eca.txt"):gsub("\n$", "")), p.ExtraConnectionAttributes)
    assert.are.same({ PluginName = "pglogical", SlotName = "dms_slot_01" }, p.PostgreSQLSettings)
    assert.are.equal("dms-slot-01-source", p.EndpointIdentifier)
    assert.are.equal("source", p.EndpointType)
    assert.are.equal("postgres", p.EngineName)
    assert.are.equal(5432, p.Port)
    assert.is_true(math.type(p.Port) == "integer")
    local t = builders.target_endpoint{ host = "rds.example", dbname = "appdb", user = "u", password = "p" }
    assert.are.equal("target", t.EndpointType)
    assert.is_nil(t.ExtraConnectionAttributes)
  end)

  it("builds the runbook's table mappings", function()
    local expected = assert(json.decode(fixture("runbook_table_mappings.json")))
    local doc = builders.table_mappings(runbook_group(), { first_rule_id = 348698101 })
    local got = assert(json.decode(builders.encode(doc)))
    -- the runbook's table-settings rule-id is an arbitrary number; ours continues the sequence
    assert.are.equal("348698104", got.rules[4]["rule-id"])
    got.rules[4]["rule-id"] = expected.rules[4]["rule-id"]
    -- where migrun differs from the runbook on purpose: its selection rules name
    -- "some_table_001", a pattern that also selects "someXtable_001"; ours
    -- escape DMS's wildcards so that each rule selects its own table only
    for _, r in ipairs(expected.rules) do
      if r["rule-type"] == "selection" then
        local loc = r["object-locator"]
        loc["schema-name"], loc["table-name"] = builders.literal_pattern(loc["schema-name"]),
          builders.literal_pattern(loc["table-name"])
      end
    end
    assert.are.equal("some[_]table[_]001", got.rules[1]["object-locator"]["table-name"])
    assert.are.same(expected, got)
    -- empty filters stay arrays
    assert.truthy(builders.encode(doc):find('"filters":[]', 1, true))
  end)

  it("numbers rules deterministically from 1 and names clashing LOB rules by schema", function()
    local g = { name = "g", slot = "s", tables = {
      { schema = "a", name = "t", lob_max_kb = 10, lob_truncation_ok = false },
      { schema = "b", name = "t", lob_max_kb = 10, lob_truncation_ok = false },
    } }
    local doc = builders.table_mappings(g)
    local ids, names = {}, {}
    for i, r in ipairs(doc.rules) do ids[i] = r["rule-id"]; names[i] = r["rule-name"] end
    assert.are.same({ "1", "2", "3", "4" }, ids)
    assert.are.same({ "1", "2", "a-t-lob", "b-t-lob" }, names)
    assert.are.equal(builders.encode(doc), builders.encode(builders.table_mappings(g)))
    assert.has_error(function()
      builders.table_mappings{ name = "g", slot = "s", tables = { { schema = "a", name = "t" }, { schema = "a", name = "t" } } }
    end)
  end)

  it("makes CDC-only task settings per the runbook", function()
    local s = builders.task_settings(runbook_group(), { control_schema = "dms_control" })
    assert.are.equal("DO_NOTHING", s.FullLoadSettings.TargetTablePrepMode)
    assert.is_true(s.TargetMetadata.TaskRecoveryTableEnabled)
    assert.is_true(s.TargetMetadata.LimitedSizeLobMode)
    assert.is_false(s.TargetMetadata.FullLobMode)
    assert.are.equal(132, s.TargetMetadata.LobMaxSize)
    assert.is_false(s.TargetMetadata.BatchApplyEnabled) -- some_table_002 has PK + unique
    local c = s.ControlTablesSettings
    assert.are.equal("dms_control", c.ControlSchema)
    assert.is_true(c.StatusTableEnabled and c.HistoryTableEnabled and c.SuspendedTablesTableEnabled)
    assert.is_true(s.Logging.EnableLogging)
    assert.are.equal(#builders.LOG_COMPONENTS, #s.Logging.LogComponents)
    assert.is_nil(s.Logging.CloudWatchLogGroup)
  end)

  it("turns batch apply on only for groups without PK + separate unique tables nor full LOB mode", function()
    local g = runbook_group()
    g.tables[2].has_separate_unique = false
    g.lob_max_kb = nil
    -- some_table_001 is in full LOB mode: DMS batch-applies LOBs only in limited LOB mode
    assert.is_false(builders.task_settings(g).TargetMetadata.BatchApplyEnabled)
    assert.equal("full LOB mode: public.some_table_001", builders.transactional_reason(g))
    g.tables[1].lob_truncation_ok = true
    local s = builders.task_settings(g)
    assert.is_true(s.TargetMetadata.BatchApplyEnabled)
    assert.are.equal(1200, s.TargetMetadata.LobMaxSize) -- largest table LOB
    assert.are.equal("public", s.ControlTablesSettings.ControlSchema)
    g.batch_apply = false
    assert.is_false(builders.task_settings(g).TargetMetadata.BatchApplyEnabled)
    local plain = builders.task_settings{ name = "p", slot = "p", tables = { { schema = "s", name = "x" } } }
    assert.are.equal(builders.DEFAULT_LOB_MAX_KB, plain.TargetMetadata.LobMaxSize)
    assert.has_error(function()
      builders.task_settings{ name = "p", slot = "p", lob_max_kb = 200000, tables = { { schema = "s", name = "x" } } }
    end)
  end)

  it("builds CreateReplicationTask parameters with documents as canonical JSON strings", function()
    local opts = { source_endpoint_arn = "arn:src", target_endpoint_arn = "arn:tgt",
      replication_instance_arn = "arn:rep", cdc_start_position = "4AF/B00000D0" }
    local p = builders.replication_task(runbook_group(), opts)
    assert.are.equal("cdc", p.MigrationType)
    assert.are.equal("dms-slot-01-cdc", p.ReplicationTaskIdentifier)
    assert.are.equal("4AF/B00000D0", p.CdcStartPosition)
    assert.are.same(builders.table_mappings(runbook_group()), json.decode(p.TableMappings))
    assert.are.equal(p.ReplicationTaskSettings, builders.replication_task(runbook_group(), opts).ReplicationTaskSettings)
    -- compared with the golden document byte for byte
    assert.are.equal(fixture("runbook_group_task_settings.json"),
      builders.encode(json.decode(p.ReplicationTaskSettings), "  ") .. "\n")
  end)
end)

describe("dms builders obey DMS's rules", function()
  local opts = { source_endpoint_arn = "arn:src", target_endpoint_arn = "arn:tgt",
    replication_instance_arn = "arn:rep", cdc_start_position = "4AF/B00000D0" }

  it("never sends batch apply with a full-LOB-mode table", function()
    -- only a full-LOB-mode table: batch apply would otherwise be on
    local g = { name = "g", slot = "g", tables = {
      { schema = "public", name = "docs", has_pk = true, lob_columns = { "body" }, lob_max_kb = 10,
        lob_truncation_ok = false },
      { schema = "public", name = "plain", has_pk = true } } }
    local p = builders.replication_task(g, opts)
    local settings = json.decode(p.ReplicationTaskSettings)
    local rules = json.decode(p.TableMappings).rules
    assert.equal("unlimited", rules[3]["lob-settings"].mode)
    assert.is_false(settings.TargetMetadata.BatchApplyEnabled)
    local on, why = builders.batch_apply(g)
    assert.is_false(on)
    assert.equal("full LOB mode: public.docs", why)
    -- forced on: the builders refuse to write the document DMS would refuse
    g.batch_apply = true
    assert.matches("batch apply was asked for.*full LOB mode: public%.docs", builders.check(g))
    assert.error_matches(function() builders.task_settings(g) end, "full LOB mode: public%.docs")
    -- and on a target table with a primary key and a separate unique constraint
    local u = { name = "u", slot = "u", batch_apply = true,
      tables = { { schema = "public", name = "acc", has_pk = true, has_separate_unique = true } } }
    assert.matches("primary key and separate unique constraint: public%.acc", builders.check(u))
    u.batch_apply = nil
    assert.is_nil(builders.check(u))
  end)

  it("puts a PostgreSQL table in full LOB mode with bulk-max-size 0, not combination mode", function()
    local rules = builders.table_mappings(runbook_group()).rules
    local lob = rules[4]["lob-settings"]
    assert.same({ mode = "unlimited", ["bulk-max-size"] = "0" }, lob)
    assert.equal("table-settings", rules[4]["rule-type"])
  end)

  it("names an exact schema and table in table-settings rules, and refuses %", function()
    local g = { name = "g", slot = "g", tables = {
      { schema = "public", name = "odd%name", has_pk = true, lob_max_kb = 1, lob_truncation_ok = false } } }
    assert.error_matches(function() builders.table_mappings(g) end,
      "table public%.odd%%name: DMS table%-settings rules need an exact schema and table name and refuse %%")
    for _, r in ipairs(builders.table_mappings(runbook_group()).rules) do
      if r["rule-type"] == "table-settings" then
        assert.falsy((r["object-locator"]["schema-name"] .. r["object-locator"]["table-name"]):find("%", 1, true))
      end
    end
  end)

  it("sends Tags on CreateReplicationTask and CreateEndpoint", function()
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.tags = { [builders.MIGRATION_TAG] = "app", team = "billing" }
    local p = builders.replication_task(runbook_group(), o)
    assert.same({ { Key = "migrun:migration", Value = "app" }, { Key = "team", Value = "billing" } }, p.Tags)
    -- a list of {Key, Value} too
    o.tags = { { Key = "migrun:migration", Value = "app" } }
    assert.same({ { Key = "migrun:migration", Value = "app" } }, builders.replication_task(runbook_group(), o).Tags)
    assert.is_nil(builders.replication_task(runbook_group(), opts).Tags)
    local e = builders.source_endpoint(runbook_group(), { host = "h", user = "u", tags = { [builders.MIGRATION_TAG] = "app" } })
    assert.same({ { Key = "migrun:migration", Value = "app" } }, e.Tags)
    assert.truthy(builders.encode(e.Tags):find('^%[')) -- a JSON list, also for one tag
    assert.error_matches(function() builders.tags{ ["aws:x"] = "1" } end, "not starting with aws:")
  end)
end)

-- The DMS boundary (docs/dms-boundary.md): what migrun.fidelity asks of the DMS documents.
describe("dms builders at the DMS boundary", function()
  local fidelity = require "migrun.fidelity"

  it("removes each generated column with a transformation rule that names only it", function()
    local g = { name = "g", slot = "s", tables = {
      { schema = "Sales Ops", name = "line_item", remove_columns = { "total_cents", "50%_off" } },
      { schema = "public", name = "plain" },
    } }
    local rules = builders.table_mappings(g).rules
    assert.are.equal(4, #rules)
    assert.are.same({ ["rule-type"] = "transformation", ["rule-id"] = "3", ["rule-name"] = "3",
      ["rule-target"] = "column", ["rule-action"] = "remove-column",
      ["object-locator"] = { ["schema-name"] = "Sales Ops", ["table-name"] = "line[_]item",
        ["column-name"] = "total[_]cents" } }, rules[3])
    assert.are.equal("50[%][_]off", rules[4]["object-locator"]["column-name"])
    -- the emulator reads the locators as DMS does: each matches its own name only
    local like = require("migrun.rehearsal.emulator_cdc").like
    assert.is_true(like("total[_]cents", "total_cents"))
    assert.is_false(like("total[_]cents", "totalXcents"))
    assert.is_true(like("50[%][_]off", "50%_off"))
    assert.is_false(like("50[%][_]off", "50x_off"))
    -- selection rules too: a group's "t_1" does not select another group's "t11"
    local sel = builders.table_mappings{ name = "g", slot = "s", tables = {
      { schema = "my_app", name = "t_1" }, { schema = "public", name = "a%b" } } }.rules
    assert.is_true(like(sel[1]["object-locator"]["table-name"], "t_1"))
    assert.is_false(like(sel[1]["object-locator"]["table-name"], "t11"))
    assert.is_false(like(sel[1]["object-locator"]["schema-name"], "myXapp"))
    assert.is_true(like(sel[2]["object-locator"]["table-name"], "a%b"))
    assert.is_false(like(sel[2]["object-locator"]["table-name"], "axyzb"))
    -- no remove_columns: no transformation rule
    for _, r in ipairs(builders.table_mappings{ name = "g", slot = "s", tables = { { schema = "a", name = "b" } } }.rules) do
      assert.are_not.equal("transformation", r["rule-type"])
    end
  end)

  it("sets the endpoints as the fidelity plan says, and nothing when it says nothing", function()
    local dms = { remove_columns = {}, after_connect_script = fidelity.SESSION_REPLICATION_ROLE,
      map_unbounded_numeric = true, capture_ddls = false }
    local conn = { host = "h", dbname = "d", user = "u", password = "p" }
    local function with(kind, overrides)
      local o = fidelity.endpoint_overrides(kind, overrides, dms)
      for k, v in pairs(conn) do o[k] = o[k] or v end
      return o
    end
    local src = builders.source_endpoint({ name = "g", slot = "s", tables = { { schema = "a", name = "b" } } },
      with("source", {}))
    assert.are.same({ PluginName = "pglogical", SlotName = "s", MapUnboundedNumericAsString = true,
      CaptureDdls = false }, src.PostgreSQLSettings)
    local dst = builders.target_endpoint(with("target", {}))
    assert.are.same({ AfterConnectScript = "SET session_replication_role = replica",
      MapUnboundedNumericAsString = true }, dst.PostgreSQLSettings)
    -- the team's own settings in dms.target_endpoint win
    dst = builders.target_endpoint(with("target", { after_connect_script = "SET search_path = app" }))
    assert.are.equal("SET search_path = app", dst.PostgreSQLSettings.AfterConnectScript)
    -- a plan that needs nothing: the documents stay as they were
    local none = { remove_columns = {}, map_unbounded_numeric = false, capture_ddls = false }
    local plain = builders.target_endpoint(fidelity.endpoint_overrides("target", conn, none))
    assert.is_nil(plain.PostgreSQLSettings)
  end)

  it("carries the plan's removed columns into the groups' tables, leaving the groups as they were", function()
    local groups = { { name = "g", slot = "s", tables = { { schema = "a", name = "t" }, { schema = "a", name = "u" } } } }
    local out = fidelity.task_groups(groups, { remove_columns = { ["a.u"] = { "total" } } })
    assert.are.same({ "total" }, out[1].tables[2].remove_columns)
    assert.is_nil(out[1].tables[1].remove_columns)
    assert.are.equal("s", out[1].slot)
    assert.is_nil(groups[1].tables[2].remove_columns, "the plan's groups were changed")
    local doc = builders.table_mappings(out[1])
    assert.are.equal("remove-column", doc.rules[#doc.rules]["rule-action"])
  end)
end)

describe("dms json", function()
  it("encodes canonically", function()
    assert.are.equal('{"a":[1,2.5,"x/y"],"b":{},"c":[],"d":null,"e":"q\\"\\n\\u0001"}',
      json.encode{ e = 'q"\n\1', d = json.null, c = json.array(), b = {}, a = { 1, 2.5, "x/y" } })
    assert.are.equal("3", json.encode(3.0))
    assert.are.equal("0.1", json.encode(0.1))
    assert.are.equal("1590524772.505", json.encode(1590524772.505))
    assert.has_error(function() json.encode{ [1] = 1, [3] = 3 } end)
    assert.has_error(function() json.encode(0/0) end)
  end)

  it("decodes, dropping nulls", function()
    local v = json.decode('{"a":null,"b":[1,2],"c":{"d":null}}')
    assert.are.same({ b = { 1, 2 }, c = {} }, v)
    local bad, err = json.decode("{")
    assert.is_nil(bad)
    assert.is_string(err)
  end)
end)
