-- migrun.playbook.watchdog: a process watcher's job reaches it as JSON on
-- stdin and its check lines come back decoded by migrun.json, so that numbers
-- keep their type (lua-cjson, used before, read 5 as 5.0); a level reached is
-- one notification with the line's figures. The watcher is
-- tests/helpers/watch_probe.lua, in the worker as the guard is.
local watchdog = require "migrun.playbook.watchdog"

describe("migrun.playbook.watchdog", function()
  it("hands the job over and reads the checks with integers kept, a warning notified once", function()
    local job = { n = 5, lines = {
      { level = "warn", message = "held back", held_bytes = 1048576, rate = 2.5, warn_bytes = 1 },
      { level = "warn", message = "held back", held_bytes = 2097152 } } }
    local w = assert(watchdog.start({}, { name = "probe",
      process = { module = "helpers.watch_probe", job = function() return job end } }))
    finally(function() w:close() end)
    assert.equal("warn", w.last.level)
    assert.equal("integer", w.last.job_n_type)
    local sent = {}
    w:drain({ notify = function(_, event, message, details)
      sent[#sent + 1] = { event = event, message = message, details = details }
    end })
    assert.equal(1, #sent)
    assert.equal("probe_warn", sent[1].event)
    assert.equal("held back", sent[1].message)
    assert.equal(1048576, sent[1].details.held_bytes)
    assert.equal("integer", math.type(sent[1].details.held_bytes))
    assert.equal("integer", math.type(sent[1].details.warn_bytes))
    assert.equal("float", math.type(sent[1].details.rate))
  end)
end)
