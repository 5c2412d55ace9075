-- migrun.json: decoding keeps integers as integers and floats as floats (lua-cjson
-- read every number as a float: 5432 came back 5432.0, 2^53 + 1 came back 2^53),
-- and the journal gives back the integers it was given.
local json = require "migrun.json"
local journal = require "migrun.playbook.journal"
local proc = require "migrun.proc"
local tmp = require "helpers.tmp"

local function typed(v) return { math.type(v), v } end

describe("json.decode", function()
  it("reads a number without '.' or exponent as an integer", function()
    assert.are.same(typed(5432), typed(json.decode("5432")))
    assert.are.same(typed(-7), typed(json.decode("-7")))
    assert.are.same(typed(0), typed(json.decode("0")))
    local doc = json.decode('{"port": 5432, "list": [1, 2, {"n": 3}], "rows": 0}')
    assert.are.equal("integer", math.type(doc.port))
    assert.are.equal("integer", math.type(doc.rows))
    assert.are.equal("integer", math.type(doc.list[1]))
    assert.are.equal("integer", math.type(doc.list[3].n))
    assert.are.equal("5432", tostring(doc.port)) -- not "5432.0"
  end)

  it("keeps integers exact beyond 2^53, up to 64 bits", function()
    assert.are.same(typed(9007199254740993), typed(json.decode("9007199254740993"))) -- 2^53 + 1
    assert.are.same(typed(math.maxinteger), typed(json.decode("9223372036854775807")))
    assert.are.same(typed(math.mininteger), typed(json.decode("-9223372036854775808")))
    local doc = json.decode('{"xid": 18446744073709551, "lsn": 81985529216486895}')
    assert.are.equal(18446744073709551, doc.xid)
    assert.are.equal(81985529216486895, doc.lsn)
  end)

  it("reads an integer beyond 64 bits as the nearest float", function()
    local v = json.decode("9223372036854775808") -- 2^63
    assert.are.equal("float", math.type(v))
    assert.are.equal(2.0 ^ 63, v)
    v = json.decode("123456789012345678901234567890")
    assert.are.equal("float", math.type(v))
    assert.are.equal(1.2345678901234568e29, v)
  end)

  it("keeps floats floats, also integral ones written with '.' or an exponent", function()
    assert.are.same(typed(1.0), typed(json.decode("1.0")))
    assert.are.same(typed(1.5), typed(json.decode("1.5")))
    assert.are.same(typed(1000.0), typed(json.decode("1e3")))
    assert.are.same(typed(-0.0015), typed(json.decode("-1.5E-3")))
    assert.are.same(typed(0.1), typed(json.decode("0.1")))
    local doc = json.decode('[2.0, 2, 1700000000.25]')
    assert.are.same({ "float", "integer", "float" }, { math.type(doc[1]), math.type(doc[2]), math.type(doc[3]) })
  end)

  it("turns null into nil, as before", function()
    assert.is_nil(json.decode("null"))
    assert.are.same({ b = 1 }, json.decode('{"a": null, "b": 1}'))
    local a = json.decode("[1, null, 3]")
    assert.are.equal(1, a[1])
    assert.is_nil(a[2])
    assert.are.equal(3, a[3])
  end)

  it("reads strings with every escape", function()
    assert.are.equal('a"b\\c/d\b\f\n\r\t', json.decode([["a\"b\\c\/d\b\f\n\r\t"]]))
    assert.are.equal("caf\u{e9} \u{1F600}", json.decode([["caf\u00e9 \ud83d\ude00"]]))
    assert.are.equal("caf\u{e9}", json.decode('"caf\u{e9}"'))
  end)

  it("returns nil and a message for what is not JSON", function()
    for _, bad in ipairs{ "", "  ", "01", "1.", ".5", "-", "1e", "+1", "0x10", "NaN", "Infinity", "[1,]", "{\"a\":1,}",
        "{a:1}", "'a'", "\"a", "\"a\tb\"", "[1 2]", "true false", "tru", "\"\\ud83d\"", "\"\\x\"",
        string.rep("[", 1001) .. string.rep("]", 1001) } do
      local v, err = json.decode(bad)
      assert.is_nil(v, bad)
      assert.matches("^json", err, 1, false, bad)
    end
    assert.is_nil((json.decode(nil)))
  end)

  it("round-trips what it encodes", function()
    local value = { n = 42, big = 9007199254740993, f = 0.25, s = "x\ny", list = { 1, 2.5, "three" }, yes = true }
    local back = json.decode(json.encode(value))
    assert.are.same(value, back)
    assert.are.equal("integer", math.type(back.big))
    assert.are.equal("float", math.type(back.f))
    -- the encoder writes an integral float as an integer (DMS's integer fields
    -- take no "5.0"): it comes back an integer
    assert.are.equal("integer", math.type(json.decode(json.encode(5.0))))
  end)
end)

describe("the journal", function()
  it("gives back the integers it was given", function()
    local dir = tmp.dir("json")
    local J = assert(journal.open(dir))
    local S = J:step("full", "load")
    S.status = "done"
    S.facts = { loaded = { ["public.t"] = { rows = 123456789, bytes = 9007199254740993, stream = 2, seconds = 1.5 } },
                chunks = { ["public.t"] = { plan = { count = 16, lo = -9223372036854775807 }, done = { ["3"] = { chunk = 3 } } } } }
    assert(J:save())
    local again = assert(journal.open(dir))
    local facts = again:step("full", "load").facts
    local r = facts.loaded["public.t"]
    assert.are.same({ "integer", 123456789 }, typed(r.rows))
    assert.are.same({ "integer", 9007199254740993 }, typed(r.bytes))
    assert.are.same({ "integer", 2 }, typed(r.stream))
    assert.are.same({ "float", 1.5 }, typed(r.seconds))
    local cs = facts.chunks["public.t"]
    assert.are.same({ "integer", 16 }, typed(cs.plan.count))
    assert.are.same({ "integer", -9223372036854775807 }, typed(cs.plan.lo))
    assert.are.same({ "integer", 3 }, typed(cs.done["3"].chunk))
    proc.run{ "rm", "-rf", dir }
  end)
end)
