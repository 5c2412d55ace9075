--[[
migrun.fidelity: the DMS boundary (docs/dms-boundary.md). What AWS DMS CDC into
PostgreSQL breaks, degrades or skips in a schema, found table by table and
column by column on the source, and what migrun does about each: the target
changes DMS needs while it applies (undone at cutover), the DMS settings and
mapping rules, and the errors where nothing can be done safely.

  local fidelity = require "migrun.fidelity"
  local plan = assert(fidelity.inspect(source_db, { schemas =, exclude = }))
  for _, f in ipairs(plan.findings) do print(f.severity, f.table, f.column, f.message, f.action) end
  local checks = assert(fidelity.check_target(target_db, plan))   -- the target role's privileges
  local a = assert(fidelity.adapt(target_db, plan, { say = print }))  -- before DMS starts
  ... CDC ...
  assert(fidelity.restore(target_db, a.changes, { say = print }))   -- at cutover, after the sequences

fidelity.inspect(db, opts) -> plan | nil, err
    opts.tables (a catalog.tables list) or opts.schemas / opts.exclude (then
    catalog.tables is read here). Reads only. plan = {
      findings = { { feature, severity = "error" | "warning" | "handled" | "note",
                     table = "s.t" | nil, column = name | nil, message, action } },
      errors = n, warnings = n, handled = n, notes = n,
      tables = { ["s.t"] = { schema, name, remove_columns = {names},
                 identity_always = {names}, always_triggers = { {name, enabled} },
                 force_rls = bool } }   (only the tables that need something)
      session_replication_role = true: DMS's target sessions must fire neither
          the schema's triggers, foreign keys and rules nor migrun's own
          sentinel (migrun.sentinel notes what others write on the target),
      unbounded_numeric = bool, owners = {role names}, extensions = {names} }
fidelity.check_target(db, plan) -> { { check, ok, message, hint } } | nil, err
    What the run will need of the role migrun (and DMS) uses on the target,
    without superuser: membership of the roles that own the objects (or
    CREATEROLE to create them), CREATE on the database and on schema public,
    SET on session_replication_role (tried in a transaction rolled back),
    the extensions. Reads only.
fidelity.adapt(db, plan, opts) -> { changes = { change }, written = n } | nil, err
    The target as DMS needs it while it applies, through db:write (a dry run
    prints each statement): identity columns GENERATED ALWAYS made BY DEFAULT,
    ENABLE ALWAYS/REPLICA triggers disabled (session_replication_role =
    replica does not stop them), FORCE ROW LEVEL SECURITY lifted. Compares
    with the target's current state, so it runs again safely. change = {
    kind, table = "s.t", object, from, to, sql, undo } (JSON-safe, for the
    journal; schema and name too). opts.say(line).
fidelity.restore(db, changes, opts) -> { restored = n, already = n } | nil, err
    Each change undone, in reverse order, where the target still has it.
fidelity.dms(plan) -> { remove_columns = { ["s.t"] = {names} }, after_connect_script =,
    map_unbounded_numeric = bool, capture_ddls = false }   (JSON-safe)
fidelity.endpoint_overrides(kind, overrides, dms) -> overrides with the
    fidelity settings ("source" | "target") for cdc.ensure_endpoints.
fidelity.task_groups(groups, dms) -> the groups, each table carrying
    remove_columns, for builders.table_mappings.
fidelity.report_rows(plan) -> { {feature, table, column, result, action} }
fidelity.undo_lines(changes) / fidelity.redo_lines(changes) -> { "SQL;" }
    (the cutover's checklist and its way back)
]]
local pg = require "migrun.pg"
local text = require "migrun.text"
local catalog = require "migrun.catalog"
local pgversion = require "migrun.pgversion"

local fidelity = {}

fidelity.SESSION_REPLICATION_ROLE = "SET session_replication_role = replica"
-- The DMS user guide's "Using DMS to migrate data from PostgreSQL to
-- PostgreSQL" lists these as "does not migrate": DMS carries them as strings
-- (its STRING/CLOB types), which only a pre-created table turns back into them.
local NOT_CARRIED = { inet = "STRING(50)", macaddr = "STRING(18)", tsvector = "CLOB", tsquery = "CLOB",
  line = "STRING(255)", lseg = "STRING(255)", box = "STRING(255)", path = "CLOB", circle = "STRING(255)" }
local NOT_CARRIED_KIND = { e = "enum: STRING(64)", c = "composite: NCLOB", r = "range: STRING(255)",
  m = "multirange: STRING(255)" }
-- DMS transformation rules cannot name such a column (user guide, Transformation rules, Limitations).
local NO_TRANSFORM = "[#\\/%-]"

local function is_null(v) return v == nil or v == pg.null end

