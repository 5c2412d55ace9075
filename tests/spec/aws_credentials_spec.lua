-- migrun.aws.credentials: every source of credentials, region and endpoint,
-- each resolved against an environment table (never the real one) and files
-- in a temporary directory; IMDSv2 served by a loopback stand-in.
local credentials = require "migrun.aws.credentials"
local stub = require "helpers.http_stub"

local dir

local function write(name, text)
  local f = assert(io.open(dir .. "/" .. name, "w"))
  f:write(text)
  f:close()
  return dir .. "/" .. name
end

-- an environment with no AWS settings: HOME points at an empty directory, IMDS off
local function env(t)
  local e = { HOME = dir .. "/home", AWS_EC2_METADATA_DISABLED = "true" }
  for k, v in pairs(t or {}) do e[k] = v end
  return e
end

setup(function()
  dir = stub.tmpdir()
end)

teardown(function()
  require("migrun.proc").run{ "rm", "-rf", dir }
end)

describe("aws credentials", function()
  it("takes explicit values first", function()
    local c = assert(credentials.resolve{ access_key = "AKIAEXPLICIT", secret_key = "s3cr3t", region = "eu-west-1",
      env = env{ AWS_ACCESS_KEY_ID = "AKIAENV", AWS_SECRET_ACCESS_KEY = "envsecret", AWS_REGION = "us-west-2" } })
    assert.are.equal("AKIAEXPLICIT", c.access_key)
    assert.are.equal("s3cr3t", c.secret_key)
    assert.are.equal("eu-west-1", c.region)
    assert.are.equal("https://dms.eu-west-1.amazonaws.com", c.endpoint_url)
    assert.is_nil(tostring(c):find("s3cr3t", 1, true))
    local _, err = credentials.resolve{ access_key = "AKIAONLY", env = env() }
    assert.are.equal("PartialCredentials", err.code)
  end)

  it("reads the environment variables", function()
    local c = assert(credentials.resolve{ env = env{ AWS_ACCESS_KEY_ID = "AKIAENV", AWS_SECRET_ACCESS_KEY = "envsecret",
      AWS_SESSION_TOKEN = "tok", AWS_REGION = "us-west-2", AWS_DEFAULT_REGION = "us-east-2" } })
    assert.are.equal("AKIAENV", c.access_key)
    assert.are.equal("tok", c.session_token)
    assert.are.equal("us-west-2", c.region)
    assert.are.equal("environment AWS_ACCESS_KEY_ID", c.credential_source)
    c = assert(credentials.resolve{ env = env{ AWS_ACCESS_KEY_ID = "A", AWS_SECRET_ACCESS_KEY = "B",
      AWS_DEFAULT_REGION = "us-east-2" } })
    assert.are.equal("us-east-2", c.region)
    assert.is_nil(c.session_token)
  end)

  it("reads profiles from the shared credentials and config files", function()
    local cred = write("credentials", "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = defsecret\n\n"
      .. "[work]\naws_access_key_id=AKIAWORK\naws_secret_access_key=worksecret\naws_session_token = worktoken\n")
    local conf = write("config", "[default]\nregion = us-east-1\n\n# a comment\n[profile work]\nregion = ap-south-1 ; trailing\n"
      .. "services = local-dms\n\n[profile cfgonly]\nregion = eu-central-1\naws_access_key_id = AKIACFG\n"
      .. "aws_secret_access_key = cfgsecret\nendpoint_url = http://127.0.0.1:1/\n\n"
      .. "[services local-dms]\ndatabase_migration_service =\n  endpoint_url = http://127.0.0.1:2\n")
    local files = { AWS_SHARED_CREDENTIALS_FILE = cred, AWS_CONFIG_FILE = conf }
    local c = assert(credentials.resolve{ env = env(files) })
    assert.are.equal("AKIADEFAULT", c.access_key)
    assert.are.equal("us-east-1", c.region)
    files.AWS_PROFILE = "work"
    c = assert(credentials.resolve{ env = env(files) })
    assert.are.equal("AKIAWORK", c.access_key)
    assert.are.equal("worktoken", c.session_token)
    assert.are.equal("ap-south-1", c.region)
    assert.are.equal("http://127.0.0.1:2", c.endpoint_url)
    -- an explicit profile wins over AWS_PROFILE and disables the env credentials
    files.AWS_ACCESS_KEY_ID, files.AWS_SECRET_ACCESS_KEY = "AKIAENV", "envsecret"
    c = assert(credentials.resolve{ profile = "cfgonly", env = env(files) })
    assert.are.equal("AKIACFG", c.access_key)
    assert.are.equal("eu-central-1", c.region)
    assert.are.equal("http://127.0.0.1:1/", c.endpoint_url)
    c = assert(credentials.resolve{ env = env(files) })
    assert.are.equal("AKIAENV", c.access_key)
    local _, err = credentials.resolve{ profile = "nope", env = env(files) }
    assert.are.equal("ProfileNotFound", err.code)
    assert.truthy(tostring(err):find("[profile nope]", 1, true))
  end)

  it("finds ~/.aws files under HOME", function()
    require("migrun.proc").run{ "mkdir", "-p", dir .. "/h2/.aws" }
    local f = assert(io.open(dir .. "/h2/.aws/credentials", "w"))
    f:write("[default]\naws_access_key_id = AKIAHOME\naws_secret_access_key = x\n")
    f:close()
    local c = assert(credentials.resolve{ region = "us-east-1", env = env{ HOME = dir .. "/h2" } })
    assert.are.equal("AKIAHOME", c.access_key)
  end)

  it("chooses the endpoint: explicit, service variable, global variable, regional default", function()
    local base = { AWS_ACCESS_KEY_ID = "A", AWS_SECRET_ACCESS_KEY = "B", AWS_REGION = "cn-north-1" }
    assert.are.equal("https://dms.cn-north-1.amazonaws.com.cn", credentials.resolve{ env = env(base) }.endpoint_url)
    base.AWS_ENDPOINT_URL = "http://127.0.0.1:3"
    assert.are.equal("http://127.0.0.1:3", credentials.resolve{ env = env(base) }.endpoint_url)
    base.AWS_ENDPOINT_URL_DATABASE_MIGRATION_SERVICE = "http://127.0.0.1:4"
    assert.are.equal("http://127.0.0.1:4", credentials.resolve{ env = env(base) }.endpoint_url)
    assert.are.equal("http://127.0.0.1:5", credentials.resolve{ endpoint_url = "http://127.0.0.1:5", env = env(base) }.endpoint_url)
    base.AWS_IGNORE_CONFIGURED_ENDPOINT_URLS = "true"
    assert.are.equal("https://dms.cn-north-1.amazonaws.com.cn", credentials.resolve{ env = env(base) }.endpoint_url)
  end)

  it("says where it looked when there are no credentials or no region", function()
    local _, err = credentials.resolve{ env = env{ AWS_SHARED_CREDENTIALS_FILE = dir .. "/none",
      AWS_CONFIG_FILE = dir .. "/none2" } }
    assert.are.equal("config", err.kind)
    assert.are.equal("NoCredentials", err.code)
    local text = tostring(err)
    for _, where in ipairs{ "explicit access_key", "AWS_ACCESS_KEY_ID", dir .. "/none [default]",
                            dir .. "/none2 [default]", "EC2 instance metadata: disabled" } do
      assert.truthy(text:find(where, 1, true), where)
    end
    _, err = credentials.resolve{ env = env{ AWS_ACCESS_KEY_ID = "A", AWS_SECRET_ACCESS_KEY = "B" } }
    assert.are.equal("NoRegion", err.code)
    text = tostring(err)
    for _, where in ipairs{ "explicit region", "AWS_REGION", "AWS_DEFAULT_REGION", "region" } do
      assert.truthy(text:find(where, 1, true), where)
    end
  end)

  it("parses IMDS expiration times as UTC", function()
    assert.are.equal(1440938160, credentials.parse_time("2015-08-30T12:36:00Z"))
    assert.are.equal(0, credentials.parse_time("1970-01-01T00:00:00Z"))
    assert.is_nil(credentials.parse_time("soon"))
  end)
end)

