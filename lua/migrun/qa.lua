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
      Partitions (tables with partition_of, as catalog.tables gives them):
      the partitioned table is what the config names and what is ranked and
      sampled, as large as its partitions together; timestamp_columns of
      the parent holds for every partition (a partition's own entry first).
      Each partition is still checked on its own (its check has partition_of).
    full: count and row_hash for every table ("hash"; a and b are row_hash
      results).
    opts.before: see monthly_counts. opts.between: a function; when given,
      every check reads a first, then between() runs once, then every check
      reads b (qa.settled waits for a fence there). opts.kinds: { ["s.t"] =
      "monthly" | "count" } forces a table's method (a second comparison
      keeps the first one's).
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

local function failed_check(check, err)
  check.equal, check.error, check.detail = false, err, tostring(err)
  return check
end

local function parent_of(t)
  return type(t) == "table" and t.partition_of or nil
end

--[[ A probe: one check, read on each side by read(db) -> value | nil, err,
then judged by judge(check) once check.a and check.b are there. Reading both
sides of every probe one after the other, or every a side, then between(),
then every b side, is compare's choice (see opts.between). ]]
local function probe(t, method, read, judge)
  local check = { method = method }
  if type(t) == "table" and t.query then
    check.table = "query:" .. t.query
  else
    check.table, check.partition_of = key_of(t), parent_of(t)
  end
  return { check = check, read = read, judge = judge }
end

local function monthly_probe(t, column, before)
  return probe(t, "monthly:" .. column .. (before and (" < " .. before) or ""),
    function(db) return qa.monthly_counts(db, t, column, before) end,
    function(c)
      c.detail = months_detail(c.a, c.b)
      c.equal = c.detail == ""
    end)
end

local function count_probe(t, note)
  return probe(t, "count", function(db) return count(db, t) end,
    function(c)
      c.equal = c.a == c.b
      c.detail = c.equal and (note or "") or ("%d vs %d rows"):format(c.a, c.b)
      if not c.equal and note then c.detail = c.detail .. "; " .. note end
    end)
end

local function hash_probe(t)
  return probe(t, "hash", function(db) return qa.row_hash(db, t) end,
    function(c)
      local a, b = c.a, c.b
      c.equal = a.rows == b.rows and a.hash == b.hash
      if a.rows ~= b.rows then
        c.detail = ("%d vs %d rows"):format(a.rows, b.rows)
      elseif a.hash ~= b.hash then
        c.detail = ("same row count (%d), different contents"):format(a.rows)
      else
        c.detail = ""
      end
    end)
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

local function query_probe(q)
  assert(type(q) == "table" and type(q.sql) == "string", "qa: queries entries need sql")
  return probe({ query = q.name or q.sql }, "query",
    function(db) return catalog._with_settings(db, STABLE_TEXT, function() return query_text(db, q.sql) end) end,
    function(c)
      local a, b = c.a, c.b
      c.a, c.b = table.concat(a, "\n"), table.concat(b, "\n")
      c.equal = c.a == c.b
      c.detail = ""
      if not c.equal then
        for i = 1, math.max(#a, #b) do
          if a[i] ~= b[i] then
            c.detail = ("row %d: %s vs %s"):format(i, a[i] or "(none)", b[i] or "(none)")
            break
          end
        end
      end
    end)
end

-- The b side of a probe whose a side was read (or failed): the finished check.
local function finish(p, a, aerr, b_db)
  local c = p.check
  if a == nil then return failed_check(c, aerr) end
  c.a = a
  local b, berr = p.read(b_db)
  if b == nil then return failed_check(c, berr) end
  c.b = b
  p.judge(c)
  return c
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
    -- A partitioned table is one unit, by its own name: as large as its
    -- partitions together, and chosen (largest or sampled) with all of them.
    local units, by_unit = {}, {}
    for _, t in ipairs(tables) do
      local u = parent_of(t) or key_of(t)
      if not by_unit[u] then
        by_unit[u] = { key = u, bytes = 0 }
        units[#units + 1] = by_unit[u]
      end
      by_unit[u].bytes = by_unit[u].bytes + (type(t) == "table" and t.bytes or 0)
    end
    table.sort(units, function(x, y)
      if x.bytes ~= y.bytes then return x.bytes > y.bytes end
      return x.key < y.key
    end)
    local large = cfg_qa.large_tables or 5
    local monthly, others = {}, {}
    for i, u in ipairs(units) do
      if i <= large then monthly[u.key] = true else others[#others + 1] = u.key end
    end
    table.sort(others)
    for _, u in ipairs(sample(others, cfg_qa.small_sample or 10, seed)) do monthly[u] = true end
    for _, t in ipairs(ordered) do
      local kind = (opts.kinds or {})[key_of(t)] or (monthly[parent_of(t) or key_of(t)] and "monthly" or "count")
      plan[#plan + 1] = { t = t, kind = kind }
    end
  end

  local probes = {}
  local columns = cfg_qa.timestamp_columns or {}
  for _, p in ipairs(plan) do
    if p.kind == "hash" then
      probes[#probes + 1] = hash_probe(p.t)
    elseif p.kind == "count" then
      probes[#probes + 1] = count_probe(p.t)
    else
      local k, parent = key_of(p.t), parent_of(p.t)
      -- the table's own entry, else its partitioned table's: config names the parent
      local named = columns[k] or (parent and columns[parent])
      local column = named or cfg_qa.timestamp_column
      local has, err = false, nil
      if column then has, err = has_column(a_db, p.t, column) end
      if err then
        local failed = probe(p.t, "monthly:" .. column)
        failed.error = err
        probes[#probes + 1] = failed
      elseif has then
        probes[#probes + 1] = monthly_probe(p.t, column, opts.before)
      else
        probes[#probes + 1] = count_probe(p.t,
          named and ("configured timestamp column %s not in the table"):format(named) or nil)
      end
    end
  end
  if mode == "quick" then
    for _, q in ipairs(cfg_qa.queries or {}) do probes[#probes + 1] = query_probe(q) end
  end

  local total = #probes
  local function add(check)
    result.checks[#result.checks + 1] = check
    if not check.equal then result.differences = result.differences + 1 end
    if on_progress then on_progress(#result.checks, total, check.table) end
  end
  local function read_a(p)
    if p.error then return nil, p.error end
    return p.read(a_db)
  end
  if opts.between then
    -- every a side first, then between() (a fence waited for), then every b
    -- side: b then holds at least everything a showed
    local firsts = {}
    for i, p in ipairs(probes) do firsts[i] = table.pack(read_a(p)) end
    opts.between()
    for i, p in ipairs(probes) do add(finish(p, firsts[i][1], firsts[i][2], b_db)) end
  else
    for _, p in ipairs(probes) do
      local a, aerr = read_a(p)
      add(finish(p, a, aerr, b_db))
    end
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
     qa.compare while b is still receiving a's changes (CDC), so that no
     difference is reported that b applying what is in flight would close:
     opts.wait() (which returns once b has applied everything a committed
     before the call: a fence, cdc.wait_applied) runs first, then the
     comparison; a table that differs is compared again, by the same method,
     up to opts.attempts times (default 5), each time read on a first, then
     opts.wait(), then read on b, so that b holds at least what a showed. Only
     differences that persist remain. opts.before (a timestamp text) leaves
     rows newer than it out of the per-month counts; opts.mode, opts.seed. ]]
function qa.settled(a_db, b_db, tables, cfg_qa, opts)
  opts = opts or {}
  if opts.wait then opts.wait() end
  local result, err = qa.compare(a_db, b_db, tables, cfg_qa,
    { mode = opts.mode or "quick", seed = opts.seed, before = opts.before })
  if not result then return nil, err end
  local by_key = {}
  for _, t in ipairs(tables) do by_key[key_of(t)] = t end
  for _ = 1, opts.attempts or 5 do
    if result.differences == 0 then break end
    local again, kinds = {}, {}
    for _, c in ipairs(result.checks) do
      if not c.equal and by_key[c.table] then
        again[#again + 1] = by_key[c.table]
        kinds[c.table] = c.method:match("^(%a+)")
      end
    end
    if #again == 0 then break end
    local redo, rerr = qa.compare(a_db, b_db, again, { timestamp_column = (cfg_qa or {}).timestamp_column,
      timestamp_columns = (cfg_qa or {}).timestamp_columns },
      { mode = result.mode, seed = result.seed, before = opts.before, kinds = kinds, between = opts.wait })
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
