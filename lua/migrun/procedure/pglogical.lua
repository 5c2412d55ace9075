--[[
migrun.pglogical: what migrun sets up on the source primary for DMS CDC
(runbook Phase I, steps 1 to 4 and 7): the pglogical provider node, one
logical replication slot per table group with the pglogical output plugin,
two replication sets per slot and the tables in them; the verification of the
captured LSN against each slot; and the destructive helpers a restart uses.
Every function is idempotent (what exists already is checked and reused) and
writes only through Db:write, so a dry run prints each statement and changes
nothing. Needs pglogical preloaded and installed, and, on servers that have
the setting, 'pglogical' in output_plugin_libraries.

  local pgl = require "migrun.pglogical"
  assert(pgl.ensure_node(db, "migrun_provider", conninfo))
  local s = assert(pgl.create_slot(db, "dms_slot_01"))       -- { slot=, lsn=, created= }
  assert(pgl.create_sets(db, "dms_slot_01"))
  local r = assert(pgl.add_tables(db, "dms_slot_01", { "public.t1", {schema="public", name="t2"} }))
  assert(pgl.verify_lsn(db, "dms_slot_01", replay_lsn, { max_changes = 1000 }))

  pgl.node_dsn(conninfo) -> the dsn stored in the node: host, hostaddr, port,
      dbname, user (and sslmode) only. The node's dsn is what pglogical
      *subscribers* would use to reach this provider; DMS never reads it (it
      connects with its own endpoint credentials), so no password is needed and
      none is stored: pglogical keeps the dsn in plain text in
      pglogical.node_interface, readable by anyone who can read that table.
  pgl.ensure_extension(db) -> { created = bool } | nil, err   CREATE EXTENSION pglogical if missing
  pgl.ensure_node(db, node_name, dsn) -> { node =, created = bool } | nil, err
      A local node of another name is an error (a database has one local node;
      it may belong to other replication: never replaced here).
  pgl.create_slot(db, slot) -> { slot =, lsn =, created = bool } | nil, err
      lsn: the slot's confirmed_flush_lsn (existing slot) or the creation LSN.
      An existing slot with another plugin or in another database is an error.
  pgl.set_names(slot) -> "<slot>", "i<slot>"
  pgl.create_sets(db, slot) -> { {name=, created=}, {name=, created=} } | nil, err
      "<slot>" replicates update and delete, "i<slot>" insert and truncate (as
      the runbook); an existing set with other flags is an error.
  pgl.add_tables(db, slot, tables, { say = fn }) -> { added = {...}, insert_only = {...},
      already = {...} } | nil, err
      tables: "schema.name" strings or { schema =, name = }. Every table goes in
      both sets, except tables without a primary key: only the insert set (say()
      warns that their updates and deletes will not replicate). Lists hold
      "schema.name" strings.
  pgl.slots(db, { prefix = "dms_slot_" }) -> { { name, plugin, slot_type, active,
      active_pid, restart_lsn, confirmed_flush_lsn, retained_bytes, database, owned } }
      retained_bytes: WAL the slot holds back (current WAL LSN - restart_lsn);
      owned: migrun's (name starts with prefix and plugin is pglogical).
  pgl.verify_lsn(db, slot, lsn, { max_changes = 1000 }) -> { confirmed_flush_lsn,
      restart_lsn, ok = true, peeked = n } | nil, err     (reads only; see below)
  pgl.drop_slot(db, slot) -> "dropped" | "absent" | "would drop" (dry run) | nil, err
      An active slot (a DMS task reading it) is refused.
  pgl.drop_sets(db, slot) -> number of sets dropped (or that a dry run would drop) | nil, err
  pgl.drop_node(db, node_name) -> "dropped" | "absent" | "would drop" | nil, err
      Only the local node of that name; pglogical drops its sets with it.
  pgl.sql(server_version_num) -> version-specific SQL texts (unit-tested for 9.6)
  pgl.PROTO_OPTIONS: the pglogical JSON protocol's options, as SQL arguments of
      pg_logical_slot_peek_changes (the runbook's)
]]
local lsn = require "migrun.lsn"
local pgversion = require "migrun.pgversion"
local errors = require "migrun.error"
local pg = require "migrun.pg"
local text = require "migrun.text"

local pgl = {}

local PROTO_OPTIONS = "'min_proto_version', '1', 'max_proto_version', '1', "
  .. "'startup_params_format', '1', 'proto_format', 'json'"
-- the decoding options of the JSON protocol, for whoever else peeks a pglogical slot (migrun.watch)
pgl.PROTO_OPTIONS = PROTO_OPTIONS

local function failure(db, message, fields)
  local e = { kind = "pglogical", where = db:name(), message = message }
  for k, v in pairs(fields or {}) do e[k] = v end
  return errors.new(e)
end

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

local function check_db(db, fn)
  assert(type(db) == "table" and db.query and db.write, "pglogical." .. fn .. ": a migrun.db Db expected")
end

-- Slot names: what PostgreSQL accepts ([a-z0-9_], at most 63 bytes); the
-- insert set adds an "i", so the slot name leaves room for it.
local function check_slot(slot, fn)
  assert(type(slot) == "string" and slot:match("^[a-z0-9_]+$") and #slot <= 62,
    "pglogical." .. fn .. ": slot name of lower-case letters, digits and _ (at most 62) expected, got "
    .. tostring(slot))
end

function pgl.set_names(slot)
  return slot, "i" .. slot
end

function pgl.sql(version)
  local n = lsn.names(version)
  return {
    create_slot = pgversion.pick(version, "wal_names",
      "select slot_name, lsn from pg_create_logical_replication_slot($1, 'pglogical')",
      "select slot_name, xlog_position as lsn from pg_create_logical_replication_slot($1, 'pglogical')"),
    slots = ("select slot_name, plugin, slot_type, database, active, active_pid, restart_lsn,"
      .. " confirmed_flush_lsn, %s(%s(), restart_lsn)::bigint as retained_bytes"
      .. " from pg_replication_slots order by slot_name"):format(n.wal_lsn_diff, n.current_wal_lsn),
    -- Bounded: decoding stops at upto_lsn, or after the transaction that
    -- reaches upto_nchanges rows; only a count comes back.
    peek = ("select count(*) as n from pg_logical_slot_peek_changes($1, $2::pg_lsn, $3::int, %s,"
      .. " 'pglogical.replication_set_names', $4)"):format(PROTO_OPTIONS),
    peek_lsn_column = n.peek_lsn_column,
  }
end

-- { schema, name } from "schema.name" or a table.
local function table_ref(t)
  local schema, name = text.split_key(t)
  assert(schema, ("pglogical.add_tables: table \"schema.name\" or { schema =, name = } expected, got %s"):format(
    tostring(t)))
  return schema, name
end

local function extension_installed(db)
  local res, err = db:query("select extversion from pg_extension where extname = 'pglogical'")
  if not res then return nil, err end
  if #res == 0 then
    return nil, failure(db, "the pglogical extension is not installed in database " .. (db.conn:info().dbname or "?"),
      { hint = "CREATE EXTENSION pglogical (with pglogical in shared_preload_libraries)" })
  end
  return true
end

-- The extension in this database (pglogical must be preloaded): created
-- when missing, through db:write (a dry run prints it).
function pgl.ensure_extension(db)
  check_db(db, "ensure_extension")
  local res, err = db:query("select extversion from pg_extension where extname = 'pglogical'")
  if not res then return nil, err end
  if #res > 0 then return { created = false, version = res[1].extversion } end
  res, err = db:write("create extension if not exists pglogical")
  if not res then return nil, err end
  return { created = true }
end

---------------------------------------------------------------------------
-- Node
---------------------------------------------------------------------------

local DSN_KEYS = { "host", "hostaddr", "port", "dbname", "user", "sslmode" }

local function dsn_value(v)
  return "'" .. v:gsub("\\", "\\\\"):gsub("'", "\\'") .. "'"
end

function pgl.node_dsn(conninfo)
  local parsed, err = pg.conninfo_parse(conninfo)
  if not parsed then return nil, err end
  local parts = {}
  for _, k in ipairs(DSN_KEYS) do
    if parsed[k] then parts[#parts + 1] = k .. "=" .. dsn_value(parsed[k]) end
  end
  return table.concat(parts, " ")
end

local function local_node(db)
  local res, err = db:query("select n.node_name from pglogical.local_node l"
    .. " join pglogical.node n on n.node_id = l.node_id")
  if not res then return nil, err end
  return res[1] and res[1].node_name or false
end

function pgl.ensure_node(db, node_name, dsn)
  check_db(db, "ensure_node")
  assert(type(node_name) == "string" and node_name ~= "", "pglogical.ensure_node: node name expected")
  assert(type(dsn) == "string", "pglogical.ensure_node: dsn expected")
  local ok, err = extension_installed(db)
  if not ok then
    if db.dry_run then return { node = node_name, created = "would create" } end -- its extension too
    return nil, err
  end
  local existing
  existing, err = local_node(db)
  if existing == nil then return nil, err end
  if existing == node_name then return { node = node_name, created = false } end
  if existing then
    return nil, failure(db, ("this database already has the pglogical node %q, not %q"):format(existing, node_name),
      { hint = "another replication may depend on it: set slots.node to " .. existing
        .. " if it is migrun's, else drop it only once you are sure nothing uses it" })
  end
  local stored
  stored, err = pgl.node_dsn(dsn)
  if not stored then return nil, err end
  local res
  res, err = db:write("select pglogical.create_node(node_name := $1, dsn := $2)", node_name, stored)
  if not res then return nil, err end
  return { node = node_name, created = true }
end

function pgl.drop_node(db, node_name)
  check_db(db, "drop_node")
  local res, err = db:query("select 1 from pg_extension where extname = 'pglogical'")
  if not res then return nil, err end
  if #res == 0 then return "absent" end
  local existing
  existing, err = local_node(db)
  if existing == nil then return nil, err end
  if existing ~= node_name then return "absent" end
  res, err = db:write("select pglogical.drop_node(node_name := $1, ifexists := true)", node_name)
  if not res then return nil, err end
  return db.dry_run and "would drop" or "dropped"
end

---------------------------------------------------------------------------
-- Slots
---------------------------------------------------------------------------

local function slot_row(db, slot)
  local res, err = db:query("select slot_name, plugin, slot_type, database, active, active_pid,"
    .. " restart_lsn, confirmed_flush_lsn, database = current_database() as here"
    .. " from pg_replication_slots where slot_name = $1", slot)
  if not res then return nil, err end
  return res[1] or false
end

function pgl.create_slot(db, slot)
  check_db(db, "create_slot")
  check_slot(slot, "create_slot")
  local row, err = slot_row(db, slot)
  if row == nil then return nil, err end
  if row then
    if opt(row.plugin) ~= "pglogical" then
      return nil, failure(db, ("replication slot %s exists with plugin %s, not pglogical"):format(
        slot, tostring(opt(row.plugin) or row.slot_type)),
        { hint = "it is not migrun's: choose another slots.prefix, or drop it once you are sure nothing uses it" })
    end
    if not row.here then
      return nil, failure(db, ("replication slot %s exists in database %s, not in this one"):format(
        slot, tostring(opt(row.database))), { hint = "choose another slots.prefix" })
    end
    return { slot = slot, lsn = opt(row.confirmed_flush_lsn), created = false }
  end
  local res
  res, err = db:write(pgl.sql(db.conn:server_version()).create_slot, slot)
  if not res then
    if tostring(err.message or ""):find("may not be used as an output plugin", 1, true) then
      err.hint = "add pglogical to output_plugin_libraries on the source (e.g. 'pgoutput, test_decoding, pglogical')"
    end
    return nil, err
  end
  return { slot = slot, lsn = res[1] and res[1].lsn or nil, created = not db.dry_run }
end

function pgl.drop_slot(db, slot)
  check_db(db, "drop_slot")
  check_slot(slot, "drop_slot")
  local row, err = slot_row(db, slot)
  if row == nil then return nil, err end
  if not row then return "absent" end
  if row.active then
    return nil, failure(db, ("replication slot %s is active (pid %s)"):format(slot, tostring(opt(row.active_pid))),
      { hint = "stop the DMS task that reads it first" })
  end
  local res
  res, err = db:write("select pg_drop_replication_slot($1)", slot)
  if not res then return nil, err end
  return db.dry_run and "would drop" or "dropped"
end

function pgl.slots(db, opts)
  check_db(db, "slots")
  opts = opts or {}
  local prefix = opts.prefix or "dms_slot_"
  local res, err = db:query(pgl.sql(db.conn:server_version()).slots)
  if not res then return nil, err end
  local list = {}
  for row in res:rows() do
    local plugin = opt(row.plugin)
    local retained = opt(row.retained_bytes)
    list[#list + 1] = {
      name = row.slot_name, plugin = plugin, slot_type = row.slot_type, active = row.active,
      active_pid = opt(row.active_pid), restart_lsn = opt(row.restart_lsn),
      confirmed_flush_lsn = opt(row.confirmed_flush_lsn), database = opt(row.database),
      retained_bytes = retained and math.tointeger(tonumber(retained)) or nil,
      owned = row.slot_name:sub(1, #prefix) == prefix and plugin == "pglogical",
    }
  end
  return list
end

---------------------------------------------------------------------------
-- Replication sets
---------------------------------------------------------------------------

-- name -> insert, update, delete, truncate
local function set_flags(slot)
  local upd, ins = pgl.set_names(slot)
  return {
    { name = upd, flags = { false, true, true, false } },
    { name = ins, flags = { true, false, false, true } },
  }
end

local function set_row(db, name)
  local res, err = db:query("select set_id, replicate_insert, replicate_update, replicate_delete,"
    .. " replicate_truncate from pglogical.replication_set where set_name = $1", name)
  if not res then return nil, err end
  return res[1] or false
end

function pgl.create_sets(db, slot)
  check_db(db, "create_sets")
  check_slot(slot, "create_sets")
  local ok, err = extension_installed(db)
  if not ok then return nil, err end
  local out = {}
  for _, s in ipairs(set_flags(slot)) do
    local row
    row, err = set_row(db, s.name)
    if row == nil then return nil, err end
    if row then
      local have = { row.replicate_insert, row.replicate_update, row.replicate_delete, row.replicate_truncate }
      for i = 1, 4 do
        if have[i] ~= s.flags[i] then
          return nil, failure(db, ("replication set %s exists with other actions than migrun's"):format(s.name),
            { hint = "it is not migrun's: choose another slots.prefix, or drop the set" })
        end
      end
      out[#out + 1] = { name = s.name, created = false }
    else
      local res
      res, err = db:write("select pglogical.create_replication_set(set_name := $1, replicate_insert := $2,"
        .. " replicate_update := $3, replicate_delete := $4, replicate_truncate := $5)",
        s.name, table.unpack(s.flags))
      if not res then return nil, err end
      out[#out + 1] = { name = s.name, created = not db.dry_run }
    end
  end
  return out
end

function pgl.drop_sets(db, slot)
  check_db(db, "drop_sets")
  check_slot(slot, "drop_sets")
  local res, err = db:query("select 1 from pg_extension where extname = 'pglogical'")
  if not res then return nil, err end
  if #res == 0 then return 0 end
  local dropped = 0
  for _, s in ipairs(set_flags(slot)) do
    local row
    row, err = set_row(db, s.name)
    if row == nil then return nil, err end
    if row then
      res, err = db:write("select pglogical.drop_replication_set(set_name := $1)", s.name)
      if not res then return nil, err end
      dropped = dropped + 1
    end
  end
  return dropped
end

function pgl.add_tables(db, slot, tables, opts)
  check_db(db, "add_tables")
  check_slot(slot, "add_tables")
  assert(type(tables) == "table", "pglogical.add_tables: list of tables expected")
  opts = opts or {}
  local say = opts.say or function() end
  local upd_set, ins_set = pgl.set_names(slot)
  local out = { added = {}, insert_only = {}, already = {} }
  for _, t in ipairs(tables) do
    local schema, name = table_ref(t)
    local qualified = pg.qualify(schema, name)
    local label = text.key(schema, name)
    local res, err = db:query("select c.oid::int8 as oid,"
      .. " exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary) as has_pk,"
      .. " array_to_string(array(select rs.set_name::text from pglogical.replication_set_table rst"
      .. "   join pglogical.replication_set rs on rs.set_id = rst.set_id"
      .. "   where rst.set_reloid = c.oid and rs.set_name in ($2, $3) order by 1), ',') as sets"
      .. " from pg_class c where c.oid = to_regclass($1)", qualified, upd_set, ins_set)
    if not res then return nil, err end
    local row = res[1]
    if not row then
      return nil, failure(db, ("table %s does not exist"):format(label))
    end
    local member = {}
    for s in tostring(opt(row.sets) or ""):gmatch("[^,]+") do member[s] = true end
    local wanted = row.has_pk and { upd_set, ins_set } or { ins_set }
    if not row.has_pk then
      out.insert_only[#out.insert_only + 1] = label
      say(("warning: %s has no primary key: it goes only in the insert set %s;"
        .. " its UPDATEs and DELETEs will not replicate"):format(label, ins_set))
    end
    local added = false
    for _, set in ipairs(wanted) do
      if not member[set] then
        res, err = db:write("select pglogical.replication_set_add_table(set_name := $1,"
          .. " relation := $2::regclass, synchronize_data := false)", set, qualified)
        if not res then return nil, err end
        added = true
      end
    end
    local list = added and out.added or out.already
    list[#list + 1] = label
  end
  return out
end

---------------------------------------------------------------------------
-- Verifying the captured LSN (runbook step 7)
---------------------------------------------------------------------------

--[[ The runbook peeks the whole slot, `pg_logical_slot_peek_changes(slot, null,
null, ...) where lsn = '<captured>'`: the filter applies only after every
change the slot holds has been decoded and materialised on the primary, so on a
slot that has held WAL for days it decodes all of it, in one backend, into a
tuplestore that spills to disk — load and disk use on the production primary
for a check. Here the peek stops at the captured LSN (upto_lsn) and after
max_changes rows (upto_nchanges; checked at transaction ends, so one huge
transaction is still decoded whole), and only a count travels back. What it
proves is what the runbook's check proves: the slot decodes with both of its
replication sets, from a position at or before the captured LSN, and
confirmed_flush_lsn <= captured LSN says no change after it has been consumed. ]]
function pgl.verify_lsn(db, slot, at, opts)
  check_db(db, "verify_lsn")
  check_slot(slot, "verify_lsn")
  opts = opts or {}
  local max_changes = opts.max_changes or 1000
  assert(math.type(max_changes) == "integer" and max_changes > 0, "pglogical.verify_lsn: max_changes > 0 expected")
  if type(at) == "string" then
    local v, err = lsn.parse(at)
    assert(v, "pglogical.verify_lsn: " .. tostring(err))
    at = v
  end
  assert(lsn.is(at), "pglogical.verify_lsn: an LSN expected")
  local row, err = slot_row(db, slot)
  if row == nil then return nil, err end
  if not row then
    return nil, failure(db, ("replication slot %s does not exist"):format(slot),
      { hint = "create the slots again (a restart from the slots step)" })
  end
  if opt(row.plugin) ~= "pglogical" or not row.here then
    return nil, failure(db, ("replication slot %s is not a pglogical slot of this database"):format(slot))
  end
  local flushed = opt(row.confirmed_flush_lsn)
  if not flushed or flushed > at then
    return nil, failure(db, ("slot %s has confirmed_flush_lsn %s, after the captured LSN %s"):format(
      slot, tostring(flushed), tostring(at)),
      { detail = "changes between the two are gone from the slot: CDC from this LSN would miss them",
        hint = "the slot was created after the replica was paused, or it was consumed: drop and recreate "
          .. "the slot, then pause the replica and capture the LSN again" })
  end
  if row.active then
    return nil, failure(db, ("replication slot %s is in use (pid %s): it cannot be peeked"):format(
      slot, tostring(opt(row.active_pid))), { hint = "verify before the DMS tasks start" })
  end
  local upd_set, ins_set = pgl.set_names(slot)
  local res
  res, err = db:query(pgl.sql(db.conn:server_version()).peek, slot, at, max_changes, upd_set .. "," .. ins_set)
  if not res then
    return nil, failure(db, ("slot %s does not decode up to %s: %s"):format(slot, tostring(at), tostring(err.message)),
      { code = err.code, detail = err.detail,
        hint = "check that the pglogical node and the sets " .. upd_set .. ", " .. ins_set .. " exist" })
  end
  return { ok = true, confirmed_flush_lsn = flushed, restart_lsn = opt(row.restart_lsn), peeked = res[1].n }
end

--[[ pgl.check_slots(db, slots) -> true | nil, why
     On a resumed run: every slot recorded ({ [slot] = lsn }) still exists as a
     pglogical slot. A vanished slot means the changes since the captured LSN
     are gone for that group: only a partial restart can bring it back. ]]
function pgl.check_slots(db, slots)
  local list, err = pgl.slots(db, { prefix = "" })
  if not list then return nil, tostring(err) end
  local have = {}
  for _, s in ipairs(list) do have[s.name] = s end
  local names = {}
  for name in pairs(slots or {}) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local s = have[name]
    if not s then
      return nil, ("replication slot %s no longer exists on %s (run playbooks/partial_restart.lua %s)")
        :format(name, db:name(), name)
    end
    if s.plugin ~= "pglogical" then
      return nil, ("replication slot %s now uses plugin %s, not pglogical"):format(name, tostring(s.plugin))
    end
  end
  return true
end

-- The newest of the LSNs recorded when the slots were created (or nil).
function pgl.newest_slot_lsn(slots)
  local newest
  for _, text in pairs(slots or {}) do
    local at = lsn.parse(tostring(text))
    if at and (newest == nil or at > newest) then newest = at end
  end
  return newest
end

return pgl
