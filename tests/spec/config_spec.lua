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
    assert.same({ jobs = 2, analyze = true, hash = true, reconnect_timeout = 300, attempts = 5 }, cfg.full_load) -- chunk_bytes, split_bytes: from the data
    assert.same({ timestamp_column = "created_at", timestamp_columns = {}, large_tables = 5,
                  small_sample = 10, queries = {} }, cfg.qa)
    assert.same({ warn_bytes = 50 * 2 ^ 30, stop_bytes = 200 * 2 ^ 30, warn_ahead = 3600, rate_window = 600,
                  replica_min_free_bytes = 20 * 2 ^ 30, replica_disk_unwatched = false, interval = 30 },
      cfg.wal_guard)
    assert.same({ on_change = "stop" }, cfg.schema_drift)
    assert.same({ allow_slots = {}, min_free_bytes = 10 * 2 ^ 30, wal_rate_seconds = 5, load_rate = 32 * 2 ^ 20,
                  query_timeout = 10 }, cfg.preflight)
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
    assert.matches(': dms.endpoint_url: expected an http:// or https:// URL with a host, found "localhost:4566"$', err)
  end)

  -- issue 21: what would fail only at dms_setup (after the slots and the full load), or
  -- be silently ignored, is refused when the file is read, saying why and what to do
  it("checks every number against the range DMS and the servers allow", function()
    local _, err = load_with("lobs = { default = { max_kb = 204800 } },")
    assert.matches(": lobs.default.max_kb: expected a whole number of KB from 1 to 102400 %(100 MB: the largest "
      .. "LobMaxSize DMS recommends; for larger values set truncation_ok = false, full LOB mode has no size limit%), "
      .. "found 204800$", err)
    _, err = load_with("lobs = { tables = { ['public.events'] = { max_kb = 0 } } },")
    assert.matches(': lobs.tables%["public.events"%].max_kb: expected a whole number of KB from 1 to 102400', err)
    _, err = load_with("dms = { task = { lob_max_kb = 102401 } },")
    assert.matches(": dms.task.lob_max_kb: expected a whole number of KB from 1 to 102400", err)
    assert(load_with("lobs = { default = { max_kb = 102400 } }, dms = { task = { lob_max_kb = 1 } },"))
    _, err = load_with("dms = { source_endpoint = { port = 99999 } },")
    assert.matches(": dms.source_endpoint.port: expected a port from 1 to 65535, found 99999$", err)
    _, err = load_with("dms = { target_endpoint = { ssl_mode = 'required' } },")
    assert.matches(': dms.target_endpoint.ssl_mode: expected one of none, require, verify%-ca, verify%-full '
      .. '%(DMS\'s SslMode%), found "required"$', err)
    _, err = load_with("dms = { source_endpoint = { heartbeat = 0 } },")
    assert.matches(": dms.source_endpoint.heartbeat: expected true, or the heartbeat's period in whole minutes >= 1", err)
    _, err = load_with("dms = { source_endpoint = { host = '/var/run/postgresql' } },")
    assert.matches("dms.source_endpoint.host: expected a host name or address DMS connects to over TCP %(not a Unix "
      .. "socket directory%)", err)
    _, err = load_with("know_data = { write_rate_seconds = 0 },")
    assert.matches(": know_data.write_rate_seconds: expected a number of seconds >= 0.1, found 0$", err)
    _, err = load_with("preflight = { load_rate = 1000 },")
    assert.matches(": preflight.load_rate: expected a number of bytes per second >= 1 MiB, found 1000$", err)
  end)

  it("checks URLs for a scheme, a host and a port, never showing a webhook's", function()
    for _, bad in ipairs{ "https://", "http://:80/x", "https://hooks.example.com:70000/x", "ftp://hooks.example.com",
                          "https://hooks.example.com/a b" } do
      local _, err = load_with(("notify = { webhook = %q },"):format(bad))
      assert.matches(": notify.webhook: expected an http:// or https:// URL with a host", err)
      assert.matches("found a string$", err)
      assert.falsy(err:find("hooks.example.com", 1, true), err)
    end
    assert(load_with("notify = { webhook = 'https://hooks.example.com/services/T0/B0/x?y=1' },"))
    assert(load_with("notify = { webhook = 'http://[::1]:8080/hook' }, dms = { endpoint_url = 'http://127.0.0.1:4566' },"))
  end)

  it("refuses slot, node and group names PostgreSQL would not take, and says why", function()
    local _, err = load_with("slots = { prefix = 'dms_slot_01; drop table x' },")
    assert.matches(': slots.prefix: expected lower%-case letters, digits and _ only, at most 58 bytes %(PostgreSQL\'s '
      .. 'rule for slot names: <prefix>01, ... and <prefix>watch must fit in 63%), found "dms_slot_01; drop table x"$', err)
    _, err = load_with("slots = { prefix = 'DMS_' },")
    assert.matches(": slots.prefix: expected lower%-case letters", err)
    _, err = load_with(("slots = { prefix = %q },"):format(("p"):rep(59)))
    assert.matches(": slots.prefix: expected lower%-case letters, digits and _ only, at most 58 bytes", err)
    assert(load_with(("slots = { prefix = %q },"):format(("p"):rep(58))))
    _, err = load_with("slots = { node = 'node-1' },")
    assert.matches(': slots.node: expected lower%-case letters, digits and _ only, at most 63 bytes, found "node%-1"$', err)
    _, err = load_with("groups = { explicit = { { name = 'billing; drop table x', tables = { 'public.a' } } } },")
    assert.matches(': groups.explicit%[1%].name: expected a group name of letters, digits, _ and %- starting with a '
      .. 'letter, at most 63 bytes, found "billing; drop table x"$', err)
    _, err = load_with("groups = { explicit = { { name = '2fast', tables = { 'public.a' } } } },")
    assert.matches(": groups.explicit%[1%].name: expected a group name", err)
  end)

  it("refuses a table in two explicit groups, two groups of one name, a group without tables", function()
    local cfg, err = load_with([[groups = { explicit = {
      { name = "billing", tables = { "public.invoices", "public.payments" } },
      { name = "audit", tables = { "public.log", "public.payments" } } } },]])
    assert.is_nil(cfg)
    assert.matches(': groups.explicit%[2%].tables%[2%]: public.payments is already in group "billing": a table '
      .. "replicates through one slot, so it can be in one group only HINT: keep it in one of the two groups$", err)
    local _, e = config.load(file("return {\n" .. SERVERS .. [[groups = { explicit = {
      { name = "billing", tables = { "public.invoices" } }, { name = "billing", tables = { "public.log" } } } } }]]))
    assert.matches(': groups.explicit%[2%].name: a second group named "billing"', tostring(e))
    assert.equal("rename one of them", e.hint)
    _, err = load_with("groups = { explicit = { { name = 'empty', tables = {} } } },")
    assert.matches(': groups.explicit%[1%].tables: expected at least one table "schema.name"$', err)
  end)

  it("refuses an excluded table that another setting names", function()
    local _, e = config.load(file("return {\n" .. SERVERS .. [[exclude_tables = { "public.tmp" },
      lobs = { tables = { ["public.tmp"] = { truncation_ok = false } } } }]]))
    assert.matches(': lobs.tables%["public.tmp"%]: public.tmp is in exclude_tables: an excluded table is not '
      .. "migrated, so this setting would never apply HINT: remove it from exclude_tables", tostring(e))
    assert.equal("remove it from exclude_tables to migrate it, or from here", e.hint)
    local _, err = load_with("exclude_tables = { 'public.tmp' }, cutover = { count_only = { 'public.tmp' } },")
    assert.matches(": cutover.count_only%[1%]: public.tmp is in exclude_tables", err)
    _, err = load_with("exclude_tables = { 'public.tmp' }, groups = { explicit = { { name = 'g', tables = { 'public.tmp' } } } },")
    assert.matches(": groups.explicit%[1%].tables%[1%]: public.tmp is in exclude_tables", err)
    _, err = load_with("exclude_tables = { 'public.tmp' }, qa = { timestamp_columns = { ['public.tmp'] = 'at' } },")
    assert.matches(': qa.timestamp_columns%["public.tmp"%]: public.tmp is in exclude_tables', err)
  end)

  it("refuses a conninfo sslmode DMS would refuse for its endpoint, unless the endpoint says its own", function()
    local function with_target(conninfo, extra)
      return config.load(file(("return { source = { conninfo = 'host=a' }, replica = { conninfo = 'host=b' },"
        .. " target = { conninfo = %q }, %s }"):format(conninfo, extra or "")))
    end
    local cfg, err = with_target("host=rds.example.com sslmode=prefer password=s3cret")
    assert.is_nil(cfg)
    assert.matches(": target.conninfo: sslmode=prefer becomes the DMS target endpoint's SslMode, which takes none, "
      .. "require, verify%-ca, verify%-full: DMS would refuse the endpoint at dms_setup, after the full load HINT: ",
      tostring(err))
    assert.truthy(err.hint:find("dms.target_endpoint.ssl_mode", 1, true))
    assert.falsy(tostring(err):find("s3cret", 1, true))
    assert(with_target("host=rds.example.com sslmode=prefer", "dms = { target_endpoint = { ssl_mode = 'require' } }"))
    assert(with_target("host=rds.example.com sslmode=verify-full"))
  end)

  it("takes DMS's and libpq's names for the endpoint settings as migrun's, and catches typos there", function()
    local cfg = assert(load_with("dms = { source_endpoint = { server_name = '10.0.0.5', port = 5432, sslmode = 'require' } },"))
    assert.same({ host = "10.0.0.5", port = 5432, ssl_mode = "require" }, cfg.dms.source_endpoint)
    local _, err = load_with("dms = { source_endpoint = { server_name = 'a', host = 'b' } },")
    assert.matches(": dms.source_endpoint: expected host and server_name name the same setting with two values: give one", err)
    _, err = load_with("dms = { source_endpoint = { server_nmae = 'a' } },")
    assert.matches(": dms.source_endpoint.server_nmae: unknown key %(did you mean dms.source_endpoint.server_name%?%)$", err)
    _, err = load_with("dms = { target_endpoint = { capture_ddls = false } },")
    assert.matches(": dms.target_endpoint.capture_ddls: unknown key", err)
  end)

  it("refuses two QA queries of one name, and an empty one", function()
    local _, err = load_with([[qa = { queries = { { name = "paid", sql = "select 1" }, { name = "paid", sql = "select 2" } } },]])
    assert.matches(': qa.queries%[2%].name: a second query named "paid"', err)
    _, err = load_with([[qa = { queries = { { name = "x", sql = "  " } } },]])
    assert.matches(': qa.queries%[1%].sql: expected a read%-only query %(one SELECT%)', err)
  end)

  it("finds the nearest name for a typo", function()
    assert.equal("public.orders", config.nearest("public.ordres", { "public.items", "public.orders", "audit.orders" }))
    assert.equal("public.Orders", config.nearest("public.orders", { "public.Orders" }))
    assert.is_nil(config.nearest("public.zzz", { "public.orders" }))
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
    -- a URI libpq rejects with a message that quotes it whole: its password masked
    -- (libpq's own message: 'end of string reached when looking for matching "]" in
    -- IPv6 host address in URI: "postgresql://u:s3cret@[::1/db"')
    _, err = config.load(file([[return { source = { conninfo = "postgresql://u:s3cret@[::1/db" },
      replica = { conninfo = "host=a" }, target = { conninfo = "host=b" } }]]))
    assert.matches(': source.conninfo: expected a libpq connection string, found one libpq rejects: .*URI: '
      .. '"postgresql://u:%*%*%*%*@%[::1/db"$', tostring(err))
    assert.falsy(tostring(err):find("s3cret", 1, true))
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
