--[[
migrun.chunks: how a large table of the paused replica is cut into chunks that
load (and hash) independently: ranges of an integer primary key where the table
has one, else ranges of physical blocks (ctid). Reads only.

Why these two ways:
- An integer primary key gives ranges that mean the same rows on every server:
  a chunk can be loaded from the replica, and later hashed on the source and
  on the target, by the same WHERE clause. The ranges follow the key's
  histogram (pg_stats, replicated with the data) where it covers the key's
  actual min..max, so that chunks hold about the same number of rows even when
  the keys are unevenly spread; else they are of equal width.
- Any other table (a text or uuid key, a composite key, no key at all) is cut
  by blocks: `ctid >= '(a,0)' AND ctid < '(b,0)'` reads just those pages with a
  TID range scan (PostgreSQL 14 and later; before that every chunk would scan
  the whole table, so such a table is not split there). Block ranges exist
  only on the replica: on the target the same rows sit elsewhere.
- The replica is paused, so min/max, the block count and every range are
  fixed for the whole load: a chunk read twice gives the same rows.

  local chunks = require "migrun.chunks"
  local plan, why = chunks.plan(replica, { schema = "public", name = "orders" },
    { chunk_bytes = 1 << 30, split_bytes = 2 << 30 })
  if plan then for i = 1, plan.count do print(chunks.copy_sql(plan, i)) end end

  chunks.describe(db, t) -> { bytes =, blocks =, buffers =, version =, columns = {names},
      key = { column =, type = } | nil } | nil, err
      db: a migrun.pg Conn or a migrun.db Db; t: { schema =, name = }.
      bytes: pg_table_size (heap and TOAST); buffers: the server's
      shared_buffers, in blocks; columns: the stored columns in order
      (generated ones left out: COPY cannot write them).
  chunks.plan(db, t, { chunk_bytes =, split_bytes = [, tail =] }) -> plan | false, reason | nil, err
      A table larger than split_bytes is cut into ceil(bytes / chunk_bytes)
      chunks; false and the reason when it stays whole. tail: the last that
      many of them cut again in halves (a load of `jobs` streams passes
      tail = jobs: the chunks in flight when the table ends, or when a run is
      killed, are half as long, and the table's index builds start sooner).
      plan = { table = "s.t", schema, name, method = "key" | "blocks",
      column (the key), columns, count, bytes, ranges = { {lo =, hi =,
      share =} } } with lo/hi as strings (integers of any size survive
      JSON), nil for an open end; share: the range's part of the table (its
      expected bytes / plan.bytes).
  chunks.fractions(n, tail) -> { f... }  (pure) where ranges are cut, in
      (0, 1): n equal parts, the last `tail` of them halved
  chunks.key_ranges(lo, hi, n, bounds [, tail]) -> ranges   (pure; bounds: a histogram)
  chunks.block_ranges(blocks, n [, tail]) -> ranges         (pure)
  chunks.share(plan, i) -> the part of the table chunk i is expected to hold
  chunks.where(plan, i [, lo, hi]) -> SQL condition of chunk i (or of lo..hi,
      a narrower key range inside it, for QA)
  chunks.copy_sql(plan, i) -> from_sql (replica), to_sql (target)
  chunks.label(plan, i) -> "id 1..99999" | "id >= 100000" | "blocks 0..1023"
]]
local pg = require "migrun.pg"
local text = require "migrun.text"
local pgversion = require "migrun.pgversion"

local chunks = {}

local INTEGER_TYPES = { smallint = true, integer = true, bigint = true }

local function query(db, sql, ...)
  if db.query then return db:query(sql, ...) end
  return db:exec(sql, ...)
end

