--[[
bench/cutover.lua: the cutover window at two sizes of the same database under
the same write rate: it must not grow with the data.

  migrun bench/cutover.lua [--scales 1,4] [--rate 50] [--small-tables 94] [--settle 10] [--repeat 3]
  (make bench-cutover)

For each scale: a lab with the DMS emulator, the demo sample (its 6 tables
and --small-tables more: 100 by default) loaded at that scale, a workload
writing --rate transactions a second to every kind of table; full.lua to READY
FOR CUTOVER under the workload; --settle seconds more of writes; then
cutover.lua (stop_writes read_only, existing sessions terminated). Measured:
the window (the source made read-only to the target ready for writes, as the
cutover's report states it) and each of its steps, from the cutover's
journal; how many keys its verification compared and how many tables it
hashed whole; and, once writes have stopped, what the old final QA (every row
of every table hashed on both sides, by key ranges, over full_load.jobs
workers a side) costs on the same database: what the window would have paid.
Every table is then compared (count and row hash) to check the run. With
--repeat N each size is measured N times, the sizes in alternating order
(1, 4, 4, 1, ...), and the median window of each size compared.
]]
local demo = require "migrun.rehearsal.demo"
local proc = require "migrun.proc"
local host = require "migrun.host"
local pg = require "migrun.pg"
local db = require "migrun.db"
local json = require "migrun.json"
local qa = require "migrun.qa"
local catalog = require "migrun.catalog"
local text = require "migrun.text"

local opt = { scales = { 1, 4 }, rate = 50, small_tables = 94, settle = 10, ["repeat"] = 1 }
do
  local i = 1
  while arg[i] do
    local a, v = arg[i], arg[i + 1]
    if a == "--scales" then
      opt.scales = {}
      for x in v:gmatch("[^,]+") do opt.scales[#opt.scales + 1] = assert(tonumber(x), "--scales: numbers") end
    elseif a == "--rate" then opt.rate = assert(tonumber(v))
    elseif a == "--small-tables" then opt.small_tables = assert(math.tointeger(tonumber(v)))
    elseif a == "--settle" then opt.settle = assert(tonumber(v))
    elseif a == "--repeat" then opt["repeat"] = assert(math.tointeger(tonumber(v)))
    else io.stderr:write("unknown option ", a, "\n") os.exit(2) end
    i = i + 2
  end
end

local function say(fmt, ...) io.stdout:write(os.date("!%H:%M:%S "), fmt:format(...), "\n") io.stdout:flush() end

local function playbook(R, name)
  local t0 = host.monotonic()
  local argv = { host.exe, (os.getenv("MIGRUN_SOURCE_DIR") or ".") .. "/playbooks/" .. name, "--config",
    R.config_path, "--yes", env = R.env, stdin = false, stdout = "capture", stderr = "stdout" }
  local ok, _, _, out = proc.run(argv)
  if not ok then
    io.stderr:write(out or "", "\n")
    error(name .. " failed", 0)
  end
  return out, host.monotonic() - t0
end

local function wrap(c, name) return db.wrap(assert(pg.connect(c.conninfo, { name = name }))) end

local function measure(scale)
  local ok, _, _, out = proc.run{ "mktemp", "-d", "/tmp/migrun-bench-cutover.XXXXXX" }
  assert(ok, "mktemp")
  local dir = out:gsub("%s+$", "")
  say("scale %s: lab, sample (%d tables), workload at %d transactions/s", tostring(scale), 6 + opt.small_tables, opt.rate)
  local R = assert(demo.rehearsal{ dir = dir, scale = scale, name = "bench-cutover",
    sample_options = { small_tables = opt.small_tables },
    dms = { delays = { task_create = 0.1, task_start = 0.1, task_stop = 0.1, connection = 0.1, cdc_poll = 0.1,
      endpoint_delete = 0.1, task_delete = 0.1, task_modify = 0.1 } },
    config = { groups = { largest_alone = 3 }, full_load = { jobs = 2 },
      cutover = { stop_writes = "read_only", existing_sessions = "terminate", sessions_timeout = 30,
                  count_only = { "public.page_views" } } } })
  local r = { scale = scale }
  local ok_run, err = pcall(function()
    local src = wrap(R.lab.source, "source")
    r.bytes = assert(src:query("select pg_database_size(current_database()) as b"))[1].b
    src:close()
    R:start_workload{ rate = opt.rate }
    local _, full_s = playbook(R, "full.lua")
    say("  full.lua READY in %s; %s more of writes", text.duration(full_s), text.duration(opt.settle))
    host.sleep(opt.settle)
    local out, cutover_s = playbook(R, "cutover.lua")
    local workload = R:stop_workload()
    r.transactions = tonumber((workload or ""):match("(%d+) transactions")) or 0
    assert(out:find("the cutover window: ", 1, true), "the cutover did not state its window")
    r.cutover = cutover_s
    local J = json.decode(assert(host.read_file(R.config.state_dir .. "/journal.json")))
    local steps = J.playbooks.cutover.steps
    r.steps = {}
    for _, name in ipairs{ "stop_writes", "wait_applied", "verify", "sequences", "matviews", "no_truncation",
        "restore_target" } do
      r.steps[#r.steps + 1] = { name, steps[name] and steps[name].duration or 0 }
    end
    -- the window from the clock marks the cutover records (the journal's durations are rounded)
    r.window = steps.restore_target.facts.ended - steps.stop_writes.facts.started
    r.keys = math.tointeger(steps.verify and steps.verify.facts.keys or 0) or 0
    r.whole = steps.verify and #(steps.verify.facts.whole or {}) or 0
    -- the verification brought up to date just before writes stop (not in the window)
    r.ready = steps.verify_live and steps.verify_live.duration or 0
    -- what the old final QA would have cost now, writes stopped
    local a, b = wrap(R.lab.source, "source"), wrap(R.lab.target, "target")
    local tables = assert(catalog.tables(a, { schemas = { "public" } }))
    local t0 = host.monotonic()
    local q = assert(qa.compare(a, b, tables, {}, { mode = "full", jobs = 2, a_conninfo = R.lab.source.conninfo,
      b_conninfo = R.lab.target.conninfo, chunk_bytes = 8 * 1024 * 1024 }))
    r.full_qa = host.monotonic() - t0
    r.differences = 0
    for _, c in ipairs(q.checks) do
      if not c.equal and not (c.table == "public.page_views" and c.a and c.b and c.a.rows == c.b.rows) then
        r.differences = r.differences + 1
      end
    end
    a:close() b:close()
  end)
  R:close()
  if not ok_run then error(err, 0) end
  say("  window %.2f s (the old final QA alone: %.2f s), %d key(s) compared, %d table(s) hashed whole, "
    .. "%d difference(s)", r.window, r.full_qa, r.keys, r.whole, r.differences)
  return r
end

local results, runs = {}, {}
for i = 1, opt["repeat"] do
  local order = table.move(opt.scales, 1, #opt.scales, 1, {})
  if i % 2 == 0 then -- alternate: 1, 4, then 4, 1
    for j = 1, #order // 2 do order[j], order[#order - j + 1] = order[#order - j + 1], order[j] end
  end
  for _, sc in ipairs(order) do
    local r = measure(sc)
    results[#results + 1] = r
    runs[sc] = runs[sc] or {}
    table.insert(runs[sc], r.window)
  end
end
local function median(list)
  local c = table.move(list, 1, #list, 1, {})
  table.sort(c)
  local n = #c
  return n % 2 == 1 and c[(n + 1) // 2] or (c[n // 2] + c[n // 2 + 1]) / 2
end
table.sort(results, function(x, y) return x.scale < y.scale end)

print()
print(("The cutover window under %d transactions/s, %d tables (demo sample)"):format(opt.rate, 6 + opt.small_tables))
local rows = { { "scale", "database", "window", "verify", "keys", "whole", "old final QA", "verify_live (before)", "diffs" } }
for _, r in ipairs(results) do
  local verify_s = 0
  for _, st in ipairs(r.steps) do if st[1] == "verify" then verify_s = st[2] end end
  rows[#rows + 1] = { tostring(r.scale), text.bytes(r.bytes), ("%.2f s"):format(r.window), ("%.2f s"):format(verify_s),
    tostring(r.keys), tostring(r.whole), ("%.2f s"):format(r.full_qa), ("%.2f s"):format(r.ready), tostring(r.differences) }
end
for _, line in ipairs(text.aligned(rows)) do print(line) end
print()
print("window steps (seconds):")
for _, r in ipairs(results) do
  local parts = {}
  for _, st in ipairs(r.steps) do parts[#parts + 1] = ("%s %.2f"):format(st[1], st[2]) end
  print(("  scale %s: %s"):format(tostring(r.scale), table.concat(parts, ", ")))
end
if #opt.scales >= 2 then
  local small, large = opt.scales[1], opt.scales[#opt.scales]
  local function spread(list)
    local lo, hi = math.huge, -math.huge
    for _, x in ipairs(list) do lo, hi = math.min(lo, x), math.max(hi, x) end
    return ("%.2f-%.2f s"):format(lo, hi)
  end
  local first, last = results[1], results[#results]
  print(("median window: scale %s %.2f s (%s over %d), scale %s %.2f s (%s over %d)"):format(tostring(small),
    median(runs[small]), spread(runs[small]), #runs[small], tostring(large), median(runs[large]),
    spread(runs[large]), #runs[large]))
  print(("larger / smaller median window: %.2f (goal <= 1.2); data %.1f x; old final QA %.1f x"):format(
    median(runs[large]) / median(runs[small]), last.bytes / first.bytes, last.full_qa / first.full_qa))
end
for _, r in ipairs(results) do
  if r.differences > 0 then io.stderr:write("differences after the cutover at scale ", r.scale, "\n") os.exit(1) end
end
