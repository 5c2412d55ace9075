--[[
migrun.playbook.progress: how a long operation shows it is moving. On a terminal, one
live line redrawn in place; anywhere else (a pipe, a log file, CI), plain
timestamped lines at most every `interval` seconds plus the final one, so a
log stays readable.

  local progress = require "migrun.playbook.progress"
  local bar = progress.new{ label = "copy public.orders", total = 1e9, unit = "bytes" }
  bar:update(5e8, "3.2M rows")     -- 12:01:03 copy public.orders: 476.8 MiB of 953.7 MiB (50%) 3.2M rows
  bar:finish("953.7 MiB in 12 s")  -- 12:01:15 copy public.orders: done, 953.7 MiB in 12 s

  progress.new{ label =, total = (optional), unit = "bytes" | "rows" | nil,
                tty = (default host.isatty(io.stdout)), out = (default io.stdout),
                say = function(line) (plain mode: where lines go; default: a
                      timestamped line on out), interval = seconds (default 10),
                on_tick = function() (called on every update: the playbook runs
                      its due watchers there) } -> bar
  bar:update(done [, detail])   bar:finish([summary])   (finish is idempotent)
  bar:abandon()   work that did not finish (the step failed or was stopped):
                  "copy public.orders: stopped at 476.8 MiB of 953.7 MiB (50%)"
  progress.amount(n, unit) -> "1.5 GiB" | "1,234 rows" | "1234"
]]
local host = require "migrun.host"
local text = require "migrun.text"

local progress = {}

local Bar = {}
Bar.__index = Bar
Bar.__name = "migrun.playbook.progress.Bar"

function progress.amount(n, unit)
  if n == nil then return "?" end
  if unit == "bytes" then return text.bytes(n) end
  if unit then return text.thousands(n) .. " " .. unit end
  return text.thousands(n)
end

function progress.new(opts)
  assert(type(opts) == "table" and opts.label, "progress.new{ label = ... } expected")
  local out = opts.out or io.stdout
  local tty = opts.tty
  if tty == nil then tty = host.isatty(out) end
  local self = setmetatable({
    label = opts.label, total = opts.total, unit = opts.unit, out = out, tty = tty,
    interval = opts.interval or 10, on_tick = opts.on_tick,
    say = opts.say or function(line)
      out:write(os.date("%H:%M:%S "), line, "\n")
      out:flush()
    end,
    started = host.monotonic(), last_shown = nil, done = 0, finished = false,
  }, Bar)
  return self
end

function Bar:line(detail)
  local parts = { self.label, ": ", progress.amount(self.done, self.unit) }
  if self.total then
    parts[#parts + 1] = " of " .. progress.amount(self.total, self.unit)
    if self.total > 0 then
      parts[#parts + 1] = (" (%d%%)"):format(math.min(100, math.floor(self.done * 100 / self.total)))
    end
  end
  local elapsed = host.monotonic() - self.started
  if self.total and self.done > 0 and self.done < self.total and elapsed > 2 then
    local left = elapsed * (self.total - self.done) / self.done
    parts[#parts + 1] = (", %s left"):format(text.duration(left))
  end
  if detail and detail ~= "" then parts[#parts + 1] = "  " .. detail end
  return table.concat(parts)
end


function Bar:update(done, detail)
  assert(not self.finished, "progress: update after finish")
  self.done = done or self.done
  self.detail = detail
  local now = host.monotonic()
  if self.tty then
    -- redrawn in place: carriage return, the line, clear to the end of line
    self.out:write("\r", self:line(detail):sub(1, 200), "\27[K")
    self.out:flush()
    self.live = true
  elseif self.last_shown == nil or now - self.last_shown >= self.interval then
    self.last_shown = now
    self.say(self:line(detail))
  end
  if self.on_tick then self.on_tick() end
end

-- Clears a live line so that another message can be printed (the playbook's
-- say does it before writing).
function Bar:clear()
  if self.live then
    self.out:write("\r\27[K")
    self.out:flush()
  end
end

function Bar:finish(summary)
  if self.finished then return end
  self.finished = true
  self:clear()
  self.live = false
  local line = self.label .. ": done"
  if summary and summary ~= "" then
    line = line .. ", " .. summary
  else
    line = line .. ", " .. progress.amount(self.done, self.unit) .. " in " ..
           text.duration(host.monotonic() - self.started)
  end
  self.say(line)
end

function Bar:abandon()
  if self.finished then return end
  self.finished = true
  self:clear()
  self.live = false
  local line = self:line()
  self.say(self.label .. ": stopped at " .. line:sub(#self.label + 3):gsub(", [^,]* left$", ""))
end

progress.Bar = Bar
return progress
