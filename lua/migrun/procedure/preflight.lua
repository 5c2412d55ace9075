--[[
migrun.preflight: the checks before anything is written (issue 5, step 1; the
runbook's prerequisites; issue 21: every configuration mistake that can be
found before the first write): each server is what the config says it is and
is set up as the runbook requires, and what the config names exists. Reads
only: it never writes to any server. docs/mistakes.md lists every mistake
looked for, here or when the config is read.

  local preflight = require "migrun.preflight"
  local r = preflight.run{ source = src_db, replica = rep_db, target = tgt_db, config = cfg }
  print(preflight.format(r))
  if r.errors > 0 then ... stop ... end

  preflight.run{ source, replica, target (migrun.db Db values), config (the
      loaded config), resuming = bool, replica_pause_expected = bool (the
      run itself paused the replica: its pause_replica step began and
      resume_replica has not; default: resuming), slots_needed = n
      (default: estimated from config.groups),
      tables = { "schema.name" | {schema=, name=} } (default: the source's
      tables in config.schemas minus config.exclude_tables),
      tools = function(name, major) -> path | nil, why (default: schema.tools
      for the pair, by PostgreSQL's rule: the target's major, else the newest
      at least the source's, with a warning; check_versions below),
      dms = function() -> a migrun.dms client (raising when none can be made):
      phase II is checked too: credentials, the region, DMS reachable (a
      probe of its own: preflight.DMS_PROBE tries and timeouts, so an
      unreachable endpoint is said within seconds) and accepting them (a
      read-only call), the replication instance there and available, the
      endpoints DMS will be given (TCP, a password) }
    -> { findings = { { server, check, ok, severity = "error" | "warning",
         message, hint, handled, note, action, table, column } }, errors = n,
         warnings = n, handled = n, fidelity = plan (migrun.fidelity.inspect) }
      A finding with ok = true passed; severity says what it would have been.
      The checks run in the order of preflight.CHECKS, each a function of
      the run's state (what earlier ones found: the source's status, the
      tables to migrate, ...):
        the source: role, version, settings and pglogical, slots, senders and
          workers, foreign slots, free disk; what PostgreSQL lets the slots
          keep (migrun.walkeep: max_slot_wal_keep_size against the WAL rate,
          measured while the other checks run, and the load's estimated
          length; idle_replication_slot_timeout);
        the replica: a streaming standby of the source, its disk watched,
          replay not paused (a replica paused before the run is refused:
          see below);
        the target: not the source nor the replica (migrun.whois: system
          identifier and start time as the servers say), writable, its
          version and the tools, empty, connections free for the load;
        the config's names (migrun.mistakes): schemas, tables and columns
          exist and are in scope, with "did you mean"; qa.queries read-only
          (run on the replica in a read-only transaction); notify and
          stop_writes commands found;
        the DMS boundary (migrun.fidelity): each table and column DMS would
          break, with what migrun does about it (handled = true, action) or
          an error where nothing can be done safely; notes for what DMS never
          carries (TRUNCATE, DDL); and the target role's privileges for the
          run (no superuser needed). Skipped when args.tables is given;
        the materialized views in one line (migrun.matviews.preflight): a
          warning when one has no unique index (the cutover's plain REFRESH
          locks its readers out), a note otherwise;
        DMS (phase II), when args.dms is given.
      A replica whose replay is paused when the run has not paused it is an
      error, with the command that resumes it: migrun's capture point must
      come after its slots' creation (CDC starts there), and a replica paused
      before the run began is paused before slots that do not exist yet, so
      its pause can never be taken as the capture point; resuming it is the
      team's call (someone paused it: a backup, an investigation), never
      migrun's.
  preflight.format(result) -> an aligned table, hints under failed rows, and a
      last line with the counts.
  preflight.estimate_slots(config) -> n     largest_alone + explicit groups + 2, and the watch slot
  preflight.format(result) -> text: errors, then warnings, then what passed,
      then notes; what migrun handles folded into one line per kind
  preflight.report_rows(result), preflight.REPORT_COLUMNS: every finding, for the report
  preflight.CHECKS      { { name, fn(state) } } in order
  preflight.DMS_PROBE   { attempts = 2, connect_timeout = 3, timeout = 10 }
]]
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local pgl = require "migrun.pglogical"
local replica_ = require "migrun.replica"
local walguard = require "migrun.walguard"
local text = require "migrun.text"
local fidelity = require "migrun.fidelity"
local matviews = require "migrun.matviews"
local pgversion = require "migrun.pgversion"
local schema = require "migrun.schema"
local mistakes = require "migrun.mistakes"
local walkeep = require "migrun.walkeep"
local whois = require "migrun.whois"
local host = require "migrun.host"

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
  -- and migrun's watch slot (migrun.watch: the live verification)
  return (groups.largest_alone or 5) + #(groups.explicit or {}) + 2 + 1
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


