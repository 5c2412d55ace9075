--[[
migrun.rowhash: the SQL of a row's hash, the same on any two servers, for
comparing tables (migrun.qa) and rows by key (migrun.keydiff). Reads only.

A row's hash is a bigint computed in SQL from the row's columns taken by name
(not position), so equal rows hash equal whatever the physical order, the
column order or the server: "typed" (PostgreSQL 11 and later) combines each
column's own 64-bit hash function (hashint8extended, jsonb_hash_extended...)
with a seed per column, and text forms elsewhere; "md5" (before 11) is the
first 60 bits of md5(row text), floats by their binary form. A table's hash
is the sum of its rows' (exact in numeric), so the hashes of parts add up to
the whole's.

The session settings that change text forms (TimeZone, DateStyle,
IntervalStyle, bytea_output, extra_float_digits) are fixed while hashing:
with_stable() sets them around a function and restores them after (three
round trips), unless the Db is a session of its own made stable once
(stabilize()).

  local rowhash = require "migrun.rowhash"
  local cols = assert(rowhash.columns(db, '"public"."orders"'))
  local expr = rowhash.expr(cols, "typed")        -- SQL of one row's hash
  local method = assert(rowhash.method(a_db, b_db)) -- "typed" | "md5"
  rowhash.with_stable(db, function() return db:query(...) end)

rowhash.STABLE_TEXT: { {setting, value} }
rowhash.columns(db, qualified) -> { {name, type, base} } | nil, err   (by name)
rowhash.columns(db, {qualified...}) -> { [qualified] = { {name, type, base} } } | nil, err
    the same for many tables in one query (a table missing fails it whole)
rowhash.expr(cols, method) -> SQL (a bigint expression over the row's columns)
rowhash.method(db, ...) -> "typed" | "md5" | nil, err   (the one every server can use)
rowhash.stabilize(db) -> true | nil, err   set the settings for the session for good
rowhash.with_stable(db, fn) -> fn's results  (errors raised by fn propagate)
rowhash.add_sums(x, y) -> x + y   two tables' (or parts') hashes, non-negative
    decimal strings (sums of up to ~30 digits: beyond a Lua integer)
]]
local pg = require "migrun.pg"
local pgversion = require "migrun.pgversion"
local json = require "migrun.json"

local rowhash = {}

rowhash.STABLE_TEXT = {
  { "TimeZone", "UTC" }, { "DateStyle", "ISO, MDY" }, { "IntervalStyle", "postgres" },
  { "bytea_output", "hex" }, { "extra_float_digits", "3" },
}

-- The 64-bit hash function of a column's (base) type, where it has one that
-- does not depend on the server (enums, for one, hash their oids).
local TYPED = {
  smallint = "hashint2extended(%s, %d)", integer = "hashint4extended(%s, %d)",
  bigint = "hashint8extended(%s, %d)", oid = "hashoidextended(%s, %d)",
  boolean = "hashint4extended(%s::int, %d)",
  text = 'hashtextextended(%s::text COLLATE "C", %d)', ["character varying"] = 'hashtextextended(%s::text COLLATE "C", %d)',
  character = 'hashtextextended(%s::text COLLATE "C", %d)', name = 'hashtextextended(%s::text COLLATE "C", %d)',
  ["timestamp without time zone"] = "timestamp_hash_extended(%s, %d)",
  -- under TimeZone UTC (fixed for the query) the cast keeps the instant's value
  ["timestamp with time zone"] = "timestamp_hash_extended(%s::timestamp, %d)",
  ["time without time zone"] = "time_hash_extended(%s, %d)", ["time with time zone"] = "timetz_hash_extended(%s, %d)",
  interval = "interval_hash_extended(%s, %d)", numeric = "hash_numeric_extended(%s, %d)",
  real = "hashfloat4extended(%s, %d)", ["double precision"] = "hashfloat8extended(%s, %d)",
  uuid = "uuid_hash_extended(%s, %d)", jsonb = "jsonb_hash_extended(%s, %d)",
  inet = "hashinetextended(%s, %d)", cidr = "hashinetextended(%s, %d)", macaddr = "hashmacaddrextended(%s, %d)",
}

