-- playbooks/full.lua and cutover.lua on a source that has gone quiet: the
-- workload stops before full.lua's catch_up, and then only another database
-- writes WAL (what an autovacuum ANALYZE does), which no slot decodes, so the
-- slots' confirmed_flush_lsn stays behind the WAL position by more than
-- dms.catch_up.lag_bytes for good. full.lua must still reach READY FOR
-- CUTOVER and cutover.lua (writes stopped: the source read-only) must still
-- complete, each within a minute, the target equal to the source; each run's
-- report is kept.
local H = require "helpers.rehearsal"
local aws = require "migrun.aws"

local MINUTE = 60
local LAG_BYTES = 4 * 1024 * 1024 -- the rehearsal's dms.catch_up.lag_bytes

describe("an idle source", function()
  local R

  setup(function()
    R = H.rehearsal("e2e-idle", { config = { cutover = {
      stop_writes = "read_only", existing_sessions = "terminate", sessions_timeout = 30, apply_timeout = 300,
      -- page_views has no primary key: the workload's updates of it cannot replicate
      count_only = { "public.page_views" } } } })
  end)
  teardown(function()
    if R then
      R:stop_workload()
      R:close()
    end
  end)

  -- WAL that no slot of the migrated database decodes: 8 MiB in database postgres
  local function unrelated_wal()
    assert(R.lab.source:psql("create table if not exists noise (v text); "
      .. "insert into noise select repeat(md5(g::text), 32) from generate_series(1, 8192) g; analyze noise",
      { dbname = "postgres" }))
  end
  -- the least any migrun slot lags behind the WAL position, in bytes
  local function least_lag()
    local src = H.connect(R.lab.source, "source")
    local n = assert(src:exec([[select min(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn))::bigint as n
      from pg_replication_slots where slot_name like 'dms\_slot\_%']]))[1].n
    src:close()
    return n
  end
  local function timed(playbook)
    local t0 = aws.monotonic()
    local r = H.run(R, playbook, { "--yes" }, { timeout = 4 * MINUTE })
    return r, aws.monotonic() - t0
  end

  it("full.lua reaches READY FOR CUTOVER and cutover.lua completes, each within a minute", function()
    R:start_workload{ rate = 20 }
    local r1 = H.run(R, "full.lua", { "--yes" }, { kill_when = "catch_up: Watch the tasks" })
    assert.is_true(r1.killed, r1.output)
    local workload = R:stop_workload()
    assert.matches("workload: %d+ transactions", workload)
    -- what autovacuum would do in the migrated database after the workload,
    -- done now: a later ANALYZE there would be a transaction the slots decode
    assert(R.lab.source:psql("vacuum analyze"))
    unrelated_wal()
    assert.is_true(least_lag() > LAG_BYTES, "the slots are not behind: the test proves nothing")

    local full, took = timed("full.lua")
    assert.is_true(full.ok, full.output)
    assert.truthy(full.output:find("READY FOR CUTOVER", 1, true), full.output)
    assert.is_true(took < MINUTE, ("full.lua took %.1fs on an idle source:\n%s"):format(took, full.output))

    unrelated_wal()
    assert.is_true(least_lag() > LAG_BYTES, "the slots are not behind: the test proves nothing")
    local cut
    cut, took = timed("cutover.lua")
    assert.is_true(cut.ok, cut.output)
    assert.truthy(cut.output:find("cutover: done", 1, true), cut.output)
    assert.is_true(took < MINUTE, ("cutover.lua took %.1fs on an idle source:\n%s"):format(took, cut.output))

    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))

    -- each run kept its report; report.md is the cutover's
    local dir = R.config.state_dir .. "/reports"
    local ok, _, _, listing = require("migrun.proc").run{ "ls", "-1", dir }
    assert.truthy(ok, dir)
    assert.truthy(listing:find("%-full%.md\n"), listing)
    local name = listing:match("([^\n]+%-cutover%.md)\n")
    assert.truthy(name, listing)
    local latest = assert(io.open(R.config.state_dir .. "/report.md")):read("a")
    assert.equal(assert(io.open(dir .. "/" .. name)):read("a"), latest)
    assert.truthy(latest:find("Tasks past the fence", 1, true), latest)
  end)
end)
