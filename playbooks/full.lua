--[[
playbooks/full.lua: the whole two-phase migration of the runbook, as steps.

    migrun playbooks/full.lua --config migration.lua [--dry-run] [--yes]
                              [--from STEP | --only STEP] [--list]

Phase I (full load): preflight, schema, know the data, groups, slots and sets,
pause the maintenance replica and capture its LSN, verify it on the primary,
hold back the indexes, load in parallel from the frozen replica, restore and
verify the indexes, populate the materialized views, the target as DMS needs
it (migrun.fidelity, undone by cutover.lua), QA, resume the replica. Phase II
(CDC): DMS endpoints and CDC-only tasks at the captured LSN, started one by
one, watched until they have caught up, then every table verified against the
primary while the application writes. Running it again resumes where it
stopped.

Copy this file to adapt the procedure: it is the runbook's steps, in order.
What each does is in migrun.runbook (one function a step, which a copy can
replace by its own), the machinery (journal, resume, dry run, confirmation,
progress, report) in migrun.playbook.
]]
local playbook = require "migrun.playbook"
local runbook = require "migrun.runbook"
local guard = require "migrun.guard"

local P = playbook.new{ name = "full", main = true,
  title = "Full migration: full load from the paused replica, then DMS CDC" }

-- Through every step, in a process of its own: WAL held back by our slots,
-- the disks, the source's schema against know_data's fingerprint.
P:watch(guard.watcher())

-- Phase I: full load ---------------------------------------------------------

P:step{ "preflight", "Preflight on the primary, the maintenance replica and the target", always = true,
  run = runbook.preflight }
P:step{ "schema", "Schema (pre-data) and roles from the source to the target", run = runbook.schema }
P:step{ "know_data", "Know the data: keys, unique constraints, LOB columns, sizes, write rates; the schema's fingerprint",
  run = runbook.know_data }
P:step{ "groups", "Group the tables into slots (printed before anything is created)", run = runbook.groups }
P:step{ "slots", "Replication slots, the pglogical node and two sets per slot on the primary; the fence table",
  run = runbook.slots, check = runbook.check_slots }
P:step{ "pause_replica", "Pause the maintenance replica and capture its replay LSN",
  run = runbook.pause_after_slots, check = runbook.check_paused }
P:step{ "verify_lsn", "Verify the captured LSN on the primary for every slot (bounded peek)",
  run = runbook.verify_captured_lsn, dry_run = runbook.verify_lsn_dry_run }
P:step{ "hold_indexes", "Hold back the separate unique indexes (they come back with the post-data)",
  run = runbook.hold_indexes }
P:step{ "full_load", "Full load from the paused replica, in parallel",
  run = runbook.full_load, destructive = runbook.full_load_destructive }
P:step{ "indexes", "Restore the indexes and constraints; verify every one of the source's exists", run = runbook.indexes }
P:step{ "matviews", "Populate the target's materialized views from the loaded tables", run = runbook.matviews }
P:step{ "fidelity", "The DMS boundary: the target as DMS needs it while it applies, the sentinel (undone at cutover)",
  run = runbook.fidelity }
P:step{ "qa", "QA, replica against target: the load's row hashes; per-month and exact counts where it has none",
  run = runbook.qa }
P:step{ "resume_replica", "Resume the maintenance replica", run = runbook.resume_replica }

-- Phase II: CDC with DMS ------------------------------------------------------

P:step{ "dms_setup", "DMS endpoints, connection tests, a CDC-only task per slot at the captured LSN",
  run = runbook.dms_setup }
P:step{ "dms_start", "Start the tasks one by one", run = runbook.dms_start }
P:step{ "catch_up", "Watch the tasks catch up; verify every table against the primary, under writes", always = true,
  run = runbook.catch_up, dry_run = runbook.catch_up_dry_run }

os.exit(P:main(arg))
