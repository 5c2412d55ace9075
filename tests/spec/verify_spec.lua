-- migrun.verify on a real lab and the DMS emulator, under a writer that never
-- stops: inserts, updates and deletes on tables keyed by an integer, a uuid
-- and a composite key, inserts into a table without any key, with the
-- emulator lagging behind. The live verification reports no difference that
-- is only changes in flight, names by key a row changed on the target behind
-- DMS's back (and a keyless table's difference), converges to the keys still
-- changing; at the cutover only what changed since is compared, and a source
-- still written is refused.
local cdc_lab = require "helpers.cdc_lab"
local cdc = require "migrun.cdc"
local verify = require "migrun.verify"
local watch = require "migrun.watch"
local sentinel = require "migrun.sentinel"
local catalog = require "migrun.catalog"
local aws = require "migrun.aws"
local proc = require "migrun.proc"
local host = require "migrun.host"
local T = require "helpers.tmp"

local SLOTS = { "vs_slot_01", "vs_slot_02" }

local DDL = [[
  create extension if not exists pgcrypto;
  create schema shop;
  create table shop.orders (id bigint primary key, customer int not null, status text not null, total numeric(12,2),
    tags text[] not null default '{}', updated_at timestamptz not null default now());
  create table shop.carts (id uuid primary key, items jsonb not null, seen int not null default 0);
  create table shop.stock (warehouse text not null, sku text not null, qty int not null,
    primary key (warehouse, sku));
  create table shop.audit (happened timestamptz not null default clock_timestamp(), what text not null);
]]

local SEED = [[
  insert into shop.orders (id, customer, status, total)
    select g, g % 97, 'new', g * 1.25 from generate_series(1, 20000) g;
  insert into shop.carts select gen_random_uuid(), jsonb_build_object('n', g) from generate_series(1, 3000) g;
  insert into shop.stock select w, 'sku-' || g, g % 50 from unnest(array['eu', 'us', 'ap']) w,
    generate_series(1, 1500) g;
  insert into shop.audit (what) select 'seed ' || g from generate_series(1, 500) g;
]]

-- The writer: every table, all the time (the keyless one only gets inserts,
-- the only change DMS carries for it).
local WRITER = [[
  local pg = require "migrun.pg"
  local aws = require "migrun.aws"
  local c = assert(pg.connect(os.getenv("W_CONNINFO")))
  local stop, n = os.getenv("W_STOP"), 0
  math.randomseed(7)
  while not io.open(stop) do
    n = n + 1
    local i, a, b = n, math.random(20000), math.random(20000)
    local ok, err = true, nil
    for _, q in ipairs{
      { "begin" },
      { "insert into shop.orders (id, customer, status, total) values (100000 + $1::int, $1::int % 97, 'new', 9.99)", i },
      { "update shop.orders set status = 'paid', updated_at = now() where id = $1::int", a },
      { "delete from shop.orders where id = $1::int", b },
      { "update shop.carts set seen = seen + 1 where id = (select id from shop.carts order by seen, id limit 1)" },
      { "insert into shop.carts values (gen_random_uuid(), '{\"live\": true}')" },
      { "update shop.stock set qty = qty - 1 where warehouse = 'eu' and sku = 'sku-' || ($1::int % 1500 + 1)", a },
      { "insert into shop.audit (what) values ('live ' || $1::int)", i },
      { "commit" } } do
      if ok then ok, err = c:exec(table.unpack(q)) end
    end
    if not ok then io.stderr:write(tostring(err), "\n") break end
    aws.sleep(0.01)
  end
  print(n)]]

