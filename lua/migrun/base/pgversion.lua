--[[
migrun.pgversion: what each PostgreSQL major has, in one place. Every module
that writes a catalog query or calls a function some servers lack asks here
(the WAL functions PostgreSQL 10 renamed stay with migrun.lsn: lsn.names);
docs/versions.md lists the same facts with what migrun does without each.

  local pgversion = require "migrun.pgversion"
  local v = pgversion.of(db)                       -- 130016
  if pgversion.has(v, "wal_status") then ... end
  local expr = pgversion.pick(v, "attgenerated", "a.attgenerated::text <> ''", "false")
  print(pgversion.label(v))                        -- PostgreSQL 13.16
  print(pgversion.major(v))                        -- 13 (9.6 -> "9.6")

  pgversion.facts: { name = { since = server_version_num, what = text, without = what migrun
      does on a source without it (for preflight's note; nil: no difference to a run) } }
  pgversion.has(version, name) -> boolean          (an unknown name raises: a typo is misuse)
  pgversion.since(name) -> the first server_version_num that has it
  pgversion.pick(version, name, present, absent) -> present or absent
  pgversion.of(db) -> server_version_num | nil, err
      db: a migrun.db Db, a migrun.pg Conn (conn:server_version()), or anything
      with :query/:exec (current_setting('server_version_num') is asked).
  pgversion.number(version) -> server_version_num from 130016, "13", 13, "9.6", "13.16"
  pgversion.major(version) -> 13 (an integer from 10 on) | "9.6"
  pgversion.major_num(version) -> comparable majors: 9.6 -> 906, 13 -> 1300
  pgversion.label(version) -> "PostgreSQL 13.16" | "PostgreSQL 9.6.24"
  pgversion.lacks(version [, names]) -> { {name=, since=, what=, without=} } the facts
      this server lacks (all of them, or those in names), oldest first
]]
local pgversion = {}

-- since: the first server_version_num that has it. Release notes of each major.
pgversion.facts = {
  parallel_query = { since = 90600, what = "parallel query (max_parallel_workers_per_gather)",
    without = "the full comparison reads a table too large for its block ranges in one process" },
  min_parallel_table_scan_size = { since = 100000,
    what = "min_parallel_table_scan_size (min_parallel_relation_size in 9.6)" },
  wal_names = { since = 100000, what = "xlog renamed wal and location lsn (the names themselves: lsn.names)" },
  replay_lag = { since = 100000, what = "pg_stat_replication.replay_lag" },
  relispartition = { since = 100000, what = "declarative partitioning (pg_class.relispartition)" },
  attidentity = { since = 100000, what = "identity columns (pg_attribute.attidentity)" },
  pg_monitor_roles = { since = 100000, what = "the roles pg_monitor, pg_read_all_settings" },
  indnkeyatts = { since = 110000, what = "covering indexes: pg_index.indnkeyatts (key columns before INCLUDE)" },
  wal_receiver_sender = { since = 110000, what = "pg_stat_wal_receiver.sender_host and sender_port" },
  slot_advance = { since = 110000, what = "pg_replication_slot_advance()",
    without = "the watch slot is moved on by decoding its changes and discarding them" },
  typed_hashes = { since = 110000, what = "64-bit hash functions (hashtextextended...)",
    without = "rows are compared by the md5 of their text on both sides" },
  attgenerated = { since = 120000, what = "stored generated columns (pg_attribute.attgenerated)" },
  wal_keep_size = { since = 130000, what = "wal_keep_size (wal_keep_segments before)" },
  wal_status = { since = 130000, what = "wal_status and safe_wal_size in pg_replication_slots",
    without = "a slot's WAL is watched by the bytes it retains (no max_slot_wal_keep_size can cut it loose)" },
  safe_wal_size = { since = 130000, what = "pg_replication_slots.safe_wal_size" },
  max_slot_wal_keep_size = { since = 130000, what = "max_slot_wal_keep_size: a cap on WAL a slot keeps" },
  pg_stat_progress_copy = { since = 140000, what = "the view pg_stat_progress_copy" },
  tid_range_scan = { since = 140000, what = "TID range scans",
    without = "a large table without an integer primary key loads in one piece, not in block ranges" },
  wal_replay_pause_state = { since = 140000, what = "pg_get_wal_replay_pause_state()",
    without = "the replica's pause is read with pg_is_wal_replay_paused()" },
  initdb_no_instructions = { since = 140000, what = "initdb --no-instructions" },
  reltuples_unknown = { since = 140000, what = "pg_class.reltuples = -1 for a never-analyzed table" },
  set_on_parameter = { since = 150000, what = "GRANT SET ON PARAMETER (pg_parameter_acl)" },
  pg_checkpoint_role = { since = 150000, what = "the role pg_checkpoint" },
  public_schema_owner = { since = 150000, what = "public schema owned by pg_database_owner, no CREATE for PUBLIC" },
  createrole_admin = { since = 160000,
    what = "CREATEROLE grants only what its holder has ADMIN OPTION on (and gets ADMIN on roles it creates)" },
  grant_options = { since = 160000, what = "GRANT ... WITH INHERIT / SET options (pg_auth_members)" },
  transaction_timeout = { since = 170000, what = "transaction_timeout (pg_dump 17 sets it)" },
}

local function fact(name)
  local f = pgversion.facts[name]
  if not f then error(("migrun.pgversion: no fact named %q"):format(tostring(name)), 3) end
  return f
end

function pgversion.number(version)
  -- a number with a fraction ("13.16", 9.6) is a version's text, read below
  local n = math.tointeger(tonumber(version))
  if n and n >= 90000 then return n end
  if n and n >= 10 and n < 100 then return n * 10000 end
  local s = tostring(version)
  local a, b, c = s:match("^(%d+)%.?(%d*)%.?(%d*)")
  a, b, c = tonumber(a), tonumber(b), tonumber(c)
  assert(a, "migrun.pgversion: not a PostgreSQL version: " .. s)
  if a >= 10 then return a * 10000 + (b or 0) end
  return a * 10000 + (b or 0) * 100 + (c or 0)
end

function pgversion.since(name) return fact(name).since end

function pgversion.has(version, name)
  return pgversion.number(version) >= fact(name).since
end

function pgversion.pick(version, name, present, absent)
  if pgversion.has(version, name) then return present end
  return absent
end

function pgversion.major(version)
  local v = pgversion.number(version)
  if v >= 100000 then return v // 10000 end
  return ("%d.%d"):format(v // 10000, v // 100 % 100)
end

function pgversion.major_num(version)
  local v = pgversion.number(version)
  return v >= 100000 and v // 10000 * 100 or v // 100
end

function pgversion.label(version)
  local v = pgversion.number(version)
  if v >= 100000 then return ("PostgreSQL %d.%d"):format(v // 10000, v % 10000) end
  return ("PostgreSQL %d.%d.%d"):format(v // 10000, v // 100 % 100, v % 100)
end

function pgversion.lacks(version, names)
  local v = pgversion.number(version)
  local out = {}
  local list = names
  if not list then
    list = {}
    for name in pairs(pgversion.facts) do list[#list + 1] = name end
  end
  for _, name in ipairs(list) do
    local f = fact(name)
    if v < f.since then out[#out + 1] = { name = name, since = f.since, what = f.what, without = f.without } end
  end
  table.sort(out, function(a, b)
    if a.since ~= b.since then return a.since < b.since end
    return a.name < b.name
  end)
  return out
end

function pgversion.of(db)
  local conn = db and (db.conn or db)
  if type(conn) == "table" or type(conn) == "userdata" then
    local ok, v = pcall(function() return conn:server_version() end)
    if ok and math.tointeger(v) then return v end
  end
  assert(db and (db.query or db.exec), "pgversion.of: a migrun.db Db or a migrun.pg Conn expected")
  local sql = "select current_setting('server_version_num')::int as v"
  local res, err
  if db.query then res, err = db:query(sql) else res, err = db:exec(sql) end
  if not res then return nil, err end
  return res[1].v
end

return pgversion
