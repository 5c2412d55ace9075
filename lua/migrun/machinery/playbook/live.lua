--[[
migrun.playbook.live: what a running migration is doing now, kept where
another process can read it without disturbing the run: `playbooks/status.lua`
(another terminal), the metrics server (a child of the run) and the HTML
report. Everything here only reads, except the two writers the runner uses.

Files under the state directory (0600, beside journal.json):
  progress.json   the live progress of the running step: the progress bar's
                  snapshot (migrun.playbook.progress) with the playbook, step
                  and pid; replaced atomically, at most every `interval`
                  seconds (and at the bar's end)
  samples.jsonl   a small time series, one JSON object a line, appended while
                  the WAL guard checks and while cdc.watch polls: the primary's
                  WAL position, each slot's lag and retained WAL, the tasks'
                  states. The lag in time and the report's charts come from it.

  local live = require "migrun.playbook.live"
  local w = live.progress_writer(state_dir, { interval = 2 })
  w:save(record [, force])            -- -> true | nil, err (a skipped save is true)
  live.read_progress(state_dir) -> record | nil
  live.append_sample(state_dir, sample) -> true | nil, err   (sample.t: epoch seconds)
  live.read_samples(state_dir [, { since = epoch, limit = n, offset = bytes }])
      -> { sample, ... } (oldest first), offset (where the next read of new lines starts)

  live.lock_state(state_dir) -> { held = bool, pid = n | nil, alive = bool | nil }
      Whether a migrun holds state_dir/lock, without taking it (taking it,
      even for a moment, could make a playbook starting then refuse to run):
      the holder's pid is in the file (host.lock writes it), and the kernel's
      table of flock locks (/proc/locks) says whether a lock is held on that
      file's inode.

  live.slots(db, { prefix = }) -> { wal_lsn = LSN, at = epoch, slots = { { name, owned,
      active, confirmed_flush_lsn, restart_lsn, lag_bytes, retained_bytes,
      replay_lag_seconds, wal_status, safe_wal_size } } } | nil, err
      One read-only query on the primary: every replication slot with how far
      it is behind the current WAL position (lag: to confirmed_flush_lsn;
      retained: to restart_lsn), when a walsender serves it (real DMS), that
      walsender's replay_lag, and from PostgreSQL 13 its wal_status and
      safe_wal_size (bytes of WAL before max_slot_wal_keep_size invalidates
      it; nil without a limit). Every value plain: nil for NULL, LSNs as
      migrun.lsn values (tostring for JSON).
  live.held(slots) -> bytes | nil
      The WAL migrun's slots hold back, as the WAL guard counts it: the
      largest retained_bytes among the owned slots (the oldest restart_lsn:
      the slots share one WAL stream, so retained figures do not add up).
      slots: live.slots(...).slots or a sample's slots.
  live.lag_seconds(history, confirmed_lsn, now [, current]) -> seconds, exact | nil
      How long ago the primary's WAL was where the slot has confirmed: the
      history is a list of { t = epoch, wal_lsn = "X/Y" } (oldest first), the
      time found between the two readings that bracket the LSN. It is how
      PostgreSQL's walsender measures replay_lag, for consumers that do not
      report through a walsender (the DMS emulator). exact = false when the
      LSN is older than the history: seconds is then a lower bound.
  live.epoch("2026-11-21T12:01:03Z") -> Unix time | nil   (the journal's timestamps)
]]
local host = require "migrun.host"
local json = require "migrun.json"
local lsn = require "migrun.lsn"
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local errors = require "migrun.error"
local text = require "migrun.text"

local live = {}

local FILE_MODE = tonumber("600", 8)

live.PROGRESS = "progress.json"
live.SAMPLES = "samples.jsonl"

local read_file = host.read_file

-- JSON without the values it cannot hold (NaN, inf), keys sorted
local function clean(v)
  if type(v) == "number" and (v ~= v or v == math.huge or v == -math.huge) then return nil end
  if type(v) ~= "table" then return v end
  local is_array = json.is_array(v)
  local out = is_array and json.array() or {}
  for k, x in pairs(v) do out[k] = clean(x) end
  return out
end

---------------------------------------------------------------------------
-- progress.json
---------------------------------------------------------------------------

local Writer = {}
Writer.__index = Writer

function live.progress_writer(state_dir, opts)
  assert(type(state_dir) == "string", "live.progress_writer: state_dir expected")
  opts = opts or {}
  return setmetatable({ path = state_dir .. "/" .. live.PROGRESS, interval = opts.interval or 2,
                        last = nil }, Writer)
end

function Writer:save(record, force)
  local now = host.monotonic()
  if not force and self.last and now - self.last < self.interval then return true end
  self.last = now
  return host.write_file(self.path, json.encode(clean(record)) .. "\n", FILE_MODE)
end

function live.read_progress(state_dir)
  local s = read_file(state_dir .. "/" .. live.PROGRESS)
  if not s then return nil end
  local v = json.decode(s) -- nil for a torn or malformed file
  if type(v) == "table" then return v end
  return nil
end

---------------------------------------------------------------------------
-- samples.jsonl
---------------------------------------------------------------------------

function live.append_sample(state_dir, sample)
  assert(type(sample) == "table" and type(sample.t) == "number", "live.append_sample: { t = epoch, ... } expected")
  local path = state_dir .. "/" .. live.SAMPLES
  if not read_file(path) then
    local ok, err = host.write_file(path, "", FILE_MODE) -- created 0600, then appended to
    if not ok then return nil, err end
  end
  local f, err = io.open(path, "a")
  if not f then return nil, errors.new{ kind = "os", where = path, message = tostring(err) } end
  -- one write of one line: the metrics server may read while we append
  f:setvbuf("full", 1 << 16)
  f:write(json.encode(clean(sample)) .. "\n")
  f:close()
  return true
end

function live.read_samples(state_dir, opts)
  opts = opts or {}
  local out = {}
  local f = io.open(state_dir .. "/" .. live.SAMPLES, "rb")
  if not f then return out, opts.offset or 0 end
  local offset = opts.offset or 0
  if offset > 0 then
    local size = f:seek("end")
    if size < offset then offset = 0 end -- replaced (a journal set aside): from the top
    f:seek("set", offset)
  end
  local s = f:read("a")
  f:close()
  -- complete lines only: one being appended right now is read next time
  local complete = s:match("^.*\n") or ""
  for line in complete:gmatch("[^\n]+") do
    local v = json.decode(line)
    if type(v) == "table" and type(v.t) == "number" and (not opts.since or v.t >= opts.since) then
      out[#out + 1] = v
    end
  end
  if opts.limit and #out > opts.limit then out = table.move(out, #out - opts.limit + 1, #out, 1, {}) end
  return out, offset + #complete
end

---------------------------------------------------------------------------
-- The lock, looked at without taking it
---------------------------------------------------------------------------

local function inode_of(path)
  local ok, _, _, out = proc.run{ "stat", "-L", "-c", "%i", path }
  return ok and tonumber((out or ""):match("%d+")) or nil
end

function live.lock_state(state_dir)
  local path = state_dir .. "/lock"
  local content = read_file(path)
  if not content then return { held = false } end
  local pid = tonumber(content:match("^%s*(%d+)"))
  local ino = inode_of(path)
  local held = false
  local locks = read_file("/proc/locks") or ""
  for kind, holder, inode in locks:gmatch("%d+:%s+(%u+)%s+%u+%s+%u+%s+(%d+)%s+%x+:%x+:(%d+)") do
    if kind == "FLOCK" and ino and tonumber(inode) == ino then
      held = true
      pid = pid or tonumber(holder)
    end
  end
  local alive
  if pid then alive = read_file("/proc/" .. pid .. "/stat") ~= nil end
  return { held = held, pid = pid, alive = alive }
end

---------------------------------------------------------------------------
-- The primary's slots
---------------------------------------------------------------------------

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

function live.slots_sql(version)
  local n = lsn.names(version)
  -- replay_lag of a walsender exists from PostgreSQL 10 on
  local lag = version >= 100000 and "extract(epoch from r.replay_lag)::float8" or "null::float8"
  -- wal_status and safe_wal_size (how close max_slot_wal_keep_size is) from 13 on
  local limit = version >= 130000 and "s.wal_status, s.safe_wal_size::int8 as safe_wal_size"
    or "null::text as wal_status, null::int8 as safe_wal_size"
  return ("select %s() as wal_lsn, extract(epoch from now())::float8 as at, s.slot_name, s.plugin, s.active,"
    .. " s.confirmed_flush_lsn, s.restart_lsn,"
    .. " %s(%s(), s.confirmed_flush_lsn)::int8 as lag_bytes,"
    .. " %s(%s(), s.restart_lsn)::int8 as retained_bytes, %s as replay_lag, %s"
    .. " from pg_replication_slots s left join pg_stat_replication r on r.pid = s.active_pid"
    .. " where s.slot_type = 'logical' order by s.slot_name"):format(n.current_wal_lsn,
      n.wal_lsn_diff, n.current_wal_lsn, n.wal_lsn_diff, n.current_wal_lsn, lag, limit)
end

function live.slots(db, opts)
  assert(type(db) == "table" and db.query, "live.slots: a migrun.db Db expected")
  opts = opts or {}
  local prefix = opts.prefix or "dms_slot_"
  local version = db.conn:server_version()
  local res, err = db:query(live.slots_sql(version))
  if not res then return nil, err end
  local out = { slots = {} }
  if #res == 0 then
    local r2, err2 = db:query(("select %s() as wal_lsn, extract(epoch from now())::float8 as at")
      :format(lsn.names(version).current_wal_lsn))
    if not r2 then return nil, err2 end
    out.wal_lsn, out.at = r2[1].wal_lsn, r2[1].at
    return out
  end
  for row in res:rows() do
    out.wal_lsn, out.at = row.wal_lsn, row.at
    local plugin = opt(row.plugin)
    out.slots[#out.slots + 1] = {
      name = row.slot_name, active = row.active,
      owned = row.slot_name:sub(1, #prefix) == prefix and plugin == "pglogical",
      confirmed_flush_lsn = opt(row.confirmed_flush_lsn), restart_lsn = opt(row.restart_lsn),
      lag_bytes = opt(row.lag_bytes), retained_bytes = opt(row.retained_bytes),
      replay_lag_seconds = opt(row.replay_lag),
      wal_status = opt(row.wal_status), safe_wal_size = opt(row.safe_wal_size),
    }
  end
  return out
end

function live.held(slots)
  local held
  for _, s in ipairs(type(slots) == "table" and slots or {}) do
    local r = tonumber(s.retained_bytes)
    if r and s.owned ~= false and (not held or r > held) then held = r end
  end
  return held
end

---------------------------------------------------------------------------
-- Lag in time
---------------------------------------------------------------------------

local function as_lsn(v)
  if v == nil then return nil end
  if type(v) == "string" then return lsn.parse(v) end
  return v
end

function live.lag_seconds(history, confirmed, now, current)
  confirmed = as_lsn(confirmed)
  if not confirmed then return nil end
  current = as_lsn(current)
  if current and confirmed >= current then return 0, true end
  local points = {}
  for _, s in ipairs(history or {}) do
    local at = as_lsn(s.wal_lsn)
    if at and type(s.t) == "number" then points[#points + 1] = { t = s.t, lsn = at } end
  end
  -- the reading just taken is the newest point of the history
  if current then points[#points + 1] = { t = now, lsn = current } end
  local prev
  for _, p in ipairs(points) do
    if p.lsn > confirmed then
      if not prev then return math.max(0, now - p.t), false end -- older than the history: at least
      local span = p.lsn - prev.lsn
      local frac = span > 0 and (confirmed - prev.lsn) / span or 1
      return math.max(0, now - (prev.t + (p.t - prev.t) * frac)), true
    end
    prev = p
  end
  return 0, true -- the slot has confirmed all the history saw
end

-- The journal's UTC timestamps as Unix time, whatever this machine's time zone.
live.epoch = text.epoch

return live
