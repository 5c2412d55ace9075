-- The lab's fault harness (migrun.rehearsal.faults through migrun.rehearsal.lab):
-- a TCP proxy in front of a server that passes, delays, blackholes or resets,
-- on cue; a server restarted on cue, fast or immediate; a target whose
-- database lives on a small disk that fills. What migrun does about each is
-- in pg_faults_spec.lua.
local lab = require "migrun.rehearsal.lab"
local faults = require "migrun.rehearsal.faults"
local pg = require "migrun.pg"
local host = require "migrun.host"
local proc = require "migrun.proc"

local function is_root()
  local _, _, _, out = proc.run{ "id", "-u" }
  return out == "0\n"
end

local function connect(c, opts)
  local o = { name = c.name, connect_timeout = 5 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return pg.connect(c.conninfo, o)
end

local function timed(fn, ...)
  local t0 = host.monotonic()
  local r = table.pack(fn(...))
  return host.monotonic() - t0, table.unpack(r, 1, r.n)
end

describe("the lab's faults", function()
  local L

  setup(function()
    L = assert(lab.start{ proxy = { "target" }, small_disk = is_root() and { size = "32M" } or nil })
  end)

  teardown(function()
    if L then assert(L:stop()) end
  end)

  after_each(function()
    if L and L.target.proxy then assert(L.target.proxy:pass()) end
  end)

  describe("proxy", function()
    it("stands in the cluster's conninfo and forwards both ways, byte for byte", function()
      local p = L.target.proxy
      assert.equal(("host=127.0.0.1 port=%d dbname=app user=rdsadmin"):format(p.port), L.target.conninfo)
      assert.equal(("host=127.0.0.1 port=%d dbname=app user=migrun"):format(p.port), L.target.migrun_conninfo)
      assert.equal(("host=127.0.0.1 port=%d dbname=app user=rdsadmin"):format(L.target.port),
        L.target.direct_conninfo)
      local before = assert(p:stats())
      local c <close> = assert(connect(L.target))
      assert(c:exec("create table fwd as select g, md5(g::text) m from generate_series(1, 100000) g"))
      local sum = assert(c:exec("select md5(string_agg(g || ' ' || m, ',' order by g)) s from fwd"))[1].s
      local rows = {}
      assert(c:copy_out("copy (select g, m from fwd order by g) to stdout", function(chunk) rows[#rows + 1] = chunk end))
      local text = table.concat(rows)
      local seen = {}
      for g, m in text:gmatch("(%d+)\t(%x+)\n") do seen[#seen + 1] = g .. " " .. m end
      assert.equal(100000, #seen)
      local direct <close> = assert(pg.connect(L.target.direct_conninfo))
      assert.equal(sum, assert(direct:exec("select md5($1) s", table.concat(seen, ",")))[1].s)
      local after = assert(p:stats())
      assert.equal("pass", after.mode)
      assert.equal(before.accepted + 1, after.accepted)
      assert.is_true(after.down - before.down > #text)
    end)

    it("delays each way by the seconds asked, and passes again", function()
      local c <close> = assert(connect(L.target))
      assert(L.target.proxy:delay(0.3))
      local seconds = timed(c.exec, c, "select 1")
      assert.is_true(seconds >= 0.6, ("a round trip took %.2f s"):format(seconds)) -- there and back
      assert(L.target.proxy:pass())
      seconds = timed(c.exec, c, "select 1")
      assert.is_true(seconds < 0.3, ("a round trip took %.2f s"):format(seconds))
    end)

    it("blackholes: nothing comes back, nothing is closed, new connections hang; duration heals it", function()
      local c <close> = assert(connect(L.target))
      assert(L.target.proxy:blackhole{ duration = 2 })
      local seconds, d, err = timed(pg.connect, L.target.conninfo, { connect_timeout = 0.5 })
      assert.is_nil(d)
      assert.equal("timeout", err.kind) -- no RST, no FIN: the connect waits out its timeout
      assert.is_true(seconds >= 0.5)
      -- a query sent into the blackhole is answered once it heals (held, not lost)
      local res
      seconds, res = timed(c.exec, c, "select 42 as x")
      assert.equal(42, assert(res)[1].x)
      assert.is_true(seconds >= 1, ("answered after %.2f s"):format(seconds))
      assert.equal("pass", assert(L.target.proxy:stats()).mode)
    end)

    it("resets: open connections are lost at once, new ones refused until it passes", function()
      local c <close> = assert(connect(L.target))
      assert(L.target.proxy:reset())
      local seconds, res, err = timed(c.exec, c, "select 1")
      assert.is_nil(res)
      assert.equal("connection", err.kind)
      assert.is_true(err.lost)
      assert.is_true(seconds < 2)
      local d, cerr = pg.connect(L.target.conninfo, { connect_timeout = 2 })
      assert.is_nil(d)
      assert.equal("connection", cerr.kind)
      assert(L.target.proxy:pass())
      local e <close> = assert(connect(L.target))
      assert(e:exec("select 1"))
    end)

    it("changes on cue: after seconds, or after bytes forwarded", function()
      local c <close> = assert(connect(L.target))
      assert(L.target.proxy:reset{ after = 0.5 })
      assert(c:exec("select 1")) -- not yet
      host.sleep(0.8)
      local res, err = c:exec("select 1")
      assert.is_nil(res)
      assert.is_true(err.lost)
      assert(L.target.proxy:pass())
      local d <close> = assert(connect(L.target))
      assert(L.target.proxy:reset{ after_bytes = 200000 })
      local n = 0
      local r
      r, err = d:copy_out("copy (select g, repeat('x', 100) from generate_series(1, 100000) g) to stdout",
        function(chunk) n = n + #chunk end)
      assert.is_nil(r)
      assert.is_true(err.lost)
      assert.is_true(n >= 100000 and n < 2000000, "bytes received before the reset: " .. n)
    end)

    it("refuses an unknown mode as misuse", function()
      assert.has_error(function() L.target.proxy:set("drop") end)
    end)
  end)

  describe("restart", function()
    it("fast, here and now: a new postmaster that answers", function()
      local pid = L.source:pid()
      assert(L.source:restart{ mode = "fast" })
      assert.is_number(L.source:pid())
      assert.are_not.equal(pid, L.source:pid())
      assert.equal("1", assert(L.source:psql("select 1")))
    end)

    it("immediate, on cue: crash recovery at the start, while the caller waits", function()
      local pid = L.source:pid()
      local cue = assert(L.source:restart{ mode = "immediate", after = 0.2, down = 0.3 })
      local ok, err = cue:wait(60)
      assert(ok, tostring(err))
      assert.are_not.equal(pid, L.source:pid())
      assert.truthy(L.source:log_tail(40):find("not properly shut down", 1, true)
        or L.source:log_tail(40):find("automatic recovery", 1, true))
      assert(L:wait_replica_caught_up(30)) -- the replica streams again
    end)

    it("refuses an unknown mode as misuse", function()
      assert.has_error(function() L.source:restart{ mode = "smart" } end)
    end)
  end)

  describe("small disk", function()
    it("holds the target's database, and fills on cue with a clear error (53100)", function()
      if not L.target.disk then
        pending("not root: a small disk mounts a tmpfs")
        return
      end
      local disk = L.target.disk
      local u = assert(disk:usage())
      assert.equal(32 * 1024 * 1024, u.total)
      local c <close> = assert(pg.connect(L.target.direct_migrun_conninfo .. " passfile=" .. L.passfile))
      assert.equal("migrun_small_disk", assert(c:exec([[select t.spcname from pg_database d
        join pg_tablespace t on t.oid = d.dattablespace where d.datname = current_database()]]))[1].spcname)
      assert(c:exec("create table small (id int, pad text)"))
      assert(disk:fill{ leave = 256 * 1024 })
      local res, err = c:exec("insert into small select g, repeat('x', 1000) from generate_series(1, 10000) g")
      assert.is_nil(res)
      assert.equal("53100", err.sqlstate)
      assert.is_true(err.disk_full)
      assert.matches("No space left on device", err.message, 1, true)
      disk:unfill()
      assert(c:exec("insert into small select g, repeat('x', 1000) from generate_series(1, 10000) g"))
    end)

    it("needs a size it understands", function()
      assert.equal(64 * 1024 * 1024, faults.size("64M"))
      assert.equal(1024 ^ 3, faults.size("1GB"))
      assert.equal(4096, faults.size(4096))
      assert.has_error(function() faults.size("lots") end)
    end)
  end)
end)
