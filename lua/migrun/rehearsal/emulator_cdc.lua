--[[ CDC for the DMS emulator (migrun.rehearsal.emulator): a running CDC task reads
the pglogical slot of its source endpoint with pg_logical_slot_peek_binary_changes
(pglogical's native protocol, migrun.rehearsal.pglogical_native; replication
sets <slot> and i<slot>), skips transactions that committed before its
CdcStartPosition, applies the others to the target in commit order (one
target transaction each, a savepoint per change), then confirms them with
pg_replication_slot_advance. Every value travels as the text the source's
output function gives and the target's input function reads, as DMS's
strings and LOBs do: an array arrives whole ('{}', NULL elements, several
dimensions, lower bounds), a jsonb string keeps its quotes. What DMS does
that is modelled:
  * selection rules of the table mappings (include/exclude; wildcards %, _,
    [_], [ab], [a-d]); TargetMetadata.TargetSchema; remove-column
    transformation rules (the column is left out of every statement);
    other rule types are ignored;
  * the target endpoint's AfterConnectScript (PostgreSQLSettings, or
    afterConnectScript= in its extra connection attributes) runs on the
    target session once connected (SET session_replication_role = replica:
    the target's triggers and foreign keys then do not fire); a script the
    target refuses fails the task. Without it, triggers fire as they would;
  * every column pglogical sends is written, generated and identity columns
    included: PostgreSQL refuses a value for a stored generated column or a
    GENERATED ALWAYS identity (428C9) and the change lands in
    awsdms_apply_exceptions, as with DMS;
  * numeric without precision travels as DMS's NUMERIC(28,6) (rounded to 6
    decimals; more than 22 integer digits is refused) unless
    MapUnboundedNumericAsString is set on the source and the target
    endpoints, which carry it as text cut at 1,000 characters;
  * UPDATE/DELETE of tables without a primary key are ignored (pglogical only
    sends their inserts anyway); updates that change the key are ignored;
  * TRUNCATE (pglogical's queue message) is not applied and is logged: DMS
    does not process TRUNCATE from a PostgreSQL source;
  * LOBs as DMS types them (user guide, "Source data types for PostgreSQL"):
    bytea is a BLOB; text, json, jsonb, arrays, composites, hstore (and
    varchar without a length) are NCLOBs; xml, tsvector, tsquery, path and
    polygon are CLOBs (domains count as their base type). Their size is
    counted in bytes as DMS holds them: a BLOB's bytes (not its hex text), an
    NCLOB's two bytes a character (four beyond the BMP: "each character as a
    double-byte character"), a CLOB's UTF-8 bytes. In limited LOB mode a
    value larger than LobMaxSize KB is cut to that many bytes (a bytea to
    whole bytes, text to whole characters) and "[SOURCE_CAPTURE ]W: Value of
    column ... was truncated to N bytes, actual length: M bytes" is logged;
    a cut array or JSON is then refused by the target (22P02) and lands in
    awsdms_apply_exceptions; FailTasksOnLobTruncation on the source endpoint
    fails the task; SupportLobs=false leaves LOB columns out; a
    table-settings rule's lob-settings override that per table (unlimited:
    nothing is cut; limited: cut at its bulk-max-size KB; none: the task's
    settings);
  * a change the target rejects goes to awsdms_apply_exceptions (LOG_ERROR);
    an UPDATE that finds no row too; a DELETE that finds none is ignored;
  * BatchApplyEnabled on a table whose target has a primary key and another
    unique constraint: the table is suspended ("Table error") and its
    changes are not applied;
  * awsdms_status (when ControlTablesSettings.StatusTableEnabled) and
    awsdms_apply_exceptions (always) in ControlTablesSettings.ControlSchema.
Start position: a transaction is skipped when its commit record starts
before the start LSN (PostgreSQL's own rule for a logical start point).
Recoverable errors (user guide, "Error handling task settings"; dms-api.md
3.1): a connection to the source or the target that is lost (a server
restarted, the network failed) does not fail the task. It stays running,
logs the error, and connects again after RecoverableErrorInterval seconds
(5), doubled each time while RecoverableErrorThrottling (up to
RecoverableErrorThrottlingMax, 1800); RecoverableErrorCount (-1: forever)
bounds the tries, after which the task fails. It goes on from what it had
applied: a transaction already committed on the target is not applied
again, even when the slot, after a crash of the primary, gives it again. ]]
local pg = require "migrun.pg"
local lsn = require "migrun.lsn"
local json = require "migrun.json"
local text = require "migrun.text"
local native = require "migrun.rehearsal.pglogical_native"

