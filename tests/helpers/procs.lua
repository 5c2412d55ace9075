-- The processes of one spec's runs, told apart from every other process on the
-- machine (the suite runs in two builds at once, specs in parallel in each) by
-- a mark in their environment: a spec starts its migrun with
-- env = { [procs.MARK] = something unique }, and every child inherits it.
local host = require "migrun.host"
local proc = require "migrun.proc"

local procs = { MARK = "MIGRUN_SPEC_MARK" }

-- The live (not zombie) processes carrying the mark whose command line
-- contains `with` (plain text; any when nil) -> { pid, ... }
function procs.marked(mark, with)
  local tag = "\0" .. procs.MARK .. "=" .. mark .. "\0"
  local _, _, _, out = proc.run{ "ls", "/proc" }
  local found = {}
  for pid in out:gmatch("%f[%w](%d+)%f[%W]") do
    local env = host.read_file("/proc/" .. pid .. "/environ")
    if env and ("\0" .. env):find(tag, 1, true) then
      local stat = host.read_file("/proc/" .. pid .. "/stat") or ""
      local cmdline = (host.read_file("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ")
      if not stat:match("^%d+ %b() Z") and (not with or cmdline:find(with, 1, true)) then
        found[#found + 1] = pid
      end
    end
  end
  return found
end

-- Waits up to `seconds` for no live process to carry the mark -> whether none does.
function procs.gone(mark, seconds)
  local deadline = host.monotonic() + seconds
  while #procs.marked(mark) > 0 do
    if host.monotonic() > deadline then return false end
    host.sleep(0.2)
  end
  return true
end

-- The live descendants of pid whose command line contains `with` -> { pid, ... }.
-- Reads /proc only (no process started): usable inside an output callback.
function procs.descendants(pid, with, found)
  found = found or {}
  local list = host.read_file(("/proc/%d/task/%d/children"):format(pid, pid)) or ""
  for child in list:gmatch("%d+") do
    local stat = host.read_file("/proc/" .. child .. "/stat") or ""
    local cmdline = (host.read_file("/proc/" .. child .. "/cmdline") or ""):gsub("%z", " ")
    if stat ~= "" and not stat:match("^%d+ %b() Z") and (not with or cmdline:find(with, 1, true)) then
      found[#found + 1] = child
    end
    procs.descendants(tonumber(child), with, found)
  end
  return found
end

return procs
