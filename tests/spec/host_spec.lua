-- The migrun host as a program: Ctrl-C, installation, leaks under valgrind.
local proc = require "migrun.proc"
local tmp = require "helpers.tmp"
local MIGRUN = assert(os.getenv("MIGRUN_BIN"), "MIGRUN_BIN is set by ctest")
local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or "."
local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"

local function tmpdir() return tmp.dir("host") end

describe("the host", function()
  it("interrupts a running Lua loop on Ctrl-C with a traceback, exit status 1", function()
    local h = proc.spawn{ MIGRUN, "-e", "io.stdout:write('ready\\n') io.stdout:flush() while true do end",
      stdout = "capture", stderr = "capture" }
    for _ = 1, 100 do
      if h.stdout:find("ready") then break end
      h:wait(0.05)
    end
    h:kill("INT")
    assert.same({ nil, "exit", 1 }, { h:wait(10) })
    assert.matches("interrupted!", h.stderr)
    assert.matches("stack traceback", h.stderr)
  end)

  it("interrupts a script blocked in a C call (waiting for a child) and kills the child", function()
    local script = [[
      local h = require("migrun.proc").spawn{ "sleep", "60" }
      io.stdout:write(h.pid, "\n") io.stdout:flush()
      h:wait()
    ]]
    local h = proc.spawn{ MIGRUN, "-e", script, stdout = "capture", stderr = "capture" }
    local child
    for _ = 1, 100 do
      child = h.stdout:match("(%d+)\n")
      if child then break end
      h:wait(0.05)
    end
    assert.truthy(child)
    h:kill("INT")
    assert.same({ nil, "exit", 1 }, { h:wait(10) })
    assert.matches("interrupted!", h.stderr)
    assert.is_nil(io.open("/proc/" .. child .. "/stat"))
  end)

  it("is installed with its playbooks, and finds them from any directory", function()
    local build = MIGRUN:match("^(.*)/[^/]+$")
    local prefix = tmpdir()
    local ok, _, _, _, err = proc.run{ "cmake", "--install", build, "--prefix", prefix }
    assert(ok, err)
    local installed = prefix .. "/bin/migrun"
    assert.truthy(io.open(prefix .. "/share/migrun/playbooks/tour.lua"))
    assert.truthy(io.open(prefix .. "/share/doc/migrun/README.md"))
    assert.truthy(io.open(prefix .. "/share/doc/migrun/lab.md"))
    assert.truthy(io.open(prefix .. "/share/migrun/tools/dms-emulator.lua"))
    -- from a directory without playbooks/, the relative path falls back to the installed ones
    local ok2, _, _, out, err2 = proc.run{ installed, "playbooks/tour.lua", "--quick", cwd = "/" }
    assert(ok2, err2)
    assert.matches("migrun tour", out)
    proc.run{ "rm", "-rf", prefix }
  end)

  it("gives embedded modules chunk names that point at the real files", function()
    local ok, _, _, out = proc.run{ MIGRUN, "-e", "print(debug.getinfo(require('migrun.rehearsal.tour').run, 'S').source)" }
    assert(ok)
    assert.equal("@" .. SOURCE .. "/lua/migrun/rehearsal/tour.lua\n", out)
  end)

  it("leaks nothing under valgrind", function()
    if SANITIZE then return pending("valgrind does not run the sanitizer build") end
    local ok, how, code, out, err = proc.run{ "valgrind", "--quiet", "--leak-check=full",
      "--errors-for-leak-kinds=definite,indirect", "--error-exitcode=99",
      "--child-silent-after-fork=yes",
      MIGRUN, SOURCE .. "/tests/valgrind/smoke.lua" }
    assert(ok, ("valgrind %s %s:\n%s"):format(how, code, err))
    assert.matches("valgrind smoke ok", out)
  end)
end)