local M = {}

local Engine = {}
Engine.__index = Engine

-- The DMS type of a PostgreSQL column that DMS treats as a LOB (AWS DMS User
-- Guide, "Using a PostgreSQL database as an AWS DMS source", "Source data
-- types for PostgreSQL": BYTEA -> BLOB; TEXT, JSON, JSONB, ARRAY, COMPOSITE,
-- HSTORE -> NCLOB; XML, TSVECTOR, TSQUERY, PATH, POLYGON -> CLOB). A varchar
-- without a length is held as text. r: base type name, kind, category, typmod.
local NCLOB_TYPES = { text = true, json = true, jsonb = true, hstore = true }
local CLOB_TYPES = { xml = true, tsvector = true, tsquery = true, path = true, polygon = true }
local function lob_kind(r)
  if r.base == "bytea" then return "blob" end
  if r.category == "A" or r.kind == "c" or NCLOB_TYPES[r.base] or (r.base == "varchar" and r.typmod < 0) then
    return "nclob"
  end
  if CLOB_TYPES[r.base] then return "clob" end
end

local function connect(ep, name)
  local ok, conn, err = pcall(pg.connect, { host = ep.ServerName, port = tostring(ep.Port or 5432),
    dbname = ep.DatabaseName, user = ep.Username, password = ep._password,
    sslmode = (ep.SslMode == nil or ep.SslMode == "none") and "disable" or ep.SslMode,
    application_name = "migrun-dms-emulator" }, { name = name, connect_timeout = 10 })
  if not ok then return nil, tostring(conn) end
  return conn, err
end

