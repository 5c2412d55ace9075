--[[
migrun.cdc: Phase II of the runbook on AWS DMS: one source endpoint per slot
group and one target endpoint, their connection tests, one CDC-only task per
group starting at the LSN captured on the paused replica, the starts (one at a
time, a pause between them), and the watch until every task has caught up.

Everything is idempotent and found by name, so a run killed at any point and
started again reuses what exists instead of creating duplicates: endpoints and
tasks carry identifiers derived from the migration's name and the slot
("app-dms-slot-01-source", "app-target", "app-dms-slot-01-cdc").

  local cdc = require "migrun.cdc"
  local eps = assert(cdc.ensure_endpoints(client, groups, { name=, source=conninfo, target=conninfo,
                                                            source_overrides=, target_overrides= }))
  assert(cdc.test_connections(client, instance_arn, eps, { timeout = 300 }))
  local tasks = assert(cdc.ensure_tasks(client, groups, eps, { name=, instance_arn=, start_lsn=, task= }))
  assert(cdc.start_tasks(client, groups, tasks, { pause = 5, sleep = fn, say = fn }))
  local st = assert(cdc.status(client, groups, tasks, { source = Db, target = Db, control_schema = }))
  local st = assert(cdc.watch(client, groups, tasks, { source =, target =, lag_bytes =, ... }))
  local w = assert(cdc.wait_applied(source, target, { "dms_slot_01", ... }, { timeout =, sleep = }))
  cdc.exceptions_message(st) -> the apply exceptions in words, with what to do (or nil)
  cdc.find_task(client, id), cdc.stop_task(client, arn), cdc.delete_task(client, arn),
  cdc.delete_endpoint(client, id): what a restart takes down (see each below).

Endpoint settings are what libpq resolved when migrun logged in (conninfo,
PG* variables, passfile); passwords travel only in the CreateEndpoint body,
which the DMS client masks in its log.
]]
local pg = require "migrun.pg"
local host = require "migrun.host"
local errors = require "migrun.error"
local builders = require "migrun.dms.builders"
local text = require "migrun.text"
local fence = require "migrun.fence"

local cdc = {}

---------------------------------------------------------------------------
-- Endpoint connection settings from a conninfo
---------------------------------------------------------------------------

--[[ cdc.endpoint_settings(conninfo, overrides) -> { host, port, dbname,
     user, password, ssl_mode } | nil, err
     What libpq itself resolved for that conninfo (its defaults, PG*
     variables and passfile, by its own rules): a short connection is made and
     asked (PQhost, PQport, PQdb, PQuser, PQpass), so DMS logs in exactly as
     migrun does. The error never holds the password. ]]
function cdc.endpoint_settings(conninfo, overrides)
  local p, err = pg.conninfo_parse(conninfo)
  if not p then return nil, err end
  local conn
  conn, err = pg.connect(conninfo, { name = "endpoint check" })
  if not conn then return nil, err end
  local info = conn:info()
  local s = { host = info.host, port = tonumber(info.port), dbname = info.dbname, user = info.user,
              password = conn:password(), ssl_mode = p.sslmode }
  conn:close()
  for k, v in pairs(overrides or {}) do s[k] = v end
  if s.host:sub(1, 1) == "/" then
    return nil, errors.new{ kind = "config", where = "dms endpoint",
      message = ("host %s is a Unix socket directory; DMS connects over TCP"):format(s.host),
      hint = "give the server's address as host= in the conninfo, or dms.*_endpoint.host" }
  end
  return s
end

---------------------------------------------------------------------------
-- Names
---------------------------------------------------------------------------

function cdc.source_endpoint_id(name, group) return builders.identifier(name, group.slot, "source") end
function cdc.target_endpoint_id(name) return builders.identifier(name, "target") end
function cdc.task_id(name, group) return builders.identifier(name, group.slot, "cdc") end

---------------------------------------------------------------------------
-- Endpoints
---------------------------------------------------------------------------

local function find_endpoint(client, id)
  local list, err = client:describe_endpoints{ Filters = { ["endpoint-id"] = id } }
  if not list then return nil, err end
  return list[1] or false
end

