-- Exercises the C modules under valgrind: every handle opened and closed,
-- errors raised and caught, children spawned and reaped.
local lsn, proc, err = require "migrun.lsn", require "migrun.proc", require "migrun.error"
local x = lsn("16/B374D848")
assert(tostring(x + 8) == "16/B374D850" and (x + 8) - x == 8)
assert(not lsn.parse("nope"))
assert(not pcall(lsn, "1/2/3"))
assert(lsn.names(150000).wal_replay_pause == "pg_wal_replay_pause")
local ok, _, _, out = proc.run{ "echo", "hi", env = { SECRET = "x" } }
assert(ok and out == "hi\n")
local p = proc.pipeline{ { "seq", "1", "1000" }, { "wc", "-l" }, stdout = "capture" }
assert(p:wait() and p.stdout:match("1000"))
local lines = 0
proc.spawn{ "seq", "1", "100", stdout = function() lines = lines + 1 end }:wait()
assert(lines == 100)
do -- a conversation on a kept stdin, a send after the child stopped reading
  local got = {}
  local c <close> = proc.spawn{ "cat", stdin = { pipe = true }, stdout = function(l) got[#got + 1] = l end }
  assert(c:send("one\n") and c:send(string.rep("x", 1 << 17) .. "\n"))
  c:close_stdin()
  assert(c:wait(10) and #got == 2)
  local t <close> = proc.spawn{ "true", stdin = { pipe = true } }
  assert(t:wait(10) and not t:send("late"))
end
local s <close> = proc.spawn{ "sleep", "10" }
assert(select(2, s:wait(0.01)) == "timeout")
assert(not proc.spawn{ "/no/such/program" })
assert(not pcall(proc.spawn, {}))
-- a spec found bad after files were opened: the handle frees and closes what it had
assert(not pcall(proc.spawn, { "true", stdout = { file = "/dev/null" }, stdin = false, env = { [1] = "X=1" } }))
assert(proc.environment{ env = { "HOME", X = "1" } }.X == "1")
assert(not pcall(proc.pipeline, { { "true" }, { "cat", {} }, stdout = "null" }))
assert(not proc.pipeline{ { "true" }, { "/no/such/program" }, stdout = "capture" })
local host = require "migrun.host"
host.sleep(0.01)
assert(#host.read_file("/proc/self/maps") > 0)
assert(select(2, host.read_file("/no/such/file")).errno == 2)
do -- a file written whole, appended to, and an append that cannot be made
  local dir = os.tmpname()
  os.remove(dir)
  assert(host.mkdir(dir))
  assert(host.write_file(dir .. "/f", "one\n") and host.append_file(dir .. "/f", "two\n"))
  assert(host.append_file(dir .. "/g", "new\n") and host.read_file(dir .. "/g") == "new\n")
  assert(host.read_file(dir .. "/f") == "one\ntwo\n")
  assert(select(2, host.append_file(dir .. "/no/f", "x")).errno == 2)
  os.remove(dir .. "/f") os.remove(dir .. "/g") os.remove(dir)
end
assert(host.monotonic() > 0 and require("migrun.aws").sleep == host.sleep)
assert(tostring(err.new{ message = "m", code = "C" }) == "C m")
print("valgrind smoke ok")
