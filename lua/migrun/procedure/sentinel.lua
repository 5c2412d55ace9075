--[[
migrun.sentinel: the rows written on the target by anyone but DMS while DMS
applies (a person fixing data by hand, an application pointed at the target
too early), so that the live verification, which follows the source's changes
(migrun.watch), also looks at what changed behind DMS's back.

On every migrated table of the target, a trigger of migrun's own
(migrun_note_write: AFTER each row, and AFTER TRUNCATE) notes the table and the
key of every row written into migrun.target_writes. It is an ordinary trigger,
so it does not fire in DMS's sessions, which run with session_replication_role
= replica (the target endpoint's AfterConnectScript, migrun.fidelity), nor in
migrun's own repair sessions (the same setting): only what others write is
noted, and what DMS applies costs nothing. It is installed once the load and
the indexes are done (full.lua's fidelity step) and removed at the cutover
before the target opens for writes (restore_target).

  local sentinel = require "migrun.sentinel"
  assert(sentinel.install(target, tables, keys))   -- keys: { ["s.t"] = {columns} | false }
  local w = assert(sentinel.read(target))          -- { upto =, tables = { ["s.t"] = { keys = {raw}, whole = bool } } }
  assert(sentinel.clear(target, w.upto))
  assert(sentinel.remove(target, tables))          -- nil: every table, and the function and table

sentinel.TABLE ("migrun.target_writes"), sentinel.TRIGGER ("migrun_note_write")
sentinel.install(db, tables, keys) -> { installed = n } | nil, err
    Idempotent; through db:write (a dry run shows every statement).
sentinel.read(db) -> { upto = id, tables = { ["s.t"] = { keys = {raw key texts}, whole = bool } } } | nil, err
    What was noted (raw keys: JSON arrays as the writer's session printed
    them; keydiff.canonical makes them comparable). whole: a TRUNCATE, or a
    table without a key. Nothing noted (or no sentinel): tables = {}.
sentinel.clear(db, upto) -> true | nil, err    the notes up to that id, looked at
sentinel.remove(db, tables) -> { removed = n } | nil, err
    The triggers of those tables (and their notes); tables nil: every one,
    then the function and the table.
]]
local pg = require "migrun.pg"
local text = require "migrun.text"

local sentinel = {}

sentinel.SCHEMA = "migrun"
sentinel.TABLE = "migrun.target_writes"
sentinel.TRIGGER = "migrun_note_write"
local QUALIFIED = pg.qualify("migrun", "target_writes")

-- The key's values from the row as jsonb (TG_ARGV: the key's columns; none:
-- a table without a key, noted by name only).
local FUNCTION = [[
create or replace function migrun.note_write() returns trigger language plpgsql as $fn$
declare
  tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
  r jsonb;
begin
  if TG_OP = 'TRUNCATE' or TG_NARGS = 0 then
    insert into migrun.target_writes (tbl, key) values (tbl, null);
    return null;
  end if;
  foreach r in array array_remove(array[case when TG_OP <> 'INSERT' then to_jsonb(OLD) end,
                                        case when TG_OP <> 'DELETE' then to_jsonb(NEW) end], null) loop
    insert into migrun.target_writes (tbl, key)
      select tbl, jsonb_agg(r -> c order by o) from unnest(TG_ARGV) with ordinality u(c, o);
  end loop;
  return null;
end $fn$]]

local function qualify(t)
  if type(t) == "string" then return pg.qualify(text.split_key(t)), t end
  return pg.qualify(t.schema, t.name), text.key(t)
end

local function exists(db)
  local res, err = db:query("select to_regclass($1) is not null as here", QUALIFIED)
  if not res then return nil, err end
  return res[1].here
end

function sentinel.install(db, tables, keys)
  assert(db and db.write, "sentinel.install: a Db expected")
  assert(type(tables) == "table" and type(keys) == "table", "sentinel.install: tables and their keys expected")
  local ok, err = db:write("create schema if not exists migrun")
  if not ok then return nil, err end
  ok, err = db:write(("create table if not exists %s (id bigserial primary key, tbl text not null, key jsonb, "
    .. "at timestamptz not null default now())"):format(QUALIFIED))
  if not ok then return nil, err end
  ok, err = db:write(FUNCTION)
  if not ok then return nil, err end
  local n = 0
  for _, t in ipairs(tables) do
    local qualified, k = qualify(t)
    local args = {}
    for i, c in ipairs(keys[k] or {}) do args[i] = "'" .. c:gsub("'", "''") .. "'" end
    local trigger = pg.quote_ident(sentinel.TRIGGER)
    for _, sql in ipairs{
      ("drop trigger if exists %s on %s"):format(trigger, qualified),
      ("create trigger %s after insert or update or delete on %s for each row execute function migrun.note_write(%s)")
        :format(trigger, qualified, table.concat(args, ", ")),
      ("drop trigger if exists %s on %s"):format(pg.quote_ident(sentinel.TRIGGER .. "_truncate"), qualified),
      ("create trigger %s after truncate on %s for each statement execute function migrun.note_write()")
        :format(pg.quote_ident(sentinel.TRIGGER .. "_truncate"), qualified),
    } do
      ok, err = db:write(sql)
      if not ok then return nil, err end
    end
    n = n + 1
  end
  return { installed = n }
end

function sentinel.read(db)
  assert(db and db.query, "sentinel.read: a Db expected")
  local here, err = exists(db)
  if here == nil then return nil, err end
  local out = { upto = 0, tables = {} }
  if not here then return out end
  local res
  res, err = db:query(("select tbl, key::text as key, max(id) as upto from %s group by tbl, key order by tbl"):format(QUALIFIED))
  if not res then return nil, err end
  for row in res:rows() do
    local t = out.tables[row.tbl] or { keys = {}, whole = false }
    out.tables[row.tbl] = t
    if row.key == pg.null then t.whole = true else t.keys[#t.keys + 1] = row.key end
    if row.upto > out.upto then out.upto = row.upto end
  end
  return out
end

function sentinel.clear(db, upto)
  assert(db and db.write, "sentinel.clear: a Db expected")
  if not upto or upto == 0 then return true end
  local ok, err = db:write(("delete from %s where id <= $1"):format(QUALIFIED), upto)
  if not ok then return nil, err end
  return true
end

function sentinel.remove(db, tables)
  assert(db and db.write, "sentinel.remove: a Db expected")
  local here, err = exists(db)
  if here == nil then return nil, err end
  local n = 0
  local list = tables
  if not list then
    local res
    res, err = db:query([[select distinct n.nspname as schema, c.relname as name
      from pg_trigger g join pg_class c on c.oid = g.tgrelid join pg_namespace n on n.oid = c.relnamespace
     where g.tgname = $1]], sentinel.TRIGGER)
    if not res then return nil, err end
    list = {}
    for row in res:rows() do list[#list + 1] = { schema = row.schema, name = row.name } end
  end
  for _, t in ipairs(list) do
    local qualified, k = qualify(t)
    for _, name in ipairs{ sentinel.TRIGGER, sentinel.TRIGGER .. "_truncate" } do
      local ok, werr = db:write(("drop trigger if exists %s on %s"):format(pg.quote_ident(name), qualified))
      if not ok then return nil, werr end
    end
    if here and tables then
      local ok, werr = db:write(("delete from %s where tbl = $1"):format(QUALIFIED), k)
      if not ok then return nil, werr end
    end
    n = n + 1
  end
  if not tables then
    for _, sql in ipairs{ "drop table if exists " .. QUALIFIED, "drop function if exists migrun.note_write()" } do
      local ok, werr = db:write(sql)
      if not ok then return nil, werr end
    end
  end
  return { removed = n }
end

return sentinel
