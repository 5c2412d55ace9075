-- A loopback HTTP/1.1 stand-in for tests, run as its own migrun process:
--   migrun http_stub_server.lua <handler code> <ready file> <log file>
-- The handler code is a Lua chunk returning function(req, n) -> response, where
-- req = {method=, path=, headers={lower-name=value}, body=} and n counts requests
-- from 1; response = {status=200, headers={...}, body="", delay=seconds,
-- hangup=true (close without answering)}. Each request is appended to the log
-- file as one JSON line, then answered. The chosen port is written to the ready
-- file once listening. Serves one connection at a time; exits after 300 s.
local socket = require "socket"
local cjson = require "cjson"

local code, ready, logfile = arg[1], arg[2], arg[3]
local handler = assert(load(code, "=handler"))()
local server = assert(socket.bind("127.0.0.1", 0))
local _, port = server:getsockname()
server:settimeout(0.5)
do
  local f = assert(io.open(ready .. ".tmp", "w"))
  f:write(port, "\n")
  f:close()
  assert(os.rename(ready .. ".tmp", ready))
end

local reasons = { [200] = "OK", [400] = "Bad Request", [403] = "Forbidden", [404] = "Not Found",
  [405] = "Method Not Allowed", [500] = "Internal Server Error", [502] = "Bad Gateway",
  [503] = "Service Unavailable", [504] = "Gateway Timeout" }

local function serve(conn, n)
  conn:settimeout(10)
  local line = conn:receive("*l")
  if not line then return end
  local method, path = line:match("^(%S+)%s+(%S+)")
  local headers = {}
  while true do
    local h = conn:receive("*l")
    if not h or h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.-)%s*$")
    if k then
      k = k:lower()
      headers[k] = headers[k] and (headers[k] .. ", " .. v) or v
    end
  end
  local body = ""
  local len = tonumber(headers["content-length"] or 0)
  if len > 0 then body = conn:receive(len) or "" end
  local req = { n = n, method = method, path = path, headers = headers, body = body }
  local log = assert(io.open(logfile, "a"))
  log:write(cjson.encode(req), "\n")
  log:close()
  local ok, res = pcall(handler, req, n)
  if not ok then res = { status = 500, body = tostring(res) } end
  res = res or {}
  if res.delay then socket.sleep(res.delay) end
  if res.hangup then return end
  local status = res.status or 200
  local rbody = res.body or ""
  local out = { ("HTTP/1.1 %d %s\r\n"):format(status, reasons[status] or "Status") }
  local rh = res.headers or {}
  for k, v in pairs(rh) do out[#out + 1] = k .. ": " .. v .. "\r\n" end
  out[#out + 1] = "Content-Length: " .. #rbody .. "\r\nConnection: close\r\n\r\n" .. rbody
  conn:send(table.concat(out))
end

local started, n = socket.gettime(), 0
while socket.gettime() - started < 300 do
  local conn = server:accept()
  if conn then
    n = n + 1
    serve(conn, n)
    conn:close()
  end
end
