--[[
migrun.walguard: the WAL guard's measurements and verdict. Through the whole
run migrun's slots hold WAL back on the primary (until DMS reads it), and the
paused maintenance replica keeps every WAL segment it receives without
replaying it. Either can fill a disk; the runbook's advice is to watch free
space and, in a disaster, drop the slots. walguard.check measures both, says
ok, warn or stop, and what to do. Reads only. migrun.guard runs it in a
process of its own through every step.

How WAL held back is counted, as a DBA counts it by hand: the slots share one
WAL stream, so what they keep is the distance from the oldest restart_lsn
among migrun's slots to the current LSN (not the sum over slots, which counts
the shared WAL once per slot). Each slot's own figures (retained from its
restart_lsn, behind from its confirmed_flush_lsn) are the per-slot view.

  local walguard = require "migrun.walguard"
  local tracker = walguard.tracker(600)
  local r = assert(walguard.check(source_db, replica_db, cfg.wal_guard,
    { prefix = "dms_slot_", tracker = tracker, tasks = true, advice = { config =, rerun =, playbooks = } }))
  if r.level == "stop" then ... r.message ... end

  walguard.check(source, replica | nil, guard, opts) -> report | nil, err
      guard: config.wal_guard (warn_bytes, stop_bytes, warn_free_percent,
        stop_free_percent, replica_min_free_bytes, replica_min_free_percent,
        warn_ahead, source_free_command, replica_free_command).
      opts.prefix: migrun's slots; opts.tracker: a walguard.tracker (rates
        and stalled slots need samples over time); opts.tasks: DMS tasks read
        the slots (phase II) or not yet; opts.advice = { config = path, rerun =
        "migrun playbooks/full.lua --config ...", playbooks = "playbooks" }
        for the commands the messages name; opts.now (seconds, monotonic).
      report = { current_lsn, held_bytes, holder (the slot with the oldest
        restart_lsn), slots = { { name, restart_lsn, confirmed_flush_lsn,
        retained_bytes, behind_bytes, active, stalled_seconds, wal_status,
        safe_wal_size, invalidation_reason, eta_lost } },
        keep_bytes (max_slot_wal_keep_size; nil: no limit), wal_keep_bytes,
        wal_dir_bytes | nil (+ wal_dir_note: why not), source = disk,
        replica = disk | nil, replica_wal_bytes, replica_paused,
        rate (bytes/s of WAL held back, over the tracker's window), wal_rate
        (bytes/s of WAL written), eta_stop, eta_full (seconds),
        level = "ok"|"warn"|"stop", problems, message }
      Slot invalidation (PostgreSQL 13+, walguard.slot_limits): a warning
      when a slot has used half of what max_slot_wal_keep_size lets it keep
      or would reach it within warn_ahead at the WAL rate; a stop at a fifth
      left, within three checks at that rate, once unreserved (lost at the
      next checkpoint) or lost; the watch slot only warns. Before 13 nothing
      is read (no limit exists).
  walguard.slot_limits(report, guard, opts) -> level, problems, advice
  walguard.limits_sql(server_version_num) -> sql | nil (before 13)
      disk = { free, total, how ("statvfs <dir>" | "command"), dir } or { note = why not }
  walguard.free_space(db, command, label) -> { free, total, how } | nil, why
      command (an argv list printing free bytes, then optionally the disk's
      size) when given; else statvfs of the server's WAL directory when the
      server runs on this machine; else nil and why not.
  walguard.disk_watch(db, command, acknowledged, label) -> { watched = bool, how, message }
      what preflight says about watching a server's disk.
  walguard.tracker(window_seconds) -> tracker (tracker:add(now, report),
      tracker:rate() held back, tracker:wal_rate() written, bytes/s)
  walguard.sql(server_version_num) -> { wal_dir_bytes, current_lsn }
]]
local host = require "migrun.host"
local proc = require "migrun.proc"
local lsn = require "migrun.lsn"
local pgl = require "migrun.pglogical"
local replica_ = require "migrun.replica"
local text = require "migrun.text"

local walguard = {}

local GiB = 2 ^ 30
local human = text.bytes

