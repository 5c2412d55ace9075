--[[
playbooks/cutover.lua: the end of the road, after playbooks/full.lua has said
READY FOR CUTOVER. What DMS leaves undone, as steps:

    migrun playbooks/cutover.lua --config migration.lua [--dry-run] [--yes]
                                 [--from STEP | --only STEP] [--list]

Before writes stop: every task runs and has caught up, the schema is as it
was, ANALYZE of what CDC changed a lot, then, last, no LOB cut by DMS and the
live verification brought up to date (migrun.verify: every table was proven
equal while the source wrote; what changed since is compared now, still under
writes, so that the window gets only what changes after it). The cutover window,
from the source made read-only to the target ready for writes, then costs
what changed in the last seconds, not the size of the database: stop writes
(cutover.stop_writes); wait until every task has applied the primary's last
write (a fence row seen on the target); verify what changed since the live
verification (the watch slot's last changes and the keys still pending,
compared once on a source that no longer moves); set the target's sequences
ahead; refresh the materialized views from the target's own tables; no LOB
truncation in the task logs; the target's definitions as on
the source again (the window ends: the target is ready for writes). Then the
tasks, which have nothing left to apply, are stopped, and the checklist and
the way back are printed. The report states the window and what it was spent
on. Any difference stops it before the target changes hands, and the message
says what was already done and how to undo it.

Copy this file to adapt the procedure; the work is in migrun.cutover, migrun.cdc
and migrun.qa, the machinery in migrun.playbook.
]]
local playbook = require "migrun.playbook"
local steps = require "migrun.steps"
local runbook = require "migrun.runbook"
local cutover = require "migrun.cutover"
local cdc = require "migrun.cdc"
local verify = require "migrun.verify"
local sentinel = require "migrun.sentinel"
local matviews = require "migrun.matviews"
local host = require "migrun.host"
local proc = require "migrun.proc"
local text = require "migrun.text"
local guard = require "migrun.guard"
local drift = require "migrun.drift"

local P = playbook.new{ name = "cutover", title = "Cutover: stop writes, verify what changed, sequences, target ready, stop the tasks" }

