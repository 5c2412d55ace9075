--[[
migrun.pg: PostgreSQL connections. The C core (runtime/pg.c, "migrun.pg.core")
owns libpq; this layer adds what reads better in Lua: transactions, COPY to and
from files, and small queries.

  local pg = require "migrun.pg"
  local c <close> = assert(pg.connect("host=127.0.0.1 dbname=app", { name = "target" }))
  local res = assert(c:exec("select id, email from users where id = $1", 42))
  for row in res:rows() do print(row.id, row.email) end

Connections
  pg.connect(conninfo | {keyword = value, ...} [, opts]) -> Conn | nil, err
      conninfo is anything libpq takes (keywords or a URI; PGHOST and friends,
      .pgpass, service files and sslmode all apply). opts.name ("source",
      "replica", "target") labels the connection in errors and notices;
      opts.connect_timeout (seconds, default 10); opts.statement_timeout
      (seconds; client side: the statement is cancelled, see exec);
      opts.stall_timeout (seconds, default pg.STALL_TIMEOUT = 20; false for
      none): how long a COPY on this connection may go without moving a byte
      (see COPY). application_name defaults to "migrun"; opts.application_name
      names the session whatever the conninfo says.
      Every connection gets TCP keepalives and tcp_user_timeout unless its
      conninfo says otherwise (pg.NETWORK_DEFAULTS: keepalives=1,
      keepalives_idle=15, keepalives_interval=5, keepalives_count=3,
      tcp_user_timeout=30000): a server that vanishes without a RST ends the
      connection in about 30 s, not the kernel's two hours (docs/faults.md).
  pg.identity([name | false]) -> the previous one
      The application_name of every session this process opens from now on
      (false: none again), over one a conninfo string gives: a playbook run
      names its sessions so that a rerun can find what a killed run left
      working on the servers (migrun.playbook.sessions). A table conninfo
      with its own application_name keeps it (code that names its sessions,
      the DMS emulator's), and so does opts.application_name.
  pg.application_name([role]) -> "<identity>/<role>" (at most 63 bytes, what
      the server keeps) | the identity | nil without one: for the sessions of
      another process working for this one (a pool worker, pg_dump).
  conn:close()                    idempotent; also <close> and __gc
  tostring(conn)                  name, host, port, dbname, user, pid; never a password
  conn:password() (what libpq logged in with, for a DMS endpoint; never print it),
  conn:info() (name, host, port, dbname, user, pid, server_version,
  application_name, stall_timeout, and tcp = the keepalive settings in effect),
  conn:name(), conn:server_version() (150020), conn:backend_pid(),
  conn:in_recovery() -> boolean | nil, err, conn:transaction_status() -> "idle"...
  conn:set_timeout(seconds | nil) -> old   the client-side statement timeout
  conn:set_stall_timeout(seconds | nil) -> old   the COPY stall bound (nil: none)
  conn:on_notice(fn | nil) -> old          fn(notice) for server notices (an error
      value of kind "notice" with severity, message, detail...); without one
      they go to stderr prefixed with the connection name.

Statements
  conn:exec(sql, p1, p2, ...)  or  conn:exec{ sql, p1, ..., n = count, timeout = s }
      -> Result | nil, err
      Parameters go separately ($1..$n): nil or pg.null is NULL; numbers,
      booleans and LSNs travel as text; strings with NUL bytes travel as raw
      bytes (for bytea). In the table form use pg.null (or n) for NULLs.
      Without parameters several statements separated by ";" may be given
      (simple protocol); the last statement's result is returned, and the
      first error stops the rest. With parameters only one statement.
      On timeout the statement is cancelled on the server and the error has
      kind "timeout" (code 57014). Ctrl-C cancels it too and raises an error of
      kind "interrupted". COPY FROM STDIN / TO STDOUT are refused (use COPY below).
  Result: #res, res[i], res:rows() (iterator), res:columns() (names in order),
      res.affected (rows of INSERT/UPDATE/DELETE/COPY/SELECT, nil if none),
      res.command (the command tag, "INSERT 0 1"). Rows are tables keyed by
      column name: int2/int4/int8/oid -> integer, float4/float8 -> number (NaN,
      inf), bool -> boolean, numeric -> string, pg_lsn -> migrun.lsn value,
      bytea -> raw bytes, NULL -> pg.null, everything else -> its text.
  err: kind ("sql", "connection", "timeout", "interrupted", "copy"), where
      ("target 4711"), code = sqlstate, sqlstate, severity, message, detail,
      hint, context, conn; tostring gives one line. A connection that was up
      and is gone (the server restarted or crashed, the network or
      tcp_user_timeout ended it) gives kind "connection", lost = true, a
      message starting "connection lost: " and a hint, whatever the server
      said last (57P01 on a fast shutdown): connect again.

Transactions
  conn:transaction(function(conn) ... end) -> fn's results | true | nil, err
      BEGIN, then COMMIT when fn returns; ROLLBACK and re-raise when fn raises.
      When fn returns nil or false first (the nil, err convention), the
      transaction is rolled back and fn's results are returned. Nested calls
      use savepoints (a failed inner call rolls back to its savepoint only).
      A failing BEGIN or COMMIT returns nil, err.

COPY
  conn:copy_out(sql, sink) -> {bytes=, rows=} | nil, err
      sink: function(chunk), a file path (created/truncated) or an open file.
  conn:copy_in(sql, source) -> {bytes=, rows=} | nil, err
      source: function() returning chunks then nil, a file path or an open file.
      A sink/source that raises aborts the COPY (the connection stays usable)
      and the error is re-raised.
  pg.copy{ from = c1, from_sql = "COPY t TO STDOUT (FORMAT binary)",
           to = c2, to_sql = "COPY t FROM STDIN (FORMAT binary)",
           on_progress = function(bytes, rows) end, progress_interval = 1.0,
           stall_timeout = seconds | false }
      -> {bytes=, rows=} | nil, err (err.side = "from" | "to")
      Streams server to server inside C with flat memory; an error on either
      side aborts both and leaves both connections usable.
      Stalls: each side has a bound, stall_timeout (default: each
      connection's own, 20 s): from the COPY statement to its result, the
      source must bring and the target take at least one byte within it, or
      the COPY fails with kind "connection", stalled = true, lost = true and
      side naming the one that stalled, whose connection migrun closes (the
      other is aborted and stays usable). A COPY (SELECT ...) whose first row
      takes longer than the bound to compute needs a larger one.
      conn:copy_out and conn:copy_in apply their connection's bound alike.
      Errors while starting a COPY have kind "sql"; errors during the data
      phase have kind "copy" (with the server's sqlstate, e.g. 23514).
      Limitation: libpq does not read server messages during COPY IN, so an
      error the target raises mid-stream (a CHECK on row N) is seen when the
      source has been read to the end; nothing is committed on the target.

Quoting
  conn:escape_identifier(s), conn:escape_literal(s) (libpq, encoding aware)
  pg.conninfo_parse(conninfo) -> {keyword = value} | nil, err   libpq's parser; may
      hold a password: for building other descriptions, never for printing.
  pg.quote_ident(s) -> "s"; pg.qualify(schema, name) -> "schema"."name" (always
  quoted, embedded quotes doubled; pg.qualify(nil, name) -> "name").
]]

local core = require "migrun.pg.core"
local error_ = require "migrun.error"

local pg = core
local Conn = core.Conn

---------------------------------------------------------------------------
-- Connecting under a name
---------------------------------------------------------------------------

-- What the server keeps of an application_name (NAMEDATALEN - 1 bytes).
pg.APPLICATION_NAME_MAX = 63

local identity -- this process's application_name (pg.identity)

function pg.identity(name)
  assert(name == nil or name == false or (type(name) == "string" and name ~= ""),
    "pg.identity: a name, or false for none, expected")
  local previous = identity
  if name ~= nil then identity = name and name:sub(1, pg.APPLICATION_NAME_MAX) or nil end
  return previous
end

function pg.application_name(role)
  if not identity then return nil end
  if role == nil then return identity end
  return (identity .. "/" .. tostring(role)):sub(1, pg.APPLICATION_NAME_MAX)
end

local core_connect = core.connect

-- conninfo as keywords (a copy), so that application_name can be set over
-- what it says; nil when it is not a conninfo libpq parses (then the core
-- reports it, or takes it as a database name, as it does without a name).
local function keywords(conninfo)
  if type(conninfo) == "table" then
    local kw = {}
    for k, v in pairs(conninfo) do kw[k] = v end
    return kw
  end
  if type(conninfo) ~= "string" then return nil end
  local kw = pg.conninfo_parse(conninfo)
  if kw then return kw end
  -- libpq takes a bare word for a database name
  if not conninfo:find("=", 1, true) and not conninfo:match("^postgres%a*://") then return { dbname = conninfo } end
  return nil
end

function pg.connect(conninfo, opts)
  local name = opts and opts.application_name
  if name == nil and identity and not (type(conninfo) == "table" and conninfo.application_name) then
    name = identity
  end
  local kw = name and keywords(conninfo)
  if not kw then return core_connect(conninfo, opts) end
  kw.application_name = name
  return core_connect(kw, opts)
end

local savepoints = setmetatable({}, { __mode = "k" }) -- conn -> nesting depth

local function finish(conn, sql)
  local res, err = conn:exec(sql)
  if not res then return nil, err end
  return true
end

local function pack(...) return { n = select("#", ...), ... } end

function Conn:transaction(fn)
  assert(type(fn) == "function", "transaction needs a function")
  local status = self:transaction_status()
  local depth = savepoints[self] or 0
  local open, commit, rollback
  if status == "idle" then
    open, commit, rollback = "BEGIN", "COMMIT", "ROLLBACK"
  elseif status == "intrans" then
    local sp = "migrun_sp_" .. (depth + 1)
    open, commit = "SAVEPOINT " .. sp, "RELEASE SAVEPOINT " .. sp
    rollback = "ROLLBACK TO SAVEPOINT " .. sp .. "; RELEASE SAVEPOINT " .. sp
  else
    error("transaction() on connection " .. self:name() .. " whose transaction is " .. status, 2)
  end
  local ok, err = finish(self, open)
  if not ok then return nil, err end
  savepoints[self] = depth + 1
  local r = pack(pcall(fn, self))
  savepoints[self] = depth > 0 and depth or nil
  if not r[1] then
    if not self:is_closed() then finish(self, rollback) end
    error(r[2], 0)
  end
  if r.n >= 2 and not r[2] then -- fn returned nil, err: roll back, hand them back
    local rok, rerr = finish(self, rollback)
    if not rok then return nil, rerr end
    return table.unpack(r, 2, r.n)
  end
  ok, err = finish(self, commit)
  if not ok then return nil, err end
  if r.n < 2 then return true end
  return table.unpack(r, 2, r.n)
end

function Conn:in_recovery()
  local res, err = self:exec("select pg_is_in_recovery() as r")
  if not res then return nil, err end
  return res[1].r
end

local function io_error(conn, msg)
  return nil, error_.new { kind = "copy", where = conn:name(), message = msg, conn = conn:name() }
end

local core_copy_out, core_copy_in = Conn.copy_out, Conn.copy_in

-- COPY to or from a file path (opened and closed here) or an open file, by
-- way of the core's chunk functions. mode: "wb" for copy_out, "rb" for copy_in.
local function copy_with_file(self, core, sql, file, mode, what)
  local f, own = file, false
  if type(file) == "string" then
    local e
    f, e = io.open(file, mode)
    if not f then return io_error(self, e) end
    own = true
  elseif io.type(file) ~= "file" then
    error(what .. " must be a function, a file path or an open file", 3)
  end
  local chunks = mode == "wb" and function(chunk) assert(f:write(chunk)) end
    or function() return f:read(65536) end
  local ok, res, err = pcall(core, self, sql, chunks)
  if own then f:close() end
  if not ok then error(res, 0) end
  return res, err
end

function Conn:copy_out(sql, sink)
  if type(sink) == "function" then return core_copy_out(self, sql, sink) end
  return copy_with_file(self, core_copy_out, sql, sink, "wb", "copy_out sink")
end

function Conn:copy_in(sql, source)
  if type(source) == "function" then return core_copy_in(self, sql, source) end
  return copy_with_file(self, core_copy_in, sql, source, "rb", "copy_in source")
end

return pg
