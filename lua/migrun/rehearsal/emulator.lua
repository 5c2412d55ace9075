--[[ A loopback stand-in for AWS DMS: the JSON 1.1 protocol (POST /,
X-Amz-Target AmazonDMSv20160101.<Op>), every request's SigV4 signature checked
against the credentials it was started with, state that moves through DMS's
status lifecycle over time, fault injection, and (when the source is a real
PostgreSQL with a pglogical slot) CDC applied to the target by
migrun.rehearsal.emulator_cdc.

  local emulator = require "migrun.rehearsal.emulator"
  local emu = assert(emulator.start{ port = 0, access_key = "AK", secret_key = "SK",
    region = "us-east-1", delays = { task_start = 0.2 }, faults = { seed = 1, throttle = 0.2 } })
  print(emu.url)              -- http://127.0.0.1:<port>
  emu:serve(10)               -- answer requests and advance state for 10 s (or forever: nil)
  emu:step(0.1)               -- one round: due transitions, then at most one request
  emu:handle{ method=, path=, headers={lower-name=value}, body= } -> {status=, headers=, body=}
  emu:close()

What it is not: one account, one region, one pre-created replication
instance; session tokens are accepted without checking (there is no STS);
full-load tasks load nothing (they finish at once). docs/dms-emulator.md lists
what is modelled and the choices made where the reference is UNCONFIRMED. ]]
local socket = require "socket"
local aws = require "migrun.aws"
local host = require "migrun.host"
local json = require "migrun.json"
local dms = require "migrun.dms"
local text = require "migrun.text"

local M = {}

M.ACCOUNT = "123456789012"
M.TARGET_PREFIX = dms.TARGET_PREFIX -- the wire protocol is the client's, not a copy of it
M.CONTROL_PREFIX = "MigrunEmulator"
M.LOGS_PREFIX = dms.LOGS_TARGET_PREFIX
M.CONTENT_TYPE = dms.CONTENT_TYPE
M.INSTANCE_ID = "migrun-emulator"

-- seconds each transition takes, overridable per emulator (delays = {...})
M.DEFAULT_DELAYS = {
  endpoint_delete = 0.5,
  connection = 0.5,
  task_create = 0.5,
  task_start = 0.5,
  task_stop = 0.5,
  task_modify = 0.3,
  task_delete = 0.5,
  cdc_poll = 0.2,       -- how often a running CDC task reads its slot
}

------------------------------------------------------------------------------
-- faults raised by handlers: error(Fault) is turned into a JSON error response

local Fault = {}
Fault.__index = Fault
Fault.__tostring = function(f) return f.code .. ": " .. f.message end

local function fault(code, message, status)
  error(setmetatable({ code = code, message = message, status = status or 400 }, Fault), 0)
end
M.fault = fault

local function check(cond, code, message, status)
  if not cond then fault(code, message, status) end
  return cond
end

local function invalid(message) fault("InvalidParameterValueException", message) end
local function not_found(message) fault("ResourceNotFoundFault", message) end
local function bad_state(message) fault("InvalidResourceStateFault", message) end

------------------------------------------------------------------------------
-- deterministic pseudo-random numbers (64-bit LCG, top 53 bits)

local function prng(seed)
  local state = math.tointeger(seed) or 0
  return function()
    state = state * 6364136223846793005 + 1442695040888963407
    return ((state >> 11) & ((1 << 53) - 1)) / (1 << 53)
  end
end
M.prng = prng

local ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

------------------------------------------------------------------------------
-- parameter checks (AWS JSON services answer a missing required member with
-- ValidationException and a wrongly typed one with SerializationException)

local function lower_first(s) return s:sub(1, 1):lower() .. s:sub(2) end

local function required(p, name)
  if p[name] == nil then
    fault("ValidationException", ("1 validation error detected: Value null at '%s' failed to satisfy "
      .. "constraint: Member must not be null"):format(lower_first(name)))
  end
  return p[name]
end

