-- fullload.run in a child migrun (tests/fixtures/fullload/run.lua) that
-- journals to job.journal and kills itself on cue (job.die), for the specs of
-- the full load's resume. Its workers carry procs.MARK = mark: none of them
-- may outlive it (they die with their parent).
--
--   fullload_child.run_killed(job, mark) -> the journal as the killed run left it
local proc = require "migrun.proc"
local host = require "migrun.host"
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
  return json.decode(assert(host.read_file(job.journal)))
end

return M
