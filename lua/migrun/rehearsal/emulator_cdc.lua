--[[ CDC for the DMS emulator (migrun.rehearsal.emulator): a running CDC task reads
the pglogical slot of its source endpoint with pg_logical_slot_peek_changes
(JSON protocol, replication sets <slot> and i<slot>), skips transactions that
committed before its CdcStartPosition, applies the others to the target in
commit order (one target transaction each, a savepoint per change), then
confirms them with pg_replication_slot_advance. What DMS does that is modelled:
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
  * limited LOB mode: a LOB column value longer than LobMaxSize KB is cut
    (on a UTF-8 boundary) and "[SOURCE_CAPTURE ]W: Value of column ..." is
    logged; FailTasksOnLobTruncation on the source endpoint fails the task;
    SupportLobs=false leaves LOB columns out; a table-settings rule's
    lob-settings override that per table (unlimited: nothing is cut; limited:
    cut at its bulk-max-size KB; none: the task's settings);
  * a change the target rejects goes to awsdms_apply_exceptions (LOG_ERROR);
    an UPDATE that finds no row too; a DELETE that finds none is ignored;
  * BatchApplyEnabled on a table whose target has a primary key and another
    unique constraint: the table is suspended ("Table error") and its
    changes are not applied;
  * awsdms_status (when ControlTablesSettings.StatusTableEnabled) and
    awsdms_apply_exceptions (always) in ControlTablesSettings.ControlSchema.
Start position: a transaction is skipped when its commit record starts
before the start LSN (PostgreSQL's own rule for a logical start point). ]]
local pg = require "migrun.pg"
local lsn = require "migrun.lsn"
local json = require "migrun.json"
local text = require "migrun.text"

local M = {}

local Engine = {}
Engine.__index = Engine

-- PostgreSQL types DMS treats as LOBs (dms-api.md §8)
local LOB_TYPES = { text = true, json = true, jsonb = true, xml = true, bytea = true, tsvector = true,
  hstore = true, ["character varying"] = true }

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
    target_ep = o.target, tables = {} }, Engine)
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

  local err
  e.src, err = connect(o.source, "source")
  if not e.src then return nil, "Failed to connect to the source endpoint: " .. tostring(err) end
  e.dst, err = connect(o.target, "target")
  if not e.dst then e.src:close() return nil, "Failed to connect to the target endpoint: " .. tostring(err) end
  if e.after_connect and e.after_connect ~= "" then
    local ok, aerr = e.dst:exec(e.after_connect)
    if not ok then
      e:close()
      return nil, ("The target endpoint's after connect script failed: %s"):format(tostring(aerr.message or aerr))
    end
  end
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
    target_schema = self.target_schema or schema, cols = {}, pk = {} }
  self.tables[key] = t
  if not t.selected then return t end
  local res = self.src:exec([[select a.attname, format_type(a.atttypid, a.atttypmod) as type,
      coalesce(a.attnum = any(i.indkey), false) as pk
    from pg_attribute a
    left join pg_index i on i.indrelid = a.attrelid and i.indisprimary
    where a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass and a.attnum > 0 and not a.attisdropped
    order by a.attnum]], schema, name)
  for row in (res and res:rows() or function() end) do
    t.cols[row.attname] = row.type
    if row.pk then t.pk[#t.pk + 1] = row.attname end
  end
  t.qualified = pg.qualify(t.target_schema, name)
  local tres = self.dst:exec([[select a.attname, format_type(a.atttypid, a.atttypmod) as type
    from pg_attribute a where a.attrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2))
      and a.attnum > 0 and not a.attisdropped]], t.target_schema, name)
  t.target_cols = {}
  for row in (tres and tres:rows() or function() end) do t.target_cols[row.attname] = row.type end
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

local CHANGES_SQL = [[
select c.ord, c.lsn::text as lsn, c.d->>'action' as action, c.d->'relation'->>0 as nsp,
  c.d->'relation'->>1 as rel, c.d->>'final_lsn' as final_lsn, c.d->>'end_lsn' as end_lsn,
  c.d->>'commit_time' as commit_time, t.which, t.key, t.value, t.jtype
from (select row_number() over () as ord, lsn, data::json as d
      from pg_logical_slot_peek_changes($1, NULL, $2, 'min_proto_version', '1', 'max_proto_version', '1',
        'startup_params_format', '1', 'proto_format', 'json', 'pglogical.replication_set_names', $3)) c
left join lateral (
  select 'n' as which, key, value #>> '{}' as value, json_typeof(value) as jtype, o from json_each(c.d->'newtuple') with ordinality as x(key, value, o)
  union all
  select 'o', key, value #>> '{}', json_typeof(value), o from json_each(c.d->'oldtuple') with ordinality as y(key, value, o)
) t on true
order by c.ord, t.which, t.o]]

