-- migrun.playbook.sessions on a real lab: every session of a run is named
-- after it (its pool workers' and pg_dump's too, whatever application_name a
-- conninfo gives), and a run that takes the lock first ends what a killed run
-- left working on the servers (a backend does not notice its client died
-- until it next talks to it), leaving every other application's sessions.
-- The killed runs are the fixture tests/fixtures/playbooks/sessions.lua in a
-- child migrun, SIGKILLed while a backend of it runs a long statement.
local lab = require "migrun.rehearsal.lab"
local proc = require "migrun.proc"
local host = require "migrun.host"
local pg = require "migrun.pg"
local db = require "migrun.db"
local json = require "migrun.json"
local qa = require "migrun.qa"
local schema = require "migrun.schema"
local catalog = require "migrun.catalog"
local sessions = require "migrun.playbook.sessions"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or os.getenv("PWD")
if MIGRUN:sub(1, 1) ~= "/" then MIGRUN = os.getenv("PWD") .. "/" .. MIGRUN end
local FIXTURE = SOURCE .. "/tests/fixtures/playbooks/sessions.lua"

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

describe("migrun.playbook.sessions", function()
  local L, dir, config_path, lsn, target
  local counter = 0

  setup(function()
    L = assert(lab.start{ pglogical = false })
    assert(L.source:psql([[create schema fx; create table fx.t (id int primary key, v text);
      insert into fx.t select g, 'v' || g from generate_series(1, 100) g;]]))
    assert(L.target:psql("create schema fx; create table fx.t (id int, v text)"))
    lsn = assert(L:pause_replica(60))
    target = assert(pg.connect(L.target.conninfo, { name = "target" }))
    local _, _, _, out = proc.run{ "mktemp", "-d" }
    dir = out:match("%S+")
    config_path = dir .. "/migration.lua"
    -- the target's conninfo names its sessions itself: the run's name goes over it
    write(config_path, ([[
      return { name = "fx", source = { conninfo = %q }, replica = { conninfo = %q },
               target = { conninfo = %q } }
    ]]):format(L.source.conninfo, L.replica.conninfo, L.target.conninfo .. " application_name=mine"))
  end)

  teardown(function()
    pg.identity(false)
    if target then target:close() end
    if L then L:stop() end
    if dir then proc.run{ "rm", "-rf", dir } end
  end)

  local function fresh()
    counter = counter + 1
    return dir .. "/state" .. counter
  end

  local function run(state, args, env, config)
    local argv = { MIGRUN, FIXTURE, "--config", config or config_path, "--state-dir", state, "--yes",
                   env = env, timeout = 120 }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local _, how, code, out, err = proc.run(argv)
    assert(how == "exit", ("migrun ended by %s %s: %s"):format(how, code, err))
    return code, out, err
  end

  -- The target's sessions: pid -> { app =, query =, state = }
  local function on_target()
    local res = assert(target:exec("select pid, application_name as app, query, state from pg_stat_activity "
      .. "where pid <> pg_backend_pid()"))
    local out = {}
    for r in res:rows() do out[r.pid] = r end
    return out
  end

  -- Waits for a target session whose application_name matches pattern and
  -- which runs pg_sleep -> pid, application_name
  local function wait_for_sleeper(pattern, h)
    for _ = 1, 600 do
      for pid, s in pairs(on_target()) do
        if s.app:match(pattern) and s.query:find("pg_sleep", 1, true) and s.state == "active" then
          return pid, s.app
        end
      end
      if h then h:wait(0.05) else host.sleep(0.05) end
    end
    error("no session " .. pattern .. " ran pg_sleep on the target" .. (h and (":\n" .. h.stdout .. h.stderr) or ""))
  end

  -- The fixture run with FIXTURE_HOLD=hold, SIGKILLed while its session named
  -- like `pattern` sleeps on the target (after meanwhile(pid, its pid) if
  -- given) -> that session's pid and name, the journal
  local function kill_while_holding(state, hold, pattern, meanwhile)
    local h = assert(proc.spawn{ MIGRUN, FIXTURE, "--config", config_path, "--state-dir", state, "--yes",
      stdout = "capture", stderr = "capture",
      env = { FIXTURE_HOLD = hold, FIXTURE_TABLE = "fx.t", FIXTURE_LSN = tostring(lsn) } })
    local pid, app = wait_for_sleeper(pattern, h)
    if meanwhile then meanwhile(pid, h.pid) end
    h:kill("KILL")
    h:wait()
    h:close()
    local j = json.decode(assert(host.read_file(state .. "/journal.json")))
    return pid, app, j
  end

  -- Sessions of other applications, idle in this process: none may be ended.
  local function bystanders()
    local list = {}
    for _, name in ipairs{ "migrun-dms-emulator", "migrun", "migrun/fxx/20200101T000000.1", "migrun/other/x/fullload" } do
      list[#list + 1] = assert(pg.connect({ host = "127.0.0.1", port = L.target.port, dbname = "app",
        user = L.target.superuser, application_name = name }))
    end
    return list
  end
  local function still_there(list)
    for _, c in ipairs(list) do
      assert.truthy(c:exec("select 1 as one"), c:info().application_name .. " was ended")
      c:close()
    end
  end

  it("ends a killed run's statement before the rerun's first one, says so, and leaves every other session", function()
    local state = fresh()
    local pid, app, j = kill_while_holding(state, "sleep", "^migrun/fx/", function(sleeper, holder)
      -- a dry run beside a live run: that run's sessions are its own
      local code, out, err = run(state, { "--dry-run" })
      assert.equal(0, code, out .. err)
      assert.truthy(out:find(("dry run: migrun pid %d holds %s: the sessions of this migration are its own, "
        .. "none would be ended"):format(holder, state), 1, true), out)
      assert.falsy(out:find("would end a session", 1, true), out)
      assert.truthy(on_target()[sleeper])
    end)
    -- the run's session, named after the run whatever the conninfo said
    assert.equal("migrun/fx/" .. j.runs[1].id, app)
    assert.matches("^%d+T%d+%.%d+$", j.runs[1].id)
    host.sleep(0.5)
    assert.truthy(on_target()[pid], "the killed run's backend ended with it: nothing to prove")
    local others = bystanders()

    -- a dry run says what it would end, and ends nothing
    local code, out, err = run(state, { "--dry-run" })
    assert.equal(0, code, out .. err)
    assert.truthy(out:find(("dry run: target: would end a session of an earlier run: pid %d (%s), active since")
      :format(pid, app), 1, true), out)
    assert.truthy(on_target()[pid])

    code, out, err = run(state)
    assert.equal(0, code, out .. err)
    local said = out:find(("target: ending a session of an earlier run: pid %d (%s), active since"):format(pid, app), 1, true)
    assert.truthy(said, out)
    assert.matches("active since [%d:]+ %([%d.]+ s%): select pg_sleep%(600%)\n", out:sub(said))
    -- gone before the rerun's first statement: its look step does not see it
    local look = out:find("look: ", 1, true)
    assert.truthy(look and look > said, out)
    assert.falsy(out:find(("look: target pid %d "):format(pid), 1, true), out)
    assert.is_nil(on_target()[pid])
    -- the rerun's own sessions carry its own identity
    local runs = json.decode(assert(host.read_file(state .. "/journal.json"))).runs
    local rerun = runs[#runs]
    assert.equal(2, #runs) -- the dry run is not one
    assert.truthy(out:find("look: own migrun/fx/" .. rerun.id .. "\n", 1, true), out)
    still_there(others)
  end)

  it("ends what a killed run's pool worker left building", function()
    local state = fresh()
    local pid, app, j = kill_while_holding(state, "fullload", "^migrun/fx/.*/fullload$")
    assert.equal("migrun/fx/" .. j.runs[1].id .. "/fullload", app)
    host.sleep(0.5)
    assert.truthy(on_target()[pid], "the killed worker's backend ended with it: nothing to prove")
    local code, out, err = run(state)
    assert.equal(0, code, out .. err)
    assert.truthy(out:find(("target: ending a session of an earlier run: pid %d (%s)"):format(pid, app), 1, true), out)
    assert.is_nil(on_target()[pid])
  end)

  it("fails before anything runs when a session cannot be ended, with what to do", function()
    -- an earlier run's session of the target's superuser, the run as the master user
    local h = assert(proc.spawn{ L.bin .. "/psql", "-X", "-q", "-h", "127.0.0.1", "-p", tostring(L.target.port),
      "-U", L.target.superuser, "-d", "app", "-c", "select pg_sleep(600)", stdout = "capture", stderr = "capture",
      env = { PGAPPNAME = "migrun/fx/20200101T000000.1/pg_restore" } })
    local pid = wait_for_sleeper("^migrun/fx/20200101T000000%.1/pg_restore$")
    local cfg = dir .. "/master.lua"
    write(cfg, ([[
      return { name = "fx", source = { conninfo = %q }, replica = { conninfo = %q },
               target = { conninfo = %q } }
    ]]):format(L.source.conninfo, L.replica.conninfo, L.target.migrun_conninfo .. " password=" .. L.password))
    local code, out, err = run(fresh(), nil, nil, cfg)
    h:kill("KILL")
    h:close()
    assert(target:exec("select pg_terminate_backend($1)", pid))
    assert.equal(1, code, out .. err)
    assert.truthy(err:find(("cannot end a session an earlier run of this migration left on the target, pid %d "
      .. "(migrun/fx/20200101T000000.1/pg_restore)"):format(pid), 1, true), err)
    assert.matches("only a superuser can end: select pg_terminate_backend%(" .. pid .. "%); on the target", err)
    assert.falsy(out:find("look:", 1, true), out)
    assert.falsy((out .. err):find(L.password, 1, true))
  end)

  it("names a run's pool workers and tools after it, over a conninfo's own name, and gives up on what will not end", function()
    pg.identity("migrun/fx/20200101T000000.2")
    finally(function() pg.identity(false) end)
    -- in this process
    local c = assert(pg.connect(L.target.conninfo .. " application_name=mine"))
    assert.equal("migrun/fx/20200101T000000.2", c:info().application_name)
    c:close()
    c = assert(pg.connect(("postgresql://%s@127.0.0.1:%d/app?application_name=mine"):format(L.target.superuser,
      L.target.port), { application_name = "migrun/fx/20200101T000000.2/x" }))
    assert.equal("migrun/fx/20200101T000000.2/x", c:info().application_name)
    c:close()
    c = assert(pg.connect({ host = "127.0.0.1", port = L.target.port, dbname = "app", user = L.target.superuser,
      application_name = "migrun-dms-emulator" }))
    assert.equal("migrun-dms-emulator", c:info().application_name) -- code that names its sessions keeps its name
    c:close()

    -- others, seen waiting for a lock that a psql holds for `seconds`, then names
    local function waiting(cluster, seconds, fn)
      local h = assert(proc.spawn{ L.bin .. "/psql", "-X", "-A", "-t", "-q", "-h", "127.0.0.1",
        "-p", tostring(cluster.port), "-U", cluster.superuser, "-d", "app", stdout = "capture", stderr = "capture",
        stdin = ("begin; lock table fx.t; select pg_sleep(%d); select 'waiting ' || application_name "
          .. "from pg_stat_activity where wait_event_type = 'Lock'; commit;"):format(seconds) })
      for _ = 1, 200 do
        if cluster:psql("select count(*) from pg_locks where relation = 'fx.t'::regclass "
          .. "and mode = 'AccessExclusiveLock' and granted") == "1" then break end
        host.sleep(0.05)
      end
      fn()
      h:wait()
      h:close()
      local names = {}
      for name in h.stdout:gmatch("waiting ([^\n]+)") do names[#names + 1] = name end
      table.sort(names)
      return names
    end
    local tools = assert(schema.tools(target:server_version()))
    assert.same({ "migrun/fx/20200101T000000.2/pg_dump" }, waiting(L.source, 2, function()
      assert(schema.dump(L.source.conninfo .. " application_name=mine", dir .. "/dump", { tools = tools,
        schemas = { "fx" } }))
    end))
    local src = db.wrap(assert(pg.connect(L.source.conninfo, { name = "source" })))
    local tgt = db.wrap(assert(pg.connect(L.target.conninfo, { name = "target" })))
    local tables = assert(catalog.tables(src, { schemas = { "fx" } }))
    assert.same({ "migrun/fx/20200101T000000.2/qa" }, waiting(L.target, 2, function()
      assert(qa.compare(src, tgt, tables, {}, { mode = "full", jobs = 2, a_conninfo = L.source.conninfo,
        b_conninfo = L.target.conninfo .. " application_name=mine" }))
    end))

    -- a session that does not end when told to: its backend stopped (SIGSTOP) until it is given up on
    local h = assert(proc.spawn{ L.bin .. "/psql", "-X", "-q", "-h", "127.0.0.1", "-p", tostring(L.target.port),
      "-U", L.target.superuser, "-d", "app", "-c", "select pg_sleep(600)",
      stdout = "capture", stderr = "capture", env = { PGAPPNAME = "migrun/fx/20200101T000000.1/fullload" } })
    local pid = wait_for_sleeper("^migrun/fx/20200101T000000%.1/fullload$")
    assert(proc.run{ "kill", "-STOP", tostring(pid) })
    local t0 = host.monotonic()
    local ended, err = sessions.clear(tgt, { server = "target", prefix = sessions.prefix("fx"),
      own = "migrun/fx/20200101T000000.2", timeout = 1 })
    assert(proc.run{ "kill", "-CONT", tostring(pid) })
    h:wait()
    h:close()
    assert.is_nil(ended)
    assert.equal("sessions", err.kind)
    assert.same({ pid }, err.pids)
    assert.truthy(tostring(err):find("1 session of an earlier run of this migration still works on the target "
      .. "1.0 s after pg_terminate_backend: pid " .. pid .. " (migrun/fx/20200101T000000.1/fullload), active since ", 1, true)
      and tostring(err):find(": select pg_sleep(600); nothing was run", 1, true),
      tostring(err))
    assert.truthy(host.monotonic() - t0 < 3.5)
    src:close()
    tgt:close()

    -- the name of a migration too long to fit is cut, marked by a hash of it
    local long = ("a"):rep(40)
    assert.equal(63, #sessions.identity(long, "20200101T000000.4194304"))
    assert.are_not.equal(sessions.prefix(long), sessions.prefix(long:sub(1, 39) .. "b"))
    assert.equal("migrun/fx/", sessions.prefix("fx"))
  end)
end)
