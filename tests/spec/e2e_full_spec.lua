-- playbooks/full.lua end to end on the lab and the DMS emulator, under a
-- write workload: a dry run that changes nothing, then a real run killed with
-- SIGKILL during the full load and again during the DMS phase, which still
-- ends with the target equal to the source and nothing created twice.
local H = require "helpers.rehearsal"
local cjson = require "cjson"

describe("playbooks/full.lua", function()
  local R

  -- chunks of 1 MiB: the larger sample tables are cut, so that the kill in
  -- the full load lands between two chunks of one table
  setup(function() R = H.rehearsal("e2e-full", { config = { full_load = { chunk_bytes = 1048576,
    split_bytes = 1048576 } } }) end)
  teardown(function() if R then R:close() end end)

  it("--dry-run reads everything, prints every write, and changes nothing anywhere", function()
    local before = H.world(R)
    local r = H.run(R, "full.lua", { "--dry-run" })
    assert.is_true(r.ok, r.output)
    local after = H.world(R)
    assert.same(before, after)
    assert.equal("not paused", after.replica_paused)
    -- the writes were shown: SQL on the source and the replica, the commands, the DMS calls
    for _, expected in ipairs{ "pglogical.create_node", "pg_create_logical_replication_slot",
        "pglogical.create_replication_set", "pg_wal_replay_pause", "--section=pre-data",
        "--section=post-data", "COPY ", "CreateEndpoint", "CreateReplicationTask", "StartReplicationTask",
        'create table if not exists "migrun"."fence"', "row_filter", "would watch every task catch up (writing a fence row" } do
      assert.truthy(r.output:find(expected, 1, true), "dry run did not show " .. expected .. "\n" .. r.output)
    end
    assert.is_nil(io.open(R.config.state_dir .. "/journal.json"), "a dry run wrote the journal")
    assert.falsy(r.output:find(R.lab.password, 1, true), "the password was printed")
    assert.falsy(r.output:find(R.lab.dms.secret_key, 1, true), "the AWS secret was printed")
  end)

  it("migrates under writes, survives SIGKILL in the full load and in the DMS phase, ends equal", function()
    R:start_workload{ rate = 30 }

    -- 1. killed at the start of the full load; then one row in the middle of
    --    events holds its chunk on the target while the others commit, and
    --    the run is killed once chunks are journaled loaded
    local r0 = H.run(R, "full.lua", { "--yes" }, { kill_when = "^%d%d:%d%d:%d%d full_load: " })
    assert.is_true(r0.killed, r0.output)
    local middle = assert(R.lab.source:psql("select max(id) / 2 from public.events"))
    assert(R.lab.target:psql(([[
      create function public.hold() returns trigger language plpgsql as $$
      begin if new.id = %s then perform pg_sleep(30); end if; return new; end $$;
      create trigger hold before insert on public.events for each row execute function public.hold();]]):format(middle)))
    local r1 = H.run(R, "full.lua", { "--yes" }, { kill_when = "^%d%d:%d%d:%d%d chunk %d+/%d+ of public%.events " })
    -- the held backend sleeps on, its client gone: ended, as a dropped connection's would be
    assert(R.lab.target:psql("select pg_terminate_backend(pid) from pg_stat_activity where wait_event = 'PgSleep'"))
    assert(R.lab.target:psql("drop trigger hold on public.events; drop function public.hold()"))
    assert.is_true(r1.killed, r1.output)
    local status, rec = H.step_status(R, "full_load")
    assert.equal("running", status, "the kill came too late to test a resumed full load:\n" .. r1.output)
    local split = "public.events"
    local cs = rec.facts.chunks[split]
    local done, of = 0, cs.plan.count
    for _ in pairs(cs.done) do done = done + 1 end
    assert.is_true(done >= 1 and done < of, cjson.encode(cs) .. "\n" .. r1.output)

    -- 2. resumed (the chunks loaded are not loaded again); killed once the first DMS task has started
    local r2 = H.run(R, "full.lua", { "--yes" }, { kill_when = "started .*%-cdc" })
    assert.is_true(r2.killed, r2.output)
    local quoted = split:gsub("%p", "%%%0")
    -- the journaled ones, and any whose transaction the target says committed
    local already = tonumber(r2.output:match(("split %s %%(.-%%) into %d chunks by .-, (%%d+) already loaded"):format(
      quoted, of)))
    assert.truthy(already, r2.output)
    assert.is_true(already >= done, r2.output)
    local reloaded = 0
    for _ in r2.output:gmatch("chunk %d+/%d+ of " .. quoted .. " ") do reloaded = reloaded + 1 end
    assert.equal(of - already, reloaded, r2.output)
    assert.equal("done", (H.step_status(R, "full_load")))
    assert.equal("running", (H.step_status(R, "dms_start")))

    -- 3. resumed to the end
    local r3 = H.run(R, "full.lua", { "--yes" })
    assert.is_true(r3.ok, r3.output)
    assert.truthy(r3.output:find("READY FOR CUTOVER", 1, true), r3.output)

    -- after the writes stop and the tasks have applied them, every table is equal,
    -- except what pglogical cannot carry: page_views (no primary key) had updates
    local workload = R:stop_workload()
    assert.matches("workload: %d+ transactions", workload)
    assert.is_true(H.wait_applied(R, 120), "the tasks did not apply the last changes")
    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))

    -- nothing twice: one slot and two sets per group (and the watch slot), one node, one task per
    -- group, one endpoint per group plus the target
    assert.equal("not paused", H.assert_single_world(R).replica_paused)

    -- the report and the journal tell the story, with no secret in them
    local report = assert(io.open(R.config.state_dir .. "/report.md")):read("a")
    for _, section in ipairs{ "Full load", "Full load: split tables", "Full load: hashed as loaded", "Quick QA",
        "DMS tasks", "Live verification" } do
      assert.truthy(report:find(section, 1, true), "report lacks " .. section)
    end
    local journal_text = assert(io.open(R.config.state_dir .. "/journal.json")):read("a")
    local full = cjson.decode(journal_text).playbooks.full.steps
    assert.truthy(full.pause_replica.facts.lsn)
    -- every table hashed on both sides as its parts committed, across the kills,
    -- and judged equal: the QA step after the load read none of them again
    local n_tables, n_hashed = #full.know_data.facts.tables, 0
    for k, h in pairs(full.full_load.facts.hashed) do
      assert.is_true(h.equal, k)
      n_hashed = n_hashed + 1
    end
    assert.equal(n_tables, n_hashed)
    assert.equal(n_tables, full.qa.facts.hashed_at_load)
    assert.truthy(r2.output:find(("%d of %d table(s) proven equal to the replica as they loaded"):format(n_tables,
      n_tables), 1, true), r2.output)
    for _, secret in ipairs{ R.lab.password, R.lab.dms.secret_key } do
      assert.falsy(report:find(secret, 1, true))
      assert.falsy(journal_text:find(secret, 1, true))
    end

    -- what holds data or configuration is its owner's only: 0600 files in 0700 directories
    local function mode(path)
      local _, _, _, out = require("migrun.proc").run{ "stat", "-c", "%a", path }
      return (out:gsub("%s+$", ""))
    end
    local state = R.config.state_dir
    for path, want in pairs{ [R.dir] = "700", [R.config_path] = "600", [state] = "700",
        [state .. "/journal.json"] = "600", [state .. "/report.md"] = "600", [state .. "/migrun.log"] = "600",
        [state .. "/schema.dump"] = "600", [state .. "/schema.list"] = "600" } do
      assert.equal(want, mode(path), path)
    end
  end)
end)
