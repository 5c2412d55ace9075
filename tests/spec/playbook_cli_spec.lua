local cli = require "migrun.playbook.cli"

local SPEC = {
  usage = "migrun thing.lua", about = "Does a thing",
  options = {
    { "--scale", "N", "how big", default = 1, number = true },
    { "--dir", "DIR", "where" },
    { "--yes", nil, "do not ask" },
  },
  args = { { "slot", "the slot" } },
}

describe("migrun.playbook.cli", function()
  it("parses options, flags, values given with = and positional arguments by name", function()
    local o = assert(cli.parse(SPEC, { "--scale", "2.5", "--dir=/tmp/x", "--yes", "dms_slot_01" }))
    assert.equal(2.5, o.scale)
    assert.equal("/tmp/x", o.dir)
    assert.is_true(o.yes)
    assert.equal("dms_slot_01", o.args[1])
    assert.equal("dms_slot_01", o.args.slot)
    o = assert(cli.parse(SPEC, { "s" }))
    assert.equal(1, o.scale)
    assert.is_nil(o.yes)
    o = assert(cli.parse(SPEC, { "--", "--not-an-option" }))
    assert.equal("--not-an-option", o.args.slot)
  end)

  it("refuses what it does not know, with a usage error", function()
    for argv, pattern in pairs{
      [{ "--bogus", "s" }] = "unknown option %-%-bogus",
      [{ "--scale" }] = "%-%-scale needs a value",
      [{ "--scale", "big", "s" }] = "%-%-scale takes a number",
      [{ "--yes=1", "s" }] = "%-%-yes takes no value",
      [{}] = "missing <slot>: the slot",
      [{ "a", "b" }] = 'unexpected argument "b"',
    } do
      local o, err = cli.parse(SPEC, argv)
      assert.is_nil(o)
      assert.equal("usage", err.kind)
      assert.matches(pattern, tostring(err))
    end
  end)

  -- issue 21: partial_restart's slot names its journal section and report file
  it("refuses a positional argument its check refuses, before anything uses it", function()
    local spec = { usage = "migrun thing.lua", args = { { "slot", "the slot",
      check = function(v) if not v:match("^[a-z0-9_]+$") then return "not a slot name" end end } } }
    assert.equal("dms_slot_01", assert(cli.parse(spec, { "dms_slot_01" })).args.slot)
    local o, err = cli.parse(spec, { "dms_slot_01; drop table x" })
    assert.is_nil(o)
    assert.equal("usage", err.kind)
    assert.matches('<slot> "dms_slot_01; drop table x": not a slot name', tostring(err))
  end)

  it("takes --help anywhere, without the positional arguments", function()
    assert.is_true(assert(cli.parse(SPEC, { "--dir", "x", "--help" })).help)
  end)

  it("generates the help from the declaration", function()
    assert.equal(table.concat({
      "usage: migrun thing.lua [options] <slot>",
      "",
      "Does a thing",
      "",
      "arguments:",
      "  <slot>               the slot",
      "",
      "options:",
      "  --scale N            how big (default 1)",
      "  --dir DIR            where",
      "  --yes                do not ask",
      "  --help               this help",
      "",
      "steps: ...",
    }, "\n") .. "\n", cli.help(SPEC, "steps: ..."))
  end)
end)
