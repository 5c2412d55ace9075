-- What a running migration leaves for others to read (migrun.playbook.live),
-- the windowed rate behind every ETA (migrun.playbook.rate) and the progress
-- bar's rates and snapshot. No server.
local rate = require "migrun.playbook.rate"
local tmp = require "helpers.tmp"
local progress = require "migrun.playbook.progress"
local live = require "migrun.playbook.live"
local journal = require "migrun.playbook.journal"
local host = require "migrun.host"
local proc = require "migrun.proc"
local lsn = require "migrun.lsn"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

local function tmpdir() return tmp.dir("live") end

local function mode(path)
  local _, _, _, out = proc.run{ "stat", "-c", "%a", path }
  return (out:gsub("%s+$", ""))
end

describe("rate", function()
  it("measures over the recent window, not since the start", function()
    local r = rate.new{ window = 10 }
    -- 100 units/s for 60 s, then 10 units/s for 20 s
    for t = 0, 60 do r:add(t, t * 100) end
    for t = 61, 80 do r:add(t, 6000 + (t - 60) * 10) end
    local per = r:per_second()
    assert.near(10, per, 1e-9)               -- the average since the start would say 76
    assert.equal(380, rate.eta(6200, 10000, per))
  end)

  it("interpolates the window's start after a quiet spell, and keeps few samples", function()
    local r = rate.new{ window = 10 }
    r:add(0, 0)
    r:add(100, 1000)  -- one sample 100 s later: 10/s across the gap
    assert.near(10, (r:per_second()), 1e-9)
    for t = 101, 300 do r:add(t, 1000 + (t - 100) * 2) end
    assert.near(2, (r:per_second()), 1e-9)
    assert.is_true(#r.samples <= 12, "samples are trimmed to the window: " .. #r.samples)
  end)

  it("counts rows alongside, and says nothing until it knows", function()
    local r = rate.new{ window = 30 }
    assert.is_nil(r:per_second())
    r:add(0, 0, 0)
    r:add(0.5, 50, 5)
    assert.is_nil(r:per_second(), "half a second is too short to say")
    r:add(2, 200, 20)
    local per, rows = r:per_second()
    assert.near(100, per, 1e-9)
    assert.near(10, rows, 1e-9)
    assert.is_nil(rate.eta(10, nil, 5))
    assert.is_nil(rate.eta(10, 100, 0))
    assert.equal(0, rate.eta(100, 100, 5))
    assert.has_error(function() r:add(1, 300) end, "rate:add: time went backwards")
  end)
end)

describe("progress bar", function()
  it("shows a rate and an expected end, and snapshots its parts", function()
    local said, records = {}, {}
    local bar = progress.new{ label = "Full load", total = 1000, unit = "bytes", tty = false, interval = 0,
      say = function(line) said[#said + 1] = line end,
      on_record = function(_, now) records[#records + 1] = now and "now" or "when due" end }
    -- the bar's clock is the real one: its window starts at creation
    bar.rate = rate.new{ window = 30 }
    local t0 = host.monotonic() - 10
    bar.rate:add(t0, 0, 0)
    bar.rate:add(t0 + 5, 250, 2500)
    bar:update(500, "public.events, 5000 rows", { rows = 5000,
      part = { key = "stream 1", name = "public.events", done = 500, total = 800, rows = 5000 } })
    local line = said[#said]
    assert.matches("Full load: 500 B of 1000 B %(50%%%), %d+ B/s, %d+ rows/s, ends ~%d%d:%d%d %(", line)
    local snap = bar:snapshot()
    assert.equal(500, snap.done)
    assert.equal(1000, snap.total)
    assert.equal(5000, snap.rows)
    assert.near(50, snap.per_second, 1)       -- 500 B in ~10 s
    assert.near(500, snap.rows_per_second, 10)
    assert.near(10, snap.eta_seconds, 0.5)
    assert.equal(1, #snap.parts)
    assert.same({ "stream 1", "public.events", 500, 800, 5000 },
      { snap.parts[1].key, snap.parts[1].name, snap.parts[1].done, snap.parts[1].total, snap.parts[1].rows })
    -- the stream's next table starts a rate of its own
    bar:update(600, nil, { part = { key = "stream 1", name = "public.calls", done = 100, total = 200 } })
    snap = bar:snapshot()
    assert.equal(1, #snap.parts)
    assert.equal("public.calls", snap.parts[1].name)
    assert.is_nil(snap.parts[1].per_second)
    bar:update(700, nil, { part = { key = "stream 1", name = "public.calls", done = 200, total = 200 } })
    bar:finish()
    assert.is_true(bar:snapshot().finished)
    -- saved at once: a new table in a stream, and the end; the rest when due
    assert.same({ "now", "now", "when due", "now" }, records)
  end)
end)

describe("live files", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() proc.run{ "rm", "-rf", dir } end)

  it("saves progress at most every interval, atomically and 0600", function()
    local w = live.progress_writer(dir, { interval = 60 })
    assert(w:save({ n = 1 }))
    assert(w:save({ n = 2 }))           -- too soon: skipped
    assert.equal(1, live.read_progress(dir).n)
    assert(w:save({ n = 3 }, true))     -- forced (a bar's end)
    assert.equal(3, live.read_progress(dir).n)
    assert.equal("600", mode(dir .. "/progress.json"))
    assert.is_nil(live.read_progress(dir .. "/nowhere"))
  end)

  it("appends samples, reads only complete lines, and from where it stopped", function()
    assert(live.append_sample(dir, { t = 1, wal_lsn = "0/100" }))
    assert(live.append_sample(dir, { t = 2, wal_lsn = "0/200", bad = 0 / 0 }))
    assert.equal("600", mode(dir .. "/samples.jsonl"))
    local list, offset = live.read_samples(dir)
    assert.equal(2, #list)
    assert.is_nil(list[2].bad)          -- NaN has no JSON: left out
    -- a line being written right now (no newline yet) waits for the next read
    local f = assert(io.open(dir .. "/samples.jsonl", "a"))
    f:write('{"t": 3, "wal_lsn": "0/3')
    f:close()
    local more, offset2 = live.read_samples(dir, { offset = offset })
    assert.equal(0, #more)
    assert.equal(offset, offset2)
    f = assert(io.open(dir .. "/samples.jsonl", "a"))
    f:write('00"}\n')
    f:close()
    more = live.read_samples(dir, { offset = offset2 })
    assert.equal(1, #more)
    assert.equal("0/300", more[1].wal_lsn)
    assert.equal(2, #live.read_samples(dir, { since = 2 }))
    assert.equal(1, #live.read_samples(dir, { limit = 1 }))
  end)

  it("converts the journal's timestamps whatever the time zone", function()
    local t = 1796070489
    assert.equal(t, live.epoch(journal.timestamp(t)))
    assert.equal(951868800, live.epoch("2000-03-01T00:00:00Z"))
    assert.is_nil(live.epoch("yesterday"))
  end)
end)

describe("lag in time", function()
  local history = { { t = 100, wal_lsn = "0/1000" }, { t = 110, wal_lsn = "0/2000" }, { t = 120, wal_lsn = "0/3000" } }

  it("is the time since the primary was where the slot has confirmed", function()
    -- 0/1800 is half way from 0/1000 (at 100 s) to 0/2000 (at 110 s): written at 105 s
    local secs, exact = live.lag_seconds(history, "0/1800", 130)
    assert.near(25, secs, 1e-9)
    assert.is_true(exact)
    secs = live.lag_seconds(history, lsn("0/2000"), 130)   -- exactly a reading's: 110 s
    assert.near(20, secs, 1e-9)
  end)

  it("counts the reading just taken, is 0 when caught up, and a lower bound before the history", function()
    assert.equal(0, (live.lag_seconds(history, "0/3500", 130, "0/3500")))
    -- between the last sample (120 s, 0/3000) and now (130 s, 0/4000)
    assert.near(5, (live.lag_seconds(history, "0/3800", 130, "0/4000")), 1e-9)
    local secs, exact = live.lag_seconds(history, "0/800", 130, "0/4000")
    assert.equal(30, secs)
    assert.is_false(exact)
    assert.is_nil(live.lag_seconds(history, nil, 130))
  end)
end)

describe("the lock, looked at without taking it", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() proc.run{ "rm", "-rf", dir } end)

  it("says who holds it, and never takes it", function()
    assert.same({ held = false }, live.lock_state(dir))
    local lock = assert(host.lock(dir .. "/lock"))
    local st = live.lock_state(dir)
    assert.is_true(st.held)
    assert.equal(host.pid, st.pid)
    assert.is_true(st.alive)
    lock:unlock()
    st = live.lock_state(dir)
    assert.is_false(st.held)
    assert.equal(host.pid, st.pid)      -- the last holder, from the file

    -- another process holds it: seen held, and looking did not take it
    local h = assert(proc.spawn{ MIGRUN, "-e", ([[
      local l = assert(require("migrun.host").lock(%q))
      while true do require("migrun.host").sleep(1) end]]):format(dir .. "/lock"), stdin = false, stdout = "capture" })
    local deadline = host.monotonic() + 10
    while not live.lock_state(dir).held and host.monotonic() < deadline do h:wait(0.05) end
    st = live.lock_state(dir)
    assert.is_true(st.held)
    assert.equal(h.pid, st.pid)
    local mine, err = host.lock(dir .. "/lock")
    assert.is_nil(mine)
    assert.equal("locked", err.kind)
    h:close()
    -- once it is gone, the lock is free, and taking it works at once
    deadline = host.monotonic() + 10
    while live.lock_state(dir).held and host.monotonic() < deadline do proc.run{ "sleep", "0.05" } end
    assert.is_false(live.lock_state(dir).held)
    assert(host.lock(dir .. "/lock")):unlock()
  end)
end)
