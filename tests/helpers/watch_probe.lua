-- A process watcher for watchdog_spec: reads its job (JSON on stdin), writes
-- one check line per job.lines entry as the guard does, then waits to be
-- closed. Each line also says what Lua types the job's numbers arrived as.
local host = require "migrun.host"
local json = require "migrun.json"

return {
  main = function()
    local job = assert(json.decode(io.read("a")))
    for _, line in ipairs(job.lines) do
      line.job_n_type = math.type(job.n)
      io.stdout:write(json.encode(line), "\n")
      io.stdout:flush()
    end
    host.sleep(60)
  end,
}
