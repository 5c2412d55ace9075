--[[
migrun.rehearsal.faults: faults of the world for the lab (issue 24): a TCP
proxy between migrun and a server that can pass, delay, blackhole or reset
its connections; cues, things that happen later while the caller is blocked
in a query or a COPY (a server restarted in the middle of it); a small file
system that fills. migrun.rehearsal.lab puts them in front of, under and
around its clusters (lab.start{ proxy =, small_disk = }, Cluster:restart,
Cluster:start_proxy; docs/lab.md); they work alone too. docs/faults.md says
what migrun does about each fault.

Proxies (a child process running migrun.rehearsal.tcpproxy, killed with this one)
  faults.proxy{ upstream_port =, upstream_host = "127.0.0.1", name =, logfile = }
      -> Proxy | nil, err
  p.port (clients connect here), p.upstream_port, p.name
  p:set(mode [, { seconds =, after =, after_bytes =, duration = }]) -> true | nil, err
      mode "pass", "delay" (seconds late), "blackhole" (nothing forwarded,
      nothing closed: the proxy's kernel still acknowledges, as a frozen server
      or middlebox would) or "reset" (every connection, and each new one, closed
      with a RST on both sides). after = seconds or after_bytes = bytes forwarded
      from now: the change waits for that cue; duration: then back to pass.
  p:pass(), p:delay(seconds [, o]), p:blackhole([o]), p:reset([o])
  p:stats() -> { mode =, delay =, accepted =, open =, up =, down = } | nil, err
  p:close()

Cues (a child migrun: the caller may be blocked meanwhile)
  faults.cue(steps [, { logfile = }]) -> Cue | nil, err
      steps run in order: { sleep = seconds } or a proc.run job (argv...,
      cwd =, env =, timeout =) with retries = n, retry_delay = s.
  cue:wait([timeout]) -> true | nil, err (err.detail: the cue's log); cue:close()

Packet loss (root, and only in a network namespace of the caller's own: the
proxy's blackhole cannot stop its kernel from acknowledging; this does)
  faults.isolated(argv) -> argv   the command run in a new network namespace
      (unshare -n), where a lab of its own runs on a loopback of its own
  faults.private_network() -> true | nil, err   inside it: the loopback brought up;
      refused in the host's namespace (PID 1's), whose loopback others share
  faults.drop_steps(port) -> cue steps that make the loopback drop every packet
      from port, the server's (tc: htb, a class whose queue holds nothing, a u32
      filter) | nil, err (in the host's namespace). The client's own packets
      still leave: a packet its own host drops counts for TCP as local
      congestion, retried forever, where a partition loses them further on.
  faults.drop(port) -> true | nil, err   the same, now

Small disks (root only: a tmpfs mounted for the test)
  faults.small_disk{ path =, size = bytes | "64M", owner = user } -> Disk | nil, err
  disk.path, disk.size; disk:usage() -> { free =, total = } | nil, err
  disk:fill{ leave = bytes } -> true | nil, err   a ballast file leaving that much free
  disk:unfill(); disk:unmount() (idempotent)
  faults.size(v) -> bytes ("64M", "1G", 4096)
]]
local proc = require "migrun.proc"
local host = require "migrun.host"
local errors = require "migrun.error"
local cjson = require "cjson"

local faults = {}

local HOST = "127.0.0.1"
local MODES = { pass = true, delay = true, blackhole = true, reset = true }

local function fault_error(where, message, detail)
  return errors.new{ kind = "lab", where = where, message = message, detail = detail }
end

local function last_lines(text, n)
  local lines = {}
  for line in (text or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  return table.concat(lines, "\n", math.max(1, #lines - (n or 20) + 1))
end

-- A child migrun running lua_code, its stdout's first line handed to on_line;
-- its stderr in logfile. Dies with this process.
local function child(lua_code, env, logfile, on_line)
  local spec, err = host.worker_spec{ "-e", lua_code, env = env, stdin = false, die_with_parent = true,
    stdout = on_line or "null", stderr = logfile and { file = logfile } or "null" }
  if not spec then return nil, err end
  return proc.spawn(spec)
end

---------------------------------------------------------------------------
-- Proxy
---------------------------------------------------------------------------

local Proxy = {}
Proxy.__index = Proxy
Proxy.__name = "migrun.rehearsal.faults.Proxy"

function Proxy.__tostring(p)
  return ("migrun.rehearsal.faults proxy %s %s:%d -> %s:%d"):format(p.name or "", HOST, p.port or 0,
    p.upstream_host, p.upstream_port)
end

function faults.proxy(opts)
  assert(type(opts) == "table" and tonumber(opts.upstream_port), "faults.proxy: upstream_port expected")
  local p = setmetatable({ upstream_host = opts.upstream_host or HOST, upstream_port = tonumber(opts.upstream_port),
    name = opts.name, logfile = opts.logfile }, Proxy)
  local line
  local h, err = child("require('migrun.rehearsal.tcpproxy').main{ upstream_host = os.getenv('MIGRUN_PROXY_HOST'), "
    .. "upstream_port = os.getenv('MIGRUN_PROXY_PORT') }",
    { MIGRUN_PROXY_HOST = p.upstream_host, MIGRUN_PROXY_PORT = tostring(p.upstream_port) }, opts.logfile,
    function(l) line = line or l end)
  if not h then return nil, fault_error(p.name or "proxy", "cannot start the TCP proxy: " .. tostring(err)) end
  p.process = h
  local deadline = host.monotonic() + 15
  while not line and h.running and host.monotonic() < deadline do h:wait(0.02) end
  local port, control = (line or ""):match("^listening (%d+) (%d+)")
  if not port then
    h:close()
    return nil, fault_error(p.name or "proxy", "the TCP proxy did not start",
      opts.logfile and last_lines(host.read_file(opts.logfile), 10))
  end
  p.port, p.control_port = tonumber(port), tonumber(control)
  return p
end

-- One command on the control port -> its answer after "ok" | nil, err.
function Proxy:_command(line)
  if not self.process then return nil, fault_error(self.name or "proxy", "the proxy is closed") end
  local c = require("socket").tcp()
  c:settimeout(5)
  local ok, err = c:connect(HOST, self.control_port)
  if ok then ok, err = c:send(line .. "\n") end
  local answer
  if ok then answer, err = c:receive("*l") end
  c:close()
  if not answer then
    return nil, fault_error(self.name or "proxy", ("the proxy did not answer %q: %s"):format(line, tostring(err)))
  end
  local rest = answer:match("^ok ?(.*)$")
  if not rest then return nil, fault_error(self.name or "proxy", "the proxy refused " .. line .. ": " .. answer) end
  return rest
end

function Proxy:set(mode, o)
  assert(MODES[mode], "proxy:set: mode pass, delay, blackhole or reset expected")
  o = o or {}
  local line = { "set", mode }
  for _, k in ipairs{ "seconds", "after", "after_bytes", "duration" } do
    if o[k] ~= nil then
      assert(type(o[k]) == "number" and o[k] >= 0, "proxy:set: " .. k .. " must be a number >= 0")
      line[#line + 1] = ("%s=%s"):format(k, k == "after_bytes" and ("%d"):format(o[k]) or ("%.3f"):format(o[k]))
    end
  end
  assert(mode ~= "delay" or o.seconds, "proxy:set('delay'): seconds expected")
  local ok, err = self:_command(table.concat(line, " "))
  if not ok then return nil, err end
  return true
end

function Proxy:pass() return self:set("pass") end
function Proxy:delay(seconds, o)
  o = o or {}
  o.seconds = seconds
  return self:set("delay", o)
end
function Proxy:blackhole(o) return self:set("blackhole", o) end
function Proxy:reset(o) return self:set("reset", o) end

function Proxy:stats()
  local json, err = self:_command("stats")
  if not json then return nil, err end
  return cjson.decode(json)
end

function Proxy:close()
  if not self.process then return end
  pcall(self._command, self, "quit")
  self.process:wait(2)
  self.process:close()
  self.process = nil
end
Proxy.__close = Proxy.close
Proxy.__gc = Proxy.close

---------------------------------------------------------------------------
-- Cues
---------------------------------------------------------------------------

local Cue = {}
Cue.__index = Cue
Cue.__name = "migrun.rehearsal.faults.Cue"

-- A job as JSON takes: the argv apart from its options.
local function encode_step(step)
  if step.sleep then return { sleep = step.sleep } end
  return { argv = table.move(step, 1, #step, 1, {}), cwd = step.cwd, env = step.env, timeout = step.timeout,
    retries = step.retries, retry_delay = step.retry_delay }
end

function faults.cue(steps, opts)
  opts = opts or {}
  local encoded = {}
  for i, step in ipairs(steps) do encoded[i] = encode_step(step) end
  local h, err = child("require('migrun.rehearsal.faults').cue_main()",
    { MIGRUN_FAULT_CUE = cjson.encode{ steps = encoded } }, opts.logfile)
  if not h then return nil, fault_error("cue", "cannot start the cue: " .. tostring(err)) end
  return setmetatable({ process = h, logfile = opts.logfile }, Cue)
end

function Cue:wait(timeout)
  if not self.process then return self.result, self.err end
  local ok, how, code = self.process:wait(timeout)
  if not ok and how == "timeout" then
    return nil, fault_error("cue", ("the cue has not ended within %g s"):format(timeout))
  end
  self.process:close()
  self.process = nil
  if ok then
    self.result = true
  else
    self.err = fault_error("cue", ("the cue failed (%s %s)"):format(tostring(how), tostring(code)),
      self.logfile and last_lines(host.read_file(self.logfile), 15))
  end
  return self.result, self.err
end

function Cue:close()
  if self.process then self.process:close() self.process = nil end
end
Cue.__close = Cue.close
Cue.__gc = Cue.close

-- The child's side: each step in turn; a failed one ends the cue with exit 1.
function faults.cue_main()
  local cue = cjson.decode((assert(os.getenv("MIGRUN_FAULT_CUE"), "MIGRUN_FAULT_CUE expected")))
  for i, step in ipairs(cue.steps) do
    if step.sleep then
      host.sleep(step.sleep)
    else
      local job = table.move(step.argv, 1, #step.argv, 1, {})
      job.cwd, job.timeout = step.cwd, step.timeout
      if type(step.env) == "table" then job.env = step.env end
      local ok, how, code, out, err
      for _ = 0, step.retries or 0 do
        ok, how, code, out, err = proc.run(job)
        if ok then break end
        host.sleep(step.retry_delay or 0.2)
      end
      io.stderr:write(("[cue %.3f] step %d: %s -> %s %s %s\n%s%s"):format(host.monotonic(), i,
        table.concat(job, " "), tostring(ok), tostring(how), tostring(code), out or "", err or ""))
      if not ok then os.exit(1) end
    end
  end
  os.exit(0)
end

---------------------------------------------------------------------------
-- Packet loss in a private network namespace
---------------------------------------------------------------------------

local NETNS_VAR = "MIGRUN_FAULT_OUTER_NETNS"

-- This process's network namespace ("net:[4026531833]").
local function netns()
  local ok, _, _, out = proc.run{ "readlink", "/proc/self/ns/net" }
  return ok and out and out:match("%S+") or nil
end

-- The command run in a new network namespace, told which one it left (the
-- check of private_ns: PID 1's is not always readable).
function faults.isolated(argv)
  local wrapped = { "unshare", "-n", "--" }
  table.move(argv, 1, #argv, 4, wrapped)
  for k, v in pairs(argv) do
    if type(k) ~= "number" then wrapped[k] = v end
  end
  wrapped.env = wrapped.env or {}
  wrapped.env[NETNS_VAR] = netns() or "unknown"
  return wrapped
end

-- Whether this process runs in a namespace faults.isolated made: not the one
-- it was started from, and holding no interface but its loopback.
local function private_ns()
  local mine, outer = netns(), os.getenv(NETNS_VAR)
  if not mine or not outer or mine == outer then return false end
  local ok, _, _, out = proc.run{ "ip", "-o", "link", "show" }
  if not ok then return false end
  for name in (out or ""):gmatch("^%d+: ([^:@]+)") do
    if name ~= "lo" then return false end
  end
  for name in (out or ""):gmatch("\n%d+: ([^:@]+)") do
    if name ~= "lo" then return false end
  end
  return true
end

function faults.private_network()
  if not private_ns() then
    return nil, fault_error("network", "not in a network namespace of its own: packet loss is only made in one "
      .. "(run the command through faults.isolated)")
  end
  local ok, how, code, out, err = proc.run{ "ip", "link", "set", "lo", "up" }
  if not ok then
    return nil, fault_error("network", ("ip link set lo up: %s %s"):format(tostring(how), tostring(code)),
      (out or "") .. (err or ""))
  end
  return true
end

function faults.drop_steps(port)
  port = assert(math.tointeger(tonumber(port)), "faults.drop_steps: a port expected")
  if not private_ns() then
    return nil, fault_error("network", "refusing to drop packets in the host's network namespace")
  end
  local function step(...) return { "tc", ... } end
  return {
    step("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"),
    step("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit"),
    step("class", "add", "dev", "lo", "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit"),
    step("qdisc", "add", "dev", "lo", "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"),
    step("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "sport",
      tostring(port), "0xffff", "flowid", "1:2"),
  }
end

function faults.drop(port)
  local steps, err = faults.drop_steps(port)
  if not steps then return nil, err end
  for _, argv in ipairs(steps) do
    local ok, how, code, out, err = proc.run(argv)
    if not ok then
      return nil, fault_error("network", ("%s: %s %s"):format(table.concat(argv, " "), tostring(how), tostring(code)),
        (out or "") .. (err or ""))
    end
  end
  return true
end

---------------------------------------------------------------------------
-- Small disks
---------------------------------------------------------------------------

local Disk = {}
Disk.__index = Disk
Disk.__name = "migrun.rehearsal.faults.Disk"

local UNITS = { K = 1024, M = 1024 ^ 2, G = 1024 ^ 3 }

function faults.size(v)
  if type(v) == "number" then return math.floor(v) end
  local n, unit = tostring(v):upper():match("^%s*(%d+)%s*([KMG]?)B?%s*$")
  assert(n, "a size in bytes or like \"64M\" expected, got " .. tostring(v))
  return math.floor(tonumber(n) * (UNITS[unit] or 1))
end

-- Runs argv: its output (a string, maybe empty) | nil, what went wrong.
local function run(argv)
  local ok, how, code, out, err = proc.run(argv)
  if ok then return out or "" end
  return nil, ("%s: %s %s %s"):format(table.concat(argv, " "), tostring(how), tostring(code),
    last_lines((out or "") .. (err or ""), 5))
end

function faults.small_disk(opts)
  assert(type(opts) == "table" and opts.path, "faults.small_disk: path expected")
  local size = faults.size(opts.size or "64M")
  local uid = run{ "id", "-u" }
  if not uid or uid:match("%d+") ~= "0" then
    return nil, fault_error("disk", "a small disk needs root (it mounts a tmpfs)")
  end
  local options = ("size=%d,mode=0700"):format(size)
  if opts.owner then
    local u, err = run{ "id", "-u", opts.owner }
    if not u then return nil, fault_error("disk", "no user " .. opts.owner, err) end
    local g = run{ "id", "-g", opts.owner }
    options = options .. (",uid=%s,gid=%s"):format(u:match("%d+"), (g or u):match("%d+"))
  end
  local ok, err = run{ "mkdir", "-p", "--", opts.path }
  if ok then ok, err = run{ "mount", "-t", "tmpfs", "-o", options, "migrun-small-disk", opts.path } end
  if not ok then return nil, fault_error("disk", "could not mount a tmpfs of " .. size .. " bytes at " .. opts.path, err) end
  return setmetatable({ path = opts.path, size = size, mounted = true }, Disk)
end

function Disk:usage()
  return host.statvfs(self.path)
end

-- A ballast file (written as root, who may fill a tmpfs to the last byte)
-- leaving opts.leave bytes free.
function Disk:fill(opts)
  local leave = faults.size((opts or {}).leave or 0)
  local u, err = self:usage()
  if not u then return nil, err end
  local want = u.free - leave
  if want <= 0 then return true end
  local path = self.path .. "/migrun-ballast." .. tostring(#(self.ballast or {}) + 1)
  local f
  f, err = io.open(path, "wb")
  if not f then return nil, fault_error("disk", "cannot write the ballast: " .. tostring(err)) end
  self.ballast = self.ballast or {}
  self.ballast[#self.ballast + 1] = path
  local block = string.rep("\0", 1024 * 1024)
  while want > 0 do
    local n = math.min(want, #block)
    local ok = f:write(n == #block and block or block:sub(1, n))
    if not ok then break end
    want = want - n
  end
  f:close()
  return true
end

function Disk:unfill()
  for _, path in ipairs(self.ballast or {}) do os.remove(path) end
  self.ballast = nil
end

function Disk:unmount()
  if not self.mounted then return true end
  local ok, err = run{ "umount", "--", self.path }
  if not ok then ok, err = run{ "umount", "-l", "--", self.path } end
  if not ok then return nil, fault_error("disk", "could not unmount " .. self.path, err) end
  self.mounted = false
  return true
end

return faults
