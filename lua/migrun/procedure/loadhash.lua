--[[
migrun.loadhash: the full load verified as it goes. Each part of a table is
hashed on both sides as soon as it is committed (migrun.rowhash's sums, the
same as qa.compare's), by a worker in a lane of its own beside the load's
streams (migrun.pool's lanes), while its pages are in the cache; whole tables
loaded by one task are hashed by one task. The sums of a table's parts add
up to the whole table's, so once
every part is in, the table is judged: the target holds the rows the paused
replica has, or it does not. The load's own check ("check it", runbook step
10) then reads nothing again: on a paused replica and a target only the load
has written, nothing changed since.

The parts, by how a table is loaded:
- a whole table: one part, hashed whole on both sides after its COMMIT;
- a split table: each chunk's range on the replica (its key range, read by
  the replica's index, or its blocks) once it commits, and the target's
  table whole once it is complete, beside its index builds: on the target
  the table has no index yet while its chunks load (a key range would be a
  scan of the whole table for each chunk), and block ranges hold other rows
  there.
A part loaded by an earlier run whose sums the journal lost (it is saved at
most every second) is hashed again as a task of its own.

This module is the bookkeeping (what to hash, the sums as they come, the
verdict); migrun.fullload schedules the items and migrun.fullload_worker runs
them (op "hash": qa.row_hash on each side named).

  local loadhash = require "migrun.loadhash"
  local h = loadhash.new(state.hashed)             -- journaled: see below
  h:expect(k, plan)                                -- plan: chunks.plan's, nil for a whole table
  h:forget(k, parts)                               -- parts about to load again: { "whole" } | { "c3", ... }
  h:whole_item(t) / h:chunk_item(t, plan, i) / h:complete_items(t, plan) -> item | nil
  h:missing_items(t, plan, done) -> { item... }    parts an earlier run loaded, not hashed
  h:add(ev) -> verdict | nil                       a worker's "hashed" event; the verdict
      once the table's last part is in: { table =, equal =, rows = {replica, target},
      hash = {replica, target}, parts = n }
  loadhash.report_rows(hashed) / loadhash.REPORT_COLUMNS
  loadhash.proven(hashed) -> { ["s.t"] = true } (judged equal), { "s.t"... } (differ)

state.hashed["s.t"] = { need = { replica = n, target = n }, replica = { [part] = {rows, hash} },
    target = { ... }, equal = true | false | nil (not judged yet), rows =, hash = }
]]
local chunks = require "migrun.chunks"
local rowhash = require "migrun.rowhash"
local text = require "migrun.text"

local loadhash = {}

local H = {}
H.__index = H
H.__name = "migrun.loadhash.Hashes"

local SIDES = { "replica", "target" }

function loadhash.new(hashed)
  assert(type(hashed) == "table", "loadhash.new: the journal's hashed table expected")
  return setmetatable({ hashed = hashed }, H)
end

local function count(t)
  local n = 0
  for _ in pairs(t or {}) do n = n + 1 end
  return n
end

-- What a table's parts are, on each side. A record of another shape (the
-- table cut another way since: a full restart) starts again.
function H:expect(k, plan)
  local need = { replica = plan and plan.count or 1, target = 1 }
  local r = self.hashed[k]
  if not r or not r.need or r.need.replica ~= need.replica or r.need.target ~= need.target then
    self.hashed[k] = { need = need, replica = {}, target = {} }
  end
end

-- Parts about to be loaded (again): their sums, and what was judged of
-- the table, are forgotten; a table cut by blocks loses the target's sum too
-- (it is taken of the whole table once complete). parts: { "whole" } or
-- { "c1", ... }.
function H:forget(k, parts)
  local r = self.hashed[k]
  if not r or #parts == 0 then return end
  for _, part in ipairs(parts) do r.replica[part], r.target[part] = nil, nil end
  if r.need.target == 1 and r.need.replica > 1 then r.target.whole = nil end
  r.equal, r.rows, r.hash = nil, nil, nil
end

local function item(t, part, sides, where, chunk)
  return { op = "hash", table = text.key(t), schema = t.schema, name = t.name, part = part, sides = sides,
           where = where, chunk = chunk }
end

function H:whole_item(t)
  return item(t, "whole", SIDES)
end

function H:chunk_item(t, plan, i)
  return item(t, "c" .. i, { "replica" }, chunks.where(plan, i), i)
end

-- Once a split table is complete: the target's side, the table whole.
function H:complete_items(t, _)
  local r = self.hashed[text.key(t)]
  if r and r.target.whole then return {} end
  return { item(t, "whole", { "target" }) }
end

-- The parts an earlier run loaded whose sums are not in the journal.
function H:missing_items(t, plan, done)
  local k, out = text.key(t), {}
  local r = self.hashed[k]
  if not plan then
    if not (r.replica.whole and r.target.whole) then out[1] = self:whole_item(t) end
    return out
  end
  for i = 1, plan.count do
    if done[tostring(i)] then
      local part = "c" .. i
      local it = self:chunk_item(t, plan, i)
      local sides = {}
      for _, side in ipairs(it.sides) do if not r[side][part] then sides[#sides + 1] = side end end
      if #sides > 0 then it.sides = sides out[#out + 1] = it end
    end
  end
  return out
end

local function total(parts)
  local rows, hash = 0, "0"
  for _, p in pairs(parts) do rows, hash = rows + p.rows, rowhash.add_sums(hash, p.hash) end
  return rows, hash
end

function H:add(ev)
  local r = self.hashed[ev.table]
  assert(r, ("loadhash: %s was hashed but not expected"):format(tostring(ev.table)))
  for _, side in ipairs(SIDES) do
    if ev[side] then r[side][ev.part] = { rows = math.tointeger(ev[side].rows), hash = ev[side].hash } end
  end
  if r.equal ~= nil or count(r.replica) < r.need.replica or count(r.target) < r.need.target then return nil end
  local a_rows, a_hash = total(r.replica)
  local b_rows, b_hash = total(r.target)
  r.equal = a_rows == b_rows and a_hash == b_hash
  r.rows, r.hash = { a_rows, b_rows }, { a_hash, b_hash }
  return { table = ev.table, equal = r.equal, rows = r.rows, hash = r.hash, parts = r.need.replica }
end

function loadhash.proven(hashed)
  local equal, differ = {}, {}
  for k, r in pairs(hashed or {}) do
    if r.equal == true then equal[k] = true elseif r.equal == false then differ[#differ + 1] = k end
  end
  table.sort(differ)
  return equal, differ
end

loadhash.REPORT_COLUMNS = { "table", "parts", "rows (replica)", "rows (target)", "equal" }

function loadhash.report_rows(hashed)
  local names = {}
  for k in pairs(hashed or {}) do names[#names + 1] = k end
  table.sort(names)
  local rows = {}
  for _, k in ipairs(names) do
    local r = hashed[k]
    rows[#rows + 1] = { k, r.need and r.need.replica or "", r.rows and r.rows[1] or "", r.rows and r.rows[2] or "",
      r.equal == nil and "not judged" or (r.equal and "yes" or "NO") }
  end
  return rows
end

return loadhash