local function typed(p, name, want)
  local v = p[name]
  if v == nil then return nil end
  local ok
  if want == "integer" then
    -- migrun.json reads 5 as an integer and 5.0 as a float: an integer
    -- member takes the former (migrun's client never writes the latter)
    ok = math.type(v) == "integer"
  elseif want == "array" then ok = type(v) == "table" and (json.is_array(v) or next(v) == nil)
  elseif want == "object" then ok = type(v) == "table" and not json.is_array(v)
  else ok = type(v) == want end
  if not ok then
    fault("SerializationException", ("Unexpected value type for '%s': %s expected"):format(name, want))
  end
    return p[name]
end

local function req_string(p, name)
  required(p, name)
  return typed(p, name, "string")
end

local function valid_identifier(s, max)
  return #s >= 1 and #s <= (max or 255) and s:match("^%a[%w-]*$") ~= nil
    and not s:find("--", 1, true) and s:sub(-1) ~= "-"
end

local function check_identifier(s, what, max)
  if not valid_identifier(s, max) then
    invalid(("The parameter %s must begin with a letter, contain only ASCII letters, digits, and hyphens, "
      .. "not end with a hyphen or contain two consecutive hyphens."):format(what))
  end
end

-- Validates Filters and returns a predicate over an item (AND of filters, OR of values).
local function filter_predicate(p, fields)
  local filters = typed(p, "Filters", "array") or {}
  local tests = {}
  for _, f in ipairs(filters) do
    check(type(f) == "table", "SerializationException", "Filters must be a list of {Name, Values}")
    local name = req_string(f, "Name")
    required(f, "Values")
    local values = typed(f, "Values", "array")
    local get = fields[name]
    if not get then invalid(("The filter name %s is not valid for this operation."):format(name)) end
    local set = {}
    for _, v in ipairs(values) do set[tostring(v)] = true end
    tests[#tests + 1] = function(item)
      for _, have in ipairs(get(item)) do
        if set[tostring(have)] then return true end
      end
      return false
    end
  end
  return function(item)
    for _, t in ipairs(tests) do
      if not t(item) then return false end
    end
    return true
  end
end

-- MaxRecords and Marker, checked before anything is looked up.
local function paging(p, max_allowed)
  max_allowed = max_allowed or 100
  local max = typed(p, "MaxRecords", "integer") or 100
  if max < 20 or max > max_allowed then
    invalid(("MaxRecords must be between 20 and %d."):format(max_allowed))
  end
  local marker = typed(p, "Marker", "string")
  local from = 1
  if marker then
    from = math.tointeger(tonumber(marker:match("^emu%-marker%-(%d+)$")))
    if not from or from < 1 then invalid("Invalid Marker value: " .. marker) end
  end
  return { max = max, from = from, marker = marker }
end

-- One page of list (items already filtered).
local function page(pg, list)
  local max, from = pg.max, pg.from
  if from > #list + 1 then invalid("Invalid Marker value: " .. pg.marker) end
  local out = json.array()
  for i = from, math.min(#list, from + max - 1) do out[#out + 1] = list[i] end
  local next_marker = (from + max <= #list) and ("emu-marker-" .. (from + max)) or nil
  return out, next_marker
end

-- public view of a resource: fields whose names do not start with "_"
local function view(r, omit)
  local out = {}
  for k, v in pairs(r) do
    if type(k) == "string" and k:sub(1, 1) ~= "_" and not (omit and omit[k]) then out[k] = v end
  end
  return out
end

local function decode_doc(s, what)
  local doc = json.decode(s)
  if type(doc) ~= "table" or json.is_array(doc) then invalid(what) end
  return doc
end

-- "a=b;c=d" -> { a = "b", c = "d" } (keys as given)
function M.parse_eca(s)
  local out = {}
  for part in tostring(s or ""):gmatch("[^;]+") do
    local k, v = part:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
    if k and k ~= "" then out[k] = v end
  end
  return out
end

local function eca_get(eca, name)
  for k, v in pairs(eca) do
    if k:lower() == name:lower() then return v end
  end
end

local function is_lsn(s)
  return type(s) == "string" and s:match("^%x%x?%x?%x?%x?%x?%x?%x?/%x%x?%x?%x?%x?%x?%x?%x?$") ~= nil
end

-- CdcStartPosition for PostgreSQL: an LSN, or a checkpoint whose third field is one.
function M.start_lsn(pos)
  if type(pos) ~= "string" then return nil end
  if is_lsn(pos) then return pos end
  local lsn = pos:match("^checkpoint:V1#[^#]*#(%x+/%x+)#")
  if lsn then
    local hi, lo = lsn:match("^(%x+)/(%x+)$")
    return ("%X/%X"):format(tonumber(hi, 16), tonumber(lo, 16))
  end
  return nil
end

------------------------------------------------------------------------------
-- the emulator object

local Emu = {}
Emu.__index = Emu
Emu.__name = "migrun.dms.Emulator"
Emu.__tostring = function(e) return ("migrun.dms.Emulator (%s)"):format(e.url or "closed") end

function M.new(opts)
  opts = opts or {}
  assert(type(opts.access_key) == "string" and opts.access_key ~= "", "emulator: access_key required")
  assert(type(opts.secret_key) == "string" and opts.secret_key ~= "", "emulator: secret_key required")
  local e = setmetatable({
    access_key = opts.access_key,
    secret_key = opts.secret_key,
    region = opts.region or "us-east-1",
    delays = {},
    clock = opts.clock or socket.gettime,
    log = opts.log or function() end,
    endpoints = {}, endpoint_order = {},
    tasks = {}, task_order = {},
    connections = {}, connection_order = {},
    instances = {}, instance_order = {},
    scheduled = {}, seq = 0,
    request_count = 0,
    ids = prng(opts.id_seed or 20160101),
    cdc = opts.cdc, -- engine module (default: migrun.rehearsal.emulator_cdc when it loads)
  }, Emu)
  for k, v in pairs(M.DEFAULT_DELAYS) do e.delays[k] = v end
  for k, v in pairs(opts.delays or {}) do e.delays[k] = v end
  e:set_faults(opts.faults or {})
  if e.cdc == nil then
    local ok, mod = pcall(require, "migrun.rehearsal.emulator_cdc")
    e.cdc = ok and mod or false
  end
  -- the one replication instance, available from the start
  local arn = e:arn("rep")
  local inst = {
    ReplicationInstanceIdentifier = M.INSTANCE_ID,
    ReplicationInstanceClass = "dms.t3.medium",
    ReplicationInstanceStatus = "available",
    AllocatedStorage = 50,
    InstanceCreateTime = e.clock(),
    EngineVersion = "3.5.3",
    AutoMinorVersionUpgrade = true,
    MultiAZ = false,
    PubliclyAccessible = false,
    AvailabilityZone = e.region .. "a",
    ReplicationInstancePrivateIpAddresses = json.array{ "127.0.0.1" },
    ReplicationInstanceArn = arn,
  }
  e.instances[arn] = inst
  e.instance_order[1] = arn
  e.instance_arn = arn
  return e
end

-- emulator.start{port=, host=, ...} -> emulator listening | nil, err
function M.start(opts)
  opts = opts or {}
  local e = M.new(opts)
  local host = opts.host or "127.0.0.1"
  assert(host == "127.0.0.1" or host == "localhost" or host == "::1", "emulator: loopback only")
  local server, err = socket.bind(host, opts.port or 0)
  if not server then return nil, "emulator: cannot listen on " .. host .. ":" .. tostring(opts.port) .. ": " .. err end
  local _, port = server:getsockname()
  e.server, e.port = server, math.tointeger(tonumber(port))
  e.url = ("http://%s:%d"):format(host == "::1" and "[::1]" or host, e.port)
  return e
end

function Emu:arn(kind, suffix)
  if not suffix then
    local t = {}
    for i = 1, 26 do
      local n = math.floor(self.ids() * (i == 1 and 26 or #ID_CHARS)) + 1
      t[i] = ID_CHARS:sub(n, n)
    end
    suffix = table.concat(t)
  end
  return ("arn:aws:dms:%s:%s:%s:%s"):format(self.region, M.ACCOUNT, kind, suffix)
end

--[[ faults = { seed=, throttle= share 0..1, error5xx= share 0..1, latency= s,
     operations = { "DescribeReplicationTasks", ... } (only these; default all),
     fail_tasks = { ["task-id"] = "message", ... } } ]]
function Emu:set_faults(f)
  assert(type(f) == "table", "faults must be a table")
  local function share(v, name)
    v = v or 0
    assert(type(v) == "number" and v >= 0 and v <= 1, "faults." .. name .. " must be a share between 0 and 1")
    return v
  end
  local ops
  if f.operations then
    ops = {}
    for _, op in ipairs(f.operations) do ops[op] = true end
  end
  self.faults = {
    seed = f.seed or 1,
    throttle = share(f.throttle, "throttle"),
    error5xx = share(f.error5xx, "error5xx"),
    latency = f.latency or 0,
    operations = ops,
    fail_tasks = f.fail_tasks or {},
    injected = 0,
  }
  self.fault_random = prng(self.faults.seed)
  -- a named task already running fails now
  for _, arn in ipairs(self.task_order) do self:_maybe_fail(self.tasks[arn]) end
end

function Emu:later(delay, fn)
  self.seq = self.seq + 1
  self.scheduled[#self.scheduled + 1] = { at = self.clock() + (delay or 0), seq = self.seq, fn = fn }
end

-- Runs due transitions (in time order) and polls running CDC tasks.
function Emu:tick()
  local now = self.clock()
  while true do
    local best, bi
    for i, s in ipairs(self.scheduled) do
      if s.at <= now and (not best or s.at < best.at or (s.at == best.at and s.seq < best.seq)) then
        best, bi = s, i
      end
    end
    if not best then break end
    table.remove(self.scheduled, bi)
    local ok, err = pcall(best.fn)
    if not ok then self.log("transition failed: " .. tostring(err)) end
  end
  for _, arn in ipairs(self.task_order) do
    local t = self.tasks[arn]
    if t and t.Status == "running" and t._engine and now >= (t._next_poll or 0) then
      t._next_poll = now + self.delays.cdc_poll
      -- engine:poll() -> true | nil, message (the task fails with it)
      local ok, res, msg = pcall(t._engine.poll, t._engine)
      if not ok then self:_fail_task(t, "emulator CDC error: " .. tostring(res))
      elseif not res then self:_fail_task(t, tostring(msg)) end
    end
  end
end

------------------------------------------------------------------------------
-- HTTP

local REASONS = { [200] = "OK", [400] = "Bad Request", [403] = "Forbidden", [404] = "Not Found",
  [413] = "Payload Too Large", [500] = "Internal Server Error", [503] = "Service Unavailable" }

local function read_request(conn)
  local line, err = conn:receive("*l")
  if not line then return nil, err end
  local method, path = line:match("^(%S+)%s+(%S+)%s+HTTP/%d")
  if not method then return nil, "bad request line" end
  local headers = {}
  while true do
    local h = conn:receive("*l")
    if not h then return nil, "headers cut short" end
    if h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.-)%s*$")
    if k then
      k = k:lower()
      headers[k] = headers[k] and (headers[k] .. "," .. v) or v
    end
  end
  local body = ""
  local len = tonumber(headers["content-length"] or 0) or 0
  if len > 16 * 1024 * 1024 then return { too_large = true, method = method, path = path, headers = headers } end
  if len > 0 then
    body = conn:receive(len)
    if not body then return nil, "body cut short" end
  end
  return { method = method, path = path, headers = headers, body = body }
end

local function write_response(conn, res)
  local out = { ("HTTP/1.1 %d %s\r\n"):format(res.status, REASONS[res.status] or "Status") }
  local names = {}
  for k in pairs(res.headers) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do out[#out + 1] = k .. ": " .. res.headers[k] .. "\r\n" end
  out[#out + 1] = "Content-Length: " .. #res.body .. "\r\nConnection: close\r\n\r\n" .. res.body
  conn:send(table.concat(out))
end

-- One round: due transitions, then at most one request (waiting up to timeout s).
function Emu:step(timeout)
  assert(self.server, "emulator is closed")
  self:tick()
  self.server:settimeout(timeout or 0)
  local conn = self.server:accept()
  if not conn then return false end
  conn:settimeout(10)
  local req = read_request(conn)
  if req then
    local res
    if req.too_large then
      res = self:_error_response({ code = "SerializationException", message = "request body too large", status = 413 })
    else
      res = self:handle(req)
    end
    if res.delay and res.delay > 0 then host.sleep(res.delay) end
    write_response(conn, res)
  end
  conn:close()
  self:tick()
  return true
end

-- Serves for `seconds` (forever when nil), in rounds of at most 0.1 s.
function Emu:serve(seconds)
  local deadline = seconds and (self.clock() + seconds)
  while self.server and (not deadline or self.clock() < deadline) do
    local left = deadline and (deadline - self.clock()) or 0.1
    self:step(math.max(0, math.min(0.1, left)))
  end
end

function Emu:close()
  for _, arn in ipairs(self.task_order) do
    local t = self.tasks[arn]
    if t and t._engine then pcall(t._engine.close, t._engine) t._engine = nil end
  end
  if self.server then
    self.server:close()
    self.server = nil
  end
end
Emu.__close = Emu.close
Emu.__gc = Emu.close

function Emu:_request_id()
  self.request_count = self.request_count + 1
  local n = self.request_count
  return ("%08x-emul-4000-8000-%012x"):format(self.port or 0, n)
end

function Emu:_error_response(f, rid)
  return {
    status = f.status or 400,
    headers = { ["Content-Type"] = M.CONTENT_TYPE, ["x-amzn-RequestId"] = rid or self:_request_id() },
    body = json.encode{ __type = f.code, message = f.message },
  }
end

------------------------------------------------------------------------------
-- SigV4 check (errors as AWS JSON services give them; status 403 for
-- authentication failures, as moto does: the real status is UNCONFIRMED)

-- X-Amz-Date: the ISO 8601 basic format only, as SigV4 has it.
local function parse_amz_date(s)
  if not tostring(s):match("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ$") then return nil end
  return text.epoch(s)
end
M.parse_amz_date = parse_amz_date

function Emu:verify_signature(req)
  local h = req.headers
  local auth = h.authorization
  if not auth then
    fault("MissingAuthenticationTokenException", "Missing Authentication Token", 403)
  end
  local cred, signed, sig = auth:match(
    "^AWS4%-HMAC%-SHA256%s+Credential=([^,%s]+),%s*SignedHeaders=([^,%s]+),%s*Signature=(%x+)%s*$")
  if not cred then
    fault("IncompleteSignatureException", "Authorization header requires 'Credential', 'Signature' and "
      .. "'SignedHeaders' parameters of the AWS4-HMAC-SHA256 algorithm.", 403)
  end
  local akid, day, region, service, term = cred:match("^([^/]+)/(%d%d%d%d%d%d%d%d)/([^/]+)/([^/]+)/([^/]+)$")
  if not akid or term ~= "aws4_request" then
    fault("IncompleteSignatureException", "Credential should be of the form <key>/<date>/<region>/<service>/aws4_request.", 403)
  end
  if akid ~= self.access_key then
    fault("UnrecognizedClientException", "The security token included in the request is invalid.", 403)
  end
  local amz_date = h["x-amz-date"]
  local t = parse_amz_date(amz_date)
  if not t then
    fault("IncompleteSignatureException", "Authorization header requires existence of either a 'X-Amz-Date' "
      .. "or a 'Date' header.", 403)
  end
  if amz_date:sub(1, 8) ~= day then
    fault("InvalidSignatureException", ("Date in Credential scope does not match YYYYMMDD from ISO-8601 "
      .. "version of date from HTTP: '%s' != '%s'"):format(day, amz_date:sub(1, 8)), 403)
  end
  if region ~= self.region then
    fault("InvalidSignatureException", ("Credential should be scoped to a valid region, not '%s'."):format(region), 403)
  end
  -- CloudWatch Logs (the task logs) is served on the same port, signed for "logs"
  local want = (h["x-amz-target"] or ""):match("^" .. M.LOGS_PREFIX .. "%.") and "logs" or "dms"
  if service ~= want then
    fault("InvalidSignatureException", ("Credential should be scoped to correct service: '%s'."):format(want), 403)
  end
  local list = {}
  for name in (signed .. ";"):gmatch("([^;]*);") do list[name] = true end
  if not list.host or not list["x-amz-date"] then
    fault("InvalidSignatureException", "'Host' and 'X-Amz-Date' must be signed headers.", 403)
  end
  local skew = math.abs(os.time() - t)
  if skew > 15 * 60 then
    fault("InvalidSignatureException", ("Signature expired: %s is now earlier or later than 15 minutes "
      .. "from the server time."):format(amz_date), 403)
  end
  local again = aws.sign{ method = req.method, url = "http://" .. (h.host or "localhost") .. req.path,
    headers = h, body = req.body, region = region, service = service, access_key = self.access_key,
    secret_key = self.secret_key, time = amz_date, signed_headers = signed }
  if again.signature ~= sig then
    fault("InvalidSignatureException", "The request signature we calculated does not match the signature "
      .. "you provided. Check your AWS Secret Access Key and signing method. Consult the service "
      .. "documentation for details.", 403)
  end
end

------------------------------------------------------------------------------
-- dispatch

local OPS = {}        -- AmazonDMSv20160101.<Op> -> function(self, params)
local CONTROL = {}    -- MigrunEmulator.<Op>
local LOGS = {}       -- Logs_20140328.<Op> (CloudWatch Logs: the task logs)

-- Every operation of DMS's API (botocore's model dms/2016-01-01, 65
-- operations, and the later ones migrun's reference names): the emulator models
-- those migrun uses (OPS); another is a real DMS operation it cannot perform.
M.DMS_OPERATIONS = {}
for name in ([[AddTagsToResource ApplyPendingMaintenanceAction CancelReplicationTaskAssessmentRun CreateEndpoint
  CreateEventSubscription CreateFleetAdvisorCollector CreateReplicationInstance CreateReplicationSubnetGroup
  CreateReplicationTask DeleteCertificate DeleteConnection DeleteEndpoint DeleteEventSubscription
  DeleteFleetAdvisorCollector DeleteFleetAdvisorDatabases DeleteReplicationInstance DeleteReplicationSubnetGroup
  DeleteReplicationTask DeleteReplicationTaskAssessmentRun DescribeAccountAttributes
  DescribeApplicableIndividualAssessments DescribeCertificates DescribeConnections DescribeEndpointSettings
  DescribeEndpointTypes DescribeEndpoints DescribeEventCategories DescribeEventSubscriptions DescribeEvents
  DescribeFleetAdvisorCollectors DescribeFleetAdvisorDatabases DescribeFleetAdvisorLsaAnalysis
  DescribeFleetAdvisorSchemaObjectSummary DescribeFleetAdvisorSchemas DescribeOrderableReplicationInstances
  DescribePendingMaintenanceActions DescribeRefreshSchemasStatus DescribeReplicationInstanceTaskLogs
  DescribeReplicationInstances DescribeReplicationSubnetGroups DescribeReplicationTaskAssessmentResults
  DescribeReplicationTaskAssessmentRuns DescribeReplicationTaskIndividualAssessments DescribeReplicationTasks
  DescribeSchemas DescribeTableStatistics ImportCertificate ListTagsForResource ModifyEndpoint
  ModifyEventSubscription ModifyReplicationInstance ModifyReplicationSubnetGroup ModifyReplicationTask
  MoveReplicationTask RebootReplicationInstance RefreshSchemas ReloadTables RemoveTagsFromResource
  RunFleetAdvisorLsaAnalysis StartReplicationTask StartReplicationTaskAssessment StartReplicationTaskAssessmentRun
  StopReplicationTask TestConnection UpdateSubscriptionsToEventBridge
  ModifyReplicationConfig StartDataMigration DeleteDataMigration]]):gmatch("%a+") do
  M.DMS_OPERATIONS[name] = true
end

-- The answer to an operation the emulator has no handler for, always with a
-- message: a DMS operation it does not model is InvalidOperationFault (DMS's
-- own "the action or operation requested isn't valid", which every SDK knows
-- for DMS); a name DMS does not have is UnknownOperationException, HTTP 400,
-- as AWS's JSON services answer an unknown X-Amz-Target.
local function unknown_operation(prefix, op, target)
  if prefix == M.TARGET_PREFIX and op and M.DMS_OPERATIONS[op] then
    fault("InvalidOperationFault", ("%s is a DMS operation the DMS emulator does not model (it answers the "
      .. "operations migrun uses; docs/dms-emulator.md lists them)"):format(op), 400)
  end
  if target == "" then
    fault("UnknownOperationException", "Missing X-Amz-Target header: expected AmazonDMSv20160101.<Operation>", 400)
  end
  fault("UnknownOperationException", ("Unknown operation %s: this endpoint serves %s.<Operation> (the DMS API)")
    :format(target, M.TARGET_PREFIX), 400)
end

-- handle(req) -> { status=, headers=, body=, delay= }
function Emu:handle(req)
  local rid = self:_request_id()
  local ok, res = pcall(function()
    if req.method ~= "POST" then fault("UnknownOperationException", "Only POST / is served.", 404) end
    self:verify_signature(req)
    local target = req.headers["x-amz-target"] or ""
    local prefix, op = target:match("^([%w_]+)%.(%w+)$")
    local fn
    if prefix == M.TARGET_PREFIX then fn = OPS[op]
    elseif prefix == M.CONTROL_PREFIX then fn = CONTROL[op]
    elseif prefix == M.LOGS_PREFIX then fn = LOGS[op] end
    if not fn then unknown_operation(prefix, op, target) end
    local ctype = req.headers["content-type"] or ""
    if prefix ~= M.CONTROL_PREFIX and not ctype:find("application/x-amz-json-1.1", 1, true) then
      fault("UnknownOperationException", "Content-Type must be application/x-amz-json-1.1", 400)
    end
    local params = {}
    if req.body ~= "" then
      local doc, derr = json.decode(req.body)
      if type(doc) ~= "table" or (json.is_array(doc) and next(doc) ~= nil) then
        fault("SerializationException", "Start of structure or map found where not expected: "
          .. tostring(derr or "a JSON object is required"))
      end
      params = doc
    end
    local delay = 0
    if prefix == M.TARGET_PREFIX then
      local f = self.faults
      if f.latency > 0 then delay = f.latency end
      if not f.operations or f.operations[op] then
        local r = self.fault_random()
        if r < f.throttle then
          f.injected = f.injected + 1
          fault("ThrottlingException", "Rate exceeded", 400)
        elseif r < f.throttle + f.error5xx then
          f.injected = f.injected + 1
          if self.fault_random() < 0.5 then fault("InternalFailure", "We encountered an internal error. Please try again.", 500) end
          fault("ServiceUnavailable", "Service is unavailable. Please try again.", 503)
        end
      end
    end
    self:tick()
    local out = fn(self, params, op) or {}
    self.log(("%s %s -> ok"):format(op, rid))
    return { status = 200, delay = delay,
      headers = { ["Content-Type"] = M.CONTENT_TYPE, ["x-amzn-RequestId"] = rid },
      body = json.encode(out) }
  end)
  if ok then return res end
  if getmetatable(res) ~= Fault then
    self.log("internal error: " .. tostring(res))
    res = { code = "InternalFailure", message = "emulator error: " .. tostring(res), status = 500 }
  end
  self.log(("%s -> %s"):format(rid, res.code))
  local r = self:_error_response(res, rid)
  r.delay = self.faults.latency
  return r
end

------------------------------------------------------------------------------
-- replication instances

function OPS.DescribeReplicationInstances(self, p)
  local pg = paging(p)
  local keep = filter_predicate(p, {
    ["replication-instance-arn"] = function(i) return { i.ReplicationInstanceArn } end,
    ["replication-instance-id"] = function(i) return { i.ReplicationInstanceIdentifier } end,
    ["replication-instance-class"] = function(i) return { i.ReplicationInstanceClass } end,
    ["engine-version"] = function(i) return { i.EngineVersion } end,
  })
  local list = {}
  for _, arn in ipairs(self.instance_order) do
    local i = self.instances[arn]
    if keep(i) then list[#list + 1] = view(i) end
  end
  if #list == 0 then not_found("No replication instances found matching provided filters") end
  local items, marker = page(pg, list)
  return { ReplicationInstances = items, Marker = marker }
end

function Emu:_instance(arn)
  local i = self.instances[arn]
  if not i then not_found("Replication instance " .. arn .. " not found") end
  return i
end

------------------------------------------------------------------------------
-- tags (dms-api.md §2.1, DMS API Tag: Key 1-128 characters, Value 0-256, no
-- "aws:" or "dms:" prefix; kept in order, a key given again replaces its value)

local function check_tags(tags, list)
  list = list or {}
  for _, tag in ipairs(tags or {}) do
    if type(tag) ~= "table" or json.is_array(tag) then fault("SerializationException", "Tags must be a list of {Key, Value}") end
    local key = req_string(tag, "Key")
    local value = typed(tag, "Value", "string") or ""
    if #key < 1 or #key > 128 or #value > 256 then
      invalid(("Tag key must be 1 to 128 characters and its value at most 256: %s"):format(key))
    end
    if key:lower():match("^aws:") or key:lower():match("^dms:") then
      invalid("Tag keys may not begin with aws: or dms: " .. key)
    end
    local found = false
    for _, t in ipairs(list) do
      if t.Key == key then t.Value, found = value, true end
    end
    if not found then list[#list + 1] = { Key = key, Value = value } end
  end
  return list
end

-- The resource (endpoint, task or the replication instance) of an ARN.
function Emu:_tagged(arn)
  local r = self.endpoints[arn] or self.tasks[arn] or self.instances[arn]
  if not r then not_found(("Resource %s not found"):format(tostring(arn))) end
  r._tags = r._tags or {}
  return r
end

-- ListTagsForResource: ResourceArn or ResourceArnList; every tag comes back
-- with the ARN it belongs to (API_ListTagsForResource, API_Tag).
function OPS.ListTagsForResource(self, p)
  typed(p, "ResourceArn", "string")
  local arns = typed(p, "ResourceArnList", "array")
  local list = {}
  if p.ResourceArn then list[1] = p.ResourceArn end
  for _, a in ipairs(arns or {}) do
    if type(a) ~= "string" then fault("SerializationException", "ResourceArnList must be a list of strings") end
    list[#list + 1] = a
  end
  if #list == 0 then invalid("Either ResourceArn or ResourceArnList must be specified.") end
  local out = json.array()
  for _, arn in ipairs(list) do
    for _, t in ipairs(self:_tagged(arn)._tags) do
      out[#out + 1] = { Key = t.Key, Value = t.Value, ResourceArn = arn }
    end
  end
  return { TagList = out }
end

function OPS.AddTagsToResource(self, p)
  local r = self:_tagged(req_string(p, "ResourceArn"))
  required(p, "Tags")
  typed(p, "Tags", "array")
  check_tags(p.Tags, r._tags)
  return {}
end

function OPS.RemoveTagsFromResource(self, p)
  local r = self:_tagged(req_string(p, "ResourceArn"))
  required(p, "TagKeys")
  local gone = {}
  for _, k in ipairs(typed(p, "TagKeys", "array")) do gone[tostring(k)] = true end
  local keep = {}
  for _, t in ipairs(r._tags) do
    if not gone[t.Key] then keep[#keep + 1] = t end
  end
  r._tags = keep
  return {}
end

------------------------------------------------------------------------------
-- endpoints

local ENGINES = { postgres = "PostgreSQL", ["aurora-postgresql"] = "Amazon Aurora PostgreSQL" }
local SSL_MODES = { none = true, require = true, ["verify-ca"] = true, ["verify-full"] = true }

function Emu:_endpoint(arn)
  local ep = self.endpoints[arn]
  if not ep then not_found("Endpoint " .. tostring(arn) .. " not found") end
  return ep
end

local ENDPOINT_STRINGS = { "Username", "Password", "ServerName", "DatabaseName", "ExtraConnectionAttributes",
  "SslMode", "KmsKeyId", "CertificateArn", "ServiceAccessRoleArn", "ResourceIdentifier", "EndpointIdentifier",
  "EndpointType", "EngineName" }

-- The members CreateEndpoint and ModifyEndpoint share, type-checked and
-- validated as DMS does (given ones only: ModifyEndpoint changes what it names).
local function check_endpoint_params(p)
  for _, k in ipairs(ENDPOINT_STRINGS) do typed(p, k, "string") end
  typed(p, "Port", "integer")
  typed(p, "Tags", "array")
  typed(p, "PostgreSQLSettings", "object")
  if p.EndpointIdentifier then check_identifier(p.EndpointIdentifier, "EndpointIdentifier") end
  if p.EndpointType and p.EndpointType:lower() ~= "source" and p.EndpointType:lower() ~= "target" then
    invalid("Invalid value for EndpointType: " .. p.EndpointType .. " (source or target)")
  end
  if p.EngineName and not ENGINES[p.EngineName] then
    invalid("The emulator supports only engine names postgres and aurora-postgresql, not " .. p.EngineName)
  end
  if p.SslMode and not SSL_MODES[p.SslMode] then invalid("Invalid value for SslMode: " .. p.SslMode) end
  local pg = p.PostgreSQLSettings or {}
  if pg.PluginName and not ({ ["no-preference"] = 1, ["test-decoding"] = 1, pglogical = 1 })[pg.PluginName] then
    invalid("Invalid value for PluginName: " .. tostring(pg.PluginName))
  end
  if p.ResourceIdentifier and not valid_identifier(p.ResourceIdentifier, 31) then
    invalid("Invalid ResourceIdentifier: " .. p.ResourceIdentifier)
  end
end

-- An identifier no other endpoint holds (DMS keeps them in lower case).
function Emu:_check_endpoint_id_free(id, except_arn)
  for _, arn in ipairs(self.endpoint_order) do
    if arn ~= except_arn and self.endpoints[arn].EndpointIdentifier == id:lower() then
      fault("ResourceAlreadyExistsFault", "The resource you are attempting to create already exists.")
    end
  end
end

-- PostgreSQLSettings as kept (never the password, which is kept apart).
local function kept_settings(pg)
  local settings = {}
  for k, v in pairs(pg) do
    if k ~= "Password" then settings[k] = v end
  end
  return settings
end

function OPS.CreateEndpoint(self, p)
  local id = req_string(p, "EndpointIdentifier")
  req_string(p, "EndpointType")
  local engine = req_string(p, "EngineName")
  check_endpoint_params(p)
  local etype = p.EndpointType:lower()
  local pg = p.PostgreSQLSettings or {}
  self:_check_endpoint_id_free(id)
  local arn = self:arn("endpoint", p.ResourceIdentifier)
  if self.endpoints[arn] then fault("ResourceAlreadyExistsFault", "The resource you are attempting to create already exists.") end
  local ep = {
    EndpointIdentifier = id:lower(),
    EndpointType = etype:upper(),
    EngineName = engine,
    EngineDisplayName = ENGINES[engine],
    Username = p.Username or pg.Username,
    ServerName = p.ServerName or pg.ServerName,
    Port = p.Port or pg.Port,
    DatabaseName = p.DatabaseName or pg.DatabaseName,
    ExtraConnectionAttributes = p.ExtraConnectionAttributes,
    Status = "active",
    KmsKeyId = p.KmsKeyId or ("arn:aws:kms:%s:%s:key/emulator"):format(self.region, M.ACCOUNT),
    EndpointArn = arn,
    CertificateArn = p.CertificateArn,
    SslMode = p.SslMode or "none",
    ServiceAccessRoleArn = p.ServiceAccessRoleArn,
    PostgreSQLSettings = p.PostgreSQLSettings and kept_settings(pg) or nil,
    _password = p.Password or pg.Password,
    _tags = check_tags(p.Tags),
  }
  self.endpoints[arn] = ep
  self.endpoint_order[#self.endpoint_order + 1] = arn
  return { Endpoint = view(ep) }
end

--[[ ModifyEndpoint (API_ModifyEndpoint): every member but EndpointArn is
optional and changes what it names. PostgreSQLSettings are merged into the
endpoint's (a setting of the same name replaced, new ones added), or replace
them all with ExactSettings = true. Errors as DMS's model lists them:
ResourceNotFoundFault (no such endpoint), InvalidResourceStateFault (it is
being deleted), ResourceAlreadyExistsFault (another endpoint has the new
identifier), and the same validation as CreateEndpoint. A task that runs keeps
the endpoint it started with until it is started again (the emulator reads an
endpoint when a task starts; DMS's own behaviour there is UNCONFIRMED).
KmsKeyId, ResourceIdentifier and Tags are CreateEndpoint's only: ignored here,
as any member the operation does not have. ]]
function OPS.ModifyEndpoint(self, p)
  local arn = req_string(p, "EndpointArn")
  -- CreateEndpoint's own members are not ModifyEndpoint's: ignored, as members a model lacks
  p.KmsKeyId, p.ResourceIdentifier, p.Tags = nil, nil, nil
  check_endpoint_params(p)
  local exact = typed(p, "ExactSettings", "boolean")
  local ep = self:_endpoint(arn)
  if ep.Status ~= "active" then bad_state("Endpoint " .. arn .. " is " .. ep.Status) end
  if p.EndpointIdentifier then self:_check_endpoint_id_free(p.EndpointIdentifier, arn) end
  local pg = p.PostgreSQLSettings
  if p.EndpointIdentifier then ep.EndpointIdentifier = p.EndpointIdentifier:lower() end
  if p.EndpointType then ep.EndpointType = p.EndpointType:upper() end
  if p.EngineName then ep.EngineName, ep.EngineDisplayName = p.EngineName, ENGINES[p.EngineName] end
  for _, k in ipairs{ "Username", "ServerName", "Port", "DatabaseName" } do
    if p[k] ~= nil then ep[k] = p[k] elseif pg and pg[k] ~= nil then ep[k] = pg[k] end
  end
  for _, k in ipairs{ "ExtraConnectionAttributes", "CertificateArn", "SslMode", "ServiceAccessRoleArn" } do
    if p[k] ~= nil then ep[k] = p[k] end
  end
  if p.Password ~= nil then ep._password = p.Password elseif pg and pg.Password ~= nil then ep._password = pg.Password end
  if pg then
    local settings = exact and {} or (ep.PostgreSQLSettings or {})
    for k, v in pairs(kept_settings(pg)) do settings[k] = v end
    ep.PostgreSQLSettings = settings
  elseif exact then
    ep.PostgreSQLSettings = nil
  end
  return { Endpoint = view(ep) }
end

local ENDPOINT_FILTERS = {
  ["endpoint-arn"] = function(e) return { e.EndpointArn } end,
  ["endpoint-type"] = function(e) return { e.EndpointType, e.EndpointType:lower() } end,
  ["endpoint-id"] = function(e) return { e.EndpointIdentifier } end,
  ["engine-name"] = function(e) return { e.EngineName } end,
}

function OPS.DescribeEndpoints(self, p)
  local pg = paging(p)
  local keep = filter_predicate(p, ENDPOINT_FILTERS)
  local list = {}
  for _, arn in ipairs(self.endpoint_order) do
    local e = self.endpoints[arn]
    if keep(e) then list[#list + 1] = view(e) end
  end
  if #list == 0 then not_found("No Endpoints found matching provided filters") end
  local items, marker = page(pg, list)
  return { Endpoints = items, Marker = marker }
end

function OPS.DeleteEndpoint(self, p)
  local arn = req_string(p, "EndpointArn")
  local ep = self:_endpoint(arn)
  if ep.Status == "deleting" then bad_state("Endpoint " .. arn .. " is already being deleted") end
  for _, tarn in ipairs(self.task_order) do
    local t = self.tasks[tarn]
    if t.SourceEndpointArn == arn or t.TargetEndpointArn == arn then
      bad_state("All tasks associated with the endpoint must be deleted before you can delete the endpoint.")
    end
  end
  ep.Status = "deleting"
  for key, c in pairs(self.connections) do
    if c.EndpointArn == arn then c.Status = "deleting" self.connections[key] = nil end
  end
  self:later(self.delays.endpoint_delete, function()
    self.endpoints[arn] = nil
    for i, a in ipairs(self.endpoint_order) do
      if a == arn then table.remove(self.endpoint_order, i) break end
    end
    for i = #self.connection_order, 1, -1 do
      if not self.connections[self.connection_order[i]] then table.remove(self.connection_order, i) end
    end
  end)
  return { Endpoint = view(ep) }
end

------------------------------------------------------------------------------
-- connections

-- The endpoint's host must be a loopback address: the emulator connects nowhere else.
local function loopback_address(host)
  if host == nil or host == "" then return nil, "no ServerName" end
  local ip = host
  if not host:match("^[%d.]+$") and not host:find(":", 1, true) then
    local resolved = socket.dns.toip(host)
    if not resolved then return nil, "cannot resolve " .. host end
    ip = resolved
  end
  if ip:match("^127%.") or ip == "::1" then return ip end
  return nil, ("the emulator connects only to loopback addresses, not %s"):format(host)
end

-- Really tries the endpoint: a login with psql when it is installed (the
-- password goes through PGPASSWORD), else a TCP connect. -> true | nil, message
function Emu:probe_endpoint(ep)
  local ip, err = loopback_address(ep.ServerName)
  if not ip then return nil, err end
  local port = ep.Port or 5432
  local ok_pg, pg = pcall(require, "migrun.pg")
  if ok_pg and ENGINES[ep.EngineName] then
    local conn, perr = pg.connect({ host = ip, port = tostring(port), dbname = ep.DatabaseName,
      user = ep.Username, password = ep._password, application_name = "migrun-dms-emulator",
      sslmode = (ep.SslMode == "none" or ep.SslMode == nil) and "disable" or ep.SslMode },
      { name = ep.EndpointIdentifier, connect_timeout = 5 })
    if conn then
      conn:close()
      return true
    end
    return nil, tostring(perr and perr.message or perr)
  end
  local ok_proc, proc = pcall(require, "migrun.proc")
  local psql = io.open("/usr/bin/psql", "r")
  if psql then psql:close() end
  if ok_proc and psql then
    local ok, _, _, _, stderr = proc.run{ "/usr/bin/psql", "-X", "-w", "-At", "-c", "select 1",
      env = { PGHOST = ip, PGPORT = tostring(port), PGUSER = ep.Username or "", PGDATABASE = ep.DatabaseName or "",
        PGPASSWORD = ep._password or "", PGCONNECT_TIMEOUT = "5", PGAPPNAME = "migrun-dms-emulator",
        PGSSLMODE = (ep.SslMode == "none" or ep.SslMode == nil) and "disable" or ep.SslMode,
        PGPASSFILE = "/dev/null", PGSERVICEFILE = "/dev/null" },
      stdin = false }
    if ok then return true end
    local msg = tostring(stderr or ""):gsub("^psql: ", ""):gsub("%s+$", "")
    return nil, msg ~= "" and msg or "connection failed"
  end
  local tcp = socket.tcp()
  tcp:settimeout(3)
  local ok, cerr = tcp:connect(ip, port)
  tcp:close()
  if ok then return true end
  return nil, ("cannot connect to %s:%d: %s"):format(ep.ServerName, port, tostring(cerr))
end

function OPS.TestConnection(self, p)
  local iarn = req_string(p, "ReplicationInstanceArn")
  local earn = req_string(p, "EndpointArn")
  local inst = self:_instance(iarn)
  local ep = self:_endpoint(earn)
  if ep.Status ~= "active" then bad_state("Endpoint " .. earn .. " is " .. ep.Status) end
  if inst.ReplicationInstanceStatus ~= "available" then bad_state("Replication instance is not available") end
  local key = iarn .. "|" .. earn
  local c = self.connections[key]
  if c and c.Status == "testing" then bad_state("A connection test is already running for this endpoint") end
  if not c then
    self.connection_order[#self.connection_order + 1] = key
  end
  c = { ReplicationInstanceArn = iarn, EndpointArn = earn, Status = "testing",
    EndpointIdentifier = ep.EndpointIdentifier, ReplicationInstanceIdentifier = inst.ReplicationInstanceIdentifier }
  self.connections[key] = c
  self:later(self.delays.connection, function()
    if self.connections[key] ~= c then return end
    local ok, msg = self:probe_endpoint(ep)
    if ok then
      c.Status = "successful"
    else
      c.Status = "failed"
      c.LastFailureMessage = "Test connection failed for endpoint '" .. ep.EndpointIdentifier .. "': " .. msg
    end
  end)
  return { Connection = view(c) }
end

function OPS.DescribeConnections(self, p)
  local pg = paging(p)
  local keep = filter_predicate(p, {
    ["endpoint-arn"] = function(c) return { c.EndpointArn } end,
    ["replication-instance-arn"] = function(c) return { c.ReplicationInstanceArn } end,
  })
  local list = {}
  for _, key in ipairs(self.connection_order) do
    local c = self.connections[key]
    if c and keep(c) then list[#list + 1] = view(c) end
  end
  if #list == 0 then not_found("No Connections found matching provided filters") end
  local items, marker = page(pg, list)
  return { Connections = items, Marker = marker }
end

------------------------------------------------------------------------------
-- tasks

local MIGRATION_TYPES = { ["full-load"] = true, cdc = true, ["full-load-and-cdc"] = true }
local START_TYPES = { ["start-replication"] = true, ["resume-processing"] = true, ["reload-target"] = true }

function Emu:_task(arn)
  local t = self.tasks[arn]
  if not t then not_found("Replication task could not be found.") end
  return t
end

local function check_mappings(s)
  local doc = decode_doc(s, "Invalid Table Mappings document")
  if type(doc.rules) ~= "table" or #doc.rules == 0 then invalid("Invalid Table Mappings document") end
  local selection = false
  for _, r in ipairs(doc.rules) do
    if type(r) ~= "table" or type(r["rule-type"]) ~= "string" then invalid("Invalid Table Mappings document") end
    if r["rule-type"] == "selection" then
      selection = true
      local loc = r["object-locator"]
      if type(loc) ~= "table" or type(loc["schema-name"]) ~= "string" then
        invalid("Invalid Table Mappings document")
      end
      local action = r["rule-action"]
      if action ~= "include" and action ~= "exclude" and action ~= "explicit" then
        invalid("Invalid Table Mappings document")
      end
    elseif r["rule-type"] == "transformation" then
      local loc = r["object-locator"]
      if type(loc) ~= "table" or type(loc["schema-name"]) ~= "string" or type(r["rule-action"]) ~= "string"
          or type(r["rule-target"]) ~= "string" then
        invalid("Invalid Table Mappings document")
      end
      if r["rule-action"] == "remove-column" and (r["rule-target"] ~= "column" or type(loc["table-name"]) ~= "string"
          or type(loc["column-name"]) ~= "string") then
        invalid(("Error in mapping rules. Rule with ruleId = %s failed validation: remove-column needs rule-target "
          .. "column and a column-name"):format(tostring(r["rule-id"])))
      end
    end
  end
  if not selection then invalid("Invalid Table Mappings document: at least one selection rule is required") end
  return doc
end

--[[ The DMS rules that concern migrun's documents together (mappings, task
settings, the source engine), each refused with InvalidParameterValueException
as DMS answers invalid mappings and settings (docs/dms-emulator.md, "Rules"):
  * a table-settings rule names an exact schema and table (no %): DMS's own
    text, "Error in mapping rules. Rule with ruleId = x failed validation. Exact
    schema and table name required when using table settings rule.";
  * lob-settings "unlimited" with a nonzero bulk-max-size is combination LOB
    mode, for Db2 and SAP ASE sources only; "limited" needs a nonzero one;
  * BatchApplyEnabled with LOB columns only in limited LOB mode: not with
    TargetMetadata.FullLobMode, nor with a table-settings rule in full LOB mode
    (TargetMetadata task settings, BatchApplyEnabled). ]]
local COMBINATION_ENGINES = { db2 = true, ["db2-zos"] = true, sybase = true }

local function rule_error(r, why)
  invalid(("Error in mapping rules. Rule with ruleId = %s failed validation. %s"):format(
    tostring(r["rule-id"]), why))
end

local function check_rules(mappings, settings, source_engine)
  local doc = json.decode(mappings) or {}
  local tm = (type(settings) == "table" and settings.TargetMetadata) or {}
  local batch = tm.BatchApplyEnabled == true
  if batch and tm.SupportLobs ~= false and tm.FullLobMode == true then
    invalid("Batch apply (TargetMetadata.BatchApplyEnabled) supports LOB columns only in limited LOB mode; "
      .. "FullLobMode is set.")
  end
  for _, r in ipairs(doc.rules or {}) do
    if type(r) == "table" and r["rule-type"] == "table-settings" then
      local loc = r["object-locator"]
      if type(loc) ~= "table" or type(loc["schema-name"]) ~= "string" or type(loc["table-name"]) ~= "string"
         or loc["schema-name"]:find("%", 1, true) or loc["table-name"]:find("%", 1, true) then
        rule_error(r, "Exact schema and table name required when using table settings rule.")
      end
      local lob = r["lob-settings"]
      if lob ~= nil then
        if type(lob) ~= "table" then rule_error(r, "lob-settings must be an object.") end
        local mode = lob.mode or "limited"
        local size = lob["bulk-max-size"]
        local kb = tonumber(size)
        if size ~= nil and (not kb or kb < 0 or kb ~= math.floor(kb)) then
          rule_error(r, ("bulk-max-size '%s' is not a whole number of KB."):format(tostring(size)))
        end
        if mode == "unlimited" then
          if kb and kb ~= 0 and not COMBINATION_ENGINES[source_engine] then
            rule_error(r, ("lob-settings mode 'unlimited' with a nonzero bulk-max-size is combination LOB mode, "
              .. "supported only for Db2 and SAP ASE sources, not %s: use bulk-max-size 0 for full LOB mode.")
              :format(tostring(source_engine)))
          end
          if batch then
            invalid(("Batch apply (TargetMetadata.BatchApplyEnabled) supports LOB columns only in limited LOB "
              .. "mode; table-settings rule %s sets full LOB mode for %s.%s."):format(tostring(r["rule-id"]),
              loc["schema-name"], loc["table-name"]))
          end
        elseif mode == "limited" then
          if not kb or kb == 0 then rule_error(r, "lob-settings mode 'limited' needs a nonzero bulk-max-size.") end
        elseif mode ~= "none" then
          rule_error(r, ("lob-settings mode '%s' is not one of limited, unlimited, none."):format(tostring(mode)))
        end
      end
    end
  end
end

local function check_settings(s, on_create)
  if s == nil then return {} end
  local doc = decode_doc(s, "Invalid task settings JSON")
  local logging = doc.Logging
  if on_create and type(logging) == "table" and (logging.CloudWatchLogGroup or logging.CloudWatchLogStream) then
    invalid("Task Settings CloudWatchLogGroup or CloudWatchLogStream cannot be set on create.")
  end
  for _, section in ipairs{ "TargetMetadata", "FullLoadSettings", "Logging", "ControlTablesSettings",
                            "ChangeProcessingTuning", "ErrorBehavior" } do
    if doc[section] ~= nil and (type(doc[section]) ~= "table" or json.is_array(doc[section])) then
      invalid("Invalid task settings JSON: " .. section .. " must be an object")
    end
  end
  return doc
end

local function check_positions(p)
  typed(p, "CdcStartPosition", "string")
  typed(p, "CdcStopPosition", "string")
  if p.CdcStartTime ~= nil and type(p.CdcStartTime) ~= "number" and type(p.CdcStartTime) ~= "string" then
    fault("SerializationException", "CdcStartTime must be a timestamp")
  end
  if p.CdcStartTime ~= nil and p.CdcStartPosition ~= nil then
    invalid("CdcStartTime and CdcStartPosition cannot both be specified.")
  end
  if p.CdcStartPosition and not M.start_lsn(p.CdcStartPosition) then
    invalid("Invalid CdcStartPosition '" .. p.CdcStartPosition .. "': a PostgreSQL source takes an LSN such as "
      .. "4AF/B00000D0 or a checkpoint:V1#... string.")
  end
  if p.CdcStopPosition and not (p.CdcStopPosition:match("^server_time:") or p.CdcStopPosition:match("^commit_time:")) then
    invalid("Invalid CdcStopPosition '" .. p.CdcStopPosition .. "'")
  end
end

function OPS.CreateReplicationTask(self, p)
  local id = req_string(p, "ReplicationTaskIdentifier")
  local src = req_string(p, "SourceEndpointArn")
  local dst = req_string(p, "TargetEndpointArn")
  local iarn = req_string(p, "ReplicationInstanceArn")
  local mtype = req_string(p, "MigrationType")
  local mappings = req_string(p, "TableMappings")
  typed(p, "ReplicationTaskSettings", "string")
  typed(p, "TaskData", "string")
  typed(p, "ResourceIdentifier", "string")
  typed(p, "Tags", "array")
  check_identifier(id, "ReplicationTaskIdentifier")
  if not MIGRATION_TYPES[mtype] then invalid("Invalid value for MigrationType: " .. mtype) end
  check_mappings(mappings)
  local settings = check_settings(p.ReplicationTaskSettings, true)
  check_positions(p)
  local tags = check_tags(p.Tags)
  local sep, tep = self:_endpoint(src), self:_endpoint(dst)
  check_rules(mappings, settings, sep.EngineName)
  self:_instance(iarn)
  if sep.EndpointType ~= "SOURCE" then invalid("Endpoint " .. src .. " is not a source endpoint") end
  if tep.EndpointType ~= "TARGET" then invalid("Endpoint " .. dst .. " is not a target endpoint") end
  if p.CdcStartTime ~= nil and ENGINES[sep.EngineName] then
    invalid("CdcStartTime is not supported for a PostgreSQL source: use CdcStartPosition with an LSN.")
  end
  for _, arn in ipairs(self.task_order) do
    if self.tasks[arn].ReplicationTaskIdentifier == id:lower() then
      fault("ResourceAlreadyExistsFault", "The resource you are attempting to create already exists.")
    end
  end
  local arn = self:arn("task", p.ResourceIdentifier)
  if self.tasks[arn] then fault("ResourceAlreadyExistsFault", "The resource you are attempting to create already exists.") end
  local now = self.clock()
  local t = {
    ReplicationTaskIdentifier = id:lower(),
    SourceEndpointArn = src,
    TargetEndpointArn = dst,
    ReplicationInstanceArn = iarn,
    MigrationType = mtype,
    TableMappings = mappings,
    ReplicationTaskSettings = p.ReplicationTaskSettings or "{}",
    Status = "creating",
    ReplicationTaskCreationDate = now,
    CdcStartPosition = p.CdcStartPosition,
    CdcStopPosition = p.CdcStopPosition,
    TaskData = p.TaskData,
    ReplicationTaskArn = arn,
    ReplicationTaskStats = { FullLoadProgressPercent = 0, ElapsedTimeMillis = 0, TablesLoaded = 0,
      TablesLoading = 0, TablesQueued = 0, TablesErrored = 0 },
    _has_run = false,
    _tables = {}, _table_order = {},
    _log = {}, _log_times = {},
    _tags = tags,
  }
  self.tasks[arn] = t
  self.task_order[#self.task_order + 1] = arn
  self:later(self.delays.task_create, function()
    if t.Status == "creating" then t.Status = "ready" end
  end)
  return { ReplicationTask = view(t) }
end

function Emu:_maybe_fail(t)
  if not t then return end
  local msg = self.faults.fail_tasks[t.ReplicationTaskIdentifier]
  if msg and (t.Status == "running" or t.Status == "starting") then
    self:_fail_task(t, msg == true and "Injected failure" or tostring(msg))
  end
end

-- Appends "[COMPONENT      ]L: message" to the task's log (DMS's CloudWatch lines).
function Emu:task_log(t, line, component, level)
  if component then line = ("[%-15s]%s: %s"):format(component, level or "I", line) end
  t._log[#t._log + 1] = line
  t._log_times[#t._log] = math.floor(self.clock() * 1000)
  self.log(t.ReplicationTaskIdentifier .. ": " .. line)
end

function Emu:_fail_task(t, message)
  if t._engine then pcall(t._engine.close, t._engine) t._engine = nil end
  t.Status = "failed"
  t.LastFailureMessage = message
  t.StopReason = "Stop Reason FATAL_ERROR"
  t.ReplicationTaskStats.StopDate = self.clock()
  t._run = (t._run or 0) + 1 -- pending transitions of this run no longer apply
  self:task_log(t, message, "TASK_MANAGER", "E")
end

local function elapsed(self, t)
  local s = t.ReplicationTaskStats
  if s.StartDate then
    local stop = (t.Status == "running" or t.Status == "starting") and self.clock() or (s.StopDate or self.clock())
    s.ElapsedTimeMillis = math.floor((stop - s.StartDate) * 1000)
  end
end

function OPS.StartReplicationTask(self, p)
  local arn = req_string(p, "ReplicationTaskArn")
  local stype = req_string(p, "StartReplicationTaskType")
  check_positions(p)
  local t = self:_task(arn)
  if not START_TYPES[stype] then invalid("Invalid value for StartReplicationTaskType: " .. stype) end
  if t.Status ~= "ready" and t.Status ~= "stopped" and t.Status ~= "failed" then
    bad_state(("Replication task %s is %s; it can only be started when ready, stopped or failed."):format(
      t.ReplicationTaskIdentifier, t.Status))
  end
  if stype ~= "start-replication" and not t._has_run then
    bad_state("The task has never run: the first start must use start-replication.")
  end
  if stype == "reload-target" and t.MigrationType == "cdc" then
    invalid("reload-target is not valid for a cdc-only task.")
  end
  local sep = self:_endpoint(t.SourceEndpointArn)
  if p.CdcStartTime ~= nil and ENGINES[sep.EngineName] then
    invalid("CdcStartTime is not supported for a PostgreSQL source: use CdcStartPosition with an LSN.")
  end
  if p.CdcStartPosition then t.CdcStartPosition = p.CdcStartPosition end
  if p.CdcStopPosition then t.CdcStopPosition = p.CdcStopPosition end
  local resume = stype == "resume-processing"
  local now = self.clock()
  t.Status = "starting"
  t.LastFailureMessage = nil
  t.StopReason = nil
  t.ReplicationTaskStartDate = now
  local s = t.ReplicationTaskStats
  s.StartDate = now
  s.StopDate = nil
  if not resume then s.FreshStartDate = now end
  t._has_run = true
  t._run = (t._run or 0) + 1
  local run = t._run
  self:later(self.delays.task_start, function()
    if t._run ~= run or t.Status ~= "starting" then return end
    self:_begin_run(t, resume)
  end)
  return { ReplicationTask = view(t) }
end

-- starting -> running (or failed): validates the start position and starts CDC.
function Emu:_begin_run(t, resume)
  local sep = self.endpoints[t.SourceEndpointArn]
  local tep = self.endpoints[t.TargetEndpointArn]
  local settings = json.decode(t.ReplicationTaskSettings) or {}
  if t.MigrationType == "full-load" then
    t.Status = "running"
    local run = t._run
    self:later(self.delays.task_stop, function()
      if t._run ~= run or t.Status ~= "running" then return end
      t.Status = "stopped"
      t.StopReason = "Stop Reason FULL_LOAD_ONLY_FINISHED"
      t.ReplicationTaskStats.FullLoadProgressPercent = 100
      t.ReplicationTaskStats.StopDate = self.clock()
      elapsed(self, t)
    end)
    return
  end
  local pg = sep.PostgreSQLSettings or {}
  local eca = M.parse_eca(sep.ExtraConnectionAttributes)
  local slot = pg.SlotName or eca_get(eca, "slotName")
  if t.MigrationType == "cdc" and not resume then
    if not t.CdcStartPosition then
      return self:_fail_task(t, "A CDC-only task on a PostgreSQL source needs a CdcStartPosition "
        .. "(native start point) when started with start-replication.")
    end
    if not slot then
      return self:_fail_task(t, "The source endpoint names no replication slot (PostgreSQLSettings.SlotName "
        .. "or slotName= in ExtraConnectionAttributes): a CDC start position needs one.")
    end
  end
  t.Status = "running"
  self:task_log(t, "Task started (" .. t.MigrationType .. ")", "TASK_MANAGER", "I")
  if self.cdc and slot then
    local engine, err = self.cdc.new{ emulator = self, server_name = M.INSTANCE_ID, task = t, source = sep, target = tep, slot = slot,
      settings = settings, resume = resume, start_lsn = M.start_lsn(t.CdcStartPosition) }
    if not engine then return self:_fail_task(t, tostring(err)) end
    t._engine = engine
    -- its first read of the slot a poll after it started, as DMS's task takes
    -- a while to connect: until then it is running and has applied nothing
    t._next_poll = self.clock() + self.delays.cdc_poll
  end
  self:_maybe_fail(t)
end

function OPS.StopReplicationTask(self, p)
  local arn = req_string(p, "ReplicationTaskArn")
  local t = self:_task(arn)
  if t.Status ~= "running" and t.Status ~= "starting" then
    bad_state("Replication task is not running")
  end
  t.Status = "stopping"
  t._run = (t._run or 0) + 1
  local run = t._run
  local engine = t._engine
  t._engine = nil
  self:later(self.delays.task_stop, function()
    if engine then pcall(engine.close, engine) end
    if t._run ~= run or t.Status ~= "stopping" then return end
    t.Status = "stopped"
    t.StopReason = "Stop Reason NORMAL"
    t.ReplicationTaskStats.StopDate = self.clock()
    elapsed(self, t)
  end)
  return { ReplicationTask = view(t) }
end

function OPS.ModifyReplicationTask(self, p)
  local arn = req_string(p, "ReplicationTaskArn")
  typed(p, "ReplicationTaskIdentifier", "string")
  typed(p, "MigrationType", "string")
  typed(p, "TableMappings", "string")
  typed(p, "ReplicationTaskSettings", "string")
  typed(p, "TaskData", "string")
  check_positions(p)
  local t = self:_task(arn)
  if t.Status ~= "ready" and t.Status ~= "stopped" and t.Status ~= "failed" then
    bad_state(("Replication task %s is %s; it can only be modified when ready, stopped or failed."):format(
      t.ReplicationTaskIdentifier, t.Status))
  end
  if p.MigrationType and p.MigrationType ~= t.MigrationType then
    if not MIGRATION_TYPES[p.MigrationType] then invalid("Invalid value for MigrationType: " .. p.MigrationType) end
    invalid("The migration type of a task cannot be changed.")
  end
  if p.TableMappings then check_mappings(p.TableMappings) end
  if p.ReplicationTaskSettings then check_settings(p.ReplicationTaskSettings, false) end
  check_rules(p.TableMappings or t.TableMappings, json.decode(p.ReplicationTaskSettings or t.ReplicationTaskSettings),
    self:_endpoint(t.SourceEndpointArn).EngineName)
  if p.ReplicationTaskIdentifier then
    check_identifier(p.ReplicationTaskIdentifier, "ReplicationTaskIdentifier")
    for _, other in ipairs(self.task_order) do
      if other ~= arn and self.tasks[other].ReplicationTaskIdentifier == p.ReplicationTaskIdentifier:lower() then
        fault("ResourceAlreadyExistsFault", "The resource you are attempting to create already exists.")
      end
    end
  end
  local before = t.Status
  t.Status = "modifying"
  if p.ReplicationTaskIdentifier then t.ReplicationTaskIdentifier = p.ReplicationTaskIdentifier:lower() end
  if p.TableMappings then t.TableMappings = p.TableMappings end
  if p.ReplicationTaskSettings then t.ReplicationTaskSettings = p.ReplicationTaskSettings end
  if p.TaskData then t.TaskData = p.TaskData end
  if p.CdcStartPosition then t.CdcStartPosition = p.CdcStartPosition end
  if p.CdcStopPosition then t.CdcStopPosition = p.CdcStopPosition end
  self:later(self.delays.task_modify, function()
    if t.Status == "modifying" then t.Status = before end
  end)
  return { ReplicationTask = view(t) }
end

function OPS.DeleteReplicationTask(self, p)
  local arn = req_string(p, "ReplicationTaskArn")
  local t = self:_task(arn)
  if t.Status == "running" or t.Status == "starting" or t.Status == "stopping" or t.Status == "modifying"
     or t.Status == "creating" or t.Status == "deleting" then
    bad_state(("Replication task %s is %s; stop it before deleting it."):format(t.ReplicationTaskIdentifier, t.Status))
  end
  t.Status = "deleting"
  self:later(self.delays.task_delete, function()
    self.tasks[arn] = nil
    for i, a in ipairs(self.task_order) do
      if a == arn then table.remove(self.task_order, i) break end
    end
  end)
  return { ReplicationTask = view(t) }
end

local SETTINGS_FIELDS = { ReplicationTaskSettings = true, TableMappings = true }

function OPS.DescribeReplicationTasks(self, p)
  typed(p, "WithoutSettings", "boolean")
  local pg = paging(p)
  local keep = filter_predicate(p, {
    ["replication-task-arn"] = function(t) return { t.ReplicationTaskArn } end,
    ["replication-task-id"] = function(t) return { t.ReplicationTaskIdentifier } end,
    ["migration-type"] = function(t) return { t.MigrationType } end,
    ["endpoint-arn"] = function(t) return { t.SourceEndpointArn, t.TargetEndpointArn } end,
    ["replication-instance-arn"] = function(t) return { t.ReplicationInstanceArn } end,
  })
  local list = {}
  for _, arn in ipairs(self.task_order) do
    local t = self.tasks[arn]
    if keep(t) then
      elapsed(self, t)
      if t._engine and t._engine.checkpoint then t.RecoveryCheckpoint = t._engine:checkpoint() end
      list[#list + 1] = view(t, p.WithoutSettings and SETTINGS_FIELDS or nil)
    end
  end
  if #list == 0 then not_found("No Tasks found matching provided filters") end
  local items, marker = page(pg, list)
  return { ReplicationTasks = items, Marker = marker }
end

-- Statistics of one table (created at first use, in first-seen order).
function Emu:table_stats(t, schema, name)
  local key = text.key(schema, name)
  local s = t._tables[key]
  if not s then
    s = { SchemaName = schema, TableName = name, Inserts = 0, Deletes = 0, Updates = 0, Ddls = 0,
      AppliedInserts = 0, AppliedDeletes = 0, AppliedUpdates = 0, AppliedDdls = 0, FullLoadRows = 0,
      FullLoadCondtnlChkFailedRows = 0, FullLoadErrorRows = 0, FullLoadReloaded = false,
      LastUpdateTime = self.clock(), TableState = "Table completed", ValidationPendingRecords = 0,
      ValidationFailedRecords = 0, ValidationSuspendedRecords = 0, ValidationState = "Not enabled" }
    t._tables[key] = s
    t._table_order[#t._table_order + 1] = key
  end
  return s
end

function OPS.DescribeTableStatistics(self, p)
  local arn = req_string(p, "ReplicationTaskArn")
  local t = self:_task(arn)
  local pg = paging(p, 500)
  local keep = filter_predicate(p, {
    ["schema-name"] = function(s) return { s.SchemaName } end,
    ["table-name"] = function(s) return { s.TableName } end,
    ["table-state"] = function(s) return { s.TableState } end,
  })
  if t.Status == "creating" or t.Status == "deleting" then
    bad_state("Replication task " .. t.ReplicationTaskIdentifier .. " is " .. t.Status)
  end
  local list = {}
  for _, key in ipairs(t._table_order) do
    local s = t._tables[key]
    if keep(s) then list[#list + 1] = view(s) end
  end
  local items, marker = page(pg, list)
  return { ReplicationTaskArn = arn, TableStatistics = items, Marker = marker }
end

------------------------------------------------------------------------------
-- emulator-only operations (X-Amz-Target MigrunEmulator.<Op>, signed like the rest)

function CONTROL.SetFaults(self, p)
  local ok, err = pcall(self.set_faults, self, p)
  if not ok then invalid(tostring(err):gsub("^.-:%d+: ", "")) end
  return { Faults = { seed = self.faults.seed, throttle = self.faults.throttle, error5xx = self.faults.error5xx,
    latency = self.faults.latency } }
end

function CONTROL.GetFaults(self)
  return { Injected = self.faults.injected, Requests = self.request_count }
end

-- The task's log lines (what DMS would send to CloudWatch), for tests.
function CONTROL.GetTaskLog(self, p)
  local t = self:_task(req_string(p, "ReplicationTaskArn"))
  return { Lines = json.array(t._log) }
end

------------------------------------------------------------------------------
-- CloudWatch Logs: DMS sends a task's log to the group dms-tasks-<replication
-- instance id>, stream dms-task-<task resource id> (the ARN's last part).
-- FilterLogEvents with logGroupName, logStreamNames, filterPattern (terms that
-- must all appear, or a "quoted phrase"), startTime/endTime (ms), limit and
-- nextToken; errors as CloudWatch Logs answers them.

function M.log_group(instance_id) return "dms-tasks-" .. instance_id end
function M.log_stream(task_arn) return "dms-task-" .. tostring(task_arn):match("([^:]+)$") end

local function pattern_terms(pat)
  local terms = {}
  if pat == nil or pat == "" then return terms end
  local phrase = pat:match('^%s*"(.*)"%s*$')
  if phrase then return { phrase } end
  for w in pat:gmatch("%S+") do terms[#terms + 1] = w end
  return terms
end

function LOGS.FilterLogEvents(self, p)
  local group = req_string(p, "logGroupName")
  local streams = typed(p, "logStreamNames", "array")
  local pat = typed(p, "filterPattern", "string")
  local from = typed(p, "startTime", "integer")
  local to = typed(p, "endTime", "integer")
  local limit = typed(p, "limit", "integer") or 10000
  local token = typed(p, "nextToken", "string")
  if group ~= M.log_group(M.INSTANCE_ID) then
    fault("ResourceNotFoundException", "The specified log group does not exist.")
  end
  local wanted
  if streams then
    wanted = {}
    for _, s in ipairs(streams) do wanted[tostring(s)] = true end
  end
  local terms = pattern_terms(pat)
  local events = {}
  for _, arn in ipairs(self.task_order) do
    local t = self.tasks[arn]
    local stream = M.log_stream(arn)
    if not wanted or wanted[stream] then
      for i, line in ipairs(t._log) do
        local at = t._log_times[i] or 0
        local keep = (not from or at >= from) and (not to or at <= to)
        for _, term in ipairs(terms) do
          if keep and not line:find(term, 1, true) then keep = false end
        end
        if keep then
          events[#events + 1] = { logStreamName = stream, timestamp = at, ingestionTime = at, message = line,
            eventId = ("%s-%d"):format(stream, i) }
        end
      end
    end
  end
  table.sort(events, function(a, b)
    if a.timestamp ~= b.timestamp then return a.timestamp < b.timestamp end
    return a.eventId < b.eventId
  end)
  local start = 1
  if token then
    start = math.tointeger(tonumber(token:match("^emu%-token%-(%d+)$")))
    if not start then fault("InvalidParameterException", "The specified nextToken is invalid.") end
  end
  local out = json.array()
  for i = start, math.min(#events, start + limit - 1) do out[#out + 1] = events[i] end
  local next_token = (start + limit <= #events) and ("emu-token-" .. (start + limit)) or nil
  return { events = out, nextToken = next_token, searchedLogStreams = json.array() }
end

--[[ emulator.control(client, op, params) -> doc | nil, err
     Calls a MigrunEmulator.<op> through a migrun.dms client's endpoint and
     credentials (signed, no retries). ]]
function M.control(client, op, params)
  local cfg = client.config
  local url = cfg.endpoint_url
  if not url:match("^%a[%w+.-]*://[^/]+/") then url = url .. "/" end
  local body = json.encode(params or {})
  local signed = aws.sign{ method = "POST", url = url, body = body, region = cfg.region, service = "dms",
    access_key = cfg.access_key, secret_key = cfg.secret_key, session_token = cfg.session_token,
    headers = { ["Content-Type"] = M.CONTENT_TYPE, ["X-Amz-Target"] = M.CONTROL_PREFIX .. "." .. op } }
  local res, err = aws.request{ url = url, method = "POST", headers = signed.headers, body = body,
    timeout = 30, where = "dms emulator " .. op }
  if not res then return nil, err end
  local doc = json.decode(res.body)
  if res.status ~= 200 then
    return nil, (type(doc) == "table" and (tostring(doc.__type) .. ": " .. tostring(doc.message)))
      or ("HTTP " .. res.status)
  end
  return doc
end

M.OPS = OPS
M.CONTROL = CONTROL
M.LOGS = LOGS
M.Emulator = Emu
return M
