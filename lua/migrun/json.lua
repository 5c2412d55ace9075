-- Canonical JSON for DMS: object keys sorted bytewise, no insignificant
-- whitespace (or a stable two-space indentation), integers printed as
-- integers and floats in their shortest round-trip form, "/" not escaped.
-- The same table always gives the same bytes, so documents built by
-- migrun.dms.builders can be compared with golden files and diffed between
-- runs. Decoding goes through lua-cjson (a private cjson.safe instance), with
-- JSON null turned into nil.
--
-- Lua tables are ambiguous: a table whose keys are exactly 1..n (n >= 1) is an
-- array, any other non-empty table an object. An empty table is an object
-- ({}) unless marked with json.array{} (then []). json.null encodes null.
local cjson = require("cjson.safe").new() -- private instance: settings stay ours

local M = {}

local array_mt = { __name = "migrun.json.array" }
M.null = setmetatable({}, { __name = "migrun.json.null", __tostring = function() return "null" end })

-- Marks t (default a new table) as a JSON array, so that it encodes as [] when empty.
function M.array(t)
  return setmetatable(t or {}, array_mt)
end

function M.is_array(t)
  if getmetatable(t) == array_mt then return true end
  local n = #t
  if n == 0 then return false end
  local count = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
    count = count + 1
  end
  return count == n
end

local escapes = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}
local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function number(n)
  if math.type(n) == "integer" then return string.format("%d", n) end
  if n ~= n or n == math.huge or n == -math.huge then
    error("json: cannot encode " .. tostring(n), 0)
  end
  if n == math.floor(n) and math.abs(n) < 2^53 then return string.format("%d", n) end
  for p = 14, 17 do
    local s = string.format("%." .. p .. "g", n)
    if tonumber(s) == n then return s end
  end
  return string.format("%.17g", n)
end

local function encode(v, out, indent, depth, seen)
  local t = type(v)
  if v == M.null or v == cjson.null then
    out[#out + 1] = "null"
  elseif t == "string" then
    out[#out + 1] = quote(v)
  elseif t == "number" then
    out[#out + 1] = number(v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if seen[v] then error("json: cannot encode a table that contains itself", 0) end
    seen[v] = true
    local nl, pad, pad_in, colon = "", "", "", ":"
    if indent then
      nl = "\n"; pad = string.rep(indent, depth); pad_in = pad .. indent; colon = ": "
    end
    if M.is_array(v) then
      if #v == 0 then
        out[#out + 1] = "[]"
      else
        out[#out + 1] = "[" .. nl
        for i = 1, #v do
          out[#out + 1] = pad_in
          encode(v[i], out, indent, depth + 1, seen)
          out[#out + 1] = (i < #v and "," or "") .. nl
        end
        out[#out + 1] = pad .. "]"
      end
    else
      local keys = {}
      for k in pairs(v) do
        if type(k) ~= "string" then
          error("json: object keys must be strings, got " .. type(k), 0)
        end
        keys[#keys + 1] = k
      end
      table.sort(keys)
      if #keys == 0 then
        out[#out + 1] = "{}"
      else
        out[#out + 1] = "{" .. nl
        for i, k in ipairs(keys) do
          out[#out + 1] = pad_in .. quote(k) .. colon
          encode(v[k], out, indent, depth + 1, seen)
          out[#out + 1] = (i < #keys and "," or "") .. nl
        end
        out[#out + 1] = pad .. "}"
      end
    end
    seen[v] = nil
  else
    error("json: cannot encode a " .. t, 0)
  end
end

-- json.encode(value [, {indent = "  "}]) -> string; raises on values JSON cannot hold.
function M.encode(v, opts)
  local out = {}
  encode(v, out, opts and opts.indent, 0, {})
  return table.concat(out)
end

local function strip_nulls(v)
  if type(v) ~= "table" then return v end
  for k, x in pairs(v) do
    if x == cjson.null then v[k] = nil else strip_nulls(x) end
  end
  return v
end

-- json.decode(text) -> value | nil, message
function M.decode(s)
  local v, err = cjson.decode(s)
  if v == nil and err then return nil, err end
  if v == cjson.null then return nil end
  return strip_nulls(v)
end

return M
