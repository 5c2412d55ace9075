-- The stock playbooks run whole from any host that embeds migrun (issue 22):
-- examples/embed (a C program on libmigrun) and the stock lua5.4 with
-- migrun.so drive one migration on the lab and the DMS emulator, under
-- writes, each running full.lua and a partial_restart.lua, the lua5.4 also a
-- full_restart.lua whose then_run starts full.lua again. The full load, the
-- reloads and the QA run in a pool of three workers, the WAL guard and the
-- metrics server beside them: every one of these children is seen while it
-- runs, and is the worker executable migrun-worker, whatever the host.
local H = require "helpers.rehearsal"
local emulator = require "migrun.rehearsal.emulator"
local cdc = require "migrun.cdc"
local proc = require "migrun.proc"
local procs = require "helpers.procs"
local host = require "migrun.host"

local BUILD = H.MIGRUN:match("^(.*)/[^/]+$") or "build"
local EXAMPLE = os.getenv("MIGRUN_EXAMPLE") or BUILD .. "/examples/embed"
local MODULE_DIR = (os.getenv("MIGRUN_MODULE") or BUILD .. "/migrun.so"):match("^(.*)/[^/]+$")
local PRELOAD = os.getenv("MIGRUN_SANITIZE_PRELOAD")
local LUA = "/usr/bin/lua5.4"
local NAME = "e2e-embed"

-- The hosts: the program and options before the playbook's path, and what
-- their environment needs.
local HOSTS = {
  embed = { argv = { EXAMPLE }, env = {} },
  lua54 = { argv = { LUA, "-e", ("package.cpath = %q .. package.cpath require 'migrun'"):format(MODULE_DIR .. "/?.so;") },
    env = { LUA_INIT = false, LUA_INIT_5_4 = false } },
}
if PRELOAD and PRELOAD ~= "" then
  HOSTS.lua54.env.LD_PRELOAD = PRELOAD -- the sanitizer build: its runtimes first
  HOSTS.lua54.env.ASAN_OPTIONS = "detect_leaks=0" -- the interpreter is not ours
end

local KINDS = { pool = "migrun.pool", guard = "migrun.guard", metrics = "migrun.playbook.metrics" }