-- DMS object locators (user guide, "Wildcards in table mapping"): % matches
-- any run of characters, _ one character, [_] a literal underscore, [ab] a
-- set, [a-d] a range; everything else itself.
local function like(pattern, s)
  local out, i = { "^" }, 1
  while i <= #pattern do
    local c = pattern:sub(i, i)
    if c == "%" then out[#out + 1] = ".*"
    elseif c == "_" then out[#out + 1] = "."
    elseif c == "[" and pattern:find("]", i + 2, true) then
      local close = pattern:find("]", i + 2, true)
      local set = pattern:sub(i + 1, close - 1)
      local lo, hi = set:match("^(.)%-(.)$")
      if lo then
        out[#out + 1] = "[" .. lo:gsub("%W", "%%%0") .. "-" .. hi:gsub("%W", "%%%0") .. "]"
      else
        out[#out + 1] = "[" .. set:gsub("%W", "%%%0") .. "]"
      end
      i = close
    else
      out[#out + 1] = (c:gsub("%W", "%%%0"))
    end
    i = i + 1
  end
  out[#out + 1] = "$"
  return s:match(table.concat(out)) ~= nil
end

-- remove-column transformation rules -> function(schema, table, column) -> removed?
local function removed_columns(mappings)
  local doc = json.decode(mappings) or {}
  local rules = {}
  for _, r in ipairs(doc.rules or {}) do
    if r["rule-type"] == "transformation" and r["rule-action"] == "remove-column"
        and r["rule-target"] == "column" and type(r["object-locator"]) == "table" then
      rules[#rules + 1] = r["object-locator"]
    end
  end
  return function(schema, name, column)
    for _, loc in ipairs(rules) do
      if like(loc["schema-name"] or "%", schema) and like(loc["table-name"] or "%", name)
          and like(loc["column-name"] or "%", column) then
        return true
      end
    end
    return false
  end
end

-- An extra connection attribute (name=value;...), by name, any case.
local function eca(s, name)
  for part in tostring(s or ""):gmatch("[^;]+") do
    local k, v = part:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
    if k and k:lower() == name:lower() then return v end
  end
end

local function selector(mappings)
  local doc = json.decode(mappings) or {}
  local rules = {}
  for _, r in ipairs(doc.rules or {}) do
    if r["rule-type"] == "selection" then rules[#rules + 1] = r end
  end
  return function(schema, name)
    local included = false
    for _, r in ipairs(rules) do
      local loc = r["object-locator"]
      if like(loc["schema-name"], schema) and like(loc["table-name"] or "%", name) then
        if r["rule-action"] == "exclude" then return false end
        included = true
      end
    end
    return included
  end
end

-- Per-table LOB limits from the table-settings rules: {["s.t"] = bytes | false
-- (full LOB mode)}; tables without a rule (or mode "none") keep the task's.
function M.lob_rules(mappings)
  local doc = json.decode(mappings) or {}
  local out = {}
  for _, r in ipairs(doc.rules or {}) do
    local loc, lob = r["object-locator"], r["lob-settings"]
    if r["rule-type"] == "table-settings" and type(loc) == "table" and type(lob) == "table" then
      local key = text.key(tostring(loc["schema-name"]), tostring(loc["table-name"]))
      if lob.mode == "unlimited" then out[key] = false
      elseif lob.mode == nil or lob.mode == "limited" then
        out[key] = math.floor((tonumber(lob["bulk-max-size"]) or 0) * 1024)
      end
    end
  end
  return out
end

function M.new(o)
  local e = setmetatable({ emu = o.emulator, task = o.task, slot = o.slot, source_ep = o.source,
    target_ep = o.target, tables = {}, relations = {} }, Engine)
  local settings = o.settings or {}
  local tm = settings.TargetMetadata or {}
  e.target_schema = (tm.TargetSchema ~= nil and tm.TargetSchema ~= "") and tm.TargetSchema or nil
  e.support_lobs = tm.SupportLobs ~= false
  e.limited_lobs = tm.SupportLobs ~= false and tm.FullLobMode ~= true
  e.lob_max = math.floor((tonumber(tm.LobMaxSize) or 32) * 1024)
  e.batch_apply = tm.BatchApplyEnabled == true
  local cts = settings.ControlTablesSettings or {}
  e.control_schema = (cts.ControlSchema ~= nil and cts.ControlSchema ~= "") and cts.ControlSchema or "public"
  e.status_table = cts.StatusTableEnabled == true
  local pgs = o.source.PostgreSQLSettings or {}
  local tgs = o.target.PostgreSQLSettings or {}
  e.fail_on_truncation = pgs.FailTasksOnLobTruncation == true
  e.after_connect = tgs.AfterConnectScript or eca(o.target.ExtraConnectionAttributes, "afterConnectScript")
  -- DMS wants MapUnboundedNumericAsString on both endpoints together
  local function maps(settings, ep)
    return settings.MapUnboundedNumericAsString == true
      or (eca(ep.ExtraConnectionAttributes, "MapUnboundedNumericAsString") or ""):lower() == "true"
  end
  e.numeric_as_string = maps(pgs, o.source) and maps(tgs, o.target)
  e.numeric_half_set = not e.numeric_as_string and (maps(pgs, o.source) or maps(tgs, o.target))
  e.selected = selector(o.task.TableMappings)
  e.lob_rules = M.lob_rules(o.task.TableMappings)
  e.removed = removed_columns(o.task.TableMappings)
  e.task_name = o.task.ReplicationTaskArn:match(":task:(.+)$")
  e.server_name = o.server_name -- the replication instance, as awsdms_status names it

  local eb = settings.ErrorBehavior or {}
  e.recoverable = { count = tonumber(eb.RecoverableErrorCount) or -1, interval = tonumber(eb.RecoverableErrorInterval) or 5,
    throttling = eb.RecoverableErrorThrottling ~= false, max = tonumber(eb.RecoverableErrorThrottlingMax) or 1800,
    errors = 0 }

  e.o = o
  local connected, err = e:_connect()
  if not connected then
    -- a server down at the start is a recoverable error too: the task starts, and connects when it can
    if not e.connect_failed then return nil, err end
    e.pending_init = true
    local ok, rerr = e:_recoverable(err, e.emu.clock())
    if not ok then return nil, rerr end
    return e
  end
  return e:_init()
end

-- What a start checks once connected: the slot, the start position, the
-- control tables. -> the engine | nil, message (the task fails)
function Engine:_init()
  local e, o = self, self.o
  self.pending_init = nil
  if e.numeric_half_set then
    e:log("SOURCE_CAPTURE", "W", "MapUnboundedNumericAsString is set on one endpoint only: it must be set on the "
      .. "source and the target endpoints together; unbounded NUMERIC is carried as NUMERIC(28,6)")
  end

  local res = e.src:exec("select plugin, active, confirmed_flush_lsn from pg_replication_slots "
    .. "where slot_name = $1 and database = current_database()", o.slot)
  if not res then e:close() return nil, "Failed to read pg_replication_slots" end
  local slot = res[1]
  if not slot then
    e:close()
    return nil, ("Replication slot '%s' does not exist in database '%s'"):format(o.slot, tostring(o.source.DatabaseName))
  end
  if slot.plugin ~= "pglogical" then
    e:close()
    return nil, ("Replication slot '%s' uses plugin '%s': the emulator reads pglogical slots only"):format(o.slot, slot.plugin)
  end
  if slot.active == true then
    e:close()
    return nil, ("Replication slot '%s' is active for another connection"):format(o.slot)
  end
  local confirmed = slot.confirmed_flush_lsn
  local current = assert(e.src:exec("select pg_current_wal_lsn() as l"))[1].l
  if o.resume and o.task._applied_lsn then
    e.start = lsn(o.task._applied_lsn)
  else
    if not o.start_lsn then e:close() return nil, "No CDC start position" end
    e.start = lsn(o.start_lsn)
    if not rawequal(confirmed, pg.null) and e.start < confirmed then
      e:close()
      return nil, ("The CDC start position %s is older than the confirmed_flush_lsn %s of replication slot '%s'")
        :format(tostring(e.start), tostring(confirmed), o.slot)
    end
    if e.start > current then
      e:close()
      return nil, ("The CDC start position %s was not found: the source WAL ends at %s"):format(tostring(e.start), tostring(current))
    end
  end
  e.position = e.start
  local ok, cerr = e:_prepare_target()
  if not ok then e:close() return nil, cerr end
  e:_check_tables()
  return e
end

-- A connection that failed for the world (a server down), not for who it is
-- (a login refused, 28xxx; no such database): only the first is recoverable.
local function recoverable_failure(err)
  local code = type(err) == "table" and tostring(err.code or err.sqlstate or "") or ""
  return not (code:match("^28") or code == "3D000")
end

-- The task's two sessions (again after a recoverable error).
function Engine:_connect()
  local err
  self.connect_failed = nil
  self.src, err = connect(self.source_ep, "source")
  if not self.src then
    self.connect_failed = recoverable_failure(err)
    return nil, "Failed to connect to the source endpoint: " .. tostring(err)
  end
  -- the decoding runs in this session: bytea in hex, whatever the server's default
  local bok, berr = self.src:exec("set bytea_output = 'hex'")
  if not bok then self.src:close() return nil, "Failed to set up the source session: " .. tostring(berr) end
  self.dst, err = connect(self.target_ep, "target")
  if not self.dst then
    self.src:close()
    self.connect_failed = recoverable_failure(err)
    return nil, "Failed to connect to the target endpoint: " .. tostring(err)
  end
  if self.after_connect and self.after_connect ~= "" then
    local ok, aerr = self.dst:exec(self.after_connect)
    if not ok then
      self:close()
      return nil, ("The target endpoint's after connect script failed: %s"):format(tostring(aerr.message or aerr))
    end
  end
  return true
end

-- Whether a session of the task's is gone (closed, or its connection broken).
local function gone(conn)
  if not conn or conn:is_closed() then return true end
  local ok, status = pcall(conn.transaction_status, conn)
  return not ok or status == "unknown"
end

function Engine:log(component, level, msg)
  self.emu:task_log(self.task, ("[%-15s]%s: %s"):format(component, level, msg))
end

function Engine:_prepare_target()
  local d = self.dst
  local s = pg.quote_ident(self.control_schema)
  local sql = ("create schema if not exists %s; "):format(s)
    .. ('create table if not exists %s.awsdms_apply_exceptions ("TASK_NAME" varchar(128) not null, '
      .. '"TABLE_OWNER" varchar(128) not null, "TABLE_NAME" varchar(128) not null, "ERROR_TIME" timestamp not null, '
      .. '"STATEMENT" text not null, "ERROR" text not null)'):format(s)
  if self.status_table then
    sql = sql .. ("; create table if not exists %s.awsdms_status (server_name varchar(128) not null, "
      .. "task_name varchar(128) not null, task_status varchar(32), status_time timestamp, pending_changes int8, "
      .. "disk_swap_size int8, task_memory int8, source_current_position varchar(128), "
      .. "source_current_timestamp timestamp, source_tail_position varchar(128), source_tail_timestamp timestamp, "
      .. "source_timestamp_applied timestamp); create unique index if not exists awsdms_status_task_status_index "
      .. "on %s.awsdms_status (server_name, task_name)"):format(s, s)
  end
  local ok, err = d:exec(sql)
  if not ok then return nil, "Failed to create the control tables on the target: " .. tostring(err) end
  return self:_status("CHANGE PROCESSING")
end

function Engine:_status(state, applied_time)
  if not self.status_table then return true end
  local sql = ("insert into %s.awsdms_status as s (server_name, task_name, task_status, status_time, "
    .. "pending_changes, disk_swap_size, task_memory, source_current_position, source_timestamp_applied) "
    .. "values ($1, $2, $3, now() at time zone 'utc', 0, 0, 0, $4, $5::timestamptz at time zone 'utc') "
    .. "on conflict (server_name, task_name) do update set task_status = excluded.task_status, "
    .. "status_time = excluded.status_time, source_current_position = excluded.source_current_position, "
    .. "source_timestamp_applied = coalesce(excluded.source_timestamp_applied, s.source_timestamp_applied)")
    :format(pg.quote_ident(self.control_schema))
  local ok, err = self.dst:exec{ sql, self.server_name, self.task_name, state, tostring(self.position),
    applied_time or pg.null, n = 6 }
  if not ok then return nil, "Failed to write awsdms_status: " .. tostring(err) end
  return true
end

-- Source and target facts about one table (cached).
function Engine:table(schema, name)
  local key = text.key(schema, name)
  local t = self.tables[key]
  if t then return t end
  t = { schema = schema, name = name, key = key, selected = self.selected(schema, name),
    target_schema = self.target_schema or schema, cols = {}, lob = {}, pk = {} }
  self.tables[key] = t
  if not t.selected then return t end
  local res = self.src:exec([[select a.attname, format_type(a.atttypid, a.atttypmod) as type,
      coalesce(a.attnum = any(i.indkey), false) as pk, bt.typname as base, bt.typtype::text as kind,
      bt.typcategory::text as category, case when ty.typtype = 'd' then ty.typtypmod else a.atttypmod end as typmod
    from pg_attribute a
    join pg_type ty on ty.oid = a.atttypid
    join pg_type bt on bt.oid = case when ty.typtype = 'd' then ty.typbasetype else ty.oid end
    left join pg_index i on i.indrelid = a.attrelid and i.indisprimary
    where a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass and a.attnum > 0 and not a.attisdropped
    order by a.attnum]], schema, name)
  for row in (res and res:rows() or function() end) do
    t.cols[row.attname] = row.type
    t.lob[row.attname] = lob_kind(row)
    if row.pk then t.pk[#t.pk + 1] = row.attname end
  end
  t.qualified = pg.qualify(t.target_schema, name)
  if self.batch_apply then
    local u = self.dst:exec([[select count(*) filter (where indisprimary) as pk,
        count(*) filter (where indisunique and not indisprimary) as uk
      from pg_index where indrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2))]], t.target_schema, name)
    local r = u and u[1]
    if r and r.pk > 0 and r.uk > 0 then
      t.suspended = true
      self:log("TARGET_APPLY", "E", ("Batch apply is not supported for table '%s.%s': the target table has a "
        .. "primary key and a unique constraint. The table is suspended."):format(schema, name))
    end
  end
  local stats = self.emu:table_stats(self.task, schema, name)
  if t.suspended then
    stats.TableState = "Table error"
    self.task.ReplicationTaskStats.TablesErrored = self.task.ReplicationTaskStats.TablesErrored + 1
  end
  return t
end

-- Every selected source table, so statistics list them from the start.
function Engine:_check_tables()
  local res = self.src:exec([[select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema', 'pglogical')
    order by 1, 2]])
  for row in (res and res:rows() or function() end) do
    if self.selected(row.nspname, row.relname) then self:table(row.nspname, row.relname) end
  end
end

-- pglogical's native protocol (the default proto_format), as DMS reads the slot.
local CHANGES_SQL = [[
select lsn::text as lsn, data from pg_logical_slot_peek_binary_changes($1, NULL, $2, 'min_proto_version', '1',
  'max_proto_version', '1', 'startup_params_format', '1', 'pglogical.replication_set_names', $3)]]

-- A decoded tuple as the emulator's change side: {[column] = {value = text | nil}}
-- and the columns in order (unchanged TOAST values are not there: left as they are).
local function side(tuple, order)
  local out = {}
  if not tuple then return out end
  for _, col in ipairs(tuple.order) do
    local v = tuple.values[col]
    out[col] = { value = v ~= native.NULL and v or nil }
    if order then order[#order + 1] = col end
  end
  return out
end

-- Reads the slot: a list of transactions {final_lsn=, end_lsn=, commit_time=, changes={...}}.
function Engine:_read()
  local res, err = self.src:exec(CHANGES_SQL, self.slot, 1000, self.slot .. ",i" .. self.slot)
  if not res then return nil, "Error reading replication slot '" .. self.slot .. "': " .. tostring(err.message or err) end
  local txs, tx = {}, nil
  for row in res:rows() do
    local ok, m = pcall(native.decode, row.data, self.relations)
    if not ok then return nil, ("Error decoding replication slot '%s' at %s: %s"):format(self.slot, row.lsn, m) end
    if m.type == "B" then
      tx = { changes = {}, commit_time = m.commit_time }
    elseif m.type == "C" then
      if tx then
        tx.final_lsn, tx.end_lsn = lsn(m.commit_lsn), lsn(m.end_lsn)
        txs[#txs + 1] = tx
      end
      tx = nil
    elseif (m.type == "I" or m.type == "U" or m.type == "D") and tx then
      local order = {}
      local ch = { action = m.type, schema = m.schema, name = m.name, lsn = row.lsn, order = order }
      ch.new = side(m.new, m.type ~= "D" and order or nil)
      ch.old = side(m.old, m.type == "D" and order or nil)
      tx.changes[#tx.changes + 1] = ch
    end
  end
  return txs
end

-- The size in bytes DMS gives a LOB value, by its DMS type (user guide,
-- "Working with LOB source data types for PostgreSQL"): a BLOB its bytes (the
-- text is "\x" and two hex digits a byte); an NCLOB two bytes a character,
-- four for one beyond the BMP (UTF-16); a CLOB its UTF-8 bytes.
local function lob_bytes(kind, value)
  if kind == "blob" and value:sub(1, 2) == "\\x" then return (#value - 2) // 2 end
  if kind == "nclob" then
    local chars = utf8.len(value)
    if not chars then return 2 * #value end -- not UTF-8: a byte a character
    local wide = select(2, value:gsub("[\xF0-\xF7]", ""))
    return 2 * (chars + wide)
  end
  return #value
end

-- A LOB value cut to at most n bytes as DMS counts them: a bytea to whole
-- bytes (still a valid bytea), text to whole characters.
local function lob_cut(kind, value, n)
  if kind == "blob" and value:sub(1, 2) == "\\x" then return value:sub(1, 2 + 2 * n) end
  if kind == "nclob" then
    local chars = utf8.len(value)
    if chars == #value or not chars then return value:sub(1, n // 2) end -- ASCII: one byte a character
    local used = 0
    for p, c in utf8.codes(value) do
      used = used + (c > 0xFFFF and 4 or 2)
      if used > n then return value:sub(1, p - 1) end
    end
    return value
  end
  local i = n -- UTF-8: back to the start of a character
  while i > 0 and (value:byte(i + 1) or 0) >= 0x80 and (value:byte(i + 1) or 0) < 0xC0 do i = i - 1 end
  return value:sub(1, i)
end

-- A column value as a query parameter (its text), with the LOB rules applied.
function Engine:_value(t, col, v)
  if v == nil or v.value == nil then return pg.null end
  local value = v.value
  local kind = t.lob[col]
  local limit = self.lob_rules[text.key(t.schema, t.name)]
  if limit == nil then limit = self.limited_lobs and self.lob_max end
  local size = kind and limit and lob_bytes(kind, value)
  if size and size > limit then
    self:log("SOURCE_CAPTURE", "W", ("Value of column '%s' in table '%s.%s' was truncated to %d bytes, "
      .. "actual length: %d bytes"):format(col, t.schema, t.name, limit, size))
    if self.fail_on_truncation then
      error({ fatal = ("LOB value of column '%s' in table '%s.%s' exceeds LobMaxSize and "
        .. "FailTasksOnLobTruncation is set"):format(col, t.schema, t.name) })
    end
    value = lob_cut(kind, value, limit)
  end
  if t.cols[col] == "numeric" and self.numeric_as_string and #value > 1000 then
    self:log("SOURCE_CAPTURE", "W", ("Unbounded NUMERIC value of column '%s' in table '%s.%s' was truncated to "
      .. "1000 characters"):format(col, t.schema, t.name))
    value = value:sub(1, 1000)
  end
  return value
end

-- SQL with the values inlined, for awsdms_apply_exceptions.
local function inline(conn, sql, params)
  return (sql:gsub("%$(%d+)", function(i)
    local v = params[tonumber(i)]
    if v == pg.null or v == nil then return "NULL" end
    return conn:escape_literal(v)
  end))
end

-- The SQL of parameter i for column col: the text as it is (the target's
-- column type reads it: an array its array literal), an unbounded numeric
-- through DMS's NUMERIC(28,6) unless carried as a string.
function Engine:_placeholder(t, col, i)
  if t.cols[col] == "numeric" and not self.numeric_as_string then
    return ("$%d::numeric(28,6)"):format(i)
  end
  return "$" .. i
end

-- -> sql, params | nil (nothing to do)
function Engine:_statement(t, ch)
  local params, cols, vals = {}, {}, {}
  local function add(v) params[#params + 1] = v return #params end
  local function included(col)
    if self.removed(t.schema, t.name, col) then return false end
    return self.support_lobs or not t.lob[col]
  end
  if ch.action == "I" then
    for _, col in ipairs(ch.order) do
      if included(col) then
        local i = add(self:_value(t, col, ch.new[col]))
        cols[#cols + 1] = pg.quote_ident(col)
        vals[#vals + 1] = self:_placeholder(t, col, i)
      end
    end
    return ("insert into %s (%s) values (%s)"):format(t.qualified, table.concat(cols, ", "),
      table.concat(vals, ", ")), params
  end
  local key = next(ch.old) and ch.old or ch.new
  if ch.action == "U" and next(ch.old) then
    for _, k in ipairs(t.pk) do
      local a, b = ch.old[k], ch.new[k]
      if a and b and a.value ~= b.value then
        self:log("TARGET_APPLY", "W", ("Update of the primary key of table '%s.%s' is ignored"):format(t.schema, t.name))
        return nil
      end
    end
  end
  local where = {}
  for _, k in ipairs(t.pk) do
    local v = key[k]
    if not v or v.value == nil then return nil end
    where[#where + 1] = pg.quote_ident(k) .. " = " .. self:_placeholder(t, k, add(v.value))
  end
  if ch.action == "D" then
    return ("delete from %s where %s"):format(t.qualified, table.concat(where, " and ")), params
  end
  local sets = {}
  for _, col in ipairs(ch.order) do
    if included(col) then
      local i = add(self:_value(t, col, ch.new[col]))
      sets[#sets + 1] = pg.quote_ident(col) .. " = " .. self:_placeholder(t, col, i)
    end
  end
  if #sets == 0 then return nil end
  -- the WHERE parameters came first: renumbering keeps them
  return ("update %s set %s where %s"):format(t.qualified, table.concat(sets, ", "), table.concat(where, " and ")),
    params
end

function Engine:_exception(t, sql, params, message)
  self.dst:exec(("insert into %s.awsdms_apply_exceptions values ($1, $2, $3, now() at time zone 'utc', $4, $5)")
    :format(pg.quote_ident(self.control_schema)), self.task_name, t.target_schema, t.name,
    inline(self.dst, sql, params), message)
end

local function error_text(err)
  return ("RetCode: SQL_ERROR  SqlState: %s NativeError: 1 Message: ERROR: %s"):format(
    tostring(err.sqlstate or err.code or "?"), tostring(err.message or err))
end

-- Applies one change inside the open target transaction.
function Engine:_apply(ch)
  local stats
  if ch.schema == "pglogical" and ch.name == "queue" then
    local mt = ch.new.message_type and ch.new.message_type.value
    local msg = ch.new.message and json.decode(ch.new.message.value or "")
    if mt ~= "T" or type(msg) ~= "table" then return end
    local t = self:table(msg.schema_name, msg.table_name)
    if not t.selected or t.suspended then return end
    stats = self.emu:table_stats(self.task, t.schema, t.name)
    stats.Ddls = stats.Ddls + 1
    stats.LastUpdateTime = self.emu.clock()
    self:log("SOURCE_CAPTURE", "W", ("TRUNCATE of table '%s.%s' is not applied: change processing of TRUNCATE "
      .. "is not supported"):format(t.schema, t.name))
    return
  end
  local t = self:table(ch.schema, ch.name)
  if not t.selected or t.suspended then return end
  stats = self.emu:table_stats(self.task, t.schema, t.name)
  stats.LastUpdateTime = self.emu.clock()
  local counter = ({ I = "Inserts", U = "Updates", D = "Deletes" })[ch.action]
  stats[counter] = stats[counter] + 1
  if ch.action ~= "I" and #t.pk == 0 then
    self:log("TARGET_APPLY", "W", ("Table '%s.%s' has no primary key: %s ignored"):format(t.schema, t.name,
      ch.action == "U" and "UPDATE" or "DELETE"))
    return
  end
  local sql, params = self:_statement(t, ch)
  if not sql then return end
  assert(self.dst:exec("savepoint emu_change"))
  local args = { sql, n = #params + 1 } -- n counts the SQL too
  for i = 1, #params do args[i + 1] = params[i] end
  local res, err = self.dst:exec(args)
  if res and ch.action == "U" and res.affected == 0 then
    res, err = nil, { sqlstate = "00000", message = "0 rows affected" }
  end
  if res then -- a DELETE that finds no row is fine (ApplyErrorDeletePolicy IGNORE_RECORD)
    assert(self.dst:exec("release savepoint emu_change"))
    stats["Applied" .. counter] = stats["Applied" .. counter] + 1
  else
    assert(self.dst:exec("rollback to savepoint emu_change; release savepoint emu_change"))
    self:_exception(t, sql, params, error_text(err))
  end
end

-- One round: read, apply whole transactions, confirm. -> true | nil, message
-- (a lost session: a recoverable error, see the header)
function Engine:poll()
  local now = self.emu.clock()
  local rec = self.recoverable
  if self.down then
    if now < self.retry_at then return true end
    local ok, err = self:_connect()
    if not ok then return self:_recoverable(err, now) end
    self.down = nil
    if self.pending_init then
      local e, ierr = self:_init()
      if not e then return nil, ierr end
    end
    self:log("TASK_MANAGER", "I", ("Reconnected after a recoverable error (%d so far): the task goes on from %s")
      :format(rec.errors, tostring(self.position)))
  end
  local ok, err = self:_poll()
  if ok or not (gone(self.src) or gone(self.dst)) then return ok, err end
  return self:_recoverable(err, now)
end

-- A recoverable error: the sessions closed, a try again scheduled, or the
-- task failed once RecoverableErrorCount is spent.
function Engine:_recoverable(err, now)
  local rec = self.recoverable
  rec.errors = rec.errors + 1
  self:close_sessions()
  if rec.count >= 0 and rec.errors > rec.count then
    return nil, ("%s (recoverable error %d, RecoverableErrorCount %d reached)"):format(tostring(err), rec.errors,
      rec.count)
  end
  local wait = rec.interval
  if rec.throttling then wait = math.min(rec.max, rec.interval * 2 ^ (rec.errors - 1)) end
  self.down, self.retry_at = true, now + wait
  self:log("SOURCE_CAPTURE", "E", ("%s (recoverable error %d: the task reconnects in %g s)"):format(tostring(err),
    rec.errors, wait))
  return true
end

function Engine:_poll()
  local txs, err = self:_read()
  if not txs then return nil, err end
  if #txs == 0 then return true end
  local last_end, applied_time
  for _, tx in ipairs(txs) do
    -- a slot set back by a crash of the primary gives again what was applied
    if tx.final_lsn >= self.start and not (self.applied_end and tx.end_lsn <= self.applied_end) then
      local ok, aerr = self.dst:exec("begin")
      if not ok then return nil, "Target: " .. tostring(aerr) end
      local pok, perr = pcall(function()
        for _, ch in ipairs(tx.changes) do self:_apply(ch) end
      end)
      if not pok then
        self.dst:exec("rollback")
        if type(perr) == "table" and perr.fatal then return nil, perr.fatal end
        return nil, "Error applying changes: " .. tostring(perr)
      end
      ok, aerr = self.dst:exec("commit")
      if not ok then return nil, "Target commit failed: " .. tostring(aerr) end
      self.applied_end = tx.end_lsn
      applied_time = tx.commit_time or applied_time
    end
    last_end = tx.end_lsn
  end
  if last_end then
    local ok, aerr = self.src:exec("select pg_replication_slot_advance($1, $2::pg_lsn)", self.slot, tostring(last_end))
    if not ok then return nil, "Failed to confirm position " .. tostring(last_end) .. ": " .. tostring(aerr) end
    self.position = last_end
    self.task._applied_lsn = tostring(last_end)
  end
  return self:_status("CHANGE PROCESSING", applied_time)
end

function Engine:checkpoint()
  local hi, lo = tostring(self.position):match("^(%x+)/(%x+)$")
  return ("checkpoint:V1#1#%08X/%08X#0#0#*#0#0"):format(tonumber(hi, 16), tonumber(lo, 16))
end

function Engine:close()
  if self.dst and not gone(self.dst) then pcall(self._status, self, "NOT RUNNING") end
  self:close_sessions()
end

function Engine:close_sessions()
  if self.dst and not self.dst:is_closed() then self.dst:close() end
  if self.src and not self.src:is_closed() then self.src:close() end
end

M.Engine = Engine
M.like = like
return M
