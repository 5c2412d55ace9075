--[[
migrun.playbook.rate: how fast something moves now, and when it will end. A
load of hours slows down and speeds up (a table of wide rows, then one of
narrow ones; a busy primary), so the rate is measured over a recent window,
never since the start: an ETA from the average since the start stays wrong
for hours after the speed changed.

  local rate = require "migrun.playbook.rate"
  local r = rate.new{ window = 30 }        -- seconds (default 30)
  r:add(t, done [, rows])                  -- t: seconds on any clock that never jumps
  r:per_second() -> done/s, rows/s         -- over the window; nil, nil until two
                                           -- samples at least min_span (1 s) apart
  rate.eta(done, total, per_second) -> seconds left | nil (unknown: no total,
      no rate, or nothing moving)

Samples older than the window are dropped, except the newest of them: the
window's start is then interpolated between it and the next one, so a rate
right after a quiet spell does not jump.
]]
local rate = {}

local Rate = {}
Rate.__index = Rate
Rate.__name = "migrun.playbook.rate.Rate"

function rate.new(opts)
  opts = opts or {}
  local window = opts.window or 30
  assert(type(window) == "number" and window > 0, "rate.new: window must be a number of seconds > 0")
  return setmetatable({ window = window, min_span = opts.min_span or 1, samples = {} }, Rate)
end

function Rate:add(t, done, rows)
  assert(type(t) == "number" and type(done) == "number", "rate:add(t, done [, rows]): numbers expected")
  local s = self.samples
  local last = s[#s]
  if last and t < last.t then error("rate:add: time went backwards", 2) end
  if last and t == last.t then
    last.done, last.rows = done, rows or last.rows
  else
    s[#s + 1] = { t = t, done = done, rows = rows }
  end
  -- keep one sample at or before the window's start
  while #s > 2 and s[2].t <= t - self.window do table.remove(s, 1) end
end

-- The value of field at time t, interpolated between samples a and b.
local function at(a, b, t, field)
  local x, y = a[field], b[field]
  if x == nil or y == nil then return nil end
  if b.t == a.t then return y end
  return x + (y - x) * (t - a.t) / (b.t - a.t)
end

function Rate:per_second()
  local s = self.samples
  if #s < 2 then return nil, nil end
  local last = s[#s]
  local start = math.max(s[1].t, last.t - self.window)
  local span = last.t - start
  if span < self.min_span then return nil, nil end
  local first_done, first_rows
  if s[1].t >= start then
    first_done, first_rows = s[1].done, s[1].rows
  else
    first_done, first_rows = at(s[1], s[2], start, "done"), at(s[1], s[2], start, "rows")
  end
  local per = (last.done - first_done) / span
  local rows_per = (last.rows and first_rows) and (last.rows - first_rows) / span or nil
  return math.max(0, per), rows_per and math.max(0, rows_per) or nil
end

function rate.eta(done, total, per_second)
  if not (total and done and per_second) or per_second <= 0 then return nil end
  if done >= total then return 0 end
  return (total - done) / per_second
end

rate.Rate = Rate
return rate
