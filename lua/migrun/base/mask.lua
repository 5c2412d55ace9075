--[[
migrun.mask: secrets kept out of every message, log line, journal fact and
report migrun writes: a password in a conninfo or a URL, a value under a key
that names a secret. Below everything that prints (the procedure, the
machinery, the console): one place that knows what a secret looks like.

  local mask = require "migrun.mask"
  print(mask.string("host=db password=s3cret"))           -- host=db password=****
  print(mask.message(err, cfg.source.conninfo))           -- that conninfo's password too
  local safe = mask.scrub(facts)                          -- a copy fit for JSON, no secret

mask.string(s) -> s with password=..., password='...' and user:password@ in
    URIs masked
mask.message(message, conninfo) -> mask.string, and the conninfo's own password
    wherever it appears (a message about that connection)
mask.scrub(value) -> a copy fit for JSON and free of secrets: keys that name a
    secret (password, secret, token, ...) get "****", strings masked, values
    JSON cannot hold (LSNs, functions) become their tostring
mask.secret_key(name) -> whether a key names a secret (never a "schema.table"
    key: a name holding a dot is an object's, not a field's)
]]
local json = require "migrun.json"

local mask = {}

local SECRET_KEY = { "password", "passwd", "secret", "token", "credential", "private_key", "access_key" }

-- A key holding a dot is a schema-qualified name ("public.api_tokens": the
-- full load's records of a table are keyed so), never a field that holds a
-- secret: its record is kept, or a table named for tokens or passwords would
-- lose its journaled load and be skipped, or fail, on a rerun.
function mask.secret_key(k)
  k = tostring(k):lower()
  if k:find(".", 1, true) then return false end
  for _, word in ipairs(SECRET_KEY) do
    if k:find(word, 1, true) then return true end
  end
  return false
end

function mask.string(s)
  s = s:gsub("([Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]%s*=%s*)'[^']*'", "%1****")
  s = s:gsub("([Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]%s*=%s*)[^%s'&]+", "%1****")
  s = s:gsub("(%a[%w+.-]*://[^:/@%s]+:)[^@%s/]+@", "%1****@")
  return s
end

function mask.message(message, conninfo)
  message = mask.string(tostring(message))
  local parsed = conninfo and require("migrun.pg").conninfo_parse(conninfo)
  if parsed and parsed.password and parsed.password ~= "" then
    message = message:gsub(parsed.password:gsub("%p", "%%%0"), "****")
  end
  return message
end

local function scrub(v, seen)
  local t = type(v)
  if t == "string" then return mask.string(v) end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return tostring(v) end
    return v
  end
  if t == "boolean" or v == nil then return v end
  if t == "table" and (getmetatable(v) == nil or json.is_array(v)) then
    if seen[v] then return "(cycle)" end
    seen[v] = true
    local is_array = json.is_array(v)
    local out = is_array and json.array() or {}
    for k, x in pairs(v) do
      local key = is_array and k or tostring(k)
      if not is_array and mask.secret_key(k) then
        out[key] = "****"
      else
        out[key] = scrub(x, seen)
      end
    end
    seen[v] = nil
    return out
  end
  return mask.string(tostring(v))
end

function mask.scrub(v)
  return scrub(v, {})
end

return mask
