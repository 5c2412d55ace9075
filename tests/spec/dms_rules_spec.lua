-- The DMS rules on task settings and table mappings that migrun's documents
-- touch, seen from the emulator (tools/dms-emulator.lua as a child process,
-- driven by migrun.dms over loopback): the builders' documents are accepted
-- and each violation is refused with DMS's error; tags are stored and listed
-- as DMS lists them, and cdc.lua finds its tasks by them; the task log is
-- read through CloudWatch Logs' FilterLogEvents.
local proc = require "migrun.proc"
local socket = require "socket"
local dms = require "migrun.dms"
local json = require "migrun.json"
local builders = require "migrun.dms.builders"
local cdc = require "migrun.cdc"

local root = os.getenv("MIGRUN_SOURCE_DIR") or "."
local bin = os.getenv("MIGRUN_BIN") or (root .. "/build/migrun")
local AKID, SECRET = "AKIDEMULATOR", "emulator/secret+KEY"
local FAST = { task_create = 0.05, task_start = 0.05, task_stop = 0.05, task_modify = 0.05, task_delete = 0.05,
  endpoint_delete = 0.05, connection = 0.05, cdc_poll = 0.1 }

local function start_emulator()
  local argv = { bin, root .. "/tools/dms-emulator.lua", "--port", "0", "--access-key", AKID,
    "--delays", json.encode(FAST), "--no-cdc", env = { MIGRUN_DMS_EMULATOR_SECRET = SECRET }, stdin = false,
    stderr = "capture" }
  local url
  argv.stdout = function(line) url = url or line end
  local h = assert(proc.spawn(argv))
  local deadline = socket.gettime() + 20
  while not url and socket.gettime() < deadline do
    local ok, how = h:wait(0.05)
    if ok or how ~= "timeout" then error("emulator exited: " .. tostring(h.stderr)) end
  end
  assert(url, "emulator printed no URL")
  return { url = url, h = h }
end

local function client_of(e, extra)
  local opts = { endpoint_url = e.url, region = "us-east-1", access_key = AKID, secret_key = SECRET, env = {},
    retry_base = 0.01, max_attempts = 1 }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return assert(dms.client(opts))
end

-- A group like the runbook's: a full-LOB-mode table, a limited one, a plain one.
local function group()
  return { name = "dms_slot_01", slot = "dms_slot_01", tables = {
    { schema = "public", name = "docs", has_pk = true, lob_columns = { "body" }, lob_max_kb = 2000,
      lob_truncation_ok = false },
    { schema = "public", name = "notes", has_pk = true, lob_columns = { "note" }, lob_max_kb = 40,
      lob_truncation_ok = true },
    { schema = "public", name = "plain", has_pk = true } } }
end

describe("the emulator's CDC engine", function()
  it("takes each table's LOB limit from its table-settings rule", function()
    local cdc_engine = require "migrun.rehearsal.emulator_cdc"
    local g = group()
    local rules = cdc_engine.lob_rules(builders.replication_task(g, { source_endpoint_arn = "a",
      target_endpoint_arn = "b", replication_instance_arn = "c" }).TableMappings)
    assert.same({ ["public.docs"] = false }, rules) -- full LOB mode: never cut; the others: the task's limit
    local m = { rules = { { ["rule-type"] = "table-settings", ["rule-id"] = "9", ["rule-name"] = "9",
      ["object-locator"] = { ["schema-name"] = "s", ["table-name"] = "t" },
      ["lob-settings"] = { mode = "limited", ["bulk-max-size"] = "100" } } } }
    assert.same({ ["s.t"] = 100 * 1024 }, cdc_engine.lob_rules(json.encode(m)))
  end)
end)

