-- fullload.run in a child migrun (tests/fixtures/fullload/run.lua) that
-- journals in the state directory job.journal and kills itself on cue (job.die), for the specs of
-- the full load's resume. Its workers carry procs.MARK = mark: none of them
-- may outlive it (they die with their parent).
--
--   fullload_child.run_killed(job, mark) -> the load's state as the killed run left it in its journal
local proc = require "migrun.proc"
local journal = require "migrun.playbook.journal"
local json = require "migrun.json"
local procs = require "helpers.procs"
local assert = require "luassert" -- helpers do not get busted's globals

local M = {}

local ROOT = os.getenv("MIGRUN_SOURCE_DIR") or "."
local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"

function M.run_killed(job, mark)
  local ok, how, code, out, err = proc.run{ MIGRUN, ROOT .. "/tests/fixtures/fullload/run.lua",
    stdin = json.encode(job), stdout = "capture", stderr = "capture", timeout = 300,
    env = { [procs.MARK] = mark } } -- inherited by its workers: they are told apart by it
  assert.is_false(ok == true, "the run was not killed:\n" .. tostring(out) .. tostring(err))
  assert.equal("signal", how, tostring(how) .. " " .. tostring(code) .. "\n" .. tostring(err))
  assert.is_true(procs.gone(mark, 10), "workers of the killed run live on")
  local J = assert(journal.open(job.journal, { read_only = true }))
  assert.is_true(J.existed, "the killed run left no journal")
  return J:step("fixture", "full_load").facts or {}
end

return M
