--[[
playbooks/full_restart.lua: the runbook's "Full Restart" — the attempt is
scrapped and the migration starts again from the beginning of full.lua.

    migrun playbooks/full_restart.lua --config migration.lua [--dry-run] [--yes]

Keeps the failure state of every task for the report, stops and deletes
every DMS task and endpoint of this migration (found by the identifiers
migrun.cdc gives them), drops its replication sets, slots, pglogical node and
fence table (migrun.fence) on the primary, resumes the maintenance replica if
a run left it paused, and empties the target as restart.target in the config
says: "truncate" (the default: the migrated tables are emptied, their schema
stays) or "drop_schema" (the migrated schemas are dropped and restored
again); the fence table goes there too.

Then the journal, the reports and the log move to state_dir/attempt-<n>/, and the
migration's main playbook (full.lua, or the team's copy of it: the journal
names it) runs from its first step with a fresh journal, as a child of this
migrun that dies with it, with the same --config, --state-dir and --yes; its
exit status is this playbook's (migrun.playbook's then_run). With
"truncate", the new journal starts with the main playbook's schema step done
(copied from the old one): the target still has the tables, indexes and
roles. If full.lua stops, run full.lua again to resume it: running
full_restart.lua again tears down the new attempt and starts another one.
]]
local playbook = require "migrun.playbook"
local restart = require "migrun.restart"
local catalog = require "migrun.catalog"
local pglogical = require "migrun.pglogical"
local replica = require "migrun.replica"
local fence = require "migrun.fence"
local watch = require "migrun.watch"
local verify = require "migrun.verify"
local guard = require "migrun.guard"

local P = playbook.new{ name = "full_restart",
  title = "Full restart: take this migration's DMS and pglogical objects down, empty the target, start again" }

-- What the main playbook (full.lua) found out and created.
local function full(ctx) return ctx:main_facts() end

-- WAL and disks are watched while the attempt is taken down; the schema is
-- not (a changed schema is a reason to start again).
P:watch(guard.watcher{ drift = false })

-- The groups of the attempt: full.lua's plan, or (a run that failed before
-- planning) migrun's slots found on the primary.
local function plan(ctx)
  local f = full(ctx)
  if f.groups and f.groups.groups then return f.groups.groups end
  local list = assert(pglogical.slots(ctx.source, { prefix = ctx.config.slots.prefix }))
  local groups = {}
  for _, s in ipairs(list) do
    if s.owned then groups[#groups + 1] = { slot = s.name, name = s.name, tables = {} } end
  end
  return groups
end

-- The migrated tables: what full.lua measured, else what it would.
local function tables(ctx)
  local f = full(ctx)
  if f.know_data and f.know_data.tables then return f.know_data.tables end
  return assert(catalog.tables(ctx.source, { schemas = ctx.config.schemas, exclude = ctx.config.exclude_tables }))
end

local function slots_of(groups)
  local names = {}
  for i, g in ipairs(groups) do names[i] = g.slot end
  return table.concat(names, ", ")
end

P:step{ "preserve_failure", "Keep the failure state of every task for the report",
  run = function(ctx)
    local f = full(ctx)
    local state = assert(restart.preserve_failure(ctx:dms(), plan(ctx), f.dms_setup and f.dms_setup.tasks,
      { name = ctx.config.name, source = ctx.source, target = ctx.target, prefix = ctx.config.slots.prefix }))
    for _, t in ipairs(restart.report_tables(state)) do ctx:report_table(t.title, t.columns, t.rows) end
    for _, t in ipairs(state.tasks) do
      ctx:say("%s: task %s is %s%s", t.slot, t.task, t.status, t.failure and (": " .. t.failure) or "")
    end
    return { state = state }
  end }

P:step{ "dms_teardown", "Stop and delete every DMS task and endpoint of this migration",
  destructive = function(ctx)
    local groups = plan(ctx)
    return ("delete the DMS tasks and endpoints of migration %s (%d group(s))"):format(ctx.config.name, #groups)
  end,
  run = function(ctx)
    local r = assert(restart.teardown_dms(ctx:dms(), plan(ctx), { name = ctx.config.name }))
    for id, how in pairs(r.tasks) do ctx:say("task %s: %s", id, how) end
    for id, how in pairs(r.endpoints) do ctx:say("endpoint %s: %s", id, how) end
    return r
  end }

P:step{ "source_teardown", "Drop the replication sets, slots and pglogical node on the primary",
  destructive = function(ctx)
    return ("drop the slots %s, their sets, the node %s, the fence table %s and the watch slot %s on the primary")
      :format(slots_of(plan(ctx)), ctx.config.slots.node, fence.KEY, watch.slot_name(ctx.config.slots.prefix))
  end,
  run = function(ctx)
    local r = assert(restart.teardown_source(ctx.source, plan(ctx), ctx.config.slots.node,
      { watch_slot = watch.slot_name(ctx.config.slots.prefix) }))
    -- the live verification starts afresh with the next full.lua
    if not ctx.dry_run then verify.reset(ctx.state_dir) end
    ctx:say("slots: %s; %d set(s) dropped; node %s: %s; %s: %s", slots_of(plan(ctx)), r.sets,
      ctx.config.slots.node, r.node, fence.KEY, r.fence)
    return r
  end }

P:step{ "resume_replica", "Resume the maintenance replica if a run left it paused",
  run = function(ctx)
    assert(replica.resume(ctx.replica))
    return { resumed = true }
  end }

P:step{ "empty_target", "Empty the target (restart.target: truncate or drop_schema)",
  destructive = function(ctx)
    if ctx.config.restart.target == "drop_schema" then
      return ("drop and recreate the migrated schemas on the target (%s), drop %s there"):format(
        table.concat(ctx.config.schemas or { "every migrated schema" }, ", "), fence.KEY)
    end
    return ("truncate the %d migrated tables on the target, drop %s there"):format(#tables(ctx), fence.KEY)
  end,
  run = function(ctx)
    local r = assert(restart.empty_target(ctx.target, tables(ctx),
      { how = ctx.config.restart.target, schemas = ctx.config.schemas }))
    ctx:say("target emptied (%s)", r.how)
    return r
  end }

-- Then the attempt's journal is set aside and the main playbook runs again
-- from its first step; with "truncate" the target kept its schema, indexes
-- and roles, so its schema step is carried over as done.
P:then_run{ "main", fresh_journal = true,
  carry = function(ctx) return ctx.config.restart.target == "truncate" and { "schema" } or {} end }

os.exit(P:main(arg))
