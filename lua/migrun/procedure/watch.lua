--[[
migrun.watch: which rows the source changed since a point, from a logical
decoding slot of migrun's own on the primary (the watch slot), so that a
verification done while the application writes stays true until the cutover
at the cost of what changed since, not of what exists (migrun.verify).

The watch slot is a pglogical slot like the DMS tasks' (the same output plugin
and JSON protocol DMS's slots use, already on the source), decoding every
group's replication sets: every change DMS will carry is seen there too. It is
named after the groups' slots ("<slots.prefix>watch"), so the guard counts the
WAL it holds and preflight does not take it for a foreign slot. Nothing reads
it but migrun: it only moves when migrun.verify has recorded what it saw
(peek, record, then advance), so a kill between the two sees the same changes
again, never fewer.

What it gives per table: the distinct keys (the primary key's values, the
JSON array of them) of the rows inserted, updated (old and new key) or
deleted, and how many changes; a table without a key, or with more distinct
keys than the cap, only its count. Tables without a primary key are in the
insert-only sets: their updates and deletes are not decoded, exactly as DMS
does not carry them.

  local watch = require "migrun.watch"
  local slot = watch.slot_name(cfg.slots.prefix)
  assert(watch.ensure(source, slot))
  local seen = assert(watch.changes(source, slot, watch.sets(groups), { ["public.orders"] = { "id" } }))
  ... record seen.upto and the keys ...
  assert(watch.advance(source, slot, seen.upto, watch.sets(groups)))

watch.slot_name(prefix) -> "<prefix>watch"
watch.sets(groups) -> "s1,is1,s2,is2,...": every group's two replication sets
watch.ensure(source, slot) -> { slot, lsn (where it stands), created } | nil, err
watch.position(source, slot) -> { confirmed_flush_lsn, restart_lsn, retained_bytes, wal_status } | false | nil, err
    false: there is no such slot. wal_status ("reserved", "extended",
    "unreserved", "lost") from PostgreSQL 13, else nil.
watch.changes(source, slot, sets, key_columns, { cap = 100000, upto = lsn }) -> {
      upto = lsn, changes = n,
      tables = { ["s.t"] = { changes = n, keys = {raw key texts} | nil, capped = bool } } } | nil, err
    Every change committed from the slot's position up to `upto` (default:
    the primary's WAL position now), decoded on the primary and reduced there
    to distinct keys: only keys travel. key_columns: { ["s.t"] = {columns} }
    for the tables with a key (keydiff.key's columns); raw key texts are JSON
    arrays of the values as the decoder printed them (keydiff.canonical makes
    them comparable). migrun's fence rows are left out.
watch.advance(source, slot, upto, sets) -> true | nil, err
    The slot's position moved to upto (its changes are consumed). PostgreSQL
    11 and later: pg_replication_slot_advance; before: decoded and discarded.
watch.drop(source, slot) -> "dropped" | "absent" | "would drop" | nil, err
]]
local pgl = require "migrun.pglogical"
local lsn = require "migrun.lsn"
local json = require "migrun.json"
local fence = require "migrun.fence"
local text = require "migrun.text"
local pgversion = require "migrun.pgversion"

local watch = {}

local PROTO = pgl.PROTO_OPTIONS

local function opt(v)
  if v == nil or rawequal(v, require("migrun.pg").null) then return nil end
  return v
end

function watch.slot_name(prefix)
  assert(type(prefix) == "string", "watch.slot_name: the slots' prefix expected")
  return prefix .. "watch"
end

function watch.sets(groups)
  assert(type(groups) == "table", "watch.sets: the groups expected")
  local names = {}
  for _, g in ipairs(groups) do
    local a, b = pgl.set_names(g.slot)
    names[#names + 1], names[#names + 2] = a, b
  end
  return table.concat(names, ",")
end

function watch.ensure(source, slot)
  assert(source and source.query, "watch.ensure: the source (a migrun.db Db) expected")
  return pgl.create_slot(source, slot)
end

function watch.position(source, slot)
  assert(source and source.query, "watch.position: the source (a migrun.db Db) expected")
  local v = source.conn:server_version()
  local n = lsn.names(v)
  local res, err = source:query(("select confirmed_flush_lsn, restart_lsn, %s(%s(), restart_lsn)::bigint as retained,"
    .. " %s as wal_status from pg_replication_slots where slot_name = $1"):format(n.wal_lsn_diff, n.current_wal_lsn,
    pgversion.pick(v, "wal_status", "wal_status", "null::text")), slot)
  if not res then return nil, err end
  local r = res[1]
  if not r then return false end
  return { confirmed_flush_lsn = opt(r.confirmed_flush_lsn), restart_lsn = opt(r.restart_lsn),
           retained_bytes = opt(r.retained) and math.tointeger(tonumber(r.retained)) or nil,
           wal_status = opt(r.wal_status) }
end

-- The changes up to upto, reduced on the primary to (table, key, count)
-- rows, at most cap + 1 keys per table (with the table's distinct count).
local CHANGES_SQL = [[
  with ch as (
    select data::jsonb as d
      from pg_logical_slot_peek_changes($1, $2::pg_lsn, NULL, %s, 'pglogical.replication_set_names', $3)
  ), tup as (
    select d->'relation'->>0 as s, d->'relation'->>1 as t, v.tup
      from ch cross join lateral (values (d->'newtuple'), (d->'oldtuple')) v(tup)
     where d->>'action' in ('I', 'U', 'D') and v.tup is not null
  ), keyed as (
    select s, t, (select jsonb_agg(tup.tup -> c.col order by c.o)
                    from jsonb_array_elements_text(($4::jsonb) -> (s || '.' || t)) with ordinality c(col, o))::text as k
      from tup
  ), g as (
    select s, t, k, count(*) as n from keyed group by s, t, k
  ), r as (
    select s, t, k, n, count(*) over (partition by s, t) as keys,
           sum(n) over (partition by s, t) as changes,
           row_number() over (partition by s, t order by k) as rn
      from g
  )
  select s, t, k, keys, changes from r where rn <= $5::bigint + 1]]

function watch.changes(source, slot, sets, key_columns, opts)
  assert(source and source.query, "watch.changes: the source (a migrun.db Db) expected")
  assert(type(slot) == "string" and type(sets) == "string", "watch.changes: a slot and its sets expected")
  opts = opts or {}
  local cap = opts.cap or 100000
  local upto = opts.upto
  if not upto then
    local res, err = source:query(("select %s() as l"):format(lsn.names(source.conn:server_version()).current_wal_lsn))
    if not res then return nil, err end
    upto = res[1].l
  end
  local res, err = source:query(CHANGES_SQL:format(PROTO), slot, tostring(upto), sets,
    json.encode(key_columns or {}), cap)
  if not res then return nil, err end
  local out = { upto = upto, changes = 0, tables = {} }
  for row in res:rows() do
    local k = text.key(row.s, row.t)
    if not fence.is_fence(row.s, row.t) then
      local t = out.tables[k]
      if not t then
        local changes = math.tointeger(tonumber(row.changes))
        local keys = math.tointeger(tonumber(row.keys))
        local keyed = opt(row.k) ~= nil
        t = { changes = changes, capped = keyed and keys > cap, keys = keyed and keys <= cap and {} or nil }
        out.tables[k] = t
        out.changes = out.changes + changes
      end
      if t.keys and opt(row.k) then t.keys[#t.keys + 1] = row.k end
    end
  end
  return out
end

function watch.advance(source, slot, upto, sets)
  assert(source and source.query, "watch.advance: the source (a migrun.db Db) expected")
  local sql, params = "select 1 from pg_replication_slot_advance($1, $2::pg_lsn)", { slot, tostring(upto) }
  if not pgversion.has(source.conn:server_version(), "slot_advance") then
    -- decoded and thrown away: what get_changes consumes is what advance skips
    assert(type(sets) == "string", "watch.advance: the slot's sets expected (before PostgreSQL 11)")
    sql = ("select count(*) from pg_logical_slot_get_changes($1, $2::pg_lsn, NULL, %s,"
      .. " 'pglogical.replication_set_names', $3)"):format(PROTO)
    params[3] = sets
  end
  local pos, err = watch.position(source, slot)
  if not pos then return nil, err or ("the watch slot %s is gone"):format(slot) end
  if pos.confirmed_flush_lsn and pos.confirmed_flush_lsn >= lsn(tostring(upto)) then return true end
  local res
  res, err = source:write(sql, table.unpack(params))
  if not res then return nil, err end
  return true
end

function watch.drop(source, slot)
  assert(source and source.query, "watch.drop: the source (a migrun.db Db) expected")
  return pgl.drop_slot(source, slot)
end

return watch