-- A resource found by identifier is this migration's unless its
-- migrun:migration tag names another one (identifiers derive from names, so
-- two migrations can meet on one: "app" + slot "dms_slot_01" and "app-dms" +
-- slot "slot_01"). An untagged one (made before migrun tagged) is reused.
local function owned(client, arn, id, name)
  if not name then return true end
  local tags, err = client:list_tags({ arn })
  if not tags then return nil, err end
  local owner = (tags[arn] or {})[builders.MIGRATION_TAG]
  if owner ~= nil and owner ~= name then
    return nil, errors.new{ kind = "config", where = "dms " .. id, code = "NotThisMigration",
      message = ("%s exists but belongs to migration %q (tag %s), not %q: nothing was changed")
        :format(id, owner, builders.MIGRATION_TAG, name),
      hint = "give this migration another name (config name), or delete what the other one left" }
  end
  return true
end

local function ensure_endpoint(client, params, name)
  local found, err = find_endpoint(client, params.EndpointIdentifier)
  if found == nil then return nil, err end
  if found then
    local ok, oerr = owned(client, found.EndpointArn, params.EndpointIdentifier, name)
    if not ok then return nil, oerr end
    return found.EndpointArn, "reused"
  end
  local ep, cerr = client:create_endpoint(params)
  if not ep then return nil, cerr end
  if ep.dry_run then return "arn:dry-run:endpoint:" .. params.EndpointIdentifier, "created" end
  return ep.EndpointArn, "created"
end

--[[ cdc.ensure_endpoints(client, groups, opts) -> { target = arn, source = { [slot] = arn },
     created = {ids}, reused = {ids} } | nil, err
     opts: name, source (conninfo of the primary), target (conninfo),
     source_overrides, target_overrides (endpoint_settings overrides). ]]
function cdc.ensure_endpoints(client, groups, opts)
  local src, err = cdc.endpoint_settings(opts.source, opts.source_overrides)
  if not src then return nil, err end
  local tgt
  tgt, err = cdc.endpoint_settings(opts.target, opts.target_overrides)
  if not tgt then return nil, err end
  local out = { source = {}, created = {}, reused = {} }
  local function note(id, how) table.insert(how == "created" and out.created or out.reused, id) end

  local tags = opts.name and { [builders.MIGRATION_TAG] = opts.name } or nil
  tgt.identifier = cdc.target_endpoint_id(opts.name)
  tgt.tags = tags
  local arn, how = ensure_endpoint(client, builders.target_endpoint(tgt), opts.name)
  if not arn then return nil, how end
  out.target = arn
  note(tgt.identifier, how)
  for _, g in ipairs(groups) do
    local conn = {}
    for k, v in pairs(src) do conn[k] = v end
    conn.identifier = cdc.source_endpoint_id(opts.name, g)
    conn.tags = tags
    arn, how = ensure_endpoint(client, builders.source_endpoint(g, conn), opts.name)
    if not arn then return nil, how end
    out.source[g.slot] = arn
    note(conn.identifier, how)
  end
  return out
end

-- Every endpoint tested from the replication instance; the first failure is returned.
local function testing(client, instance_arn, arn)
  local list = client:describe_connections{ Filters = { ["endpoint-arn"] = arn,
    ["replication-instance-arn"] = instance_arn } }
  return list and list[1] and tostring(list[1].Status):lower() == "testing"
end

