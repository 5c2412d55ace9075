-- migrun.repl.pretty: the printer the REPL uses for results.
local pretty = require "migrun.repl.pretty"
local lsn = require "migrun.lsn"
local fmt = pretty.format

describe("migrun.repl.pretty", function()
    it("prints scalars like Lua, strings quoted", function()
        assert.equal("nil", fmt(nil))
        assert.equal("true", fmt(true))
        assert.equal("42", fmt(42))
        assert.equal("1.5", fmt(1.5))
        assert.equal("1.0", fmt(1.0))
        assert.equal('"hi"', fmt("hi"))
    end)

    it("escapes quotes, backslashes, newlines and control bytes", function()
        assert.equal([["say \"hi\"\n\tbye\\"]], fmt('say "hi"\n\tbye\\'))
        assert.equal([["a\000b\0271"]], fmt("a\0b\0271"))
        assert.equal('"é"', fmt("é")) -- UTF-8 kept as is
    end)

    it("prints short tables on one line with sorted keys", function()
        assert.equal("{}", fmt({}))
        assert.equal("{ 1, 2, 3 }", fmt({ 1, 2, 3 }))
        assert.equal('{ a = 1, b = "x", z = false }', fmt({ z = false, b = "x", a = 1 }))
        assert.equal('{ 1, 2, n = 2 }', fmt({ 1, 2, n = 2 }))
        assert.equal('{ [1.5] = 1, [10] = 2, ["a b"] = 3, ["end"] = 4, [true] = 5 }',
            fmt({ [true] = 5, ["end"] = 4, ["a b"] = 3, [10] = 2, [1.5] = 1 }))
    end)

    it("indents nested tables that do not fit on a line", function()
        local t = {
            name = "source",
            databases = { "app", "billing" },
            settings = { wal_level = "logical", max_replication_slots = 10,
                         shared_preload_libraries = "pglogical" },
        }
        assert.equal([[
{
  databases = { "app", "billing" },
  name = "source",
  settings = {
    max_replication_slots = 10,
    shared_preload_libraries = "pglogical",
    wal_level = "logical",
  },
}]], fmt(t))
    end)

    it("elides long arrays after max_items", function()
        local t = {}
        for i = 1, 50 do t[i] = i end
        assert.equal([[
{
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
  ... (30 more)
}]], fmt(t))
        assert.equal("{ 1, 2, ... (48 more) }", fmt(t, { max_items = 2 }))
    end)

    it("marks cycles, but prints a table shared by siblings twice", function()
        local t = { name = "loop" }
        t.self = t
        t.list = { t }
        assert.equal('{ list = { <cycle> }, name = "loop", self = <cycle> }', fmt(t))
        local shared = { 1 }
        assert.equal("{ a = { 1 }, b = { 1 } }", fmt({ a = shared, b = shared }))
    end)

    it("stops at max_depth", function()
        assert.equal("{ a = { b = {...} } }", fmt({ a = { b = { c = 1 } } }, { max_depth = 2 }))
    end)

    it("prints values with __tostring through it", function()
        local x = lsn("16/B374D848")
        assert.equal("16/B374D848", fmt(x))
        assert.equal("{ from = 0/0, to = 16/B374D848 }", fmt({ from = lsn("0/0"), to = x }))
        local obj = setmetatable({ secret = 1 }, { __tostring = function() return "Obj<1>" end })
        assert.equal("Obj<1>", fmt(obj))
        assert.equal("{ secret = 1 }", fmt(obj, { raw = true }))
        local bad = setmetatable({}, { __tostring = function() error("no") end })
        assert.equal("<table: __tostring failed>", fmt(bad))
    end)

    it("prints userdata without __tostring by type name", function()
        assert.matches("^file %(0x%x+%)$", fmt(io.stdout))
    end)

    it("print writes every value tab-separated", function()
        local out = {}
        local real = io.stdout
        local fake = { write = function(_, ...) for _, s in ipairs({ ... }) do out[#out + 1] = s end end,
                       flush = function() end }
        io.stdout = fake ---@diagnostic disable-line
        local ok, err = pcall(pretty.print, 1, "a", nil, { 2 })
        io.stdout = real
        assert(ok, err)
        assert.equal('1\t"a"\tnil\t{ 2 }\n', table.concat(out))
    end)
end)
