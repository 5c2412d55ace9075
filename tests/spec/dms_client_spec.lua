-- migrun.dms client against a loopback HTTP stand-in (tests/helpers/http_stub):
-- the wire format, SigV4 verified by recomputing with aws.sign, standard-mode
-- retries, structured faults, pagination, waiters, timeouts, masking.
local aws = require "migrun.aws"
local dms = require "migrun.dms"
local json = require "migrun.json"
local stub = require "helpers.http_stub"

local AKID, SECRET, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "SESSIONTOKEN"

local servers = {}
local function serve(code)
  local s = stub.start(code)
  servers[#servers + 1] = s
  return s
end

local function client(s, extra)
  local sleeps = {}
  local opts = { endpoint_url = s.url, region = "us-east-1", access_key = AKID, secret_key = SECRET,
    session_token = TOKEN, env = {}, retry_base = 0.001, sleep = function(t) sleeps[#sleeps + 1] = t end }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return assert(dms.client(opts)), sleeps
end

-- Recomputes the signature of a logged request from the headers it listed.
local function verify(s, req)
  local cred, signed, sig = req.headers.authorization:match(
    "^AWS4%-HMAC%-SHA256 Credential=([^,]+), SignedHeaders=([^,]+), Signature=(%x+)$")
  assert.is_string(sig)
  assert.are.equal(AKID .. "/" .. req.headers["x-amz-date"]:sub(1, 8) .. "/us-east-1/dms/aws4_request", cred)
  local again = aws.sign{ method = req.method, url = s.url .. req.path, headers = req.headers, body = req.body,
    region = "us-east-1", service = "dms", access_key = AKID, secret_key = SECRET,
    time = req.headers["x-amz-date"], signed_headers = signed }
  assert.are.equal(sig, again.signature)
  local tampered = aws.sign{ method = req.method, url = s.url .. req.path, headers = req.headers,
    body = req.body .. " ", region = "us-east-1", service = "dms", access_key = AKID, secret_key = SECRET,
    time = req.headers["x-amz-date"], signed_headers = signed }
  assert.are_not.equal(sig, tampered.signature)
  return signed
end

teardown(function()
  for _, s in ipairs(servers) do s:close() end
end)

describe("dms client", function()
  it("sends JSON 1.1 requests signed with SigV4", function()
    local s = serve[[ return function(req) return { status = 200, headers = { ["x-amzn-RequestId"] = "r-1" },
      body = '{"Endpoint":{"EndpointArn":"arn:aws:dms:us-east-1:123456789012:endpoint:E1","Status":"active","X":null}}' } end ]]
    local c = client(s)
    local ep, err = c:create_endpoint{ EndpointIdentifier = "src", EndpointType = "source", EngineName = "postgres",
      Port = 5432, Password = "pw", Tags = json.array() }
    assert.is_nil(err)
    assert.are.equal("active", ep.Status)
    local req = s:requests()[1]
    assert.are.equal("POST", req.method)
    assert.are.equal("/", req.path)
    assert.are.equal("application/x-amz-json-1.1", req.headers["content-type"])
    assert.are.equal("AmazonDMSv20160101.CreateEndpoint", req.headers["x-amz-target"])
    assert.are.equal(TOKEN, req.headers["x-amz-security-token"])
    assert.are.equal('{"EndpointIdentifier":"src","EndpointType":"source","EngineName":"postgres",'
      .. '"Password":"pw","Port":5432,"Tags":[]}', req.body)
    assert.are.equal("content-type;host;x-amz-date;x-amz-security-token;x-amz-target", verify(s, req))
    -- no params: an empty object
    assert(c:call("DescribeAccountAttributes"))
    assert.are.equal("{}", s:requests()[2].body)
    verify(s, s:requests()[2])
  end)

  it("retries 503 and ThrottlingException with jittered backoff, then succeeds", function()
    local s = serve[[ return function(req, n)
      if n == 1 then return { status = 503, body = "" } end
      if n == 2 then return { status = 400, body = '{"__type":"ThrottlingException","message":"Rate exceeded"}' } end
      return { status = 200, body = '{"ReplicationTasks":[{"Status":"ready"}]}' }
    end ]]
    local c, sleeps = client(s, { retry_base = 0.5, random = function() return 0.5 end })
    local tasks = assert(c:describe_replication_tasks())
    assert.are.equal("ready", tasks[1].Status)
    assert.are.equal(3, #s:requests())
    assert.are.same({ 0.25, 0.5 }, sleeps) -- rand * min(base * 2^(n-1), 20)
    for _, req in ipairs(s:requests()) do verify(s, req) end
  end)

  it("logs every retry with the operation, the error code and the attempt", function()
    local s = serve[[ return function(req, n)
      if n <= 2 then return { status = 400, body = '{"__type":"ThrottlingException","message":"Rate exceeded"}' } end
      return { status = 200, body = '{"Endpoints":[]}' }
    end ]]
    local lines, infos = {}, {}
    local c = client(s, { random = function() return 0.5 end,
      on_retry = function(line, info) lines[#lines + 1] = line infos[#infos + 1] = info end })
    assert(c:call("DescribeEndpoints", {}))
    assert.are.same({ "dms DescribeEndpoints: ThrottlingException (attempt 1 of 10), retrying in 0.0 s",
                      "dms DescribeEndpoints: ThrottlingException (attempt 2 of 10), retrying in 0.0 s" }, lines)
    assert.are.equal(2, infos[2].attempt)
    assert.are.equal("DescribeEndpoints", infos[1].op)
  end)

  it("rides out a 20% fault rate over many calls with the default attempts", function()
    local s = serve[[ local r = 7
      return function(req, n)
        r = (r * 1103515245 + 12345) % 2147483648
        if r % 10 == 0 then return { status = 503, body = "" } end
        if r % 10 == 1 then return { status = 400, body = '{"__type":"ThrottlingException","message":"slow down"}' } end
        return { status = 200, body = '{"Endpoints":[]}' }
      end ]]
    local c = client(s)
    for _ = 1, 300 do assert(c:call("DescribeEndpoints", {})) end
    assert.is_true(#s:requests() > 300 * 1.15, "the stub did inject faults")
    -- the SDKs' 3 tries would not have: the same faults make one call fail
    local sdk, failed = client(s, { max_attempts = 3 }), false
    for _ = 1, 300 do failed = failed or not sdk:call("DescribeEndpoints", {}) end
    assert.is_true(failed)
  end)

  it("gives up after max_attempts with the last fault", function()
    local s = serve[[ return function() return { status = 500, headers = { ["x-amzn-RequestId"] = "r-500" },
      body = '{"__type":"InternalFailure","message":"boom"}' } end ]]
    local c, sleeps = client(s, { max_attempts = 4 })
    local res, err = c:call("DescribeEndpoints", {})
    assert.is_nil(res)
    assert.are.equal("InternalFailure", err.code)
    assert.are.equal(500, err.status)
    assert.is_true(err.retryable)
    assert.are.equal(4, err.attempts)
    assert.matches("boom %(gave up after 4 attempts%)$", tostring(err))
    assert.are.equal(4, #s:requests())
    assert.are.equal(3, #sleeps)
    for i, t in ipairs(sleeps) do assert.is_true(t >= 0 and t <= 0.001 * 2 ^ (i - 1)) end
  end)

  it("returns a modeled fault at once, with code, message and request id", function()
    local s = serve[[ return function() return { status = 400, headers = { ["x-amzn-RequestId"] = "req-42" },
      body = '{"__type":"com.amazonaws.dms#InvalidResourceStateFault:http://internal","message":"Task is running"}' } end ]]
    local c, sleeps = client(s)
    local res, err = c:stop_replication_task("arn:aws:dms:us-east-1:1:task:T")
    assert.is_nil(res)
    assert.are.equal("aws", err.kind)
    assert.are.equal("InvalidResourceStateFault", err.code)
    assert.are.equal("Task is running", err.message)
    assert.are.equal("req-42", err.request_id)
    assert.are.equal(400, err.status)
    assert.is_false(err.retryable)
    assert.are.equal("dms StopReplicationTask", err.where)
    assert.are.equal(1, #s:requests())
    assert.are.equal(0, #sleeps)
    assert.are.equal("[dms StopReplicationTask] InvalidResourceStateFault Task is running", tostring(err))
    assert.is_nil(tostring(err):find(SECRET, 1, true))
  end)

  it("follows Marker through every page", function()
    local s = serve[[
      local cjson = require "cjson"
      return function(req)
        local body = cjson.decode(req.body)
        if req.headers["x-amz-target"]:match("DescribeTableStatistics$") then
          if body.Marker == nil then
            return { status = 200, body = '{"TableStatistics":[{"TableName":"a"}],"Marker":"s1"}' }
          end
          return { status = 200, body = '{"TableStatistics":[{"TableName":"b"}]}' }
        end
        if body.Marker == nil then return { status = 200, body = '{"ReplicationTasks":[{"N":1},{"N":2}],"Marker":"m1"}' } end
        if body.Marker == "m1" then return { status = 200, body = '{"ReplicationTasks":[{"N":3}],"Marker":"m2"}' } end
        return { status = 200, body = '{"ReplicationTasks":[{"N":4}],"Marker":""}' }
      end ]]
    local c = client(s)
    local tasks = assert(c:describe_replication_tasks{ Filters = { ["replication-task-id"] = "x" }, MaxRecords = 20 })
    assert.are.same({ 1, 2, 3, 4 }, { tasks[1].N, tasks[2].N, tasks[3].N, tasks[4].N })
    local reqs = s:requests()
    assert.are.equal('{"Filters":[{"Name":"replication-task-id","Values":["x"]}],"MaxRecords":20}', reqs[1].body)
    assert.are.equal('{"Filters":[{"Name":"replication-task-id","Values":["x"]}],"Marker":"m2","MaxRecords":20}', reqs[3].body)
    local stats = assert(c:describe_table_statistics("arn:task"))
    assert.are.same({ "a", "b" }, { stats[1].TableName, stats[2].TableName })
    assert.are.equal('{"Marker":"s1","ReplicationTaskArn":"arn:task"}', s:requests()[5].body)
  end)

  it("treats ResourceNotFoundFault from Describe as an empty list", function()
    local s = serve[[ return function() return { status = 400,
      body = '{"__type":"ResourceNotFoundFault","message":"No Tasks found matching provided filters"}' } end ]]
    local c = client(s)
    assert.are.same({}, assert(c:describe_replication_tasks{ Filters = { ["replication-task-arn"] = "arn:x" } }))
    assert.is_nil(c:describe_task("arn:x"))
    local _, err = c:delete_replication_task("arn:x")
    assert.are.equal("ResourceNotFoundFault", err.code)
  end)

  it("waits for a task status, and reports failure and deletion", function()
    local s = serve[[
      local cjson = require "cjson"
      local seen = {}
      return function(req)
        local arn = cjson.decode(req.body).Filters[1].Values[1]
        seen[arn] = (seen[arn] or 0) + 1
        local k = seen[arn]
        if arn == "run" then
          return { status = 200, body = cjson.encode{ ReplicationTasks = { { ReplicationTaskArn = arn,
            Status = k < 3 and "starting" or "running" } } } }
        elseif arn == "fail" then
          return { status = 200, body = cjson.encode{ ReplicationTasks = { { ReplicationTaskArn = arn,
            Status = k < 2 and "starting" or "failed", LastFailureMessage = "slot missing" } } } }
        elseif arn == "gone" then
          if k < 2 then return { status = 200, body = '{"ReplicationTasks":[{"Status":"deleting"}]}' } end
          return { status = 400, body = '{"__type":"ResourceNotFoundFault","message":"No Tasks found"}' }
        end
        return { status = 200, body = '{"ReplicationTasks":[{"Status":"starting"}]}' }
      end ]]
    local c = client(s, { sleep = function() end })
    local task = assert(c:wait_for_task("run", "running", 10, 0.01))
    assert.are.equal("running", task.Status)
    local _, err = c:wait_for_task("fail", { "running", "stopped" }, 10, 0.01)
    assert.are.equal("TaskFailed", err.code)
    assert.truthy(err.message:find("slot missing", 1, true))
    assert.are.equal("deleted", assert(c:wait_for_task("gone", "deleted", 10, 0.01)).Status)
    c.sleep = aws.sleep
    local t0 = aws.monotonic()
    _, err = c:wait_for_task("slow", "running", 0.3, 0.05)
    assert.are.equal("timeout", err.kind)
    assert.truthy(err.message:find("starting", 1, true))
    assert.is_true(aws.monotonic() - t0 < 3)
  end)

  it("looks again soon at first, then every poll: a short transition costs no whole poll", function()
    local s = serve[[ return function(req, n)
      return { status = 200, body = '{"ReplicationTasks":[{"Status":"' .. (n < 7 and "starting" or "running") .. '"}]}' }
    end ]]
    local waited = {}
    local c = client(s, { sleep = function(t) waited[#waited + 1] = t end })
    assert.are.equal("running", assert(c:wait_for_task("arn:t", "running", 60, 2)).Status)
    assert.are.same({ 0.125, 0.25, 0.5, 1, 2, 2 }, waited)
    -- a poll shorter than the first look is the poll
    waited = {}
    c = client(serve[[ return function(req, n)
      return { status = 200, body = '{"ReplicationTasks":[{"Status":"' .. (n < 3 and "starting" or "running") .. '"}]}' }
    end ]], { sleep = function(t) waited[#waited + 1] = t end })
    assert(c:wait_for_task("arn:t", "running", 60, 0.05))
    assert.are.same({ 0.05, 0.05 }, waited)
  end)

  it("waits for a connection test", function()
    local s = serve[[ return function(req, n)
      return { status = 200, body = '{"Connections":[{"Status":"' .. (n < 3 and "testing" or "successful") .. '"}]}' }
    end ]]
    local c = client(s, { sleep = function() end })
    assert.are.equal("successful", assert(c:wait_for_connection("arn:rep", "arn:ep", 10, 0.01)).Status)
    assert.are.equal('{"Filters":[{"Name":"endpoint-arn","Values":["arn:ep"]},'
      .. '{"Name":"replication-instance-arn","Values":["arn:rep"]}]}', s:requests()[1].body)
  end)

  it("times out a slow request and retries it as a connection failure", function()
    local s = serve[[ return function() return { delay = 1.5, status = 200, body = "{}" } end ]]
    local c = client(s, { timeout = 0.3, max_attempts = 2 })
    local t0 = aws.monotonic()
    local res, err = c:call("DescribeEndpoints", {})
    assert.is_nil(res)
    assert.are.equal("connection", err.kind)
    assert.are.equal("timeout", err.code)
    assert.is_true(err.timeout)
    assert.are.equal(2, err.attempts)
    assert.are.equal("dms DescribeEndpoints", err.where)
    assert.is_true(aws.monotonic() - t0 < 1.4)
  end)

  it("lets Ctrl-C interrupt a request in flight", function()
    local proc = require "migrun.proc"
    local s = serve[[ return function() return { delay = 10, status = 200, body = "{}" } end ]]
    local h = assert(proc.spawn{ os.getenv("MIGRUN_BIN") or "build/migrun", "-e",
      ("local r = require('migrun.aws').request{ url = %q, timeout = 30 } print('finished', r)"):format(s.url),
      stdout = "capture", stderr = "capture" })
    require("migrun.aws").sleep(0.5)
    local t0 = aws.monotonic()
    h:kill("INT")
    local ok = h:wait(5)
    assert.is_nil(ok)
    assert.is_true(aws.monotonic() - t0 < 4)
    assert.truthy(h.stderr:find("interrupted", 1, true))
    assert.is_nil(h.stdout:find("finished", 1, true))
  end)

  it("reports a refused connection after its retries", function()
    -- a port bound and not listening refuses, and is nobody else's while
    -- held (a port let go could be taken by a server of a spec running
    -- beside this one, which answered: "empty_reply" once)
    local held = assert(require("socket").tcp())
    assert(held:bind("127.0.0.1", 0))
    local _, port = held:getsockname()
    local c = assert(dms.client{ endpoint_url = "http://127.0.0.1:" .. port, region = "us-east-1", access_key = AKID,
      secret_key = SECRET, env = {}, retry_base = 0.001 })
    local _, err = c:call("DescribeEndpoints", {})
    held:close()
    assert.are.equal("connection", err.kind)
    assert.are.equal("connect_failed", err.code)
    assert.are.equal(dms.MAX_ATTEMPTS, err.attempts)
    assert.matches("gave up after 10 attempts", tostring(err))
    assert.is_nil(tostring(err):find(SECRET, 1, true))
  end)

  it("logs each call without secrets, and a dry run sends no write", function()
    local s = serve[[ return function() return { status = 200, body = "{}" } end ]]
    local lines = {}
    local c = client(s, { on_call = function(line) lines[#lines + 1] = line end, dry_run = true })
    c:create_endpoint{ EndpointIdentifier = "src", Password = "hunter2",
      PostgreSQLSettings = { Password = "hunter2", SlotName = "s" } }
    assert.are.equal('dms CreateEndpoint {"EndpointIdentifier":"src","Password":"****",'
      .. '"PostgreSQLSettings":{"Password":"****","SlotName":"s"}}', lines[1])
    assert.are.equal(0, #s:requests())
    -- reads still run when there are credentials: a dry run shows what a real run would do
    assert(c:call("DescribeEndpoints"))
    assert.are.equal(1, #s:requests())
    local quiet = assert(dms.client{ dry_run = true, env = { AWS_EC2_METADATA_DISABLED = "true" } })
    assert.is_true(quiet:call("DescribeEndpoints").dry_run)
  end)

  it("fails to build a client without credentials, saying where it looked", function()
    local c, err = dms.client{ region = "us-east-1", env = { HOME = "/nonexistent", AWS_EC2_METADATA_DISABLED = "true" } }
    assert.is_nil(c)
    assert.are.equal("NoCredentials", err.code)
    assert.truthy(tostring(err):find("AWS_ACCESS_KEY_ID", 1, true))
  end)
end)
