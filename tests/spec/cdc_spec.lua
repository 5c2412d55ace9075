-- migrun.cdc against a real lab and the DMS emulator: endpoints and tasks
-- found by name (a second run creates nothing), the CDC task replays what
-- changed after the start LSN, and status() reports lag, control tables and
-- apply exceptions.
local lab = require "migrun.rehearsal.lab"
local cdc = require "migrun.cdc"
local db = require "migrun.db"
local pg = require "migrun.pg"
local aws = require "migrun.aws"

describe("migrun.cdc", function()
  local L, client, instance_arn, source, target

  setup(function()
    L = assert(lab.start{ dms = { delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1,
      connection = 0.1, cdc_poll = 0.1 } } })
    client = assert(L:dms_client())
    instance_arn = assert(client:describe_replication_instances())[1].ReplicationInstanceArn
    source = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    target = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
  end)
  teardown(function()
    if source then source:close() end
    if target then target:close() end
    if L then L:stop() end
  end)

  local function conninfo(c)
    return c.migrun_conninfo .. " passfile=" .. L.passfile
  end

  describe("endpoint_settings", function()
    it("takes the password from the passfile and never needs it in the conninfo", function()
      local s = assert(cdc.endpoint_settings(conninfo(L.source)))
      assert.equal("127.0.0.1", s.host)
      assert.equal(L.source.port, s.port)
      assert.equal("migrun", s.user)
      assert.equal(L.password, s.password)
    end)
    it("refuses a socket directory, and a bad conninfo without echoing it", function()
      local s, err = cdc.endpoint_settings(("host=%s port=%d dbname=app user=postgres"):format(L.dir, L.source.port))
      assert.is_nil(s)
      assert.matches("Unix socket", tostring(err))
      s, err = cdc.endpoint_settings("host=x password=hunter2 nonsense=1")
      assert.is_nil(s)
      assert.matches("nonsense", tostring(err))
      assert.not_matches("hunter2", tostring(err))
    end)
  end)

  it("creates endpoints and a task once, replays changes after the start LSN, reports status", function()
    assert(L.source:psql([[
      create table public.c1 (id int primary key, v text);
      insert into public.c1 select g, 'before' from generate_series(1, 10) g;
      select pglogical.create_node(node_name := 'cdc_spec', dsn := 'host=127.0.0.1 port=]] .. L.source.port .. [[ dbname=app');
      select pg_create_logical_replication_slot('dms_slot_01', 'pglogical');
      select pglogical.create_replication_set('dms_slot_01', false, true, true, false);
      select pglogical.create_replication_set('idms_slot_01', true, false, false, true);
      select pglogical.replication_set_add_table('dms_slot_01', 'public.c1');
      select pglogical.replication_set_add_table('idms_slot_01', 'public.c1');]]))
    -- the "full load": the target gets the table as it is at start_lsn
    local start_lsn = assert(source:query("select pg_current_wal_lsn() as l"))[1].l
    assert(L.target:psql([[create table public.c1 (id int primary key, v text);
      insert into public.c1 select g, 'before' from generate_series(1, 10) g;]]))
    assert(L.source:psql([[insert into public.c1 values (11, 'after');
      update public.c1 set v = 'changed' where id = 1; delete from public.c1 where id = 2;]]))

    local groups = { { name = "dms_slot_01", slot = "dms_slot_01",
      tables = { { schema = "public", name = "c1", has_pk = true } } } }
    local opts = { name = "spec", source = conninfo(L.source), target = conninfo(L.target) }
    local eps = assert(cdc.ensure_endpoints(client, groups, opts))
    assert.same({ "spec-target", "spec-dms-slot-01-source" }, eps.created)
    assert(cdc.test_connections(client, instance_arn, eps, { timeout = 30, poll = 0.2 }))
    local tasks = assert(cdc.ensure_tasks(client, groups, eps,
      { name = "spec", instance_arn = instance_arn, start_lsn = start_lsn }))
    assert.same({ "spec-dms-slot-01-cdc" }, tasks.created)

    -- a second run (as after a SIGKILL) finds everything by name
    local eps2 = assert(cdc.ensure_endpoints(client, groups, opts))
    assert.same({}, eps2.created)
    assert.equal(eps.target, eps2.target)
    local tasks2 = assert(cdc.ensure_tasks(client, groups, eps2,
      { name = "spec", instance_arn = instance_arn, start_lsn = start_lsn }))
    assert.same({}, tasks2.created)
    assert.equal(tasks[groups[1].slot], tasks2[groups[1].slot])
    assert.equal(1, #assert(client:describe_replication_tasks()))
    assert.equal(2, #assert(client:describe_endpoints()))

    local said = {}
    local started = assert(cdc.start_tasks(client, groups, tasks, { name = "spec", pause = 0,
      say = function(l) said[#said + 1] = l end }))
    assert.same({ "dms_slot_01" }, started.started)
    assert.matches("start%-replication", said[1])
    -- already running: not started twice
    local again = assert(cdc.start_tasks(client, groups, tasks, { name = "spec" }))
    assert.same({ "dms_slot_01" }, again.running)

    local st
    local deadline = aws.monotonic() + 30
    repeat
      aws.sleep(0.2)
      st = assert(cdc.status(client, groups, tasks, { name = "spec", source = source, target = target }))
    until (st.all_running and st.max_lag < 1024 * 1024 and
           assert(target:query("select count(*) as n from public.c1 where v in ('after','changed')"))[1].n == 2)
      or aws.monotonic() > deadline
    assert.is_true(st.all_running)
    assert.equal("running", st.rows[1].status)
    assert.equal(0, st.exceptions)
    local rows = assert(target:query("select id, v from public.c1 order by id"))
    assert.equal(10, #rows)                 -- 10 - one deleted + one inserted
    assert.equal("changed", rows[1].v)
    assert.equal(3, rows[2].id)
    assert.equal("after", rows[10].v)
    local cols, trows = cdc.status_table(st)
    assert.equal(#cols, #trows[1])
  end)

  it("prints every call in a dry run and creates nothing", function()
    local lines = {}
    local dry = assert(L:dms_client{ dry_run = true, on_call = function(l) lines[#lines + 1] = l end })
    local groups = { { name = "dms_slot_09", slot = "dms_slot_09",
      tables = { { schema = "public", name = "c9", has_pk = true } } } }
    local opts = { name = "dry", source = conninfo(L.source), target = conninfo(L.target) }
    local before = #assert(client:describe_endpoints())
    local eps = assert(cdc.ensure_endpoints(dry, groups, opts))
    local tasks = assert(cdc.ensure_tasks(dry, groups, eps, { name = "dry", instance_arn = "arn:x", start_lsn = "0/1" }))
    assert(cdc.start_tasks(dry, groups, tasks, { name = "dry" }))
    assert.equal(before, #assert(client:describe_endpoints()))
    local all = table.concat(lines, "\n")
    assert.matches("CreateEndpoint", all)
    assert.matches("CreateReplicationTask", all)
    assert.matches("StartReplicationTask", all)
    assert.not_matches(L.password, all, 1, true)
  end)
end)
