-- Issue 21: every configuration mistake that can be found before the first
-- write is found there (docs/mistakes.md is the table of them). One
-- rehearsal (lab, DMS emulator, the demo's tables) for every case: each is
-- refused with its message checked, and nothing is written anywhere: no
-- slot, replication set or pglogical node on the source, no table or schema
-- on the target beyond the lab's, no DMS endpoint or task (the emulator is
-- asked). preflight.run is called directly where that is enough (its Dbs are
-- dry-run Dbs that record any write: there must be none); full.lua is run as
-- a team runs it for the cases that must stop the playbook itself.
-- The config-time checks are unit tests: tests/spec/config_spec.lua.
local H = require "helpers.rehearsal"
local demo = require "migrun.rehearsal.demo"
local host = require "migrun.host"
local pg = require "migrun.pg"
local db = require "migrun.db"
local config = require "migrun.playbook.config"
local preflight = require "migrun.preflight"
local walkeep = require "migrun.walkeep"

local GiB = 2 ^ 30

describe("configuration mistakes (docs/mistakes.md)", function()
  local R, pristine
  local writes = {}

  local function copy(v)
    if type(v) ~= "table" then return v end
    local t = {}
    for k, x in pairs(v) do t[k] = copy(x) end
    return t
  end

  local function psql(cluster, sql, opts) return assert(R.lab[cluster]:psql(sql, opts)) end

  -- Everything migrun could have written, on the three servers and DMS.
  local function world()
    local w = H.world(R)
    w.source_schemas = psql("source", "select string_agg(nspname, ',' order by nspname) from pg_namespace")
    w.source_tables = psql("source", "select string_agg(relname, ',' order by relname) from pg_class"
      .. " where relkind = 'r' and relnamespace = 'public'::regnamespace")
    w.target_schemas = psql("target", "select string_agg(nspname, ',' order by nspname) from pg_namespace")
    local client = assert(R.lab:dms_client())
    w.endpoints = #assert(client:describe_endpoints())
    w.tasks = #assert(client:describe_replication_tasks())
    return w
  end

  setup(function()
    R = H.rehearsal("mistakes", { scale = 0.05, config = { preflight = { min_free_bytes = 64 * 1024 * 1024,
      wal_rate_seconds = 1 } } })
    pristine = world()
  end)

  teardown(function()
    if R then R:close() end
  end)

  after_each(function()
    assert.same({}, writes)
    assert.same(pristine, world())
  end)

  -- preflight.run on the rehearsal's config changed by `change`, through dry-run Dbs.
  local function run(change, opts)
    opts = opts or {}
    local raw = copy(R.config)
    if change then change(raw) end
    local cfg = assert(config.check(raw, "mistakes.lua", R.dir))
    local conns = {}
    local function wrap(conninfo, name)
      local c = assert(pg.connect(conninfo, { name = name }))
      conns[#conns + 1] = c
      return db.wrap(c, { dry_run = true, echo = function(line) writes[#writes + 1] = line end })
    end
    local ok, r = pcall(preflight.run, { source = wrap(cfg.source.conninfo, "source"),
      replica = wrap(cfg.replica.conninfo, "replica"), target = wrap(cfg.target.conninfo, "target"),
      config = cfg, dms = opts.dms or function()
        return assert(R.lab:dms_client{ region = cfg.dms.region, endpoint_url = cfg.dms.endpoint_url,
          max_attempts = cfg.dms.max_attempts })
      end })
    for _, c in ipairs(conns) do c:close() end
    assert(ok, r)
    return r
  end

  -- The failed finding of server/check whose message matches pattern (plain text).
  local function refused(r, server, check, text, severity)
    for _, f in ipairs(r.findings) do
      if not f.ok and f.server == server and f.check == check and f.message:find(text, 1, true) then
        assert.equal(severity or "error", f.severity, f.message)
        if (severity or "error") == "error" then assert.is_true(r.errors >= 1) end
        assert.truthy(f.hint and #f.hint > 0, "no hint for: " .. f.message)
        return f
      end
    end
    error(("no failed %s/%s finding with %q in:\n%s"):format(server, check, text, preflight.format(r)))
  end

  local function no_finding(r, check)
    for _, f in ipairs(r.findings) do assert.not_equal(check, f.check, preflight.format(r)) end
  end

  it("passes the rehearsal's own config without an error", function()
    local r = run()
    assert.equal(0, r.errors, preflight.format(r))
    local found
    for _, f in ipairs(r.findings) do
      if f.check == "names in the config" then found = f end
    end
    assert.truthy(found and found.ok, preflight.format(r))
  end)

  describe("the target is the source or the replica", function()
    it("refuses the source given as the target, and gives none of the target's advice", function()
      local r = run(function(c) c.target = c.source end)
      local f = refused(r, "target", "not the source", "the target IS the source: the same server (system identifier ")
      assert.truthy(f.message:find("DMS would replicate the source into itself", 1, true), f.message)
      assert.truthy(f.hint:find("target.conninfo", 1, true))
      no_finding(r, "empty") -- "truncate them on the target" would be advice to truncate the source
    end)

    it("refuses another database of the source's server as the target", function()
      local r = run(function(c) c.target = { conninfo = c.source.conninfo:gsub("dbname=app", "dbname=postgres") } end)
      refused(r, "target", "not the source", "the target database postgres is on the source's server")
    end)

    it("refuses the replica given as the target", function()
      local r = run(function(c) c.target = c.replica end)
      refused(r, "target", "not the source", "the target is the maintenance replica")
    end)
  end)

  describe("what PostgreSQL lets the slots keep", function()
    -- A reload reaches the postmaster and each backend when they next look:
    -- wait until a new session (and conn, a session already open) sees it.
    local function set_keep(value, conn)
      psql("source", ("alter system set max_slot_wal_keep_size = '%s'"):format(value))
      psql("source", "select pg_reload_conf()")
      local host = require "migrun.host"
      local deadline = host.monotonic() + 10
      local function sees(v) return v == value end -- as given: '1MB', '4GB', '-1'
      while not sees(psql("source", "show max_slot_wal_keep_size")) and host.monotonic() < deadline do
        host.sleep(0.05)
      end
      while conn and host.monotonic() < deadline do
        local res = assert(conn:exec("show max_slot_wal_keep_size"))
        if sees(res[1].max_slot_wal_keep_size) then break end
        host.sleep(0.05)
      end
    end

    it("refuses a max_slot_wal_keep_size below what the load needs, and one the guard would stop after", function()
      local ok, err = pcall(function()
        set_keep("1MB")
        local r = run()
        local f = refused(r, "source", "max_slot_wal_keep_size", "max_slot_wal_keep_size = 1 MB: PostgreSQL "
          .. "invalidates a slot that holds more WAL (wal_status 'lost')")
        assert.truthy(f.message:find("Too small: the slots hold WAL for at least 1 h 00 min", 1, true), f.message)
        assert.truthy(f.message:find("of WAL measured over %d+ s, at least 1%.0 GiB assumed"), f.message)
        assert.truthy(f.hint:find("ALTER SYSTEM SET max_slot_wal_keep_size = -1; SELECT pg_reload_conf()", 1, true))
        set_keep("2GB")
        r = run()
        f = refused(r, "source", "max_slot_wal_keep_size", "wal_guard.stop_bytes (200.0 GiB) is not below it")
        assert.truthy(f.hint:find("set wal_guard.stop_bytes below it (say 1.6 GiB)", 1, true), f.hint)
        -- enough, the guard below it: said, not refused
        r = run(function(c) c.wal_guard.stop_bytes = 1.5 * GiB c.wal_guard.warn_bytes = GiB end)
        refused(r, "source", "max_slot_wal_keep_size", "Enough by the estimate", "warning")
        assert.equal(0, r.errors, preflight.format(r))
      end)
      set_keep("-1")
      assert(ok, err)
    end)

    it("measures the WAL rate while the other checks run, and sizes the need by the load", function()
      local src = assert(pg.connect(R.lab.source.conninfo, { name = "source" }))
      local w = assert(walkeep.start(db.wrap(src)))
      assert.is_nil(w.first) -- -1: nothing to measure, nothing waited for
      set_keep("4GB", src)
      local ok, err = pcall(function()
        w = assert(walkeep.start(db.wrap(src)))
        assert.truthy(w.first)
        -- some 40 MB of WAL while "the other checks run"
        psql("source", "create table wal_burst as select g, md5(g::text) as m from generate_series(1, 400000) g; "
          .. "drop table wal_burst")
        local findings = walkeep.finish(w, { seconds = 0.5, data_bytes = 10 * GiB, load_rate = 1024 * 1024,
          stop_bytes = GiB })
        local f = findings[1]
        assert.is_false(f.ok)
        assert.equal("error", f.severity)
        assert.truthy(f.message:find("Too small: the slots hold WAL for about 5 h 41 min (the load of 10.0 GiB at "
          .. "1.0 MiB/s, twice over", 1, true), f.message)
        local rate = f.message:match("([%d.]+ %a+)/s of WAL measured over [%d.]+ s, about [%d.]+ %a+ at that rate")
        assert.truthy(rate, f.message)
        assert.truthy(rate:find("MiB", 1, true), f.message)
      end)
      src:close()
      set_keep("-1")
      assert(ok, err)
    end)
  end)

  describe("what the config names", function()
    it("refuses a schema that does not exist, with the nearest one, and a system schema", function()
      local r = run(function(c) c.schemas = { "pubilc" } end)
      refused(r, "source", "schemas", "schemas[1] = pubilc: no such schema on the source (did you mean public?)")
      r = run(function(c) c.schemas = { "public", "pg_catalog" } end)
      refused(r, "source", "schemas", "schemas[2] = pg_catalog is a system schema")
    end)

    it("refuses a schema whose name holds a dot, unless the config leaves it out", function()
      assert(R.lab.source:psql('create schema "odd.name"; create table "odd.name".t (id int primary key)'))
      finally(function() assert(R.lab.source:psql('drop schema "odd.name" cascade')) end)
      -- the documented default: every schema
      local r = run(function(c) c.schemas = nil end)
      refused(r, "source", "schemas", 'schema "odd.name" holds a dot in its name')
      r = run(function(c) c.schemas = { "public" } end)
      for _, f in ipairs(r.findings) do assert.is_nil(f.message:find("holds a dot", 1, true), f.message) end
    end)

    it("refuses an excluded table that does not exist: the one meant would be migrated", function()
      local r = run(function(c) c.exclude_tables = { "public.documnets" } end)
      refused(r, "source", "exclude_tables", "exclude_tables[1] = public.documnets: no such table on the source "
        .. "(did you mean public.documents?): the table meant to be left out would be migrated")
    end)

    it("refuses an explicit group's table that is not to be migrated: missing, partitioned, a view", function()
      psql("source", "create table public.metrics (id int, at date not null, primary key (id, at)) partition by range (at);"
        .. " create table public.metrics_2026 partition of public.metrics for values from ('2026-01-01') to ('2027-01-01');"
        .. " create view public.recent_calls as select * from public.calls")
      local ok, err = pcall(function()
        local r = run(function(c)
          c.groups.explicit = { { name = "billing", tables = { "public.acounts", "public.metrics", "public.recent_calls" } } }
        end)
        refused(r, "source", "explicit groups", "public.acounts (group billing) is not among the tables to migrate: "
          .. "no such table on the source (did you mean public.accounts?)")
        refused(r, "source", "explicit groups", "public.metrics (group billing) is not among the tables to migrate: "
          .. "it is partitioned: its partitions replicate by their own names (public.metrics_2026): name them")
        refused(r, "source", "explicit groups", "public.recent_calls (group billing) is not among the tables to "
          .. "migrate: it is a view, not a table")
      end)
      psql("source", "drop view public.recent_calls; drop table public.metrics")
      assert(ok, err)
    end)

    it("refuses a LOB policy for a table that is not migrated: its protection would be dropped", function()
      local r = run(function(c) c.lobs.tables = { ["public.document"] = { max_kb = 64, truncation_ok = false } } end)
      refused(r, "source", "LOB policy", 'lobs.tables["public.document"] is not among the tables to migrate: no such '
        .. "table on the source (did you mean public.documents?); its policy (truncation_ok = false's protection "
        .. "included) would apply to nothing")
    end)

    it("refuses batch apply forced where DMS refuses it", function()
      local r = run(function(c) c.dms.task = { batch_apply = true } end)
      local f = refused(r, "source", "batch apply", "dms.task.batch_apply = true, but DMS refuses batch apply for 2 "
        .. "table(s): ")
      assert.truthy(f.message:find("public.accounts (a primary key and a separate unique constraint)", 1, true))
      assert.truthy(f.message:find("public.documents (full LOB mode: truncation_ok = false)", 1, true))
      assert.truthy(f.message:find("the groups step would stop once the schema is restored", 1, true))
    end)

    it("refuses a QA timestamp column that is not there, or not a date", function()
      local r = run(function(c) c.qa.timestamp_columns = { ["public.events"] = "creatd_at", ["public.calls"] = "caller",
        ["public.evnts"] = "created_at" } end)
      refused(r, "source", "QA timestamp column", 'qa.timestamp_columns["public.events"] = creatd_at: public.events '
        .. "has no column creatd_at (did you mean created_at?)")
      refused(r, "source", "QA timestamp column", 'qa.timestamp_columns["public.calls"] = caller: the column is of '
        .. "type text: the per-month counts need a date or a timestamp")
      refused(r, "source", "QA timestamp column", "public.evnts is not among the tables to migrate: no such table "
        .. "on the source (did you mean public.events?)")
    end)

    it("refuses a count_only table that is not migrated", function()
      local r = run(function(c) c.cutover.count_only = { "public.page_view" } end)
      refused(r, "source", "count_only", "cutover.count_only[1] = public.page_view is not among the tables to "
        .. "migrate: no such table on the source (did you mean public.page_views?)")
    end)
  end)

  describe("qa.queries", function()
    local function query(sql, change)
      return run(function(c)
        c.qa.queries = { { name = "q", sql = sql } }
        if change then change(c) end
      end)
    end

    it("runs a read-only one on the replica and says so", function()
      local r = query("select count(*) from public.documents;  -- all of them\n")
      local f
      for _, x in ipairs(r.findings) do if x.check == "QA query" then f = x end end
      assert.truthy(f and f.ok, preflight.format(r))
      assert.equal("replica", f.server)
      assert.equal("qa.queries[1] (q) is read-only: it ran in a read-only transaction", f.message)
    end)

    it("refuses DML, a second statement, FOR UPDATE, a missing table", function()
      refused(query("delete from public.documents where false"), "replica", "QA query",
        'qa.queries[1] (q) is not one read-only query: syntax error at or near "from"')
      refused(query("select 1; drop table public.documents"), "replica", "QA query",
        'qa.queries[1] (q) is not one read-only query: syntax error at or near ";"')
      refused(query("select 1) q; drop table public.documents; select * from (select 1"), "replica", "QA query",
        "qa.queries[1] (q) is not one read-only query: ")
      refused(query("with d as (delete from public.documents returning *) select count(*) from d"), "replica",
        "QA query", "WITH clause containing a data-modifying statement must be at the top level")
      refused(query("select * from public.documents for update"), "replica", "QA query",
        "qa.queries[1] (q) writes or locks rows (its plan has LockRows)")
      refused(query("select count(*) from public.nope"), "replica", "QA query",
        'qa.queries[1] (q) is not one read-only query: relation "public.nope" does not exist')
    end)

    it("refuses a query whose function writes, found by running it read-only", function()
      psql("source", "create function public.bump() returns int language sql volatile as "
        .. "$$ insert into public.page_views (url) values ('/bump') returning 1 $$")
      local ok, err = pcall(function()
        local deadline = host.monotonic() + 30
        while psql("replica", "select count(*) from pg_proc where proname = 'bump'") ~= "1" do
          assert(host.monotonic() < deadline, "the function did not reach the replica")
          host.sleep(0.1)
        end
        refused(query("select public.bump()"), "replica", "QA query",
          "qa.queries[1] (q) writes: cannot execute INSERT in a read-only transaction")
      end)
      psql("source", "drop function public.bump()")
      assert(ok, err)
    end)

    it("judges a slow one by its plan, and says so", function()
      local r = query("select pg_sleep(5)", function(c) c.preflight.query_timeout = 0.3 end)
      local f
      for _, x in ipairs(r.findings) do if x.check == "QA query" then f = x end end
      assert.truthy(f and f.ok, preflight.format(r))
      assert.truthy(f.message:find("took longer than 0.3 s here: judged by its plan, which writes nothing", 1, true),
        f.message)
    end)
  end)

  describe("commands and webhooks", function()
    it("refuses a notify command or a stop_writes command that is not there", function()
      local r = run(function(c)
        c.notify = { command = { "/nonexistent/post-to-chat", "--channel", "db" } }
        c.cutover.stop_writes = { "no-such-stop-writes-program", "app" }
      end)
      refused(r, "migrun", "notify.command", "notify.command: no executable /nonexistent/post-to-chat there: the "
        .. "notifications would fail when the first event fires")
      refused(r, "migrun", "cutover.stop_writes", "cutover.stop_writes: no executable no-such-stop-writes-program in "
        .. "PATH: the cutover would fail in its window")
      r = run(function(c) c.notify = { command = { "true" } } end)
      for _, f in ipairs(r.findings) do
        if f.check == "notify.command" then assert.truthy(f.ok and f.message:find("^true: /"), f.message) end
      end
    end)

    it("warns of a webhook over plain http to another machine, without calling it", function()
      local r = run(function(c) c.notify = { webhook = "http://hooks.example.com/services/T0/B0/s3cret" } end)
      local f = refused(r, "migrun", "notify.webhook", "the webhook is plain http to hooks.example.com", "warning")
      assert.falsy(f.message:find("s3cret", 1, true))
    end)
  end)

  describe("DMS", function()
    it("says within seconds that DMS is unreachable, whatever dms.max_attempts", function()
      local started = host.monotonic()
      local r = run(function(c)
        c.dms.endpoint_url = "http://127.0.0.1:9" -- discard: nothing listens
        c.dms.max_attempts = 10
      end)
      local elapsed = host.monotonic() - started
      local f = refused(r, "dms", "reachable", "http://127.0.0.1:9: ")
      assert.truthy(f.message:find("(2 tries in", 1, true), f.message)
      -- the run's client would have retried 10 times with backoff (54 s in the issue)
      assert.is_true(elapsed < 10, ("preflight took %.1f s"):format(elapsed))
    end)

    it("blames the region, not the access key, for a region mismatch", function()
      local r = run(function(c) c.dms.region = "eu-west-1" end)
      local f = refused(r, "dms", "region", "region eu-west-1 (from dms.region), but the replication instance is in "
        .. "us-east-1 (its ARN)")
      assert.truthy(f.hint:find('set dms.region = "us-east-1"', 1, true))
      -- the ARN and the region agree, the endpoint serves another region: its signature is refused
      r = run(function(c)
        c.dms.region = "eu-west-1"
        c.dms.replication_instance_arn = c.dms.replication_instance_arn:gsub("us%-east%-1", "eu-west-1")
      end)
      f = refused(r, "dms", "region", "Credential should be scoped to a valid region")
      assert.truthy(f.hint:find("set dms.region (or AWS_REGION) to the replication instance's region", 1, true))
      assert.falsy(preflight.format(r):find("access key", 1, true), preflight.format(r))
    end)

    it("refuses a source DMS could not log in to: no password", function()
      local r = run(function(c) c.source = { conninfo = R.lab.source.conninfo } end) -- the lab's trusted superuser
      refused(r, "dms", "source endpoint", "libpq logged in to the source without a password (trust or peer "
        .. "authentication?): DMS logs in as migrun did and needs one")
    end)
  end)

  it("refuses more load streams than the target has connections for", function()
    local r = run(function(c) c.full_load.jobs = 1000 end)
    refused(r, "target", "connections",
      "the load needs 1003 (full_load.jobs 1000, one hashing as it loads, and migrun's own)")
  end)

  -- The playbook itself: refused before its first write, the DMS emulator untouched.
  describe("full.lua", function()
    local function with_config(change, name)
      local cfg = copy(R.config)
      change(cfg)
      cfg.state_dir = R.dir .. "/state-" .. name
      local path = R.dir .. "/" .. name .. ".lua"
      assert(host.write_file(path, "return " .. demo.literal(cfg) .. "\n"))
      return setmetatable({ config_path = path, config = cfg }, { __index = R })
    end

    local function stops(change, name, pattern, code)
      local r = H.run(with_config(change, name), "full.lua", { "--yes" })
      assert.is_nil(r.ok, r.output)
      assert.equal(code or 1, r.code, r.output)
      assert.truthy(r.output:find(pattern), "expected /" .. pattern .. "/ in:\n" .. r.output)
      return r
    end

    it("stops at config time, before connecting: a LOB size DMS refuses, a slot name, a table in two groups",
      function()
        stops(function(c) c.lobs.default = { max_kb = 204800 } end, "lob-size",
          "lobs%.default%.max_kb: expected a whole number of KB from 1 to 102400", 2)
        stops(function(c) c.slots = { prefix = "dms_slot_01; drop table x" } end, "slot-name",
          "slots%.prefix: expected lower%-case letters, digits and _ only", 2)
        stops(function(c)
          c.groups.explicit = { { name = "a", tables = { "public.calls" } }, { name = "b", tables = { "public.calls" } } }
        end, "two-groups", 'public%.calls is already in group "a"', 2)
      end)

    it("stops at preflight: the target is the source", function()
      stops(function(c) c.target = c.source end, "target-is-source", "the target IS the source")
    end)

    it("stops at preflight: a replica someone paused, with the command that resumes it", function()
      psql("replica", "select pg_wal_replay_pause()")
      local ok, err = pcall(function()
        local deadline = host.monotonic() + 20
        while psql("replica", "select pg_get_wal_replay_pause_state()") ~= "paused" do
          assert(host.monotonic() < deadline, "the replica did not pause")
          host.sleep(0.05)
        end
        local r = stops(function() end, "paused-replica", "replay is paused at [%x/]+, and this run did not pause it")
        assert.truthy(r.output:find("select pg_wal_replay_resume()", 1, true), r.output)
      end)
      psql("replica", "select pg_wal_replay_resume()")
      assert(ok, err)
    end)

    it("stops at preflight: a max_slot_wal_keep_size that would lose the slots", function()
      psql("source", "alter system set max_slot_wal_keep_size = '1MB'; select pg_reload_conf()")
      local ok, err = pcall(stops, function() end, "keep-size", "max_slot_wal_keep_size = 1 MB")
      psql("source", "alter system reset max_slot_wal_keep_size; select pg_reload_conf()")
      assert(ok, err)
    end)

    it("stops at preflight: a QA query that writes, an excluded table misspelt, DMS unreachable", function()
      local r = stops(function(c)
        c.qa.queries = { { name = "cleanup", sql = "select * from public.documents for update" } }
        c.exclude_tables = { "public.sesions" }
        c.dms.endpoint_url = "http://127.0.0.1:9"
      end, "several", "qa%.queries%[1%] %(cleanup%) writes or locks rows")
      assert.truthy(r.output:find("did you mean public.sessions?", 1, true), r.output)
      assert.truthy(r.output:find("dms%s+reachable%s+ERROR%s+http://127%.0%.0%.1:9"), r.output)
    end)
  end)
end)
