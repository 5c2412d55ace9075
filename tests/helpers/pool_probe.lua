-- A migrun.pool task for pool_spec: says it started, waits job.seconds, ends.
-- With job.chatter it talks all that time instead: event after event, so that
-- its parent spends its time decoding them.
local host = require "migrun.host"

-- tasks this process has run: a worker serves task after task
local served = 0

return {
  task = function(job, emit)
    served = served + 1
    emit{ event = "started", group = job.group, n = job.n, pid = host.pid, served = served }
    if job.fail then return nil, "task " .. job.n .. " failed" end
    if not job.chatter then
      host.sleep(job.seconds)
      return true
    end
    local pad, deadline = {}, host.monotonic() + job.seconds
    for i = 1, 300 do pad[i] = { i, "x", { a = i } } end
    while host.monotonic() < deadline do
      emit{ event = "chatter", n = job.n, pad = pad }
    end
    return true
  end,
}