local function table_label(t)
  if type(t) == "table" then return text.key(t) end
  return t
end

----------------------------------------------------------------------------
-- DMS (phase II), checked before phase I writes anything: a wrong secret or
-- region found at dms_setup would come after slots and a full load.
----------------------------------------------------------------------------

-- The probe's own tries and timeouts: the run's client may try 10 times with
-- backoff (it must ride out a bad hour), which before the first write only
-- delays "DMS is unreachable" by a minute.
preflight.DMS_PROBE = { attempts = 2, connect_timeout = 3, timeout = 10, retry_base = 0.2 }

local CREDENTIAL_CODES = { InvalidClientTokenId = true, UnrecognizedClientException = true,
  InvalidSignatureException = true, SignatureDoesNotMatch = true, AccessDeniedException = true,
  AccessDenied = true, ExpiredTokenException = true, AuthFailure = true }

local function flat(message)
  return (tostring(message):gsub(":%s*\n%s*%-?%s*", ": "):gsub("%s*\n%s*%-?%s*", "; "))
end

-- The client with the probe's tries and timeouts; the run's client is left as it is.
local function probe_of(client)
  local p = preflight.DMS_PROBE
  return setmetatable({ max_attempts = math.min(client.max_attempts, p.attempts), connect_timeout = p.connect_timeout,
    timeout = p.timeout, retry_base = p.retry_base, on_retry = false }, { __index = client })
end

local function region_source(cfg)
  local s = tostring(cfg.region_source or "")
  if s == "explicit region" then return "dms.region" end
  return (s:gsub("^environment ", ""))
end

-- The region the credentials are scoped to, against the instance's ARN and
-- the endpoint's host: a mismatch is the region's fault, not the key's.
local function check_region(add, client, arn)
  local cfg = client.config
  local region, from = tostring(cfg.region), region_source(cfg)
  local arn_region = arn:match("^arn:[^:]+:dms:([^:]+):")
  if arn_region and arn_region ~= region then
    add("dms", "region", false, "error", ("region %s (from %s), but the replication instance is in %s (its ARN)")
      :format(region, from, arn_region), ("set dms.region = %q (or AWS_REGION), or check "
      .. "dms.replication_instance_arn"):format(arn_region))
    return false
  end
  local url_region = tostring(cfg.endpoint_url):match("^https?://dms[%w-]*%.([%w-]+)%.amazonaws%.com")
  if url_region and url_region ~= region then
    add("dms", "region", false, "error", ("region %s (from %s), but dms.endpoint_url %s serves %s"):format(region,
      from, tostring(cfg.endpoint_url), url_region), "make dms.region and dms.endpoint_url name the same region")
    return false
  end
  add("dms", "region", true, "error", ("%s (from %s)"):format(region, from))
  return true
end

-- What a refused signature says about its cause.
local function signature_trouble(err)
  local m = tostring(err.message or "")
  if m:find("scoped to a valid region", 1, true) or m:find("region", 1, true) and m:find("scope", 1, true) then
    return "region", "DMS at this endpoint serves another region than the one the request was signed for: set "
      .. "dms.region (or AWS_REGION) to the replication instance's region, and dms.endpoint_url to match"
  elseif m:find("Signature expired", 1, true) or m:find("earlier or later than", 1, true) then
    return "clock", "this machine's clock is off by more than 15 minutes: set it right (NTP) and run again"
  elseif m:find("correct service", 1, true) then
    return "endpoint", "dms.endpoint_url is not a DMS endpoint: fix it or leave it out"
  end
end

local function check_dms_call(add, client, arn)
  local started = host.monotonic()
  local list, err = probe_of(client):describe_replication_instances{ Filters = { ["replication-instance-arn"] = arn } }
  if not list then
    if err.kind == "connection" then
      add("dms", "reachable", false, "error", ("%s: %s (%d tr%s in %.1f s)"):format(tostring(client.config.endpoint_url),
        flat(err), err.attempts or 1, (err.attempts or 1) == 1 and "y" or "ies", host.monotonic() - started),
        "check dms.endpoint_url and dms.region, and the network path from here to DMS")
      return
    end
    local trouble, hint = signature_trouble(err)
    if trouble then
      add("dms", "reachable", true, "error", tostring(client.config.endpoint_url))
      add("dms", trouble, false, "error", flat(err), hint)
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

