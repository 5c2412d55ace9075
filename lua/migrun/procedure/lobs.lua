--[[
migrun.lobs: did DMS cut a LOB? In limited LOB mode DMS truncates a value
longer than the task's LobMaxSize and only writes a warning to the task log
("LOBs that exceed the maximum LOB size are truncated, and a warning is issued
to the log file": AWS DMS User Guide, "Setting LOB support for source
databases in an AWS DMS task",
https://docs.aws.amazon.com/dms/latest/userguide/CHAP_Tasks.LOBSupport.html).
So migrun looks in both places, and a single truncated value stops the run:

  * the task logs (CloudWatch Logs: group dms-tasks-<replication instance id>,
    stream dms-task-<task resource id>), for warnings that say "truncated";
  * the LOB columns themselves, source against target: for every LOB column
    DMS may cut (a table in limited LOB mode), the rows whose value is long
    enough to be cut are counted and their octet lengths summed on both sides;
    where the sums differ, the rows are compared one by one by primary key,
    and each one that differs is named (table, column, key, both lengths).

A value "long enough to be cut" is one over the limit for bytea (a BLOB), and
over half of it for the text types (DMS holds them as NCLOB, two bytes per
character, dms-api.md §8).

  local lobs = require "migrun.lobs"
  local cols = lobs.columns(groups, tables, { lob_max_kb = cfg.dms.task.lob_max_kb })
  local r = assert(lobs.check{ source = Db, target = Db, columns = cols,
    dms = client, logs = logs_client, instance_arn = arn, tasks = { [slot] = arn },
    settle = function() ... end })  -- waits until the tasks have applied what the source has
  if #r.truncated > 0 then print(lobs.format(r)) end

lobs.columns(groups, tables, opts) -> { {table = "s.t", schema, name, column,
    bytea, limit_bytes, threshold, pk = {names}, pk_types = {types}} }
    groups: the slot groups (groups.plan); tables: catalog.tables' list (types
    and primary keys). Tables in full LOB mode are left out (DMS never cuts
    them); opts.lob_max_kb is config dms.task.lob_max_kb (it overrides each
    group's LobMaxSize, as cdc.ensure_tasks does).
lobs.compare(source, target, columns, opts) -> { rows = {per column},
    truncated = { {table, column, key, source_bytes, target_bytes} } } | nil, err
    opts.settle(): called once when a difference is found, before comparing
    again (at catch-up the source still writes); opts.max_rows (100) rows
    named per column.
lobs.log_truncations(dms, logs, instance_arn, task_arns, opts) -> { {task,
    message, table, column} } | nil, err   (opts.start_time: ms since the epoch)
lobs.check(opts) -> { columns = n, rows, truncated, log } | nil, err: both.
lobs.format(r) -> text naming every truncated value and log warning.
]]
local pg = require "migrun.pg"
local errors = require "migrun.error"
local text = require "migrun.text"
local json = require "migrun.json"
local builders = require "migrun.dms.builders"

local lobs = {}

lobs.MAX_ROWS = 100
lobs.LOG_FILTER = "truncated"

local function find_table(tables, schema, name)
  for _, t in ipairs(tables) do
    if t.schema == schema and t.name == name then return t end
  end
end

function lobs.columns(groups, tables, opts)
  assert(type(groups) == "table" and type(tables) == "table", "lobs.columns: groups and tables expected")
  opts = opts or {}
  local out = {}
  for _, g in ipairs(groups) do
    local limit_kb = opts.lob_max_kb or builders.lob_max_kb(g)
    for _, gt in ipairs(g.tables) do
      local t = find_table(tables, gt.schema, gt.name)
      if t and not builders.full_lob_mode(gt) then
        local types = {}
        for _, c in ipairs(t.columns or {}) do types[c.name] = c.type end
        local pk_types = {}
        for i, k in ipairs(t.pk_columns or {}) do pk_types[i] = types[k] or "text" end
        for _, c in ipairs(t.lob_columns or {}) do
          local bytea = c.bytea or c.type == "bytea"
          local limit = limit_kb * 1024
          out[#out + 1] = { table = text.key(t), schema = t.schema, name = t.name, column = c.name,
            bytea = bytea, limit_bytes = limit, threshold = bytea and limit or limit // 2,
            pk = t.pk_columns or {}, pk_types = pk_types }
        end
      end
    end
  end
  return out
end

local function length_expr(c)
  local col = pg.quote_ident(c.column)
  return c.bytea and ("octet_length(%s)"):format(col) or ("octet_length(%s::text)"):format(col)
end

-- Count, sum and max of the lengths over the threshold of every column of one
-- table, on one side, in one scan: { [column] = {n, s, m} }.
local function totals(db, cols)
  local exprs = {}
  for i, c in ipairs(cols) do
    local len = length_expr(c)
    local over = ("%s > %d"):format(len, c.threshold)
    exprs[#exprs + 1] = ("count(*) filter (where %s)::bigint as n%d, coalesce(sum(%s) filter (where %s), 0)::bigint "
      .. "as s%d, coalesce(max(%s) filter (where %s), 0)::bigint as m%d"):format(over, i, len, over, i, len, over, i)
  end
  local res, err = db:query(("select %s from %s"):format(table.concat(exprs, ", "),
    pg.qualify(cols[1].schema, cols[1].name)))
  if not res then return nil, err end
  local out = {}
  for i, c in ipairs(cols) do
    local r = res[1]
    out[c.column] = { n = r["n" .. i], s = r["s" .. i], m = r["m" .. i] }
  end
  return out
end

local function key_text(c, row)
  local parts = {}
  for i, k in ipairs(c.pk) do parts[i] = ("%s=%s"):format(k, tostring(row["k" .. i])) end
  return table.concat(parts, ", ")
end

-- The rows over the threshold on the source whose length differs on the target.
local function differing_rows(source, target, c, max_rows)
  if #c.pk == 0 then return {}, "no primary key: rows cannot be named" end
  local len = length_expr(c)
  local keys = {}
  for i, k in ipairs(c.pk) do keys[i] = ("%s::text as k%d"):format(pg.quote_ident(k), i) end
  local order = {}
  for i, k in ipairs(c.pk) do order[i] = pg.quote_ident(k) end
  local src, err = source:query(("select %s, %s::bigint as len from %s where %s > $1 order by %s"):format(
    table.concat(keys, ", "), len, pg.qualify(c.schema, c.name), len, table.concat(order, ", ")), c.threshold)
  if not src then return nil, err end
  local out = {}
  -- in slices, so that a large table sends bounded key lists
  local slice = 1000
  for from = 1, #src, slice do
    local arrays, params, cols, sel = {}, {}, {}, {}
    for i = 1, #c.pk do arrays[i] = {} end
    for r = from, math.min(#src, from + slice - 1) do
      for i = 1, #c.pk do arrays[i][#arrays[i] + 1] = src[r]["k" .. i] end
    end
    for i = 1, #c.pk do
      params[i] = json.encode(json.array(arrays[i]))
      cols[i] = "x" .. i
      sel[i] = ("x%d::%s"):format(i, c.pk_types[i])
    end
    local args = {}
    for i = 1, #c.pk do args[i] = ("array(select json_array_elements_text($%d::json))"):format(i) end
    local tres, terr = target:query(("select %s, %s::bigint as len from %s where (%s) in "
      .. "(select %s from unnest(%s) as u(%s))"):format(table.concat(keys, ", "), len,
      pg.qualify(c.schema, c.name), table.concat(order, ", "), table.concat(sel, ", "),
      table.concat(args, ", "), table.concat(cols, ", ")), table.unpack(params))
    if not tres then return nil, terr end
    local on_target = {}
    for r in tres:rows() do on_target[key_text(c, r)] = r.len end
    for r = from, math.min(#src, from + slice - 1) do
      local key = key_text(c, src[r])
      local tl = on_target[key]
      if tl ~= src[r].len then
        out[#out + 1] = { table = c.table, column = c.column, key = key, source_bytes = src[r].len,
          target_bytes = tl }
        if #out >= max_rows then return out end
      end
    end
  end
  return out
end

function lobs.compare(source, target, columns, opts)
  assert(source and source.query and target and target.query, "lobs.compare: source and target Dbs expected")
  opts = opts or {}
  local max_rows = opts.max_rows or lobs.MAX_ROWS
  local out = { rows = {}, truncated = {} }
  -- the columns by table, in the order given
  local by_table, order = {}, {}
  for _, c in ipairs(columns) do
    if not by_table[c.table] then by_table[c.table] = {}; order[#order + 1] = c.table end
    table.insert(by_table[c.table], c)
  end
  local function measure()
    local rows, differ = {}, {}
    for _, key in ipairs(order) do
      local cols = by_table[key]
      local sa, err = totals(source, cols)
      if not sa then return nil, err end
      local sb
      sb, err = totals(target, cols)
      if not sb then return nil, err end
      for _, c in ipairs(cols) do
        local a, b = sa[c.column], sb[c.column]
        local row = { table = c.table, column = c.column, limit = text.bytes(c.limit_bytes),
          source_rows = a.n, source_bytes = a.s, target_rows = b.n, target_bytes = b.s,
          source_max = a.m, target_max = b.m, same = a.n == b.n and a.s == b.s and a.m == b.m }
        rows[#rows + 1] = row
        if not row.same then differ[#differ + 1] = c end
      end
    end
    return rows, differ
  end
  local rows, differ = measure()
  if not rows then return nil, differ end
  if #differ > 0 and opts.settle then
    local ok, err = opts.settle()
    if ok == nil and err then return nil, err end
    rows, differ = measure()
    if not rows then return nil, differ end
  end
  out.rows = rows
  for _, c in ipairs(differ) do
    local named, why = differing_rows(source, target, c, max_rows)
    if not named then return nil, why end
    if #named == 0 then
      -- the totals differ but no row over the threshold does: a row is missing
      -- or extra on one side, or (no primary key) rows cannot be named
      named = { { table = c.table, column = c.column, key = why or "(rows over the threshold differ in number)",
        source_bytes = nil, target_bytes = nil } }
    end
    for _, n in ipairs(named) do out.truncated[#out.truncated + 1] = n end
  end
  return out
end

function lobs.log_truncations(dms, logs, instance_arn, task_arns, opts)
  opts = opts or {}
  local inst, err = dms:describe_replication_instances{ Filters = { ["replication-instance-arn"] = instance_arn } }
  if not inst then return nil, err end
  if not inst[1] then
    return nil, errors.new{ kind = "dms", where = "lob check", message = "replication instance "
      .. tostring(instance_arn) .. " not found", hint = "check dms.replication_instance_arn" }
  end
  local group = "dms-tasks-" .. inst[1].ReplicationInstanceIdentifier
  local streams, by_stream = {}, {}
  for _, arn in ipairs(task_arns) do
    local s = "dms-task-" .. tostring(arn):match("([^:]+)$")
    streams[#streams + 1] = s
    by_stream[s] = arn
  end
  local out = {}
  for from = 1, #streams, 100 do -- FilterLogEvents takes at most 100 stream names
    local names = {}
    for i = from, math.min(#streams, from + 99) do names[#names + 1] = streams[i] end
    local events, ferr = logs:filter_log_events{ logGroupName = group, logStreamNames = names,
      filterPattern = lobs.LOG_FILTER, startTime = opts.start_time }
    if not events then
      ferr.hint = ferr.hint or ("migrun reads the tasks' CloudWatch logs (%s) for LOB truncation warnings: "
        .. "grant logs:FilterLogEvents, and keep Logging.EnableLogging on"):format(group)
      return nil, ferr
    end
    for _, e in ipairs(events) do
      local msg = tostring(e.message)
      local column, tbl = msg:match("column '([^']*)' in table '([^']*)'")
      out[#out + 1] = { task = by_stream[e.logStreamName] or e.logStreamName, message = msg,
        table = tbl, column = column }
    end
  end
  return out
end

function lobs.check(opts)
  assert(type(opts) == "table", "lobs.check: options expected")
  local out = { columns = #opts.columns }
  local arns, slots = {}, {}
  for slot in pairs(opts.tasks or {}) do slots[#slots + 1] = slot end
  table.sort(slots)
  for _, slot in ipairs(slots) do
    local arn = opts.tasks[slot]
    if type(arn) == "string" and arn:match("^arn:") then arns[#arns + 1] = arn end
  end
  local log, err = lobs.log_truncations(opts.dms, opts.logs, opts.instance_arn, arns, opts)
  if not log then return nil, err end
  local cmp
  cmp, err = lobs.compare(opts.source, opts.target, opts.columns, opts)
  if not cmp then return nil, err end
  out.log, out.rows, out.truncated = log, cmp.rows, cmp.truncated
  return out
end

-- Rows for a printed table of the comparison.
function lobs.report_rows(r)
  local rows = {}
  for _, x in ipairs(r.rows) do
    rows[#rows + 1] = { x.table, x.column, x.limit, tostring(x.source_rows), text.bytes(x.source_bytes),
      tostring(x.target_rows), text.bytes(x.target_bytes), x.same and "same" or "DIFFERENT" }
  end
  return { "table", "column", "LOB limit", "long values (source)", "their bytes (source)",
    "long values (target)", "their bytes (target)", "" }, rows
end

function lobs.format(r)
  local lines = {}
  for _, t in ipairs(r.truncated) do
    lines[#lines + 1] = ("  %s.%s %s: %s on the source, %s on the target"):format(t.table, t.column, t.key,
      t.source_bytes and (tostring(t.source_bytes) .. " bytes") or "?",
      t.target_bytes and (tostring(t.target_bytes) .. " bytes") or "no such row")
  end
  for _, l in ipairs(r.log) do
    lines[#lines + 1] = ("  task log %s: %s"):format(tostring(l.task):match("([^:]+)$"), l.message)
  end
  return table.concat(lines, "\n")
end

return lobs