-- Runs a playbook from a host, as H.run does from migrun, and looks at every
-- child running migrun Lua code while it lives -> { ok, code, output,
-- programs = { [kind] = { [argv0] = true } }, most = pool workers at once }
local function run(R, which, playbook, args)
  local hst = HOSTS[which]
  local argv = { table.unpack(hst.argv) }
  argv[#argv + 1] = playbook:sub(1, 1) == "/" and playbook or H.ROOT .. "/playbooks/" .. playbook
  argv[#argv + 1], argv[#argv + 2] = "--config", R.config_path
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local env = { MIGRUN_LUA_PATH = false }
  for k, v in pairs(R.env) do env[k] = v end
  for k, v in pairs(hst.env) do env[k] = v end
  argv.env, argv.stdin, argv.stderr = env, false, "stdout"
  local lines = {}
  argv.stdout = function(line)
    lines[#lines + 1] = line
    if os.getenv("MIGRUN_E2E_VERBOSE") then io.stderr:write(line, "\n") end
  end
  local h = assert(proc.spawn(argv))
  local programs, most = { pool = {}, guard = {}, metrics = {} }, 0
  local deadline = host.monotonic() + 900
  local ok, how, code
  repeat
    for kind, mark in pairs(KINDS) do
      local pids = procs.descendants(h.pid, mark)
      for _, pid in ipairs(pids) do
        local cmdline = host.read_file("/proc/" .. pid .. "/cmdline")
        -- between fork and exec a child is still its parent's program
        if cmdline and cmdline:find(mark, 1, true) then programs[kind][cmdline:match("^[^%z]*")] = true end
      end
      if kind == "pool" then most = math.max(most, #pids) end
    end
    ok, how, code = h:wait(0.05)
  until how ~= "timeout" or host.monotonic() > deadline
  if how == "timeout" then h:kill("KILL") h:wait() end
  h:close()
  return { ok = ok, code = code, output = table.concat(lines, "\n"), programs = programs, most = most }
end

describe("the stock playbooks from examples/embed and from the stock lua5.4", function()
  if not io.open(LUA) then
    it("needs /usr/bin/lua5.4 (Debian's lua5.4 package)", function() pending("lua5.4 is not installed") end)
    return
  end
  local R, client, worker

  setup(function()
    -- chunks of 1 MiB: the larger tables are cut, so the load has tasks for three workers
    R = H.rehearsal(NAME, { config = {
      full_load = { jobs = 3, chunk_bytes = 1048576, split_bytes = 1048576 },
      metrics = { listen = "127.0.0.1:0", interval = 1 },
      cutover = { count_only = { "public.page_views" } } } })
    client = assert(R.lab:dms_client())
    local _, _, _, out = proc.run{ "readlink", "-f", BUILD .. "/migrun-worker" }
    worker = out:gsub("%s+$", "")
  end)
  teardown(function()
    if R then
      R:stop_workload()
      R:close()
    end
  end)

  local function plan() return H.journal(R).playbooks.full.steps.groups.facts.groups end
  local function group_with(table_name)
    for _, g in ipairs(plan()) do
      for _, t in ipairs(g.tables) do
        if t.schema .. "." .. t.name == table_name then return g end
      end
    end
  end
  local function task_of(g)
    return assert(client:describe_replication_tasks{ Filters = { ["replication-task-id"] = cdc.task_id(NAME, g) } })[1]
  end
  local function fail_task(g)
    assert(emulator.control(client, "SetFaults", { fail_tasks = { [cdc.task_id(NAME, g)] = "injected" } }))
    local deadline = host.monotonic() + 30
    while task_of(g).Status ~= "failed" and host.monotonic() < deadline do host.sleep(0.2) end
    assert.equal("failed", task_of(g).Status)
    assert(emulator.control(client, "SetFaults", {}))
  end
  -- every child of these kinds that was seen ran the worker; at least the pool's and the guard's were seen
  local function assert_workers(r, kinds)
    for _, kind in ipairs(kinds) do
      assert.same({ [worker] = true }, r.programs[kind], kind .. ":\n" .. r.output)
    end
  end

  it("full.lua from examples/embed: a load over three workers, ready for cutover", function()
    R:start_workload{ rate = 30 }
    local r = run(R, "embed", "full.lua", { "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find("READY FOR CUTOVER", 1, true), r.output)
    assert_workers(r, { "pool", "guard", "metrics" })
    assert.is_true(r.most >= 2, "the pool's workers never ran at once: " .. r.most)
  end)

  it("partial_restart.lua from lua5.4 reloads a failed group; full.lua from lua5.4 is ready again", function()
    local bad = assert(group_with("public.events"))
    fail_task(bad)
    local r = run(R, "lua54", "partial_restart.lua", { bad.slot, "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find(bad.slot .. " has caught up", 1, true), r.output)
    assert_workers(r, { "pool", "guard", "metrics" })
    local r2 = run(R, "lua54", "full.lua", { "--yes" })
    assert.is_true(r2.ok, r2.output)
    assert.truthy(r2.output:find("READY FOR CUTOVER", 1, true), r2.output)
    assert_workers(r2, { "guard" })
  end)

  it("partial_restart.lua from examples/embed; full_restart.lua from lua5.4 starts full.lua again; equal", function()
    local bad = assert(group_with("public.calls"))
    fail_task(bad)
    local r = run(R, "embed", "partial_restart.lua", { bad.slot, "--yes" })
    assert.is_true(r.ok, r.output)
    assert.truthy(r.output:find(bad.slot .. " has caught up", 1, true), r.output)
    assert_workers(r, { "pool", "guard" })

    -- then_run: the next full.lua is the worker, and its pool's workers too
    local r2 = run(R, "lua54", "full_restart.lua", { "--yes" })
    assert.is_true(r2.ok, r2.output)
    assert.truthy(r2.output:find("starting again from the beginning: " .. worker .. " ", 1, true), r2.output)
    assert.truthy(r2.output:find("READY FOR CUTOVER", 1, true), r2.output)
    assert_workers(r2, { "pool", "guard" })
    assert.equal("done", H.journal(R).playbooks.full.steps.catch_up.status)

    R:stop_workload()
    assert.is_true(H.wait_applied(R, 120), "the tasks did not apply the last changes")
    local diffs = H.differences(R, { count_only = { ["public.page_views"] = true } })
    assert.equal(0, #diffs, H.describe_diffs(diffs))
    assert.equal("not paused", H.assert_single_world(R).replica_paused)
  end)
end)
