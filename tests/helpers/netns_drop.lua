-- Run by pg_faults_spec through faults.isolated (a network namespace of its
-- own): a lab there, a query waiting on the target, then every packet from
-- the target dropped; prints how long the query took to fail, as JSON.
-- MIGRUN_DROP_CONNINFO_EXTRA: keywords added to the target's conninfo.
local pg = require "migrun.pg"
local host = require "migrun.host"
local faults = require "migrun.rehearsal.faults"
local cjson = require "cjson"

assert(faults.private_network())
local L <close> = assert(require("migrun.rehearsal.lab").start{})
local c = assert(pg.connect(L.target.conninfo .. " " .. (os.getenv("MIGRUN_DROP_CONNINFO_EXTRA") or ""),
  { name = "target" }))
local tcp = c:info().tcp
local steps = assert(faults.drop_steps(L.target.port))
table.insert(steps, 1, { sleep = 1 })
local cue = assert(faults.cue(steps, { logfile = L.dir .. "/drop.log" }))
local t0 = host.monotonic()
local res, err = c:exec("select pg_sleep(120)")
local seconds = host.monotonic() - t0 - 1
assert(cue:wait(10))
io.stdout:write(cjson.encode{ seconds = seconds, ok = res ~= nil, kind = err and err.kind, lost = err and err.lost,
  message = err and err.message, tcp = tcp }, "\n")
