--[[
migrun.qa: is the data on two servers the same? (runbook Phase I "quick QA" and
the live verification after catch-up, migrun.verify). Reads only: every function takes migrun.db Dbs
(or anything with :query) and runs SELECTs.

  local qa = require "migrun.qa"
  local result = qa.compare(replica, target, tables, cfg.qa, { mode = "quick", seed = 42 })
  if result.differences > 0 then print(qa.format(result)) end

A table is { schema =, name = } (catalog.tables' entries do) or "schema.table".

qa.monthly_counts(db, table, column) -> { ["2026-01"] = n, ..., ["(null)"] = n } | nil, err
    Rows per calendar month of column (date, timestamp or timestamptz; months
    of timestamptz are taken in UTC, so two servers with different TimeZone
    settings agree).
qa.row_hash(db, table, opts) -> { rows = n, hash = "<decimal string>" } | nil, err
    An order-independent digest of the table's contents: the sum over all rows
    of the first 60 bits of md5(row text), as numeric, and the row count.
    Equal contents give equal results on any two servers, whatever the physical
    order: the columns are taken by name (not position), the session settings
    that change text forms are fixed for the query (TimeZone UTC, DateStyle
    ISO, IntervalStyle postgres, bytea_output hex, extra_float_digits 3), and
    float4/float8 columns are hashed by their binary form (float8send), which
    does not change between PostgreSQL versions the way their text does.
    A sum can in principle hide two differences that cancel out; with 60-bit
    terms that is a chance of about 2^-60 per comparison. opts.where: only
    those rows; opts.method; opts.columns: the table's rowhash.columns, read
    already.
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
      results). With opts.jobs > 1 and opts.a_conninfo, opts.b_conninfo, the
      tables are hashed by `jobs` worker processes on each side at once,
      largest first, and a table larger than opts.chunk_bytes (migrun.chunks,
      planned on a) in parts: by block ranges of each side where both servers
      have TID range scans (PostgreSQL 14), each side its own parts under one
      exported snapshot, whose hashes add up to the table's (a sequential read
      of each side: verifying a big table costs about one scan of each side);
      elsewhere by ranges of an integer primary key, each range on both sides.
      On a side where the table is larger than a quarter of shared_buffers,
      by one sequential scan with parallel workers instead (its share of the
      side's jobs): it reads through a ring of 256 KB, where ranges read
      through the whole buffer pool and push out what the server had cached.
      Without workers every table is hashed whole, one statement per side. A
      table that differs and has a key (primary, or unique on NOT NULL
      columns) is narrowed to the keys of the rows that differ
      (migrun.keydiff): a table with an integer key is hashed again by key
      ranges to find the ranges that differ and narrowed in each, any other
      over the whole table: check.key (its
      columns), check.keys = { {key, what, a, b} } (up to opts.keys_limit,
      default 1000; check.keys_complete false when there were more), and the
      detail names the first ten ("id 17 differs, id 20 only in target (2
      keys)"); a split table's check.chunks = { {chunk =, of =, range =, keys
      = {"id 17 differs"}, a =, b = } }. opts.narrow = false: not narrowed.
      opts.exclude = { ["s.t"] = {canonical keys} }: those rows are left out
      on both sides (rows known to be changing: migrun.verify).
    opts.before: see monthly_counts. opts.kinds: { ["s.t"] =
      "monthly" | "count" } forces a table's method (a second comparison
      keeps the first one's).
    A check that fails to run (a table missing on one side) is a difference
    with the error in `error` and its message in `detail`.
qa.verdict(check) -> "yes" | "NO" | "empty on both" | "nothing compared" (a
    filter such as opts.before left every row out): the report's word for a check
qa.format(result) -> text: a summary line, then an aligned table of the
    differences (table, method, a, b, detail).
]]
local pg = require "migrun.pg"
local text = require "migrun.text"
local chunks = require "migrun.chunks"
local pool = require "migrun.pool"
local errors = require "migrun.error"
local db = require "migrun.db"
local rowhash = require "migrun.rowhash"
local pgversion = require "migrun.pgversion"
local keydiff = require "migrun.keydiff"

local qa = {}

