--[[
playbooks/partial_restart.lua: the runbook's "Partial Restart" — every group
but one is healthy, so only that group's slot and tables are migrated again.

    migrun playbooks/partial_restart.lua <slot> --config migration.lua [--dry-run] [--yes]
                                         [--from STEP | --only STEP] [--list]

Keeps the failure state for the report first, stops that group's DMS task,
truncates its tables on the target, drops and recreates its slot and
replication sets, pauses the maintenance replica at a new LSN and verifies
it, reloads just those tables from the paused replica, verifies their
indexes, QAs them, resumes the replica, then replaces the task (DMS cannot
move a task's start position: the old one is deleted and one of the same
identifier created at the new LSN, on the same endpoints) and watches it
catch up. The other groups' tasks are never touched. A slot that full.lua did
not create for this migration is refused before anything changes.

Journal: each partial restart of a slot has its own section,
"partial_restart-<slot>"; running the same command again resumes it where it
stopped. Once one has finished, a later partial restart of the same slot gets
a new section ("partial_restart-<slot>-2", ...) and starts from the top. The
new task's ARN replaces the old one in full.lua's dms_setup facts, so
`full.lua` (its catch_up step) and later playbooks watch the task that runs.
]]
local playbook = require "migrun.playbook"
local steps = require "migrun.steps"
local runbook = require "migrun.runbook"
local restart = require "migrun.restart"
local fidelity = require "migrun.fidelity"
local pglogical = require "migrun.pglogical"
local cdc = require "migrun.cdc"
local sentinel = require "migrun.sentinel"
local guard = require "migrun.guard"
local lsn = require "migrun.lsn"
local text = require "migrun.text"

local P = playbook.new{ name = "partial_restart",
  title = "Partial restart: one group's slot, tables and DMS task again, the others untouched",
  args = { { "slot", "the slot of the group to migrate again, e.g. dms_slot_02",
    -- it names the journal section and the report: a slot name or nothing (issue 21)
    check = function(v)
      if not v:match("^[a-z0-9_]+$") or #v > 63 then
        return "expected one of this migration's slots (lower-case letters, digits and _, at most 63 bytes: "
          .. "full.lua's report lists them)"
      end
    end } },
  -- each partial restart of a slot has its own journal section (see the header)
  section = function(args) return "partial_restart-" .. args.slot end, new_section_after = "catch_up" }

-- What the main playbook (full.lua) and earlier steps found out.
local function full(ctx) return ctx:main_facts() end
local function slot(ctx) return ctx.args.slot end
local function group(ctx) return ctx.facts.refuse_foreign.group end
local function tables(ctx) return ctx.facts.refuse_foreign.tables end
local function new_lsn(ctx) return lsn(ctx.facts.pause_replica.lsn) end

-- Through every step, in a process of its own: WAL, disks, schema drift.
P:watch(guard.watcher())