-- What the endpoints will be given (migrun.cdc.endpoint_settings): the host
-- and password libpq used, unless dms.*_endpoint overrides them.
local function check_endpoints(add, st)
  for _, kind in ipairs{ "source", "target" } do
    local over = ((st.config.dms or {})[kind .. "_endpoint"]) or {}
    local db = st[kind]
    local h = db.conn:info().host
    if not over.host and (h == nil or h == "" or h:sub(1, 1) == "/") then
      add("dms", kind .. " endpoint", false, "error", ("migrun reaches the %s through a Unix socket (%s); DMS "
        .. "connects over TCP"):format(kind, tostring(h)), ("give the %s's address as host= in %s.conninfo, or "
        .. "dms.%s_endpoint.host"):format(kind, kind, kind))
    elseif not over.password and not db.conn:password() then
      add("dms", kind .. " endpoint", false, "error", ("libpq logged in to the %s without a password (trust or "
        .. "peer authentication?): DMS logs in as migrun did and needs one"):format(kind),
        ("give the role a password (in %s.conninfo from os.getenv, PGPASSWORD or ~/.pgpass), or "
          .. "dms.%s_endpoint.password"):format(kind, kind))
    end
  end
end

local function check_dms(st)
  local add = st.add
  if not st.args.dms then return end
  local ok, client = pcall(st.args.dms)
  if not ok then
    add("dms", "credentials", false, "error", flat(client),
      "give AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role")
    return
  end
  check_endpoints(add, st)
  add("dms", "credentials", true, "error", ("from %s"):format(tostring(client.config.credential_source)))
  local arn = (st.config.dms or {}).replication_instance_arn
  if not arn then
    add("dms", "replication instance", false, "error", "dms.replication_instance_arn is not set",
      "set dms.replication_instance_arn in the config")
    return
  end
  if client.dry_run and client.config.credential_source == "none (dry run)" then return end
  if not check_region(add, client, arn) then return end
  check_dms_call(add, client, arn)
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


----------------------------------------------------------------------------
-- The checks, in order (preflight.CHECKS). Each takes the run's state:
-- st.add(server, check, ok, severity, message, hint), st.failed(server,
-- check, err), st.take(findings), the three Dbs, the config, and what the
-- checks before it found (st.sst, st.source_ok, st.settings, st.scope,
-- st.rst, st.target_ok).
----------------------------------------------------------------------------

local function source_role(st)
  local add, source = st.add, st.source
  st.sv = source.conn:server_version()
  local sst, err = replica_.status(source)
  st.sst, st.source_ok = sst, sst ~= nil
  if not sst then st.failed("source", "role", err) end
  add("source", "version", st.sv >= 90400, "error", "PostgreSQL " .. version_text(st.sv),
    "logical decoding with pglogical needs PostgreSQL 9.4 or later")
  if sst and sst.in_recovery then
    st.source_ok = false
    add("source", "role", false, "error",
      ("source %s is in recovery: it is a standby, not the primary"):format(where(source)),
      "give the primary's conninfo in source.conninfo (the maintenance replica goes in replica.conninfo)")
  elseif sst then
    add("source", "role", true, "error", "primary (not in recovery)")
  end
end

local function pglogical_extension(st, preloaded)
  local add = st.add
  local res, err = st.source:query("select (select extversion from pg_extension where extname = 'pglogical') as installed,"
    .. " (select default_version from pg_available_extensions where name = 'pglogical') as available")
  if not res then return st.failed("source", "pglogical extension", err) end
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
        major_text(st.sv)))
  end
end

