--[[
migrun.verify: the source and the target proven equal while the application
writes, and kept proven until the cutover at the cost of what changed since.
docs/verification.md says what each comparison proves and why.

The pieces: migrun.sentinel notes the rows others write on the target
behind DMS's back (they join the work like the source's changes);
migrun.qa hashes whole tables (by key or block ranges, both sides
at once) and narrows a difference to its keys; migrun.keydiff compares rows
by key; migrun.watch says which keys the source changed since a position
(the watch slot); a fence (cdc.wait_applied) proves the target has applied
everything the source committed before it was written.

A round, while the source is written:
  1. the position P where the watch slot stands (what was verified before it
     needs no more look);
  2. a fence: the target has applied everything the source committed before
     now, so before P;
  3. the work read on both sides: tables hashed whole (the first round, a
     table reloaded, a table too busy to follow by key) with the keys still
     to check left out, and the keys still to check row by row;
  4. the watch slot read from P up to now (U), after every read: C, the keys
     the source changed in that time.
  A row whose key is not in C was the same on the source from P to U, and
  the target had applied its last change (step 2): if the two sides differ
  there, it is a real difference, whatever else is in flight. A row whose
  key is in C may be in flight: it is the next round's work. Nothing else can
  change behind the watch slot's back, so after the round every row of every
  table is either proven equal, a real difference (named by key), or in the
  work of the next round, and the slot moves to U once that is recorded.
  Rounds go on while the work shrinks; what is left ("pending": the keys
  changed in the last second or so) is checked at the cutover.

At the cutover (writes stopped, every task past a fence) one more reading of
the watch slot gives the last changes; those keys and the pending ones are
compared once, on a source that no longer moves. The cost is what changed
since the last round, not the size of the database; a table without a key
that changed since, or one with more changed keys than the cap, is hashed
whole (the report says which and what it cost).

The state (position, pending work, differences) is kept in
state_dir/verification.json (written atomically, 0600: keys may be data).

  local verify = require "migrun.verify"
  local v = assert(verify.new{ source =, target =, tables =, groups =, prefix =, state_dir =,
    fence = function() return cdc.wait_applied(...) end, full = { jobs =, chunk_bytes =, a_conninfo =, b_conninfo = },
    say = print })
  local r = assert(v:live())        -- full.lua's catch_up, verify.lua, cutover.lua's ready
  local c = assert(v:at_cutover())  -- cutover.lua, writes stopped

verify.new(opts) -> Verification | nil, err
    opts: source, target (migrun.db Dbs), tables (catalog entries), groups
    (the plan: the slots), prefix (slots.prefix: the watch slot's name),
    state_dir, fence() -> true | nil, err, full (qa.compare's options for
    whole tables: jobs, chunk_bytes, a_conninfo, b_conninfo), say(line),
    rounds (default 5), cap (keys followed per table, default 100000),
    count_only (cutover.count_only: tables judged by their row counts),
    dry_run (nothing written: no slot, no state).
V:live({ whole = {"s.t"} }) -> report | nil, err
    Rounds until the work stops shrinking (the first verification compares
    every table whole; opts.whole adds tables, a partial restart's).
V:at_cutover({ fenced = bool }) -> report | nil, err
    The last changes and the pending work compared once; fails when the
    source changed meanwhile (writes did not stop). opts.fenced: the caller
    has just seen every task apply a fence written after writes stopped (no
    second one).
V:forget(tables) -> the named tables to be compared whole again (a reload)
V:suspend_sets(slot), V:resume_sets(): around a partial restart dropping and
    creating again a group's replication sets (see V:suspend_sets)
verify.load(state_dir) -> state | false | nil, err;  verify.reset(state_dir)
report = { differences = { {table, key (keydiff key or nil), keys = {{key, what}},
    complete, detail} }, rounds, history = { {whole, keys, changes, differences, seconds}
    per round }, compared = { whole = n, keys = n }, pending = { keys = n,
    tables = n, whole = {"s.t"} }, position = lsn text, seconds, cutover = bool }
verify.report_rows(report, tables) / verify.REPORT_COLUMNS: the report's table: every table,
    how it was compared, equal (yes / NO / pending), the difference's keys
verify.format(report) -> text: one line, then the differences
]]
local qa = require "migrun.qa"
local keydiff = require "migrun.keydiff"
local watch = require "migrun.watch"
local sentinel = require "migrun.sentinel"
local pgl = require "migrun.pglogical"
local lsn = require "migrun.lsn"
local json = require "migrun.json"
local host = require "migrun.host"
local text = require "migrun.text"
local errors = require "migrun.error"

local verify = {}

local FILE = "verification.json"

local V = {}
V.__index = V
V.__name = "migrun.verify.Verification"

local function verify_error(message, extra)
  local e = { kind = "verify", where = "verification", message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return errors.new(e)
end

function verify.load(state_dir)
  local body = host.read_file(state_dir .. "/" .. FILE)
  if not body then return false end
  local state, err = json.decode(body)
  if type(state) ~= "table" then
    return nil, verify_error(("%s/%s does not parse: %s"):format(state_dir, FILE, tostring(err)),
      { hint = "move it aside: the next verification starts afresh (every table compared whole)" })
  end
  return state
end

function verify.reset(state_dir)
  os.remove(state_dir .. "/" .. FILE)
  return true
end

local function set_of(list)
  local s = {}
  for _, x in ipairs(list or {}) do s[x] = true end
  return s
end

local function count_keys(work)
  local n, tables = 0, 0
  for _, keys in pairs(work.keys or {}) do
    if #keys > 0 then n, tables = n + #keys, tables + 1 end
  end
  local whole = {}
  for k in pairs(work.whole or {}) do whole[#whole + 1] = k end
  table.sort(whole)
  return n, tables, whole
end

function verify.new(opts)
  assert(type(opts) == "table", "verify.new: options expected")
  assert(opts.source and opts.source.query and opts.target and opts.target.query, "verify.new: source and target Dbs expected")
  assert(type(opts.tables) == "table" and type(opts.groups) == "table", "verify.new: tables and groups expected")
  assert(type(opts.fence) == "function", "verify.new: a fence function expected")
  assert(type(opts.prefix) == "string" and type(opts.state_dir) == "string", "verify.new: prefix and state_dir expected")
  local self = setmetatable({ source = opts.source, target = opts.target, groups = opts.groups,
    fence = opts.fence, full = opts.full or {}, say = opts.say or function() end, rounds = opts.rounds or 5,
    cap = opts.cap or 100000, dry_run = opts.dry_run, state_dir = opts.state_dir,
    slot = watch.slot_name(opts.prefix), sets = watch.sets(opts.groups), by_key = {}, count_only = {} }, V)
  for _, t in ipairs(opts.tables) do self.by_key[text.key(t)] = t end
  local named = set_of(opts.count_only)
  for k, t in pairs(self.by_key) do
    if named[k] or (t.partition_of and named[t.partition_of]) then self.count_only[k] = true end
  end
  local state, err = verify.load(opts.state_dir)
  if state == nil then return nil, err end
  self.state = state or nil
  return self
end

-- The table's key (keydiff.key), kept in the state: asked once per table.
function V:key(k)
  self.state.keys = self.state.keys or {}
  local cached = self.state.keys[k]
  if cached ~= nil then return cached end
  local key, err = keydiff.key(self.source, self.by_key[k] or k)
  if key == nil then return nil, err end
  self.state.keys[k] = key
  return key
end

function V:save()
  if self.dry_run then return true end
  return host.write_file(self.state_dir .. "/" .. FILE, json.encode(self.state, { indent = "  " }),
    tonumber("600", 8))
end

-- The watch slot, created with a fresh state (every table to compare whole),
-- or the state kept if its slot is still there and usable.
function V:start(extra_whole)
  local pos, err = watch.position(self.source, self.slot)
  if pos == nil then return nil, err end
  local usable = pos and pos.wal_status ~= "lost" and self.state and self.state.position
  -- a slot further on than the state says was moved by something else: what it
  -- skipped is unknown (the state is saved before the slot moves, never after)
  if usable and pos.confirmed_flush_lsn and pos.confirmed_flush_lsn > lsn(self.state.position) then
    self.say(("the watch slot %s stands at %s, past the verification's %s: something else moved it; "
      .. "verifying every table again"):format(self.slot, tostring(pos.confirmed_flush_lsn), self.state.position))
    usable = false
  end
  if not usable then
    if pos and pos.wal_status == "lost" then
      self.say(("the watch slot %s lost the WAL it needed (max_slot_wal_keep_size): verifying every table again")
        :format(self.slot))
      local ok, derr = watch.drop(self.source, self.slot)
      if not ok then return nil, derr end
    end
    local s
    s, err = watch.ensure(self.source, self.slot)
    if not s then return nil, err end
    local whole = {}
    for k in pairs(self.by_key) do whole[k] = true end
    self.state = { slot = self.slot, position = s.lsn and tostring(s.lsn) or "0/0", keys = {},
                   pending = { keys = {}, whole = whole }, differences = {}, started_at = os.date("!%Y-%m-%dT%H:%M:%SZ") }
    if s.created then self.say(("created the watch slot %s at %s"):format(self.slot, tostring(s.lsn))) end
  end
  for _, k in ipairs(extra_whole or {}) do self.state.pending.whole[k] = true end
  return true
end

-- The differences found before are looked at again: a repair closes them,
-- nothing else forgets them.
function V:recheck_differences()
  local pending = self.state.pending
  for _, d in ipairs(self.state.differences or {}) do
    if d.keys and #d.keys > 0 then
      local list = pending.keys[d.table] or {}
      local have = set_of(list)
      for _, x in ipairs(d.keys) do
        if not have[x.key] then list[#list + 1] = x.key end
      end
      pending.keys[d.table] = list
      if not d.complete then pending.whole[d.table] = true end
    else
      pending.whole[d.table] = true
    end
  end
end

function V:forget(tables)
  local ok, err = self:start(tables)
  if not ok then return nil, err end
  for _, k in ipairs(tables) do self.state.pending.keys[k] = nil end
  return self:save()
end

-- A group's replication sets dropped and created again (a partial restart):
-- pglogical's decoder fails on the drop of a set it decodes ("replication set
-- ... used by this connection was deleted"), and a recreated set has the same
-- id. Until the watch slot's position is past their creation, it decodes
-- without them; their tables are forgotten (hashed whole again) meanwhile.
function V:suspend_sets(slot)
  local ok, err = self:start()
  if not ok then return nil, err end
  local a, b = pgl.set_names(slot)
  self.state.suspended = { sets = { a, b }, upto = nil }
  return self:save()
end

function V:resume_sets()
  if not (self.state and self.state.suspended) then return true end
  local res, err = self.source:query(("select %s()::text as l"):format(
    lsn.names(self.source.conn:server_version()).current_wal_lsn))
  if not res then return nil, err end
  self.state.suspended.upto = res[1].l
  return self:save()
end

-- The sets to decode with: every group's, but the suspended ones.
function V:decoded_sets()
  local s = self.state and self.state.suspended
  if not s then return self.sets end
  local out = {}
  local skip = set_of(s.sets)
  for name in self.sets:gmatch("[^,]+") do
    if not skip[name] then out[#out + 1] = name end
  end
  return table.concat(out, ",")
end

-- The watch slot moved past the recreation of suspended sets, decoding up to
-- there without them; what it saw is kept in the pending work first, so a kill
-- loses nothing. -> the changes seen (merged into the drain) | nil, err
function V:pass_suspension(key_columns)
  local s = self.state.suspended
  if not (s and s.upto) then return {} end
  local pos, err = watch.position(self.source, self.slot)
  if not pos then return nil, err or "the watch slot is gone" end
  if pos.confirmed_flush_lsn and pos.confirmed_flush_lsn >= lsn(s.upto) then
    self.state.suspended = nil
    return {}
  end
  local reduced = self:decoded_sets()
  local seen
  seen, err = watch.changes(self.source, self.slot, reduced, key_columns, { cap = self.cap, upto = s.upto })
  if not seen then return nil, err end
  for k, t in pairs(seen.tables) do
    if t.capped or not t.keys then
      self.state.pending.whole[k] = true
    else
      local list = self.state.pending.keys[k] or {}
      for _, x in ipairs(t.keys) do list[#list + 1] = x end
      self.state.pending.keys[k] = list
    end
  end
  self.state.suspended = nil
  self.state.position = tostring(s.upto) -- saved before the slot moves there
  local ok
  ok, err = self:save()
  if not ok then return nil, err end
  if not self.dry_run then
    ok, err = watch.advance(self.source, self.slot, s.upto, reduced)
    if not ok then return nil, err end
  end
  return seen.tables
end

-- The watch slot read from its position up to now: { upto, tables = { [k] =
-- { changes, capped, keys = {canonical} } } }.
function V:drain()
  local key_columns = {}
  for k in pairs(self.by_key) do
    local key, err = self:key(k)
    if key == nil then return nil, err end
    if key then key_columns[k] = key.columns end
  end
  local before, perr = self:pass_suspension(key_columns)
  if not before then return nil, perr end
  local seen, err = watch.changes(self.source, self.slot, self:decoded_sets(), key_columns, { cap = self.cap })
  if not seen then return nil, err end
  for k, t in pairs(before) do
    local into = seen.tables[k]
    if not into then
      seen.tables[k] = t
    else
      into.changes = into.changes + t.changes
      into.capped = into.capped or t.capped
      if into.keys and t.keys then table.move(t.keys, 1, #t.keys, #into.keys + 1, into.keys) else into.keys = nil end
    end
  end
  for k, t in pairs(seen.tables) do
    if t.keys and #t.keys > 0 then
      local key = self:key(k)
      if not key then
        t.keys = nil
      else
        local canon, cerr = keydiff.canonical(self.source, key, t.keys)
        if not canon then return nil, cerr end
        t.keys = canon
      end
    end
  end
  return seen
end

-- What others wrote on the target since the last look (migrun.sentinel), into
-- the work: a row changed behind DMS's back is compared like one the source
-- changed. -> the id of the last note looked at
function V:noted(work)
  local w, err = sentinel.read(self.target)
  if not w then return nil, err end
  for k, t in pairs(w.tables) do
    if self.by_key[k] then
      local key
      key, err = self:key(k)
      if key == nil then return nil, err end
      if t.whole or not key then
        work.whole[k] = true
      elseif #t.keys > 0 then
        local canon
        canon, err = keydiff.canonical(self.source, key, t.keys)
        if not canon then return nil, err end
        local list = work.keys[k] or {}
        local have = set_of(list)
        for _, x in ipairs(canon) do if not have[x] then list[#list + 1] = x end end
        work.keys[k] = list
      end
    end
  end
  return w.upto
end

-- Read the work on both sides: tables hashed whole (with the keys still to
-- check left out) and keys compared row by row. -> { [k] = { candidates =
-- {{key, what}}, complete, equal, check } }
function V:read(work, compared)
  local found = {}
  local wholes, counted, kinds = {}, {}, {}
  for k in pairs(work.whole) do
    local t = self.by_key[k]
    -- a table the team accepts by its count (cutover.count_only) is only counted
    if t and self.count_only[k] then counted[#counted + 1], kinds[k] = t, "count"
    elseif t then wholes[#wholes + 1] = t end
  end
  local function by_name(x, y) return text.key(x) < text.key(y) end
  table.sort(wholes, by_name)
  table.sort(counted, by_name)
  local function take(r)
    for _, c in ipairs(r.checks) do
      if c.error then return nil, c.error end
      found[c.table] = { check = c, equal = c.equal, complete = c.keys_complete ~= false,
                         candidates = c.keys or {} }
    end
    return true
  end
  if #counted > 0 then
    local r, err = qa.compare(self.source, self.target, counted, {}, { mode = "quick", kinds = kinds })
    if not r then return nil, err end
    local ok, terr = take(r)
    if not ok then return nil, terr end
    for _, t in ipairs(counted) do wholes[#wholes + 1] = t end -- counted as a whole
  end
  if #wholes > #counted then
    local o = { mode = "full", exclude = work.keys, keys_limit = 1000 }
    for name, v in pairs(self.full) do o[name] = v end
    local hashed = {}
    for _, t in ipairs(wholes) do if not kinds[text.key(t)] then hashed[#hashed + 1] = t end end
    local r, err = qa.compare(self.source, self.target, hashed, {}, o)
    if not r then return nil, err end
    local ok, terr = take(r)
    if not ok then return nil, terr end
  end
  if #wholes > 0 then
    compared.whole = compared.whole + #wholes
    for _, t in ipairs(wholes) do
      local per = compared.tables[text.key(t)] or { whole = 0, keys = 0 }
      per.whole = per.whole + 1
      compared.tables[text.key(t)] = per
    end
  end
  for k, keys in pairs(work.keys) do
    if #keys > 0 and self.by_key[k] then
      local key, err = self:key(k)
      if not key then return nil, err or (k .. ": no key") end
      local diffs
      diffs, err = keydiff.compare(self.source, self.target, self.by_key[k], key, keys)
      if not diffs then return nil, err end
      local f = found[k] or { equal = true, complete = true, candidates = {} }
      for _, d in ipairs(diffs) do f.candidates[#f.candidates + 1] = d end
      f.equal = f.equal and #diffs == 0
      found[k] = f
      compared.keys = compared.keys + #keys
      local per = compared.tables[k] or { whole = 0, keys = 0 }
      per.keys = per.keys + #keys
      compared.tables[k] = per
    end
  end
  return found
end

-- cutover.count_only: the team accepts a table (without a key, whose updates
-- and deletes DMS cannot carry) when its row counts agree.
function V:counts_suffice(k, f)
  local c = f.check
  if not (self.count_only[k] and c and c.a and c.b) then return false end
  local function rows(v) return type(v) == "table" and v.rows or v end
  return rows(c.a) == rows(c.b)
end

-- What one table's reading means, given what the source changed meanwhile:
-- its real differences and the next round's work for it.
function V:judge(k, f, changed, next_work)
  local key = self.state.keys[k]
  if not key then
    -- no key: only a table that did not change while it was read says anything
    if changed then next_work.whole[k] = true return nil end
    if f and not f.equal and not self:counts_suffice(k, f) then
      return { table = k, detail = (f.check and f.check.detail or "different contents")
        .. "; DMS carries only the inserts of a table without a key: give it a primary key on the source, "
        .. "or accept it by its row count (cutover.count_only)", complete = true }
    end
    return nil
  end
  if changed and changed.capped then
    next_work.whole[k] = true -- too many keys to follow: hashed whole again
  elseif changed and changed.keys then
    next_work.keys[k] = changed.keys
  end
  if not f or f.equal then return nil end
  if changed and changed.capped then return nil end
  local moving = set_of(changed and changed.keys)
  local real = {}
  for _, d in ipairs(f.candidates) do
    if not moving[d.key] then real[#real + 1] = d end
  end
  if not f.complete then next_work.whole[k] = true end
  if #real == 0 then return nil end
  table.sort(real, function(x, y) return x.key < y.key end)
  return { table = k, key = key, keys = real, complete = f.complete,
           detail = keydiff.describe(key, real, { a = "source", b = "target", more = not f.complete }) }
end

-- One round: fence, read, drain, judge; the state saved, then the slot moved.
function V:round(work)
  local t0 = host.monotonic()
  local ok, err = self.fence()
  if not ok then return nil, err end
  local noted
  noted, err = self:noted(work)
  if not noted then return nil, err end
  local compared = { whole = 0, keys = 0, tables = {} }
  local found
  found, err = self:read(work, compared)
  if not found then return nil, err end
  local seen
  seen, err = self:drain()
  if not seen then return nil, err end
  local next_work = { keys = {}, whole = {} }
  for k in pairs(work.carried or {}) do next_work.whole[k] = true end -- not read this round
  local differences = {}
  local names = {}
  for k in pairs(found) do names[k] = true end
  for k in pairs(seen.tables) do names[k] = true end
  for k in pairs(names) do
    if self.by_key[k] then
      local d = self:judge(k, found[k], seen.tables[k], next_work)
      if d then differences[#differences + 1] = d end
    end
  end
  table.sort(differences, function(x, y) return x.table < y.table end)
  self.state.position, self.state.pending = tostring(seen.upto), next_work
  self.state.verified_at = os.date("!%Y-%m-%dT%H:%M:%SZ")
  ok, err = self:save()
  if not ok then return nil, err end
  if not self.dry_run then
    ok, err = watch.advance(self.source, self.slot, seen.upto, self:decoded_sets())
    if not ok then return nil, err end
    ok, err = sentinel.clear(self.target, noted)
    if not ok then return nil, err end
  end
  local busy = {}
  for k, t in pairs(seen.tables) do
    if self.state.keys[k] == false and t.changes > 0 then busy[k] = true end
  end
  return { differences = differences, compared = compared, changes = seen.changes, upto = seen.upto,
           busy = busy, seconds = host.monotonic() - t0 }
end

local function merge_differences(into, list)
  local by = {}
  for i, d in ipairs(into) do by[d.table] = i end
  for _, d in ipairs(list) do
    if by[d.table] then into[by[d.table]] = d else into[#into + 1] = d; by[d.table] = #into end
  end
  table.sort(into, function(x, y) return x.table < y.table end)
end

-- A table without a key that changed in the last round is not hashed whole
-- again in this run (it would change again while hashed); it stays in the
-- pending work, for the cutover or a later run.
function V:without_busy_keyless(work, busy)
  local whole = {}
  for k in pairs(work.whole) do
    if not busy[k] then whole[k] = true end
  end
  return { keys = work.keys, whole = whole, carried = busy }
end

function V:report(r)
  local n, tables, whole = count_keys(self.state.pending)
  r.pending = { keys = n, tables = tables, whole = whole }
  r.position = self.state.position
  return r
end

function V:live(opts)
  opts = opts or {}
  local t0 = host.monotonic()
  local ok, err = self:start(opts.whole)
  if not ok then return nil, err end
  self:recheck_differences()
  local r = { differences = {}, rounds = 0, compared = { whole = 0, keys = 0, tables = {} }, busy = {},
                history = {} }
  local prev
  for i = 1, self.rounds do
    local work = self.state.pending
    local n, _, whole = count_keys(work)
    if i > 1 then
      if n == 0 and #whole == 0 then break end
      -- the work no longer shrinks: it is what the writes change in a round
      if i > 2 and n >= prev.n and #whole >= prev.whole then break end
      work = self:without_busy_keyless(work, r.busy)
    end
    prev = { n = n, whole = #whole }
    local res
    res, err = self:round(work)
    if not res then return nil, err end
    r.rounds = i
    r.compared.whole, r.compared.keys = r.compared.whole + res.compared.whole, r.compared.keys + res.compared.keys
    for k, per in pairs(res.compared.tables) do
      local into = r.compared.tables[k] or { whole = 0, keys = 0 }
      into.whole, into.keys = into.whole + per.whole, into.keys + per.keys
      r.compared.tables[k] = into
    end
    merge_differences(r.differences, res.differences)
    r.busy = res.busy
    r.history[i] = { whole = res.compared.whole, keys = res.compared.keys, changes = res.changes,
                     differences = #res.differences, seconds = res.seconds }
    self.say(("verification round %d: %d table(s) hashed whole, %d key(s) compared, %d difference(s); %d change(s) "
      .. "meanwhile (%s)"):format(i, res.compared.whole, res.compared.keys, #res.differences, res.changes,
      text.duration(res.seconds)))
  end
  self.state.differences = r.differences
  ok, err = self:save()
  if not ok then return nil, err end
  r.seconds = host.monotonic() - t0
  return self:report(r)
end

function V:at_cutover(opts)
  opts = opts or {}
  local t0 = host.monotonic()
  if not self.state or not self.state.position then
    return nil, verify_error("there is no live verification to build on", {
      hint = "run playbooks/verify.lua (or full.lua to its end) while the source still writes, then the cutover" })
  end
  local pos, err = watch.position(self.source, self.slot)
  if pos == nil then return nil, err end
  if not pos or pos.wal_status == "lost" then
    return nil, verify_error(("the watch slot %s is %s: what changed since the verification is unknown"):format(
      self.slot, pos and "lost" or "gone"), { hint = "run playbooks/verify.lua again (it compares every table whole)" })
  end
  self:recheck_differences()
  local ok = true
  if not opts.fenced then ok, err = self.fence() end
  if not ok then return nil, err end
  local seen
  seen, err = self:drain()
  if not seen then return nil, err end
  local work = { keys = {}, whole = {} }
  for k, keys in pairs(self.state.pending.keys or {}) do work.keys[k] = table.move(keys, 1, #keys, 1, {}) end
  for k in pairs(self.state.pending.whole or {}) do work.whole[k] = true end
  for k, t in pairs(seen.tables) do
    if self.by_key[k] then
      local key = self:key(k)
      if t.capped or not key then
        work.whole[k] = true
      elseif t.keys then
        local have = set_of(work.keys[k])
        work.keys[k] = work.keys[k] or {}
        for _, x in ipairs(t.keys) do if not have[x] then table.insert(work.keys[k], x) end end
      end
    end
  end
  local noted
  noted, err = self:noted(work)
  if not noted then return nil, err end
  for k in pairs(work.whole) do work.keys[k] = nil end -- hashed whole: nothing left out
  local compared = { whole = 0, keys = 0, tables = {} }
  local found
  found, err = self:read(work, compared)
  if not found then return nil, err end
  -- the source must not have moved while it was read
  local after
  after, err = watch.changes(self.source, self.slot, self:decoded_sets(), {}, { cap = 0 })
  if not after then return nil, err end
  if after.changes > seen.changes then
    return nil, verify_error(("the source changed while it was compared (%d change(s) after the last one read)")
      :format(after.changes - seen.changes), { hint = "writes have not stopped: check cutover.stop_writes" })
  end
  local differences = {}
  for k, f in pairs(found) do
    if not f.equal and not self:counts_suffice(k, f) then
      local key = self.state.keys[k]
      differences[#differences + 1] = { table = k, key = key or nil, keys = key and f.candidates or nil,
        complete = f.complete, detail = key and keydiff.describe(key, f.candidates,
          { a = "source", b = "target", more = not f.complete }) or (f.check and f.check.detail) }
    end
  end
  table.sort(differences, function(x, y) return x.table < y.table end)
  self.state.position, self.state.pending = tostring(seen.upto), { keys = {}, whole = {} }
  self.state.differences, self.state.cutover_at = differences, os.date("!%Y-%m-%dT%H:%M:%SZ")
  ok, err = self:save()
  if not ok then return nil, err end
  if not self.dry_run then
    ok, err = sentinel.clear(self.target, noted)
    if not ok then return nil, err end
  end
  local whole = {}
  for k in pairs(work.whole) do whole[#whole + 1] = k end
  table.sort(whole)
  return { differences = differences, compared = compared, whole = whole, changes = seen.changes, cutover = true,
           rounds = 1, seconds = host.monotonic() - t0, position = self.state.position,
           pending = { keys = 0, tables = 0, whole = {} } }
end

-- Words ------------------------------------------------------------------------

verify.REPORT_COLUMNS = { "table", "compared", "equal", "detail" }

local function how_compared(per)
  local parts = {}
  if per.whole > 0 then parts[#parts + 1] = "hashed whole" end
  if per.keys > 0 then parts[#parts + 1] = ("%d key(s)"):format(per.keys) end
  return table.concat(parts, ", ")
end

-- The report's table: every table of the verification, how it was compared
-- (hashed whole, keys, or unchanged since the last verification), whether it
-- is equal, and the detail of a difference (the keys).
function verify.report_rows(r, tables)
  local diff, pending = {}, {}
  for _, d in ipairs(r.differences) do diff[d.table] = d end
  for _, k in ipairs(r.pending and r.pending.whole or {}) do pending[k] = "hashed whole at the cutover" end
  local names, seen = {}, {}
  for _, t in ipairs(tables or {}) do
    local k = text.key(t)
    if not seen[k] then names[#names + 1], seen[k] = k, true end
  end
  for k in pairs((r.compared or {}).tables or {}) do if not seen[k] then names[#names + 1], seen[k] = k, true end end
  for k in pairs(diff) do if not seen[k] then names[#names + 1], seen[k] = k, true end end
  table.sort(names)
  local rows = {}
  for _, k in ipairs(names) do
    local per = ((r.compared or {}).tables or {})[k]
    local how = per and how_compared(per) or "unchanged since verified"
    local d = diff[k]
    rows[#rows + 1] = { k, how, d and "NO" or (pending[k] and "pending" or "yes"),
      d and d.detail or pending[k] or "" }
  end
  return rows
end

function verify.format(r)
  local head = ("%s: %d table(s) hashed whole, %d key(s) compared in %d round(s), %d difference(s)"):format(
    r.cutover and "Verification at cutover" or "Live verification", r.compared.whole, r.compared.keys,
    r.rounds or 1, #r.differences)
  if not r.cutover then
    head = head .. ("; %d key(s) in %d table(s) changing as they were read%s: compared at cutover"):format(
      r.pending.keys, r.pending.tables,
      #r.pending.whole > 0 and (", and " .. #r.pending.whole .. " table(s) to hash whole") or "")
  end
  local lines = { head }
  for _, d in ipairs(r.differences) do lines[#lines + 1] = ("  %s: %s"):format(d.table, d.detail or "") end
  return table.concat(lines, "\n")
end

return verify
