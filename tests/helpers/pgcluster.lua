-- A throwaway PostgreSQL 15 cluster for specs, until migrun.lab provides the
-- three-cluster lab. Runs as user postgres in a mktemp directory, listens on
-- 127.0.0.1 and a unix socket in that directory, on a free port.
--   local cluster = require("helpers.pgcluster").start()
--   cluster.conninfo           "host=127.0.0.1 port=N user=postgres dbname=postgres"
--   cluster:conninfo_for{ dbname = "x", user = "u", password = "p" }
--   cluster:stop()
-- pg_hba: user postgres trusted on the socket and 127.0.0.1; every other role
-- must give its password (scram-sha-256) on 127.0.0.1.
local proc = require "migrun.proc"

local M = {}
local BIN = "/usr/lib/postgresql/15/bin/"

local function run(argv)
  local ok, how, code, out, err = proc.run(argv)
  if not ok then
    error(string.format("%s failed (%s %s): %s%s", proc.quote(argv), tostring(how), tostring(code),
      out or "", err or ""), 2)
  end
  return out
end

local function as_postgres(argv)
  local a = { "runuser", "-u", "postgres", "--" }
  for _, v in ipairs(argv) do a[#a + 1] = v end
  return a
end

local Cluster = {}
Cluster.__index = Cluster

function Cluster:conninfo_for(t)
  local parts = { "host=127.0.0.1", "port=" .. self.port }
  parts[#parts + 1] = "user=" .. (t.user or "postgres")
  parts[#parts + 1] = "dbname=" .. (t.dbname or "postgres")
  if t.password then parts[#parts + 1] = "password=" .. t.password end
  return table.concat(parts, " ")
end

function Cluster:stop()
  if self.stopped then return end
  self.stopped = true
  proc.run(as_postgres { BIN .. "pg_ctl", "-D", self.dir .. "/data", "-m", "immediate", "-w", "stop" })
  proc.run { "rm", "-rf", self.dir }
end

function M.start(opts)
  opts = opts or {}
  local dir = run({ "mktemp", "-d", "/tmp/migrun-pgtest.XXXXXX" }):gsub("%s+$", "")
  run { "chown", "postgres:postgres", dir }
  run { "chmod", "700", dir }
  local self = setmetatable({ dir = dir }, Cluster)
  local ok, err = pcall(function()
    run(as_postgres { BIN .. "initdb", "-D", dir .. "/data", "-U", "postgres", "-A", "trust",
      "-E", "UTF8", "--locale=C", "--no-sync" })
    local hba = assert(io.open(dir .. "/data/pg_hba.conf", "w"))
    hba:write("local all postgres trust\n",
      "host all postgres 127.0.0.1/32 trust\n",
      "host all all 127.0.0.1/32 scram-sha-256\n")
    hba:close()
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 100000)
    for _ = 1, 8 do
      local port = math.random(20000, 60000)
      local started = proc.run(as_postgres { BIN .. "pg_ctl", "-D", dir .. "/data", "-l", dir .. "/log",
        "-w", "-t", "60", "start", "-o",
        "-p " .. port .. " -k " .. dir .. " -c listen_addresses=127.0.0.1 -c fsync=off" ..
        " -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB" ..
        " -c max_wal_size=2GB" .. (opts.options and (" " .. opts.options) or "") })
      if started then
        self.port = port
        break
      end
    end
    assert(self.port, "could not start a cluster (see " .. dir .. "/log)")
  end)
  if not ok then
    self:stop()
    error(err, 0)
  end
  self.host = "127.0.0.1"
  self.conninfo = self:conninfo_for {}
  return self
end

return M
