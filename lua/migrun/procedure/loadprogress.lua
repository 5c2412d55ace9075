--[[
migrun.loadprogress: the full load's progress in one unit. The plan sizes
the tables as the source keeps them on disk (know_data: heap, TOAST and
indexes), while the load moves COPY text, whose size has little to do with
that: "46.5 MiB of 65.3 MiB" after a finished load, or more than the total
on a table of narrow integers. So the progress is counted in the plan's
unit, on-disk bytes: a table loaded counts its whole size, a table under way
its share of rows copied (against the planner's estimate, reltuples; its
share of COPY bytes when the table was never analyzed), never more than 99%
until it is committed. The bar's rate and ETA, `status` and the metrics then
compare like with like; the COPY bytes stay what the journal records as
sent.

  local loadprogress = require "migrun.loadprogress"
  local p = loadprogress.new(tables, state)  -- know_data's tables; fullload.run's opts.state
  p.total                                     -- on-disk bytes of every table
  p:update(detail) -> done     a progress event of fullload.run (detail = { table=, chunk=, rows=, bytes= });
                               done as p:done()
  p:done() -> the on-disk bytes loaded or under way (loaded tables whole)
  p:table_done("s.t") -> the table's own
  loadprogress.loaded(tables, loaded) -> on-disk bytes of the tables loaded, how many
      (tables: know_data's; loaded: a full load step's facts.loaded)
]]
local text = require "migrun.text"

local loadprogress = {}

local CAP = 0.99 -- a table is whole only once committed

local P = {}
P.__index = P

function loadprogress.new(tables, state)
  assert(type(tables) == "table", "loadprogress.new: the tables (know_data's) expected")
  state = state or {}
  local self = setmetatable({ tables = {}, total = 0, state = state, moving = {} }, P)
  for _, t in ipairs(tables) do
    local k = text.key(t)
    self.tables[k] = t
    self.total = self.total + (t.bytes or 0)
  end
  return self
end

-- The share of table k loaded or under way, 0 to 1.
function P:share(k)
  local loaded = self.state.loaded or {}
  if loaded[k] then return 1 end
  local t = self.tables[k]
  if not t then return 0 end
  local rows, copied = 0, 0
  local cs = (self.state.chunks or {})[k]
  local done = cs and cs.done or {}
  for _, c in pairs(done) do rows, copied = rows + (c.rows or 0), copied + (c.bytes or 0) end
  for chunk, m in pairs(self.moving[k] or {}) do
    if not done[chunk] then rows, copied = rows + m.rows, copied + m.bytes end
  end
  local f = 0
  if t.rows_estimate and t.rows_estimate > 0 then
    f = rows / t.rows_estimate
  elseif t.bytes and t.bytes > 0 then
    f = copied / t.bytes
  end
  return math.min(CAP, f)
end

function P:table_done(k)
  local t = self.tables[k]
  return t and math.floor((t.bytes or 0) * self:share(k)) or 0
end

function P:done()
  local n = 0
  for k in pairs(self.tables) do n = n + self:table_done(k) end
  return n
end

function P:update(detail)
  if detail and detail.table then
    local m = self.moving[detail.table] or {}
    self.moving[detail.table] = m
    -- a chunk's key as the journal's (fullload: done["i"]); a whole table's: "whole"
    m[detail.chunk and tostring(detail.chunk) or "whole"] =
      { rows = tonumber(detail.rows) or 0, bytes = tonumber(detail.bytes) or 0 }
  end
  return self:done()
end

function loadprogress.loaded(tables, loaded)
  local bytes, n = 0, 0
  for _, t in ipairs(tables or {}) do
    if loaded and loaded[text.key(t)] then bytes, n = bytes + (t.bytes or 0), n + 1 end
  end
  return bytes, n
end

return loadprogress
