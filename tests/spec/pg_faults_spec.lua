-- migrun.pg when the world fails (issue 24; docs/faults.md): every network
-- wait bounded. TCP keepalives and tcp_user_timeout on every connection (a
-- peer that vanishes ends the connection), a COPY stall bound that names the
-- side that stopped moving, a cancel that nothing answers given up, a server
-- restarted under a query or a COPY said as a lost connection, a full disk
-- said as such. The faults come from the lab's harness (lab_faults_spec.lua);
-- each blackhole heals by itself after a while (duration), so that a bound
-- that does not hold fails the test instead of hanging it.
local lab = require "migrun.rehearsal.lab"
local faults = require "migrun.rehearsal.faults"
local pg = require "migrun.pg"
local host = require "migrun.host"
local proc = require "migrun.proc"
local cjson = require "cjson"

local ROWS = 300000 -- about 12 MB as text: far more than the socket buffers on the way

local function is_root()
  local _, _, _, out = proc.run{ "id", "-u" }
  return out == "0\n"
end

local function timed(fn, ...)
  local t0 = host.monotonic()
  local r = table.pack(fn(...))
  return host.monotonic() - t0, table.unpack(r, 1, r.n)
end

describe("migrun.pg under faults", function()
  local L, direct -- the lab; a direct connection to its target, for looking

  local function count(name)
    return assert(direct:exec("select count(*) as n from " .. name))[1].n
  end

  setup(function()
    L = assert(lab.start{ proxy = { "source", "target" }, small_disk = is_root() and { size = "32M" } or nil })
    assert(L.source:psql(("create table big as select g as id, md5(g::text) as m from generate_series(1, %d) g")
      :format(ROWS)))
    direct = assert(pg.connect(L.target.direct_conninfo, { name = "target" }))
  end)

  teardown(function()
    if direct then direct:close() end
    if L then assert(L:stop()) end
  end)

  before_each(function()
    assert(direct:exec("drop table if exists big; create table big (id int, m text)"))
  end)

  after_each(function()
    for _, name in ipairs{ "source", "target" } do assert(L[name].proxy:pass()) end
  end)

  local function connections(stall)
    local src = assert(pg.connect(L.source.conninfo, { name = "source", stall_timeout = stall }))
    local dst = assert(pg.connect(L.target.conninfo, { name = "target", stall_timeout = stall }))
    return src, dst, setmetatable({}, { __close = function() src:close() dst:close() end })
  end

  local function copy(src, dst, o)
    local args = { from = src, from_sql = "COPY big TO STDOUT", to = dst, to_sql = "COPY big FROM STDIN" }
    for k, v in pairs(o or {}) do args[k] = v end
    return pg.copy(args)
  end

  describe("every connection", function()
    it("has TCP keepalives and tcp_user_timeout unless its conninfo says otherwise", function()
      assert.same({ keepalives = "1", keepalives_idle = "15", keepalives_interval = "5", keepalives_count = "3",
        tcp_user_timeout = "30000" }, pg.NETWORK_DEFAULTS)
      local c <close> = assert(pg.connect(L.target.conninfo))
      assert.same({ keepalives = 1, keepalives_idle = 15, keepalives_interval = 5, keepalives_count = 3,
        tcp_user_timeout = 30000 }, c:info().tcp)
      assert.equal(20, c:info().stall_timeout)
      assert.equal(20, pg.STALL_TIMEOUT)
      local s <close> = assert(pg.connect(L.target.conninfo .. " keepalives_idle=60 tcp_user_timeout=0"))
      assert.equal(60, s:info().tcp.keepalives_idle)
      assert.equal(0, s:info().tcp.tcp_user_timeout)
      assert.equal(5, s:info().tcp.keepalives_interval)
      local t <close> = assert(pg.connect({ host = "127.0.0.1", port = L.target.port, user = "rdsadmin", dbname = "app",
        keepalives = "0" }))
      assert.equal(0, t:info().tcp.keepalives)
      local u <close> = assert(pg.connect(("postgresql://rdsadmin@127.0.0.1:%d/app?keepalives_count=9")
        :format(L.target.port), { stall_timeout = false }))
      assert.equal(9, u:info().tcp.keepalives_count)
      assert.equal(0, u:info().stall_timeout)
    end)

    it("ends within tcp_user_timeout when the server's packets are lost (a private network namespace)", function()
      if not is_root() then
        pending("not root: packet loss is made with tc in a network namespace of its own")
        return
      end
      local job = faults.isolated{ host.exe, os.getenv("MIGRUN_SOURCE_DIR") .. "/tests/helpers/netns_drop.lua",
        env = { MIGRUN_DROP_CONNINFO_EXTRA = "keepalives_idle=1 keepalives_interval=1 tcp_user_timeout=3000" },
        timeout = 120 }
      local ok, how, code, out, errout = proc.run(job)
      assert(ok, ("%s %s %s %s"):format(tostring(how), tostring(code), tostring(out), tostring(errout)))
      local r = cjson.decode(out:match("([^\n]+)\n*$"))
      assert.is_false(r.ok)
      assert.equal("connection", r.kind)
      assert.is_true(r.lost)
      assert.equal(3000, r.tcp.tcp_user_timeout)
      -- 3 s since the last packet received (1 s before the drop began), and no longer
      -- (a loaded machine or a sanitizer build adds a second or two; the default is ~30 s)
      assert.is_true(r.seconds < 7, ("the lost server was noticed after %.1f s"):format(r.seconds))
      print(("\npackets lost: noticed after %.2f s (tcp_user_timeout 3 s)"):format(r.seconds))
    end)
  end)

  describe("pg.copy", function()
    it("fails within the stall bound when the target takes nothing, naming the target side", function()
      local src, dst, _ <close> = connections(1.5)
      assert(L.target.proxy:blackhole{ after_bytes = 1000000, duration = 20 })
      local seconds, r, err = timed(copy, src, dst)
      assert.is_nil(r)
      assert.equal("connection", err.kind)
      assert.equal("to", err.side)
      assert.is_true(err.stalled)
      assert.is_true(err.lost)
      assert.equal(1.5, err.stall_timeout)
      assert.matches("COPY stalled on the target side", err.message, 1, true)
      assert.is_true(seconds < 6, ("the stall was noticed after %.1f s"):format(seconds))
      assert.is_true(dst:is_closed())
      assert.equal(1, assert(src:exec("select 1 as x"))[1].x) -- the source was aborted, still usable
      assert.equal(0, count("big"))
      print(("\ntarget stalled: noticed after %.2f s (stall_timeout 1.5 s)"):format(seconds))
    end)

    it("fails within the stall bound when the source brings nothing, naming the source side", function()
      local src, dst, _ <close> = connections(30)
      assert(L.source.proxy:blackhole{ after_bytes = 1000000, duration = 20 })
      local seconds, r, err = timed(copy, src, dst, { stall_timeout = 1.5 })
      assert.is_nil(r)
      assert.equal("from", err.side)
      assert.is_true(err.stalled)
      assert.matches("COPY stalled on the source side", err.message, 1, true)
      assert.is_true(seconds < 6, ("the stall was noticed after %.1f s"):format(seconds))
      assert.is_true(src:is_closed())
      assert.equal("idle", dst:transaction_status()) -- the target's COPY was failed, nothing kept
      assert.equal(0, count("big"))
    end)

    it("is not a stall when the way is slow but moving", function()
      local src, dst, _ <close> = connections(1)
      assert(L.target.proxy:delay(0.2)) -- longer than a round trip, shorter than the bound
      local r = assert(copy(src, dst))
      assert.equal(ROWS, r.rows)
      assert.equal(ROWS, count("big"))
    end)

    it("says connection lost, on the target side, when the target restarts mid-COPY", function()
      local src, dst, _ <close> = connections(30)
      local restarted
      local seconds, r, err = timed(copy, src, dst, { progress_interval = 0, on_progress = function()
        if not restarted then restarted = assert(L.target:restart{ mode = "immediate" }) end
      end })
      assert.is_true(restarted)
      assert.is_nil(r)
      assert.equal("connection", err.kind)
      assert.equal("to", err.side)
      assert.is_true(err.lost)
      assert.matches("^connection lost", err.message)
      assert.is_true(seconds < 30)
      assert.equal(1, assert(src:exec("select 1 as x"))[1].x)
      direct:close()
      direct = assert(pg.connect(L.target.direct_conninfo, { name = "target" }))
      assert.equal(0, count("big"))
    end)

    it("gives the target's disk_full error (53100) when the target's disk fills mid-COPY", function()
      if not L.target.disk then
        pending("not root: a small disk mounts a tmpfs")
        return
      end
      local src, dst, _ <close> = connections(30)
      assert(L.target.disk:fill{ leave = 2 * 1024 * 1024 })
      finally(function() L.target.disk:unfill() end)
      local r, err = copy(src, dst)
      assert.is_nil(r)
      assert.equal("to", err.side)
      assert.equal("53100", err.sqlstate)
      assert.is_true(err.disk_full)
      assert.matches("No space left on device", err.message, 1, true)
      assert.equal("idle", dst:transaction_status())
      assert.equal(1, assert(src:exec("select 1 as x"))[1].x)
    end)
  end)

  describe("copy_out and copy_in", function()
    it("fail within their connection's stall bound", function()
      local src, dst, _ <close> = connections(1)
      assert(L.source.proxy:blackhole{ after_bytes = 1000000, duration = 20 })
      local seconds, r, err = timed(src.copy_out, src, "COPY big TO STDOUT", function() end)
      assert.is_nil(r)
      assert.equal("from", err.side)
      assert.is_true(err.stalled)
      assert.is_true(seconds < 5, ("noticed after %.1f s"):format(seconds))
      assert(L.target.proxy:blackhole{ after_bytes = 1000000, duration = 20 })
      local line = ("x"):rep(1000) .. "\n"
      seconds, r, err = timed(dst.copy_in, dst, "COPY big (m) FROM STDIN", function() return line:rep(64) end)
      assert.is_nil(r)
      assert.equal("to", err.side)
      assert.is_true(err.stalled)
      assert.is_true(seconds < 5, ("noticed after %.1f s"):format(seconds))
    end)
  end)

  describe("a query", function()
    for _, mode in ipairs{ "fast", "immediate" } do
      it("says connection lost, at once, when the server restarts under it (" .. mode .. ")", function()
        local c <close> = assert(pg.connect(L.target.conninfo, { name = "target" }))
        local cue = assert(L.target:restart{ mode = mode, after = 0.5 })
        local seconds, r, err = timed(c.exec, c, "select pg_sleep(30)")
        assert(cue:wait(60))
        assert.is_nil(r)
        assert.equal("connection", err.kind)
        assert.is_true(err.lost)
        assert.matches("^connection lost: ", err.message)
        assert.truthy(err.hint:find("connect again", 1, true))
        assert.is_true(seconds < 5, ("noticed after %.1f s"):format(seconds))
        local again <close> = assert(pg.connect(L.target.conninfo))
        assert(again:exec("select 1"))
        direct:close()
        direct = assert(pg.connect(L.target.direct_conninfo, { name = "target" }))
      end)
    end

    it("with a timeout, ends within it and the cancel's 5 s when nothing answers", function()
      local c <close> = assert(pg.connect(L.target.conninfo, { name = "target" }))
      assert(L.target.proxy:blackhole{ duration = 30 })
      local seconds, r, err = timed(c.exec, c, { "select 1", timeout = 1 })
      assert.is_nil(r)
      assert.equal("connection", err.kind)
      assert.is_true(err.lost)
      assert.matches("did not take a cancel request within 5 s", err.message, 1, true)
      assert.is_true(seconds < 8, ("ended after %.1f s"):format(seconds))
      assert.is_true(c:is_closed())
    end)
  end)
end)
