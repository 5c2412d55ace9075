-- migrun.keydiff on a real lab: differences narrowed to their keys whatever
-- the key (a uuid, a composite of text and integer, a unique index on NOT NULL
-- columns of a table without a primary key), across many rows, with a limit,
-- and with keys left out; rows compared by key; keys made canonical from a
-- decoder's JSON.
local lab = require "migrun.rehearsal.lab"
local pg = require "migrun.pg"
local db = require "migrun.db"
local keydiff = require "migrun.keydiff"

local DDL = [[
  create schema kd;
  create table kd.u (id uuid primary key, v text, n int);
  create table kd.c (region text not null, seq int not null, v text, primary key (region, seq));
  create table kd.nk (code text not null, v int);
  create unique index nk_code on kd.nk (code);
  create table kd.none (v text);
]]
local DATA = [[
  insert into kd.u select md5(g::text)::uuid, 'v' || g, g from generate_series(1, 20000) g;
  insert into kd.c select r, g, 'x' || g from unnest(array['eu', 'us', 'ap']) r, generate_series(1, 4000) g;
  insert into kd.nk select 'code-' || g, g from generate_series(1, 3000) g;
  insert into kd.none select 'n' || g from generate_series(1, 10) g;
]]

describe("migrun.keydiff", function()
  local L, a, b

  setup(function()
    L = assert(lab.start{})
    assert(L.source:psql(DDL .. DATA))
    assert(L.target:psql(DDL .. DATA))
    a = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    b = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
  end)
  teardown(function()
    for _, d in ipairs{ a, b } do if d then d:close() end end
    if L then L:stop() end
  end)

  local function whats(found)
    local out = {}
    for _, d in ipairs(found.keys) do out[#out + 1] = d.key .. " " .. d.what end
    table.sort(out)
    return out
  end

  it("finds the keys: the primary key, else a unique index on NOT NULL columns, else none", function()
    local u = assert(keydiff.key(a, "kd.u"))
    assert.same({ "id" }, u.columns)
    assert.same({ "uuid" }, u.types)
    assert.is_false(u.integer)
    assert.same({ "region", "seq" }, assert(keydiff.key(a, "kd.c")).columns)
    assert.same({ "code" }, assert(keydiff.key(a, "kd.nk")).columns)
    assert.is_false(keydiff.key(a, "kd.none"))
  end)

  it("narrows a uuid-keyed table to the rows that differ, each side named", function()
    local key = assert(keydiff.key(a, "kd.u"))
    local changed = assert(b:query("select id::text as id from kd.u where n = 777"))[1].id
    local gone = assert(b:query("select id::text as id from kd.u where n = 12345"))[1].id
    assert(b:write("update kd.u set v = 'changed' where n = 777"))
    assert(b:write("delete from kd.u where n = 12345"))
    assert(b:write("insert into kd.u values ('00000000-0000-0000-0000-000000000001', 'extra', 0)"))
    local found = assert(keydiff.narrow(a, b, "kd.u", key))
    assert.is_true(found.complete)
    local expected = { '["00000000-0000-0000-0000-000000000001"] only in b', ('["%s"] differs'):format(changed),
      ('["%s"] only in a'):format(gone) }
    table.sort(expected)
    assert.same(expected, whats(found))
    assert.equal(3, #found.keys)
    -- a limit: the first ones, and not complete
    local some = assert(keydiff.narrow(a, b, "kd.u", key, { limit = 1 }))
    assert.equal(1, #some.keys)
    assert.is_false(some.complete)
    -- keys left out are not looked at
    local rest = assert(keydiff.narrow(a, b, "kd.u", key, { exclude = { ('["%s"]'):format(changed) } }))
    assert.equal(2, #rest.keys)
    -- a key's label
    assert.equal(("id %s"):format(changed), keydiff.label(key, ('["%s"]'):format(changed)))
  end)

  it("narrows a composite key and a unique-index key; compares rows by key", function()
    local key = assert(keydiff.key(a, "kd.c"))
    assert(b:write("update kd.c set v = 'y' where region = 'us' and seq = 3999"))
    assert(b:write("delete from kd.c where region = 'ap' and seq = 1"))
    local found = assert(keydiff.narrow(a, b, "kd.c", key))
    assert.same({ '["ap", 1] only in a', '["us", 3999] differs' }, whats(found))
    assert.equal("(region, seq) (us, 3999)", keydiff.label(key, '["us", 3999]'))
    local said = keydiff.describe(key, found.keys, { a = "source", b = "target" })
    assert.truthy(said:find("(region, seq) (us, 3999) differs", 1, true), said)
    assert.truthy(said:find("(region, seq) (ap, 1) only in source", 1, true), said)
    assert.equal("(2 keys)", said:sub(-8))

    local nk = assert(keydiff.key(a, "kd.nk"))
    assert(b:write("update kd.nk set v = -1 where code = 'code-2500'"))
    assert.same({ '["code-2500"] differs' }, whats(assert(keydiff.narrow(a, b, "kd.nk", nk))))
    -- rows by key: missing keys absent; xmin and hash present
    local rows = assert(keydiff.rows(b, "kd.nk", nk, { '["code-2500"]', '["nope"]' }))
    assert.is_string(rows['["code-2500"]'].hash)
    assert.is_string(rows['["code-2500"]'].xmin)
    assert.is_nil(rows['["nope"]'])
    local diffs = assert(keydiff.compare(a, b, "kd.nk", nk, { '["code-2500"]', '["code-1"]' }))
    assert.equal(1, #diffs)
    assert.equal('["code-2500"]', diffs[1].key)
  end)

  it("makes keys from a decoder's JSON canonical", function()
    local key = assert(keydiff.key(a, "kd.c"))
    assert.same({ '["eu", 7]' }, assert(keydiff.canonical(a, key, { '["eu", 7]', '["eu",7]', '["eu", "7"]' })))
    assert(a:query("create temp table ts (at timestamptz primary key)"))
    local tkey = assert(keydiff.key(a, "pg_temp.ts"))
    -- the same instant written under two time zones is one key
    assert.equal(1, #assert(keydiff.canonical(a, tkey, { '["2026-01-01T09:00:00+09:00"]', '["2026-01-01T00:00:00+00:00"]' })))
  end)
end)
