--[[
migrun.qa: is the data on two servers the same? (runbook Phase I "quick QA" and
the final QA after catch-up). Reads only: every function takes migrun.db Dbs
(or anything with :query) and runs SELECTs.

  local qa = require "migrun.qa"
  local result = qa.compare(replica, target, tables, cfg.qa, { mode = "quick", seed = 42 })
  if result.differences > 0 then print(qa.format(result)) end

A table is { schema =, name = } (catalog.tables' entries do) or "schema.table".

qa.monthly_counts(db, table, column) -> { ["2026-01"] = n, ..., ["(null)"] = n } | nil, err
    Rows per calendar month of column (date, timestamp or timestamptz; months
    of timestamptz are taken in UTC, so two servers with different TimeZone
    settings agree).
qa.row_hash(db, table) -> { rows = n, hash = "<decimal string>" } | nil, err
    An order-independent digest of the table's contents: the sum over all rows
    of the first 60 bits of md5(row text), as numeric, and the row count.
    Equal contents give equal results on any two servers, whatever the physical
    order: the columns are taken by name (not position), the session settings
    that change text forms are fixed for the query (TimeZone UTC, DateStyle
    ISO, IntervalStyle postgres, bytea_output hex, extra_float_digits 3), and
    float4/float8 columns are hashed by their binary form (float8send), which
    does not change between PostgreSQL versions the way their text does.
    A sum can in principle hide two differences that cancel out; with 60-bit
    terms that is a chance of about 2^-60 per comparison.
qa.compare(a_db, b_db, tables, cfg_qa, { mode = "quick" | "full", seed = n }) ->
    { checks = { {table = "s.t" | "query:<name>", method, a, b, equal, detail, error} },
      differences = n, seed = n, mode = "quick" | "full", a_name, b_name }
    quick (default): per-month counts ("monthly:<column>") on the timestamp
      column (cfg_qa.timestamp_columns["s.t"], else cfg_qa.timestamp_column,
      used only where the table has it) for the cfg_qa.large_tables (default
      5) largest tables and a sample of cfg_qa.small_sample (default 10) of
      the others, chosen by a PRNG seeded with opts.seed (default os.time();
      the seed is in the result, so a run can be repeated); a table without
      that column gets an exact count instead. Exact counts ("count") for
      every other table. Then every cfg_qa.queries entry ({name =, sql =})
      runs on both and the results (all rows, all columns, as text) must be
      equal ("query").
    full: count and row_hash for every table ("hash"; a and b are row_hash
      results).
    A check that fails to run (a table missing on one side) is a difference
    with the error in `error` and its message in `detail`.
qa.format(result) -> text: a summary line, then an aligned table of the
    differences (table, method, a, b, detail).
]]
local pg = require "migrun.pg"
local catalog = require "migrun.catalog"
local text = require "migrun.text"

local qa = {}

-- The settings that change how values print; fixed while hashing and counting.
local STABLE_TEXT = {
  { "TimeZone", "UTC" }, { "DateStyle", "ISO, MDY" }, { "IntervalStyle", "postgres" },
  { "bytea_output", "hex" }, { "extra_float_digits", "3" },
}

local function split(t)
  if type(t) == "string" then
    local schema, name = t:match("^([^.]+)%.(.+)$")
    assert(schema, ("qa: table %q: \"schema.table\" expected"):format(t))
    return schema, name
  end
  assert(type(t) == "table" and t.schema and t.name, "qa: a table {schema=, name=} expected")
  return t.schema, t.name
end

local function key_of(t)
  local s, n = split(t)
  return s .. "." .. n
end

-- before (optional, a timestamp text): only rows whose column is older, so
-- that a comparison under live replication leaves out the rows still in flight.
function qa.monthly_counts(db, t, column, before)
  assert(db and db.query, "qa.monthly_counts: a Db expected")
  assert(type(column) == "string", "qa.monthly_counts: column name expected")
  local schema, name = split(t)
  return catalog._with_settings(db, STABLE_TEXT, function()
    local sql = ([[
      select coalesce(to_char(date_trunc('month', %s), 'YYYY-MM'), '(null)') as month,
             count(*)::bigint as n
        from %s %s group by 1]]):format(pg.quote_ident(column), pg.qualify(schema, name),
        before and ("where %s < $1::timestamptz"):format(pg.quote_ident(column)) or "")
    local res, err
    if before then res, err = db:query(sql, before) else res, err = db:query(sql) end
    if not res then return nil, err end
    local counts = {}
    for row in res:rows() do counts[row.month] = row.n end
    return counts
  end)
end

function qa.row_hash(db, t)
  assert(db and db.query, "qa.row_hash: a Db expected")
  local schema, name = split(t)
  local qualified = pg.qualify(schema, name)
  local res, err = db:query([[
    select a.attname as name, format_type(a.atttypid, null) as type
      from pg_attribute a
     where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped
     order by a.attname]], qualified)
  if not res then return nil, err end
  local exprs = {}
  for row in res:rows() do
    local col = pg.quote_ident(row.name)
    if row.type == "double precision" then
      exprs[#exprs + 1] = "float8send(" .. col .. ")"
    elseif row.type == "real" then
      exprs[#exprs + 1] = "float4send(" .. col .. ")"
    else
      exprs[#exprs + 1] = col
    end
  end
  -- row(...) of a single column is still a row; of none, the empty row "()".
  local row_text = ("row(%s)::text"):format(table.concat(exprs, ", "))
  return catalog._with_settings(db, STABLE_TEXT, function()
    local r, qerr = db:query(([[
      select count(*)::bigint as rows,
             coalesce(sum(('x' || substr(md5(%s), 1, 15))::bit(60)::bigint), 0)::text as hash
        from %s]]):format(row_text, qualified))
    if not r then return nil, qerr end
    return { rows = r[1].rows, hash = r[1].hash }
  end)
end

local function count(db, t)
  local schema, name = split(t)
  local res, err = db:query(("select count(*)::bigint as n from %s"):format(pg.qualify(schema, name)))
  if not res then return nil, err end
  return res[1].n
end

-- A small PRNG of our own (64-bit LCG, high bits out), so a seed gives the same
-- sample whatever else uses math.random.
local function prng(seed)
  local x = math.tointeger(seed) or math.floor(seed)
  x = x ~ 0x5DEECE66D
  return function(n)
    x = x * 6364136223846793005 + 1442695040888963407
    return ((x >> 33) % n) + 1
  end
end

-- k distinct entries of list (partial Fisher-Yates over a copy).
local function sample(list, k, seed)
  local copy = table.move(list, 1, #list, 1, {})
  local rand = prng(seed)
  k = math.min(k, #copy)
  for i = 1, k do
    local j = i - 1 + rand(#copy - i + 1)
    copy[i], copy[j] = copy[j], copy[i]
  end
  return { table.unpack(copy, 1, k) }
end
qa._sample = sample

local function has_column(db, t, column)
  if type(t) == "table" and t.columns then
    for _, c in ipairs(t.columns) do
      if c.name == column then return true end
    end
    return false
  end
  local schema, name = split(t)
  local res, err = db:query([[
    select 1 from pg_attribute
     where attrelid = $1::regclass and attname = $2 and attnum > 0 and not attisdropped]],
    pg.qualify(schema, name), column)
  if not res then return nil, err end
  return #res > 0
end

local function months_detail(a, b)
  local months, seen = {}, {}
  for m in pairs(a) do if not seen[m] then seen[m] = true; months[#months + 1] = m end end
  for m in pairs(b) do if not seen[m] then seen[m] = true; months[#months + 1] = m end end
  table.sort(months)
  local diffs = {}
  for _, m in ipairs(months) do
    if (a[m] or 0) ~= (b[m] or 0) then diffs[#diffs + 1] = ("%s: %d vs %d"):format(m, a[m] or 0, b[m] or 0) end
  end
  if #diffs > 5 then
    local n = #diffs
    diffs = { table.unpack(diffs, 1, 5) }
    diffs[6] = ("(+%d more months)"):format(n - 5)
  end
  return table.concat(diffs, "; ")
end

local function run_both(a_db, b_db, fn)
  local a, aerr = fn(a_db)
  if a == nil then return nil, nil, aerr end
  local b, berr = fn(b_db)
  if b == nil then return a, nil, berr end
  return a, b
end

local function failed_check(check, err)
  check.equal, check.error, check.detail = false, err, tostring(err)
  return check
end

local function monthly_check(a_db, b_db, t, column, before)
  local check = { table = key_of(t), method = "monthly:" .. column .. (before and (" < " .. before) or "") }
  local a, b, err = run_both(a_db, b_db, function(db) return qa.monthly_counts(db, t, column, before) end)
  check.a, check.b = a, b
  if err then return failed_check(check, err) end
  check.detail = months_detail(a, b)
  check.equal = check.detail == ""
  return check
end

local function count_check(a_db, b_db, t, note)
  local check = { table = key_of(t), method = "count" }
  local a, b, err = run_both(a_db, b_db, function(db) return count(db, t) end)
  check.a, check.b = a, b
  if err then return failed_check(check, err) end
  check.equal = a == b
  check.detail = check.equal and (note or "") or ("%d vs %d rows"):format(a, b)
  if not check.equal and note then check.detail = check.detail .. "; " .. note end
  return check
end

local function hash_check(a_db, b_db, t)
  local check = { table = key_of(t), method = "hash" }
  local a, b, err = run_both(a_db, b_db, function(db) return qa.row_hash(db, t) end)
  check.a, check.b = a, b
  if err then return failed_check(check, err) end
  check.equal = a.rows == b.rows and a.hash == b.hash
  if a.rows ~= b.rows then
    check.detail = ("%d vs %d rows"):format(a.rows, b.rows)
  elseif a.hash ~= b.hash then
    check.detail = ("same row count (%d), different contents"):format(a.rows)
  else
    check.detail = ""
  end
  return check
end

local function query_text(db, sql)
  local res, err = db:query(sql)
  if not res then return nil, err end
  local cols, lines = res:columns(), {}
  for row in res:rows() do
    local cells = {}
    for i, c in ipairs(cols) do
      local v = row[c]
      cells[i] = v == pg.null and "NULL" or tostring(v)
    end
    lines[#lines + 1] = table.concat(cells, "\t")
  end
  return lines
end

local function query_check(a_db, b_db, q)
  assert(type(q) == "table" and type(q.sql) == "string", "qa: queries entries need sql")
  local check = { table = "query:" .. (q.name or q.sql), method = "query" }
  local a, b, err = run_both(a_db, b_db, function(db)
    return catalog._with_settings(db, STABLE_TEXT, function() return query_text(db, q.sql) end)
  end)
  if err then return failed_check(check, err) end
  check.a, check.b = table.concat(a, "\n"), table.concat(b, "\n")
  check.equal = check.a == check.b
  check.detail = ""
  if not check.equal then
    for i = 1, math.max(#a, #b) do
      if a[i] ~= b[i] then
        check.detail = ("row %d: %s vs %s"):format(i, a[i] or "(none)", b[i] or "(none)")
        break
      end
    end
  end
  return check
end

local function db_name(db)
  local ok, name = pcall(function() return db:name() end)
  return ok and name or nil
end

function qa.compare(a_db, b_db, tables, cfg_qa, opts)
  assert(a_db and a_db.query and b_db and b_db.query, "qa.compare: two Dbs expected")
  assert(type(tables) == "table", "qa.compare: a list of tables expected")
  cfg_qa, opts = cfg_qa or {}, opts or {}
  local mode = opts.mode or "quick"
  assert(mode == "quick" or mode == "full", "qa.compare: mode must be \"quick\" or \"full\"")
  local seed = opts.seed or os.time()
  local on_progress = opts.on_progress
  local result = { checks = {}, differences = 0, seed = seed, mode = mode,
                   a_name = db_name(a_db) or "a", b_name = db_name(b_db) or "b" }

  local plan = {} -- { {table, kind = "monthly" | "count" | "hash"} }
  if mode == "full" then
    for _, t in ipairs(tables) do plan[#plan + 1] = { t = t, kind = "hash" } end
  else
    local ordered = table.move(tables, 1, #tables, 1, {})
    table.sort(ordered, function(x, y)
      local xb, yb = type(x) == "table" and x.bytes or 0, type(y) == "table" and y.bytes or 0
      if xb ~= yb then return xb > yb end
      return key_of(x) < key_of(y)
    end)
    local large = cfg_qa.large_tables or 5
    local monthly, others = {}, {}
    for i, t in ipairs(ordered) do
      if i <= large then monthly[key_of(t)] = true else others[#others + 1] = t end
    end
    table.sort(others, function(x, y) return key_of(x) < key_of(y) end)
    for _, t in ipairs(sample(others, cfg_qa.small_sample or 10, seed)) do monthly[key_of(t)] = true end
    for _, t in ipairs(ordered) do
      plan[#plan + 1] = { t = t, kind = monthly[key_of(t)] and "monthly" or "count" }
    end
  end

  local total = #plan + #(cfg_qa.queries or {})
  local function add(check)
    result.checks[#result.checks + 1] = check
    if not check.equal then result.differences = result.differences + 1 end
    if on_progress then on_progress(#result.checks, total, check.table) end
  end
  for _, p in ipairs(plan) do
    if p.kind == "hash" then
      add(hash_check(a_db, b_db, p.t))
    elseif p.kind == "count" then
      add(count_check(a_db, b_db, p.t))
    else
      local k = key_of(p.t)
      local column = (cfg_qa.timestamp_columns or {})[k] or cfg_qa.timestamp_column
      local has, err = false, nil
      if column then has, err = has_column(a_db, p.t, column) end
      if err then
        add(failed_check({ table = k, method = "monthly:" .. column }, err))
      elseif has then
        add(monthly_check(a_db, b_db, p.t, column, opts.before))
      else
        local named = (cfg_qa.timestamp_columns or {})[k]
        add(count_check(a_db, b_db, p.t,
          named and ("configured timestamp column %s not in the table"):format(named) or nil))
      end
    end
  end
  if mode == "quick" then
    for _, q in ipairs(cfg_qa.queries or {}) do add(query_check(a_db, b_db, q)) end
  end
  return result
end

local function summary(v)
  if v == nil then return "-" end
  if type(v) ~= "table" then
    local s = tostring(v):gsub("\n", " | ")
    return #s > 40 and s:sub(1, 37) .. "..." or s
  end
  if v.rows then return ("%d rows"):format(v.rows) end
  local rows, months = 0, 0
  for _, n in pairs(v) do rows, months = rows + n, months + 1 end
  return ("%d rows, %d months"):format(rows, months)
end

function qa.format(result)
  assert(type(result) == "table" and result.checks, "qa.format: a qa.compare result expected")
  local lines = { ("QA (%s, %s vs %s, seed %s): %d checks, %d difference%s"):format(
    result.mode or "?", result.a_name or "a", result.b_name or "b", tostring(result.seed),
    #result.checks, result.differences, result.differences == 1 and "" or "s") }
  if result.differences == 0 then return lines[1] end
  local rows = { { "table", "method", result.a_name or "a", result.b_name or "b", "detail" } }
  for _, c in ipairs(result.checks) do
    if not c.equal then
      rows[#rows + 1] = { c.table, c.method, summary(c.a), summary(c.b), c.detail or "" }
    end
  end
  for _, line in ipairs(text.aligned(rows)) do lines[#lines + 1] = line end
  return table.concat(lines, "\n")
end

-- The report's table of a comparison: columns and rows.
function qa.report_columns() return { "table", "method", "a", "b", "equal", "detail" } end
function qa.report_rows(result)
  local rows = {}
  for _, c in ipairs(result.checks) do
    rows[#rows + 1] = { c.table, c.method, summary(c.a), summary(c.b), c.equal and "yes" or "NO", c.detail or "" }
  end
  return rows
end

--[[ qa.settled(a_db, b_db, tables, cfg_qa, opts) -> result | nil, err
     qa.compare while b is still receiving a's changes (CDC): a table that
     differs is compared again after opts.wait() (which waits for the
     replication to catch up), up to opts.attempts times (default 5); only
     differences that persist remain. Under a steady trickle of writes a count
     can be off by the transactions in flight at that instant; a real
     difference stays. opts.before (a timestamp text) leaves rows newer than
     it out of the per-month counts. ]]
function qa.settled(a_db, b_db, tables, cfg_qa, opts)
  opts = opts or {}
  local result, err = qa.compare(a_db, b_db, tables, cfg_qa,
    { mode = opts.mode or "quick", seed = opts.seed, before = opts.before })
  if not result then return nil, err end
  local by_key = {}
  for _, t in ipairs(tables) do by_key[key_of(t)] = t end
  for _ = 1, opts.attempts or 5 do
    if result.differences == 0 then break end
    if opts.wait then opts.wait() end
    local again = {}
    for _, c in ipairs(result.checks) do
      if not c.equal and by_key[c.table] then again[#again + 1] = by_key[c.table] end
    end
    local redo, rerr = qa.compare(a_db, b_db, again, { timestamp_column = (cfg_qa or {}).timestamp_column,
      timestamp_columns = (cfg_qa or {}).timestamp_columns, large_tables = #again, small_sample = 0 },
      { mode = result.mode, seed = result.seed, before = opts.before })
    if not redo then return nil, rerr end
    local fresh = {}
    for _, c in ipairs(redo.checks) do fresh[c.table] = c end
    result.differences = 0
    for i, c in ipairs(result.checks) do
      if not c.equal and fresh[c.table] then result.checks[i] = fresh[c.table] end
      if not result.checks[i].equal then result.differences = result.differences + 1 end
    end
  end
  return result
end

return qa
