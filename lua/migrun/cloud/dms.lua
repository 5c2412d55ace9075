-- The AWS DMS client: JSON 1.1 over HTTPS (POST /, X-Amz-Target
-- AmazonDMSv20160101.<Operation>), signed with SigV4 by migrun.aws, with the
-- SDKs' "standard" retry mode (throttling codes, transient codes, HTTP
-- 500/502/503/504 and connection failures retried with capped exponential
-- backoff and full jitter, at most max_attempts tries, a retry quota) and
-- structured errors. A migration runs for days and must ride out a bad hour
-- of throttling: migrun's default is M.MAX_ATTEMPTS (10) tries per call
-- rather than the SDKs' 3 (at a 20% fault rate, 3 tries lose about one call
-- in 125; 10 tries one in ten million), the quota stays the SDKs' token bucket
-- (a retry that ends in success gives its tokens back), every retry is
-- reported through on_retry, and the final error says how many tries it took:
--   { kind = "aws", where = "dms <Operation>", code = "ResourceNotFoundFault",
--     message = ..., status = 400, request_id = ..., retryable = false, attempts = n }
-- (connection failures keep kind "connection" and gain where/attempts/retryable).
--
--   local dms = require "migrun.dms"
--   local c = assert(dms.client{ region = "us-east-1", endpoint_url = "http://127.0.0.1:4566" })
--   c.on_call = function(line) print(line) end     -- "dms CreateEndpoint {...}" with secrets masked
--   local tasks = assert(c:describe_replication_tasks{ Filters = { ["replication-task-id"] = "x" } })
--
-- Describe* methods follow Marker to the end and return the whole list; when
-- DMS answers ResourceNotFoundFault (its way of saying "no match") they return
-- an empty list. Filters may be given as DMS lists or as a {name = value(s)} map.
local aws = require "migrun.aws"
local host = require "migrun.host"
local credentials = require "migrun.aws.credentials"
local errors = require "migrun.error"
local json = require "migrun.json"

local M = {}

M.TARGET_PREFIX = "AmazonDMSv20160101"
-- CloudWatch Logs speaks the same JSON 1.1 protocol; DMS writes its task logs
-- there (group dms-tasks-<replication instance id>, stream dms-task-<task
-- resource id>), and that is where LOB truncation warnings are found.
M.LOGS_TARGET_PREFIX = "Logs_20140328"
M.LOGS = { service = "logs", target_prefix = M.LOGS_TARGET_PREFIX, service_env = "CLOUDWATCH_LOGS",
           service_key = "cloudwatch_logs", endpoint_prefix = "logs" }
M.DRY_RUN_CREDENTIALS = "none (dry run)"
M.CONTENT_TYPE = "application/x-amz-json-1.1"

-- dms-api.md §6.4
M.THROTTLING_CODES = {}
for _, c in ipairs{ "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
                    "TooManyRequestsException", "ProvisionedThroughputExceededException",
                    "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                    "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
                    "EC2ThrottledException" } do
  M.THROTTLING_CODES[c] = true
end
M.TRANSIENT_CODES = { RequestTimeout = true, RequestTimeoutException = true, PriorRequestNotComplete = true }
M.TRANSIENT_STATUS = { [500] = true, [502] = true, [503] = true, [504] = true }

M.MAX_ATTEMPTS = 10
M.RETRY_QUOTA = 500
M.RETRY_COST = 5
M.TIMEOUT_RETRY_COST = 10
M.MAX_BACKOFF = 20

local Client = {}
Client.__index = Client
Client.__name = "migrun.dms.Client"
Client.__tostring = function(c)
  return ("migrun.dms.Client (%s, %s)"):format(c.config.region, c.config.endpoint_url)
end

-- Password, SecretAccessKey, SessionToken, ... (by name, case-insensitively)
local function is_secret_key(k)
  local l = tostring(k):lower()
  return l:find("password", 1, true) or l:find("secret", 1, true) or l:find("token", 1, true)
end

-- A copy of params with secrets replaced by "****" and long strings shortened.
function M.mask(v, key)
  if type(v) == "table" then
    local out = json.is_array(v) and json.array() or {}
    for k, x in pairs(v) do out[k] = M.mask(x, k) end
    return out
  end
  if key ~= nil and is_secret_key(key) and v ~= nil then return "****" end
  return v
end

-- "dms <Op> <params>" as the log line shows it.
function M.summary(op, params, service)
  local masked = M.mask(params or {})
  return (service or "dms") .. " " .. op .. " " .. json.encode(masked)
