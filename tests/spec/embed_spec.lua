-- Embedding migrun: examples/embed.c, a host of a few dozen lines on the
-- public header, runs scripts with the migrun library (built here against
-- libmigrun.so); and the same file compiles against an installed prefix with
-- nothing but `pkg-config --cflags --libs migrun`. Whatever the host (that
-- example, the stock lua5.4 with migrun.so, the migrun executable, each also
-- installed), a pool's workers are the worker executable migrun-worker, found
-- by the library; examples/two_states.c runs two states side by side, each
-- with its children, callbacks and guard. (The stock playbooks run end to end
-- from these hosts in e2e_embed_spec.)
local proc = require "migrun.proc"
local tmp = require "helpers.tmp"
local host = require "migrun.host"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local BUILD = MIGRUN:match("^(.*)/[^/]+$") or "build"
local EXAMPLE = os.getenv("MIGRUN_EXAMPLE") or BUILD .. "/examples/embed"
local TWO_STATES = EXAMPLE:gsub("[^/]+$", "two_states")
local WORKER = BUILD .. "/migrun-worker"
local MODULE = os.getenv("MIGRUN_MODULE") or BUILD .. "/migrun.so"
local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or "."
local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"
local PRELOAD = os.getenv("MIGRUN_SANITIZE_PRELOAD")
local LUA = "/usr/bin/lua5.4"

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

-- A pool of three tasks over three workers (tests/helpers/pool_probe.lua: each
-- says it started, then sleeps): prints, per task, the program its process
-- runs (argv[0], read while it sleeps), then how many ran at once.
local POOL = [[
local pool = require "migrun.pool"
local programs, most = {}, 0
local p
p = pool.new{ jobs = 3, entry = "helpers.pool_probe", on_event = function(task, ev)
  if ev.event == "started" then
    local f = assert(io.open("/proc/" .. task.pid .. "/cmdline", "rb"))
    programs[#programs + 1] = f:read("a"):match("^[^%z]*")
    f:close()
    most = math.max(most, p:running())
  end
end }
for n = 1, 3 do p:add{ job = { seconds = 0.5, n = n } } end
local ok, failure = p:run()
assert(ok, failure and (tostring(failure.message) .. "\n" .. tostring(failure.detail)))
table.sort(programs)
print(table.concat(programs, "\n"))
print("at once", most)
]]

local function pool_script(dir)
  write(dir .. "/pool.lua", POOL)
  return dir .. "/pool.lua"
end

-- The stock interpreter with the migrun.so of dir first on package.cpath.
local function lua54(dir, ...)
  return { LUA, "-e", ("package.cpath = %q .. package.cpath require 'migrun'"):format(dir .. "/?.so;"), ... }
end

-- Runs argv with the tests' helpers on LUA_PATH -> ok, stdout, stderr
local function run(argv, env)
  env = env or {}
  env.LUA_PATH = SOURCE .. "/tests/?.lua;;"
  env.LUA_INIT, env.LUA_INIT_5_4, env.MIGRUN_LUA_PATH = false, false, false
  if argv[1] == LUA and PRELOAD and PRELOAD ~= "" then
    env.LD_PRELOAD = PRELOAD -- the sanitizer build: its runtimes must come first
    env.ASAN_OPTIONS = "detect_leaks=0" -- the interpreter is not ours
  end
  argv.env, argv.timeout = env, 120
  local ok, _, _, out, err = proc.run(argv)
  return ok, out, err
end

-- What the pool script printed: three tasks in `worker`, three at once.
local function assert_pool(worker, ok, out, err)
  assert(ok, err)
  assert.equal(("%s\n%s\n%s\nat once\t3\n"):format(worker, worker, worker), out)
end

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
                         "include/migrun.h", "lib/lua/5.4/migrun.so", "lib/migrun/migrun-worker" } do
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

    -- the installed worker is found from each installed form of the library:
    -- beside libmigrun.so, migrun.so and the migrun executable, not the build's
    local installed = prefix .. "/lib/migrun/migrun-worker"
    local script = pool_script(dir)
    assert_pool(installed, run{ dir .. "/embed", script })
    assert_pool(installed, run{ prefix .. "/bin/migrun", script })
    if io.open(LUA) then assert_pool(installed, run(lua54(prefix .. "/lib/lua/5.4", script))) end
  end)
end)

