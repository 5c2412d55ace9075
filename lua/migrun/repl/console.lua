--[[
migrun.repl.console: the slot-inspection console. The REPL with the migration's
three servers connected and a few helpers for looking at replication slots,
DMS tasks and the paused replica by hand, e.g. while a playbook runs or after
one failed. It cannot hurt: it only looks, unless the operator opens a write
session on a server on purpose (see below).

    migrun -i --config migration.lua
    MIGRUN_CONFIG=migration.lua migrun -l migrun.repl.console -i
    > console.open("migration.lua")            -- from any REPL

  Globals it sets (help() lists them):
    source, replica, target   the servers (a migrun.db Db each: source:query(...)).
        Connected at open; one that cannot be reached is reported and tried
        again on its next use, so the console opens anyway. Results print
        their rows as a table (the first 50; res[i] holds them all).
        Read-only: every statement (through query, write or conn:exec) is
        checked first by migrun.repl.sqlcheck, which refuses what consumes,
        advances or drops a slot, touches pglogical's setup, pauses or
        resumes a server, and any write; the sessions also run with
        default_transaction_read_only, so the server refuses what remains.
        Db:write is echoed, not run. Calling one prints its status:
        replica() its pause state and replay LSN.
    write_session("source")   asks, says what it allows, then lets that
                              server's statements run as typed; read_only()
                              ends every write session
    slots()                   the primary's replication slots
    peek(slot [, n | lsn | {upto = n | lsn}])   pending changes of a pglogical
                              slot: whole transactions, empty ones hidden
    lag()                     per slot and task: bytes and seconds behind
    tasks()                   the migration's DMS tasks with their status
    lsn"0/16B3748"            migrun.lsn
    config                    the configuration, passwords masked
    help()                    exit or quit leaves

  console.open(path [, opts]) -> session | nil, err
      Loads the config (a bad one is an error: nothing is set), connects and
      sets the globals in opts.env (default _G); opts.say(line) prints the
      banner (default: stdout); opts.ask(question) -> the answer line
      (default: reads a line of stdin); opts.connect_timeout (seconds, default 5).
      Opening again closes the previous session's connections.
  console.main(path) -> session     the same, raising on failure (migrun --config)
  console.close()                   closes the current session's connections
  console.rows(columns, records, opts) -> Rows   a list of records that prints as
      an aligned table: columns = { {key, title [, align = "right"] [, format = fn]} },
      opts.noun = {"slot", "slots"} for the count line, opts.empty (text when
      there are no records), opts.notes (lines printed under the table).
      Rows[i] are the records (plain tables), Rows.columns, Rows.notes.

Every helper raises on failure (at the REPL the message is printed and the
session goes on); results are values, so `slots()[1].retained_bytes` works too.
Nothing the console prints holds a password: connection errors are masked and
the connections print without theirs.
]]
local pg = require "migrun.pg"
local db = require "migrun.db"
local lsn = require "migrun.lsn"
local errors = require "migrun.error"
local config = require "migrun.playbook.config"
local journal = require "migrun.playbook.journal"
local pglogical = require "migrun.pglogical"
local watch = require "migrun.watch"
local replica_status = require("migrun.replica").status
local cdc = require "migrun.cdc"
local builders = require "migrun.dms.builders"
local text = require "migrun.text"
local sqlcheck = require "migrun.repl.sqlcheck"

local console = {}

local SERVERS = { "source", "replica", "target" }
local DEFAULT_PEEK = 10
local MAX_PEEK = 10000
local DATA_WIDTH = 60
local SHOWN_ROWS = 50      -- rows a result prints (all stay in it)
local CELL_WIDTH = 60

-- Raises a one-line error (no traceback at the REPL) about the world as found.
local function fail(where, message, hint)
  error(errors.new{ kind = "console", where = where, message = message, hint = hint }, 0)
end

local function opt(v)
  if rawequal(v, pg.null) then return nil end
  return v
end

-- Printing: a list of records as an aligned table (migrun.text.columns).
console.rows = text.columns

-- A text that prints as itself (help(), short messages), not as a quoted string.
local Text = { __name = "migrun.repl.console.Text", __tostring = function(t) return t.text end }
local function plain(s) return setmetatable({ text = s }, Text) end

