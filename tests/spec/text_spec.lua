local text = require "migrun.text"

describe("migrun.text", function()
  it("prints sizes one way everywhere: 1024-based, one decimal", function()
    assert.equal("0 B", text.bytes(0))
    assert.equal("512 B", text.bytes(512))
    assert.equal("1023 B", text.bytes(1023))
    assert.equal("1.0 KiB", text.bytes(1024))
    assert.equal("1.5 KiB", text.bytes(1536))
    assert.equal("200.0 MiB", text.bytes(200 * 2 ^ 20))
    assert.equal("287.9 MiB", text.bytes(287.9 * 2 ^ 20))
    assert.equal("3.0 GiB", text.bytes(3 * 2 ^ 30))
    assert.equal("-2.0 KiB", text.bytes(-2048))
    assert.equal("?", text.bytes(nil))
    assert.equal("inf", text.bytes(math.huge))
  end)

  it("prints durations", function()
    assert.equal("0.3 s", text.duration(0.31))
    assert.equal("42.0 s", text.duration(42))
    assert.equal("1 min 00 s", text.duration(59.97))
    assert.equal("3 min 07 s", text.duration(187))
    assert.equal("2 h 05 min", text.duration(2 * 3600 + 5 * 60 + 20))
  end)

  it("reads ISO 8601 UTC times as Unix time, whatever the machine's time zone (the one date parser)", function()
    assert.equal(0, text.epoch("1970-01-01T00:00:00Z"))
    assert.equal(1440938160, text.epoch("2015-08-30T12:36:00Z"))
    assert.equal(951868800, text.epoch("2000-03-01T00:00:00Z")) -- after a leap day of a century's year
    assert.equal(951782400, text.epoch("2000-02-29T00:00:00Z"))
    assert.equal(-86400, text.epoch("1969-12-31T00:00:00Z"))
    assert.equal(4107542400, text.epoch("2100-03-01T00:00:00Z")) -- 2100 is no leap year
    assert.equal("integer", math.type(text.epoch("2026-11-21T12:01:03Z")))
    -- SigV4's basic format, a fraction, an offset, no zone (UTC)
    assert.equal(text.epoch("2026-11-21T12:01:03Z"), text.epoch("20261121T120103Z"))
    assert.equal(text.epoch("2026-11-21T12:01:03Z"), text.epoch("2026-11-21T12:01:03.999Z"))
    assert.equal(text.epoch("2026-11-21T12:01:03Z"), text.epoch("2026-11-21T14:01:03+02:00"))
    assert.equal(text.epoch("2026-11-21T12:01:03Z"), text.epoch("2026-11-21T07:01:03-0500"))
    assert.equal(text.epoch("2026-11-21T12:01:03Z"), text.epoch("2026-11-21T12:01:03"))
    for _, bad in ipairs{ "yesterday", "2026-11-21", "2026-11-21T12:01:03 UTC", "2026-11-21T12:01:03+2", 42 } do
      assert.is_nil(text.epoch(bad), tostring(bad))
    end
    -- the same as the machine's own clock reading of a UTC date
    local now = os.time()
    assert.equal(now, text.epoch(os.date("!%Y-%m-%dT%H:%M:%SZ", now)))
  end)

  it("groups thousands and names tables", function()
    assert.equal("1,234,567", text.thousands(1234567))
    assert.equal("-1,000", text.thousands(-1000))
    assert.equal("12", text.thousands(12))
    assert.equal("public.a", text.key{ schema = "public", name = "a" })
    assert.equal("given.key", text.key{ key = "given.key", schema = "public", name = "a" })
    assert.equal("My Schema.t", text.key("My Schema", "t"))
  end)

  it("reads a key back into its schema and name, at the first dot", function()
    assert.same({ "public", "a" }, { text.split_key("public.a") })
    assert.same({ "My Schema", "t.with.dots" }, { text.split_key(text.key("My Schema", "t.with.dots")) })
    assert.same({ "s", "t" }, { text.split_key{ schema = "s", name = "t" } })
    assert.is_nil(text.split_key("nodot"))
    assert.is_nil(text.split_key(".t"))
    assert.is_nil(text.split_key("s."))
    assert.is_nil(text.split_key{ schema = "s" })
    assert.is_nil(text.split_key(42))
  end)

  it("aligns rows, the last column unpadded", function()
    assert.same({ "a    bb  c", "ccc  d   eeee" }, text.aligned{ { "a", "bb", "c" }, { "ccc", "d", "eeee" } })
  end)

  it("prints records as columns with titles, a rule and a count", function()
    local t = text.columns({ { "name", "slot" }, { "bytes", align = "right" }, { "ok" } },
      { { name = "dms_slot_01", bytes = 1024, ok = true }, { name = "s2", bytes = 3, ok = false } },
      { noun = { "slot", "slots" }, notes = { "a note" } })
    assert.equal(table.concat({
      "slot         bytes  ok",
      "-----------  -----  ---",
      "dms_slot_01   1024  yes",
      "s2               3  no",
      "(2 slots)",
      "a note",
    }, "\n"), tostring(t))
    assert.equal("dms_slot_01", t[1].name)
    assert.equal("nothing", tostring(text.columns({ { "a" } }, {}, { empty = "nothing" })))
  end)

  it("aligns Markdown tables, numbers to the right, and escapes pipes", function()
    local md = text.markdown({ "table", { "n", "rows" } },
      { { "public.a|b", 5 }, { table = "public.longer_name", n = 12345 } })
    assert.equal(table.concat({
      "| table              |  rows |",
      "| ------------------ | ----: |",
      "| public.a\\|b        |     5 |",
      "| public.longer_name | 12345 |",
    }, "\n") .. "\n", md)
  end)
end)
