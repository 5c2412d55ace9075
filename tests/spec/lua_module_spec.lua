-- migrun.so: the migrun runtime as a Lua C module for Debian's stock lua5.4.
-- require "migrun" registers every migrun module (C and Lua) in
-- package.preload; the module uses the interpreter's Lua, never a liblua of
-- its own.
local proc = require "migrun.proc"
local host = require "migrun.host"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local MODULE = os.getenv("MIGRUN_MODULE") or (MIGRUN:match("^(.*)/[^/]+$") or ".") .. "/migrun.so"
local PRELOAD = os.getenv("MIGRUN_SANITIZE_PRELOAD")
local LUA = "/usr/bin/lua5.4"

-- Runs code in the stock interpreter with the build's migrun.so first on
-- package.cpath; -> ok, stdout, stderr
local function lua54(code)
  local env = { MIGRUN_LUA_PATH = false, LUA_INIT = false, LUA_INIT_5_4 = false }
  if PRELOAD and PRELOAD ~= "" then
    env.LD_PRELOAD = PRELOAD -- the sanitizer build: its runtimes must come first
    env.ASAN_OPTIONS = "detect_leaks=0" -- the interpreter is not ours
  end
  local dir = MODULE:match("^(.*)/[^/]+$")
  local ok, _, _, out, err = proc.run{ LUA, "-e", ("package.cpath = %q .. package.cpath"):format(dir .. "/?.so;"),
    "-e", code, env = env, timeout = 60 }
  return ok, out, err
end

describe("migrun.so in the stock lua5.4", function()
  if not io.open(LUA) then
    it("needs /usr/bin/lua5.4 (Debian's lua5.4 package)", function() pending("lua5.4 is not installed") end)
    return
  end

  it("does not link a liblua of its own", function()
    local ok, _, _, out = proc.run{ "ldd", MODULE }
    assert.is_true(ok)
    assert.not_matches("liblua", out)
  end)

  it("makes migrun.lsn and migrun.pg requirable after require 'migrun'", function()
    local ok, out, err = lua54([[
      local migrun = require "migrun"
      local lsn, pg = require "migrun.lsn", require "migrun.pg"
      print(migrun.version, migrun.lua:sub(1, #_VERSION) == _VERSION)
      print(lsn("16/B374D848") + 8, lsn("16/B374D850") - lsn("16/B374D848"))
      print(pg.quote_ident('my "table"'), tostring(pg.null))
      local conn, e = pg.connect("host=127.0.0.1 port=1 dbname=x connect_timeout=5", { name = "nowhere" })
      print(conn, e.kind, require("migrun.error").is(e))
      print(package.preload["migrun.pg"] ~= nil, package.preload["migrun.pg.core"] ~= nil)
    ]])
    assert(ok, err)
    assert.equal(host.version .. "\ttrue\n"
      .. "16/B374D850\t8\n"
      .. '"my ""table"""\tnull\n'
      .. "nil\tconnection\ttrue\n"
      .. "true\ttrue\n", out)
  end)

  it("lists the modules it registered, and every one of them loads", function()
    local ok, out, err = lua54([[
      local migrun = require "migrun"
      local seen = {}
      for _, name in ipairs(migrun.modules) do
        seen[#seen + 1] = name
        assert(package.preload[name], name)
      end
      print(#seen, table.concat(seen, " "):find("migrun.proc", 1, true) ~= nil)
      for _, name in ipairs{ "migrun.error", "migrun.lsn", "migrun.proc", "migrun.host", "migrun.aws",
                             "migrun.pg.core", "migrun.pg" } do
        assert(require(name), name)
      end
      local okrun, _, _, echo = require("migrun.proc").run{ "echo", "from a child" }
      print(okrun, echo)
    ]])
    assert(ok, err)
    local n = tonumber(out:match("^(%d+)\t"))
    assert.is_true(n ~= nil and n > 10, out)
    assert.matches("^%d+\ttrue\ntrue\tfrom a child\n\n$", out)
  end)
end)
