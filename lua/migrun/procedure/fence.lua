--[[
migrun.fence: proof that the DMS tasks have applied everything the source
committed up to a moment, instead of waiting for the slots' confirmed_flush_lsn
to reach the source's WAL position.

Why not the LSN: a slot only moves when its consumer confirms a decoded
transaction of its own database. WAL written after the last such transaction
(an autovacuum ANALYZE in another database, a checkpoint) holds nothing for the
slots, so on an idle source, which is exactly the cutover with writes
stopped, confirmed_flush_lsn may never reach pg_current_wal_lsn().

The fence is a row: migrun.fence (slot, seq, written_at), a small table of
migrun's own on the source and the target. Every slot's two replication sets
carry it with a row filter `slot = '<slot>'` (pglogical evaluates row filters
on the provider, so each slot decodes its own rows only), and every DMS task's
table mappings select it, so each task applies its slot's fence rows into the
target's migrun.fence like any table's changes. A task applies a slot's
changes in commit order: once the target holds the fence row a task was given,
that task has applied everything its slot decoded before that row's commit.
Writing a fence row and seeing it on the target takes a few poll intervals,
writes or no writes.

The source may be read-only at the cutover: default_transaction_read_only is
a default, and the fence is written in an explicit BEGIN READ WRITE.

  local fence = require "migrun.fence"
  assert(fence.create(source)); assert(fence.create(target))  -- full.lua's slots step
  assert(fence.add_slot(source, "dms_slot_01"))                 -- per slot, both sets
  local w = assert(fence.wait(source, target, { "dms_slot_01" }, { timeout =, poll =, sleep = }))

fence.SCHEMA, fence.NAME, fence.KEY ("migrun.fence")
fence.is_fence(t | "s.t" | schema, name) -> bool   (to leave it out of QA and statistics)
fence.table_entry() -> { schema, name, has_pk = true } for a task's table mappings
fence.create(db) -> "created" | "exists" | nil, err      schema and table; idempotent
fence.add_slot(source, slot) -> { added = {sets}, already = {sets} } | nil, err
fence.check(source, target, slots) -> true | nil, err
    The fence can work: the table on both sides, in both sets of every slot.
fence.write(source, slots) -> { seq, lsn, written_at } | nil, err
    One transaction: a row (slot, seq) per slot, and the slots' older rows
    deleted (the deletes replicate too: both tables stay a row per slot).
    seq grows: the clock in microseconds, or past the largest seq there.
    In a dry run the statements are shown and nothing is written. A source
    whose connection is lost in the middle (a restart; the Db connects
    again: migrun.db) is written to once more: a second fence row is
    harmless (the older one is deleted), a fence never written is not.
fence.seen(target, slots) -> { [slot] = largest seq on the target (0: none) } | nil, err
fence.wait(source, target, slots, opts) -> { seq, lsn, written_at, seconds,
    slots = { {slot, seen = true, seconds} } } | nil, err
    check, write, then poll the target until every slot shows seq or more.
    opts: timeout (600), poll (1), sleep(seconds), on_progress(done, total),
    hint (added to the timeout error). A slot that no longer exists on the
    source is an error at once. In a dry run: the writes shown, { dry_run = true }.
fence.drop(db) -> "dropped" | "absent" | nil, err
    The table (out of any replication set first), and the schema when
    nothing else is in it (full_restart.lua).
]]
local pg = require "migrun.pg"
local db = require "migrun.db"
local errors = require "migrun.error"
local host = require "migrun.host"
local text = require "migrun.text"

local fence = {}

fence.SCHEMA = "migrun"
fence.NAME = "fence"
fence.KEY = text.key(fence.SCHEMA, fence.NAME)
local QUALIFIED = pg.qualify(fence.SCHEMA, fence.NAME)

local function fence_error(message, extra)
  local e = { kind = "fence", where = "fence " .. fence.KEY, message = message }
  for k, v in pairs(extra or {}) do e[k] = v end
  return errors.new(e)
end

function fence.is_fence(schema, name)
  if type(schema) == "table" then return text.key(schema) == fence.KEY end
  if name == nil then return schema == fence.KEY end
  return schema == fence.SCHEMA and name == fence.NAME
end

function fence.table_entry()
  return { schema = fence.SCHEMA, name = fence.NAME, has_pk = true, has_separate_unique = false }
end

