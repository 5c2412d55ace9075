-- Polls `migrun playbooks/status.lua --json` as a person's script would, every
-- `interval` seconds until `stop_file` exists, and appends each answer (exit
-- status, output, errors) to `out` as one JSON line. Its own process, so that
-- the playbooks it watches run undisturbed (tests/spec/e2e_status_spec.lua).
--   migrun tests/helpers/status_poller.lua <migrun> <status.lua> <config> <out> <stop_file> [interval]
-- The status processes get the AWS variables by name (they ask DMS): the
-- poller's environment holds them, its children get only what they are given.
local proc = require "migrun.proc"
local host = require "migrun.host"
local cjson = require "cjson"

local bin, script, config, out, stop_file, interval = ...
interval = tonumber(interval) or 0.5
local f = assert(io.open(out, "a"))
f:setvbuf("line")
while not io.open(stop_file) do
  local t0 = host.now()
  local ok, how, code, stdout, stderr = proc.run{ bin, script, "--config", config, "--json", stdin = false,
    env = { "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION" }, timeout = 60 }
  f:write(cjson.encode{ t = t0, seconds = host.now() - t0, ok = ok or false, how = how, code = code,
    out = stdout or "", err = stderr or "" }, "\n")
  host.sleep(math.max(0, interval - (host.now() - t0)))
end
f:close()
