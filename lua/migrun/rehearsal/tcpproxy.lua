--[[
migrun.rehearsal.tcpproxy: the lab's TCP proxy for network faults, the loop
that runs in a child process (migrun.rehearsal.faults starts it and talks to
it; see there). It listens on a loopback port, forwards every connection to
one upstream server, and obeys a control port on which each line is a
command:

  set pass                          forward both ways
  set delay seconds=0.2             forward each chunk that many seconds late
  set blackhole                     forward nothing, read nothing, close nothing:
                                    the peer's kernel still acknowledges (a frozen
                                    server or middlebox; no RST, no FIN)
  set reset                         close every connection with a RST, both sides,
                                    and reset each new one at once
  ... after=seconds | after_bytes=n the change waits for that cue (time from now,
                                    or bytes forwarded from now, both ways)
  ... duration=seconds              then back to pass
  stats                             ok {"mode":...,"accepted":n,"open":n,"up":bytes,"down":bytes}
  quit

Each answers "ok" (with stats: "ok <json>") or "error <why>". Writing
"listening <port> <control port>" on stdout is the last thing it ever
writes there (the parent stops reading); its log goes to stderr.

  tcpproxy.main{ upstream_host = "127.0.0.1", upstream_port = 5432 }
]]
local socket = require "socket"
local cjson = require "cjson"

local tcpproxy = {}

local HOST = "127.0.0.1"
local CHUNK = 65536
-- Read no more from a side while this much waits for the other. Delayed,
-- the queue holds what the delay holds back, as a long link does in flight:
-- the delay slows each byte, not the throughput.
local QUEUE_MAX, DELAY_QUEUE_MAX = 4 * CHUNK, 64 * 1024 * 1024
local RECEIVE_BUFFER = 256 * 1024
local MODES = { pass = true, delay = true, blackhole = true, reset = true }

local function log(fmt, ...)
  io.stderr:write(("[tcpproxy %.3f] "):format(socket.gettime()), fmt:format(...), "\n")
  io.stderr:flush()
end

-- A direction of a pair: bytes read from `from`, waiting to be written to `to`,
-- each chunk with the time it is due.
local function direction(from, to, name)
  return { from = from, to = to, name = name, queue = {}, queued = 0, offset = 1, eof = false, shut = false }
end

local Proxy = {}
Proxy.__index = Proxy

function Proxy:_close_pair(p, rst)
  if p.closed then return end
  p.closed = true
  for _, s in ipairs{ p.client, p.server } do
    if s then
      if rst then pcall(s.setoption, s, "linger", { on = true, timeout = 0 }) end
      s:close()
    end
  end
  self.open = self.open - 1
end

-- Connects a held client to the upstream server; a server that refuses gets
-- the client reset, as a refused connect would be.
function Proxy:_connect(p)
  local server = socket.tcp()
  server:settimeout(2)
  local ok, err = server:connect(self.upstream_host, self.upstream_port)
  if not ok then
    log("upstream %s:%d refused (%s): resetting the client", self.upstream_host, self.upstream_port, tostring(err))
    server:close()
    self:_close_pair(p, true)
    return
  end
  server:settimeout(0)
  server:setoption("tcp-nodelay", true)
  p.server = server
  p.up = direction(p.client, server, "up")
  p.down = direction(server, p.client, "down")
end

