--[[
migrun.pgbin: where the PostgreSQL programs of each major are on this machine,
and what they need to run. Two places, in this order:

  - the system's: /usr/lib/postgresql/<major>/bin (Debian's packages;
    tools/install-deps gives 15 with pglogical);
  - the cache of tools/install-pg-versions ($MIGRUN_PG_CACHE, default
    /var/cache/migrun/pg): <cache>/<major>/env names the bindir, the
    LD_LIBRARY_PATH its programs need (Debian 11's libraries unpacked beside
    13), whether pglogical and the client tools (pg_dump, psql) are there.
    npm's embedded-postgres servers (12..18) have neither, as RDS has neither.

Never /usr/local (an unrelated build there has no pglogical).

  local pgbin = require "migrun.pgbin"
  local inst = assert(pgbin.find(13))
  -- { major = 13, bindir = ".../13/bin", env = { LD_LIBRARY_PATH = ... } | nil,
  --   origin = "system" | "debian-11" | "npm", version = "13.16" | nil,
  --   pglogical = true | false, client_tools = true | false }
  proc.run(pgbin.argv(inst, { inst.bindir .. "/postgres", "--version" }))

  pgbin.cache_dir() -> the cache directory
  pgbin.find(major) -> inst | nil, err (kind "pgbin", hint: what to run)
  pgbin.list() -> { inst, ... } every major found, lowest first (system over cache)
  pgbin.argv(inst, argv) -> argv with inst.env merged into argv.env (a copy)
]]
local proc = require "migrun.proc"
local host = require "migrun.host"
local errors = require "migrun.error"

local pgbin = {}

local SYSTEM = "/usr/lib/postgresql"

function pgbin.cache_dir()
  local d = os.getenv("MIGRUN_PG_CACHE")
  if d and d ~= "" then return (d:gsub("/+$", "")) end
  return "/var/cache/migrun/pg"
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function ls(dir)
  local ok, _, _, out = proc.run{ "ls", "-1", "--", dir }
  local names = {}
  for name in (ok and out or ""):gmatch("[^\n]+") do names[#names + 1] = name end
  return names
end

local function system_inst(major)
  local bindir = ("%s/%s/bin"):format(SYSTEM, major)
  if not (exists(bindir .. "/postgres") and exists(bindir .. "/initdb")) then return nil end
  return { major = tonumber(major) or major, bindir = bindir, origin = "system",
           pglogical = exists(("%s/%s/lib/pglogical.so"):format(SYSTEM, major)),
           client_tools = exists(bindir .. "/pg_dump") and exists(bindir .. "/psql") }
end

local function cache_inst(major)
  local text = host.read_file(("%s/%s/env"):format(pgbin.cache_dir(), major))
  if not text then return nil end
  local kv = {}
  for k, v in text:gmatch("([%w_]+)=([^\n]*)") do kv[k] = v end
  if not kv.bindir or not exists(kv.bindir .. "/postgres") then return nil end
  return { major = tonumber(major) or major, bindir = kv.bindir, origin = kv.origin or "cache",
           version = kv.version, env = kv.ld_library_path ~= "" and { LD_LIBRARY_PATH = kv.ld_library_path } or nil,
           pglogical = (kv.pglogical or "") ~= "", pglogical_version = kv.pglogical ~= "" and kv.pglogical or nil,
           client_tools = kv.client_tools == "yes" }
end

function pgbin.find(major)
  local m = tostring(major)
  assert(m:match("^%d+$") or m:match("^9%.%d$"), "pgbin.find: a major version expected, got " .. m)
  local inst = system_inst(m) or cache_inst(m)
  if inst then return inst end
  local how = m == "15" and "tools/install-deps (Debian 12's postgresql-15)"
    or ("tools/install-pg-versions %s"):format(m)
  return nil, errors.new{ kind = "pgbin", where = "PostgreSQL " .. m,
    message = ("no PostgreSQL %s server here (looked in %s/%s/bin and %s/%s)"):format(m, SYSTEM, m, pgbin.cache_dir(), m),
    hint = "run " .. how }
end

function pgbin.list()
  local seen, out = {}, {}
  for _, dir in ipairs{ SYSTEM, pgbin.cache_dir() } do
    for _, name in ipairs(ls(dir)) do
      if not seen[name] and (name:match("^%d+$") or name:match("^9%.%d$")) then
        local inst = pgbin.find(name)
        if inst then
          seen[name] = true
          out[#out + 1] = inst
        end
      end
    end
  end
  local function num(i) local a, b = tostring(i.major):match("^(%d+)%.?(%d*)") return tonumber(a) * 100 + (tonumber(b) or 0) end
  table.sort(out, function(a, b) return num(a) < num(b) end)
  return out
end

function pgbin.argv(inst, argv)
  local out = {}
  for k, v in pairs(argv) do out[k] = v end
  if inst and inst.env then
    local env = {}
    for k, v in pairs(argv.env or {}) do env[k] = v end
    for k, v in pairs(inst.env) do env[k] = v end
    out.env = env
  end
  return out
end

return pgbin
