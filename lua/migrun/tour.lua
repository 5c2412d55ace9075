-- A short scripted tour of migrun's modules, run by `make demo` until the
-- end-to-end migration demo exists. Each stop prints what it does, then does it.
local lsn = require "migrun.lsn"
local proc = require "migrun.proc"

local tour = {}

local function stop(title)
  io.write("\n== ", title, "\n")
end

local function show(label, ...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  io.write(("  %-44s %s\n"):format(label, table.concat(parts, "  ")))
end

function tour.run(opts)
  opts = opts or {}
  io.write("migrun tour\n")

  stop("migrun.lsn: log sequence numbers as values")
  local paused_at = lsn("35FE3/B63D4718")
  local primary_now = lsn("35FE4/1A2B0000")
  show('lsn("35FE3/B63D4718")', paused_at)
  show("primary_now - paused_at (bytes)", primary_now - paused_at)
  show("lsn.format_bytes(primary_now - paused_at)", lsn.format_bytes(primary_now - paused_at))
  show("paused_at < primary_now", paused_at < primary_now)
  show('lsn.parse("35FE3/ B63D4718")', lsn.parse("35FE3/ B63D4718"))
  show("lsn.names(90600).last_wal_replay_lsn", lsn.names(90600).last_wal_replay_lsn)
  show("lsn.names(150000).last_wal_replay_lsn", lsn.names(150000).last_wal_replay_lsn)

  stop("migrun.proc: processes from argv arrays, never a shell")
  local p = proc.pipeline{ { "seq", "1", "100000" }, { "grep", "-c", "7" }, stdout = "capture" }
  show(p:command(), p:wait(), p.stdout:match("%d+"))
  local failing = proc.pipeline{ { "seq", "1", "10" }, { "sh", "-c", "exit 3" }, { "cat" }, stdout = "null" }
  show(failing:command(), failing:wait())
  local h = proc.spawn{ "psql", "--version", env = { PGPASSWORD = "never printed" }, stdout = "capture" }
  show("printable command (env kept out)", h:command())
  h:wait()
  show("spawn of a missing program", proc.spawn{ "no-such-program" })

  if not opts.quick then
    stop("the REPL, fed from stdin")
    local self = arg and arg[-1] or "migrun"
    local session = 'x = lsn"16/B374D848"\nx + 1024\n{ slot = "dms_slot_01", lag = lsn.format_bytes(3 * 2^30) }\n'
    local r = proc.spawn{ self, "-l", "migrun.lsn", "-i", stdin = session, stdout = "capture", stderr = "stdout" }
    r:wait(10)
    io.write((r.stdout:gsub("[^\n]+", "  %0")))
  end
  io.write("\ntour done\n")
  return true
end

return tour
