--[[
migrun.playbook.progress: how a long operation shows it is moving. On a terminal, one
live line redrawn in place; anywhere else (a pipe, a log file, CI), plain
timestamped lines at most every `interval` seconds plus the final one, so a
log stays readable.

  local progress = require "migrun.playbook.progress"
  local bar = progress.new{ label = "copy public.orders", total = 1e9, unit = "bytes" }
  bar:update(5e8, "3.2M rows")     -- 12:01:03 copy public.orders: 476.8 MiB of 953.7 MiB (50%),
                                   --   40.0 MiB/s, ends ~12:01:15 (12.0 s)  3.2M rows
  bar:finish("953.7 MiB in 12 s")  -- 12:01:15 copy public.orders: done, 953.7 MiB in 12 s

  progress.new{ label =, total = (optional), unit = "bytes" | "rows" | nil,
                tty = (default host.isatty(io.stdout)), out = (default io.stdout),
                say = function(line) (plain mode: where lines go; default: a
                      timestamped line on out), interval = seconds (default 10),
                on_tick = function() (called on every update: the playbook runs
                      its due watchers there), on_record = function(bar, now) (called
                      on every update and at the finish: the playbook saves
                      bar:snapshot() for `status` and the metrics, at most every
                      few seconds, or at once when `now`: a new part, the finish),
                      window = seconds of the rate (default 30) } -> bar
  bar:update(done [, detail] [, extra])   bar:finish([summary])   (finish is idempotent)
      extra.rows: rows done so far (a rows/s rate besides the unit's);
      extra.part = { key =, name =, done =, total =, rows = }: one of several
      things moving at once (a stream of the full load and its table), with
      a rate and ETA of its own.
  bar:rates() -> per second in the unit, rows per second (recent window; nil
      while unknown), bar:eta() -> seconds left | nil
  bar:snapshot() -> { label, unit, done, total, rows, per_second, rows_per_second,
      eta_seconds, started_at, updated_at, finished, detail, parts = { {key, name,
      done, total, rows, per_second, eta_seconds, updated_at} } }  (times: epoch)
  bar:abandon()   work that did not finish (the step failed or was stopped):
                  "copy public.orders: stopped at 476.8 MiB of 953.7 MiB (50%)"
  progress.amount(n, unit) -> "1.5 GiB" | "1,234 rows" | "1234"

The rate and the ETA come from the last `window` seconds (migrun.playbook.rate),
not from the average since the start: after hours, that average says nothing
about the next hour.
]]
local host = require "migrun.host"
local text = require "migrun.text"
local rate = require "migrun.playbook.rate"

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
    interval = opts.interval or 10, on_tick = opts.on_tick, on_record = opts.on_record,
    window = opts.window or 30, rate = rate.new{ window = opts.window or 30 }, parts = {}, part_order = {},
    say = opts.say or function(line)
      out:write(os.date("%H:%M:%S "), line, "\n")
      out:flush()
    end,
    started = host.monotonic(), started_at = host.now(), last_shown = nil, done = 0, finished = false,
  }, Bar)
  self.rate:add(self.started, 0, 0)
  return self
end

-- per second in the bar's unit, rows per second: over the recent window
function Bar:rates()
  return self.rate:per_second()
end

function Bar:eta()
  return rate.eta(self.done, self.total, (self.rate:per_second()))
end

-- "40.0 MiB/s" | "1,234 rows/s" | "12/s"
function progress.speed(per_second, unit)
  if per_second == nil then return nil end
  if unit == "bytes" then return text.bytes(per_second) .. "/s" end
  local n = per_second >= 10 and text.thousands(per_second) or ("%.1f"):format(per_second)
  return unit and (n .. " " .. unit .. "/s") or (n .. "/s")
end

function Bar:line(detail)
  local parts = { self.label, ": ", progress.amount(self.done, self.unit) }
  if self.total then
    parts[#parts + 1] = " of " .. progress.amount(self.total, self.unit)
    if self.total > 0 then
      parts[#parts + 1] = (" (%d%%)"):format(math.min(100, math.floor(self.done * 100 / self.total)))
    end
  end
  local per, rows_per = self:rates()
  if per then
    parts[#parts + 1] = ", " .. progress.speed(per, self.unit)
    if rows_per and self.unit ~= "rows" then parts[#parts + 1] = ", " .. progress.speed(rows_per, "rows") end
  end
  local left = self:eta()
  if left and self.done < self.total then
    parts[#parts + 1] = (", ends ~%s (%s)"):format(os.date("%H:%M", math.floor(host.now() + left)),
      text.duration(left))
  end
  if detail and detail ~= "" then parts[#parts + 1] = "  " .. detail end
  return table.concat(parts)
end


function Bar:update(done, detail, extra)
  assert(not self.finished, "progress: update after finish")
  self.done = done or self.done
  self.detail = detail
  local now = host.monotonic()
  if extra and extra.rows then self.rows = extra.rows end
  self.rate:add(now, self.done, self.rows)
  local new_part = extra and extra.part and self:_part(extra.part, now)
  if self.tty then
    -- redrawn in place: carriage return, the line, clear to the end of line
    self.out:write("\r", self:line(detail):sub(1, 200), "\27[K")
    self.out:flush()
    self.live = true
  elseif self.last_shown == nil or now - self.last_shown >= self.interval then
    self.last_shown = now
    self.say(self:line(detail))
  end
  -- a new table in a stream is worth saving at once (it may then wait long)
  if self.on_record then self.on_record(self, new_part) end
  if self.on_tick then self.on_tick() end
end

function Bar:_part(p, now)
  assert(p.key ~= nil, "progress: extra.part.key expected")
  local key = tostring(p.key)
  local part = self.parts[key]
  local new = not part or part.name ~= p.name
  if new then
    -- a new thing in this place (the stream's next table): its own rate
    part = { key = key, rate = rate.new{ window = self.window } }
    if not self.parts[key] then self.part_order[#self.part_order + 1] = key end
    self.parts[key] = part
  end
  part.name, part.done, part.total, part.rows = p.name, p.done or 0, p.total, p.rows
  part.updated_at = host.now()
  part.rate:add(now, part.done, part.rows)
  return new
end

function Bar:snapshot()
  local per, rows_per = self:rates()
  local out = { label = self.label, unit = self.unit, done = self.done, total = self.total, rows = self.rows,
    per_second = per, rows_per_second = rows_per, eta_seconds = self:eta(), started_at = self.started_at,
    updated_at = host.now(), finished = self.finished or nil, detail = self.detail, parts = {} }
  for _, key in ipairs(self.part_order) do
    local p = self.parts[key]
    local pper, prows = p.rate:per_second()
    out.parts[#out.parts + 1] = { key = key, name = p.name, done = p.done, total = p.total, rows = p.rows,
      per_second = pper, rows_per_second = prows, eta_seconds = rate.eta(p.done, p.total, pper),
      updated_at = p.updated_at }
  end
  return out
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
  if self.on_record then self.on_record(self, true) end
end

function Bar:abandon()
  if self.finished then return end
  self.finished = true
  self:clear()
  self.live = false
  local line = self:line()
  self.say(self.label .. ": stopped at " .. line:sub(#self.label + 3):gsub(", [^,]* left$", ""))
  if self.on_record then self.on_record(self, true) end
end

progress.Bar = Bar
return progress
