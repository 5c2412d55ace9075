--[[
migrun.mistakes: what the configuration names, checked against the servers
and this machine before anything is written (issue 21; docs/mistakes.md
lists every mistake migrun looks for and where). What the file alone can
say (types, ranges, identifiers, a table in two groups) is checked when it
is read (migrun.playbook.config); this is what needs the source's catalog,
a server to run a query on, or this machine's PATH. Reads only.

  local mistakes = require "migrun.mistakes"
  local scope = assert(mistakes.scope(source, config))
  local findings = mistakes.names(source, config, scope)        -- tables, schemas, columns
  mistakes.queries(replica, config.qa.queries, { timeout = 10 }, findings)
  mistakes.commands(config, findings)

Each function appends preflight findings ({ server, check, ok, severity =
"error" | "warning", message, hint }) to the list it is given (or a new one)
and returns it. Every message says what is wrong, what it would cause, and
the hint what to do.

  mistakes.scope(db, config) -> scope | nil, err
      scope = { tables = catalog.tables' list for config.schemas (those
      that exist) minus exclude_tables, by_key = { ["s.t"] = table },
      parents = { ["s.root"] = { its partitions } }, relations = { ["s.t"] =
      relkind } (every relation outside the system schemas: r, p, v, m, f),
      schemas = { [name] = true } (non-system), bytes = the tables' size }
  mistakes.names(db, config, scope, findings) -> findings
      schemas: each exists and is not a system schema; exclude_tables: each
      exists (else the table meant to be kept out is migrated);
      groups.explicit: each table among the tables to migrate (a partitioned
      table's partitions are, not itself); lobs.tables: likewise (else its
      policy, truncation_ok = false's protection included, is silently
      dropped), and a table DMS cannot give a table-settings rule to (a % in
      its name) when truncation is not acceptable; dms.task.batch_apply =
      true where DMS refuses batch apply for a table; qa.timestamp_columns: the
      table in scope (its partitions or itself), the column there and a date
      or timestamp; cutover.count_only: in scope. A name not found gets the
      nearest one ("did you mean").
  mistakes.queries(db, queries, opts, findings) -> findings
      Each qa.queries entry, on db (the maintenance replica: a hot standby
      refuses every write whatever the query does), in a READ ONLY
      transaction rolled back, through the extended protocol (one statement,
      nothing smuggled after a ";"), wrapped as a subquery ("select * from
      (<sql>) as q": PostgreSQL refuses there anything but one query: no DML,
      no SELECT INTO, no data-modifying WITH): EXPLAIN first (syntax, names,
      no LockRows or ModifyTable in the plan), then run it, at most
      opts.timeout seconds (default 10), which catches a function that
      writes. Longer: judged by its plan, said so. opts.server names db in
      the findings (default "replica").
  mistakes.commands(config, findings) -> findings
      notify.command and a cutover.stop_writes command: the program exists
      and is executable (a path, or found in PATH), so that it does not fail
      only when the first event fires or in the cutover window; a webhook
      over plain http to another machine is a warning (its URL, the secret,
      would travel in clear).
  mistakes.which(program) -> path | nil   PATH lookup (a name with / as is)
]]
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local catalog = require "migrun.catalog"
local text = require "migrun.text"

local mistakes = {}

local function finding(findings, server, check, ok, severity, message, hint)
  findings[#findings + 1] = { server = server, check = check, ok = ok and true or false, severity = severity,
    message = message, hint = (not ok) and hint or nil }
end

---------------------------------------------------------------------------
-- What the source has, and what the run migrates
---------------------------------------------------------------------------

