-- migrun.playbook: the machinery under every playbook, driven as users drive
-- it: the fixture playbook tests/fixtures/playbooks/steps.lua run as a child
-- migrun against a real lab, with a fresh state directory and schema per test.
local lab = require "migrun.rehearsal.lab"
local proc = require "migrun.proc"
local pg = require "migrun.pg"
local json = require "migrun.json"

local MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or os.getenv("PWD")
if MIGRUN:sub(1, 1) ~= "/" then MIGRUN = os.getenv("PWD") .. "/" .. MIGRUN end
local FIXTURE = SOURCE .. "/tests/fixtures/playbooks/steps.lua"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function mode_of(path)
  local _, _, _, out = proc.run{ "stat", "-c", "%a", path }
  return out and out:match("%d+")
end

describe("migrun.playbook", function()
  local L, target, dir, config_path
  local counter = 0

  setup(function()
    L = assert(lab.start{ pglogical = false })
    target = assert(pg.connect(L.target.conninfo))
    local _, _, _, out = proc.run{ "mktemp", "-d" }
    dir = out:match("%S+")
    config_path = dir .. "/migration.lua"
    write(config_path, ([[
      return {
        name = "fixture",
        source = { conninfo = %q },
        replica = { conninfo = %q },
        target = { conninfo = %q },
      }
    ]]):format(L.source.conninfo, L.replica.conninfo, L.target.conninfo))
  end)

  teardown(function()
    if target then target:close() end
    if L then L:stop() end
    if dir then proc.run{ "rm", "-rf", dir } end
  end)

  -- A fresh schema name and state directory for one test.
  local function fresh()
    counter = counter + 1
    return "fx" .. counter, dir .. "/state" .. counter
  end

  -- Runs the fixture; -> code, stdout, stderr
  local function run(schema, state, args, env)
    local argv = { MIGRUN, FIXTURE, "--config", config_path, "--state-dir", state, schema }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    argv.env = env
    argv.timeout = 120
    local _, how, code, out, err = proc.run(argv)
    assert(how == "exit", ("migrun ended by %s %s: %s"):format(how, code, err))
    return code, out, err
  end

  local function spawn(schema, state, args, env)
    local argv = { MIGRUN, FIXTURE, "--config", config_path, "--state-dir", state, schema,
                   stdout = "capture", stderr = "capture", env = env }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    return assert(proc.spawn(argv))
  end

  local function wait_for(h, pattern)
    for _ = 1, 400 do
      if h.stdout:find(pattern) then return true end
      h:wait(0.05)
    end
    error("never saw " .. pattern .. " in:\n" .. h.stdout .. h.stderr)
  end

  local function rows(schema)
    local res = target:exec("select count(*) as n from " .. pg.qualify(schema, "t"))
    if not res then return nil end
    return res[1].n
  end

  local function journal(state)
    local text = read(state .. "/journal.json")
    return text and assert(json.decode(text)), text
  end

  it("runs every step, keeps a 0600 journal of them, and writes the report", function()
    local schema, state = fresh()
    local code, out, err = run(schema, state, { "--yes" })
    assert.equal(0, code, out .. err)
    assert.equal(200, rows(schema))
    local j, text = journal(state)
    assert.equal("600", mode_of(state .. "/journal.json"))
    assert.equal("700", mode_of(state))
    assert.equal("600", mode_of(state .. "/migrun.log"))
    assert.equal("fixture", j.migration)
    assert.truthy(read(state .. "/touched"))
    local steps = j.playbooks.steps.steps
    for _, name in ipairs{ "prepare", "load", "summary" } do
      assert.equal("done", steps[name].status, name)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", steps[name].started_at)
      assert.is_number(steps[name].duration)
    end
    assert.same({ batch1 = true, batch2 = true, rows = 200 }, steps.load.facts)
    assert.equal('"' .. schema .. '"."t"', steps.prepare.facts.table)
    assert.equal("ok", j.runs[1].outcome)
    assert.same({ "--config", config_path, "--state-dir", state, schema, "--yes" }, j.runs[1].argv)
    -- human-readable: indented, sorted keys
    assert.matches('\n  "format": 1,\n  "log_generation": %d+,\n  "migration": "fixture",', text)
    -- progress on a pipe: plain timestamped lines, never a carriage return
    assert.matches("\n%d%d:%d%d:%d%d load \"" .. schema .. "\"%.\"t\": 100 rows of 200 rows %(50%%%)", out)
    assert.matches("\n%d%d:%d%d:%d%d load [^\n]*: done", out)
    assert.falsy(out:find("\r", 1, true))
    -- the report: the step table and the step's own table
    local md = assert(read(state .. "/report.md"))
    assert.equal("600", mode_of(state .. "/report.md"))
    assert.matches("report: " .. state:gsub("%p", "%%%0") .. "/report.md", out)
    assert.matches("# Test steps: fixture", md, 1, true)
    assert.matches("| step    | outcome |", md, 1, true)
    assert.matches("|   2 | load    | done    |", md, 1, true)
    assert.matches("### Rows on the target", md, 1, true)
    assert.matches('| "' .. schema .. '"."t" |  200 |', md, 1, true)
  end)

  it("keeps every run's report in reports/, report.md being the latest", function()
    local schema, state = fresh()
    local function reports()
      local _, _, _, out = proc.run{ "ls", "-1", state .. "/reports" }
      local names = {}
      for name in (out or ""):gmatch("[^\n]+") do names[#names + 1] = name end
      return names
    end
    -- a refusal (not confirmed), then the run to the end, then a dry run (which writes nothing)
    local code = run(schema, state, {})
    assert.equal(3, code)
    code = run(schema, state, { "--yes" })
    assert.equal(0, code)
    assert.equal(0, (run(schema, state, { "--dry-run" })))
    local names = reports()
    assert.equal(2, #names, table.concat(names, " "))
    assert.equal("700", mode_of(state .. "/reports"))
    local j = journal(state)
    local md = {}
    for i, name in ipairs(names) do
      -- <run start, UTC>-<playbook>[-n].md; two runs in the same second get -2
      assert.matches("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ%-steps%.md$", name:gsub("%-2%.md$", ".md"))
      assert.equal(j.runs[1].started_at:gsub("[-:]", ""):sub(1, 9), name:sub(1, 9))
      assert.equal("600", mode_of(state .. "/reports/" .. name))
      md[i] = read(state .. "/reports/" .. name)
    end
    local by_outcome = {}
    for _, text in ipairs(md) do by_outcome[text:match("outcome: %*%*(%a+)%*%*")] = text end
    assert.truthy(by_outcome.aborted, "the refused run's report was not kept")
    assert.truthy(by_outcome.ok)
    assert.equal(by_outcome.ok, read(state .. "/report.md"))
  end)

  it("skips done steps on a second run, says so, and reruns the `always` ones", function()
    local schema, state = fresh()
    assert.equal(0, (run(schema, state, { "--yes" })))
    local code, out, err = run(schema, state, {})
    assert.equal(0, code, out .. err)
    assert.matches("skipped prepare: done %d%d%d%d%-", out)
    assert.matches("skipped load: done", out)
    assert.matches("summary: 200 rows", out)
    assert.equal(200, rows(schema))
    local j = journal(state)
    assert.same({ "prepare", "load" }, j.runs[2].skipped)
    assert.same({ "summary" }, j.runs[2].ran)
  end)

  it("stops before running anything when a done step's check no longer holds", function()
    local schema, state = fresh()
    assert.equal(0, (run(schema, state, { "--yes" })))
    assert(target:exec("drop table " .. pg.qualify(schema, "t")))
    local code, out, err = run(schema, state, { "--yes" })
    assert.equal(1, code)
    assert.matches("prepare was done %(.-%), but its check fails: \"" .. schema .. "\"%.\"t\" is missing on the target; nothing was run", err)
    assert.falsy(out:find("summary: Summarise", 1, true))
    assert.equal("failed", journal(state).runs[2].outcome)
  end)

  it("reruns a step killed half-way, which sees what it recorded before", function()
    local schema, state = fresh()
    local h = spawn(schema, state, { "--yes" }, { FIXTURE_SLEEP = "1" })
    wait_for(h, "sleeping")
    h:kill("KILL")
    h:wait()
    local j = journal(state)
    assert.equal("running", j.playbooks.steps.steps.load.status)
    assert.same({ batch1 = true }, j.playbooks.steps.steps.load.facts)
    assert.equal(100, rows(schema))
    local code, out, err = run(schema, state, { "--yes" })
    assert.equal(0, code, out .. err)
    assert.matches("batch 1 already loaded", out)
    assert.equal(200, rows(schema))
    assert.equal("done", journal(state).playbooks.steps.steps.load.status)
  end)

  it("runs one step with --only and the rest from a step with --from", function()
    local schema, state = fresh()
    local _, code, out, err
    code, out, err = run(schema, state, { "--only", "prepare" })
    assert.equal(0, code, out .. err)
    assert.equal(0, rows(schema))
    assert.falsy(out:find("summary", 1, true))
    -- --from needs the earlier steps done
    code, _, err = run(schema, state, { "--from", "summary" })
    assert.equal(2, code)
    assert.matches("%-%-from summary: the earlier step load is not done %(never run%)", err)
    code, out, err = run(schema, state, { "--from", "load", "--yes" })
    assert.equal(0, code, out .. err)
    assert.matches("skipped prepare", out)
    assert.equal(200, rows(schema))
    -- an unknown step names the steps there are
    code, _, err = run(schema, state, { "--only", "lod" })
    assert.equal(2, code)
    assert.matches("%-%-only lod: no such step; the steps are: prepare, load, summary", err)
  end)

  it("shows the writes of a dry run without doing them or writing the journal", function()
    local schema, state = fresh()
    assert(target:exec(("create schema %s; create table %s (id int primary key, batch int)")
      :format(pg.quote_ident(schema), pg.qualify(schema, "t"))))
    local code, out, err = run(schema, state, { "--dry-run" })
    assert.equal(0, code, out .. err)
    assert.matches("dry run: target: insert into \"" .. schema .. "\"%.\"t\" select g, %$1 from "
      .. "generate_series%(%$2::int, %$3::int%) g  %-%- %$1=1, %$2=1, %$3=100", out)
    assert.matches("dry run: would ask: insert rows into", out)
    assert.matches("dry run: touch " .. state:gsub("%p", "%%%0") .. "/touched\n", out)
    assert.falsy(out:find("hidden", 1, true))
    assert.is_nil(read(state .. "/touched"))
    assert.matches("summary: 0 rows", out)
    assert.matches("# Test steps: fixture", out, 1, true) -- the report is printed
    assert.equal(0, rows(schema))
    assert.is_nil(read(state .. "/journal.json"))
    assert.is_nil(read(state .. "/report.md"))
  end)

  it("refuses destructive work unconfirmed without a terminal (exit 3), and does it with --yes", function()
    local schema, state = fresh()
    local code, out, err = run(schema, state, {})
    assert.equal(3, code, out .. err)
    assert.matches("not confirmed: insert rows into", err)
    assert.matches("%-%-yes", err)
    assert.equal(0, rows(schema))
    local j = journal(state)
    assert.equal("done", j.playbooks.steps.steps.prepare.status)
    assert.is_nil(j.playbooks.steps.steps.load)
    assert.equal("aborted", j.runs[1].outcome)
    code, out, err = run(schema, state, { "--yes" })
    assert.equal(0, code, out .. err)
    assert.equal(200, rows(schema))
  end)

  it("lets only one migrun drive a state directory", function()
    local schema, state = fresh()
    local h = spawn(schema, state, { "--yes" }, { FIXTURE_SLEEP = "1" })
    wait_for(h, "sleeping")
    local code, _, err = run(schema, state, { "--yes" })
    assert.equal(4, code)
    assert.matches("is in use: %[.-/lock%] locked by another migrun %(pid " .. h.pid .. "%)", err)
    h:kill("KILL")
    h:wait()
  end)

  it("stops the run when a watcher reports a problem", function()
    local schema, state = fresh()
    local code, out, err = run(schema, state, { "--yes" }, { FIXTURE_WATCH_FAIL = "1" })
    assert.equal(1, code, out .. err)
    assert.matches("watcher guard stopped the run: too much WAL retained", err)
    assert.falsy(out:find("prepare: Create", 1, true))
  end)

  it("stops with the process watcher's reason when its stop lands inside a Lua watcher's check", function()
    -- the load sleeps (ctx:sleep runs the watchers); the Lua watcher's check
    -- takes 0.5 s of every 0.7: the stop most often interrupts it, and must
    -- not come out as that watcher's failure
    local schema, state = fresh()
    local code, out, err = run(schema, state, { "--yes" }, { FIXTURE_SLEEP = "1", FIXTURE_GUARD_STOP = "1",
      LUA_PATH = SOURCE .. "/tests/?.lua;;" })
    assert.equal(1, code, out .. err)
    assert.matches("FAILED: load failed: the probe's reason to stop", err)
    assert.falsy(err:find("watcher guard stopped the run", 1, true), err)
  end)

  it("says where a step's progress stopped, never done, when the step fails", function()
    local schema, state = fresh()
    local code, out, err = run(schema, state, { "--yes" }, { FIXTURE_LOAD_FAIL = "1" })
    assert.equal(1, code, out .. err)
    assert.truthy(out:find(("load \"%s\".\"t\": stopped at 100 rows of 200 rows (50%%)\n"):format(schema), 1, true), out)
    assert.falsy(out:find(": done, ", 1, true), out)
    assert.matches("FAILED: load failed: the load broke", err)
  end)

  it("names the unreachable server and its config key, never its password", function()
    local schema, state = fresh()
    local bad = dir .. "/bad.lua"
    write(bad, ([[
      return { name = "fixture", source = { conninfo = %q }, replica = { conninfo = %q },
               target = { conninfo = "host=127.0.0.1 port=1 user=migrun password=" .. os.getenv("FX_PW") } }
    ]]):format(L.source.conninfo, L.replica.conninfo))
    local argv = { MIGRUN, FIXTURE, "--config", bad, "--state-dir", state, schema, "--yes",
                   env = { FX_PW = "s3cretpw" } }
    local _, _, code, out, err = proc.run(argv)
    assert.equal(1, code)
    assert.matches("cannot connect to the target %(target%.conninfo%)", err)
    local all = out .. err .. read(state .. "/journal.json") .. read(state .. "/report.md")
      .. read(state .. "/migrun.log")
    assert.falsy(all:find("s3cretpw", 1, true))
  end)

  it("gives its children an allow-list: no secret, no variable they were not given", function()
    local schema, state = fresh()
    local cfg = dir .. "/env-config.lua"
    write(cfg, ([[
      return {
        name = "fixture",
        source = { conninfo = %q .. (os.getenv("FIXTURE_SOURCE_OPTS") or "") },
        replica = { conninfo = %q },
        target = { conninfo = %q },
        children_env = { "TEAM_*" },
      }
    ]]):format(L.source.conninfo, L.replica.conninfo, L.target.conninfo))
    local argv = { MIGRUN, FIXTURE, "--config", cfg, "--state-dir", state, schema, "--yes",
      env = { FIXTURE_SHOW_ENV = "1", FIXTURE_SOURCE_OPTS = " application_name=s3cret-by-env",
        AWS_SECRET_ACCESS_KEY = "aws-s3cret", AWS_ACCESS_KEY_ID = "AKIDVISIBLE", UNRELATED = "s3cret-unrelated",
        TEAM_KUBECONFIG = "/k", LC_TIME = "C" } }
    local _, _, code, out, err = proc.run(argv)
    assert.equal(0, code, out .. err)
    assert.matches("child env: LC_TIME=C", out)
    assert.matches("child env: PATH=", out)
    -- the config's children_env adds the team's own
    assert.matches("child env: TEAM_KUBECONFIG=/k", out)
    for _, never in ipairs{ "aws-s3cret", "AKIDVISIBLE", "s3cret-unrelated", "FIXTURE_SOURCE_OPTS" } do
      assert.falsy(out:find(never, 1, true), never .. ": " .. out)
    end
    -- a bad name there is the config's mistake, said as such
    write(cfg, ([[return { name = "fixture", source = { conninfo = %q }, replica = { conninfo = %q },
      target = { conninfo = %q }, children_env = { "A=B" } }]]):format(L.source.conninfo, L.replica.conninfo,
      L.target.conninfo))
    local _, _, bcode, _, berr = proc.run{ MIGRUN, FIXTURE, "--config", cfg, "--state-dir", state, schema, "--yes" }
    assert.equal(2, bcode)
    assert.matches("children_env: environment variable names %(or \"PREFIX%*\"%) expected", berr)
  end)

  it("lists the steps with their status and explains itself with --help", function()
    local schema, state = fresh()
    assert.equal(0, (run(schema, state, { "--only", "prepare" })))
    local code, out = run(schema, state, { "--list" })
    assert.equal(0, code)
    assert.matches(" 1%. prepare%s+done%s+%d%d%d%d%-", out)
    assert.matches(" 2%. load%s+pending", out)
    local _, _, hcode, help = proc.run{ MIGRUN, FIXTURE, "--help" }
    assert.equal(0, hcode)
    assert.matches("usage: migrun .-steps%.lua %[options%] <schema>", help)
    assert.matches("2%. load%s+Load two batches %(asks before destructive work%)", help)
    assert.matches("%-%-dry%-run", help)
    local _, _, ucode, _, uerr = proc.run{ MIGRUN, FIXTURE, "--bogus" }
    assert.equal(2, ucode)
    assert.matches("unknown option %-%-bogus", uerr)
  end)
end)

describe("migrun.playbook.progress", function()
  local progress = require "migrun.playbook.progress"

  local function output(f)
    f:seek("set")
    return f:read("a")
  end

  it("redraws one line in place on a terminal", function()
    local f = io.tmpfile()
    local ticks = 0
    local bar = progress.new{ label = "copy t", total = 2048, unit = "bytes", tty = true, out = f,
                              on_tick = function() ticks = ticks + 1 end }
    bar:update(1024, "10 rows")
    bar:update(2048, "20 rows")
    bar:finish("2 KiB in 1 s")
    local text = output(f)
    assert.equal(2, ticks)
    assert.matches("^\rcopy t: 1.0 KiB of 2.0 KiB %(50%%%)  10 rows\27%[K\rcopy t: 2.0 KiB of 2.0 KiB %(100%%%)  20 rows\27%[K", text)
    assert.matches("\r\27%[K%d%d:%d%d:%d%d copy t: done, 2 KiB in 1 s\n$", text)
  end)

  it("prints plain lines at most every interval elsewhere, and the last one", function()
    local f = io.tmpfile()
    local bar = progress.new{ label = "rows", total = 3, unit = "rows", tty = false, out = f, interval = 3600 }
    bar:update(1)
    bar:update(2)
    bar:update(3)
    bar:finish()
    local lines = {}
    for line in output(f):gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(2, #lines)
    assert.matches("^%d%d:%d%d:%d%d rows: 1 rows of 3 rows %(33%%%)$", lines[1])
    assert.matches("^%d%d:%d%d:%d%d rows: done, 3 rows in 0%.%d s$", lines[2])
  end)
end)

describe("migrun.playbook.journal", function()
  local journal = require "migrun.playbook.journal"
  local lsn = require "migrun.lsn"

  it("keeps secrets and values JSON cannot hold out of the facts", function()
    local facts = journal.scrub{
      slot_lsn = lsn("0/16B3748"),
      conninfo = "host=a password=s3cret dbname=b",
      quoted = "host=a password='s 3cret'",
      uri = "postgresql://migrun:s3cret@db:5432/app",
      aws_secret_access_key = "abc", nested = { db_password = "x", list = { 1, 2 } },
      ratio = 0 / 0,
    }
    assert.same({
      slot_lsn = "0/16B3748",
      conninfo = "host=a password=**** dbname=b",
      quoted = "host=a password=****",
      uri = "postgresql://migrun:****@db:5432/app",
      aws_secret_access_key = "****", nested = { db_password = "****", list = { 1, 2 } },
      ratio = tostring(0 / 0),
    }, facts)
  end)
end)
