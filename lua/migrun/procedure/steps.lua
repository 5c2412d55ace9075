--[[
migrun.steps: step bodies that more than one playbook runs the same way
(full.lua on every table, partial_restart.lua on one group's), so that each
playbook keeps only the line that says which tables.

  P:step{ "qa", "Quick QA ...", run = function(ctx) return steps.quick_qa(ctx, tables(ctx)) end }

  steps.load(ctx, tables, at, title) -> { loaded =, seconds = }
      fullload.run from the paused replica (which must still be at `at`),
      with a progress bar, config.full_load's jobs, chunk_bytes, split_bytes
      and analyze. The journal follows it as it goes (facts of the step):
      "loaded" (each table the moment it is complete, as before), "chunks"
      (each split table's plan, its chunks loaded, and the transaction of a
      chunk about to commit), "indexed" and "analyzed" (per table, with their
      times); a rerun loads only the chunks and tables not committed, then
      builds and analyzes what is left. Each table's indexes are those the
      target lacks (schema.table_post_data), built as soon as it is complete.
  steps.restore_indexes(ctx, schema_facts, tables) -> { verified = true } | nil, why
      the post-data section restored from the dump of full.lua's schema
      step: whole on a bare target, else what is not on the target yet
      (foreign keys, triggers, rules...: the indexes came with the load);
      then verify_indexes.
  steps.full_qa_options(ctx) -> the qa.compare options of a full comparison:
      row hashes by key ranges, on both sides at once, over full_load.jobs
      worker processes
  steps.analyze_changed(ctx, tables) -> { analyzed = {"s.t"} }
      ANALYZE on the target of the tables CDC changed enough since their
      last ANALYZE that autovacuum would analyze them next
      (pg_stat_user_tables.n_mod_since_analyze above the server's
      autovacuum_analyze_threshold + autovacuum_analyze_scale_factor x rows).
  steps.verify_indexes(ctx, tables) -> { verified = true } | nil, why
      every index and constraint of the (paused) replica's tables exists on
      the target; each missing one is named.
  steps.quick_qa(ctx, tables [, hashed]) -> facts | nil, why
      per-month and exact counts, replica against target, into the report;
      a difference fails the step with the table of them. hashed: the load
      step's facts.hashed (migrun.loadhash): the tables it proved equal as
      they loaded are not read again, one it found different fails the step.
  steps.watch_options(ctx [, on_status]) -> the cdc.watch options from
      config.dms.catch_up; every poll is also observed (steps.observe), then
      given to on_status(st)
  steps.observe(ctx, st) -> a cdc status seen by people: the slots' lag into
      samples.jsonl (for `status`, the metrics and report.html), and a
      task_failed notification the first time a task is seen failed or stopped
  steps.no_truncation(ctx, groups, tables, tasks, title, opts) -> facts | nil, why
      no LOB value was cut by DMS (migrun.lobs): the tasks' CloudWatch logs
      hold no truncation warning and every LOB column in limited LOB mode has
      the same long values on the primary and the target (compared again
      once every slot has confirmed what the primary had written, unless
      opts.settled; none with opts.logs_only); anything truncated is named
      (table, column, key) and fails the step.
  steps.verification(ctx) -> a migrun.verify Verification of the whole
      migration (full.lua's groups and tables; fences on every slot; whole
      tables hashed on both sides at once, steps.full_qa_options)
  steps.install_sentinel(ctx, tables) -> { installed = n } | nil, err
      migrun.sentinel's triggers on those tables of the target (their keys
      read on the source): what others write behind DMS's back is noted
  steps.live_qa(ctx, title, { whole = {"s.t"} }) -> report | nil, why
      the primary proven equal to the target while the source writes
      (verify's rounds: whole tables the first time or where opts.whole
      says, then the keys that changed); a difference is named by key and
      fails the step; what still changes is left for the cutover.
]]
local catalog = require "migrun.catalog"
local qa = require "migrun.qa"
local fullload = require "migrun.fullload"
local loadprogress = require "migrun.loadprogress"
local schema = require "migrun.schema"
local cdc = require "migrun.cdc"
local lobs = require "migrun.lobs"
local text = require "migrun.text"
local pg = require "migrun.pg"
local verify = require "migrun.verify"
local keydiff = require "migrun.keydiff"
local sentinel = require "migrun.sentinel"
local loadhash = require "migrun.loadhash"

local steps = {}