local function split(t)
  local schema, name = text.split_key(t)
  assert(schema, ("qa: table %s: \"schema.table\" or {schema=, name=} expected"):format(tostring(t)))
  return schema, name
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
  return rowhash.with_stable(db, function()
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

local method_for = rowhash.method
qa._method_for = method_for

function qa.row_hash(db, t, opts)
  assert(db and db.query, "qa.row_hash: a Db expected")
  opts = opts or {}
  local schema, name = split(t)
  local qualified = pg.qualify(schema, name)
  local method = opts.method
  if not method then
    local err
    method, err = method_for(db)
    if not method then return nil, err end
  end
  assert(method == "typed" or method == "md5", "qa.row_hash: method must be \"typed\" or \"md5\"")
  local cols = opts.columns
  if not cols then
    local err
    cols, err = rowhash.columns(db, qualified)
    if not cols then return nil, err end
  end
  local expr = rowhash.expr(cols, method)
  return rowhash.with_stable(db, function()
    -- typed terms are signed: count * 2^63 added once keeps the text a plain number
    local sql = method == "md5" and ([[
      select count(*)::bigint as rows, coalesce(sum(%s), 0)::text as hash from %s%s]])
      or ([[select count(*)::bigint as rows,
             (coalesce(sum(%s), 0) + count(*) * 9223372036854775808::numeric)::text as hash from %s%s]])
    local r, qerr = db:query(sql:format(expr, qualified, opts.where and (" where " .. opts.where) or ""))
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
then judged by judge(check) once check.a and check.b are there. ]]
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

local function run_both(a_db, b_db, fn)
  local a, aerr = fn(a_db)
  if a == nil then return nil, nil, aerr end
  local b, berr = fn(b_db)
  if b == nil then return a, nil, berr end
  return a, b
end

local function result_name(d, default)
  local ok, name = pcall(function() return d:name() end)
  return ok and name or default
end

local MAX_KEYS = 10 -- keys named in a difference's detail (check.keys holds up to opts.keys_limit)

-- A scan's parallel workers for the session (0: none), in one round trip.
-- The costs set to nothing make the planner take the workers it is offered
-- on a table of any size (it sizes them by the table, then caps them).
-- Before 9.6 there is nothing to set: every query runs in one process.
local function parallel_workers(d, n, version)
  if not pgversion.has(version, "parallel_query") then return true end
  local min_size = pgversion.pick(version, "min_parallel_table_scan_size", "min_parallel_table_scan_size",
    "min_parallel_relation_size")
  return d:query(([[select set_config('max_parallel_workers_per_gather', $1, false),
    set_config('%s', '0', false), set_config('parallel_setup_cost', '0', false),
    set_config('parallel_tuple_cost', '0', false)]]):format(min_size), tostring(n))
end