function walguard.sql(version)
  local n = lsn.names(version)
  local current = ("select %s() as lsn"):format(n.current_wal_lsn)
  if version >= 100000 then
    return { wal_dir_bytes = "select coalesce(sum(size), 0)::int8 as bytes from pg_ls_waldir()",
             current_lsn = current, wal_dir = "pg_wal" }
  end
  -- 9.6 has no pg_ls_waldir: list pg_xlog and stat each file (superuser only).
  return { wal_dir_bytes = "select coalesce(sum((pg_stat_file('pg_xlog/' || f)).size), 0)::int8 as bytes"
    .. " from pg_ls_dir('pg_xlog') as f", current_lsn = current, wal_dir = "pg_xlog" }
end

-- The size of the server's WAL directory -> bytes | nil, why
local function wal_dir_bytes(db)
  local res, err = db:query(walguard.sql(db.conn:server_version()).wal_dir_bytes)
  if res and res[1] then return res[1].bytes end
  if err and err.sqlstate == "42501" then
    return nil, ("the size of pg_wal cannot be read: pg_ls_waldir() needs pg_monitor or superuser"
      .. " (GRANT pg_monitor TO %s)"):format(tostring(db.conn:info().user))
  end
  return nil, "the size of pg_wal cannot be read: " .. tostring(err)
end

---------------------------------------------------------------------------
-- Free space
---------------------------------------------------------------------------

-- "free [total]" from the last line of a command's output that holds a number.
local function parse_free(out)
  local free, total
  for line in tostring(out):gmatch("[^\n]+") do
    local a, b = line:match("^%s*(%d+)%s+(%d+)")
    if a then free, total = a, b else
      a = line:match("^%s*(%d+)%s*$")
      if a then free, total = a, nil end
    end
  end
  return math.tointeger(tonumber(free)), total and math.tointeger(tonumber(total)) or nil
end

function walguard.free_space(db, command, label)
  label = label or db:name()
  if command then
    local spec = { timeout = 60 }
    for i, a in ipairs(command) do spec[i] = a end
    local ok, how, code, out, errout = proc.run(spec)
    if not ok then
      return nil, ("the %s's free-space command %s failed (%s %s): %s"):format(label, proc.quote(command),
        tostring(how), tostring(code), (tostring(errout or ""):gsub("%s+$", "")):sub(1, 200))
    end
    local free, total = parse_free(out)
    if not free then
      return nil, ("the %s's free-space command %s printed no number of bytes (it printed %q)"):format(label,
        proc.quote(command), (tostring(out):gsub("%s+$", "")):sub(1, 80))
    end
    return { free = free, total = total, how = "command" }
  end
  if not db:is_local() then
    return nil, ("the %s (%s) is not on this machine: its free disk cannot be measured"):format(label,
      tostring(db.conn:info().host))
  end
  local res, err = db:query("select setting from pg_settings where name = 'data_directory'")
  if not res then return nil, tostring(err) end
  if not res[1] then return nil, "data_directory is not visible to this role (pg_read_all_settings)" end
  -- the WAL directory: where WAL piles up, often a disk of its own (a symlink)
  local dir = res[1].setting .. "/" .. walguard.sql(db.conn:server_version()).wal_dir
  local st, serr = host.statvfs(dir)
  if not st then return nil, tostring(serr) end
  return { free = st.free, total = st.total, how = "statvfs " .. dir, dir = dir }
end

function walguard.disk_watch(db, command, acknowledged, label)
  local d, why = walguard.free_space(db, command, label)
  if d then
    return { watched = true, how = d.how, message = ("free disk watched (%s): %s free%s"):format(
      d.how == "command" and "by " .. proc.quote(command) or d.how, human(d.free),
      d.total and (" of " .. human(d.total)) or "") }
  end
  if acknowledged then
    return { watched = false, how = "acknowledged", message = "free disk NOT watched (" .. why
      .. "); acknowledged by the configuration" }
  end
  return { watched = false, message = "free disk NOT watched: " .. why }
end

---------------------------------------------------------------------------
-- Rates over time
---------------------------------------------------------------------------