describe("migrun.verify", function()
  local C, L, source, target, tables, groups, dir

  local function conninfo(c) return c.migrun_conninfo .. " passfile=" .. L.passfile end
  local function one(dbx, sql, ...) return assert(dbx:query(sql, ...))[1] end

  -- until DMS has applied everything the source wrote (the verifications' fence)
  local function applied()
    return cdc.wait_applied(source, target, SLOTS, { timeout = 60, poll = 0.1, sleep = aws.sleep })
  end

  local function verification(opts)
    opts = opts or {}
    return assert(verify.new{ source = source, target = target, tables = tables, groups = groups,
      prefix = "vs_slot_", state_dir = dir, say = function() end, rounds = opts.rounds, fence = applied })
  end

  local function start_writer()
    local stop = os.tmpname()
    os.remove(stop)
    local w = assert(proc.spawn{ host.exe, "-e", WRITER, env = { W_CONNINFO = conninfo(L.source), W_STOP = stop },
      stdout = "capture", stderr = "capture", stdin = false, die_with_parent = true })
    return function()
      io.open(stop, "w"):close()
      w:wait(20)
      local out = (w.stdout or "") .. (w.stderr or "")
      w:close()
      os.remove(stop)
      return tonumber(out:match("^(%d+)")), out
    end
  end

  setup(function()
    -- the emulator applies every 0.3 s: a reading always finds changes in flight
    C = cdc_lab.start{ name = "verify", ddl = DDL, cdc_poll = 0.3,
      load = function(c)
        assert(c.L.source:psql(SEED .. "analyze;"))
        -- the target loaded as the full load would (another physical order)
        for _, t in ipairs{ "orders", "carts", "stock", "audit" } do
          assert(c.target:copy_to(c.source, ("COPY (select * from shop.%s order by 1 desc) TO STDOUT (FORMAT binary)")
            :format(t), ("COPY shop.%s FROM STDIN (FORMAT binary)"):format(t)))
        end
      end,
      groups = function(c)
        tables = assert(catalog.tables(c.source, { schemas = { "shop" } }))
        local g = { { slot = SLOTS[1], tables = {} }, { slot = SLOTS[2], tables = {} } }
        for i, t in ipairs(tables) do table.insert(g[i % 2 + 1].tables, t) end
        return g
      end,
      -- DMS's sessions as full.lua makes them: the sentinel's triggers do not fire there
      target_overrides = { after_connect_script = "SET session_replication_role = replica" },
      before_tasks = function(c)
        local keys = {}
        for _, t in ipairs(tables) do keys[t.key] = t.has_pk and t.pk_columns or false end
        assert(sentinel.install(c.target, tables, keys))
      end }
    L, source, target, groups, dir = C.L, C.source, C.target, C.groups, T.dir("verify")
  end)
  teardown(function() if C then C:stop() end end)

  it("under writes that never stop: no difference in flight, a row changed behind DMS's back named by key", function()
    local stop_writer = start_writer()
    local n_done
    finally(function() if not n_done then stop_writer() end end)
    aws.sleep(1)
    -- behind DMS's back: rows the writer never touches
    assert(target:write("update shop.orders set total = 0 where id = 19999"))
    assert(target:write("delete from shop.stock where warehouse = 'ap' and sku = 'sku-7'"))
    -- a plain comparison now sees changes in flight on every busy table
    local plain = assert(require("migrun.qa").compare(source, target, tables, {}, { mode = "full", narrow = false }))
    assert.is_true(plain.differences >= 3, "nothing in flight: the test proves nothing")
    local r = assert(verification():live())
    assert.equal(4, r.compared.whole)
    local by = {}
    for _, d in ipairs(r.differences) do by[d.table] = d end
    assert.equal(2, #r.differences, verify.format(r))
    assert.same({ { key = "[19999]", what = "differs" } }, { { key = by["shop.orders"].keys[1].key,
      what = by["shop.orders"].keys[1].what } })
    assert.equal("id 19999 differs (1 key)", by["shop.orders"].detail)
    assert.equal('(warehouse, sku) (ap, sku-7) only in source (1 key)', by["shop.stock"].detail)
    -- the writer touched every table meanwhile: what it changed last is left for the cutover
    assert.is_true(r.rounds >= 2, verify.format(r))
    assert.is_true(r.pending.keys < r.history[1].changes, verify.format(r))
    -- the watch slot moved with the rounds
    local pos = assert(watch.position(source, "vs_slot_watch"))
    assert.equal(r.position, tostring(pos.confirmed_flush_lsn))

    -- mended by hand: the next run finds nothing, still under writes
    assert(target:write("update shop.orders set total = 19999 * 1.25 where id = 19999"))
    assert(target:write("insert into shop.stock values ('ap', 'sku-7', 7)"))
    r = assert(verification():live())
    assert.equal(0, #r.differences, verify.format(r))
    assert.equal(1, r.compared.whole) -- only the keyless table hashed whole again (it is written): the rest by key
    assert.is_true(r.compared.keys > 0)

    -- the cutover while the source still writes is refused
    local c, err = verification():at_cutover()
    assert.is_nil(c)
    assert.matches("the source changed while it was compared", tostring(err))

    -- writes stopped; then a row the source never changes is changed on the
    -- target behind DMS's back (the sentinel notes it)
    n_done = stop_writer()
    -- DMS has applied the writer's last changes first: an insert applied
    -- after this update could sort before the cart it changes, and an update
    -- applied after it would overwrite it. The cart is named once.
    assert(applied())
    local cart = one(target, "select id from shop.carts order by id limit 1").id
    assert(target:write("update shop.carts set seen = -1 where id = $1", cart))
    assert(target:write("delete from shop.orders where id = 18888"))
    c = assert(verification():at_cutover())
    assert.equal(2, #c.differences, verify.format(c))
    assert.equal("id 18888 only in source (1 key)", c.differences[2].detail)
    assert.equal(("id %s differs (1 key)"):format(cart), c.differences[1].detail)
    -- DMS's own writes were never noted: the sentinel holds nothing after the look
    assert.equal(0, one(target, "select count(*) as n from migrun.target_writes").n)
    -- mended by hand: the fix is noted too, and compares equal
    local seen = one(source, "select seen from shop.carts where id = $1", cart).seen
    assert(target:write("update shop.carts set seen = $1 where id = $2", seen, cart))
    assert(target:copy_to(source, "COPY (select * from shop.orders where id = 18888) TO STDOUT (FORMAT binary)",
      "COPY shop.orders FROM STDIN (FORMAT binary)"))
    c = assert(verification():at_cutover())
    assert.equal(0, #c.differences, verify.format(c))
    assert.same({ "shop.audit" }, c.whole) -- no key: hashed whole, as it changed
    assert.is_true(c.compared.keys > 0 and c.compared.keys < 2000, verify.format(c))
  end)

  it("verifies every table whole again when something else moved the watch slot", function()
    local v = verification()
    assert(v:live())
    assert(source:write("insert into shop.audit (what) values ('moved behind its back')"))
    assert(source:write("select 1 from pg_replication_slot_advance('vs_slot_watch', pg_current_wal_lsn())"))
    local said = {}
    local again = assert(verify.new{ source = source, target = target, tables = tables, groups = groups,
      prefix = "vs_slot_", state_dir = dir, say = function(l) said[#said + 1] = l end, fence = applied })
    local r = assert(again:live())
    assert.equal(#tables, r.history[1].whole, verify.format(r))
    assert.matches("something else moved it", table.concat(said, "\n"))
  end)

  it("names a keyless table's difference, found when the table is still", function()
    assert(target:write("delete from shop.audit where what = 'seed 7'"))
    local v = verification()
    assert(v:forget{ "shop.audit" })
    local r = assert(v:live())
    assert.equal(1, #r.differences, verify.format(r))
    assert.equal("shop.audit", r.differences[1].table)
    assert.is_nil(r.differences[1].keys)
    assert.matches("^%d+ vs %d+ rows", r.differences[1].detail)
  end)
end)
