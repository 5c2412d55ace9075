-- Ctrl-C raises one error value whoever notices it: the hook that stops Lua
-- code, a C call blocked in poll/waitpid/nanosleep (migrun.proc, the sleeps),
-- a transfer in flight (migrun.aws) or a statement (migrun.pg, in pg_spec):
-- a migrun error of kind "interrupted", message "interrupted!", that prints
-- as "interrupted!" (or "[where] interrupted!") and, uncaught, with a traceback.
local proc = require "migrun.proc"
local stub = require "helpers.http_stub"
local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

-- Runs code (after `ready` is printed, it blocks) in a child migrun, sends
-- one SIGINT (or sig) once it is ready; -> stdout, stderr, exit code
local function interrupt(code, sig)
  local h = assert(proc.spawn{ MIGRUN, "-e", code, stdout = "capture", stderr = "capture" })
  for _ = 1, 400 do
    if h.stdout:find("ready\n", 1, true) then break end
    h:wait(0.05)
  end
  h:wait(0.2) -- blocked by now
  h:kill(sig or "INT")
  local ok, how, status = h:wait(30)
  assert(how ~= "timeout", "the child did not stop: " .. h.stdout .. h.stderr)
  local out, err = h.stdout, h.stderr
  h:close()
  return out, err, status, ok
end

-- what a caught interrupt looks like from Lua
local CAUGHT = [[
  local ok, e = pcall(function() io.stdout:write("ready\n") io.stdout:flush() %s end)
  local errors = require("migrun.error")
  print(ok, type(e), e.kind, e.message, tostring(e), errors.is(e), errors.is_interrupt(e))
]]
local EXPECTED = "ready\nfalse\ttable\tinterrupted\tinterrupted!\tinterrupted!\ttrue\ttrue\n"

describe("Ctrl-C", function()
  local blockers = {
    ["Lua code (the hook)"] = "while true do end",
    ["proc:wait"] = "require('migrun.proc').spawn{ 'sleep', '60' }:wait()",
    ["proc.run"] = "require('migrun.proc').run{ 'sleep', '60' }",
    ["aws.sleep"] = "require('migrun.aws').sleep(60)",
    ["host.sleep"] = "require('migrun.host').sleep(60)",
  }
  for what, code in pairs(blockers) do
    it("raises the interrupted error from " .. what, function()
      local out, err, status = interrupt(CAUGHT:format(code))
      assert.equal(EXPECTED, out, err)
      assert.equal(0, status, err)
    end)
  end

  it("raises the interrupted error from an AWS request in flight", function()
    local s = stub.start[[ return function() return { delay = 30, status = 200, body = "{}" } end ]]
    local out, err = interrupt(CAUGHT:format(
      ("require('migrun.aws').request{ url = %q, timeout = 60 }"):format(s.url)))
    s:close()
    assert.equal(EXPECTED, out, err)
  end)

  it("prints the uncaught error as before, with a traceback, exit status 1", function()
    for _, code in ipairs{ "while true do end", "require('migrun.proc').spawn{ 'sleep', '60' }:wait()" } do
      local out, err, status = interrupt("io.stdout:write('ready\\n') io.stdout:flush() " .. code)
      assert.equal("ready\n", out)
      assert.equal(1, status)
      assert.matches("^[^\n]*migrun: interrupted!\nstack traceback:\n", err)
      assert.matches("(command line):1: in main chunk", err, 1, true)
    end
  end)

  it("is consumed once: code that catches it runs on, and a later C call is not interrupted", function()
    local out, err, status = interrupt([[
      local ok, e = pcall(function() io.stdout:write("ready\n") io.stdout:flush() while true do end end)
      print(e.kind)
      print(require("migrun.proc").run{ "sh", "-c", "sleep 0.3; echo slept" })
    ]])
    assert.equal(0, status, err)
    assert.equal("ready\ninterrupted\ntrue\texit\t0\tslept\n\t\n", out)
  end)

  it("is told from any other error by error.is_interrupt, whatever their kind or text", function()
    local errors = require "migrun.error"
    assert.is_false(errors.is_interrupt(errors.new{ kind = "guard", message = "stopped by migrun's guard" }))
    assert.is_false(errors.is_interrupt(errors.new{ kind = "interrupted", message = "interrupted!" }))
    assert.is_false(errors.is_interrupt({ kind = "interrupted", interrupt = true }))
    assert.is_false(errors.is_interrupt("interrupted!"))
    assert.is_false(errors.is_interrupt(nil))
  end)
end)

-- The guard (a child of a running playbook) asks migrun to stop with SIGUSR1:
-- the same machinery, an error of its own kind, and only while armed.
describe("A stop request (SIGUSR1, host.listen_stop / arm_stop)", function()
  local ARMED = [[
    local host = require "migrun.host"
    host.listen_stop(true)
    local ok, e = pcall(function() host.arm_stop(true) io.stdout:write("ready\n") io.stdout:flush() %s end)
    host.arm_stop(false)
    local errors = require("migrun.error")
    print(ok, e.kind, e.message, tostring(e), errors.is(e), errors.is_interrupt(e))
  ]]
  local STOPPED = "ready\nfalse\tguard\tstopped by migrun's guard\tstopped by migrun's guard\ttrue\ttrue\n"
  for what, code in pairs{ ["Lua code (the hook)"] = "while true do end",
      ["proc:wait"] = "require('migrun.proc').spawn{ 'sleep', '60' }:wait()",
      ["host.sleep"] = "require('migrun.host').sleep(60)" } do
    it("raises an error of kind guard from " .. what, function()
      local out, err, status = interrupt(ARMED:format(code), "USR1")
      assert.equal(STOPPED, out, err)
      assert.equal(0, status, err)
    end)
  end

  it("is only remembered while disarmed, and stops the armed code at once", function()
    local out, err, status = interrupt([[
      local host = require "migrun.host"
      host.listen_stop(true)
      io.stdout:write("ready\n") io.stdout:flush()
      host.sleep(1)
      print("slept")
      local ok, e = pcall(function() host.arm_stop(true) while true do end end)
      print(ok, e.kind, host.arm_stop(false))
      host.listen_stop(false)
      print(host.arm_stop(false))
    ]], "USR1")
    assert.equal(0, status, err)
    assert.equal("ready\nslept\nfalse\tguard\ttrue\nfalse\n", out)
  end)

  it("does not cut a line's callback in half: it stops the wait once the line is handled", function()
    -- the guard writes its reason on a line, then asks for the stop: the line must not be lost
    local out, err, status = interrupt([[
      local host, proc = require "migrun.host", require "migrun.proc"
      host.listen_stop(true)
      local got
      local ok, e = pcall(function()
        host.arm_stop(true)
        local h = proc.spawn{ "sh", "-c", "echo the reason; exec sleep 60", stdout = function(line)
          io.stdout:write("ready\n") io.stdout:flush()
          local t = host.monotonic()
          while host.monotonic() - t < 1.5 do end -- the request comes meanwhile
          got = line
        end }
        h:wait()
      end)
      host.arm_stop(false)
      print(ok, e.kind, got)
    ]], "USR1")
    assert.equal(0, status, err)
    assert.equal("ready\nfalse\tguard\tthe reason\n", out)
  end)

  it("is sent to the parent only", function()
    local host = require "migrun.host"
    local ok, err = host.request_stop(host.pid)
    assert.is_nil(ok)
    assert.matches("not this process's parent", tostring(err))
  end)
end)
