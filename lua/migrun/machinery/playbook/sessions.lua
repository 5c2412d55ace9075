--[[
migrun.playbook.sessions: every session a playbook run opens carries the
run's identity, and a run that takes the state directory's lock first ends
what an earlier run of the migration left working on the servers.

Why: the backends of a SIGKILLed migrun do not die with it. A backend learns
that its client is gone only when it next reads from or writes to the socket;
one in the middle of a CREATE INDEX, a TRUNCATE or the commit of a COPY works
on to the end (measured: a killed run's CREATE UNIQUE INDEX still ran 1.3 s
after the kill and finished inside the rerun). A rerun that truncates and
reloads that chunk, or builds that index, would race it.

The identity is the sessions' application_name (what pg_stat_activity shows;
the server keeps 63 bytes of it):
  migrun/<migration>/<run id>[/<role>]
  run id   the run's start (local time) and migrun's pid: 20260121T120301.4711,
           also in the journal's record of the run (runs[i].id)
  role     what opened the session in another process working for the run:
           fullload and qa (pool workers), pg_dump, pg_dumpall, pg_restore,
           psql; the run's own sessions have none
  A migration name too long for the 63 bytes is cut and ends in a hash of the
  whole name, so that two names never share a prefix. A dry run's sessions
  are migrun-dry/<migration>/<run id>: a real run leaves them alone (they
  change nothing). An application_name in a configured conninfo gives way to
  the identity (pg.identity): migrun's sessions must stay findable.

  sessions.run_id([t, pid]) -> "20260121T120301.4711"
  sessions.prefix(migration [, dry_run]) -> "migrun/<migration>/"
  sessions.identity(migration, run_id [, dry_run]) -> the run's application_name
  sessions.earlier(db, prefix, own) -> { session, ... } | nil, err
      The server's sessions whose application_name starts with prefix and is
      neither own nor own/<role> (nor the asking session): an earlier run's.
      session = { pid =, application_name =, user =, me = (current_user),
      superuser = (user is one), state =, backend_type =, query =,
      since = "12:03:05" (server time: the query's start when active, the
      state's otherwise), seconds = (since then) }
  sessions.clear(db, opts) -> { session, ... } (those ended) | nil, err
      opts: prefix, own, server ("target", for messages), dry_run, say(line),
      mask(text) -> text (for query texts), timeout (seconds, default
      sessions.TIMEOUT)
      Ends them (pg_terminate_backend) and waits until the server shows none,
      saying each one (pid, identity, what it ran, since when). A dry run only
      says what it would end. err (kind "sessions") names the pids and what
      they run: one could not be ended (the hint gives the GRANT), or they
      were still there at the timeout.

Who may end whom: pg_terminate_backend needs membership in the session's
role or pg_signal_backend; migrun's sessions all use the configured role, so
a rerun ends them. Sessions of other applications (the DMS emulator's
migrun-dms-emulator, AWS DMS's, the guard's and the metrics' of this run)
never carry the prefix.
]]
local host = require "migrun.host"
local errors = require "migrun.error"
local text = require "migrun.text"

local sessions = {}

sessions.TIMEOUT = 30
local NAME_MAX = 63  -- what the server keeps of an application_name
-- the time (15), "." and a pid of up to 7 digits (pid_max is at most 2^22)
local RUN_ID_MAX = 23

function sessions.run_id(t, pid)
  return ("%s.%d"):format(os.date("%Y%m%dT%H%M%S", math.floor(t or host.now())), pid or host.pid)
end

-- FNV-1a, 32 bits, in hex: a name's mark when it has to be cut
local function hash(s)
  local h = 0x811c9dc5
  for i = 1, #s do h = ((h ~ s:byte(i)) * 0x01000193) & 0xffffffff end
  return ("%08x"):format(h)
end

function sessions.prefix(migration, dry_run)
  assert(type(migration) == "string" and migration ~= "", "sessions.prefix: a migration name expected")
  -- the room a real run's name has with the longest run id after it
  local room = NAME_MAX - #"migrun/" - 1 - RUN_ID_MAX
  local name = migration
  if #name > room then name = name:sub(1, room - 9) .. "~" .. hash(migration) end
  return (dry_run and "migrun-dry/" or "migrun/") .. name .. "/"
end

function sessions.identity(migration, run_id, dry_run)
  return (sessions.prefix(migration, dry_run) .. run_id):sub(1, NAME_MAX)
end

local EARLIER = [[
  select a.pid, a.application_name, coalesce(a.usename::text, '') as user, current_user::text as me,
         coalesce(r.rolsuper, false) as superuser, coalesce(a.state, '') as state,
         coalesce(a.backend_type, '') as backend_type, coalesce(a.query, '') as query,
         coalesce(to_char(w.at, 'HH24:MI:SS'), '?') as since,
         coalesce(extract(epoch from now() - w.at)::float8, 0) as seconds
    from pg_stat_activity a
    left join pg_roles r on r.rolname = a.usename
    cross join lateral (select coalesce(case when a.state = 'active' then a.query_start else a.state_change end,
                                        a.backend_start) as at) w
   where left(a.application_name, length($1::text)) = $1::text
     and a.application_name <> $2::text
     and left(a.application_name, length($2::text) + 1) <> $2::text || '/'
     and a.pid <> pg_backend_pid()
   order by a.pid]]

function sessions.earlier(d, prefix, own)
  assert(d and d.query, "sessions.earlier: a Db expected")
  assert(type(prefix) == "string" and type(own) == "string", "sessions.earlier: prefix and own expected")
  local res, err = d:query(EARLIER, prefix, own)
  if not res then return nil, err end
  local out = {}
  for r in res:rows() do out[#out + 1] = r end
  return out
end

-- one line of what a session runs, at most 120 characters
local function statement(s, mask)
  local q = s.query:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  if mask then q = mask(q) end
  if #q > 120 then q = q:sub(1, 117) .. "..." end
  return q
end

local function describe(s, mask)
  local q = statement(s, mask)
  return ("pid %d (%s), %s since %s (%s)%s"):format(s.pid, s.application_name,
    s.state ~= "" and s.state or s.backend_type, s.since, text.duration(s.seconds), q ~= "" and (": " .. q) or "")
end

local function describe_all(list, mask)
  local parts = {}
  for _, s in ipairs(list) do parts[#parts + 1] = describe(s, mask) end
  return table.concat(parts, "; ")
end

local function cannot_end(server, s, err, mask)
  local hint
  if s.superuser then
    hint = ("it is a session of the superuser %s, which only a superuser can end: "
      .. "select pg_terminate_backend(%d); on the %s, then run again"):format(s.user, s.pid, server)
  else
    hint = ("GRANT pg_signal_backend TO %s; on the %s lets migrun end an earlier run's sessions "
      .. "(or GRANT %s TO %s;), or end it yourself: select pg_terminate_backend(%d); then run again")
      :format(s.me, server, s.user, s.me, s.pid)
  end
  return errors.new{ kind = "sessions", where = server, code = type(err) == "table" and err.code or nil,
    pids = { s.pid },
    message = ("cannot end a session an earlier run of this migration left on the %s, %s: %s; nothing was run")
      :format(server, describe(s, mask), type(err) == "table" and err.message or tostring(err)),
    hint = hint }
end

function sessions.clear(d, opts)
  assert(type(opts) == "table", "sessions.clear: options expected")
  local server, say = opts.server or d:name(), opts.say or function() end
  local found, err = sessions.earlier(d, opts.prefix, opts.own)
  if not found then return nil, err end
  if #found == 0 then return found end
  if opts.dry_run then
    for _, s in ipairs(found) do
      say(("dry run: %s: would end a session of an earlier run: %s"):format(server, describe(s, opts.mask)))
    end
    return found
  end
  local timeout = opts.timeout or sessions.TIMEOUT
  local t0 = host.monotonic()
  local ended, signalled = {}, {}
  while true do
    for _, s in ipairs(found) do
      if not signalled[s.pid] then
        local res, terr = d:write("select pg_terminate_backend($1) as ended", s.pid)
        if not res then return nil, cannot_end(server, s, terr, opts.mask) end
        signalled[s.pid] = true
        ended[#ended + 1] = s
        say(("%s: ending a session of an earlier run: %s"):format(server, describe(s, opts.mask)))
      end
    end
    host.sleep(0.05)
    found, err = sessions.earlier(d, opts.prefix, opts.own)
    if not found then return nil, err end
    if #found == 0 then break end
    if host.monotonic() - t0 > timeout then
      local pids = {}
      for i, s in ipairs(found) do pids[i] = s.pid end
      return nil, errors.new{ kind = "sessions", where = server, pids = pids,
        message = ("%d session%s of an earlier run of this migration still %s on the %s %s after "
          .. "pg_terminate_backend: %s; nothing was run"):format(#found, #found == 1 and "" or "s",
          #found == 1 and "works" or "work", server, text.duration(timeout), describe_all(found, opts.mask)),
        hint = "find out why they do not end (pg_stat_activity, the server's log), end them, then run again" }
    end
  end
  say(("%s: the earlier run's session%s ended in %s"):format(server, #ended == 1 and "" or "s",
    text.duration(host.monotonic() - t0)))
  return ended
end

return sessions