local Tracker = {}
Tracker.__index = Tracker

function walguard.tracker(window)
  return setmetatable({ window = window or 600, samples = {}, flushed = {} }, Tracker)
end

-- Records a check: the WAL held back, and when each slot's confirmed position last moved.
function Tracker:add(now, report)
  local s = self.samples
  s[#s + 1] = { t = now, held = report.held_bytes, current = report.current_lsn }
  while #s > 2 and now - s[2].t >= self.window do table.remove(s, 1) end
  for _, slot in ipairs(report.slots) do
    local seen = self.flushed[slot.name]
    local at = slot.confirmed_flush_lsn and tostring(slot.confirmed_flush_lsn)
    if not seen or seen.lsn ~= at then self.flushed[slot.name] = { lsn = at, since = now } end
  end
end

-- Bytes per second by which the WAL held back grew over the window, or nil
-- before two samples some seconds apart.
function Tracker:rate()
  local s = self.samples
  if #s < 2 then return nil end
  local a, b = s[1], s[#s]
  if b.t - a.t < 1 then return nil end
  return (b.held - a.held) / (b.t - a.t)
end

-- Bytes per second of WAL the primary wrote over the window (what brings a
-- slot's limit nearer, whatever the slots hold), or nil before two samples.
function Tracker:wal_rate()
  local s = self.samples
  if #s < 2 then return nil end
  local a, b = s[1], s[#s]
  if b.t - a.t < 1 or not (a.current and b.current) then return nil end
  return math.max(0, b.current - a.current) / (b.t - a.t)
end

-- Seconds since the slot's confirmed position last moved (nil: never seen).
function Tracker:stalled(name, now)
  local seen = self.flushed[name]
  return seen and (now - seen.since) or nil
end

---------------------------------------------------------------------------
-- The check
---------------------------------------------------------------------------

local function command_line(parts)
  return "`" .. table.concat(parts, " ") .. "`"
end

local function percent(d)
  if d and d.free and d.total and d.total > 0 then return 100 * d.free / d.total end
end

-- What to do about WAL held back on the primary (stop or warn).
local function wal_advice(r, guard, opts, stopping)
  local a = opts.advice or {}
  local cfg = a.config or "migration.lua"
  local dir = a.playbooks or "playbooks"
  local rerun = a.rerun and command_line{ a.rerun } or "the same playbook again"
  local out = {}
  local raise = ("raise wal_guard.stop_bytes (now %s) in %s to what the primary's disk can take%s, then run %s: "
    .. "it resumes at the step that stopped"):format(human(guard.stop_bytes), cfg,
    r.source.free and (" (it has " .. human(r.source.free) .. " free)") or "", rerun)
  if not opts.tasks then
    out[#out + 1] = "no DMS task reads the slots before phase II (the tasks are created after the full load"
      .. " and its QA), so nothing frees this WAL until they run"
    out[#out + 1] = (stopping and "to go on, " or "before the stop, either free space on the primary or ") .. raise
  else
    local holder = r.holder_slot
    local stalled = holder and holder.stalled_seconds
    local watch_slot = require("migrun.watch").slot_name(opts.prefix or "dms_slot_")
    if holder and holder.name == watch_slot then
      -- migrun's own: it moves when the live verification runs, not with a task
      out[#out + 1] = ("%s, migrun's watch slot, holds back the most (%s): it moves on when the verification "
        .. "runs: %s; or drop it (SELECT pg_drop_replication_slot('%s')) and the next verification hashes every "
        .. "table whole again"):format(holder.name, human(holder.retained_bytes),
        command_line{ "migrun", dir .. "/verify.lua", "--config", cfg }, holder.name)
    elseif holder and stalled and stalled >= math.max(3 * (guard.interval or 30), 60) then
      out[#out + 1] = ("%s holds back the most (%s) and has confirmed nothing for %s: its DMS task stopped"
        .. " reading it. Look at it (`migrun -i --config %s`, then tasks() and lag()), then redo that group"
        .. " alone: %s (drops and recreates its slot, which frees the WAL)"):format(holder.name,
        human(holder.retained_bytes), text.duration(stalled), cfg,
        command_line{ "migrun", dir .. "/partial_restart.lua", holder.name, "--config", cfg })
    elseif holder then
      out[#out + 1] = ("the tasks read their slots but fall behind (%s the most: %s behind); if its task is"
        .. " stuck, %s redoes that group alone"):format(holder.name, human(holder.behind_bytes),
        command_line{ "migrun", dir .. "/partial_restart.lua", holder.name, "--config", cfg })
    end
    out[#out + 1] = "to let the tasks catch up, " .. raise
  end
  out[#out + 1] = ("to give this attempt up and free the WAL at once: %s (drops every slot, starts again)")
    :format(command_line{ "migrun", dir .. "/full_restart.lua", "--config", cfg })
  return table.concat(out, "; ")
end

local function replica_advice(r, cfg)
  if r.replica_paused then
    return ("the paused replica keeps every WAL segment it receives until the resume_replica step (after QA)%s:"
      .. " free space on its WAL disk, or move its pg_wal to a bigger disk (runbook step 5), then run the"
      .. " playbook again; or lower wal_guard.replica_min_free_bytes in %s if the disk can take it"):format(
      r.replica_wal_bytes and (" (its pg_wal holds " .. human(r.replica_wal_bytes) .. ")") or "", cfg)
  end
  return ("the replica is not paused, so migrun is not what fills its disk: free space on it, or lower"
    .. " wal_guard.replica_min_free_bytes in %s"):format(cfg)
end

---------------------------------------------------------------------------
-- Slot invalidation (PostgreSQL 13+)
---------------------------------------------------------------------------

-- From PostgreSQL 13, max_slot_wal_keep_size caps the WAL a slot may keep:
-- past it, the next checkpoint removes WAL the slot needs and the slot is
-- invalidated for good (wal_status 'lost'): its DMS task can never read it
-- again. wal_status says where each slot stands (reserved, extended: within
-- the limits; unreserved: past them, lost at the next checkpoint; lost), and
-- safe_wal_size how many more bytes of WAL may be written before it is in
-- danger (NULL without a limit, or once lost). 17 adds invalidation_reason.
function walguard.limits_sql(version)
  if version < 130000 then return nil end
  return ("select s.slot_name, s.wal_status, s.safe_wal_size::int8 as safe_wal_size, %s as reason,"
    .. " k.keep_mb, k.wal_keep_mb from (select"
    .. " (select setting::int8 from pg_settings where name = 'max_slot_wal_keep_size') as keep_mb,"
    .. " (select setting::int8 from pg_settings where name = 'wal_keep_size') as wal_keep_mb) k"
    .. " left join pg_replication_slots s on true"):format(
      version >= 170000 and "s.invalidation_reason" or "null::text")
end

local function opt(v)
  if v == nil or rawequal(v, require("migrun.pg").null) then return nil end
  return v
end

-- Each slot's wal_status and safe_wal_size into r.slots; the limit into
-- r.keep_bytes (nil: no limit) -> true | nil, err. Before 13: nothing to read.
local function read_limits(source, r)
  local sql = walguard.limits_sql(source.conn:server_version())
  if not sql then r.limits_note = "no max_slot_wal_keep_size before PostgreSQL 13: slots are never invalidated" return true end
  local res, err = source:query(sql)
  if not res then return nil, err end
  local by_name = {}
  for row in res:rows() do
    local keep = opt(row.keep_mb)
    r.keep_bytes = keep and keep >= 0 and keep * 1024 * 1024 or nil
    r.wal_keep_bytes = (opt(row.wal_keep_mb) or 0) * 1024 * 1024
    if opt(row.slot_name) then by_name[row.slot_name] = row end
  end
  for _, slot in ipairs(r.slots) do
    local row = by_name[slot.name]
    if row then
      slot.wal_status, slot.safe_wal_size = opt(row.wal_status), opt(row.safe_wal_size)
      slot.invalidation_reason = opt(row.reason)
    end
  end
  return true
end

local function is_watch(name, prefix)
  return name == require("migrun.watch").slot_name(prefix or "dms_slot_")
end

-- A value for max_slot_wal_keep_size worth proposing: twice what the slots
-- hold now and at least twice the present limit, in whole GB (MB when small).
local function proposed_keep(r)
  local want = math.max(2 * (r.held_bytes or 0), 2 * (r.keep_bytes or 0), 1024 ^ 3)
  return ("%dGB"):format(math.ceil(want / 1024 ^ 3))
end

-- The slots in danger of invalidation -> level ("ok"|"warn"|"stop"), problems, advice.
-- Warn when a slot has used half of what it may keep, or would reach the
-- limit within warn_ahead at the WAL rate; stop at a fifth left, within three
-- checks at that rate, once past the limit (unreserved) or lost. The watch
-- slot only warns: losing it costs a verification of every table, not CDC.
function walguard.slot_limits(r, g, opts)
  local a = opts.advice or {}
  local cfg = a.config or "migration.lua"
  local dir = a.playbooks or "playbooks"
  local level, problems, advice = "ok", {}, {}
  local function raise(l) if l == "stop" or (l == "warn" and level == "ok") then level = l end end
  local allowance = r.keep_bytes and math.max(r.keep_bytes, r.wal_keep_bytes or 0)
  local rate = r.wal_rate
  local threatened, lost = {}, {}
  for _, slot in ipairs(r.slots) do
    local watch = is_watch(slot.name, opts.prefix)
    local safe, st = slot.safe_wal_size, slot.wal_status
    local eta = safe and rate and rate > 0 and math.max(0, safe) / rate or nil
    slot.eta_lost = eta
    local l, what
    if st == "lost" then
      l, what = "stop", ("%s is lost: PostgreSQL removed WAL it needs (wal_status lost%s)"):format(slot.name,
        slot.invalidation_reason and (", " .. slot.invalidation_reason) or "")
      lost[#lost + 1] = slot
    elseif st == "unreserved" then
      l, what = "stop", ("%s no longer keeps the WAL it needs (wal_status unreserved: past max_slot_wal_keep_size"
        .. " %s): the next checkpoint removes it and the slot is lost"):format(slot.name, human(r.keep_bytes or 0))
      threatened[#threatened + 1] = slot
    elseif safe and allowance then
      local stop_at = math.max(allowance / 5, rate and 3 * g.interval * rate or 0)
      local warn_at = math.max(allowance / 2, rate and g.warn_ahead * rate or 0)
      if safe <= stop_at then l = "stop" elseif safe <= warn_at then l = "warn" end
      if l then
        what = ("%s would be lost after %s more WAL (safe_wal_size; wal_status %s): max_slot_wal_keep_size %s caps what a"
          .. " slot keeps, and past it PostgreSQL removes the WAL the slot needs at the next checkpoint%s"):format(
          slot.name, human(math.max(0, safe)), tostring(st), human(r.keep_bytes),
          eta and ("; at this rate (%s/min of WAL) in about %s"):format(human(rate * 60), text.duration(eta)) or "")
        threatened[#threatened + 1] = slot
      end
    end
    if l then
      if watch then l = "warn" end
      raise(l)
      problems[#problems + 1] = what .. (watch and " (the live verification's watch slot)" or "")
    end
  end
  if #threatened > 0 then
    advice[#advice + 1] = ("raise max_slot_wal_keep_size on the primary before the slot is lost, for example"
      .. " `ALTER SYSTEM SET max_slot_wal_keep_size = '%s'` then `SELECT pg_reload_conf()` (no restart; -1 lifts"
      .. " the limit, and wal_guard.stop_bytes and the free-disk thresholds then guard the disk alone), then run %s:"
      .. " it resumes at the step that stopped"):format(proposed_keep(r),
      a.rerun and command_line{ a.rerun } or "the same playbook again")
    local group = threatened[1]
    for _, slot in ipairs(threatened) do if not is_watch(slot.name, opts.prefix) then group = slot break end end
    if not opts.tasks then
      advice[#advice + 1] = "no DMS task reads the slots before phase II (the tasks are created after the full load"
        .. " and its QA): until then only a higher limit saves them"
    elseif not is_watch(group.name, opts.prefix) then
      advice[#advice + 1] = ("a DMS task frees its slot as it confirms what it applied; if the task of %s stopped"
        .. " reading it, %s redoes that group alone"):format(group.name,
        command_line{ "migrun", dir .. "/partial_restart.lua", group.name, "--config", cfg })
    end
  end
  for _, slot in ipairs(lost) do
    if is_watch(slot.name, opts.prefix) then
      advice[#advice + 1] = ("nothing of the migration is lost with %s: the next verification compares every"
        .. " table whole (%s)"):format(slot.name, command_line{ "migrun", dir .. "/verify.lua", "--config", cfg })
    else
      advice[#advice + 1] = ("no DMS task can read %s any more: redo its group alone with %s (drops and recreates"
        .. " the slot, loads the group's tables again), or give the attempt up with %s"):format(slot.name,
        command_line{ "migrun", dir .. "/partial_restart.lua", slot.name, "--config", cfg },
        command_line{ "migrun", dir .. "/full_restart.lua", "--config", cfg })
    end
  end
  if #lost > 0 and #threatened == 0 and r.keep_bytes then
    advice[#advice + 1] = ("raise max_slot_wal_keep_size (now %s) so that it does not happen again"):format(
      human(r.keep_bytes or 0))
  end
  return level, problems, advice
end

-- config.wal_guard with its defaults.
local function settings(guard)
  local g = {
    warn_bytes = guard.warn_bytes or 50 * GiB, stop_bytes = guard.stop_bytes or 200 * GiB,
    warn_free_percent = guard.warn_free_percent, stop_free_percent = guard.stop_free_percent,
    replica_min_free_bytes = guard.replica_min_free_bytes or 20 * GiB,
    replica_min_free_percent = guard.replica_min_free_percent,
    warn_ahead = guard.warn_ahead or 3600, interval = guard.interval or 30,
  }
  assert(g.warn_bytes <= g.stop_bytes, "walguard.check: warn_bytes must not exceed stop_bytes")
  return g
end

-- The measurements: migrun's slots and the WAL the oldest holds back, the
-- slots' limits, the WAL directories and disks, the rates -> report | nil, err.
local function measure(source, replica, guard, g, opts, now)
  local cur, err = source:query(walguard.sql(source.conn:server_version()).current_lsn)
  if not cur then return nil, err end
  local all
  all, err = pgl.slots(source, { prefix = opts.prefix })
  if not all then return nil, err end
  local current = cur[1].lsn
  local r = { current_lsn = current, slots = {}, held_bytes = 0, level = "ok", problems = {} }
  local oldest
  for _, s in ipairs(all) do
    if s.owned then
      local slot = { name = s.name, restart_lsn = s.restart_lsn, confirmed_flush_lsn = s.confirmed_flush_lsn,
        active = s.active,
        retained_bytes = s.restart_lsn and math.max(0, current - s.restart_lsn) or nil,
        behind_bytes = s.confirmed_flush_lsn and math.max(0, current - s.confirmed_flush_lsn) or nil }
      r.slots[#r.slots + 1] = slot
      if s.restart_lsn and (not oldest or s.restart_lsn < oldest.restart_lsn) then oldest = slot end
    end
  end
  if oldest then r.held_bytes, r.holder, r.holder_slot = oldest.retained_bytes, oldest.name, oldest end
  local lok, lerr = read_limits(source, r)
  if not lok then return nil, lerr end
  r.wal_dir_bytes, r.wal_dir_note = wal_dir_bytes(source)
  local d, why = walguard.free_space(source, guard.source_free_command, "primary")
  r.source = d or { note = why }

  if replica then
    local st = replica_.status(replica)
    if st then r.replica_paused = st.pause_state ~= nil and st.pause_state ~= "not paused" end
    r.replica_wal_bytes = wal_dir_bytes(replica)
    d, why = walguard.free_space(replica, guard.replica_free_command, "replica")
    r.replica = d or { note = why }
  end

  if opts.tracker then
    opts.tracker:add(now, r)
    r.rate, r.wal_rate = opts.tracker:rate(), opts.tracker:wal_rate()
    for _, slot in ipairs(r.slots) do slot.stalled_seconds = opts.tracker:stalled(slot.name, now) end
  end
  if r.rate and r.rate > 0 then
    r.eta_stop = math.max(0, (g.stop_bytes - r.held_bytes) / r.rate)
    if r.source.free then r.eta_full = r.source.free / r.rate end
  end
  return r
end

-- "migrun's N slots hold back X of WAL on the primary (from ...; pg_wal ...; free ...)"
local function held_line(r)
  local n = #r.slots
  local line = ("migrun's %d slot%s hold%s back %s of WAL on the primary"):format(n, n == 1 and "" or "s",
    n == 1 and "s" or "", human(r.held_bytes))
  local detail = {}
  local oldest = r.holder_slot
  if oldest then
    detail[#detail + 1] = ("from %s's restart_lsn %s to %s"):format(oldest.name, tostring(oldest.restart_lsn),
      tostring(r.current_lsn))
  end
  -- what could not be measured is said, never left out silently
  detail[#detail + 1] = r.wal_dir_bytes and ("pg_wal holds " .. human(r.wal_dir_bytes)) or r.wal_dir_note
  if r.source.free then
    detail[#detail + 1] = human(r.source.free) .. " free" .. (r.source.total and (" of " .. human(r.source.total)) or "")
  else
    detail[#detail + 1] = "free disk not measured: " .. tostring(r.source.note)
      .. " (wal_guard.source_free_command measures it)"
  end
  if #detail > 0 then line = line .. " (" .. table.concat(detail, "; ") .. ")" end
  return line
end

-- r.prediction: when the stop threshold or a full disk comes at this rate.
local function predict(r, g, tracker)
  if not (r.rate and r.rate > 0) then return end
  -- beyond a week a rate says nothing worth reading
  local parts, WEEK = {}, 7 * 86400
  if r.eta_stop and r.eta_stop > 0 and r.eta_stop < WEEK then
    parts[#parts + 1] = "the stop threshold " .. human(g.stop_bytes) .. " is reached in about " .. text.duration(r.eta_stop)
  end
  if r.eta_full and r.eta_full < WEEK then
    parts[#parts + 1] = "the primary's disk is full in about " .. text.duration(r.eta_full)
  end
  if #parts > 0 then
    r.prediction = ("at this rate (%s/min held back more, over the last %s) %s"):format(human(r.rate * 60),
      text.duration(tracker.samples[#tracker.samples].t - tracker.samples[1].t),
      table.concat(parts, " and "))
  end
end

-- The WAL held back, and the primary's free space in percent, now and
-- predicted within warn_ahead -> level | nil (problems added to r.problems).
local function wal_verdict(r, g, line)
  local problems, level = r.problems, nil
  if r.held_bytes >= g.stop_bytes then
    level = "stop"
    problems[#problems + 1] = line .. ", at or above the stop threshold " .. human(g.stop_bytes)
  elseif r.held_bytes >= g.warn_bytes then
    level = "warn"
    problems[#problems + 1] = line .. ", above the warning threshold " .. human(g.warn_bytes)
      .. " (the run stops at " .. human(g.stop_bytes) .. ")"
  end
  local pct = percent(r.source)
  if pct and g.stop_free_percent and pct < g.stop_free_percent then
    level = "stop"
    problems[#problems + 1] = ("the primary's WAL disk is %.1f%% free, below wal_guard.stop_free_percent %g%%")
      :format(pct, g.stop_free_percent)
  elseif pct and g.warn_free_percent and pct < g.warn_free_percent then
    level = level or "warn"
    problems[#problems + 1] = ("the primary's WAL disk is %.1f%% free, below wal_guard.warn_free_percent %g%%")
      :format(pct, g.warn_free_percent)
  end
  -- predicted: the stop threshold or a full disk within warn_ahead
  local soon = (r.eta_stop and r.eta_stop > 0 and r.eta_stop <= g.warn_ahead)
    or (r.eta_full and r.eta_full <= g.warn_ahead)
  if not level and soon then
    level = "warn"
    problems[#problems + 1] = line
  end
  return level
end

-- The replica's disk -> level | nil, problem, advice.
local function replica_verdict(r, g, opts)
  local rfree, rpct = r.replica.free, percent(r.replica)
  local low, near
  if rfree and rfree < g.replica_min_free_bytes then
    low = ("the replica has %s free (minimum %s)"):format(human(rfree), human(g.replica_min_free_bytes))
  elseif rpct and g.replica_min_free_percent and rpct < g.replica_min_free_percent then
    low = ("the replica's WAL disk is %.1f%% free (minimum %g%%)"):format(rpct, g.replica_min_free_percent)
  elseif rfree and rfree < 2 * g.replica_min_free_bytes then
    near = ("the replica has %s free, near the minimum %s"):format(human(rfree), human(g.replica_min_free_bytes))
  elseif rpct and g.replica_min_free_percent and rpct < 2 * g.replica_min_free_percent then
    near = ("the replica's WAL disk is %.1f%% free, near the minimum %g%%"):format(rpct, g.replica_min_free_percent)
  end
  if not (low or near) then return nil end
  -- only a paused replica piles WAL up because of migrun: a stop is for that
  return (low and r.replica_paused) and "stop" or "warn",
    (low or near) .. (r.replica_paused and " while paused" or " (not paused)"),
    replica_advice(r, (opts.advice or {}).config or "migration.lua")
end

local function ok_message(r, line)
  local parts = { line }
  if r.prediction then parts[#parts + 1] = r.prediction end
  local nearest
  for _, slot in ipairs(r.slots) do
    if slot.safe_wal_size and (not nearest or slot.safe_wal_size < nearest.safe_wal_size) then nearest = slot end
  end
  if nearest then
    parts[#parts + 1] = ("max_slot_wal_keep_size %s: %s may take %s more WAL before it is lost"):format(
      human(r.keep_bytes), nearest.name, human(nearest.safe_wal_size))
  end
  if r.replica_wal_bytes then parts[#parts + 1] = "replica pg_wal " .. human(r.replica_wal_bytes) end
  if r.replica and r.replica.free then parts[#parts + 1] = "replica free " .. human(r.replica.free) end
  return "WAL guard ok: " .. table.concat(parts, "; ")
end

function walguard.check(source, replica, guard, opts)
  assert(type(source) == "table" and source.query, "walguard.check: source (a migrun.db Db) expected")
  guard = guard or {}
  opts = opts or {}
  local g = settings(guard)
  local r, err = measure(source, replica, guard, g, opts, opts.now or host.monotonic())
  if not r then return nil, err end

  local function raise_level(level)
    if level == "stop" or (level == "warn" and r.level == "ok") then r.level = level end
  end
  local problems, advice = r.problems, {}
  local line = held_line(r)
  local wal_level = wal_verdict(r, g, line)
  predict(r, g, opts.tracker)
  if wal_level then
    raise_level(wal_level)
    if r.prediction then problems[#problems] = problems[#problems] .. "; " .. r.prediction end
    advice[#advice + 1] = wal_advice(r, g, opts, wal_level == "stop")
  end

  -- slots PostgreSQL would invalidate (max_slot_wal_keep_size)
  local sl_level, sl_problems, sl_advice = walguard.slot_limits(r, g, opts)
  raise_level(sl_level)
  table.move(sl_problems, 1, #sl_problems, #problems + 1, problems)
  table.move(sl_advice, 1, #sl_advice, #advice + 1, advice)

  if replica and r.replica then
    local level, problem, what = replica_verdict(r, g, opts)
    if level then
      raise_level(level)
      problems[#problems + 1] = problem
      advice[#advice + 1] = what
    end
  end

  if r.level == "ok" then
    r.message = ok_message(r, line)
  else
    r.message = ("WAL guard %s: %s. What to do: %s."):format(r.level == "stop" and "STOP" or "warning",
      table.concat(problems, "; "), table.concat(advice, "; "))
  end
  return r
end

return walguard
