--[[
migrun.walkeep: whether PostgreSQL will let migrun's slots keep the WAL they
must hold until DMS reads it. From their creation (before the full load)
until the DMS tasks have caught up, the slots hold every WAL segment the
source writes. PostgreSQL 13+ invalidates a slot that holds more than
max_slot_wal_keep_size (pg_replication_slots.wal_status = 'lost'), and 18+
one left inactive longer than idle_replication_slot_timeout: its DMS task
cannot continue, CDC is gone and the migration starts over. Reads only.

  local walkeep = require "migrun.walkeep"
  local w = assert(walkeep.start(source))            -- the settings; a first WAL sample
  ... the other checks run meanwhile ...
  for _, f in ipairs(walkeep.finish(w, { seconds = 5, data_bytes = n, load_rate = r,
      stop_bytes = cfg.wal_guard.stop_bytes })) do ... end

  walkeep.start(db) -> state | nil, err
      Reads max_slot_wal_keep_size and idle_replication_slot_timeout (where
      the version has them); when either limits the slots, samples the WAL
      position (pg_current_wal_lsn()) and the time.
  walkeep.finish(state, opts) -> findings ({ server = "source", check, ok,
      severity, message, hint }, as preflight's)
      opts: seconds (the WAL rate is measured over at least this long: what
      has passed since start counts, the rest is waited; 0: not measured),
      data_bytes (what the full load copies), load_rate (bytes/s),
      stop_bytes (wal_guard.stop_bytes), sleep (default host.sleep),
      now (default host.monotonic).
      The estimate: the slots hold WAL for window = max(1 h, 2 x data_bytes /
      load_rate) (the load, then about as long again for the indexes, the
      QA, DMS's setup and catch-up), so they need rate x window, at least
      walkeep.FLOOR (a quiet moment's rate says little about the hours to
      come). max_slot_wal_keep_size below that is an error; any other value
      but -1 a warning that says what it means; at or below stop_bytes an
      error (the guard would stop after PostgreSQL invalidated the slots).
      idle_replication_slot_timeout below the window is an error (the slots
      are idle until the tasks start), any other value but 0 a warning.
  walkeep.estimate(opts) -> { window (s), rate (bytes/s or nil), needed (bytes) }
]]
local host = require "migrun.host"
local lsn = require "migrun.lsn"
local pg = require "migrun.pg"
local text = require "migrun.text"

local walkeep = {}

local GiB = 2 ^ 30
walkeep.FLOOR = GiB
walkeep.MIN_WINDOW = 3600

local UNIT_BYTES = { B = 1, kB = 1024, MB = 1024 ^ 2, GB = 1024 ^ 3, TB = 1024 ^ 4 }
local UNIT_SECONDS = { ms = 0.001, s = 1, min = 60, h = 3600, d = 86400 }

local RELOAD = "a reload, no restart: ALTER SYSTEM SET %s = %s; SELECT pg_reload_conf()"

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

function walkeep.start(db)
  assert(db and db.query, "walkeep.start: a migrun.db Db expected")
  local version = db.conn:server_version()
  local st = { db = db, version = version }
  if version < 130000 then return st end
  local res, err = db:query("select name, setting, unit from pg_settings"
    .. " where name in ('max_slot_wal_keep_size', 'idle_replication_slot_timeout')")
  if not res then return nil, err end
  for row in res:rows() do
    local v, unit = tonumber(row.setting), opt(row.unit)
    if row.name == "max_slot_wal_keep_size" then
      if v >= 0 then st.keep_bytes = v * (UNIT_BYTES[unit] or 1024 ^ 2) end
      st.keep_text = row.setting .. (unit and unit ~= "" and " " .. unit or "")
    elseif v > 0 then
      st.idle_seconds = v * (UNIT_SECONDS[unit] or 1)
    end
  end
  if st.keep_bytes or st.idle_seconds then
    res, err = db:query(("select %s() as l"):format(lsn.names(version).current_wal_lsn))
    if not res then return nil, err end
    st.first = { lsn = res[1].l, at = host.monotonic() }
  end
  return st
end

function walkeep.estimate(opts)
  local window = walkeep.MIN_WINDOW
  if opts.data_bytes and opts.load_rate then window = math.max(window, 2 * opts.data_bytes / opts.load_rate) end
  local needed = walkeep.FLOOR
  if opts.rate then needed = math.max(needed, opts.rate * window) end
  return { window = window, rate = opts.rate, needed = needed }
end

-- The WAL rate since start, after waiting for the rest of `seconds`.
local function rate(st, opts)
  local seconds = opts.seconds or 5
  if not st.first or seconds <= 0 then return nil, "not measured (preflight.wal_rate_seconds = 0)" end
  local now, sleep = opts.now or host.monotonic, opts.sleep or host.sleep
  local left = st.first.at + seconds - now()
  if left > 0 then sleep(left) end
  local res, err = st.db:query(("select %s() as l"):format(lsn.names(st.version).current_wal_lsn))
  if not res then return nil, "not measured: " .. tostring(err) end
  local elapsed = now() - st.first.at
  return (res[1].l - st.first.lsn) / elapsed, ("%s/s of WAL measured over %.0f s"):format(
    text.bytes((res[1].l - st.first.lsn) / elapsed), elapsed)
end

local function why_window(e, opts)
  if opts.data_bytes and opts.load_rate and e.window > walkeep.MIN_WINDOW then
    return ("about %s (the load of %s at %s/s, twice over for the indexes, the QA and DMS's catch-up; "
      .. "preflight.load_rate)"):format(text.duration(e.window), text.bytes(opts.data_bytes), text.bytes(opts.load_rate))
  end
  return ("at least %s (the load, the indexes, the QA and DMS's catch-up)"):format(text.duration(e.window))
end

function walkeep.finish(st, opts)
  opts = opts or {}
  local out = {}
  local function add(check, ok, severity, message, hint)
    out[#out + 1] = { server = "source", check = check, ok = ok, severity = severity, message = message,
      hint = (not ok) and hint or nil }
  end
  if st.version < 130000 then
    add("max_slot_wal_keep_size", true, "error", "not in this version: the slots are never invalidated (the guard "
      .. "watches the WAL they hold)")
    return out
  end
  local r, how = rate(st, opts)
  local e = walkeep.estimate{ rate = r, data_bytes = opts.data_bytes, load_rate = opts.load_rate }
  local at_rate = r and r * e.window
  local held = ("the slots hold WAL for %s: %s, %s"):format(why_window(e, opts), r and how or ("WAL rate " .. how),
    (at_rate and at_rate >= walkeep.FLOOR) and ("about %s at that rate"):format(text.bytes(e.needed))
      or ("at least %s assumed (a quiet moment's rate says little of the hours to come)"):format(
        text.bytes(walkeep.FLOOR)))
  if not st.keep_bytes then
    add("max_slot_wal_keep_size", true, "error", "-1: the slots are never invalidated (the guard watches the WAL "
      .. "they hold)")
  else
    local what = ("max_slot_wal_keep_size = %s: PostgreSQL invalidates a slot that holds more WAL (wal_status "
      .. "'lost'); its DMS task cannot go on, CDC is gone and the migration starts over"):format(st.keep_text)
    local fix = ("set max_slot_wal_keep_size = -1 for the migration (" .. RELOAD .. ") and let the guard watch "
      .. "the disk (wal_guard.stop_bytes)"):format("max_slot_wal_keep_size", "-1")
    if st.keep_bytes < e.needed then
      add("max_slot_wal_keep_size", false, "error", ("%s. Too small: %s"):format(what, held),
        fix .. (", or raise it well above %s"):format(text.bytes(e.needed)))
    elseif opts.stop_bytes and opts.stop_bytes >= st.keep_bytes then
      add("max_slot_wal_keep_size", false, "error", ("%s. wal_guard.stop_bytes (%s) is not below it: the guard "
        .. "would stop the run only after PostgreSQL had invalidated the slots"):format(what,
        text.bytes(opts.stop_bytes)), ("set wal_guard.stop_bytes below it (say %s), or %s"):format(
        text.bytes(math.floor(st.keep_bytes * 0.8)), fix))
    else
      add("max_slot_wal_keep_size", false, "warning", ("%s. Enough by the estimate: %s"):format(what, held),
        fix .. ", or keep it and watch the slots' safe_wal_size")
    end
  end
  if st.idle_seconds then
    local what = ("idle_replication_slot_timeout = %s: PostgreSQL invalidates a slot left inactive longer, and "
      .. "migrun's slots are inactive from their creation until the DMS tasks start"):format(
      text.duration(st.idle_seconds))
    local fix = ("set idle_replication_slot_timeout = 0 for the migration (" .. RELOAD .. ")"):format(
      "idle_replication_slot_timeout", "0")
    if st.idle_seconds < e.window then
      add("idle_replication_slot_timeout", false, "error", ("%s, %s"):format(what, why_window(e, opts)), fix)
    else
      add("idle_replication_slot_timeout", false, "warning", what .. ": a long load or a stopped task loses them", fix)
    end
  end
  return out
end

return walkeep