-- Reads the slot: a list of transactions {final_lsn=, end_lsn=, commit_time=, changes={...}}.
function Engine:_read()
  local res, err = self.src:exec(CHANGES_SQL, self.slot, 1000, self.slot .. ",i" .. self.slot)
  if not res then return nil, "Error reading replication slot '" .. self.slot .. "': " .. tostring(err.message or err) end
  local txs, tx, change, last_ord = {}, nil, nil, nil
  for row in res:rows() do
    if row.ord ~= last_ord then
      last_ord = row.ord
      change = nil
      local a = row.action
      if a == "B" then
        tx = { changes = {}, commit_time = row.commit_time ~= pg.null and row.commit_time or nil }
      elseif a == "C" then
        if tx then
          tx.final_lsn, tx.end_lsn = lsn(row.final_lsn), lsn(row.end_lsn)
          txs[#txs + 1] = tx
        end
        tx = nil
      elseif (a == "I" or a == "U" or a == "D") and tx then
        change = { action = a, schema = row.nsp, name = row.rel, lsn = row.lsn, new = {}, old = {}, order = {} }
        tx.changes[#tx.changes + 1] = change
      end
    end
    if change and row.which ~= pg.null then
      local side = row.which == "n" and change.new or change.old
      side[row.key] = { value = row.value ~= pg.null and row.value or nil, jtype = row.jtype }
      if row.which == "n" or change.action == "D" then
        if not change.seen then change.seen = {} end
        if not change.seen[row.key] then
          change.seen[row.key] = true
          change.order[#change.order + 1] = row.key
        end
      end
    end
  end
  return txs
end

-- utf-8-safe cut to at most n bytes
local function cut(s, n)
  local i = n
  while i > 0 and (s:byte(i + 1) or 0) >= 0x80 and (s:byte(i + 1) or 0) < 0xC0 do i = i - 1 end
  return s:sub(1, i)
end

-- A column value as a query parameter (text), with the LOB rules applied.
function Engine:_value(t, col, v)
  if v == nil or v.jtype == "null" or v.value == nil then return pg.null end
  local value = v.value
  local ctype = t.cols[col] or ""
  local is_lob = LOB_TYPES[ctype] or ctype:sub(-2) == "[]"
  local limit = self.lob_rules[text.key(t.schema, t.name)]
  if limit == nil then limit = self.limited_lobs and self.lob_max end
  if is_lob and limit and #value > limit then
    self:log("SOURCE_CAPTURE", "W", ("Value of column '%s' in table '%s.%s' was truncated to %d bytes, "
      .. "actual length: %d bytes"):format(col, t.schema, t.name, limit, #value))
    if self.fail_on_truncation then
      error({ fatal = ("LOB value of column '%s' in table '%s.%s' exceeds LobMaxSize and "
        .. "FailTasksOnLobTruncation is set"):format(col, t.schema, t.name) })
    end
    value = cut(value, limit)
  end
  if ctype == "numeric" and self.numeric_as_string and #value > 1000 then
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

-- The SQL of parameter i for column col: arrays from their JSON form; an
-- unbounded numeric through DMS's NUMERIC(28,6) unless carried as a string.
function Engine:_placeholder(t, col, i)
  local ttype = t.target_cols[col]
  if ttype and ttype:sub(-2) == "[]" then
    return ("(select array_agg(x) from json_array_elements_text($%d::json) x)::%s"):format(i, ttype)
  end
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
    local ctype = t.cols[col] or ""
    if self.removed(t.schema, t.name, col) then return false end
    return self.support_lobs or not (LOB_TYPES[ctype] or ctype:sub(-2) == "[]")
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
function Engine:poll()
  local txs, err = self:_read()
  if not txs then return nil, err end
  if #txs == 0 then return true end
  local last_end, applied_time
  for _, tx in ipairs(txs) do
    if tx.final_lsn >= self.start then
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
  if self.dst and not self.dst:is_closed() then
    pcall(self._status, self, "NOT RUNNING")
    self.dst:close()
  end
  if self.src and not self.src:is_closed() then self.src:close() end
end

M.Engine = Engine
M.like = like
return M