local function source_settings(st)
  if not st.source_ok then return end
  local add = st.add
  local s, err = settings(st.source, { "wal_level", "shared_preload_libraries", "max_replication_slots",
    "max_wal_senders", "max_worker_processes", "track_commit_timestamp", "wal_sender_timeout",
    "output_plugin_libraries" })
  if s and not s.shared_preload_libraries then
    -- pg_settings hides some settings from a role that is not a superuser (nor pg_read_all_settings)
    s, err = nil, "shared_preload_libraries is not visible to the role migrun connects as: DMS CDC on a "
      .. "self-managed source needs a superuser (AWS DMS user guide), give one in source.conninfo"
  end
  if not s then return st.failed("source", "settings", err) end
  st.settings = s
  add("source", "wal_level", s.wal_level.setting == "logical", "error",
    "wal_level = " .. s.wal_level.setting, "set wal_level = logical and restart the server")
  local preloaded = list_has(s.shared_preload_libraries.setting, "pglogical")
  add("source", "pglogical preloaded", preloaded, "error",
    "shared_preload_libraries = '" .. s.shared_preload_libraries.setting .. "'",
    "add pglogical to shared_preload_libraries and restart the server")
  pglogical_extension(st, preloaded)
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
end

local function foreign_slots(st, foreign)
  local add = st.add
  local allowed = {}
  for _, name in ipairs(st.pf.allow_slots or {}) do allowed[name] = true end
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
end

