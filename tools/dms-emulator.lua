-- The DMS emulator as a command (docs/dms-emulator.md):
--   migrun tools/dms-emulator.lua --port 4566 --access-key AKIDEXAMPLE [options]
-- The secret key is read from the environment variable named by --secret-env
-- (default MIGRUN_DMS_EMULATOR_SECRET), never from the command line. Prints
-- the endpoint URL on stdout once listening, then serves until killed.
local emulator = require "migrun.rehearsal.emulator"
local json = require "migrun.json"

local options = {
  { "--port", "N", "port on 127.0.0.1 (0 = any free port; the URL printed tells which)", "0" },
  { "--access-key", "KEY", "access key id the clients must sign with (required)" },
  { "--secret-env", "NAME", "environment variable holding the secret key", "MIGRUN_DMS_EMULATOR_SECRET" },
  { "--region", "NAME", "signing region", "us-east-1" },
  { "--faults", "JSON", 'faults at start, e.g. {"seed":1,"throttle":0.2,"fail_tasks":{"t1":"boom"}}' },
  { "--delays", "JSON", 'transition times in seconds, e.g. {"task_start":0.2}' },
  { "--no-cdc", nil, "lifecycle only: running CDC tasks read no slot and apply nothing" },
  { "--verbose", nil, "log each request and task log line to stderr" },
}

local function usage(msg)
  local out = { msg and ("dms-emulator: " .. msg .. "\n") or "",
    "usage: migrun tools/dms-emulator.lua --access-key KEY [options]\n" }
  for _, o in ipairs(options) do
    out[#out + 1] = ("  %-22s %s%s\n"):format(o[1] .. (o[2] and (" " .. o[2]) or ""), o[3],
      o[4] and (" (default " .. o[4] .. ")") or "")
  end
  io.stderr:write(table.concat(out))
  os.exit(msg and 2 or 0)
end

local args = {}
for _, o in ipairs(options) do args[o[1]] = o[4] end
local i = 1
while i <= #arg do
  local a = arg[i]
  if a == "--help" or a == "-h" then usage() end
  local known
  for _, o in ipairs(options) do
    if o[1] == a then known = o end
  end
  if not known then usage("unknown option " .. a) end
  if known[2] then
    if arg[i + 1] == nil then usage(a .. " needs a value") end
    args[a] = arg[i + 1]
    i = i + 2
  else
    args[a] = true
    i = i + 1
  end
end

if not args["--access-key"] then usage("--access-key is required") end
local secret = os.getenv(args["--secret-env"])
if not secret or secret == "" then usage("the secret key must be in $" .. args["--secret-env"]) end
local port = math.tointeger(tonumber(args["--port"]))
if not port or port < 0 or port > 65535 then usage("--port takes a number from 0 to 65535") end

local function doc(name)
  if not args[name] then return nil end
  local d = json.decode(args[name])
  if type(d) ~= "table" then usage(name .. " takes a JSON object") end
  return d
end

local cdc -- nil: the default engine (migrun.rehearsal.emulator_cdc)
if args["--no-cdc"] then cdc = false end
local emu, err = emulator.start{ port = port, access_key = args["--access-key"], secret_key = secret,
  region = args["--region"], cdc = cdc, faults = doc("--faults"), delays = doc("--delays"),
  log = args["--verbose"] and function(line) io.stderr:write("dms-emulator: ", line, "\n") end or nil }
if not emu then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
io.stdout:write(emu.url, "\n")
io.stdout:flush()
emu:serve()