function Proxy:_accept()
  local client = self.listener:accept()
  if not client then return end
  client:settimeout(0)
  client:setoption("tcp-nodelay", true)
  self.accepted, self.open = self.accepted + 1, self.open + 1
  local p = { client = client }
  self.pairs[#self.pairs + 1] = p
  if self.mode == "reset" then
    self:_close_pair(p, true)
  elseif self.mode ~= "blackhole" then
    self:_connect(p)
  end -- blackhole: held, connected upstream when the mode lets traffic through again
end

function Proxy:_read(d, now)
  local data, err, partial = d.from:receive(CHUNK)
  data = data or partial
  if data and #data > 0 then
    d.queue[#d.queue + 1] = { data = data, due = now + (self.mode == "delay" and self.delay or 0) }
    d.queued = d.queued + #data
  end
  if err == "closed" then d.eof = true end
end

-- Writes what is due; false when the peer is gone.
function Proxy:_write(d, now)
  while d.queue[1] and d.queue[1].due <= now do
    local item = d.queue[1]
    local last, err, partial_last = d.to:send(item.data, d.offset)
    local sent_to = last or partial_last or (d.offset - 1)
    local n = sent_to - d.offset + 1
    self.bytes[d.name] = self.bytes[d.name] + n
    d.queued = d.queued - n
    if sent_to >= #item.data then
      table.remove(d.queue, 1)
      d.offset = 1
    else
      d.offset = sent_to + 1
    end
    if err == "closed" then return false end
    if err then return true end -- "timeout": the socket is full, try again when writable
  end
  if d.eof and not d.queue[1] and not d.shut then
    d.shut = true
    d.to:shutdown("send")
  end
  return true
end

function Proxy:_apply(mode, delay)
  self.mode, self.delay = mode, delay or 0
  log("mode %s%s", mode, mode == "delay" and (" " .. self.delay .. " s") or "")
  for _, p in ipairs(self.pairs) do
    if not p.closed then
      if mode == "reset" then
        self:_close_pair(p, true)
      elseif mode ~= "blackhole" and not p.server then
        self:_connect(p)
      end
    end
  end
end

-- A change of mode, now or at its cue.
function Proxy:_command_set(args)
  local mode = args[2]
  if not MODES[mode] then return "error unknown mode " .. tostring(mode) end
  local o = {}
  for i = 3, #args do
    local k, v = args[i]:match("^([%w_]+)=([%d%.]+)$")
    if not k or not tonumber(v) then return "error bad argument " .. args[i] end
    o[k] = tonumber(v)
  end
  local cue = { mode = mode, delay = o.seconds, duration = o.duration }
  if o.after then cue.at = socket.gettime() + o.after end
  if o.after_bytes then cue.at_bytes = self.bytes.up + self.bytes.down + o.after_bytes end
  if cue.at or cue.at_bytes then
    self.cue = cue
  else
    self.cue = nil
    self:_start(cue)
  end
  return "ok"
end

function Proxy:_start(cue)
  self:_apply(cue.mode, cue.delay)
  self.revert_at = cue.duration and (socket.gettime() + cue.duration) or nil
end

function Proxy:_command(line)
  local args = {}
  for w in line:gmatch("%S+") do args[#args + 1] = w end
  if args[1] == "set" then return self:_command_set(args) end
  if args[1] == "stats" then
    return "ok " .. cjson.encode{ mode = self.mode, delay = self.delay, accepted = self.accepted, open = self.open,
      up = self.bytes.up, down = self.bytes.down, cue = self.cue and self.cue.mode or nil }
  end
  if args[1] == "quit" then
    self.quit = true
    return "ok"
  end
  return "error unknown command " .. tostring(args[1])
end

function Proxy:_serve_control(c)
  local line, err, partial = c.sock:receive("*l", c.buffer)
  c.buffer = nil
  if line then
    c.sock:settimeout(1)
    c.sock:send(self:_command(line) .. "\n")
    c.sock:settimeout(0)
  elseif err == "closed" then
    c.sock:close()
    c.closed = true
  else
    c.buffer = partial -- what came of the line so far (the prefix included)
  end
end

-- The cue and the end of a timed fault, when their time or bytes have come.
function Proxy:_due(now)
  local cue = self.cue
  if cue and ((cue.at and now >= cue.at) or (cue.at_bytes and self.bytes.up + self.bytes.down >= cue.at_bytes)) then
    self.cue = nil
    self:_start(cue)
  end
  if self.revert_at and now >= self.revert_at then
    self.revert_at = nil
    self:_apply("pass")
  end
end

-- One round: what to watch, a select, then reads, writes and commands.
function Proxy:_round()
  local now = socket.gettime()
  local recvt, sendt = { self.listener, self.control }, {}
  local wake = now + 0.2
  local flowing = self.mode == "pass" or self.mode == "delay"
  for _, c in ipairs(self.controls) do recvt[#recvt + 1] = c.sock end
  for _, p in ipairs(self.pairs) do
    if not p.closed and p.server then
      for _, d in ipairs{ p.up, p.down } do
        local max = self.mode == "delay" and DELAY_QUEUE_MAX or QUEUE_MAX
        if flowing and not d.eof and d.queued < max then recvt[#recvt + 1] = d.from end
        local head = d.queue[1]
        if flowing and head then
          if head.due <= now then sendt[#sendt + 1] = d.to else wake = math.min(wake, head.due) end
        end
      end
    end
  end
  if self.cue and self.cue.at then wake = math.min(wake, self.cue.at) end
  if self.revert_at then wake = math.min(wake, self.revert_at) end
  local readable = socket.select(recvt, sendt, math.max(0, wake - now))
  now = socket.gettime()
  if readable[self.listener] then self:_accept() end
  if readable[self.control] then
    local c = self.control:accept()
    if c then
      c:settimeout(0)
      self.controls[#self.controls + 1] = { sock = c }
    end
  end
  for _, c in ipairs(self.controls) do
    if readable[c.sock] then self:_serve_control(c) end
  end
  for _, p in ipairs(self.pairs) do
    if not p.closed and p.server and (self.mode == "pass" or self.mode == "delay") then
      for _, d in ipairs{ p.up, p.down } do
        if readable[d.from] then self:_read(d, now) end
        if not self:_write(d, now) then self:_close_pair(p, false) break end
      end
      if not p.closed and p.up.shut and p.down.shut then self:_close_pair(p, false) end
    end
  end
  self:_due(now)
  self:_sweep()
end

-- Forgets closed pairs and control connections.
function Proxy:_sweep()
  local keep = {}
  for _, p in ipairs(self.pairs) do if not p.closed then keep[#keep + 1] = p end end
  self.pairs = keep
  keep = {}
  for _, c in ipairs(self.controls) do if not c.closed then keep[#keep + 1] = c end end
  self.controls = keep
end

function tcpproxy.main(opts)
  local self = setmetatable({ upstream_host = opts.upstream_host or HOST, upstream_port = assert(tonumber(opts.upstream_port)),
    mode = "pass", delay = 0, pairs = {}, controls = {}, accepted = 0, open = 0, bytes = { up = 0, down = 0 } }, Proxy)
  self.listener = assert(socket.bind(HOST, 0))
  -- a receive buffer of a fixed size for every connection accepted (the
  -- kernel's would grow to tcp_rmem's maximum, 32 MiB here): in a blackhole
  -- the kernel takes in a few hundred KiB more, not the rest of a COPY,
  -- which the client would then think sent
  assert(self.listener:setoption("recv-buffer-size", RECEIVE_BUFFER))
  self.control = assert(socket.bind(HOST, 0))
  self.listener:settimeout(0)
  self.control:settimeout(0)
  local _, port = self.listener:getsockname()
  local _, control_port = self.control:getsockname()
  io.stdout:write(("listening %s %s\n"):format(port, control_port))
  io.stdout:flush()
  log("forwarding %s:%s to %s:%d", HOST, port, self.upstream_host, self.upstream_port)
  while not self.quit do self:_round() end
  for _, p in ipairs(self.pairs) do self:_close_pair(p, false) end
  log("quit")
end

return tcpproxy
