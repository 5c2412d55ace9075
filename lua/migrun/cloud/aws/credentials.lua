-- Where migrun finds AWS credentials, region and endpoint, the way the AWS CLI
-- v2 and the SDKs look for them (dms-api.md §6):
--   credentials: explicit access_key/secret_key; AWS_ACCESS_KEY_ID +
--     AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN) unless a profile was passed
--     explicitly; the profile in the shared credentials file ([name]), then in
--     the config file ([profile name], [default]); EC2 instance metadata (IMDSv2:
--     PUT a token, GET the role, GET its credentials) unless
--     AWS_EC2_METADATA_DISABLED=true.
--   profile: explicit, AWS_PROFILE, AWS_DEFAULT_PROFILE, "default".
--   region: explicit, AWS_REGION, AWS_DEFAULT_REGION, the profile's region.
--   endpoint: explicit endpoint_url, AWS_ENDPOINT_URL_<SERVICE>, AWS_ENDPOINT_URL,
--     the profile's services section / endpoint_url, then the regional default.
-- When nothing is found the error lists every place migrun looked. The result
-- prints without its secret (tostring masks it), and no error carries one.
--
-- The environment is read through opts.env (a table, or a function like
-- os.getenv; default os.getenv) so callers and tests can resolve against an
-- environment of their own.
local aws = require "migrun.aws"
local errors = require "migrun.error"
local json = require "migrun.json"
local text = require "migrun.text"

local M = {}

M.IMDS_ENDPOINT = "http://169.254.169.254"

local function getenv_of(opts)
  local env = opts.env
  if env == nil then return os.getenv end
  if type(env) == "function" then return env end
  return function(k) return env[k] end
end

local function nonempty(s)
  if s ~= nil and s ~= "" then return s end
end

local function truthy(s)
  return s ~= nil and s:lower() == "true"
end

