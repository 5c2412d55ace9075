--[[
playbooks/full.lua: the whole two-phase migration of the runbook, as steps.

    migrun playbooks/full.lua --config migration.lua [--dry-run] [--yes]
                              [--from STEP | --only STEP] [--list]

Phase I (full load): preflight, schema, know the data, groups, slots and sets,
pause the maintenance replica and capture its LSN, verify it on the primary,
hold back the indexes, load in parallel from the frozen replica, restore and
verify the indexes, the target as DMS needs it (identity columns BY DEFAULT,
ALWAYS triggers off, FORCE row-level security lifted: migrun.fidelity, undone
by cutover.lua), QA, resume the replica. Phase II (CDC): DMS endpoints and
CDC-only tasks at the captured LSN (with the DMS boundary's settings and
rules), started one by one, watched until they have caught up. Running it
again resumes where it stopped.

Copy this file to adapt the procedure. The machinery (journal, resume, dry
run, confirmation, progress, report) is in migrun.playbook and the work in the
migrun.* modules, so each step here is only what the runbook says to do.
]]
local playbook = require "migrun.playbook"
local steps = require "migrun.steps"
local preflight = require "migrun.preflight"
local schema = require "migrun.schema"
local catalog = require "migrun.catalog"
local groups = require "migrun.groups"
local pglogical = require "migrun.pglogical"
local replica = require "migrun.replica"
local cdc = require "migrun.cdc"
local fence = require "migrun.fence"
local guard = require "migrun.guard"
local drift = require "migrun.drift"
local lsn = require "migrun.lsn"
local text = require "migrun.text"
local fidelity = require "migrun.fidelity"

local P = playbook.new{ name = "full", main = true,
  title = "Full migration: full load from the paused replica, then DMS CDC" }

-- What earlier steps found out, as later steps need it.
local function tables(ctx) return ctx.facts.know_data.tables end
local function plan(ctx) return ctx.facts.groups.groups end
local function captured_lsn(ctx) return lsn(ctx.facts.pause_replica.lsn) end

-- Through every step, in a process of its own: WAL held back by our slots,
-- the disks, the source's schema against know_data's fingerprint.
P:watch(guard.watcher())

-- Phase I: full load ---------------------------------------------------------

P:step{ "preflight", "Preflight on the primary, the maintenance replica and the target", always = true,
  run = function(ctx)
    local r = preflight.run{ source = ctx.source, replica = ctx.replica, target = ctx.target,
      config = ctx.config, resuming = ctx.resuming, dms = function() return ctx:dms() end,
      -- a paused replica is this run's only once its pause step has begun
      replica_pause_expected = ctx:began("pause_replica") }
    ctx:say("%s", preflight.format(r))
    if r.errors > 0 then return nil, ("preflight found %d problem(s); nothing was changed"):format(r.errors) end
    return { errors = r.errors, warnings = r.warnings }
  end }

P:step{ "schema", "Schema (pre-data) and roles from the source to the target",
  run = function(ctx)
    local tools = assert(schema.tools(ctx.target.conn:server_version(), { source = ctx.source.conn:server_version() }))
    if tools.note then ctx:say("%s", tools.note) end
    local dump = assert(schema.dump(ctx.config.source.conninfo, ctx.state_dir, { tools = tools,
      schemas = ctx.config.schemas, exclude_tables = ctx.config.exclude_tables, echo = ctx.print }))
    local roles = assert(schema.copy_roles(ctx.config.source.conninfo, ctx.target, { tools = tools, say = ctx.print,
      schemas = ctx.config.schemas }))
    local source_tables = assert(catalog.tables(ctx.source, { schemas = ctx.config.schemas,
      exclude = ctx.config.exclude_tables }))
    assert(schema.restore_pre_data(ctx.config.target.conninfo, dump, ctx.target, source_tables,
      { dry_run = ctx.dry_run, echo = ctx.print }))
    return { dump = dump.file, list = dump.list, notes = dump.notes, roles_created = roles.created }
  end }

P:step{ "know_data", "Know the data: keys, unique constraints, LOB columns, sizes, write rates; the schema's fingerprint",
  run = function(ctx)
    local list = assert(catalog.tables(ctx.source, { schemas = ctx.config.schemas,
      exclude = ctx.config.exclude_tables }))
    -- what the guard compares the source with until the cutover (DDL is not replicated)
    local fingerprint = assert(drift.fingerprint(ctx.source, { schemas = ctx.config.schemas,
      exclude = ctx.config.exclude_tables }))
    assert(catalog.measure_lobs(ctx.replica, list))
    assert(catalog.write_rates(ctx.source, list, ctx.config.know_data.write_rate_seconds,
      function(s) ctx:sleep(s) end))
    ctx:report_table("Tables", { "table", "size", "rows (est.)", "primary key", "separate unique",
      "largest LOB", "writes/s" }, catalog.summary_rows(list))
    return { tables = list, schema_fingerprint = fingerprint }
  end }

