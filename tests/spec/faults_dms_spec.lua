-- The fault campaign (make test-faults): the DMS API answering one call in
-- five with throttling or a 5xx, all through a run; full.lua reaches ready
-- for cutover without a rerun, and every retry is in its output.
local H = require "helpers.rehearsal"
local emulator = require "migrun.rehearsal.emulator"

describe("DMS faults at 20%", function()
  local R

  setup(function()
    R = H.rehearsal("faults-dms", { dms = { faults = { seed = 20, throttle = 0.1, error5xx = 0.1 },
      delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, connection = 0.1, cdc_poll = 0.1,
        endpoint_delete = 0.1, task_delete = 0.1, task_modify = 0.1 } } })
  end)
  teardown(function()
    if R then
      R:stop_workload()
      R:close()
    end
  end)

  it("full.lua reaches ready for cutover in one run, retrying what failed", function()
    R:start_workload{ rate = 20 }
    local r = H.run(R, "full.lua", { "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    local client = assert(R.lab:dms_client())
    local counts = assert(emulator.control(client, "GetFaults", {}))
    assert.is_true(counts.Injected >= 5, ("the emulator injected too few faults to test anything: %d of %d calls")
      :format(counts.Injected, counts.Requests))
    -- each retry was logged with the operation, the error code and the attempt
    assert.matches("dms %u%a+: [%w]+ %(attempt 1 of 10%), retrying in", r.output)
  end)
end)