function mistakes.scope(db, config)
  assert(db and db.query, "mistakes.scope: a migrun.db Db expected")
  config = config or {}
  local res, err = db:query([[
    select n.nspname as schema, c.relname as name, c.relkind::text as kind
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relkind in ('r', 'p', 'v', 'm', 'f') and ]] .. catalog.not_system_sql("n.nspname"))
  if not res then return nil, err end
  local relations = {}
  for row in res:rows() do relations[text.key(row.schema, row.name)] = row.kind end
  res, err = db:query("select nspname from pg_namespace where " .. catalog.not_system_sql("nspname"))
  if not res then return nil, err end
  local schemas = {}
  for row in res:rows() do schemas[row.nspname] = true end
  local wanted
  if config.schemas then
    wanted = {}
    for _, s in ipairs(config.schemas) do
      if schemas[s] then wanted[#wanted + 1] = s end
    end
  end
  local tables
  tables, err = catalog.tables(db, { schemas = wanted, exclude = config.exclude_tables })
  if not tables then return nil, err end
  local by_key, parents, bytes = {}, {}, 0
  for _, t in ipairs(tables) do
    by_key[t.key] = t
    bytes = bytes + (t.bytes or 0)
    if t.partition_of then
      parents[t.partition_of] = parents[t.partition_of] or {}
      table.insert(parents[t.partition_of], t)
    end
  end
  return { tables = tables, by_key = by_key, parents = parents, relations = relations, schemas = schemas,
           bytes = bytes }
end

---------------------------------------------------------------------------
-- Names
---------------------------------------------------------------------------

local KIND = { v = "a view", m = "a materialized view", f = "a foreign table", p = "a partitioned table" }

local function sorted_keys(t)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out)
  return out
end

local function did_you_mean(word, names)
  local near = text.nearest(word, names)
  return near and (" (did you mean %s?)"):format(near) or ""
end

