-- Children get only what they need (docs/environment.md): full.lua run as a
-- team runs it from a shell whose environment holds secrets the
-- configuration never reads (the target's password in TARGET_PASSWORD while
-- the conninfo names a passfile, another tool's token, a PGPASSWORD that
-- libpq would use), and the AWS keys the playbook needs for DMS. Every
-- process the run starts is found while it lives (its descendants, read from
-- /proc every 50 ms) and its /proc/PID/environ read: the pool's workers,
-- pg_dump, pg_restore, psql, the WAL guard, the metrics server; a notify
-- command writes its own. None holds a secret or an AWS variable; each has
-- what it needs (the run ends ready for cutover).
local H = require "helpers.rehearsal"
local proc = require "migrun.proc"
local procs = require "helpers.procs"
local host = require "migrun.host"

describe("the environment of every child of a playbook run", function()
  local R, dump

  setup(function()
    local dir = H.tmpdir("e2e-env-dump")
    dump = dir .. "/notify-env"
    R = H.rehearsal("e2e-env", { config = {
      metrics = { listen = "127.0.0.1:0", interval = 1 },
      -- the guard warns at once: a notify command runs
      wal_guard = { interval = 2, warn_bytes = 1 },
      notify = { command = { H.MIGRUN, H.ROOT .. "/tests/helpers/env_dump.lua", dump }, events = { "wal_guard_warn" } },
    } })
  end)
  teardown(function() if R then R:close() end end)

  local SECRETS = { TARGET_PASSWORD = "tgt-S3CRET-4711", MY_API_TOKEN = "tok-S3CRET-0815" }

  it("holds no secret and no AWS variable in any child; the run works with what they get", function()
    local env = {}
    for k, v in pairs(R.env) do env[k] = v end -- the AWS keys and region DMS needs
    for k, v in pairs(SECRETS) do env[k] = v end
    env.PGPASSWORD = R.lab.password -- libpq's own: serves the playbook, never its children
    local argv = { H.MIGRUN, H.ROOT .. "/playbooks/full.lua", "--config", R.config_path, "--yes", env = env,
      stdin = false, stderr = "stdout" }
    local lines = {}
    argv.stdout = function(line) lines[#lines + 1] = line end
    local h = assert(proc.spawn(argv))
    local seen = {} -- pid -> { cmdline, environ }
    local deadline = host.monotonic() + 900
    local ok, how
    repeat
      for _, pid in ipairs(procs.descendants(h.pid)) do
        if not seen[pid] then
          local function cmdline() return (host.read_file("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ") end
          local before = cmdline()
          local environ = host.read_file("/proc/" .. pid .. "/environ")
          local after = cmdline()
          -- a process caught between fork and exec still has migrun's: read it again once it has exec'd
          -- (its command line the same before and after its environment was read: no exec in between)
          if environ and environ ~= "" and before ~= "" and before == after
              and not before:find("playbooks/full.lua", 1, true) then
            seen[pid] = { cmdline = before, environ = environ }
          end
        end
      end
      ok, how = h:wait(0.05)
    until how ~= "timeout" or host.monotonic() > deadline
    h:close()
    local output = table.concat(lines, "\n")
    assert.is_true(ok, output)
    assert.truthy(output:find("READY FOR CUTOVER", 1, true), output)

    local kinds = {}
    local function kind(cmdline)
      for _, k in ipairs{ "migrun.pool", "migrun.guard", "migrun.playbook.metrics", "pg_dump", "pg_restore", "psql" } do
        if cmdline:find(k, 1, true) then return k end
      end
      return cmdline:match("^(%S+)") or "?"
    end
    for pid, p in pairs(seen) do
      local k = kind(p.cmdline)
      kinds[k] = (kinds[k] or 0) + 1
      local where = ("%s (pid %s: %s)"):format(k, pid, p.cmdline:sub(1, 120))
      for name, value in pairs(SECRETS) do
        assert.falsy(p.environ:find(value, 1, true), name .. " reached " .. where)
      end
      assert.falsy(p.environ:find(R.lab.password, 1, true), "the password reached " .. where)
      assert.falsy(("\0" .. p.environ):find("\0AWS_", 1, true), "an AWS variable reached " .. where)
      assert.truthy(("\0" .. p.environ):find("\0PATH=", 1, true), "no PATH in " .. where)
    end
    -- every kind of child was looked at (the schema's tools live long enough at this scale)
    for _, k in ipairs{ "migrun.pool", "migrun.guard", "migrun.playbook.metrics", "pg_dump", "pg_restore" } do
      assert.truthy(kinds[k], k .. " was never seen; seen: " .. require("cjson").encode(kinds))
    end

    -- the notify command's own environment: the allow-list and its event, nothing else of the shell
    local got = assert(host.read_file(dump), "the notify command never ran")
    assert.truthy(got:find("MIGRUN_EVENT=wal_guard_warn", 1, true), got)
    for name, value in pairs(SECRETS) do assert.falsy(got:find(value, 1, true), name .. " reached the notify command") end
    assert.falsy(got:find(R.lab.password, 1, true), "the password reached the notify command")
    assert.falsy(("\0" .. got):find("\0AWS_", 1, true), "an AWS variable reached the notify command")
  end)
end)