-- Human units for bytes.
local function human(n)
  if n == nil then return nil end
  return text.bytes(n)
end

---------------------------------------------------------------------------
-- The servers
---------------------------------------------------------------------------

local mask = journal.mask

-- A server global: the Db once connected (its fields through __index, so
-- `source:query(...)` and tab completion work), callable for a status.
-- Until it connects, any use tries to connect and raises if it cannot.
local function new_server(session, name)
  local server = {}
  local mt = { __name = "migrun.repl.console.Server" }
  function mt.__tostring()
    local d = session.dbs[name]
    if d then
      return name .. ": " .. tostring(d.conn) .. (session.writable[name] and " (WRITE SESSION)" or " (read-only)")
    end
    return ("%s: not connected (%s)"):format(name, tostring(session.failures[name] or "not tried"))
  end
  mt.__index = function(_, k)
    local d = session:db(name)
    return d[k]
  end
  mt.__call = function() return session:status(name) end
  session.server_mts[name] = mt
  return setmetatable(server, mt)
end

-- A result as the console gives it: the rows as plain records (res[i],
-- #res, res:rows(), res:columns(), res.affected, res.command, as a
-- migrun.pg Result), printing as a table of its first rows.
local Result = { __name = "migrun.repl.console.Result" }
local result_methods = {
  rows = function(self)
    local i = 0
    return function() i = i + 1 return self[i] end
  end,
  columns = function(self) return self._columns end,
}
Result.__index = function(self, k)
  if result_methods[k] then return result_methods[k] end
  return rawget(self, "_fields")[k]
