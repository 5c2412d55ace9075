-- A lab with CDC running, for the specs of what runs while DMS applies
-- (fence_spec, verify_spec): the same schema and rows on both sides, a
-- pglogical node, a slot and its two replication sets per group (tables
-- without a primary key in the insert set only), migrun's fence on both sides
-- and in every set, and a running DMS emulator task per group from now.
--
--   local C = require("helpers.cdc_lab").start{ ddl = (both sides), seed = (both sides),
--     load = function(C) end (rows loaded otherwise), groups = { { slot =, tables = {...} } } or
--     function(C) -> groups, name = "fence", target_overrides = {...}, cdc_poll = 0.1,
--     before_tasks = function(C) end }
--   C.L, C.client, C.instance_arn, C.source, C.target (migrun.db Dbs), C.groups, C.tasks,
--   C.added[slot] (fence.add_slot's first answer), C.conninfo(cluster); C:stop()
local lab = require "migrun.rehearsal.lab"
local cdc = require "migrun.cdc"
local fence = require "migrun.fence"
local db = require "migrun.db"
local pg = require "migrun.pg"

local M = {}

local Lab = {}
Lab.__index = Lab

function Lab:stop()
  if self.source then self.source:close() self.source = nil end
  if self.target then self.target:close() self.target = nil end
  if self.L then self.L:stop() self.L = nil end
end

function M.start(opts)
  -- the specs make tables on the target by hand: its superuser, not the RDS-like role
  local L = assert(lab.start{ target_superuser = true, dms = { delays = { task_create = 0.1, task_start = 0.1,
    task_stop = 0.1, connection = 0.1, cdc_poll = opts.cdc_poll or 0.1 } } })
  local C = setmetatable({ L = L, added = {} }, Lab)
  function C.conninfo(c) return c.migrun_conninfo .. " passfile=" .. L.passfile end
  local function wrap(c, name) return db.wrap(assert(pg.connect(C.conninfo(c), { name = name }))) end
  C.client = assert(L:dms_client())
  C.instance_arn = assert(C.client:describe_replication_instances())[1].ReplicationInstanceArn
  C.source, C.target = wrap(L.source, "source"), wrap(L.target, "target")
  for _, c in ipairs{ L.source, L.target } do
    assert(c:psql(opts.ddl))
    if opts.seed then assert(c:psql(opts.seed)) end
  end
  if opts.load then opts.load(C) end
  assert(L.source:psql(([[select pglogical.create_node(node_name := '%s_spec',
    dsn := 'host=127.0.0.1 port=%d dbname=app')]]):format(opts.name, L.source.port)))
  assert(fence.create(C.source))
  assert(fence.create(C.target))
  C.groups = {}
  local groups = type(opts.groups) == "function" and opts.groups(C) or opts.groups
  for _, g in ipairs(groups) do
    local group = { name = g.slot, slot = g.slot, tables = g.tables }
    C.groups[#C.groups + 1] = group
    assert(C.source:write("select pg_create_logical_replication_slot($1, 'pglogical')", g.slot))
    assert(C.source:write("select pglogical.create_replication_set($1, false, true, true, false)", g.slot))
    assert(C.source:write("select pglogical.create_replication_set($1, true, false, false, true)", "i" .. g.slot))
    for _, t in ipairs(g.tables) do
      local sets = t.has_pk == false and { "i" .. g.slot } or { g.slot, "i" .. g.slot }
      for _, set in ipairs(sets) do
        assert(C.source:write("select pglogical.replication_set_add_table($1, $2::regclass)", set,
          pg.qualify(t.schema, t.name)))
      end
    end
    C.added[g.slot] = assert(fence.add_slot(C.source, g.slot))
  end
  if opts.before_tasks then opts.before_tasks(C) end
  local start = assert(C.source:query("select pg_current_wal_lsn() as l"))[1].l
  local eps = assert(cdc.ensure_endpoints(C.client, C.groups, { name = opts.name, source = C.conninfo(L.source),
    target = C.conninfo(L.target), target_overrides = opts.target_overrides }))
  assert(cdc.test_connections(C.client, C.instance_arn, eps, { timeout = 30, poll = 0.2 }))
  C.tasks = assert(cdc.ensure_tasks(C.client, C.groups, eps, { name = opts.name, instance_arn = C.instance_arn,
    start_lsn = start }))
  assert(cdc.start_tasks(C.client, C.groups, C.tasks, { name = opts.name, pause = 0 }))
  return C
end

return M
