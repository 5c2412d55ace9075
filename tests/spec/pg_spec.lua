-- migrun.pg against real PostgreSQL 15 servers: the lab's source (a primary),
-- its streaming replica and the target (migrun.rehearsal.lab).
local pg = require "migrun.pg"
local lsn = require "migrun.lsn"
local proc = require "migrun.proc"
local errors = require "migrun.error"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"

local function vmhwm_mb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmHWM:%s+(%d+)")
    if kb then return tonumber(kb) / 1024 end
  end
end

describe("migrun.pg", function()
  local L, c, other -- the lab, a connection to its target, one to its source

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    c = assert(pg.connect(L.target.conninfo, { name = "target" }))
    other = assert(pg.connect(L.source.conninfo, { name = "source" }))
  end)

  teardown(function()
    if c then c:close() end
    if other then other:close() end
    if L then assert(L:stop()) end
  end)

  describe("connect", function()
    it("connects with a conninfo string, a URI and a keyword table", function()
      local u = assert(pg.connect(("postgresql://postgres@127.0.0.1:%d/postgres"):format(L.source.port)))
      assert.equal("postgres", u:info().dbname)
      u:close()
      local t = assert(pg.connect({ host = "127.0.0.1", port = L.replica.port, user = "postgres",
        dbname = "app" }, { name = "replica" }))
      assert.equal("replica", t:name())
      assert.equal("app", t:info().dbname)
      t:close()
    end)

    it("defaults application_name to migrun and keeps an explicit one", function()
      assert.equal("migrun", c:info().application_name)
      local res = assert(c:exec("select current_setting('application_name') a"))
      assert.equal("migrun", res[1].a)
      local t = assert(pg.connect(L.target.conninfo .. " application_name=mine"))
      assert.equal("mine", t:info().application_name)
      t:close()
    end)

    it("prints name, host, port, database and user, never the password", function()
      local s = tostring(c)
      assert.matches("target", s, 1, true)
      assert.matches("host=127.0.0.1", s, 1, true)
      assert.matches("port=" .. L.target.port, s, 1, true)
      assert.matches("dbname=app", s, 1, true)
      assert.matches("user=" .. L.target.conninfo:match("user=(%S+)"), s, 1, true)
      local a = assert(pg.connect(L.target.migrun_conninfo .. " password=" .. L.password,
        { name = "target" }))
      assert.is_nil(tostring(a):find(L.password, 1, true))
      assert.equal("migrun", a:exec("select current_user u")[1].u)
      for k, v in pairs(a:info()) do assert.is_nil(tostring(v):find(L.password, 1, true), k) end
      a:close()
    end)

    it("reads the password from a passfile", function()
      local a = assert(pg.connect(L.source.migrun_conninfo .. " passfile=" .. L.passfile))
      assert.equal("migrun", a:exec("select current_user u")[1].u)
      a:close()
    end)

    it("reports bad credentials as a connection error", function()
      local a, err = pg.connect(L.target.migrun_conninfo .. " password=wrong", { name = "target" })
      assert.is_nil(a)
      assert.is_true(errors.is(err))
      assert.equal("connection", err.kind)
      assert.equal("target", err.conn)
      assert.matches("password authentication failed", err.message, 1, true)
      assert.matches("^%[target%] ", tostring(err))
      assert.is_nil(tostring(err):find("wrong", 1, true))
    end)

    it("reports a refused connection", function()
      local a, err = pg.connect("host=127.0.0.1 port=1 user=x dbname=x", { name = "source" })
      assert.is_nil(a)
      assert.equal("connection", err.kind)
      assert.matches("refused", err.message)
      assert.is_nil(tostring(err):find("\n", 1, true))
    end)

    it("rejects a malformed conninfo with nil, err", function()
      local a, err = pg.connect("host=127.0.0.1 bogus_option=1")
      assert.is_nil(a)
      assert.matches("bogus_option", err.message)
    end)

    it("gives up after the connect timeout", function()
      -- a listener that never answers (lua-socket): the kernel accepts, nobody replies
      local listener = assert(require("socket").bind("127.0.0.1", 0))
      local _, port = listener:getsockname()
      local t0 = os.time()
      local a, err = pg.connect(("host=127.0.0.1 port=%d user=x dbname=x"):format(port),
        { name = "slow", connect_timeout = 0.5 })
      assert.is_nil(a)
      assert.equal("timeout", err.kind)
      assert.is_true(os.time() - t0 <= 2)
      listener:close()
    end)

    it("exposes server facts", function()
      assert.is_true(c:server_version() >= 150000)
      assert.equal(c:exec("select pg_backend_pid() p")[1].p, c:backend_pid())
      assert.is_false(c:in_recovery())
      assert.equal("idle", c:transaction_status())
    end)
  end)

  describe("results", function()
    it("converts every type without losing anything", function()
      local res = assert(c:exec([[select
        1::int2 a, 2147483647::int4 b, 9223372036854775807::int8 c, 4294967295::oid d,
        1.5::float4 e, 0.1::float8 f, 'NaN'::float8 g, 'Infinity'::float8 h, '-Infinity'::float4 i,
        123456789012345678901234567890.123456789::numeric j, true k, false l, null::int m,
        '16/B374D848'::pg_lsn n, '\x00ff0041'::bytea o, '{"a": [1, 2]}'::jsonb p, '{1,NULL,3}'::int[] q,
        '2024-01-02 03:04:05.123456+00'::timestamptz r, 'héllo ✓'::text s, ''::text t,
        '-32768'::int2 u]]))
      local r = res[1]
      assert.equal(1, r.a); assert.is_true(math.type(r.a) == "integer")
      assert.equal(2147483647, r.b)
      assert.equal(math.maxinteger, r.c); assert.is_true(math.type(r.c) == "integer")
      assert.equal(4294967295, r.d)
      assert.equal(1.5, r.e)
      assert.equal(0.1, r.f)
      assert.is_true(r.g ~= r.g)
      assert.equal(math.huge, r.h)
      assert.equal(-math.huge, r.i)
      assert.equal("123456789012345678901234567890.123456789", r.j)
      assert.is_true(r.k); assert.is_false(r.l)
      assert.equal(pg.null, r.m)
      assert.equal("null", tostring(pg.null))
      assert.is_true(lsn.is(r.n)); assert.equal(lsn("16/B374D848"), r.n)
      assert.equal("\0\255\0A", r.o)
      assert.equal('{"a": [1, 2]}', r.p)
      assert.equal("{1,NULL,3}", r.q)
      assert.equal("2024-01-02 03:04:05.123456+00", r.r)
      assert.equal("héllo ✓", r.s)
      assert.equal("", r.t)
      assert.equal(-32768, r.u)
    end)

    it("decodes bytea in escape output too", function()
      assert(c:exec("set bytea_output = escape"))
      local r = assert(c:exec([[select '\x00ff5c41'::bytea b]]))[1]
      assert(c:exec("reset bytea_output"))
      assert.equal("\0\255\\A", r.b)
    end)

    it("gives #res, res[i], rows(), columns(), affected and command", function()
      local res = assert(c:exec("select g as n, g * 2 as twice from generate_series(1, 3) g"))
      assert.equal(3, #res)
      assert.equal(2, res[1].twice)
      assert.is_nil(res[0]); assert.is_nil(res[4])
      assert.same({ "n", "twice" }, res:columns())
      local seen = {}
      for row in res:rows() do seen[#seen + 1] = row.n end
      assert.same({ 1, 2, 3 }, seen)
      assert.equal(3, res.affected)
      assert.equal("SELECT 3", res.command)
      assert(c:exec("create temp table aff(x int)"))
      local ins = assert(c:exec("insert into aff select generate_series(1, 5)"))
      assert.equal(5, ins.affected)
      assert.equal(0, #ins)
      assert.equal(2, assert(c:exec("delete from aff where x <= $1", 2)).affected)
      assert.is_nil(assert(c:exec("create temp table aff2(x int)")).affected)
      assert.matches("SELECT 3", tostring(res), 1, true)
    end)

    it("returns the last result of several statements without parameters", function()
      local res = assert(c:exec("select 1 as a; select 2 as b"))
      assert.equal(2, res[1].b)
      local r2, err = c:exec("select 1; select $1::int", 5)
      assert.is_nil(r2)
      assert.equal("42601", err.sqlstate)
    end)

    it("keeps its connection alive and survives it being closed", function()
      local res = assert(pg.connect(L.target.conninfo)):exec("select 'still here' s")
      collectgarbage(); collectgarbage()
      assert.equal("still here", res[1].s)
      local t = assert(pg.connect(L.target.conninfo))
      local r = assert(t:exec("select 7 x"))
      t:close()
      assert.equal(7, r[1].x)
    end)
  end)

  describe("parameters", function()
    it("sends quotes, unicode, NULLs, numbers, booleans and LSNs as values", function()
      local nasty = [[it's "quoted"; drop table x; -- \ $1]]
      local r = assert(c:exec("select $1::text a, $2::text b, $3::int c, $4::text d, $5::float8 e," ..
        " $6::bool f, $7::pg_lsn g, $8::int8 h, $9::float8 i, $10::text is_null",
        nasty, "żółw ✓ 日本", nil, pg.null, 2.5, true, lsn("1/FF"), math.mininteger, -math.huge,
        "x"))[1]
      assert.equal(nasty, r.a)
      assert.equal("żółw ✓ 日本", r.b)
      assert.equal(pg.null, r.c)
      assert.equal(pg.null, r.d)
      assert.equal(2.5, r.e)
      assert.is_true(r.f)
      assert.equal(lsn("1/FF"), r.g)
      assert.equal(math.mininteger, r.h)
      assert.equal(-math.huge, r.i)
      local n = assert(c:exec("select $1::float8 x, $2::float8 y", 0 / 0, 1 / 3))[1]
      assert.is_true(n.x ~= n.x)
      assert.equal(1 / 3, n.y)
    end)

    it("sends strings with NUL bytes as raw bytes (bytea)", function()
      local blob = "a\0b\255\0"
      local r = assert(c:exec("select $1::bytea b, length($1::bytea) n", blob))[1]
      assert.equal(blob, r.b)
      assert.equal(5, r.n)
    end)

    it("takes a table form with a timeout and n for trailing NULLs", function()
      local r = assert(c:exec { "select $1::int a, $2::text b", 4, pg.null })[1]
      assert.equal(4, r.a); assert.equal(pg.null, r.b)
      r = assert(c:exec { "select $1::int a, $2::text b", 4, nil, n = 3 })[1]
      assert.equal(pg.null, r.b)
    end)

    it("raises on a parameter that has no text form", function()
      assert.has_error(function() c:exec("select $1", {}) end)
      assert.has_error(function() c:exec("select $1", print) end)
    end)
  end)

  describe("errors", function()
    it("returns syntax errors with their fields", function()
      local res, err = c:exec("selec 1")
      assert.is_nil(res)
      assert.is_true(errors.is(err))
      assert.equal("sql", err.kind)
      assert.equal("42601", err.sqlstate)
      assert.equal("42601", err.code)
      assert.equal("ERROR", err.severity)
      assert.equal("target", err.conn)
      assert.equal("target " .. c:backend_pid(), err.where)
      assert.equal('syntax error at or near "selec"', err.message)
      assert.equal(('[target %d] 42601 syntax error at or near "selec"'):format(c:backend_pid()),
        tostring(err))
    end)

    it("returns a unique violation with detail, printed on one line", function()
      assert(c:exec("create temp table u(id int primary key)"))
      assert(c:exec("insert into u values (1)"))
      local _, err = c:exec("insert into u values ($1)", 1)
      assert.equal("23505", err.sqlstate)
      assert.equal("Key (id)=(1) already exists.", err.detail)
      assert.equal(('[target %d] 23505 duplicate key value violates unique constraint "u_pkey"' ..
        ' DETAIL: Key (id)=(1) already exists.'):format(c:backend_pid()), tostring(err))
      local ok, raised = pcall(function() assert(c:exec("insert into u values (1)")) end)
      assert.is_false(ok)
      assert.matches("23505", tostring(raised))
    end)

    it("carries hint and context", function()
      local _, err = c:exec([[do $$ begin raise exception 'boom' using hint = 'try again', errcode = 'P0001'; end $$]])
      assert.equal("P0001", err.sqlstate)
      assert.equal("try again", err.hint)
      assert.matches("PL/pgSQL", err.context)
      assert.matches("HINT: try again", tostring(err), 1, true)
    end)

    it("refuses COPY through exec and stays usable", function()
      local res, err = c:exec("copy (select 1) to stdout")
      assert.is_nil(res)
      assert.equal("copy", err.kind)
      res, err = c:exec("create temp table cin(x int); copy cin from stdin")
      assert.is_nil(res)
      assert.equal("copy", err.kind)
      assert.equal(1, c:exec("select 1 x")[1].x)
    end)
  end)

  describe("timeouts", function()
    it("cancels a statement after a per-call timeout", function()
      local t0 = os.time()
      local res, err = c:exec { "select pg_sleep(30)", timeout = 0.3 }
      assert.is_nil(res)
      assert.equal("timeout", err.kind)
      assert.equal("57014", err.code)
      assert.is_true(os.time() - t0 <= 3)
      assert.equal(1, c:exec("select 1 x")[1].x)
      assert.equal("idle", c:transaction_status())
    end)

    it("applies the connection's timeout", function()
      local t = assert(pg.connect(L.target.conninfo, { statement_timeout = 0.3 }))
      local _, err = t:exec("select pg_sleep(30)")
      assert.equal("timeout", err.kind)
      assert.equal(0.3, t:set_timeout(nil))
      assert(t:exec("select pg_sleep(0.5)"))
      t:set_timeout(0.2)
      _, err = t:exec("select pg_sleep(10)")
      assert.equal("timeout", err.kind)
      -- the server has stopped it
      local n = c:exec("select count(*) n from pg_stat_activity where query like 'select pg_sleep(10)%'" ..
        " and state = 'active'")[1].n
      assert.equal(0, n)
      t:close()
    end)

    it("cancels on Ctrl-C and raises an interrupted error", function()
      local script = ([[
        local pg = require "migrun.pg"
        local c = assert(pg.connect(%q, { name = "target" }))
        io.stdout:write("ready\n"); io.stdout:flush()
        local ok, err = pcall(c.exec, c, "select pg_sleep(60)")
        print(ok, err.kind, tostring(err))
        print(c:exec("select 'usable' s")[1].s)
      ]]):format(L.target.conninfo)
      local lines = {}
      local h = assert(proc.spawn { MIGRUN, "-e", script, stdout = function(l) lines[#lines + 1] = l end,
        stderr = "stdout" })
      local deadline = os.time() + 20
      while #lines == 0 and os.time() < deadline do h:wait(0.1) end
      h:wait(0.5) -- in pg_sleep by now
      h:kill("INT")
      local ok = h:wait(10)
      assert.is_true(ok, table.concat(lines, "\n"))
      local out = table.concat(lines, "\n")
      assert.matches("false\tinterrupted\t[target", out, 1, true)
      assert.matches("usable", out, 1, true)
    end)
  end)

  describe("notices", function()
    it("go to the handler", function()
      local got = {}
      assert.is_nil(c:on_notice(function(n) got[#got + 1] = n end))
      assert(c:exec("do $$ begin raise notice 'hello %', 42; raise warning 'careful'; end $$"))
      c:on_notice(nil)
      assert.equal(2, #got)
      assert.equal("hello 42", got[1].message)
      assert.equal("NOTICE", got[1].severity)
      assert.equal("WARNING", got[2].severity)
      assert.equal("target", got[1].conn)
      assert.matches("hello 42", tostring(got[1]))
    end)

    it("go to stderr with the connection name by default", function()
      local script = ([[
        local pg = require "migrun.pg"
        local c = assert(pg.connect(%q, { name = "replica" }))
        assert(c:exec("do $$ begin raise notice 'not dropped'; end $$"))
      ]]):format(L.target.conninfo)
      local ok, _, _, _, err = proc.run { MIGRUN, "-e", script }
      assert.is_true(ok, err)
      assert.matches("[replica] NOTICE:  not dropped", err, 1, true)
    end)
  end)

  describe("handles", function()
    it("closes idempotently, raises on use after close, works with <close>", function()
      local t = assert(pg.connect(L.target.conninfo, { name = "x" }))
      t:close(); t:close()
      assert.is_true(t:is_closed())
      assert.matches("closed", tostring(t))
      assert.has_error(function() t:exec("select 1") end, "attempt to use a closed connection")
      assert.has_error(function() t:escape_literal("a") end, "attempt to use a closed connection")
      local pid
      do
        local s <close> = assert(pg.connect(L.target.conninfo))
        pid = s:backend_pid()
      end
      local n
      for _ = 1, 50 do
        n = c:exec("select count(*) n from pg_stat_activity where pid = $1", pid)[1].n
        if n == 0 then break end
        c:exec("select pg_sleep(0.05)")
      end
      assert.equal(0, n)
    end)

    it("raises on misuse", function()
      assert.has_error(function() c.exec(nil, "select 1") end)
      assert.has_error(function() c:exec() end)
      assert.has_error(function() pg.connect(true) end)
      assert.has_error(function() pg.copy { from = c, to = c, from_sql = "x", to_sql = "y" } end)
      assert.has_error(function() c:on_notice(42) end)
    end)
  end)

  describe("quoting", function()
    it("escapes identifiers and literals", function()
      assert.equal('"we""ird"', c:escape_identifier('we"ird'))
      assert.equal("'it''s'", c:escape_literal("it's"))
      assert.equal([[ E'a\\b']], c:escape_literal([[a\b]]))
      local lit = c:escape_literal("żółw's")
      assert.equal("żółw's", c:exec("select " .. lit .. " s")[1].s)
    end)

    it("qualifies without a connection", function()
      assert.equal('"public"."t"', pg.qualify("public", "t"))
      assert.equal('"My Schema"."we""ird"', pg.qualify("My Schema", 'we"ird'))
      assert.equal('"t"', pg.qualify(nil, "t"))
      assert.equal('"select"', pg.quote_ident("select"))
      assert.has_error(function() pg.qualify("s", "") end)
      assert(c:exec("create temp table " .. pg.quote_ident('We"ird') .. " (x int)"))
    end)
  end)

  describe("transaction", function()
    before_each(function()
      assert(c:exec("drop table if exists tx; create table tx(id int primary key)"))
    end)

    local function count() return c:exec("select count(*) n from tx")[1].n end

    it("commits when the function returns", function()
      local a, b = c:transaction(function(tx)
        assert(tx:exec("insert into tx values (1)"))
        assert.equal("intrans", tx:transaction_status())
        return "done", 2
      end)
      assert.equal("done", a); assert.equal(2, b)
      assert.equal(1, count())
      assert.is_true(c:transaction(function() end))
    end)

    it("rolls back and re-raises on error", function()
      assert.has_error(function()
        c:transaction(function(tx)
          assert(tx:exec("insert into tx values (1)"))
          error("boom")
        end)
      end)
      assert.equal(0, count())
      assert.equal("idle", c:transaction_status())
      local ok, err = pcall(c.transaction, c, function(tx)
        assert(tx:exec("insert into tx values (1)"))
        local r, e = tx:exec("insert into tx values (1)")
        if not r then error(e) end -- luassert's assert stringifies, Lua's keeps the value
      end)
      assert.is_false(ok)
      assert.equal("23505", err.sqlstate) -- the structured error survives
      assert.equal(0, count())
    end)

    it("rolls back when the function returns nil, err", function()
      local r, err = c:transaction(function(tx)
        assert(tx:exec("insert into tx values (1)"))
        return tx:exec("insert into tx values (1)")
      end)
      assert.is_nil(r)
      assert.equal("23505", err.sqlstate)
      assert.equal(0, count())
    end)

    it("nests with savepoints", function()
      c:transaction(function(tx)
        assert(tx:exec("insert into tx values (1)"))
        assert.has_error(function()
          tx:transaction(function(inner)
            assert(inner:exec("insert into tx values (2)"))
            error("inner failure")
          end)
        end)
        tx:transaction(function(inner) assert(inner:exec("insert into tx values (3)")) end)
      end)
      assert.same({ { id = 1 }, { id = 3 } }, (function()
        local t = {}
        for row in c:exec("select id from tx order by id"):rows() do t[#t + 1] = row end
        return t
      end)())
    end)
  end)

  describe("COPY", function()
    before_each(function()
      assert(other:exec("drop table if exists src; create table src(id int primary key, name text, b bytea, j jsonb)"))
      assert(other:exec([[insert into src select g, 'name ' || g || E' tab\there', '\x00ff'::bytea,
        '{"k": "v"}' from generate_series(1, 1000) g]]))
      assert(c:exec("drop table if exists dst; create table dst(id int primary key, name text, b bytea, j jsonb)"))
    end)

    local function dst_count() return c:exec("select count(*) n from dst")[1].n end

    it("streams COPY OUT to a function, a path and a file; COPY IN from them", function()
      local chunks = {}
      local r = assert(other:copy_out("copy src to stdout", function(chunk) chunks[#chunks + 1] = chunk end))
      local data = table.concat(chunks)
      assert.equal(1000, r.rows)
      assert.equal(#data, r.bytes)
      local i = 0
      r = assert(c:copy_in("copy dst from stdin", function()
        i = i + 1
        if i == 1 then return data:sub(1, 1000) elseif i == 2 then return data:sub(1001) end
      end))
      assert.equal(1000, r.rows)
      assert.equal(1000, dst_count())
      assert.equal(c:exec("select md5(string_agg(name, ',' order by id)) h from dst")[1].h,
        other:exec("select md5(string_agg(name, ',' order by id)) h from src")[1].h)

      local path = os.tmpname()
      assert.equal(1000, assert(other:copy_out("copy src to stdout (format binary)", path)).rows)
      assert(c:exec("truncate dst"))
      assert.equal(1000, assert(c:copy_in("copy dst from stdin (format binary)", path)).rows)
      local f = assert(io.open(path, "wb"))
      assert(other:copy_out("copy src to stdout (format csv)", f))
      f:close()
      assert(c:exec("truncate dst"))
      f = assert(io.open(path, "rb"))
      assert.equal(1000, assert(c:copy_in("copy dst from stdin (format csv)", f)).rows)
      f:close()
      os.remove(path)
    end)

    it("aborts cleanly when a sink or source raises", function()
      assert.has_error(function()
        other:copy_out("copy src to stdout", function() error("sink broke") end)
      end, "sink broke")
      assert.equal("idle", other:transaction_status())
      assert.equal(1, other:exec("select 1 x")[1].x)
      local n = 0
      assert.has_error(function()
        c:copy_in("copy dst from stdin", function()
          n = n + 1
          if n > 2 then error("source broke") end
          return n .. "\tx\t\\\\x00\t{}\n"
        end)
      end, "source broke")
      assert.equal(0, dst_count())
      assert.equal(1, c:exec("select 1 x")[1].x)
    end)

    it("returns a COPY IN data error with its fields", function()
      local sent = false
      local r, err = c:copy_in("copy dst from stdin", function() if not sent then sent = true return "oops\n" end end)
      assert.is_nil(r)
      assert.equal("22P02", err.sqlstate)
      assert.equal("to", err.side)
      assert.equal(1, c:exec("select 1 x")[1].x)
    end)

    for _, format in ipairs { "text", "binary" } do
      it("copies between databases in C, " .. format .. " format", function()
        local calls = 0
        local r = assert(pg.copy {
          from = other, from_sql = "copy src to stdout (format " .. format .. ")",
          to = c, to_sql = "copy dst from stdin (format " .. format .. ")",
          on_progress = function(bytes, rows) calls = calls + 1; assert.is_true(bytes > 0 and rows > 0) end,
        })
        assert.equal(1000, r.rows)
        assert.is_true(r.bytes > 1000 * 10)
        assert.is_true(calls >= 1)
        assert.equal(1000, dst_count())
        local q = "select md5(string_agg(id || name || encode(b, 'hex') || j::text, ',' order by id)) h from "
        assert.equal(other:exec(q .. "src")[1].h, c:exec(q .. "dst")[1].h)
      end)
    end

    it("carries rows larger than its batches, and rows across their edges, whole", function()
      -- rows of 0 to 150 KB, many larger than libpq's 8 KiB send buffer and the
      -- server's 64 KiB socket reads, so that a row spans several of each
      assert(other:exec("drop table if exists wide; create table wide(id int, pad text)"))
      assert(c:exec("drop table if exists wide; create table wide(id int, pad text)"))
      assert(other:exec([[insert into wide select g, left(repeat(md5(g::text), 5000), (g * 7919) % 150000)
        from generate_series(1, 300) g]]))
      local q = "select count(*) n, md5(string_agg(id || ':' || pad, ',' order by id)) h from wide"
      for _, format in ipairs { "text", "binary" } do
        assert(c:exec("truncate wide"))
        local r = assert(pg.copy { from = other, from_sql = "copy wide to stdout (format " .. format .. ")",
          to = c, to_sql = "copy wide from stdin (format " .. format .. ")" })
        assert.equal(300, r.rows)
        assert.same(other:exec(q)[1], c:exec(q)[1])
      end
      assert.is_true(other:exec("select count(*) n from wide where length(pad) > 65536")[1].n > 50)
      assert(other:exec("drop table wide"))
      assert(c:exec("drop table wide"))
    end)

    it("aborts both sides when the target fails in the middle", function()
      assert(c:exec("alter table dst add constraint small check (id < 600)"))
      local r, err = pg.copy { from = other, from_sql = "copy src to stdout",
        to = c, to_sql = "copy dst from stdin" }
      assert.is_nil(r)
      assert.equal("to", err.side)
      assert.equal("23514", err.sqlstate)
      assert.matches("small", err.message)
      assert.equal("idle", other:transaction_status())
      assert.equal("idle", c:transaction_status())
      assert.equal(0, dst_count())
      assert.equal(1000, other:exec("select count(*) n from src")[1].n)
      assert(c:exec("alter table dst drop constraint small"))
    end)

    it("aborts both sides when the source fails in the middle", function()
      local r, err = pg.copy { from = other,
        from_sql = "copy (select g, 'n', null, null from generate_series(1, 100000) g where 1 / (50000 - g) <> 7) to stdout",
        to = c, to_sql = "copy dst from stdin" }
      assert.is_nil(r)
      assert.equal("from", err.side)
      assert.equal("22012", err.sqlstate)
      assert.equal("source", err.conn)
      assert.equal(0, dst_count())
      assert.equal(1, other:exec("select 1 x")[1].x)
      assert.equal(1, c:exec("select 1 x")[1].x)
    end)

    it("reports a COPY that cannot start, on the right side", function()
      local r, err = pg.copy { from = other, from_sql = "copy nosuch to stdout",
        to = c, to_sql = "copy dst from stdin" }
      assert.is_nil(r)
      assert.equal("from", err.side)
      assert.equal("42P01", err.sqlstate)
      assert.equal(0, dst_count())
      r, err = pg.copy { from = other, from_sql = "copy src to stdout", to = c, to_sql = "select 1" }
      assert.is_nil(r)
      assert.equal("to", err.side)
      assert.equal("copy", err.kind)
      assert.equal(1, other:exec("select 1 x")[1].x)
      assert.equal(1, c:exec("select 1 x")[1].x)
    end)

    it("aborts both sides when on_progress raises", function()
      assert.has_error(function()
        pg.copy { from = other, from_sql = "copy src to stdout", to = c, to_sql = "copy dst from stdin",
          progress_interval = 0, on_progress = function() error("stop now") end }
      end, "stop now")
      assert.equal(0, dst_count())
      assert.equal(1, other:exec("select 1 x")[1].x)
    end)

    it("cancels both sides on Ctrl-C", function()
      local script = ([[
        local pg = require "migrun.pg"
        local a = assert(pg.connect(%q, { name = "source" }))
        local b = assert(pg.connect(%q, { name = "target" }))
        local ok, err = pcall(pg.copy, { from = a, to = b, to_sql = "copy dst from stdin",
          from_sql = "copy (select g, 'n' || pg_sleep(0.001)::text, null, null" ..
                     " from generate_series(1, 100000) g) to stdout",
          progress_interval = 0.2, on_progress = function()
            if not started then started = true; io.stdout:write("ready\n"); io.stdout:flush() end
          end })
        print(ok, err.kind)
        print(a:transaction_status(), b:transaction_status(), b:exec("select count(*) n from dst")[1].n)
      ]]):format(L.source.conninfo, L.target.conninfo)
      local lines = {}
      local h = assert(proc.spawn { MIGRUN, "-e", script, stdout = function(l) lines[#lines + 1] = l end,
        stderr = "stdout" })
      local deadline = os.time() + 20
      while #lines == 0 and os.time() < deadline do h:wait(0.1) end
      h:kill("INT")
      local ok = h:wait(15)
      local out = table.concat(lines, "\n")
      assert.is_true(ok, out)
      assert.matches("false\tinterrupted", out, 1, true)
      assert.matches("idle\tidle\t0", out, 1, true)
    end)

    it("moves a large table with flat memory", function()
      -- ~1 GB (~50 MB under the sanitizers) of 1 KiB rows, unlogged to spare the disk
      local rows = SANITIZE and 50000 or 1000000
      assert(other:exec("drop table if exists big; create unlogged table big(id int8, pad text)"))
      assert(c:exec("drop table if exists big; create unlogged table big(id int8, pad text)"))
      assert(other:exec("insert into big select g, repeat(md5(g::text), 31) from generate_series(1, $1) g", rows))
      local before = vmhwm_mb()
      local progress = 0
      local t0 = os.time()
      local r = assert(pg.copy { from = other, from_sql = "copy big to stdout (format binary)",
        to = c, to_sql = "copy big from stdin (format binary)",
        on_progress = function() progress = progress + 1 end, progress_interval = 2 })
      local peak = vmhwm_mb()
      print(("\nlarge COPY: %d rows, %.1f MB in %d s; VmHWM %.1f MB before, %.1f MB after"):format(
        r.rows, r.bytes / 1e6, os.time() - t0, before, peak))
      assert.equal(rows, r.rows)
      assert.is_true(r.bytes > rows * 1000)
      assert.equal(rows, c:exec("select count(*) n from big")[1].n)
      assert.equal(rows, other:exec("select count(*) n from big")[1].n)
      -- ASan's quarantine holds on to freed memory: allow it more
      local limit = SANITIZE and 400 or 200
      assert.is_true(peak < limit, "peak RSS " .. peak .. " MB")
      assert(other:exec("drop table big"))
      assert(c:exec("drop table big"))
    end)
  end)

  describe("replica", function()
    local r
    setup(function() r = assert(pg.connect(L.replica.conninfo, { name = "replica" })) end)
    teardown(function() if r then r:close() end end)

    it("is in recovery while the primary is not", function()
      assert.is_true(r:in_recovery())
      assert.is_false(other:in_recovery())
      assert.is_false(c:in_recovery())
      local _, err = r:exec("create table nope(x int)")
      assert.equal("25006", err.sqlstate) -- read-only transaction
      assert.equal("replica", err.conn)
    end)

    it("shows no new rows while its replay is paused and the primary writes", function()
      assert(other:exec("drop table if exists moving; create table moving(id int)"))
      assert(other:exec("insert into moving select generate_series(1, 10)"))
      assert(L:wait_replica_caught_up(30))
      assert.equal(10, r:exec("select count(*) n from moving")[1].n)
      local names = lsn.names(r:server_version())
      assert(r:exec("select " .. names.wal_replay_pause .. "()"))
      local state
      for _ = 1, 200 do -- 14+: the pause is only requested until replay really stops
        state = r:exec("select " .. names.wal_replay_pause_state .. "() s")[1].s
        if state == "paused" then break end
        r:exec("select pg_sleep(0.05)")
      end
      assert.equal("paused", state)
      local frozen = r:exec("select pg_last_wal_replay_lsn() l")[1].l
      assert.is_true(lsn.is(frozen))
      for i = 1, 5 do assert(other:exec("insert into moving select generate_series(1, $1)", i * 100)) end
      local written = other:exec("select pg_current_wal_lsn() l")[1].l
      assert.is_true(written > frozen)
      -- wait until the replica has received the new WAL, then check it did not apply it
      for _ = 1, 200 do
        if r:exec("select pg_last_wal_receive_lsn() l")[1].l >= written then break end
        r:exec("select pg_sleep(0.05)")
      end
      assert.is_true(r:exec("select pg_last_wal_receive_lsn() l")[1].l >= written)
      assert.equal(10, r:exec("select count(*) n from moving")[1].n)
      assert.equal(frozen, r:exec("select pg_last_wal_replay_lsn() l")[1].l)
      assert(r:exec("select " .. names.wal_replay_resume .. "()"))
      assert(L:wait_replica_caught_up(30))
      assert.equal(1510, r:exec("select count(*) n from moving")[1].n)
      assert(other:exec("drop table moving"))
    end)
  end)
end)
