-- A migrun.pool task for pool_spec: says it started, waits job.seconds, ends.
local host = require "migrun.host"

return {
  task = function(job, emit)
    emit{ event = "started", group = job.group, n = job.n }
    host.sleep(job.seconds)
    return true
  end,
}
