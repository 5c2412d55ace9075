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
  steps.quick_qa(ctx, tables) -> facts | nil, why
      per-month and exact counts, replica against target, into the report;
      a difference fails the step with the table of them.
  steps.watch_options(ctx) -> the cdc.watch options from config.dms.catch_up
  steps.live_qa(ctx, groups, tables, title) -> result | nil, why
      primary against target while CDC runs: per-month counts of rows older
      than a minute (newer ones may be in flight), and a difference compared
      again once every slot has confirmed what the primary had written.
]]
local catalog = require "migrun.catalog"
local qa = require "migrun.qa"
local fullload = require "migrun.fullload"
local schema = require "migrun.schema"
local cdc = require "migrun.cdc"
local text = require "migrun.text"
local pg = require "migrun.pg"

local steps = {}

local function say(ctx) return function(line) ctx:say("%s", line) end end

function steps.load(ctx, tables, at, title)
  local facts = ctx.facts[ctx.step]
  local state = { loaded = facts.loaded or {}, chunks = facts.chunks or {}, indexed = facts.indexed or {},
                  analyzed = facts.analyzed or {} }
  local cfg = ctx.config.full_load
  local total = 0
  for _, t in ipairs(tables) do total = total + (t.bytes or 0) end
  local post = assert(schema.table_post_data(ctx.replica, ctx.target, tables))
  local bar = ctx:progress{ label = title, total = total, unit = "bytes" }
  local result = assert(fullload.run{
    replica = ctx.config.replica.conninfo, target = ctx.config.target.conninfo,
    tables = tables, jobs = cfg.jobs, chunk_bytes = cfg.chunk_bytes, split_bytes = cfg.split_bytes,
    analyze = cfg.analyze, post = post, expect_replay_lsn = at, dry_run = ctx.dry_run, echo = say(ctx),
    -- journal first: a table or a chunk said loaded is never loaded again
    state = state, save = function(field) ctx:record(field, state[field]) end,
    on_progress = function(done, _, rows, detail)
      bar:update(done, ("%s, %d rows"):format(detail and detail.table or "", rows or 0))
    end,
    on_chunk = function(c)
      ctx:say("chunk %d/%d of %s (%s) loaded: %d rows, %s in %s", c.chunk, c.of, c.table, c.range, c.rows,
        text.bytes(c.bytes), text.duration(c.seconds))
    end,
    on_table = function(r)
      ctx:say("loaded %s: %d rows, %s in %s%s", r.table, r.rows, text.bytes(r.bytes), text.duration(r.seconds or 0),
        r.chunks and (" (%d chunks)"):format(r.chunks) or "")
    end,
    on_post = function(what, r)
      if what == "indexed" then
        ctx:say("indexes of %s built: %d in %s", r.table, r.indexes, text.duration(r.seconds))
      else
        ctx:say("analyzed %s in %s", r.table, text.duration(r.seconds))
      end
    end })
  bar:finish(("%d tables, %s"):format(#result.tables, text.bytes(result.bytes or 0)))
  ctx:report_table(title, { "table", "rows", "bytes", "started", "ended", "seconds", "stream" },
    fullload.report_rows(state.loaded))
  ctx:report_table(title .. ": split tables", { "table", "chunks", "by", "rows", "bytes", "seconds" },
    fullload.split_rows(state.chunks))
  return { loaded = state.loaded, seconds = result.seconds }
end

function steps.restore_indexes(ctx, schema_facts, tables)
  local dump = { file = schema_facts.dump, list = schema_facts.list,
                 tools = assert(schema.tools(ctx.target.conn:server_version())) }
  assert(schema.restore_missing(ctx.config.target.conninfo, dump, ctx.replica, ctx.target, tables,
    { jobs = ctx.config.full_load.jobs, dry_run = ctx.dry_run, echo = say(ctx) }))
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

function steps.quick_qa(ctx, tables)
  if ctx.dry_run then
    ctx:say("would compare %d table(s) on the replica and the target", #tables)
    return {}
  end
  local r = assert(qa.compare(ctx.replica, ctx.target, tables, ctx.config.qa, { mode = "quick" }))
  ctx:report_table("Quick QA (replica vs target)", qa.report_columns(), qa.report_rows(r))
  if r.differences > 0 then
    ctx:say("%s", qa.format(r))
    return nil, ("%d QA difference(s) between the replica and the target"):format(r.differences)
  end
  return { checks = #r.checks, seed = r.seed }
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

function steps.watch_options(ctx)
  local c = ctx.config.dms.catch_up
  return { name = ctx.config.name, source = ctx.source, target = ctx.target, lag_bytes = c.lag_bytes,
           timeout = c.timeout, poll = c.poll, sleep = function(t) ctx:sleep(t) end }
end

function steps.live_qa(ctx, groups, tables, title)
  local slots = {}
  for _, g in ipairs(groups) do slots[#slots + 1] = g.slot end
  local before = assert(ctx.source:query("select (now() - interval '1 minute')::text as t"))[1].t
  local r = assert(qa.settled(ctx.source, ctx.target, tables, ctx.config.qa, { before = before,
    wait = function()
      assert(cdc.wait_applied(ctx.source, slots, { timeout = ctx.config.dms.catch_up.timeout,
        poll = 0.2, sleep = function(t) ctx:sleep(t) end }))
    end }))
  ctx:report_table(title, qa.report_columns(), qa.report_rows(r))
  if r.differences > 0 then
    ctx:say("%s", qa.format(r))
    return nil, ("%d difference(s) between the primary and the target persist after catch-up"):format(r.differences)
  end
  return r
end

return steps
