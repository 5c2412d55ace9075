-- host.sleep and host.monotonic: the one sleep (Ctrl-C interrupts it) and the
-- one clock of migrun; aws.sleep and aws.monotonic are the same functions.
local host = require "migrun.host"
local aws = require "migrun.aws"
local proc = require "migrun.proc"
local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

describe("host.sleep", function()
  it("sleeps about as long as asked, on the monotonic clock", function()
    local t0 = host.monotonic()
    assert.is_nil(host.sleep(0.2))
    local slept = host.monotonic() - t0
    assert.is_true(slept >= 0.2, tostring(slept))
    assert.is_true(slept < 2, tostring(slept))
    t0 = host.monotonic()
    host.sleep(0)
    assert.is_true(host.monotonic() - t0 < 0.5)
  end)

  it("raises on misuse", function()
    assert.has_error(function() host.sleep() end)
    assert.has_error(function() host.sleep("soon") end)
    assert.has_error(function() host.sleep(-1) end, "bad argument #1 to 'sleep' (seconds out of range)")
    assert.has_error(function() host.sleep(0 / 0) end, "bad argument #1 to 'sleep' (seconds out of range)")
    assert.has_error(function() host.sleep(math.huge) end)
  end)

  it("is interrupted by Ctrl-C with the interrupted error", function()
    local h = assert(proc.spawn{ MIGRUN, "-e", [[
      local host = require "migrun.host"
      io.stdout:write("ready\n") io.stdout:flush()
      local t0 = host.monotonic()
      local ok, e = pcall(host.sleep, 60)
      print(ok, e.kind, tostring(e), host.monotonic() - t0 < 30)
    ]], stdout = "capture", stderr = "capture" })
    for _ = 1, 400 do
      if h.stdout:find("ready\n", 1, true) then break end
      h:wait(0.05)
    end
    host.sleep(0.2)
    h:kill("INT")
    assert.same({ true, "exit", 0 }, { h:wait(30) })
    assert.equal("ready\nfalse\tinterrupted\tinterrupted!\ttrue\n", h.stdout)
  end)
end)

describe("host.monotonic", function()
  it("never goes back", function()
    local last = host.monotonic()
    for _ = 1, 1000 do
      local t = host.monotonic()
      assert.is_true(t >= last)
      last = t
    end
  end)
end)

describe("aws.sleep and aws.monotonic", function()
  it("are host.sleep and host.monotonic under their old names", function()
    assert.equal(host.sleep, aws.sleep)
    assert.equal(host.monotonic, aws.monotonic)
  end)
end)
