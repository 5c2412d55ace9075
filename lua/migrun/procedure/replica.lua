--[[
migrun.replica: the maintenance streaming replica (runbook Phase I, steps 5, 6
and 11): its status, pausing replay at a point whose LSN is then the CDC start
position, and resuming it. Reads go through Db:query, the pause and resume
requests through Db:write (a dry run prints them and pauses nothing).

  local replica = require "migrun.replica"
  local st = assert(replica.status(db))
  local at = assert(replica.pause(db, { timeout = 60 }))   -- a migrun.lsn
  assert(replica.resume(db))

  replica.status(db) -> status | nil, err
      status = { in_recovery, pause_state ("not paused" | "pause requested" |
      "paused"; nil on a primary), replay_lsn, receive_lsn (migrun.lsn or nil),
      system_identifier (string), server_version, upstream = { host, port,
      status } (pg_stat_wal_receiver; nil when no WAL receiver runs) }
  replica.pause(db, { timeout = 60, poll = 0.2, say = fn, after = lsn }) -> replay_lsn | nil, err
      Refuses a primary. With after (the LSN where the slots were created), first
      waits until replay has passed it, so the captured LSN is never before them. Requests the pause, waits until replay has really
      stopped (14+: pg_get_wal_replay_pause_state() = 'paused'; before 14 the
      pause flag) and the replay LSN has stayed the same over two polls, then
      returns pg_last_wal_replay_lsn(). An already paused replica returns its
      replay LSN at once (a resumed run). In a dry run: the request is echoed
      and the replay LSN now is returned (nothing was paused).
  replica.resume(db) -> true | nil, err      idempotent
  replica.check_paused(db, at) -> true | nil, why   (a resumed run; below)
  replica.repause(db, at, { timeout = 30, poll = 0.2 }) -> true | nil, err
      A replica that is no longer paused (restarted: PostgreSQL keeps the
      pause in shared memory only, so a restarted standby replays again) but
      still replays nothing past `at` is paused again there; one that has
      replayed past it, or was promoted, is refused with why and what to do
      (err.moved, err.promoted).
  replica.lost_pause(db, st, at) -> err   what a replica no longer paused at
      `at` means for the migration, in words (st: replica.status's)
  replica.sql(server_version_num) -> the version's SQL texts (unit-tested for 9.6)
]]
local lsn = require "migrun.lsn"
local errors = require "migrun.error"
local host = require "migrun.host"
local pg = require "migrun.pg"
local pgversion = require "migrun.pgversion"

local replica = {}


local function failure(db, message, fields)
  local e = { kind = "replica", where = db:name(), message = message }
  for k, v in pairs(fields or {}) do e[k] = v end
  return errors.new(e)
end

-- The SQL of one server version. PostgreSQL 10 renamed xlog/location to
-- wal/lsn; 14 made pausing asynchronous and added the pause state function.
function replica.sql(version)
  local n = lsn.names(version)
  local pause_state
  if n.wal_replay_pause_state then
    pause_state = n.wal_replay_pause_state .. "()"
  else
    pause_state = ("case when %s() then 'paused' else 'not paused' end"):format(n.is_wal_replay_paused)
  end
  local receiver
  if pgversion.has(version, "wal_receiver_sender") then
    receiver = "select status, sender_host, sender_port, conninfo from pg_stat_wal_receiver"
  else -- sender_host/sender_port came in 11: read them from the (password-masked) conninfo
    receiver = "select status, null::text as sender_host, null::int as sender_port, conninfo from pg_stat_wal_receiver"
  end
  return {
    recovery = "select pg_is_in_recovery() as in_recovery, system_identifier::text as system_identifier"
      .. " from pg_control_system()",
    standby = ("select %s as pause_state, %s() as replay_lsn, %s() as receive_lsn"):format(
      pause_state, n.last_wal_replay_lsn, n.last_wal_receive_lsn),
    receiver = receiver,
    pause = ("select %s()"):format(n.wal_replay_pause),
    resume = ("select %s()"):format(n.wal_replay_resume),
  }
end

local function first_row(db, sql)
  local res, err = db:query(sql)
  if not res then return nil, err end
  return res[1] or {}
end

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

function replica.status(db)
  assert(db and db.query, "replica.status: a migrun.db Db expected")
  local version = db.conn:server_version()
  local sql = replica.sql(version)
  local row, err = first_row(db, sql.recovery)
  if not row then return nil, err end
  local st = { in_recovery = row.in_recovery, system_identifier = row.system_identifier,
               server_version = version }
  if not st.in_recovery then return st end

  row, err = first_row(db, sql.standby)
  if not row then return nil, err end
  st.pause_state, st.replay_lsn, st.receive_lsn = opt(row.pause_state), opt(row.replay_lsn), opt(row.receive_lsn)

  row, err = first_row(db, sql.receiver)
  if not row then return nil, err end
  if opt(row.status) then
    local up = { status = row.status, host = opt(row.sender_host), port = opt(row.sender_port) }
    if (not up.host or not up.port) and opt(row.conninfo) then
      local parsed = pg.conninfo_parse(row.conninfo)
      if parsed then
        up.host = up.host or parsed.host or parsed.hostaddr
        up.port = up.port or tonumber(parsed.port)
      end
    end
    st.upstream = up
  end
  return st
end

local function not_a_replica(db)
  return failure(db, db:name() .. " is not in recovery: it is a primary",
    { hint = "give the maintenance replica's conninfo in replica.conninfo" })
end

function replica.pause(db, opts)
  assert(db and db.write, "replica.pause: a migrun.db Db expected")
  opts = opts or {}
  local timeout, poll = opts.timeout or 60, opts.poll or 0.2
  local st, err = replica.status(db)
  if not st then return nil, err end
  if not st.in_recovery then return nil, not_a_replica(db) end
  local deadline = host.monotonic() + timeout
  local after = opts.after and lsn(tostring(opts.after))
  if st.pause_state == "paused" then
    if after and st.replay_lsn < after then
      return nil, failure(db, ("%s is paused at %s, before %s (where the replication slots begin)")
        :format(db:name(), tostring(st.replay_lsn), tostring(after)),
        { hint = "someone else paused it: resume it (select pg_wal_replay_resume()) and run again" })
    end
    if opts.say then opts.say(("%s: replay already paused at %s"):format(db:name(), tostring(st.replay_lsn))) end
    return st.replay_lsn
  end

  -- The captured LSN is where CDC starts: it must not be before the slots,
  -- so let replay pass the point where they were created first.
  while after and not db.dry_run and not (st.replay_lsn and st.replay_lsn >= after) do
    if host.monotonic() > deadline then
      return nil, errors.new{ kind = "timeout", where = db:name(),
        message = ("replay did not reach %s within %gs (at %s)"):format(tostring(after), timeout,
          tostring(st.replay_lsn)),
        hint = "the replica lags behind the primary; check its WAL receiver and try again" }
    end
    host.sleep(poll)
    st, err = replica.status(db)
    if not st then return nil, err end
  end

  local res
  res, err = db:write(replica.sql(st.server_version).pause)
  if not res then return nil, err end
  if db.dry_run then return st.replay_lsn end

  -- Replay stops at the next record boundary after the request: wait for the
  -- server to say so, then for the replay position to hold still.
  local last
  while true do
    st, err = replica.status(db)
    if not st then return nil, err end
    if not st.in_recovery then
      return nil, failure(db, db:name() .. " left recovery (promoted?) while being paused")
    end
    if st.pause_state == "paused" and st.replay_lsn then
      if last and last == st.replay_lsn then return st.replay_lsn end
      last = st.replay_lsn
    else
      last = nil
    end
    if host.monotonic() > deadline then
      return nil, errors.new{ kind = "timeout", where = db:name(),
        message = ("replay did not stop within %gs (pause state: %s)"):format(timeout, tostring(st.pause_state)),
        hint = "replay may be waiting on a long record or a conflict; try again or raise the timeout" }
    end
    host.sleep(poll)
  end
end

function replica.resume(db)
  assert(db and db.write, "replica.resume: a migrun.db Db expected")
  local st, err = replica.status(db)
  if not st then return nil, err end
  if not st.in_recovery then return nil, not_a_replica(db) end
  if st.pause_state == "not paused" then return true end
  local res
  res, err = db:write(replica.sql(st.server_version).resume)
  if not res then
    -- Replay resumes inside the call: a cleanup record replayed before the
    -- statement ends can cancel it for conflicting with its own snapshot
    -- (40001). The resume has happened all the same: ask the replica.
    local now = err and err.sqlstate == "40001" and replica.status(db)
    if now and now.pause_state == "not paused" then return true end
    return nil, err
  end
  return true
end

-- When the server (re)started, as text, for messages.
local function started_at(db)
  local res = db:query("select pg_postmaster_start_time()::text as t")
  return res and res[1] and res[1].t or nil
end

function replica.lost_pause(db, st, at)
  local name = db:name()
  if not st.in_recovery then
    return failure(db, ("the maintenance replica (%s) is no longer in recovery: it was promoted, and the snapshot at "
      .. "the captured LSN %s is gone with it"):format(name, tostring(at)), { promoted = true,
      hint = "nothing can be read at the captured LSN any more: rebuild the maintenance replica from the primary "
        .. "(a new standby), then start the migration again with playbooks/full_restart.lua" })
  end
  local since = started_at(db)
  return failure(db, ("the maintenance replica (%s) is no longer paused (%s) and has replayed past the captured "
    .. "LSN %s (replay is at %s)%s: what it holds is no longer the snapshot the load read"):format(name,
    tostring(st.pause_state), tostring(at), tostring(st.replay_lsn),
    since and ("; it (re)started at " .. since .. ", and PostgreSQL does not keep a pause across a restart") or ""),
    { moved = true, hint = "the tables loaded so far match the captured LSN, the replica does not: start the "
      .. "migration again with playbooks/full_restart.lua (and keep the replica from restarting or resuming "
      .. "during the full load)" })
end

function replica.repause(db, at, opts)
  assert(db and db.write, "replica.repause: a migrun.db Db expected")
  opts = opts or {}
  at = lsn(tostring(at))
  local st, err = replica.status(db)
  if not st then return nil, err end
  if st.in_recovery and st.pause_state == "paused" and st.replay_lsn == at then return true end
  if not st.in_recovery or not st.replay_lsn or st.replay_lsn ~= at then return nil, replica.lost_pause(db, st, at) end
  local res
  res, err = db:write(replica.sql(st.server_version).pause)
  if not res then return nil, err end
  if db.dry_run then return true end
  local deadline = host.monotonic() + (opts.timeout or 30)
  while true do
    st, err = replica.status(db)
    if not st then return nil, err end
    if not st.in_recovery or not st.replay_lsn or st.replay_lsn ~= at then return nil, replica.lost_pause(db, st, at) end
    if st.pause_state == "paused" then return true end
    if host.monotonic() > deadline then
      return nil, errors.new{ kind = "timeout", where = db:name(),
        message = ("replay did not pause again within %gs (pause state: %s)"):format(opts.timeout or 30,
          tostring(st.pause_state)), hint = "pause it by hand (select pg_wal_replay_pause()) and run again" }
    end
    host.sleep(opts.poll or 0.2)
  end
end

--[[ replica.check_paused(db, at) -> true | nil, why
     On a resumed run: the replica is still paused exactly at the captured
     LSN, so what the full load reads is still the snapshot CDC starts from.
     A replica that restarted (it then replays again) is paused again if it
     has replayed nothing past the captured LSN; otherwise why says what
     happened and what to do. ]]
function replica.check_paused(db, at)
  local st, err = replica.status(db)
  if not st then return nil, tostring(err) end
  if st.in_recovery and st.pause_state == "paused" then
    if tostring(st.replay_lsn) ~= tostring(at) then
      return nil, ("%s is paused at %s, not at the captured %s"):format(db:name(), tostring(st.replay_lsn), tostring(at))
    end
    return true
  end
  local ok
  ok, err = replica.repause(db, at)
  if not ok then return nil, tostring(err) end
  return true
end

return replica
