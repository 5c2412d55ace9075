-- migrun.proc: processes from argv arrays, never through a shell.
local proc = require "migrun.proc"
local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  -- a zombie ("Z") still has an entry: count it as alive, it was not reaped
  return stat ~= nil
end

describe("migrun.proc", function()
  it("reports exit codes like os.execute", function()
    assert.same({ true, "exit", 0 }, { proc.spawn{ "true" }:wait() })
    assert.same({ nil, "exit", 3 }, { proc.spawn{ "sh", "-c", "exit 3" }:wait() })
  end)

  it("reports signals", function()
    local h = proc.spawn{ "sleep", "30" }
    assert.is_true(h:kill("KILL"))
    assert.same({ nil, "signal", 9 }, { h:wait() })
    local h2 = proc.spawn{ "sleep", "30" }
    h2:kill()
    assert.same({ nil, "signal", 15 }, { h2:wait() })
  end)

  it("times out without killing, then can be waited again", function()
    local h = proc.spawn{ "sleep", "0.5" }
    assert.same({ nil, "timeout" }, { h:wait(0.05) })
    assert.is_true(h.running)
    assert.same({ true, "exit", 0 }, { h:wait(5) })
    assert.is_false(h.running)
    -- a finished process answers again with the same result
    assert.same({ true, "exit", 0 }, { h:wait() })
  end)

  it("passes arguments verbatim, with no shell in between", function()
    local weird = { "$HOME", "a b", "it's", "`id`", "*", ";", "" }
    local ok, _, _, out = proc.run{ "printf", "%s\\n", table.unpack(weird) }
    assert.is_true(ok)
    assert.equal(table.concat(weird, "\n") .. "\n", out)
  end)

  it("adds env entries to the child only and removes with false", function()
    local ok, _, _, out = proc.run{ "sh", "-c", 'echo "$MIGRUN_T1-${HOME:+home}-${MIGRUN_T2-unset}"',
      env = { MIGRUN_T1 = "one", MIGRUN_T2 = false } }
    assert.is_true(ok)
    assert.equal("one-home-unset\n", out)
    assert.is_nil(os.getenv("MIGRUN_T1"))
  end)

  it("runs in cwd", function()
    local _, _, _, out = proc.run{ "pwd", cwd = "/tmp" }
    assert.equal("/tmp\n", out)
  end)

  it("keeps secrets given through env out of the printable command", function()
    local h = proc.spawn{ "psql", "-h", "db host", env = { PGPASSWORD = "s3cret" }, stdout = "null", stderr = "null" }
    assert.equal("psql -h 'db host'", h:command())
    assert.falsy(tostring(h):find("s3cret", 1, true))
    h:wait()
    assert.equal([[pg_dump -t 'a b' 'it'\''s']], proc.quote{ "pg_dump", "-t", "a b", "it's" })
  end)

  it("returns nil, err when the program cannot be run", function()
    local h, err = proc.spawn{ "/nonexistent/program" }
    assert.is_nil(h)
    assert.equal("spawn", err.kind)
    assert.matches("cannot run /nonexistent/program: No such file or directory", tostring(err))
    local h2, err2 = proc.spawn{ "true", cwd = "/nonexistent/dir" }
    assert.is_nil(h2)
    assert.matches("cannot change directory to /nonexistent/dir", tostring(err2))
  end)

  it("raises on misuse", function()
    assert.has_error(function() proc.spawn{} end)
    assert.has_error(function() proc.spawn{ "true", stdout = "bogus" } end)
    assert.has_error(function() proc.spawn{ { "true" } } end)
    assert.has_error(function() proc.spawn{ "true", stdin = true } end)
    local h = proc.spawn{ "true" }
    h:close()
    h:close() -- idempotent
    assert.has_error(function() h:wait() end, "attempt to use a closed process handle")
    assert.matches("%(closed%)", tostring(h))
  end)

  it("captures large outputs on both streams at once without deadlock", function()
    -- 8 MB on stdout and 8 MB on stderr, interleaved: a naive reader blocks on a full pipe
    local script = "for i in $(seq 1 64); do head -c 131072 /dev/zero | tr '\\0' o; head -c 131072 /dev/zero | tr '\\0' e >&2; done"
    local h = proc.spawn{ "sh", "-c", script, stdout = "capture", stderr = "capture" }
    assert.same({ true, "exit", 0 }, { h:wait(60) })
    assert.equal(64 * 131072, #h.stdout)
    assert.equal(64 * 131072, #h.stderr)
    assert.is_nil(h.stdout:find("[^o]"))
  end)

  it("feeds stdin data and reads it back", function()
    local data = string.rep("0123456789abcdef", 1 << 16) -- 1 MiB
    local h = proc.spawn{ "cat", stdin = data, stdout = "capture" }
    assert.same({ true, "exit", 0 }, { h:wait(30) })
    assert.equal(data, h.stdout)
    local _, _, _, out = proc.run{ "cat", stdin = false }
    assert.equal("", out)
  end)

  it("keeps a piped stdin open for h:send: a conversation, then EOF at close_stdin", function()
    local lines = {}
    local h <close> = proc.spawn{ "cat", stdin = { pipe = true }, stdout = function(l) lines[#lines + 1] = l end }
    -- nothing sent: cat waits on its stdin, it does not see EOF
    assert.same({ nil, "timeout" }, { h:wait(0.2) })
    assert.is_true(h:send("one\n"))
    local deadline = os.time() + 10
    while #lines < 1 and os.time() < deadline do h:wait(0.05) end
    assert.same({ "one" }, lines) -- answered while stdin stays open
    -- more than a pipe holds, sent without waiting, written as cat reads it
    local big = string.rep("x", 1 << 20)
    assert.is_true(h:send(big .. "\n"))
    assert.is_true(h:send("two\n"))
    h:close_stdin()
    h:close_stdin() -- again: nothing to do
    assert.same({ true, "exit", 0 }, { h:wait(30) })
    assert.same({ "one", big, "two" }, lines)
    -- misuse: send after close_stdin, to a process whose stdin was data, a bad pipe spec
    assert.has_error(function() h:send("late\n") end)
    local d <close> = proc.spawn{ "cat", stdin = "x", stdout = "null" }
    assert.has_error(function() d:send("y") end)
    assert.has_error(function() proc.spawn{ "cat", stdin = { pipe = 1 } } end)
  end)

  it("ends a wait for a wake = true process when one of its lines is delivered, and no other wait", function()
    local host = require "migrun.host"
    local lines = {}
    local h <close> = proc.spawn{ "cat", stdin = { pipe = true }, wake = true,
      stdout = function(l) lines[#lines + 1] = l end }
    local other <close> = proc.spawn{ "sleep", "30" }
    local t0 = host.monotonic()
    assert.is_true(h:send("one\n"))
    assert.same({ nil, "woken" }, { proc.wait_any({ h, other }, 20) })
    assert.is_true(host.monotonic() - t0 < 10)
    assert.same({ "one" }, lines)
    assert.same({ nil, "timeout" }, { h:wait(0.1) }) -- nothing new: no wake
    -- a line delivered while something else is waited for: that wait goes
    -- on to its end, and the next wait for h returns at once
    assert.is_true(h:send("two\n"))
    assert.same({ nil, "timeout" }, { other:wait(0.5) })
    assert.same({ "one", "two" }, lines)
    assert.same({ nil, "woken" }, { h:wait(0) })
    -- proc.run waits for the exit whatever its lines
    local n = 0
    assert.is_true(proc.run{ "printf", "a\\nb\\n", wake = true, stdout = function() n = n + 1 end })
    assert.equal(2, n)
    h:close_stdin()
    assert.is_true(h:wait(10))
  end)

  it("sends to a child that stopped reading: an error, not a SIGPIPE", function()
    local h <close> = proc.spawn{ "true", stdin = { pipe = true } }
    assert.is_true(h:wait(10))
    local ok, err = h:send(string.rep("x", 1 << 17))
    assert.is_nil(ok)
    assert.equal("spawn", err.kind)
    assert.truthy(tostring(err):find("stdin is closed", 1, true), tostring(err))
  end)

  it("delivers output line by line to a function", function()
    local lines = {}
    local h = proc.spawn{ "printf", "a\\nb\\n\\nlast", stdout = function(l) lines[#lines + 1] = l end }
    assert.is_true(h:wait())
    assert.same({ "a", "b", "", "last" }, lines)
  end)

  it("propagates an error raised by a line callback", function()
    local h = proc.spawn{ "printf", "x\\n", stdout = function() error("callback failed") end }
    assert.has_error(function() h:wait() end)
  end)

  it("appends to a file and merges stderr into stdout", function()
    local path = os.tmpname()
    assert.is_true(proc.spawn{ "sh", "-c", "echo one; echo two >&2", stdout = { file = path }, stderr = "stdout" }:wait())
    assert.is_true(proc.spawn{ "echo", "three", stdout = { file = path, append = true } }:wait())
    local f = io.open(path)
    local text = f:read("a")
    f:close()
    os.remove(path)
    assert.equal("one\ntwo\nthree\n", text)
  end)

  describe("pipelines", function()
    it("connects stages with pipes", function()
      local p = proc.pipeline{ { "seq", "1", "1000" }, { "grep", "7" }, { "wc", "-l" }, stdout = "capture" }
      assert.same({ true, "exit", 0 }, { p:wait(10) })
      assert.equal("271", p.stdout:match("%d+"))
      assert.equal("seq 1 1000 | grep 7 | wc -l", p:command())
    end)

    it("fails when a middle stage fails, and does not leave the others hanging", function()
      -- the last stage would wait 60 s for input that never ends; the first writes forever
      local p = proc.pipeline{ { "yes" }, { "sh", "-c", "head -c 10 >/dev/null; exit 5" }, { "sleep", "60" } }
      local t0 = os.time()
      assert.same({ nil, "exit", 5 }, { p:wait(20) })
      assert.is_true(os.time() - t0 < 15)
      local st = p:statuses()
      assert.equal(3, #st)
      assert.equal(5, st[2].code)
      assert.is_nil(st[3].ok) -- the sleeper was stopped, not left running
    end)

    it("succeeds only if every stage succeeds (pipefail)", function()
      local p = proc.pipeline{ { "sh", "-c", "echo x; exit 2" }, { "cat" }, stdout = "null" }
      assert.same({ nil, "exit", 2 }, { p:wait(10) })
    end)
  end)

  it("runs many children at once and wait_any returns the first to finish", function()
    local hs = {}
    for i = 1, 40 do
      hs[i] = proc.spawn{ "sh", "-c", "sleep 0.$1; echo $1", "x", tostring(i % 9 + 1), stdout = "capture" }
    end
    local slow = proc.spawn{ "sleep", "30" }
    local fast = proc.spawn{ "true" }
    local h, ok = proc.wait_any({ slow, fast }, 20)
    assert.equal(fast, h)
    assert.is_true(ok)
    slow:close()
    for i = 1, 40 do
      assert.is_true(hs[i]:wait(30))
      assert.equal(tostring(i % 9 + 1) .. "\n", hs[i].stdout)
    end
    assert.same({ nil, "timeout" }, { proc.wait_any({ proc.spawn{ "sleep", "5" } }, 0.05) })
  end)

  it("kills the whole process group", function()
    local h = proc.spawn{ "sh", "-c", "sleep 60 & echo $!; wait", stdout = "capture" }
    local grandchild
    for _ = 1, 100 do
      grandchild = h.stdout:match("%d+")
      if grandchild then break end
      h:wait(0.05)
    end
    assert.truthy(grandchild)
    assert.is_true(alive(grandchild))
    h:kill()
    h:wait(5)
    local gone = false
    for _ = 1, 50 do
      if not alive(grandchild) then gone = true break end
      proc.spawn{ "sleep", "0.05" }:wait()
    end
    assert.is_true(gone)
  end)

  it("leaves no zombies and no children behind when a script errors", function()
    local pidfile = os.tmpname()
    local script = ([[
      local proc = require "migrun.proc"
      local h = proc.spawn{ "sleep", "60" }
      local f = io.open(%q, "w") f:write(h.pid) f:close()
      error("script failed")
    ]]):format(pidfile)
    local ok, how, code, _, err = proc.run{ MIGRUN, "-e", script }
    assert.is_nil(ok)
    assert.equal("exit", how)
    assert.equal(1, code)
    assert.matches("script failed", err)
    local f = io.open(pidfile)
    local pid = f:read("a")
    f:close()
    os.remove(pidfile)
    assert.is_false(alive(pid))
  end)

  it("kills a die_with_parent child when its parent is SIGKILLed, and only that one", function()
    local pidfile = os.tmpname()
    local script = ([[
      local proc = require "migrun.proc"
      local bound = proc.spawn{ "sleep", "60", die_with_parent = true }
      local free = proc.spawn{ "sleep", "60" }
      local f = io.open(%q, "w") f:write(bound.pid, " ", free.pid) f:close()
      proc.run{ "sleep", "60", die_with_parent = true }
    ]]):format(pidfile)
    local parent = assert(proc.spawn{ MIGRUN, "-e", script })
    local text = ""
    for _ = 1, 200 do
      local f = io.open(pidfile)
      text = f and f:read("a") or ""
      if f then f:close() end
      if text ~= "" then break end
      proc.run{ "sleep", "0.05" }
    end
    os.remove(pidfile)
    local bound, free = text:match("(%d+) (%d+)")
    assert.truthy(bound)
    parent:kill("KILL")
    parent:wait()
    for _ = 1, 100 do
      if not alive(bound) then break end
      proc.run{ "sleep", "0.05" }
    end
    assert.is_false(alive(bound))
    assert.is_true(alive(free))
    proc.run{ "kill", "-KILL", free }
  end)

  it("reaps every finished child", function()
    local h = proc.spawn{ "true" }
    local pid = h.pid
    h:wait()
    assert.is_false(alive(pid))
  end)
end)

-- Every descriptor spawn opens (files for stdin/stdout/stderr, /dev/null, dups
-- of io handles, pipes) belongs to the handle from the moment it is opened, so
-- a spec that turns out to be bad after some of them were opened leaks none.
describe("migrun.proc descriptors", function()
  -- counted in this process (a child listing /proc/<pid>/fd would race with
  -- the parent closing its ends of the child's pipes)
  local lfs = require "lfs"
  local function open_fds(no_collect)
    -- handles dropped by earlier tests hold descriptors until they are collected
    if not no_collect then collectgarbage() end
    local n = 0
    for name in lfs.dir("/proc/self/fd") do
      if name ~= "." and name ~= ".." then n = n + 1 end
    end
    return n
  end

  -- processes left running by the tests above finish (and close their pipes
  -- and pidfds) whenever a later wait pumps: close them all before counting
  setup(function()
    for _, h in pairs(debug.getregistry()["migrun.proc.active"] or {}) do h:close() end
  end)

  local tmp = os.tmpname()
  local file = io.open(tmp, "w")
  teardown(function()
    file:close()
    os.remove(tmp)
  end)

  local bad = {
    { "bad env after a stdout file", { "true", stdout = { file = tmp }, env = { [1] = "X=1" } },
      "bad env%[1%]: expected the name of a variable to pass on" },
    { "bad env key after a stdout file", { "true", stdout = { file = tmp }, env = { [true] = "x" } },
      "bad env: keys must be variable names" },
    { "bad env value after a stdin file and /dev/null",
      { "true", stdin = { file = "/dev/null" }, stderr = "null", env = { X = {} } }, "bad env.X" },
    { "bad stderr after a stdout file", { "true", stdout = { file = tmp }, stderr = "bogus" },
      "bad stderr" },
    { "bad stderr after an io file stdout", { "true", stdout = file, stderr = 42 },
      "bad stderr: number not supported" },
    { "unopenable stderr after stdout/stdin files",
      { "true", stdout = { file = tmp }, stdin = false, stderr = { file = "/no/such/dir/x" } },
      "cannot open /no/such/dir/x for stderr" },
    { "bad argv after the stdio files", { "true", {}, stdout = "null", stdin = false },
      "argv%[2%] is a table" },
    { "bad cwd after the stdio files", { "true", stdout = { file = tmp }, cwd = {} }, "string expected" },
    { "bad pipeline stage argv after the stdio files",
      { { "true" }, { "cat", false }, stdout = { file = tmp }, stderr = "null" }, "argv%[2%] is a boolean",
      true },
  }
  for _, case in ipairs(bad) do
    local what, spec, message, pipeline = case[1], case[2], case[3], case[4]
    it("closes them when spawn raises on a " .. what, function()
      local before = open_fds()
      for _ = 1, 20 do
        local ok, err = pcall(pipeline and proc.pipeline or proc.spawn, spec)
        assert.is_false(ok)
        assert.matches(message, tostring(err))
      end
      -- the descriptors were closed before the error was raised, not by a later collection
      assert.equal(before, open_fds(true))
    end)
  end

  it("raises on an argv element that is not a string, in quote too", function()
    assert.has_error(function() proc.quote{ "ls", {} } end, "argv[2] is a table, expected a string")
    assert.equal("echo 1 2.5", proc.quote{ "echo", 1, 2.5 })
  end)

  it("closes them when the program cannot be run", function()
    local before = open_fds()
    for _ = 1, 20 do
      assert.is_nil(proc.spawn{ "/no/such/program", stdout = "capture", stderr = { file = tmp }, stdin = "x" })
      assert.is_nil(proc.pipeline{ { "true" }, { "/no/such/program" }, stdout = "capture", stdin = false })
    end
    assert.equal(before, open_fds(true))
  end)

  it("keeps none after spawns that ran", function()
    local before = open_fds()
    for _ = 1, 20 do
      assert.is_true(proc.spawn{ "true", stdout = { file = tmp }, stderr = "capture", stdin = "data" }:wait())
      assert.is_true(proc.pipeline{ { "echo", "x" }, { "cat" }, stdout = file, stderr = "null" }:wait())
    end
    assert.equal(before, open_fds(true))
  end)
end)

describe("the children's environment", function()
  local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

  -- runs script in a migrun whose environment is exactly env (and PATH); -> its stdout
  local function in_migrun(script, env)
    local spec = { MIGRUN, "-e", "local proc = require 'migrun.proc'\n"
      .. "local function env(spec) spec = spec or {} spec[1] = 'env' spec.stdout = 'capture'\n"
      .. "  local _, _, _, out = proc.run(spec) return out end\n" .. script, env = env }
    -- the child migrun itself gets exactly env: everything else of this process removed
    spec.env.PATH = spec.env.PATH or os.getenv("PATH")
    local ok, _, _, out, err = proc.run(spec)
    assert.is_true(ok, err)
    return out
  end

  local WORLD = { TARGET_PASSWORD = "s3cret-target", MY_API_TOKEN = "t0ken", PGPASSWORD = "pg-pw",
    AWS_SECRET_ACCESS_KEY = "aws-secret", MIGRUN_DMS_EMULATOR_SECRET = "emu-secret",
    HOME = "/home/op", LANG = "C.UTF-8", LC_TIME = "en_GB.UTF-8", TZ = "UTC", TMPDIR = "/tmp",
    MIGRUN_LUA_PATH = os.getenv("MIGRUN_LUA_PATH") or false, MIGRUN_MARK = "m1", PGSSLMODE = "require",
    PGPASSFILE = "/home/op/.pgpass", KUBECONFIG = "/home/op/.kube/config" }

  it("is an allow-list: an unrelated secret never reaches a child, what a program needs does", function()
    local out = in_migrun([[ io.write(env()) ]], WORLD)
    for _, secret in ipairs{ "s3cret-target", "t0ken", "pg-pw", "aws-secret", "emu-secret", "KUBECONFIG",
                             "PGSSLMODE", "PGPASSFILE" } do
      assert.falsy(out:find(secret, 1, true), secret .. " reached the child:\n" .. out)
    end
    for _, kept in ipairs{ "HOME=/home/op", "LANG=C.UTF-8", "LC_TIME=en_GB.UTF-8", "TZ=UTC", "TMPDIR=/tmp",
                           "MIGRUN_MARK=m1", "PATH=" } do
      assert.truthy(out:find("\n" .. kept, 1, true) or out:find("^" .. kept:gsub("%p", "%%%0")), kept .. " missing:\n" .. out)
    end
  end)

  it("passes names on by name, values explicitly, and unsets what a spec says", function()
    local out = in_migrun([[
      local libpq = { table.unpack(proc.LIBPQ_ENV) }
      libpq.PGPASSWORD = "given"
      io.write(env{ env = libpq }, "--\n", env{ env = { "KUBECONFIG", HOME = false, X = 1 } })
    ]], WORLD)
    local a, b = out:match("^(.-)%-%-\n(.*)$")
    -- a child that connects to PostgreSQL: libpq's variables by name, the password only when given
    assert.truthy(a:find("PGSSLMODE=require", 1, true), a)
    assert.truthy(a:find("PGPASSFILE=/home/op/.pgpass", 1, true), a)
    assert.truthy(a:find("PGPASSWORD=given", 1, true), a)
    assert.falsy(a:find("pg-pw", 1, true), a)
    assert.falsy(a:find("s3cret-target", 1, true), a)
    assert.truthy(b:find("KUBECONFIG=/home/op/.kube/config", 1, true), b)
    assert.truthy(b:find("X=1", 1, true), b)
    assert.falsy(b:find("HOME=", 1, true), b)
  end)

  it("inherits everything on request (migrun running itself), never what is withheld", function()
    local out = in_migrun([[
      proc.withhold{ "TARGET_PASSWORD" }
      io.write(env{ inherit_env = true }, "--\n", env{ inherit_env = true, env = { TARGET_PASSWORD = "again" } })
    ]], WORLD)
    local a, b = out:match("^(.-)%-%-\n(.*)$")
    assert.truthy(a:find("MY_API_TOKEN=t0ken", 1, true), a)
    assert.truthy(a:find("KUBECONFIG=", 1, true), a)
    assert.falsy(a:find("s3cret-target", 1, true), a)
    assert.falsy(a:find("emu-secret", 1, true), a) -- withheld from the start
    assert.truthy(b:find("TARGET_PASSWORD=again", 1, true), b)
  end)

  it("builds an environment of thousands of allowed names, each kept alive until the exec", function()
    -- every name found in the allow-list once left a value on the C stack (beyond its room,
    -- and the environment's array unanchored): a crash here, freed memory read by a child
    local env = {}
    for i = 1, 3000 do env["V" .. i] = "x" .. i end
    local out = in_migrun([[
      local names = {}
      for i = 1, 3000 do names[i] = "V" .. i end
      proc.allow(names)
      local n = 0
      for k in pairs(proc.environment()) do if k:match("^V%d+$") then n = n + 1 end end
      local ok, _, _, got = proc.run{ "printenv", "V2999", env = { V1 = "given" } }
      io.write(n, " ", tostring(ok), " ", got, env{ env = { V1 = "given" } }:match("V1=%w+"))
    ]], env)
    assert.equal("3000 true x2999\nV1=given", out)
  end)

  it("takes more names (or prefixes) with proc.allow, and says what a child would get", function()
    local out = in_migrun([[
      proc.allow{ "KUBECONFIG", "MY_API_*" }
      local e = proc.environment()
      print(e.KUBECONFIG, e.MY_API_TOKEN, e.TARGET_PASSWORD, e.PATH ~= nil)
      print(table.concat(proc.allowed(), ","))
      print(pcall(proc.allow, { "A=B" }))
      print(pcall(proc.allow, { "*" }))
      print(proc.environment{ env = { "TARGET_PASSWORD" } }.TARGET_PASSWORD)
      local has_pw = false
      for _, n in ipairs(proc.LIBPQ_ENV) do if n == "PGPASSWORD" then has_pw = true end end
      print(has_pw, #proc.LIBPQ_ENV > 30)
    ]], WORLD)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal("/home/op/.kube/config\tt0ken\tnil\ttrue", lines[1])
    assert.truthy(lines[2]:find("KUBECONFIG,LANG,LANGUAGE,LC_*,", 1, true), lines[2])
    assert.truthy(lines[2]:find("MY_API_*", 1, true), lines[2])
    assert.matches("^false\t.*environment variable names %(or \"PREFIX%*\"%) expected", lines[3])
    assert.matches("^false\t", lines[4])
    assert.equal("s3cret-target", lines[5])
    assert.equal("false\ttrue", lines[6])
  end)
end)

describe("migrun.proc.withhold", function()
  it("keeps withheld variables from every child, unless a spec passes one on purpose", function()
    local script = [[
      local proc = require "migrun.proc"
      local function env(spec) spec = spec or {} spec[1] = "env" spec.stdout = "capture"
        local _, _, _, out = proc.run(spec) return out end
      assert(env{ env = { "HELD_X" } }:find("HELD_X=1", 1, true))
      proc.withhold{ "HELD_X" }
      assert(not env{ env = { "HELD_X" } }:find("HELD_X", 1, true))
      assert(not env{ inherit_env = true }:find("HELD_X", 1, true))
      assert(not env{ env = { OTHER = "y" } }:find("HELD_X", 1, true))
      assert(env{ env = { HELD_X = "2" } }:find("HELD_X=2", 1, true))
      print(table.concat(proc.withheld(), ","))
    ]]
    local ok, _, _, out, err = proc.run{ os.getenv("MIGRUN_BIN") or "build/migrun", "-e", script,
      env = { HELD_X = "1" } }
    assert.is_true(ok, err)
    assert.equal("HELD_X,MIGRUN_DMS_EMULATOR_SECRET\n", out)
  end)
end)
