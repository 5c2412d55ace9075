--[[
migrun.db: a connection as a playbook step sees it, with reads and writes
told apart so that --dry-run can run every read and show every write.

  local db = require "migrun.db"
  local target = db.wrap(conn, { dry_run = true, echo = print })
  local res = assert(target:query("select count(*) as n from t"))   -- always runs
  assert(target:write("truncate t"))    -- dry run: echo("target: truncate t") instead

  db.wrap(conn, opts) -> Db          opts.dry_run (boolean), opts.echo(line)
      called with "<name>: <sql>" (and the parameters) for every write when
      dry_run is set, and for every write actually run when opts.echo_writes.
  Db:query(sql, ...) | Db:query{sql, ..., timeout=} -> Result | nil, err
      conn:exec for statements that change nothing.
  Db:write(sql, ...) | Db:write{...} -> Result | db.DRY | nil, err
      conn:exec for statements that change something; in a dry run the
      statement is echoed and db.DRY (a result with no rows, affected = 0,
      dry_run = true) is returned.
  Db:copy_to(from_db, from_sql, to_sql, opts) -> {bytes, rows} | db.DRY | nil, err
      pg.copy from another Db's connection into this one (a write here).
  Db.conn, Db.dry_run, Db:name(), Db:is_local(), tostring(Db), Db:close()
]]
local pg = require "migrun.pg"

local db = {}

local Db = {}
Db.__index = Db
Db.__name = "migrun.db.Db"

db.DRY = setmetatable({ affected = 0, dry_run = true, command = "DRY RUN" }, {
  __len = function() return 0 end,
  __index = { rows = function() return function() return nil end end,
              columns = function() return {} end },
  __tostring = function() return "(dry run: not executed)" end,
})

function db.wrap(conn, opts)
  assert(conn ~= nil, "db.wrap: connection expected")
  opts = opts or {}
  return setmetatable({ conn = conn, dry_run = opts.dry_run and true or false,
                        echo = opts.echo, echo_writes = opts.echo_writes }, Db)
end

function Db:name() return self.conn:name() end

-- Whether the server runs on this machine (loopback or a Unix socket), so
-- that its data directory can be looked at directly (free disk, WAL size).
function Db:is_local()
  local h = self.conn:info().host
  return h == nil or h == "" or h == "127.0.0.1" or h == "localhost" or h == "::1" or h:sub(1, 1) == "/"
end
function Db:__tostring() return "db " .. tostring(self.conn) end
function Db:close() return self.conn:close() end

local function describe(name, first, ...)
  local sql, params
  if type(first) == "table" then
    sql, params = first[1], { table.unpack(first, 2, first.n and first.n + 1 or #first) }
  else
    sql, params = first, table.pack(...)
    params.n = nil
  end
  local line = ("%s: %s"):format(name, (tostring(sql):gsub("%s+$", "")))
  if #params > 0 then
    local shown = {}
    for i, p in ipairs(params) do shown[i] = ("$%d=%s"):format(i, tostring(p)) end
    line = line .. "  -- " .. table.concat(shown, ", ")
  end
  return line
end

function Db:query(...)
  return self.conn:exec(...)
end

function Db:write(...)
  if self.dry_run then
    if self.echo then self.echo(describe(self:name(), ...)) end
    return db.DRY
  end
  if self.echo and self.echo_writes then self.echo(describe(self:name(), ...)) end
  return self.conn:exec(...)
end

function Db:copy_to(from, from_sql, to_sql, opts)
  opts = opts or {}
  if self.dry_run then
    if self.echo then
      self.echo(("%s: %s  <=  %s: %s"):format(self:name(), to_sql, from:name(), from_sql))
    end
    return db.DRY
  end
  return pg.copy{ from = from.conn, from_sql = from_sql, to = self.conn, to_sql = to_sql,
                  on_progress = opts.on_progress, progress_interval = opts.progress_interval }
end

db.Db = Db
return db
