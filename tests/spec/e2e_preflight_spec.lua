-- playbooks/full.lua refusing to start: each preflight failure (and a wrong
-- config key) stops the run before any write, with a message saying what is
-- wrong and what to do.
local H = require "helpers.rehearsal"
local demo = require "migrun.rehearsal.demo"
local host = require "migrun.host"
local proc = require "migrun.proc"
local lab = require "migrun.rehearsal.lab"

describe("playbooks/full.lua preflight", function()
  local R, pristine

  setup(function()
    R = H.rehearsal("e2e-preflight")
    pristine = H.world(R)
  end)
  teardown(function() if R then R:close() end end)

  -- A variant of the rehearsal's config, written beside it.
  local function with_config(change, name)
    local cfg = {}
    for k, v in pairs(R.config) do cfg[k] = v end
    change(cfg)
    local path = R.dir .. "/" .. name .. ".lua"
    assert(host.write_file(path, "return " .. demo.literal(cfg) .. "\n"))
    return setmetatable({ config_path = path, config = cfg }, { __index = R })
  end

  local function refused(variant, pattern, code)
    local r = H.run(variant, "full.lua", { "--yes" })
    assert.is_nil(r.ok, r.output)
    assert.equal(code or 1, r.code, r.output)
    assert.truthy(r.output:find(pattern), "expected /" .. pattern .. "/ in:\n" .. r.output)
    assert.same(pristine, H.world(R))
    return r
  end

  it("refuses the primary given as the maintenance replica", function()
    local v = with_config(function(c) c.replica = c.source c.state_dir = R.dir .. "/s1" end, "replica-is-primary")
    refused(v, "not in recovery")
  end)

  it("refuses the replica given as the source primary", function()
    local v = with_config(function(c) c.source = c.replica c.state_dir = R.dir .. "/s2" end, "source-is-replica")
    refused(v, "in recovery")
  end)

  it("refuses a source without pglogical preloaded; one with it preloaded only gets the extension", function()
    local plain = assert(lab.start{ pglogical = false, settings = { source = { shared_preload_libraries = "" } } })
    local ok, err = pcall(function()
      local v = with_config(function(c)
        c.source = { conninfo = plain.source.migrun_conninfo .. " passfile=" .. plain.passfile }
        c.replica = { conninfo = plain.replica.migrun_conninfo .. " passfile=" .. plain.passfile }
        c.state_dir = R.dir .. "/s3"
      end, "no-pglogical")
      local r = H.run(v, "full.lua", { "--yes" })
      assert.is_nil(r.ok, r.output)
      assert.truthy(r.output:find("pglogical"), r.output)
      assert.truthy(r.output:find("shared_preload_libraries", 1, true), r.output)
      local slots = assert(plain.source:psql("select count(*) from pg_replication_slots"))
      assert.matches("^%s*0%s*$", slots)
    end)
    plain:stop()
    assert(ok, err)
    -- preloaded, the extension not created: preflight says the slots step creates it; a dry run shows it
    local bare = assert(lab.start{ pglogical = false })
    ok, err = pcall(function()
      local v = with_config(function(c)
        c.source = { conninfo = bare.source.migrun_conninfo .. " passfile=" .. bare.passfile }
        c.replica = { conninfo = bare.replica.migrun_conninfo .. " passfile=" .. bare.passfile }
        c.state_dir = R.dir .. "/s3b"
        -- a lab without the sample's tables: the settings naming them would be refused (issue 21)
        c.lobs, c.cutover = nil, nil
      end, "pglogical-not-created")
      local r = H.run(v, "full.lua", { "--dry-run" })
      assert.is_true(r.ok, r.output)
      assert.truthy(r.output:find("the slots step will CREATE EXTENSION pglogical", 1, true), r.output)
      assert.truthy(r.output:find("dry run: source: create extension if not exists pglogical", 1, true), r.output)
      assert.matches("^%s*$", assert(bare.source:psql("select extname from pg_extension where extname = 'pglogical'")))
    end)
    bare:stop()
    assert(ok, err)
  end)

  it("refuses a foreign active slot unless it is allowed", function()
    local psql = function(sql) return assert(R.lab.source:psql(sql)) end
    psql("select pg_create_logical_replication_slot('other_tool', 'test_decoding')")
    local holder = assert(proc.spawn{ R.lab.bin .. "/pg_recvlogical", "--start", "--slot=other_tool",
      "--dbname=" .. R.lab.source.conninfo, "--file=/dev/null", stdin = false, stderr = "null",
      die_with_parent = true })
    local ok, err = pcall(function()
      local v = with_config(function(c) c.state_dir = R.dir .. "/s4" end, "foreign-slot")
      local before = H.world(R)
      local r = H.run(v, "full.lua", { "--yes" })
      assert.is_nil(r.ok, r.output)
      assert.truthy(r.output:find("other_tool", 1, true), r.output)
      assert.truthy(r.output:find("allow_slots", 1, true), r.output)
      assert.same(before, H.world(R))
      -- allowed: preflight passes (only --only preflight, to leave the servers as they are)
      local allowed = with_config(function(c)
        c.state_dir = R.dir .. "/s5"
        c.preflight = { allow_slots = { "other_tool" } }
      end, "foreign-slot-allowed")
      local r2 = H.run(allowed, "full.lua", { "--only", "preflight" })
      assert.is_true(r2.ok, r2.output)
    end)
    holder:kill("TERM")
    holder:wait()
    for _ = 1, 50 do
      local active = psql("select active from pg_replication_slots where slot_name = 'other_tool'")
      if active:match("f") then break end
      require("migrun.aws").sleep(0.1)
    end
    psql("select pg_drop_replication_slot('other_tool')")
    assert(ok, err)
  end)

  it("refuses an explicit group that names a table the source does not have", function()
    local v = with_config(function(c)
      c.groups = { explicit = { { name = "billing", tables = { "public.documents", "public.no_such_table" } } } }
      c.state_dir = R.dir .. "/s7"
    end, "explicit-missing")
    refused(v, "public%.no_such_table %(group billing%)")
  end)

  -- Phase II is checked before phase I writes anything.
  local function refused_with_env(variant, env, pattern)
    local r = H.run(variant, "full.lua", { "--yes" }, { env = env })
    assert.is_nil(r.ok, r.output)
    assert.equal(1, r.code, r.output)
    assert.truthy(r.output:find(pattern), "expected /" .. pattern .. "/ in:\n" .. r.output)
    assert.same(pristine, H.world(R))
    assert.falsy(r.output:find(R.lab.dms.secret_key, 1, true))
    return r
  end

  it("refuses an unreachable DMS, a wrong secret, no credentials, an unknown instance", function()
    local dead = with_config(function(c)
      c.dms = {}
      for k, v in pairs(R.config.dms) do c.dms[k] = v end
      c.dms.endpoint_url = "http://127.0.0.1:9" -- discard: nothing listens
      c.dms.max_attempts = 2
      c.state_dir = R.dir .. "/s8"
    end, "dms-unreachable")
    refused_with_env(dead, {}, "dms%s+reachable%s+ERROR%s+http://127%.0%.0%.1:9")

    local same = with_config(function(c) c.state_dir = R.dir .. "/s9" end, "dms-secret")
    local r = refused_with_env(same, { AWS_SECRET_ACCESS_KEY = "not-the-secret" },
      "credentials accepted%s+ERROR%s+.*InvalidSignatureException")
    assert.truthy(r.output:find("access key or its secret is wrong", 1, true), r.output)

    local empty = R.dir .. "/no-home"
    assert(host.mkdir(empty))
    r = refused_with_env(same, { AWS_ACCESS_KEY_ID = "", AWS_SECRET_ACCESS_KEY = "", HOME = empty,
      AWS_EC2_METADATA_DISABLED = "true", AWS_CONFIG_FILE = empty .. "/config",
      AWS_SHARED_CREDENTIALS_FILE = empty .. "/credentials", AWS_PROFILE = "" },
      "credentials%s+ERROR%s+.*no AWS credentials found")
    -- the whole message: every place the chain looked, not its first line only
    assert.truthy(r.output:find("AWS_EC2_METADATA_DISABLED", 1, true) or r.output:find("instance metadata", 1, true),
      r.output)

    local wrong = with_config(function(c)
      c.dms = {}
      for k, v in pairs(R.config.dms) do c.dms[k] = v end
      c.dms.replication_instance_arn = "arn:aws:dms:us-east-1:123456789012:rep:NOSUCHINSTANCE"
      c.state_dir = R.dir .. "/s10"
    end, "dms-no-instance")
    refused_with_env(wrong, {}, "no replication instance arn:aws:dms:us%-east%-1:123456789012:rep:NOSUCHINSTANCE")
  end)

  -- The DMS boundary (docs/dms-boundary.md): a table neither the replica nor DMS can read stops the run
  -- before any write, named, with what to do.
  it("refuses an unlogged table and a large object column, writing nothing", function()
    local psql = function(sql) return assert(R.lab.source:psql(sql)) end
    psql("create unlogged table public.scratch (id int primary key); "
      .. "create table public.scans (id int primary key, image oid)")
    local ok, err = pcall(function()
      local v = with_config(function(c) c.state_dir = R.dir .. "/s7" end, "boundary")
      local r = refused(v, "UNLOGGED")
      assert.truthy(r.output:find('"public"."scratch" is UNLOGGED', 1, true), r.output)
      assert.truthy(r.output:find('"public"."scans"."image" is of type oid', 1, true), r.output)
      assert.truthy(r.output:find("SET LOGGED", 1, true), r.output)
      assert.truthy(r.output:find("2 errors", 1, true), r.output)
      assert.equal("0", psql("select count(*) from pg_replication_slots"))
    end)
    psql("drop table public.scratch, public.scans")
    assert(ok, err)
  end)

  it("refuses a wrong config key before connecting anywhere", function()
    local v = with_config(function(c) c.grups = { largest_alone = 2 } c.state_dir = R.dir .. "/s6" end, "bad-key")
    local r = refused(v, "grups", 2)
    assert.truthy(r.output:find("groups", 1, true), r.output)
  end)
end)
