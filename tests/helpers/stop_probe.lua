-- A process watcher for playbook_spec (tests/fixtures/playbooks/steps.lua,
-- FIXTURE_GUARD_STOP=1): one good check, then, after job.after seconds, a
-- stop with its reason, asked of its parent as the guard asks (a line, then
-- SIGUSR1).
local host = require "migrun.host"
local json = require "migrun.json"

return {
  main = function()
    local job = assert(json.decode(io.read("a")))
    io.stdout:write(json.encode{ level = "ok", message = "fine" }, "\n")
    io.stdout:flush()
    host.sleep(job.after)
    io.stdout:write(json.encode{ level = "stop", message = "the probe's reason to stop" }, "\n")
    io.stdout:flush()
    assert(host.request_stop(job.parent))
    os.exit(0)
  end,
}
