--[[ migrun.rehearsal.pglogical_native: the native (binary) protocol of the
pglogical output plugin, which the DMS emulator reads as DMS reads a
pglogical slot: every column as the text its type's output function gives
(the protocol's 't' datums), so a value reaches the target exactly as the
source prints it. pglogical's JSON protocol cannot do that: an array becomes a
JSON array (its lower bounds lost, a jsonb[] element that is a JSON array
looks like a second dimension), a jsonb string loses its quotes, a jsonb
null and SQL NULL look alike, a composite becomes an object.

Format (pglogical_proto_native.c, pglogical 2.x; integers big-endian):
  'S' version(1) then NUL-terminated key, value pairs   startup
  'B' flags(1) final_lsn(8) commit_time(8) xid(4)          begin
  'C' flags(1) commit_lsn(8) end_lsn(8) commit_time(8)     commit
  'O' flags(1) origin_lsn(8) len(1) name(len)              origin
  'R' flags(1) relid(4) len(1) nspname(len) len(1) relname(len)
      'A' natts(2) then per column 'C' flags(1) 'N' len(2) name(len)
  'I' flags(1) relid(4) 'N' tuple
  'U' flags(1) relid(4) ['K' | 'O' tuple] 'N' tuple
  'D' flags(1) relid(4) 'K' | 'O' tuple
  tuple: 'T' natts(2) then per column 'n' (null) | 'u' (unchanged TOAST) |
         't' len(4) text(len, NUL-terminated) | 'i' / 'b' len(4) bytes
Names and texts carry their NUL terminator inside len. A relation is
described ('R') before its first change in each decoding session.

  local native = require "migrun.rehearsal.pglogical_native"
  local rels = {}
  local m = native.decode(bytes, rels)
  -- m.type "B": m.final_lsn ("0/3000060"), m.commit_time ("2026-11-21 11:00:49.578289+00"), m.xid
  -- m.type "C": m.commit_lsn, m.end_lsn, m.commit_time
  -- m.type "R": m.relid, m.schema, m.name, m.columns (names in order); also kept in rels
  -- m.type "I"/"U"/"D": m.schema, m.name, m.new / m.old = { order = {names},
  --     values = { [name] = text | native.NULL } } (unchanged TOAST columns absent)
  -- m.type "S"/"O": nothing more
native.decode raises on bytes it cannot read (a protocol error, not a world failure).
]]
local M = {}

M.NULL = setmetatable({}, { __tostring = function() return "NULL" end })

local PG_EPOCH = 946684800 -- 2000-01-01 00:00:00 UTC in Unix seconds

local function lsn_text(v)
  return ("%X/%X"):format(v >> 32, v & 0xFFFFFFFF)
end

-- microseconds since 2000-01-01 UTC -> "YYYY-MM-DD HH:MM:SS.ffffff+00"
local function timestamp_text(us)
  local secs, frac = us // 1000000, us % 1000000
  return os.date("!%Y-%m-%d %H:%M:%S", PG_EPOCH + secs) .. (".%06d+00"):format(frac)
end

local Reader = {}
Reader.__index = Reader

function Reader:take(fmt)
  local v, next_pos = string.unpack(fmt, self.s, self.pos)
  self.pos = next_pos
  return v
end

function Reader:bytes(n)
  local s = self.s:sub(self.pos, self.pos + n - 1)
  if #s ~= n then error(("pglogical native protocol: message ends inside a %d-byte field"):format(n), 0) end
  self.pos = self.pos + n
  return s
end

function Reader:expect(c, what)
  local got = self:bytes(1)
  if got ~= c then
    error(("pglogical native protocol: expected '%s' (%s), got %q"):format(c, what, got), 0)
  end
end

-- A NUL-terminated name of n bytes (the NUL included in n).
function Reader:name(n)
  return (self:bytes(n):gsub("%z$", ""))
end

function Reader:tuple(rel)
  self:expect("T", "tuple")
  local natts = self:take(">I2")
  local t = { order = {}, values = {} }
  for i = 1, natts do
    local col = rel.columns[i] or ("#" .. i)
    local kind = self:bytes(1)
    -- 'u' is an unchanged TOAST value: not sent, the column is left as it is
    if kind == "n" then
      t.order[#t.order + 1] = col
      t.values[col] = M.NULL
    elseif kind == "t" then
      local len = self:take(">i4")
      t.order[#t.order + 1] = col
      t.values[col] = self:bytes(len):gsub("%z$", "")
    elseif kind == "i" or kind == "b" then
      error(("pglogical native protocol: column %s came in binary form ('%s'), which is never asked for")
        :format(col, kind), 0)
    elseif kind ~= "u" then
      error(("pglogical native protocol: unknown datum kind %q in column %s"):format(kind, col), 0)
    end
  end
  return t
end

local function relation(r, rels)
  r:take("B") -- flags
  local relid = r:take(">I4")
  local schema = r:name(r:take("B"))
  local name = r:name(r:take("B"))
  r:expect("A", "attributes")
  local columns = {}
  for i = 1, r:take(">I2") do
    r:expect("C", "column")
    r:take("B") -- flags (replica identity)
    r:expect("N", "column name")
    columns[i] = r:name(r:take(">I2"))
  end
  local rel = { relid = relid, schema = schema, name = name, columns = columns }
  rels[relid] = rel
  return { type = "R", relid = relid, schema = schema, name = name, columns = columns }
end

local function change(r, kind, rels)
  r:take("B") -- flags
  local relid = r:take(">I4")
  local rel = rels[relid]
  if not rel then error(("pglogical native protocol: change of relation %d, which was not described"):format(relid), 0) end
  local m = { type = kind, relid = relid, schema = rel.schema, name = rel.name }
  local tag = r:bytes(1)
  if tag == "K" or tag == "O" then
    m.old = r:tuple(rel)
    if kind == "U" then tag = r:bytes(1) end
  end
  if kind ~= "D" then
    if tag ~= "N" then error(("pglogical native protocol: expected a new tuple ('N'), got %q"):format(tag), 0) end
    m.new = r:tuple(rel)
  elseif not m.old then
    error(("pglogical native protocol: a delete without its old key, got %q"):format(tag), 0)
  end
  return m
end

function M.decode(s, rels)
  assert(type(s) == "string" and type(rels) == "table", "pglogical_native.decode: bytes and a relation map expected")
  local r = setmetatable({ s = s, pos = 1 }, Reader)
  local kind = r:bytes(1)
  if kind == "B" then
    r:take("B")
    local final_lsn, commit_time, xid = r:take(">I8"), r:take(">i8"), r:take(">I4")
    return { type = "B", final_lsn = lsn_text(final_lsn), commit_time = timestamp_text(commit_time), xid = xid }
  elseif kind == "C" then
    r:take("B")
    local commit_lsn, end_lsn, commit_time = r:take(">I8"), r:take(">I8"), r:take(">i8")
    return { type = "C", commit_lsn = lsn_text(commit_lsn), end_lsn = lsn_text(end_lsn),
      commit_time = timestamp_text(commit_time) }
  elseif kind == "R" then
    return relation(r, rels)
  elseif kind == "I" or kind == "U" or kind == "D" then
    return change(r, kind, rels)
  elseif kind == "S" or kind == "O" then
    return { type = kind }
  end
  error(("pglogical native protocol: unknown message type %q"):format(kind), 0)
end

M.lsn_text = lsn_text
M.timestamp_text = timestamp_text
return M
