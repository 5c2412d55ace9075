-- The migrun command line, run as a user runs it: options, scripts, stdin,
-- LUA_INIT, MIGRUN_LUA_PATH, errors and exit codes. Outputs are compared with
-- tests/golden/*.txt (MIGRUN_UPDATE_GOLDEN=1 rewrites them).
local cli = require "helpers.cli"

describe("migrun command line", function()
    local tmp
    setup(function() tmp = cli.tmpdir() end)
    teardown(function() cli.rmtree(tmp) end)

    local function script(name, text)
        local path = tmp .. "/" .. name
        cli.write(path, text)
        return path
    end

    describe("-v", function()
        it("prints the versions of migrun and its libraries", function()
            local out, err, code = cli.run{ "-v" }
            assert.equal(0, code)
            assert.equal("", err)
            local lines = {}
            for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
            assert.equal(5, #lines, out)
            assert.matches("^migrun %d+%.%d+%.%d+$", lines[1])
            assert.matches("^  Lua 5%.4%.%d+$", lines[2])
            assert.matches("^  libpq %d+%.%d+$", lines[3])
            assert.matches("^  libcurl %d+%.%d+%.%d+", lines[4])
            assert.matches("^  OpenSSL %d+%.%d+%.%d+", lines[5])
        end)

        it("prints them before running -e", function()
            local out, _, code = cli.run{ "-v", "-e", "print('after')" }
            assert.equal(0, code)
            assert.matches("^migrun .*\nafter\n$", out)
        end)
    end)

    describe("-e", function()
        it("runs statements in order in one state", function()
            local out, err, code = cli.run{ "-e", "x = 20", "-e", "print(x + 1)", "-eprint(x * 2)" }
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("21\n40\n", out)
        end)

        it("stops at the first error with status 1", function()
            local out, err, code = cli.run{ "-e", "print(1)", "-e", "error('boom')", "-e", "print(2)" }
            assert.equal(1, code)
            assert.equal("1\n", out)
            cli.golden("cli_e_error", cli.normalize(err))
        end)

        it("reports syntax errors with status 1", function()
            local out, err, code = cli.run{ "-e", "x =" }
            assert.equal(1, code)
            assert.equal("", out)
            assert.equal("migrun: (command line):1: unexpected symbol near <eof>\n", cli.normalize(err))
        end)
    end)

    describe("-l", function()
        it("requires a dotted module into the global named by its last part", function()
            local out, err, code = cli.run{ "-l", "migrun.lsn", "-e", "print(lsn('0/10') + 1)" }
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("0/11\n", out)
        end)

        it("requires into a chosen global with g=mod", function()
            local out, err, code = cli.run{ "-lL=migrun.lsn", "-e", "print(L.is(L('0/1')), lsn)" }
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("true\tnil\n", out)
        end)

        it("fails with status 1 for a missing module", function()
            local out, err, code = cli.run{ "-l", "no.such.module", "-e", "print('not reached')" }
            assert.equal(1, code)
            assert.equal("", out)
            assert.matches("^migrun: module 'no.such.module' not found:", cli.normalize(err))
        end)
    end)

    describe("scripts", function()
        it("get arg and ... with their arguments", function()
            local path = script("args.lua", [[
print(select("#", ...), ...)
print(arg[0] == SELF, arg[1], arg[2], #arg)
]])
            local out, err, code = cli.run{ "-e", "SELF=" .. string.format("%q", path), path, "one", "two words" }
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("2\tone\ttwo words\ntrue\tone\ttwo words\t2\n", out)
        end)

        it("see the options before the script at negative indices", function()
            local path = script("neg.lua", "print(arg[-3] == os.getenv('MIGRUN_BIN'), arg[-2], arg[-1])")
            local out, _, code = cli.run({ "-e", "x=1", path }, nil, { MIGRUN_BIN = cli.bin })
            assert.equal(0, code)
            assert.equal("true\t-e\tx=1\n", out)
        end)

        it("return status 0 when they end normally, whatever they return", function()
            local _, _, code = cli.run{ script("ret.lua", "return false") }
            assert.equal(0, code)
        end)

        it("run from stdin with '-', with arguments", function()
            local out, err, code = cli.run({ "-", "x", "y" }, "print(#arg, arg[0], ...)\n")
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("2\t-\tx\ty\n", out)
        end)

        it("run from stdin when there is no script and stdin is not a terminal", function()
            local out, _, code = cli.run({}, "print('from stdin')\n")
            assert.equal(0, code)
            assert.equal("from stdin\n", out)
        end)

        it("fail with status 1 and a traceback on stderr", function()
            local path = script("fail.lua", [[
local function inner() error("something broke") end
local function outer() inner() end
outer()
print("not reached")
]])
            local out, err, code = cli.run{ path }
            assert.equal(1, code)
            assert.equal("", out)
            cli.golden("cli_script_error", cli.normalize(err, tmp))
        end)

        it("print error objects through __tostring", function()
            local path = script("errobj.lua", [[
local E = require "migrun.error"
error(E.new{ kind = "sql", where = "target 4711", code = "23505",
             message = "duplicate key value", detail = "Key (id)=(1) already exists." })
]])
            local out, err, code = cli.run{ path }
            assert.equal(1, code)
            assert.equal("", out)
            assert.equal("migrun: [target 4711] 23505 duplicate key value DETAIL: Key (id)=(1) already exists.\n",
                cli.normalize(err))
            local _, err2, code2 = cli.run{ "-e", "error(setmetatable({}, {__tostring = function() return 'custom' end}))" }
            assert.equal(1, code2)
            assert.equal("migrun: custom\n", cli.normalize(err2))
        end)

        it("report error objects without __tostring by type", function()
            local _, err, code = cli.run{ "-e", "error({})" }
            assert.equal(1, code)
            assert.matches("^migrun: %(error object is a table value%)\nstack traceback:\n", cli.normalize(err))
        end)

        it("fail with status 1 on a syntax error, running nothing", function()
            local path = script("syntax.lua", "print('ran')\nlocal x = = 1\n")
            local out, err, code = cli.run{ path }
            assert.equal(1, code)
            assert.equal("", out)
            assert.equal("migrun: $TMP/syntax.lua:2: unexpected symbol near '='\n", cli.normalize(err, tmp))
        end)

        it("fail with status 1 when the file does not exist", function()
            local out, err, code = cli.run{ tmp .. "/missing.lua" }
            assert.equal(1, code)
            assert.equal("", out)
            assert.equal("migrun: cannot open $TMP/missing.lua: No such file or directory\n", cli.normalize(err, tmp))
        end)
    end)

    describe("options", function()
        it("print the usage on an unknown option, with status 1", function()
            local out, err, code = cli.run{ "-z" }
            assert.equal(1, code)
            assert.equal("", out)
            cli.golden("cli_usage", cli.normalize(err))
        end)

        it("say which option needs an argument", function()
            local _, err, code = cli.run{ "-e" }
            assert.equal(1, code)
            assert.matches("^migrun: '%-e' needs argument\nusage:", cli.normalize(err))
        end)

        it("stop at --", function()
            local path = script("dash.lua", "print(...)")
            local out, _, code = cli.run{ "--", path, "-e" }
            assert.equal(0, code)
            assert.equal("-e\n", out)
        end)
    end)

    describe("LUA_INIT", function()
        it("runs before -e", function()
            local out, err, code = cli.run({ "-e", "print(x)" }, nil, { LUA_INIT = "x = 'init'" })
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("init\n", out)
        end)

        it("runs a file with @file", function()
            local path = script("init.lua", "y = 'from file'")
            local out, _, code = cli.run({ "-e", "print(y)" }, nil, { LUA_INIT = "@" .. path })
            assert.equal(0, code)
            assert.equal("from file\n", out)
        end)

        it("prefers LUA_INIT_5_4", function()
            local out = cli.run({ "-e", "print(x)" }, nil, { LUA_INIT = "x = 1", LUA_INIT_5_4 = "x = 54" })
            assert.equal("54\n", out)
        end)

        it("is ignored with -E", function()
            local out, _, code = cli.run({ "-E", "-e", "print(x)" }, nil, { LUA_INIT = "x = 'init'" })
            assert.equal(0, code)
            assert.equal("nil\n", out)
        end)

        it("stops migrun with status 1 when it fails", function()
            local out, err, code = cli.run({ "-e", "print('not reached')" }, nil, { LUA_INIT = "error('bad init')" })
            assert.equal(1, code)
            assert.equal("", out)
            assert.matches("^migrun: LUA_INIT:1: bad init\n", cli.normalize(err))
        end)
    end)

    describe("MIGRUN_LUA_PATH", function()
        local probe = "print(require('migrun.repl.pretty').shadowed)"
        local dev
        setup(function()
            dev = tmp .. "/lua"
            assert(require("migrun.proc").run{ "mkdir", "-p", dev .. "/migrun/repl" })
            cli.write(dev .. "/migrun/repl/pretty.lua", "return { shadowed = 'from the tree' }\n")
            cli.write(dev .. "/migrun/extra.lua", "return 'extra module'\n")
        end)

        it("puts an on-disk tree before the embedded library", function()
            local out, err, code = cli.run({ "-e", probe, "-e", "print((require 'migrun.extra'))" },
                nil, { MIGRUN_LUA_PATH = dev })
            assert.equal("", err)
            assert.equal(0, code)
            assert.equal("from the tree\nextra module\n", out)
        end)

        it("leaves the embedded library when unset", function()
            local out = cli.run{ "-e", probe }
            assert.equal("nil\n", out)
        end)

        it("is ignored with -E", function()
            local out = cli.run({ "-E", "-e", probe }, nil, { MIGRUN_LUA_PATH = dev })
            assert.equal("nil\n", out)
        end)
    end)
end)