function chunks.describe(db, t)
  assert(db and (db.query or db.exec), "chunks.describe: a connection expected")
  assert(type(t) == "table" and t.schema and t.name, "chunks.describe: a table {schema=, name=} expected")
  local qualified = pg.qualify(t.schema, t.name)
  local res, err = query(db, [[
    select pg_table_size(c.oid) as bytes,
           pg_relation_size(c.oid) / current_setting('block_size')::int as blocks,
           current_setting('server_version_num')::int as version,
           (select setting::bigint from pg_settings where name = 'shared_buffers') as buffers
      from pg_class c where c.oid = $1::regclass]], qualified)
  if not res then return nil, err end
  local d = { bytes = res[1].bytes, blocks = res[1].blocks, buffers = res[1].buffers, version = res[1].version,
              columns = {} }
  local generated = pgversion.pick(d.version, "attgenerated", "a.attgenerated::text <> ''", "false")
  res, err = query(db, ([[
    select a.attname as name, %s as generated from pg_attribute a
     where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum]]):format(generated),
    qualified)
  if not res then return nil, err end
  for row in res:rows() do
    if not row.generated then d.columns[#d.columns + 1] = row.name end
  end
  res, err = query(db, [[
    select a.attname as name, format_type(a.atttypid, null) as type
      from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
     where i.indrelid = $1::regclass and i.indisprimary and i.indnatts = 1]], qualified)
  if not res then return nil, err end
  if #res == 1 and INTEGER_TYPES[res[1].type] then d.key = { column = res[1].name, type = res[1].type } end
  return d
end

-- Histogram bounds as integers, or nil.
local function parse_bounds(s)
  if type(s) ~= "string" then return nil end
  local out = {}
  for v in s:gmatch("[^{},]+") do
    local n = math.tointeger(tonumber(v))
    if not n then return nil end
    out[#out + 1] = n
  end
  return #out >= 2 and out or nil
end

function chunks.fractions(n, tail)
  assert(math.type(n) == "integer" and n >= 1, "chunks.fractions: n >= 1 expected")
  tail = math.max(0, math.min(tail or 0, n - 1)) -- the first part stays whole: a table of 2 parts is not all tail
  local out = {}
  for j = 1, n - 1 do
    if j > n - tail then out[#out + 1] = (j - 0.5) / n end
    out[#out + 1] = j / n
  end
  if tail > 0 then out[#out + 1] = (n - 0.5) / n end
  return out
end

-- The shares of the ranges cut at fractions fs (kept where a cut was kept).
local function with_shares(ranges, fs, kept)
  local prev = 0
  for i, r in ipairs(ranges) do
    local f = kept[i] or 1
    r.share = f - prev
    prev = f
  end
  return ranges
end

-- Ranges over lo..hi (integers), cut at chunks.fractions(n, tail): at the
-- quantiles of the histogram where it covers lo..hi (within 5% of the span
-- at each end), else of equal width.
function chunks.key_ranges(lo, hi, n, bounds, tail)
  assert(math.type(lo) == "integer" and math.type(hi) == "integer" and lo <= hi, "chunks.key_ranges: lo <= hi expected")
  assert(math.type(n) == "integer" and n >= 1, "chunks.key_ranges: n >= 1 expected")
  local span = (hi + 0.0) - lo + 1
  local use = bounds and #bounds >= 2 and bounds[1] <= lo + span * 0.05 and bounds[#bounds] >= hi - span * 0.05
  local fs = chunks.fractions(n, tail)
  local cuts, kept = {}, {}
  for _, f in ipairs(fs) do
    local v
    if use then
      local p = f * (#bounds - 1)
      local k = math.floor(p)
      local a, b = bounds[k + 1], bounds[math.min(k + 2, #bounds)]
      v = a + ((b + 0.0) - a) * (p - k) -- in floating point: b - a may not fit in an integer
    else
      v = lo + span * f
    end
    local c = math.tointeger(math.floor(v)) or lo
    if c > lo and c <= hi and (#cuts == 0 or c > cuts[#cuts]) then
      cuts[#cuts + 1], kept[#cuts + 1] = c, f
    end
  end
  local ranges = {}
  local prev
  for _, c in ipairs(cuts) do
    ranges[#ranges + 1] = { lo = prev and tostring(prev) or nil, hi = tostring(c) }
    prev = c
  end
  ranges[#ranges + 1] = { lo = prev and tostring(prev) or nil, hi = nil }
  return with_shares(ranges, fs, kept)
end

function chunks.block_ranges(blocks, n, tail)
  assert(math.type(blocks) == "integer" and blocks >= 0, "chunks.block_ranges: a block count expected")
  assert(math.type(n) == "integer" and n >= 1, "chunks.block_ranges: n >= 1 expected")
  local fs = chunks.fractions(n, tail)
  local ranges, kept, prev = {}, {}, nil
  for _, f in ipairs(fs) do
    local c = math.tointeger(math.ceil(blocks * f - 1e-9)) -- the exact fraction's block, not one past by rounding
    if c > 0 and (not prev or c > prev) and c < blocks then
      ranges[#ranges + 1] = { lo = prev and tostring(prev) or nil, hi = tostring(c) }
      kept[#ranges] = c / blocks -- what the range holds, not the fraction asked for
      prev = c
    end
  end
  ranges[#ranges + 1] = { lo = prev and tostring(prev) or nil, hi = nil }
  return with_shares(ranges, fs, kept)
end

function chunks.share(plan, i)
  local r = plan.ranges[i]
  assert(r, ("chunks.share: %s has no chunk %s"):format(plan.table, tostring(i)))
  return r.share or 1 / plan.count -- a plan journaled before ranges had shares: equal parts
end

function chunks.plan(db, t, opts)
  opts = opts or {}
  local chunk_bytes, split_bytes = opts.chunk_bytes, opts.split_bytes or opts.chunk_bytes
  assert(type(chunk_bytes) == "number" and chunk_bytes > 0, "chunks.plan: opts.chunk_bytes > 0 expected")
  local d, err = chunks.describe(db, t)
  if not d then return nil, err end
  if d.bytes <= split_bytes then return false, ("%s is not above %s"):format(text.bytes(d.bytes), text.bytes(split_bytes)) end
  local n = math.tointeger(math.ceil(d.bytes / chunk_bytes))
  if n < 2 then return false, "one chunk" end
  local plan = { table = text.key(t.schema, t.name), schema = t.schema, name = t.name, columns = d.columns,
                 bytes = d.bytes }
  if d.key then
    local qualified, col = pg.qualify(t.schema, t.name), pg.quote_ident(d.key.column)
    local res
    res, err = query(db, ("select min(%s)::text as lo, max(%s)::text as hi from %s"):format(col, col, qualified))
    if not res then return nil, err end
    local lo, hi = math.tointeger(tonumber(res[1].lo)), math.tointeger(tonumber(res[1].hi))
    if not lo then return false, "empty" end
    res, err = query(db, "select histogram_bounds::text as b from pg_stats where schemaname = $1 and tablename = $2 "
      .. "and attname = $3", t.schema, t.name, d.key.column)
    if not res then return nil, err end
    plan.method, plan.column = "key", d.key.column
    plan.ranges = chunks.key_ranges(lo, hi, n, parse_bounds(#res > 0 and res[1].b or nil), opts.tail)
  elseif pgversion.has(d.version, "tid_range_scan") then
    plan.method = "blocks"
    plan.ranges = chunks.block_ranges(d.blocks, n, opts.tail)
  else
    return false, ("no integer primary key, and block ranges need TID range scans (PostgreSQL 14; this is %s)")
      :format(pgversion.label(d.version))
  end
  plan.count = #plan.ranges
  if plan.count < 2 then return false, "one chunk" end
  return plan
end

local function bound(v)
  local n = math.tointeger(tonumber(v))
  assert(n, "chunks: a range bound must be an integer, got " .. tostring(v))
  return ("%d"):format(n)
end

function chunks.where(plan, i, lo, hi)
  local r = plan.ranges[i]
  assert(r, ("chunks.where: %s has no chunk %s"):format(plan.table, tostring(i)))
  if lo == nil then lo = r.lo end
  if hi == nil then hi = r.hi end
  local parts = {}
  if plan.method == "key" then
    local col = pg.quote_ident(plan.column)
    if lo then parts[#parts + 1] = ("%s >= %s"):format(col, bound(lo)) end
    if hi then parts[#parts + 1] = ("%s < %s"):format(col, bound(hi)) end
  else
    if lo then parts[#parts + 1] = ("ctid >= '(%s,0)'::tid"):format(bound(lo)) end
    if hi then parts[#parts + 1] = ("ctid < '(%s,0)'::tid"):format(bound(hi)) end
  end
  if #parts == 0 then return "true" end
  return table.concat(parts, " AND ")
end

function chunks.copy_sql(plan, i)
  local cols = {}
  for k, c in ipairs(plan.columns) do cols[k] = pg.quote_ident(c) end
  local list = table.concat(cols, ", ")
  local qualified = pg.qualify(plan.schema, plan.name)
  return ("COPY (SELECT %s FROM %s WHERE %s) TO STDOUT (FORMAT binary)"):format(list, qualified, chunks.where(plan, i)),
         ("COPY %s (%s) FROM STDIN (FORMAT binary)"):format(qualified, list)
end

function chunks.label(plan, i)
  local r = plan.ranges[i]
  local what = plan.method == "key" and plan.column or "blocks"
  if r.lo and r.hi then
    local hi = math.tointeger(tonumber(r.hi)) - 1
    return ("%s %s..%d"):format(what, r.lo, hi)
  elseif r.hi then
    return ("%s < %s"):format(what, r.hi)
  elseif r.lo then
    return ("%s >= %s"):format(what, r.lo)
  end
  return what .. " (all)"
end

return chunks
