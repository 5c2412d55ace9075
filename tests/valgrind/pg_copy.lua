-- pg.copy under valgrind (issue 25): the relay's buffer and libpq's rows
-- through a copy that ends, one the target fails in the middle, one whose
-- on_progress raises, and rows larger than the buffer. Needs the lab:
--   valgrind --leak-check=full --error-exitcode=1 build/migrun tests/valgrind/pg_copy.lua
local pg = require "migrun.pg"
local L <close> = assert(require("migrun.rehearsal.lab").start { replica = false })
local a = assert(pg.connect(L.source.conninfo, { name = "source" }))
local b = assert(pg.connect(L.target.conninfo, { name = "target" }))
assert(a:exec("create table t (id int primary key, pad text)"))
assert(a:exec("insert into t select g, repeat(md5(g::text), 4 + (g % 9000)) from generate_series(1, 2000) g"))
assert(b:exec("create table t (id int primary key, pad text)"))
local function copy(extra)
  local spec = { from = a, from_sql = "copy t to stdout (format binary)", to = b,
                 to_sql = "copy t from stdin (format binary)" }
  for k, v in pairs(extra or {}) do spec[k] = v end
  return pg.copy(spec)
end
local r = assert(copy())
assert(r.rows == 2000)
-- the target fails half-way: both sides back to idle
assert(b:exec("truncate t; alter table t add constraint small check (id < 1000)"))
local bad, err = copy()
assert(not bad and err.side == "to", tostring(err))
assert(b:exec("alter table t drop constraint small"))
-- on_progress raises
assert(b:exec("truncate t"))
local ok = pcall(copy, { progress_interval = 0, on_progress = function() error("stop") end })
assert(not ok and a:transaction_status() == "idle" and b:transaction_status() == "idle")
a:close() b:close()
print("valgrind pg_copy ok")
