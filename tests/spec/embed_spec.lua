-- Embedding migrun: examples/embed.c, a host of a few dozen lines on the
-- public header, runs scripts with the migrun library (built here against
-- libmigrun.so); and the same file compiles against an installed prefix with
-- nothing but `pkg-config --cflags --libs migrun`.
local proc = require "migrun.proc"
local tmp = require "helpers.tmp"
local host = require "migrun.host"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local BUILD = MIGRUN:match("^(.*)/[^/]+$") or "build"
local EXAMPLE = os.getenv("MIGRUN_EXAMPLE") or BUILD .. "/examples/embed"
local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or "."
local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"

local function tmpdir() return tmp.dir("embed") end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- requires migrun.lsn and migrun.proc, and prints a result
local SCRIPT = [[
local lsn, proc = require "migrun.lsn", require "migrun.proc"
local ok, how, code, out = proc.run{ "printf", "%s|", table.unpack(arg) }
print(lsn("16/B374D848") + 8, ok, how, code, out, select("#", ...))
]]
local EXPECTED = "16/B374D850\ttrue\texit\t0\tone|two words|\t2\n"

describe("examples/embed.c", function()
  local dir
  setup(function() dir = tmpdir() end)
  teardown(function() proc.run{ "rm", "-rf", dir } end)

  it("runs a script that requires migrun.lsn and migrun.proc, with arg and ...", function()
    write(dir .. "/script.lua", SCRIPT)
    local ok, _, code, out, err = proc.run{ EXAMPLE, dir .. "/script.lua", "one", "two words",
      env = { MIGRUN_LUA_PATH = false } }
    assert.equal(0, code, err)
    assert.is_true(ok)
    assert.equal(EXPECTED, out)
  end)

  it("reports an error with its traceback, exit status 1", function()
    write(dir .. "/fails.lua", "local function inner() error('broke') end\ninner()\n")
    local ok, _, code, out, err = proc.run{ EXAMPLE, dir .. "/fails.lua" }
    assert.is_nil(ok)
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("fails.lua:1: broke\nstack traceback:\n", err, 1, true)
    assert.matches("in local 'inner'", err, 1, true)
    local ok2, _, code2, _, err2 = proc.run{ EXAMPLE }
    assert.is_nil(ok2)
    assert.equal(2, code2)
    assert.matches("usage: ", err2)
  end)

  it("stops a script blocked in a migrun C call on Ctrl-C, and kills its child", function()
    write(dir .. "/blocks.lua", [[
      local h = require("migrun.proc").spawn{ "sleep", "60" }
      io.stdout:write(h.pid, "\n") io.stdout:flush()
      h:wait()
    ]])
    local h = assert(proc.spawn{ EXAMPLE, dir .. "/blocks.lua", stdout = "capture", stderr = "capture" })
    local child
    for _ = 1, 400 do
      child = h.stdout:match("(%d+)\n")
      if child then break end
      h:wait(0.05)
    end
    assert.truthy(child, h.stderr)
    host.sleep(0.2)
    h:kill("INT")
    assert.same({ nil, "exit", 1 }, { h:wait(30) })
    assert.matches("interrupted!\nstack traceback:", h.stderr, 1, true)
    assert.is_nil(io.open("/proc/" .. child .. "/stat"))
  end)

  it("compiles against an installed prefix with pkg-config --cflags --libs migrun", function()
    local prefix = dir .. "/prefix"
    local ok, _, _, _, err = proc.run{ "cmake", "--install", BUILD, "--prefix", prefix }
    assert(ok, err)
    for _, f in ipairs{ "bin/migrun", "lib/libmigrun.a", "lib/libmigrun.so", "lib/pkgconfig/migrun.pc",
                         "include/migrun.h", "lib/lua/5.4/migrun.so" } do
      assert.truthy(io.open(prefix .. "/" .. f), f)
    end
    local env = { PKG_CONFIG_PATH = prefix .. "/lib/pkgconfig" }
    local okf, _, _, flags, errf = proc.run{ "pkg-config", "--cflags", "--libs", "migrun", env = env }
    assert(okf, errf)
    assert.matches("-I" .. prefix .. "/include", flags, 1, true)
    assert.matches("-lmigrun", flags, 1, true)
    local cc = { "cc", "-o", dir .. "/embed", SOURCE .. "/examples/embed.c", "-Wl,-rpath," .. prefix .. "/lib" }
    for word in flags:gmatch("%S+") do cc[#cc + 1] = word end
    if SANITIZE then cc[#cc + 1] = "-fsanitize=address,undefined" end -- the library is instrumented
    local okc, _, _, _, errc = proc.run(cc)
    assert(okc, errc)
    write(dir .. "/script.lua", SCRIPT)
    local okr, _, code, out, errr = proc.run{ dir .. "/embed", dir .. "/script.lua", "one", "two words" }
    assert.equal(0, code, errr)
    assert.is_true(okr)
    assert.equal(EXPECTED, out)
    local _, _, _, needed = proc.run{ "ldd", dir .. "/embed" }
    assert.matches(prefix .. "/lib/libmigrun.so.", needed, 1, true)
  end)
end)
