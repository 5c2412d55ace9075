-- migrun.playbook.config: the migration's config file, checked up front with messages
-- that name the key, what was expected and what was found.
local config = require "migrun.playbook.config"
local proc = require "migrun.proc"

local SOURCE = os.getenv("MIGRUN_SOURCE_DIR") or os.getenv("PWD")

local dir
local counter = 0

-- Writes a config file whose body is `text`; -> its path
local function file(text, name)
  counter = counter + 1
  local path = dir .. "/" .. (name or ("c" .. counter .. ".lua"))
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

local SERVERS = [[
  source = { conninfo = "host=127.0.0.1 port=5432 dbname=app" },
  replica = { conninfo = "host=127.0.0.1 port=5433 dbname=app" },
  target = { conninfo = "host=127.0.0.1 port=5434 dbname=app" },
]]

-- A valid config plus `extra` keys; -> cfg | nil, message
local function load_with(extra, name)
  local cfg, err = config.load(file("return {\n" .. SERVERS .. (extra or "") .. "\n}\n", name))
  return cfg, err and tostring(err)
end

describe("migrun.playbook.config", function()
  setup(function()
    local _, _, _, out = proc.run{ "mktemp", "-d" }
    dir = out:match("%S+")
  end)

  teardown(function()
    if dir then proc.run{ "rm", "-rf", dir } end
  end)

  it("fills every default", function()
    local cfg = assert(load_with(nil, "migration.lua"))
    assert.equal("migration", cfg.name)
    assert.equal(dir .. "/migrun-state", cfg.state_dir)
    assert.equal(dir .. "/migration.lua", cfg.config_path)
    assert.is_nil(cfg.schemas)
    assert.same({}, cfg.exclude_tables)
    assert.same({ prefix = "dms_slot_", node = "migrun_provider" }, cfg.slots)
    assert.same({ largest_alone = 5, explicit = {} }, cfg.groups)
    assert.same({ default = { max_kb = 32, truncation_ok = true }, tables = {} }, cfg.lobs)
    assert.same({ jobs = 2, analyze = true }, cfg.full_load) -- chunk_bytes, split_bytes: from the data
    assert.same({ timestamp_column = "created_at", timestamp_columns = {}, large_tables = 5,
                  small_sample = 10, queries = {} }, cfg.qa)
    assert.same({ warn_bytes = 50 * 2 ^ 30, stop_bytes = 200 * 2 ^ 30, warn_ahead = 3600, rate_window = 600,
                  replica_min_free_bytes = 20 * 2 ^ 30, replica_disk_unwatched = false, interval = 30 },
      cfg.wal_guard)
    assert.same({ on_change = "stop" }, cfg.schema_drift)
    assert.same({ allow_slots = {}, min_free_bytes = 10 * 2 ^ 30 }, cfg.preflight)
    assert.same({ source_endpoint = {}, target_endpoint = {}, task = {}, start_pause = 5,
                  catch_up = { lag_bytes = 1024 * 1024, timeout = 6 * 3600, poll = 5 } }, cfg.dms)
  end)

  it("takes lobs.default for what a per-table LOB policy leaves out", function()
    local cfg = assert(load_with([[
      lobs = { default = { max_kb = 64, truncation_ok = false },
               tables = { ["public.events"] = { max_kb = 512 } } },
    ]]))
    assert.same({ max_kb = 512, truncation_ok = false }, cfg.lobs.tables["public.events"])
  end)

  it("resolves state_dir from the config file's directory, keeps absolute ones", function()
    local cfg = assert(load_with('state_dir = "runs/app",'))
    assert.equal(dir .. "/runs/app", cfg.state_dir)
    cfg = assert(load_with('state_dir = "/srv/migrun",'))
    assert.equal("/srv/migrun", cfg.state_dir)
    -- a relative path to the config file itself
    local name = "rel.lua"
    load_with(nil, name)
    local out = select(4, proc.run{ os.getenv("MIGRUN_BIN") or "build/migrun", "-e",
      "print(require('migrun.playbook.config').load('" .. name .. "').state_dir)", cwd = dir })
    assert.equal(dir .. "/migrun-state\n", out)
  end)

  it("reads secrets from the environment and nothing else of the system", function()
    local path = file([[
      assert(io == nil and require == nil and os.execute == nil and load == nil)
      return { name = "app",
        source = { conninfo = "host=127.0.0.1 password=" .. (os.getenv("HOME") or "x") },
        replica = { conninfo = "host=127.0.0.1" }, target = { conninfo = "host=127.0.0.1" } }
    ]])
    assert(config.load(path))
  end)

  it("names the key, what was expected and what was found", function()
    local _, err = load_with('dms = { start_pause = "five" },', "migration.lua")
    assert.equal('migration.lua: dms.start_pause: expected a number of seconds >= 0, found "five"', err)
    _, err = load_with("dms = { start_pause = -1 },")
    assert.matches(": dms.start_pause: expected a number of seconds >= 0, found %-1$", err)
    _, err = load_with("full_load = { jobs = 1.5 },")
    assert.matches(": full_load.jobs: expected a whole number >= 1, found 1.5$", err)
    _, err = load_with("full_load = { chunk_bytes = 1000 },")
    assert.matches(": full_load.chunk_bytes: expected a number of bytes >= 1 MiB, found 1000$", err)
    _, err = load_with("groups = { explicit = { { name = 'a', tables = { 'orders' } } } },")
    assert.matches(': groups.explicit%[1%].tables%[1%]: expected a table name "schema.name", found "orders"$', err)
    _, err = load_with("lobs = { tables = { ['public.e'] = { truncation_ok = 'no' } } },")
    assert.matches(': lobs.tables%["public.e"%].truncation_ok: expected true or false, found "no"$', err)
    _, err = load_with("wal_guard = { warn_bytes = 300 * 2^30 },")
    assert.matches(": wal_guard: expected warn_bytes <= stop_bytes$", err)
    _, err = load_with("wal_guard = { stop_free_percent = 120 },")
    assert.matches(": wal_guard.stop_free_percent: expected a percentage from 0 to 100, found 120$", err)
    _, err = load_with("wal_guard = { warn_free_percent = 5, stop_free_percent = 10 },")
    assert.matches(": wal_guard: expected warn_free_percent >= stop_free_percent", err)
    _, err = load_with("wal_guard = { replica_free_command = 'df -B1 /srv' },")
    assert.matches(': wal_guard.replica_free_command: expected a command as an argv list { "prog", "arg", ... }, '
      .. 'found "df %-B1 /srv"$', err)
    _, err = load_with("wal_guard = { source_free_command = { 'df', 2 } },")
    assert.matches(": wal_guard.source_free_command: expected an argv list of strings, found a table$", err)
    _, err = load_with("schema_drift = { on_change = 'ignore' },")
    assert.matches(': schema_drift.on_change: expected "stop" or "warn", found "ignore"$', err)
    assert(load_with("wal_guard = { replica_free_command = { 'df', '-B1', '/srv' }, warn_free_percent = 20,"
      .. " stop_free_percent = 10 }, schema_drift = { on_change = 'warn' },"))
    _, err = load_with("schemas = 'public',")
    assert.matches(': schemas: expected a list { ... }, found "public"$', err)
    _, err = load_with("name = 'my_app',")
    assert.matches(': name: expected a name of letters, digits and hyphens starting with a letter', err)
    _, err = load_with("dms = { endpoint_url = 'localhost:4566' },")
    assert.matches(': dms.endpoint_url: expected an http:// or https:// URL, found "localhost:4566"$', err)
  end)

  it("rejects unknown keys, suggesting the nearest known one", function()
    local _, err = load_with("dms = { start_paus = 5 },", "migration.lua")
    assert.equal("migration.lua: dms.start_paus: unknown key (did you mean dms.start_pause?)", err)
    _, err = load_with("wal_gaurd = {},")
    assert.matches(": wal_gaurd: unknown key %(did you mean wal_guard%?%)$", err)
    _, err = load_with("qa = { frobnicate = true },")
    assert.matches(": qa.frobnicate: unknown key %(known here: timestamp_column, timestamp_columns, " ..
                   "large_tables, small_sample, queries%)$", err)
  end)

  it("requires the three servers", function()
    local _, cfg, err
    cfg, err = config.load(file([[return { source = { conninfo = "host=a" },
      target = { conninfo = "host=b" } }]]))
    assert.is_nil(cfg)
    assert.matches(": replica: missing: maintenance streaming replica", tostring(err))
    _, err = config.load(file([[return { source = { conninfo = "host=a" }, replica = {},
      target = { conninfo = "host=b" } }]]))
    assert.matches(": replica.conninfo: missing: connection string of the maintenance", tostring(err))
    assert.equal("config", err.kind)
  end)

  it("checks connection strings with libpq's parser without showing them", function()
    local _, cfg, err
    cfg, err = config.load(file([[return { source = { conninfo = "host=a hots=b password=s3cret" },
      replica = { conninfo = "host=a" }, target = { conninfo = "host=b" } }]]))
    assert.is_nil(cfg)
    err = tostring(err)
    assert.matches(': source.conninfo: expected a libpq connection string, found one libpq rejects: ' ..
                   'invalid connection option "hots"', err)
    assert.falsy(err:find("s3cret", 1, true))
    _, err = config.load(file([[return { source = { conninfo = "host=a password s3cret" },
      replica = { conninfo = "host=a" }, target = { conninfo = "host=b" } }]]))
    assert.matches(": source.conninfo: expected a libpq connection string", tostring(err))
    assert.falsy(tostring(err):find("s3cret", 1, true))
    _, err = config.load(file([[return { source = { conninfo = "postgresql://u:s3cret@h:99999999999/db" },
      replica = { conninfo = "host=a" }, target = { conninfo = "host=b" } }]]))
    if err then assert.falsy(tostring(err):find("s3cret", 1, true)) end
    -- a wrong type does not show the value either
    _, err = config.load(file([[return { source = { conninfo = 42 },
      replica = { conninfo = "host=a" }, target = { conninfo = "host=b" } }]]))
    assert.matches(": source.conninfo: expected a libpq connection string, found 42$", tostring(err))
  end)

  it("says which file is missing and how to give one", function()
    local cfg, err = config.load(dir .. "/nope.lua")
    assert.is_nil(cfg)
    assert.equal("config", err.kind)
    assert.matches("no configuration file " .. dir:gsub("%p", "%%%0") .. "/nope%.lua", tostring(err))
    assert.matches("%-%-config FILE", tostring(err))
  end)

  it("reports a file that does not run or does not return a table", function()
    local _, err = config.load(file("return {", "broken.lua"))
    assert.matches("broken.lua:1: unexpected symbol near <eof>", tostring(err))
    _, err = config.load(file("error('boom')", "raises.lua"))
    assert.matches("raises.lua: error while running it: .*boom", tostring(err))
    _, err = config.load(file("return 42", "number.lua"))
    assert.equal("number.lua: expected the file to return a table, found 42", tostring(err))
  end)

  it("never echoes the source text of a broken file, which may hold a password", function()
    for name, src in pairs{
      ["string.lua"] = 'return { source = { conninfo = "host=a"\n "password=S3cr3t" } }',
      ["long.lua"] = "return { x = [[a]] [[password S3cr3t]] }",
      ["runs.lua"] = 'local pw = "S3cr3t"\nerror("cannot use password=" .. pw)',
      ["uri.lua"] = 'error("postgresql://u:S3cr3t@h/db")',
    } do
      local cfg, err = config.load(file(src, name))
      assert.is_nil(cfg)
      assert.matches(name:gsub("%p", "%%%0") .. ":%d", tostring(err))
      assert.falsy(tostring(err):find("S3cr3t", 1, true), tostring(err))
    end
  end)

  it("loads and validates the shipped example", function()
    local cfg, err = config.load(SOURCE .. "/playbooks/migration.example.lua")
    assert(cfg, tostring(err))
    assert.equal("app", cfg.name)
    assert.equal(SOURCE .. "/playbooks/migrun-state", cfg.state_dir)
    assert.same({ max_kb = 512, truncation_ok = false }, cfg.lobs.tables["public.events"])
    assert.equal("billing", cfg.groups.explicit[1].name)
    assert.equal(200 * 2 ^ 30, cfg.wal_guard.stop_bytes)
  end)

  it("documents every key", function()
    local text = config.describe()
    for _, key in ipairs{ "name", "state_dir", "source.conninfo", "groups.explicit%[i%].tables",
        "lobs.default.max_kb", 'lobs.tables%["schema.table"%].truncation_ok', "qa.queries%[i%].sql",
        "wal_guard.stop_bytes", "preflight.allow_slots", "dms.catch_up.poll", "dms.task.batch_apply" } do
      assert.matches("\n" .. key .. " ", "\n" .. text)
    end
    assert.matches("wal_guard.stop_bytes%s+stop the run when they hold back this much %(a number of bytes >= 0; default 200 GiB%)", text)
    assert.matches("wal_guard.replica_free_command%s+prints the replica's free disk in bytes", text)
    assert.matches("schema_drift.on_change%s+what the guard does", text)
  end)
end)