end

-- error codes from a JSON 1.1 error response (botocore's rules, dms-api.md §1.4)
local function sanitize_code(code)
  code = tostring(code)
  code = code:match("^([^:]*)") or code
  return code:match("#(.*)$") or code
end

function M.parse_error(res)
  local doc = json.decode(res.body or "") or {}
  if type(doc) ~= "table" then doc = {} end
  local code = doc.__type or doc.code or (res.headers and res.headers["x-amzn-errortype"])
  code = code and sanitize_code(code) or tostring(res.status)
  local message = doc.message or doc.Message
  return code, message
end

local function is_retryable_code(code, status)
  return M.THROTTLING_CODES[code] or M.TRANSIENT_CODES[code] or M.TRANSIENT_STATUS[status] or false
end

--[[ dms.client{ region=, profile=, endpoint_url=, access_key=, secret_key=,
       session_token=, max_attempts= (else AWS_MAX_ATTEMPTS, else M.MAX_ATTEMPTS),
       timeout= (s, whole request, 60), connect_timeout= (s, 10), retry_base=
       (s, 1), env=, on_call=function(line, op, masked_params),
       on_retry=function(line, {op=, code=, attempt=, max_attempts=, delay=}),
       dry_run=bool }
     -> client | nil, err ]]
function M.client(opts)
  opts = opts or {}
  local cfg, err = credentials.resolve(opts)
  if not cfg then
    if not opts.dry_run then return nil, err end
    cfg = { region = opts.region or "us-east-1", credential_source = M.DRY_RUN_CREDENTIALS }
    cfg.endpoint_url = opts.endpoint_url or credentials.default_endpoint(opts.endpoint_prefix or "dms", cfg.region)
  end
  local getenv = os.getenv
  if type(opts.env) == "table" then getenv = function(k) return opts.env[k] end
  elseif type(opts.env) == "function" then getenv = opts.env end
  local max_attempts = math.tointeger(tonumber(opts.max_attempts or getenv("AWS_MAX_ATTEMPTS"))) or M.MAX_ATTEMPTS
  assert(max_attempts >= 1, "max_attempts must be at least 1")
  local c = setmetatable({
    config = cfg,
    opts = opts,
    service = opts.service or "dms",
    target_prefix = opts.target_prefix or M.TARGET_PREFIX,
    max_attempts = max_attempts,
    timeout = opts.timeout or 60,
    connect_timeout = opts.connect_timeout or 10,
    retry_base = opts.retry_base or 1,
    on_call = opts.on_call,
    on_retry = opts.on_retry,
    dry_run = opts.dry_run or false,
    quota = M.RETRY_QUOTA,
    random = opts.random or math.random,
    sleep = opts.sleep or host.sleep,
  }, Client)
  return c
end

-- Credentials from IMDS expire: fetch them again five minutes ahead.
function Client:_refresh()
  local exp = self.config.expiration
  if exp and exp - os.time() < 300 then
    local cfg = credentials.resolve(self.opts)
    if cfg then self.config = cfg end
  end
end

function Client:_send(op, body)
  local cfg = self.config
  local url = cfg.endpoint_url
  if not url:match("^%a[%w+.-]*://[^/]+/") then url = url .. "/" end
  local signed = aws.sign{
    method = "POST", url = url, body = body, region = cfg.region, service = self.service,
    access_key = cfg.access_key, secret_key = cfg.secret_key, session_token = cfg.session_token,
    headers = { ["Content-Type"] = M.CONTENT_TYPE, ["X-Amz-Target"] = self.target_prefix .. "." .. op },
  }
  return aws.request{ url = url, method = "POST", headers = signed.headers, body = body,
    connect_timeout = self.connect_timeout, timeout = self.timeout, where = self.service .. " " .. op }
end

-- One attempt: the decoded result, or nil, err (err.retryable decides a retry).
function Client:_attempt(op, body)
  local where = self.service .. " " .. op
  local res, err = self:_send(op, body)
  if not res then
    err.where = where
    err.retryable = err.code ~= "bad_url" and err.code ~= "unsupported_protocol"
    return nil, err
  end
  local request_id = res.headers["x-amzn-requestid"]
  if res.status >= 200 and res.status < 300 then
    if res.body == "" then return {} end
    local doc, derr = json.decode(res.body)
    if type(doc) ~= "table" then
      return nil, errors.new{ kind = "aws", where = where, code = "InvalidResponse",
        message = "response is not a JSON object: " .. tostring(derr or type(doc)),
        status = res.status, request_id = request_id, retryable = false }
    end
    return doc
  end
  local code, message = M.parse_error(res)
  return nil, errors.new{ kind = "aws", where = where, code = code,
    message = message or ("HTTP " .. res.status), status = res.status,
    request_id = request_id, retryable = is_retryable_code(code, res.status),
    throttling = M.THROTTLING_CODES[code] or false }
end

-- c:call(op, params) -> decoded response | nil, err. Any DMS operation.
function Client:call(op, params)
  assert(type(op) == "string" and op:match("^%u%a+$"), "DMS operation name expected, like DescribeEndpoints")
  params = params or {}
  local body = json.encode(params)
  -- A dry run still reads (Describe*) when it has credentials, so that what
  -- it prints is what a real run would do; every other call is only shown.
  local reads = (op:match("^Describe") or op:match("^List")) and self.config.credential_source ~= M.DRY_RUN_CREDENTIALS
  if self.on_call then self.on_call(M.summary(op, params, self.service), op, M.mask(params)) end
  if self.dry_run and not reads then return { dry_run = true } end
  self:_refresh()
  local attempt, taken = 0, 0
  while true do
    attempt = attempt + 1
    local doc, err = self:_attempt(op, body)
    if doc then
      self.quota = math.min(M.RETRY_QUOTA, self.quota + (taken > 0 and taken or 1))
      return doc
    end
    err.attempts = attempt
    if not err.retryable then return nil, err end
    if attempt >= self.max_attempts then
      if attempt > 1 then err.message = ("%s (gave up after %d attempts)"):format(tostring(err.message), attempt) end
      return nil, err
    end
    local cost = err.timeout and M.TIMEOUT_RETRY_COST or M.RETRY_COST
    if self.quota < cost then
      err.message = ("%s (retry quota exhausted after %d attempt%s)"):format(tostring(err.message), attempt,
        attempt == 1 and "" or "s")
      return nil, err
    end
    self.quota = self.quota - cost
    taken = taken + cost
    -- full jitter: rand(0,1) * min(base * 2^(attempt-1), cap)
    local delay = self.random() * math.min(self.retry_base * 2 ^ (attempt - 1), M.MAX_BACKOFF)
    if self.on_retry then
      self.on_retry(("dms %s: %s (attempt %d of %d), retrying in %.1f s"):format(op, tostring(err.code),
        attempt, self.max_attempts, delay),
        { op = op, code = err.code, attempt = attempt, max_attempts = self.max_attempts, delay = delay })
    end
    self.sleep(delay)
  end
end

-- Filters as a {name = value | {values}} map become DMS's sorted list.
local function filters(p)
  local f = p and p.Filters
  if type(f) ~= "table" or json.is_array(f) then return p end
  local out, names = json.array(), {}
  for k in pairs(f) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    local v = f[k]
    out[#out + 1] = { Name = k, Values = json.array(type(v) == "table" and v or { tostring(v) }) }
  end
  local q = {}
  for k, v in pairs(p) do q[k] = v end
  q.Filters = #out > 0 and out or nil -- an empty map means no filter
  return q
end

-- Follows Marker until the end; returns the concatenated list under key.
function Client:paginate(op, params, key)
  local p = {}
  for k, v in pairs(filters(params) or {}) do p[k] = v end
  local all, seen = json.array(), {}
  while true do
    local doc, err = self:call(op, p)
    if not doc then
      if err.code == "ResourceNotFoundFault" and #all == 0 and op:match("^Describe") then return all end
      return nil, err
    end
    for _, x in ipairs(doc[key] or {}) do all[#all + 1] = x end
    local marker = doc.Marker
    if marker == nil or marker == "" then return all end
    if seen[marker] then
      return nil, errors.new{ kind = "aws", where = "dms " .. op, code = "PaginationLoop",
        message = "the service returned the same Marker twice", retryable = false }
    end
    seen[marker] = true
    p.Marker = marker
  end
end

local function pick(key)
  return function(doc, err)
    if not doc then return nil, err end
    return doc[key] or doc
  end
end

function Client:create_endpoint(params) return pick("Endpoint")(self:call("CreateEndpoint", params)) end
function Client:describe_endpoints(params) return self:paginate("DescribeEndpoints", params, "Endpoints") end
function Client:delete_endpoint(arn)
  return pick("Endpoint")(self:call("DeleteEndpoint", { EndpointArn = arn }))
end
function Client:test_connection(instance_arn, endpoint_arn)
  return pick("Connection")(self:call("TestConnection",
    { ReplicationInstanceArn = instance_arn, EndpointArn = endpoint_arn }))
end
function Client:describe_connections(params) return self:paginate("DescribeConnections", params, "Connections") end
function Client:create_replication_task(params)
  return pick("ReplicationTask")(self:call("CreateReplicationTask", params))
end
-- start_type: "start-replication" (default), "resume-processing", "reload-target"
function Client:start_replication_task(arn, start_type, extra)
  local p = { ReplicationTaskArn = arn, StartReplicationTaskType = start_type or "start-replication" }
  for k, v in pairs(extra or {}) do p[k] = v end
  return pick("ReplicationTask")(self:call("StartReplicationTask", p))
end
function Client:stop_replication_task(arn)
  return pick("ReplicationTask")(self:call("StopReplicationTask", { ReplicationTaskArn = arn }))
end
function Client:modify_replication_task(params)
  return pick("ReplicationTask")(self:call("ModifyReplicationTask", params))
end
function Client:delete_replication_task(arn)
  return pick("ReplicationTask")(self:call("DeleteReplicationTask", { ReplicationTaskArn = arn }))
end
function Client:describe_replication_tasks(params)
  return self:paginate("DescribeReplicationTasks", params, "ReplicationTasks")
end
function Client:describe_table_statistics(arn, params)
  local p = {}
  for k, v in pairs(filters(params) or {}) do p[k] = v end
  p.ReplicationTaskArn = arn
  return self:paginate("DescribeTableStatistics", p, "TableStatistics")
end
function Client:describe_replication_instances(params)
  return self:paginate("DescribeReplicationInstances", params, "ReplicationInstances")
end

-- The tags of resources: {[arn] = {key = value}} (ListTagsForResource with
-- ResourceArnList, at most 100 ARNs a call here).
function Client:list_tags(arns)
  assert(type(arns) == "table", "list_tags: a list of ARNs expected")
  local out = {}
  for i = 1, #arns, 100 do
    local chunk = json.array()
    for j = i, math.min(i + 99, #arns) do chunk[#chunk + 1] = arns[j]; out[arns[j]] = {} end
    local doc, err = self:call("ListTagsForResource", { ResourceArnList = chunk })
    if not doc then return nil, err end
    if doc.dry_run then return out end
    for _, tag in ipairs(doc.TagList or {}) do
      local arn = tag.ResourceArn or (#chunk == 1 and chunk[1])
      if out[arn] then out[arn][tag.Key] = tag.Value or "" end
    end
  end
  return out
end

-- One task by ARN, or nil (no error) when DMS no longer knows it.
function Client:describe_task(arn)
  local tasks, err = self:describe_replication_tasks{ Filters = { ["replication-task-arn"] = arn } }
  if not tasks then return nil, err end
  return tasks[1]
end

local function as_set(v)
  local set = {}
  for _, s in ipairs(type(v) == "table" and v or { v }) do set[s:lower()] = true end
  return set
end

local function timeout_error(where, what, timeout, last)
  return errors.new{ kind = "timeout", where = where, code = "WaitTimeout",
    message = ("%s not reached within %gs (last seen: %s)"):format(what, timeout, tostring(last)),
    retryable = false }
end

-- The first looks of a wait come soon, FIRST_LOOK seconds after the call
-- and doubling up to the caller's poll: a transition DMS makes in a second is
-- seen in about a second, not a whole poll later, for a few more Describe
-- calls (log2(poll / FIRST_LOOK), 4 for a 2 s poll) on a long one.
local FIRST_LOOK = 0.125

-- Polls describe until done(item) says yes or no; generic waiter.
function Client:_wait(where, what, timeout, poll, probe)
  timeout, poll = timeout or 900, poll or 15
  local deadline = host.monotonic() + timeout
  local last = "nothing"
  local step = math.min(FIRST_LOOK, poll)
  while true do
    local done, result, seen = probe()
    if done == true then return result end
    if done == false then return nil, result end
    last = seen or last
    local left = deadline - host.monotonic()
    if left <= 0 then return nil, timeout_error(where, what, timeout, last) end
    self.sleep(math.min(step, left))
    step = math.min(2 * step, poll)
  end
end

--[[ c:wait_for_task(arn, status | {statuses}, timeout_s, poll_s) -> task | nil, err
     status "deleted" waits until DMS no longer knows the task. Reaching
     "failed" (unless awaited) ends the wait with an error carrying the task's
     LastFailureMessage / StopReason. ]]
function Client:wait_for_task(arn, status, timeout, poll)
  local want = as_set(status)
  local where = "dms wait " .. tostring(arn)
  return self:_wait(where, "task status " .. table.concat(type(status) == "table" and status or { status }, "|"),
    timeout, poll, function()
      local task, err = self:describe_task(arn)
      if err then
        if err.retryable then return nil, nil, tostring(err) end
        return false, err
      end
      if task == nil then
        if want.deleted then return true, { ReplicationTaskArn = arn, Status = "deleted" } end
        return false, errors.new{ kind = "aws", where = where, code = "ResourceNotFoundFault",
          message = "replication task no longer exists", retryable = false }
      end
      local st = tostring(task.Status):lower()
      if want[st] then return true, task end
      if st == "failed" then
        return false, errors.new{ kind = "aws", where = where, code = "TaskFailed",
          message = "replication task failed: " .. tostring(task.LastFailureMessage or task.StopReason or "no reason given"),
          retryable = false, task = task }
      end
      return nil, nil, st
    end)
end

-- c:wait_for_connection(instance_arn, endpoint_arn, timeout_s, poll_s) -> connection | nil, err
function Client:wait_for_connection(instance_arn, endpoint_arn, timeout, poll)
  local where = "dms wait connection " .. tostring(endpoint_arn)
  return self:_wait(where, "connection test success", timeout, poll or 5, function()
    local list, err = self:describe_connections{ Filters = {
      ["endpoint-arn"] = endpoint_arn, ["replication-instance-arn"] = instance_arn } }
    if not list then
      if err.retryable then return nil, nil, tostring(err) end
      return false, err
    end
    local conn = list[1]
    if conn == nil then return nil, nil, "no connection yet" end
    local st = tostring(conn.Status):lower()
    if st == "successful" then return true, conn end
    if st == "failed" then
      return false, errors.new{ kind = "aws", where = where, code = "ConnectionTestFailed",
        message = "connection test failed: " .. tostring(conn.LastFailureMessage or "no reason given"),
        retryable = false, connection = conn }
    end
    return nil, nil, st
  end)
end

-- c:wait_for_replication_instance(arn, timeout_s, poll_s) -> instance | nil, err (until "available")
function Client:wait_for_replication_instance(arn, timeout, poll)
  local where = "dms wait instance " .. tostring(arn)
  return self:_wait(where, "replication instance available", timeout, poll or 30, function()
    local list, err = self:describe_replication_instances{ Filters = { ["replication-instance-arn"] = arn } }
    if not list then
      if err.retryable then return nil, nil, tostring(err) end
      return false, err
    end
    local inst = list[1]
    if inst == nil then return nil, nil, "not found" end
    local st = tostring(inst.ReplicationInstanceStatus):lower()
    if st == "available" then return true, inst end
    if st == "failed" or st == "deleted" or st == "deleting" or st:match("^incompatible") then
      return false, errors.new{ kind = "aws", where = where, code = "InstanceUnavailable",
        message = "replication instance is " .. st, retryable = false, instance = inst }
    end
    return nil, nil, st
  end)
end

M.Client = Client
--[[ dms.logs_client(opts) -> client | nil, err
     A CloudWatch Logs client (same options as dms.client; the endpoint from
     endpoint_url, AWS_ENDPOINT_URL_CLOUDWATCH_LOGS, ... as the AWS CLI finds
     it). client:filter_log_events{ logGroupName=, logStreamNames=,
     filterPattern=, startTime= } -> every matching event, following nextToken. ]]
function M.logs_client(opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  for k, v in pairs(M.LOGS) do o[k] = v end
  return M.client(o)
end

function Client:filter_log_events(params)
  local p, all, seen = {}, json.array(), {}
  for k, v in pairs(params) do p[k] = v end
  while true do
    local doc, err = self:call("FilterLogEvents", p)
    if not doc then return nil, err end
    for _, e in ipairs(doc.events or {}) do all[#all + 1] = e end
    local token = doc.nextToken
    if token == nil or token == "" or doc.dry_run then return all end
    if seen[token] then
      return nil, errors.new{ kind = "aws", where = "logs FilterLogEvents", code = "PaginationLoop",
        message = "the service returned the same nextToken twice", retryable = false }
    end
    seen[token] = true
    p.nextToken = token
  end
end

return M