describe("aws credentials from IMDSv2", function()
  local s

  setup(function()
    s = stub.start[[
      local token = "TOKEN-123"
      return function(req)
        if req.method == "PUT" and req.path == "/latest/api/token" then
          if req.headers["x-aws-ec2-metadata-token-ttl-seconds"] ~= "21600" then return { status = 400 } end
          return { status = 200, body = token }
        end
        if req.headers["x-aws-ec2-metadata-token"] ~= token then return { status = 401 } end
        if req.path == "/latest/meta-data/iam/security-credentials/" then
          return { status = 200, body = "migrun-role" }
        end
        if req.path == "/latest/meta-data/iam/security-credentials/migrun-role" then
          return { status = 200, body = '{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIAIMDS",'
            .. '"SecretAccessKey":"imdssecret","Token":"imdstoken","Expiration":"2030-01-01T00:00:00Z"}' }
        end
        return { status = 404 }
      end
    ]]
  end)

  teardown(function() s:close() end)

  it("puts a token, then gets the role and its credentials", function()
    local c = assert(credentials.resolve{ region = "us-east-1",
      env = env{ AWS_EC2_METADATA_DISABLED = "false", AWS_EC2_METADATA_SERVICE_ENDPOINT = s.url .. "/" } })
    assert.are.equal("ASIAIMDS", c.access_key)
    assert.are.equal("imdssecret", c.secret_key)
    assert.are.equal("imdstoken", c.session_token)
    assert.are.equal(credentials.parse_time("2030-01-01T00:00:00Z"), c.expiration)
    assert.truthy(c.credential_source:find("migrun-role", 1, true))
    local reqs = s:requests()
    assert.are.same({ "PUT", "GET", "GET" }, { reqs[1].method, reqs[2].method, reqs[3].method })
    assert.are.equal("/latest/api/token", reqs[1].path)
    assert.are.equal("/latest/meta-data/iam/security-credentials/migrun-role", reqs[3].path)
  end)

  it("reports an unreachable metadata service among the places it looked", function()
    local dead = stub.start[[ return function() return { status = 200 } end ]]
    local url = dead.url
    dead:close()
    local _, err = credentials.resolve{ region = "us-east-1",
      env = env{ AWS_EC2_METADATA_DISABLED = "false", AWS_EC2_METADATA_SERVICE_ENDPOINT = url } }
    assert.are.equal("NoCredentials", err.code)
    assert.truthy(tostring(err):find("EC2 instance metadata (IMDSv2) at " .. url, 1, true))
  end)
end)
