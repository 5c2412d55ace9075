-- migrun.rehearsal.lab: real clusters on loopback — a pglogical-ready source, its
-- streaming maintenance replica and a target standing in for RDS.
local lab = require "migrun.rehearsal.lab"
local proc = require "migrun.proc"
local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
if MIGRUN:sub(1, 1) ~= "/" then MIGRUN = os.getenv("PWD") .. "/" .. MIGRUN end

local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("%) (%a)") ~= "Z"
end

local function exists(path)
  local ok = proc.run{ "test", "-e", path }
  return ok == true
end

-- Processes whose command line mentions the lab directory (its servers).
local function processes_under(dir)
  local _, _, _, out = proc.run{ "pgrep", "-f", "--", dir }
  local pids = {}
  for pid in (out or ""):gmatch("%d+") do pids[#pids + 1] = pid end
  return pids
end

local function is_root()
  local _, _, _, out = proc.run{ "id", "-u" }
  return out == "0\n"
end

describe("migrun.rehearsal.lab", function()
  local L, seconds

  setup(function()
    local t0 = os.clock()
    local wall = require("socket").gettime()
    local err
    L, err = lab.start{ password = "lab-spec-secret" }
    assert(L, tostring(err))
    seconds = require("socket").gettime() - wall
    print(("\nlab started in %.2fs wall (%.2fs inside lab.start, %.2fs CPU in migrun)"):format(
      seconds, L.startup_seconds, os.clock() - t0))
  end)

  teardown(function()
    if L then L:stop() end
  end)

  it("starts in a few seconds", function()
    assert.is_true(seconds < 60) -- printed above; not asserted tightly (shared 2-core machine)
  end)

  it("describes each cluster by conninfo, url, port, datadir, logfile and name", function()
    for _, name in ipairs{ "source", "replica", "target" } do
      local c = L[name]
      assert.equal(name, c.name)
      assert.is_number(c.port)
      -- the target's own superuser is named as RDS's is
      local super = name == "target" and "rdsadmin" or "postgres"
      assert.equal(("host=127.0.0.1 port=%d dbname=app user=%s"):format(c.port, super), c.conninfo)
      assert.equal(("postgresql://%s@127.0.0.1:%d/app"):format(super, c.port), c.url)
      assert.truthy(exists(c.datadir .. "/PG_VERSION"))
      assert.truthy(exists(c.logfile))
      assert.is_number(c:pid())
    end
    assert.are_not.equal(L.source.port, L.target.port)
    assert.are_not.equal(L.source.port, L.replica.port)
  end)

  it("configures the source as the runbook requires", function()
    local function show(name) return assert(L.source:psql("show " .. name)) end
    assert.equal("logical", show("wal_level"))
    assert.truthy(show("shared_preload_libraries"):find("pglogical", 1, true))
    assert.equal("on", show("track_commit_timestamp"))
    assert.is_true(tonumber(show("max_replication_slots")) >= 10)
    assert.is_true(tonumber(show("max_wal_senders")) >= 10)
    assert.is_true(tonumber(show("max_worker_processes")) >= 10)
    assert.equal("0", show("wal_sender_timeout"))
    local has = assert(L.source:psql("select count(*) from pg_settings where name = 'output_plugin_libraries'"))
    if has == "1" then
      assert.equal("pgoutput, test_decoding, pglogical", show("output_plugin_libraries"))
    end
  end)

  it("has the pglogical extension in the app database of the source, usable as an output plugin", function()
    assert.equal("pglogical", L.source:psql("select extname from pg_extension where extname = 'pglogical'"))
    assert(L.source:psql("select pg_create_logical_replication_slot('lab_spec_slot', 'pglogical')"))
    assert(L.source:psql("select pg_drop_replication_slot('lab_spec_slot')"))
  end)

  it("has a replica in recovery, streaming from the source", function()
    assert.is_true(L.replica:in_recovery())
    assert.equal("t", L.replica:psql("select pg_is_in_recovery()"))
    assert.equal("streaming", L.replica:psql("select status from pg_stat_wal_receiver"))
    local n = assert(L.source:psql("select count(*) from pg_stat_replication where state = 'streaming'"))
    assert.is_true(tonumber(n) >= 1)
    assert.equal("on", L.replica:psql("show hot_standby"))
  end)

  it("has a reachable target, not in recovery, with the app database and no pglogical preload", function()
    assert.is_false(L.target:in_recovery())
    assert.equal("app", L.target:psql("select current_database()"))
    assert.is_nil(L.target:psql("show shared_preload_libraries"):find("pglogical", 1, true))
  end)

  it("replicates a row written on the source to the replica", function()
    assert(L.source:psql("create table lab_spec_t(id int primary key, v text); insert into lab_spec_t values (1, 'one')"))
    local upto = assert(L:wait_replica_caught_up(30))
    assert.truthy(tostring(upto):match("^%x+/%x+$"))
    assert.equal("1|one", L.replica:psql("select id, v from lab_spec_t"))
  end)

  it("gives the role migrun on the target what RDS gives its master user, no superuser", function()
    assert.equal("f|f|t|t|t", L.target:psql([[select rolsuper, rolreplication, rolcreaterole, rolcreatedb,
      pg_has_role('migrun', 'rds_superuser', 'member') from pg_roles where rolname = 'migrun']]))
    assert.equal("migrun", L.target:psql("select pg_get_userbyid(datdba) from pg_database where datname = 'app'"))
    assert.equal("replica", L.target:psql("set session_replication_role = replica; show session_replication_role",
      { user = "migrun" }))
    local _, err = L.target:psql("alter system set work_mem = '8MB'", { user = "migrun" })
    assert.truthy(tostring(err):find("must be superuser", 1, true) or tostring(err):find("permission denied", 1, true),
      tostring(err))
    -- the source's role stays a superuser (DMS needs one on a self-managed source)
    assert.equal("t", L.source:psql("select rolsuper from pg_roles where rolname = 'migrun'"))
  end)

  it("has a role migrun that must give its password", function()
    assert.equal("lab-spec-secret", L.password)
    for _, name in ipairs{ "source", "target", "replica" } do
      assert.equal("migrun", L[name]:psql("select current_user", { user = "migrun" }))
    end
    local psql = L.bin .. "/psql"
    local ok, _, _, _, err = proc.run{ psql, "-X", "-At", "-c", "select 1", L.target.migrun_conninfo,
      env = { PGPASSWORD = "wrong", PGPASSFILE = "/dev/null" } }
    assert.is_nil(ok)
    assert.truthy(err:find("password authentication failed", 1, true), err)
    local out
    ok, _, _, out = proc.run{ psql, "-X", "-At", "-c", "select current_user", L.source.migrun_conninfo,
      env = { PGPASSFILE = L.passfile, PGPASSWORD = false } }
    assert.is_true(ok)
    assert.equal("migrun\n", out)
  end)

  it("keeps the password out of what it prints", function()
    for _, text in ipairs{ tostring(L), L:describe(), tostring(L.source), L.source.conninfo, L.source.url,
                           L.source.migrun_conninfo } do
      assert.is_nil(text:find("lab-spec-secret", 1, true), text)
    end
    assert.truthy(tostring(L):find("source 127.0.0.1:" .. L.source.port, 1, true))
  end)

  it("can kill the target's postmaster and start it again", function()
    assert(L.target:psql("create table lab_spec_k(i int); insert into lab_spec_k values (42)"))
    local pid = L.target:pid()
    assert.is_true(L.target:kill())
    assert.is_false(alive(pid))
    assert.is_nil(L.target:pid())
    assert.is_nil(L.target:psql("select 1"))
    assert.is_true(L.target:start())
    assert.are_not.equal(pid, L.target:pid())
    assert.equal("42", L.target:psql("select i from lab_spec_k"))
    assert.truthy(L.target:log_tail(50):find("not properly shut down", 1, true))
  end)

  it("can stop and start one cluster", function()
    assert.is_true(L.replica:stop())
    assert.is_nil(L.replica:pid())
    assert(L.source:psql("insert into lab_spec_t values (2, 'two')"))
    assert.is_true(L.replica:start())
    assert(L:wait_replica_caught_up(30))
    assert.equal("2", L.replica:psql("select count(*) from lab_spec_t"))
  end)

  it("stops every server and removes its directory", function()
    local pids = {}
    for _, c in ipairs(L.clusters) do pids[#pids + 1] = assert(c:pid()) end
    local dir = L.dir
    assert.is_true(L:stop())
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    assert.is_false(exists(dir))
    assert.same({}, processes_under(dir))
    assert.is_true(L:stop()) -- again: nothing to do
    assert.truthy(tostring(L):find("stopped", 1, true))
  end)
end)

describe("migrun.rehearsal.lab failures and cleanup", function()
  it("names the cluster that failed and shows the tail of its log", function()
    local dir = os.tmpname()
    os.remove(dir)
    local L, err = lab.start{ dir = dir, settings = { target = { shared_buffers = "plenty" } } }
    assert.is_nil(L)
    assert.equal("lab", err.kind)
    assert.equal("target", err.where)
    assert.truthy(tostring(err):find("^%[target%]"), tostring(err))
    assert.truthy(err.detail:find("shared_buffers", 1, true), err.detail)
    -- the source, started at the same time, was stopped, and the directory removed
    assert.is_false(exists(dir))
    assert.same({}, processes_under(dir))
  end)

  it("refuses a dir that is not empty, and leaves it alone", function()
    local dir = os.tmpname() -- a file: not an empty directory
    local L, err = lab.start{ dir = dir }
    assert.is_nil(L)
    assert.equal("lab", err.where)
    assert.truthy(exists(dir))
    os.remove(dir)
  end)

  it("is stopped by <close> when the block fails, and keeps the directory with keep", function()
    local pids, dir = {}, nil
    local ok, err = pcall(function()
      local L <close> = assert(lab.start{ keep = true, pglogical = false })
      dir = L.dir
      for _, c in ipairs(L.clusters) do pids[#pids + 1] = c:pid() end
      error("boom")
    end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("boom", 1, true))
    assert.equal(3, #pids)
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    assert.truthy(exists(dir .. "/source/PG_VERSION"))
    assert.same({}, processes_under(dir))
    assert.is_true(proc.run{ "rm", "-rf", "--", dir })
  end)

  it("is stopped by the garbage collector when forgotten", function()
    local pids, dir = {}
    do
      local L = assert(lab.start{ pglogical = false })
      dir = L.dir
      for _, c in ipairs(L.clusters) do pids[#pids + 1] = c:pid() end
    end
    collectgarbage()
    collectgarbage()
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    assert.is_false(exists(dir))
  end)

  it("lab.shell() prints connection strings, and stops at end of input or Ctrl-C", function()
    -- end of input
    local ok, how, code, out, err = proc.run{ MIGRUN, "-l", "migrun.rehearsal.lab", "-e", 'lab.shell{password="shell-secret"}',
      stdin = "", timeout = 120 }
    assert.is_true(ok, tostring(how) .. " " .. tostring(code) .. "\n" .. tostring(out) .. tostring(err))
    assert.truthy(out:find("psql 'host=127.0.0.1 port=%d+ dbname=app user=postgres'"), out)
    assert.truthy(out:find("replica", 1, true))
    assert.is_nil(out:find("shell-secret", 1, true))
    local dir = out:match("migrun lab in (%S+)")
    assert.is_false(exists(dir))

    -- Ctrl-C while it waits on a terminal-like stdin that never ends
    local fifo = os.tmpname()
    os.remove(fifo)
    assert.is_true(proc.run{ "mkfifo", fifo })
    local writer = assert(io.open(fifo, "r+")) -- keeps the fifo open: no EOF
    local lines = {}
    local h = assert(proc.spawn{ MIGRUN, "-l", "migrun.rehearsal.lab", "-e", "lab.shell()", stdin = { file = fifo },
      stdout = function(line) lines[#lines + 1] = line end, stderr = "stdout" })
    finally(function()
      -- whatever failed above, let the shell stop its lab (a SIGKILL could not)
      if h.running then h:kill("INT") h:wait(60) end
      writer:close()
      os.remove(fifo)
    end)
    local deadline = os.time() + 120
    while not table.concat(lines, "\n"):find("Press Ctrl-C", 1, true) and os.time() < deadline do
      h:wait(0.1) -- the line callback runs while waiting
    end
    local text = table.concat(lines, "\n")
    dir = text:match("migrun lab in (%S+)")
    assert.truthy(dir, text)
    h:kill("INT")
    assert.same({ true, "exit", 0 }, { h:wait(60) })
    assert.is_false(exists(dir))
    assert.same({}, processes_under(dir))
  end)

  it("works as an ordinary user (no runuser)", function()
    if not is_root() then
      pending("already running as an ordinary user")
      return
    end
    local script = [[
      local L = assert(require("migrun.rehearsal.lab").start{})
      print(L.runas == nil, L.source:psql("select current_user"), L.replica:in_recovery(), L.dir)
      assert(L:stop())
    ]]
    local ok, _, _, out, err = proc.run{ "runuser", "-u", "postgres", "--", MIGRUN, "-e", script,
      cwd = "/tmp", env = { TMPDIR = "/tmp" }, timeout = 120 }
    assert.is_true(ok, tostring(out) .. tostring(err))
    local plain, user, recovery, dir = out:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)")
    assert.equal("true", plain)
    assert.equal("postgres", user)
    assert.equal("true", recovery)
    assert.is_false(exists(dir))
  end)

  it("starts the DMS emulator with dms = true, signed with a secret kept out of argv", function()
    local D <close> = assert(lab.start{ dms = true, pglogical = false })
    assert.matches("^http://127%.0%.0%.1:%d+", D.dms.url)
    local c = assert(D:dms_client())
    local instances = assert(c:describe_replication_instances())
    assert.equal(1, #instances)
    local bad = assert(D:dms_client{ secret_key = "wrong" })
    local r, err = bad:describe_replication_instances()
    assert.is_nil(r)
    assert.equal("InvalidSignatureException", err.code)
    local pid = D.dms.process.pid
    local cmdline = assert(io.open("/proc/" .. pid .. "/cmdline")):read("a")
    assert.falsy(cmdline:find(D.dms.secret_key, 1, true))
    D:stop()
    assert.is_false(alive(pid))
  end)
end)