describe("DMS rules at the emulator", function()
  local e, c, src, dst, rep

  setup(function()
    e = start_emulator()
    c = client_of(e)
    local conn = { host = "127.0.0.1", port = 1, dbname = "app", user = "u", password = "pw",
      tags = { [builders.MIGRATION_TAG] = "app" } }
    src = assert(c:create_endpoint(builders.source_endpoint(group(), conn)))
    conn.identifier = "app-target"
    dst = assert(c:create_endpoint(builders.target_endpoint(conn)))
    rep = assert(c:describe_replication_instances())[1].ReplicationInstanceArn
  end)
  teardown(function() if e then e.h:close() end end)

  local n = 0
  local function task_params(g, extra)
    n = n + 1
    local p = builders.replication_task(g or group(), { identifier = "rules-" .. n,
      source_endpoint_arn = src.EndpointArn, target_endpoint_arn = dst.EndpointArn,
      replication_instance_arn = rep, cdc_start_position = "0/16B3748",
      tags = { [builders.MIGRATION_TAG] = "app" } })
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end
  local function mappings(p) return json.decode(p.TableMappings) end
  local function settings(p) return json.decode(p.ReplicationTaskSettings) end
  local function refused(p, code, message)
    local t, err = c:create_replication_task(p)
    assert.is_nil(t, "accepted: " .. tostring(p.TableMappings) .. "\n" .. tostring(p.ReplicationTaskSettings))
    assert.equal(code, err.code)
    assert.equal(400, err.status)
    if message then assert.equal(message, err.message) end
    return err
  end

  it("accepts the builders' documents and keeps their tags", function()
    local task = assert(c:create_replication_task(task_params()))
    local tags = assert(c:list_tags{ task.ReplicationTaskArn, src.EndpointArn, dst.EndpointArn })
    for _, arn in ipairs{ task.ReplicationTaskArn, src.EndpointArn, dst.EndpointArn } do
      assert.same({ [builders.MIGRATION_TAG] = "app" }, tags[arn])
    end
    -- as DMS answers: every tag with its ResourceArn; one ARN alone works too
    local doc = assert(c:call("ListTagsForResource", { ResourceArn = task.ReplicationTaskArn }))
    assert.same({ { Key = "migrun:migration", Value = "app", ResourceArn = task.ReplicationTaskArn } }, doc.TagList)
    assert(c:call("AddTagsToResource", { ResourceArn = task.ReplicationTaskArn,
      Tags = { { Key = "team", Value = "billing" }, { Key = "migrun:migration", Value = "app" } } }))
    assert.same({ [builders.MIGRATION_TAG] = "app", team = "billing" }, assert(c:list_tags{ task.ReplicationTaskArn })[task.ReplicationTaskArn])
    assert(c:call("RemoveTagsFromResource", { ResourceArn = task.ReplicationTaskArn, TagKeys = { "team" } }))
    assert.same({ [builders.MIGRATION_TAG] = "app" }, assert(c:list_tags{ task.ReplicationTaskArn })[task.ReplicationTaskArn])
    local _, err = c:call("ListTagsForResource", { ResourceArnList = { "arn:aws:dms:us-east-1:123456789012:task:NOPE" } })
    assert.equal("ResourceNotFoundFault", err.code)
    _, err = c:call("AddTagsToResource", { ResourceArn = task.ReplicationTaskArn, Tags = { { Key = "aws:x", Value = "1" } } })
    assert.equal("InvalidParameterValueException", err.code)
  end)

  it("refuses a table-settings rule without an exact schema and table name, with DMS's message", function()
    local p = task_params()
    local m = mappings(p)
    m.rules[4]["object-locator"]["table-name"] = "doc%"
    p.TableMappings = json.encode(m)
    refused(p, "InvalidParameterValueException", "Error in mapping rules. Rule with ruleId = 4 failed validation. "
      .. "Exact schema and table name required when using table settings rule.")
  end)

  it("refuses combination LOB mode (unlimited with a nonzero bulk-max-size) for a PostgreSQL source", function()
    local p = task_params()
    local m = mappings(p)
    assert.same({ mode = "unlimited", ["bulk-max-size"] = "0" }, m.rules[4]["lob-settings"])
    m.rules[4]["lob-settings"]["bulk-max-size"] = "64" -- the runbook's form
    p.TableMappings = json.encode(m)
    local err = refused(p, "InvalidParameterValueException")
    assert.matches("^Error in mapping rules%. Rule with ruleId = 4 failed validation%. .*combination LOB mode.*"
      .. "Db2 and SAP ASE.*postgres", err.message)
    -- and limited mode without a size
    m.rules[4]["lob-settings"] = { mode = "limited", ["bulk-max-size"] = "0" }
    p.TableMappings = json.encode(m)
    refused(p, "InvalidParameterValueException")
  end)

  it("refuses batch apply with full LOB mode, per table or for the task", function()
    local p = task_params()
    local s = settings(p)
    assert.is_false(s.TargetMetadata.BatchApplyEnabled) -- what the builders send
    s.TargetMetadata.BatchApplyEnabled = true
    p.ReplicationTaskSettings = json.encode(s)
    local err = refused(p, "InvalidParameterValueException")
    assert.matches("only in limited LOB mode; table%-settings rule 4 sets full LOB mode for public%.docs", err.message)
    -- task-level full LOB mode
    local g = group()
    g.tables[1].lob_truncation_ok = true
    p = task_params(g)
    s = settings(p)
    assert.is_true(s.TargetMetadata.BatchApplyEnabled)
    s.TargetMetadata.FullLobMode, s.TargetMetadata.LimitedSizeLobMode = true, false
    p.ReplicationTaskSettings = json.encode(s)
    refused(p, "InvalidParameterValueException")
    -- the same group in limited LOB mode: batch apply accepted
    assert(c:create_replication_task(task_params(g)))
  end)

  it("refuses a ModifyReplicationTask that would break a rule", function()
    local task = assert(c:create_replication_task(task_params()))
    assert(c:wait_for_task(task.ReplicationTaskArn, "ready", 10, 0.05))
    local s = settings(task_params())
    s.TargetMetadata.BatchApplyEnabled = true
    local _, err = c:modify_replication_task{ ReplicationTaskArn = task.ReplicationTaskArn,
      ReplicationTaskSettings = json.encode(s) }
    assert.equal("InvalidParameterValueException", err.code)
  end)

  it("lets cdc.lua find a migration's tasks by tag and refuse another migration's task", function()
    local g = group()
    local mine = assert(cdc.tagged_tasks(c, "app"))
    assert.is_true(#mine >= 1)
    for _, t in ipairs(mine) do assert.matches("^rules%-", t.ReplicationTaskIdentifier) end
    assert.same({}, assert(cdc.tagged_tasks(c, "other")))
    -- "other"'s task id, but made by "app": ensure_tasks refuses to take it over
    local p = task_params(g, { ReplicationTaskIdentifier = cdc.task_id("other", g) })
    assert(c:create_replication_task(p))
    local eps = { source = { [g.slot] = src.EndpointArn }, target = dst.EndpointArn }
    local out, err = cdc.ensure_tasks(c, { g }, eps, { name = "other", instance_arn = rep, start_lsn = "0/16B3748" })
    assert.is_nil(out)
    assert.equal("NotThisMigration", err.code)
    assert.matches('belongs to migration "app"', tostring(err))
    -- a group the config forces into batch apply: refused before any task exists
    local before = #assert(c:describe_replication_tasks())
    out, err = cdc.ensure_tasks(c, { g }, eps, { name = "forced", instance_arn = rep, start_lsn = "0/16B3748",
      task = { batch_apply = true } })
    assert.is_nil(out)
    assert.equal("config", err.kind)
    assert.matches("full LOB mode: public%.docs; no task was created", tostring(err))
    assert.equal(before, #assert(c:describe_replication_tasks()))
    -- a new migration: created with its tag
    out = assert(cdc.ensure_tasks(c, { g }, eps, { name = "third", instance_arn = rep, start_lsn = "0/16B3748" }))
    local third = assert(cdc.tagged_tasks(c, "third"))
    assert.equal(1, #third)
    assert.equal(out[g.slot], third[1].ReplicationTaskArn)
  end)

  it("serves the task logs through CloudWatch Logs FilterLogEvents", function()
    local logs = assert(dms.logs_client{ endpoint_url = e.url, region = "us-east-1", access_key = AKID,
      secret_key = SECRET, env = {}, max_attempts = 1 })
    local task = assert(c:create_replication_task(task_params()))
    assert(c:wait_for_task(task.ReplicationTaskArn, "ready", 10, 0.05))
    assert(c:start_replication_task(task.ReplicationTaskArn, "start-replication"))
    assert(c:wait_for_task(task.ReplicationTaskArn, "running", 10, 0.05))
    local stream = "dms-task-" .. task.ReplicationTaskArn:match("([^:]+)$")
    local events = assert(logs:filter_log_events{ logGroupName = "dms-tasks-migrun-emulator",
      logStreamNames = { stream }, filterPattern = "Task started" })
    assert.equal(1, #events)
    assert.equal(stream, events[1].logStreamName)
    assert.matches("Task started", events[1].message)
    assert.same({}, assert(logs:filter_log_events{ logGroupName = "dms-tasks-migrun-emulator",
      logStreamNames = { stream }, filterPattern = "truncated" }))
    local _, err = logs:filter_log_events{ logGroupName = "dms-tasks-nope" }
    assert.equal("ResourceNotFoundException", err.code)
    -- a DMS-signed request to the Logs API is refused
    local wrong = client_of(e, { target_prefix = dms.LOGS_TARGET_PREFIX })
    _, err = wrong:call("FilterLogEvents", { logGroupName = "dms-tasks-migrun-emulator" })
    assert.equal("InvalidSignatureException", err.code)
  end)
end)
