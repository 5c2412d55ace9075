-- playbooks/cutover.lua end to end on the lab and the DMS emulator: refused
-- before full.lua is done; after full.lua under a write workload, a dry run
-- that changes nothing; a row changed on the target stops it before writes
-- stop (the live verification) and, changed again once they have, at the
-- verification of the window, with what was done said and the way back; then,
-- rolled back and under writes again, the cutover to the end: writes refused on the source, every table equal, every
-- sequence on the target ahead of the source, the tasks stopped, the
-- checklist and the way back in the report.
local H = require "helpers.rehearsal"
local pg = require "migrun.pg"

describe("playbooks/cutover.lua", function()
  local R

  setup(function()
    R = H.rehearsal("e2e-cutover", { config = { cutover = {
      stop_writes = "read_only", existing_sessions = "terminate", sessions_timeout = 30,
      sequence_margin = 1000, apply_timeout = 300,
      -- page_views has no primary key: the workload's updates of it cannot replicate
      count_only = { "public.page_views" } } } })
  end)
  teardown(function() if R then R:close() end end)

  local function sql(cluster, q, ...)
    local c = H.connect(cluster, "test")
    local res = assert(c:exec(q, ...))
    local rows = {}
    for r in res:rows() do rows[#rows + 1] = r end
    c:close()
    return rows
  end
  local function read_only()
    return sql(R.lab.source, [[select exists (select 1 from pg_db_role_setting s join pg_database d
      on d.oid = s.setdatabase where d.datname = current_database()
      and 'default_transaction_read_only=on' = any (s.setconfig)) as ro]])[1].ro
  end
  local function sequences(cluster)
    local out = {}
    for _, r in ipairs(sql(cluster, "select sequencename as s, last_value as v from pg_sequences where schemaname = 'public'")) do
      out[r.s] = r.v
    end
    return out
  end
  local function task_statuses()
    local client = assert(R.lab:dms_client())
    local out = {}
    for _, t in ipairs(assert(client:describe_replication_tasks())) do out[#out + 1] = t.Status end
    table.sort(out)
    return table.concat(out, ",")
  end
  local function cutover_journal()
    local j = H.journal(R)
    return j and j.playbooks.cutover
  end

  it("refuses to start before full.lua has finished, changing nothing", function()
    local r = H.run(R, "cutover.lua", { "--yes" })
    assert.falsy(r.ok, r.output)
    assert.truthy(r.output:find("full.lua has not finished", 1, true), r.output)
    assert.is_false(read_only())
  end)

  it("after full.lua: a dry run, refusals before and after writes stop, then the cutover under writes", function()
    R:start_workload{ rate = 20 }
    local full = H.run(R, "full.lua", { "--yes" })
    assert.is_true(full.ok, full.output)
    assert.truthy(full.output:find("READY FOR CUTOVER", 1, true), full.output)
    local plan = H.journal(R).playbooks.full.steps.groups.facts.groups
    local all_running = ("running,"):rep(#plan):sub(1, -2)

    -- 1. dry run: every write shown, nothing changed
    local seq_before, journal_before = sequences(R.lab.target), cutover_journal()
    local d = H.run(R, "cutover.lua", { "--dry-run" })
    assert.is_true(d.ok, d.output)
    for _, expected in ipairs{ "would ask: make the source database read-only", "default_transaction_read_only = on",
        "pg_terminate_backend", "setval", "StopReplicationTask", "Cutover checklist", "RESET default_transaction_read_only",
        "begin read write", 'insert into "migrun"."fence"' } do
      assert.truthy(d.output:find(expected, 1, true), "the dry run did not show " .. expected .. "\n" .. d.output)
    end
    assert.is_false(read_only())
    assert.equal(all_running, task_statuses())
    assert.same(seq_before, sequences(R.lab.target))
    assert.same(journal_before, cutover_journal(), "a dry run wrote the journal")
    assert.truthy(R.workload, "the workload was stopped")

    -- 2. a row changed on the target behind DMS's back: the verification before writes stop finds it,
    --    by key; nothing was done
    local original = sql(R.lab.target, "select title from documents where id = 1")[1].title
    sql(R.lab.target, "update documents set title = 'changed on the target' where id = 1")
    local refused = H.run(R, "cutover.lua", { "--yes" })
    assert.falsy(refused.ok, refused.output)
    assert.truthy(refused.output:find("public.documents: id 1 differs (1 key)", 1, true), refused.output)
    assert.truthy(refused.output:find("the tasks still run, nothing was changed", 1, true), refused.output)
    assert.equal("failed", cutover_journal().steps.verify_live.status)
    assert.is_false(read_only())
    assert.equal(all_running, task_statuses())
    sql(R.lab.target, "update documents set title = $1 where id = 1", original)

    -- 3. the same once writes have stopped: the verification at the cutover finds it, and the
    --    refusal says what was done (the source is read-only) and how to undo it
    for _, step in ipairs{ "ready", "analyze", "verify_live" } do
      local before = H.run(R, "cutover.lua", { "--yes", "--only", step })
      assert.is_true(before.ok, before.output)
    end
    sql(R.lab.target, "update documents set title = 'changed on the target' where id = 1")
    refused = H.run(R, "cutover.lua", { "--yes", "--from", "stop_writes" })
    assert.falsy(refused.ok, refused.output)
    assert.truthy(refused.output:find("public.documents: id 1 differs (1 key)", 1, true), refused.output)
    assert.truthy(refused.output:find("so far the source database is read-only", 1, true), refused.output)
    assert.truthy(refused.output:find("the DMS tasks still run", 1, true), refused.output)
    assert.equal("failed", cutover_journal().steps.verify.status)
    assert.is_nil(cutover_journal().steps.stop_tasks)
    assert.equal(all_running, task_statuses())
    assert.is_true(read_only())
    local workload = R:stop_workload()
    assert.truthy(workload:find("writes refused", 1, true), workload)

    -- roll back as the refusal says, repair the target, writes again
    local rollback = refused.output:match("(BEGIN READ WRITE; ALTER DATABASE [^\n]*; COMMIT;)")
    assert.truthy(rollback, refused.output)
    sql(R.lab.source, rollback)
    sql(R.lab.target, "update documents set title = $1 where id = 1", original)
    assert.is_false(read_only())
    R:start_workload{ rate = 20, seed = 2 }

    -- resuming would find the source no longer read-only
    local stale = H.run(R, "cutover.lua", { "--yes" })
    assert.falsy(stale.ok, stale.output)
    assert.truthy(stale.output:find("no longer read-only", 1, true), stale.output)

    -- 3. the cutover from the start, the workload still writing
    local c = H.run(R, "cutover.lua", { "--yes", "--from", "ready" })
    assert.is_true(c.ok, c.output)
    workload = R:stop_workload()
    -- the window, step by step
    local window = c.output:match("the cutover window: ([%d.]+) s from the source made read%-only")
    assert.truthy(window, c.output)
    assert.truthy(workload:find("writes refused", 1, true), workload)
    assert.truthy(c.output:find("Cutover checklist", 1, true), c.output)

    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))
    local src, tgt = sequences(R.lab.source), sequences(R.lab.target)
    local n = 0
    for name, v in pairs(src) do
      n = n + 1
      assert.is_true(tgt[name] ~= nil and tgt[name] ~= pg.null, name .. " not set on the target")
      if v ~= pg.null then assert.is_true(tgt[name] > v, ("%s: target %s, source %s"):format(name, tgt[name], v)) end
    end
    assert.equal(25, n, "the sample has 25 sequences (every table but page_views)")
    assert.equal(("stopped,"):rep(#plan):sub(1, -2), task_statuses())
    assert.is_true(read_only())
    local report = assert(io.open(R.config.state_dir .. "/report.md")):read("a")
    for _, section in ipairs{ "Cutover checklist", "Roll back", "Sequences", "Verification at the cutover",
        "The cutover window",
        "RESET default_transaction_read_only", "resume-processing" } do
      assert.truthy(report:find(section, 1, true), "report lacks " .. section)
    end
    assert.falsy(report:find(R.lab.password, 1, true))
    assert.falsy(c.output:find(R.lab.password, 1, true))
  end)
end)
