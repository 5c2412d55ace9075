-- Runs the migrun binary under test (MIGRUN_BIN) the way a user would, for the
-- command-line and REPL specs, and compares output with golden files.
--
--   cli.run(args, stdin, env, merge) -> stdout, stderr, exit_code, how
--     args   argv after the program name
--     stdin  text fed to stdin (nil: empty stdin, not a terminal)
--     env    added to the environment (false removes a variable); LUA_INIT,
--            LUA_INIT_5_4 and MIGRUN_LUA_PATH are removed unless given here,
--            so a developer's environment does not change the results
--     merge  stderr goes into stdout (a transcript in the order written)
--   cli.normalize(text, tmpdir) -> text with the binary's path shown as
--     "migrun" (it is the program name in messages) and tmpdir as "$TMP"
--   cli.golden(name, text) asserts text equals tests/golden/<name>.txt;
--     MIGRUN_UPDATE_GOLDEN=1 rewrites the file instead.
--   cli.tmpdir() -> a new empty directory; cli.rmtree(dir)
--   cli.write(path, text)
local proc = require "migrun.proc"
local assert = require "luassert" -- helpers do not get busted's globals

local M = {}

M.bin = os.getenv("MIGRUN_BIN") or "build/migrun"
M.source = os.getenv("MIGRUN_SOURCE_DIR") or "."
M.sanitize = os.getenv("MIGRUN_SANITIZE") == "1"
-- generous: the sanitizer build starts slowly on a busy machine
M.timeout = M.sanitize and 120 or 30

local function merged_env(env)
    local e = { LUA_INIT = false, LUA_INIT_5_4 = false, MIGRUN_LUA_PATH = false }
    for k, v in pairs(env or {}) do e[k] = v end
    return e
end

function M.run(args, stdin, env, merge)
    local argv = { M.bin, table.unpack(args) }
    argv.stdin = stdin or false
    argv.env = merged_env(env)
    argv.timeout = M.timeout
    if merge then argv.stderr = "stdout" end
    local ok, how, code, out, err = proc.run(argv)
    if ok == nil and how == "timeout" then
        error("timed out: " .. proc.quote(argv))
    elseif ok == nil and type(how) ~= "string" then
        error(tostring(how)) -- could not spawn
    end
    return out or "", err or "", code, how
end

--- Runs a pipeline (each stage an argv table) feeding stdin to the first
-- stage; returns stdout, stderr, exit code of the last stage.
function M.pipeline(stages, env)
    local spec = { stdout = "capture", stderr = "capture", env = merged_env(env) }
    for i, s in ipairs(stages) do spec[i] = s end
    local h = assert(proc.pipeline(spec))
    local ok, how, code = h:wait(M.timeout)
    if ok == nil and how == "timeout" then
        h:close()
        error("timed out")
    end
    local out, err = h.stdout, h.stderr
    h:close()
    return out or "", err or "", code, how
end

local function plain(s)
    return (s:gsub("[%p]", "%%%0"))
end

function M.normalize(text, tmpdir)
    if tmpdir then text = text:gsub(plain(tmpdir), "$TMP") end
    return (text:gsub(plain(M.bin), "migrun"))
end

function M.read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

function M.write(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

function M.golden(name, text)
    local path = M.source .. "/tests/golden/" .. name .. ".txt"
    if os.getenv("MIGRUN_UPDATE_GOLDEN") == "1" then
        M.write(path, text)
        return
    end
    local f = io.open(path, "rb")
    assert(f, "no golden file " .. path .. " (run with MIGRUN_UPDATE_GOLDEN=1 to create it)")
    local expected = f:read("a")
    f:close()
    assert.are.equal(expected, text)
end

function M.tmpdir()
    local ok, _, _, out = proc.run{ "mktemp", "-d", "/tmp/migrun-cli.XXXXXX" }
    assert(ok, "mktemp failed")
    return (out:gsub("\n$", ""))
end

function M.rmtree(dir)
    assert(dir:match("^/tmp/migrun%-cli%."), "refusing to remove " .. dir)
    proc.run{ "rm", "-rf", "--", dir }
end

return M
