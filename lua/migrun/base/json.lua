-- Canonical JSON for DMS: object keys sorted bytewise, no insignificant
-- whitespace (or a stable two-space indentation), integers printed as
-- integers and floats in their shortest round-trip form, "/" not escaped.
-- The same table always gives the same bytes, so documents built by
-- migrun.dms.builders can be compared with golden files and diffed between
-- runs.
--
-- Decoding is this module's own (RFC 8259, strict), because lua-cjson 2.1
-- (Debian's) reads every number as a double, with no option to do otherwise:
-- 5432 came back as 5432.0, printed "5432.0", and an integer beyond 2^53 came
-- back rounded. Here a number is what Lua's own reading of its text gives: an
-- integer when the text has no '.' and no exponent and fits in 64 bits (-2^63
-- .. 2^63-1, exactly, also beyond 2^53), else a float (1.0, 1e3, and an
-- integer beyond 64 bits: the nearest double, as precise as a float can be).
-- "-0" is the integer 0. JSON null becomes nil (a key left out, a hole in an
-- array; a document that is only null decodes to nil, without an error).
-- The encoder writes an integral float as an integer (DMS's integer fields
-- take no "5432.0"), so such a float comes back as an integer.
--
-- Lua tables are ambiguous: a table whose keys are exactly 1..n (n >= 1) is an
-- array, any other non-empty table an object. An empty table is an object
-- ({}) unless marked with json.array{} (then []). json.null encodes null.
-- lua-cjson's null (cjson.null, from modules that use lua-cjson directly)
-- encodes null too.
local cjson = require("cjson.safe").new() -- for cjson.null only

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

---------------------------------------------------------------------------
-- Decoding
---------------------------------------------------------------------------
local byte, sub, find, match, concat = string.byte, string.sub, string.find, string.match, table.concat
local MAX_DEPTH = 1000 -- as lua-cjson: deeper documents are refused, not a stack overflow

-- A decoding error: caught by M.decode, which returns nil, message.
local Failure = {}
local function fail(pos, what)
  error(setmetatable({ message = ("json: %s at character %d"):format(what, pos) }, Failure), 0)
end

local NULL = {} -- a null read: its key left out, its array slot a hole

local ESCAPES = { [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r",
                  [116] = "\t" }

local function skip(s, pos)
  local _, e = find(s, "^[ \t\n\r]*", pos)
  return e + 1
end

-- \uXXXX at pos (the backslash), with a surrogate pair's second half -> UTF-8, next pos
local function unicode_escape(s, pos)
  local hex = match(s, "^\\u(%x%x%x%x)", pos)
  if not hex then fail(pos, "invalid \\u escape") end
  local cp = tonumber(hex, 16)
  if cp >= 0xDC00 and cp <= 0xDFFF then fail(pos, "a lone low surrogate") end
  if cp >= 0xD800 and cp <= 0xDBFF then
    local low = match(s, "^\\u([dD][c-fC-F]%x%x)", pos + 6)
    if not low then fail(pos, "a high surrogate without its low half") end
    cp = 0x10000 + ((cp - 0xD800) << 10) + (tonumber(low, 16) - 0xDC00)
    return utf8.char(cp), pos + 12
  end
  return utf8.char(cp), pos + 6
end

-- the string whose opening quote is at pos -> string, next pos
local function read_string(s, pos)
  local i, parts, n = pos + 1, nil, 0
  while true do
    local j = find(s, '[\0-\31"\\]', i)
    if not j then fail(pos, "unterminated string") end
    local c = byte(s, j)
    if c == 34 then -- the closing quote
      if not parts then return sub(s, i, j - 1), j + 1 end
      parts[n + 1] = sub(s, i, j - 1)
      return concat(parts), j + 1
    elseif c == 92 then
      parts = parts or {}
      parts[n + 1] = sub(s, i, j - 1)
      local e = byte(s, j + 1)
      if e == 117 then
        parts[n + 2], i = unicode_escape(s, j)
      else
        parts[n + 2] = ESCAPES[e] or fail(j, "invalid escape")
        i = j + 2
      end
      n = n + 2
    else
      fail(j, "a control character in a string")
    end
  end
end

-- the number at pos -> integer or float (see the top), next pos
local function read_number(s, pos)
  local _, e = find(s, "^-?%d+", pos)
  if not e then fail(pos, "an invalid number") end
  if find(s, "^-?0%d", pos) then fail(pos, "a number with a leading zero") end
  if byte(s, e + 1) == 46 then -- "."
    _, e = find(s, "^%.%d+", e + 1)
    if not e then fail(pos, "an invalid number") end
  end
  local x = byte(s, e + 1)
  if x == 101 or x == 69 then -- "e", "E"
    _, e = find(s, "^[eE][-+]?%d+", e + 1)
    if not e then fail(pos, "an invalid number") end
  end
  return tonumber(sub(s, pos, e)), e + 1
end

local read_value

-- After a member: the position of the next one and false, or of what
-- follows the closing bracket and true.
local function next_member(s, pos, close, what)
  local _, e, c = find(s, "^[ \t\n\r]*([,%]}])", pos)
  if c == close then return e + 1, true end
  if c ~= "," then fail(pos, what) end
  return skip(s, e + 1), false
end

local function read_array(s, pos, depth)
  local out, n = {}, 0
  pos = skip(s, pos + 1)
  if byte(s, pos) == 93 then return out, pos + 1 end
  while true do
    local v, done
    v, pos = read_value(s, pos, depth)
    n = n + 1
    if v ~= NULL then out[n] = v end
    pos, done = next_member(s, pos, "]", "',' or ']' expected")
    if done then return out, pos end
  end
end

local function read_object(s, pos, depth)
  local out = {}
  pos = skip(s, pos + 1)
  if byte(s, pos) == 125 then return out, pos + 1 end
  while true do
    if byte(s, pos) ~= 34 then fail(pos, "a string key expected") end
    local k, v, done
    k, pos = read_string(s, pos)
    local _, e = find(s, "^[ \t\n\r]*:[ \t\n\r]*", pos)
    if not e then fail(pos, "':' expected") end
    v, pos = read_value(s, e + 1, depth)
    if v == NULL then out[k] = nil else out[k] = v end -- a repeated key: the last one counts
    pos, done = next_member(s, pos, "}", "',' or '}' expected")
    if done then return out, pos end
  end
end

local LITERALS = { t = { "true", true }, f = { "false", false }, n = { "null", NULL } }

-- the value at pos (no whitespace before it) -> value, next pos
function read_value(s, pos, depth)
  local c = byte(s, pos)
  if c == 34 then return read_string(s, pos) end
  if c == 123 or c == 91 then
    if depth >= MAX_DEPTH then fail(pos, "more than " .. MAX_DEPTH .. " nested arrays and objects") end
    if c == 123 then return read_object(s, pos, depth + 1) end
    return read_array(s, pos, depth + 1)
  end
  if c == 45 or (c and c >= 48 and c <= 57) then return read_number(s, pos) end
  local lit = c and LITERALS[string.char(c)]
  if lit and sub(s, pos, pos + #lit[1] - 1) == lit[1] then return lit[2], pos + #lit[1] end
  fail(pos, c and "a value expected" or "a value expected, found the end")
end

-- json.decode(text) -> value | nil, message
function M.decode(s)
  if type(s) == "number" then s = tostring(s) end
  if type(s) ~= "string" then return nil, "json.decode: a string expected, got " .. type(s) end
  local ok, v, pos = pcall(function()
    local value, at = read_value(s, skip(s, 1), 0)
    return value, skip(s, at)
  end)
  if not ok then
    if getmetatable(v) == Failure then return nil, v.message end
    error(v, 0)
  end
  if pos <= #s then return nil, ("json: the end expected at character %d"):format(pos) end
  if v == NULL then return nil end
  return v
end

return M
