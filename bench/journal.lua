--[[
bench/journal.lua: what the full load's journal costs per chunk as the load
grows, saved as the load step saves it (each change by its path,
journal:save_change) against the whole journal rewritten at each chunk (the
way it was saved before), in the same run, on the same disk.

  migrun bench/journal.lua [--chunks 250,500,1000,10000] [--whole-max 1000] [--dir DIR]

For each size N, a load of one table cut into N chunks is played through the
journal with no server: each chunk is journaled as committing (saved at
once, as before its COMMIT), then as done. "whole" rewrites journal.json at
each of the two; "changes" appends the two changes and the removal of the
committing entry (fsynced, as the load saves them). Printed per size: CPU
seconds and wall seconds of the whole load's saves, bytes written, the cost
of the last 100 chunks' saves (what a chunk costs once the load is that far),
and whole / changes. "whole" grows with the square of N (1000 chunks took
minutes): above --whole-max it is not run, and "changes" alone shows that
a chunk's cost stays flat. The journal read back at the end must hold every chunk.
No network, no server: the state directory's disk only (default: a new
directory under $TMPDIR).
]]
local journal = require "migrun.playbook.journal"
local host = require "migrun.host"
local proc = require "migrun.proc"

local opt = { chunks = { 250, 500, 1000, 10000 }, whole_max = 1000, dir = nil }
do
  local i = 1
  while i <= #arg do
    local a, v = arg[i], arg[i + 1]
    if a == "--chunks" then
      opt.chunks = {}
      for n in v:gmatch("%d+") do opt.chunks[#opt.chunks + 1] = math.tointeger(tonumber(n)) end
      i = i + 2
    elseif a == "--dir" then opt.dir, i = v, i + 2
    elseif a == "--whole-max" then opt.whole_max, i = math.tointeger(tonumber(v)), i + 2
    else error("bench/journal.lua: unknown argument " .. a .. " (see the header)", 0) end
  end
end

local base = opt.dir or ((os.getenv("TMPDIR") or "/tmp") .. "/migrun-bench-journal-" .. host.pid)
assert(journal.make_dir(base))
local FACTS = { "playbooks", "full", "steps", "full_load", "facts" }

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return 0 end
  local n = f:seek("end")
  f:close()
  return n
end

-- One load of n chunks through the journal, saved the way `how` says.
local function play(n, how)
  local dir = ("%s/%s-%d"):format(base, how, n)
  proc.run{ "rm", "-rf", dir }
  assert(journal.make_dir(dir))
  local J = assert(journal.open(dir))
  local step = J:step("full", "full_load")
  step.status, step.facts = "running", { loaded = {}, indexed = {}, analyzed = {}, hashed = {} }
  local plan = { table = "public.big", count = n, method = "key", column = "id", ranges = {} }
  for i = 1, n do plan.ranges[i] = { i * 100000, (i + 1) * 100000 } end
  local cs = { plan = plan, done = {}, committing = {} }
  step.facts.chunks = { ["public.big"] = cs }
  assert(J:save())
  local bytes, last = 0, nil
  local function written()
    return file_size(dir .. "/journal.json") + file_size(dir .. "/journal.log")
  end
  local function save(paths)
    if how == "whole" then
      assert(J:save())
      bytes = bytes + file_size(dir .. "/journal.json")
    else
      local before, gen = file_size(dir .. "/journal.log"), J.data.log_generation
      assert(J:save_changes(paths, FACTS))
      -- a log folded into journal.json: that rewrite is written too
      if J.data.log_generation ~= gen then bytes = bytes + file_size(dir .. "/journal.json") end
      bytes = bytes + math.max(0, file_size(dir .. "/journal.log") - before)
    end
  end
  local c0, w0 = os.clock(), host.monotonic()
  for i = 1, n do
    if i == n - 99 then last = { os.clock(), host.monotonic() } end
    local k = tostring(i)
    cs.committing[k] = { xid = 1000 + i, rows = 250000, bytes = 67108864, started = 1.5, stream = i % 2 + 1 }
    save{ { "chunks", "public.big", "committing", k } }
    cs.done[k] = { chunk = i, rows = 250000, bytes = 67108864, started = 1.5, ended = 2.5, seconds = 1.0,
                   stream = i % 2 + 1, xid = 1000 + i }
    cs.committing[k] = nil
    save{ { "chunks", "public.big", "done", k }, { "chunks", "public.big", "committing", k } }
  end
  local c1, w1 = os.clock(), host.monotonic()
  local back = assert(journal.open(dir, { read_only = true }))
  local got = 0
  for _ in pairs(back:step("full", "full_load").facts.chunks["public.big"].done) do got = got + 1 end
  assert(got == n, ("%s: the journal read back holds %d of %d chunks"):format(how, got, n))
  local r = { cpu = c1 - c0, wall = w1 - w0, bytes = bytes, on_disk = written(),
              last_cpu = (c1 - last[1]) / 100, last_wall = (w1 - last[2]) / 100 }
  proc.run{ "rm", "-rf", dir }
  return r
end

local function mib(b) return ("%.1f MiB"):format(b / 1048576) end
print(("journal saves of a load in N chunks (state directory %s)"):format(base))
print(("%8s  %-8s %9s %9s %12s %16s %16s"):format("chunks", "saved", "CPU s", "wall s", "written",
  "CPU ms / chunk", "wall ms / chunk"))
print("          (the load's saves in all; per chunk: the last 100 chunks')")
for round, n in ipairs(opt.chunks) do
  local r = {}
  -- alternating order per size: neither method always runs first
  local order = round % 2 == 0 and { "changes", "whole" } or { "whole", "changes" }
  for _, how in ipairs(order) do
    if how == "changes" or n <= opt.whole_max then r[how] = play(n, how) end
  end
  for _, how in ipairs{ "whole", "changes" } do
    local x = r[how]
    if x then
      print(("%8d  %-8s %9.2f %9.2f %12s %16.3f %16.3f"):format(n, how, x.cpu, x.wall, mib(x.bytes),
        x.last_cpu * 1000, x.last_wall * 1000))
    end
  end
  if r.whole then print(("%8d  whole / changes: CPU %.1f x, wall %.1f x, written %.1f x; per chunk at the end: CPU %.0f x")
    :format(n, r.whole.cpu / r.changes.cpu, r.whole.wall / r.changes.wall, r.whole.bytes / r.changes.bytes,
      r.whole.last_cpu / r.changes.last_cpu)) end
end
proc.run{ "rm", "-rf", base }
