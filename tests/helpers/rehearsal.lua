-- Driving playbooks end to end: a rehearsal (lab + emulator + sample data +
-- config, from migrun.rehearsal.demo), the playbook run as a separate migrun exactly as
-- a team runs it, killed on cue, and the comparisons the tests assert on.
local demo = require "migrun.rehearsal.demo"
local proc = require "migrun.proc"
local pg = require "migrun.pg"
local qa = require "migrun.qa"
local aws = require "migrun.aws"
local journal = require "migrun.playbook.journal"

local M = {}

M.MIGRUN = os.getenv("MIGRUN_BIN") or "build/migrun"
M.ROOT = os.getenv("MIGRUN_SOURCE_DIR") or "."
M.SANITIZE = os.getenv("MIGRUN_SANITIZE") == "1"

function M.tmpdir(tag)
  local ok, _, _, out = proc.run{ "mktemp", "-d", "/tmp/migrun-" .. tag .. ".XXXXXX" }
  assert(ok, "mktemp failed")
  return (out:gsub("%s+$", ""))
end

--[[ M.run(R, playbook, args, opts) -> { ok, how, code, output, killed, pid }
     playbook: a stock playbook's file name, or an absolute path.
     opts.kill_when: a Lua pattern; the run is SIGKILLed on the first output
     line matching it (opts.kill_delay seconds later, if given). opts.env:
     added to R.env. ]]
