-- `make demo`: the whole two-phase migration on the local lab.
--
--   migrun tools/demo.lua [--scale N] [--dir DIR] [--rate TPS]   (--help)
--
-- Starts three real PostgreSQL clusters (a primary with pglogical, its
-- streaming maintenance replica, a target) and the DMS emulator on loopback,
-- loads a sample database shaped like the runbook's, keeps a write workload
-- running on the primary, runs playbooks/full.lua to "ready for cutover" and
-- prints its report. Everything stops when the demo ends; the state directory
-- (journal, report, log, the generated migration.lua) is kept in DIR.
local demo = require "migrun.rehearsal.demo"
local proc = require "migrun.proc"
local host = require "migrun.host"
local cli = require "migrun.playbook.cli"

local opts = cli.run({ usage = "migrun tools/demo.lua",
  about = "The whole two-phase migration on the local lab (make demo)",
  options = {
    { "--scale", "N", "size of the sample database (1 = about 1 GB)", default = 1, number = true },
    { "--rate", "TPS", "transactions per second of the write workload", default = 20, number = true },
    { "--dir", "DIR", "where the lab and the state directory live (default ./migrun-demo-<time>)" },
  } }, arg)
opts.dir = opts.dir or ("migrun-demo-" .. os.date("%Y%m%d-%H%M%S"))
if opts.dir:sub(1, 1) ~= "/" then opts.dir = os.getenv("PWD") .. "/" .. opts.dir end

local function say(fmt, ...) io.stdout:write("demo: ", fmt:format(...), "\n") io.stdout:flush() end

say("starting the lab (primary + maintenance replica + target) and the DMS emulator in %s", opts.dir)
local R <close> = assert(demo.rehearsal{ dir = opts.dir, scale = opts.scale })
say("sample database loaded on the primary:")
for _, t in ipairs(demo.sample_tables()) do
  if not t[1]:match("ref_%d%d$") or t[1]:match("ref_01$") then say("  %-20s %s", t[1], t[2]) end
end
say("  (and ref_02 .. ref_%02d)", demo.SMALL_TABLES)
say("write workload on the primary: ~%d transactions/s of inserts, updates and deletes", opts.rate)
R:start_workload{ rate = opts.rate }

-- The playbook is run exactly as a team would run it, by a separate migrun.
local script = host.exe and arg[0]:gsub("tools/demo%.lua$", "playbooks/full.lua")
local argv = { host.exe, script, "--config", R.config_path, "--yes", env = R.env, stdin = false }
say("running: %s", proc.quote(argv))
local ok, how, code = proc.spawn(argv):wait()
say("workload: %s", (R:stop_workload()))

local report = io.open(R.config.state_dir .. "/report.md")
if report then
  io.stdout:write("\n", report:read("a"), "\n")
  report:close()
end
if not ok then
  say("the playbook stopped (%s %s); the journal and log are in %s", how, tostring(code), R.config.state_dir)
  os.exit(1)
end
say("done: the target is ready for cutover. State kept in %s", R.config.state_dir)