-- An array column (docs/dms-boundary.md, "arrays"). DMS types an ARRAY as an
-- NCLOB: it carries the text PostgreSQL prints for it, which the column
-- migrun restored reads back, whatever the elements, dimensions and bounds.
-- What can go wrong is what goes wrong with LOBs, and a table without a key.
local function array_finding(ins, key, t, r, where)
  local what = ("%s is an array (%s)"):format(where, r.type)
  if r.in_pk then
    ins:find("array", "warning", key, r.column, what .. " in the primary key",
      "DMS treats an ARRAY as a LOB, and its premigration assessment flags a primary key of a LOB type: DMS finds "
      .. "rows by their key and looks LOBs up by it. Make an ordinary column the key on the source, or exclude "
      .. "the table and copy it at cutover")
  elseif not t.has_pk then
    ins:find("array", "warning", key, r.column, what .. " in a table without a primary key",
      "DMS requires a primary key on a table with an ARRAY column (it suspends such a table in its full load and "
      .. "its premigration assessment flags it); what its CDC does with the arrays of the inserts it carries is "
      .. "not documented. Add a primary key on the source, or exclude the table and copy it at cutover")
  else
    ins:find("array", "handled", key, r.column, what,
      "DMS carries an ARRAY as an NCLOB, its text, which the target's column reads back whole ('{}', NULL "
      .. "elements, several dimensions, lower bounds). It is a LOB: in limited LOB mode a value over LobMaxSize "
      .. "(two bytes a character) would be cut and the target refuse the cut array (the change lost to "
      .. "awsdms_apply_exceptions); migrun sets LobMaxSize above the largest value it measures and checks for "
      .. "cut LOBs after catch-up and before cutover")
  end
end

local function version_of(db)
  return pgversion.of(db)
end

local function label(schema, name, column)
  local s = pg.qualify(schema, name)
  if column then s = s .. "." .. pg.quote_ident(column) end
  return s
end

---------------------------------------------------------------------------
-- Inspection of the source
---------------------------------------------------------------------------

