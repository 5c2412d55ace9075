-- migrun.cutover on a real lab: stopping writes (read-only database, the
-- sessions opened before waited for or terminated, the team's command),
-- sequences set ahead on the target, and the checklist. Dry runs change
-- nothing. (Waiting for the tasks to apply: fence_spec.lua.)
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local aws = require "migrun.aws"
local cutover = require "migrun.cutover"

describe("migrun.cutover", function()
  local L, source, target

  local function migrun_db(cluster, name, opts)
    return db.wrap(assert(pg.connect(cluster.migrun_conninfo .. " passfile=" .. L.passfile, { name = name })), opts)
  end
  -- An application's session: another role than migrun's, its own application_name.
  local function app_session(name)
    return assert(pg.connect(L.source.conninfo .. " application_name=" .. (name or "app"), { name = name or "app" }))
  end
  local function read_write_again()
    assert(source.conn:exec(("alter database %s reset default_transaction_read_only"):format(pg.quote_ident(L.source.dbname))))
  end

  setup(function()
    L = assert(lab.start{})
    source = migrun_db(L.source, "source")
    target = migrun_db(L.target, "target")
  end)
  teardown(function()
    if source then source:close() end
    if target then target:close() end
    if L then L:stop() end
  end)

  describe("stop_writes", function()
    after_each(read_write_again)

    it("none does nothing", function()
      local s = assert(cutover.stop_writes(source, { stop_writes = "none" }))
      assert.equal("none", s.mode)
      assert.is_false((cutover.is_read_only(source)))
    end)

    it("read_only with terminate: new sessions are read-only, the application's old ones are gone, migrun's stay", function()
      local app = app_session("app")
      assert(app:exec("create table if not exists public.cut_t (id int)"))
      assert(app:exec("insert into public.cut_t values (1)"))
      local dms_like = migrun_db(L.source, "dms") -- migrun's role: DMS connects with it too
      local lines = {}
      local s = assert(cutover.stop_writes(source, { stop_writes = "read_only", existing_sessions = "terminate",
        sessions_timeout = 10, sleep = aws.sleep, poll = 0.1, say = function(l) lines[#lines + 1] = l end }))
      assert.equal("read_only", s.mode)
      assert.equal(L.source.dbname, s.database)
      assert.same({ app:backend_pid() }, s.terminated)
      assert.is_true(assert(cutover.is_read_only(source)))
      assert.truthy(table.concat(lines, "\n"):find("app", 1, true))
      -- the old session was terminated
      local ok = app:exec("select 1")
      assert.is_nil(ok)
      app:close()
      -- a new session cannot write
      local fresh = app_session("app2")
      local res, err = fresh:exec("insert into public.cut_t values (2)")
      assert.is_nil(res)
      assert.equal("25006", err.sqlstate)
      fresh:close()
      -- migrun's role was left alone
      assert(dms_like:query("select 1"))
      dms_like:close()
      -- a closed session's backend exits a moment after PQfinish: give it that moment
      local left
      for _ = 1, 50 do
        left = assert(cutover.sessions(source))
        if #left == 0 then break end
        aws.sleep(0.1)
      end
      assert.same({}, left)
      -- the checklist's way back works from a session that starts read-only
      local cl = cutover.checklist{ database = L.source.dbname, stop_writes = "read_only", tasks = {} }
      local back = app_session("rollback")
      local ok_back, err_back = back:exec(cl.rollback[1][2])
      back:close()
      assert(ok_back, err_back)
      assert.is_false((cutover.is_read_only(source)))
    end)

    it("read_only with wait gives up after the timeout, naming the sessions still there", function()
      local app = app_session("billing-worker")
      local t0 = aws.monotonic()
      local s, err = cutover.stop_writes(source, { stop_writes = "read_only", existing_sessions = "wait",
        sessions_timeout = 0.5, poll = 0.1, sleep = aws.sleep })
      assert.is_nil(s)
      assert.is_true(aws.monotonic() - t0 >= 0.5)
      assert.equal("cutover", err.kind)
      assert.truthy(tostring(err):find("billing-worker", 1, true), tostring(err))
      assert.truthy(err.hint:find("terminate", 1, true))
      -- it was not terminated
      assert(app:exec("select 1"))
      app:close()
    end)

    it("read_only with wait returns once the old sessions have ended", function()
      local app = app_session("short-lived")
      local closed = false
      local s = assert(cutover.stop_writes(source, { stop_writes = "read_only", existing_sessions = "wait",
        sessions_timeout = 10, poll = 0.1,
        sleep = function(t) if not closed then app:close() closed = true end aws.sleep(t) end }))
      assert.is_true(closed)
      assert.same({}, s.terminated)
    end)

    it("a dry run shows the ALTER DATABASE and the terminations and changes nothing", function()
      local app = app_session("app")
      local shown = {}
      local dry = db.wrap(source.conn, { dry_run = true, echo = function(l) shown[#shown + 1] = l end })
      local s = assert(cutover.stop_writes(dry, { stop_writes = "read_only", existing_sessions = "terminate",
        sleep = function() error("a dry run waited") end }))
      assert.truthy(table.concat(s.terminated, ","):find(tostring(app:backend_pid()), 1, true))
      local text = table.concat(shown, "\n")
      assert.truthy(text:find("default_transaction_read_only = on", 1, true), text)
      assert.truthy(text:find("pg_terminate_backend", 1, true), text)
      assert.is_false((cutover.is_read_only(source)))
      assert(app:exec("select 1"))
      app:close()
    end)

    it("runs the team's command, and stops on its failure", function()
      local seen
      local s = assert(cutover.stop_writes(source, { stop_writes = { "true", "--stop" },
        run_command = function(argv) seen = argv return require("migrun.proc").run(argv) end }))
      assert.equal("command", s.mode)
      assert.same({ "true", "--stop" }, { seen[1], seen[2] })
      local f, err = cutover.stop_writes(source, { stop_writes = { "false" },
        run_command = function(argv) return require("migrun.proc").run(argv) end })
      assert.is_nil(f)
      assert.truthy(tostring(err):find("stop-writes command failed", 1, true), tostring(err))
    end)

    it("refuses an unknown mode", function()
      assert.has_error(function() cutover.stop_writes(source, { stop_writes = "readonly" }) end)
    end)
  end)

  describe("wait_applied", function()
    -- the fence itself, with DMS tasks applying it: tests/spec/fence_spec.lua
    it("is migrun.cdc's fence wait; a missing slot is an error at once", function()
      assert.equal(require("migrun.cdc").wait_applied, cutover.wait_applied)
      local w, err = cutover.wait_applied(source, target, { "no_such_slot" },
        { timeout = 10, sleep = function() error("waited") end })
      assert.is_nil(w)
      assert.truthy(tostring(err):find("no_such_slot", 1, true))
    end)
  end)

  describe("sequences", function()
    local DDL = [[
      create schema cs;
      create table cs.orders (id bigserial primary key, v text);
      create table cs.items (id int generated always as identity primary key, v text);
      create sequence cs.invoice_no start 5000;
      create sequence cs.countdown increment -1 start 100 maxvalue 100 minvalue -10000;
      create sequence cs.near_max maxvalue 1100;
      create sequence cs.unused start 7;
      create table cs.skipped (id serial primary key);
    ]]
    setup(function()
      assert(source.conn:exec(DDL))
      assert(target.conn:exec(DDL))
      assert(target.conn:exec("drop table cs.skipped; drop sequence cs.invoice_no"))
      assert(source.conn:exec([[
        insert into cs.orders (v) select 'x' from generate_series(1, 42);
        insert into cs.items (v) select 'y' from generate_series(1, 17);
        select nextval('cs.invoice_no') from generate_series(1, 3);
        select nextval('cs.countdown') from generate_series(1, 5);
        select setval('cs.near_max', 1050);
        insert into cs.skipped default values;
      ]]))
    end)

    local function target_last(name)
      local r = assert(target.conn:exec("select last_value from pg_sequences where schemaname = 'cs' and sequencename = $1", name))
      return r[1].last_value
    end

    it("lists the source's sequences with their owners, identity ones included, excluded tables' left out", function()
      local list = assert(cutover.sequences(source, { schemas = { "cs" }, exclude_tables = { "cs.skipped" } }))
      local by = {}
      for _, s in ipairs(list) do by[s.name] = s end
      assert.is_nil(by.skipped_id_seq)
      assert.equal(42, by.orders_id_seq.last_value)
      assert.equal("cs.orders.id", by.orders_id_seq.owned_by)
      assert.is_false(by.orders_id_seq.identity)
      assert.equal(17, by.items_id_seq.last_value)
      assert.is_true(by.items_id_seq.identity)
      assert.is_nil(by.unused.last_value)
      assert.equal(-1, by.countdown.increment)
      assert.same({}, assert(cutover.sequences(source, { schemas = { "no_such_schema" } })))
    end)

    it("sets the target's ahead by the margin, within bounds, never backwards; a dry run changes nothing", function()
      local opts = { schemas = { "cs" }, exclude_tables = { "cs.skipped" }, margin = 1000 }
      local shown = {}
      local dry = assert(cutover.sync_sequences(source, db.wrap(target.conn, { dry_run = true,
        echo = function(l) shown[#shown + 1] = l end }), opts))
      assert.equal(5, dry.set)
      assert.truthy(table.concat(shown, "\n"):find("setval", 1, true))
      assert.equal(pg.null, target_last("orders_id_seq"))

      local r = assert(cutover.sync_sequences(source, target, opts))
      assert.same({ "cs.invoice_no" }, r.missing)
      assert.equal(5, r.set)
      assert.equal(1042, target_last("orders_id_seq"))
      assert.equal(1017, target_last("items_id_seq"))
      assert.equal(96 - 1000, target_last("countdown"))
      assert.equal(1100, target_last("near_max"))          -- clamped to maxvalue
      assert.equal(1007, target_last("unused"))            -- never used: from its start
      -- the application's next ids on the target are past the source's
      assert.equal(1043, assert(target.conn:exec("select nextval('cs.orders_id_seq') as n"))[1].n)
      assert(target.conn:exec("insert into cs.items (v) values ('z')"))
      assert.equal(1018, assert(target.conn:exec("select max(id) as n from cs.items"))[1].n)

      -- run again: nothing moves backwards
      local again = assert(cutover.sync_sequences(source, target, opts))
      assert.equal(0, again.set)
      for _, row in ipairs(again.rows) do assert.equal("already ahead", row.action, row.sequence) end
      assert.equal(1043, target_last("orders_id_seq"))
    end)
  end)

  describe("refusals, the window and the checklist", function()
    it("says what was done before a refusal, and how to give the source back", function()
      local cl = cutover.checklist{ database = "app", stop_writes = "read_only", tasks = {} }
      local before = cutover.refusal("1 table(s) differ", {}, cl)
      assert.equal("refusing to cut over: 1 table(s) differ; so far the DMS tasks still run", before)
      local after = cutover.refusal("1 table(s) differ", { stop_writes = "read_only", sequences = true }, cl)
      assert.truthy(after:find("so far the source database is read-only (default_transaction_read_only), the "
        .. "target's sequences were set ahead of the source's (harmless), the DMS tasks still run", 1, true), after)
      assert.truthy(after:find('To let the application write to the source again: BEGIN READ WRITE; ALTER DATABASE '
        .. '"app" RESET default_transaction_read_only; COMMIT;', 1, true), after)
      local cmd = cutover.refusal("x", { stop_writes = { "/usr/local/bin/app-stop", "--now" }, tasks_stopped = true },
        cutover.checklist{ database = "app", stop_writes = { "/usr/local/bin/app-stop", "--now" }, tasks = {} })
      assert.truthy(cmd:find("the team's stop-writes command ran (/usr/local/bin/app-stop --now), the DMS tasks "
        .. "are stopped", 1, true), cmd)
    end)

    it("states the window from its clock marks, step by step", function()
      local records = { stop_writes = { duration = 0.5 }, wait_applied = { duration = 1.25 },
                        restore_target = { duration = 0.25 } }
      local w = cutover.window(records, { "stop_writes", "wait_applied", "verify", "restore_target" }, 100, 102.5)
      assert.equal(2.5, w.seconds) -- wall, between the marks
      assert.equal(2.0, w.steps)
      assert.same({ { "stop_writes", 0.5 }, { "wait_applied", 1.25 }, { "verify", 0 }, { "restore_target", 0.25 } }, w.rows)
      assert.equal(2.0, cutover.window(records, { "stop_writes", "wait_applied", "restore_target" }).seconds)
      assert.matches("^the cutover window: 2%.5 s from the source made read%-only to the target ready for writes "
        .. "%(stop_writes 0%.5 s, wait_applied 1%.2 s, verify 0%.0 s, restore_target 0%.2 s%)$", cutover.format_window(w))
    end)

    it("gives the steps and the exact commands to roll back", function()
      local cl = cutover.checklist{ database = "app", stop_writes = "read_only", region = "eu-west-1",
        tasks = { { slot = "dms_slot_01", task = "app-dms-slot-01-cdc", arn = "arn:aws:dms:eu-west-1:1:task:A" } } }
      local text = cutover.format_checklist(cl)
      assert.truthy(text:find('BEGIN READ WRITE; ALTER DATABASE "app" RESET default_transaction_read_only; COMMIT;', 1, true), text)
      assert.truthy(text:find("aws dms start-replication-task --region eu-west-1 --replication-task-arn "
        .. "arn:aws:dms:eu-west-1:1:task:A --start-replication-task-type resume-processing", 1, true), text)
      assert.truthy(text:find("Point the application", 1, true))
      local none = cutover.format_checklist(cutover.checklist{ stop_writes = "none", tasks = {} })
      assert.truthy(none:find("NOT stopped", 1, true))
      assert.falsy(none:find("ALTER DATABASE", 1, true))
    end)
  end)
end)
