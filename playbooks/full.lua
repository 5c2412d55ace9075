--[[
playbooks/full.lua: the whole two-phase migration of the runbook, as steps.

    migrun playbooks/full.lua --config migration.lua [--dry-run] [--yes]
                              [--from STEP | --only STEP] [--list]

Phase I (full load): preflight, schema, know the data, groups, slots and
sets, pause the maintenance replica and capture its LSN, verify it on the
primary, hold back the indexes, load in parallel from the frozen replica,
restore and verify the indexes, QA, resume the replica. Phase II (CDC): DMS
endpoints and CDC-only tasks at the captured LSN, started one by one, watched
until they have caught up. Running it again resumes where it stopped.

Copy this file to adapt the procedure; the machinery (journal, resume,
dry run, confirmation, progress, report) lives in migrun.playbook and the
work in the migrun.* modules, so each step here is only what the runbook says.
]]
local playbook = require "migrun.playbook"
local steps = require "migrun.steps"

local P = playbook.new{ name = "full", title = "Full migration: full load from the paused replica, then DMS CDC" }

P:watch{ "wal_guard", run = steps.wal_guard }

-- Phase I: full load --------------------------------------------------------

P:step{ "preflight", "Preflight on the primary, the maintenance replica and the target",
  always = true, run = steps.preflight }

P:step{ "schema", "Schema and roles from the source to the target (pre-data)",
  run = steps.schema, check = steps.check_schema }

P:step{ "know_data", "Know the data: keys, unique constraints, LOB columns, sizes, write rates",
  run = steps.know_data }

P:step{ "groups", "Group the tables into slots (printed before anything is created)",
  run = steps.groups }

P:step{ "slots", "Replication slots, the pglogical node and two sets per slot on the primary",
  run = steps.slots, check = steps.check_slots }

P:step{ "pause_replica", "Pause the maintenance replica and capture its replay LSN",
  run = steps.pause_replica, check = steps.check_replica_paused }

P:step{ "verify_lsn", "Verify the captured LSN on the primary for every slot (bounded peek)",
  run = steps.verify_lsn }

P:step{ "hold_indexes", "Hold back the target's indexes and separate unique constraints",
  run = steps.hold_indexes }

P:step{ "full_load", "Full load from the paused replica, in parallel",
  destructive = steps.full_load_warning, run = steps.full_load, check = steps.check_replica_paused }

P:step{ "indexes", "Restore the indexes and constraints; verify every one of the source's exists",
  run = steps.restore_indexes }

P:step{ "qa", "Quick QA: per-month and exact counts, replica against target",
  run = steps.quick_qa }

P:step{ "resume_replica", "Resume the maintenance replica",
  run = steps.resume_replica }

-- Phase II: CDC with DMS -----------------------------------------------------

P:step{ "dms_setup", "DMS endpoints, connection tests, a CDC-only task per slot at the captured LSN",
  run = steps.dms_setup }

P:step{ "dms_start", "Start the tasks one by one",
  run = steps.dms_start }

P:step{ "catch_up", "Watch the tasks catch up; final QA against the primary",
  always = true, run = steps.catch_up }

os.exit(P:main(arg))
