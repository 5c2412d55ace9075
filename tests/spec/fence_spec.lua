-- migrun.fence, cdc.wait_applied and cdc.watch on a real lab and the DMS
-- emulator: two slots with their sets and the fence, a CDC task per slot.
-- On a source nothing writes to (only another database's WAL grows) the
-- slots' confirmed_flush_lsn never reaches the WAL position, yet a fence ends
-- the wait within a few polls; a stopped task never has its fence claimed;
-- a read-only source takes the fence; a dry run shows it and writes nothing.
-- (Comparisons under a live writer: verify_spec.)
local cdc_lab = require "helpers.cdc_lab"
local cdc = require "migrun.cdc"
local fence = require "migrun.fence"
local db = require "migrun.db"
local pg = require "migrun.pg"
local aws = require "migrun.aws"

local SLOTS = { "dms_slot_01", "dms_slot_02" }

describe("migrun.fence", function()
  local C, L, client, source, target, groups, tasks

  local function conninfo(c) return c.migrun_conninfo .. " passfile=" .. L.passfile end
  local function wrap(c, name, opts) return db.wrap(assert(pg.connect(conninfo(c), { name = name })), opts) end
  local function sleep(t) aws.sleep(t) end
  local function one(dbx, sql, ...) return assert(dbx:query(sql, ...))[1] end

  -- WAL that no slot of the app database decodes: another database's work.
  local function unrelated_wal(mb)
    assert(L.source:psql(("create table if not exists wal_noise (v text); "
      .. "insert into wal_noise select repeat(md5(g::text), 32) from generate_series(1, %d) g; analyze wal_noise")
      :format(mb * 1024), { dbname = "postgres" }))
  end
  -- whether every slot has confirmed the current WAL position (the old wait)
  local function slots_at_wal_end()
    return one(source, [[select count(*) filter (where confirmed_flush_lsn < pg_current_wal_lsn()) = 0 as at
      from pg_replication_slots where slot_name = any (string_to_array($1, ','))]], table.concat(SLOTS, ",")).at
  end

  setup(function()
    local ddl = [[
      create table public.f1 (id int primary key, v text);
      create table public.f2 (id int primary key, v text);
      create schema live;
      create table live.events (id bigint primary key, happened_at timestamptz not null, v text)
        partition by range (id);
      create table live.events_a partition of live.events for values from (0) to (1000000);
      create table live.events_b partition of live.events for values from (1000000) to (2000000);
      create table live.other (id bigint primary key, created_at timestamptz not null default now(), pad text);
      create table live.late (id bigint primary key, happened_at timestamptz not null, v text) partition by range (id);
      create table live.late_a partition of live.late for values from (0) to (1000000);
      create table live.late_b partition of live.late for values from (1000000) to (2000000);]]
    local seed = [[
      insert into live.events select g, timestamptz '2026-01-01' + g * interval '1 minute', 'old'
        from generate_series(1, 5000) g;
      insert into live.events select 1000000 + g, timestamptz '2026-02-01' + g * interval '1 minute', 'old'
        from generate_series(1, 5000) g;
      insert into live.other select g, timestamptz '2026-01-01', repeat('p', 300) from generate_series(1, 2000) g;
      analyze;]]
    local function t(schema, name) return { schema = schema, name = name, has_pk = true } end
    C = cdc_lab.start{ name = "fence", ddl = ddl, seed = seed, groups = {
      { slot = SLOTS[1], tables = { t("public", "f1"), t("live", "events_a"), t("live", "events_b"),
        t("live", "late_a"), t("live", "late_b") } },
      { slot = SLOTS[2], tables = { t("public", "f2"), t("live", "other") } } } }
    L, client, source, target, groups, tasks = C.L, C.client, C.source, C.target, C.groups, C.tasks
    -- every slot's two sets carry the fence, once
    assert.equal("exists", fence.create(source))
    for _, g in ipairs(groups) do
      assert.same({ g.slot, "i" .. g.slot }, C.added[g.slot].added)
      assert.same({ g.slot, "i" .. g.slot }, assert(fence.add_slot(source, g.slot)).already)
    end
  end)
  teardown(function() if C then C:stop() end end)

  it("every task's table mappings select the fence", function()
    for _, g in ipairs(groups) do
      local t = assert(client:describe_task(tasks[g.slot]))
      assert.truthy(t.TableMappings:find('"schema-name":"migrun","table-name":"fence"', 1, true), t.TableMappings)
    end
  end)

  it("ends the wait on a write-free source within a few polls, where the slots' LSN never gets there", function()
    -- the tasks have applied what the setup wrote; now nothing writes to app
    assert(cdc.wait_applied(source, target, SLOTS, { timeout = 30, poll = 0.1, sleep = sleep }))
    unrelated_wal(8)
    aws.sleep(1.5) -- many emulator polls: nothing decoded moves the slots
    assert.is_false(slots_at_wal_end(), "the slots caught up with another database's WAL: the test proves nothing")

    local t0 = aws.monotonic()
    local w = assert(cdc.wait_applied(source, target, SLOTS, { timeout = 30, poll = 0.1, sleep = sleep }))
    local took = aws.monotonic() - t0
    assert.is_true(took < 3, ("the fence took %.1fs"):format(took))
    assert.equal(#SLOTS, #w.slots)
    for i, row in ipairs(w.slots) do
      assert.equal(SLOTS[i], row.slot)
      assert.is_true(row.seen)
      assert.matches("^%x+/%x+$", row.confirmed_flush_lsn)
    end
    -- one row per slot on both sides, the same seq: each task applied its own
    -- slot's row (the row filter) and the deletes of the older ones
    for _, side in ipairs{ source, target } do
      local rows = assert(side:query("select slot, seq from migrun.fence order by slot"))
      assert.equal(2, #rows)
      assert.same({ SLOTS[1], SLOTS[2] }, { rows[1].slot, rows[2].slot })
      assert.equal(w.seq, rows[1].seq)
      assert.equal(w.seq, rows[2].seq)
    end
    assert.equal(0, one(target, "select count(*) as n from public.awsdms_apply_exceptions").n)
    -- every task saw only its own fence rows
    for _, g in ipairs(groups) do
      for _, s in ipairs(assert(client:describe_table_statistics(tasks[g.slot]))) do
        if fence.is_fence(s.SchemaName, s.TableName) then
          assert.equal(s.Inserts, s.AppliedInserts)
          assert.equal(s.Inserts - 1, s.Deletes, g.slot .. ": each fence deletes the slot's previous row")
        end
      end
    end
  end)

  it("cdc.watch ends on an idle source through a fence; by the lag alone it never would", function()
    unrelated_wal(8)
    local watch = { name = "fence", source = source, target = target, lag_bytes = 256 * 1024, poll = 0.2,
      sleep = sleep }
    -- the lag alone (fence = false): the other database's WAL keeps it above lag_bytes
    local by_lag, err = cdc.watch(client, groups, tasks, setmetatable({ fence = false, timeout = 2 }, { __index = watch }))
    assert.is_nil(by_lag)
    assert.equal("timeout", err.kind)
    local t0 = aws.monotonic()
    local st = assert(cdc.watch(client, groups, tasks, setmetatable({ timeout = 30 }, { __index = watch })))
    assert.is_true(aws.monotonic() - t0 < 3)
    assert.equal(#groups, cdc.caught_up(st, watch.lag_bytes))
    local cols, rows = cdc.status_table(st)
    assert.equal("fence", cols[#cols])
    for _, r in ipairs(rows) do assert.equal(#cols, #r) end
  end)

  it("never claims applied for a stopped task, and does once it runs again", function()
    assert.equal("stopped", assert(cdc.stop_task(client, tasks[SLOTS[2]], { timeout = 30, poll = 0.1 })))
    local w, err = cdc.wait_applied(source, target, SLOTS, { timeout = 1.5, poll = 0.1, sleep = sleep })
    assert.is_nil(w)
    assert.truthy(tostring(err):find(SLOTS[2], 1, true), tostring(err))
    assert.falsy(tostring(err):find(SLOTS[1] .. ",", 1, true), tostring(err))
    assert.same({ SLOTS[2] }, err.behind)
    -- the running task alone is proven
    assert(cdc.wait_applied(source, target, { SLOTS[1] }, { timeout = 30, poll = 0.1, sleep = sleep }))
    assert(cdc.start_tasks(client, groups, tasks, { name = "fence", pause = 0 }))
    assert(cdc.wait_applied(source, target, SLOTS, { timeout = 30, poll = 0.1, sleep = sleep }))
  end)

  it("writes the fence on a read-only source (BEGIN READ WRITE)", function()
    assert(source:write("alter database app set default_transaction_read_only = on"))
    local ro = wrap(L.source, "source")
    finally(function() -- (busted keeps one finally per test)
      ro:close()
      assert(source.conn:exec("begin read write; alter database app reset default_transaction_read_only; commit"))
    end)
    assert.equal("on", one(ro, "show transaction_read_only").transaction_read_only)
    local _, refused = ro:write("insert into public.f1 values (99, 'x')")
    assert.equal("25006", refused.sqlstate)
    assert(cdc.wait_applied(ro, target, SLOTS, { timeout = 30, poll = 0.1, sleep = sleep }))
  end)

  it("a dry run shows the fence's statements and writes nothing", function()
    local lines = {}
    local dry = wrap(L.source, "source", { dry_run = true, echo = function(l) lines[#lines + 1] = l end })
    finally(function() dry:close() end)
    local before_src = one(source, "select max(seq) as s from migrun.fence").s
    local w = assert(cdc.wait_applied(dry, target, SLOTS, { timeout = 5, sleep = function() error("waited") end }))
    assert.is_true(w.dry_run)
    local all = table.concat(lines, "\n")
    for _, expected in ipairs{ "begin read write", "insert into \"migrun\".\"fence\"", "delete from \"migrun\".\"fence\"",
        "commit" } do
      assert.truthy(all:find(expected, 1, true), expected .. " not shown:\n" .. all)
    end
    assert.equal(before_src, one(source, "select max(seq) as s from migrun.fence").s)
  end)

  it("a missing slot or a fence not set up is an error at once, saying what to do", function()
    local w, err = cdc.wait_applied(source, target, { "no_such_slot" }, { timeout = 10, sleep = function() error("waited") end })
    assert.is_nil(w)
    assert.truthy(tostring(err):find("no_such_slot", 1, true))
    assert(source:write("select pg_create_logical_replication_slot('dms_slot_03', 'pglogical')"))
    finally(function() source:write("select pg_drop_replication_slot('dms_slot_03')") end)
    w, err = cdc.wait_applied(source, target, { "dms_slot_03" }, { timeout = 10, sleep = function() error("waited") end })
    assert.is_nil(w)
    assert.truthy(tostring(err):find("not in the replication sets of dms_slot_03", 1, true), tostring(err))
    assert.truthy(err.hint:find("slots step", 1, true))
  end)

  -- last: it takes the fence down
  it("full_restart's teardown drops the fence on both sides (shown first in a dry run), the schema only when empty", function()
    local restart = require "migrun.restart"
    local lines = {}
    local dry = wrap(L.target, "target", { dry_run = true, echo = function(l) lines[#lines + 1] = l end })
    local r = assert(restart.empty_target(dry, {}, { how = "truncate" }))
    dry:close()
    assert.equal("dropped", r.fence)
    local all = table.concat(lines, "\n")
    assert.truthy(all:find('drop table "migrun"."fence"', 1, true), all)
    assert.truthy(all:find('drop schema if exists "migrun"', 1, true), all)
    assert.is_true(one(target, "select to_regclass('migrun.fence') is not null as p").p)

    assert.equal("dropped", assert(restart.empty_target(target, {}, { how = "truncate" })).fence)
    assert.is_false(one(target, "select exists (select 1 from pg_namespace where nspname = 'migrun') as p").p)
    -- something else of the team's in schema migrun: the schema stays
    assert(source:write("create table migrun.keep (id int)"))
    assert.equal("dropped", assert(fence.drop(source)))
    assert.is_true(one(source, "select to_regclass('migrun.keep') is not null as p").p)
    assert.is_false(one(source, "select to_regclass('migrun.fence') is not null as p").p)
    assert.equal("absent", assert(fence.drop(source)))
  end)
end)