function M.run(R, playbook, args, opts)
  opts = opts or {}
  local script = playbook:sub(1, 1) == "/" and playbook or M.ROOT .. "/playbooks/" .. playbook
  local argv = { M.MIGRUN, script, "--config", R.config_path }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local env = {}
  for k, v in pairs(R.env) do env[k] = v end
  for k, v in pairs(opts.env or {}) do env[k] = v end
  argv.env, argv.stdin, argv.stderr = env, false, "stdout"
  local lines, killed, kill_at = {}, false, nil
  local h
  argv.stdout = function(line)
    lines[#lines + 1] = line
    if os.getenv("MIGRUN_E2E_VERBOSE") then io.stderr:write(line, "\n") end
    if opts.kill_when and not kill_at and line:match(opts.kill_when) then
      kill_at = aws.monotonic() + (opts.kill_delay or 0)
      if not opts.kill_delay then killed = true h:kill("KILL") end
    end
  end
  h = assert(proc.spawn(argv))
  local deadline = aws.monotonic() + (opts.timeout or 900)
  local ok, how, code
  repeat
    ok, how, code = h:wait(0.2)
    if how == "timeout" and kill_at and not killed and aws.monotonic() >= kill_at then
      killed = true
      h:kill("KILL")
    end
  until how ~= "timeout" or aws.monotonic() > deadline
  if how == "timeout" then h:kill("KILL") h:wait() end
  local pid = h.pid
  h:close()
  return { ok = ok, how = how, code = code, output = table.concat(lines, "\n"), killed = killed, pid = pid }
end

-- Processes a killed migrun may have left behind: children re-parented to
-- init (pg_dump, pg_restore, psql, load workers, a playbook) -> { "pid args" }.
function M.orphans()
  local _, _, _, out = proc.run{ "ps", "-eo", "pid=,ppid=,args=" }
  local found = {}
  for line in out:gmatch("[^\n]+") do
    local pid, ppid, args = line:match("^%s*(%d+)%s+(%d+)%s+(.*)$")
    if ppid == "1" and (args:match("^%S*pg_dump ") or args:match("^%S*pg_restore ") or args:match("^%S*psql ")
        or args:match("migrun%.pool'%)%.child") or args:match("playbooks/%S+%.lua")) then
      found[#found + 1] = pid .. " " .. args
    end
  end
  return found
end

function M.journal(R)
  local J = assert(journal.open(R.config.state_dir, { read_only = true }))
  return J.existed and J.data or nil
end

function M.step_status(R, step, playbook)
  local j = M.journal(R)
  local s = j and j.playbooks[playbook or "full"] and j.playbooks[playbook or "full"].steps[step]
  return s and s.status, s
end

function M.connect(cluster, name)
  return assert(pg.connect(cluster.conninfo, { name = name }))
end

local function reader(cluster, name)
  return require("migrun.db").wrap(M.connect(cluster, name))
end

-- What migrun leaves on the servers: slots, sets, nodes on the source; tables on the target.
function M.world(R)
  local src = M.connect(R.lab.source, "source")
  local tgt = M.connect(R.lab.target, "target")
  local rep = M.connect(R.lab.replica, "replica")
  local function list(c, sql)
    local out = {}
    for row in assert(c:exec(sql)):rows() do out[#out + 1] = row.x end
    return table.concat(out, ",")
  end
  local w = {
    slots = list(src, "select slot_name as x from pg_replication_slots order by 1"),
    sets = list(src, "select set_name as x from pglogical.replication_set order by 1"),
    nodes = list(src, "select node_name as x from pglogical.node order by 1"),
    target_tables = list(tgt, "select relname as x from pg_class where relkind = 'r' and relnamespace = 'public'::regnamespace order by 1"),
    replica_paused = assert(rep:exec("select pg_get_wal_replay_pause_state() as s"))[1].s,
  }
  src:close() tgt:close() rep:close()
  return w
end

-- Nothing twice: one slot and two sets per group (and the live verification's
-- watch slot), one pglogical node, one task per group, one endpoint per group
-- plus the target.
function M.assert_single_world(R)
  local plan = M.journal(R).playbooks.full.steps.groups.facts.groups
  local w = M.world(R)
  local slots, sets = { require("migrun.watch").slot_name(R.config.slots and R.config.slots.prefix or "dms_slot_") }, {}
  for _, g in ipairs(plan) do
    slots[#slots + 1] = g.slot
    sets[#sets + 1] = g.slot
    sets[#sets + 1] = "i" .. g.slot
  end
  table.sort(slots) table.sort(sets)
  assert(table.concat(slots, ",") == w.slots, ("slots: %s, expected %s"):format(w.slots, table.concat(slots, ",")))
  local mine = {}
  for name in w.sets:gmatch("[^,]+") do
    if not (name:match("^default") or name == "ddl_sql") then mine[#mine + 1] = name end
  end
  table.sort(mine)
  assert(table.concat(sets, ",") == table.concat(mine, ","), "replication sets: " .. table.concat(mine, ","))
  assert(select(2, w.nodes:gsub("[^,]+", "")) == 1, "pglogical nodes: " .. w.nodes)
  local client = assert(R.lab:dms_client())
  assert(#plan == #assert(client:describe_replication_tasks()), "not one task per group")
  assert(#plan + 1 == #assert(client:describe_endpoints()), "not one endpoint per group plus the target")
  return w
end

-- Waits until every running DMS task has applied what the source had written
-- when called: a fence (migrun.fence) seen on the target for each of their
-- slots, as migrun waits itself. No slot's confirmed_flush_lsn is waited for:
-- on a quiet source WAL that no slot decodes (a standby snapshot, another
-- database's work) may keep it behind for good. Tasks that do not run (after
-- a cutover) have nothing left to apply.
function M.wait_applied(R, timeout)
  local client = assert(R.lab:dms_client())
  local slot_of = {}
  for _, e in ipairs(client:describe_endpoints() or {}) do
    slot_of[e.EndpointArn] = e.PostgreSQLSettings and e.PostgreSQLSettings.SlotName
  end
  local slots = {}
  for _, t in ipairs(client:describe_replication_tasks() or {}) do
    if t.Status == "running" and slot_of[t.SourceEndpointArn] then slots[#slots + 1] = slot_of[t.SourceEndpointArn] end
  end
  if #slots == 0 then return true end
  table.sort(slots)
  local src, tgt = reader(R.lab.source, "source"), reader(R.lab.target, "target")
  local ok, err = require("migrun.cdc").wait_applied(src, tgt, slots,
    { timeout = timeout or 120, poll = 0.2, sleep = aws.sleep })
  src:close() tgt:close()
  if not ok then io.stderr:write("wait_applied: ", tostring(err), "\n") end
  return ok ~= nil
end

--[[ Every migrated table (the config's schemas, or every non-system one;
     partitions by their own names): source vs target by row count and
     order-independent hash. Returns a list of { table, source, target } that
     differ, except opts.count_only tables (compared by count). ]]
function M.differences(R, opts)
  opts = opts or {}
  local src = reader(R.lab.source, "source")
  local tgt = reader(R.lab.target, "target")
  local diffs = {}
  local tables = assert(require("migrun.catalog").tables(src, { schemas = R.config.schemas,
    exclude = R.config.exclude_tables }))
  for _, t in ipairs(tables) do
    local tbl = { schema = t.schema, name = t.name }
    local a = assert(qa.row_hash(src, tbl))
    local b = assert(qa.row_hash(tgt, tbl))
    local same = a.rows == b.rows and (opts.count_only and opts.count_only[t.key] or a.hash == b.hash)
    if not same then diffs[#diffs + 1] = { table = t.key, source = a, target = b } end
  end
  src:close() tgt:close()
  return diffs
end

function M.describe_diffs(diffs)
  local out = {}
  for _, d in ipairs(diffs) do
    out[#out + 1] = ("%s: source %d rows %s, target %d rows %s"):format(d.table, d.source.rows,
      d.source.hash, d.target.rows, d.target.hash)
  end
  return table.concat(out, "\n")
end

-- A team's copy of playbooks/full.lua under another file and playbook name
-- (e.g. "billing"), in the rehearsal's directory -> its path.
function M.copy_main(R, name)
  local f = assert(io.open(M.ROOT .. "/playbooks/full.lua"))
  local src = f:read("a")
  f:close()
  local copy, n = src:gsub('playbook%.new{ name = "full"', 'playbook.new{ name = "' .. name .. '"')
  assert(n == 1, "full.lua no longer declares its name as expected")
  local path = R.dir .. "/" .. name .. ".lua"
  assert(require("migrun.host").write_file(path, copy))
  return path
end

-- What a rehearsal's playbooks wait for that no spec is about, shortened:
-- know_data samples the write rates over 1 s (5 by default), the tasks start
-- 0.2 s apart (1 s in the demo's config). A spec's own config wins.
local function quick() return { know_data = { write_rate_seconds = 1 }, dms = { start_pause = 0.2 } } end

local function merged(into, from)
  for k, v in pairs(from or {}) do
    if type(v) == "table" and type(into[k]) == "table" and #v == 0 then merged(into[k], v) else into[k] = v end
  end
  return into
end

function M.rehearsal(tag, opts)
  opts = opts or {}
  local dir = M.tmpdir(tag)
  local config = merged(quick(), opts.config)
  local R = assert(demo.rehearsal{ dir = dir, scale = opts.scale or (M.SANITIZE and 0.05 or 0.2),
    name = opts.name or tag, config = config, sample = opts.sample, dms = opts.dms or { delays = { task_create = 0.1,
      task_start = 0.1, task_stop = 0.1, connection = 0.1, cdc_poll = 0.1, endpoint_delete = 0.1,
      task_delete = 0.1, task_modify = 0.1 } } })
  return R
end

return M
