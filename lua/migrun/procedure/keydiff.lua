--[[
migrun.keydiff: a difference between two servers narrowed to the keys of the
rows that differ, and rows compared key by key. Reads only.

Keys travel as canonical texts: the jsonb array of the key's values, as
PostgreSQL prints it from the typed values under migrun.rowhash's settings
('[17]', '["eu", 4]'), so the same row has the same key text whoever found it
(a comparison, a narrowing, a logical decoding slot's JSON) and on either
server.

  local keydiff = require "migrun.keydiff"
  local key = assert(keydiff.key(db, { schema = "public", name = "orders" }))
  local found = assert(keydiff.narrow(a, b, t, key, { where = "id >= 1000 AND id < 2000" }))
  for _, d in ipairs(found.keys) do print(keydiff.label(key, d.key), d.what) end

keydiff.key(db, t) -> key | false | nil, err
    The rows' key: the primary key, else a unique index without predicate or
    expression on NOT NULL columns; false when the table has neither.
    key = { columns = {names}, types = {SQL types}, integer = bool (a single
    smallint, integer or bigint column) }. t: { schema =, name = } or "s.t".
keydiff.rows(db, t, key, keys, { method =, xmin = true }) -> { [k] = { hash =, xmin = } } | nil, err
    The row hash (migrun.rowhash) and xmin of the rows with those keys
    (canonical texts); a key with no row is absent from the result.
keydiff.canonical(db, key, raw) -> { canonical texts } | nil, err
    Key texts from elsewhere (a JSON array of the values each: a decoding
    slot's) made canonical by the server.
keydiff.compare(a_db, b_db, t, key, keys, opts) -> { {key, what, a, b} } | nil, err
    The keys whose rows differ: what = "only in a" | "only in b" | "differs";
    a, b: each side's { hash, xmin } (nil where absent).
keydiff.narrow(a_db, b_db, t, key, opts) -> { keys = { {key, what, a, b} }, complete = bool } | nil, err
    Every key whose row differs between the two servers (up to opts.limit,
    default 1000: complete is false when there were more), found by hashing
    ranges of keys on both sides and cutting the ranges that differ until
    they are small enough to compare row by row (an integer key by value
    ranges, any other key by ranges of its sort order sampled on the side
    with more rows), then confirmed by a lookup of each key on both sides.
    opts.where: an SQL condition bounding the search (one unit of a
    comparison); opts.exclude: canonical keys left out on both sides (rows
    known to be changing); opts.method: the row hash's.
keydiff.exclusion(t, key, keys) -> SQL condition: "the row's key is not one of keys" ("true" for none)
keydiff.label(key, k) -> "id 17", "(region, id) (eu, 4)"
keydiff.describe(key, list, opts) -> "id 17 differs, id 20 only in b (23 keys)": the first
    opts.show (default 10) of a list of {key, what}, with opts.a / opts.b
    naming the sides and opts.more (true: "or more") after the count.
]]
local pg = require "migrun.pg"
local json = require "migrun.json"
local rowhash = require "migrun.rowhash"
local text = require "migrun.text"

local keydiff = {}

local FANOUT_BITS = 4
local FANOUT = 1 << FANOUT_BITS -- sub-ranges per step of the narrowing
local LEAF = 256   -- rows at or below which a range is compared row by row
local BATCH = 2000 -- keys per lookup query

local function split(t)
  local schema, name = text.split_key(t)
  assert(schema, ("keydiff: table %s: \"schema.table\" or {schema=, name=} expected"):format(tostring(t)))
  return schema, name
end

local function qualified_of(t) return pg.qualify(split(t)) end

local function literal(s) return "'" .. tostring(s):gsub("'", "''") .. "'" end

local INTEGER = { smallint = true, integer = true, bigint = true }

function keydiff.key(db, t)
  assert(db and db.query, "keydiff.key: a Db expected")
  local res, err = db:query([[
    select i.indisprimary as primary,
           array_to_json(array(select a.attname from unnest(i.indkey) with ordinality k(n, o)
                                 join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n
                                order by k.o))::text as columns,
           array_to_json(array(select format_type(a.atttypid, a.atttypmod) from unnest(i.indkey) with ordinality k(n, o)
                                 join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n
                                order by k.o))::text as types,
           bool_and(a.attnotnull) as not_null, i.indpred is null and i.indexprs is null as plain
      from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any (i.indkey)
     where i.indrelid = $1::regclass and i.indisunique and i.indisvalid
     group by i.indexrelid, i.indisprimary, i.indkey, i.indrelid, i.indpred, i.indexprs
     order by i.indisprimary desc, i.indexrelid]], qualified_of(t))
  if not res then return nil, err end
  for row in res:rows() do
    if row.primary or (row.not_null and row.plain) then
      local columns, types = json.decode(row.columns), json.decode(row.types)
      if #columns > 0 and #columns == #types then
        return { columns = columns, types = types, integer = #columns == 1 and INTEGER[types[1]] or false }
      end
    end
  end
  return false
end

-- SQL pieces over a key ------------------------------------------------------

-- The key's columns of the table as a row value (or the one column).
local function key_row(key, prefix)
  local cols = {}
  for i, c in ipairs(key.columns) do cols[i] = (prefix or "") .. pg.quote_ident(c) end
  return #cols == 1 and cols[1] or ("(" .. table.concat(cols, ", ") .. ")")
end

-- The canonical text of the key of the current row.
local function key_text(key, prefix)
  local cols = {}
  for i, c in ipairs(key.columns) do cols[i] = (prefix or "") .. pg.quote_ident(c) end
  return "jsonb_build_array(" .. table.concat(cols, ", ") .. ")::text"
end

-- The typed values of a key text (an SQL expression yielding jsonb): a list,
-- and a row value (or the one value).
local function typed_list(key, jsonb_expr)
  local vals = {}
  for i, ty in ipairs(key.types) do vals[i] = ("((%s)->>%d)::%s"):format(jsonb_expr, i - 1, ty) end
  return table.concat(vals, ", ")
end
local function typed(key, jsonb_expr)
  local list = typed_list(key, jsonb_expr)
  return #key.types == 1 and list or ("(" .. list .. ")")
end

function keydiff.exclusion(t, key, keys)
  if not keys or #keys == 0 then return "true" end
  local q = qualified_of(t) .. "."
  return ("NOT EXISTS (SELECT 1 FROM jsonb_array_elements(%s::jsonb) _mx(e) WHERE %s = %s)"):format(
    literal("[" .. table.concat(keys, ",") .. "]"), key_row(key, q), typed(key, "_mx.e"))
end

local function both(cond, extra)
  if not extra or extra == "true" then return cond or "true" end
  if not cond or cond == "true" then return extra end
  return "(" .. cond .. ") AND " .. extra
end

-- Row lookups ------------------------------------------------------------------

local function method_of(opts, a_db, b_db)
  if opts.method then return opts.method end
  return rowhash.method(a_db, b_db)
end

function keydiff.rows(db, t, key, keys, opts)
  assert(db and db.query, "keydiff.rows: a Db expected")
  assert(type(key) == "table" and key.columns, "keydiff.rows: a key (keydiff.key) expected")
  opts = opts or {}
  local method, err = method_of(opts, db)
  if not method then return nil, err end
  local qualified = qualified_of(t)
  local cols
  cols, err = rowhash.columns(db, qualified)
  if not cols then return nil, err end
  local mk = {}
  for i in ipairs(key.columns) do mk[i] = "_mk._k" .. i end
  local sql = ([[
    select %s as k, r.h::text as h, r.x as xmin
      from (select %s from jsonb_array_elements($1::jsonb) _e(e)) _mk
      left join lateral (select %s as h, xmin::text as x from %s where %s = %s) r on true]]):format(
    "jsonb_build_array(" .. table.concat(mk, ", ") .. ")::text",
    (function()
      local sel = {}
      for i, ty in ipairs(key.types) do sel[i] = ("(_e.e->>%d)::%s as _k%d"):format(i - 1, ty, i) end
      return table.concat(sel, ", ")
    end)(),
    rowhash.expr(cols, method), qualified, key_row(key),
    #mk == 1 and mk[1] or ("(" .. table.concat(mk, ", ") .. ")"))
  local out = {}
  for first = 1, #keys, BATCH do
    local batch = table.move(keys, first, math.min(first + BATCH - 1, #keys), 1, {})
    local res, qerr = rowhash.with_stable(db, function()
      return db:query(sql, "[" .. table.concat(batch, ",") .. "]")
    end)
    if not res then return nil, qerr end
    for row in res:rows() do
      if row.h ~= pg.null then out[row.k] = { hash = row.h, xmin = row.xmin } end
    end
  end
  return out
end

function keydiff.canonical(db, key, raw)
  local out = {}
  for first = 1, #raw, BATCH do
    local batch = table.move(raw, first, math.min(first + BATCH - 1, #raw), 1, {})
    local res, err = rowhash.with_stable(db, function()
      return db:query(("select distinct jsonb_build_array(%s)::text as k from jsonb_array_elements($1::jsonb) _e(e)")
        :format(typed_list(key, "_e.e")), "[" .. table.concat(batch, ",") .. "]")
    end)
    if not res then return nil, err end
    for row in res:rows() do out[#out + 1] = row.k end
  end
  table.sort(out)
  return out
end

local function what_of(a, b)
  if a and not b then return "only in a" end
  if b and not a then return "only in b" end
  if a and b and a.hash ~= b.hash then return "differs" end
  return nil
end

function keydiff.compare(a_db, b_db, t, key, keys, opts)
  opts = opts or {}
  local method, err = method_of(opts, a_db, b_db)
  if not method then return nil, err end
  local ra, rb
  ra, err = keydiff.rows(a_db, t, key, keys, { method = method })
  if not ra then return nil, err end
  rb, err = keydiff.rows(b_db, t, key, keys, { method = method })
  if not rb then return nil, err end
  local out = {}
  for _, k in ipairs(keys) do
    local what = what_of(ra[k], rb[k])
    if what then out[#out + 1] = { key = k, what = what, a = ra[k], b = rb[k] } end
  end
  return out
end

-- Narrowing ------------------------------------------------------------------

-- count and hash sum of the rows matching cond, on one side
local function range_hash(db, qualified, expr, cond)
  local res, err = rowhash.with_stable(db, function()
    return db:query(("select count(*)::bigint as n, coalesce(sum(%s), 0)::text as h from %s where %s")
      :format(expr, qualified, cond))
  end)
  if not res then return nil, err end
  return { rows = res[1].n, hash = res[1].h }
end

-- key text -> row hash of every row matching cond, on one side
local function leaf_rows(db, qualified, key, expr, cond)
  local res, err = rowhash.with_stable(db, function()
    return db:query(("select %s as k, %s::text as h from %s where %s"):format(key_text(key), expr, qualified, cond))
  end)
  if not res then return nil, err end
  local out = {}
  for row in res:rows() do out[row.k] = { hash = row.h } end
  return out
end

-- The narrowing over one table: a context shared by the two strategies.
local Narrowing = {}
Narrowing.__index = Narrowing

function Narrowing:hashes(cond)
  local a, err = range_hash(self.a_db, self.qualified, self.a_expr, both(self.base, cond))
  if not a then return nil, err end
  local b
  b, err = range_hash(self.b_db, self.qualified, self.b_expr, both(self.base, cond))
  if not b then return nil, err end
  return a, b
end

function Narrowing:full() return #self.found >= self.limit end

-- Compare the rows of a small range one by one.
function Narrowing:leaf(cond)
  local a, err = leaf_rows(self.a_db, self.qualified, self.key, self.a_expr, both(self.base, cond))
  if not a then return nil, err end
  local b
  b, err = leaf_rows(self.b_db, self.qualified, self.key, self.b_expr, both(self.base, cond))
  if not b then return nil, err end
  local keys = {}
  for k in pairs(a) do keys[#keys + 1] = k end
  for k in pairs(b) do if not a[k] then keys[#keys + 1] = k end end
  table.sort(keys)
  for _, k in ipairs(keys) do
    if what_of(a[k], b[k]) then
      if self:full() then self.more = true return true end
      self.found[#self.found + 1] = k
    end
  end
  return true
end

-- An integer key: ranges first..last (inclusive, widths unsigned: a bigint
-- key may span more than a signed 64-bit integer holds), cut in FANOUT parts.
function Narrowing:integer_walk(first, last)
  local col = pg.quote_ident(self.key.columns[1])
  local function range(l, h) return ("%s BETWEEN %d AND %d"):format(col, l, h) end
  local width = last - first -- unsigned
  if math.ult(width, LEAF) then return self:leaf(range(first, last)) end
  local step = (width >> FANOUT_BITS) + 1 -- FANOUT parts (>> is unsigned)
  local lo = first
  while true do
    local hi = math.ult(last - lo, step) and last or lo + step - 1
    local a, b = self:hashes(range(lo, hi))
    if not a then return nil, b end
    if a.rows ~= b.rows or a.hash ~= b.hash then
      if self:full() then self.more = true return true end
      local ok, err = self:integer_walk(lo, hi)
      if not ok then return nil, err end
    end
    if hi == last then return true end
    lo = hi + 1
  end
end

function Narrowing:integer()
  local col = pg.quote_ident(self.key.columns[1])
  local first, last
  for _, db in ipairs{ self.a_db, self.b_db } do
    local res, err = db:query(("select min(%s)::text as lo, max(%s)::text as hi from %s where %s"):format(col, col,
      self.qualified, both(self.base, nil)))
    if not res then return nil, err end
    local l, h = math.tointeger(tonumber(res[1].lo)), math.tointeger(tonumber(res[1].hi))
    if l and (not first or l < first) then first = l end
    if h and (not last or h > last) then last = h end
  end
  if not first then return true end
  return self:integer_walk(first, last)
end

-- Any other key: ranges of its sort order, (after, upto], cut at keys sampled
-- in order on the side with more rows.
function Narrowing:interval(after, upto)
  local parts = {}
  if after then parts[#parts + 1] = ("%s > %s"):format(key_row(self.key), typed(self.key, literal(after) .. "::jsonb")) end
  if upto then parts[#parts + 1] = ("%s <= %s"):format(key_row(self.key), typed(self.key, literal(upto) .. "::jsonb")) end
  return #parts > 0 and table.concat(parts, " AND ") or "true"
end

function Narrowing:order_walk(after, upto, a, b)
  local cond = self:interval(after, upto)
  local n = math.max(a.rows, b.rows)
  if n <= LEAF then return self:leaf(cond) end
  local db = b.rows > a.rows and self.b_db or self.a_db
  local step = n // FANOUT + 1
  local order = key_row(self.key):gsub("^%((.*)%)$", "%1")
  local res, err = rowhash.with_stable(db, function()
    return db:query(("select k from (select %s as k, row_number() over (order by %s) as rn from %s where %s) s "
      .. "where rn %% %d = 0 order by rn"):format(key_text(self.key), order, self.qualified,
      both(self.base, cond), step))
  end)
  if not res then return nil, err end
  local bounds = {}
  for row in res:rows() do bounds[#bounds + 1] = row.k end
  bounds[#bounds + 1] = upto or false
  local lo = after
  for _, hi in ipairs(bounds) do
    local sub = self:interval(lo, hi or nil)
    local ha, hb = self:hashes(sub)
    if not ha then return nil, hb end
    if ha.rows ~= hb.rows or ha.hash ~= hb.hash then
      if self:full() then self.more = true return true end
      local ok, werr = self:order_walk(lo, hi or nil, ha, hb)
      if not ok then return nil, werr end
    end
    lo = hi or nil
  end
  return true
end

function keydiff.narrow(a_db, b_db, t, key, opts)
  assert(a_db and a_db.query and b_db and b_db.query, "keydiff.narrow: two Dbs expected")
  assert(type(key) == "table" and key.columns, "keydiff.narrow: a key (keydiff.key) expected")
  opts = opts or {}
  local method, err = method_of(opts, a_db, b_db)
  if not method then return nil, err end
  local qualified = qualified_of(t)
  local a_cols, b_cols
  a_cols, err = rowhash.columns(a_db, qualified)
  if not a_cols then return nil, err end
  b_cols, err = rowhash.columns(b_db, qualified)
  if not b_cols then return nil, err end
  local n = setmetatable({ a_db = a_db, b_db = b_db, key = key, qualified = qualified,
    a_expr = rowhash.expr(a_cols, method), b_expr = rowhash.expr(b_cols, method),
    base = both(opts.where, keydiff.exclusion(t, key, opts.exclude)), limit = opts.limit or 1000,
    found = {} }, Narrowing)
  local ok
  if key.integer then
    ok, err = n:integer()
  else
    local a, b = n:hashes(nil)
    if not a then return nil, b end
    ok, err = true, nil
    if a.rows ~= b.rows or a.hash ~= b.hash then ok, err = n:order_walk(nil, nil, a, b) end
  end
  if not ok then return nil, err end
  -- each key looked up again on both sides: a range's collation may differ between servers
  local confirmed
  confirmed, err = keydiff.compare(a_db, b_db, t, key, n.found, { method = method })
  if not confirmed then return nil, err end
  return { keys = confirmed, complete = not n.more }
end

-- Words ------------------------------------------------------------------------

function keydiff.label(key, k)
  local values = json.decode(k)
  local shown = {}
  if type(values) == "table" then
    for i, v in ipairs(values) do
      shown[i] = type(v) == "number" and (math.tointeger(v) and ("%d"):format(math.tointeger(v)) or tostring(v))
        or tostring(v)
    end
  end
  -- integers beyond a double's precision: the key text's own digits
  if #key.columns == 1 and k:match("^%[%-?%d+%]$") then shown = { k:sub(2, -2) } end
  if #key.columns == 1 then return ("%s %s"):format(key.columns[1], shown[1] or k) end
  return ("(%s) (%s)"):format(table.concat(key.columns, ", "), #shown > 0 and table.concat(shown, ", ") or k)
end

function keydiff.describe(key, list, opts)
  opts = opts or {}
  local words = { ["only in a"] = "only in " .. (opts.a or "a"), ["only in b"] = "only in " .. (opts.b or "b"),
                  differs = "differs" }
  local parts = {}
  for i = 1, math.min(#list, opts.show or 10) do
    parts[i] = keydiff.label(key, list[i].key) .. " " .. (words[list[i].what] or list[i].what)
  end
  local s = table.concat(parts, ", ")
  if #list > #parts then s = s .. ", ..." end
  return ("%s (%d key%s%s)"):format(s, #list, #list == 1 and "" or "s", opts.more and " or more" or "")
end

return keydiff
