--[[
migrun.restart: the library part of the runbook's "Managing Restarts" — what
playbooks/partial_restart.lua and playbooks/full_restart.lua do besides
calling the Phase I and II modules again: keep the failure state for the
report, tell migrun's slots from others, take a migration's DMS objects and
pglogical objects down, empty the target, replace one task at a new start
position, and set a finished attempt's journal aside.

  local restart = require "migrun.restart"
  local state = assert(restart.preserve_failure(client, groups, tasks,
    { name =, source = Db, target = Db, prefix =, control_schema = "public" }))
  for _, t in ipairs(restart.report_tables(state)) do ctx:report_table(t.title, t.columns, t.rows) end
  local g = assert(restart.group_of(plan, slot, source_db, prefix))   -- refuses a slot not migrun's
  assert(restart.truncate(target_db, g.tables))
  local r = assert(restart.replace_task(client, g, { name=, old_arn=, instance_arn=, start_lsn=,
    task=, source=, target=, source_overrides=, target_overrides= }))   -- { arn=, deleted=, endpoints= }
  local down = assert(restart.teardown_dms(client, plan, { name = }))   -- { tasks = {...}, endpoints = {...} }
  local gone = assert(restart.teardown_source(source_db, plan, node))   -- { slots =, sets =, node =, fence = }
  assert(restart.empty_target(target_db, tables, { how = "truncate" | "drop_schema", schemas = }))  -- fence too

Every function that changes a server writes through Db:write or the DMS
client, so a dry run shows each change and makes none. Failures of the world
return nil, err (migrun.error); misuse raises.
]]
local pg = require "migrun.pg"
local errors = require "migrun.error"
local cdc = require "migrun.cdc"
local pglogical = require "migrun.pglogical"
local fence = require "migrun.fence"
local sentinel = require "migrun.sentinel"
local text = require "migrun.text"

local restart = {}


local function qualified(t)
  return pg.qualify(text.split_key(t))
end

local function short(s, n)
  s = tostring(s or "")
  if #s > n then return s:sub(1, n - 3) .. "..." end
  return s
end

local function when(epoch)
  if type(epoch) ~= "number" then return epoch and tostring(epoch) or nil end
  return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(epoch))
end

---------------------------------------------------------------------------
-- The failure state
---------------------------------------------------------------------------

local EXCEPTIONS_KEPT = 50

-- The apply exceptions of one task: { count =, rows = {{table, error_time, error, statement}} }
local function apply_exceptions(target, schema, task_id)
  local res, err = target:query("select to_regclass($1) is not null as present",
    pg.quote_ident(schema) .. ".awsdms_apply_exceptions")
  if not res then return nil, err end
  if not res[1].present then return { count = 0, rows = {} } end
  local tbl = pg.quote_ident(schema) .. ".awsdms_apply_exceptions"
  res, err = target:query(('select count(*) as n from %s where "TASK_NAME" = $1'):format(tbl), task_id)
  if not res then return nil, err end
  local out = { count = res[1].n, rows = {} }
  res, err = target:query(('select "TABLE_OWNER" as s, "TABLE_NAME" as t, "ERROR_TIME"::text as at,'
    .. ' "ERROR" as error, "STATEMENT" as statement from %s where "TASK_NAME" = $1'
    .. ' order by "ERROR_TIME" desc limit %d'):format(tbl, EXCEPTIONS_KEPT), task_id)
  if not res then return nil, err end
  for r in res:rows() do
    out.rows[#out.rows + 1] = { table = r.s .. "." .. r.t, error_time = r.at,
      error = short(r.error, 300), statement = short(r.statement, 300) }
  end
  return out
end

--[[ restart.preserve_failure(client, groups, tasks, opts) -> state | nil, err
     What DMS and the servers say now, before anything is stopped or dropped:
     per group the task (found by its ARN in tasks[slot], else by its
     identifier): status, LastFailureMessage, StopReason, start date, the
     table statistics, the apply exceptions on the target (count, the newest
     50); and the slots' positions on the primary. opts: name (the
     migration), source, target (Dbs), prefix (slot prefix), control_schema.
     state = { tasks = { {slot, task, arn, status, failure, stop_reason,
     started, stats = {{table, inserts, updates, deletes, ddls, state}},
     exceptions = {count, rows}} }, slots = { {name, active, restart_lsn,
     confirmed_flush_lsn, retained_bytes} } } — plain values, fit for the journal. ]]
