-- migrun.drift on a real source (what a change to a table is reported as,
-- and the statement that makes the target match), and migrun.guard's rounds
-- as its process runs them: against the journal a playbook writes, the
-- fingerprint know_data recorded, stop or warn as configured, nothing while
-- the reference is being retaken, a warning when the source cannot be reached.
local pg = require "migrun.pg"
local db = require "migrun.db"
local proc = require "migrun.proc"
local drift = require "migrun.drift"
local guard = require "migrun.guard"
local journal = require "migrun.playbook.journal"

describe("migrun.drift and the guard's rounds", function()
  local L, src, dir

  setup(function()
    L = assert(require("migrun.rehearsal.lab").start {})
    src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    assert(src:write([[
      create schema app;
      create table app.orders (id bigint primary key, amount numeric(12,2) not null, note text,
        constraint amount_positive check (amount > 0));
      create table app.users (id int primary key, secret text, constraint no_default check (secret <> 'password=hunter2'));
      create table app.gone (id int);
      create table app.skipped (id int);
      create schema other;
      create table other.t (id int);]]))
    local _, _, _, out = proc.run{ "mktemp", "-d" }
    dir = out:match("%S+")
  end)

  teardown(function()
    if src then src:close() end
    if L then assert(L:stop()) end
    if dir then proc.run{ "rm", "-rf", dir } end
  end)

  local OPTS = { schemas = { "app" }, exclude = { "app.skipped" } }

  local function whats(changes)
    local out = {}
    for i, c in ipairs(changes) do out[i] = c.table .. ": " .. c.what .. (c.sql and (" | " .. c.sql) or "") end
    return out
  end

  it("reports each change to the migrated tables with the statement for the target", function()
    local before = assert(drift.fingerprint(src, OPTS))
    local keys = {}
    for i, t in ipairs(before.tables) do keys[i] = t.key end
    assert.same({ "app.gone", "app.orders", "app.users" }, keys)
    -- the journal masks password=... in values: the fingerprint holds the same masked text
    assert.falsy(require("cjson").encode(before):find("hunter2", 1, true))
    assert.same({}, drift.compare(before, assert(drift.fingerprint(src, OPTS))))

    assert(src:write([[
      alter table app.orders add column region text not null default 'eu';
      alter table app.orders alter column note type varchar(200);
      alter table app.orders drop constraint amount_positive;
      alter table app.orders add constraint amount_small check (amount < 1000000);
      alter table app.users drop column secret;
      alter table app.users replica identity full;
      drop table app.gone;
      create table app.fresh (id int);
      alter table app.skipped add column x int;
      alter table other.t add column x int;]]))
    assert.same({
      "app.fresh: table created (it is in no replication set: DMS does not migrate it)",
      "app.gone: table dropped or renamed",
      "app.orders: column note changed: text -> character varying(200) | ALTER TABLE app.orders ALTER COLUMN note"
        .. " TYPE character varying(200)",
      "app.orders: column region text not null added | ALTER TABLE app.orders ADD COLUMN region text",
      "app.orders: constraint amount_small CHECK ((amount < (1000000)::numeric)) added | ALTER TABLE app.orders ADD"
        .. " CONSTRAINT amount_small CHECK ((amount < (1000000)::numeric))",
      "app.orders: constraint amount_positive CHECK ((amount > (0)::numeric)) dropped",
      "app.users: column secret text dropped (or renamed)",
      "app.users: constraint no_default CHECK ((secret <> 'password=****'::text)) dropped",
      "app.users: replica identity default -> full",
    }, whats(assert(drift.check(src, before, OPTS))))

    local msg = drift.message(assert(drift.check(src, before, OPTS)), { taken_at = "2026-11-30 10:00:00",
      config = "/srv/m.lua", playbooks = "playbooks", rerun = "migrun playbooks/full.lua --config /srv/m.lua",
      slot_of = function(t) return t == "app.orders" and "dms_slot_02" or nil end })
    assert.truthy(msg:find("^schema drift STOP: the source's schema changed since know_data %(2026%-11%-30 10:00:00%): "
      .. "app%.fresh: table created"), msg)
    assert.truthy(msg:find("make the same change on the target (ALTER TABLE app.orders ALTER COLUMN note TYPE", 1, true))
    assert.truthy(msg:find("`migrun playbooks/full.lua --config /srv/m.lua --only know_data`", 1, true))
    assert.truthy(msg:find("`migrun playbooks/partial_restart.lua dms_slot_02 --config /srv/m.lua`", 1, true))
    assert.has_error(function() drift.compare({}, before) end, "drift.compare: a fingerprint expected (old)")
  end)

  -- A journal as full.lua leaves it after know_data, and a guard's job for it.
  local function world(state_dir, fp, ended_at)
    assert(journal.make_dir(state_dir))
    local J = assert(journal.open(state_dir))
    J.data.main = { playbook = "full", script = "/x/playbooks/full.lua" }
    local kd = J:step("full", "know_data")
    kd.status, kd.ended_at, kd.facts = "done", ended_at or journal.timestamp(), { schema_fingerprint = fp }
    J:step("full", "groups").facts = { groups = { { slot = "dms_slot_01",
      tables = { { schema = "app", name = "orders" } } } } }
    assert(J:save())
    return { parent = 1, interval = 1, started_at = journal.timestamp(), source = L.source.conninfo,
      replica = L.replica.conninfo, wal_guard = { warn_bytes = 2 ^ 50, stop_bytes = 2 ^ 50,
      replica_min_free_bytes = 1 }, drift = "stop", schemas = { "app" }, exclude_tables = { "app.skipped" },
      prefix = "dms_slot_", state_dir = state_dir,
      advice = { config = "/srv/m.lua", rerun = "migrun playbooks/full.lua --config /srv/m.lua", playbooks = "playbooks" } }
  end

  it("compares the source with know_data's fingerprint each round: stop, or warn as configured", function()
    local job = world(dir .. "/s1", assert(drift.fingerprint(src, OPTS)))
    local g = guard.new(job)
    local r = g:round()
    assert.equal("ok", r.level, r.message)
    assert.truthy(r.message:find("^WAL guard ok: migrun's 0 slots hold back 0 B"), r.message)
    assert(src:write("alter table app.orders add column coupon text"))
    r = g:round()
    assert.equal("stop", r.level)
    assert.truthy(r.message:find("^schema drift STOP: .*app%.orders: column coupon text added"), r.message)
    assert.truthy(r.message:find("partial_restart.lua dms_slot_01 --config /srv/m.lua", 1, true), r.message)
    job.drift = "warn"
    r = guard.new(job):round()
    assert.equal("warn", r.level)
    assert.truthy(r.message:find("^schema drift warning: "), r.message)
    -- full_restart.lua's guard compares nothing
    job.drift = "off"
    assert.equal("ok", guard.new(job):round().level)
  end)

  it("compares nothing while the run retakes the fingerprint, then the new one", function()
    local old = assert(drift.fingerprint(src, OPTS))
    assert(src:write("alter table app.orders add column promo text"))
    local job = world(dir .. "/s2", old, "2020-01-01T00:00:00Z")
    job.retaking = true
    assert.equal("ok", guard.new(job):round().level) -- know_data ended before this run began
    -- know_data of this run records the new reference
    local J = assert(journal.open(job.state_dir))
    local kd = J:step("full", "know_data")
    kd.ended_at, kd.facts.schema_fingerprint = journal.timestamp(), assert(drift.fingerprint(src, OPTS))
    assert(J:save())
    local g = guard.new(job)
    assert.equal("ok", g:round().level)
    assert(src:write("alter table app.orders drop column promo"))
    assert.equal("stop", g:round().level)
  end)

  it("records every round in samples.jsonl, as the run's own readings, with the lag in time", function()
    local live = require "migrun.playbook.live"
    local pgl = require "migrun.pglogical"
    local job = world(dir .. "/s5", nil)
    job.playbook, job.samples = "full", true
    local J = assert(journal.open(job.state_dir))
    J:step("full", "full_load").status = "running"
    assert(J:save())
    local g = guard.new(job)
    assert(g:sample(g:round(), 990)) -- the primary's position before the slot: the lag in time is exact
    assert(src:write("create table app.pad0 as select g from generate_series(1, 1000) g"))
    assert(pgl.ensure_node(src, "migrun_provider", L.source.conninfo))
    assert(pgl.create_slot(src, "dms_slot_01"))
    assert(src:write("create table app.pad1 as select g from generate_series(1, 1000) g"))
    local a = assert(g:sample(g:round(), 1000))
    assert(src:write("create table app.pad as select g from generate_series(1, 20000) g"))
    local b = assert(g:sample(g:round(), 1010))
    local list = live.read_samples(job.state_dir)
    assert.equal(3, #list)
    table.remove(list, 1)
    assert.same({ "guard", "guard" }, { list[1].kind, list[2].kind })
    assert.equal("full_load", list[2].step)
    assert.equal("full", list[2].playbook)
    assert.equal(a.wal_lsn, list[1].wal_lsn)
    assert.equal(1, #list[2].slots)
    local sl = list[2].slots[1]
    assert.equal("dms_slot_01", sl.slot)
    assert.is_true(sl.retained_bytes > 0 and sl.lag_bytes > 0)
    assert.equal(sl.retained_bytes, list[2].held_bytes)
    -- the slot confirmed nothing since it was made, between the readings at 990 and 1000
    assert.is_true(sl.lag_seconds > 10 and sl.lag_seconds < 20, tostring(sl.lag_seconds))
    assert.equal(b.wal_lsn, list[2].wal_lsn)
    assert.is_true(require("migrun.lsn").parse(b.wal_lsn) > require("migrun.lsn").parse(a.wal_lsn))
    -- every value plain JSON (wal_status from PostgreSQL 13 on)
    assert.equal("reserved", sl.wal_status)
    -- a round that could not read the primary records nothing
    job.source = "host=127.0.0.1 port=1 dbname=app user=x connect_timeout=2"
    assert.is_nil(guard.new(job):sample(guard.new(job):round()))
    assert.equal(3, #live.read_samples(job.state_dir))
    assert(src:write("select pg_drop_replication_slot('dms_slot_01'); drop table app.pad, app.pad0, app.pad1"))
  end)

  it("warns, never stops, when it cannot reach the source, and says so", function()
    local job = world(dir .. "/s3", nil)
    job.source = "host=127.0.0.1 port=1 dbname=app user=x password=s3cr3t connect_timeout=2"
    local r = guard.new(job):round()
    assert.equal("warn", r.level)
    assert.truthy(r.message:find("^WAL guard warning: the guard cannot reach the source: "), r.message)
    assert.falsy(r.message:find("s3cr3t", 1, true))
    -- the replica out of reach: a warning that its disk is not watched
    job = world(dir .. "/s4", nil)
    job.replica = "host=127.0.0.1 port=1 dbname=app user=x password=s3cr3t connect_timeout=2"
    r = guard.new(job):round()
    assert.equal("warn", r.level)
    assert.truthy(r.message:find("^WAL guard warning: migrun's 0 slots"), r.message)
    assert.truthy(r.message:find("the guard cannot reach the replica: .*: its disk is not watched until it can be$"),
      r.message)
    assert.falsy(r.message:find("s3cr3t", 1, true))
  end)
end)