P:step{ "groups", "Group the tables into slots (printed before anything is created)",
  run = function(ctx)
    local cfg = ctx.config
    local g = assert(groups.plan(tables(ctx), { largest_alone = cfg.groups.largest_alone,
      explicit = cfg.groups.explicit, prefix = cfg.slots.prefix, lobs = cfg.lobs,
      batch_apply = cfg.dms.task.batch_apply }))
    ctx:say("%s", groups.format(g))
    return { groups = g }
  end }

P:step{ "slots", "Replication slots, the pglogical node and two sets per slot on the primary; the fence table",
  run = function(ctx)
    local src = ctx.source
    if assert(pglogical.ensure_extension(src)).created then ctx:say("created the pglogical extension") end
    assert(pglogical.ensure_node(src, ctx.config.slots.node, pglogical.node_dsn(ctx.config.source.conninfo)))
    -- migrun.fence on both sides: every slot carries it, so waiting for the
    -- tasks to apply ends on a row seen on the target, never on an LSN
    assert(fence.create(src))
    assert(fence.create(ctx.target))
    local created = {}
    for _, g in ipairs(plan(ctx)) do
      local s = assert(pglogical.create_slot(src, g.slot))
      assert(pglogical.create_sets(src, g.slot))
      assert(pglogical.add_tables(src, g.slot, g.tables, { say = function(l) ctx:warn("%s", l) end }))
      assert(fence.add_slot(src, g.slot))
      created[g.slot] = s.lsn and tostring(s.lsn) or "dry run"
    end
    return { slots = created, fence = fence.KEY }
  end,
  check = function(ctx, facts)
    return pglogical.check_slots(ctx.source, facts.slots)
  end }

P:step{ "pause_replica", "Pause the maintenance replica and capture its replay LSN",
  run = function(ctx)
    local after = pglogical.newest_slot_lsn(ctx.facts.slots.slots)
    local at = assert(replica.pause(ctx.replica, { after = after, say = ctx.print }))
    ctx:say("replica paused; replay LSN %s is where CDC will start", tostring(at))
    return { lsn = tostring(at) }
  end,
  check = function(ctx, facts)
    -- once resume_replica has begun (even if killed in it), not paused is expected
    if ctx:began("resume_replica") then return true end
    return replica.check_paused(ctx.replica, facts.lsn)
  end }

P:step{ "verify_lsn", "Verify the captured LSN on the primary for every slot (bounded peek)",
  run = function(ctx)
    local verified = {}
    for _, g in ipairs(plan(ctx)) do
      local v = assert(pglogical.verify_lsn(ctx.source, g.slot, captured_lsn(ctx)))
      verified[g.slot] = { confirmed_flush_lsn = tostring(v.confirmed_flush_lsn), peeked = v.peeked }
    end
    return { verified = verified }
  end,
  dry_run = function(ctx) return ("would verify every slot at the captured LSN %s"):format(captured_lsn(ctx)) end }

P:step{ "hold_indexes", "Hold back the separate unique indexes (they come back with the post-data)",
  run = function(ctx)
    local held = assert(catalog.separate_unique_indexes(ctx.source, tables(ctx)))
    for _, ix in ipairs(held) do ctx:say("held back until after the load: %s %s", ix.table, ix.definition) end
    -- The target got the pre-data section only: nothing to drop unless a team
    -- restored a full schema there itself.
    assert(catalog.drop_present(ctx.target, held, ctx.print))
    return { held = held }
  end }

