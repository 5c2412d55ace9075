-- The DMS emulator (tools/dms-emulator.lua, migrun.rehearsal.emulator) driven by the
-- real client, migrun.dms, over loopback: the emulator runs as a child migrun
-- process, as users run it. Protocol and SigV4 checks, every operation, the
-- status lifecycle, error paths, pagination, fault injection and retries.
local proc = require "migrun.proc"
local socket = require "socket"
local dms = require "migrun.dms"
local json = require "migrun.json"
local aws = require "migrun.aws"
local emulator = require "migrun.rehearsal.emulator"

local root = os.getenv("MIGRUN_SOURCE_DIR") or "."
local bin = os.getenv("MIGRUN_BIN") or (root .. "/build/migrun")
local AKID, SECRET = "AKIDEMULATOR", "emulator/secret+KEY"
local FAST = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, task_modify = 0.1, task_delete = 0.1,
  endpoint_delete = 0.5, connection = 0.1, cdc_poll = 0.1 }

local running = {}

-- Starts the emulator command; returns { url=, h= }.
local function start_emulator(extra)
  local argv = { bin, root .. "/tools/dms-emulator.lua", "--port", "0", "--access-key", AKID,
    "--delays", json.encode(FAST), "--no-cdc", env = { MIGRUN_DMS_EMULATOR_SECRET = SECRET }, stdin = false }
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  local url
  argv.stdout = function(line) url = url or line end
  argv.stderr = "capture"
  local h = assert(proc.spawn(argv))
  local deadline = socket.gettime() + 20
  while not url and socket.gettime() < deadline do
    local ok, how = h:wait(0.05)
    if ok or how ~= "timeout" then error("emulator exited: " .. tostring(h.stderr)) end
  end
  assert(url, "emulator printed no URL")
  local e = { url = url, h = h }
  running[#running + 1] = e
  return e
end

local function client(e, extra)
  local opts = { endpoint_url = e.url, region = "us-east-1", access_key = AKID, secret_key = SECRET, env = {},
    retry_base = 0.01, max_attempts = 3 }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return assert(dms.client(opts))
end

teardown(function()
  for _, e in ipairs(running) do e.h:close() end
end)

local MAPPINGS = json.encode{ rules = { { ["rule-type"] = "selection", ["rule-id"] = "1", ["rule-name"] = "1",
  ["object-locator"] = { ["schema-name"] = "public", ["table-name"] = "%" }, ["rule-action"] = "include" } } }

local function endpoints(c, suffix)
  local src = assert(c:create_endpoint{ EndpointIdentifier = "src" .. suffix, EndpointType = "source",
    EngineName = "postgres", ServerName = "127.0.0.1", Port = 1, DatabaseName = "app", Username = "u",
    Password = "pw", PostgreSQLSettings = { SlotName = "dms_slot_01", PluginName = "pglogical" } })
  local dst = assert(c:create_endpoint{ EndpointIdentifier = "dst" .. suffix, EndpointType = "target",
    EngineName = "postgres", ServerName = "127.0.0.1", Port = 1, DatabaseName = "app", Username = "u",
    Password = "pw" })
  return src, dst
end

local function instance_arn(c)
  return assert(c:describe_replication_instances())[1].ReplicationInstanceArn
end

local function create_task(c, id, src, dst, extra)
  local p = { ReplicationTaskIdentifier = id, SourceEndpointArn = src.EndpointArn,
    TargetEndpointArn = dst.EndpointArn, ReplicationInstanceArn = instance_arn(c), MigrationType = "full-load",
    TableMappings = MAPPINGS }
  for k, v in pairs(extra or {}) do p[k] = v end
  return c:create_replication_task(p)
end

describe("dms emulator", function()
  local e, c
  setup(function()
    e = start_emulator()
    c = client(e)
  end)

  describe("protocol", function()
    it("answers JSON 1.1 with a request id", function()
      local res = assert(aws.request{ url = e.url .. "/", method = "POST", body = "{}",
        headers = aws.sign{ method = "POST", url = e.url .. "/", body = "{}", region = "us-east-1",
          service = "dms", access_key = AKID, secret_key = SECRET,
          headers = { ["Content-Type"] = "application/x-amz-json-1.1",
            ["X-Amz-Target"] = "AmazonDMSv20160101.DescribeReplicationInstances" } }.headers })
      assert.are.equal(200, res.status)
      assert.are.equal("application/x-amz-json-1.1", res.headers["content-type"])
      assert.is_string(res.headers["x-amzn-requestid"])
      local doc = json.decode(res.body)
      assert.are.equal("available", doc.ReplicationInstances[1].ReplicationInstanceStatus)
      assert.are.equal("migrun-emulator", doc.ReplicationInstances[1].ReplicationInstanceIdentifier)
    end)

    it("refuses a wrong secret key with InvalidSignatureException", function()
      local bad = client(e, { secret_key = "not-the-secret" })
      local res, err = bad:describe_endpoints()
      assert.is_nil(res)
      assert.are.equal("InvalidSignatureException", err.code)
      assert.are.equal(403, err.status)
      assert.is_false(err.retryable)
      assert.matches("signature we calculated does not match", err.message)
      assert.is_string(err.request_id)
    end)

    it("refuses an unknown access key, another region, a missing signature", function()
      local _, err = client(e, { access_key = "AKIDOTHER" }):describe_endpoints()
      assert.are.equal("UnrecognizedClientException", err.code)
      _, err = client(e, { region = "eu-west-1" }):describe_endpoints()
      assert.are.equal("InvalidSignatureException", err.code)
      assert.matches("scoped to a valid region", err.message)
      local res = assert(aws.request{ url = e.url .. "/", method = "POST", body = "{}",
        headers = { ["Content-Type"] = "application/x-amz-json-1.1",
          ["X-Amz-Target"] = "AmazonDMSv20160101.DescribeEndpoints" } })
      assert.are.equal(403, res.status)
      assert.are.equal("MissingAuthenticationTokenException", json.decode(res.body).__type)
    end)

    it("refuses a tampered body", function()
      local signed = aws.sign{ method = "POST", url = e.url .. "/", body = "{}", region = "us-east-1",
        service = "dms", access_key = AKID, secret_key = SECRET,
        headers = { ["Content-Type"] = "application/x-amz-json-1.1",
          ["X-Amz-Target"] = "AmazonDMSv20160101.DescribeEndpoints" } }
      local res = assert(aws.request{ url = e.url .. "/", method = "POST", body = '{"MaxRecords":20}',
        headers = signed.headers })
      assert.are.equal(403, res.status)
      assert.are.equal("InvalidSignatureException", json.decode(res.body).__type)
    end)

    it("answers an unknown operation with UnknownOperationException, and a message", function()
      local res, err = c:call("DescribeNothing", {})
      assert.is_nil(res)
      assert.are.equal("UnknownOperationException", err.code)
      assert.are.equal(400, err.status)
      assert.are.equal("Unknown operation AmazonDMSv20160101.DescribeNothing: this endpoint serves "
        .. "AmazonDMSv20160101.<Operation> (the DMS API)", err.message)
      -- a real DMS operation the emulator does not model: DMS's own fault, saying so
      res, err = c:call("ReloadTables", { ReplicationTaskArn = "arn:x", TablesToReload = {} })
      assert.is_nil(res)
      assert.are.equal("InvalidOperationFault", err.code)
      assert.are.equal(400, err.status)
      assert.is_false(err.retryable)
      assert.matches("^ReloadTables is a DMS operation the DMS emulator does not model", err.message)
      -- no X-Amz-Target at all
      local signed = aws.sign{ method = "POST", url = e.url .. "/", body = "{}", region = "us-east-1",
        service = "dms", access_key = AKID, secret_key = SECRET,
        headers = { ["Content-Type"] = "application/x-amz-json-1.1" } }
      local raw = assert(aws.request{ url = e.url .. "/", method = "POST", body = "{}", headers = signed.headers })
      assert.are.equal(400, raw.status)
      local doc = json.decode(raw.body)
      assert.are.equal("UnknownOperationException", doc.__type)
      assert.matches("Missing X%-Amz%-Target", doc.message)
    end)

    it("answers a missing required member with ValidationException, a wrong type with SerializationException",
      function()
      local _, err = c:call("CreateEndpoint", { EndpointType = "source", EngineName = "postgres" })
      assert.are.equal("ValidationException", err.code)
      assert.matches("endpointIdentifier", err.message)
      _, err = c:call("CreateEndpoint", { EndpointIdentifier = "x", EndpointType = "source",
        EngineName = "postgres", Port = "5432" })
      assert.are.equal("SerializationException", err.code)
    end)

    it("answers bad values with InvalidParameterValueException", function()
      local _, err = c:call("CreateEndpoint", { EndpointIdentifier = "bad--name", EndpointType = "source",
        EngineName = "postgres" })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("CreateEndpoint", { EndpointIdentifier = "ok", EndpointType = "sideways", EngineName = "postgres" })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("DescribeEndpoints", { MaxRecords = 5 })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("DescribeEndpoints", { Filters = { { Name = "colour", Values = { "red" } } } })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("DescribeEndpoints", { Marker = "garbage" })
      assert.are.equal("InvalidParameterValueException", err.code)
    end)
  end)

  describe("endpoints", function()
    it("creates, describes with filters and pages, and deletes", function()
      local made = {}
      for i = 1, 25 do
        local ep = assert(c:create_endpoint{ EndpointIdentifier = ("page-%02d"):format(i),
          EndpointType = i % 2 == 0 and "target" or "source", EngineName = "postgres",
          ServerName = "127.0.0.1", Port = 5432, Password = "secret-pw" })
        assert.are.equal("active", ep.Status)
        assert.is_nil(ep.Password)
        assert.matches("^arn:aws:dms:us%-east%-1:123456789012:endpoint:%u[%u%d]+$", ep.EndpointArn)
        made[#made + 1] = ep
      end
      assert.are.equal("SOURCE", made[1].EndpointType)
      -- one page of 20, then the rest with the Marker
      local first = assert(c:call("DescribeEndpoints", { MaxRecords = 20 }))
      assert.are.equal(20, #first.Endpoints)
      assert.is_string(first.Marker)
      local second = assert(c:call("DescribeEndpoints", { MaxRecords = 20, Marker = first.Marker }))
      assert.is_nil(second.Marker)
      local all = assert(c:describe_endpoints{ MaxRecords = 20 })
      assert.are.equal(#first.Endpoints + #second.Endpoints, #all)
      local targets = assert(c:describe_endpoints{ Filters = { ["endpoint-type"] = "target" } })
      for _, ep in ipairs(targets) do assert.are.equal("TARGET", ep.EndpointType) end
      local one = assert(c:describe_endpoints{ Filters = { ["endpoint-id"] = "page-07" } })
      assert.are.equal(1, #one)
      assert.are.equal(made[7].EndpointArn, one[1].EndpointArn)
      -- no match: ResourceNotFoundFault on the wire, an empty list from the client
      local _, err = c:call("DescribeEndpoints", { Filters = { { Name = "endpoint-id", Values = { "none" } } } })
      assert.are.equal("ResourceNotFoundFault", err.code)
      assert.are.same({}, assert(c:describe_endpoints{ Filters = { ["endpoint-id"] = "none" } }))
      -- duplicates
      _, err = c:create_endpoint{ EndpointIdentifier = "page-01", EndpointType = "source", EngineName = "postgres" }
      assert.are.equal("ResourceAlreadyExistsFault", err.code)
      -- delete: deleting, then gone
      -- (the second delete right after the first: a loaded machine takes longer than
      -- the emulator's deleting window to delete 25 endpoints)
      for i, ep in ipairs(made) do
        local d = assert(c:delete_endpoint(ep.EndpointArn))
        assert.are.equal("deleting", d.Status)
        if i == 1 then
          _, err = c:delete_endpoint(made[1].EndpointArn)
          assert.are.equal("InvalidResourceStateFault", err.code)
        end
      end
      local left
      for _ = 1, 50 do
        left = assert(c:describe_endpoints{ Filters = { ["endpoint-id"] = "page-01" } })
        if #left == 0 then break end
        socket.sleep(0.1)
      end
      assert.are.same({}, left)
      _, err = c:delete_endpoint(made[1].EndpointArn)
      assert.are.equal("ResourceNotFoundFault", err.code)
    end)

    it("modifies an endpoint: the members it names, PostgreSQLSettings merged or exact, DMS's faults", function()
      local ep = assert(c:create_endpoint{ EndpointIdentifier = "mod-src", EndpointType = "source",
        EngineName = "postgres", ServerName = "127.0.0.1", Port = 5432, DatabaseName = "app", Username = "u",
        Password = "old-pw", PostgreSQLSettings = { SlotName = "dms_slot_01", PluginName = "pglogical" } })
      local res = assert(c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, Port = 6543,
        DatabaseName = "app2", Password = "new-pw", PostgreSQLSettings = { HeartbeatEnable = true } }))
      local m = res.Endpoint
      assert.are.equal(ep.EndpointArn, m.EndpointArn)
      assert.are.equal(6543, m.Port)
      assert.are.equal("app2", m.DatabaseName)
      assert.are.equal("u", m.Username)           -- not named: unchanged
      assert.is_nil(m.Password)
      assert.are.same({ SlotName = "dms_slot_01", PluginName = "pglogical", HeartbeatEnable = true },
        m.PostgreSQLSettings)
      local seen = assert(c:describe_endpoints{ Filters = { ["endpoint-arn"] = ep.EndpointArn } })[1]
      assert.are.equal(6543, seen.Port)
      -- ExactSettings: the settings given are all the endpoint keeps
      m = assert(c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, ExactSettings = true,
        PostgreSQLSettings = { SlotName = "dms_slot_02" } })).Endpoint
      assert.are.same({ SlotName = "dms_slot_02" }, m.PostgreSQLSettings)
      -- renamed, in lower case as DMS keeps identifiers
      m = assert(c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, EndpointIdentifier = "Mod-Renamed" })).Endpoint
      assert.are.equal("mod-renamed", m.EndpointIdentifier)

      -- refusals, with DMS's codes and a message
      local other = assert(c:create_endpoint{ EndpointIdentifier = "mod-other", EndpointType = "target",
        EngineName = "postgres" })
      local _, err = c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, EndpointIdentifier = "mod-other" })
      assert.are.equal("ResourceAlreadyExistsFault", err.code)
      _, err = c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, EndpointIdentifier = "bad--name" })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, SslMode = "sometimes" })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("ModifyEndpoint", { EndpointArn = ep.EndpointArn, Port = "5432" })
      assert.are.equal("SerializationException", err.code)
      _, err = c:call("ModifyEndpoint", { Port = 5432 })
      assert.are.equal("ValidationException", err.code)
      assert.matches("endpointArn", err.message)
      _, err = c:call("ModifyEndpoint", { EndpointArn = "arn:aws:dms:us-east-1:123456789012:endpoint:NOPE" })
      assert.are.equal("ResourceNotFoundFault", err.code)
      assert.is_true(#err.message > 0)
      -- an endpoint being deleted cannot be modified
      assert(c:delete_endpoint(other.EndpointArn))
      _, err = c:call("ModifyEndpoint", { EndpointArn = other.EndpointArn, Port = 1 })
      assert.are.equal("InvalidResourceStateFault", err.code)
      assert.matches("is deleting", err.message)
      assert(c:delete_endpoint(ep.EndpointArn))
    end)

    it("tests connections: testing, then successful against a listening port, failed otherwise", function()
      local listener = assert(socket.bind("127.0.0.1", 0))
      local _, port = listener:getsockname()
      local up = assert(c:create_endpoint{ EndpointIdentifier = "conn-up", EndpointType = "source",
        EngineName = "postgres", ServerName = "127.0.0.1", Port = tonumber(port) })
      listener:close() -- nothing listens any more: the connection test fails
      local inst = instance_arn(c)
      local conn = assert(c:test_connection(inst, up.EndpointArn))
      assert.are.equal("testing", conn.Status)
      local _, err = c:test_connection(inst, up.EndpointArn)
      assert.are.equal("InvalidResourceStateFault", err.code)
      local res
      res, err = c:wait_for_connection(inst, up.EndpointArn, 10, 0.05)
      assert.is_nil(res)
      assert.are.equal("ConnectionTestFailed", err.code)
      -- a remote host is never contacted
      local far = assert(c:create_endpoint{ EndpointIdentifier = "conn-far", EndpointType = "source",
        EngineName = "postgres", ServerName = "192.0.2.1", Port = 5432 })
      assert(c:test_connection(inst, far.EndpointArn))
      res, err = c:wait_for_connection(inst, far.EndpointArn, 10, 0.05)
      assert.is_nil(res)
      assert.matches("loopback", err.message)
      _, err = c:test_connection("arn:aws:dms:us-east-1:123456789012:rep:NOPE", up.EndpointArn)
      assert.are.equal("ResourceNotFoundFault", err.code)
      local list = assert(c:describe_connections{ Filters = { ["endpoint-arn"] = up.EndpointArn } })
      assert.are.equal(1, #list)
      assert.are.equal("failed", list[1].Status)
      assert.are.equal("migrun-emulator", list[1].ReplicationInstanceIdentifier)
    end)
  end)

  describe("tasks", function()
    local src, dst
    setup(function() src, dst = endpoints(c, "-tasks") end)

    it("goes creating -> ready -> starting -> running -> stopping -> stopped, and deletes", function()
      local t = assert(create_task(c, "life-1", src, dst, { MigrationType = "cdc", CdcStartPosition = "0/1000" }))
      assert.are.equal("creating", t.Status)
      assert.is_number(t.ReplicationTaskCreationDate)
      local _, err = c:start_replication_task(t.ReplicationTaskArn)
      assert.are.equal("InvalidResourceStateFault", err.code)
      assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
      _, err = c:start_replication_task(t.ReplicationTaskArn, "resume-processing")
      assert.are.equal("InvalidResourceStateFault", err.code)
      local s = assert(c:start_replication_task(t.ReplicationTaskArn, "start-replication"))
      assert.are.equal("starting", s.Status)
      local r = assert(c:wait_for_task(t.ReplicationTaskArn, "running", 10, 0.05))
      assert.are.equal("0/1000", r.CdcStartPosition)
      _, err = c:modify_replication_task{ ReplicationTaskArn = t.ReplicationTaskArn, TableMappings = MAPPINGS }
      assert.are.equal("InvalidResourceStateFault", err.code)
      _, err = c:delete_replication_task(t.ReplicationTaskArn)
      assert.are.equal("InvalidResourceStateFault", err.code)
      local st = assert(c:stop_replication_task(t.ReplicationTaskArn))
      assert.are.equal("stopping", st.Status)
      local stopped = assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
      assert.are.equal("Stop Reason NORMAL", stopped.StopReason)
      _, err = c:stop_replication_task(t.ReplicationTaskArn)
      assert.are.equal("InvalidResourceStateFault", err.code)
      -- modify when stopped: modifying, then back to stopped; the migration type is fixed
      local m = assert(c:modify_replication_task{ ReplicationTaskArn = t.ReplicationTaskArn,
        ReplicationTaskSettings = '{"Logging":{"EnableLogging":true}}' })
      assert.are.equal("modifying", m.Status)
      assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
      _, err = c:modify_replication_task{ ReplicationTaskArn = t.ReplicationTaskArn, MigrationType = "full-load" }
      assert.are.equal("InvalidParameterValueException", err.code)
      -- resume after a run
      assert(c:start_replication_task(t.ReplicationTaskArn, "resume-processing"))
      assert(c:wait_for_task(t.ReplicationTaskArn, "running", 10, 0.05))
      assert(c:stop_replication_task(t.ReplicationTaskArn))
      assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
      -- an endpoint in use cannot be deleted
      _, err = c:delete_endpoint(src.EndpointArn)
      assert.are.equal("InvalidResourceStateFault", err.code)
      local d = assert(c:delete_replication_task(t.ReplicationTaskArn))
      assert.are.equal("deleting", d.Status)
      assert(c:wait_for_task(t.ReplicationTaskArn, "deleted", 10, 0.05))
      _, err = c:call("StopReplicationTask", { ReplicationTaskArn = t.ReplicationTaskArn })
      assert.are.equal("ResourceNotFoundFault", err.code)
    end)

    it("finishes a full-load task on its own", function()
      local t = assert(create_task(c, "full-1", src, dst))
      assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
      assert(c:start_replication_task(t.ReplicationTaskArn))
      local done = assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
      assert.are.equal("Stop Reason FULL_LOAD_ONLY_FINISHED", done.StopReason)
      assert.are.equal(100, done.ReplicationTaskStats.FullLoadProgressPercent)
      assert.are.same({}, assert(c:describe_table_statistics(t.ReplicationTaskArn)))
    end)

    it("checks the start position rules", function()
      local _, err = create_task(c, "pos-1", src, dst, { MigrationType = "cdc", CdcStartPosition = "not-an-lsn" })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = create_task(c, "pos-2", src, dst, { MigrationType = "cdc", CdcStartPosition = "0/10",
        CdcStartTime = 1590524772 })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = create_task(c, "pos-3", src, dst, { MigrationType = "cdc", CdcStartTime = 1590524772 })
      assert.are.equal("InvalidParameterValueException", err.code)
      assert.matches("PostgreSQL", err.message)
      -- a checkpoint string is accepted
      local t = assert(create_task(c, "pos-4", src, dst, { MigrationType = "cdc",
        CdcStartPosition = "checkpoint:V1#1#000004AF/B00000D0#0#0#*#0#0" }))
      -- a CDC task without a start position fails when it starts
      local t2 = assert(create_task(c, "pos-5", src, dst, { MigrationType = "cdc" }))
      assert(c:wait_for_task(t2.ReplicationTaskArn, "ready", 10, 0.05))
      assert(c:start_replication_task(t2.ReplicationTaskArn))
      local failed = assert(c:wait_for_task(t2.ReplicationTaskArn, "failed", 10, 0.05))
      assert.matches("CdcStartPosition", failed.LastFailureMessage)
      assert.are.equal("Stop Reason FATAL_ERROR", failed.StopReason)
      -- a failed task can be modified and started again
      assert(c:modify_replication_task{ ReplicationTaskArn = t2.ReplicationTaskArn, CdcStartPosition = "0/20" })
      assert(c:wait_for_task(t2.ReplicationTaskArn, "failed", 10, 0.05))
      _, err = c:start_replication_task(t2.ReplicationTaskArn, "reload-target")
      assert.are.equal("InvalidParameterValueException", err.code)
      assert(c:start_replication_task(t2.ReplicationTaskArn))
      assert(c:wait_for_task(t2.ReplicationTaskArn, "running", 10, 0.05))
      assert(c:stop_replication_task(t2.ReplicationTaskArn))
      assert(c:wait_for_task(t2.ReplicationTaskArn, "stopped", 10, 0.05))
      assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
    end)

    it("refuses bad task documents and duplicates", function()
      local _, err = create_task(c, "doc-1", src, dst, { TableMappings = "{not json" })
      assert.are.equal("InvalidParameterValueException", err.code)
      assert.are.equal("Invalid Table Mappings document", err.message)
      _, err = create_task(c, "doc-2", src, dst, { ReplicationTaskSettings = "[1" })
      assert.are.equal("Invalid task settings JSON", err.message)
      _, err = create_task(c, "doc-3", src, dst,
        { ReplicationTaskSettings = '{"Logging":{"CloudWatchLogGroup":"g"}}' })
      assert.matches("cannot be set on create", err.message)
      _, err = create_task(c, "doc-4", src, dst, { MigrationType = "sideways" })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = create_task(c, "doc-5", dst, src)
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = create_task(c, "doc-6", src, { EndpointArn = "arn:aws:dms:us-east-1:123456789012:endpoint:NONE" })
      assert.are.equal("ResourceNotFoundFault", err.code)
      assert(create_task(c, "doc-7", src, dst))
      _, err = create_task(c, "doc-7", src, dst)
      assert.are.equal("ResourceAlreadyExistsFault", err.code)
      _, err = c:call("CreateReplicationTask", { ReplicationTaskIdentifier = "doc-8" })
      assert.are.equal("ValidationException", err.code)
    end)

    it("describes with filters, pages, and omits settings on request", function()
      for i = 1, 21 do assert(create_task(c, ("many-%02d"):format(i), src, dst)) end
      local page1 = assert(c:call("DescribeReplicationTasks", { MaxRecords = 20,
        Filters = { { Name = "migration-type", Values = { "full-load" } } } }))
      assert.are.equal(20, #page1.ReplicationTasks)
      assert.is_string(page1.Marker)
      local all = assert(c:describe_replication_tasks{ MaxRecords = 20, Filters = { ["migration-type"] = "full-load" } })
      assert.is_true(#all >= 21)
      local one = assert(c:describe_replication_tasks{ Filters = { ["replication-task-id"] = "many-03" },
        WithoutSettings = true })
      assert.are.equal(1, #one)
      assert.is_nil(one[1].ReplicationTaskSettings)
      assert.is_nil(one[1].TableMappings)
      local by_ep = assert(c:describe_replication_tasks{ Filters = { ["endpoint-arn"] = dst.EndpointArn } })
      assert.is_true(#by_ep >= 21)
      local _, err = c:call("DescribeTableStatistics", { ReplicationTaskArn = one[1].ReplicationTaskArn,
        MaxRecords = 501 })
      assert.are.equal("InvalidParameterValueException", err.code)
      _, err = c:call("DescribeTableStatistics", { ReplicationTaskArn = "arn:aws:dms:us-east-1:123456789012:task:NONE" })
      assert.are.equal("ResourceNotFoundFault", err.code)
    end)
  end)

  describe("faults", function()
    it("throttles a share of calls deterministically; the client retries through it", function()
      local f = start_emulator{ "--faults", json.encode{ seed = 7, throttle = 0.3 } }
      local fc = client(f, { max_attempts = 10 })
      for i = 1, 15 do
        assert(fc:create_endpoint{ EndpointIdentifier = "thr-" .. i, EndpointType = "source",
          EngineName = "postgres" })
      end
      local stats = assert(emulator.control(fc, "GetFaults"))
      assert.is_true(stats.Injected > 0)
      assert.is_true(stats.Requests > 15)
      -- without retries the throttling shows
      local once = client(f, { max_attempts = 1 })
      local codes = {}
      for _ = 1, 20 do
        local _, err = once:describe_endpoints()
        if err then codes[err.code] = (codes[err.code] or 0) + 1 end
      end
      assert.is_true((codes.ThrottlingException or 0) > 0)
      -- the same seed gives the same sequence
      local g = start_emulator{ "--faults", json.encode{ seed = 7, throttle = 0.3 } }
      local gc = client(g, { max_attempts = 10 })
      for i = 1, 15 do
        assert(gc:create_endpoint{ EndpointIdentifier = "thr-" .. i, EndpointType = "source",
          EngineName = "postgres" })
      end
      assert.are.equal(stats.Injected, assert(emulator.control(gc, "GetFaults")).Injected)
    end)

    it("injects 5xx and latency at runtime through MigrunEmulator.SetFaults", function()
      local f = start_emulator()
      local once = client(f, { max_attempts = 1 })
      assert(emulator.control(once, "SetFaults", { seed = 3, error5xx = 1 }))
      local _, err = once:describe_replication_instances()
      assert.is_true(err.status == 500 or err.status == 503)
      assert.is_true(err.retryable)
      assert(emulator.control(once, "SetFaults", { latency = 0.3 }))
      local t0 = socket.gettime()
      assert(once:describe_replication_instances())
      assert.is_true(socket.gettime() - t0 >= 0.3)
      local _, cerr = emulator.control(once, "SetFaults", { throttle = 2 })
      assert.matches("InvalidParameterValueException", cerr)
      -- the control operations are signed too
      local _, serr = emulator.control(client(f, { secret_key = "wrong" }), "SetFaults", {})
      assert.matches("InvalidSignatureException", serr)
      assert(emulator.control(once, "SetFaults", {}))
    end)

    it("fails a named task with its LastFailureMessage", function()
      local f = start_emulator{ "--faults", json.encode{ fail_tasks = { ["doomed-1"] = "ERROR: injected for the test" } } }
      local fc = client(f)
      local src, dst = endpoints(fc, "-f")
      local t = assert(create_task(fc, "doomed-1", src, dst, { MigrationType = "cdc", CdcStartPosition = "0/10" }))
      local ok = assert(create_task(fc, "fine-1", src, dst, { MigrationType = "cdc", CdcStartPosition = "0/10" }))
      assert(fc:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
      assert(fc:wait_for_task(ok.ReplicationTaskArn, "ready", 10, 0.05))
      assert(fc:start_replication_task(t.ReplicationTaskArn))
      assert(fc:start_replication_task(ok.ReplicationTaskArn))
      local res, err = fc:wait_for_task(t.ReplicationTaskArn, "running", 10, 0.05)
      assert.is_nil(res)
      assert.are.equal("TaskFailed", err.code)
      assert.matches("injected for the test", err.message)
      assert(fc:wait_for_task(ok.ReplicationTaskArn, "running", 10, 0.05))
      -- failing a running task at runtime
      assert(emulator.control(fc, "SetFaults", { fail_tasks = { ["fine-1"] = "lost the slot" } }))
      local failed = assert(fc:wait_for_task(ok.ReplicationTaskArn, "failed", 10, 0.05))
      assert.are.equal("lost the slot", failed.LastFailureMessage)
    end)
  end)
end)

-- A real CDC run on migrun.rehearsal.lab clusters: a pglogical slot, node and the two
-- replication sets as the runbook makes them, changes before and after a
-- captured LSN, a CDC task started at that LSN.
describe("dms emulator CDC", function()
  local lab = require "migrun.rehearsal.lab"
  local L, e, c

  setup(function()
    L = assert(lab.start{})
    e = start_emulator()
    -- the spec's emulator runs with --no-cdc; this one reads slots
    e.h:close()
    local argv = { bin, root .. "/tools/dms-emulator.lua", "--port", "0", "--access-key", AKID,
      "--delays", json.encode(FAST), env = { MIGRUN_DMS_EMULATOR_SECRET = SECRET }, stdin = false,
      stderr = "capture" }
    local url
    argv.stdout = function(line) url = url or line end
    e.h = assert(proc.spawn(argv))
    local deadline = socket.gettime() + 20
    while not url and socket.gettime() < deadline do assert(not e.h:wait(0.05)) end
    e.url = url
    c = client(e)
  end)
  teardown(function() if L then L:stop() end end)

  local function q(cluster, sql) return assert(cluster:psql(sql)) end
  -- on the target as the role DMS connects as (no superuser, as on RDS), so that it owns what it writes
  local function qt(sql) return assert(L.target:psql(sql, { user = "migrun" })) end

  it("applies exactly the changes after the start LSN, with LOB truncation and a table without a key", function()
    local tables = [[
      create table public.t1 (id int primary key, email text, body jsonb, note text);
      create table public.t2 (id int, v text);
      create table public.t3 (id int primary key, code text unique);]]
    q(L.source, tables .. [[
      select pglogical.create_node(node_name := 'src', dsn := 'host=127.0.0.1 port=]] .. L.source.port .. [[ dbname=app');
      select pg_create_logical_replication_slot('dms_slot_01', 'pglogical');
      select pglogical.create_replication_set('dms_slot_01', false, true, true, false);
      select pglogical.create_replication_set('idms_slot_01', true, false, false, true);
      select pglogical.replication_set_add_table('dms_slot_01', 'public.t1');
      select pglogical.replication_set_add_table('idms_slot_01', 'public.t1');
      select pglogical.replication_set_add_table('idms_slot_01', 'public.t2');
      insert into t1 values (1, 'a@x', '{"k":1}', 'one'), (2, 'b@x', '{"k":2}', 'two');
      insert into t2 values (1, 'before');]])
    -- the target holds what the full load copied as of the start LSN
    qt(tables .. [[
      insert into t1 values (1, 'a@x', '{"k":1}', 'one'), (2, 'b@x', '{"k":2}', 'two');
      insert into t2 values (1, 'before');]])
    local start = q(L.source, "select pg_current_wal_lsn()"):gsub("%s+", "")
    local big = '{"pad":"' .. ("x"):rep(3000) .. '"}'
    q(L.source, [[
      insert into t1 values (3, 'c@x', '{"k":3}', 'three');
      update t1 set email = 'aa@x', body = '{"k":10}' where id = 1;
      delete from t1 where id = 2;
      insert into t1 values (4, 'd@x', ']] .. big .. [[', 'big json');
      insert into t2 values (2, 'after');
      update t2 set v = 'changed' where id = 1;
      truncate t2;
      insert into t2 values (3, 'after truncate');]])

    local src = assert(c:create_endpoint{ EndpointIdentifier = "lab-src", EndpointType = "source",
      EngineName = "postgres", ServerName = "127.0.0.1", Port = L.source.port, DatabaseName = "app",
      Username = "migrun", Password = L.password,
      ExtraConnectionAttributes = "PluginName=PGLOGICAL;slotName=dms_slot_01" })
    local dst = assert(c:create_endpoint{ EndpointIdentifier = "lab-dst", EndpointType = "target",
      EngineName = "postgres", ServerName = "127.0.0.1", Port = L.target.port, DatabaseName = "app",
      Username = "migrun", Password = L.password })
    local inst = instance_arn(c)
    assert(c:test_connection(inst, src.EndpointArn))
    assert(c:wait_for_connection(inst, src.EndpointArn, 20, 0.05))
    local settings = json.encode{ TargetMetadata = { SupportLobs = true, FullLobMode = false,
      LimitedSizeLobMode = true, LobMaxSize = 1 }, ControlTablesSettings = { StatusTableEnabled = true } }
    local mappings = json.encode{ rules = { { ["rule-type"] = "selection", ["rule-id"] = "1", ["rule-name"] = "1",
      ["object-locator"] = { ["schema-name"] = "public", ["table-name"] = "t%" }, ["rule-action"] = "include" },
      { ["rule-type"] = "selection", ["rule-id"] = "2", ["rule-name"] = "2",
      ["object-locator"] = { ["schema-name"] = "public", ["table-name"] = "t3" }, ["rule-action"] = "exclude" } } }
    local t = assert(create_task(c, "cdc-1", src, dst, { MigrationType = "cdc", CdcStartPosition = start,
      TableMappings = mappings, ReplicationTaskSettings = settings }))
    assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
    assert(c:start_replication_task(t.ReplicationTaskArn))
    assert(c:wait_for_task(t.ReplicationTaskArn, "running", 20, 0.05))
    local want1 = "1|aa@x|{\"k\": 10}|one\n3|c@x|{\"k\": 3}|three"
    local deadline = socket.gettime() + 30
    while socket.gettime() < deadline and q(L.target, "select * from t1 order by id"):gsub("%s+$", "") ~= want1 do
      assert(c:describe_replication_tasks()) -- keeps the emulator's loop busy
      socket.sleep(0.1)
    end
    assert.are.equal(want1, (q(L.target, "select * from t1 order by id"):gsub("%s+$", "")))
    -- t2 has no key: its update is ignored (pglogical does not even send it); the truncate is not
    -- applied (DMS does not process TRUNCATE from a PostgreSQL source) and is logged
    assert.are.equal("1|before\n2|after\n3|after truncate", (q(L.target, "select * from t2 order by id"):gsub("%s+$", "")))
    -- the truncated JSON was rejected by the target and logged
    local exc = q(L.target, [[select "TASK_NAME", "TABLE_OWNER", "TABLE_NAME", "ERROR" from awsdms_apply_exceptions]])
    assert.matches("^" .. t.ReplicationTaskArn:match(":task:(.+)$") .. "|public|t1|", exc)
    assert.matches("22P02", exc)
    assert.are.equal("1", (q(L.target, "select count(*) from awsdms_apply_exceptions"):gsub("%s+", "")))
    local log = assert(emulator.control(c, "GetTaskLog", { ReplicationTaskArn = t.ReplicationTaskArn })).Lines
    local found
    for _, line in ipairs(log) do
      local n = line:match("^%[SOURCE_CAPTURE %]W: Value of column 'body' in table 'public%.t1' was truncated "
        .. "to 1024 bytes, actual length: (%d+) bytes$")
      if n and tonumber(n) >= #big - 2 then found = true end
    end
    assert.is_true(found, table.concat(log, "\n"))
    assert.matches("TRUNCATE of table 'public.t2' is not applied", table.concat(log, "\n"), 1, true)
    -- statistics per table; t3 is excluded
    local stats = {}
    for _, s in ipairs(assert(c:describe_table_statistics(t.ReplicationTaskArn))) do stats[s.TableName] = s end
    assert.is_nil(stats.t3)
    assert.are.same({ 2, 1, 1, 1, 1, 1 }, { stats.t1.Inserts, stats.t1.Updates, stats.t1.Deletes,
      stats.t1.AppliedInserts, stats.t1.AppliedUpdates, stats.t1.AppliedDeletes })
    assert.are.equal(2, stats.t2.Inserts)
    assert.are.equal(1, stats.t2.Ddls)
    assert.matches("CHANGE PROCESSING", q(L.target, "select task_status from awsdms_status"))
    -- the slot is confirmed up to what was applied
    local running = assert(c:describe_task(t.ReplicationTaskArn))
    assert.matches("^checkpoint:V1#", running.RecoveryCheckpoint)
    assert.are.equal("", (q(L.source, [[select data from pg_logical_slot_peek_changes('dms_slot_01', NULL, NULL,
      'min_proto_version','1','max_proto_version','1','startup_params_format','1','proto_format','json',
      'pglogical.replication_set_names','dms_slot_01,idms_slot_01') where data::json->>'action' = 'I']]):gsub("%s+", "")))
    assert(c:stop_replication_task(t.ReplicationTaskArn))
    assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
    assert.matches("NOT RUNNING", q(L.target, "select task_status from awsdms_status"))

    -- a start position older than the slot's confirmed_flush_lsn fails the task
    local old = assert(create_task(c, "cdc-old", src, dst, { MigrationType = "cdc", CdcStartPosition = start,
      TableMappings = mappings }))
    assert(c:wait_for_task(old.ReplicationTaskArn, "ready", 10, 0.05))
    assert(c:start_replication_task(old.ReplicationTaskArn))
    local _, err = c:wait_for_task(old.ReplicationTaskArn, "running", 20, 0.05)
    assert.matches("older than the confirmed_flush_lsn", err.message)
    -- an unknown slot too
    local nos = assert(c:create_endpoint{ EndpointIdentifier = "lab-noslot", EndpointType = "source",
      EngineName = "postgres", ServerName = "127.0.0.1", Port = L.source.port, DatabaseName = "app",
      Username = "postgres", PostgreSQLSettings = { SlotName = "nope" } })
    local ns = assert(create_task(c, "cdc-noslot", nos, dst, { MigrationType = "cdc", CdcStartPosition = start }))
    assert(c:wait_for_task(ns.ReplicationTaskArn, "ready", 10, 0.05))
    assert(c:start_replication_task(ns.ReplicationTaskArn))
    _, err = c:wait_for_task(ns.ReplicationTaskArn, "running", 20, 0.05)
    assert.matches("Replication slot 'nope' does not exist", err.message)
  end)

  -- The DMS boundary (docs/dms-boundary.md): without migrun's adaptations the target refuses what
  -- PostgreSQL refuses and fires its own triggers; with them (a remove-column rule, the identity made
  -- BY DEFAULT, the AfterConnectScript, MapUnboundedNumericAsString on both endpoints) every change lands.
  it("refuses generated and ALWAYS identity values, fires target triggers and cuts unbounded numerics, "
      .. "until the rules and settings DMS supports say otherwise", function()
    local tables = [[
      create schema fid;
      create table fid.line_item (id int primary key, qty int, price int,
        total_price int generated always as (qty * price) stored);
      create table fid.ident (id int generated always as identity primary key, v text);
      create table fid.amounts (id int primary key, x numeric);
      create table fid.audit (id bigint generated by default as identity primary key, msg text);
      create table fid.watched (id int primary key, v text);]]
    q(L.source, tables .. [[
      select pg_create_logical_replication_slot('dms_slot_03', 'pglogical');
      select pglogical.create_replication_set('dms_slot_03', false, true, true, false);
      select pglogical.create_replication_set('idms_slot_03', true, false, false, true);
      select pglogical.replication_set_add_all_tables('dms_slot_03', array['fid']);
      select pglogical.replication_set_add_all_tables('idms_slot_03', array['fid']);]])
    qt(tables .. [[
      create function fid.note() returns trigger language plpgsql as $$
        begin insert into fid.audit (msg) values ('fired for ' || new.id); return new; end $$;
      create trigger watched_note after insert on fid.watched for each row execute function fid.note();]])
    local function endpoint(id, kind, settings, user)
      local p = { EndpointIdentifier = id, EndpointType = kind, EngineName = "postgres", ServerName = "127.0.0.1",
        Port = kind == "source" and L.source.port or L.target.port, DatabaseName = "app",
        Username = user or "migrun", Password = user == nil and L.password or nil, PostgreSQLSettings = settings }
      return assert(c:create_endpoint(p))
    end
    local select_fid = { ["rule-type"] = "selection", ["rule-id"] = "1", ["rule-name"] = "1",
      ["object-locator"] = { ["schema-name"] = "fid", ["table-name"] = "%" }, ["rule-action"] = "include" }
    local function run(id, src, dst, rules, changes)
      local start = q(L.source, "select pg_current_wal_lsn()"):gsub("%s+", "")
      q(L.source, changes)
      local want = q(L.source, "select pg_current_wal_lsn()"):gsub("%s+", "")
      local t = assert(create_task(c, id, src, dst, { MigrationType = "cdc", CdcStartPosition = start,
        TableMappings = json.encode{ rules = rules } }))
      assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
      assert(c:start_replication_task(t.ReplicationTaskArn))
      local task = assert(c:wait_for_task(t.ReplicationTaskArn, { "running", "failed" }, 20, 0.05))
      if task.Status == "running" then
        local deadline = socket.gettime() + 30
        repeat
          assert(c:describe_replication_tasks()) -- keeps the emulator's loop busy
          socket.sleep(0.1)
        until q(L.source, ("select confirmed_flush_lsn >= '%s' from pg_replication_slots where slot_name = 'dms_slot_03'")
          :format(want)):match("t") or socket.gettime() > deadline
        assert(c:stop_replication_task(t.ReplicationTaskArn))
        assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
      end
      return assert(c:describe_task(t.ReplicationTaskArn))
    end
    local function exceptions()
      return q(L.target, [[select coalesce(string_agg("TABLE_NAME" || ': ' || "ERROR", E'\n' order by "TABLE_NAME"), '')
        from awsdms_apply_exceptions where "TABLE_OWNER" = 'fid']])
    end

    -- 1. as DMS does by default
    local plain_src, plain_dst = endpoint("fid-src", "source", { SlotName = "dms_slot_03" }), endpoint("fid-dst", "target")
    run("fid-plain", plain_src, plain_dst, { select_fid }, [[
      insert into fid.line_item (id, qty, price) values (1, 2, 3);
      insert into fid.ident (v) values ('one');
      insert into fid.amounts values (1, 0.611111104488373);
      insert into fid.watched values (1, 'x');]])
    local exc = exceptions()
    assert.matches("line_item: RetCode: SQL_ERROR  SqlState: 428C9", exc, 1, true)
    assert.matches('cannot insert a non-DEFAULT value into column "total_price"', exc, 1, true)
    assert.matches("ident: RetCode: SQL_ERROR  SqlState: 428C9", exc, 1, true)
    assert.equal("0", q(L.target, "select count(*) from fid.line_item"))
    assert.equal("0", q(L.target, "select count(*) from fid.ident"))
    assert.equal("0.611111", q(L.target, "select x from fid.amounts where id = 1"))
    assert.equal("1|x", q(L.target, "select * from fid.watched"))
    assert.equal("fired for 1", q(L.target, "select string_agg(msg, ',') from fid.audit"))

    -- 2. with what migrun sets up: the target's identity BY DEFAULT (fidelity.adapt), and the DMS documents
    qt("alter table fid.ident alter column id set generated by default")
    local src = endpoint("fid-src-2", "source", { SlotName = "dms_slot_03", MapUnboundedNumericAsString = true })
    local dst = endpoint("fid-dst-2", "target", { AfterConnectScript = "SET session_replication_role = replica",
      MapUnboundedNumericAsString = true })
    local remove = { ["rule-type"] = "transformation", ["rule-id"] = "2", ["rule-name"] = "2",
      ["rule-target"] = "column", ["rule-action"] = "remove-column",
      ["object-locator"] = { ["schema-name"] = "fid", ["table-name"] = "line[_]item", ["column-name"] = "total[_]price" } }
    local before = exceptions()
    local done = run("fid-adapted", src, dst, { select_fid, remove }, [[
      insert into fid.line_item (id, qty, price) values (2, 2, 5);
      update fid.line_item set qty = 3 where id = 2;
      insert into fid.ident (v) values ('two');
      insert into fid.amounts values (2, 0.611111104488373123456789);
      insert into fid.watched values (2, 'y');]])
    assert.equal("stopped", done.Status)
    assert.equal(before, exceptions())
    assert.equal("2|3|5|15", q(L.target, "select * from fid.line_item"))
    assert.equal("2|two", q(L.target, "select * from fid.ident"))
    assert.equal("0.611111104488373123456789", q(L.target, "select x from fid.amounts where id = 2"))
    assert.equal("1|x\n2|y", q(L.target, "select * from fid.watched order by id"))
    assert.equal("fired for 1", q(L.target, "select string_agg(msg, ',') from fid.audit"), "the target trigger fired again")

    -- 3. a role the target does not let set session_replication_role: the task fails, as DMS's would
    q(L.target, "create role fid_nopriv login; grant usage on schema fid to fid_nopriv")
    local nopriv = endpoint("fid-dst-3", "target", { AfterConnectScript = "SET session_replication_role = replica" },
      "fid_nopriv")
    local failed = run("fid-nopriv", src, nopriv, { select_fid }, "insert into fid.watched values (3, 'z')")
    assert.equal("failed", failed.Status)
    assert.matches("after connect script failed", failed.LastFailureMessage, 1, true)
    assert.matches("session_replication_role", failed.LastFailureMessage, 1, true)
  end)

  -- A CDC task over its own slot: the slot and its two sets on the tables of `schema`, endpoints as the
  -- role migrun, `changes` made on the source after the start position; returns when the slot is
  -- confirmed past them, the task stopped, with its log.
  local function cdc_run(id, slot, schema, settings, changes)
    q(L.source, ([[
      select pg_create_logical_replication_slot('%s', 'pglogical');
      select pglogical.create_replication_set('%s', false, true, true, false);
      select pglogical.create_replication_set('i%s', true, false, false, true);
      select pglogical.replication_set_add_all_tables('%s', array['%s']);
      select pglogical.replication_set_add_all_tables('i%s', array['%s']);]]):format(slot, slot, slot, slot, schema,
      slot, schema))
    local start = q(L.source, "select pg_current_wal_lsn()"):gsub("%s+", "")
    q(L.source, changes)
    local want = q(L.source, "select pg_current_wal_lsn()"):gsub("%s+", "")
    local function endpoint(kind, port)
      return assert(c:create_endpoint{ EndpointIdentifier = id .. "-" .. kind, EndpointType = kind,
        EngineName = "postgres", ServerName = "127.0.0.1", Port = port, DatabaseName = "app", Username = "migrun",
        Password = L.password, PostgreSQLSettings = kind == "source" and { SlotName = slot } or nil })
    end
    local t = assert(create_task(c, id, endpoint("source", L.source.port), endpoint("target", L.target.port),
      { MigrationType = "cdc", CdcStartPosition = start, ReplicationTaskSettings = settings and json.encode(settings),
        TableMappings = json.encode{ rules = { { ["rule-type"] = "selection", ["rule-id"] = "1", ["rule-name"] = "1",
          ["object-locator"] = { ["schema-name"] = schema, ["table-name"] = "%" }, ["rule-action"] = "include" } } } }))
    assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
    assert(c:start_replication_task(t.ReplicationTaskArn))
    assert(c:wait_for_task(t.ReplicationTaskArn, "running", 20, 0.05))
    local deadline = socket.gettime() + 30
    repeat
      assert(c:describe_replication_tasks()) -- keeps the emulator's loop busy
      socket.sleep(0.1)
    until q(L.source, ("select confirmed_flush_lsn >= '%s' from pg_replication_slots where slot_name = '%s'")
      :format(want, slot)):match("t") or socket.gettime() > deadline
    assert(c:stop_replication_task(t.ReplicationTaskArn))
    assert(c:wait_for_task(t.ReplicationTaskArn, "stopped", 10, 0.05))
    return table.concat(assert(emulator.control(c, "GetTaskLog", { ReplicationTaskArn = t.ReplicationTaskArn })).Lines,
      "\n")
  end
  local function exceptions_of(schema)
    return q(L.target, ([[select coalesce(string_agg("TABLE_NAME" || ': ' || "ERROR", E'\n' order by "ERROR_TIME"), '')
      from awsdms_apply_exceptions where "TABLE_OWNER" = '%s']]):format(schema))
  end

  -- docs/dms-boundary.md, "arrays": DMS carries an ARRAY as an NCLOB, the text PostgreSQL prints for it,
  -- which the target's column reads back: nothing about it is lost, whatever its elements.
  it("carries arrays whole: empty, NULL elements, several dimensions, lower bounds, every element type", function()
    local ddl = [[
      create schema shop;
      create type shop.size as enum ('S', 'M', 'L', 'XL');
      create domain shop.sku as text check (value ~ '^[A-Z0-9-]+$');
      create type shop.box as (width_cm numeric, height_cm numeric);
      create table shop.product (id int primary key, name text not null,
        tags text[] not null default '{}', sizes shop.size[], skus shop.sku[], stock int[],
        prices numeric(10,2)[], ratings numeric[], weights real[], attributes jsonb[], specs json[],
        restock_at timestamptz[], launch_dates date[], supplier_ids uuid[], flags boolean[], shelf_grid int[][],
        boxes shop.box[], thumbnails bytea[], aliases varchar(20)[], sale_windows tstzrange[], hosts inet[],
        search_terms tsvector[], slots bigint[]);]]
    q(L.source, ddl)
    qt(ddl)
    local log = cdc_run("arrays", "dms_slot_04", "shop", nil, [==[
      insert into shop.product values
        (1, 'kettle', '{kitchen,"steel & glass","comma, inside","quote \" inside","back\\slash","NULL","",NULL}',
         '{S,XL}', '{KT-100,KT-101}', '{NULL}', '{19.99,NULL,0.50}', '{0.611111104488373,NaN,1e-20}',
         '{1.5,NaN,Infinity,-0}', '{"{\"color\": \"red\", \"w\": [1, 2]}","[1, 2]","\"plain\"","null",NULL}',
         '{"{\"a\" : 1}","[ ]"}', '{"2024-03-01 10:00:00.123456+00",infinity,-infinity}', '{2024-01-31,NULL}',
         '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{t,f,NULL}', '{{1,2,3},{4,5,6}}',
         '{"(12.5,30)","(,3)",NULL}', '{"\\x00ff",NULL,"\\x"}', '{"ünïcødé ✓","a b"}',
         '{"[2024-01-01 00:00:00+00,2024-02-01 00:00:00+00)",empty}', '{10.0.0.1/8,::1}',
         '{"''fast'':1 ''kettl'':2"}', '{9223372036854775807,-9223372036854775808}'),
        (2, 'empty arrays', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',
         '{}', '{}', '{}', '{}', '{}'),
        (3, 'bounds and depth', '{a}', NULL, NULL, '[3:4]={7,8}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         '{{{t}},{{f}}}', '[0:1][1:2]={{1,2},{3,4}}', NULL, NULL, NULL, NULL, NULL, NULL, '[-2:-1]={1,2}'),
        (4, 'to delete', '{x}', NULL, NULL, '{1}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL);
      update shop.product set tags = '{}', stock = '{NULL,NULL}', shelf_grid = '{{9},{8},{7}}', sizes = NULL
        where id = 1;
      update shop.product set tags = '{{a,b},{c,NULL}}', attributes = '{"[[1]]"}', stock = '{}' where id = 2;
      update shop.product set shelf_grid = '{}', stock = stock || 9 where id = 3;
      delete from shop.product where id = 4;]==])
    assert.equal("", exceptions_of("shop"), log)
    local rows = "select id, p::text from shop.product p order by id"
    assert.equal(q(L.source, rows), q(L.target, rows))
    -- what the test is about, said outright
    local target = q(L.target, [[select string_agg(id || ':' || coalesce(array_dims(tags), 'none') || ' '
      || coalesce(array_dims(stock), 'none') || ' ' || coalesce(array_dims(shelf_grid), 'none'), ', ' order by id)
      from shop.product]])
    assert.equal("1:none [1:2] [1:3][1:1], 2:[1:2][1:2] none none, 3:[1:1] [3:5] none", target)
    assert.equal("t|t", q(L.target, "select tags = '{}' and tags is not null, stock = '{NULL,NULL}' from shop.product where id = 1"))
    assert.equal("3", q(L.target, "select count(*) from shop.product"))
  end)

  -- LOB sizes in bytes as DMS counts them (AWS DMS User Guide, "Working with LOB source data types for
  -- PostgreSQL"): a bytea (BLOB) by its bytes, text and arrays (NCLOB) at two bytes a character and four beyond
  -- the BMP, xml (CLOB) by its UTF-8 bytes. LobMaxSize 1 KB: just under and just over.
  it("counts LOB sizes in bytes as DMS does, cuts a bytea to whole bytes and refuses a cut array", function()
    local ddl = [[
      create schema media;
      create table media.asset (id int primary key, label text, image bytea, caption text, manifest xml,
        frame_offsets int[]);]]
    q(L.source, ddl)
    qt(ddl)
    local settings = { TargetMetadata = { SupportLobs = true, FullLobMode = false, LimitedSizeLobMode = true,
      LobMaxSize = 1 } }
    local function bytes(n) return ("decode(repeat('a5', %d), 'hex')"):format(n) end
    local log = cdc_run("lobs", "dms_slot_05", "media", settings, ([[
      insert into media.asset values
        (1, 'at the limit', %s, repeat('c', 512), ('<m>' || repeat('x', 1017) || '</m>')::xml,
         ('{' || repeat('1,', 254) || '1}')::int[]),
        (2, 'one over', %s, repeat('c', 513), NULL, NULL),
        (3, 'two-byte letters', NULL, repeat('é', 512), NULL, NULL),
        (4, 'beyond the BMP', NULL, repeat('😀', 257), NULL, NULL),
        (5, 'array over', NULL, NULL, NULL, ('{' || repeat('1,', 256) || '1}')::int[]);
      update media.asset set image = %s where id = 3;]]):format(bytes(1024), bytes(1025),
      bytes(1100)))
    local function target(sql) return q(L.target, sql) end
    -- at the limit: carried whole (the hex text of 1024 bytes is 2050 characters; the xml, a CLOB, is 1024
    -- UTF-8 bytes; the array's 511 characters are 1022 bytes as an NCLOB)
    assert.equal("1024|512|1024|t", target([[select octet_length(image), length(caption), octet_length(manifest::text),
      frame_offsets = ('{' || repeat('1,', 254) || '1}')::int[] from media.asset where id = 1]]))
    -- one byte / one character over: cut to 1024 bytes, a bytea to whole bytes, text to 512 characters
    assert.equal("1024|t|512", target([[select octet_length(image), image = decode(repeat('a5', 1024), 'hex'),
      length(caption) from media.asset where id = 2]]))
    -- 512 two-byte letters are 1024 bytes as UTF-8 and as DMS's NCLOB: whole; the bytea update of 1100 bytes
    -- is cut to its first 1024; 257 characters beyond the BMP are 1028 bytes, cut to 256 characters
    assert.equal("t|1024|t", target([[select caption = repeat('é', 512), octet_length(image),
      image = decode(repeat('a5', 1024), 'hex') from media.asset where id = 3]]))
    assert.equal("t", target("select caption = repeat('😀', 256) from media.asset where id = 4"))
    -- an array over the limit is cut, and the cut literal is refused: the row is not there
    assert.equal("", target("select id from media.asset where id = 5"))
    local exc = exceptions_of("media")
    assert.matches("asset: RetCode: SQL_ERROR  SqlState: 22P02", exc, 1, true)
    assert.matches("malformed array literal", exc, 1, true)
    assert.equal("1", q(L.target, [[select count(*) from awsdms_apply_exceptions where "TABLE_OWNER" = 'media']]))
    -- the warnings, with the byte counts DMS would log
    for _, line in ipairs{
      "Value of column 'image' in table 'media.asset' was truncated to 1024 bytes, actual length: 1025 bytes",
      "Value of column 'caption' in table 'media.asset' was truncated to 1024 bytes, actual length: 1026 bytes",
      "Value of column 'caption' in table 'media.asset' was truncated to 1024 bytes, actual length: 1028 bytes",
      "Value of column 'frame_offsets' in table 'media.asset' was truncated to 1024 bytes, actual length: 1030 bytes",
      "Value of column 'image' in table 'media.asset' was truncated to 1024 bytes, actual length: 1100 bytes" } do
      assert.matches(line, log, 1, true)
    end
    local _, n = log:gsub("was truncated", "")
    assert.equal(5, n, log)
  end)

  it("suspends a table with a primary key and a unique constraint under batch apply", function()
    q(L.source, [[
      create table public.b1 (id int primary key, code text unique, v text);
      select pg_create_logical_replication_slot('dms_slot_02', 'pglogical');
      select pglogical.create_replication_set('dms_slot_02', false, true, true, false);
      select pglogical.create_replication_set('idms_slot_02', true, false, false, true);
      select pglogical.replication_set_add_table('dms_slot_02', 'public.b1');
      select pglogical.replication_set_add_table('idms_slot_02', 'public.b1');]])
    qt("create table public.b1 (id int primary key, code text unique, v text)")
    local start = q(L.source, "select pg_current_wal_lsn()"):gsub("%s+", "")
    q(L.source, "insert into b1 values (1, 'a', 'x')")
    local src = assert(c:create_endpoint{ EndpointIdentifier = "lab-src2", EndpointType = "source",
      EngineName = "postgres", ServerName = "127.0.0.1", Port = L.source.port, DatabaseName = "app",
      Username = "postgres", PostgreSQLSettings = { SlotName = "dms_slot_02", PluginName = "pglogical" } })
    local dst = assert(c:describe_endpoints{ Filters = { ["endpoint-id"] = "lab-dst" } })[1]
    local mappings = json.encode{ rules = { { ["rule-type"] = "selection", ["rule-id"] = "1", ["rule-name"] = "1",
      ["object-locator"] = { ["schema-name"] = "public", ["table-name"] = "b1" }, ["rule-action"] = "include" } } }
    local t = assert(create_task(c, "cdc-batch", src, dst, { MigrationType = "cdc", CdcStartPosition = start,
      TableMappings = mappings, ReplicationTaskSettings = '{"TargetMetadata":{"BatchApplyEnabled":true}}' }))
    assert(c:wait_for_task(t.ReplicationTaskArn, "ready", 10, 0.05))
    assert(c:start_replication_task(t.ReplicationTaskArn))
    assert(c:wait_for_task(t.ReplicationTaskArn, "running", 20, 0.05))
    local stats
    local deadline = socket.gettime() + 10
    repeat
      stats = assert(c:describe_table_statistics(t.ReplicationTaskArn))
      socket.sleep(0.1)
    until (stats[1] and stats[1].TableState == "Table error") or socket.gettime() > deadline
    assert.are.equal("Table error", stats[1].TableState)
    assert.are.equal(1, assert(c:describe_task(t.ReplicationTaskArn)).ReplicationTaskStats.TablesErrored)
    socket.sleep(0.5)
    assert.are.equal("0", (q(L.target, "select count(*) from b1"):gsub("%s+", "")))
    local log = table.concat(assert(emulator.control(c, "GetTaskLog", { ReplicationTaskArn = t.ReplicationTaskArn })).Lines, "\n")
    assert.matches("primary key and a unique constraint", log)
    assert(c:stop_replication_task(t.ReplicationTaskArn))
  end)
end)