-- Parses an AWS config/credentials file: {section = {key = value | {subkey = value}}}.
-- Returns nil when the file cannot be read.
function M.parse_ini(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local sections, cur, parent_key = {}, nil, nil
  for line in f:lines() do
    line = line:gsub("\r$", "")
    local indented = line:match("^%s+%S") ~= nil
    local s = line:match("^%s*(.-)%s*$")
    if s == "" or s:match("^[#;]") then -- luacheck: ignore 542 (a comment or a blank line)
    elseif s:match("^%[.*%]$") then
      local name = s:match("^%[%s*(.-)%s*%]$")
      sections[name] = sections[name] or {}
      cur, parent_key = sections[name], nil
    elseif cur then
      local k, v = s:match("^([^=]-)%s*=%s*(.*)$")
      if k then
        v = v:gsub("%s+[#;].*$", "")
        if indented and parent_key and type(cur[parent_key]) == "table" then
          cur[parent_key][k] = v
        elseif v == "" then
          cur[k] = {}
          parent_key = k
        else
          cur[k] = v
          parent_key = nil
        end
      end
    end
  end
  f:close()
  return sections
end

local function home_of(getenv)
  return nonempty(getenv("HOME")) or "~"
end

local function file_paths(getenv)
  local home = home_of(getenv)
  return nonempty(getenv("AWS_SHARED_CREDENTIALS_FILE")) or (home .. "/.aws/credentials"),
         nonempty(getenv("AWS_CONFIG_FILE")) or (home .. "/.aws/config")
end

-- "2026-11-21T12:00:00Z" -> epoch seconds (UTC), or nil.
M.parse_time = text.epoch

-- IMDSv2: token, role name, role credentials. Returns creds or nil, reason.
function M.from_imds(opts)
  opts = opts or {}
  local getenv = getenv_of(opts)
  local base = (opts.imds_endpoint or nonempty(getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT"))
                or M.IMDS_ENDPOINT):gsub("/+$", "")
  local timeout = tonumber(opts.imds_timeout or getenv("AWS_METADATA_SERVICE_TIMEOUT")) or 1
  local attempts = math.tointeger(tonumber(getenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS"))) or 1
  local function fetch(method, path, headers)
    local res, err
    for _ = 1, math.max(attempts, 1) do
      res, err = aws.request{ url = base .. path, method = method, headers = headers,
        connect_timeout = timeout, timeout = timeout, where = "imds", max_body = 65536 }
      if res and res.status == 200 and res.body ~= "" then return res end
      if res and (res.status == 400 or res.status == 403 or res.status == 404 or res.status == 405) then
        return res
      end
    end
    return res, err
  end
  local res, err = fetch("PUT", "/latest/api/token", { ["x-aws-ec2-metadata-token-ttl-seconds"] = "21600" })
  local headers = {}
  if res and res.status == 200 then
    headers["x-aws-ec2-metadata-token"] = res.body
  elseif res and (res.status == 403 or res.status == 404 or res.status == 405)
         and not truthy(getenv("AWS_EC2_METADATA_V1_DISABLED")) then
    headers = {} -- IMDSv1 fallback
  elseif res then
    return nil, ("token request answered HTTP %d"):format(res.status)
  else
    return nil, "token request failed: " .. tostring(err and err.message)
  end
  res, err = fetch("GET", "/latest/meta-data/iam/security-credentials/", headers)
  if not res then return nil, "role request failed: " .. tostring(err and err.message) end
  if res.status ~= 200 then return nil, ("role request answered HTTP %d"):format(res.status) end
  local role = res.body:match("^%s*([^\r\n]-)%s*\n") or res.body:match("^%s*(.-)%s*$")
  if role == "" then return nil, "no IAM role attached to the instance" end
  res, err = fetch("GET", "/latest/meta-data/iam/security-credentials/" .. role, headers)
  if not res then return nil, "credentials request failed: " .. tostring(err and err.message) end
  if res.status ~= 200 then return nil, ("credentials request answered HTTP %d"):format(res.status) end
  local doc = json.decode(res.body)
  if type(doc) ~= "table" then return nil, "credentials response is not JSON" end
  if doc.Code and doc.Code ~= "Success" then
    return nil, ("credentials response says %s: %s"):format(tostring(doc.Code), tostring(doc.Message))
  end
  if not (doc.AccessKeyId and doc.SecretAccessKey and doc.Token) then
    return nil, "credentials response lacks AccessKeyId/SecretAccessKey/Token"
  end
  return { access_key = doc.AccessKeyId, secret_key = doc.SecretAccessKey, session_token = doc.Token,
           expiration = M.parse_time(doc.Expiration), source = "EC2 instance metadata (" .. base .. ", role " .. role .. ")" }
end

local config_mt = {
  __name = "migrun.aws.Config",
  __tostring = function(c)
    return ("aws config: region %s, endpoint %s, credentials from %s (access key %s, secret ****%s)")
      :format(tostring(c.region), tostring(c.endpoint_url), tostring(c.credential_source),
              tostring(c.access_key), c.session_token and ", session token ****" or "")
  end,
}

-- The regional DMS endpoint (never contacted by tests).
function M.default_endpoint(prefix, region)
  local suffix = region:match("^cn%-") and "amazonaws.com.cn" or "amazonaws.com"
  return ("https://%s.%s.%s"):format(prefix, region, suffix)
end

local function fail(code, message, looked)
  local lines = {}
  for i, l in ipairs(looked) do lines[i] = "  - " .. l end
  return nil, errors.new{ kind = "config", where = "aws", code = code,
    message = message .. "; migrun looked in:\n" .. table.concat(lines, "\n"), looked = looked }
end

--[[ credentials.resolve{ access_key=, secret_key=, session_token=, profile=,
       region=, endpoint_url=, env=, service_env="DATABASE_MIGRATION_SERVICE",
       service_key="database_migration_service", endpoint_prefix="dms",
       imds=true, imds_endpoint=, imds_timeout= }
     -> config {access_key, secret_key, session_token, expiration, region,
                endpoint_url, profile, credential_source, region_source}
      | nil, err (kind "config", code "NoCredentials"|"NoRegion"|"ProfileNotFound") ]]
-- The profile in use and its sections of the shared files. -> P | nil, err
local function profile_of(opts, getenv)
  local explicit = nonempty(opts.profile)
  local named = explicit or nonempty(getenv("AWS_PROFILE")) or nonempty(getenv("AWS_DEFAULT_PROFILE"))
  local profile = named or "default"
  local cred_path, conf_path = file_paths(getenv)
  local P = { name = profile, explicit = explicit, cred_path = cred_path, conf_path = conf_path,
              cred_file = M.parse_ini(cred_path), conf_file = M.parse_ini(conf_path) }
  P.cred_sec = P.cred_file and P.cred_file[profile]
  P.conf_sec = P.conf_file and (profile == "default" and (P.conf_file["default"] or P.conf_file["profile default"])
                                or P.conf_file["profile " .. profile])
  P.conf_label = profile == "default" and "[default]" or "[profile " .. profile .. "]"
  if named and profile ~= "default" and not P.cred_sec and not P.conf_sec then
    return nil, errors.new{ kind = "config", where = "aws", code = "ProfileNotFound",
      message = ("profile %q not found in %s ([%s]) or %s ([profile %s])")
        :format(profile, cred_path, profile, conf_path, profile) }
  end
  return P
end

-- The credentials, in the chain's order: explicit, environment, the shared
-- files, EC2 instance metadata. Each place looked at is said in `looked`.
local function credentials_of(opts, getenv, P, cfg, looked)
  local function take(src, ak, sk, tok)
    cfg.access_key, cfg.secret_key, cfg.session_token = ak, sk, nonempty(tok)
    cfg.credential_source = src
  end
  if nonempty(opts.access_key) or nonempty(opts.secret_key) then
    if not (nonempty(opts.access_key) and nonempty(opts.secret_key)) then
      return nil, errors.new{ kind = "config", where = "aws", code = "PartialCredentials",
        message = "access_key and secret_key must be given together" }
    end
    take("explicit access_key/secret_key", opts.access_key, opts.secret_key, opts.session_token)
    return true
  end
  looked[#looked + 1] = "explicit access_key/secret_key: not given"
  if P.explicit then
    looked[#looked + 1] = "environment AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: skipped (profile given explicitly)"
  else
    local ak, sk = nonempty(getenv("AWS_ACCESS_KEY_ID")), nonempty(getenv("AWS_SECRET_ACCESS_KEY"))
    if ak and sk then
      take("environment AWS_ACCESS_KEY_ID", ak, sk, getenv("AWS_SESSION_TOKEN") or getenv("AWS_SECURITY_TOKEN"))
      return true
    end
    looked[#looked + 1] = "environment AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: "
      .. ((ak or sk) and "only one of them is set" or "not set")
  end
  for _, f in ipairs{ { P.cred_path, P.cred_file, P.cred_sec, "[" .. P.name .. "]" },
                      { P.conf_path, P.conf_file, P.conf_sec, P.conf_label } } do
    local path, parsed, sec, label = f[1], f[2], f[3], f[4]
    if sec and nonempty(sec.aws_access_key_id) and nonempty(sec.aws_secret_access_key) then
      take(path .. " " .. label, sec.aws_access_key_id, sec.aws_secret_access_key,
           sec.aws_session_token or sec.aws_security_token)
      return true
    end
    looked[#looked + 1] = path .. " " .. label .. ": "
      .. (not parsed and "no such file" or not sec and "no such profile" or "no aws_access_key_id/aws_secret_access_key")
  end
  if opts.imds == false or truthy(getenv("AWS_EC2_METADATA_DISABLED")) then
    looked[#looked + 1] = "EC2 instance metadata: disabled"
    return true
  end
  local c, why = M.from_imds{ env = getenv, imds_endpoint = opts.imds_endpoint, imds_timeout = opts.imds_timeout }
  if c then
    take(c.source, c.access_key, c.secret_key, c.session_token)
    cfg.expiration = c.expiration
  else
    local base = opts.imds_endpoint or nonempty(getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT")) or M.IMDS_ENDPOINT
    looked[#looked + 1] = "EC2 instance metadata (IMDSv2) at " .. base .. ": " .. why
  end
  return true
end

-- The region: explicit, environment, the profile's. -> true | nil, err
local function region_of(opts, getenv, P, cfg)
  local looked = {}
  local function region_from(label, v)
    if cfg.region then return end
    if nonempty(v) then cfg.region, cfg.region_source = v, label
    else looked[#looked + 1] = label .. ": not set" end
  end
  region_from("explicit region", opts.region)
  region_from("environment AWS_REGION", getenv("AWS_REGION"))
  region_from("environment AWS_DEFAULT_REGION", getenv("AWS_DEFAULT_REGION"))
  region_from(P.conf_path .. " " .. P.conf_label .. " region", P.conf_sec and P.conf_sec.region)
  if not cfg.region then return fail("NoRegion", "no AWS region configured", looked) end
  return true
end

-- The endpoint: explicit, the service's or the general environment variable,
-- the profile's services section or endpoint_url, else AWS's.
local function endpoint_of(opts, getenv, P, region)
  local service_env = opts.service_env or "DATABASE_MIGRATION_SERVICE"
  local service_key = opts.service_key or "database_migration_service"
  local ignore = truthy(getenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"))
  local conf_sec = P.conf_sec
  local services = conf_sec and conf_sec.services and P.conf_file["services " .. conf_sec.services]
  local svc = services and services[service_key]
  return nonempty(opts.endpoint_url)
    or (not ignore and (nonempty(getenv("AWS_ENDPOINT_URL_" .. service_env))
                        or nonempty(getenv("AWS_ENDPOINT_URL"))
                        or (type(svc) == "table" and nonempty(svc.endpoint_url))
                        or (conf_sec and type(conf_sec.endpoint_url) == "string" and nonempty(conf_sec.endpoint_url))))
    or M.default_endpoint(opts.endpoint_prefix or "dms", region)
end

function M.resolve(opts)
  opts = opts or {}
  local getenv = getenv_of(opts)
  local P, perr = profile_of(opts, getenv)
  if not P then return nil, perr end
  local cfg = setmetatable({ profile = P.name }, config_mt)
  local looked = {}
  local ok, err = credentials_of(opts, getenv, P, cfg, looked)
  if not ok then return nil, err end
  if not cfg.access_key then return fail("NoCredentials", "no AWS credentials found", looked) end
  ok, err = region_of(opts, getenv, P, cfg)
  if not ok then return nil, err end
  cfg.endpoint_url = endpoint_of(opts, getenv, P, cfg.region)
  return cfg
end

return M