local function rows(res)
  local out = {}
  for r in res:rows() do out[#out + 1] = r end
  return out
end

-- One inspection: the plan it fills, the tables wanted ("s.t" -> catalog
-- table), the owners met. Each finder below reads what its feature needs and
-- records what it finds through it.
local Inspection = {}
Inspection.__index = Inspection

local SEVERITY_COUNT = { error = "errors", warning = "warnings", handled = "handled", note = "notes" }

-- The plan's entry of a table that needs something done.
function Inspection:entry(key, t)
  local e = self.plan.tables[key]
  if not e then
    e = { schema = t.schema, name = t.name, remove_columns = {}, identity_always = {}, always_triggers = {} }
    self.plan.tables[key] = e
  end
  return e
end

function Inspection:find(feature, severity, key, column, message, action)
  local plan = self.plan
  plan.findings[#plan.findings + 1] = { feature = feature, severity = severity, table = key, column = column,
    message = message, action = action }
  local count = SEVERITY_COUNT[severity]
  plan[count] = plan[count] + 1
end

-- Rows of a query of the inspection, or nil, err.
function Inspection:rows(sql)
  local res, err = self.db:query(sql)
  if not res then return nil, err end
  return rows(res)
end

-- Tables: persistence, replica identity, row-level security, owner; the
-- partitioned parents (and tables not migrated) kept for find_partitions.
local function table_finding(ins, key, t, r)
  ins.owners[r.owner] = true
  if r.persistence == "u" then
    ins:find("unlogged table", "error", key, nil, label(r.schema, r.name) .. " is UNLOGGED",
      "it is not in the WAL: neither the maintenance replica (which cannot even read it) nor DMS CDC "
      .. "sees its rows. ALTER TABLE ... SET LOGGED on the source, or list it in exclude_tables")
  end
  if r.identity == "f" then
    if t.has_pk then
      ins:find("replica identity full", "error", key, nil, label(r.schema, r.name) .. " has REPLICA IDENTITY FULL",
        "DMS does not support FULL with pglogical, and pglogical refuses the table in a set that replicates "
        .. "updates: ALTER TABLE ... REPLICA IDENTITY DEFAULT on the source (its primary key identifies rows)")
    end
  end
  if r.rls and not r.bypass and not (r.owns and not r.force_rls) then
    ins:find("row-level security", "error", key, nil, ("%s has row-level security (%d polic%s) and the role %s "
      .. "that reads the source is subject to it"):format(label(r.schema, r.name), r.policies,
        r.policies == 1 and "y" or "ies", r.me),
      "the full load and the QA would miss the rows its policies hide: read the source as a superuser, "
      .. "a role with BYPASSRLS, or the table's owner (without FORCE ROW LEVEL SECURITY)")
  elseif r.rls and r.force_rls then
    ins:entry(key, t).force_rls = true
    ins:find("row-level security", "handled", key, nil, label(r.schema, r.name)
      .. " has FORCE ROW LEVEL SECURITY: its policies apply to its owner too",
      "on the target, NO FORCE ROW LEVEL SECURITY while DMS applies (its policies would hide rows from "
      .. "DMS's updates and deletes and from the QA), FORCE again at cutover")
  end
end

local function find_tables(ins)
  local list, err = ins:rows([[
    select n.nspname as schema, c.relname as name, c.relpersistence::text as persistence,
           c.relreplident::text as identity, c.relrowsecurity as rls, c.relforcerowsecurity as force_rls,
           pg_get_userbyid(c.relowner) as owner,
           (select count(*) from pg_policy p where p.polrelid = c.oid)::int as policies,
           r.rolsuper or r.rolbypassrls as bypass,
           pg_has_role(current_user, c.relowner, 'USAGE') as owns,
           current_user as me
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
      join pg_roles r on r.rolname = current_user
     where c.relkind in ('r', 'p') and ]] .. catalog.not_system_sql("n.nspname"))
  if not list then return nil, err end
  for _, r in ipairs(list) do
    local key = text.key(r.schema, r.name)
    local t = ins.wanted[key]
    if t then
      table_finding(ins, key, t, r)
    elseif r.persistence ~= "u" then
      ins.parents[key] = r -- a partitioned parent or a table not migrated
    end
  end
  return true
end

local function find_partitions(ins)
  for key in pairs(ins.parents) do
    local leaves = {}
    for _, t in ipairs(ins.list) do
      if t.partition_of == key then leaves[#leaves + 1] = t.name end
    end
    if #leaves > 0 then
      table.sort(leaves)
      local schema, name = ins.parents[key].schema, ins.parents[key].name
      ins:find("partitioned table", "handled", key, nil, ("%s is partitioned: %d partition(s) (%s)"):format(
        label(schema, name), #leaves, table.concat(leaves, ", ")),
        "each partition is loaded, replicated and compared by its own name (DMS: select the child tables, never "
        .. "the parent, which would duplicate rows); a partition added on the source during CDC is not carried: "
        .. "create it on the target and restart its group")
    end
  end
  return true
end

-- A stored generated column or an identity column GENERATED ALWAYS.
local function generated_finding(ins, key, t, r, where)
  if r.generated == "s" then
    if r.column:find(NO_TRANSFORM) then
      ins:find("generated column", "error", key, r.column, where .. " is a stored generated column",
        "DMS would write it and PostgreSQL refuses that (428C9), and DMS cannot leave it out: transformation "
        .. "rules do not work on a column whose name has #, \\, / or -. Rename the column, or exclude the table")
    elseif r.in_pk then
      ins:find("generated column", "error", key, r.column, where .. " is a stored generated column in the primary key",
        "DMS must write the key to find rows and PostgreSQL refuses writing a generated column (428C9): "
        .. "exclude the table, or make the key an ordinary column")
    else
      local e = ins:entry(key, t)
      e.remove_columns[#e.remove_columns + 1] = r.column
      ins:find("generated column", "handled", key, r.column, where .. " is a stored generated column (" .. r.type .. ")",
        "a remove-column transformation rule keeps DMS from writing it (PostgreSQL refuses it: 428C9); "
        .. "the target computes it from the other columns DMS writes")
    end
  elseif r.identity == "a" then
    local e = ins:entry(key, t)
    e.identity_always[#e.identity_always + 1] = r.column
    ins:find("identity column", "handled", key, r.column, where .. " is GENERATED ALWAYS AS IDENTITY",
      "on the target, GENERATED BY DEFAULT while DMS applies (it writes the source's values, which ALWAYS "
      .. "refuses: 428C9); its sequence is set ahead of the source and ALWAYS restored at cutover")
  end
end

-- A column's type: large objects, unbounded numeric, arrays, types DMS does not carry.
local function type_finding(ins, key, t, r, where)
  if r.base == "oid" or r.base == "lo" then
    ins:find("large object", "error", key, r.column, where .. " is of type " .. r.type
      .. " (a large object reference)",
      "DMS does not migrate the OID LOB type and the large objects themselves are neither in the schema "
      .. "dump nor in the tables: store the data in bytea, or exclude the table")
  elseif r.base == "numeric" and r.typmod < 0 then
    ins.plan.unbounded_numeric = true
    ins:find("unbounded numeric", "handled", key, r.column, where .. " is numeric without precision",
      "DMS carries it as NUMERIC(28,6) (0.611111104488373 becomes 0.611111): MapUnboundedNumericAsString "
      .. "on the source and the target endpoints carries the digits as text (up to 1,000 characters)")
  elseif r.category == "A" then
    array_finding(ins, key, t, r, where)
  elseif NOT_CARRIED_KIND[r.kind] or NOT_CARRIED[r.base] then
    ins:find("type DMS does not carry", "warning", key, r.column, ("%s is %s"):format(where, r.type),
      ("DMS's PostgreSQL-to-PostgreSQL table says this type does not migrate; it sends the value as %s "
      .. "to the table migrun restored, which reads it back; a longer value would be cut. The verification "
      .. "compares row hashes: rehearse with real data"):format(NOT_CARRIED_KIND[r.kind] or NOT_CARRIED[r.base]))
  end
end

-- Columns: generated, identity, types.
local function find_columns(ins)
  local generated = pgversion.pick(ins.version, "attgenerated", "a.attgenerated::text", "''")
  local identity = pgversion.pick(ins.version, "attidentity", "a.attidentity::text", "''")
  local list, err = ins:rows(([[
    select n.nspname as schema, c.relname as name, a.attname as column, format_type(a.atttypid, a.atttypmod) as type,
           %s as generated, %s as identity, t.typtype::text as kind, bt.typname as base,
           bt.typcategory::text as category,
           case when t.typtype = 'd' then t.typtypmod else a.atttypmod end as typmod,
           coalesce(a.attnum = any (i.indkey), false) as in_pk
      from pg_attribute a
      join pg_class c on c.oid = a.attrelid and c.relkind = 'r'
      join pg_namespace n on n.oid = c.relnamespace
      join pg_type t on t.oid = a.atttypid
      join pg_type bt on bt.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
      left join pg_index i on i.indrelid = c.oid and i.indisprimary
     where a.attnum > 0 and not a.attisdropped
       and %s
     order by n.nspname, c.relname, a.attnum]]):format(generated, identity, catalog.not_system_sql("n.nspname")))
  if not list then return nil, err end
  for _, r in ipairs(list) do
    local key = text.key(r.schema, r.name)
    local t = ins.wanted[key]
    if t then
      local where = label(r.schema, r.name, r.column)
      generated_finding(ins, key, t, r, where)
      if not r.generated:match("s") then type_finding(ins, key, t, r, where) end
    end
  end
  return true
end

local function find_no_primary_key(ins)
  for key, t in pairs(ins.wanted) do
    if not t.has_pk then
      ins:find("no primary key", "warning", key, nil, label(t.schema, t.name) .. " has no primary key",
        "only its inserts are carried (pglogical puts it in the insert-only set; DMS ignores updates and deletes "
        .. "without a key): add a primary key on the source, or accept it and list it in cutover.count_only")
    end
  end
  return true
end

local function find_triggers(ins)
  local list, err = ins:rows([[
    select n.nspname as schema, c.relname as name, tg.tgname as trigger, tg.tgenabled::text as enabled
      from pg_trigger tg join pg_class c on c.oid = tg.tgrelid join pg_namespace n on n.oid = c.relnamespace
     where not tg.tgisinternal order by 1, 2, 3]])
  if not list then return nil, err end
  for _, r in ipairs(list) do
    local key = text.key(r.schema, r.name)
    local t = ins.wanted[key]
    if t and (r.enabled == "A" or r.enabled == "R") then
      local e = ins:entry(key, t)
      e.always_triggers[#e.always_triggers + 1] = { name = r.trigger, enabled = r.enabled }
      ins:find("trigger", "handled", key, nil, ("trigger %s on %s is ENABLE %s"):format(pg.quote_ident(r.trigger),
        label(r.schema, r.name), r.enabled == "A" and "ALWAYS" or "REPLICA"),
        "it fires even in DMS's replica sessions, doing on the target again what the source's rows already "
        .. "carry: disabled on the target while DMS applies, enabled as on the source at cutover")
      ins.plan.session_replication_role = true
    elseif t and r.enabled == "O" then
      ins.plan.session_replication_role = true
      ins:find("trigger", "handled", key, nil, ("trigger %s on %s"):format(pg.quote_ident(r.trigger),
        label(r.schema, r.name)),
        "DMS's target sessions run SET session_replication_role = replica (the target endpoint's "
        .. "AfterConnectScript): it does not fire there, the rows it writes on the source arrive by CDC")
    end
  end
  return true
end

local function find_foreign_keys(ins)
  local list, err = ins:rows([[
    select n.nspname as schema, c.relname as name, con.conname as name_of,
           fn.nspname as ref_schema, f.relname as ref_name
      from pg_constraint con join pg_class c on c.oid = con.conrelid join pg_namespace n on n.oid = c.relnamespace
      join pg_class f on f.oid = con.confrelid join pg_namespace fn on fn.oid = f.relnamespace
     where con.contype = 'f' order by 1, 2, 3]])
  if not list then return nil, err end
  for _, r in ipairs(list) do
    local key = text.key(r.schema, r.name)
    if ins.wanted[key] then
      ins.plan.session_replication_role = true
      ins:find("foreign key", "handled", key, nil, ("foreign key %s of %s references %s"):format(
        pg.quote_ident(r.name_of), label(r.schema, r.name), label(r.ref_schema, r.ref_name)),
        "not checked in DMS's replica sessions: its tasks apply each slot's tables in their own order, a "
        .. "child row can arrive before its parent; the verification compares every table")
    end
  end
  return true
end

local function find_rules(ins)
  local list, err = ins:rows([[
    select n.nspname as schema, c.relname as name, r.rulename as rule
      from pg_rewrite r join pg_class c on c.oid = r.ev_class join pg_namespace n on n.oid = c.relnamespace
     where r.rulename <> '_RETURN' order by 1, 2, 3]])
  if not list then return nil, err end
  for _, r in ipairs(list) do
    local key = text.key(r.schema, r.name)
    if ins.wanted[key] then
      ins.plan.session_replication_role = true
      ins:find("rule", "handled", key, nil, ("rule %s on %s"):format(pg.quote_ident(r.rule), label(r.schema, r.name)),
        "does not fire in DMS's replica sessions")
    end
  end
  return true
end

-- The database as a whole: large objects.
local function find_large_objects(ins)
  local list, err = ins:rows("select count(*)::bigint as n from pg_largeobject_metadata")
  if not list then return nil, err end
  if list[1].n > 0 then
    ins:find("large object", "warning", nil, nil, ("the database holds %d large object(s)"):format(list[1].n),
      "large objects are not migrated (not in the tables, the schema dump or DMS): if a migrated table refers "
      .. "to them, move the data to bytea first")
  end
  return true
end

-- Who owns what pg_dump will give an owner on the target: the schemas and
-- everything in them.
local function find_owners(ins)
  local plan, schema_list = ins.plan, {}
  for _, t in pairs(ins.wanted) do
    if not plan.schemas[t.schema] then
      plan.schemas[t.schema] = true
      schema_list[#schema_list + 1] = ins.db.conn:escape_literal(t.schema)
    end
  end
  if #schema_list > 0 then
    local list, err = ins:rows(([[
      select distinct pg_get_userbyid(o.owner) as owner from (
        select n.nspowner as owner, n.nspname as schema from pg_namespace n
        union all select c.relowner, n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace
        union all select t.typowner, n.nspname from pg_type t join pg_namespace n on n.oid = t.typnamespace
        union all select p.proowner, n.nspname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
      ) o where o.schema in (%s)]]):format(table.concat(schema_list, ", ")))
    if not list then return nil, err end
    for _, r in ipairs(list) do
      if not r.owner:match("^pg_") then ins.owners[r.owner] = true end
    end
  end
  return true
end

local function find_extensions(ins)
  local list, err = ins:rows("select extname from pg_extension where extname not in ('plpgsql', 'pglogical') order by 1")
  if not list then return nil, err end
  for _, r in ipairs(list) do ins.plan.extensions[#ins.plan.extensions + 1] = r.extname end
  return true
end

-- What DMS never does in CDC, whatever the schema (notes: nothing to fix now).
local function find_cdc_limits(ins)
  if next(ins.wanted) then
    ins:find("truncate", "note", nil, nil, "TRUNCATE is not carried",
      "DMS does not process TRUNCATE: a table truncated on the source during CDC keeps its rows on the target "
      .. "(the verification stops the cutover; a partial restart of its group repairs it)")
    ins:find("DDL", "note", nil, nil, "schema changes are not carried",
      "the schema is restored once; DMS is told not to capture DDL (CaptureDdls false, no event trigger on the "
      .. "source): freeze DDL on the migrated schemas until the cutover, or apply it to the target too")
  end
  return true
end

-- In this order (the findings are sorted at the end; ties keep it).
local FINDERS = { find_tables, find_partitions, find_columns, find_no_primary_key, find_triggers,
  find_foreign_keys, find_rules, find_large_objects, find_owners, find_extensions, find_cdc_limits }

local SEVERITY_ORDER = { error = 1, warning = 2, handled = 3, note = 4 }

local function by_severity(a, b)
  if SEVERITY_ORDER[a.severity] ~= SEVERITY_ORDER[b.severity] then
    return SEVERITY_ORDER[a.severity] < SEVERITY_ORDER[b.severity]
  end
  if (a.table or "") ~= (b.table or "") then return (a.table or "") < (b.table or "") end
  return (a.column or "") < (b.column or "")
end

function fidelity.inspect(db, opts)
  assert(db and db.query, "fidelity.inspect: a Db expected")
  opts = opts or {}
  local list, err = opts.tables
  if not list then
    list, err = catalog.tables(db, { schemas = opts.schemas, exclude = opts.exclude })
    if not list then return nil, err end
  end
  local version
  version, err = version_of(db)
  if not version then return nil, err end
  local wanted = {}
  for _, t in ipairs(list) do wanted[text.key(t)] = t end

  local plan = { findings = {}, errors = 0, warnings = 0, handled = 0, notes = 0, tables = {},
                 session_replication_role = true, unbounded_numeric = false, owners = {}, extensions = {},
                 schemas = {} }
  local ins = setmetatable({ db = db, version = version, list = list, wanted = wanted, plan = plan,
    owners = {}, parents = {} }, Inspection)
  for _, finder in ipairs(FINDERS) do
    local ok, ferr = finder(ins)
    if not ok then return nil, ferr end
  end
  for o in pairs(ins.owners) do plan.owners[#plan.owners + 1] = o end
  table.sort(plan.owners)
  table.sort(plan.findings, by_severity)
  return plan
end

---------------------------------------------------------------------------
-- What the run needs of the target role
---------------------------------------------------------------------------

function fidelity.check_target(db, plan)
  assert(db and db.query, "fidelity.check_target: a Db expected")
  assert(type(plan) == "table" and plan.owners, "fidelity.check_target: a plan from fidelity.inspect expected")
  local out = {}
  local function add(check, ok, message, hint)
    out[#out + 1] = { check = check, ok = ok and true or false, message = message, hint = (not ok) and hint or nil }
  end
  local res, err = db:query([[
    select current_user as me, r.rolsuper as super, r.rolcreaterole as createrole, current_database() as db,
           has_database_privilege(current_database(), 'CREATE') as create_db,
           coalesce((select has_schema_privilege(oid, 'CREATE') from pg_namespace where nspname = 'public'),
                    false) as create_public
      from pg_roles r where r.rolname = current_user]])
  if not res then return nil, err end
  local me = res[1]
  local q = pg.quote_ident
  add("privilege: superuser", true, me.super and ("role %s is a superuser (RDS never gives one)"):format(me.me)
    or ("role %s is not a superuser, as on RDS"):format(me.me))
  add("privilege: CREATE on the database", me.super or me.create_db,
    ("role %s %s create schemas in %s"):format(me.me, (me.super or me.create_db) and "may" or "may not", me.db),
    ("the schema restore creates the migrated schemas: GRANT CREATE ON DATABASE %s TO %s"):format(q(me.db), q(me.me)))
  if plan.schemas.public then add("privilege: CREATE on schema public", me.super or me.create_public,
    ("role %s %s create tables in public"):format(me.me, (me.super or me.create_public) and "may" or "may not"),
    ("GRANT CREATE ON SCHEMA public TO %s (or make it the database's owner, as the RDS master user is)"):format(q(me.me)))
  end

  -- The owners of the migrated objects: members of them, or able to create them.
  for _, owner in ipairs(plan.owners) do
    res, err = db:query([[select r.rolsuper as super, pg_has_role(current_user, r.oid, 'MEMBER') as member
      from pg_roles r where r.rolname = $1]], owner)
    if not res then return nil, err end
    local r = res[1]
    if not r then
      add("privilege: owner " .. owner, me.super or me.createrole,
        ("role %s (owner of migrated objects) is not on the target: the schema step creates it%s"):format(owner,
          (me.super or me.createrole) and ", and makes " .. me.me .. " a member" or ""),
        ("the role %s needs CREATEROLE to create it: ALTER ROLE %s CREATEROLE, or create %s on the target "
          .. "and GRANT %s TO %s"):format(me.me, q(me.me), q(owner), q(owner), q(me.me)))
    else
      local ok = me.super or r.member
      add("privilege: owner " .. owner, ok, ("role %s owns migrated objects; %s %s a member of it"):format(owner,
          me.me, ok and "is" or "is not"),
        r.super and ("%s is a superuser on the target: only a superuser can give %s its objects; have them owned "
          .. "by another role on the source"):format(owner, me.me)
          or ("the restore gives it its objects and DMS writes its tables: GRANT %s TO %s"):format(q(owner), q(me.me)))
    end
  end

  -- session_replication_role, as DMS's AfterConnectScript will set it.
  if plan.session_replication_role then
    local ok, serr = db:query("begin")
    if ok then
      ok, serr = db:query("set local session_replication_role = replica")
      db:query("rollback")
    end
    add("privilege: session_replication_role", ok ~= nil,
      ok and ("role %s may SET session_replication_role (DMS's sessions will, so that triggers and foreign keys "
        .. "do not fire twice)"):format(me.me)
        or ("role %s may not SET session_replication_role: %s"):format(me.me, tostring(serr and serr.message or serr)),
      ("GRANT SET ON PARAMETER session_replication_role TO %s (PostgreSQL 15 and later; on RDS the "
        .. "rds_superuser role may set it)"):format(q(me.me)))
  end

  -- Extensions of the source: installed on the target, or installable by this role.
  for _, name in ipairs(plan.extensions) do
    res, err = db:query([[select (select extversion from pg_extension where extname = $1) as installed,
      exists (select 1 from pg_available_extensions where name = $1) as available,
      coalesce((select bool_or(trusted) from pg_available_extension_versions where name = $1), false) as trusted]],
      name)
    if not res then return nil, err end
    local e = res[1]
    local ok = not is_null(e.installed) or (e.available and (me.super or e.trusted))
    add("extension " .. name, ok, not is_null(e.installed) and ("%s %s is installed"):format(name, e.installed)
      or e.available and ("%s is available%s"):format(name, (me.super or e.trusted) and "" or
        (", but untrusted: %s may not create it"):format(me.me))
      or (name .. " is not available on the target"),
      e.available and ("an untrusted extension needs a superuser: create it on the target beforehand (on RDS, "
        .. "rds_superuser may create the extensions RDS supports)") or
        ("install %s on the target (on RDS: only supported extensions), or drop it from the source"):format(name))
  end
  return out
end

---------------------------------------------------------------------------
-- The target while DMS applies, and back
---------------------------------------------------------------------------

local function target_state(db, key, e)
  local rel = pg.qualify(e.schema, e.name)
  local res, err = db:query([[
    select c.relforcerowsecurity as force_rls,
           coalesce((select json_object_agg(a.attname, a.attidentity::text) from pg_attribute a
                      where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '{}') as identity,
           coalesce((select json_object_agg(t.tgname, t.tgenabled::text) from pg_trigger t
                      where t.tgrelid = c.oid and not t.tgisinternal), '{}') as triggers
      from pg_class c where c.oid = to_regclass($1)]], rel)
  if not res then return nil, err end
  if not res[1] then return nil, ("%s is not on the target"):format(key) end
  local json = require "migrun.json"
  return { force_rls = res[1].force_rls, identity = json.decode(res[1].identity),
           triggers = json.decode(res[1].triggers) }
end

local TRIGGER_STATE = { A = "ENABLE ALWAYS", R = "ENABLE REPLICA", O = "ENABLE", D = "DISABLE" }

-- The changes the plan asks for, in order, each with its SQL and its undo.
local function wanted_changes(plan)
  local keys = {}
  for key in pairs(plan.tables) do keys[#keys + 1] = key end
  table.sort(keys)
  local out = {}
  for _, key in ipairs(keys) do
    local e = plan.tables[key]
    local rel = pg.qualify(e.schema, e.name)
    for _, col in ipairs(e.identity_always) do
      out[#out + 1] = { kind = "identity", table = key, schema = e.schema, name = e.name, object = col, from = "ALWAYS", to = "BY DEFAULT",
        sql = ("ALTER TABLE %s ALTER COLUMN %s SET GENERATED BY DEFAULT"):format(rel, pg.quote_ident(col)),
        undo = ("ALTER TABLE %s ALTER COLUMN %s SET GENERATED ALWAYS"):format(rel, pg.quote_ident(col)) }
    end
    for _, tg in ipairs(e.always_triggers) do
      out[#out + 1] = { kind = "trigger", table = key, schema = e.schema, name = e.name, object = tg.name, from = TRIGGER_STATE[tg.enabled],
        to = "DISABLE", enabled = tg.enabled,
        sql = ("ALTER TABLE %s DISABLE TRIGGER %s"):format(rel, pg.quote_ident(tg.name)),
        undo = ("ALTER TABLE %s %s TRIGGER %s"):format(rel, TRIGGER_STATE[tg.enabled], pg.quote_ident(tg.name)) }
    end
    if e.force_rls then
      out[#out + 1] = { kind = "rls", table = key, schema = e.schema, name = e.name, object = "FORCE ROW LEVEL SECURITY", from = "FORCE", to = "NO FORCE",
        sql = ("ALTER TABLE %s NO FORCE ROW LEVEL SECURITY"):format(rel),
        undo = ("ALTER TABLE %s FORCE ROW LEVEL SECURITY"):format(rel) }
    end
  end
  return out
end

-- Whether the target is as the change leaves it ("to") or as it found it ("from").
local function state_is(st, c, side)
  if st.unknown then return false end
  local want = c[side]
  if c.kind == "identity" then
    local v = st.identity[c.object]
    return want == "ALWAYS" and v == "a" or want == "BY DEFAULT" and v == "d"
  elseif c.kind == "trigger" then
    return st.triggers[c.object] == (side == "to" and "D" or c.enabled)
  elseif c.kind == "rls" then
    return (want == "FORCE") == (st.force_rls == true)
  end
  return false
end

function fidelity.adapt(db, plan, opts)
  assert(db and db.write, "fidelity.adapt: a Db expected")
  assert(type(plan) == "table" and plan.tables, "fidelity.adapt: a plan from fidelity.inspect expected")
  opts = opts or {}
  local say = opts.say or function() end
  local out = { changes = {}, written = 0 }
  local states = {}
  for _, c in ipairs(wanted_changes(plan)) do
    local st, err = states[c.table]
    if not st then
      st, err = target_state(db, c.table, plan.tables[c.table])
      -- a dry run has not restored the schema: every change is shown
      if not st and db.dry_run then st = { unknown = true } end
      if not st then return nil, err end
      states[c.table] = st
    end
    if state_is(st, c, "to") then
      say(("%s: already %s on the target (%s)"):format(c.table, c.to, c.object))
    else
      local ok, werr = db:write(c.sql)
      if not ok then return nil, werr end
      out.written = out.written + 1
      if not db.dry_run then say(c.sql) end -- a dry run's Db shows it
    end
    out.changes[#out.changes + 1] = c
  end
  return out
end

function fidelity.restore(db, changes, opts)
  assert(db and db.write, "fidelity.restore: a Db expected")
  assert(type(changes) == "table", "fidelity.restore: a list of changes expected")
  opts = opts or {}
  local say = opts.say or function() end
  local out = { restored = 0, already = 0 }
  for i = #changes, 1, -1 do
    local c = changes[i]
    local st, err = target_state(db, c.table, c)
    if not st and db.dry_run then st = { unknown = true } end
    if not st then return nil, err end
    if state_is(st, c, "from") then
      out.already = out.already + 1
    else
      local ok, werr = db:write(c.undo)
      if not ok then return nil, werr end
      out.restored = out.restored + 1
      if not db.dry_run then say(c.undo) end
    end
  end
  return out
end

function fidelity.undo_lines(changes)
  local out = {}
  for i = #(changes or {}), 1, -1 do out[#out + 1] = changes[i].undo .. ";" end
  return out
end

function fidelity.redo_lines(changes)
  local out = {}
  for _, c in ipairs(changes or {}) do out[#out + 1] = c.sql .. ";" end
  return out
end

---------------------------------------------------------------------------
-- What DMS is told
---------------------------------------------------------------------------

function fidelity.dms(plan)
  local remove = {}
  for key, e in pairs(plan.tables) do
    if #e.remove_columns > 0 then remove[key] = e.remove_columns end
  end
  return { remove_columns = remove,
    after_connect_script = plan.session_replication_role and fidelity.SESSION_REPLICATION_ROLE or nil,
    map_unbounded_numeric = plan.unbounded_numeric, capture_ddls = false }
end

function fidelity.endpoint_overrides(kind, overrides, dms)
  assert(kind == "source" or kind == "target", "fidelity.endpoint_overrides: kind is source or target")
  local o = {}
  for k, v in pairs(overrides or {}) do o[k] = v end
  if not dms then return o end
  if dms.map_unbounded_numeric and o.map_unbounded_numeric == nil then o.map_unbounded_numeric = true end
  if kind == "source" and o.capture_ddls == nil then o.capture_ddls = dms.capture_ddls end
  if kind == "target" and o.after_connect_script == nil then o.after_connect_script = dms.after_connect_script end
  return o
end

function fidelity.task_groups(groups, dms)
  if not dms or not next(dms.remove_columns or {}) then return groups end
  local out = {}
  for i, g in ipairs(groups) do
    local tables = {}
    for j, t in ipairs(g.tables) do
      local cols = dms.remove_columns[text.key(t)]
      tables[j] = cols and setmetatable({ remove_columns = cols }, { __index = t }) or t
    end
    out[i] = setmetatable({ tables = tables }, { __index = g })
  end
  return out
end

fidelity.REPORT_COLUMNS = { "feature", "table", "column", "result", "what migrun does" }
fidelity.CHANGE_COLUMNS = { { "table" }, { "kind", "what" }, { "object", "column / trigger" },
  { "from", "on the source" }, { "to", "while DMS applies" } }

function fidelity.report_rows(plan)
  local out = {}
  for _, f in ipairs(plan.findings) do
    out[#out + 1] = { f.feature, f.table or "-", f.column or "-",
      f.severity == "error" and "ERROR" or f.severity, f.action }
  end
  return out
end

return fidelity
