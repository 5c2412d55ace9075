-- The DMS emulator as a command (docs/dms-emulator.md):
--   migrun tools/dms-emulator.lua --port 4566 --access-key AKIDEXAMPLE [options]
-- The secret key is read from the environment variable named by --secret-env
-- (default MIGRUN_DMS_EMULATOR_SECRET), never from the command line. Prints
-- the endpoint URL on stdout once listening, then serves until killed.
local emulator = require "migrun.rehearsal.emulator"
local json = require "migrun.json"
local cli = require "migrun.playbook.cli"

local spec = { usage = "migrun tools/dms-emulator.lua", about = "The DMS emulator on loopback (docs/dms-emulator.md)",
  options = {
    { "--port", "N", "port on 127.0.0.1 (0 = any free port; the URL printed tells which)", default = 0, number = true },
    { "--access-key", "KEY", "access key id the clients must sign with (required)" },
    { "--secret-env", "NAME", "environment variable holding the secret key", default = "MIGRUN_DMS_EMULATOR_SECRET" },
    { "--region", "NAME", "signing region", default = "us-east-1" },
    { "--faults", "JSON", 'faults at start, e.g. {"seed":1,"throttle":0.2,"fail_tasks":{"t1":"boom"}}' },
    { "--delays", "JSON", 'transition times in seconds, e.g. {"task_start":0.2}' },
    { "--no-cdc", nil, "lifecycle only: running CDC tasks read no slot and apply nothing" },
    { "--verbose", nil, "log each request and task log line to stderr" },
  } }
local opts = cli.run(spec, arg)

local function usage(msg)
  io.stderr:write("dms-emulator: ", msg, " (see --help)\n")
  os.exit(2)
end

if not opts.access_key then usage("--access-key is required") end
local secret = os.getenv(opts.secret_env)
if not secret or secret == "" then usage("the secret key must be in $" .. opts.secret_env) end
local port = math.tointeger(tonumber(opts.port))
if not port or port < 0 or port > 65535 then usage("--port takes a number from 0 to 65535") end

local function doc(name)
  local value = opts[name:sub(3)]
  if not value then return nil end
  local d = json.decode(value)
  if type(d) ~= "table" then usage(name .. " takes a JSON object") end
  return d
end

local cdc -- nil: the default engine (migrun.rehearsal.emulator_cdc)
if opts.no_cdc then cdc = false end
local emu, err = emulator.start{ port = port, access_key = opts.access_key, secret_key = secret,
  region = opts.region, cdc = cdc, faults = doc("--faults"), delays = doc("--delays"),
  log = opts.verbose and function(line) io.stderr:write("dms-emulator: ", line, "\n") end or nil }
if not emu then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
io.stdout:write(emu.url, "\n")
io.stdout:flush()
emu:serve()
