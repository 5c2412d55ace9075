-- Starts tests/helpers/http_stub_server.lua as a child migrun process (through
-- migrun.proc) and reads back what it received.
--   local stub = require "helpers.http_stub"
--   local s = stub.start[[ return function(req, n) return { status = 200, body = "{}" } end ]]
--   s.url           -- "http://127.0.0.1:<port>"
--   s:requests()    -- every request so far: {n, method, path, headers, body}
--   s:close()
local proc = require "migrun.proc"
local socket = require "socket"
local cjson = require "cjson"

local M = {}

local root = os.getenv("MIGRUN_SOURCE_DIR") or "."
local bin = os.getenv("MIGRUN_BIN") or (root .. "/build/migrun")

function M.tmpdir()
  local ok, _, _, out = proc.run{ "mktemp", "-d", "/tmp/migrun-aws-test.XXXXXX" }
  assert(ok, "mktemp failed")
  return (out:gsub("%s+$", ""))
end

local Stub = {}
Stub.__index = Stub

function Stub:requests()
  local list = {}
  local f = io.open(self.log, "r")
  if not f then return list end
  for line in f:lines() do list[#list + 1] = cjson.decode(line) end
  f:close()
  return list
end

function Stub:close()
  if self.h then
    self.h:close()
    self.h = nil
  end
  proc.run{ "rm", "-rf", self.dir }
end

function M.start(handler_code)
  local dir = M.tmpdir()
  local s = setmetatable({ dir = dir, log = dir .. "/requests.log", ready = dir .. "/ready" }, Stub)
  s.h = assert(proc.spawn{ bin, root .. "/tests/helpers/http_stub_server.lua", handler_code, s.ready, s.log,
    stdin = "null", stdout = "null", stderr = { file = dir .. "/stderr" } })
  local deadline = socket.gettime() + 20
  while socket.gettime() < deadline do
    local f = io.open(s.ready, "r")
    if f then
      s.port = tonumber(f:read("l"))
      f:close()
      break
    end
    local ok, how = s.h:wait(0.05)
    if ok or how ~= "timeout" then
      local e = io.open(dir .. "/stderr")
      error("stub server died: " .. (e and e:read("a") or "?"))
    end
  end
  assert(s.port, "stub server did not start")
  s.url = "http://127.0.0.1:" .. s.port
  return s
end

return M
