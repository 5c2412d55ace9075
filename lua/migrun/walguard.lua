--[[
migrun.walguard: the WAL guard. Through the whole run migrun's slots hold WAL
back on the primary (until DMS reads it), and the paused maintenance replica
keeps every WAL segment it receives without replaying it. Either can fill a
disk; the runbook's advice is to watch free space and, in a disaster, drop the
slots. walguard.check measures both and says ok, warn or stop. Reads only.

  local walguard = require "migrun.walguard"
  local g = assert(walguard.check(source_db, replica_db, cfg.wal_guard, { prefix = "dms_slot_" }))
  if g.level == "stop" then error(g.message) elseif g.level == "warn" then say(g.message) end

  walguard.check(source_db, replica_db | nil, guard, { prefix = }) -> report | nil, err
      guard = { warn_bytes, stop_bytes, replica_min_free_bytes } (config.wal_guard)
      report = { slots = { { name, retained_bytes, active } }, retained_bytes (total of
        migrun's slots), replica_wal_bytes (the replica's WAL directory, or nil when
        it cannot be listed), replica_free_bytes (free disk under the replica's data
        directory when it runs on this machine, else nil), level = "ok" | "warn" |
        "stop", message (human units, and what to do) }
      stop: retained >= stop_bytes, or replica free < replica_min_free_bytes;
      warn: retained >= warn_bytes, or replica free < 2 x replica_min_free_bytes.
  walguard.sql(server_version_num) -> { wal_dir_bytes = ... } (9.6: pg_xlog via pg_ls_dir)
]]
local host = require "migrun.host"
local pgl = require "migrun.pglogical"
local text = require "migrun.text"

local walguard = {}

local GiB = 2 ^ 30

local function human(n)
  return text.bytes(n)
end

function walguard.sql(version)
  if version >= 100000 then
    return { wal_dir_bytes = "select coalesce(sum(size), 0)::int8 as bytes from pg_ls_waldir()" }
  end
  -- 9.6 has no pg_ls_waldir: list pg_xlog and stat each file (superuser only).
  return { wal_dir_bytes = "select coalesce(sum((pg_stat_file('pg_xlog/' || f)).size), 0)::int8 as bytes"
    .. " from pg_ls_dir('pg_xlog') as f" }
end


local function replica_disk(db)
  local wal, free
  local res = db:query(walguard.sql(db.conn:server_version()).wal_dir_bytes)
  if res and res[1] then wal = res[1].bytes end
  if db:is_local() then
    res = db:query("select setting from pg_settings where name = 'data_directory'")
    if res and res[1] then
      local st = host.statvfs(res[1].setting)
      if st then free = st.free end
    end
  end
  return wal, free
end

function walguard.check(source, replica, guard, opts)
  assert(type(source) == "table" and source.query, "walguard.check: source (a migrun.db Db) expected")
  guard = guard or {}
  opts = opts or {}
  local warn_bytes = guard.warn_bytes or 50 * GiB
  local stop_bytes = guard.stop_bytes or 200 * GiB
  local min_free = guard.replica_min_free_bytes or 20 * GiB
  assert(warn_bytes <= stop_bytes, "walguard.check: warn_bytes must not exceed stop_bytes")

  local all, err = pgl.slots(source, { prefix = opts.prefix })
  if not all then return nil, err end
  local report = { slots = {}, retained_bytes = 0, level = "ok" }
  local biggest
  for _, s in ipairs(all) do
    if s.owned then
      report.slots[#report.slots + 1] = { name = s.name, retained_bytes = s.retained_bytes, active = s.active }
      report.retained_bytes = report.retained_bytes + (s.retained_bytes or 0)
      if s.retained_bytes and (not biggest or s.retained_bytes > biggest.retained_bytes) then biggest = s end
    end
  end
  if replica then report.replica_wal_bytes, report.replica_free_bytes = replica_disk(replica) end

  local problems, advice = {}, {}
  local retained = report.retained_bytes
  local slot_line = ("migrun's %d slot%s retain %s of WAL on the primary"):format(#report.slots,
    #report.slots == 1 and "" or "s", human(retained))
  if biggest then slot_line = slot_line .. (" (most: %s, %s)"):format(biggest.name, human(biggest.retained_bytes)) end
  if retained >= stop_bytes then
    report.level = "stop"
    problems[#problems + 1] = slot_line .. ", at or above the stop threshold " .. human(stop_bytes)
  elseif retained >= warn_bytes then
    report.level = "warn"
    problems[#problems + 1] = slot_line .. ", above the warning threshold " .. human(warn_bytes)
  end
  if #problems > 0 then
    advice[#advice + 1] = "monitor free space on the primary; the WAL is freed as the DMS tasks read their slots:"
      .. " let the load finish and start CDC, and look for a task that stopped reading its slot"
    advice[#advice + 1] = "if the disk is about to fill, drop the stuck slot and redo its tables"
      .. " (a partial restart: migrun restart from the slots step for that group)"
  end

  local free = report.replica_free_bytes
  if free and free < min_free then
    report.level = "stop"
    problems[#problems + 1] = ("the paused replica has %s free (minimum %s)"):format(human(free), human(min_free))
  elseif free and free < 2 * min_free then
    if report.level == "ok" then report.level = "warn" end
    problems[#problems + 1] = ("the paused replica has %s free, near the minimum %s"):format(
      human(free), human(min_free))
  end
  if free and free < 2 * min_free then
    advice[#advice + 1] = ("the paused replica accumulates WAL it does not replay%s: finish the full load and resume"
      .. " the replica, or move its WAL to a bigger disk (runbook step 5)"):format(
      report.replica_wal_bytes and (" (" .. human(report.replica_wal_bytes) .. " now)") or "")
  end

  if report.level == "ok" then
    local parts = { slot_line }
    if report.replica_wal_bytes then parts[#parts + 1] = "replica WAL " .. human(report.replica_wal_bytes) end
    if free then parts[#parts + 1] = "replica free " .. human(free) end
    report.message = "WAL guard ok: " .. table.concat(parts, "; ")
  else
    report.message = ("WAL guard %s: %s. What to do: %s."):format(report.level == "stop" and "STOP" or "warning",
      table.concat(problems, "; "), table.concat(advice, "; "))
  end
  return report
end

--[[ walguard.watcher() -> the watcher spec playbooks register with P:watch:
     every wal_guard.interval seconds, a check; "warn" is said, "stop" ends
     the run with the advice. Each check is also a reading of the slots for
     samples.jsonl, and a level reached (warn, stop) is a notification: once
     when it is reached, not every interval while it lasts. ]]
function walguard.watcher()
  local notified
  return { "wal_guard", interval = function(ctx) return ctx.config.wal_guard.interval end,
    run = function(ctx)
      local g = assert(walguard.check(ctx.source, ctx.replica, ctx.config.wal_guard,
        { prefix = ctx.config.slots.prefix }))
      ctx:sample_slots("wal_guard", { level = g.level, replica_free_bytes = g.replica_free_bytes })
      if g.level ~= "ok" and notified ~= g.level then
        ctx:notify("wal_guard_" .. g.level, g.message, { retained_bytes = g.retained_bytes,
          replica_free_bytes = g.replica_free_bytes, warn_bytes = ctx.config.wal_guard.warn_bytes,
          stop_bytes = ctx.config.wal_guard.stop_bytes })
      end
      notified = g.level ~= "ok" and g.level or nil
      if g.level == "stop" then error(g.message, 0) end
      if g.level == "warn" then ctx:warn("%s", g.message) end
    end }
end

return walguard