-- What the migration's main playbook (playbooks/full.lua) found out and created.
local function plan(ctx) return runbook.known(ctx).groups end
local function tasks(ctx) return runbook.known(ctx).tasks end
local function tables(ctx) return runbook.known(ctx).tables end
local function slots_of(ctx)
  local slots = {}
  for _, g in ipairs(plan(ctx)) do slots[#slots + 1] = g.slot end
  return slots
end
-- Through every step, in a process of its own: WAL, disks, schema drift.
P:watch(guard.watcher())

-- The steps of the cutover window: the source read-only to the target ready.
local WINDOW = { "stop_writes", "wait_applied", "verify", "sequences", "matviews", "no_truncation", "restore_target" }

local function checklist(ctx)
  local list = {}
  for _, g in ipairs(plan(ctx)) do
    list[#list + 1] = { slot = g.slot, task = cdc.task_id(ctx.config.name, g), arn = tasks(ctx)[g.slot] }
  end
  return cutover.checklist{ database = (ctx.facts.stop_writes or {}).database,
    matviews = (ctx.facts.matviews or {}).checklist,
    stop_writes = ctx.config.cutover.stop_writes, tasks = list, target_changes = runbook.known(ctx).changes,
    region = ctx.config.dms.region, endpoint_url = ctx.config.dms.endpoint_url }
end

-- A refusal that says what the cutover had already done.
local function refusal(ctx, why)
  local sw = ctx:done("stop_writes") and (ctx.facts.stop_writes.mode == "command" and ctx.config.cutover.stop_writes
    or ctx.facts.stop_writes.mode) or nil
  return cutover.refusal(why, { stop_writes = sw, sequences = ctx:done("sequences"),
    tasks_stopped = ctx:began("stop_tasks"), target_restored = ctx:done("restore_target") }, checklist(ctx))
end

P:step{ "ready", "Every task of this migration runs and has caught up (full.lua is done); the schema is unchanged",
  run = function(ctx)
    if not ctx:main_done("catch_up") then
      return nil, ("%s has not finished (its catch_up step is not done): run it to the end first")
        :format(ctx.main and ("the main playbook " .. ctx.main) or "playbooks/full.lua")
    end
    local fp, cfg = ctx:main_facts().know_data.schema_fingerprint, ctx.config
    if fp then
      local changes = assert(drift.check(ctx.source, fp, { schemas = cfg.schemas, exclude = cfg.exclude_tables }))
      if #changes > 0 then
        local msg = drift.message(changes, { level = cfg.schema_drift.on_change, taken_at = fp.taken_at,
          config = cfg.config_path })
        if cfg.schema_drift.on_change == "stop" then return nil, msg end
        ctx:warn("%s", msg)
      end
    end
    local st = assert(cdc.watch(ctx:dms(), plan(ctx), tasks(ctx), steps.watch_options(ctx)))
    ctx:report_table("DMS tasks before the cutover", cdc.status_table(st))
    if st.exceptions > 0 then ctx:warn("%d row(s) in awsdms_apply_exceptions: the verification will tell", st.exceptions) end
    return { tasks = #st.rows, max_lag = st.max_lag }
  end }

P:step{ "analyze", "ANALYZE on the target the tables CDC changed a lot since the load analyzed them",
  run = function(ctx) return steps.analyze_changed(ctx, tables(ctx)) end }

-- Last before writes stop, so that the window has only what changes after it.
P:step{ "verify_live", "No LOB cut by DMS; the verification brought up to date, still under writes",
  run = function(ctx)
    local lob, lwhy = steps.no_truncation(ctx, plan(ctx), tables(ctx), tasks(ctx), "LOB values before the cutover")
    if not lob then
      return nil, "refusing to cut over: " .. lwhy .. "; nothing was done, the tasks still run"
    end
    local r, why = steps.live_qa(ctx, "Live verification before the cutover (primary vs target)")
    if not r then return nil, why end
    return { pending_keys = r.pending.keys, pending_whole = r.pending.whole }
  end,
  dry_run = "would look for LOB values DMS cut, then verify what changed since the last verification, under writes" }

P:step{ "stop_writes", "Stop writes on the source (cutover.stop_writes)",
  destructive = function(ctx)
    local c = ctx.config.cutover
    if c.stop_writes == "none" then return nil end
    if type(c.stop_writes) == "table" then return "run " .. proc.quote(c.stop_writes) end
    return "make the source database read-only (ALTER DATABASE ... SET default_transaction_read_only = on)" ..
      (c.existing_sessions == "terminate" and " and terminate the application's sessions opened before" or "")
  end,
  run = function(ctx)
    local t0 = host.now() -- the cutover window starts here
    local c = ctx.config.cutover
    local s = assert(cutover.stop_writes(ctx.source, { stop_writes = c.stop_writes,
      existing_sessions = c.existing_sessions, sessions_timeout = c.sessions_timeout,
      poll = 0.05, sleep = function(t) ctx:sleep(t) end, say = ctx.print, -- in the window: look often
      run_command = function(argv) return ctx:command(argv, { writes = true }) end }))
    if s.mode == "none" then ctx:warn("cutover.stop_writes is \"none\": the application must have stopped writing") end
    return { mode = s.mode, database = s.database, terminated = s.terminated, started = t0 }
  end,
  check = function(ctx, facts)
    if facts.mode ~= "read_only" then return true end
    local ro, err = cutover.is_read_only(ctx.source)
    if ro == nil then return nil, err end
    return ro or nil, "the source database is no longer read-only"
  end }

P:step{ "wait_applied", "Wait until every task has applied the primary's last write (a fence row seen on the target)",
  run = function(ctx)
    local slots = slots_of(ctx)
    local bar = ctx:progress{ label = "tasks past the fence", total = #slots, unit = "tasks" }
    local w = assert(cutover.wait_applied(ctx.source, ctx.target, slots, { timeout = ctx.config.cutover.apply_timeout,
      poll = 0.05, sleep = function(t) ctx:sleep(t) end, on_progress = function(done) bar:update(done) end }))
    if w.dry_run then
      ctx:say("dry run: would wait until the target shows that fence row for %s", table.concat(slots, ", "))
      return {}
    end
    bar:finish(("every task has applied the fence written at %s (LSN %s) in %s"):format(w.written_at,
      tostring(w.lsn), text.duration(w.seconds)))
    ctx:report_table(("Tasks past the fence written at %s (LSN %s)"):format(w.written_at, tostring(w.lsn)),
      { { "slot" }, { "seconds", "seen after", format = text.duration },
        { "confirmed_flush_lsn", "confirmed flush" } }, w.slots)
    return { lsn = tostring(w.lsn), fence = w.seq, seconds = w.seconds }
  end }

P:step{ "verify", "Verify what changed since the live verification (the watch slot's last changes, the keys pending)",
  run = function(ctx)
    local v = assert(steps.verification(ctx))
    -- wait_applied has just seen every task apply a fence written after writes stopped
    local r = assert(v:at_cutover{ fenced = ctx:done("wait_applied") })
    ctx:say("%s", verify.format(r))
    ctx:report_table("Verification at the cutover (primary vs target)", verify.REPORT_COLUMNS,
      verify.report_rows(r, tables(ctx)))
    if #r.whole > 0 then
      ctx:say("hashed whole (no key, or too many keys changed): %s", table.concat(r.whole, ", "))
    end
    if #r.differences > 0 then
      ctx:say("%s", cutover.format_rollback(checklist(ctx)))
      return nil, refusal(ctx, ("%d table(s) differ between the primary and the target"):format(#r.differences))
    end
    return { keys = r.compared.keys, whole = r.whole, changes = r.changes, seconds = r.seconds }
  end,
  dry_run = "would compare the rows the source changed since the live verification (read from the watch slot), "
    .. "and the keys still pending, on the primary and the target" }

P:step{ "sequences", "Set every sequence on the target ahead of the source's last value",
  run = function(ctx)
    local cfg = ctx.config
    local r = assert(cutover.sync_sequences(ctx.source, ctx.target, { schemas = cfg.schemas,
      exclude_tables = cfg.exclude_tables, margin = cfg.cutover.sequence_margin }))
    ctx:report_table("Sequences", cutover.SEQUENCE_COLUMNS, r.rows)
    if #r.missing > 0 then
      return nil, refusal(ctx, ("%d sequence(s) of the source are missing on the target: %s"):format(#r.missing,
        table.concat(r.missing, ", ")))
    end
    ctx:say("%d sequence(s) set %d ahead of the source", r.set, cfg.cutover.sequence_margin)
    return { sequences = #r.rows, set = r.set }
  end }

P:step{ "matviews", "Refresh the materialized views on the target from its own tables (DMS carries none)",
  run = function(ctx)
    local cfg = ctx.config
    local list = assert(matviews.list(ctx.source, { schemas = cfg.schemas, exclude = cfg.exclude_tables }))
    -- no reader on the target yet: a plain REFRESH, several times faster than CONCURRENTLY
    local r = assert(matviews.refresh_all(ctx.target, list, { say = ctx.print, concurrently = false }))
    ctx:report_table("Materialized views refreshed", matviews.REFRESH_COLUMNS, r.rows)
    return { refreshed = r.refreshed, plain = r.plain, unpopulated = r.unpopulated, seconds = r.seconds,
             checklist = matviews.checklist_line(list, r) }
  end }

P:step{ "no_truncation", "No LOB value truncated by DMS: the task logs (the values were compared by the verification)",
  run = function(ctx)
    local r, why = steps.no_truncation(ctx, plan(ctx), tables(ctx), tasks(ctx), "LOB truncation warnings at the cutover",
      { settled = true, logs_only = true })
    if not r then
      ctx:say("%s", cutover.format_rollback(checklist(ctx)))
      return nil, refusal(ctx, why)
    end
    return r
  end }

P:step{ "restore_target", "The target's definitions as on the source again (what full.lua changed for DMS): ready for writes",
  run = function(ctx)
    assert(sentinel.remove(ctx.target)) -- the application writes there from now on
    local r = assert(cutover.restore_target(ctx.target, runbook.known(ctx).changes, { say = ctx.print }))
    ctx:report_table("Target definitions restored", { { "table" }, { "kind", "what" },
      { "object", "column / trigger" }, { "state", "now, as on the source" } }, r.rows)
    ctx:say("%d target change(s) undone, %d already as on the source", r.restored, r.already)
    return { restored = r.restored, already = r.already, ended = host.now() } -- the window ends here
  end }

-- After the window: the source is read-only and every task has applied its
-- last change (the fence), so they have nothing left to write; stopping a
-- DMS task takes a while (tens of seconds on AWS), and the target need not wait.
P:step{ "stop_tasks", "Stop the DMS tasks (they have applied the source's last change)",
  run = function(ctx)
    local s = assert(cutover.stop_tasks(ctx:dms(), plan(ctx), tasks(ctx), { name = ctx.config.name,
      timeout = ctx.config.cutover.stop_timeout, say = ctx.print }))
    return { stopped = s.stopped, already = s.already }
  end }

P:step{ "checklist", "The cutover checklist and the commands to roll back",
  run = function(ctx)
    local cl = checklist(ctx)
    ctx:say("%s", cutover.format_checklist(cl))
    local numbered = {}
    for i, line in ipairs(cl.steps) do numbered[i] = { i, line } end
    ctx:report_table("Cutover checklist", { "#", "do" }, numbered)
    ctx:report_table("Roll back", { "what", "how" }, cl.rollback)
    local w = cutover.window(ctx.journal:steps(P.name), WINDOW, ctx.facts.stop_writes.started,
      ctx.facts.restore_target.ended)
    ctx:say("%s", cutover.format_window(w))
    ctx:report_table(("The cutover window: %s"):format(text.duration(w.seconds)),
      { { "step" }, { "seconds", "time", format = text.duration } }, w.rows)
    ctx:notify("cutover_done", "the cutover is done: the tasks are stopped; the checklist is in the report",
      { checklist = cl.steps })
    return { rollback = cl.rollback, window = w.seconds }
  end }

os.exit(P:main(arg))