function rowhash.columns(db, qualified)
  if type(qualified) == "table" then
    local res, err = db:query([[
      select q.rel, a.attname as name, format_type(a.atttypid, null) as type,
             format_type(case when t.typtype = 'd' then t.typbasetype else t.oid end, null) as base
        from json_array_elements_text($1::json) as q(rel)
        join pg_attribute a on a.attrelid = q.rel::regclass
        join pg_type t on t.oid = a.atttypid
       where a.attnum > 0 and not a.attisdropped
       order by q.rel, a.attname]], json.encode(qualified))
    if not res then return nil, err end
    local out = {}
    for _, q in ipairs(qualified) do out[q] = {} end
    for row in res:rows() do
      local cols = out[row.rel]
      cols[#cols + 1] = { name = row.name, type = row.type, base = row.base }
    end
    return out
  end
  local res, err = db:query([[
    select a.attname as name, format_type(a.atttypid, null) as type,
           format_type(case when t.typtype = 'd' then t.typbasetype else t.oid end, null) as base
      from pg_attribute a join pg_type t on t.oid = a.atttypid
     where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped
     order by a.attname]], qualified)
  if not res then return nil, err end
  local cols = {}
  for row in res:rows() do cols[#cols + 1] = row end
  return cols
end

local function md5_expr(cols)
  local exprs = {}
  for _, c in ipairs(cols) do
    local col = pg.quote_ident(c.name)
    if c.type == "double precision" then
      exprs[#exprs + 1] = "float8send(" .. col .. ")"
    elseif c.type == "real" then
      exprs[#exprs + 1] = "float4send(" .. col .. ")"
    else
      exprs[#exprs + 1] = col
    end
  end
  -- row(...) of a single column is still a row; of none, the empty row "()".
  return ("('x' || substr(md5(row(%s)::text), 1, 15))::bit(60)::bigint"):format(table.concat(exprs, ", "))
end

function rowhash.expr(cols, method)
  assert(method == "typed" or method == "md5", "rowhash.expr: method must be \"typed\" or \"md5\"")
  if method == "md5" then return md5_expr(cols) end
  if #cols == 0 then return "0::bigint" end
  local parts = {}
  for i, c in ipairs(cols) do
    local fn = TYPED[c.base] or 'hashtextextended(%s::text COLLATE "C", %d)'
    -- NULL: a constant of the column's own, so that NULL in a and NULL in b differ
    parts[i] = ("coalesce(%s, %d)"):format(fn:format(pg.quote_ident(c.name), i), 0x5851F42D4C957F2D + i)
  end
  return "(" .. table.concat(parts, " # ") .. ")"
end

function rowhash.method(...)
  for _, db in ipairs{ ... } do
    local v, err = pgversion.of(db)
    if not v then return nil, err end
    if not pgversion.has(v, "typed_hashes") then return "md5" end
  end
  return "typed"
end

-- One statement sets every setting (set_config, session-wide).
local function set_all(db, values)
  local calls, params = {}, {}
  for i, kv in ipairs(values) do
    calls[i] = ("set_config($%d, $%d, false)"):format(2 * i - 1, 2 * i)
    params[2 * i - 1], params[2 * i] = kv[1], kv[2]
  end
  return db:query("select " .. table.concat(calls, ", "), table.unpack(params))
end

function rowhash.stabilize(db)
  local ok, err = set_all(db, rowhash.STABLE_TEXT)
  if not ok then return nil, err end
  db._stable_text = true
  return true
end

function rowhash.add_sums(x, y)
  local out, carry = {}, 0
  for i = 1, math.max(#x, #y) do
    local d = (tonumber(x:sub(-i, -i)) or 0) + (tonumber(y:sub(-i, -i)) or 0) + carry
    out[#out + 1], carry = d % 10, d // 10
  end
  if carry > 0 then out[#out + 1] = carry end
  return (table.concat(out):reverse():gsub("^0+(%d)", "%1"))
end

function rowhash.with_stable(db, fn)
  if db._stable_text then return fn() end
  local reads = {}
  for i, kv in ipairs(rowhash.STABLE_TEXT) do reads[i] = ("current_setting('%s') as s%d"):format(kv[1], i) end
  local res, err = db:query("select " .. table.concat(reads, ", "))
  if not res then return nil, err end
  local saved = {}
  for i, kv in ipairs(rowhash.STABLE_TEXT) do saved[i] = { kv[1], res[1]["s" .. i] } end
  local ok
  ok, err = set_all(db, rowhash.STABLE_TEXT)
  if not ok then return nil, err end
  local r = table.pack(pcall(fn))
  set_all(db, saved)
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

return rowhash