function steps.load(ctx, tables, at, title)
  -- the load's state is the step's facts themselves: its changes are saved in place
  local state = ctx.facts[ctx.step]
  for _, f in ipairs(fullload.STATE_FIELDS) do state[f] = state[f] or {} end
  ctx:record(state)
  local cfg = ctx.config.full_load
  local size = {}
  for _, t in ipairs(tables) do size[text.key(t)] = t.bytes end
  -- the bar counts on-disk bytes, as its total (COPY bytes are another unit)
  local disk = loadprogress.new(tables, state)
  local post = assert(schema.table_post_data(ctx.replica, ctx.target, tables))
  local bar = ctx:progress{ label = title, total = disk.total, unit = "bytes" }
  local result = assert(fullload.run{
    replica = ctx.config.replica.conninfo, target = ctx.config.target.conninfo,
    tables = tables, jobs = cfg.jobs, chunk_bytes = cfg.chunk_bytes, split_bytes = cfg.split_bytes,
    analyze = cfg.analyze, post = post, expect_replay_lsn = at, dry_run = ctx.dry_run, echo = ctx.print,
    hash = cfg.hash, -- each part hashed on both sides as it commits: the QA step reads nothing again
    reconnect_timeout = cfg.reconnect_timeout, attempts = cfg.attempts, -- a lost connection (docs/faults.md)
    -- journal first: a table or a chunk said loaded is never loaded again
    state = state, save = function(paths) ctx:record_changes(paths) end,
    on_progress = function(_, _, rows, detail)
      bar:update(disk:update(detail), ("%s, %d rows"):format(detail and detail.table or "", rows or 0), {
        rows = rows, part = detail and { key = "stream " .. detail.stream, name = detail.table,
          done = disk:table_done(detail.table), total = size[detail.table], rows = detail.rows } })
    end,
    on_chunk = function(c)
      ctx:say("chunk %d/%d of %s (%s) loaded: %d rows, %s in %s", c.chunk, c.of, c.table, c.range, c.rows,
        text.bytes(c.bytes), text.duration(c.seconds))
    end,
    on_table = function(r)
      ctx:say("loaded %s: %d rows, %s in %s%s", r.table, r.rows, text.bytes(r.bytes), text.duration(r.seconds or 0),
        r.chunks and (" (%d chunks)"):format(r.chunks) or "")
    end,
    on_hashed = function(v)
      if not v.equal then
        ctx:warn("%s as loaded differs from the replica: %d rows there, %d on the target, or the same count with "
          .. "other contents (the QA step names it)", v.table, v.rows[1], v.rows[2])
      end
    end,
    on_post = function(what, r)
      if what == "indexed" then
        ctx:say("indexes of %s built: %d in %s", r.table, r.indexes, text.duration(r.seconds))
      else
        ctx:say("analyzed %s in %s", r.table, text.duration(r.seconds))
      end
    end })
  bar:update(disk:done()) -- every table committed: the whole total
  bar:finish(("%d tables, %s sent as COPY"):format(#result.tables, text.bytes(result.bytes or 0)))
  ctx:report_table(title, { "table", "rows", "bytes", "started", "ended", "seconds", "stream" },
    fullload.report_rows(state.loaded))
  ctx:report_table(title .. ": split tables", { "table", "chunks", "by", "rows", "bytes", "seconds" },
    fullload.split_rows(state.chunks))
  if cfg.hash then ctx:report_table(title .. ": hashed as loaded", loadhash.REPORT_COLUMNS, loadhash.report_rows(state.hashed)) end
  return { loaded = state.loaded, seconds = result.seconds }
end

function steps.restore_indexes(ctx, schema_facts, tables)
  local dump = { file = schema_facts.dump, list = schema_facts.list,
                 tools = assert(schema.tools(ctx.target.conn:server_version(),
                   { source = ctx.source.conn:server_version() })) }
  assert(schema.restore_missing(ctx.config.target.conninfo, dump, ctx.replica, ctx.target, tables,
    { jobs = ctx.config.full_load.jobs, dry_run = ctx.dry_run, echo = ctx.print }))
  return steps.verify_indexes(ctx, tables)
end

function steps.verify_indexes(ctx, tables)
  local missing = catalog.missing_on_target(
    assert(catalog.constraints_and_indexes(ctx.replica, tables)),
    assert(catalog.constraints_and_indexes(ctx.target, tables)))
  if #missing > 0 and not ctx.dry_run then
    for _, m in ipairs(missing) do ctx:warn("missing on the target: %s %s", m.table, m.definition) end
    return nil, ("%d index(es) or constraint(s) of the source are missing on the target"):format(#missing)
  end
  return { verified = true }
end

function steps.quick_qa(ctx, tables, hashed)
  local equal, differ = loadhash.proven(hashed)
  local rest = {}
  for _, t in ipairs(tables) do if not equal[text.key(t)] then rest[#rest + 1] = t end end
  local proven = #tables - #rest
  if ctx.dry_run then
    ctx:say("would compare %d table(s) on the replica and the target", #rest)
    return {}
  end
  if #differ > 0 then
    return nil, ("%d table(s) as loaded differ from the replica (each part hashed on both sides as it committed): "
      .. "%s; load them again (playbooks/partial_restart.lua for a group's tables), or compare them with "
      .. "playbooks/verify.lua to see which rows"):format(#differ, table.concat(differ, ", "))
  end
  if proven > 0 then
    ctx:say("%d of %d table(s) proven equal to the replica as they loaded (row hashes of every part on both sides): "
      .. "not read again", proven, #tables)
  end
  local r = assert(qa.compare(ctx.replica, ctx.target, rest, ctx.config.qa, { mode = "quick" }))
  ctx:report_table("Quick QA (replica vs target)", qa.report_columns(), qa.report_rows(r))
  if r.differences > 0 then
    ctx:say("%s", qa.format(r))
    return nil, ("%d QA difference(s) between the replica and the target"):format(r.differences)
  end
  return { checks = #r.checks, seed = r.seed, hashed_at_load = proven }
end

function steps.full_qa_options(ctx)
  local cfg = ctx.config.full_load
  local total = 0
  for _, t in ipairs(ctx:main_facts().know_data and ctx:main_facts().know_data.tables or {}) do
    total = total + (t.bytes or 0)
  end
  return { mode = "full", jobs = cfg.jobs, chunk_bytes = cfg.chunk_bytes or fullload.chunk_size(total, cfg.jobs),
           a_conninfo = ctx.config.source.conninfo, b_conninfo = ctx.config.target.conninfo }
end

function steps.analyze_changed(ctx, tables)
  local wanted = {}
  for _, t in ipairs(tables) do wanted[text.key(t)] = t end
  local res = assert(ctx.target:query([[
    select schemaname as schema, relname as name, n_mod_since_analyze as changed, n_live_tup as live
      from pg_stat_user_tables
     where n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
             + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(n_live_tup, 0)
     order by 1, 2]]))
  local analyzed, rows = {}, {}
  for row in res:rows() do
    local k = text.key(row.schema, row.name)
    if wanted[k] then
      assert(ctx.target:write("ANALYZE " .. pg.qualify(row.schema, row.name)))
      analyzed[#analyzed + 1] = k
      rows[#rows + 1] = { k, tostring(row.changed), tostring(row.live) }
    end
  end
  ctx:say("%d table(s) analyzed on the target (changed by CDC since their last ANALYZE)", #analyzed)
  ctx:report_table("ANALYZE after CDC", { "table", "rows changed", "rows" }, rows)
  return { analyzed = analyzed }
end

function steps.watch_options(ctx, on_status)
  local c = ctx.config.dms.catch_up
  return { name = ctx.config.name, source = ctx.source, target = ctx.target, lag_bytes = c.lag_bytes,
           timeout = c.timeout, poll = c.poll, sleep = function(t) ctx:sleep(t) end,
           on_status = function(st)
             steps.observe(ctx, st)
             if on_status then on_status(st) end
           end }
end

function steps.observe(ctx, st)
  local tasks = {}
  for _, r in ipairs(st.rows) do
    tasks[#tasks + 1] = { slot = r.slot, task = r.task, status = r.status, exceptions = r.exceptions,
                          lag_bytes = r.lag_bytes ~= math.huge and r.lag_bytes or nil }
    local s = tostring(r.status):lower()
    if (s == "failed" or s == "stopped") and ctx:first_time("task_failed " .. r.task) then
      ctx:notify("task_failed", ("the DMS task %s (%s) is %s%s"):format(r.task, r.slot, s,
        r.failure and (": " .. tostring(r.failure)) or ""),
        { task = r.task, slot = r.slot, status = r.status, failure = r.failure })
    end
  end
  ctx:sample_slots("cdc", { tasks = tasks, exceptions = st.exceptions,
    max_lag = st.max_lag ~= math.huge and st.max_lag or nil })
end

-- The CloudWatch Logs client for the task logs: dms.logs_endpoint_url, else
-- dms.endpoint_url (the emulator serves both in a rehearsal), else AWS's.
local function logs_client(ctx)
  local dms = require "migrun.dms"
  local c = ctx.config.dms
  local client, err = dms.logs_client{ region = c.region, endpoint_url = c.logs_endpoint_url or c.endpoint_url,
    dry_run = ctx.dry_run, on_call = function(line) ctx:_log(line) end }
  if not client then error(err, 0) end
  return client
end

function steps.no_truncation(ctx, groups, tables, tasks, title, opts)
  opts = opts or {}
  local c = ctx.config
  -- logs_only: at the cutover the values were compared already (migrun.verify)
  local columns = opts.logs_only and {} or lobs.columns(groups, tables, { lob_max_kb = c.dms.task.lob_max_kb })
  if ctx.dry_run then
    ctx:say("would read the tasks' logs for LOB truncation warnings and compare %d LOB column(s) "
      .. "of the primary and the target", #columns)
    return {}
  end
  local slots = {}
  for _, g in ipairs(groups) do slots[#slots + 1] = g.slot end
  local r = assert(lobs.check{ source = ctx.source, target = ctx.target, columns = columns,
    dms = ctx:dms(), logs = logs_client(ctx), instance_arn = c.dms.replication_instance_arn,
    tasks = tasks,
    -- While the source writes, a long value may be on its way: wait until
    -- every task has applied a fence written now, and compare again. At the
    -- cutover writes have stopped and every slot has applied already
    -- (opts.settled).
    -- (a fence that does not come through is the error, not a truncation)
    settle = not opts.settled and function()
      return cdc.wait_applied(ctx.source, ctx.target, slots, { timeout = math.min(c.dms.catch_up.timeout, 60),
        poll = 0.2, sleep = function(t) ctx:sleep(t) end })
    end or nil })
  ctx:report_table(title, lobs.report_rows(r))
  if #r.truncated > 0 or #r.log > 0 then
    ctx:say("LOB values truncated by DMS:\n%s", lobs.format(r))
    local first = r.truncated[1] or r.log[1]
    return nil, ("%d LOB value(s) truncated and %d truncation warning(s) in the task logs (first: %s%s); "
      .. "raise the table's LOB limit (lobs.tables[...].max_kb, or lobs.default) or set its truncation_ok "
      .. "= false, then restart its group (playbooks/partial_restart.lua)"):format(#r.truncated, #r.log,
      first.table and (first.table .. (first.column and ("." .. first.column) or "")) or "?",
      first.key and (" " .. first.key) or "")
  end
  ctx:say("no LOB value truncated: %d LOB column(s) compared, no truncation warning in the task logs", #columns)
  return { lob_columns = #columns }
end

-- Every group of the migration and every table, as full.lua planned them:
-- the live verification always covers the whole migration.
local function migration(ctx)
  local f = ctx:main_facts()
  return f.groups and f.groups.groups or {}, f.know_data and f.know_data.tables or {}
end

function steps.verification(ctx)
  local groups, tables = migration(ctx)
  local slots = {}
  for _, g in ipairs(groups) do slots[#slots + 1] = g.slot end
  local c = ctx.config
  return verify.new{ source = ctx.source, target = ctx.target, tables = tables, groups = groups,
    prefix = c.slots.prefix, state_dir = ctx.state_dir, dry_run = ctx.dry_run, say = ctx.print,
    full = steps.full_qa_options(ctx), count_only = c.cutover.count_only,
    fence = function()
      return cdc.wait_applied(ctx.source, ctx.target, slots, { timeout = c.dms.catch_up.timeout,
        poll = 0.2, sleep = function(t) ctx:sleep(t) end })
    end }
end

-- migrun.sentinel on the target's tables: what anyone but DMS writes there
-- from now on is noted for the verification.
function steps.install_sentinel(ctx, tables)
  local keys = {}
  for _, t in ipairs(tables) do
    -- read on the source: in a dry run the target has no table yet
    local key = keydiff.key(ctx.source, t)
    if key == nil then return nil, ("%s: its key could not be read on the source"):format(text.key(t)) end
    keys[text.key(t)] = key and key.columns or false
  end
  return sentinel.install(ctx.target, tables, keys)
end

function steps.live_qa(ctx, title, opts)
  opts = opts or {}
  if ctx.dry_run then
    ctx:say("dry run: would verify every table of the primary against the target while the source writes "
      .. "(the watch slot %swatch on the primary, fence rows, row hashes; differences named by key)",
      ctx.config.slots.prefix)
    return { differences = {}, pending = { keys = 0, tables = 0, whole = {} }, compared = { whole = 0, keys = 0 } }
  end
  local v = assert(steps.verification(ctx))
  local r = assert(v:live{ whole = opts.whole })
  ctx:say("%s", verify.format(r))
  ctx:report_table(title, verify.REPORT_COLUMNS, verify.report_rows(r, select(2, migration(ctx))))
  if #r.differences > 0 then
    return nil, ("%d table(s) differ between the primary and the target (named above, with the keys of the "
      .. "rows where the table has a key): mend those rows with playbooks/repair.lua, or restart the table's group "
      .. "(playbooks/partial_restart.lua); the tasks still run, nothing was changed"):format(#r.differences)
  end
  return r
end

return steps
