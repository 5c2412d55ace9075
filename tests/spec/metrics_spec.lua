-- The metrics endpoint (migrun.playbook.metrics) without a server: the
-- exposition formats and Prometheus's naming conventions, what a scrape shows
-- from a state directory, and the real child process scraped over HTTP (its
-- primary unreachable: migrun_source_up 0). The e2e spec checks the values
-- against a live run.
local metrics = require "migrun.playbook.metrics"
local tmp = require "helpers.tmp"
local config = require "migrun.playbook.config"
local journal = require "migrun.playbook.journal"
local live = require "migrun.playbook.live"
local proc = require "migrun.proc"
local socket = require "socket"

local function tmpdir() return tmp.dir("metrics") end

local free_port = tmp.free_port

-- GET url -> status, headers, body (plain luasocket: the test's own client)
local function get(url, accept)
  local h, port, path = url:match("^http://([^:/]+):(%d+)(/.*)$")
  local c = assert(socket.connect(h, tonumber(port)))
  c:settimeout(10)
  c:send(("GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n"):format(path, h,
    accept and ("Accept: " .. accept .. "\r\n") or ""))
  local all = c:receive("*a")
  c:close()
  local head, body = all:match("^(.-)\r\n\r\n(.*)$")
  local status = tonumber(head:match("^HTTP/1%.1 (%d+)"))
  local headers = {}
  for k, v in head:gmatch("\r\n([^:]+):%s*([^\r]*)") do headers[k:lower()] = v end
  return status, headers, body
end

-- name{labels} value lines -> { [name] = { {labels = "...", value = n} } }
local function parse(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    if not line:match("^#") then
      local name, labels, value = line:match("^([%w_:]+)(%b{})%s+(%S+)$")
      if not name then name, value = line:match("^([%w_:]+)%s+(%S+)$") end
      assert(name, "not a sample line: " .. line)
      out[name] = out[name] or {}
      table.insert(out[name], { labels = labels or "", value = tonumber(value) })
    end
  end
  return out
end

-- A journal of a full run under way: the full load done for 3 of 4 tables.
local function write_state(dir)
  local J = assert(journal.open(dir))
  J.data.migration, J.data.main = "billing", { playbook = "full" }
  local steps = J:steps("full")
  steps.know_data = { status = "done", started_at = "2026-11-21T10:00:00Z", ended_at = "2026-11-21T10:00:05Z",
    facts = { tables = { { schema = "public", name = "a", bytes = 1000 }, { schema = "public", name = "b", bytes = 2000 },
                         { schema = "public", name = "c", bytes = 3000 }, { schema = "public", name = "d", bytes = 4000 } } } }
  steps.full_load = { status = "running", started_at = "2026-11-21T10:01:00Z", facts = { loaded = {
    ["public.a"] = { table = "public.a", rows = 10, bytes = 900, started = 1, ended = 2, stream = 1 },
    ["public.b"] = { table = "public.b", rows = 20, bytes = 1800, started = 1, ended = 3, stream = 2 },
    ["public.c"] = { table = "public.c", rows = 30, bytes = 2700, started = 2, ended = 4, stream = 1 } } } }
  steps.schema = { status = "failed", started_at = "2026-11-21T09:00:00Z", ended_at = "2026-11-21T09:00:01Z", error = "x" }
  J.data.runs[1] = { playbook = "full", started_at = "2026-11-21T10:00:00Z", outcome = "running" }
  assert(J:save())
  assert(live.progress_writer(dir):save({ pid = 1, playbook = "full", step = "full_load",
    progress = { label = "Full load", unit = "bytes", done = 6400 + 1000, total = 10000, rows = 60 + 5,
                 eta_seconds = 12.5, updated_at = 1796000000, parts = {} } }))
  assert(live.append_sample(dir, { t = 1796000001, wal_lsn = "0/3000000", retained_bytes = 5,
    tasks = { { slot = "dms_slot_01", task = "billing-dms-slot-01-cdc", status = "running", exceptions = 2 },
              { slot = "dms_slot_02", task = "billing-dms-slot-02-cdc", status = "failed", exceptions = 0 } } }))
end

describe("metrics", function()
  it("follow Prometheus's conventions in both formats", function()
    local dir = tmpdir()
    finally(function() proc.run{ "rm", "-rf", dir } end)
    write_state(dir)
    local state = { journal = assert(journal.open(dir, { read_only = true })).data, progress = live.read_progress(dir),
      lock = { held = true }, guard = { warn_bytes = 10, stop_bytes = 20 },
      sample = live.read_samples(dir)[1], slots = { at = 1796000010, wal_lsn = "0/3000100", slots = {
        { name = "dms_slot_01", owned = true, active = true, lag_bytes = 256, retained_bytes = 4096,
          confirmed_flush_lsn = "0/3000000", wal_status = "extended", safe_wal_size = 1 << 20 },
        { name = "dms_slot_02", owned = true, active = true, lag_bytes = 128, retained_bytes = 1024,
          confirmed_flush_lsn = "0/3000080" },
        { name = "other_tool", owned = false, lag_bytes = 9, retained_bytes = 9 } } },
      history = { { t = 1796000001, wal_lsn = "0/3000000" } } }
    local fams = metrics.families(state)
    for _, om in ipairs{ false, true } do
      local text = metrics.render(fams, om)
      local typed, helped = {}, {}
      for name, kind in text:gmatch("# TYPE (%S+) (%S+)") do typed[name] = kind end
      for name in text:gmatch("# HELP (%S+) ") do helped[name] = true end
      for _, f in ipairs(fams) do
        assert.matches("^migrun_[a-z_]+$", f.name)
        local base = f.name
        if not om and f.type == "counter" then base = f.name .. "_total" end
        if not om and f.type == "info" then base = f.name .. "_info" end
        assert.truthy(typed[base], base .. " has no TYPE line")
        assert.truthy(helped[base], base .. " has no HELP line")
        if f.unit == "bytes" then assert.matches("_bytes$", f.name) end
        if f.unit == "seconds" then assert.matches("_seconds$", f.name) end
        for _, sm in ipairs(f.samples) do assert.equal("number", type(sm.value)) end
      end
      assert.equal(om, text:sub(-6) == "# EOF\n")
      if om then assert.truthy(text:find("# TYPE migrun_full_load_bytes counter\n# UNIT migrun_full_load_bytes bytes", 1, true)) end
      if not om then assert.truthy(text:find("# TYPE migrun_full_load_bytes_total counter", 1, true)) end
      local v = parse(text)
      assert.equal(3, v.migrun_full_load_tables_loaded_total[1].value)
      assert.equal(4, v.migrun_full_load_tables[1].value)
      -- in the plan's unit (on-disk bytes), the progress record's: loaded tables and those under way
      assert.equal(7400, v.migrun_full_load_bytes_total[1].value)
      assert.equal(10000, v.migrun_full_load_expected_bytes[1].value)
      assert.equal(65, v.migrun_full_load_rows_total[1].value)
      assert.equal(0.74, v.migrun_progress_ratio[1].value)
      assert.equal(12.5, v.migrun_progress_remaining_seconds[1].value)
      assert.equal(256, v.migrun_slot_lag_bytes[1].value)
      assert.equal('{slot="dms_slot_01"}', v.migrun_slot_lag_bytes[1].labels)
      assert.equal(2, #v.migrun_slot_lag_bytes, "a slot that is not migrun's is left out")
      -- confirmed 0/3000000 was the primary's position at the sample, 9 s before the reading
      assert.equal(9, v.migrun_slot_lag_seconds[1].value)
      -- added up slot by slot, and held back as the WAL guard counts it (the oldest restart_lsn)
      assert.equal(4096 + 1024, v.migrun_wal_retained_bytes[1].value)
      assert.equal(4096, v.migrun_wal_held_bytes[1].value)
      -- how near max_slot_wal_keep_size each slot is (PostgreSQL 13+)
      assert.equal(1, #v.migrun_slot_safe_wal_size_bytes)
      assert.equal(1048576, v.migrun_slot_safe_wal_size_bytes[1].value)
      assert.truthy(text:find('migrun_slot_wal_status{slot="dms_slot_01",status="extended"} 1', 1, true))
      assert.equal(20, v.migrun_wal_guard_stop_bytes[1].value)
      assert.equal(1, v.migrun_step_running[1].value)
      assert.equal('{playbook="full",step="full_load"}', v.migrun_step_running[1].labels)
      assert.equal('{playbook="full",step="schema"}', v.migrun_step_failed[1].labels)
      assert.equal(live.epoch("2026-11-21T10:00:05Z"), v.migrun_last_success_timestamp_seconds[1].value)
      assert.equal(2, #v.migrun_dms_task_running)
      assert.equal(1, v.migrun_dms_task_running[1].value)
      assert.equal(0, v.migrun_dms_task_running[2].value)
      assert.equal(2, v.migrun_dms_apply_exceptions[1].value)
      assert.truthy(text:find('migrun_dms_task_state{slot="dms_slot_02",state="failed",task="billing-dms-slot-02-cdc"} 1',
        1, true))
      assert.truthy(text:find('migrun_run_info{main="full",migration="billing",outcome="running",playbook="full"} 1', 1, true))
    end
    -- label values are escaped
    local odd = metrics.render({ { name = "migrun_x", type = "gauge", help = "a\\b", samples = {
      { labels = { t = 'a"b\\c\nd' }, value = 1.5 } } } }, false)
    assert.truthy(odd:find('migrun_x{t="a\\"b\\\\c\\nd"} 1.5', 1, true), odd)
  end)

  it("are served by a child process over HTTP, content-negotiated, without a server to read", function()
    local dir = tmpdir()
    finally(function() proc.run{ "rm", "-rf", dir } end)
    write_state(dir)
    local dead = free_port()
    local m = assert(metrics.start{ listen = "127.0.0.1:0", state_dir = dir, migration = "billing",
      source = ("host=127.0.0.1 port=%d dbname=app user=migrun password=S3cr3t connect_timeout=2"):format(dead),
      prefix = "dms_slot_", guard = { warn_bytes = 10, stop_bytes = 20 }, interval = 60 })
    finally(function() m:close() end)
    assert.matches("^http://127%.0%.0%.1:%d+/metrics$", m.url)
    local status, headers, body = get(m.url)
    assert.equal(200, status)
    assert.equal("text/plain; version=0.0.4; charset=utf-8", headers["content-type"])
    local v = parse(body)
    assert.equal(0, v.migrun_source_up[1].value)
    assert.equal(3, v.migrun_full_load_tables_loaded_total[1].value)
    assert.equal(0, v.migrun_running[1].value)      -- nobody holds this state directory
    status, headers, body = get(m.url, "application/openmetrics-text; version=1.0.0")
    assert.equal(200, status)
    assert.matches("^application/openmetrics%-text", headers["content-type"])
    assert.equal("# EOF\n", body:sub(-6))
    status = get(m.url:gsub("/metrics$", "/secrets"))
    assert.equal(404, status)
    -- the state changes under it: the next scrape sees it
    local J = assert(journal.open(dir))
    J.data.playbooks.full.steps.full_load.facts.loaded["public.d"] = { table = "public.d", rows = 1, bytes = 1, stream = 2 }
    assert(J:save())
    assert.equal(4, parse(select(3, get(m.url))).migrun_full_load_tables_loaded_total[1].value)
    -- nothing secret in what it logged
    local log = assert(io.open(dir .. "/metrics.log")):read("a")
    assert.falsy(log:find("S3cr3t", 1, true))
    local pid = m.pid
    m:close()
    assert.is_nil(io.open("/proc/" .. pid .. "/cmdline"), "the server outlived its handle")
  end)

  it("say why they cannot listen, and are configured in the metrics section", function()
    local busy = assert(socket.bind("127.0.0.1", 0))
    local _, port = busy:getsockname()
    finally(function() busy:close() end)
    local dir = tmpdir()
    finally(function() proc.run{ "rm", "-rf", dir } end)
    local m, err = metrics.start{ listen = "127.0.0.1:" .. port, state_dir = dir, source = "host=127.0.0.1" }
    assert.is_nil(m)
    assert.matches("cannot listen on 127%.0%.0%.1:" .. port .. ": address already in use", tostring(err))
    local base = { source = { conninfo = "host=a" }, replica = { conninfo = "host=b" }, target = { conninfo = "host=c" } }
    local function check(mc)
      local t = { metrics = mc }
      for k, v in pairs(base) do t[k] = v end
      return config.check(t, "migration.lua")
    end
    assert.equal("[::1]:9187", assert(check{ listen = "[::1]:9187" }).metrics.listen)
    assert.equal(5, assert(check{ listen = "0.0.0.0:9187" }).metrics.interval)
    assert.is_nil(assert(check{}).metrics.listen)
    local _, cerr = check{ listen = "9187" }
    assert.matches('metrics.listen: expected an address "host:port", e.g. "127.0.0.1:9187", found "9187"', tostring(cerr))
    _, cerr = check{ listen = "127.0.0.1:99999" }
    assert.truthy(cerr)
    assert.same({ "::1", 9187 }, { metrics.parse_listen("[::1]:9187") })
  end)
end)
