--[[
migrun.preflight: the checks before anything is written (issue 5, step 1; the
runbook's prerequisites): each server is what the config says it is and is
set up as the runbook requires. Reads only: it never writes to any server.

  local preflight = require "migrun.preflight"
  local r = preflight.run{ source = src_db, replica = rep_db, target = tgt_db, config = cfg }
  print(preflight.format(r))
  if r.errors > 0 then ... stop ... end

  preflight.run{ source, replica, target (migrun.db Db values), config (the
      loaded config: slots.prefix, groups, schemas, exclude_tables, preflight),
      resuming = bool, slots_needed = n (default: estimated from config.groups),
      tables = { "schema.name" | {schema=, name=} } (default: the source's
      tables in config.schemas minus config.exclude_tables),
      tools = function(name, major) -> path | nil, why (default: schema.tools
      for the pair, by PostgreSQL's rule: the target's major, else the newest
      at least the source's, with a warning; check_versions below),
      dms = function() -> a migrun.dms client (raising when none can be made):
      phase II is checked too: credentials, DMS reachable and accepting them
      (a read-only call), the replication instance there and available }
    -> { findings = { { server, check, ok, severity = "error" | "warning",
         message, hint, handled, note, action, table, column } }, errors = n,
         warnings = n, handled = n, fidelity = plan (migrun.fidelity.inspect) }
      A finding with ok = true passed; severity says what it would have been.
      The DMS boundary (migrun.fidelity): each table and column DMS would
      break, with what migrun does about it (handled = true, action) or an
      error where nothing can be done safely; notes for what DMS never
      carries (TRUNCATE, DDL); and the target role's privileges for the run
      (no superuser needed). Skipped when args.tables is given.
      The materialized views of the migrated schemas in one line
      (migrun.matviews.preflight): a warning when one has no unique index
      (the cutover's plain REFRESH locks its readers out), a note otherwise.
  preflight.format(result) -> an aligned table, hints under failed rows, and a
      last line with the counts.
  preflight.estimate_slots(config) -> n     largest_alone + explicit groups + 2
]]
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local pgl = require "migrun.pglogical"
local replica_ = require "migrun.replica"
local walguard = require "migrun.walguard"
local text = require "migrun.text"
local fidelity = require "migrun.fidelity"
local catalog = require "migrun.catalog"
local matviews = require "migrun.matviews"
local pgversion = require "migrun.pgversion"
local schema = require "migrun.schema"

local preflight = {}

local GiB = 2 ^ 30
local RUNBOOK_MIN = 10 -- max_replication_slots, max_wal_senders, max_worker_processes in the runbook

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

local function human(n)
  return text.bytes(n)
end

local function version_text(v)
  if v >= 100000 then return ("%d.%d"):format(v // 10000, v % 10000) end
  return ("%d.%d.%d"):format(v // 10000, v // 100 % 100, v % 100)
end

local function major_text(v)
  return v >= 100000 and tostring(v // 10000) or ("%d.%d"):format(v // 10000, v // 100 % 100)
end

local function where(db)
  local i = db.conn:info()
  return ("%s:%s"):format(tostring(i.host), tostring(i.port))
end

function preflight.estimate_slots(config)
  local groups = (config or {}).groups or {}
  return (groups.largest_alone or 5) + #(groups.explicit or {}) + 2
end

local function settings(db, names)
  local quoted = {}
  for i, n in ipairs(names) do quoted[i] = db.conn:escape_literal(n) end
  local res, err = db:query("select name, setting, unit from pg_settings where name in ("
    .. table.concat(quoted, ", ") .. ")")
  if not res then return nil, err end
  local out = {}
  for row in res:rows() do out[row.name] = { setting = row.setting, unit = opt(row.unit) } end
  return out
end

local function list_has(csv, item)
  for part in tostring(csv or ""):gmatch("[^,]+") do
    if part:gsub("^%s+", ""):gsub("%s+$", ""):gsub('^"(.*)"$', "%1") == item then return true end
  end
  return false
end


local function table_label(t)
  if type(t) == "table" then return text.key(t) end
  return t
end

-- The source tables to migrate: config.schemas (default every non-system schema)
-- minus config.exclude_tables.
local function source_tables(db, config)
  local res, err = db:query([[
    select n.nspname as schema, c.relname as name from pg_class c
      join pg_namespace n on n.oid = c.relnamespace
     where c.relkind in ('r', 'p') and ]] .. catalog.not_system_sql("n.nspname") .. [[ order by 1, 2]])
  if not res then return nil, err end
  local schemas, excluded = nil, {}
  if config.schemas then
    schemas = {}
    for _, s in ipairs(config.schemas) do schemas[s] = true end
  end
  for _, t in ipairs(config.exclude_tables or {}) do excluded[t] = true end
  local out = {}
  for row in res:rows() do
    local label = text.key(row)
    if (not schemas or schemas[row.schema]) and not excluded[label] then out[#out + 1] = label end
  end
  return out
end

-- The given tables that exist on the target and hold rows.
local function nonempty_on_target(db, labels)
  local res, err = db:query([[
    select n.nspname || '.' || c.relname as label, n.nspname as schema, c.relname as name
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relkind in ('r', 'p')]])
  if not res then return nil, err end
  local present = {}
  for row in res:rows() do present[row.label] = row end
  local parts, found = {}, {}
  local function flush()
    if #parts == 0 then return true end
    local r, e = db:query(table.concat(parts, " union all "))
    parts = {}
    if not r then return nil, e end
    for row in r:rows() do found[#found + 1] = row.t end
    return true
  end
  for _, label in ipairs(labels) do
    local t = present[label]
    if t then
      parts[#parts + 1] = ("select %s as t where exists (select 1 from %s)"):format(
        db.conn:escape_literal(label), pg.qualify(t.schema, t.name))
      if #parts >= 200 then
        local ok, e = flush()
        if not ok then return nil, e end
      end
    end
  end
  local ok, e = flush()
  if not ok then return nil, e end
  return found
end

-- Every table an explicit group names exists among the tables to migrate.
local function check_explicit_groups(add, explicit, labels)
  local known = {}
  for _, l in ipairs(labels) do known[l] = true end
  local missing = {}
  for _, g in ipairs(explicit) do
    for _, t in ipairs(g.tables or {}) do
      if not known[t] then missing[#missing + 1] = ("%s (group %s)"):format(t, tostring(g.name)) end
    end
  end
  add("source", "explicit groups", #missing == 0, "error",
    #missing == 0 and ("%d explicit group(s), every table found"):format(#explicit)
      or ("not among the tables to migrate: %s"):format(table.concat(missing, ", ")),
    "name existing tables as \"schema.table\" in groups.explicit (and not in exclude_tables)")
end

local CREDENTIAL_CODES = { InvalidClientTokenId = true, UnrecognizedClientException = true,
  InvalidSignatureException = true, SignatureDoesNotMatch = true, AccessDeniedException = true,
  AccessDenied = true, ExpiredTokenException = true, AuthFailure = true }

local function flat(message)
  return (tostring(message):gsub(":%s*\n%s*%-?%s*", ": "):gsub("%s*\n%s*%-?%s*", "; "))
end

-- DMS reachable, the credentials accepted (a read-only call), the
-- replication instance there and available. make_client() -> client (raises
-- on a configuration it cannot use: no credentials, no region).
local function check_dms(add, make_client, dms_config)
  local ok, client = pcall(make_client)
  if not ok then
    add("dms", "credentials", false, "error", flat(client),
      "give AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role")
    return
  end
  add("dms", "credentials", true, "error", ("from %s"):format(tostring(client.config.credential_source)))
  local arn = dms_config.replication_instance_arn
  if not arn then
    add("dms", "replication instance", false, "error", "dms.replication_instance_arn is not set",
      "set dms.replication_instance_arn in the config")
    return
  end
  if client.dry_run and client.config.credential_source == "none (dry run)" then return end
  local list, err = client:describe_replication_instances{ Filters = { ["replication-instance-arn"] = arn } }
  if not list then
    if err.kind == "connection" then
      add("dms", "reachable", false, "error", ("%s: %s"):format(tostring(client.config.endpoint_url), flat(err)),
        "check dms.endpoint_url and region, and the network path from here to DMS")
    elseif CREDENTIAL_CODES[err.code] then
      add("dms", "reachable", true, "error", tostring(client.config.endpoint_url))
      add("dms", "credentials accepted", false, "error", flat(err),
        "the access key or its secret is wrong, expired or not allowed dms:Describe*: fix the credentials")
    else
      add("dms", "replication instance", false, "error", flat(err), "check dms.replication_instance_arn")
    end
    return
  end
  add("dms", "reachable", true, "error", tostring(client.config.endpoint_url))
  local inst = list[1]
  if not inst then
    add("dms", "replication instance", false, "error", ("no replication instance %s"):format(arn),
      "check dms.replication_instance_arn and dms.region")
  else
    local status = tostring(inst.ReplicationInstanceStatus)
    add("dms", "replication instance", status == "available", "error",
      ("%s is %s"):format(tostring(inst.ReplicationInstanceIdentifier or arn), status),
      "wait until the replication instance is available (or fix it) before the run")
  end
end

-- The materialized views (migrun.matviews): nothing carries their rows, migrun
-- refreshes them; a warning where the cutover's refresh will lock readers out.
local function check_matviews(add, result, source, config)
  local list, err = matviews.list(source, { schemas = config.schemas, exclude = config.exclude_tables })
  if not list then return add("source", "materialized views", false, "error", "could not check: " .. tostring(err)) end
  local f = matviews.preflight(list)
  if not f then return end
  if f.severity == "note" then
    result.findings[#result.findings + 1] = { server = "source", check = "materialized views", ok = true,
      severity = "warning", note = true, message = f.message }
  else
    add("source", "materialized views", false, f.severity, f.message, f.hint)
  end
end

----------------------------------------------------------------------------
-- Versions (issue 23): the source's and the target's, and the schema tools
-- for the pair. One function, called once from preflight.run.
-- docs/versions.md says why each rule.
----------------------------------------------------------------------------
local function check_versions(add, sv, tv, lookup)
  local source, target = pgversion.label(sv), pgversion.label(tv)
  local up = pgversion.major_num(tv) >= pgversion.major_num(sv)
  add("target", "version", up, "error",
    up and ("source %s, target %s%s"):format(source, target,
      pgversion.major(sv) == pgversion.major(tv) and " (the same major)" or " (an upgrade)")
    or ("source %s is newer than target %s: a migration never goes to an older major"):format(source, target),
    ("pg_dump refuses a server newer than itself, and its output is not guaranteed to load into an older "
      .. "major (PostgreSQL's pg_dump documentation); AWS DMS wants the target's version equal to the source's "
      .. "or higher: create the target as PostgreSQL %s or later"):format(tostring(pgversion.major(sv))))
  if not up then return end

  local m = tostring(pgversion.major(tv))
  if lookup then -- preflight.run{ tools = ... }: the target's major only, as asked
    for _, tool in ipairs{ "pg_dump", "psql" } do
      local path, why = lookup(tool, m)
      add("target", tool, path ~= nil, "error",
        path and (tool .. " " .. m .. ": " .. path) or (tool .. " " .. m .. ": " .. tostring(why)),
        ("install the client of the target's version: apt-get install postgresql-client-%s"):format(m))
    end
  else
    local tools, err = schema.tools(tv, { source = sv })
    if not tools then
      add("target", "pg_dump", false, "error", ("pg_dump for %s into %s: %s"):format(source, target,
        tostring(err.message or err)), ("install the client of the target's version: apt-get install "
        .. "postgresql-client-%s"):format(m))
    else
      add("target", "pg_dump", true, "error", ("pg_dump %s: %s (%s)"):format(tools.major, tools.pg_dump, tools.rule))
      add("target", "psql", true, "error", ("psql %s: %s"):format(tools.major, tools.psql))
      if tools.note then
        add("target", "pg_dump version", false, "warning", tools.note,
          ("to follow it: apt-get install postgresql-client-%s, then run again"):format(m))
      end
    end
  end

  local lacks = {}
  for _, f in ipairs(pgversion.lacks(sv)) do
    if f.without then
      lacks[#lacks + 1] = ("no %s (from %s): %s"):format(f.what, tostring(pgversion.major(f.since)), f.without)
    end
  end
  if #lacks > 0 then
    add("source", "version features", true, "warning", source .. " has " .. table.concat(lacks, "; "))
  end
end

function preflight.run(args)
  assert(type(args) == "table", "preflight.run: table of arguments expected")
  for _, k in ipairs{ "source", "replica", "target" } do
    assert(type(args[k]) == "table" and args[k].query, "preflight.run: " .. k .. " (a migrun.db Db) expected")
  end
  local config = args.config or {}
  local pf = config.preflight or {}
  local wg = config.wal_guard or {}
  local prefix = (config.slots or {}).prefix or "dms_slot_"
  local source, replica, target = args.source, args.replica, args.target
  local result = { findings = {}, errors = 0, warnings = 0, handled = 0 }

  local function add(server, check, ok, severity, message, hint)
    result.findings[#result.findings + 1] = { server = server, check = check, ok = ok and true or false,
      severity = severity, message = message, hint = (not ok) and hint or nil }
    if not ok then
      if severity == "error" then result.errors = result.errors + 1 else result.warnings = result.warnings + 1 end
    end
  end
  local function failed(server, check, err)
    add(server, check, false, "error", "could not check: " .. tostring(err))
  end

  ---------------------------------------------------------------- source
  local sv = source.conn:server_version()
  local sst, err = replica_.status(source)
  local source_ok = sst ~= nil
  if not sst then failed("source", "role", err) end
  add("source", "version", sv >= 90400, "error", "PostgreSQL " .. version_text(sv),
    "logical decoding with pglogical needs PostgreSQL 9.4 or later")
  if sst and sst.in_recovery then
    source_ok = false
    add("source", "role", false, "error",
      ("source %s is in recovery: it is a standby, not the primary"):format(where(source)),
      "give the primary's conninfo in source.conninfo (the maintenance replica goes in replica.conninfo)")
  elseif sst then
    add("source", "role", true, "error", "primary (not in recovery)")
  end

  if source_ok then
    local s
    s, err = settings(source, { "wal_level", "shared_preload_libraries", "max_replication_slots",
      "max_wal_senders", "max_worker_processes", "track_commit_timestamp", "wal_sender_timeout",
      "output_plugin_libraries" })
    if s and not s.shared_preload_libraries then
      -- pg_settings hides some settings from a role that is not a superuser (nor pg_read_all_settings)
      s, err = nil, "shared_preload_libraries is not visible to the role migrun connects as: DMS CDC on a "
        .. "self-managed source needs a superuser (AWS DMS user guide), give one in source.conninfo"
    end
    if not s then failed("source", "settings", err) else
      add("source", "wal_level", s.wal_level.setting == "logical", "error",
        "wal_level = " .. s.wal_level.setting, "set wal_level = logical and restart the server")
      local preloaded = list_has(s.shared_preload_libraries.setting, "pglogical")
      add("source", "pglogical preloaded", preloaded, "error",
        "shared_preload_libraries = '" .. s.shared_preload_libraries.setting .. "'",
        "add pglogical to shared_preload_libraries and restart the server")
      local res
      res, err = source:query("select (select extversion from pg_extension where extname = 'pglogical') as installed,"
        .. " (select default_version from pg_available_extensions where name = 'pglogical') as available")
      if not res then failed("source", "pglogical extension", err) else
        local installed, available = opt(res[1].installed), opt(res[1].available)
        if installed then
          add("source", "pglogical extension", true, "error", "pglogical " .. installed .. " installed")
        elseif available and preloaded then
          add("source", "pglogical extension", false, "warning",
            "pglogical " .. available .. " is preloaded but not created in this database: "
            .. "the slots step will CREATE EXTENSION pglogical", "or create it yourself before the run")
        elseif available then
          add("source", "pglogical extension", false, "error",
            "pglogical " .. available .. " is available but not installed in this database, nor preloaded",
            "add pglogical to shared_preload_libraries and restart; the slots step then creates the extension")
        else
          add("source", "pglogical extension", false, "error", "pglogical is not installed on the server",
            ("install the package postgresql-%s-pglogical, preload it, then CREATE EXTENSION pglogical"):format(
              major_text(sv)))
        end
      end
      if s.output_plugin_libraries then
        add("source", "output_plugin_libraries", list_has(s.output_plugin_libraries.setting, "pglogical"), "error",
          "output_plugin_libraries = '" .. s.output_plugin_libraries.setting .. "'",
          "add pglogical: output_plugin_libraries = 'pgoutput, test_decoding, pglogical'")
      end
      add("source", "track_commit_timestamp", s.track_commit_timestamp.setting == "on", "error",
        "track_commit_timestamp = " .. s.track_commit_timestamp.setting,
        "set track_commit_timestamp = on and restart the server")
      local wst = tonumber(s.wal_sender_timeout.setting)
      add("source", "wal_sender_timeout", wst == 0 or wst >= 600000, "warning",
        ("wal_sender_timeout = %s"):format(wst == 0 and "0" or (wst // 1000) .. "s"),
        "the runbook sets 0: a DMS task whose walsender waits longer than this is disconnected")

      -- Slots, senders and workers for the planned slots, on top of what others use.
      local slots
      slots, err = pgl.slots(source, { prefix = prefix })
      if not slots then failed("source", "replication slots", err) else
        local needed = args.slots_needed or preflight.estimate_slots(config)
        local foreign, owned_active = {}, 0
        for _, sl in ipairs(slots) do
          if sl.owned then
            if sl.active then owned_active = owned_active + 1 end
          else
            foreign[#foreign + 1] = sl
          end
        end
        local sres = source:query("select count(*) as n from pg_stat_replication")
        local senders = sres and sres[1].n or 0
        local max_slots = tonumber(s.max_replication_slots.setting)
        add("source", "max_replication_slots", max_slots >= needed + #foreign, "error",
          ("%d; needed: %d for migrun + %d other slots"):format(max_slots, needed, #foreign),
          ("set max_replication_slots >= %d (runbook: %d or more) and restart"):format(
            needed + #foreign, RUNBOOK_MIN))
        local max_senders = tonumber(s.max_wal_senders.setting)
        local other_senders = math.max(0, senders - owned_active)
        add("source", "max_wal_senders", max_senders >= needed + other_senders, "error",
          ("%d; needed: %d for migrun + %d in use by others"):format(max_senders, needed, other_senders),
          ("set max_wal_senders >= %d (runbook: %d or more) and restart"):format(
            needed + other_senders, RUNBOOK_MIN))
        local workers = tonumber(s.max_worker_processes.setting)
        add("source", "max_worker_processes", workers >= RUNBOOK_MIN, "warning",
          tostring(workers), ("the runbook sets %d or more (pglogical's supervisor and managers are workers)"):format(
            RUNBOOK_MIN))

        local allowed = {}
        for _, name in ipairs(pf.allow_slots or {}) do allowed[name] = true end
        for _, sl in ipairs(foreign) do
          local what = ("%s slot %s (plugin %s, database %s) %s"):format(sl.slot_type, sl.name,
            tostring(sl.plugin or "-"), tostring(sl.database or "-"),
            sl.active and ("is ACTIVE (pid " .. tostring(sl.active_pid) .. ")") or "is inactive")
          if sl.retained_bytes then what = what .. ", retains " .. human(sl.retained_bytes) end
          if allowed[sl.name] then
            add("source", "foreign slot", true, "error", what .. "; allowed by preflight.allow_slots")
          else
            add("source", "foreign slot", false, "error", what .. ": migrun did not create it",
              (sl.active and "something replicates from this server: " or "")
              .. "find out who uses it (another team's logical replication?) and list it in preflight.allow_slots"
              .. " to go on, or drop it if it is abandoned")
          end
        end
        if #foreign == 0 then add("source", "foreign slots", true, "error", "none") end
        for _, sl in ipairs(slots) do
          if sl.owned and not args.resuming then
            add("source", "migrun slot", false, "warning",
              ("slot %s exists already (an earlier run?) and will be reused"):format(sl.name),
              "if that run was abandoned, drop it (a restart) so CDC does not start from a stale position")
          end
        end
      end

      -- Free disk where the WAL goes (the guard watches it through the run).
      local min_free = pf.min_free_bytes or 10 * GiB
      local disk, why = walguard.free_space(source, wg.source_free_command, "primary")
      if disk then
        add("source", "free disk", disk.free >= min_free, "error",
          ("%s free %s (minimum %s)"):format(human(disk.free),
            disk.dir and ("under " .. disk.dir) or ("by " .. proc.quote(wg.source_free_command)), human(min_free)),
          "slots retain WAL until DMS reads it: free space or raise the disk before starting")
      else
        add("source", "free disk", false, "warning", "could not be measured: " .. tostring(why),
          ("make sure the primary has at least %s free for WAL the slots retain; to have the guard watch it,"
            .. " set wal_guard.source_free_command (an argv list printing its free bytes)"):format(human(min_free)))
      end
    end
  end

  ---------------------------------------------------------------- replica
  local rst
  rst, err = replica_.status(replica)
  if not rst then failed("replica", "role", err) else
    local same_id = sst and rst.system_identifier == sst.system_identifier
    if not rst.in_recovery then
      local msg = ("replica %s is not in recovery: it is a primary"):format(where(replica))
      if same_id then msg = msg .. " (the source itself: same system identifier)" end
      if sst and sst.in_recovery then msg = msg .. "; source and replica look swapped" end
      add("replica", "role", false, "error", msg, "give the maintenance replica's conninfo in replica.conninfo")
    else
      add("replica", "role", true, "error", "standby (in recovery)")
      add("replica", "same cluster", same_id or false, "error",
        same_id and ("system identifier %s, as the source"):format(rst.system_identifier)
          or ("system identifier %s, the source's is %s"):format(rst.system_identifier,
            tostring(sst and sst.system_identifier)),
        "the replica must be a physical standby of the source: give the maintenance replica of this primary")
      local up = rst.upstream
      add("replica", "streaming", up ~= nil and up.status == "streaming", "error",
        up and ("WAL receiver %s from %s:%s"):format(up.status, tostring(up.host), tostring(up.port))
          or "no WAL receiver: not streaming (archive recovery, or disconnected)",
        "the replica must stream from the primary (primary_conninfo) so that its replay position is the source's")
      if up and sst then
        local si = source.conn:info()
        local same = tostring(up.host) == tostring(si.host) and tostring(up.port) == tostring(si.port)
        add("replica", "upstream", same, "warning",
          ("streams from %s:%s; source is %s:%s"):format(tostring(up.host), tostring(up.port),
            tostring(si.host), tostring(si.port)),
          "a cascading standby or another address of the primary: make sure it replays the source's WAL directly")
      end
      -- The paused replica keeps every WAL segment it receives: its disk must
      -- be watched, or the team must say it accepts that it is not.
      local watch = walguard.disk_watch(replica, wg.replica_free_command, wg.replica_disk_unwatched, "replica")
      if watch.watched then
        add("replica", "disk watched", true, "error", watch.message)
      elseif watch.how == "acknowledged" then
        add("replica", "disk watched", false, "warning", watch.message,
          "the paused replica piles WAL up during the full load: watch its disk yourself")
      else
        add("replica", "disk watched", false, "error", watch.message .. "; the guard cannot see it fill during the"
          .. " full load", "set wal_guard.replica_free_command to a command printing its free bytes (an argv list,"
          .. " e.g. { \"ssh\", \"replica-host\", \"df\", \"-B1\", \"--output=avail,size\", \"/var/lib/postgresql\" }),"
          .. " or wal_guard.replica_disk_unwatched = true to go on without it")
      end
      if rst.pause_state ~= "not paused" and not args.resuming then
        add("replica", "replay", false, "warning", "replay is " .. tostring(rst.pause_state),
          "left paused by an earlier run? the pause step reuses it only when resuming")
      end
    end
  end

  ---------------------------------------------------------------- target
  local tv = target.conn:server_version()
  local res
  res, err = target:query("select pg_is_in_recovery() as r, current_database() as db")
  if not res then
    add("target", "reachable", false, "error", "cannot query: " .. tostring(err))
  else
    add("target", "reachable", true, "error", ("PostgreSQL %s, database %s"):format(version_text(tv), res[1].db))
    add("target", "role", not res[1].r, "error",
      res[1].r and ("target %s is in recovery: it is read-only"):format(where(target)) or "accepts writes",
      "give the writable target (RDS) in target.conninfo")
    check_versions(add, sv, tv, args.tools)

    local labels = args.tables
    if labels then
      local l = {}
      for i, t in ipairs(labels) do l[i] = table_label(t) end
      labels = l
    elseif source_ok then
      labels, err = source_tables(source, config)
      if not labels then failed("target", "empty", err) end
    end
    if labels then
      local full
      full, err = nonempty_on_target(target, labels)
      if not full then failed("target", "empty", err)
      elseif #full == 0 then
        add("target", "empty", true, "error", #labels == 0 and "no tables to load found on the source"
          or ("none of the %d tables to load has rows"):format(#labels))
      elseif args.resuming then
        add("target", "empty", true, "error", ("%d tables have rows (resuming)"):format(#full))
      else
        local shown = {}
        for i = 1, math.min(#full, 5) do shown[i] = full[i] end
        add("target", "empty", false, "error",
          ("%d tables to load already have rows: %s%s"):format(#full, table.concat(shown, ", "),
            #full > 5 and ", ..." or ""),
          "the full load needs empty tables: truncate them on the target (or run again with the journal to resume)")
      end
    end

  end

  ---------------------------------------------------------------- the DMS boundary
  -- What DMS CDC into PostgreSQL breaks in this schema (docs/dms-boundary.md),
  -- each table and column with what migrun will do, and what the run needs of
  -- the target role without superuser.
  if source_ok and not args.tables then
    local plan
    plan, err = fidelity.inspect(source, { schemas = config.schemas, exclude = config.exclude_tables })
    if not plan then failed("source", "DMS boundary", err) else
      result.fidelity = plan
      for _, f in ipairs(plan.findings) do
        if f.severity == "handled" or f.severity == "note" then
          result.findings[#result.findings + 1] = { server = "source", check = f.feature, ok = true,
            severity = "warning", handled = f.severity == "handled", note = f.severity == "note",
            message = f.message, action = f.action, table = f.table, column = f.column }
          if f.severity == "handled" then result.handled = result.handled + 1 end
        else
          add("source", f.feature, false, f.severity, f.message, f.action)
          result.findings[#result.findings].table = f.table
          result.findings[#result.findings].column = f.column
        end
      end
      local checks
      checks, err = fidelity.check_target(target, plan)
      if not checks then failed("target", "privileges", err) else
        for _, c in ipairs(checks) do add("target", c.check, c.ok, "error", c.message, c.hint) end
      end
    end
  end

  ---------------------------------------------------------------- materialized views
  if source_ok then check_matviews(add, result, source, config) end

  ---------------------------------------------------------------- the plan
  if source_ok and #((config.groups or {}).explicit or {}) > 0 then
    local labels = source_tables(source, config)
    if labels then check_explicit_groups(add, config.groups.explicit, labels) end
  end

  ---------------------------------------------------------------- DMS (phase II)
  -- Everything phase II needs is checked before phase I writes anything: a
  -- wrong secret found at dms_setup would come after slots and a full load.
  if args.dms then check_dms(add, args.dms, config.dms or {}) end
  return result
end

function preflight.format(result)
  local rows = { { "server", "check", "result", "details" } }
  for _, f in ipairs(result.findings) do
    rows[#rows + 1] = { f.server, f.check,
      f.handled and "handled" or f.note and "note" or f.ok and "ok" or (f.severity == "error" and "ERROR" or "warning"),
      f.message, hint = f.hint, action = f.ok and f.action or nil }
  end
  local width = { 0, 0, 0 }
  for _, r in ipairs(rows) do
    for i = 1, 3 do width[i] = math.max(width[i], utf8.len(r[i]) or #r[i]) end
  end
  local lines = {}
  local function line(r)
    local cells = {}
    for i = 1, 3 do cells[i] = r[i] .. (" "):rep(width[i] - (utf8.len(r[i]) or #r[i])) end
    cells[4] = r[4]
    lines[#lines + 1] = table.concat(cells, "  ")
  end
  line(rows[1])
  local rule = {}
  for i = 1, 3 do rule[i] = ("-"):rep(width[i]) end
  rule[4] = ("-"):rep(7)
  lines[#lines + 1] = table.concat(rule, "  ")
  for i = 2, #rows do
    line(rows[i])
    if rows[i].hint then
      lines[#lines + 1] = (" "):rep(width[1] + width[2] + width[3] + 6) .. "hint: " .. rows[i].hint
    end
    if rows[i].action then
      lines[#lines + 1] = (" "):rep(width[1] + width[2] + width[3] + 6) .. "migrun: " .. rows[i].action
    end
  end
  lines[#lines + 1] = ("%d error%s, %d warning%s"):format(result.errors, result.errors == 1 and "" or "s",
    result.warnings, result.warnings == 1 and "" or "s")
    .. ((result.handled or 0) > 0 and (", %d handled by migrun"):format(result.handled) or "")
  return table.concat(lines, "\n")
end

return preflight