-- A worker's task: row hashes of units on one side. Units marked snapshot
-- (block ranges; they come first) are hashed in one transaction under the
-- side's exported snapshot (job.snapshot), so that a row that moves while
-- they are read is counted once. The units are the parallelism: no parallel
-- workers per query (they would cost more CPU for the same scans), but for
-- a unit given some (u.workers: a scan of a table too large for ranges).
function qa.task(job, emit)
  local conn, err = pg.connect(job.conninfo, { name = job.name, application_name = job.application_name })
  if not conn then return nil, err end
  local d = db.wrap(conn)
  local version = conn:server_version()
  local ok, serr = rowhash.stabilize(d) -- once for the session, not three round trips per unit
  if ok then ok, serr = parallel_workers(d, 0, version) end
  if not ok then conn:close() return nil, serr end
  -- every table's columns in one query (one per unit cost the servers a
  -- few percent over the scans); a table missing fails it: then each unit
  -- reads its own and says its own error
  local names, seen = {}, {}
  for _, u in ipairs(job.units) do
    local q = pg.qualify(u.schema, u.name)
    if not seen[q] then seen[q] = true names[#names + 1] = q end
  end
  local columns = rowhash.columns(d, names) or {}
  local in_snapshot = false
  for _, u in ipairs(job.units) do
    if u.snapshot and not in_snapshot then
      ok, serr = d:query("begin isolation level repeatable read read only")
      if ok then ok, serr = d:query("set transaction snapshot " .. conn:escape_literal(job.snapshot)) end
      if not ok then conn:close() return nil, serr end
      in_snapshot = true
    elseif in_snapshot and not u.snapshot then
      d:query("commit")
      in_snapshot = false
    end
    local parallel = (u.workers or 0) > 0
    local r, herr
    if parallel then _, herr = parallel_workers(d, u.workers, version) end
    if not herr then
      r, herr = qa.row_hash(d, { schema = u.schema, name = u.name }, { where = u.where, method = job.method,
        columns = columns[pg.qualify(u.schema, u.name)] })
    end
    if parallel then parallel_workers(d, 0, version) end -- the next units read alone (if this fails, they are only faster)
    local e = herr and { kind = type(herr) == "table" and herr.kind or "sql", message = type(herr) == "table"
      and herr.message or tostring(herr), where = type(herr) == "table" and herr.where or nil,
      code = type(herr) == "table" and herr.code or nil }
    emit{ event = "hashed", unit = u.unit, side = job.side, rows = r and r.rows, hash = r and r.hash, error = e }
  end
  if in_snapshot then d:query("commit") end
  conn:close()
  return true
end

local add_decimal = rowhash.add_sums

-- The units of a full comparison: a table whole, one key range of it (the
-- same rows on both sides), or one block range of one side (other rows on
-- each: those sums are added up per side, which gives the whole table's
-- hash). Rows whose keys opts.exclude lists for the table are left out of
-- every unit on both sides.
--
-- A table above opts.chunk_bytes is cut only where the units are hashed in
-- parallel (opts.pool: worker processes on each side); hashed here, one
-- statement per side reads it whole. It is cut by block ranges of each side
-- where both servers have TID range scans (PostgreSQL 14): a sequential
-- read of each part, as cheap as hashing gets (by key ranges, the index
-- scans cost some 40% more on a table in memory), under one exported
-- snapshot per side so that a row that moves while they are read is
-- counted once. Elsewhere by key ranges, on both sides. An integer key's
-- ranges are kept in any case (e.key_plan): they narrow a difference.
--
-- Except on a side where the table is larger than a quarter of the
-- server's shared_buffers: there it is one unit, a sequential scan with
-- parallel workers (side_tasks gives it its share of the side's jobs). A
-- sequential scan of a table that size reads through a ring of 256 KB per
-- process; a TID range scan, or an index scan, reads through the whole
-- buffer pool, and the ranges of every large table would push out of it
-- what the server had cached: the application's pages on a source it runs
-- on (the live verification reads the primary), DMS's on the target.
local function reads_through_ring(d) return d.blocks > d.buffers // 4 end

local function plan_units(a_db, b_db, tables, opts)
  local entries, units = {}, {}
  local function unit(e, u)
    if e.exclusion then u.where = u.where and ("(" .. u.where .. ") AND " .. e.exclusion) or e.exclusion end
    units[#units + 1] = u
    u.id, u.entry = #units, e
    e.units[#e.units + 1] = u
  end
  -- one side's units of a table read by sides: its block ranges (a plan
  -- by blocks), or one scan when there is none
  local function side_units(e, side, bytes, blocks_plan)
    if not blocks_plan then
      unit(e, { side = side, scan = true, cost = bytes })
      return
    end
    for i = 1, #blocks_plan.ranges do
      unit(e, { side = side, ranged = true, where = chunks.where(blocks_plan, i), cost = bytes / #blocks_plan.ranges })
    end
  end
  local function add_units(e, plan, da, db_)
    local ring_a, ring_b = da and reads_through_ring(da), db_ and reads_through_ring(db_)
    local tid = da and pgversion.has(da.version, "tid_range_scan") and pgversion.has(db_.version, "tid_range_scan")
    if plan and opts.pool and (ring_a or ring_b or tid) then
      e.sided = true
      local function blocks_of(d) return { table = plan.table, method = "blocks",
        ranges = chunks.block_ranges(math.tointeger(d.blocks), plan.count) } end
      side_units(e, "a", plan.bytes, tid and not ring_a and (plan.method == "blocks" and plan or blocks_of(da)))
      side_units(e, "b", plan.bytes, tid and not ring_b and blocks_of(db_))
    elseif plan and plan.method == "key" and opts.pool then
      for i = 1, plan.count do unit(e, { chunk = i, where = chunks.where(plan, i), cost = plan.bytes / plan.count }) end
    else
      unit(e, { cost = e.bytes or 0 })
    end
  end
  for _, t in ipairs(tables) do
    local schema, name = split(t)
    local e = { t = t, k = key_of(t), schema = schema, name = name, units = {},
                bytes = type(t) == "table" and t.bytes or 0 }
    entries[#entries + 1] = e
    local excluded = (opts.exclude or {})[e.k]
    if excluded and #excluded > 0 then
      local key, kerr = keydiff.key(a_db, { schema = schema, name = name })
      if key then e.exclusion, e.excluded = keydiff.exclusion({ schema = schema, name = name }, key, excluded), #excluded
      else e.error = kerr or ("%s has no key: keys cannot be left out of its comparison"):format(e.k) end
    end
    local plan, da, db_
    -- a table known to be small is not planned (a catalog query less on a for each)
    local small = type(t) == "table" and math.type(t.bytes) == "integer" and t.bytes <= (opts.chunk_bytes or 0)
    if opts.chunk_bytes and not e.error and not small then
      local why
      plan, why = chunks.plan(a_db, { schema = schema, name = name },
        { chunk_bytes = opts.chunk_bytes, split_bytes = opts.chunk_bytes })
      if plan == nil then e.error = why end
      if plan and plan.method == "key" then e.key_plan = plan end
      if plan then
        local derr
        da, derr = chunks.describe(a_db, { schema = schema, name = name })
        if da then db_, derr = chunks.describe(b_db, { schema = schema, name = name }) end
        if not (da and db_) then e.error = derr or "the table could not be described" end
      end
    end
    if not e.error then add_units(e, plan, da, db_) end -- else the check reports the error
  end
  return entries, units
end

-- A side's snapshot, exported by a transaction held open on a session of
-- its own while the workers import it: -> { conn =, id = } | nil, err
local function export_snapshot(conninfo, name)
  local conn, err = pg.connect(conninfo, { name = name, application_name = pg.application_name("qa") })
  if not conn then return nil, err end
  local ok
  ok, err = conn:exec("begin isolation level repeatable read read only")
  local res
  if ok then res, err = conn:exec("select pg_export_snapshot() as id") end
  if not res then conn:close() return nil, err end
  return { conn = conn, id = res[1].id }
end

-- A side's units in `jobs` tasks, split by cost (largest first, each to the
-- least loaded): a process and a session per task cost the client some 10
-- ms and the server a backend's start; a task per unit (or per batch of small
-- ones) made the comparison a third dearer than the scans themselves. A
-- scan (a table too large to read by ranges) is given parallel workers for
-- its share of the side's work, so that one large table does not leave the
-- other jobs idle; the server may launch fewer (max_parallel_workers), then
-- the scan takes longer and the result is the same. In a task, the units
-- under the snapshot first (one transaction), then by cost.
local function side_tasks(units, side, jobs)
  local mine, total = {}, 0
  for _, u in ipairs(units) do
    if not u.side or u.side == side then
      mine[#mine + 1] = u
      total = total + u.cost
    end
  end
  local cost, workers = {}, {}
  for _, u in ipairs(mine) do
    local share = u.scan and total > 0 and math.floor(u.cost / total * jobs + 0.5) or 1
    local processes = math.max(1, math.min(jobs, share))
    cost[u], workers[u] = u.cost / processes, processes - 1
  end
  local bins, bin_of = {}, {}
  for k = 1, math.min(jobs, #mine) do bins[k] = { units = {}, cost = 0 } end
  table.sort(mine, function(x, y) return cost[x] > cost[y] end)
  for _, u in ipairs(mine) do
    local least = bins[1]
    for _, b in ipairs(bins) do if b.cost < least.cost then least = b end end
    least.cost, bin_of[u] = least.cost + cost[u], least
  end
  table.sort(mine, function(x, y)
    if (x.ranged ~= nil) ~= (y.ranged ~= nil) then return x.ranged ~= nil end
    return cost[x] > cost[y]
  end)
  for _, u in ipairs(mine) do
    local b = bin_of[u]
    b.units[#b.units + 1] = { unit = u.id, schema = u.entry.schema, name = u.entry.name, where = u.where,
                              snapshot = u.ranged, workers = u.scan and workers[u] or nil }
    b.ranged = b.ranged or u.ranged
  end
  return bins
end
qa._side_tasks = side_tasks

-- Every unit hashed by `jobs` worker processes on each side at once.
local function hash_in_pool(a_db, b_db, units, method, opts)
  -- units of block ranges: each side's hashed under one snapshot, held no
  -- longer than they are: an open snapshot on a primary holds back what
  -- VACUUM may remove in the whole cluster, and the scans of the largest
  -- tables (which take a snapshot each) come after the ranges
  local snapshots = {}
  for _, u in ipairs(units) do
    if u.ranged and not snapshots[u.side] then
      local s, err = export_snapshot(u.side == "a" and opts.a_conninfo or opts.b_conninfo,
        result_name(u.side == "a" and a_db or b_db, u.side))
      if not s then
        for _, o in pairs(snapshots) do o.conn:close() end
        return nil, err
      end
      s.left = 0
      snapshots[u.side] = s
    end
    if u.ranged then snapshots[u.side].left = snapshots[u.side].left + 1 end
  end
  local function let_go(side)
    local snap = snapshots[side]
    snapshots[side] = nil
    snap.conn:exec("commit")
    snap.conn:close()
  end
  local r = table.pack(pcall(function()
    -- `jobs` processes on each side: each side's largest units first, both
    -- servers busy from the start (one queue ordered by cost alone would
    -- hash most of a before the first of b)
    local p = pool.new{ jobs = 2 * opts.jobs, limits = { a = opts.jobs, b = opts.jobs }, entry = "migrun.qa",
      on_event = function(_, ev)
        if ev.event == "hashed" then
          local u = units[ev.unit]
          if ev.error then
            u.err = u.err or errors.new(ev.error)
          else
            u[ev.side] = { rows = ev.rows, hash = ev.hash }
          end
          -- every task has imported the snapshot before its first range
          local snap = u.ranged and snapshots[u.side]
          if snap then
            snap.left = snap.left - 1
            if snap.left == 0 then let_go(u.side) end
          end
        end
        return true
      end }
    for _, side in ipairs{ { "a", opts.a_conninfo, result_name(a_db, "a") }, { "b", opts.b_conninfo, result_name(b_db, "b") } } do
      for _, b in ipairs(side_tasks(units, side[1], opts.jobs)) do
        p:add{ job = { conninfo = side[2], name = side[3], side = side[1], method = method, units = b.units,
                       application_name = pg.application_name("qa"),
                       snapshot = b.ranged and snapshots[side[1]].id or nil },
               cost = b.cost, group = side[1], label = "hashing " .. b.units[1].schema .. "." .. b.units[1].name }
      end
    end
    local done, failure = p:run()
    if not done then
      return nil, errors.new{ kind = "qa", where = failure.where or ("stream " .. tostring(failure.stream)),
        message = failure.message, detail = failure.detail }
    end
    return true
  end))
  for side in pairs(snapshots) do let_go(side) end
  if not r[1] then error(r[2], 0) end -- Ctrl-C, raised again once the snapshots are let go
  return r[2], r[3]
end

-- Every unit hashed here, one after the other.
local function hash_here(a_db, b_db, units, method)
  for _, u in ipairs(units) do
    local t = { schema = u.entry.schema, name = u.entry.name }
    local function hash(d) return qa.row_hash(d, t, { where = u.where, method = method }) end
    if u.side then
      local r, err = hash(u.side == "a" and a_db or b_db)
      u[u.side], u.err = r, err
    else
      u.a, u.b, u.err = run_both(a_db, b_db, hash)
    end
  end
  return true
end

local function hash_units(a_db, b_db, units, method, opts)
  if #units == 0 then return true end
  if opts.pool then return hash_in_pool(a_db, b_db, units, method, opts) end
  return hash_here(a_db, b_db, units, method)
end

-- The table's rows and hash on each side, added up over its units; the
-- key units that differ (block ranges cannot be paired: a table hashed by
-- them that differs is hashed again by key ranges, e.key_units, to say which
-- differ).
local function totals(e)
  local a, b = { rows = 0 }, { rows = 0 }
  local differing = {}
  for _, u in ipairs(e.key_units or {}) do
    if u.a.rows ~= u.b.rows or u.a.hash ~= u.b.hash then differing[#differing + 1] = u end
  end
  if e.sided then
    a.hash, b.hash, a.chunks, b.chunks = "0", "0", 0, 0
    for _, u in ipairs(e.units) do
      local side = u.side == "a" and a or b
      side.rows, side.hash, side.chunks = side.rows + u[u.side].rows, add_decimal(side.hash, u[u.side].hash),
        side.chunks + 1
    end
    return a, b, differing, a.rows == b.rows and a.hash == b.hash
  end
  local equal = true
  for _, u in ipairs(e.units) do
    a.rows, b.rows = a.rows + u.a.rows, b.rows + u.b.rows
    if u.a.rows ~= u.b.rows or u.a.hash ~= u.b.hash then
      equal = false
      if u.chunk and not e.key_units then differing[#differing + 1] = u end
    end
  end
  if #e.units == 1 then a.hash, b.hash = e.units[1].a.hash, e.units[1].b.hash end
  if #e.units > 1 then a.chunks, b.chunks = #e.units, #e.units end
  return a, b, differing, equal
end

local function unit_error(e)
  local err = e.error
  for _, u in ipairs(e.units) do err = err or u.err end
  for _, u in ipairs(e.key_units or {}) do err = err or u.err end
  return err
end

-- The tables that differ and have an integer key, hashed by block ranges or
-- whole: hashed again by key ranges (both sides), so that the narrowing
-- starts from the ranges that differ.
local function key_units_of_differing(a_db, b_db, entries, method, opts)
  local again = {}
  for _, e in ipairs(entries) do
    if e.key_plan and not unit_error(e) and not (e.units[1] and e.units[1].chunk) then
      local _, _, _, equal = totals(e)
      if not equal then
        e.key_units = {}
        for i = 1, e.key_plan.count do
          local where = chunks.where(e.key_plan, i)
          if e.exclusion then where = "(" .. where .. ") AND " .. e.exclusion end
          local u = { chunk = i, where = where, cost = e.key_plan.bytes / e.key_plan.count, entry = e }
          again[#again + 1] = u
          u.id = #again
          e.key_units[#e.key_units + 1] = u
        end
      end
    end
  end
  return hash_units(a_db, b_db, again, method, opts)
end

-- A table that differs, narrowed to the keys of the rows that differ: in
-- each differing key range, or over the whole table.
local function narrow_entry(a_db, b_db, e, differing, method, opts, check)
  local t = { schema = e.schema, name = e.name }
  local key, err = keydiff.key(a_db, t)
  if key == nil then return nil, err end
  if not key then
    check.detail = check.detail .. " (no primary or unique key: the rows cannot be named)"
    return true
  end
  check.key, check.keys, check.keys_complete = key, {}, true
  local limit = opts.keys_limit or 1000
  local plan = e.key_plan
  local scopes = (plan and #differing > 0) and differing or { { where = e.exclusion } }
  local parts = {}
  for _, u in ipairs(scopes) do
    local found, nerr = keydiff.narrow(a_db, b_db, t, key, { where = u.where, method = method,
      limit = math.max(1, limit - #check.keys) })
    if not found then
      parts[#parts + 1] = "not narrowed: " .. tostring(nerr)
    else
      table.move(found.keys, 1, #found.keys, #check.keys + 1, check.keys)
      check.keys_complete = check.keys_complete and found.complete
      if u.chunk then
        local labels = {}
        for i, d in ipairs(found.keys) do labels[i] = keydiff.label(key, d.key) .. " " .. d.what end
        check.chunks = check.chunks or {}
        check.chunks[#check.chunks + 1] = { chunk = u.chunk, of = plan.count, range = chunks.label(plan, u.chunk),
          a = u.a, b = u.b, keys = labels }
        parts[#parts + 1] = ("chunk %d/%d (%s): %s%s"):format(u.chunk, plan.count, chunks.label(plan, u.chunk),
          table.concat(labels, ", ", 1, math.min(#labels, MAX_KEYS)), #labels > MAX_KEYS and ", ..." or "")
      end
    end
  end
  if plan and #differing > 0 and #parts > 0 then
    check.detail = check.detail .. " in " .. table.concat(parts, "; ")
  elseif #check.keys > 0 then
    check.detail = check.detail .. ": " .. keydiff.describe(key, check.keys,
      { a = opts.a_name, b = opts.b_name, more = not check.keys_complete, show = MAX_KEYS })
  elseif #parts > 0 then
    check.detail = check.detail .. " (" .. table.concat(parts, "; ") .. ")"
  end
  return true
end

-- The check of one table of a full comparison.
local function judge_entry(a_db, b_db, e, method, opts)
  local check = { table = e.k, method = "hash", partition_of = parent_of(e.t), excluded = e.excluded }
  local err = unit_error(e)
  if err then return failed_check(check, err) end
  local a, b, differing, equal = totals(e)
  check.a, check.b, check.equal = a, b, equal
  if a.rows ~= b.rows then
    check.detail = ("%d vs %d rows"):format(a.rows, b.rows)
  elseif not equal then
    check.detail = ("same row count (%d), different contents"):format(a.rows)
  else
    check.detail = a.rows == 0 and "empty on both sides" or ""
  end
  if not equal and opts.narrow ~= false then
    local ok, nerr = narrow_entry(a_db, b_db, e, differing, method, opts, check)
    if not ok then return nil, nerr end
  end
  return check
end

local function full_compare(a_db, b_db, tables, opts, add)
  local method = opts.method
  if not method then
    local err
    method, err = method_for(a_db, b_db)
    if not method then return nil, err end
  end
  local o = setmetatable({ pool = (opts.jobs or 1) > 1 and opts.a_conninfo and opts.b_conninfo and true }, { __index = opts })
  local entries, units = plan_units(a_db, b_db, tables, o)
  local ok, err = hash_units(a_db, b_db, units, method, o)
  if ok and opts.narrow ~= false then ok, err = key_units_of_differing(a_db, b_db, entries, method, o) end
  if not ok then return nil, err end
  for _, e in ipairs(entries) do
    local check, cerr = judge_entry(a_db, b_db, e, method, opts)
    if not check then return nil, cerr end
    add(check)
  end
  return true
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
    function(db) return rowhash.with_stable(db, function() return query_text(db, q.sql) end) end,
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

  local plan = {} -- { {table, kind = "monthly" | "count"} }; full mode: full_compare
  if mode ~= "full" then
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
  if mode == "full" then
    total = #tables
    local named = setmetatable({ a_name = opts.a_name or result.a_name, b_name = opts.b_name or result.b_name },
      { __index = opts })
    local ok, err = full_compare(a_db, b_db, tables, named, add)
    if not ok then return nil, err end
    return result
  end
  local function read_a(p)
    if p.error then return nil, p.error end
    return p.read(a_db)
  end
  for _, p in ipairs(probes) do
    local a, aerr = read_a(p)
    add(finish(p, a, aerr, b_db))
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
-- The rows a check looked at on each side (nil when it does not say).
local function rows_of(v)
  if type(v) == "number" then return v end
  if type(v) ~= "table" then return nil end
  if v.rows then return v.rows end
  local n = 0
  for _, x in pairs(v) do if type(x) == "number" then n = n + x end end
  return n
end

-- "yes" only where rows were compared: zero rows on both sides is "nothing
-- compared" when a filter left every row out (rows newer than a cut-off), else
-- "empty on both" -- never a bare "yes" for a comparison of nothing.
function qa.verdict(c)
  if not c.equal then return "NO" end
  local a, b = rows_of(c.a), rows_of(c.b)
  if a == 0 and b == 0 then
    return c.method:find(" < ", 1, true) and "nothing compared" or "empty on both"
  end
  return "yes"
end

function qa.report_rows(result)
  local rows = {}
  for _, c in ipairs(result.checks) do
    rows[#rows + 1] = { c.table, c.method, summary(c.a), summary(c.b), qa.verdict(c), c.detail or "" }
  end
  return rows
end

return qa
