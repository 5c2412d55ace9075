-- playbooks/status.lua run as a person runs it (a separate migrun) against a
-- state directory made here: held by another process, then left behind by a
-- killed one, and before anything ran. It must only read: no file of the
-- state directory changes, the lock stays with its holder. Its servers are
-- unreachable here (the e2e spec has live ones): that is reported, without
-- the password. No server.
local journal = require "migrun.playbook.journal"
local tmp = require "helpers.tmp"
local live = require "migrun.playbook.live"
local host = require "migrun.host"
local proc = require "migrun.proc"
local cjson = require "cjson"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local ROOT = os.getenv("MIGRUN_SOURCE_DIR") or "."

local function tmpdir() return tmp.dir("status") end

local dead_port = tmp.free_port

local function status(config_path, ...)
  local argv = { MIGRUN, ROOT .. "/playbooks/status.lua", "--config", config_path, ... }
  argv.stdin = false
  local ok, _, code, out, err = proc.run(argv)
  return ok, code, out, err
end

-- every file of a directory with its size, mtime and content
local function snapshot(dir)
  local _, _, _, out = proc.run{ "find", dir, "-printf", "%p %s %T@\n" }
  local files = {}
  for line in out:gmatch("[^\n]+") do
    local path = line:match("^(%S+)")
    local f = io.open(path, "rb")
    local content = f and f:read("a")
    if f then f:close() end
    files[#files + 1] = line .. " " .. tostring(content and #content)
    files[path] = content
  end
  return files
end

describe("playbooks/status.lua", function()
  local dir, cfg_path, holder

  setup(function()
    dir = tmpdir()
    local state = dir .. "/state"
    assert(journal.make_dir(state))
    local port = dead_port()
    cfg_path = dir .. "/migration.lua"
    local conninfo = ("host=127.0.0.1 port=%d dbname=app user=migrun password=S3cr3tPw connect_timeout=2"):format(port)
    assert(host.write_file(cfg_path, ([[return { name = "billing", state_dir = "state",
      source = { conninfo = %q }, replica = { conninfo = %q }, target = { conninfo = %q },
      wal_guard = { warn_bytes = 1000, stop_bytes = 5000 } }
    ]]):format(conninfo, conninfo, conninfo)))

    local J = assert(journal.open(state))
    J.data.migration, J.data.main = "billing", { playbook = "full" }
    local steps = J:steps("full")
    steps.know_data = { status = "done", started_at = "2026-11-21T10:00:00Z", ended_at = "2026-11-21T10:00:05Z",
      facts = { tables = { { schema = "public", name = "a", bytes = 1000, rows_estimate = 10 },
        { schema = "public", name = "b", bytes = 9000, rows_estimate = 80 } } } }
    steps.full_load = { status = "running", started_at = journal.timestamp(host.now() - 125), facts = { loaded = {
      ["public.a"] = { table = "public.a", rows = 10, bytes = 900, started = 1, ended = 2, stream = 2 } } } }
    steps.schema = { status = "failed", started_at = "2026-11-21T09:00:00Z", ended_at = "2026-11-21T09:00:01Z",
      error = "pg_restore failed: disk full" }
    J.data.runs[1] = { playbook = "full", started_at = journal.timestamp(host.now() - 130), outcome = "running",
                       metrics = "http://127.0.0.1:9187/metrics" }
    assert(J:save())
    assert(live.append_sample(state, { t = host.now() - 5, wal_lsn = "0/3000000", retained_bytes = 4096,
      slots = { { slot = "dms_slot_01", lag_bytes = 2048, lag_seconds = 3, retained_bytes = 4096 } },
      tasks = { { slot = "dms_slot_01", task = "billing-dms-slot-01-cdc", status = "running", exceptions = 2 } } }))

    -- another migrun holds the state directory, as a running playbook does
    holder = assert(proc.spawn{ MIGRUN, "-e", ([[
      local l = assert(require("migrun.host").lock(%q))
      while true do require("migrun.host").sleep(1) end]]):format(state .. "/lock"), stdin = false })
    local deadline = host.monotonic() + 10
    while not live.lock_state(state).held and host.monotonic() < deadline do holder:wait(0.05) end
    assert(live.progress_writer(state):save({ pid = holder.pid, playbook = "full", step = "full_load",
      progress = { label = "Full load", unit = "bytes", done = 5400, total = 10000, rows = 60,
        per_second = 100, rows_per_second = 2, eta_seconds = 46, updated_at = host.now() - 1, parts = {
          { key = "stream 1", name = "public.b", done = 4500, total = 9000, rows = 50, per_second = 100, eta_seconds = 45 },
          { key = "stream 2", name = "public.a", done = 900, total = 1000, rows = 10 } } } }))
  end)
  teardown(function()
    if holder then holder:close() end
    proc.run{ "rm", "-rf", dir }
  end)

  it("--json: what runs, since when, how far, with the lock's holder; reads only", function()
    local before = snapshot(dir)
    local ok, code, out, err = status(cfg_path, "--json", "--offline")
    assert.is_true(ok, err)
    assert.equal(0, code)
    assert.same(before, snapshot(dir))
    assert.is_true(live.lock_state(dir .. "/state").held)
    local s = cjson.decode(out)
    assert.equal(1, s.status_version)
    assert.equal("billing", s.migration)
    assert.same({ held = true, pid = holder.pid, alive = true }, s.lock)
    assert.is_true(s.running)
    assert.equal("running", s.run.outcome)
    assert.equal("http://127.0.0.1:9187/metrics", s.run.metrics)
    assert.equal("full_load", s.step.name)
    assert.equal("running", s.step.state)
    assert.near(125, s.step.seconds, 5)
    assert.is_true(s.progress.current)
    assert.equal(54, s.progress.percent)
    assert.equal(100, s.progress.per_second)
    assert.equal(46, s.progress.eta_seconds)
    assert.truthy(s.progress.expected_end)
    -- per stream: what each has loaded, and the table it copies now
    assert.equal(1, s.full_load.tables_loaded)
    assert.equal(2, s.full_load.tables)
    assert.equal(10000, s.full_load.bytes_expected)
    -- like with like: public.a is 1000 bytes on disk, 900 were sent as COPY
    assert.equal(1000, s.full_load.disk_bytes_loaded)
    assert.equal(900, s.full_load.bytes_loaded)
    assert.equal(50, s.full_load.streams[1].table_rows_done)
    assert.equal(2, #s.full_load.streams)
    assert.same({ 1, "public.b", 4500, 9000, 45 }, { s.full_load.streams[1].stream, s.full_load.streams[1].table,
      s.full_load.streams[1].table_bytes_done, s.full_load.streams[1].table_bytes_expected, s.full_load.streams[1].eta_seconds })
    assert.is_nil(s.full_load.streams[2].table, "stream 2's table is loaded: it copies nothing now")
    assert.equal(1, s.full_load.streams[2].tables_loaded)
    -- offline: the slots and tasks as the run last sampled them
    assert.equal(2048, s.slots[1].lag_bytes)
    assert.equal(3, s.slots[1].lag_seconds)
    assert.equal(4096, s.wal.retained_bytes)
    assert.same({ 1000, 5000 }, { s.wal.warn_bytes, s.wal.stop_bytes })
    assert.equal("sample", s.tasks[1].source)
    assert.equal(2, s.apply_exceptions)
    assert.equal("schema", s.last_error.step)
    assert.equal("pg_restore failed: disk full", s.last_error.message)
  end)

  it("for people, and with unreachable servers said without their password", function()
    local ok, _, out, err = status(cfg_path)
    assert.is_true(ok, err)
    assert.matches("migration billing: RUNNING: full %(pid " .. holder.pid .. "%)", out)
    assert.matches("step: full · full_load running since [%d%-: ]+UTC %(2 min 0%d s%)", out)
    assert.matches("progress: Full load: 5%.3 KiB of 9%.8 KiB %(54%%%), 100 B/s, 2%.0 rows/s, ends ~", out)
    assert.matches("full load %(full · full_load, running%): 1/2 tables, 1000 B of 9%.8 KiB on disk %(900 B sent as COPY%), "
      .. "10 rows", out)
    assert.matches("public%.b 4%.4 KiB of 8%.8 KiB %(50 of ~80 rows%), 100 B/s, 45%.0 s left", out)
    assert.matches("last error %(full · schema, 2026%-11%-21 09:00:01 UTC", out)
    assert.matches("metrics: http://127%.0%.0%.1:9187/metrics", out)
    assert.matches("could not look: the source: connection to server at \"127%.0%.0%.1\", port %d+ failed: "
      .. "Connection refused", out)
    assert.matches("slots %(as sampled [%d%-: ]+UTC%):\n", out)
    assert.falsy(out:find("S3cr3tPw", 1, true))
    assert.falsy(err:find("S3cr3tPw", 1, true))
  end)

  it("after the run was killed: not running, the step interrupted", function()
    holder:close()
    holder = nil
    local deadline = host.monotonic() + 10
    while live.lock_state(dir .. "/state").held and host.monotonic() < deadline do proc.run{ "sleep", "0.05" } end
    local ok, _, out = status(cfg_path, "--json", "--offline")
    assert.is_true(ok)
    local s = cjson.decode(out)
    assert.is_false(s.running)
    assert.is_false(s.lock.held)
    assert.equal("interrupted", s.run.outcome)
    assert.equal("interrupted", s.step.state)
    assert.is_false(s.progress.current)
    _, _, out = status(cfg_path, "--offline")
    assert.matches("not running; the last run %(full%) was interrupted %(killed%?%)", out)
    assert.matches("when it stopped", out)
  end)

  it("--json holds every value a collector can meet: NULL, LSNs, NaN, text in another encoding", function()
    local status = require "migrun.status"
    local pg = require "migrun.pg"
    local lsn = require "migrun.lsn"
    local json = require "migrun.json"
    -- what cdc.status hands over while a task has started but applied nothing yet
    local s = { status_version = 1, tasks = json.array{ { slot = "dms_slot_01", applied_at = pg.null, pending = pg.null,
      confirmed_flush_lsn = assert(lsn.parse("0/3000060")), failure = "caf\xe9 ferm\xe9", lag = 0 / 0, eta = math.huge,
      fn = print, [3] = "three" } }, problems = json.array() }
    local doc = cjson.decode(status.json(s))
    local t = doc.tasks[1]
    assert.is_nil(t.applied_at)
    assert.is_nil(t.pending)
    assert.equal("0/3000060", t.confirmed_flush_lsn)
    assert.equal("caf\u{FFFD} ferm\u{FFFD}", t.failure)
    assert.is_nil(t.lag)
    assert.is_nil(t.eta)
    assert.is_nil(t.fn)
    assert.equal("three", t["3"])
    assert.same({}, doc.problems)
  end)

  it("before anything ran, without creating the state directory", function()
    local path = dir .. "/fresh.lua"
    assert(host.write_file(path, ([[return { name = "fresh", state_dir = "nowhere",
      source = { conninfo = "host=127.0.0.1 port=%d" }, replica = { conninfo = "host=x" }, target = { conninfo = "host=x" } }
    ]]):format(dead_port())))
    local ok, _, out = status(path, "--json", "--offline")
    assert.is_true(ok)
    local s = cjson.decode(out)
    assert.is_false(s.running)
    assert.is_nil(s.run)
    assert.is_nil(s.step)
    assert.is_nil(io.open(dir .. "/nowhere"), "status created the state directory")
    local _, code, _, err = status(dir .. "/missing.lua")
    assert.equal(2, code)
    assert.matches("no configuration file", err)
  end)
end)
