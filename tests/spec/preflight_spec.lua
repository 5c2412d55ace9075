-- migrun.preflight against real clusters: a healthy lab passes; each failure
-- (roles swapped, pglogical missing, a foreign active slot, rows on the
-- target, a missing tool) is found with a message saying what to do. Every
-- run goes through dry-run Dbs that record writes: preflight must make none.
local pg = require "migrun.pg"
local db = require "migrun.db"
local preflight = require "migrun.preflight"

describe("migrun.preflight", function()
  local L, conns, writes = nil, {}, {}
  local src, rep, tgt

  local function wrap(cluster, name)
    local c = assert(pg.connect(cluster.conninfo, { name = name }))
    conns[#conns + 1] = c
    return db.wrap(c, { dry_run = true, echo = function(line) writes[#writes + 1] = line end })
  end

  local CONFIG = { slots = { prefix = "dms_slot_" }, preflight = { min_free_bytes = 1024 * 1024 },
                   groups = { largest_alone = 5 } }

  local function run(args)
    args.config = args.config or CONFIG
    args.source, args.replica, args.target = args.source or src, args.replica or rep, args.target or tgt
    return preflight.run(args)
  end

  local function find(result, server, check)
    local out = {}
    for _, f in ipairs(result.findings) do
      if f.server == server and f.check == check then out[#out + 1] = f end
    end
    assert(#out > 0, ("no finding %s/%s in:\n%s"):format(server, check, preflight.format(result)))
    return out[1], out
  end

  local function failures(result)
    local out = {}
    for _, f in ipairs(result.findings) do
      if not f.ok then out[#out + 1] = f.server .. "/" .. f.check end
    end
    return out
  end

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src, rep, tgt = wrap(L.source, "source"), wrap(L.replica, "replica"), wrap(L.target, "target")
  end)

  teardown(function()
    for _, c in ipairs(conns) do c:close() end
    if L then assert(L:stop()) end
    assert.same({}, writes)
  end)

  it("passes a healthy lab without warnings, and prints an aligned table", function()
    local r = run {}
    assert.same({}, failures(r))
    assert.equal(0, r.errors)
    assert.equal(0, r.warnings)
    assert.truthy(find(r, "source", "wal_level").message == "wal_level = logical")
    assert.truthy(find(r, "replica", "same cluster").ok)
    assert.truthy(find(r, "replica", "streaming").message:find("streaming from 127.0.0.1:" .. L.source.port, 1, true))
    assert.truthy(find(r, "target", "pg_dump").message:find("/usr/lib/postgresql/15/bin/pg_dump", 1, true))
    assert.truthy(find(r, "source", "free disk").ok)
    local text = preflight.format(r)
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.truthy(lines[1]:find("^server%s+check%s+result%s+details$"))
    local col = lines[1]:find("details", 1, true)
    for i = 3, #lines - 1 do
      -- every row's details start in the same column
      assert.equal(" ", lines[i]:sub(col - 1, col - 1), lines[i])
      assert.not_equal(" ", lines[i]:sub(col, col), lines[i])
    end
    assert.equal("0 errors, 0 warnings", lines[#lines])
  end)

  it("finds the replica given as source and the source given as replica", function()
    local r = run { source = rep, replica = src }
    local f = find(r, "source", "role")
    assert.is_false(f.ok)
    assert.truthy(f.message:find("is in recovery: it is a standby, not the primary", 1, true))
    assert.truthy(f.hint:find("source.conninfo", 1, true))
    local g = find(r, "replica", "role")
    assert.is_false(g.ok)
    assert.truthy(g.message:find("is not in recovery: it is a primary", 1, true))
    assert.truthy(g.message:find("source and replica look swapped", 1, true))
    assert.truthy(g.hint:find("replica.conninfo", 1, true))

    local r2 = run { replica = src }
    local h = find(r2, "replica", "role")
    assert.is_false(h.ok)
    assert.truthy(h.message:find("(the source itself: same system identifier)", 1, true))
    assert.is_true(r2.errors >= 1)
    assert.truthy(preflight.format(r2):find("hint: give the maintenance replica's conninfo in replica.conninfo", 1, true))
  end)

  it("stops on a foreign active slot unless preflight.allow_slots lists it", function()
    local admin = assert(pg.connect(L.source.conninfo, { name = "admin" }))
    assert(admin:exec("select pg_create_logical_replication_slot('other_tool_slot', 'test_decoding')"))
    local proc = require "migrun.proc"
    local h = assert(proc.spawn{ L.bin .. "/pg_recvlogical", "-h", "127.0.0.1", "-p", tostring(L.source.port),
      "-U", "postgres", "-d", "app", "-S", "other_tool_slot", "--start", "-f", "/dev/null",
      stdout = "null", stderr = "null" })
    local host = require "migrun.host"
    local deadline = host.monotonic() + 20
    while not assert(admin:exec("select active from pg_replication_slots where slot_name = 'other_tool_slot'"))[1].active do
      assert(host.monotonic() < deadline, "pg_recvlogical did not attach")
      require("socket").sleep(0.05)
    end
    local ok, err = pcall(function()
      local r = run {}
      local f = find(r, "source", "foreign slot")
      assert.is_false(f.ok)
      assert.equal("error", f.severity)
      assert.truthy(f.message:find("logical slot other_tool_slot (plugin test_decoding, database app) is ACTIVE (pid", 1, true))
      assert.truthy(f.hint:find("something replicates from this server", 1, true))
      assert.truthy(f.hint:find("preflight.allow_slots", 1, true))
      assert.equal(1, r.errors)

      local allowed = run { config = { slots = CONFIG.slots, preflight = { min_free_bytes = 1,
        allow_slots = { "other_tool_slot" } } } }
      assert.equal(0, allowed.errors)
      assert.truthy(find(allowed, "source", "foreign slot").message:find("allowed by preflight.allow_slots", 1, true))
    end)
    h:close()
    -- the walsender outlives pg_recvlogical for a moment: wait until the slot is free
    deadline = host.monotonic() + 20
    while assert(admin:exec("select active from pg_replication_slots where slot_name = 'other_tool_slot'"))[1].active do
      assert(host.monotonic() < deadline, "the slot stayed active")
      require("socket").sleep(0.05)
    end
    assert(admin:exec("select pg_drop_replication_slot('other_tool_slot')"))
    admin:close()
    assert(ok, err)
  end)

  it("finds rows on the target unless resuming", function()
    local s = assert(pg.connect(L.source.conninfo))
    local t = assert(pg.connect(L.target.conninfo))
    assert(s:exec("create schema pf; create table pf.filled (id int primary key); create table pf.empty (id int)"))
    assert(t:exec("create schema pf; create table pf.filled (id int primary key); create table pf.empty (id int);"
      .. " insert into pf.filled values (1)"))
    local r = run {}
    local f = find(r, "target", "empty")
    assert.is_false(f.ok)
    assert.equal("1 tables to load already have rows: pf.filled", f.message)
    local resumed = run { resuming = true }
    assert.is_true(find(resumed, "target", "empty").ok)
    -- excluded tables are not checked
    local excluded = run { config = { slots = CONFIG.slots, preflight = CONFIG.preflight,
      exclude_tables = { "pf.filled" } } }
    assert.is_true(find(excluded, "target", "empty").ok)
    s:on_notice(function() end)
    t:on_notice(function() end)
    assert(t:exec("drop schema pf cascade"))
    assert(s:exec("drop schema pf cascade"))
    s:close()
    t:close()
  end)

  it("finds a missing client tool of the target's version", function()
    local asked = {}
    local r = run { tools = function(name, major)
      asked[#asked + 1] = name .. " " .. major
      if name == "pg_dump" then return nil, "not found" end
      return "/opt/pg/bin/" .. name
    end }
    assert.same({ "pg_dump 15", "psql 15" }, asked)
    local f = find(r, "target", "pg_dump")
    assert.is_false(f.ok)
    assert.equal("pg_dump 15: not found", f.message)
    assert.truthy(f.hint:find("apt-get install postgresql-client-15", 1, true))
    assert.is_true(find(r, "target", "psql").ok)
    assert.equal(1, r.errors)
  end)

  it("says when free disk on the primary is below the minimum", function()
    local r = run { config = { slots = CONFIG.slots, preflight = { min_free_bytes = 2 ^ 62 } } }
    local f = find(r, "source", "free disk")
    assert.is_false(f.ok)
    assert.truthy(f.message:find("free under .*minimum 4%.0 EiB"))
  end)

  it("says the replica's disk is watched here, and NOT watched on another machine until the config says how", function()
    assert.truthy(find(run {}, "replica", "disk watched").message:find("^free disk watched %(statvfs .*/pg_wal%)"))
    -- the lab's replica under a name that is not this machine's (libpq connects to hostaddr)
    local remote = wrap({ conninfo = L.replica.conninfo:gsub("host=127%.0%.0%.1",
      "host=replica.example.internal hostaddr=127.0.0.1") }, "replica")
    local r = run { replica = remote }
    local f = find(r, "replica", "disk watched")
    assert.is_false(f.ok)
    assert.equal("error", f.severity)
    assert.truthy(f.message:find("NOT watched: the replica (replica.example.internal) is not on this machine", 1, true),
      f.message)
    assert.truthy(f.hint:find("wal_guard.replica_free_command", 1, true))
    assert.truthy(f.hint:find("wal_guard.replica_disk_unwatched = true", 1, true))
    assert.equal(1, r.errors, preflight.format(r))
    -- a command of the team's that prints the free bytes (and the size): watched
    local cfg = { slots = CONFIG.slots, preflight = CONFIG.preflight,
      wal_guard = { replica_free_command = { "echo", "123456789", "987654321" } } }
    f = find(run { replica = remote, config = cfg }, "replica", "disk watched")
    assert.is_true(f.ok)
    assert.equal("free disk watched (by echo 123456789 987654321): 117.7 MiB free of 941.9 MiB", f.message)
    -- one that prints no number is said as such
    cfg.wal_guard.replica_free_command = { "echo", "n/a" }
    f = find(run { replica = remote, config = cfg }, "replica", "disk watched")
    assert.is_false(f.ok)
    assert.truthy(f.message:find('printed no number of bytes (it printed "n/a")', 1, true), f.message)
    -- acknowledged: a warning, never silence
    cfg.wal_guard = { replica_disk_unwatched = true }
    r = run { replica = remote, config = cfg }
    f = find(r, "replica", "disk watched")
    assert.is_false(f.ok)
    assert.equal("warning", f.severity)
    assert.truthy(f.message:find("acknowledged by the configuration", 1, true))
    assert.equal(0, r.errors)
  end)

  it("finds pglogical missing on a server without it", function()
    local P = assert(require("migrun.rehearsal.lab").start { pglogical = false,
      settings = { source = { shared_preload_libraries = "" } } })
    local ok, err = pcall(function()
      local r = run { source = wrap(P.source, "source"), replica = wrap(P.replica, "replica"),
                      target = wrap(P.target, "target") }
      local f = find(r, "source", "pglogical preloaded")
      assert.is_false(f.ok)
      assert.equal("shared_preload_libraries = ''", f.message)
      assert.truthy(f.hint:find("add pglogical to shared_preload_libraries", 1, true))
      local e = find(r, "source", "pglogical extension")
      assert.is_false(e.ok)
      assert.truthy(e.message:find("is available but not installed in this database", 1, true))
      assert.is_true(r.errors >= 1)
    end)
    P:stop()
    assert(ok, err)
  end)

  -- The DMS boundary (docs/dms-boundary.md): what nothing can carry safely stops the run, each table and
  -- column named with what to do; what migrun handles is said too; the target role's privileges.
  it("stops at what DMS cannot carry and at missing privileges on the target, writing nothing", function()
    local admin = assert(pg.connect(L.source.conninfo, { name = "admin" }))
    admin:on_notice(function() end)
    assert(admin:exec([[
      create role boundary_owner nologin;
      create role pf_reader login;
      create schema boundary authorization boundary_owner;
      set role boundary_owner;
      create unlogged table boundary.scratch (id int primary key);
      create table boundary.blobs (id int primary key, doc oid);
      create table boundary.secret (id int primary key, author text);
      alter table boundary.secret enable row level security;
      create policy mine on boundary.secret using (author = current_user);
      create table boundary.ri_full (id int primary key, v text);
      alter table boundary.ri_full replica identity full;
      create table boundary.odd (id int primary key, a int, "a-b" int generated always as (a * 2) stored);
      create table boundary.genkey (a int, k int generated always as (a + 1) stored primary key);
      create table boundary.fine (id int generated always as identity primary key, total numeric,
        twice int generated always as (id * 2) stored);
      create table boundary.child (id int primary key, fine_id int references boundary.fine);
      reset role;
      grant usage on schema boundary to pf_reader;
      grant select on all tables in schema boundary to pf_reader;]]))
    -- on the target the owner exists already, and the roles preflight connects as are not members of it
    local tadmin = assert(pg.connect(L.target.conninfo, { name = "tadmin" }))
    assert(tadmin:exec("create role boundary_owner nologin; create role pf_plain login createrole"))
    local function as(cluster, user, name)
      local info = user == "migrun" and (cluster.migrun_conninfo .. " password=" .. L.password)
        or (cluster.conninfo:gsub("user=%S+", "user=" .. user))
      local c = assert(pg.connect(info, { name = name }))
      conns[#conns + 1] = c
      return db.wrap(c, { dry_run = true, echo = function(line) writes[#writes + 1] = line end })
    end
    local cfg = { slots = CONFIG.slots, preflight = CONFIG.preflight, schemas = { "boundary" } }
    local ok, err = pcall(function()
      local r = run { config = cfg, target = as(L.target, "migrun", "target") }
      local function finding(check, pattern)
        for _, f in ipairs(r.findings) do
          if f.check == check and f.message:find(pattern, 1, true) then return f end
        end
        error(("no %s finding with %q in:\n%s"):format(check, pattern, preflight.format(r)))
      end
      local f = finding("unlogged table", '"boundary"."scratch" is UNLOGGED')
      assert.is_false(f.ok)
      assert.equal("error", f.severity)
      assert.truthy(f.hint:find("SET LOGGED", 1, true))
      f = finding("large object", '"boundary"."blobs"."doc" is of type oid')
      assert.equal("error", f.severity)
      assert.truthy(f.hint:find("bytea", 1, true))
      f = finding("replica identity full", '"boundary"."ri_full" has REPLICA IDENTITY FULL')
      assert.truthy(f.hint:find("REPLICA IDENTITY DEFAULT", 1, true))
      f = finding("generated column", '"boundary"."odd"."a-b" is a stored generated column')
      assert.equal("error", f.severity)
      assert.truthy(f.hint:find("#, \\, / or -", 1, true))
      f = finding("generated column", '"boundary"."genkey"."k" is a stored generated column in the primary key')
      assert.equal("error", f.severity)
      -- what migrun handles is said, with what it does
      f = finding("generated column", '"boundary"."fine"."twice" is a stored generated column')
      assert.is_true(f.ok and f.handled)
      assert.truthy(f.action:find("remove-column", 1, true))
      assert.is_true(finding("identity column", '"boundary"."fine"."id" is GENERATED ALWAYS').handled)
      assert.is_true(finding("unbounded numeric", '"boundary"."fine"."total"').handled)
      -- the target role migrun (RDS-like) may set session_replication_role, but owns nothing of boundary_owner's
      f = finding("privilege: owner boundary_owner", "migrun is not a member")
      assert.is_false(f.ok)
      assert.truthy(f.hint:find('GRANT "boundary_owner" TO "migrun"', 1, true), f.hint)
      assert.is_true(find(r, "target", "privilege: superuser").message:find("not a superuser", 1, true) ~= nil)
      assert.equal(6, r.errors)
      assert.truthy(preflight.format(r):find("hint: it is not in the WAL", 1, true))

      -- a target role without SET on session_replication_role (a plain CREATEROLE role)
      local plain = run { config = cfg, target = as(L.target, "pf_plain", "target") }
      local g
      for _, x in ipairs(plain.findings) do if x.check == "privilege: session_replication_role" then g = x end end
      assert.is_false(g.ok)
      assert.truthy(g.message:find("may not SET session_replication_role", 1, true), g.message)
      assert.truthy(g.hint:find('GRANT SET ON PARAMETER session_replication_role TO "pf_plain"', 1, true), g.hint)

      -- the source read as a role that row-level security applies to: the rows it hides would be missed
      local hidden = run { config = cfg, source = as(L.source, "pf_reader", "source") }
      local h
      for _, x in ipairs(hidden.findings) do if x.check == "row-level security" then h = x end end
      assert.truthy(h, preflight.format(hidden))
      assert.equal("error", h.severity)
      assert.truthy(h.message:find('"boundary"."secret" has row-level security (1 policy) and the role pf_reader', 1, true))
      assert.truthy(h.hint:find("BYPASSRLS", 1, true))
    end)
    assert(admin:exec("drop schema boundary cascade; drop role pf_reader; drop role boundary_owner"))
    assert(tadmin:exec("drop role boundary_owner; drop role pf_plain"))
    admin:close()
    tadmin:close()
    assert(ok, err)
  end)

  -- docs/dms-boundary.md, "arrays": DMS carries an array whole (an NCLOB, its text) when its table has a
  -- primary key; without one, or with the array in the key, DMS may lose its values: a warning naming each.
  it("says what DMS does with each array column, and warns where it may lose the values", function()
    local admin = assert(pg.connect(L.source.conninfo, { name = "admin" }))
    admin:on_notice(function() end)
    assert(admin:exec([[
      create schema catalogue;
      create type catalogue.size as enum ('S', 'M', 'L');
      create table catalogue.product (id bigint primary key, name text not null, tags text[] not null default '{}',
        sizes catalogue.size[], shelf_grid int[][], attributes jsonb[]);
      create table catalogue.price_history (product_id bigint, recorded_at timestamptz, prices numeric(10,2)[]);
      create table catalogue.tag_set (tags text[] primary key, label text);]]))
    local ok, err = pcall(function()
      local r = run { config = { slots = CONFIG.slots, preflight = CONFIG.preflight, schemas = { "catalogue" } } }
      local by = {}
      for _, f in ipairs(r.findings) do
        if f.check == "array" then by[f.table .. "." .. f.column] = f end
      end
      for _, col in ipairs{ "tags", "sizes", "shelf_grid", "attributes" } do
        local f = by["catalogue.product." .. col]
        assert.truthy(f, preflight.format(r))
        assert.is_true(f.ok and f.handled)
        assert.truthy(f.action:find("NCLOB", 1, true), f.action)
        assert.truthy(f.action:find("LobMaxSize", 1, true), f.action)
      end
      assert.truthy(by["catalogue.product.shelf_grid"].message:find('"catalogue"."product"."shelf_grid" is an array '
        .. "(integer[])", 1, true))
      local f = by["catalogue.price_history.prices"]
      assert.is_false(f.ok)
      assert.equal("warning", f.severity)
      assert.truthy(f.message:find('"catalogue"."price_history"."prices" is an array (numeric(10,2)[]) in a table '
        .. "without a primary key", 1, true), f.message)
      assert.truthy(f.hint:find("Add a primary key", 1, true), f.hint)
      f = by["catalogue.tag_set.tags"]
      assert.equal("warning", f.severity)
      assert.truthy(f.message:find("in the primary key", 1, true), f.message)
      assert.is_nil(by["catalogue.tag_set.label"])
      assert.equal(0, r.errors)
      assert.truthy(preflight.format(r):find("price_history", 1, true))
    end)
    assert(admin:exec("drop schema catalogue cascade"))
    admin:close()
    assert(ok, err)
  end)

  it("names the materialized views in one line: a warning where one has no unique index", function()
    local admin = assert(pg.connect(L.source.conninfo))
    admin:on_notice(function() end)
    assert(admin:exec([[
      create schema mvpf;
      create table mvpf.orders (id int primary key, day date not null);
      create materialized view mvpf.by_day as select day, count(*) as n from mvpf.orders group by day;
      create unique index by_day_day on mvpf.by_day (day);
      create materialized view mvpf.total as select count(*) as n from mvpf.orders;
      create materialized view mvpf.later as select * from mvpf.orders with no data]]))
    local r = run {}
    local f = find(r, "source", "materialized views")
    assert.is_false(f.ok)
    assert.equal("warning", f.severity)
    assert.truthy(f.message:find("^3 materialized view%(s%): refreshed after the load and at cutover; 1 without a "
      .. "unique index %(plain REFRESH at cutover: locks readers out, takes as long as rebuilding [%d.]+ %a+: "
      .. "mvpf.total%); 1 WITH NO DATA on the source, left unpopulated: mvpf.later$"), f.message)
    assert.truthy(f.hint:find("CONCURRENTLY", 1, true))
    assert(admin:exec("create unique index total_n on mvpf.total (n)"))
    f = find(run {}, "source", "materialized views")
    assert.is_true(f.ok)
    assert.is_true(f.note)
    assert.truthy(f.message:find("; 0 without a unique index; ", 1, true), f.message)
    assert(admin:exec("drop schema mvpf cascade"))
    admin:close()
    for _, g in ipairs(run {}.findings) do assert.not_equal("materialized views", g.check) end
  end)

  -- issue 21: a replica paused before the run can never give CDC's start position (the slots do
  -- not exist yet); one this run paused is expected
  it("refuses a replica someone else paused, with the command that resumes it", function()
    local admin = assert(pg.connect(L.replica.conninfo, { name = "admin" }))
    assert(admin:exec("select pg_wal_replay_pause()"))
    local ok, err = pcall(function()
      local host = require "migrun.host"
      local deadline = host.monotonic() + 20
      while assert(admin:exec("select pg_get_wal_replay_pause_state() as s"))[1].s ~= "paused" do
        assert(host.monotonic() < deadline, "the replica did not pause")
        host.sleep(0.05)
      end
      local f = find(run {}, "replica", "replay")
      assert.is_false(f.ok)
      assert.equal("error", f.severity)
      assert.truthy(f.message:find("^replay is paused at [%x/]+, and this run did not pause it: CDC must start after "
        .. "migrun's slots are created"), f.message)
      assert.truthy(f.hint:find("psql -h 127.0.0.1 -p " .. L.replica.port .. " -U postgres -d app -c "
        .. "'select pg_wal_replay_resume()'", 1, true), f.hint)
      for _, args in ipairs{ { replica_pause_expected = true }, { resuming = true } } do
        for _, g in ipairs(run(args).findings) do assert.not_equal("replay", g.check) end
      end
      -- resuming, but the pause step has not begun: someone else's pause all the same
      assert.is_false(find(run { resuming = true, replica_pause_expected = false }, "replica", "replay").ok)
    end)
    assert(admin:exec("select pg_wal_replay_resume()"))
    admin:close()
    assert(ok, err)
  end)

  it("shows errors and warnings first, and folds what migrun handles into one line per kind", function()
    local function handled(t) return { server = "source", check = "foreign key", ok = true, handled = true,
      table = t, message = "foreign key of " .. t, action = "not checked in DMS's replica sessions" } end
    local r = { errors = 1, warnings = 1, handled = 6, findings = {
      { server = "source", check = "version", ok = true, message = "PostgreSQL 15" },
      handled("public.a"), handled("public.b"), handled("public.c"), handled("public.d"), handled("public.e"),
      { server = "source", check = "trigger", ok = true, handled = true, table = "public.t", message = "trigger x",
        action = "does not fire" },
      { server = "target", check = "empty", ok = false, severity = "warning", message = "rows already" },
      { server = "source", check = "wal_level", ok = false, severity = "error", message = "replica", hint = "set it" },
    } }
    local out = preflight.format(r)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.matches("^source%s+wal_level%s+ERROR", lines[3])
    assert.matches("hint: set it", lines[4])
    assert.matches("^target%s+empty%s+warning", lines[5])
    assert.matches("^source%s+version%s+ok", lines[6])
    -- five foreign keys: one line, four named; one trigger: its own line
    assert.matches("^source%s+foreign key%s+handled%s+5 of them: public.a, public.b, public.c, public.d, and 1 more",
      lines[7])
    assert.matches("migrun: not checked in DMS's replica sessions", lines[8])
    assert.matches("^source%s+trigger%s+handled%s+trigger x", lines[9])
    assert.is_nil(out:find("foreign key of public.b", 1, true))
    -- the report keeps every one
    assert.equal(9, #preflight.report_rows(r))
  end)

  it("raises on misuse", function()
    assert.has_error(function() preflight.run{ source = src, replica = rep } end,
      "preflight.run: target (a migrun.db Db) expected")
  end)
end)
