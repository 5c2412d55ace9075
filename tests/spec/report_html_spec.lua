-- report.html (migrun.playbook.html) from a journal and samples made here:
-- what it shows (timeline, Gantt bars, lag charts, QA differences, the
-- checklist), that every text is escaped, and that it is self-contained (no
-- script, nothing fetched). The e2e spec renders a real one in Chromium.
local html = require "migrun.playbook.html"
local tmp = require "helpers.tmp"
local journal = require "migrun.playbook.journal"
local proc = require "migrun.proc"

local function tmpdir() return tmp.dir("html") end

-- 2026-11-21T10:00:05Z, when the journal below says the full load began
local T0 = 1795255205

local function count(s, pattern)
  return select(2, s:gsub(pattern, ""))
end

local function journal_of(dir)
  local J = assert(journal.open(dir))
  J.data.migration, J.data.main = "billing", { playbook = "full" }
  local full = J:steps("full")
  full.know_data = { status = "done", started_at = "2026-11-21T10:00:00Z", ended_at = "2026-11-21T10:00:05Z",
    duration = 5, facts = { tables = { {}, {}, {}, {} } } }
  full.full_load = { status = "done", started_at = "2026-11-21T10:00:05Z", ended_at = "2026-11-21T11:00:05Z",
    duration = 3600, facts = { loaded = {
      ["public.events"] = { table = "public.events", rows = 1000000, bytes = 2 ^ 30, started = T0 + 0,
                            ended = T0 + 2995, seconds = 2995, stream = 1 },
      ["public.calls"] = { table = "public.calls", rows = 500, bytes = 4096, started = T0 + 0,
                           ended = T0 + 95, seconds = 95, stream = 2 },
      ["public.<script>x"] = { table = "public.<script>x", rows = 1, bytes = 1, started = T0 + 95,
                               ended = T0 + 195, seconds = 100, stream = 2 },
      ["public.ref"] = { table = "public.ref", rows = 1, bytes = 1, started = T0 + 195, ended = T0 + 3600,
                         seconds = 3400, stream = 2 } } } }
  full.qa = { status = "done", started_at = "2026-11-21T11:00:05Z", ended_at = "2026-11-21T11:00:10Z", duration = 5,
    tables = { { title = "Quick QA (replica vs target)", columns = { "table", "method", "a", "b", "equal", "detail" },
      rows = { { "public.events", "count", "10", "10", "yes", "" }, { "public.calls", "count", "5", "4", "NO", "1 missing" } } } } }
  full.catch_up = { status = "failed", started_at = "2026-11-21T11:01:00Z", ended_at = "2026-11-21T11:05:00Z",
    duration = 240, error = "the CDC task billing-dms-slot-02-cdc is failed: <boom> & more" }
  local cut = J:steps("cutover")
  cut.checklist = { status = "done", started_at = "2026-11-22T09:00:00Z", ended_at = "2026-11-22T09:00:01Z",
    tables = { { title = "Cutover checklist", columns = { "#", "do" },
      rows = { { 1, "point the application at the target" }, { 2, "drop the slots <when sure>" } } } } }
  J.data.runs = { { playbook = "full", started_at = "2026-11-21T10:00:00Z", ended_at = "2026-11-21T11:05:00Z",
                    outcome = "failed", ran = { "know_data", "full_load", "qa", "catch_up" } },
                  { playbook = "cutover", started_at = "2026-11-22T09:00:00Z", ended_at = "2026-11-22T09:00:01Z",
                    outcome = "ok", ran = { "checklist" } } }
  return J
end

local SAMPLES = {
  { t = T0 + 3655, wal_lsn = "0/5000000", retained_bytes = 3 * 2 ^ 20,
    slots = { { slot = "dms_slot_01", lag_bytes = 2 * 2 ^ 20, lag_seconds = 30 }, { slot = "dms_slot_02", lag_bytes = 2 ^ 20 } },
    tasks = { { slot = "dms_slot_01", task = "t1", status = "running", exceptions = 0 } }, max_lag = 2 * 2 ^ 20 },
  { t = T0 + 3715, wal_lsn = "0/5100000", retained_bytes = 2 ^ 20,
    slots = { { slot = "dms_slot_01", lag_bytes = 1000, lag_seconds = 1 }, { slot = "dms_slot_02", lag_bytes = 2000 } },
    tasks = { { slot = "dms_slot_01", task = "t1", status = "running", exceptions = 1 } }, max_lag = 2000 },
}

