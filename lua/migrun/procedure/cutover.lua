--[[
migrun.cutover: what DMS leaves undone at the end of a migration (the
runbook's cutover): stopping writes on the source, waiting until the tasks
have applied the source's last write, the sequences (DMS never migrates
them), stopping the tasks, and the checklist with the way back.

Writes go through migrun.db (Db:write), DMS calls through the migrun.dms
client, commands through a run_command function: a dry run shows each of them
and changes nothing.

  local cutover = require "migrun.cutover"
  local s = assert(cutover.stop_writes(source, cfg.cutover, { sleep =, say =, run_command = }))
  local w = assert(cutover.wait_applied(source, target, { "dms_slot_01", ... }, { timeout =, sleep = }))
  local q = assert(cutover.sync_sequences(source, target, { schemas =, exclude_tables =, margin = 1000 }))
  local t = assert(cutover.stop_tasks(client, groups, tasks, { name =, timeout = }))
  local cl = cutover.checklist{ database =, stop_writes =, tasks =, region = }

cutover.sessions(source) -> { {pid, user, application, state, backend_start} } | nil, err
    Client sessions of the source's database that are not migrun's: not this
    session, not the role migrun connects as (the DMS endpoints are made
    with the same conninfo, so DMS's sessions are kept too). Replication
    connections (walsenders) are never listed.
cutover.is_read_only(source) -> true | false | nil, err
    Whether the database has default_transaction_read_only = on (ALTER DATABASE).
cutover.stop_writes(source, opts) -> { mode, database, terminated = {pids}, waited = s } | nil, err
    opts.stop_writes: "none" | "read_only" | an argv list (a command of the
    team's that stops the application's writes; run with opts.run_command).
    read_only: ALTER DATABASE <db> SET default_transaction_read_only = on,
    which new sessions obey; sessions opened before are then handled as
    opts.existing_sessions says: "wait" (until they are gone) or "terminate"
    (pg_terminate_backend, then wait until they are gone); either gives up
    after opts.sessions_timeout seconds with an error listing them.
    opts: sleep(seconds), poll (default 1), say(line), run_command(argv) ->
    ok, how, code, stdout, stderr.
cutover.final_lsn(source) -> lsn | nil, err   the primary's current WAL position
cutover.wait_applied(source, target, slots, opts) -> { seq, lsn, written_at, seconds,
    slots = { {slot, seen, seconds, confirmed_flush_lsn} } } | nil, err
    migrun.cdc's: a fence row written on the source (in BEGIN READ WRITE, so
    a read-only source takes it) and waited for on the target for every
    named slot: the tasks have applied everything the primary committed
    before, whether or not anything moves the slots afterwards. opts:
    timeout (default 600), poll (1), sleep, on_progress(done, total). A
    missing slot is an error at once; a dry run shows the fence's statements.
cutover.sequences(db, { schemas =, exclude_tables = }) -> { {schema, name,
    last_value (nil: never used), start_value, increment, min_value,
    max_value, owned_by ("s.t.column" | nil), identity = bool} } | nil, err
    From pg_sequences; identity columns' sequences included; sequences owned
    by an excluded table left out (pg_dump leaves them out too).
cutover.sync_sequences(source, target, opts) -> { rows = { {sequence, owned_by, source,
    target_before, set_to, action} }, set = n, missing = {names} } | nil, err
    (cutover.SEQUENCE_COLUMNS: the report's columns for those rows)
    For every sequence of the source: setval on the target to the source's
    last value plus opts.margin (default 1000) increments' worth in the
    sequence's direction, within its bounds; never moves a target sequence
    backwards. A sequence missing on the target is listed in `missing` (the
    caller decides; the playbook stops).
cutover.count_only(qa_result, {"s.t", ...}) -> qa_result
    In a full qa.compare result, the hash checks of the named tables are
    judged by their row counts only; differences recounted. A partitioned
    table named stands for its partitions.
cutover.stop_tasks(client, groups, tasks, opts) -> { stopped = {slots}, already = {slots} } | nil, err
    StopReplicationTask for every running task, then waits until each is
    stopped (opts.timeout, default 600; opts.poll). opts.say(line).
cutover.restore_target(target, changes, opts) -> { restored = n, already = n, rows } | nil, err
    The target changes full.lua made for DMS (migrun.fidelity: identity
    columns BY DEFAULT, ALWAYS/REPLICA triggers disabled, FORCE row-level
    security lifted) undone, so the target's definitions are the source's
    again; each one the target still has (a rerun skips the rest). Once the
    tasks are stopped: no DMS session then writes a GENERATED ALWAYS column.
    opts.say(line). rows: { {table, kind, object, state} } for the report.
cutover.checklist(info) -> { steps = { text }, rollback = { {what, command} } }
    info: database, stop_writes (the config value), matviews (a checklist
    line: migrun.matviews.checklist_line), tasks = { {slot, task
    (identifier), arn} }, region and endpoint_url (or nil), target_changes
    (fidelity changes). The steps of the switch and the exact commands that
    undo the cutover on the source side (and redo the target changes DMS
    needs before its tasks resume).
cutover.format_checklist(cl) -> text; cutover.format_rollback(cl) -> its "To roll back:" part
cutover.refusal(why, done, cl) -> the message of a refusal: why, what was done
    already (the source read-only, sequences moved, tasks running or not),
    and how to give the source back to the application
cutover.window(records, names, first_mark, last_mark) -> { seconds, steps, rows }
    the cutover window (source read-only to target ready for writes) and the
    time of each of its steps, from the journal's step records;
    cutover.format_window(w) -> one line
]]
local pg = require "migrun.pg"
local lsn = require "migrun.lsn"
local errors = require "migrun.error"
local text = require "migrun.text"
local catalog = require "migrun.catalog"
local fidelity = require "migrun.fidelity"

local cutover = {}

local function cutover_error(where, message, extra)
  local e = { kind = "cutover", where = where, message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return errors.new(e)
end

---------------------------------------------------------------------------
-- Stopping writes on the source
---------------------------------------------------------------------------

function cutover.sessions(source)
  assert(source and source.query, "cutover.sessions: a Db expected")
  local res, err = source:query([[
    select pid, usename as user, coalesce(application_name, '') as application,
           coalesce(state, '') as state, backend_start::text as backend_start
      from pg_stat_activity
     where datname = current_database()
       and backend_type = 'client backend'
       and pid <> pg_backend_pid()
       and usename is distinct from current_user
     order by pid]])
  if not res then return nil, err end
  local out = {}
  for r in res:rows() do out[#out + 1] = r end
  return out
end

function cutover.is_read_only(source)
  assert(source and source.query, "cutover.is_read_only: a Db expected")
  local res, err = source:query([[
    select exists (select 1 from pg_db_role_setting s join pg_database d on d.oid = s.setdatabase
                    where d.datname = current_database() and s.setrole = 0
                      and 'default_transaction_read_only=on' = any (s.setconfig)) as ro]])
  if not res then return nil, err end
  return res[1].ro
end

local function describe_sessions(list)
  local parts = {}
  for i, s in ipairs(list) do
    if i > 10 then parts[#parts + 1] = ("and %d more"):format(#list - 10) break end
    parts[#parts + 1] = ("pid %d (%s, %s, %s)"):format(s.pid, s.user,
      s.application ~= "" and s.application or "no application_name", s.state)
  end
  return table.concat(parts, "; ")
end

local VALID_MODES = { none = true, read_only = true }

function cutover.stop_writes(source, opts)
  assert(source and source.query and source.write, "cutover.stop_writes: a Db expected")
  opts = opts or {}
  local mode = opts.stop_writes or "none"
  assert(type(mode) == "table" or VALID_MODES[mode],
    'cutover.stop_writes: stop_writes must be "none", "read_only" or an argv list')
  local say = opts.say or function() end
  local out = { mode = type(mode) == "table" and "command" or mode, terminated = {}, waited = 0 }
  if mode == "none" then return out end

  if type(mode) == "table" then
    assert(type(opts.run_command) == "function", "cutover.stop_writes: run_command expected for a command")
    local ok, how, code, _, stderr = opts.run_command(mode)
    if not ok then
      return nil, cutover_error("stop writes", ("the stop-writes command failed (%s %s)%s"):format(
        tostring(how), tostring(code), stderr and stderr ~= "" and (": " .. stderr:gsub("%s+$", "")) or ""),
        { hint = "nothing else was done; fix the command (cutover.stop_writes) and run again" })
    end
    return out
  end

  local res, err = source:query("select current_database() as db")
  if not res then return nil, err end
  out.database = res[1].db
  local ok, werr = source:write(("alter database %s set default_transaction_read_only = on")
    :format(pg.quote_ident(out.database)))
  if not ok then return nil, werr end
  say(("database %s: new sessions are read-only"):format(out.database))

  local policy = opts.existing_sessions or "wait"
  assert(policy == "wait" or policy == "terminate", 'cutover.stop_writes: existing_sessions must be "wait" or "terminate"')
  local list, lerr = cutover.sessions(source)
  if not list then return nil, lerr end
  if #list == 0 then return out end
  say(("%d session(s) opened before: %s"):format(#list, describe_sessions(list)))
  if policy == "terminate" then
    for _, s in ipairs(list) do
      local r, terr = source:write("select pg_terminate_backend($1) as done", s.pid)
      if not r then return nil, terr end
      out.terminated[#out.terminated + 1] = s.pid
    end
  end
  if source.dry_run then return out end

  local host = require "migrun.host"
  local started = host.monotonic()
  local timeout = opts.sessions_timeout or 300
  while true do
    list, lerr = cutover.sessions(source)
    if not list then return nil, lerr end
    out.waited = host.monotonic() - started
    if #list == 0 then return out end
    if out.waited > timeout then
      return nil, cutover_error("stop writes", ("%d session(s) opened before the database was made read-only "
        .. "are still there after %gs: %s"):format(#list, timeout, describe_sessions(list)),
        { hint = ('end them, raise cutover.sessions_timeout, or set cutover.existing_sessions = "terminate", '
            .. "and run again. Already done: new sessions of %s are read-only; to give the source back to the "
            .. "application meanwhile: BEGIN READ WRITE; ALTER DATABASE %s RESET default_transaction_read_only; COMMIT;")
            :format(out.database, pg.quote_ident(out.database)),
          sessions = list })
    end
    assert(opts.sleep, "cutover.stop_writes: sleep expected")(opts.poll or 1)
  end
end

---------------------------------------------------------------------------
-- Waiting until the target has everything
---------------------------------------------------------------------------

function cutover.final_lsn(source)
  local names = lsn.names(source.conn:server_version())
  local res, err = source:query(("select %s() as l"):format(names.current_wal_lsn))
  if not res then return nil, err end
  return res[1].l
end

-- Proving the tasks have applied everything is CDC's business (a fence): see migrun.cdc.
cutover.wait_applied = require("migrun.cdc").wait_applied

---------------------------------------------------------------------------
-- Sequences
---------------------------------------------------------------------------

local function in_list(list)
  local set = {}
  for _, v in ipairs(list or {}) do set[v] = true end
  return set
end

function cutover.sequences(db, opts)
  assert(db and db.query, "cutover.sequences: a Db expected")
  opts = opts or {}
  local res, err = db:query(([[
    select s.schemaname as schema, s.sequencename as name, s.last_value, s.start_value,
           s.increment_by as increment, s.min_value, s.max_value,
           owner.schema as owner_schema, owner.tbl as owner_table, owner.col as owner_column,
           coalesce(owner.identity, false) as identity
      from pg_sequences s
      left join lateral (
        select tn.nspname as schema, t.relname as tbl, a.attname as col, a.attidentity <> '' as identity
          from pg_class c
          join pg_namespace cn on cn.oid = c.relnamespace
          join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = c.oid
                          and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')
          join pg_class t on t.oid = d.refobjid
          join pg_namespace tn on tn.oid = t.relnamespace
          join pg_attribute a on a.attrelid = t.oid and a.attnum = d.refobjsubid
         where cn.nspname = s.schemaname and c.relname = s.sequencename and c.relkind = 'S'
         limit 1) owner on true
     where %s
     order by 1, 2]]):format(catalog.not_system_sql("s.schemaname")))
  if not res then return nil, err end
  local excluded = in_list(opts.exclude_tables)
  local schemas = opts.schemas and in_list(opts.schemas)
  local out = {}
  for r in res:rows() do
    local owner = not rawequal(r.owner_table, pg.null) and text.key(r.owner_schema, r.owner_table) or nil
    if not (owner and excluded[owner]) and (not schemas or schemas[r.schema]) then
      out[#out + 1] = { schema = r.schema, name = r.name,
        last_value = not rawequal(r.last_value, pg.null) and r.last_value or nil,
        start_value = r.start_value, increment = r.increment, min_value = r.min_value, max_value = r.max_value,
        owned_by = owner and (owner .. "." .. r.owner_column) or nil, identity = r.identity }
    end
  end
  return out
end

local function or_never_used(v) return v == nil and "never used" or tostring(v) end
cutover.SEQUENCE_COLUMNS = { { "sequence" }, { "owned_by", "owned by", format = function(v) return v or "-" end },
  { "source", "source last", format = or_never_used }, { "target_before", "target before", format = or_never_used },
  { "set_to", "target now", format = tostring }, { "action", "" } }

-- The value the target's sequence is set to: margin increments past the
-- source's last value (its start when never used), within the bounds.
local function ahead_of(seq, margin)
  local base = seq.last_value or seq.start_value
  local step = margin * math.abs(seq.increment)
  if seq.increment > 0 then
    if base > seq.max_value - step then return seq.max_value end
    return base + step
  else
    if base < seq.min_value + step then return seq.min_value end
    return base - step
  end
end

function cutover.sync_sequences(source, target, opts)
  assert(source and source.query, "cutover.sync_sequences: a source Db expected")
  assert(target and target.query and target.write, "cutover.sync_sequences: a target Db expected")
  opts = opts or {}
  local margin = opts.margin or 1000
  assert(math.type(margin) == "integer" and margin >= 0, "cutover.sync_sequences: margin must be a whole number >= 0")
  local list, err = cutover.sequences(source, opts)
  if not list then return nil, err end
  local there, terr = cutover.sequences(target, { schemas = opts.schemas })
  if not there then return nil, terr end
  local on_target = {}
  for _, s in ipairs(there) do on_target[text.key(s)] = s end
  local out = { rows = {}, set = 0, missing = {} }
  for _, seq in ipairs(list) do
    local key = text.key(seq)
    local t = on_target[key]
    if not t then
      out.missing[#out.missing + 1] = key
    else
      local want = ahead_of(seq, margin)
      local current = t.last_value
      local row = { sequence = key, source = seq.last_value, target_before = current, set_to = want,
                    owned_by = seq.owned_by, identity = seq.identity }
      local already = current and ((seq.increment > 0 and current >= want) or (seq.increment < 0 and current <= want))
      if already then
        row.set_to, row.action = current, "already ahead"
      else
        local ok, werr = target:write("select setval($1::regclass, $2::bigint, true)", pg.qualify(seq.schema, seq.name), want)
        if not ok then return nil, werr end
        row.action = "set"
        out.set = out.set + 1
      end
      out.rows[#out.rows + 1] = row
    end
  end
  return out
end

---------------------------------------------------------------------------
-- Stopping the tasks
---------------------------------------------------------------------------

function cutover.stop_tasks(client, groups, tasks, opts)
  assert(client and type(groups) == "table" and type(tasks) == "table", "cutover.stop_tasks(client, groups, tasks, opts)")
  opts = opts or {}
  local out, waiting = { stopped = {}, already = {} }, {}
  for _, g in ipairs(groups) do
    local arn = tasks[g.slot]
    local status = "running"
    if not client.dry_run then
      local task, err = client:describe_task(arn)
      if err then return nil, err end
      status = task and tostring(task.Status):lower() or "missing"
    end
    if status == "stopped" or status == "stopping" or status == "ready" or status == "failed" or status == "missing" then
      out.already[#out.already + 1] = g.slot
      if status == "stopping" then waiting[#waiting + 1] = arn end
      if opts.say then opts.say(("%s: task already %s"):format(g.slot, status)) end
    else
      local ok, err = client:stop_replication_task(arn)
      if not ok then return nil, err end
      out.stopped[#out.stopped + 1] = g.slot
      waiting[#waiting + 1] = arn
      if opts.say then opts.say(("%s: stopping its task"):format(g.slot)) end
    end
  end
  if client.dry_run then return out end
  for _, arn in ipairs(waiting) do
    local ok, err = client:wait_for_task(arn, "stopped", opts.timeout or 600, opts.poll or 2)
    if not ok then return nil, err end
  end
  return out
end

---------------------------------------------------------------------------
-- The target's definitions, as on the source again
---------------------------------------------------------------------------

function cutover.restore_target(target, changes, opts)
  assert(target and target.write, "cutover.restore_target: a target Db expected")
  assert(type(changes) == "table", "cutover.restore_target: the changes full.lua recorded expected")
  local r, err = fidelity.restore(target, changes, opts)
  if not r then return nil, err end
  r.rows = {}
  for _, c in ipairs(changes) do
    r.rows[#r.rows + 1] = { table = c.table, kind = c.kind, object = c.object, state = c.from }
  end
  return r
end

---------------------------------------------------------------------------
-- The checklist and the way back
---------------------------------------------------------------------------

function cutover.checklist(info)
  assert(type(info) == "table", "cutover.checklist{ database =, stop_writes =, tasks =, region = }")
  local db = info.database or "<database>"
  local mode = info.stop_writes or "none"
  local steps = {
    "Point the application (connection strings, pooler, DNS) at the target.",
    "Writes on the target: make sure the application's role may write there (nothing on the target is read-only).",
    "Verify: the application's smoke tests, its error rate, and a few known rows on the target.",
    "Keep the source as it is (read-only, tasks stopped, slots kept) until the team decides there is no way back.",
    "Then: drop migrun's slots and pglogical node on the source (they retain WAL), migrun's fence table "
      .. "(schema migrun) on both sides, and delete the DMS tasks and endpoints.",
  }
  if mode == "none" then
    table.insert(steps, 1, "Writes were NOT stopped by migrun: the application must have stopped writing before this cutover.")
  end
  if info.matviews then table.insert(steps, 2, info.matviews) end
  local changes = info.target_changes or {}
  if #changes > 0 then
    table.insert(steps, 2, ("The target's definitions are the source's again (%d change made for DMS undone: "
      .. "identity columns GENERATED ALWAYS, triggers, row-level security): check them before the application "
      .. "writes there."):format(#changes))
  end
  local rollback = {}
  if mode == "read_only" then
    rollback[#rollback + 1] = { "re-enable writes on the source (psql on the primary)",
      -- a new session starts read-only itself: one read-write transaction
      ("BEGIN READ WRITE; ALTER DATABASE %s RESET default_transaction_read_only; COMMIT;")
        :format(pg.quote_ident(db)) }
  elseif type(mode) == "table" then
    rollback[#rollback + 1] = { "re-enable writes on the source", "undo the team's stop-writes command: "
      .. require("migrun.proc").quote(mode) }
  end
  rollback[#rollback + 1] = { "point the application back at the source", "(the connection strings, pooler or DNS changed above)" }
  if #changes > 0 then
    rollback[#rollback + 1] = { "before resuming CDC, the target as DMS needs it again (psql on the target)",
      table.concat(fidelity.redo_lines(changes), " ") }
  end
  for _, t in ipairs(info.tasks or {}) do
    rollback[#rollback + 1] = { ("resume CDC of %s (only while nothing has written to the target)"):format(t.slot),
      ("aws dms start-replication-task%s%s --replication-task-arn %s --start-replication-task-type resume-processing")
        :format(info.region and (" --region " .. info.region) or "",
                info.endpoint_url and (" --endpoint-url " .. info.endpoint_url) or "", t.arn) }
  end
  rollback[#rollback + 1] = { "writes made on the target after the cutover", "are not on the source: DMS does not replicate back" }
  return { steps = steps, rollback = rollback }
end

-- What a refusal says: why, what the cutover had already done, what to do.
-- done = { stop_writes = "read_only" | argv | "none" | nil, sequences = bool,
--          tasks_stopped = bool, target_restored = bool }
function cutover.refusal(why, done, cl)
  assert(type(why) == "string" and type(done) == "table", "cutover.refusal(why, done [, checklist])")
  local was = {}
  if done.stop_writes == "read_only" then
    was[#was + 1] = "the source database is read-only (default_transaction_read_only)"
  elseif type(done.stop_writes) == "table" then
    was[#was + 1] = "the team's stop-writes command ran (" .. require("migrun.proc").quote(done.stop_writes) .. ")"
  end
  if done.sequences then was[#was + 1] = "the target's sequences were set ahead of the source's (harmless)" end
  if done.tasks_stopped then
    was[#was + 1] = "the DMS tasks are stopped"
  else
    was[#was + 1] = "the DMS tasks still run"
  end
  if done.target_restored then was[#was + 1] = "the target's definitions are the source's again" end
  local msg = "refusing to cut over: " .. why .. "; so far " .. table.concat(was, ", ")
  if done.stop_writes and done.stop_writes ~= "none" and cl and cl.rollback[1] then
    msg = msg .. ". To let the application write to the source again: " .. cl.rollback[1][2]
  end
  return msg
end

-- The cutover window: from the first step to the last of `names`, each
-- step's own time, from the playbook's journal records (step name ->
-- { duration, facts }). -> { seconds (wall, from the facts' clock marks when
-- both are there, else the steps' sum), rows = { {step, seconds} } }
function cutover.window(records, names, first_mark, last_mark)
  local rows, sum = {}, 0
  for _, name in ipairs(names) do
    local rec = records[name]
    local d = rec and rec.duration or 0
    rows[#rows + 1] = { name, d }
    sum = sum + d
  end
  local seconds = sum
  if first_mark and last_mark and last_mark >= first_mark then seconds = last_mark - first_mark end
  return { seconds = seconds, steps = sum, rows = rows }
end

function cutover.format_window(w)
  local parts = {}
  for _, r in ipairs(w.rows) do parts[#parts + 1] = ("%s %s"):format(r[1], text.duration(r[2])) end
  return ("the cutover window: %s from the source made read-only to the target ready for writes (%s)")
    :format(text.duration(w.seconds), table.concat(parts, ", "))
end

function cutover.format_rollback(cl)
  local lines = { "To roll back:" }
  for _, r in ipairs(cl.rollback) do lines[#lines + 1] = ("  - %s: %s"):format(r[1], r[2]) end
  return table.concat(lines, "\n")
end

function cutover.format_checklist(cl)
  local lines = { "Cutover checklist:" }
  for i, s in ipairs(cl.steps) do lines[#lines + 1] = ("  %d. %s"):format(i, s) end
  lines[#lines + 1] = cutover.format_rollback(cl)
  return table.concat(lines, "\n")
end

return cutover
