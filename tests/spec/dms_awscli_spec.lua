-- migrun's DMS documents and the emulator's answers checked with a client
-- nobody here wrote: Debian's awscli (botocore's DMS and CloudWatch Logs
-- models) pointed at the emulator on loopback with dummy credentials. The
-- builders' CreateEndpoint and CreateReplicationTask parameters go in as
-- --cli-input-json, so botocore validates them against its model before
-- sending; the emulator's tags, refusals and task logs come back through
-- botocore's parsers. tools/install-deps installs awscli.
local proc = require "migrun.proc"
local socket = require "socket"
local json = require "migrun.json"
local cjson = require "cjson"
local host = require "migrun.host"
local builders = require "migrun.dms.builders"

local root = os.getenv("MIGRUN_SOURCE_DIR") or "."
local bin = os.getenv("MIGRUN_BIN") or (root .. "/build/migrun")
local AWS = "/usr/bin/aws"
local AKID, SECRET = "AKIDEMULATOR", "emulator/secret+KEY"

local function have_awscli()
  local f = io.open(AWS)
  if f then f:close() return true end
  return false
end

describe("awscli against the emulator", function()
  if not have_awscli() then
    -- tools/install-deps installs it; without it this spec cannot say anything
    pending("awscli is not installed (apt-get install awscli, or tools/install-deps): the botocore checks did not run")
    return
  end

  local e, dir

  setup(function()
    local ok, _, _, out = proc.run{ "mktemp", "-d", "/tmp/migrun-awscli.XXXXXX" }
    assert(ok)
    dir = out:gsub("%s+$", "")
    local argv = { bin, root .. "/tools/dms-emulator.lua", "--port", "0", "--access-key", AKID,
      "--delays", json.encode{ task_create = 0.05, task_start = 0.05 }, "--no-cdc",
      env = { MIGRUN_DMS_EMULATOR_SECRET = SECRET }, stdin = false, stderr = "capture" }
    local url
    argv.stdout = function(line) url = url or line end
    local h = assert(proc.spawn(argv))
    local deadline = socket.gettime() + 20
    while not url and socket.gettime() < deadline do assert(not h:wait(0.05), "the emulator exited") end
    e = { url = assert(url, "emulator printed no URL"), h = h }
  end)
  teardown(function()
    if e then e.h:close() end
    if dir then proc.run{ "rm", "-rf", dir } end
  end)

  -- aws <args> -> ok, decoded stdout, stderr
  local function aws(args, input)
    local argv = { AWS, "--endpoint-url", e.url, "--region", "us-east-1", "--output", "json" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    if input then
      local path = dir .. "/input.json"
      assert(host.write_file(path, json.encode(input)))
      argv[#argv + 1] = "--cli-input-json"
      argv[#argv + 1] = "file://" .. path
    end
    -- dummy credentials, and no configuration of this machine's
    argv.env = { PATH = os.getenv("PATH"), HOME = dir, AWS_ACCESS_KEY_ID = AKID, AWS_SECRET_ACCESS_KEY = SECRET,
      AWS_CONFIG_FILE = dir .. "/none", AWS_SHARED_CREDENTIALS_FILE = dir .. "/none", AWS_PAGER = "",
      AWS_MAX_ATTEMPTS = "1", AWS_EC2_METADATA_DISABLED = "true", AWS_PROFILE = false, AWS_DEFAULT_PROFILE = false,
      AWS_SESSION_TOKEN = false, AWS_ENDPOINT_URL = false, AWS_DEFAULT_REGION = false, AWS_REGION = false }
    argv.stdin, argv.stderr, argv.timeout = false, "capture", 120
    local ok, how, code, out, err = proc.run(argv)
    local doc = ok and out ~= "" and cjson.decode(out) or nil
    return ok, doc, tostring(err or "") .. (ok and "" or (" (" .. tostring(how) .. " " .. tostring(code) .. ")"))
  end

  local function group()
    return { name = "dms_slot_01", slot = "dms_slot_01", tables = {
      { schema = "public", name = "docs", has_pk = true, lob_columns = { "body" }, lob_max_kb = 2000,
        lob_truncation_ok = false },
      { schema = "public", name = "notes", has_pk = true, lob_columns = { "note" }, lob_max_kb = 40 } } }
  end

  it("creates endpoints and a task from the builders' documents, lists their tags, reads the task log", function()
    local conn = { host = "127.0.0.1", port = 5432, dbname = "app", user = "u", password = "dummy",
      tags = { [builders.MIGRATION_TAG] = "app" } }
    local ok, src, err = aws({ "dms", "create-endpoint" }, builders.source_endpoint(group(), conn))
    assert.is_true(ok, err)
    conn.identifier = "app-target"
    local dst
    ok, dst, err = aws({ "dms", "create-endpoint" }, builders.target_endpoint(conn))
    assert.is_true(ok, err)
    local inst
    ok, inst, err = aws{ "dms", "describe-replication-instances" }
    assert.is_true(ok, err)
    local params = builders.replication_task(group(), { identifier = "app-dms-slot-01-cdc",
      source_endpoint_arn = src.Endpoint.EndpointArn, target_endpoint_arn = dst.Endpoint.EndpointArn,
      replication_instance_arn = inst.ReplicationInstances[1].ReplicationInstanceArn,
      cdc_start_position = "4AF/B00000D0", tags = { [builders.MIGRATION_TAG] = "app" } })
    local task
    ok, task, err = aws({ "dms", "create-replication-task" }, params)
    assert.is_true(ok, err)
    local arn = task.ReplicationTask.ReplicationTaskArn
    assert.equal("creating", task.ReplicationTask.Status)

    local tags
    ok, tags, err = aws{ "dms", "list-tags-for-resource", "--resource-arn-list", arn, src.Endpoint.EndpointArn,
      dst.Endpoint.EndpointArn }
    assert.is_true(ok, err)
    local by_arn = {}
    for _, t in ipairs(tags.TagList) do by_arn[t.ResourceArn] = (by_arn[t.ResourceArn] or "") .. t.Key .. "=" .. t.Value end
    assert.same({ [arn] = "migrun:migration=app", [src.Endpoint.EndpointArn] = "migrun:migration=app",
      [dst.Endpoint.EndpointArn] = "migrun:migration=app" }, by_arn)

    -- the task log, as CloudWatch Logs hands it out
    local _
    ok, _, err = aws{ "dms", "wait", "replication-task-ready", "--filters", "Name=replication-task-arn,Values=" .. arn }
    assert.is_true(ok, err)
    ok, _, err = aws{ "dms", "start-replication-task", "--replication-task-arn", arn,
      "--start-replication-task-type", "start-replication" }
    assert.is_true(ok, err)
    ok, _, err = aws{ "dms", "wait", "replication-task-running", "--filters", "Name=replication-task-arn,Values=" .. arn }
    assert.is_true(ok, err)
    local events
    ok, events, err = aws{ "logs", "filter-log-events", "--log-group-name", "dms-tasks-migrun-emulator",
      "--log-stream-names", "dms-task-" .. arn:match("([^:]+)$"), "--filter-pattern", "Task started" }
    assert.is_true(ok, err)
    assert.equal(1, #events.events)
    assert.matches("Task started", events.events[1].message)
  end)

  it("modifies an endpoint through `aws dms modify-endpoint`; an operation the emulator lacks says so", function()
    local ok, ep, err = aws({ "dms", "create-endpoint" }, { EndpointIdentifier = "cli-mod", EndpointType = "source",
      EngineName = "postgres", ServerName = "127.0.0.1", Port = 5432, DatabaseName = "app", Username = "u",
      Password = "pw", PostgreSQLSettings = { SlotName = "dms_slot_09", PluginName = "pglogical" } })
    assert.is_true(ok, err)
    local arn = ep.Endpoint.EndpointArn
    local m
    ok, m, err = aws{ "dms", "modify-endpoint", "--endpoint-arn", arn, "--port", "6543", "--database-name", "app2",
      "--postgre-sql-settings", "HeartbeatEnable=true" }
    assert.is_true(ok, err)
    assert.equal(arn, m.Endpoint.EndpointArn)
    assert.equal(6543, m.Endpoint.Port)
    assert.equal("app2", m.Endpoint.DatabaseName)
    assert.same({ SlotName = "dms_slot_09", PluginName = "pglogical", HeartbeatEnable = true },
      m.Endpoint.PostgreSQLSettings)
    ok, m, err = aws{ "dms", "modify-endpoint", "--endpoint-arn", arn, "--exact-settings",
      "--postgre-sql-settings", "SlotName=dms_slot_10" }
    assert.is_true(ok, err)
    assert.same({ SlotName = "dms_slot_10" }, m.Endpoint.PostgreSQLSettings)
    -- botocore parses the faults by their DMS names, with the message
    local refused, _
    refused, _, err = aws{ "dms", "modify-endpoint", "--endpoint-arn",
      "arn:aws:dms:us-east-1:123456789012:endpoint:NOPE" }
    assert.falsy(refused)
    assert.matches("%(ResourceNotFoundFault%) when calling the ModifyEndpoint operation.-: Endpoint arn:", err)
    refused, _, err = aws{ "dms", "modify-endpoint", "--endpoint-arn", arn, "--ssl-mode", "require",
      "--endpoint-identifier", "cli--mod" }
    assert.falsy(refused)
    assert.matches("%(InvalidParameterValueException%) when calling the ModifyEndpoint operation.-: The parameter "
      .. "EndpointIdentifier must begin with a letter", err)
    -- a DMS operation the emulator does not model: a code and a message, never an empty one
    refused, _, err = aws{ "dms", "describe-certificates" }
    assert.falsy(refused)
    assert.matches("%(InvalidOperationFault%) when calling the DescribeCertificates operation.-: DescribeCertificates "
      .. "is a DMS operation the DMS emulator does not model", err)
    ok, _, err = aws{ "dms", "delete-endpoint", "--endpoint-arn", arn }
    assert.is_true(ok, err)
  end)

  it("shows DMS's error code for a refused violation", function()
    local ok, inst = aws{ "dms", "describe-replication-instances" }
    assert.is_true(ok)
    local ok2, eps = aws{ "dms", "describe-endpoints" }
    assert.is_true(ok2)
    local src, dst
    for _, ep in ipairs(eps.Endpoints) do
      if ep.EndpointType == "SOURCE" then src = ep.EndpointArn else dst = ep.EndpointArn end
    end
    local params = builders.replication_task(group(), { identifier = "runbook-form",
      source_endpoint_arn = src, target_endpoint_arn = dst,
      replication_instance_arn = inst.ReplicationInstances[1].ReplicationInstanceArn, cdc_start_position = "4AF/B00000D0" })
    -- the runbook's no-truncation rule: "unlimited" with bulk-max-size 64 (combination LOB mode)
    local m = json.decode(params.TableMappings)
    m.rules[3]["lob-settings"]["bulk-max-size"] = "64"
    params.TableMappings = json.encode(m)
    local refused, _, err = aws({ "dms", "create-replication-task" }, params)
    assert.falsy(refused)
    assert.matches("An error occurred %(InvalidParameterValueException%) when calling the CreateReplicationTask "
      .. "operation.-: Error in mapping rules%. Rule with ruleId = 3 failed validation%. .*combination LOB mode", err)
    -- and batch apply forced on next to the full-LOB-mode table
    params.TableMappings = builders.replication_task(group(), { source_endpoint_arn = src, target_endpoint_arn = dst,
      replication_instance_arn = "x" }).TableMappings
    local s = json.decode(params.ReplicationTaskSettings)
    s.TargetMetadata.BatchApplyEnabled = true
    params.ReplicationTaskSettings = json.encode(s)
    refused, _, err = aws({ "dms", "create-replication-task" }, params)
    assert.falsy(refused)
    assert.matches("%(InvalidParameterValueException%).*only in limited LOB mode", err)
    -- an unknown ARN, as botocore's model names the fault
    refused, _, err = aws{ "dms", "list-tags-for-resource", "--resource-arn", "arn:aws:dms:us-east-1:123456789012:task:NOPE" }
    assert.falsy(refused)
    assert.matches("%(ResourceNotFoundFault%) when calling the ListTagsForResource operation", err)
  end)
end)
