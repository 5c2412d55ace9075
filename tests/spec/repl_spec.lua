-- The REPL: completion candidates (migrun.repl.complete), sessions piped through
-- stdin (compared with tests/golden/repl_*.txt), and sessions on a
-- pseudo-terminal made by script(1) from util-linux, for line editing,
-- completion, history and Ctrl-C.
local cli = require "helpers.cli"
local complete = require("migrun.repl.complete").complete
local lsn = require "migrun.lsn"

describe("migrun.repl.complete", function()
    it("completes globals and keywords", function()
        assert.same({ "string" }, complete("stri"))
        assert.same({ "function" }, complete("functio"))
        local env = { alpha = 1, alps = 2, beta = 3 }
        assert.same({ "alpha", "alps", "and" }, complete("a", env))
    end)

    it("completes fields after '.'", function()
        assert.same({ "string.format" }, complete("string.fo"))
        local env = { cfg = { source = { host = "h", port = 1 }, target = {} } }
        assert.same({ "cfg.source.host" }, complete("cfg.source.h", env))
        assert.same({ "cfg.source", "cfg.target" }, complete("cfg.", env))
    end)

    it("completes methods after ':' through metatable __index tables", function()
        local env = { x = lsn("0/10"), s = "text" }
        local got = complete("x:", env)
        assert.truthy(#got > 0)
        local found = false
        for _, c in ipairs(got) do
            assert.matches("^x:", c)
            if c == "x:tonumber" then found = true end
        end
        assert.is_true(found)
        assert.same({ "x:tonumber", "x:tostring" }, complete("x:to", env))
        assert.same({ "s:upper" }, complete("s:up", env))
    end)

    it("offers only functions after ':'", function()
        local obj = setmetatable({ name = "n" }, { __index = { run = function() end, kind = "k" } })
        assert.same({ "o.kind", "o.name", "o.run" }, complete("o.", { o = obj }))
        assert.same({ "o:run" }, complete("o:", { o = obj }))
    end)

    it("runs no user code and offers nothing it cannot resolve", function()
        local called = false
        local lazy = setmetatable({}, { __index = function() called = true end })
        local env = { lazy = lazy, n = 42 }
        assert.same({}, complete("lazy.x", env))
        assert.same({}, complete("missing.x", env))
        assert.same({}, complete("n.x", env))
        assert.same({}, complete("a..b", env))
        assert.same({}, complete("f().x", env))
        assert.is_false(called)
    end)
end)

describe("the REPL on piped stdin", function()
    local tmp
    setup(function() tmp = cli.tmpdir() end)
    teardown(function() cli.rmtree(tmp) end)

    it("prints expressions, runs multi-line statements and goes on after errors", function()
        local session = [[
1 + 1
"a string with \"quotes\"\n"
return 1, nil, "three"
t = { name = "source", ports = { 5432, 5433 }, [10] = true }
t
big = {} for i = 1, 25 do big[i] = i * i end
big
t.self = t
t
function double(x)
  return x * 2
end
double(21)
error("boom")
error(setmetatable({}, { __tostring = function() return "custom error object" end }))
require("migrun.error").new{ where = "target 4711", code = "23505", message = "duplicate key" }
x = = 1
print("still running", double(2))
local l = require("migrun.lsn")("16/B374D848") return { at = l, next = l + 8 }
for i = 1, 3 do
  io.write(i, " ")
end print()
]]
        local out, _, code = cli.run({ "-i" }, session, nil, true)
        assert.equal(0, code)
        cli.golden("repl_session", cli.normalize(out))
    end)

    it("enters the REPL after -e and a script with -i", function()
        local path = tmp .. "/setup.lua"
        cli.write(path, "from_script = 'script'\n")
        local out, err, code = cli.run({ "-e", "from_e = 'e'", "-i", path }, "from_e .. ' ' .. from_script\n")
        assert.equal("", err)
        assert.equal(0, code)
        assert.equal('"e script"\n', out)
    end)

    it("reports an unfinished chunk at end of input", function()
        local out, err, code = cli.run({ "-i" }, "x = 1\nfunction f()\n  return 1\n")
        assert.equal(0, code)
        assert.equal("", out)
        assert.equal("migrun: stdin:2: 'end' expected (to close 'function' at line 1) near <eof>\n",
            cli.normalize(err))
    end)

    it("prints nothing for empty input", function()
        local out, err, code = cli.run({ "-i" }, "")
        assert.equal(0, code)
        assert.equal("", out)
        assert.equal("", err)
    end)
end)

describe("the REPL on a terminal", function()
    local tmp, script_bin
    setup(function()
        tmp = cli.tmpdir()
        local ok, _, _, out = require("migrun.proc").run{ "sh", "-c", "command -v script" }
        script_bin = ok and out:match("^(%S+)")
    end)
    teardown(function() cli.rmtree(tmp) end)

    -- Runs migrun -i on a pseudo-terminal with script(1); feed is a list of
    -- strings written to the terminal with a pause before each (so Ctrl-C
    -- arrives while migrun waits at the prompt or runs a command).
    local function on_terminal(feed, pause)
        local proc = require "migrun.proc"
        pause = pause * (cli.sanitize and 3 or 1)
        local feeder_path = tmp .. "/feeder.lua"
        cli.write(feeder_path, [[
local proc = require "migrun.proc"
for i = 1, #arg, 2 do
    proc.run{ "sleep", arg[i] }
    io.write(arg[i + 1])
    io.flush()
end
proc.run{ "sleep", arg[#arg - 1] }
]])
        local feeder = { cli.bin, feeder_path }
        for _, s in ipairs(feed) do
            feeder[#feeder + 1] = tostring(pause)
            feeder[#feeder + 1] = s
        end
        -- script(1) runs its command through $SHELL -c: quoted from an argv,
        -- and exec'd so no shell shares the terminal's SIGINTs
        local command = "exec " .. proc.quote{ cli.bin, "-i" }
        local history = tmp .. "/history"
        local out, err, code = cli.pipeline({ feeder, { script_bin, "-qec", command, "/dev/null" } },
            { SHELL = "/bin/sh", TERM = "xterm", MIGRUN_HISTORY = history })
        return out:gsub("\r", ""), err, code, history
    end

    it("completes names with TAB, keeps a 0600 history and survives Ctrl-C", function()
        if not script_bin then
            pending("script(1) from util-linux is not installed")
            return
        end
        local out, err, code, history = on_terminal({
            'string.fo\t("%d", 42)\n',
            'l = require("migrun.lsn")("0/10")\n',
            "l:tonu\t()\n",
            "this line is dropped\3",
            "'after ctrl-c at the prompt'\n",
            "while true do end\n",
            "\3",
            "'after interrupting a command'\n",
        }, 0.6)
        local transcript = out .. err
        assert.equal(0, code, transcript)
        assert.matches('\n"42"\n', out, 1, true)           -- string.format("%d", 42)
        assert.matches("\n16\n", out, 1, true)             -- l:tonumber()
        assert.matches('\n"after ctrl-c at the prompt"\n', out, 1, true)
        assert.not_matches("attempt to call", out, 1, true)
        assert.not_matches("near 'line'", out, 1, true)     -- the dropped line never ran
        assert.matches("interrupted!", out, 1, true)
        assert.matches('\n"after interrupting a command"\n', out, 1, true)

        local ok, _, _, mode = require("migrun.proc").run{ "stat", "-c", "%a", history }
        assert.truthy(ok)
        assert.equal("600\n", mode)
        local saved = cli.read(history)
        assert.matches('string.format("%d",', saved, 1, true)
        assert.matches("l:tonumber()", saved, 1, true)
    end)
end)
