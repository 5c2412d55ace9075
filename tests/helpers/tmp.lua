-- What several specs need from the machine: a fresh directory, a free port.
local proc = require "migrun.proc"
local socket = require "socket"

local tmp = {}

-- A new directory, /tmp/migrun-<name>.XXXXXX (mktemp -d) -> path
function tmp.dir(name)
  local ok, _, _, out = proc.run{ "mktemp", "-d", ("/tmp/migrun-%s.XXXXXX"):format(name or "spec") }
  assert(ok, "mktemp -d failed")
  return (out:gsub("%s+$", ""))
end

-- A loopback port nothing listens on (bound, then released) -> number
function tmp.free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

return tmp