local function check_slots(slots, fn)
  assert(type(slots) == "table" and #slots > 0, "fence." .. fn .. ": a list of slot names expected")
  for _, s in ipairs(slots) do
    -- slot names are PostgreSQL's ([a-z0-9_]): they can be joined with "," and put in a row filter
    assert(type(s) == "string" and s:match("^[a-z0-9_]+$"), "fence." .. fn .. ": bad slot name " .. tostring(s))
  end
  return table.concat(slots, ",")
end

local function exists(db)
  local res, err = db:query("select to_regclass($1) is not null as present", QUALIFIED)
  if not res then return nil, err end
  return res[1].present
end

function fence.create(db)
  assert(db and db.query and db.write, "fence.create: a migrun.db Db expected")
  local present, err = exists(db)
  if present == nil then return nil, err end
  if present then return "exists" end
  local ok
  ok, err = db:write("create schema if not exists " .. pg.quote_ident(fence.SCHEMA))
  if not ok then return nil, err end
  -- no serial: cutover.sync_sequences would then look for its sequence on the target
  ok, err = db:write(("create table if not exists %s (slot text not null, seq bigint not null, "
    .. "written_at timestamptz not null default now(), primary key (slot, seq))"):format(QUALIFIED))
  if not ok then return nil, err end
  return "created"
end

-- The sets of a slot that carry the fence.
local function member_sets(source, slot)
  local res, err = source:query([[
    select rs.set_name::text as set_name
      from pglogical.replication_set_table rst
      join pglogical.replication_set rs on rs.set_id = rst.set_id
     where rst.set_reloid = to_regclass($1) and rs.set_name in ($2, $3)]], QUALIFIED, slot, "i" .. slot)
  if not res then return nil, err end
  local have = {}
  for r in res:rows() do have[r.set_name] = true end
  return have
end

function fence.add_slot(source, slot)
  assert(source and source.query and source.write, "fence.add_slot: a migrun.db Db expected")
  check_slots({ slot }, "add_slot")
  local have, err = member_sets(source, slot)
  if not have then return nil, err end
  local out = { added = {}, already = {} }
  for _, set in ipairs{ slot, "i" .. slot } do
    if have[set] then
      out.already[#out.already + 1] = set
    else
      -- the row filter keeps each slot to its own rows (pglogical filters on the provider)
      local ok, werr = source:write("select pglogical.replication_set_add_table(set_name := $1, "
        .. "relation := $2::regclass, synchronize_data := false, row_filter := $3)",
        set, QUALIFIED, ("slot = '%s'"):format(slot)) -- [a-z0-9_]: nothing to escape
      if not ok then return nil, werr end
      out.added[#out.added + 1] = set
    end
  end
  return out
end

local SETUP_HINT = "full.lua's slots step sets it up (partial_restart.lua's slot step for one group); "
  .. "a task created before the fence existed does not carry it: replace it with partial_restart.lua"

function fence.check(source, target, slots)
  check_slots(slots, "check")
  for _, side in ipairs{ { source, "source" }, { target, "target" } } do
    local present, err = exists(side[1])
    if present == nil then return nil, err end
    if not present then
      return nil, fence_error(("the fence table %s does not exist on the %s"):format(fence.KEY, side[2]),
        { hint = SETUP_HINT })
    end
  end
  for _, slot in ipairs(slots) do
    local have, err = member_sets(source, slot)
    if not have then return nil, err end
    if not (have[slot] and have["i" .. slot]) then
      return nil, fence_error(("the fence table %s is not in the replication sets of %s"):format(fence.KEY, slot),
        { hint = SETUP_HINT })
    end
  end
  return true
end

local function write_once(source, list)
  local present, err = exists(source)
  if present == nil then return nil, err end
  -- a dry run has no table to look at: the clock alone
  local res
  res, err = source:query(("select greatest((extract(epoch from clock_timestamp()) * 1000000)::bigint, %s)"
    .. " as seq, now()::text as at"):format(present and ("(select coalesce(max(seq), 0) + 1 from %s)"):format(QUALIFIED)
    or "0"))
  if not res then return nil, err end
  local seq, at = res[1].seq, res[1].at
  local steps = {
    { "begin read write" },
    { ("insert into %s (slot, seq) select s, $2::bigint from unnest(string_to_array($1, ',')) s"):format(QUALIFIED),
      list, seq },
    { ("delete from %s where slot = any (string_to_array($1, ',')) and seq < $2::bigint"):format(QUALIFIED), list, seq },
    { "commit" },
  }
  for _, s in ipairs(steps) do
    local ok, werr = source:write(table.unpack(s))
    if not ok then
      source:query("rollback")
      return nil, werr
    end
  end
  local out = { seq = seq, written_at = at, dry_run = source.dry_run or nil }
  if not source.dry_run then
    res, err = source:query("select pg_current_wal_lsn() as l")
    if not res then return nil, err end
    out.lsn = res[1].l
  end
  return out
end

function fence.write(source, slots)
  assert(source and source.query and source.write, "fence.write: a migrun.db Db expected")
  local list = check_slots(slots, "write")
  local w, err = write_once(source, list)
  if not w and db.is_lost(err) and source.reopen then w, err = write_once(source, list) end
  return w, err
end

function fence.seen(target, slots)
  local list = check_slots(slots, "seen")
  local res, err = target:query(("select slot, max(seq) as seq from %s where slot = any (string_to_array($1, ','))"
    .. " group by slot"):format(QUALIFIED), list)
  if not res then return nil, err end
  local out = {}
  for _, s in ipairs(slots) do out[s] = 0 end
  for r in res:rows() do out[r.slot] = r.seq end
  return out
end

local function missing_slots(source, slots)
  local res, err = source:query("select slot_name from pg_replication_slots")
  if not res then return nil, err end
  local have = {}
  for r in res:rows() do have[r.slot_name] = true end
  for _, s in ipairs(slots) do
    if not have[s] then return s end
  end
  return false
end

function fence.wait(source, target, slots, opts)
  assert(source and source.query, "fence.wait: a source Db expected")
  assert(target and target.query, "fence.wait: a target Db expected")
  check_slots(slots, "wait")
  opts = opts or {}
  local gone, err = missing_slots(source, slots)
  if gone == nil then return nil, err end
  if gone then return nil, fence_error(("replication slot %s no longer exists on the source"):format(gone)) end
  local ok
  ok, err = fence.check(source, target, slots)
  if not ok and not source.dry_run then return nil, err end
  local w
  w, err = fence.write(source, slots)
  if not w then return nil, err end
  if source.dry_run then return { dry_run = true, seq = w.seq, slots = {} } end
  local started = host.monotonic()
  local timeout = opts.timeout or 600
  local rows, when = {}, {}
  while true do
    local seen
    seen, err = fence.seen(target, slots)
    if not seen then return nil, err end
    local done, behind = 0, {}
    for _, s in ipairs(slots) do
      if seen[s] >= w.seq then
        done = done + 1
        when[s] = when[s] or (host.monotonic() - started)
      else
        behind[#behind + 1] = s
      end
    end
    if opts.on_progress then opts.on_progress(done, #slots) end
    if done == #slots then
      for i, s in ipairs(slots) do rows[i] = { slot = s, seen = true, seconds = when[s] } end
      return { seq = w.seq, lsn = w.lsn, written_at = w.written_at, seconds = host.monotonic() - started,
               slots = rows }
    end
    if host.monotonic() - started > timeout then
      return nil, fence_error(("the target does not show the fence written at %s (seq %s) for %s after %s")
        :format(w.written_at, tostring(w.seq), table.concat(behind, ", "), text.duration(timeout)),
        { hint = opts.hint or "are their DMS tasks running? see their status and the apply exceptions",
          behind = behind })
    end
    gone, err = missing_slots(source, slots)
    if gone == nil then return nil, err end
    if gone then return nil, fence_error(("replication slot %s no longer exists on the source"):format(gone)) end
    assert(opts.sleep, "fence.wait: sleep expected")(opts.poll or 1)
  end
end

function fence.drop(db)
  assert(db and db.query and db.write, "fence.drop: a migrun.db Db expected")
  local present, err = exists(db)
  if present == nil then return nil, err end
  if present then
    -- pglogical refuses to drop a table that a replication set still carries
    local res
    res, err = db:query([[select rs.set_name::text as set_name
        from pg_extension e, pglogical.replication_set_table rst
        join pglogical.replication_set rs on rs.set_id = rst.set_id
       where e.extname = 'pglogical' and rst.set_reloid = to_regclass($1) order by 1]], QUALIFIED)
    if not res and err.sqlstate ~= "42P01" and err.sqlstate ~= "3F000" then return nil, err end
    for r in (res and res:rows() or function() end) do
      local ok, werr = db:write("select pglogical.replication_set_remove_table(set_name := $1, relation := $2::regclass)",
        r.set_name, QUALIFIED)
      if not ok then return nil, werr end
    end
    local ok, werr = db:write("drop table " .. QUALIFIED)
    if not ok then return nil, werr end
  end
  -- the schema is migrun's only while nothing else lives in it: without CASCADE
  -- PostgreSQL refuses (2BP01) to drop a schema that holds anything else
  local ok, werr = db:write("drop schema if exists " .. pg.quote_ident(fence.SCHEMA))
  if not ok and werr.sqlstate ~= "2BP01" then return nil, werr end
  return present and "dropped" or "absent"
end

return fence