P:step{ "refuse_foreign", "Only a slot of this migration, after full.lua set up DMS", always = true,
  run = function(ctx)
    local f = full(ctx)
    if not (f.groups and f.groups.groups and ctx:main_done("dms_setup")) then
      return nil, "full.lua has not set up DMS yet: resume it (`migrun playbooks/full.lua`); nothing was changed"
    end
    local g = assert(restart.group_of(f.groups.groups, slot(ctx), ctx.source, ctx.config.slots.prefix))
    -- the group's tables with what know_data measured (sizes order the load and the QA)
    local known = {}
    for _, t in ipairs(f.know_data.tables) do known[text.key(t)] = t end
    local list = {}
    for _, t in ipairs(g.tables) do list[#list + 1] = known[text.key(t)] or t end
    local names = {}
    for i, t in ipairs(list) do names[i] = text.key(t) end
    ctx:say("%s: %d table(s): %s", g.slot, #list, table.concat(names, ", "))
    return { group = g, tables = list }
  end }

P:step{ "preserve_failure", "Keep the failure state for the report: task, statistics, apply exceptions, slot",
  run = function(ctx)
    local old_arn = full(ctx).dms_setup.tasks[slot(ctx)]
    local state = assert(restart.preserve_failure(ctx:dms(), { group(ctx) }, { [slot(ctx)] = old_arn },
      { name = ctx.config.name, source = ctx.source, target = ctx.target, prefix = ctx.config.slots.prefix }))
    for _, t in ipairs(restart.report_tables(state)) do ctx:report_table(t.title, t.columns, t.rows) end
    local t = state.tasks[1]
    ctx:say("%s: task %s is %s%s", slot(ctx), t.task, t.status, t.failure and (": " .. t.failure) or "")
    return { old_arn = old_arn, state = state }
  end }

P:step{ "stop_task", "Stop the group's DMS task (if it runs)",
  run = function(ctx)
    local r = assert(cdc.stop_task(ctx:dms(), ctx.facts.preserve_failure.old_arn))
    ctx:say("task of %s: %s", slot(ctx), r)
    return { result = r }
  end }

P:step{ "truncate", "Truncate the group's tables on the target",
  destructive = function(ctx)
    local names = {}
    for i, t in ipairs(tables(ctx)) do names[i] = text.key(t) end
    return ("truncate %d table(s) of %s on the target (%s)"):format(#names, slot(ctx), table.concat(names, ", "))
  end,
  run = function(ctx)
    -- first, the live verification forgets these tables: they are hashed whole again once reloaded
    local names = {}
    for i, t in ipairs(tables(ctx)) do names[i] = text.key(t) end
    assert(assert(steps.verification(ctx)):forget(names))
    -- and its sentinel leaves them alone while they are emptied and reloaded
    assert(sentinel.remove(ctx.target, tables(ctx)))
    assert(restart.truncate(ctx.target, tables(ctx)))
    return { truncated = #tables(ctx) }
  end }

P:step{ "slot", "Drop and recreate the slot and its two replication sets; add the tables again",
  run = function(ctx)
    local src, s = ctx.source, slot(ctx)
    -- the live verification's watch slot decodes every set: it leaves these out while they are recreated
    local verification = assert(steps.verification(ctx))
    assert(verification:suspend_sets(s))
    assert(pglogical.drop_sets(src, s))
    assert(pglogical.drop_slot(src, s))
    local created = runbook.group_slot(ctx, s, tables(ctx))
    assert(verification:resume_sets())
    return { lsn = created ~= "dry run" and created or nil }
  end,
  check = function(ctx, facts)
    return pglogical.check_slots(ctx.source, { [slot(ctx)] = facts.lsn })
  end }

P:step{ "pause_replica", "Pause the maintenance replica after the new slot; capture its LSN",
  run = function(ctx) return runbook.pause_replica(ctx, ctx.facts.slot.lsn) end, check = runbook.check_paused }

P:step{ "verify_lsn", "Verify the new LSN on the primary for the new slot (bounded peek)",
  run = function(ctx) return runbook.verify_lsn(ctx, { slot(ctx) }, new_lsn(ctx)) end,
  dry_run = function(ctx) return ("would verify %s at %s"):format(slot(ctx), tostring(new_lsn(ctx))) end }

P:step{ "reload", "Reload the group's tables from the paused replica (their indexes are in place)",
  run = function(ctx)
    return steps.load(ctx, tables(ctx), new_lsn(ctx), "Reload")
  end }

P:step{ "indexes", "Restore any missing index or constraint of the group's tables; verify every one",
  run = function(ctx)
    return steps.restore_indexes(ctx, full(ctx).schema, tables(ctx))
  end }

P:step{ "qa", "Quick QA of the group's tables, replica against target",
  run = function(ctx)
    return steps.quick_qa(ctx, tables(ctx), ctx.facts.reload and ctx.facts.reload.hashed)
  end }

P:step{ "resume_replica", "Resume the maintenance replica", run = runbook.resume_replica }

P:step{ "replace_task", "Replace the group's DMS task with one starting at the new LSN",
  run = function(ctx)
    local cfg, overrides = ctx.config, runbook.dms_endpoint_overrides(ctx)
    local boundary = runbook.known(ctx).boundary -- the DMS boundary full.lua found (migrun.fidelity)
    local r = assert(restart.replace_task(ctx:dms(), fidelity.task_groups({ group(ctx) }, boundary)[1], { name = cfg.name,
      old_arn = ctx.facts.preserve_failure.old_arn, instance_arn = cfg.dms.replication_instance_arn,
      start_lsn = new_lsn(ctx), task = cfg.dms.task, source = cfg.source.conninfo, target = cfg.target.conninfo,
      source_overrides = overrides.source, target_overrides = overrides.target }))
    ctx:say("old task: %s; new task %s at %s", r.deleted, tostring(r.arn), tostring(new_lsn(ctx)))
    -- the main playbook's facts name the task that runs now
    local tasks = full(ctx).dms_setup.tasks
    tasks[slot(ctx)] = r.arn
    ctx:record_main("dms_setup", "tasks", tasks)
    return { arn = r.arn, old = r.deleted }
  end }

P:step{ "start_task", "Start the new task",
  run = function(ctx)
    local s = assert(cdc.start_tasks(ctx:dms(), { group(ctx) }, { [slot(ctx)] = ctx.facts.replace_task.arn },
      { name = ctx.config.name, say = ctx.print }))
    return { started = s.started }
  end }

P:step{ "catch_up", "Watch the new task catch up; QA the group's tables against the primary", always = true,
  run = function(ctx)
    local tasks = { [slot(ctx)] = ctx.facts.replace_task.arn }
    local st = assert(cdc.watch(ctx:dms(), { group(ctx) }, tasks, steps.watch_options(ctx)))
    ctx:report_table("DMS task", cdc.status_table(st))
    -- the group's tables were reloaded: hashed whole again; the others by what changed
    local reloaded = {}
    for i, t in ipairs(tables(ctx)) do reloaded[i] = text.key(t) end
    assert(steps.install_sentinel(ctx, tables(ctx)))
    local r, why = steps.live_qa(ctx, "Live verification (primary vs target, under writes)", { whole = reloaded })
    if not r then return nil, why end
    ctx:say("%s has caught up: lag %s; its %d table(s) verified equal again under writes", slot(ctx),
      text.bytes(st.max_lag), #reloaded)
    return { caught_up = true, max_lag = st.max_lag }
  end,
  dry_run = function(ctx) return ("would watch the task of %s catch up, then compare its tables"):format(slot(ctx)) end }

os.exit(P:main(arg))