P:step{ "full_load", "Full load from the paused replica, in parallel",
  destructive = function(ctx)
    return ("truncate and load %d tables on the target"):format(#tables(ctx))
  end,
  run = function(ctx)
    return steps.load(ctx, tables(ctx), captured_lsn(ctx), "Full load")
  end }

P:step{ "indexes", "Restore the indexes and constraints; verify every one of the source's exists",
  run = function(ctx)
    return steps.restore_indexes(ctx, ctx.facts.schema, tables(ctx))
  end }

-- Materialized views: the schema-only restore creates them empty, nothing
-- carries their rows; populated from the loaded tables (the paused replica
-- says which the source has populated), so the application's reads work on
-- the target from the start and the cutover's refresh can be CONCURRENTLY.
local matviews = require "migrun.matviews"
P:step{ "matviews", "Populate the target's materialized views from the loaded tables",
  run = function(ctx)
    local list = assert(matviews.list(ctx.replica, { schemas = ctx.config.schemas,
      exclude = ctx.config.exclude_tables }))
    local r = assert(matviews.refresh_all(ctx.target, list, { say = ctx.print }))
    ctx:report_table("Materialized views populated", matviews.REFRESH_COLUMNS, r.rows)
    return { refreshed = r.refreshed, unpopulated = r.unpopulated, seconds = r.seconds }
  end }

P:step{ "fidelity", "The DMS boundary: the target as DMS needs it while it applies, the sentinel (undone at cutover)",
  run = function(ctx)
    local bounds = assert(fidelity.inspect(ctx.source, { tables = tables(ctx) }))
    ctx:report_table("The DMS boundary", fidelity.REPORT_COLUMNS, fidelity.report_rows(bounds))
    if bounds.errors > 0 then
      return nil, ("%d feature(s) of the schema DMS cannot carry safely (the DMS boundary table says which and "
        .. "what to do); nothing was changed on the target"):format(bounds.errors)
    end
    local a = assert(fidelity.adapt(ctx.target, bounds, { say = ctx.print }))
    ctx:report_table("Target changes while DMS applies (undone at cutover)", fidelity.CHANGE_COLUMNS, a.changes)
    -- from here on, what anyone but DMS writes on the target is noted for the verification
    assert(steps.install_sentinel(ctx, tables(ctx)))
    return { changes = a.changes, dms = fidelity.dms(bounds) }
  end }

P:step{ "qa", "Quick QA: per-month and exact counts, replica against target",
  run = function(ctx)
    return steps.quick_qa(ctx, tables(ctx))
  end }

P:step{ "resume_replica", "Resume the maintenance replica",
  run = function(ctx)
    assert(replica.resume(ctx.replica))
    return { resumed = true }
  end }

-- Phase II: CDC with DMS ------------------------------------------------------

P:step{ "dms_setup", "DMS endpoints, connection tests, a CDC-only task per slot at the captured LSN",
  run = function(ctx)
    local client, cfg = ctx:dms(), ctx.config
    local boundary = (ctx.facts.fidelity or {}).dms
    local eps = assert(cdc.ensure_endpoints(client, plan(ctx), { name = cfg.name,
      source = cfg.source.conninfo, target = cfg.target.conninfo,
      source_overrides = fidelity.endpoint_overrides("source", cfg.dms.source_endpoint, boundary),
      target_overrides = fidelity.endpoint_overrides("target", cfg.dms.target_endpoint, boundary) }))
    assert(cdc.test_connections(client, cfg.dms.replication_instance_arn, eps))
    local tasks = assert(cdc.ensure_tasks(client, fidelity.task_groups(plan(ctx), boundary), eps, { name = cfg.name,
      instance_arn = cfg.dms.replication_instance_arn, start_lsn = captured_lsn(ctx), task = cfg.dms.task }))
    return { endpoints = eps, tasks = tasks }
  end }

P:step{ "dms_start", "Start the tasks one by one",
  run = function(ctx)
    local s = assert(cdc.start_tasks(ctx:dms(), plan(ctx), ctx.facts.dms_setup.tasks, { name = ctx.config.name,
      pause = ctx.config.dms.start_pause, sleep = function(t) ctx:sleep(t) end, say = ctx.print }))
    return { started = s.started }
  end }

P:step{ "catch_up", "Watch the tasks catch up; verify every table against the primary, under writes", always = true,
  run = function(ctx)
    local bar = ctx:progress{ label = "tasks caught up", total = #plan(ctx), unit = "tasks" }
    local watch = steps.watch_options(ctx, function(st)
      bar:update(cdc.caught_up(st, ctx.config.dms.catch_up.lag_bytes),
        ("largest lag %s, %d apply exception(s)"):format(text.bytes(st.max_lag), st.exceptions))
    end)
    local st = assert(cdc.watch(ctx:dms(), plan(ctx), ctx.facts.dms_setup.tasks, watch))
    bar:finish("every task has caught up")
    ctx:report_table("DMS tasks", cdc.status_table(st))
    if st.exceptions > 0 then ctx:warn("%d row(s) in awsdms_apply_exceptions: look at them before cutover", st.exceptions) end
    -- a value DMS cut is named as such first; then every row of every table
    local lob, lwhy = steps.no_truncation(ctx, plan(ctx), tables(ctx), ctx.facts.dms_setup.tasks,
      "LOB values (primary vs target)")
    if not lob then return nil, lwhy end
    local r, why = steps.live_qa(ctx, "Live verification (primary vs target, under writes)")
    if not r then return nil, why end
    local verified = ("every table verified equal under writes (%d key(s) still changing, compared at cutover)")
      :format(r.pending.keys)
    ctx:say("READY FOR CUTOVER: %d tasks running, largest lag %s, %s", #st.rows, text.bytes(st.max_lag), verified)
    ctx:notify("ready_for_cutover", ("%d tasks running, largest lag %s, %s"):format(#st.rows,
      text.bytes(st.max_lag), verified), { tasks = #st.rows, max_lag = st.max_lag, exceptions = st.exceptions })
    return { ready = true, max_lag = st.max_lag, exceptions = st.exceptions, pending_keys = r.pending.keys }
  end,
  dry_run = "would watch every task catch up (writing a fence row into " .. fence.KEY .. " on the primary "
    .. "and seeing it on the target), then verify every table of the primary and the target under writes "
    .. "(the watch slot " .. "<slots.prefix>watch, row hashes, differences named by key), "
    .. "and look for truncated LOB values (task logs, LOB lengths)" }

os.exit(P:main(arg))