end
function Result.__tostring(self)
  local names = self._columns
  if #names == 0 then return tostring(self.command or "(no result)") end
  local cols = {}
  local function format(v)
    if rawequal(v, pg.null) then return "NULL" end
    if type(v) == "string" and #v > CELL_WIDTH then return v:sub(1, CELL_WIDTH - 3) .. "..." end
    return v
  end
  for i, n in ipairs(names) do cols[i] = { n, n, format = format } end
  local shown, notes = {}, {}
  for i = 1, math.min(#self, SHOWN_ROWS) do shown[i] = self[i] end
  if #self > SHOWN_ROWS then
    notes[1] = ("(%d rows, the first %d shown; all are in the result: r = source:query(...); r[%d])")
      :format(#self, SHOWN_ROWS, #self)
  end
  local t = text.columns(cols, shown, { noun = #self <= SHOWN_ROWS and { "row", "rows" } or nil, notes = notes,
    empty = ("(no rows: %s)"):format(tostring(self.command)) })
  return tostring(t)
end

local function printable(res)
  if type(res) ~= "userdata" then return res end -- db.DRY and the like
  local out = { _columns = res:columns(), _fields = { affected = res.affected, command = res.command } }
  for i = 1, #res do out[i] = res[i] end
  return setmetatable(out, Result)
end

-- A connection that checks every statement before it runs (see
-- migrun.repl.sqlcheck), unless the server is in a write session. Only
-- the methods that read are offered (no COPY, no transaction(fn) that would
-- hand the raw connection out).
local function guarded(session, name, conn)
  local function check(sql)
    if session.writable[name] then return end
    local why = sqlcheck.refusal(type(sql) == "table" and tostring(sql[1]) or tostring(sql))
    if why then
      fail(name, ("refused: %s %s. The console is read-only; write_session(%q) opens a write"
        .. " session on the %s (it asks first)"):format(why.what, why.reason, name, name))
    end
  end
  local proxy = {}
  local methods = {
    exec = function(_, sql, ...)
      check(sql)
      local res, err = conn:exec(sql, ...)
      if not res then return nil, err end
      return printable(res)
    end,
  }
  for _, m in ipairs{ "server_version", "info", "name", "backend_pid", "in_recovery", "transaction_status",
      "escape_identifier", "escape_literal", "set_timeout", "on_notice", "close", "password" } do
    methods[m] = function(_, ...) return conn[m](conn, ...) end
  end
  methods.password = nil -- never handed out at the console
  return setmetatable(proxy, { __name = "migrun.repl.console.Conn", __index = methods,
    __tostring = function() return tostring(conn) end })
end

local Session = {}
Session.__index = Session

function Session:connect(name)
  local conninfo = self.config[name].conninfo
  local conn, err = pg.connect(conninfo, { name = name, connect_timeout = self.connect_timeout })
  if not conn then
    return nil, errors.new{ kind = "connection", where = name, code = err and err.code,
      message = ("cannot connect to the %s (%s.conninfo): %s"):format(name, name,
        mask(err and err.message or err, conninfo)),
      hint = "the console opened without it; it is tried again when next used" }
  end
  -- Read-only: statements are checked, the session refuses writes, and Db:write only echoes.
  local ok, serr = conn:exec("set default_transaction_read_only = on")
  if not ok then
    conn:close()
    return nil, serr
  end
  local d = db.wrap(guarded(self, name, conn), { dry_run = true, echo = function(line)
    self.say(("not run (the console is read-only; write_session(%q) to write): %s"):format(name, mask(line, conninfo)))
  end })
  self.raw[name] = conn
  self.dbs[name], self.failures[name] = d, nil
  -- From now on the global's fields come straight from the Db (a table
  -- __index: completion follows it, no connection attempt per access).
  self.server_mts[name].__index = d
  return d
end

-- What a write session lets through, said before it opens.
local function write_warning(name, prefix)
  local lines = {
    ("A write session on the %s runs its statements as typed: writes and DDL, and the functions the"
      .. " console refuses otherwise:"):format(name),
    "  pg_logical_slot_get_changes and pg_replication_slot_advance consume or advance a slot,",
    "  pg_drop_replication_slot drops one, pglogical.drop_* and pglogical.alter_* change the sets and",
    "  the node, pg_wal_replay_resume/pause move the paused replica, pg_terminate_backend ends a session.",
  }
  if name == "source" then
    lines[#lines + 1] = ("On %s* (each read by a DMS task) consuming, advancing or dropping loses CDC data"
      .. " that nothing brings back."):format(prefix)
  elseif name == "replica" then
    lines[#lines + 1] = "Resuming the paused replica during the full load breaks the snapshot the load reads."
  end
  return table.concat(lines, "\n")
end

function Session:write_session(name)
  if name == nil or name == false then return self:read_only() end
  if not self.config[name] or type(self.config[name]) ~= "table" or not self.config[name].conninfo then
    fail("write_session", ("write_session(name): a server expected (\"source\", \"replica\" or \"target\"), got %s")
      :format(tostring(name)))
  end
  if self.writable[name] then return plain(("the %s is already in a write session; read_only() ends it"):format(name)) end
  self:db(name)
  self.say(write_warning(name, self.config.slots.prefix))
  local answer = self.ask(("Type %s to open a write session on it (anything else keeps it read-only): "):format(name))
  if (answer or ""):match("^%s*(.-)%s*$") ~= name then
    return plain(("not opened: the %s stays read-only"):format(name))
  end
  local ok, err = self.raw[name]:exec("set default_transaction_read_only = off")
  if not ok then error(err, 0) end
  self.writable[name] = true
  self.dbs[name].dry_run = false
  self:prompt()
  return plain(("write session open on the %s: its statements run as typed. read_only() ends it."):format(name))
end

function Session:read_only()
  local closed = {}
  for _, name in ipairs(SERVERS) do
    if self.writable[name] then
      self.writable[name] = nil
      local d = self.dbs[name]
      if d then
        d.dry_run = true
        local ok, err = self.raw[name]:exec("set default_transaction_read_only = on")
        if not ok then error(err, 0) end
      end
      closed[#closed + 1] = name
    end
  end
  self:prompt()
  if #closed == 0 then return plain("every server is read-only") end
  return plain(("read-only again: %s"):format(table.concat(closed, ", ")))
end

-- The prompt says which servers are open for writes.
function Session:prompt()
  local open = {}
  for _, name in ipairs(SERVERS) do if self.writable[name] then open[#open + 1] = name end end
  self.env._PROMPT = #open > 0 and ("[WRITE: %s]> "):format(table.concat(open, ", ")) or nil
end

-- The Db of a server, connecting if needed; raises when it cannot be reached.
function Session:db(name)
  local d = self.dbs[name]
  if d then return d end
  local err
  d, err = self:connect(name)
  if not d then
    self.failures[name] = err
    error(err, 0)
  end
  return d
end

function Session:close()
  for _, name in ipairs(SERVERS) do
    local d = self.dbs[name]
    if d then
      self.dbs[name], self.raw[name], self.writable[name] = nil, nil, nil
      d:close()
    end
  end
end

---------------------------------------------------------------------------
-- The journal: groups and task ARNs recorded by the playbooks
---------------------------------------------------------------------------

-- { slots = { slot, ... }, tasks = { [slot] = arn } } from the journal (empty
-- when there is none yet). The main playbook (full.lua) records them; later
-- playbooks (a partial restart replacing a task) override what it recorded.
function Session:recorded()
  local J, err = journal.open(self.config.state_dir, { read_only = true })
  if not J then error(err, 0) end
  local out = { slots = {}, tasks = {} }
  local main = J.data.main and J.data.main.playbook
  local names = {}
  for p in pairs(J.data.playbooks) do if p ~= main then names[#names + 1] = p end end
  table.sort(names)
  if main then table.insert(names, 1, main) end
  local seen = {}
  for _, p in ipairs(names) do
    for _, step in pairs(J:steps(p)) do
      local facts = step.facts or {}
      local plan = type(facts.groups) == "table" and facts.groups or {}
      for _, g in ipairs(plan) do
        if type(g) == "table" and type(g.slot) == "string" and not seen[g.slot] then
          seen[g.slot] = true
          out.slots[#out.slots + 1] = g.slot
        end
      end
      if type(facts.tasks) == "table" then
        for slot, arn in pairs(facts.tasks) do
          if type(slot) == "string" and type(arn) == "string" and arn:match("^arn:") then out.tasks[slot] = arn end
        end
      end
    end
  end
  table.sort(out.slots)
  return out
end

---------------------------------------------------------------------------
-- DMS
---------------------------------------------------------------------------

function Session:dms_configured()
  local c = self.config.dms
  return c and c.replication_instance_arn ~= nil
end

local NO_DMS = "no DMS in this configuration (dms.replication_instance_arn is not set)"

-- The DMS client, built as the playbooks build it (migrun.playbook's ctx:dms()).
function Session:dms()
  if self._dms then return self._dms end
  if not self:dms_configured() then fail("dms", NO_DMS) end
  local c = self.config.dms
  local client, err = require("migrun.dms").client{ region = c.region, endpoint_url = c.endpoint_url }
  if not client then error(err, 0) end
  self._dms = client
  return client
end

function Session:task_id(slot)
  return cdc.task_id(self.config.name, { slot = slot })
end

-- The task of a slot: by the recorded ARN, else by its name (a task replaced
-- by a restart keeps its name). nil when DMS knows neither.
function Session:find_task(slot, arn)
  local client = self:dms()
  if arn then
    local task, err = client:describe_task(arn)
    if err then return nil, err end
    if task then return task end
  end
  local list, err = client:describe_replication_tasks{ Filters = { ["replication-task-id"] = self:task_id(slot) } }
  if not list then return nil, err end
  return list[1]
end

---------------------------------------------------------------------------
-- The helpers
---------------------------------------------------------------------------

local function current_wal_lsn(d)
  local n = lsn.names(d.conn:server_version())
  local res, err = d:query(("select %s() as l"):format(n.current_wal_lsn))
  if not res then error(err, 0) end
  return res[1].l
end

function Session:slots()
  local list, err = pglogical.slots(self:db("source"), { prefix = self.config.slots.prefix })
  if not list then error(err, 0) end
  for _, s in ipairs(list) do s.retained = human(s.retained_bytes) end
  return console.rows({
    { "name", "slot" }, { "plugin" }, { "active" }, { "restart_lsn", "restart lsn" },
    { "confirmed_flush_lsn", "confirmed flush" }, { "retained", "wal retained", align = "right" },
    { "owned", "migrun's" },
  }, list, { noun = { "slot", "slots" }, empty = "no replication slots on the source" })
end

-- Actions of the pglogical JSON protocol.
local ACTIONS = { B = "begin", C = "commit", I = "insert", U = "update", D = "delete", T = "truncate" }

local function shorten(s, width)
  if s == nil or #s <= width then return s end
  return s:sub(1, width - 3) .. "..."
end

-- peek's second argument: a count, an LSN, or { upto = count | lsn, max = rows, sets = "a,b" }.
local PEEK_USAGE = 'peek(slot [, n | lsn | { upto = n | lsn }]): e.g. peek("dms_slot_01", 10) or'
  .. ' peek("dms_slot_01", lsn"0/16B3748")'

local function peek_bound(arg)
  local opts = {}
  if type(arg) == "table" and not lsn.is(arg) then opts = arg
  elseif arg ~= nil then opts = { upto = arg } end
  local upto = opts.upto
  if upto == nil then return nil, DEFAULT_PEEK, opts end
  if math.type(upto) == "integer" then
    if upto < 1 or upto > MAX_PEEK then
      fail("peek", ("peek: a count from 1 to %d expected, got %d"):format(MAX_PEEK, upto), PEEK_USAGE)
    end
    return nil, upto, opts
  end
  local at = lsn.is(upto) and upto or (type(upto) == "string" and lsn.parse(upto))
  if not at then
    fail("peek", "peek: upto: a count or an LSN (lsn\"0/16B3748\" or \"0/16B3748\") expected, got " .. tostring(upto),
      PEEK_USAGE)
  end
  return at, nil, opts
end

function Session:peek(slot, arg)
  if type(slot) ~= "string" or slot == "" then fail("peek", "peek: a slot name expected first", PEEK_USAGE) end
  local upto_lsn, want, opts = peek_bound(arg)
  local d = self:db("source")
  local row
  for _, s in ipairs(assert(pglogical.slots(d, { prefix = self.config.slots.prefix }))) do
    if s.name == slot then row = s end
  end
  if not row then fail("peek", ("no replication slot %s on the source"):format(slot), "slots() lists them") end
  if row.plugin ~= "pglogical" then
    fail("peek", ("%s uses plugin %s; peek decodes pglogical slots only"):format(slot,
      tostring(row.plugin or row.slot_type)))
  end
  if row.active then
    fail("peek", ("%s is in use (pid %s): a slot being read cannot be peeked"):format(slot, tostring(row.active_pid)),
      "its DMS task reads it now; try again between two of its polls, or stop the task")
  end
  local sets = opts.sets or table.concat({ pglogical.set_names(slot) }, ",")
  local names = lsn.names(d.conn:server_version())
  -- Decoding stops at upto_lsn, or at the end of the transaction in which it
  -- has produced `budget` rows (every transaction, even one with no change in
  -- these sets, yields a begin and a commit row: the budget leaves room for
  -- them). Rows come back whole transactions at a time; at most max_rows.
  local max_rows = opts.max or MAX_PEEK
  local budget = upto_lsn and pg.null or math.min(100000, want * 20 + 200)
  local sql = ([[
select lsn, xid, d->>'action' as action,
       case when d->'relation' is not null then (d->'relation'->>0) || '.' || (d->'relation'->>1) end as relation,
       d->>'commit_time' as commit_time, d->>'end_lsn' as end_lsn,
       (select string_agg(key || '=' || value::text, ' ')
          from json_each(coalesce(d->'newtuple', d->'oldtuple'))) as tuple
  from (select %s as lsn, xid::text as xid, data::json as d
          from pg_logical_slot_peek_changes($1, $2::pg_lsn, $3::int,
            'min_proto_version', '1', 'max_proto_version', '1', 'startup_params_format', '1',
            'proto_format', 'json', 'pglogical.replication_set_names', $4)) p
 where d->>'action' <> 'S'
 limit $5]]):format(names.peek_lsn_column)
  local res, err = d:query{ sql, slot, upto_lsn and tostring(upto_lsn) or pg.null, budget, sets, max_rows + 1, n = 6 }
  if not res then error(err, 0) end
  -- whole transactions, the empty ones (begin and commit only) hidden
  local out, changes, txns, empty, cut = {}, 0, 0, 0, false
  local current
  local function close_txn()
    if not current then return end
    if current.changes == 0 then
      empty = empty + 1
    else
      txns = txns + 1
      changes = changes + current.changes
      for _, r in ipairs(current.rows) do out[#out + 1] = r end
    end
    current = nil
  end
  for i = 1, math.min(#res, max_rows) do
    local r = res[i]
    local action = opt(r.action)
    local data = opt(r.tuple)
    if action == "B" then data = opt(r.commit_time) and ("committed " .. r.commit_time)
    elseif action == "C" then data = opt(r.end_lsn) and ("end " .. r.end_lsn) end
    local rec = { lsn = r.lsn, xid = opt(r.xid), action = ACTIONS[action] or action,
      relation = opt(r.relation), data = shorten(data, DATA_WIDTH) }
    if action == "B" then
      close_txn()
      if not upto_lsn and changes >= want then break end
      current = { rows = { rec }, changes = 0 }
    elseif current then
      current.rows[#current.rows + 1] = rec
      if action == "C" then close_txn()
      else current.changes = current.changes + 1 end
    end
  end
  if current then
    -- decoding returned more rows than max: the last transaction is shown cut
    cut = current.changes > 0
    close_txn()
  end
  local bound = upto_lsn and ("up to " .. tostring(upto_lsn)) or ("at least " .. want .. " change" .. (want == 1 and "" or "s"))
  local notes = { ("%d transaction%s, %d change%s (%s, whole transactions); %d empty transaction%s hidden;"
    .. " sets %s; the slot is not consumed"):format(txns, txns == 1 and "" or "s", changes, changes == 1 and "" or "s",
    bound, empty, empty == 1 and "" or "s", sets) }
  if cut then notes[#notes + 1] = ("the last transaction is cut at %d rows (peek(slot, { upto = ..., max = n }))")
    :format(max_rows) end
  return console.rows({ { "lsn" }, { "xid", align = "right" }, { "action" }, { "relation" }, { "data" } }, out,
    { noun = { "row", "rows" }, empty = ("no pending changes in %s (%s; %d empty transaction%s hidden)"):format(slot,
      bound, empty, empty == 1 and "" or "s"), notes = notes })
end

-- Seconds behind per task_name of awsdms_status on the target (the time since
-- the source commit of the last change applied; nil: unknown).
function Session:applied_seconds()
  local d = self:db("target")
  local has = d:query("select to_regclass('public.awsdms_status') is not null as ok")
  if not (has and has[1].ok) then return {} end
  local res, err = d:query("select task_name, extract(epoch from (now() at time zone 'utc')"
    .. " - source_timestamp_applied)::float8 as seconds from public.awsdms_status")
  if not res then error(err, 0) end
  local out = {}
  for r in res:rows() do out[r.task_name] = opt(r.seconds) end
  return out
end

function Session:lag()
  local src = self:db("source")
  local prefix = self.config.slots.prefix
  local list = assert(pglogical.slots(src, { prefix = prefix }))
  local now = current_wal_lsn(src)
  local rec = self:recorded()
  local wanted = {}
  for _, s in ipairs(rec.slots) do wanted[s] = true end
  local notes, seconds = {}, {}
  local dms_ok = self:dms_configured()
  if not dms_ok then notes[#notes + 1] = NO_DMS .. ": slots only" end
  if dms_ok then
    local ok, got = pcall(self.applied_seconds, self)
    if ok then seconds = got else notes[#notes + 1] = "target: " .. tostring(got) end
  end
  local rows = {}
  for _, s in ipairs(list) do
    if s.owned or wanted[s.name] then
      local flushed = s.confirmed_flush_lsn
      local behind = flushed and math.max(0, now - flushed) or nil
      local row = { slot = s.name, behind_bytes = behind, behind = human(behind) }
      if s.name == watch.slot_name(prefix) then
        -- migrun's own: no task reads it; it moves when the live verification runs (verify.lua)
        row.task, row.status = "-", "verification's"
      elseif dms_ok then
        row.task = self:task_id(s.name)
        local ok, task, err = pcall(self.find_task, self, s.name, rec.tasks[s.name])
        if not ok or err then
          row.status = "?"
          notes[#notes + 1] = ("%s: %s"):format(row.task, tostring(ok and err or task))
        else
          row.status = task and tostring(task.Status) or "no task"
          -- DMS names a task in its control tables by the ARN's resource id.
          local resource = task and tostring(task.ReplicationTaskArn):match(":task:(.+)$")
          row.seconds = resource and seconds[resource] or seconds[row.task]
        end
        -- Nothing left to apply is no delay, however old the last applied change.
        if behind == 0 then row.seconds = 0 end
        if row.seconds then row.seconds = math.floor(row.seconds + 0.5) end
      end
      rows[#rows + 1] = row
    end
  end
  local columns = { { "slot" }, { "behind_bytes", "bytes behind", align = "right" },
    { "behind", "behind", align = "right" } }
  if dms_ok then
    columns[4], columns[5] = { "task" }, { "status" }
    columns[6] = { "seconds", "seconds behind", align = "right" }
    notes[#notes + 1] = ("primary at %s; seconds from awsdms_status.source_timestamp_applied on the target")
      :format(tostring(now))
  else
    notes[#notes + 1] = ("primary at %s"):format(tostring(now))
  end
  return console.rows(columns, rows,
    { noun = { "slot", "slots" }, notes = notes, empty = "no slots of this migration on the source" })
end

function Session:tasks()
  if not self:dms_configured() then return plain(NO_DMS) end
  local client = self:dms()
  local rec = self:recorded()
  local by_arn, slot_of = {}, {}
  for slot, arn in pairs(rec.tasks) do slot_of[arn] = slot end
  -- Every task whose name is this migration's (<name>-<slot>-cdc), and the recorded ones.
  local list, err = client:describe_replication_tasks()
  if not list then error(err, 0) end
  local prefix = builders.identifier(self.config.name) .. "-"
  local rows = {}
  for _, t in ipairs(list) do
    local id = tostring(t.ReplicationTaskIdentifier)
    if slot_of[t.ReplicationTaskArn] or (id:sub(1, #prefix) == prefix and id:match("%-cdc$")) then
      by_arn[t.ReplicationTaskArn] = true
      rows[#rows + 1] = { task = id, slot = slot_of[t.ReplicationTaskArn], status = tostring(t.Status),
        type = t.MigrationType, start = t.CdcStartPosition,
        problem = shorten(t.LastFailureMessage or t.StopReason, DATA_WIDTH) }
    end
  end
  for slot, arn in pairs(rec.tasks) do
    if not by_arn[arn] then
      rows[#rows + 1] = { task = self:task_id(slot), slot = slot, status = "missing (in the journal, not in DMS)" }
    end
  end
  table.sort(rows, function(a, b) return a.task < b.task end)
  return console.rows({ { "task" }, { "slot" }, { "status" }, { "type" }, { "start", "cdc start" },
    { "problem", "last failure / stop reason" } }, rows,
    { noun = { "task", "tasks" }, empty = "no DMS tasks of migration " .. self.config.name })
end

local function fields(list)
  return console.rows({ { "field" }, { "value" } }, list)
end

function Session:status(name)
  local d = self:db(name)
  if name == "replica" then
    local st, err = replica_status(d)
    if not st then error(err, 0) end
    local up = st.upstream
    return fields{
      { field = "in recovery", value = st.in_recovery },
      { field = "pause state", value = st.pause_state or "(a primary: nothing to pause)" },
      { field = "replay lsn", value = st.replay_lsn },
      { field = "receive lsn", value = st.receive_lsn },
      { field = "upstream", value = up and ("%s:%s (%s)"):format(tostring(up.host), tostring(up.port),
        tostring(up.status)) or nil },
    }
  end
  local res, err = d:query("select current_setting('server_version') as version, current_database() as db,"
    .. " pg_is_in_recovery() as in_recovery, pg_size_pretty(pg_database_size(current_database())) as size")
  if not res then error(err, 0) end
  local r = res[1]
  local list = {
    { field = "connection", value = tostring(d.conn) },
    { field = "version", value = r.version },
    { field = "database", value = ("%s (%s)"):format(r.db, r.size) },
    { field = "in recovery", value = r.in_recovery },
  }
  if name == "source" then list[#list + 1] = { field = "current wal lsn", value = current_wal_lsn(d) } end
  return fields(list)
end

local HELP = {
  { "source, replica, target", "the servers (migrun.db Db: source:query(sql, ...)); read-only" },
  { "source(), target()", "version, database, size; the source's current WAL LSN" },
  { "replica()", "the maintenance replica: pause state, replay and receive LSN, upstream" },
  { "slots()", "the primary's replication slots: plugin, LSNs, WAL retained, migrun's or not" },
  { "peek(slot [, n | lsn])", "pending changes of a slot, whole transactions: n changes (10) or up to lsn" },
  { "lag()", "per slot and DMS task: bytes and seconds behind, task status" },
  { "tasks()", "this migration's DMS tasks: status, CDC start position, last failure" },
  { "lsn\"0/16B3748\"", "an LSN value: compare them, subtract them for bytes" },
  { "config", "the migration's configuration (passwords masked)" },
  { "write_session(\"source\")", "asks, then lets that server's statements run as typed (slots can be lost)" },
  { "read_only()", "ends every write session" },
  { "console.open(path)", "open another migration's configuration" },
  { "help()", "this list; exit or quit leaves" },
}

function Session:help()
  local list = {}
  for i, h in ipairs(HELP) do list[i] = { name = h[1], what = h[2] } end
  return console.rows({ { "name", "helper" }, { "what" } }, list,
    { notes = { ("migration %s, config %s"):format(self.config.name, self.config.config_path) } })
end

---------------------------------------------------------------------------
-- Opening
---------------------------------------------------------------------------

local current

function console.close()
  if current then
    current:close()
    current = nil
  end
end

function console.open(path, opts)
  opts = opts or {}
  path = path or os.getenv("MIGRUN_CONFIG") or "migration.lua"
  assert(type(path) == "string", "console.open: the path of a migration config expected")
  local cfg, err = config.load(path)
  if not cfg then return nil, err end
  console.close()
  local say = opts.say or function(line) io.stdout:write(line, "\n") io.stdout:flush() end
  local ask = opts.ask or function(question)
    io.stdout:write(question)
    io.stdout:flush()
    return io.read("l")
  end
  local session = setmetatable({ config = cfg, dbs = {}, raw = {}, writable = {}, failures = {}, server_mts = {},
    say = say, ask = ask, env = opts.env or _G, connect_timeout = opts.connect_timeout or 5 }, Session)
  current = session
  local env = opts.env or _G
  say(("migrun console: migration %s (%s)"):format(cfg.name, cfg.config_path))
  for _, name in ipairs(SERVERS) do
    env[name] = new_server(session, name)
    local d, cerr = session:connect(name)
    if d then
      say(("  %-8s %s"):format(name, tostring(d.conn)))
    else
      session.failures[name] = cerr
      say(("  %-8s NOT CONNECTED: %s"):format(name, tostring(cerr)))
    end
  end
  -- replica is both the server and replica(): the call goes through the global's __call.
  env.slots = function() return session:slots() end
  env.peek = function(slot, o, extra)
    if extra ~= nil then fail("peek", "peek takes a slot and one bound", PEEK_USAGE) end
    return session:peek(slot, o)
  end
  env.write_session = function(name) return session:write_session(name) end
  env.read_only = function() return session:read_only() end
  env.lag = function() return session:lag() end
  env.tasks = function() return session:tasks() end
  env.help = function() return session:help() end
  env.lsn = lsn
  env.config = journal.scrub(cfg)
  env.console = console
  say("read-only (write_session(\"source\") to write); help() lists the helpers")
  return session
end

function console.main(path)
  local session, err = console.open(path)
  if not session then error(err, 0) end
  return session
end

-- `migrun -l migrun.repl.console -i` with MIGRUN_CONFIG set opens it.
if os.getenv("MIGRUN_CONFIG") then console.main(os.getenv("MIGRUN_CONFIG")) end

return console
