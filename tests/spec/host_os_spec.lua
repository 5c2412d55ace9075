-- migrun.host: the operating system calls the library needs beyond io/os.
local host = require "migrun.host"
local proc = require "migrun.proc"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function mode_of(path)
  local _, _, _, out = proc.run{ "stat", "-c", "%a", path }
  return out and out:match("%d+")
end

-- Runs a Lua snippet in a child migrun under umask 0; -> ok, stdout, stderr
local function child(code)
  local ok, _, _, out, err = proc.run{ "sh", "-c", 'umask 0 && exec "$0" -e "$1"', MIGRUN, code }
  return ok, out, err
end

describe("migrun.host", function()
  local dir

  setup(function()
    local _, _, _, out = proc.run{ "mktemp", "-d" }
    dir = out:match("%S+")
  end)

  teardown(function()
    if dir then proc.run{ "rm", "-rf", dir } end
  end)

  it("reads a whole file, larger than one buffer, and says why it cannot", function()
    local path = dir .. "/big.bin"
    local data = {}
    for i = 0, 70000 do data[#data + 1] = string.char(i % 256) end
    data = table.concat(data)
    assert(host.write_file(path, data))
    assert.equal(data, host.read_file(path))
    assert(host.write_file(path, ""))
    assert.equal("", host.read_file(path))
    local none, err = host.read_file(dir .. "/none")
    assert.is_nil(none)
    assert.equal(2, err.errno) -- ENOENT
    assert.truthy(tostring(err):find(dir .. "/none", 1, true))
    local _, derr = host.read_file(dir)
    assert.equal(21, derr.errno) -- EISDIR
  end)

  it("writes files atomically, 0600 even under umask 0", function()
    local path = dir .. "/journal.json"
    local ok, out, err = child(("assert(require('migrun.host').write_file(%q, 'one')) print('ok')"):format(path))
    assert(ok, err)
    assert.equal("ok\n", out)
    assert.equal("one", read(path))
    assert.equal("600", mode_of(path))
    assert.is_true(host.write_file(path, "two"))
    assert.equal("two", read(path))
    assert.is_nil(read(path .. ".tmp"))
    assert.is_true(host.write_file(dir .. "/wide", "x", tonumber("644", 8)))
    assert.equal("644", mode_of(dir .. "/wide"))
  end)

  it("leaves the old content intact when a write fails", function()
    local path = dir .. "/keep.json"
    assert.is_true(host.write_file(path, "old"))
    -- the temporary file cannot be created: a directory is in its way
    assert(host.mkdir(path .. ".tmp"))
    local ok, err = host.write_file(path, "new")
    assert.is_nil(ok)
    assert.equal("os", err.kind)
    assert.equal("old", read(path))
    proc.run{ "rmdir", path .. ".tmp" }
    -- a read-only directory: nothing can be written, the old file stays
    if select(4, proc.run{ "id", "-u" }) ~= "0\n" then
      proc.run{ "chmod", "500", dir }
      assert.is_nil(host.write_file(path, "new"))
      proc.run{ "chmod", "700", dir }
      assert.equal("old", read(path))
    end
    -- a missing directory
    local ok2, err2 = host.write_file(dir .. "/missing/x", "data")
    assert.is_nil(ok2)
    assert.matches("No such file or directory", tostring(err2))
  end)

  it("makes private directories, and accepts one that exists", function()
    local ok, out, err = child(("local h = require('migrun.host') assert(h.mkdir(%q)) assert(h.mkdir(%q)) print('ok')")
      :format(dir .. "/state", dir .. "/state"))
    assert(ok, err)
    assert.equal("ok\n", out)
    assert.equal("700", mode_of(dir .. "/state"))
    local bad, berr = host.mkdir(dir .. "/journal.json/sub")
    assert.is_nil(bad)
    assert.equal("os", berr.kind)
    assert.is_true(host.write_file(dir .. "/plain", "x"))
    assert.is_nil((host.mkdir(dir .. "/plain")))
  end)

  it("knows the real current directory", function()
    local _, _, _, out = proc.run{ MIGRUN, "-e", "print(require('migrun.host').cwd())", cwd = dir }
    assert.equal(dir .. "\n", out)
  end)

  it("tells free and total space of a file system", function()
    local st = assert(host.statvfs(dir))
    assert.is_true(math.type(st.free) == "integer" and st.free > 0)
    assert.is_true(st.total >= st.free)
    local _, _, _, out = proc.run{ "df", "-B1", "--output=size", dir }
    local df_total = tonumber(out:match("(%d+)%s*$"))
    assert.equal(df_total, st.total)
    local none, err = host.statvfs(dir .. "/nope")
    assert.is_nil(none)
    assert.matches("No such file or directory", tostring(err))
  end)

  it("says a pipe is not a terminal", function()
    local ok, _, _, out = proc.run{ MIGRUN, "-e",
      "local h = require('migrun.host') print(h.isatty(1), h.isatty(io.stdout), h.isatty(0))",
      stdin = "" }
    assert(ok)
    assert.equal("false\tfalse\tfalse\n", out)
    -- under a pseudo-terminal (script(1)) it is one
    local ok2, _, _, out2 = proc.run{ "script", "-qec", MIGRUN .. " -e 'print(require(\"migrun.host\").isatty(1))'",
      "/dev/null" }
    if ok2 then assert.matches("true", out2) end
  end)

  it("locks a file for one process at a time and names the holder", function()
    local path = dir .. "/lock"
    local h = assert(proc.spawn{ MIGRUN, "-e", ([[
      local l = assert(require('migrun.host').lock(%q))
      io.stdout:write('locked\n') io.stdout:flush()
      require('migrun.aws').sleep(60)
    ]]):format(path), stdout = "capture" })
    for _ = 1, 200 do
      if h.stdout:find("locked") then break end
      h:wait(0.05)
    end
    assert.matches("locked", h.stdout)
    local lock, err = host.lock(path)
    assert.is_nil(lock)
    assert.equal("locked", err.kind)
    assert.equal(h.pid, err.pid)
    assert.matches("locked by another migrun %(pid " .. h.pid .. "%)", tostring(err))
    h:kill("KILL")
    h:wait()
    -- the holder died: the lock is free again
    local mine = assert(host.lock(path))
    assert.equal("migrun.host.Lock (held)", tostring(mine))
    assert.equal(tostring(host.pid) .. "\n", read(path))
    mine:unlock()
    assert.equal("migrun.host.Lock (released)", tostring(mine))
    assert.has_error(function() mine:unlock() end)
    do
      local scoped <close> = assert(host.lock(path)) -- luacheck: ignore 211 (held until the end of the block)
    end
    assert.truthy(host.lock(path))
  end)
end)
