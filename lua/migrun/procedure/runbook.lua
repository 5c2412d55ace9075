--[[
migrun.runbook: the runbook's steps as the stock playbooks run them, so that a
playbook is its steps' names, titles and order and nothing else:

  P:step{ "groups", "Group the tables into slots (printed before anything is created)",
          run = runbook.groups }

Each function takes the step context (ctx) and returns the step's facts, or
nil and why; `check_*` functions are the steps' checks on resume. What earlier
steps found out reaches later ones through runbook.known(ctx), by name, in any
playbook of the migration: a step never reads another's facts by hand.

The steps that full.lua and partial_restart.lua both run are one function
each: runbook.group_slot (a group's slot, its two replication sets and the
fence), runbook.pause_replica / check_paused, runbook.verify_lsn,
runbook.resume_replica, runbook.dms_endpoint_overrides.

runbook.known(ctx) -> { tables, groups, lsn (the captured LSN, a migrun.lsn),
    tasks ({ [slot] = arn }), boundary (fidelity.dms), changes (fidelity's
    target changes), schema (the schema step's facts), slots (created LSNs),
    hashed (the full load's sums and verdicts, migrun.loadhash) }
    from this run's facts in the main playbook, else from the main playbook's
    (full.lua's) in the journal.
Phase I: preflight, schema, know_data, groups, slots (check_slots), pause_replica
    (check_paused), verify_lsn, hold_indexes, full_load (full_load_destructive),
    indexes, matviews, fidelity, qa, resume_replica.
Phase II: dms_setup, dms_start, catch_up (catch_up_dry_run).
]]
local steps = require "migrun.steps"
local preflight = require "migrun.preflight"
local schema = require "migrun.schema"
local catalog = require "migrun.catalog"
local groups = require "migrun.groups"
local pglogical = require "migrun.pglogical"
local replica = require "migrun.replica"
local cdc = require "migrun.cdc"
local fence = require "migrun.fence"
local drift = require "migrun.drift"
local lsn = require "migrun.lsn"
local text = require "migrun.text"
local fidelity = require "migrun.fidelity"
local matviews = require "migrun.matviews"

local runbook = {}

function runbook.known(ctx)
  local f = (ctx.playbook and ctx.playbook.is_main) and ctx.facts or ctx:main_facts()
  local paused = f.pause_replica and f.pause_replica.lsn
  return {
    tables = f.know_data and f.know_data.tables,
    groups = f.groups and f.groups.groups,
    lsn = paused and lsn(paused) or nil,
    tasks = f.dms_setup and f.dms_setup.tasks,
    boundary = f.fidelity and f.fidelity.dms,
    changes = f.fidelity and f.fidelity.changes or {},
    schema = f.schema,
    slots = f.slots and f.slots.slots,
    hashed = f.full_load and f.full_load.hashed,
  }
end

local function scope(ctx) return { schemas = ctx.config.schemas, exclude = ctx.config.exclude_tables } end

-- Steps full.lua and partial_restart.lua share -------------------------------

-- A group's slot, its two replication sets with its tables, and the fence
-- carried by both sets. -> the slot's creation LSN (text; "dry run" in one)
function runbook.group_slot(ctx, slot, tables)
  local src = ctx.source
  local s = assert(pglogical.create_slot(src, slot))
  assert(pglogical.create_sets(src, slot))
  assert(pglogical.add_tables(src, slot, tables, { say = function(l) ctx:warn("%s", l) end }))
  -- migrun.fence on both sides: waiting for the tasks to apply ends on a row
  -- seen on the target, never on an LSN
  assert(fence.create(src))
  assert(fence.create(ctx.target))
  assert(fence.add_slot(src, slot))
  return s.lsn and tostring(s.lsn) or "dry run"
end

-- The maintenance replica paused past `after` (the newest slot's creation),
-- its replay LSN captured: where CDC starts.
function runbook.pause_replica(ctx, after)
  local at = assert(replica.pause(ctx.replica, { after = after, say = ctx.print }))
  ctx:say("replica paused; replay LSN %s is where CDC will start", tostring(at))
  return { lsn = tostring(at) }
end

function runbook.check_paused(ctx, facts)
  -- once resume_replica has begun (even if killed in it), not paused is expected
  if ctx:began("resume_replica") then return true end
  return replica.check_paused(ctx.replica, facts.lsn)
end

function runbook.verify_lsn(ctx, slots, at)
  local verified = {}
  for _, slot in ipairs(slots) do
    local v = assert(pglogical.verify_lsn(ctx.source, slot, at))
    verified[slot] = { confirmed_flush_lsn = tostring(v.confirmed_flush_lsn), peeked = v.peeked }
  end
  return { verified = verified }
end

function runbook.resume_replica(ctx)
  assert(replica.resume(ctx.replica))
  return { resumed = true }
end

-- The endpoints as DMS must see them: the config's overrides, and what the
-- DMS boundary needs (migrun.fidelity).
function runbook.dms_endpoint_overrides(ctx)
  local c, boundary = ctx.config, runbook.known(ctx).boundary
  return { source = fidelity.endpoint_overrides("source", c.dms.source_endpoint, boundary),
           target = fidelity.endpoint_overrides("target", c.dms.target_endpoint, boundary) }
end

-- Phase I ------------------------------------------------------------------------

function runbook.preflight(ctx)
  local r = preflight.run{ source = ctx.source, replica = ctx.replica, target = ctx.target,
    config = ctx.config, resuming = ctx.resuming, dms = function() return ctx:dms() end,
    -- a paused replica is this run's only once its pause step has begun
    replica_pause_expected = ctx:began("pause_replica") }
  ctx:say("%s", preflight.format(r))
  ctx:report_table("Preflight", preflight.REPORT_COLUMNS, preflight.report_rows(r))
  if r.errors > 0 then return nil, ("preflight found %d problem(s); nothing was changed"):format(r.errors) end
  return { errors = r.errors, warnings = r.warnings }
end

function runbook.schema(ctx)
  local c = ctx.config
  local tools = assert(schema.tools(ctx.target.conn:server_version(), { source = ctx.source.conn:server_version() }))
  if tools.note then ctx:say("%s", tools.note) end
  local dump = assert(schema.dump(c.source.conninfo, ctx.state_dir, { tools = tools,
    schemas = c.schemas, exclude_tables = c.exclude_tables, echo = ctx.print }))
  local roles = assert(schema.copy_roles(c.source.conninfo, ctx.target, { tools = tools, say = ctx.print,
    schemas = c.schemas }))
  local source_tables = assert(catalog.tables(ctx.source, scope(ctx)))
  assert(schema.restore_pre_data(c.target.conninfo, dump, ctx.target, source_tables,
    { dry_run = ctx.dry_run, echo = ctx.print }))
  return { dump = dump.file, list = dump.list, notes = dump.notes, roles_created = roles.created }
end

function runbook.know_data(ctx)
  local list = assert(catalog.tables(ctx.source, scope(ctx)))
  -- what the guard compares the source with until the cutover (DDL is not replicated)
  local fingerprint = assert(drift.fingerprint(ctx.source, scope(ctx)))
  assert(catalog.measure_lobs(ctx.replica, list))
  assert(catalog.write_rates(ctx.source, list, ctx.config.know_data.write_rate_seconds,
    function(s) ctx:sleep(s) end))
  ctx:report_table("Tables", { "table", "size", "rows (est.)", "primary key", "separate unique",
    "largest LOB", "writes/s" }, catalog.summary_rows(list))
  return { tables = list, schema_fingerprint = fingerprint }
end

function runbook.groups(ctx)
  local c = ctx.config
  local g = assert(groups.plan(runbook.known(ctx).tables, { largest_alone = c.groups.largest_alone,
    explicit = c.groups.explicit, prefix = c.slots.prefix, lobs = c.lobs, batch_apply = c.dms.task.batch_apply }))
  ctx:say("%s", groups.format(g))
  return { groups = g }
end

function runbook.slots(ctx)
  local src = ctx.source
  if assert(pglogical.ensure_extension(src)).created then ctx:say("created the pglogical extension") end
  assert(pglogical.ensure_node(src, ctx.config.slots.node, pglogical.node_dsn(ctx.config.source.conninfo)))
  local created = {}
  for _, g in ipairs(runbook.known(ctx).groups) do created[g.slot] = runbook.group_slot(ctx, g.slot, g.tables) end
  return { slots = created, fence = fence.KEY }
end

function runbook.check_slots(ctx, facts)
  return pglogical.check_slots(ctx.source, facts.slots)
end

local function slot_names(ctx)
  local names = {}
  for i, g in ipairs(runbook.known(ctx).groups) do names[i] = g.slot end
  return names
end

function runbook.pause_after_slots(ctx)
  return runbook.pause_replica(ctx, pglogical.newest_slot_lsn(runbook.known(ctx).slots))
end

function runbook.verify_captured_lsn(ctx)
  return runbook.verify_lsn(ctx, slot_names(ctx), runbook.known(ctx).lsn)
end

function runbook.verify_lsn_dry_run(ctx)
  return ("would verify every slot at the captured LSN %s"):format(tostring(runbook.known(ctx).lsn))
end

function runbook.hold_indexes(ctx)
  local held = assert(catalog.separate_unique_indexes(ctx.source, runbook.known(ctx).tables))
  for _, ix in ipairs(held) do ctx:say("held back until after the load: %s %s", ix.table, ix.definition) end
  -- The target got the pre-data section only: nothing to drop unless a team
  -- restored a full schema there itself.
  assert(catalog.drop_present(ctx.target, held, ctx.print))
  return { held = held }
end

function runbook.full_load_destructive(ctx)
  return ("truncate and load %d tables on the target"):format(#runbook.known(ctx).tables)
end

function runbook.full_load(ctx)
  local k = runbook.known(ctx)
  return steps.load(ctx, k.tables, k.lsn, "Full load")
end

function runbook.indexes(ctx)
  local k = runbook.known(ctx)
  return steps.restore_indexes(ctx, k.schema, k.tables)
end

-- Materialized views: the schema-only restore creates them empty, nothing
-- carries their rows; populated from the loaded tables (the paused replica
-- says which the source has populated), so the application's reads work on
-- the target from the start.
function runbook.matviews(ctx)
  local list = assert(matviews.list(ctx.replica, scope(ctx)))
  local r = assert(matviews.refresh_all(ctx.target, list, { say = ctx.print }))
  ctx:report_table("Materialized views populated", matviews.REFRESH_COLUMNS, r.rows)
  return { refreshed = r.refreshed, unpopulated = r.unpopulated, seconds = r.seconds }
end

function runbook.fidelity(ctx)
  local tables = runbook.known(ctx).tables
  local bounds = assert(fidelity.inspect(ctx.source, { tables = tables }))
  ctx:report_table("The DMS boundary", fidelity.REPORT_COLUMNS, fidelity.report_rows(bounds))
  if bounds.errors > 0 then
    return nil, ("%d feature(s) of the schema DMS cannot carry safely (the DMS boundary table says which and "
      .. "what to do); nothing was changed on the target"):format(bounds.errors)
  end
  local a = assert(fidelity.adapt(ctx.target, bounds, { say = ctx.print }))
  ctx:report_table("Target changes while DMS applies (undone at cutover)", fidelity.CHANGE_COLUMNS, a.changes)
  -- from here on, what anyone but DMS writes on the target is noted for the verification
  assert(steps.install_sentinel(ctx, tables))
  return { changes = a.changes, dms = fidelity.dms(bounds) }
end

function runbook.qa(ctx)
  local k = runbook.known(ctx)
  return steps.quick_qa(ctx, k.tables, k.hashed)
end

-- Phase II -------------------------------------------------------------------------

function runbook.dms_setup(ctx)
  local client, c, k = ctx:dms(), ctx.config, runbook.known(ctx)
  local overrides = runbook.dms_endpoint_overrides(ctx)
  local eps = assert(cdc.ensure_endpoints(client, k.groups, { name = c.name,
    source = c.source.conninfo, target = c.target.conninfo,
    source_overrides = overrides.source, target_overrides = overrides.target }))
  assert(cdc.test_connections(client, c.dms.replication_instance_arn, eps))
  local tasks = assert(cdc.ensure_tasks(client, fidelity.task_groups(k.groups, k.boundary), eps, { name = c.name,
    instance_arn = c.dms.replication_instance_arn, start_lsn = k.lsn, task = c.dms.task }))
  return { endpoints = eps, tasks = tasks }
end

function runbook.dms_start(ctx)
  local k = runbook.known(ctx)
  local s = assert(cdc.start_tasks(ctx:dms(), k.groups, k.tasks, { name = ctx.config.name,
    pause = ctx.config.dms.start_pause, sleep = function(t) ctx:sleep(t) end, say = ctx.print }))
  return { started = s.started }
end

function runbook.catch_up(ctx)
  local k = runbook.known(ctx)
  local bar = ctx:progress{ label = "tasks caught up", total = #k.groups, unit = "tasks" }
  local watch = steps.watch_options(ctx, function(st)
    bar:update(cdc.caught_up(st, ctx.config.dms.catch_up.lag_bytes),
      ("largest lag %s, %d apply exception(s)"):format(text.bytes(st.max_lag), st.exceptions))
  end)
  local st = assert(cdc.watch(ctx:dms(), k.groups, k.tasks, watch))
  bar:finish("every task has caught up")
  ctx:report_table("DMS tasks", cdc.status_table(st))
  if st.exceptions > 0 then ctx:warn("%s", cdc.exceptions_message(st)) end -- which tables, what to do
  -- a value DMS cut is named as such first; then every row of every table
  local lob, lwhy = steps.no_truncation(ctx, k.groups, k.tables, k.tasks, "LOB values (primary vs target)")
  if not lob then return nil, lwhy end
  local r, why = steps.live_qa(ctx, "Live verification (primary vs target, under writes)")
  if not r then return nil, why end
  local verified = ("every table verified equal under writes (%d key(s) still changing, compared at cutover)")
    :format(r.pending.keys)
  ctx:say("READY FOR CUTOVER: %d tasks running, largest lag %s, %s", #st.rows, text.bytes(st.max_lag), verified)
  ctx:notify("ready_for_cutover", ("%d tasks running, largest lag %s, %s"):format(#st.rows,
    text.bytes(st.max_lag), verified), { tasks = #st.rows, max_lag = st.max_lag, exceptions = st.exceptions })
  return { ready = true, max_lag = st.max_lag, exceptions = st.exceptions, pending_keys = r.pending.keys }
end

runbook.catch_up_dry_run = "would watch every task catch up (writing a fence row into " .. fence.KEY
  .. " on the primary and seeing it on the target), then verify every table of the primary and the target "
  .. "under writes (migrun's watch slot <slots.prefix>watch, row hashes, differences named by key), and look "
  .. "for truncated LOB values (task logs, LOB lengths)"

return runbook
