-- A short scripted tour of migrun's modules, run by `make demo` until the
-- end-to-end migration demo exists. Each stop prints what it does, then does it.
local lsn = require "migrun.lsn"
local proc = require "migrun.proc"
local text = require "migrun.text"

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
  show("text.bytes(primary_now - paused_at)", text.bytes(primary_now - paused_at))
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
    local session = 'x = lsn"16/B374D848"\nx + 1024\n{ slot = "dms_slot_01", lag = require(\"migrun.text\").bytes(3 * 2^30) }\n'
    local r = proc.spawn{ self, "-l", "migrun.lsn", "-i", stdin = session, stdout = "capture", stderr = "stdout" }
    r:wait(10)
    io.write((r.stdout:gsub("[^\n]+", "  %0")))
  end
  if not opts.quick then
    tour.lab()
  end
  io.write("\ntour done\n")
  return true
end

-- The runbook's Phase I anchor on real clusters: pause the maintenance
-- replica, capture its replay LSN, and see the primary move on without it.
function tour.lab()
  local lab, pg = require "migrun.rehearsal.lab", require "migrun.pg"
  stop("migrun.rehearsal.lab + migrun.pg: a primary, a paused maintenance replica, a target")
  local t0 = os.time()
  local L <close> = assert(lab.start{})
  show("lab started (s)", os.time() - t0)
  show("source", L.source.conninfo)
  show("replica", L.replica.conninfo)
  show("target", L.target.conninfo)
  local source <close> = assert(pg.connect(L.source.conninfo, { name = "source" }))
  local replica <close> = assert(pg.connect(L.replica.conninfo, { name = "replica" }))
  assert(source:exec("create table calls (id bigint primary key, at timestamptz default now())"))
  assert(source:exec("insert into calls (id) select generate_series(1, 1000)"))
  assert(L:wait_replica_caught_up(30))
  show("replica in recovery", replica:in_recovery(), "source in recovery", source:in_recovery())

  local names = lsn.names(replica:server_version())
  assert(replica:exec(("select %s()"):format(names.wal_replay_pause)))
  local state
  repeat
    state = assert(replica:exec(("select %s() as s"):format(names.wal_replay_pause_state)))[1].s
  until state == "paused"
  local anchor = assert(replica:exec(("select %s() as l"):format(names.last_wal_replay_lsn)))[1].l
  show("replica paused; replay LSN captured", anchor)
  assert(source:exec("insert into calls (id) select generate_series(1001, 5000)"))
  local now = assert(source:exec(("select %s() as l"):format(names.current_wal_lsn)))[1].l
  show("primary moved on to", now, text.bytes(now - anchor) .. " ahead")
  show("rows: source / paused replica", source:exec("select count(*) n from calls")[1].n,
    replica:exec("select count(*) n from calls")[1].n)
  assert(replica:exec(("select %s()"):format(names.wal_replay_resume)))
  assert(L:wait_replica_caught_up(30))
  show("after resume, replica rows", replica:exec("select count(*) n from calls")[1].n)
  show("a SQL error, as a value", select(2, source:exec("insert into calls (id) values (1)")))
end

return tour