function cdc.test_connections(client, instance_arn, endpoints, opts)
  opts = opts or {}
  local arns = { endpoints.target }
  local slots = {}
  for slot in pairs(endpoints.source) do slots[#slots + 1] = slot end
  table.sort(slots)
  for _, slot in ipairs(slots) do arns[#arns + 1] = endpoints.source[slot] end
  for _, arn in ipairs(arns) do
    local ok, err = client:test_connection(instance_arn, arn)
    -- a test an interrupted run started still runs (DMS refuses a second
    -- one): waiting for it below is what this run would do anyway
    if not ok and not (err and err.code == "InvalidResourceStateFault" and testing(client, instance_arn, arn)) then
      return nil, err
    end
  end
  if client.dry_run then return true end
  for _, arn in ipairs(arns) do
    local ok, err = client:wait_for_connection(instance_arn, arn, opts.timeout or 300, opts.poll or 2)
    if not ok then return nil, err end
  end
  return true
end

---------------------------------------------------------------------------
-- Tasks
---------------------------------------------------------------------------

local function find_task(client, id)
  local list, err = client:describe_replication_tasks{ Filters = { ["replication-task-id"] = id } }
  if not list then return nil, err end
  return list[1] or false
end

--[[ cdc.ensure_tasks(client, groups, endpoints, opts) -> { [slot] = arn, created = {ids},
     reused = {ids} } | nil, err
     opts: name, instance_arn, start_lsn (migrun.lsn or text), task = config.dms.task
     ({ batch_apply =, lob_max_kb =, control_schema = }), ready_timeout.
     A task that exists is reused as it is: DMS cannot move a task's start
     position, and a task already running must not be disturbed. Every task's
     table mappings select migrun.fence too (migrun.fence: how waits end). A
     task of another migration (its migrun:migration tag) is refused. A group
     whose documents would break a DMS rule (builders.check) is a config error
     before any task is created. ]]
function cdc.ensure_tasks(client, groups, endpoints, opts)
  local out = { created = {}, reused = {} }
  local created_arns = {}
  local task_opts = opts.task or {}
  local function configured(g)
    return setmetatable({ batch_apply = task_opts.batch_apply, lob_max_kb = task_opts.lob_max_kb },
      { __index = g })
  end
  for _, g in ipairs(groups) do
    local problem = builders.check(configured(g))
    if problem then
      return nil, errors.new{ kind = "config", where = "dms " .. g.slot, message = problem .. "; no task was created",
        hint = "leave dms.task.batch_apply out: batch apply is then off only for the groups that need it" }
    end
  end
  for _, g in ipairs(groups) do
    local id = cdc.task_id(opts.name, g)
    local found, err = find_task(client, id)
    if found == nil then return nil, err end
    if found then
      local ok, oerr = owned(client, found.ReplicationTaskArn, id, opts.name)
      if not ok then return nil, oerr end
      out[g.slot] = found.ReplicationTaskArn
      out.reused[#out.reused + 1] = id
    else
      -- the task applies its slot's fence rows into the target's migrun.fence
      local with_fence = table.move(g.tables, 1, #g.tables, 1, {})
      with_fence[#with_fence + 1] = fence.table_entry()
      local group = setmetatable({ tables = with_fence }, { __index = configured(g) })
      local params = builders.replication_task(group, {
        identifier = id,
        source_endpoint_arn = endpoints.source[g.slot],
        target_endpoint_arn = endpoints.target,
        replication_instance_arn = opts.instance_arn,
        cdc_start_position = tostring(opts.start_lsn),
        control_schema = task_opts.control_schema,
        tags = { [builders.MIGRATION_TAG] = opts.name },
      })
      local task, cerr = client:create_replication_task(params)
      if not task then return nil, cerr end
      out[g.slot] = task.ReplicationTaskArn or ("arn:dry-run:task:" .. id)
      out.created[#out.created + 1] = id
      created_arns[#created_arns + 1] = out[g.slot]
    end
  end
  if not client.dry_run then
    for _, arn in ipairs(created_arns) do
      local ok, err = client:wait_for_task(arn, { "ready", "stopped", "running" }, opts.ready_timeout or 600, 2)
      if not ok then return nil, err end
    end
  end
  return out
end

--[[ cdc.start_tasks(client, groups, tasks, opts) -> { started = {slots}, running = {slots} } | nil, err
     Starts the tasks that are not running, one at a time (opts.pause seconds
     between them, opts.sleep(seconds) to wait), each waited until "running".
     A stopped task that ran before is resumed (resume-processing keeps its
     checkpoint); a task never started gets start-replication. ]]
function cdc.start_tasks(client, groups, tasks, opts)
  opts = opts or {}
  local out = { started = {}, running = {} }
  for _, g in ipairs(groups) do
    local arn = tasks[g.slot]
    local task, err
    if not client.dry_run then
      task, err = client:describe_task(arn)
      if err then return nil, err end
      if not task then
        return nil, errors.new{ kind = "aws", where = "dms " .. g.slot, code = "ResourceNotFoundFault",
          message = "the CDC task of " .. g.slot .. " no longer exists" }
      end
    end
    local status = task and tostring(task.Status):lower() or "ready"
    if status == "running" or status == "starting" then
      out.running[#out.running + 1] = g.slot
    else
      if status == "failed" then
        return nil, errors.new{ kind = "aws", where = "dms " .. g.slot, code = "TaskFailed",
          message = ("the CDC task of %s has failed: %s"):format(g.slot,
            tostring(task.LastFailureMessage or task.StopReason)),
          hint = "see the report; playbooks/partial_restart.lua " .. g.slot .. " starts that group again" }
      end
      if #out.started > 0 and opts.pause and opts.pause > 0 and opts.sleep then opts.sleep(opts.pause) end
      local start_type = (task and task.ReplicationTaskStartDate) and "resume-processing" or "start-replication"
      local ok, serr = client:start_replication_task(arn, start_type)
      if not ok then return nil, serr end
      if opts.say then opts.say(("started %s (%s)"):format(cdc.task_id(opts.name or "", g), start_type)) end
      if not client.dry_run then
        ok, serr = client:wait_for_task(arn, "running", opts.timeout or 600, 2)
        if not ok then return nil, serr end
      end
      out.started[#out.started + 1] = g.slot
    end
  end
  return out
end

--[[ cdc.find_task(client, id) -> task | false (no such task) | nil, err
     A task by its identifier (cdc.task_id). ]]
function cdc.find_task(client, id)
  return find_task(client, id)
end

--[[ cdc.tagged_tasks(client, name) -> { tasks } | nil, err
     Every task tagged migrun:migration = name, whatever its identifier:
     DescribeReplicationTasks cannot filter by tag, so every task is listed
     (without settings) and ListTagsForResource reads the tags of all of them
     at once (ResourceArnList). ]]
function cdc.tagged_tasks(client, name)
  assert(type(name) == "string", "cdc.tagged_tasks: a migration name expected")
  local all, err = client:describe_replication_tasks{ WithoutSettings = true }
  if not all then return nil, err end
  local arns = {}
  for i, t in ipairs(all) do arns[i] = t.ReplicationTaskArn end
  local tags
  tags, err = client:list_tags(arns)
  if not tags then return nil, err end
  local out = {}
  for _, t in ipairs(all) do
    if (tags[t.ReplicationTaskArn] or {})[builders.MIGRATION_TAG] == name then out[#out + 1] = t end
  end
  return out
end

--[[ cdc.stop_task(client, arn, opts) -> "stopped" | "not running" | "absent" | nil, err
     Stops a running (or starting) task and waits until DMS says it stopped;
     a task in any other state is left as it is. opts.timeout (600). In a dry
     run the stop is shown and nothing is waited for. ]]
function cdc.stop_task(client, arn, opts)
  opts = opts or {}
  local task, err = client:describe_task(arn)
  if err then return nil, err end
  if not task then return "absent" end
  local status = tostring(task.Status):lower()
  if status ~= "running" and status ~= "starting" then return "not running" end
  local ok, serr = client:stop_replication_task(arn)
  if not ok then return nil, serr end
  if client.dry_run then return "stopped" end
  ok, serr = client:wait_for_task(arn, { "stopped", "failed" }, opts.timeout or 600, opts.poll or 1)
  if not ok then return nil, serr end
  return "stopped"
end

--[[ cdc.delete_task(client, arn, opts) -> "deleted" | "absent" | nil, err
     Stops the task when it runs, deletes it and waits until DMS no longer
     knows it (so a task of the same identifier can be created at once). ]]
function cdc.delete_task(client, arn, opts)
  opts = opts or {}
  local stopped, err = cdc.stop_task(client, arn, opts)
  if not stopped then return nil, err end
  if stopped == "absent" then return "absent" end
  local ok, derr = client:delete_replication_task(arn)
  if not ok then return nil, derr end
  if client.dry_run then return "deleted" end
  ok, derr = client:wait_for_task(arn, "deleted", opts.timeout or 600, opts.poll or 1)
  if not ok then return nil, derr end
  return "deleted"
end

--[[ cdc.delete_endpoint(client, id, opts) -> "deleted" | "absent" | nil, err
     An endpoint by identifier, deleted and waited for until it is gone (its
     tasks must be deleted first: DMS refuses otherwise). ]]
function cdc.delete_endpoint(client, id, opts)
  opts = opts or {}
  local found, err = find_endpoint(client, id)
  if found == nil then return nil, err end
  if not found then return "absent" end
  local ok, derr = client:delete_endpoint(found.EndpointArn)
  if not ok then return nil, derr end
  if client.dry_run then return "deleted" end
  local host = require "migrun.host"
  local deadline = host.monotonic() + (opts.timeout or 600)
  while true do
    found, err = find_endpoint(client, id)
    if found == nil then return nil, err end
    if not found then return "deleted" end
    if host.monotonic() > deadline then
      return nil, errors.new{ kind = "timeout", where = "dms endpoint " .. id,
        message = ("endpoint %s was not deleted within %gs"):format(id, opts.timeout or 600) }
    end
    client.sleep(opts.poll or 1)
  end
end

---------------------------------------------------------------------------
-- Watching
---------------------------------------------------------------------------

--[[ cdc.status(client, groups, tasks, opts) -> { rows = { {slot, task, status,
     lag_bytes, confirmed_flush_lsn, pending, applied_at, exceptions,
     exception_tables = { ["s.t"] = n } } },
     exceptions = n, max_lag = bytes, all_running = bool } | nil, err
     opts.source (Db on the primary: per-slot lag), opts.target (Db: the
     control tables), opts.control_schema ("public"), opts.name. ]]
function cdc.status(client, groups, tasks, opts)
  local out = { rows = {}, exceptions = 0, max_lag = 0, all_running = true }
  local schema = opts.control_schema or "public"
  local slot_res, err = opts.source:query(
    "select slot_name, confirmed_flush_lsn, pg_current_wal_lsn() as current from pg_replication_slots")
  if not slot_res then return nil, err end
  local slots = {}
  for r in slot_res:rows() do slots[r.slot_name] = r end
  local status_rows, exc_counts = {}, {}
  local has = opts.target:query("select to_regclass($1) is not null as st, to_regclass($2) is not null as ex",
    schema .. ".awsdms_status", schema .. ".awsdms_apply_exceptions")
  if has and has[1].st then
    local res = opts.target:query(("select task_name, task_status, pending_changes, "
      .. "source_timestamp_applied::text as applied from %s.awsdms_status"):format(pg.quote_ident(schema)))
    for r in (res and res:rows() or function() end) do status_rows[r.task_name] = r end
  end
  local exc_tables = {}
  if has and has[1].ex then
    local res = opts.target:query(('select "TASK_NAME" as task, "TABLE_OWNER" as s, "TABLE_NAME" as t, count(*) as n '
      .. 'from %s.awsdms_apply_exceptions group by 1, 2, 3'):format(pg.quote_ident(schema)))
    for r in (res and res:rows() or function() end) do
      exc_counts[r.task] = (exc_counts[r.task] or 0) + r.n
      exc_tables[r.task] = exc_tables[r.task] or {}
      exc_tables[r.task][text.key(r.s, r.t)] = r.n
    end
  end
  for _, g in ipairs(groups) do
    local id = cdc.task_id(opts.name, g)
    local task
    if not client.dry_run then
      task, err = client:describe_task(tasks[g.slot])
      if err then return nil, err end
    end
    local s = slots[g.slot]
    local lag
    if s and not rawequal(s.confirmed_flush_lsn, pg.null) then lag = s.current - s.confirmed_flush_lsn end
    -- DMS names a task in its control tables by the ARN's resource id
    local resource = tostring(tasks[g.slot] or ""):match("([^:]+)$")
    local st = status_rows[resource] or status_rows[id] or {}
    local row = {
      slot = g.slot, task = id,
      status = task and tostring(task.Status) or (client.dry_run and "dry run" or "missing"),
      lag_bytes = lag, confirmed_flush_lsn = s and tostring(s.confirmed_flush_lsn) or "no slot",
      pending = st.pending_changes, applied_at = st.applied,
      exceptions = exc_counts[resource] or exc_counts[id] or 0,
      exception_tables = exc_tables[resource] or exc_tables[id] or {},
      failure = task and task.LastFailureMessage,
    }
    out.rows[#out.rows + 1] = row
    out.exceptions = out.exceptions + row.exceptions
    if row.status ~= "running" then out.all_running = false end
    if lag == nil then out.max_lag = math.huge elseif lag > out.max_lag then out.max_lag = lag end
  end
  return out
end

-- How many tasks of a status run and have caught up: their slot is less than
-- lag_bytes behind, or (cdc.watch) they have applied a fence written during the watch.
function cdc.caught_up(st, lag_bytes)
  local n = 0
  for _, r in ipairs(st.rows) do
    if r.status == "running" and (r.fenced or (r.lag_bytes and r.lag_bytes < lag_bytes)) then n = n + 1 end
  end
  return n
end

--[[ cdc.exceptions_message(st [, { schema = "public" }]) -> text | nil
     The apply exceptions of a status in words: how many rows, on which
     tables, which group's task, and what to do (nil without any). A change
     DMS could not apply is missing on the target: that table differs from
     the source until its group is loaded again. ]]
function cdc.exceptions_message(st, opts)
  if not st or (st.exceptions or 0) == 0 then return nil end
  local schema = opts and opts.schema or "public"
  local parts, slots = {}, {}
  for _, r in ipairs(st.rows) do
    local names = {}
    for k, n in pairs(r.exception_tables or {}) do names[#names + 1] = ("%s (%d)"):format(k, n) end
    table.sort(names)
    if (r.exceptions or 0) > 0 then
      parts[#parts + 1] = ("%s: %s"):format(r.slot, #names > 0 and table.concat(names, ", ")
        or (r.exceptions .. " row(s)"))
      slots[#slots + 1] = r.slot
    end
  end
  local rerun = {}
  for i, slot in ipairs(slots) do rerun[i] = "`migrun playbooks/partial_restart.lua " .. slot .. "`" end
  return ("%d change(s) DMS could not apply are in %s.awsdms_apply_exceptions (%s): those tables lack them "
    .. "on the target; look at the rows (the ERROR column says why), fix the cause, then load the group again "
    .. "with %s"):format(st.exceptions, schema, table.concat(parts, "; "), table.concat(rerun, ", "))
end

-- Rows for a printed table of a status.
function cdc.status_table(st)
  local rows = {}
  for _, r in ipairs(st.rows) do
    rows[#rows + 1] = { r.slot, r.task, r.status, text.bytes(r.lag_bytes), r.confirmed_flush_lsn,
      r.applied_at and tostring(r.applied_at) or "-", tostring(r.exceptions), r.fenced and "applied" or "-" }
  end
  return { "slot", "task", "status", "lag", "confirmed flush", "applied up to", "apply exceptions", "fence" }, rows
end

--[[ cdc.watch(client, groups, tasks, opts) -> status | nil, err
     Polls cdc.status until every task runs and has caught up: its slot lags
     less than opts.lag_bytes, or it has applied a fence (migrun.fence)
     written at most three polls ago (one is written every poll while every
     task runs and some have not caught up). The lag alone never ends on an
     idle source whose WAL grows with what no slot decodes (another
     database's autovacuum): the fence does, within a few polls. A failed or
     stopped task ends the watch with an error naming the slot and what DMS
     said; opts.timeout bounds it. opts: the cdc.status options (source and
     target: the fence is written on the one and seen on the other) plus
     lag_bytes, timeout, poll, sleep(seconds), on_status(status) after every
     poll; fence = false leaves fences out (the lag only). Rows of the status
     get fenced = true once their task applied the fence. ]]
function cdc.watch(client, groups, tasks, opts)
  local deadline = host.monotonic() + (opts.timeout or 3600)
  local slots = {}
  for i, g in ipairs(groups) do slots[i] = g.slot end
  -- a migration set up before fences existed is watched by the lag alone
  local fences = not client.dry_run and opts.fence ~= false and opts.target and #slots > 0
    and fence.check(opts.source, opts.target, slots)
  -- Fences written during the watch, { seq, at } oldest first. A task has
  -- caught up by fence when it has applied one written within the last
  -- `recent` seconds: it is at most that far behind in time, whatever the WAL.
  local written, poll = {}, opts.poll or 5
  local recent = math.max(3 * poll, 3)
  while true do
    local st, err = cdc.status(client, groups, tasks, opts)
    if not st then return nil, err end
    if fences then
      local now = host.monotonic()
      while written[1] and now - written[1].at > recent do table.remove(written, 1) end
      if written[1] then
        local seen, ferr = fence.seen(opts.target, slots)
        if not seen then return nil, ferr end
        for _, r in ipairs(st.rows) do r.fenced = seen[r.slot] >= written[1].seq or nil end
      end
      -- one more fence per poll while a running task has not caught up either way
      local newest = written[#written]
      if st.all_running and cdc.caught_up(st, opts.lag_bytes or 1024 * 1024) < #st.rows
          and (not newest or now - newest.at >= poll) then
        local w, werr = fence.write(opts.source, slots)
        if not w then return nil, werr end
        written[#written + 1] = { seq = w.seq, at = now }
      end
    end
    if opts.on_status then opts.on_status(st) end
    for _, r in ipairs(st.rows) do
      local s = r.status:lower()
      if s == "failed" or s == "stopped" or s == "missing" then
        return nil, errors.new{ kind = "dms", where = "dms " .. r.slot, code = "TaskNotRunning",
          message = ("the CDC task %s is %s%s"):format(r.task, s, r.failure and (": " .. r.failure) or ""),
          hint = "see the report; `migrun playbooks/partial_restart.lua " .. r.slot .. "` starts that group again",
          status = st }
      end
    end
    if client.dry_run or (st.all_running and cdc.caught_up(st, opts.lag_bytes or 1024 * 1024) == #st.rows) then
      return st
    end
    if host.monotonic() > deadline then
      return nil, errors.new{ kind = "timeout", where = "dms catch-up", status = st,
        message = ("the tasks did not catch up within %gs (largest lag %s)"):format(opts.timeout or 3600,
          text.bytes(st.max_lag)),
        hint = "raise dms.catch_up.timeout, or look at the tasks' CDC latency and the apply exceptions" }
    end
    opts.sleep(opts.poll or 5)
  end
end

--[[ cdc.wait_applied(source, target, slots, opts) -> { seq, lsn, written_at, seconds,
     slots = { {slot, seen, seconds, confirmed_flush_lsn} } } | nil, err
     The tasks of the named slots have applied everything the source committed
     before this call: a fence (migrun.fence) is written on the source and
     waited for on the target, never an LSN (on an idle source a slot's
     confirmed_flush_lsn may never reach the WAL position: see migrun.fence).
     The source may be read-only (the fence is written in BEGIN READ WRITE).
     opts: timeout (600), poll (1), sleep(seconds), on_progress(done, total),
     hint. A vanished slot is an error at once. In a dry run the fence's
     statements are shown and { dry_run = true } comes back. ]]
function cdc.wait_applied(source, target, slots, opts)
  assert(source and source.query, "cdc.wait_applied: a source Db expected")
  assert(target and target.query, "cdc.wait_applied: a target Db expected (the fence is seen there)")
  assert(type(slots) == "table", "cdc.wait_applied: a list of slot names expected")
  opts = opts or {}
  local w, err = fence.wait(source, target, slots, { timeout = opts.timeout, poll = opts.poll, sleep = opts.sleep,
    on_progress = opts.on_progress,
    hint = opts.hint or "are the tasks running? are writes still going on (cutover.stop_writes)?" })
  if not w or w.dry_run then return w, err end
  -- where the slots stand once the fence is seen: for the report only
  local res
  res, err = source:query("select slot_name, confirmed_flush_lsn from pg_replication_slots")
  if not res then return nil, err end
  local at = {}
  for r in res:rows() do at[r.slot_name] = r.confirmed_flush_lsn end
  for _, row in ipairs(w.slots) do
    local l = at[row.slot]
    row.confirmed_flush_lsn = (l == nil or rawequal(l, pg.null)) and "none" or tostring(l)
  end
  return w
end


return cdc