-- Why key is not among the tables to migrate, or nil when it is.
-- parents_ok: a partitioned table stands for its partitions here.
local function not_in_scope(key, config, scope, parents_ok)
  if scope.by_key[key] or (parents_ok and scope.parents[key]) then return nil end
  local kind = scope.relations[key]
  if not kind then
    local near = did_you_mean(key, sorted_keys(scope.relations))
    return "no such table on the source" .. near
  end
  for _, x in ipairs(config.exclude_tables or {}) do
    if x == key then return "it is in exclude_tables" end
  end
  if scope.parents[key] then
    local names = {}
    for i, t in ipairs(scope.parents[key]) do
      if i > 3 then names[#names + 1] = "..." break end
      names[#names + 1] = t.key
    end
    return ("it is partitioned: its partitions replicate by their own names (%s): name them"):format(
      table.concat(names, ", "))
  end
  if kind ~= "r" and kind ~= "p" then return ("it is %s, not a table"):format(KIND[kind] or kind) end
  local schema = key:match("^([^.]+)%.")
  if config.schemas then
    local listed = false
    for _, s in ipairs(config.schemas) do listed = listed or s == schema end
    if not listed then return ("its schema %s is not among schemas"):format(schema) end
  end
  return "it is not migrated (a table of an extension, or of partitions excluded)"
end

local function check_schemas(findings, config, scope)
  local known = sorted_keys(scope.schemas)
  for i, s in ipairs(config.schemas or {}) do
    if not scope.schemas[s] then
      local system = catalog.is_system_schema(s)
      finding(findings, "source", "schemas", false, "error",
        system and ("schemas[%d] = %s is a system schema: migrun never migrates it"):format(i, s)
          or ("schemas[%d] = %s: no such schema on the source%s: nothing of it would be migrated"):format(i, s,
            did_you_mean(s, known)),
        "name the source's schemas in schemas (as the source spells them), or leave schemas out for all of them")
    end
  end
  -- migrun names a table "schema.table" (its journal, groups, keys): a
  -- schema whose name holds a dot would be read back as another table's
  local dotted = {}
  for _, t in ipairs(scope.tables) do
    if t.schema:find(".", 1, true) and not dotted[t.schema] then
      dotted[t.schema] = true
      finding(findings, "source", "schemas", false, "error",
        ("schema %s holds a dot in its name: migrun names tables \"schema.table\" and cannot tell where "
          .. "such a schema's name ends"):format(pg.quote_ident(t.schema)),
        "rename the schema on the source (ALTER SCHEMA ... RENAME TO ...) before the migration, "
          .. "or leave it out with schemas = { ... }")
    end
  end
end

local function check_excluded(findings, config, scope)
  local all = sorted_keys(scope.relations)
  for i, key in ipairs(config.exclude_tables or {}) do
    if not scope.relations[key] then
      finding(findings, "source", "exclude_tables", false, "error",
        ("exclude_tables[%d] = %s: no such table on the source%s: the table meant to be left out would be "
          .. "migrated"):format(i, key, did_you_mean(key, all)),
        "name it as \"schema.table\" the way the source spells it")
    end
  end
end

local function check_groups(findings, config, scope)
  for _, g in ipairs((config.groups or {}).explicit or {}) do
    for _, key in ipairs(g.tables or {}) do
      local why = not_in_scope(key, config, scope, false)
      if why then
        finding(findings, "source", "explicit groups", false, "error",
          ("%s (group %s) is not among the tables to migrate: %s; the groups step would stop after the schema "
            .. "is restored"):format(key, tostring(g.name), why),
          "name tables to migrate as \"schema.table\" in groups.explicit")
      end
    end
  end
end

-- DMS takes exact names in a table-settings rule and reads % as a wildcard
-- (builders.table_mappings refuses it, at dms_setup).
local function strict_with_percent(findings, config, scope)
  local lobs = config.lobs or {}
  local default_ok = (lobs.default or {}).truncation_ok
  for _, t in ipairs(scope.tables) do
    if #(t.lob_columns or {}) > 0 and (t.schema .. t.name):find("%", 1, true) then
      local policy = (lobs.tables or {})[t.key] or {}
      local ok = policy.truncation_ok
      if ok == nil then ok = default_ok end
      if ok == false then
        finding(findings, "source", "LOB policy", false, "error",
          ("%s has LOB columns and truncation_ok = false, but a %% in its name: DMS's table-settings rule (full "
            .. "LOB mode) needs an exact name and reads %% as a wildcard"):format(t.key),
          ("rename the table, or accept truncation for it: lobs.tables[%q] = { truncation_ok = true }"):format(t.key))
      end
    end
  end
end

local function check_lobs(findings, config, scope)
  for _, key in ipairs(sorted_keys((config.lobs or {}).tables or {})) do
    local why = not_in_scope(key, config, scope, false)
    if why then
      finding(findings, "source", "LOB policy", false, "error",
        ("lobs.tables[%q] is not among the tables to migrate: %s; its policy (truncation_ok = false's protection "
          .. "included) would apply to nothing"):format(key, why),
        "name tables to migrate as \"schema.table\" in lobs.tables")
    end
  end
  strict_with_percent(findings, config, scope)
end

-- dms.task.batch_apply = true forces batch apply on every group, and DMS
-- refuses it for a table with a primary key and a separate unique constraint
-- or one in full LOB mode (builders.check): the groups step would stop, after
-- the schema step has written to the target.
local function check_batch_apply(findings, config, scope)
  if (((config.dms or {}).task or {}).batch_apply) ~= true then return end
  local lobs = config.lobs or {}
  local why = {}
  for _, t in ipairs(scope.tables) do
    local ok = ((lobs.tables or {})[t.key] or {}).truncation_ok
    if ok == nil then ok = (lobs.default or {}).truncation_ok end
    if t.has_pk and t.separate_unique then
      why[#why + 1] = t.key .. " (a primary key and a separate unique constraint)"
    elseif #(t.lob_columns or {}) > 0 and ok == false then
      why[#why + 1] = t.key .. " (full LOB mode: truncation_ok = false)"
    end
  end
  if #why == 0 then return end
  local shown = table.concat(why, ", ", 1, math.min(#why, 4)) .. (#why > 4 and (", and %d more"):format(#why - 4) or "")
  finding(findings, "source", "batch apply", false, "error",
    ("dms.task.batch_apply = true, but DMS refuses batch apply for %d table(s): %s; the groups step would stop "
      .. "once the schema is restored"):format(#why, shown),
    "leave dms.task.batch_apply out: batch apply is then off only for the groups that need it")
end

local TIMESTAMP = { timestamp = true, timestamptz = true, date = true }

local function check_timestamp_columns(findings, config, scope)
  local cols = (config.qa or {}).timestamp_columns or {}
  for _, key in ipairs(sorted_keys(cols)) do
    local column = cols[key]
    local where = ("qa.timestamp_columns[%q] = %s"):format(key, column)
    local why = not_in_scope(key, config, scope, true)
    local t = scope.by_key[key] or (scope.parents[key] or {})[1]
    if why then
      finding(findings, "source", "QA timestamp column", false, "error",
        ("%s: %s is not among the tables to migrate: %s"):format(where, key, why),
        "name a table to migrate as \"schema.table\" in qa.timestamp_columns")
    else
      local found, names = nil, {}
      for _, c in ipairs(t.columns or {}) do
        names[#names + 1] = c.name
        if c.name == column then found = c end
      end
      if not found then
        finding(findings, "source", "QA timestamp column", false, "error",
          ("%s: %s has no column %s%s: the QA would count its rows without the per-month check"):format(where, key,
            column, did_you_mean(column, names)), "name one of its date or timestamp columns")
      elseif not TIMESTAMP[found.base_type] then
        finding(findings, "source", "QA timestamp column", false, "error",
          ("%s: the column is of type %s: the per-month counts need a date or a timestamp"):format(where, found.type),
          "name one of its date or timestamp columns")
      end
    end
  end
end

local function check_count_only(findings, config, scope)
  for i, key in ipairs((config.cutover or {}).count_only or {}) do
    local why = not_in_scope(key, config, scope, true)
    if why then
      finding(findings, "source", "count_only", false, "error",
        ("cutover.count_only[%d] = %s is not among the tables to migrate: %s"):format(i, key, why),
        "name tables to migrate as \"schema.table\" in cutover.count_only")
    end
  end
end

function mistakes.names(db, config, scope, findings)
  assert(db and db.query and type(scope) == "table", "mistakes.names: a Db, the config and a scope expected")
  findings = findings or {}
  config = config or {}
  local before = #findings
  check_schemas(findings, config, scope)
  check_excluded(findings, config, scope)
  check_groups(findings, config, scope)
  check_lobs(findings, config, scope)
  check_batch_apply(findings, config, scope)
  check_timestamp_columns(findings, config, scope)
  check_count_only(findings, config, scope)
  local named = #(config.schemas or {}) + #(config.exclude_tables or {}) + #((config.cutover or {}).count_only or {})
  for _, g in ipairs((config.groups or {}).explicit or {}) do named = named + #(g.tables or {}) end
  named = named + #sorted_keys((config.lobs or {}).tables or {}) + #sorted_keys((config.qa or {}).timestamp_columns or {})
  if #findings == before and named > 0 then
    finding(findings, "source", "names in the config", true, "error",
      ("every schema, table and column the config names found (%d)"):format(named))
  end
  return findings
end

---------------------------------------------------------------------------
-- qa.queries
---------------------------------------------------------------------------

-- The query as one SELECT: a trailing ";" taken off (with a line comment
-- after it), a newline before the closing parenthesis so that a trailing --
-- comment does not swallow it.
function mistakes.wrap(sql)
  sql = sql:gsub("%s+$", ""):gsub(";%s*%-%-[^\n]*$", ";"):gsub("[%s;]+$", "")
  return "select * from (\n" .. sql .. "\n) as migrun_qa_check where $1::int = 1"
end

local WRITES_IN_PLAN = { "Insert on", "Update on", "Delete on", "Merge on", "ModifyTable", "LockRows" }

local function judge_query(db, q, timeout)
  local wrapped = mistakes.wrap(q.sql)
  local res, err = db:query{ "explain " .. wrapped, 1 }
  if not res then return "error", "is not one read-only query: " .. tostring(err.message or err) end
  local plan = {}
  for row in res:rows() do plan[#plan + 1] = row["QUERY PLAN"] end
  plan = table.concat(plan, "\n")
  for _, w in ipairs(WRITES_IN_PLAN) do
    if plan:find(w, 1, true) then return "error", ("writes or locks rows (its plan has %s)"):format(w) end
  end
  res, err = db:query{ wrapped, 1, timeout = timeout }
  if res then return "ok", "is read-only: it ran in a read-only transaction" end
  if err.kind == "timeout" or err.sqlstate == "57014" then
    return "ok", ("took longer than %s here: judged by its plan, which writes nothing"):format(text.duration(timeout))
  end
  if err.sqlstate == "25006" then return "error", "writes: " .. tostring(err.message) end
  if err.sqlstate == "40001" then
    return "ok", "cancelled by the replica's recovery: judged by its plan, which writes nothing"
  end
  return "error", "fails: " .. tostring(err.message or err)
end

function mistakes.queries(db, queries, opts, findings)
  assert(db and db.query, "mistakes.queries: a migrun.db Db expected")
  findings, opts = findings or {}, opts or {}
  local timeout = opts.timeout or 10
  for i, q in ipairs(queries or {}) do
    local what = ("qa.queries[%d] (%s)"):format(i, tostring(q.name))
    local began, berr = db:query("begin transaction read only")
    local verdict, message
    if not began then
      verdict, message = "error", "could not be checked: " .. tostring(berr)
    else
      local ok, v, m = pcall(judge_query, db, q, timeout)
      db:query("rollback")
      if not ok then error(v, 0) end
      verdict, message = v, m
    end
    finding(findings, opts.server or "replica", "QA query", verdict == "ok", "error", ("%s %s"):format(what, message),
      "qa.queries are run on both sides by the QA: give one read-only SELECT (no writes, no function that "
        .. "writes, no FOR UPDATE), tried on the source's tables")
  end
  return findings
end

---------------------------------------------------------------------------
-- Commands and webhooks
---------------------------------------------------------------------------

local function executable(path)
  local ok = proc.run{ "test", "-f", path, "-a", "-x", path }
  return ok == true
end

function mistakes.which(program)
  assert(type(program) == "string", "mistakes.which: a program name expected")
  if program:find("/", 1, true) then return executable(program) and program or nil end
  for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    local p = dir .. "/" .. program
    if executable(p) then return p end
  end
end

local LOOPBACK = { localhost = true, ["127.0.0.1"] = true, ["[::1]"] = true }

function mistakes.commands(config, findings)
  findings = findings or {}
  config = config or {}
  local n = config.notify or {}
  local commands = {}
  if n.command and n.command[1] then
    commands[#commands + 1] = { "notify.command", n.command[1], "the notifications would fail when the first event fires" }
  end
  local stop = (config.cutover or {}).stop_writes
  if type(stop) == "table" and stop[1] then
    commands[#commands + 1] = { "cutover.stop_writes", stop[1], "the cutover would fail in its window, writes not stopped" }
  end
  for _, c in ipairs(commands) do
    local path = mistakes.which(c[2])
    finding(findings, "migrun", c[1], path ~= nil, "error",
      path and ("%s: %s"):format(c[2], path)
        or ("%s: no executable %s %s: %s"):format(c[1], c[2], c[2]:find("/", 1, true) and "there" or "in PATH", c[3]),
      ("install it or give its full path as the first element of %s (an argv list, run without a shell)"):format(c[1]))
  end
  if type(n.webhook) == "string" then
    local scheme, h = n.webhook:match("^(%a+)://([^/:?#]+)")
    if scheme and scheme:lower() == "http" and not LOOPBACK[(h or ""):lower()] then
      finding(findings, "migrun", "notify.webhook", false, "warning",
        ("the webhook is plain http to %s: its URL (often the secret itself) and every event travel unencrypted"):format(h),
        "use its https:// URL")
    end
  end
  return findings
end

return mistakes
