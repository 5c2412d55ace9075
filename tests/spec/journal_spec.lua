-- migrun.playbook.journal: a change saved by its path costs what changed
-- (one line appended to journal.log), never a rewrite of the whole journal;
-- a reader sees journal.json with the changes replayed over it, whatever a
-- kill left behind.
local journal = require "migrun.playbook.journal"
local host = require "migrun.host"
local proc = require "migrun.proc"
local tmp = require "helpers.tmp"

local FACTS = { "playbooks", "full", "steps", "full_load", "facts" }

local function at(...)
  local p = table.move(FACTS, 1, #FACTS, 1, {})
  for _, k in ipairs{ ... } do p[#p + 1] = k end
  return p
end

-- the path of public.big's done chunk i, from the journal's root
local function done_at(i) return at("chunks", "public.big", "done", tostring(i)) end

local function read(path)
  return host.read_file(path)
end

local function lines(text)
  local out = {}
  for line in (text or ""):gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

-- public.big's chunk state as the journal in d reads it back (opened anew).
local function big_of(d)
  return assert(journal.open(d)):step("full", "full_load").facts.chunks["public.big"]
end

-- A journal whose step holds `n` chunks already done (a load well under way).
local function journal_with_chunks(dir, n)
  local J = assert(journal.open(dir))
  local S = J:step("full", "full_load")
  S.status = "running"
  local done = {}
  for i = 1, n do
    done[tostring(i)] = { chunk = i, rows = 100000, bytes = 123456789, xid = 1000 + i, started = 1.5, ended = 2.5 }
  end
  S.facts = { chunks = { ["public.big"] = { plan = { count = n + 1 }, done = done, committing = {} } } }
  assert(J:save())
  return J, S.facts.chunks["public.big"]
end

describe("the journal's changes", function()
  local dir
  before_each(function() dir = tmp.dir("journal") end)
  after_each(function() proc.run{ "rm", "-rf", dir } end)

  it("saves a change as one line, whatever the journal's size, and gives it back", function()
    local J, cs = journal_with_chunks(dir, 5000)
    local snapshot = read(dir .. "/journal.json")
    assert.is_true(#snapshot > 500000)
    cs.committing["5001"] = { xid = 7001, rows = 10, bytes = 20 }
    assert(J:save_change(at("chunks", "public.big", "committing", "5001")))
    -- journal.json untouched; the log holds its generation and the one change
    assert.equal(snapshot, read(dir .. "/journal.json"))
    local log = read(dir .. "/journal.log")
    assert.equal(2, #lines(log))
    assert.is_true(#log < 300, "a change of a few bytes wrote " .. #log)
    cs.done["5001"] = { chunk = 5001, rows = 10, bytes = 20, xid = 7001 }
    cs.committing["5001"] = nil
    assert(J:save_change(done_at(5001)))
    assert(J:save_change(at("chunks", "public.big", "committing", "5001")))
    assert.equal(4, #lines(read(dir .. "/journal.log")))

    local again = assert(journal.open(dir, { read_only = true }))
    local back = again:step("full", "full_load").facts.chunks["public.big"]
    assert.same({ chunk = 5001, rows = 10, bytes = 20, xid = 7001 }, back.done["5001"])
    assert.is_nil(back.committing["5001"], "a removal replayed")
    assert.same(J.data, again.data)
    assert.equal("integer", math.type(back.done["5001"].xid))
  end)

  it("writes the changes of one call at once: one write and one fsync for all of them", function()
    local J, cs = journal_with_chunks(dir, 3)
    cs.done["4"] = { chunk = 4 } -- a second's records of a busy load, flushed together
    assert(J:save_change(done_at(4)))
    local paths = {}
    for i = 5, 104 do
      cs.done[tostring(i)] = { chunk = i }
      paths[#paths + 1] = { "chunks", "public.big", "done", tostring(i) }
    end
    local before = J.writes
    assert(J:save_changes(paths, FACTS))
    assert.equal(1, J.writes - before)
    assert.equal(102, #lines(read(dir .. "/journal.log")))
    assert.same({ chunk = 104 }, big_of(dir).done["104"])
  end)

  it("starts a new log with each whole save, and ignores a log a kill left of the one before", function()
    local J, cs = journal_with_chunks(dir, 3)
    cs.committing["4"] = { xid = 9 }
    assert(J:save_change(at("chunks", "public.big", "committing", "4")))
    local stale = read(dir .. "/journal.log")
    -- the step's facts rewritten whole (a rerun that planned again): the
    -- committing entry is gone from journal.json
    cs.committing["4"] = nil
    cs.plan.count = 99
    assert(J:save())
    assert.is_nil(read(dir .. "/journal.log"), "the log contained in journal.json is removed")
    -- a kill between journal.json's rename and the log's removal leaves it:
    -- it names the generation before, and is not replayed
    assert(host.write_file(dir .. "/journal.log", stale))
    local again = assert(journal.open(dir))
    local back = again:step("full", "full_load").facts.chunks["public.big"]
    assert.equal(99, back.plan.count)
    assert.is_nil(back.committing["4"])
    -- the next change starts a log of the current generation
    back.done["4"] = { chunk = 4 }
    assert(again:save_change(done_at(4)))
    local third = big_of(dir)
    assert.same({ chunk = 4 }, third.done["4"])
    assert.equal(99, third.plan.count)
  end)

  it("keeps the log's changes when a whole save fails: the next change goes on the same log", function()
    local J, cs = journal_with_chunks(dir, 2)
    cs.done["3"] = { chunk = 3 }
    assert(J:save_change(done_at(3)))
    local path = J.path
    J.path = dir .. "/no-such-dir/journal.json" -- the disk refuses the whole journal
    assert.is_nil((J:save()))
    J.path = path
    cs.done["4"] = { chunk = 4 } -- the run's last records, saved however it ends
    assert(J:save_change(done_at(4)))
    local done = big_of(dir).done
    assert.same({ chunk = 3 }, done["3"], "a change logged before the failed save was lost")
    assert.same({ chunk = 4 }, done["4"])
  end)

  it("reads journal.json again when a running migrun rewrites it between a reader's two reads", function()
    local W, cs = journal_with_chunks(dir, 2) -- the running migrun
    cs.done["3"] = { chunk = 3 }
    assert(W:save_change(done_at(3))) -- only in the log of this generation
    -- the reader (`migrun status`, the metrics server) has read journal.json
    -- and is about to read the log when the writer saves whole (a new
    -- generation, its log removed) and logs one more change on a new log
    local real, fired = host.read_file, false
    host.read_file = function(path)
      if path == W.log_path and not fired then
        fired = true
        cs.done["4"] = { chunk = 4 }
        assert(W:save())
        cs.done["5"] = { chunk = 5 }
        assert(W:save_change(done_at(5)))
      end
      return real(path)
    end
    local R, err = journal.open(dir, { read_only = true })
    host.read_file = real
    assert.is_true(fired)
    assert(R, err)
    local done = R:step("full", "full_load").facts.chunks["public.big"].done
    -- read once, the old journal.json would stand without its log: chunks 3-5 missing
    assert.same({ chunk = 3 }, done["3"], "a chunk logged before the rewrite is missing")
    assert.same({ chunk = 4 }, done["4"])
    assert.same({ chunk = 5 }, done["5"])
    assert.same(W.data, R.data)
  end)

  it("drops a last line a kill cut short, and buries nothing after it", function()
    local J, cs = journal_with_chunks(dir, 2)
    cs.done["3"] = { chunk = 3 }
    assert(J:save_change(done_at(3)))
    local f = assert(io.open(dir .. "/journal.log", "a"))
    f:write('{"p":["playbooks","full","steps","full_load","facts","chunks","public.big","done","4"],"v":{"chu')
    f:close()
    local again = assert(journal.open(dir))
    local back = again:step("full", "full_load").facts.chunks["public.big"]
    assert.same({ chunk = 3 }, back.done["3"], "the change before the cut")
    assert.is_nil(back.done["4"], "the line cut short")
    -- a change after it must not be appended to the torn line
    back.done["5"] = { chunk = 5 }
    assert(again:save_change(done_at(5)))
    local facts = big_of(dir)
    assert.same({ chunk = 3 }, facts.done["3"])
    assert.same({ chunk = 5 }, facts.done["5"])
  end)

  it("refuses a log with a line in its middle that does not read", function()
    local J, cs = journal_with_chunks(dir, 2)
    cs.done["3"] = { chunk = 3 }
    assert(J:save_change(done_at(3)))
    local log = read(dir .. "/journal.log")
    assert(host.write_file(dir .. "/journal.log", log .. "not json\n" .. lines(log)[2] .. "\n"))
    local again, err = journal.open(dir)
    assert.is_nil(again)
    assert.equal("journal", err.kind)
    assert.matches("line 3 of the journal's log", tostring(err))
  end)

  it("folds the log into journal.json once it outgrows it", function()
    local saved = journal.COMPACT_BYTES
    journal.COMPACT_BYTES = 2000
    local ok, err = pcall(function()
      local J, cs = journal_with_chunks(dir, 1)
      local rewrites, before = 0, read(dir .. "/journal.json")
      for i = 2, 200 do
        cs.done[tostring(i)] = { chunk = i, rows = i }
        assert(J:save_change(done_at(i)))
        local now = read(dir .. "/journal.json")
        if now ~= before then rewrites, before = rewrites + 1, now end
        assert.is_true(#(read(dir .. "/journal.log") or "") <= math.max(2000, #now) + 300)
      end
      assert.is_true(rewrites >= 2 and rewrites < 50, "journal.json rewritten " .. rewrites .. " times")
      local back = big_of(dir)
      for i = 2, 200 do
        assert.same({ chunk = i, rows = i }, back.done[tostring(i)])
      end
    end)
    journal.COMPACT_BYTES = saved
    assert(ok, err)
  end)

  it("masks a change under a key that names a secret, as the whole save does", function()
    local J = assert(journal.open(dir))
    local S = J:step("full", "setup")
    S.facts = { endpoint = {} }
    assert(J:save())
    S.facts.endpoint.password = "s3cret"
    S.facts.endpoint.conninfo = "host=db password=s3cret"
    assert(J:save_change({ "playbooks", "full", "steps", "setup", "facts", "endpoint", "password" }))
    assert(J:save_change({ "playbooks", "full", "steps", "setup", "facts", "endpoint", "conninfo" }))
    local log = read(dir .. "/journal.log")
    assert.is_nil(log:find("s3cret", 1, true), log)
    local again = assert(journal.open(dir))
    assert.equal("****", again:step("full", "setup").facts.endpoint.password)
    assert.equal("host=db password=****", again:step("full", "setup").facts.endpoint.conninfo)
  end)

  it("keeps the records of tables named for a secret (api_tokens, user_passwords), whole or by change", function()
    local J = assert(journal.open(dir))
    local S = J:step("full", "full_load")
    S.status = "running"
    S.facts = { loaded = { ["public.api_tokens"] = { rows = 5, bytes = 8192 } },
                chunks = { ["public.user_passwords"] = { plan = { count = 2 }, done = {}, committing = {} } } }
    assert(J:save())
    S.facts.chunks["public.user_passwords"].done["1"] = { chunk = 1, rows = 10 }
    assert(J:save_change(at("chunks", "public.user_passwords", "done", "1")))
    local again = assert(journal.open(dir))
    local facts = again:step("full", "full_load").facts
    assert.same({ rows = 5, bytes = 8192 }, facts.loaded["public.api_tokens"])
    assert.equal(2, facts.chunks["public.user_passwords"].plan.count)
    assert.same({ chunk = 1, rows = 10 }, facts.chunks["public.user_passwords"].done["1"])
  end)

  it("raises on a path that is not a list of keys, whether the change is logged or saved whole", function()
    local fresh = assert(journal.open(dir)) -- its first change is a whole save
    assert.has_error(function() fresh:save_changes{ {} } end)
    local J = journal_with_chunks(dir, 1)
    assert.has_error(function() J:save_change("chunks") end)
  end)

  it("writes the log 0600, and moves it aside with the journal", function()
    local J, cs = journal_with_chunks(dir, 1)
    cs.done["2"] = { chunk = 2 }
    assert(J:save_change(done_at(2)))
    local _, _, _, mode = proc.run{ "stat", "-c", "%a", dir .. "/journal.log" }
    assert.equal("600", (mode:gsub("%s+$", "")))
    local aside = assert(journal.set_aside(dir))
    assert.truthy(read(aside .. "/journal.log"))
    assert.is_nil(read(dir .. "/journal.log"))
    assert.same({ chunk = 2 }, big_of(aside).done["2"])
  end)

  it("says what to do when the log cannot be written, and the journal on disk still reads", function()
    local J, cs = journal_with_chunks(dir, 1)
    cs.done["2"] = { chunk = 2 }
    assert(J:save_change(done_at(2)))
    J.log_path = dir .. "/no-such-dir/journal.log"
    cs.done["3"] = { chunk = 3 }
    local ok, err = J:save_change(done_at(3))
    assert.is_nil(ok)
    assert.equal("journal", err.kind)
    assert.matches("cannot write the journal", tostring(err))
    assert.matches("free space", err.hint)
    assert.same({ chunk = 2 }, big_of(dir).done["2"])
  end)
end)

describe("host.append_file", function()
  local dir
  before_each(function() dir = tmp.dir("append") end)
  after_each(function() proc.run{ "rm", "-rf", dir } end)

  it("creates the file with its mode, then appends whole", function()
    local path = dir .. "/log"
    assert(host.append_file(path, "one\n", tonumber("640", 8)))
    assert(host.append_file(path, "two\n"))
    assert.equal("one\ntwo\n", host.read_file(path))
    local _, _, _, mode = proc.run{ "stat", "-c", "%a", path }
    assert.equal("640", (mode:gsub("%s+$", "")))
  end)

  it("returns nil and an error naming the path where it cannot write", function()
    local ok, err = host.append_file(dir .. "/missing/log", "x")
    assert.is_nil(ok)
    assert.matches("missing/log", tostring(err))
    assert.equal(2, err.errno) -- ENOENT
  end)
end)