describe("the worker executable", function()
  local dir, script, worker
  setup(function()
    dir = tmpdir()
    script = pool_script(dir)
    local _, _, _, out = proc.run{ "readlink", "-f", WORKER }
    worker = out:gsub("%s+$", "")
  end)
  teardown(function() proc.run{ "rm", "-rf", dir } end)

  it("runs a pool's three tasks at once from examples/embed, the stock lua5.4 and migrun", function()
    assert_pool(worker, run{ EXAMPLE, script })
    assert_pool(worker, run{ MIGRUN, script })
    if not io.open(LUA) then return pending("lua5.4 is not installed") end
    assert_pool(worker, run(lua54(MODULE:match("^(.*)/[^/]+$"), script)))
  end)

  it("is the one MIGRUN_WORKER names, and a wrong one is said, not passed over", function()
    assert_pool(worker, run({ EXAMPLE, script }, { MIGRUN_WORKER = WORKER }))
    for value, says in pairs{ ["/no/such/worker"] = "is not an executable file",
        [SOURCE .. "/README.md"] = "is not an executable file", ["build/migrun-worker"] = "is not an absolute path" } do
      local ok, _, err = run({ EXAMPLE, script }, { MIGRUN_WORKER = value })
      assert.is_falsy(ok)
      assert.matches("cannot start a worker process: [worker] MIGRUN_WORKER=" .. value .. " " .. says, err, 1, true)
    end
    local found = run{ MIGRUN, "-e", "assert(require('migrun.host').worker() == " .. ("%q"):format(worker) .. ")" }
    assert.is_true(found)
  end)

  it("is the one a host names with migrun_set_worker, before MIGRUN_WORKER", function()
    write(dir .. "/setter.c", [[
      #include <errno.h>
      #include <stdio.h>
      #include <lauxlib.h>
      #include <lualib.h>
      #include <migrun.h>
      int main(int argc, char **argv) {
          (void)argc;
          if (migrun_set_worker("/no/such/worker") == 0 || errno != ENOENT)
              return 3;
          if (migrun_set_worker(argv[1]) != 0)
              return 4;
          lua_State *L = luaL_newstate();
          luaL_openlibs(L);
          migrun_openlibs(L);
          int status = luaL_loadfile(L, argv[2]) || migrun_docall(L, 0, 0);
          if (status)
              fprintf(stderr, "%s\n", lua_tostring(L, -1));
          lua_close(L);
          return status;
      }
    ]])
    local _, _, _, flags = proc.run{ "pkg-config", "--cflags", "--libs", "lua5.4" }
    local cc = { "cc", "-Wall", "-Werror", "-o", dir .. "/setter", dir .. "/setter.c", "-I" .. SOURCE .. "/runtime/include",
      "-L" .. BUILD, "-lmigrun", "-Wl,-rpath," .. BUILD }
    for word in flags:gmatch("%S+") do cc[#cc + 1] = word end
    if SANITIZE then cc[#cc + 1] = "-fsanitize=address,undefined" end
    local okc, _, _, _, errc = proc.run(cc)
    assert(okc, errc)
    -- a worker shipped where the library would not look, under a name of the host's
    assert(proc.run{ "mkdir", "-p", dir .. "/elsewhere" })
    assert(proc.run{ "cp", WORKER, dir .. "/elsewhere/my-worker" })
    assert_pool(dir .. "/elsewhere/my-worker", run({ dir .. "/setter", dir .. "/elsewhere/my-worker", script },
      { MIGRUN_WORKER = "/no/such/worker" }))
  end)

  it("refuses to serve a library of another version", function()
    local ok, out, err = run({ WORKER, "-e", "print('ran')" }, { MIGRUN_WORKER_VERSION = "0.0.1" })
    assert.is_falsy(ok)
    assert.equal("", out)
    assert.matches("this migrun worker is version " .. host.version .. ", the migrun library that started it is 0.0.1",
      err, 1, true)
    -- the check is the worker's own: its children do not inherit it
    local ok2, out2 = run({ WORKER, "-e", "print(os.getenv('MIGRUN_WORKER_VERSION'))" },
      { MIGRUN_WORKER_VERSION = host.version })
    assert.is_true(ok2)
    assert.equal("nil\n", out2)
  end)

  it("makes a library refuse to spawn when SIGCHLD is ignored, and migrun put its default back", function()
    -- SIG_IGN survives exec: the kernel would reap the children and lose their status
    local code = "local proc = require 'migrun.proc'\n"
      .. "local h, err = proc.spawn{ 'true' }\n"
      .. "if h then print(h:wait()) else print(err.kind, err.code, err.message) end\n"
    write(dir .. "/chld.lua", code)
    local ok, out, err = run{ "env", "--ignore-signal=CHLD", EXAMPLE, dir .. "/chld.lua" }
    assert(ok, err)
    assert.matches("^spawn\tSIGCHLD\tSIGCHLD is ignored in this process", out)
    local ok2, out2, err2 = run{ "env", "--ignore-signal=CHLD", MIGRUN, dir .. "/chld.lua" }
    assert(ok2, err2)
    assert.equal("true\texit\t0\n", out2)
  end)

  it("gives require 'migrun' the library the host runs, never a second copy from migrun.so", function()
    write(dir .. "/migrun.lua", [[
      local m = require "migrun"
      local maps = assert(io.open("/proc/self/maps")):read("a")
      print(m.version, maps:find("/migrun.so", 1, true) == nil)
    ]])
    local ok, out, err = run({ EXAMPLE, dir .. "/migrun.lua" }, { LUA_CPATH = BUILD .. "/?.so;;" })
    assert(ok, err)
    assert.equal(host.version .. "\ttrue\n", out)
  end)
end)

describe("examples/two_states.c", function()
  it("runs two states side by side: each its children, its callbacks, its guard", function()
    local ok, _, code, out, err = proc.run{ TWO_STATES, timeout = 120 }
    assert.equal(0, code, err)
    assert.is_true(ok)
    for _, line in ipairs{ "interleaved: state A got its 500 lines", "interleaved: state B got its 500 lines",
        "threads: state A ran 40 rounds of 3 children, every line to its callback",
        "threads: state B ran 40 rounds of 3 children, every line to its callback",
        "stop: state B waited while the other state's guard asked, not stopped",
        "stop: state A was stopped by its guard (stopped by migrun's guard)" } do
      assert.truthy(out:find(line, 1, true), line .. " not in:\n" .. out)
    end
  end)
end)
