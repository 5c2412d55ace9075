--[[
migrun.playbook.config: the migration's configuration file. One Lua file per migration
(default ./migration.lua) returns a table; this module runs it in a small
sandbox, checks it against one declared schema (config.SCHEMA: every key with
its type, default and documentation), fills the defaults and resolves paths.

  local config = require "migrun.playbook.config"
  local cfg, err = config.load("migration.lua")
  if not cfg then io.stderr:write(tostring(err), "\n") os.exit(2) end
  print(cfg.name, cfg.state_dir, cfg.wal_guard.stop_bytes)

  config.load(path) -> cfg | nil, err
      The file runs with only os.getenv, string, math, table and the safe base
      functions (so passwords can come from the environment). Every problem
      is an error of kind "config" whose message names the file, the key path,
      what was expected and what was found:
        migration.lua: dms.start_pause: expected a number of seconds >= 0, found "five"
        migration.lua: dms.start_paus: unknown key (did you mean dms.start_pause?)
      Connection strings are checked with libpq's parser; their values (and
      any password) are never shown. After loading, cfg.state_dir is absolute
      (relative paths are taken from the config file's directory),
      cfg.config_path is the file's absolute path, and every default is
      filled in (schemas stays nil: every non-system schema).
  config.check(tbl, file_label, base_dir) -> cfg | nil, err   the same, on a table
  config.describe() -> text   every key with its default and documentation
  config.SCHEMA               the schema itself
  config.nearest(word, names) -> the name closest to word (a typo's "did you
      mean"), or nil when none is close; names: a list of strings
  config.DMS_SSL_MODES        the SslMode values DMS takes for an endpoint

Every number is checked against the range it may take when the file is read
(LOB sizes against DMS's LobMaxSize limit, ports, percentages), names that
become identifiers against their rules (slots.prefix, slots.node and the
explicit groups' names: PostgreSQL slot names), and what the keys say
together: a table in two explicit groups, or excluded and still named by a
group, a LOB policy, a QA setting or cutover.count_only; a conninfo whose
sslmode DMS would refuse for its endpoint. What needs the servers (the tables
existing, the queries read-only, ...) is preflight's (docs/mistakes.md).
]]
local pg = require "migrun.pg"
local host = require "migrun.host"
local text = require "migrun.text"
local errors = require "migrun.error"
local notify = require "migrun.playbook.notify"
local builders = require "migrun.dms.builders"

local config = {}

---------------------------------------------------------------------------
-- The schema: node constructors. Every node has doc, and optionally
-- default, required, expected (what messages say was expected) and check
-- (value -> nil | what is wrong with it).
---------------------------------------------------------------------------

local function node(kind, spec)
  spec.kind = kind
  return spec
end
local function str(spec) return node("string", spec) end
local function int(spec) return node("integer", spec) end
local function num(spec) return node("number", spec) end
local function bool(spec) return node("boolean", spec) end
local function any(spec) return node("any", spec) end         -- any value; spec.check says what fits
local function list(of, spec) spec.of = of return node("list", spec) end
local function map(key, value, spec) spec.key, spec.value = key, value return node("map", spec) end
-- fields: ordered { {name, node}, ... } so describe() follows the file's order
local function record(fields, spec) spec = spec or {} spec.fields = fields return node("record", spec) end

local GiB = 2 ^ 30

local function at_least(min, what)
  return function(v) if v < min then return what end end
end

local function within(min, max, what)
  return function(v) if v < min or v > max then return what end end
end

-- An http(s) URL with a host (and a port from 1 to 65535 when given): a
-- webhook or an endpoint that is not one fails only when first used.
local URL = "an http:// or https:// URL with a host"
local function url_problem(v)
  local scheme, rest = v:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme or not (scheme:lower() == "http" or scheme:lower() == "https") or rest:match("%s") then
    return URL
  end
  local authority = rest:match("^([^/?#]*)"):gsub("^.*@", "")
  local h, port = authority:match("^(%[[%x:.]+%]):?(%d*)$")
  if not h then h, port = authority:match("^([%w._~-]+):?(%d*)$") end
  if not h or authority:match(":$") then return URL end
  if port ~= "" and (tonumber(port) < 1 or tonumber(port) > 65535) then return URL .. " (a port from 1 to 65535)" end
end

-- PostgreSQL names slots and pglogical nodes with lower-case letters, digits
-- and underscores, at most NAMEDATALEN - 1 = 63 bytes. migrun names its slots
-- <prefix>01, <prefix>02, ... and its watch slot <prefix>watch, and pglogical
-- sets i<slot>: the prefix leaves room for the longest suffix.
local MAX_NAME = 63
local MAX_PREFIX = MAX_NAME - #"watch"
local SLOT_PREFIX = ("lower-case letters, digits and _ only, at most %d bytes (PostgreSQL's rule for slot names: "
  .. "<prefix>01, ... and <prefix>watch must fit in %d)"):format(MAX_PREFIX, MAX_NAME)
local NODE_NAME = ("lower-case letters, digits and _ only, at most %d bytes"):format(MAX_NAME)
local GROUP_NAME = ("a group name of letters, digits, _ and - starting with a letter, at most %d bytes"):format(MAX_NAME)

-- DMS's SslMode for an endpoint (dms-api.md 2.1); libpq's sslmode has more
-- values (disable, allow, prefer) that DMS refuses.
config.DMS_SSL_MODES = { "none", "require", "verify-ca", "verify-full" }
local SSL_MODE = {}
for _, m in ipairs(config.DMS_SSL_MODES) do SSL_MODE[m] = true end
local SSL_EXPECTED = "one of " .. table.concat(config.DMS_SSL_MODES, ", ") .. " (DMS's SslMode)"

local LOB_KB = ("a whole number of KB from 1 to %d (%d MB: the largest LobMaxSize DMS recommends; for "
  .. "larger values set truncation_ok = false, full LOB mode has no size limit)"):format(builders.MAX_LOB_MAX_KB,
  builders.MAX_LOB_MAX_KB // 1024)

local table_name = str{
  expected = 'a table name "schema.name"',
  check = function(v)
    if not v:match("^[^.]+%.[^.]+$") then return 'a table name "schema.name"' end
  end,
}

local function conninfo(server)
  return record({
    { "conninfo", str{ required = true, secret = true,
      expected = "a libpq connection string",
      doc = ("connection string of the %s (libpq keywords or a URI; a password may come from " ..
             "os.getenv, and is never printed)"):format(server),
      validate = "conninfo" } },
  }, { required = true, doc = server })
end

-- defaults: { max_kb =, truncation_ok = } or nil (per-table entries: from lobs.default)
local function lob_policy(defaults)
  defaults = defaults or {}
  return {
    { "max_kb", int{ default = defaults.max_kb, check = within(1, builders.MAX_LOB_MAX_KB, LOB_KB),
      expected = LOB_KB, doc = "largest LOB value DMS copies (limited LOB mode), in KB" } },
    { "truncation_ok", bool{ default = defaults.truncation_ok,
      doc = "whether values above max_kb may be truncated (false: the run stops when " ..
            "a larger value exists)" } },
  }
end

local function bytes(default, doc)
  return num{ default = default, check = at_least(0, "a number of bytes >= 0"),
              expected = "a number of bytes >= 0", doc = doc }
end

local function seconds(default, doc, min)
  min = min or 0
  local what = ("a number of seconds >= %s"):format(min)
  return num{ default = default, check = at_least(min, what), expected = what, doc = doc }
end

local function percent(doc)
  return num{ check = function(v) if v < 0 or v > 100 then return "a percentage from 0 to 100" end end,
              expected = "a percentage from 0 to 100", doc = doc }
end

-- A command of the team's as an argv list, run as is (no shell).
local function argv_list(doc)
  return any{ expected = 'a command as an argv list { "prog", "arg", ... }',
    check = function(v)
      if type(v) ~= "table" or #v < 1 then return 'a command as an argv list { "prog", "arg", ... }' end
      for k, a in pairs(v) do
        if math.type(k) ~= "integer" or type(a) ~= "string" then return "an argv list of strings" end
      end
    end, doc = doc }
end

local function count(default, doc, min)
  min = min or 0
  local what = ("a whole number >= %d"):format(min)
  return int{ default = default, check = at_least(min, what), expected = what, doc = doc }
end

-- The overrides of a DMS endpoint's definition (migrun.cdc.endpoint_settings,
-- migrun.dms.builders), every key checked: a typo or a value DMS refuses is
-- found when the file is read, not at dms_setup after the full load.
-- server_name, database, username and sslmode (DMS's and libpq's spellings)
-- are taken as host, dbname, user and ssl_mode, the names migrun reads.
local ENDPOINT_ALIASES = { server_name = "host", database = "dbname", username = "user", sslmode = "ssl_mode" }

local function endpoint_overrides(kind)
  local ssl = function(doc)
    return str{ expected = SSL_EXPECTED, check = function(v) if not SSL_MODE[v] then return SSL_EXPECTED end end,
      doc = doc }
  end
  local host = function(doc)
    return str{ expected = "a host name or address DMS connects to over TCP",
      check = function(v)
        if v == "" or v:sub(1, 1) == "/" then
          return "a host name or address DMS connects to over TCP (not a Unix socket directory)"
        end
      end, doc = doc }
  end
  local fields = {
    { "host", host("the server's name or address as DMS reaches it (default: what libpq connected to)") },
    { "server_name", host("the same as host (DMS's name for it)") },
    { "port", int{ check = within(1, 65535, "a port from 1 to 65535"), expected = "a port from 1 to 65535",
      doc = "the port DMS connects to (default: the conninfo's)" } },
    { "dbname", str{ doc = "the database (default: the conninfo's)" } },
    { "database", str{ doc = "the same as dbname" } },
    { "user", str{ doc = "the role DMS logs in as (default: the conninfo's)" } },
    { "username", str{ doc = "the same as user" } },
    { "password", str{ secret = true, doc = "its password (default: what libpq logged in with); never logged" } },
    { "ssl_mode", ssl("SslMode (default: the conninfo's sslmode, which must then be one DMS takes)") },
    { "sslmode", ssl("the same as ssl_mode") },
    { "map_unbounded_numeric", bool{ doc = "MapUnboundedNumericAsString (default: from the DMS boundary)" } },
  }
  if kind == "source" then
    fields[#fields + 1] = { "heartbeat", any{ expected = "true, or the heartbeat's period in whole minutes >= 1",
      check = function(v)
        if v == true or v == false or (math.type(v) == "integer" and v >= 1) then return nil end
        return "true, or the heartbeat's period in whole minutes >= 1"
      end, doc = "HeartbeatEnable (and HeartbeatFrequency in minutes): DMS writes to the source so idle slots advance" } }
    fields[#fields + 1] = { "capture_ddls", bool{ doc = "CaptureDdls (default: false, the DMS boundary's)" } }
  else
    fields[#fields + 1] = { "after_connect_script", str{ doc = "AfterConnectScript (default: from the DMS boundary)" } }
  end
  return record(fields, { default = {}, doc = ("overrides of the %s endpoint%s (host, port, ssl_mode, ...)"):format(
      kind, kind == "source" and "s" or ""),
    check = function(v)
      for alias, name in pairs(ENDPOINT_ALIASES) do
        if v[alias] ~= nil and v[name] ~= nil and v[alias] ~= v[name] then
          return ("%s and %s name the same setting with two values: give one"):format(name, alias)
        end
      end
    end })
end

-- What the keys say together, once each is checked (see the header).
local function excluded_but_named(cfg)
  local excluded = {}
  for _, t in ipairs(cfg.exclude_tables) do excluded[t] = true end
  local function named(path, t)
    if excluded[t] then
      return { path = path, message = ("%s is in exclude_tables: an excluded table is not migrated, so this "
        .. "setting would never apply"):format(t),
        hint = "remove it from exclude_tables to migrate it, or from here" }
    end
  end
  for i, g in ipairs(cfg.groups.explicit) do
    for j, t in ipairs(g.tables) do
      local p = named(("groups.explicit[%d].tables[%d]"):format(i, j), t)
      if p then return p end
    end
  end
  for _, k in ipairs{ { "lobs", "tables" }, { "qa", "timestamp_columns" } } do
    local keys = {}
    for t in pairs(cfg[k[1]][k[2]]) do keys[#keys + 1] = t end
    table.sort(keys)
    for _, t in ipairs(keys) do
      local p = named(("%s.%s[%q]"):format(k[1], k[2], t), t)
      if p then return p end
    end
  end
  for i, t in ipairs(cfg.cutover.count_only) do
    local p = named(("cutover.count_only[%d]"):format(i), t)
    if p then return p end
  end
end

-- The sslmode of a conninfo becomes the endpoint's SslMode unless overridden.
local function ssl_modes(cfg)
  for _, kind in ipairs{ "source", "target" } do
    local over = cfg.dms[kind .. "_endpoint"] or {}
    local parsed = pg.conninfo_parse(cfg[kind].conninfo) or {}
    local mode = parsed.sslmode
    if mode and not (over.ssl_mode or over.sslmode) and not SSL_MODE[mode] then
      return { path = kind .. ".conninfo", message = ("sslmode=%s becomes the DMS %s endpoint's SslMode, which "
        .. "takes %s: DMS would refuse the endpoint at dms_setup, after the full load"):format(mode, kind,
        table.concat(config.DMS_SSL_MODES, ", ")),
        hint = ("set dms.%s_endpoint.ssl_mode (\"require\", or \"none\" for no TLS), or sslmode=require in %s.conninfo")
          :format(kind, kind) }
    end
  end
end

config.SCHEMA = record({
  { "name", str{ default = "migration",
    expected = "a name of letters, digits and hyphens starting with a letter",
    check = function(v)
      if not v:match("^%a[%w-]*$") or v:match("%-%-") or v:match("%-$") or #v > 40 then
        return "a name of letters, digits and hyphens starting with a letter (at most 40)"
      end
    end,
    doc = "names this migration: DMS identifiers and the report title" } },
  { "state_dir", str{ default = "migrun-state",
    doc = "journal, report and log; relative to the config file's directory" } },
  { "source", conninfo("source primary (where the slots are created)") },
  { "replica", conninfo("maintenance streaming replica (paused for the full load)") },
  { "target", conninfo("target (RDS)") },
  { "schemas", list(str{}, { doc = "schemas to migrate (default: every non-system schema)" }) },
  { "exclude_tables", list(table_name, { default = {}, doc = "tables not migrated" }) },
  { "children_env", list(str{}, { default = {}, doc = "variables every child also gets (docs/environment.md)" }) },
  { "slots", record({
    { "prefix", str{ default = "dms_slot_", expected = SLOT_PREFIX,
      check = function(v) if not v:match("^[a-z0-9_]+$") or #v > MAX_PREFIX then return SLOT_PREFIX end end,
      doc = "replication slots are <prefix>01, <prefix>02, ... (and the watch slot <prefix>watch)" } },
    { "node", str{ default = "migrun_provider", expected = NODE_NAME,
      check = function(v) if not v:match("^[a-z0-9_]+$") or #v > MAX_NAME then return NODE_NAME end end,
      doc = "name of the pglogical node on the source" } },
  }, { doc = "slot naming" }) },
  { "groups", record({
    { "largest_alone", count(5, "each of the N largest tables gets its own group (and slot)") },
    { "explicit", list(record({
        { "name", str{ required = true, expected = GROUP_NAME, doc = "group name",
          check = function(v) if not v:match("^%a[%w_-]*$") or #v > MAX_NAME then return GROUP_NAME end end } },
        { "tables", list(table_name, { required = true, doc = "tables of the group (at least one)",
          check = function(v) if #v == 0 then return "at least one table \"schema.name\"" end end }) },
      }), { default = {}, doc = "the team's groups; they override the computed ones",
        -- a table replicates through one slot: two groups would make two tasks write it
        check = function(groups, path)
          local names, owner = {}, {}
          for i, g in ipairs(groups) do
            if names[g.name] then
              return { path = ("%s[%d].name"):format(path, i), message = ("a second group named %q (groups are "
                .. "told apart by name in the plan and the report)"):format(g.name), hint = "rename one of them" }
            end
            names[g.name] = true
            for j, t in ipairs(g.tables) do
              if owner[t] then
                return { path = ("%s[%d].tables[%d]"):format(path, i, j), message = ("%s is already in group %q: "
                  .. "a table replicates through one slot, so it can be in one group only"):format(t, owner[t]),
                  hint = "keep it in one of the two groups" }
              end
              owner[t] = g.name
            end
          end
        end }) },
  }, { doc = "how tables are grouped into slots and DMS tasks" }) },
  { "lobs", record({
    { "default", record(lob_policy{ max_kb = 32, truncation_ok = true }, { doc = "policy for every table not listed below" }) },
    { "tables", map(table_name, record(lob_policy()), { default = {},
      doc = "per-table policy; missing fields come from lobs.default" }) },
  }, { doc = "LOB policy (DMS limited LOB mode)" }) },
  { "know_data", record({
    -- catalog.write_rates divides by it: 0 would stop know_data, after the schema step
    { "write_rate_seconds", seconds(5, "seconds over which write rates are sampled on the primary", 0.1) },
  }, { doc = "knowing the data" }) },
  { "full_load", record({
    { "jobs", count(2, "parallel streams for the full load (and the final QA's row-hash sessions on each side)", 1) },
    { "chunk_bytes", num{ check = at_least(1024 * 1024, "a number of bytes >= 1 MiB"),
      expected = "a number of bytes >= 1 MiB",
      doc = "size of the chunks a large table is cut into (default: the data to load / (4 x jobs), "
        .. "between 64 MiB and 1 GiB)" } },
    { "split_bytes", bytes(nil, "tables larger than this are cut into chunks that load in parallel and "
      .. "resume one by one (default: 2 x chunk_bytes)") },
    { "analyze", bool{ default = true,
      doc = "ANALYZE each table on the target as soon as it is loaded and indexed" } },
    { "hash", bool{ default = true,
      doc = "hash each chunk and table on the replica and the target as soon as it commits (while its pages are "
        .. "in the cache), so that the QA step after the load reads the tables it proved equal no more" } },
    { "reconnect_timeout", seconds(300, "how long migrun connects again, every 2 s, to a server whose connection "
      .. "was lost (a restart, a failover, a network that failed or stalled) before it stops: the full load's "
      .. "workers, and every step's connections (docs/faults.md)", 1) },
    { "attempts", int{ default = 5, check = within(1, 100, "a whole number from 1 to 100"),
      expected = "a whole number from 1 to 100",
      doc = "how many times the full load runs a chunk, a table, an index build or an ANALYZE whose connection "
        .. "was lost before it stops (a full disk is never tried again)" } },
  }, { doc = "the full load from the paused replica" }) },
  { "qa", record({
    { "timestamp_column", str{ default = "created_at",
      doc = "per-month counts use this column where a table has it" } },
    { "timestamp_columns", map(table_name, str{}, { default = {},
      doc = "per-table timestamp column overrides" }) },
    { "large_tables", count(5, "per-month counts for the N largest tables") },
    { "small_sample", count(10, "and for a random sample of N other tables; exact counts for the rest") },
    { "queries", list(record({
        { "name", str{ required = true, doc = "what the query measures" } },
        { "sql", str{ required = true, expected = "a read-only query (one SELECT)",
          check = function(v) if not v:match("%S") then return "a read-only query (one SELECT)" end end,
          doc = "a read-only query run on both sides (preflight runs it once in a read-only transaction)" } },
      }), { default = {}, doc = "extra queries compared between source and target",
        check = function(queries, path)
          local seen = {}
          for i, q in ipairs(queries) do
            if seen[q.name] then
              return { path = ("%s[%d].name"):format(path, i), message = ("a second query named %q (the QA report "
                .. "tells them apart by name)"):format(q.name), hint = "rename one of them" }
            end
            seen[q.name] = true
          end
        end }) },
  }, { doc = "quality checks" }) },
  { "wal_guard", record({
    { "warn_bytes", bytes(50 * GiB, "warn when migrun's slots hold back this much WAL (current LSN minus " ..
      "their oldest restart_lsn)") },
    { "stop_bytes", bytes(200 * GiB, "stop the run when they hold back this much") },
    { "warn_free_percent", percent("warn when the primary's WAL disk has less free space, in percent " ..
      "(needs its free space: on this machine, or source_free_command)") },
    { "stop_free_percent", percent("stop when the primary's WAL disk has less free space, in percent") },
    { "warn_ahead", seconds(3600, "warn when, at the rate of the last rate_window seconds, the stop " ..
      "threshold or a full disk on the primary comes within this many seconds") },
    { "rate_window", seconds(600, "seconds of history the WAL rate is measured over", 1) },
    { "replica_min_free_bytes", bytes(20 * GiB, "stop when the paused replica has less free disk") },
    { "replica_min_free_percent", percent("stop when the paused replica's WAL disk has less free space, in percent") },
    { "source_free_command", argv_list("prints the primary's free disk in bytes (then, optionally, the " ..
      "disk's size), for a primary on another machine") },
    { "replica_free_command", argv_list("prints the replica's free disk in bytes (then, optionally, the " ..
      "disk's size), for a replica on another machine") },
    { "replica_disk_unwatched", bool{ default = false,
      doc = "go on without watching the replica's disk when it cannot be measured (another machine " ..
            "and no replica_free_command): preflight stops otherwise" } },
    { "interval", seconds(30, "seconds between checks", 1) },
  }, { doc = "the guard: WAL held back on the primary and disks, checked through every step",
       check = function(v)
         if v.warn_bytes > v.stop_bytes then return "warn_bytes <= stop_bytes" end
         if v.warn_free_percent and v.stop_free_percent and v.warn_free_percent < v.stop_free_percent then
           return "warn_free_percent >= stop_free_percent (warned with more free space than the stop)"
         end
       end }) },
  { "schema_drift", record({
    { "on_change", str{ default = "stop", expected = '"stop" or "warn"',
      check = function(v) if v ~= "stop" and v ~= "warn" then return '"stop" or "warn"' end end,
      doc = "what the guard does when the source's schema (tables, columns, types, constraints) changes " ..
            "after know_data: DMS does not carry DDL through pglogical" } },
  }, { doc = "schema drift on the source during the migration" }) },
  { "preflight", record({
    { "allow_slots", list(str{}, { default = {},
      doc = "replication slots not created by migrun that may exist on the source" }) },
    { "min_free_bytes", bytes(10 * GiB, "free disk the source must have") },
    { "wal_rate_seconds", seconds(5, "seconds over which preflight measures the source's WAL rate when "
      .. "max_slot_wal_keep_size limits what the slots may hold (0: not measured); taken while the other checks run") },
    { "load_rate", num{ default = 32 * 1024 * 1024, check = at_least(1024 * 1024, "a number of bytes per second >= 1 MiB"),
      expected = "a number of bytes per second >= 1 MiB",
      doc = "the full load's expected speed, in bytes per second: preflight estimates from it how long the "
        .. "slots hold WAL before DMS reads it (docs/mistakes.md)" } },
    { "query_timeout", seconds(10, "seconds each qa.queries entry may run when preflight runs it read-only "
      .. "on the replica (longer: checked by its plan only)", 0.1) },
  }, { doc = "preflight checks" }) },
  { "dms", record({
    { "region", str{ doc = "AWS region (default: AWS_REGION / the profile)" } },
    { "endpoint_url", str{ expected = URL, check = url_problem,
      doc = "DMS API endpoint (the emulator in rehearsals; default: AWS)" } },
    { "logs_endpoint_url", str{ expected = URL, check = url_problem,
      doc = "CloudWatch Logs API endpoint, where the task logs are read (default: endpoint_url when given, else AWS)" } },
    { "replication_instance_arn", str{ expected = "an ARN (arn:...)",
      check = function(v) if not v:match("^arn:") then return "an ARN (arn:...)" end end,
      doc = "the replication instance the tasks run on" } },
    { "source_endpoint", endpoint_overrides("source") },
    { "target_endpoint", endpoint_overrides("target") },
    { "task", record({
      { "batch_apply", bool{ doc = "BatchApplyEnabled (default: DMS's)" } },
      { "lob_max_kb", int{ check = within(1, builders.MAX_LOB_MAX_KB, LOB_KB),
        expected = LOB_KB, doc = "LobMaxSize for every task (default: from lobs)" } },
    }, { doc = "task settings" }) },
    { "start_pause", seconds(5, "seconds between task starts") },
    { "max_attempts", int{ check = at_least(1, "a whole number >= 1"), expected = "a whole number >= 1",
      doc = "tries per DMS API call before giving up (default: AWS_MAX_ATTEMPTS, else 10)" } },
    { "catch_up", record({
      { "lag_bytes", bytes(1024 * 1024, "a task has caught up when its slot lags less than this") },
      { "timeout", seconds(6 * 3600, "give up waiting for catch-up after this many seconds") },
      { "poll", seconds(5, "seconds between polls", 0.1) },
    }, { doc = "watching the catch-up" }) },
  }, { doc = "AWS DMS" }) },
  { "cutover", record({
    { "stop_writes", any{ default = "none",
      expected = '"none", "read_only" or a command as an argv list { "prog", "arg", ... }',
      check = function(v)
        if v == "none" or v == "read_only" then return nil end
        if type(v) == "table" and #v >= 1 then
          for k, a in pairs(v) do
            if math.type(k) ~= "integer" or type(a) ~= "string" then return "an argv list of strings" end
          end
          return nil
        end
        return '"none", "read_only" or a command as an argv list { "prog", "arg", ... }'
      end,
      doc = 'how writes stop on the source before the final LSN: "none" (the team stopped them), ' ..
            '"read_only" (ALTER DATABASE ... SET default_transaction_read_only = on) or a command ' ..
            '(argv list, run as is)' } },
    { "existing_sessions", str{ default = "wait", expected = '"wait" or "terminate"',
      check = function(v) if v ~= "wait" and v ~= "terminate" then return '"wait" or "terminate"' end end,
      doc = 'read_only: sessions opened before (which keep writing) are waited for, or terminated ' ..
            '(pg_terminate_backend; never those of the role migrun and DMS connect as, never replication connections)' } },
    { "sessions_timeout", seconds(300, "give up waiting for those sessions to end after this many seconds") },
    { "apply_timeout", seconds(1800, "give up waiting for the tasks to apply the final LSN after this many seconds") },
    { "sequence_margin", count(1000, "target sequences are set this many increments past the source's last value") },
    { "count_only", list(table_name, { default = {},
      doc = "tables the final QA compares by row count only (tables without a primary key, whose " ..
            "updates and deletes DMS cannot carry, when the team accepts that)" }) },
    { "stop_timeout", seconds(600, "give up waiting for the tasks to stop after this many seconds") },
  }, { doc = "cutover (playbooks/cutover.lua)" }) },
  { "restart", record({
    { "target", str{ default = "truncate", expected = '"truncate" or "drop_schema"',
      check = function(v)
        if v ~= "truncate" and v ~= "drop_schema" then return '"truncate" or "drop_schema"' end
      end,
      doc = "how full_restart.lua empties the target: truncate the migrated tables (the schema, "
        .. "indexes and roles stay) or drop_schema (drop the migrated schemas and restore them again)" } },
  }, { doc = "restarts (playbooks/partial_restart.lua, playbooks/full_restart.lua)" }) },
  { "notify", record({
    { "command", list(str{}, { expected = "a command as an argv list { \"prog\", \"arg\", ... }",
      doc = "run on each event, without a shell, with the event's JSON on its stdin and MIGRUN_EVENT "
        .. "set (e.g. a script that posts to the team's chat)" }) },
    { "webhook", str{ secret = true, expected = URL, check = url_problem,
      doc = "POSTed the event's JSON (Content-Type: application/json); the URL is never logged" } },
    { "headers", map(str{}, str{ secret = true }, { default = {},
      doc = "extra headers of the webhook, e.g. Authorization (from os.getenv); never logged" }) },
    { "events", list(str{ expected = "an event name",
      check = function(v)
        if not notify.KNOWN[v] then
          local names = {}
          for _, e in ipairs(notify.EVENTS) do names[#names + 1] = e[1] end
          return "one of " .. table.concat(names, ", ")
        end
      end }, { doc = "the events sent (default: all of them)" }) },
    { "timeout", seconds(5, "seconds each channel may take before it is given up (the migration goes on)", 0.1) },
  }, { doc = "notifications (command and/or webhook) on failures, WAL guard warnings, ready for cutover, "
         .. "cutover done",
       check = function(v)
         if v.command and #v.command == 0 then return "command = { \"prog\", ... } with at least the program" end
       end }) },
  { "metrics", record({
    { "listen", str{ expected = 'an address "host:port", e.g. "127.0.0.1:9187"',
      check = function(v)
        local h, p = v:match("^%[([%x:]+)%]:(%d+)$")
        if not h then h, p = v:match("^([%w.-]+):(%d+)$") end
        if not h or tonumber(p) > 65535 then return 'an address "host:port", e.g. "127.0.0.1:9187"' end
      end,
      doc = "serve OpenMetrics (Prometheus) on http://<listen>/metrics while a playbook runs (default: "
        .. "no metrics); port 0 picks a free one, said when the run starts" } },
    { "interval", seconds(5, "seconds between the metrics server's own readings of the primary "
        .. "(for the lag in time)", 1) },
  }, { doc = "metrics (docs/metrics.md)" }) },
}, { check = function(cfg) return excluded_but_named(cfg) or ssl_modes(cfg) end })

---------------------------------------------------------------------------
-- Validation
---------------------------------------------------------------------------

local function path_of(parent, key)
  if type(key) == "number" then return ("%s[%d]"):format(parent, key) end
  if key:match("^[%a_][%w_]*$") then
    return parent == "" and key or parent .. "." .. key
  end
  return ("%s[%q]"):format(parent, key)
end

local function show(v, secret)
  local t = type(v)
  if t == "string" then
    if secret then return "a string" end
    if #v > 40 then v = v:sub(1, 37) .. "..." end
    return ("%q"):format(v)
  elseif t == "table" then
    return "a table"
  elseif t == "number" or t == "boolean" then
    return tostring(v)
  end
  return "a " .. t
end

local function expected_of(n)
  if n.expected then return n.expected end
  return ({ string = "a string", integer = "a whole number", number = "a number",
            boolean = "true or false", record = "a table", list = "a list { ... }",
            map = "a table", free = "a table" })[n.kind]
end

-- the closest name to a typo: migrun.text's, for every module that suggests one
config.nearest = text.nearest

local function nearest(key, fields)
  local names = {}
  for i, f in ipairs(fields) do names[i] = f[1] end
  return config.nearest(key, names)
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = deep_copy(x) end
  return t
end

-- Masks what could be a password in a libpq message about s.
local function mask_conninfo_message(message, s)
  for value in s:gmatch("password%s*=%s*'([^']*)'") do
    message = message:gsub(value:gsub("%p", "%%%0"), "****")
  end
  for value in s:gmatch("password%s*=%s*([^%s']+)") do
    message = message:gsub(value:gsub("%p", "%%%0"), "****")
  end
  local userinfo = s:match("^%a+://([^@/]*)@")
  local pw = userinfo and userinfo:match(":(.*)$")
  if pw and pw ~= "" then message = message:gsub(pw:gsub("%p", "%%%0"), "****") end
  -- libpq quotes stray words ('missing "=" after "x"'): one could be a password
  message = message:gsub('after "[^"]*"', 'after a word')
  return (message:gsub("%s+$", ""))
end

local validate

-- Returns the checked value (defaults filled) or raises {path=, message=}.
local function fail(path, message, hint)
  error({ config_problem = true, path = path, message = message, hint = hint }, 0)
end

-- A record's or a list's own check: "what was expected" (a string), or a
-- problem of its own { path =, message =, hint = }.
local function own_check(n, v, path)
  local problem = n.check(v, path)
  if type(problem) == "table" then fail(problem.path or path, problem.message, problem.hint) end
  if problem then fail(path, "expected " .. problem) end
end

local function check_value(n, v, path)
  local kind = n.kind
  local ok
  if kind == "string" then ok = type(v) == "string"
  elseif kind == "integer" then ok = math.type(v) == "integer" or (math.type(v) == "float" and v == math.floor(v))
  elseif kind == "number" then ok = type(v) == "number"
  elseif kind == "boolean" then ok = type(v) == "boolean"
  elseif kind == "any" then ok = true
  else ok = type(v) == "table" end
  if not ok or (type(v) == "number" and v ~= v) then
    fail(path, ("expected %s, found %s"):format(expected_of(n), show(v, n.secret)))
  end
  if kind == "integer" then v = math.tointeger(v) end
  return validate(n, v, path)
end

function validate(n, v, path)
  local kind = n.kind
  if kind == "record" then
    local out = {}
    local known = {}
    for _, f in ipairs(n.fields) do known[f[1]] = true end
    for k in pairs(v) do
      if type(k) ~= "string" then
        fail(path, ("expected named keys, found the list entry [%s]"):format(tostring(k)))
      elseif not known[k] then
        local near = nearest(k, n.fields)
        local msg = near and ("unknown key (did you mean %s?)"):format(path_of(path, near))
                         or ("unknown key (known here: %s)"):format(
                              table.concat((function()
                                local names = {}
                                for _, f in ipairs(n.fields) do names[#names + 1] = f[1] end
                                return names
                              end)(), ", "))
        fail(path_of(path, k), msg)
      end
    end
    for _, f in ipairs(n.fields) do
      local key, child = f[1], f[2]
      local value = v[key]
      local p = path_of(path, key)
      if value == nil then
        if child.required then
          fail(p, ("missing: %s"):format(child.doc or expected_of(child)))
        elseif child.default ~= nil then
          out[key] = deep_copy(child.default)
        elseif child.kind == "record" then
          out[key] = validate(child, {}, p)  -- a section left out: its defaults
        end
      else
        out[key] = check_value(child, value, p)
      end
    end
    if n.check then own_check(n, out, path) end
    return out
  elseif kind == "list" then
    local out = {}
    for k in pairs(v) do
      if math.type(k) ~= "integer" or k < 1 or k > #v then
        fail(path, ("expected %s, found the key %s"):format(expected_of(n), show(k)))
      end
    end
    for i = 1, #v do out[i] = check_value(n.of, v[i], path_of(path, i)) end
    if n.check then own_check(n, out, path) end
    return out
  elseif kind == "map" then
    local out = {}
    for k, x in pairs(v) do
      local kp = path_of(path, type(k) == "string" and k or tostring(k))
      if type(k) ~= "string" then fail(kp, "expected " .. expected_of(n.key) .. " as the key") end
      check_value(n.key, k, kp)
      out[k] = check_value(n.value, x, kp)
    end
    return out
  elseif kind == "free" then
    return deep_copy(v)
  end
  if n.check then
    local problem = n.check(v)
    if problem then fail(path, ("expected %s, found %s"):format(problem, show(v, n.secret))) end
  end
  if n.validate == "conninfo" then
    local parsed, err = pg.conninfo_parse(v)
    if not parsed then
      fail(path, ("expected %s, found one libpq rejects: %s"):format(expected_of(n),
        mask_conninfo_message(tostring(err and (err.message or err)), v)))
    end
  end
  return v
end

local function config_error(label, problem)
  local message = problem.path ~= "" and ("%s: %s: %s"):format(label, problem.path, problem.message)
                                    or ("%s: %s"):format(label, problem.message)
  return errors.new{ kind = "config", message = message, key = problem.path, hint = problem.hint }
end

local function fill_lob_defaults(cfg)
  for _, policy in pairs(cfg.lobs.tables) do
    for k, v in pairs(cfg.lobs.default) do
      if policy[k] == nil then policy[k] = v end
    end
  end
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

local function absolute(path, base)
  if path:sub(1, 1) == "/" then return path end
  local cwd = assert(host.cwd())
  if base == "." or base == "" then
    base = cwd
  elseif base:sub(1, 1) ~= "/" then
    base = cwd .. "/" .. base
  end
  local p = base .. "/" .. path
  p = p:gsub("/%./", "/"):gsub("/%.$", ""):gsub("//+", "/")
  return p
end

function config.check(raw, label, base_dir)
  label = label or "config"
  if type(raw) ~= "table" then
    return nil, config_error(label, { path = "", message =
      ("expected the file to return a table, found %s"):format(show(raw)) })
  end
  local ok, result = pcall(validate, config.SCHEMA, raw, "")
  if not ok then
    if type(result) == "table" and result.config_problem then return nil, config_error(label, result) end
    error(result, 0)
  end
  fill_lob_defaults(result)
  for _, kind in ipairs{ "source_endpoint", "target_endpoint" } do
    local e = result.dms[kind]
    for alias, name in pairs(ENDPOINT_ALIASES) do
      if e[alias] ~= nil then e[name], e[alias] = e[alias], nil end
    end
  end
  result.state_dir = absolute(result.state_dir, base_dir or ".")
  return result
end

-- read: the names of the environment variables the file reads (they hold the
-- passwords of the conninfos, usually), which migrun keeps from its children.
local function sandbox(read)
  return {
    os = { getenv = function(name)
      if type(name) == "string" then read[#read + 1] = name end
      return os.getenv(name)
    end },
    string = string, math = math, table = table,
    assert = assert, error = error, ipairs = ipairs, pairs = pairs, next = next,
    select = select, tonumber = tonumber, tostring = tostring, type = type,
    pcall = pcall, rawget = rawget, rawequal = rawequal, setmetatable = setmetatable,
    getmetatable = getmetatable, _VERSION = _VERSION,
  }
end

-- Lua's messages about a config file quote its source ("'}' expected near
-- '"password=S3cr3t"'"): a quoted token, or a password=... anywhere, may be a
-- secret, so the message keeps the line number and the kind of token only.
local function without_source_text(message)
  message = message:gsub("near '([\"'%[].-)'", "near a string (not shown: it may hold a secret)")
  message = message:gsub("near (%b[])", "near a string (not shown: it may hold a secret)")
  message = message:gsub("([Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]%s*[=:]%s*)[^%s'\"]+", "%1****")
  message = message:gsub("(://[^:/@%s]+:)[^@%s]+@", "%1****@")
  return message
end

function config.load(path)
  assert(type(path) == "string", "config.load: a path expected")
  local label = path:match("[^/]+$") or path
  local f = io.open(path, "r")
  if not f then
    return nil, errors.new{ kind = "config", where = path, message =
      "no configuration file " .. path,
      hint = "give the migration's config with --config FILE (an annotated example: " ..
             "playbooks/migration.example.lua)" }
  end
  f:close()
  local env_read = {}
  local chunk, err = loadfile(path, "t", sandbox(env_read))
  if not chunk then
    return nil, errors.new{ kind = "config", message = without_source_text(tostring(err)),
      hint = "fix the syntax of " .. path .. " (check it with: luac5.4 -p FILE)" }
  end
  local ok, raw = pcall(chunk)
  if not ok then
    return nil, errors.new{ kind = "config", message = ("%s: error while running it: %s"):format(
      label, without_source_text(tostring(raw))) }
  end
  local cfg, cerr = config.check(raw, label, dirname(path))
  if not cfg then return nil, cerr end
  cfg.config_path = absolute(path, ".")
  cfg.env_read = env_read
  return cfg
end

---------------------------------------------------------------------------
-- Documentation
---------------------------------------------------------------------------

local function show_default(v)
  if type(v) == "table" then return next(v) == nil and "{}" or "{...}" end
  if type(v) == "number" and v >= GiB and v % GiB == 0 then
    return ("%d GiB"):format(v // GiB)
  end
  if type(v) == "string" then return ("%q"):format(v) end
  return tostring(v)
end

local function describe(n, path, lines)
  if n.kind == "record" then
    for _, f in ipairs(n.fields) do
      local key, child = f[1], f[2]
      local p = path_of(path, key)
      if child.kind == "record" then
        lines[#lines + 1] = ("%-34s %s"):format(p, child.doc or "")
        describe(child, p, lines)
      else
        local dflt = child.required and "required"
                     or child.default ~= nil and "default " .. show_default(child.default)
                     or "optional"
        lines[#lines + 1] = ("%-34s %s (%s; %s)"):format(p, child.doc or "", expected_of(child), dflt)
        if child.kind == "list" and child.of.kind == "record" then
          describe(child.of, p .. "[i]", lines)
        elseif child.kind == "map" and child.value.kind == "record" then
          describe(child.value, p .. '["schema.table"]', lines)
        end
      end
    end
  end
end

function config.describe()
  local lines = {}
  describe(config.SCHEMA, "", lines)
  return table.concat(lines, "\n") .. "\n"
end

return config