-- Slots, senders and workers for the planned slots, on top of what others use.
local function source_slots(st)
  local s = st.settings
  if not s then return end
  local add, source = st.add, st.source
  local slots, err = pgl.slots(source, { prefix = st.prefix })
  if not slots then return st.failed("source", "replication slots", err) end
  local needed = st.args.slots_needed or preflight.estimate_slots(st.config)
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
    ("set max_replication_slots >= %d (runbook: %d or more) and restart"):format(needed + #foreign, RUNBOOK_MIN))
  local max_senders = tonumber(s.max_wal_senders.setting)
  local other_senders = math.max(0, senders - owned_active)
  add("source", "max_wal_senders", max_senders >= needed + other_senders, "error",
    ("%d; needed: %d for migrun + %d in use by others"):format(max_senders, needed, other_senders),
    ("set max_wal_senders >= %d (runbook: %d or more) and restart"):format(needed + other_senders, RUNBOOK_MIN))
  local workers = tonumber(s.max_worker_processes.setting)
  add("source", "max_worker_processes", workers >= RUNBOOK_MIN, "warning",
    tostring(workers), ("the runbook sets %d or more (pglogical's supervisor and managers are workers)"):format(
      RUNBOOK_MIN))
  foreign_slots(st, foreign)
  for _, sl in ipairs(slots) do
    if sl.owned and not st.args.resuming then
      add("source", "migrun slot", false, "warning",
        ("slot %s exists already (an earlier run?) and will be reused"):format(sl.name),
        "if that run was abandoned, drop it (a restart) so CDC does not start from a stale position")
    end
  end
end

-- Free disk where the WAL goes (the guard watches it through the run).
local function source_disk(st)
  if not st.settings then return end
  local wg = st.wg
  local min_free = st.pf.min_free_bytes or 10 * GiB
  local disk, why = walguard.free_space(st.source, wg.source_free_command, "primary")
  if disk then
    st.add("source", "free disk", disk.free >= min_free, "error",
      ("%s free %s (minimum %s)"):format(human(disk.free),
        disk.dir and ("under " .. disk.dir) or ("by " .. proc.quote(wg.source_free_command)), human(min_free)),
      "slots retain WAL until DMS reads it: free space or raise the disk before starting")
  else
    st.add("source", "free disk", false, "warning", "could not be measured: " .. tostring(why),
      ("make sure the primary has at least %s free for WAL the slots retain; to have the guard watch it,"
        .. " set wal_guard.source_free_command (an argv list printing its free bytes)"):format(human(min_free)))
  end
end

-- max_slot_wal_keep_size and the first WAL sample; judged last (wal_kept),
-- so that the rate is measured while the other checks run.
local function wal_keep_start(st)
  if not st.source_ok then return end
  local w, err = walkeep.start(st.source)
  if not w then return st.failed("source", "max_slot_wal_keep_size", err) end
  st.walkeep = w
end

-- The tables the run migrates (catalog.tables, as know_data lists them).
local function scope(st)
  if not st.source_ok then return end
  local s, err = mistakes.scope(st.source, st.config)
  if not s then return st.failed("source", "tables to migrate", err) end
  st.scope = s
end

-- The paused replica keeps every WAL segment it receives: its disk must be
-- watched, or the team must say it accepts that it is not.
local function replica_disk(st)
  local wg = st.wg
  local watch = walguard.disk_watch(st.replica, wg.replica_free_command, wg.replica_disk_unwatched, "replica")
  if watch.watched then
    st.add("replica", "disk watched", true, "error", watch.message)
  elseif watch.how == "acknowledged" then
    st.add("replica", "disk watched", false, "warning", watch.message,
      "the paused replica piles WAL up during the full load: watch its disk yourself")
  else
    st.add("replica", "disk watched", false, "error", watch.message .. "; the guard cannot see it fill during the"
      .. " full load", "set wal_guard.replica_free_command to a command printing its free bytes (an argv list,"
      .. " e.g. { \"ssh\", \"replica-host\", \"df\", \"-B1\", \"--output=avail,size\", \"/var/lib/postgresql\" }),"
      .. " or wal_guard.replica_disk_unwatched = true to go on without it")
  end
end

-- The command a DBA runs on a server, without its password.
local function psql_command(db, sql)
  local i = db.conn:info()
  return proc.quote{ "psql", "-h", tostring(i.host), "-p", tostring(i.port), "-U", tostring(i.user),
    "-d", tostring(i.dbname), "-c", sql }
end

-- A pause the run did not make (see the header): refused, with the command.
local function replica_replay(st, rst)
  local expected = st.args.replica_pause_expected
  if expected == nil then expected = st.args.resuming end
  if rst.pause_state == "not paused" or expected then return end
  st.add("replica", "replay", false, "error",
    ("replay is %s at %s, and this run did not pause it: CDC must start after migrun's slots are created, and "
      .. "a replica paused before that cannot give its start position (the pause step would stop after the slots "
      .. "were created, leaving them to hold WAL)"):format(tostring(rst.pause_state), tostring(rst.replay_lsn)),
    ("find out who paused it (a backup? an investigation?); once it may go on, resume it: %s, then run again: "
      .. "migrun pauses it itself after creating the slots"):format(psql_command(st.replica,
      replica_.sql(st.replica.conn:server_version()).resume)))
end

local function replica_checks(st)
  local add, replica, sst = st.add, st.replica, st.sst
  local rst, err = replica_.status(replica)
  st.rst = rst
  if not rst then return st.failed("replica", "role", err) end
  local same_id = sst and rst.system_identifier == sst.system_identifier
  if not rst.in_recovery then
    local msg = ("replica %s is not in recovery: it is a primary"):format(where(replica))
    if same_id then msg = msg .. " (the source itself: same system identifier)" end
    if sst and sst.in_recovery then msg = msg .. "; source and replica look swapped" end
    add("replica", "role", false, "error", msg, "give the maintenance replica's conninfo in replica.conninfo")
    return
  end
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
    local si = st.source.conn:info()
    local same = tostring(up.host) == tostring(si.host) and tostring(up.port) == tostring(si.port)
    add("replica", "upstream", same, "warning",
      ("streams from %s:%s; source is %s:%s"):format(tostring(up.host), tostring(up.port),
        tostring(si.host), tostring(si.port)),
      "a cascading standby or another address of the primary: make sure it replays the source's WAL directly")
  end
  replica_disk(st)
  replica_replay(st, rst)
end

-- The target is neither the source nor the replica, as the servers say.
local function target_identity(st)
  local t, err = whois.of(st.target)
  if not t then return st.failed("target", "not the source", err) end
  local findings = whois.target(t, whois.of(st.source), whois.of(st.replica))
  st.take(findings)
  st.target_is_other = findings.is_source or findings.is_replica
end

-- Connections for the load's streams (full_load.jobs), its hashing lane
-- (full_load.hash: one worker more) and migrun's own.
local function connections(st, server, db)
  local jobs = ((st.config.full_load or {}).jobs) or 2
  local lane = ((st.config.full_load or {}).hash) ~= false and 1 or 0
  local res, err = db:query([[
    select current_setting('max_connections')::int as max,
           current_setting('superuser_reserved_connections')::int
             + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int as reserved,
           (select count(*) from pg_stat_activity where datname is not null)::int as used]])
  if not res then return st.failed(server, "connections", err) end
  local r = res[1]
  local free, needed = r.max - r.reserved - r.used, jobs + lane + 2
  st.add(server, "connections", free >= needed, "error",
    ("%d free (max_connections %d, %d reserved, %d in use); the load needs %d (full_load.jobs %d, %sand migrun's own)")
      :format(free, r.max, r.reserved, r.used, needed, jobs, lane > 0 and "one hashing as it loads, " or ""),
    ("lower full_load.jobs to %d, or raise max_connections"):format(math.max(1, free - 2 - lane)))
end

local function target_empty(st)
  local labels = st.args.tables
  if labels then
    local l = {}
    for i, t in ipairs(labels) do l[i] = table_label(t) end
    labels = l
  elseif st.scope then
    labels = {}
    for i, t in ipairs(st.scope.tables) do labels[i] = t.key end
  end
  if not labels then return end
  local full, err = nonempty_on_target(st.target, labels)
  if not full then return st.failed("target", "empty", err) end
  if #full == 0 then
    st.add("target", "empty", true, "error", #labels == 0 and "no tables to load found on the source"
      or ("none of the %d tables to load has rows"):format(#labels))
  elseif st.args.resuming then
    st.add("target", "empty", true, "error", ("%d tables have rows (resuming)"):format(#full))
  else
    local shown = {}
    for i = 1, math.min(#full, 5) do shown[i] = full[i] end
    st.add("target", "empty", false, "error",
      ("%d tables to load already have rows: %s%s"):format(#full, table.concat(shown, ", "), #full > 5 and ", ..." or ""),
      "the full load needs empty tables: truncate them on the target (or run again with the journal to resume)")
  end
end

local function target_checks(st)
  local add, target = st.add, st.target
  local tv = target.conn:server_version()
  local res, err = target:query("select pg_is_in_recovery() as r, current_database() as db")
  if not res then return add("target", "reachable", false, "error", "cannot query: " .. tostring(err)) end
  add("target", "reachable", true, "error", ("PostgreSQL %s, database %s"):format(version_text(tv), res[1].db))
  target_identity(st)
  -- the source or the replica given as the target: what follows would advise
  -- on the wrong server ("truncate them on the target")
  if st.target_is_other then return end
  st.target_ok = true
  add("target", "role", not res[1].r, "error",
    res[1].r and ("target %s is in recovery: it is read-only"):format(where(target)) or "accepts writes",
    "give the writable target (RDS) in target.conninfo")
  check_versions(add, st.sv, tv, st.args.tools)
  target_empty(st)
  if not res[1].r then connections(st, "target", target) end
  if st.rst and st.rst.in_recovery then connections(st, "replica", st.replica) end
end

-- What the config names: schemas, tables, columns, queries, commands.
local function config_names(st)
  if st.scope then mistakes.names(st.source, st.config, st.scope, st.result.findings) end
  local queries = (st.config.qa or {}).queries or {}
  if #queries > 0 then
    local on_replica = st.rst and st.rst.in_recovery
    local db = on_replica and st.replica or (st.source_ok and st.source)
    if db then
      mistakes.queries(db, queries, { timeout = st.pf.query_timeout, server = on_replica and "replica" or "source" },
        st.result.findings)
    end
  end
  mistakes.commands(st.config, st.result.findings)
end

-- What DMS CDC into PostgreSQL breaks in this schema (docs/dms-boundary.md),
-- each table and column with what migrun will do, and what the run needs of
-- the target role without superuser.
local function boundary(st)
  if not st.source_ok or st.args.tables then return end
  local result, add = st.result, st.add
  local plan, err = fidelity.inspect(st.source, { schemas = st.config.schemas, exclude = st.config.exclude_tables })
  if not plan then return st.failed("source", "DMS boundary", err) end
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
  if not st.target_ok then return end
  local checks
  checks, err = fidelity.check_target(st.target, plan)
  if not checks then return st.failed("target", "privileges", err) end
  for _, c in ipairs(checks) do add("target", c.check, c.ok, "error", c.message, c.hint) end
end

local function materialized_views(st)
  if st.source_ok then check_matviews(st.add, st.result, st.source, st.config) end
end

-- Judged last: the WAL rate over what the other checks took (at least
-- preflight.wal_rate_seconds), against the load's estimated length.
local function wal_kept(st)
  if not st.walkeep then return end
  st.take(walkeep.finish(st.walkeep, { seconds = st.pf.wal_rate_seconds, data_bytes = st.scope and st.scope.bytes,
    load_rate = st.pf.load_rate, stop_bytes = st.wg.stop_bytes }))
end

preflight.CHECKS = {
  { "source role", source_role },
  { "source settings", source_settings },
  { "source slots", source_slots },
  { "source disk", source_disk },
  { "WAL kept (start)", wal_keep_start },
  { "tables to migrate", scope },
  { "replica", replica_checks },
  { "target", target_checks },
  { "names in the config", config_names },
  { "DMS boundary", boundary },
  { "materialized views", materialized_views },
  { "DMS", check_dms },
  { "WAL kept", wal_kept },
}

local function new_state(args)
  local config = args.config or {}
  local result = { findings = {}, errors = 0, warnings = 0, handled = 0 }
  local st = { args = args, config = config, pf = config.preflight or {}, wg = config.wal_guard or {},
    prefix = (config.slots or {}).prefix or "dms_slot_", source = args.source, replica = args.replica,
    target = args.target, result = result }
  function st.add(server, check, ok, severity, message, hint)
    result.findings[#result.findings + 1] = { server = server, check = check, ok = ok and true or false,
      severity = severity, message = message, hint = (not ok) and hint or nil }
  end
  function st.failed(server, check, err)
    st.add(server, check, false, "error", "could not check: " .. tostring(err))
  end
  function st.take(findings)
    for _, f in ipairs(findings) do st.add(f.server, f.check, f.ok, f.severity, f.message, f.hint) end
  end
  return st
end

function preflight.run(args)
  assert(type(args) == "table", "preflight.run: table of arguments expected")
  for _, k in ipairs{ "source", "replica", "target" } do
    assert(type(args[k]) == "table" and args[k].query, "preflight.run: " .. k .. " (a migrun.db Db) expected")
  end
  local st = new_state(args)
  for _, c in ipairs(preflight.CHECKS) do c[2](st) end
  -- counted from the findings: the modules append theirs (migrun.mistakes)
  local result = st.result
  for _, f in ipairs(result.findings) do
    if not f.ok and not f.handled and not f.note then
      if f.severity == "error" then result.errors = result.errors + 1 else result.warnings = result.warnings + 1 end
    end
  end
  return result
end

local function verdict(f)
  return f.handled and "handled" or f.note and "note" or f.ok and "ok" or (f.severity == "error" and "ERROR" or "warning")
end

-- The order people read in: what stops the run, what to look at, what
-- passed, then notes; what migrun handles folded into one line per kind
-- (its full list is in the report: preflight.report_rows).
local RANK = { ERROR = 1, warning = 2, ok = 3, handled = 4, note = 5 }

local function folded(findings)
  local out, kinds = {}, {}
  for i, f in ipairs(findings) do
    local v = verdict(f)
    if v == "handled" then
      local k = f.server .. "\0" .. f.check
      local kind = kinds[k]
      if not kind then
        kind = { server = f.server, check = f.check, handled = true, ok = true, count = 0, objects = {},
                 action = f.action, rank = RANK.handled, order = i }
        kinds[k] = kind
        out[#out + 1] = kind
      end
      kind.count = kind.count + 1
      if f.table then kind.objects[#kind.objects + 1] = f.table .. (f.column and ("." .. f.column) or "") end
      if kind.action ~= f.action then kind.mixed = true end
    else
      out[#out + 1] = { finding = f, rank = RANK[v], order = i }
    end
  end
  table.sort(out, function(x, y)
    if x.rank ~= y.rank then return x.rank < y.rank end
    return x.order < y.order
  end)
  local list = {}
  for _, e in ipairs(out) do
    if e.finding then
      list[#list + 1] = e.finding
    elseif e.count == 1 then
      list[#list + 1] = findings[e.order]
    else
      local shown = table.concat(e.objects, ", ", 1, math.min(#e.objects, 4))
      if #e.objects > 4 then shown = shown .. (", and %d more"):format(#e.objects - 4) end
      list[#list + 1] = { server = e.server, check = e.check, handled = true, ok = true,
        message = ("%d of them%s (each in the report)"):format(e.count, shown ~= "" and (": " .. shown) or ""),
        action = not e.mixed and e.action or nil }
    end
  end
  return list
end

function preflight.format(result)
  local rows = { { "server", "check", "result", "details" } }
  for _, f in ipairs(folded(result.findings)) do
    rows[#rows + 1] = { f.server, f.check, verdict(f), f.message, hint = f.hint, action = f.ok and f.action or nil }
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

-- Every finding, one row each, for the report.
preflight.REPORT_COLUMNS = { "server", "check", "result", "details", "what to do / what migrun does" }
function preflight.report_rows(result)
  local rows = {}
  for _, f in ipairs(result.findings) do
    rows[#rows + 1] = { f.server, f.check, verdict(f), f.message, f.hint or f.action or "" }
  end
  return rows
end

return preflight