function restart.preserve_failure(client, groups, tasks, opts)
  assert(type(groups) == "table", "restart.preserve_failure: a list of groups expected")
  assert(opts and opts.name and opts.source and opts.target, "restart.preserve_failure: name, source, target expected")
  tasks = tasks or {}
  local state = { tasks = {}, slots = {} }
  for _, g in ipairs(groups) do
    local id = cdc.task_id(opts.name, g)
    local task, err
    if tasks[g.slot] then
      task, err = client:describe_task(tasks[g.slot])
      if err then return nil, err end
    end
    if not task then
      task, err = cdc.find_task(client, id)
      if task == nil then return nil, err end
    end
    local row = { slot = g.slot, task = id, status = "absent" }
    if task then
      row.arn = task.ReplicationTaskArn
      row.status = tostring(task.Status)
      row.failure = task.LastFailureMessage
      row.stop_reason = task.StopReason
      row.started = when(task.ReplicationTaskStartDate)
      row.stats = {}
      local stats, serr = client:describe_table_statistics(task.ReplicationTaskArn)
      if stats then
        for _, s in ipairs(stats) do
          -- migrun's fence is in every task's mappings: not a migrated table
          if not fence.is_fence(s.SchemaName, s.TableName) then
            row.stats[#row.stats + 1] = { table = s.SchemaName .. "." .. s.TableName, inserts = s.Inserts,
              updates = s.Updates, deletes = s.Deletes, ddls = s.Ddls, state = s.TableState }
          end
        end
      else
        row.stats_error = tostring(serr)
      end
    end
    local exc
    exc, err = apply_exceptions(opts.target, opts.control_schema or "public", id)
    if not exc then return nil, err end
    row.exceptions = exc
    state.tasks[#state.tasks + 1] = row
  end
  local wanted = {}
  for _, g in ipairs(groups) do wanted[g.slot] = true end
  local list, err = pglogical.slots(opts.source, { prefix = opts.prefix })
  if not list then return nil, err end
  for _, s in ipairs(list) do
    if wanted[s.name] then
      state.slots[#state.slots + 1] = { name = s.name, active = s.active,
        restart_lsn = s.restart_lsn and tostring(s.restart_lsn),
        confirmed_flush_lsn = s.confirmed_flush_lsn and tostring(s.confirmed_flush_lsn),
        retained_bytes = s.retained_bytes }
    end
  end
  return state
end

-- restart.report_tables(state) -> { {title, columns, rows} } for ctx:report_table
function restart.report_tables(state)
  local tasks, stats, exc, slots = {}, {}, {}, {}
  for _, t in ipairs(state.tasks) do
    tasks[#tasks + 1] = { t.slot, t.task, t.status, t.failure or "-", t.stop_reason or "-", t.started or "-",
      tostring(t.exceptions and t.exceptions.count or 0) }
    for _, s in ipairs(t.stats or {}) do
      stats[#stats + 1] = { t.slot, s.table, tostring(s.inserts), tostring(s.updates), tostring(s.deletes),
        tostring(s.ddls), tostring(s.state) }
    end
    for _, e in ipairs(t.exceptions and t.exceptions.rows or {}) do
      exc[#exc + 1] = { t.slot, e.table, e.error_time, e.error, e.statement }
    end
  end
  for _, s in ipairs(state.slots) do
    slots[#slots + 1] = { s.name, tostring(s.active), s.restart_lsn or "-", s.confirmed_flush_lsn or "-",
      text.bytes(s.retained_bytes) }
  end
  return {
    { title = "Failure state: tasks", columns = { "slot", "task", "status", "last failure", "stop reason",
      "started", "apply exceptions" }, rows = tasks },
    { title = "Failure state: table statistics", columns = { "slot", "table", "inserts", "updates",
      "deletes", "ddls", "state" }, rows = stats },
    { title = "Failure state: apply exceptions (newest)", columns = { "slot", "table", "time", "error",
      "statement" }, rows = exc },
    { title = "Failure state: slots", columns = { "slot", "active", "restart LSN", "confirmed flush",
      "WAL retained" }, rows = slots },
  }
end

---------------------------------------------------------------------------
-- Which slot
---------------------------------------------------------------------------

--[[ restart.group_of(plan, slot, source_db, prefix) -> group | nil, err
     The group of a slot of this migration: named in full.lua's plan, with
     the configured prefix, and on the primary (when it still exists) a
     pglogical slot of this database. Anything else is refused (kind
     "refused"): migrun never touches a slot it did not create. ]]
function restart.group_of(plan, slot, source_db, prefix)
  assert(type(slot) == "string", "restart.group_of: a slot name expected")
  local names = {}
  local found
  for _, g in ipairs(plan or {}) do
    names[#names + 1] = g.slot
    if g.slot == slot then found = g end
  end
  local function refuse(message, hint)
    return nil, errors.new{ kind = "refused", where = "slot " .. slot, message = message, hint = hint }
  end
  if not found or slot:sub(1, #prefix) ~= prefix then
    return refuse(("%s is not a slot of this migration (its slots: %s); nothing was changed"):format(slot,
      #names > 0 and table.concat(names, ", ") or "none yet"),
      "give one of the migration's slots; migrun never touches a slot it did not create")
  end
  local list, err = pglogical.slots(source_db, { prefix = prefix })
  if not list then return nil, err end
  for _, s in ipairs(list) do
    if s.name == slot and not s.owned then
      return refuse(("%s exists on the primary with plugin %s, not as migrun's pglogical slot; nothing was changed")
        :format(slot, tostring(s.plugin or s.slot_type)), "look at who created it before anything else")
    end
  end
  return found
end

---------------------------------------------------------------------------
-- The target
---------------------------------------------------------------------------

-- restart.truncate(db, tables) -> "truncated" | nil, err   (one statement; no CASCADE)
function restart.truncate(db, tables)
  assert(type(tables) == "table", "restart.truncate: a list of tables expected")
  if #tables == 0 then return "nothing" end
  local names = {}
  for i, t in ipairs(tables) do names[i] = qualified(t) end
  local ok, err = db:write("TRUNCATE " .. table.concat(names, ", "))
  if not ok then return nil, err end
  return "truncated"
end

--[[ restart.empty_target(db, tables, opts) -> { how =, tables = n, schemas = {...} } | nil, err
     opts.how "truncate" (default): the tables that exist on the target, and
     the DMS control tables of opts.control_schema ("public"), are
     truncated; the schema (tables, indexes, roles) stays. "drop_schema":
     each of opts.schemas (default: the tables' schemas) is dropped with
     CASCADE, and public is created again with its owner (pg_dump never
     creates public; the other schemas come back with the pre-data restore).
     Either way migrun's fence table and its sentinel (migrun.sentinel) are
     dropped (result.fence): full.lua creates them again. ]]
function restart.empty_target(db, tables, opts)
  opts = opts or {}
  local how = opts.how or "truncate"
  assert(how == "truncate" or how == "drop_schema", "restart.empty_target: how must be truncate or drop_schema")
  -- migrun's sentinel first: the truncate below is not a write to note
  local gone, serr = sentinel.remove(db)
  if not gone then return nil, serr end
  if how == "truncate" then
    local present = {}
    local control = opts.control_schema or "public"
    local candidates = {}
    for _, t in ipairs(tables) do candidates[#candidates + 1] = qualified(t) end
    for _, c in ipairs{ "awsdms_apply_exceptions", "awsdms_status" } do
      candidates[#candidates + 1] = pg.quote_ident(control) .. "." .. pg.quote_ident(c)
    end
    for _, name in ipairs(candidates) do
      local res, err = db:query("select to_regclass($1) is not null as present", name)
      if not res then return nil, err end
      if res[1].present then present[#present + 1] = name end
    end
    if #present > 0 then
      local ok, err = db:write("TRUNCATE " .. table.concat(present, ", "))
      if not ok then return nil, err end
    end
    local dropped, ferr = fence.drop(db)
    if not dropped then return nil, ferr end
    return { how = how, tables = #present, fence = dropped }
  end
  local schemas, seen = {}, {}
  for _, s in ipairs(opts.schemas or {}) do
    if not seen[s] then seen[s], schemas[#schemas + 1] = true, s end
  end
  if #schemas == 0 then
    for _, t in ipairs(tables) do
      local s = type(t) == "string" and t:match("^(.-)%.") or t.schema
      if not seen[s] then seen[s], schemas[#schemas + 1] = true, s end
    end
  end
  for _, s in ipairs(schemas) do
    local res, err = db:query("select pg_get_userbyid(nspowner) as owner from pg_namespace where nspname = $1", s)
    if not res then return nil, err end
    if res[1] then
      local ok, werr = db:write("DROP SCHEMA " .. pg.quote_ident(s) .. " CASCADE")
      if not ok then return nil, werr end
      if s == "public" then
        ok, werr = db:write(("CREATE SCHEMA public AUTHORIZATION %s"):format(pg.quote_ident(res[1].owner)))
        if not ok then return nil, werr end
      end
    end
  end
  local dropped, ferr = fence.drop(db)
  if not dropped then return nil, ferr end
  return { how = how, schemas = schemas, fence = dropped }
end

---------------------------------------------------------------------------
-- DMS
---------------------------------------------------------------------------

--[[ restart.replace_task(client, group, opts) -> { arn =, deleted = "deleted" | "absent" | "kept",
     endpoints = } | nil, err
     A DMS task cannot move its start position: the group's task of ARN
     opts.old_arn is stopped if it runs, deleted and waited for until gone;
     then a task of the same identifier is created at opts.start_lsn, on the
     group's source endpoint (reused when it exists: the slot name in it did
     not change) and the target endpoint. A task of that identifier with
     another ARN is one a killed earlier attempt created: it is kept.
     opts: name, old_arn, instance_arn, start_lsn, task (config.dms.task),
     source, target (conninfo), source_overrides, target_overrides. ]]
function restart.replace_task(client, group, opts)
  assert(opts and opts.name and opts.start_lsn, "restart.replace_task: name and start_lsn expected")
  local id = cdc.task_id(opts.name, group)
  local existing, err = cdc.find_task(client, id)
  if existing == nil then return nil, err end
  local deleted = "absent"
  if existing then
    if opts.old_arn == nil or existing.ReplicationTaskArn == opts.old_arn then
      deleted, err = cdc.delete_task(client, existing.ReplicationTaskArn)
      if not deleted then return nil, err end
    else
      deleted = "kept"
    end
  end
  local eps
  eps, err = cdc.ensure_endpoints(client, { group }, { name = opts.name, source = opts.source,
    target = opts.target, source_overrides = opts.source_overrides, target_overrides = opts.target_overrides })
  if not eps then return nil, err end
  local ok
  ok, err = cdc.test_connections(client, opts.instance_arn, eps)
  if not ok then return nil, err end
  local tasks
  tasks, err = cdc.ensure_tasks(client, { group }, eps, { name = opts.name, instance_arn = opts.instance_arn,
    start_lsn = opts.start_lsn, task = opts.task })
  if not tasks then return nil, err end
  return { arn = tasks[group.slot], deleted = deleted, endpoints = eps }
end

--[[ restart.teardown_dms(client, plan, opts) -> { tasks = {[id] = result}, endpoints = {[id] = result} } | nil, err
     Every task of the migration (by cdc.task_id) stopped and deleted, then
     every source endpoint and the target endpoint, each waited for. ]]
function restart.teardown_dms(client, plan, opts)
  assert(opts and opts.name, "restart.teardown_dms: name expected")
  local out = { tasks = {}, endpoints = {} }
  for _, g in ipairs(plan) do
    local id = cdc.task_id(opts.name, g)
    local task, err = cdc.find_task(client, id)
    if task == nil then return nil, err end
    if task then
      local r
      r, err = cdc.delete_task(client, task.ReplicationTaskArn, opts)
      if not r then return nil, err end
      out.tasks[id] = r
    else
      out.tasks[id] = "absent"
    end
  end
  local ids = {}
  for _, g in ipairs(plan) do ids[#ids + 1] = cdc.source_endpoint_id(opts.name, g) end
  ids[#ids + 1] = cdc.target_endpoint_id(opts.name)
  for _, id in ipairs(ids) do
    local r, err = cdc.delete_endpoint(client, id, opts)
    if not r then return nil, err end
    out.endpoints[id] = r
  end
  return out
end

--[[ restart.teardown_source(db, plan, node, { watch_slot = name }) -> { slots = {[slot] = result},
     sets = n, node = result, fence = result, watch = result } | nil, err
     The watch slot (migrun.watch: what the live verification follows),
     the groups' replication sets and slots, then the pglogical node, then
     migrun's fence table (full.lua's slots step creates it again). ]]
function restart.teardown_source(db, plan, node, opts)
  local out = { slots = {}, sets = 0 }
  if opts and opts.watch_slot then
    local w, err = pglogical.drop_slot(db, opts.watch_slot)
    if not w then return nil, err end
    out.watch = w
  end
  for _, g in ipairs(plan) do
    local n, err = pglogical.drop_sets(db, g.slot)
    if not n then return nil, err end
    out.sets = out.sets + n
    local r
    r, err = pglogical.drop_slot(db, g.slot)
    if not r then return nil, err end
    out.slots[g.slot] = r
  end
  local r, err = pglogical.drop_node(db, node)
  if not r then return nil, err end
  out.node = r
  r, err = fence.drop(db)
  if not r then return nil, err end
  out.fence = r
  return out
end

return restart
