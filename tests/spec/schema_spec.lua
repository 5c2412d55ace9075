-- migrun.schema: pre-data / post-data copy with the target's tools, roles, on a real lab.
local lab = require "migrun.rehearsal.lab"
local schema = require "migrun.schema"
local db = require "migrun.db"
local pg = require "migrun.pg"

describe("migrun.schema", function()
  local L, tools, target_conn
  local n = 0
  local function fresh(prefix)
    n = n + 1
    return ("%s%d"):format(prefix, n)
  end
  local function state_dir()
    n = n + 1
    return L.dir .. "/state" .. n
  end
  local function with_password(c) return c.migrun_conninfo .. " password='" .. L.password .. "'" end

  setup(function()
    local err
    -- a superuser on the target: this spec restores without copying roles first;
    -- the e2e specs run as an RDS-like role
    L, err = lab.start{ password = "schema-spec-s3cret", target_superuser = true }
    assert(L, tostring(err))
    target_conn = assert(pg.connect(L.target.conninfo, { name = "target" }))
    tools = assert(schema.tools(target_conn:server_version()))
  end)

  teardown(function()
    if target_conn then target_conn:close() end
    if L then L:stop() end
  end)

  -- A schema with every kind of post-data object.
  local function make_source_schema(s)
    assert(L.source:psql(([[
      create schema %s;
      set search_path = %s;
      create table parent (id int primary key, email text not null, body jsonb,
                           constraint parent_email_key unique (email));
      create unique index parent_lower_email on parent (lower(email));
      create index parent_body on parent using gin (body);
      create table child (id bigserial primary key, parent_id int references parent (id),
                          qty int check (qty > 0));
      create index child_parent on child (parent_id);
      create table nopk (a int, b text);
      create function touch() returns trigger language plpgsql as $$ begin return new; end $$;
      create trigger child_touch before insert on child for each row execute function touch();
      insert into parent select g, 'u' || g || '@x', jsonb_build_object('k', g) from generate_series(1, 100) g;
    ]]):format(s, s)))
  end

  local function indexes(cluster, s)
    return assert(cluster:psql(("select string_agg(indexname || ':' || indexdef, E'\n' order by indexname) "
      .. "from pg_indexes where schemaname = '%s'"):format(s)))
  end
  local function constraints(cluster, s)
    return assert(cluster:psql(("select string_agg(conrelid::regclass || ':' || conname || ':' || contype::text || ':' "
      .. "|| pg_get_constraintdef(c.oid), E'\n' order by conname) from pg_constraint c "
      .. "join pg_namespace n on n.oid = c.connamespace where n.nspname = '%s'"):format(s)))
  end

  it("finds the tools of the target's major version", function()
    local major = assert(L.target:psql("select current_setting('server_version_num')::int / 10000"))
    assert.equal(major, tools.major)
    for _, name in ipairs{ "pg_dump", "pg_restore", "pg_dumpall", "psql" } do
      assert.truthy(tools[name]:find("/" .. name .. "$"), name)
      local ok, _, _, out = require("migrun.proc").run{ tools[name], "--version" }
      assert.is_true(ok)
      assert.truthy(out:find("PostgreSQL%) " .. major .. "%."), out)
    end
  end)

  it("says which tools of which version are missing", function()
    -- a source of 99 into a target of 99: no pg_dump of 99 here, and none between them
    local t, err = schema.tools(990000, { source = 990000 })
    assert.is_nil(t)
    assert.truthy(tostring(err):find("PostgreSQL 99", 1, true), tostring(err))
    assert.truthy(tostring(err):find("pg_dump", 1, true))
    assert.truthy(tostring(err):find("/usr/lib/postgresql/99/bin", 1, true))
    -- without the source's version, the newest below the target's: pg_dump itself refuses a newer source
    t = assert(schema.tools(990000))
    assert.equal("older than the target", t.rule)
    assert.truthy(t.note:find("no pg_dump of PostgreSQL 99 (the target's major) here", 1, true), t.note)
    -- a version number that went through JSON (a float) is the same version
    assert.equal(tools.pg_dump, assert(schema.tools(tonumber(tools.major) * 10000 + 0.0)).pg_dump)
    t, err = schema.tools("9.6", { bindirs = { L.dir .. "/no-such-bin" } })
    assert.is_nil(t)
    assert.truthy(tostring(err):find("PostgreSQL 9.6", 1, true), tostring(err))
    assert.same({ "pg_dump", "pg_restore", "pg_dumpall", "psql" }, err.missing)
  end)

  it("restores tables without indexes before the load and every index and constraint after it", function()
    local s = fresh("sch")
    make_source_schema(s)
    local dump = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s } }))
    assert.truthy(io.open(dump.file)):close()
    for _, f in ipairs{ dump.file, dump.list } do
      local _, _, _, mode = require("migrun.proc").run{ "stat", "-c", "%a", f }
      assert.equal("600\n", mode, f)
    end
    assert(schema.restore("pre-data", L.target.conninfo, dump, {}))
    assert.equal("3", L.target:psql(("select count(*) from pg_tables where schemaname = '%s'"):format(s)))
    assert.equal("", indexes(L.target, s))
    -- only NOT NULL / CHECK style constraints are pre-data: no keys yet
    assert.equal("0", L.target:psql(("select count(*) from pg_constraint c join pg_namespace n "
      .. "on n.oid = c.connamespace where n.nspname = '%s' and contype in ('p', 'u', 'f')"):format(s)))
    assert.equal("0", L.target:psql(("select count(*) from %s.parent"):format(s))) -- schema only

    assert(schema.restore("post-data", L.target.conninfo, dump, { jobs = 2 }))
    local want_idx = indexes(L.source, s)
    assert.truthy(want_idx:find("parent_lower_email", 1, true))
    assert.equal(want_idx, indexes(L.target, s))
    local want_con = constraints(L.source, s)
    assert.truthy(want_con:find(":f:", 1, true))
    assert.equal(want_con, constraints(L.target, s))
    assert.equal("1", L.target:psql(("select count(*) from pg_trigger where tgname = 'child_touch' "
      .. "and tgrelid = '%s.child'::regclass"):format(s)))
  end)

  it("restore_pre_data: restores on a bare target, leaves a finished earlier restore, refuses a partial one", function()
    local catalog = require "migrun.catalog"
    local s = fresh("pre")
    make_source_schema(s)
    local dump = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s } }))
    local source_db = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    local target_db = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    local tables = assert(catalog.tables(source_db, { schemas = { s } }))
    assert.equal(3, #tables)
    local r = assert(schema.restore_pre_data(L.target.conninfo, dump, target_db, tables, {}))
    assert.equal("restored", r.how)
    -- as after a migrun killed while pg_restore committed: a rerun goes on
    local said = {}
    r = assert(schema.restore_pre_data(L.target.conninfo, dump, target_db, tables,
      { echo = function(l) said[#said + 1] = l end }))
    assert.equal("already there", r.how)
    assert.matches("already %(all 3 tables", table.concat(said, "\n"))
    -- a table made by someone else: nothing done, the tables named
    assert(target_db:write(("drop table %s.nopk"):format(pg.quote_ident(s))))
    local before = L.target:psql(("select count(*) from pg_tables where schemaname = '%s'"):format(s))
    local ok, err = schema.restore_pre_data(L.target.conninfo, dump, target_db, tables, {})
    assert.is_nil(ok)
    assert.matches("the target holds 2 of the 3 tables to migrate %(missing: " .. s .. "%.nopk%)", tostring(err))
    assert.equal(before, L.target:psql(("select count(*) from pg_tables where schemaname = '%s'"):format(s)))
    source_db:close() target_db:close()
  end)

  it("restore_missing: pg_restore on a bare target, the rest of the section after a half-done restore", function()
    local catalog = require "migrun.catalog"
    local s = fresh("half")
    make_source_schema(s)
    local dump = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s } }))
    assert(schema.restore("pre-data", L.target.conninfo, dump, {}))
    local source_db = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    local target_db = db.wrap(target_conn)
    local tables = { { schema = s, name = "parent" }, { schema = s, name = "child" }, { schema = s, name = "nopk" } }
    -- a post-data restore killed halfway: the primary key of parent and one index exist
    assert(L.target:psql(("alter table %s.parent add constraint parent_pkey primary key (id); "
      .. "create index child_parent on %s.child (parent_id)"):format(s, s)))
    local said = {}
    local r = assert(schema.restore_missing(L.target.conninfo, dump, source_db, target_db, tables,
      { echo = function(l) said[#said + 1] = l end }))
    assert.equal("pg_restore (rest)", r.how)
    assert.is_true(r.restored >= 4)
    assert.equal(2, r.already) -- the primary key of parent and child_parent: left out of the list
    assert.matches("post%-data: 2 entries already on the target left out of the list", table.concat(said, "\n"))
    assert.same({}, catalog.missing_on_target(assert(catalog.constraints_and_indexes(source_db, tables)),
      assert(catalog.constraints_and_indexes(target_db, tables))))
    assert.equal(constraints(L.source, s), constraints(L.target, s))
    assert.equal(indexes(L.source, s), indexes(L.target, s))
    -- and what is not an index or a constraint came too (statements from the
    -- catalog would have left the trigger out)
    assert.equal("1", L.target:psql(("select count(*) from pg_trigger where tgname = 'child_touch' "
      .. "and tgrelid = '%s.child'::regclass"):format(s)))
    -- nothing missing: every entry that names an object is left out, the
    -- restore runs without an "already exists"
    r = assert(schema.restore_missing(L.target.conninfo, dump, source_db, target_db, tables, {}))
    assert.equal("pg_restore (rest)", r.how)
    assert.equal(0, r.restored)
    assert.equal(constraints(L.source, s), constraints(L.target, s))
    -- a bare target: the archive's post-data section, with pg_restore
    local s2 = fresh("bare")
    make_source_schema(s2)
    local dump2 = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s2 } }))
    assert(schema.restore("pre-data", L.target.conninfo, dump2, {}))
    local tables2 = { { schema = s2, name = "parent" }, { schema = s2, name = "child" }, { schema = s2, name = "nopk" } }
    r = assert(schema.restore_missing(L.target.conninfo, dump2, source_db, target_db, tables2, { jobs = 2 }))
    assert.equal("pg_restore", r.how)
    assert.equal(indexes(L.source, s2), indexes(L.target, s2))
    source_db:close()
  end)

  it("table_post_data: each table's indexes and keys the target lacks, built side by side, again safely", function()
    local s = fresh("per")
    make_source_schema(s)
    local dump = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s } }))
    assert(schema.restore("pre-data", L.target.conninfo, dump, {}))
    local source_db = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    local target_db = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    local tables = { { schema = s, name = "parent" }, { schema = s, name = "child" }, { schema = s, name = "nopk" } }
    local post = assert(schema.table_post_data(source_db, target_db, tables))
    local function names(k)
      local out = {}
      for _, it in ipairs(post[k] or {}) do out[#out + 1] = it.name .. ":" .. it.kind end
      table.sort(out)
      return table.concat(out, " ")
    end
    assert.equal("parent_body:index parent_email_key:unique parent_lower_email:index parent_pkey:primary key",
      names(s .. ".parent"))
    -- the foreign key waits for the post-data restore; nopk has nothing
    assert.equal("child_parent:index child_pkey:primary key", names(s .. ".child"))
    assert.is_nil(post[s .. ".nopk"])
    local pk
    for _, it in ipairs(post[s .. ".parent"]) do if it.name == "parent_pkey" then pk = it end end
    assert.same({ ("CREATE UNIQUE INDEX IF NOT EXISTS parent_pkey ON %s.parent USING btree (id)"):format(s),
      ('ALTER TABLE "%s"."parent" ADD CONSTRAINT "parent_pkey" PRIMARY KEY USING INDEX "parent_pkey"'):format(s) },
      pk.sql)
    -- the items of one table build at the same time (SHARE locks), one of
    -- them killed after its index: its statements run again
    assert(target_db:write(pk.sql[1]))
    local conns = {}
    for i, it in ipairs(post[s .. ".parent"]) do
      conns[i] = assert(pg.connect(L.target.conninfo, { name = "target" }))
      assert(conns[i]:exec("begin"))
      assert(conns[i]:exec(it.sql[1]))
    end
    for i in ipairs(post[s .. ".parent"]) do assert(conns[i]:exec("commit")) end
    for i, it in ipairs(post[s .. ".parent"]) do
      for j = 2, #it.sql do assert(conns[i]:exec(it.sql[j])) end
      conns[i]:close()
    end
    for _, it in ipairs(post[s .. ".child"]) do
      for _, sql in ipairs(it.sql) do assert(target_db:write(sql)) end
    end
    assert.same({}, assert(schema.table_post_data(source_db, target_db, tables)))
    -- then the post-data restore brings the rest: the foreign key, the trigger
    local r = assert(schema.restore_missing(L.target.conninfo, dump, source_db, target_db, tables, { jobs = 2 }))
    assert.equal("pg_restore (rest)", r.how)
    assert.equal(indexes(L.source, s), indexes(L.target, s))
    assert.equal(constraints(L.source, s), constraints(L.target, s))
    assert.equal("1", L.target:psql(("select count(*) from pg_trigger where tgname = 'child_touch' "
      .. "and tgrelid = '%s.child'::regclass"):format(s)))
    -- a table the target does not have yet (a dry run) lacks everything
    assert(L.source:psql(("create table %s.later (id int primary key)"):format(s)))
    local later = assert(schema.table_post_data(source_db, target_db, { { schema = s, name = "later" } }))
    assert.equal("later_pkey", later[s .. ".later"][1].name)
    source_db:close() target_db:close()
  end)

  it("leaves pglogical out of the target and says so", function()
    -- A database of its own on both sides: a whole-database dump, pglogical included.
    local dbname = fresh("whole")
    assert(L.source:psql("create database " .. dbname))
    assert(L.target:psql("create database " .. dbname))
    assert(L.source:psql("create extension pglogical; create table t (id int primary key);", { dbname = dbname }))
    local src = L.source.conninfo:gsub("dbname=%S+", "dbname=" .. dbname)
    local dst = L.target.conninfo:gsub("dbname=%S+", "dbname=" .. dbname)
    local dump = assert(schema.dump(src, state_dir(), { tools = tools }))
    assert.is_true(#dump.toc.excluded >= 1)
    assert.truthy(table.concat(dump.toc.excluded, "\n"):find("EXTENSION - pglogical", 1, true))
    assert.truthy(table.concat(dump.notes, " "):find("pglogical", 1, true))
    assert(schema.restore("pre-data", dst, dump, {}))
    assert(schema.restore("post-data", dst, dump, {}))
    assert.equal("t", L.target:psql("select to_regclass('public.t') is not null", { dbname = dbname }))
    assert.equal("0", L.target:psql("select count(*) from pg_extension where extname = 'pglogical'", { dbname = dbname }))
    assert.equal("0", L.target:psql("select count(*) from pg_namespace where nspname = 'pglogical'", { dbname = dbname }))
  end)

  it("creates missing roles without SUPERUSER, REPLICATION or BYPASSRLS and reports the rest", function()
    local boss, reader, both = fresh("boss"), fresh("reader"), fresh("both")
    assert(L.source:psql(([[
      create role %s login superuser replication bypassrls createdb;
      create role %s nologin; grant %s to %s;
      alter role %s set work_mem = '8MB';
      create role %s login;]]):format(boss, reader, reader, boss, reader, both)))
    assert(L.target:psql(("create role %s nologin"):format(both))) -- already there: left alone
    local said = {}
    local report = assert(schema.copy_roles(L.source.conninfo, db.wrap(target_conn),
      { tools = tools, say = function(l) said[#said + 1] = l end }))
    local created = table.concat(report.created, ",")
    assert.truthy(created:find(boss, 1, true))
    assert.truthy(created:find(reader, 1, true))
    assert.falsy(created:find(both, 1, true))
    assert.truthy(table.concat(report.existing, ","):find(both, 1, true))
    assert.same({ "SUPERUSER", "REPLICATION", "BYPASSRLS" }, report.stripped[boss])
    assert.equal("f|f|f|t|t", L.target:psql(("select rolsuper, rolreplication, rolbypassrls, rolcreatedb, rolcanlogin "
      .. "from pg_roles where rolname = '%s'"):format(boss)))
    assert.equal("t", L.target:psql(("select pg_has_role('%s', '%s', 'member')"):format(boss, reader)))
    assert.equal("{work_mem=8MB}", L.target:psql(("select rolconfig from pg_roles where rolname = '%s'"):format(reader)))
    assert.equal("f", L.target:psql(("select rolcanlogin from pg_roles where rolname = '%s'"):format(both)))
    assert.truthy(table.concat(said, "\n"):find("without SUPERUSER, REPLICATION, BYPASSRLS", 1, true))
    -- a second run creates nothing
    report = assert(schema.copy_roles(L.source.conninfo, db.wrap(target_conn), { tools = tools }))
    assert.same({}, report.created)
  end)

  it("copies roles as a target role that is not a superuser (the RDS master user) and can give them objects", function()
    local boss, plain, master = fresh("exboss"), fresh("plain"), fresh("master")
    assert(L.source:psql(([[
      create role %s login superuser;
      create role %s nologin;]]):format(boss, plain)))
    -- like the RDS master user: no superuser, CREATEROLE, the owner of its database; trusted on loopback
    assert(L.target:psql(("create role %s login createrole createdb; create database %s owner %s")
      :format(master, master, master)))
    local conn = assert(pg.connect((L.target.conninfo:gsub("user=%S+", "user=" .. master):gsub("dbname=%S+",
      "dbname=" .. master)), { name = "target" }))
    local report = assert(schema.copy_roles(L.source.conninfo, db.wrap(conn), { tools = tools, schemas = { "public" } }))
    local joined = table.concat(report.joined, ",")
    assert.truthy(joined:find(boss, 1, true), joined)
    assert.truthy(joined:find(plain, 1, true), joined)
    assert.same({ "SUPERUSER" }, report.stripped[boss])
    assert.is_nil(report.stripped[plain], "NOSUPERUSER and the like are defaults, not stripped")
    local function q(sql)
      return assert(L.target:psql((sql:gsub("<(%w+)>", { boss = boss, plain = plain, master = master })),
        { dbname = master }))
    end
    assert.equal("t|t", q("select pg_has_role('<master>', '<boss>', 'member'), pg_has_role('<master>', '<plain>', 'member')"))
    -- the former superuser may own what it owned on the source: schemas, tables in public
    assert.equal("t|t|f", q("select has_database_privilege('<boss>', current_database(), 'CREATE'), "
      .. "has_schema_privilege('<boss>', 'public', 'CREATE'), has_database_privilege('<plain>', current_database(), 'CREATE')"))
    assert(conn:exec(("create table public.%s_t (id int); alter table public.%s_t owner to %s"):format(boss, boss, boss)))
    conn:close()
  end)

  it("runs nothing on the target in a dry run, printing what it would do", function()
    local s, role = fresh("dry"), fresh("dryrole")
    make_source_schema(s)
    assert(L.source:psql("create role " .. role))
    local lines = {}
    local echo = function(l) lines[#lines + 1] = l end
    local dump = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s } }))
    local report = assert(schema.copy_roles(L.source.conninfo, db.wrap(target_conn, { dry_run = true, echo = echo }),
      { tools = tools }))
    assert.same({ role }, report.created)
    assert.is_true(assert(schema.restore("pre-data", L.target.conninfo, dump, { dry_run = true, echo = echo })))
    assert.is_true(assert(schema.restore("post-data", L.target.conninfo, dump, { dry_run = true, jobs = 2, echo = echo })))
    local text = table.concat(lines, "\n")
    assert.truthy(text:find('CREATE ROLE "' .. role .. '"', 1, true), text)
    assert.truthy(text:find("--section=pre-data", 1, true), text)
    assert.truthy(text:find("--section=post-data", 1, true), text)
    assert.equal("0", L.target:psql(("select count(*) from pg_roles where rolname = '%s'"):format(role)))
    assert.equal("0", L.target:psql(("select count(*) from pg_namespace where nspname = '%s'"):format(s)))
  end)

  it("keeps the password out of every printed command and passes it in the environment", function()
    local s = fresh("pw")
    make_source_schema(s)
    assert(L.source:psql("grant all on schema " .. s .. " to migrun"))
    local lines = {}
    local echo = function(l) lines[#lines + 1] = l end
    -- The role migrun must authenticate (pg_hba): these work only if the password reaches the tools.
    local dump = assert(schema.dump(with_password(L.source), state_dir(), { tools = tools, schemas = { s }, echo = echo }))
    assert(schema.restore("pre-data", with_password(L.target), dump, { echo = echo }))
    assert(schema.restore("post-data", with_password(L.target), dump, { echo = echo, jobs = 2 }))
    assert(schema.copy_roles(with_password(L.source), db.wrap(target_conn), { tools = tools, echo = echo }))
    assert.equal(indexes(L.source, s), indexes(L.target, s))
    assert.is_true(#lines >= 4)
    for _, line in ipairs(lines) do
      assert.falsy(line:find(L.password, 1, true), line)
      assert.falsy(line:find("password=", 1, true), line)
    end
    local text = table.concat(lines, "\n")
    assert.truthy(text:find("user=migrun", 1, true), text)
    -- and the conninfo helper
    local ci, pw = schema.split_conninfo(with_password(L.source))
    assert.equal(L.password, pw)
    assert.falsy(ci:find(L.password, 1, true))
    -- a wrong password fails, with the tool's message and no secret in it
    local bad = L.source.migrun_conninfo .. " password=wrong-one"
    local d, err = schema.dump(bad, state_dir(), { tools = tools, schemas = { s } })
    assert.is_nil(d)
    assert.truthy(tostring(err):find("pg_dump failed", 1, true), tostring(err))
    assert.falsy(tostring(err):find("wrong-one", 1, true))
  end)

  it("tells a fresh target from one with tables, empty or not", function()
    local s = fresh("has")
    make_source_schema(s)
    local tdb = db.wrap(target_conn)
    local tables = { { schema = s, name = "parent" }, s .. ".child", s .. ".nopk" }
    assert.same({ present = {}, nonempty = {} }, assert(schema.target_has_tables(tdb, tables)))
    local dump = assert(schema.dump(L.source.conninfo, state_dir(), { tools = tools, schemas = { s } }))
    assert(schema.restore("pre-data", L.target.conninfo, dump, {}))
    local got = assert(schema.target_has_tables(tdb, tables))
    assert.same({ s .. ".parent", s .. ".child", s .. ".nopk" }, got.present)
    assert.same({}, got.nonempty)
    assert(L.target:psql(("insert into %s.nopk values (1, 'x')"):format(s)))
    assert.same({ s .. ".nopk" }, assert(schema.target_has_tables(tdb, tables)).nonempty)
  end)
end)
