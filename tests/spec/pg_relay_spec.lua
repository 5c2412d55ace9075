-- pg.copy relays whole buffers (issue 25): the rows of the source are
-- gathered and handed to the target RELAY_BYTES at a time, rather than one
-- CopyData message per row and a send() every 8 KiB (each waking the
-- target's backend); a source that brings rows slowly still has them reach
-- the target within moments. Counted with strace on a child migrun.
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local host = require "migrun.host"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local ROWS = 50000 -- about 5 MB as text: some 600 sends of 8 KiB

-- the path of an executable, or nil
local function which(name)
  local ok, _, _, out = proc.run{ "sh", "-c", 'command -v "$1"', "sh", name }
  return ok and out:match("^(%S+)") or nil
end

describe("pg.copy's relay", function()
  local L, src, dst

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start { replica = false })
    src = assert(pg.connect(L.source.conninfo, { name = "source" }))
    dst = assert(pg.connect(L.target.conninfo, { name = "target" }))
    assert(src:exec("create table rows (id int primary key, pad text)"))
    assert(src:exec("insert into rows select g, repeat(md5(g::text), 3) from generate_series(1, $1) g", ROWS))
    assert(dst:exec("create table rows (id int primary key, pad text)"))
  end)

  teardown(function()
    if src then src:close() end
    if dst then dst:close() end
    if L then assert(L:stop()) end
  end)

  it("hands the target whole buffers: a few sends, not one every 8 KiB", function()
    local strace = which("strace")
    if not strace then return pending("strace is not installed (apt-get install strace)") end
    local script = ([[
      local pg = require "migrun.pg"
      local a = assert(pg.connect(%q, { name = "source" }))
      local b = assert(pg.connect(%q, { name = "target" }))
      assert(b:exec("truncate rows"))
      local r = assert(pg.copy{ from = a, from_sql = "copy rows to stdout", to = b, to_sql = "copy rows from stdin" })
      print(r.rows, r.bytes)
    ]]):format(L.source.conninfo, L.target.conninfo)
    local out = os.tmpname()
    -- LeakSanitizer cannot run under ptrace: off for the sanitizers' build
    local asan = ((os.getenv("ASAN_OPTIONS") or "") .. ":detect_leaks=0"):gsub("^:", "")
    local ok, how, code, stdout, stderr = proc.run{ strace, "-f", "-c", "-e", "trace=sendto,write", "-o", out,
      MIGRUN, "-e", script, env = { ASAN_OPTIONS = asan } }
    local summary = host.read_file(out) or ""
    os.remove(out)
    assert.is_true(ok, tostring(how) .. " " .. tostring(code) .. "\n" .. tostring(stderr))
    local rows, bytes = stdout:match("^(%d+)%s+(%d+)")
    assert.equal(ROWS, tonumber(rows))
    assert.equal(ROWS, dst:exec("select count(*) n from rows")[1].n)
    -- strace -c: "% time, seconds, usecs/call, calls, [errors,] syscall" a line
    local sends = 0
    for line in summary:gmatch("[^\n]+") do
      local f = {}
      for x in line:gmatch("%S+") do f[#f + 1] = x end
      if f[#f] == "sendto" then sends = tonumber(f[4]) end
    end
    -- 5 MB in buffers of 256 KiB: some 20 sends, and the few of connecting and querying
    assert.is_true(sends > 0 and sends < 80, ("%d sends for %d bytes:\n%s"):format(sends, tonumber(bytes), summary))
  end)

  it("does not hold back the rows of a slow source", function()
    -- a row of 10 kB every 0.3 s (the source's server sends what it has
    -- whenever 8 kB are waiting): the target has the first ones long before the last
    local script = ([[
      local pg = require "migrun.pg"
      local a = assert(pg.connect(%q, { name = "source" }))
      local b = assert(pg.connect(%q, { name = "target", application_name = "relay_slow" }))
      assert(b:exec("truncate rows"))
      local r = assert(pg.copy{ from = a, to = b, to_sql = "copy rows from stdin",
        from_sql = "copy (select g, repeat('x', 10000) || pg_sleep(0.3)::text from generate_series(1, 10) g) to stdout" })
      print(r.rows)
    ]]):format(L.source.conninfo, L.target.conninfo)
    local h = assert(proc.spawn{ MIGRUN, "-e", script, stdout = "capture", stderr = "capture" })
    local seen, deadline = 0, host.monotonic() + 2.5
    while host.monotonic() < deadline and seen == 0 do
      host.sleep(0.1)
      local res = assert(dst:exec([[select coalesce(max(p.tuples_processed), 0) as n from pg_stat_progress_copy p
        join pg_stat_activity a using (pid) where a.application_name = 'relay_slow']]))
      seen = res[1].n
    end
    local ok, how, code = h:wait(20)
    assert.is_true(ok, tostring(how) .. " " .. tostring(code) .. " " .. tostring(h.stderr))
    assert.is_true(seen > 0, "no row reached the target within 2.5 s of a 3 s COPY")
    assert.equal(10, dst:exec("select count(*) n from rows")[1].n)
  end)
end)
