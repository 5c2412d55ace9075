--[[
migrun.whois: which server a connection reached, as the server itself says,
so that preflight can tell the target from the source and the replica
whatever names and addresses the conninfos use (a DNS alias, a proxy,
another port forwarded to the same server). Reads only.

  local whois = require "migrun.whois"
  local t = assert(whois.of(target_db))
  for _, f in ipairs(whois.target(t, whois.of(source_db), whois.of(replica_db))) do ... end

  whois.of(db) -> id | nil, err
      id = { system_identifier (text: pg_control_system(), shared by a
      cluster and every physical copy of it: standbys, clones restored from
      a base backup), started (pg_postmaster_start_time(), text: tells one
      running server from its copies), address, port (inet_server_addr()
      and _port(): the server's side of the connection; nil over a Unix
      socket), database (current_database()), in_recovery }
  whois.same_server(a, b) -> bool   the same running server: the same system
      identifier and the same start time (a copy is started on its own)
  whois.describe(id) -> "system identifier 7716..., 127.0.0.1:5432, database app"
  whois.target(target, source, replica) -> findings
      preflight findings ({ server = "target", check = "not the source",
      ok, severity, message, hint }) for the target against the source and
      the replica (either may be nil when it could not be reached):
        the source's server and database: error (DMS would replicate the
          source into itself; the full load truncates what it loads);
        the source's server, another database: error (the load and DMS's
          apply on the production primary);
        the replica's server: error;
        another server with the source's system identifier (a physical
          copy: a clone or a standby): a warning;
        otherwise ok, with both identities said.
      findings.is_source / findings.is_replica tell the caller to skip the
      checks whose advice would then be harmful ("truncate them on the
      target").
]]
local pg = require "migrun.pg"

local whois = {}

local SQL = [[
select system_identifier::text as system_identifier, pg_postmaster_start_time()::text as started,
       host(inet_server_addr()) as address, inet_server_port() as port,
       current_database() as database, pg_is_in_recovery() as in_recovery
  from pg_control_system()]]

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

function whois.of(db)
  assert(db and db.query, "whois.of: a migrun.db Db expected")
  local res, err = db:query(SQL)
  if not res then return nil, err end
  local r = res[1]
  return { system_identifier = r.system_identifier, started = r.started, address = opt(r.address),
           port = opt(r.port), database = r.database, in_recovery = r.in_recovery }
end

function whois.same_server(a, b)
  return a ~= nil and b ~= nil and a.system_identifier == b.system_identifier and a.started == b.started
end

function whois.describe(id)
  local where = id.address and ("%s:%s"):format(id.address, tostring(id.port)) or "a Unix socket"
  return ("system identifier %s, %s, database %s"):format(id.system_identifier, where, id.database)
end

local HINT = "give the target (RDS) in target.conninfo: nothing was written"

function whois.target(t, source, replica)
  local out = {}
  local function add(ok, severity, message, hint)
    out[#out + 1] = { server = "target", check = "not the source", ok = ok, severity = severity,
      message = message, hint = (not ok) and hint or nil }
  end
  if whois.same_server(t, source) then
    out.is_source = true
    if t.database == source.database then
      add(false, "error", ("the target IS the source: the same server (%s, started %s). DMS would replicate "
        .. "the source into itself, and the full load truncates every table it loads"):format(whois.describe(t),
        t.started), HINT)
    else
      add(false, "error", ("the target database %s is on the source's server (%s, started %s): the full load "
        .. "and DMS's apply would run on the production primary"):format(t.database, whois.describe(source),
        t.started), HINT)
    end
  elseif whois.same_server(t, replica) then
    out.is_replica = true
    add(false, "error", ("the target is the maintenance replica (%s, started %s)"):format(whois.describe(t),
      t.started), HINT)
  elseif source and t.system_identifier == source.system_identifier then
    add(false, "warning", ("the target is a physical copy of the source (the same system identifier %s, another "
      .. "server: %s): a clone or a promoted standby, not a separate database to load"):format(t.system_identifier,
      whois.describe(t)), "make sure target.conninfo names the target (RDS); a copy already holds the source's rows")
  else
    add(true, "error", ("another cluster: %s%s"):format(whois.describe(t),
      source and ("; the source's is %s"):format(source.system_identifier) or ""))
  end
  return out
end

return whois