describe("report.html", function()
  local dir, page
  setup(function()
    dir = tmpdir()
    page = html.render{ journal = journal_of(dir), state_dir = dir, samples = SAMPLES, now = 1795950000,
      config = { wal_guard = { warn_bytes = 2 * 2 ^ 20, stop_bytes = 100 * 2 ^ 30 }, dms = { catch_up = { lag_bytes = 4096 } } } }
  end)
  teardown(function() proc.run{ "rm", "-rf", dir } end)

  it("is one self-contained page", function()
    assert.matches("^<!DOCTYPE html>", page)
    assert.truthy(page:find("<title>billing: migration report</title>", 1, true))
    assert.is_nil(page:find("<script", 1, true), "no script")
    assert.is_nil(page:find("<link", 1, true), "no stylesheet to fetch")
    assert.is_nil(page:find(" src=", 1, true), "nothing to fetch")
    assert.is_nil(page:find("url(", 1, true), "no CSS fetch")
    for href in page:gmatch('href="([^"]*)"') do assert.matches("^#", href) end
  end)

  it("escapes every text from the journal", function()
    assert.truthy(page:find("public.&lt;script&gt;x", 1, true))
    assert.truthy(page:find("&lt;boom&gt; &amp; more", 1, true))
    assert.truthy(page:find("drop the slots &lt;when sure&gt;", 1, true))
    assert.is_nil(page:find("<boom>", 1, true))
    assert.is_nil(page:find("<when sure>", 1, true))
  end)

  it("draws the steps, the full load per stream, and the slots over time", function()
    -- every step of both playbooks on the timeline, in the order they ran
    assert.equal(5, count(page, '<rect class="step '))
    local i1, i2 = page:find(">full · know_data<", 1, true), page:find(">full_load<", 1, true)
    assert.truthy(i1 and i2 and i1 < i2)
    assert.equal(1, count(page, '<rect class="step failed"'))
    -- one bar per table, in two lanes
    assert.equal(4, count(page, '<rect class="table"'))
    assert.truthy(page:find(">stream 1<", 1, true) and page:find(">stream 2<", 1, true))
    assert.truthy(page:find("4 tables on 2 stream%(s%) over 1 h 00 min"))
    -- lag per slot (bytes and time) and retained WAL, with the thresholds near the data
    assert.equal(3, count(page, 'data%-series="dms_slot_0[12]"')) -- bytes: both slots; time: the one that has it
    assert.truthy(page:find('id="chart-lag-time"', 1, true))
    assert.truthy(page:find("WAL guard: warn", 1, true))
    assert.is_nil(page:find("WAL guard: stop", 1, true), "a threshold far above the data is not drawn")
  end)

  it("sums up, shows the error, highlights the QA difference, and makes the checklist a list", function()
    assert.truthy(page:find("4/4 tables", 1, true))
    assert.truthy(page:find("1 difference(s)", 1, true))
    assert.truthy(page:find('<section id="errors">', 1, true))
    assert.equal(1, count(page, '<tr class="diff">'))
    assert.truthy(page:find('<tr class="diff"><td>public.calls</td>', 1, true))
    local list = page:match('<ol class="checklist">(.-)</ol>')
    assert.equal(2, count(list, "<li>"))
    -- the tasks as last watched: one running, an apply exception
    assert.truthy(page:find("1/1 running", 1, true))
    assert.truthy(page:find("1 apply exception(s)", 1, true))
  end)

  it("charts the WAL held back from the guard's readings, with the slots' limit", function()
    -- the guard's readings through the load (no task yet), then the catch-up's
    local samples = {
      { t = T0 + 100, kind = "guard", wal_lsn = "0/4000000", retained_bytes = 5 * 2 ^ 20, held_bytes = 3 * 2 ^ 20,
        keep_bytes = 8 * 2 ^ 20, slots = { { slot = "dms_slot_01", lag_bytes = 3 * 2 ^ 20, retained_bytes = 3 * 2 ^ 20 },
          { slot = "dms_slot_02", lag_bytes = 2 * 2 ^ 20, retained_bytes = 2 * 2 ^ 20 } } },
      { t = T0 + 200, kind = "guard", wal_lsn = "0/4400000", retained_bytes = 13 * 2 ^ 20, held_bytes = 7 * 2 ^ 20,
        keep_bytes = 8 * 2 ^ 20, slots = { { slot = "dms_slot_01", lag_bytes = 7 * 2 ^ 20, retained_bytes = 7 * 2 ^ 20 },
          { slot = "dms_slot_02", lag_bytes = 6 * 2 ^ 20, retained_bytes = 6 * 2 ^ 20 } } },
      -- a playbook's own reading: its slots' figures, the largest is what is held
      { t = T0 + 300, kind = "cdc", wal_lsn = "0/4500000", retained_bytes = 9 * 2 ^ 20,
        slots = { { slot = "dms_slot_01", lag_bytes = 1000, retained_bytes = 5 * 2 ^ 20 },
          { slot = "dms_slot_02", lag_bytes = 1000, retained_bytes = 4 * 2 ^ 20 } } },
    }
    local p = html.render{ journal = journal_of(dir), state_dir = dir, samples = samples,
      config = { wal_guard = { warn_bytes = 6 * 2 ^ 20, stop_bytes = 100 * 2 ^ 30 } } }
    local wal = p:match('<div id="chart%-wal">(.-)</div>')
    assert.truthy(wal, "no WAL chart")
    assert.truthy(wal:find("WAL held back on the primary", 1, true))
    assert.truthy(wal:find("max_slot_wal_keep_size: slots lost", 1, true))
    assert.truthy(p:find("(3 readings, UTC)", 1, true))
    -- 3, 7 and 5 MiB held, under the 8 MiB limit: the axis ends below the 13 MiB the figures add up to
    local top = 0
    for v in wal:gmatch(">([%d.]+) MiB<") do top = math.max(top, tonumber(v)) end
    assert.is_true(top >= 8 and top < 13, "axis up to " .. top .. " MiB")
  end)

  it("says the tasks are stopped once the cutover stopped them after the last look", function()
    local J = journal_of(dir)
    J:steps("cutover").stop_tasks = { status = "done", started_at = "2026-11-22T08:59:00Z", ended_at = "2026-11-22T08:59:30Z" }
    local p = html.render{ journal = J, state_dir = dir, samples = SAMPLES }
    assert.truthy(p:find("1 stopped", 1, true))
    assert.is_nil(p:find("1/1 running", 1, true))
  end)

  it("is written at the end of a run (from the journal alone when there are no samples)", function()
    local J = journal_of(dir)
    local p = html.render{ journal = J, state_dir = dir }
    assert.is_nil(p:find('id="cdc"', 1, true))
    assert.truthy(p:find('id="full-load"', 1, true))
    local empty = html.render{ journal = assert(journal.open(dir .. "/none", { read_only = true })) }
    assert.truthy(empty:find("No step has run yet.", 1, true))
  end)
end)
