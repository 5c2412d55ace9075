-- DMS documents for one slot group, following the runbook (Phase II, steps 2
-- and 3) and dms-api.md §2-3: the source endpoint that reads one pglogical
-- slot, the target endpoint, the table mappings and the CDC-only task
-- settings, and the CreateReplicationTask parameters that tie them together.
-- Every builder is a pure function of its input; documents are encoded with
-- migrun.json (sorted keys), so the same group always gives the same bytes.
--
-- A slot group, as migrun sees it:
--   {
--     name  = "dms_slot_01",          -- names the task and the source endpoint
--     slot  = "dms_slot_01",          -- the logical replication slot DMS reads
--     tables = {                      -- in replication-set order; rules follow it
--       { schema = "public", name = "t1",
--         has_pk = true,               -- a primary key
--         has_separate_unique = false, -- a unique constraint besides the PK
--         lob_columns = { "doc" },     -- columns DMS treats as LOBs (text, json, bytea, ...)
--         lob_max_kb = 325,            -- estimated largest LOB in the table, KB
--         lob_truncation_ok = true,    -- false: a table-settings rule lifts the limit
--         remove_columns = { "total" } },  -- DMS must not write them: a transformation rule each
--       ...
--     },
--     lob_max_kb = 64,                -- LobMaxSize for the task (KB); default: the
--                                     -- largest lob_max_kb of the tables, else 32
--     batch_apply = nil,              -- force BatchApplyEnabled; default: off when a
--                                     -- table has a PK and a separate unique constraint,
--                                     -- or a table is in full LOB mode (M.batch_apply)
--   }
--
-- The DMS rules these documents obey (AWS DMS User Guide; docs/dms-emulator.md
-- lists them with the emulator's refusals):
--   * batch apply with LOB columns only in limited LOB mode ("Target metadata
--     task settings", BatchApplyEnabled:
--     https://docs.aws.amazon.com/dms/latest/userguide/CHAP_Tasks.CustomizingTasks.TaskSettings.TargetMetadata.html),
--     and never on a target table with a primary key and another unique
--     constraint (same page);
--   * a table-settings rule in full LOB mode for a PostgreSQL source is mode
--     "unlimited" with bulk-max-size 0: a nonzero bulk-max-size there is
--     "combination" mode, for Db2 and SAP ASE sources only; "limited" needs a
--     nonzero bulk-max-size ("Table and collection settings rules and
--     operations", lob-settings:
--     https://docs.aws.amazon.com/dms/latest/userguide/CHAP_Tasks.CustomizingTasks.TableMapping.SelectionTransformation.Tablesettings.html);
--   * a table-settings rule names an exact schema and table: no % (same page);
--   * Tags ([{Key, Value}]) are given to CreateEndpoint and CreateReplicationTask
--     and read back with ListTagsForResource (ResourceArnList: many at once;
--     https://docs.aws.amazon.com/dms/latest/APIReference/API_ListTagsForResource.html),
--     since DescribeReplicationTasks cannot filter by tag.
local json = require "migrun.json"
local text = require "migrun.text"

local M = {}

-- Log components the task settings switch on (dms-api.md §3.1, Logging).
M.LOG_COMPONENTS = {
  "FILE_FACTORY", "METADATA_MANAGER", "SORTER", "SOURCE_CAPTURE", "SOURCE_UNLOAD",
  "TABLES_MANAGER", "TARGET_APPLY", "TARGET_LOAD", "TASK_MANAGER", "TRANSFORMATION",
  "VALIDATOR", "VALIDATOR_EXT",
}

M.DEFAULT_LOB_MAX_KB = 32       -- DMS's own LobMaxSize default
M.MAX_LOB_MAX_KB = 102400       -- the largest LobMaxSize DMS recommends (100 MB)
-- lob-settings for tables whose LOBs must not be truncated: full LOB mode for
-- that table only. The runbook wrote bulk-max-size "64", which DMS documents as
-- "combination" LOB mode, available for Db2 and SAP ASE sources only; for a
-- PostgreSQL source full LOB mode is bulk-max-size 0.
M.FULL_LOB_SETTINGS = { mode = "unlimited", ["bulk-max-size"] = "0" }
-- The tag every endpoint and task of a migration carries: its name.
M.MIGRATION_TAG = "migrun:migration"

local function check_group(g)
  assert(type(g) == "table", "slot group expected")
  assert(type(g.name) == "string" and g.name ~= "", "slot group: name expected")
  assert(type(g.slot) == "string" and g.slot ~= "", "slot group " .. g.name .. ": slot expected")
  assert(type(g.tables) == "table" and #g.tables > 0, "slot group " .. g.name .. ": tables expected")
  for i, t in ipairs(g.tables) do
    assert(type(t.schema) == "string" and type(t.name) == "string",
      ("slot group %s: table %d needs schema and name"):format(g.name, i))
  end
end

-- A DMS identifier from free text: letters, digits and single hyphens, starting
-- with a letter, no trailing hyphen ("dms_slot_01" -> "dms-slot-01").
function M.identifier(...)
  local s = table.concat({ ... }, "-"):lower():gsub("[^%w]+", "-"):gsub("^%-+", ""):gsub("%-+$", "")
  if not s:match("^%a") then s = "m-" .. s end
  return s
end

local function has_lobs(t)
  return (t.lob_columns and #t.lob_columns > 0) or t.lob_max_kb ~= nil
end

local function strict(t)
  return has_lobs(t) and t.lob_truncation_ok == false
end

-- True when the table gets a table-settings rule in full LOB mode.
function M.full_lob_mode(t) return strict(t) end

-- Tags as DMS takes them, [{Key, Value}] sorted by key, from a {key = value}
-- map or a list of {Key=, Value=} (nil stays nil).
function M.tags(t)
  if t == nil then return nil end
  assert(type(t) == "table", "tags: a {key = value} map or a list of {Key =, Value =} expected")
  local map = {}
  if #t > 0 then
    for _, tag in ipairs(t) do
      assert(type(tag) == "table" and type(tag.Key) == "string", "tags: {Key =, Value =} expected")
      map[tag.Key] = tag.Value
    end
  else
    for k, v in pairs(t) do map[k] = v end
  end
  local keys = {}
  for k in pairs(map) do
    assert(type(k) == "string" and #k >= 1 and #k <= 128 and not k:lower():match("^aws:")
      and not k:lower():match("^dms:"),
      ("tag key %q: 1 to 128 characters, not starting with aws: or dms: (DMS's Tag)"):format(tostring(k)))
    keys[#keys + 1] = k
  end
  table.sort(keys)
  local out = json.array()
  for _, k in ipairs(keys) do out[#out + 1] = { Key = k, Value = tostring(map[k] == nil and "" or map[k]) } end
  return out
end

-- The ExtraConnectionAttributes of a source endpoint reading slot (runbook step 2).
function M.extra_connection_attributes(slot)
  return "PluginName=PGLOGICAL;slotName=" .. slot
end

local function endpoint(kind, conn, id)
  assert(type(conn) == "table", "connection settings expected")
  local p = {
    EndpointIdentifier = id,
    EndpointType = kind,
    EngineName = "postgres",
    ServerName = conn.host or conn.server_name,
    Port = math.tointeger(conn.port or 5432),
    DatabaseName = conn.dbname or conn.database,
    Username = conn.user or conn.username,
    Password = conn.password,
    SslMode = conn.ssl_mode or conn.sslmode,
  }
  p.Tags = M.tags(conn.tags)
  return p
end

-- CreateEndpoint parameters for the source endpoint of a group.
-- conn: { host=, port=, dbname=, user=, password=, ssl_mode=, tags={k=v},
--         map_unbounded_numeric= (MapUnboundedNumericAsString), capture_ddls= (CaptureDdls),
--         identifier= (default "<group>-source"), heartbeat=true|minutes }
function M.source_endpoint(group, conn)
  check_group(group)
  local p = endpoint("source", conn, conn.identifier or M.identifier(group.name, "source"))
  p.ExtraConnectionAttributes = M.extra_connection_attributes(group.slot)
  p.PostgreSQLSettings = { PluginName = "pglogical", SlotName = group.slot }
  if conn.heartbeat then
    p.PostgreSQLSettings.HeartbeatEnable = true
    p.PostgreSQLSettings.HeartbeatFrequency = math.tointeger(conn.heartbeat) or 5
  end
  -- The DMS boundary (docs/dms-boundary.md, migrun.fidelity).
  if conn.map_unbounded_numeric then p.PostgreSQLSettings.MapUnboundedNumericAsString = true end
  if conn.capture_ddls ~= nil then p.PostgreSQLSettings.CaptureDdls = conn.capture_ddls end
  return p
end

-- CreateEndpoint parameters for the target (RDS) endpoint; conn as above,
-- identifier default "migrun-target", plus after_connect_script (run by DMS
-- on each of its target sessions: "SET session_replication_role = replica"
-- keeps triggers and foreign keys from firing again there) and
-- map_unbounded_numeric (MapUnboundedNumericAsString, set on the source
-- endpoint too: DMS wants both).
function M.target_endpoint(conn)
  local p = endpoint("target", conn, conn.identifier or "migrun-target")
  if conn.after_connect_script or conn.map_unbounded_numeric then
    p.PostgreSQLSettings = { AfterConnectScript = conn.after_connect_script,
      MapUnboundedNumericAsString = conn.map_unbounded_numeric and true or nil }
  end
  return p
end

-- A name as a DMS object locator matches only itself: "_" is a one-character
-- wildcard there and "[_]" a literal underscore (user guide, Wildcards in
-- table mapping); "%" and "[" are escaped the same way.
function M.literal_pattern(name)
  return (name:gsub("[%[_%%]", "[%0]"))
end

-- Transformation rules removing columns DMS must not write (stored generated
-- columns: PostgreSQL refuses a value for them, 428C9), from each table's
-- remove_columns. -> the next rule id
local function remove_column_rules(rules, group, id)
  for _, t in ipairs(group.tables) do
    for _, col in ipairs(t.remove_columns or {}) do
      rules[#rules + 1] = {
        ["rule-type"] = "transformation",
        ["rule-id"] = tostring(id),
        ["rule-name"] = tostring(id),
        ["rule-target"] = "column",
        ["rule-action"] = "remove-column",
        ["object-locator"] = { ["schema-name"] = M.literal_pattern(t.schema),
          ["table-name"] = M.literal_pattern(t.name), ["column-name"] = M.literal_pattern(col) },
      }
      id = id + 1
    end
  end
  return id
end

-- The table mappings document (a table; encode with M.encode): one selection
-- rule per table in group order, then one table-settings rule per table whose
-- LOBs must not be truncated (full LOB mode, M.FULL_LOB_SETTINGS), then one
-- remove-column transformation rule per column in a table's remove_columns.
-- opts: first_rule_id (default 1).
function M.table_mappings(group, opts)
  check_group(group)
  opts = opts or {}
  local id = math.tointeger(opts.first_rule_id or 1)
  local rules = json.array()
  local seen_names = {}
  for _, t in ipairs(group.tables) do
    local key = text.key(t)
    assert(not seen_names[key], "slot group " .. group.name .. ": table " .. key .. " listed twice")
    seen_names[key] = true
    rules[#rules + 1] = {
      ["rule-type"] = "selection",
      ["rule-id"] = tostring(id),
      ["rule-name"] = tostring(id),
      -- the names as patterns that match only themselves: "_" is DMS's
      -- one-character wildcard, so "t_1" alone would also select "t11"
      -- (another group's table, replicated by two tasks)
      ["object-locator"] = { ["schema-name"] = M.literal_pattern(t.schema), ["table-name"] = M.literal_pattern(t.name) },
      ["rule-action"] = "include",
      filters = json.array(),
    }
    id = id + 1
  end
  local by_name = {}
  for _, t in ipairs(group.tables) do by_name[t.name] = (by_name[t.name] or 0) + 1 end
  for _, t in ipairs(group.tables) do
    if strict(t) then
      -- DMS wants exact names in a table-settings rule and takes % as a wildcard
      assert(not (t.schema .. t.name):find("%", 1, true), ("slot group %s: table %s: DMS "
        .. "table-settings rules need an exact schema and table name and refuse %%; rename the "
        .. "table or accept truncation for it (lobs.tables[%q].truncation_ok = true)"):format(
        group.name, text.key(t), text.key(t)))
      rules[#rules + 1] = {
        ["rule-type"] = "table-settings",
        ["rule-id"] = tostring(id),
        ["rule-name"] = (by_name[t.name] > 1 and (t.schema .. "-") or "") .. t.name .. "-lob",
        ["object-locator"] = { ["schema-name"] = t.schema, ["table-name"] = t.name },
        ["lob-settings"] = { mode = M.FULL_LOB_SETTINGS.mode, ["bulk-max-size"] = M.FULL_LOB_SETTINGS["bulk-max-size"] },
      }
      id = id + 1
    end
  end
  remove_column_rules(rules, group, id)
  return { rules = rules }
end

-- Why batch apply must stay off for the group, or nil: a table with a PK and a
-- separate unique constraint (DMS refuses such target tables in batch apply),
-- or a table in full LOB mode (DMS batch-applies LOB columns only in limited
-- LOB mode). -> reason text, the tables concerned
function M.transactional_reason(group)
  local both, full = {}, {}
  for _, t in ipairs(group.tables) do
    if t.has_pk and t.has_separate_unique then both[#both + 1] = text.key(t) end
    if strict(t) then full[#full + 1] = text.key(t) end
  end
  local why = {}
  if #both > 0 then why[#why + 1] = "primary key and separate unique constraint: " .. table.concat(both, ", ") end
  if #full > 0 then why[#why + 1] = "full LOB mode: " .. table.concat(full, ", ") end
  if #why == 0 then return nil end
  return table.concat(why, "; ")
end

-- True when batch apply must stay off (M.transactional_reason).
function M.needs_transactional_apply(group)
  return M.transactional_reason(group) ~= nil
end

-- BatchApplyEnabled for the group: group.batch_apply when given, else on
-- unless M.transactional_reason. -> enabled, reason (why it is off)
function M.batch_apply(group)
  local why = M.transactional_reason(group)
  if group.batch_apply ~= nil then return group.batch_apply, (not group.batch_apply) and "configured" or nil end
  return why == nil, why
end

-- The DMS rules a group's documents would break, as configured: nil when
-- none, else a sentence naming the tables and what to change. Forcing
-- batch_apply = true on a group that needs transactional apply is the one a
-- configuration can cause.
function M.check(group)
  check_group(group)
  local why = M.transactional_reason(group)
  if group.batch_apply == true and why then
    return ("slot group %s: batch apply was asked for (dms.task.batch_apply = true), but DMS "
      .. "refuses it for %s"):format(group.name, why)
  end
  return nil
end

-- LobMaxSize (KB) for the group's task.
function M.lob_max_kb(group)
  local kb = group.lob_max_kb
  if kb == nil then
    for _, t in ipairs(group.tables) do
      if t.lob_max_kb and (kb == nil or t.lob_max_kb > kb) then kb = t.lob_max_kb end
    end
  end
  kb = math.tointeger(math.ceil(kb or M.DEFAULT_LOB_MAX_KB))
  assert(kb >= 1 and kb <= M.MAX_LOB_MAX_KB,
    ("slot group %s: LOB size %s KB outside 1..%d"):format(group.name, tostring(kb), M.MAX_LOB_MAX_KB))
  return kb
end

local function merge(into, from)
  for k, v in pairs(from) do
    if type(v) == "table" and type(into[k]) == "table" and not json.is_array(v) then
      merge(into[k], v)
    else
      into[k] = v
    end
  end
  return into
end

-- The ReplicationTaskSettings document for a CDC-only task (runbook step 3):
-- target tables left alone, recovery and all control tables in control_schema,
-- every log component on, limited LOB mode at the group's size, batch apply
-- off when the group needs it. opts: control_schema (default "public"),
-- log_severity, overrides (deep-merged last).
function M.task_settings(group, opts)
  check_group(group)
  opts = opts or {}
  local problem = M.check(group)
  assert(not problem, problem)
  local batch = M.batch_apply(group)
  local components = json.array()
  for _, id in ipairs(M.LOG_COMPONENTS) do
    components[#components + 1] = { Id = id, Severity = opts.log_severity or "LOGGER_SEVERITY_DEFAULT" }
  end
  local s = {
    TargetMetadata = {
      TargetSchema = "",
      SupportLobs = true,
      FullLobMode = false,
      LobChunkSize = 64,
      LimitedSizeLobMode = true,
      LobMaxSize = M.lob_max_kb(group),
      InlineLobMaxSize = 0,
      BatchApplyEnabled = batch,
      TaskRecoveryTableEnabled = true,
    },
    FullLoadSettings = { TargetTablePrepMode = "DO_NOTHING" },
    Logging = { EnableLogging = true, LogComponents = components },
    ControlTablesSettings = {
      ControlSchema = opts.control_schema or "public",
      HistoryTimeslotInMinutes = 5,
      HistoryTableEnabled = true,
      SuspendedTablesTableEnabled = true,
      StatusTableEnabled = true,
    },
  }
  if opts.overrides then merge(s, opts.overrides) end
  return s
end

-- CreateReplicationTask parameters for the group's CDC-only task.
-- opts: source_endpoint_arn, target_endpoint_arn, replication_instance_arn,
--       cdc_start_position (an LSN value or text like "4AF/B00000D0"),
--       identifier (default "<group>-cdc"), tags (M.tags: a map or a list),
--       plus the task_settings and table_mappings options.
function M.replication_task(group, opts)
  check_group(group)
  assert(type(opts) == "table", "task options expected")
  for _, k in ipairs{ "source_endpoint_arn", "target_endpoint_arn", "replication_instance_arn" } do
    assert(type(opts[k]) == "string", "replication_task: " .. k .. " expected")
  end
  local p = {
    ReplicationTaskIdentifier = opts.identifier or M.identifier(group.name, "cdc"),
    SourceEndpointArn = opts.source_endpoint_arn,
    TargetEndpointArn = opts.target_endpoint_arn,
    ReplicationInstanceArn = opts.replication_instance_arn,
    MigrationType = "cdc",
    TableMappings = M.encode(M.table_mappings(group, opts)),
    ReplicationTaskSettings = M.encode(M.task_settings(group, opts)),
  }
  if opts.cdc_start_position ~= nil then p.CdcStartPosition = tostring(opts.cdc_start_position) end
  p.Tags = M.tags(opts.tags)
  return p
end

-- Canonical compact JSON of a document (sorted keys); indent="  " for people.
function M.encode(doc, indent)
  return json.encode(doc, indent and { indent = indent } or nil)
end

return M
