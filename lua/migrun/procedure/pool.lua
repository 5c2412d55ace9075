--[[
migrun.pool: a queue of tasks run over `jobs` child processes, the largest
task first: one worker process per slot (the worker executable of libmigrun,
host.worker_spec, whatever program hosts this state), which runs the tasks
the parent sends it one after another.

Why processes: a task is a COPY of a chunk, an index build or a hash of a
key range, all of which wait on a server; real parallelism needs several
client processes. Why the parent sends each task when a slot frees, rather
than handing out the queue at the start: it decides, as tasks finish, what
runs next (the indexes of a table whose last chunk has just committed,
before the rest of the load). Why a worker lives for the whole run: starting
migrun costs some milliseconds of CPU, and a task's module may keep what the
next task can use (the full load keeps its sessions on the servers, which
also spares them a backend's start per task).

  local pool = require "migrun.pool"
  local p = pool.new{ jobs = 2, entry = "migrun.fullload",
    on_event = function(task, ev) end,  -- a JSON line the task's process emitted, decoded
    on_done = function(task) end,       -- the task's worker finished it (its events came first)
    on_tick = function() end,           -- after each wait, at least every `interval` seconds
    on_start = function(task, idle) return used end, -- just before it goes to its worker (task.job may change)
    limits = { replica = 2 } }          -- at most 2 tasks of group "replica" at once
  p:add{ job = { ... }, cost = 1e9, label = "public.big #3", group = "replica" }
  local ok, failure = p:run()

  pool.new(opts) -> Pool
      opts.jobs (>= 1), opts.entry: a module name; the worker runs
      require(entry).task(job, emit) with the task's job (a JSON value, sent
      on the worker's stdin: never in argv, it may hold connection strings)
      and emit(table), which writes a JSON line the parent's on_event gets.
      A task that raises or returns nil, err fails (and its worker exits).
      Module state lives on between the tasks of one worker. Events are
      handed on as they come (a worker's line ends the parent's wait);
      opts.interval: the longest wait between on_tick calls (default 0.25 s).
      opts.limits: { [group] = n }: at most n tasks of that group run at once
      (a group without a limit is bounded by jobs only). Two servers each
      given their own share of the processes (the two sides of a comparison)
      keep both busy, instead of the larger tasks of one going first while
      the other waits. opts.soft: { [group] = true }: that group's limit
      gives way when nothing else queued can run (a slot is never left
      empty for it): the full load keeps a stream for the tables that are
      not split while there are any, without holding it empty after.
      opts.lanes: { [group] = n }: n processes of that group's own, beyond
      jobs: its tasks run there only, the others never (the full load's
      hashing of what has just committed, beside the load rather than in
      its streams).
  p:add(task) -> task      task.job (required), task.cost (number, default 0),
      task.label (for messages), task.group (a string, for opts.limits).
      Tasks may be added at any time, also from on_event and on_done; the
      queue is served highest cost first, then in the order added, passing
      over tasks whose group is at its limit. task.stream is set when it
      starts (1..jobs: the slot it runs in), task.pid too (its worker's).
  on_start(task, idle) -> used: idle is this task's share of the slots that
      stay empty once it and everything queued run (0 while the queue holds
      as much as the free slots): a task started at the tail of a run may use
      their part of the machine (the full load gives an index build parallel
      workers). It returns how many it uses (nil: none); they count as busy
      for the tasks that start while it runs.
  p:run() -> true | nil, failure
      Runs until the queue is empty and nothing runs. On the first failure
      (a task's error event, a process killed or exiting non-zero, a callback
      returning nil, err) the other processes are stopped (TERM, then KILL)
      and failure = { task =, stream =, message =, where =, detail = } is
      returned. A raised error (Ctrl-C) stops them too and is raised again.
      At the end the workers get EOF and exit.
  p:pending() -> n (queued), p:running() -> n
  pool.child()   the worker's main (internal)
]]
local proc = require "migrun.proc"
local host = require "migrun.host"
local json = require "migrun.json"

local pool = {}

-- The event a worker emits when it has finished a task (not passed to on_event).
local DONE = "pool.task_done"

local Pool = {}
Pool.__index = Pool
Pool.__name = "migrun.pool.Pool"

function pool.new(opts)
  assert(type(opts) == "table", "pool.new: options table expected")
  assert(math.type(opts.jobs) == "integer" and opts.jobs >= 1, "pool.new: jobs must be a positive integer")
  assert(type(opts.entry) == "string", "pool.new: entry (a module name) is required")
  for _, f in ipairs{ "on_event", "on_done", "on_tick", "on_start" } do
    assert(opts[f] == nil or type(opts[f]) == "function", "pool.new: " .. f .. " must be a function")
  end
  assert(opts.limits == nil or type(opts.limits) == "table", "pool.new: limits must be a table { [group] = n }")
  assert(opts.soft == nil or type(opts.soft) == "table", "pool.new: soft must be a set { [group] = true }")
  local width = opts.jobs
  for g, n in pairs(opts.lanes or {}) do
    assert(type(g) == "string" and math.type(n) == "integer" and n >= 1,
      "pool.new: lanes must map group names to positive integers")
    width = width + n
  end
  for g, n in pairs(opts.limits or {}) do
    assert(type(g) == "string" and math.type(n) == "integer" and n >= 1,
      "pool.new: limits must map group names to positive integers")
  end
  return setmetatable({ jobs = opts.jobs, entry = opts.entry, on_event = opts.on_event, on_done = opts.on_done,
    on_tick = opts.on_tick, on_start = opts.on_start, limits = opts.limits or {}, soft = opts.soft or {},
    lanes = opts.lanes or {}, width = width,
    interval = opts.interval or 0.25, queue = {}, seq = 0, slots = {}, workers = {}, handles = {}, events = {} },
    Pool)
end

function Pool:add(task)
  assert(type(task) == "table" and task.job ~= nil, "pool:add: a task { job = ..., cost = n } expected")
  assert(task.group == nil or type(task.group) == "string", "pool:add: task.group must be a string")
  self.seq = self.seq + 1
  task.seq, task.cost = self.seq, task.cost or 0
  self.queue[#self.queue + 1] = task
  return task
end

function Pool:pending() return #self.queue end
function Pool:running()
  local n = 0
  for _ in pairs(self.slots) do n = n + 1 end
  return n
end

-- The next task: highest cost, then first added, of a group below its
-- limit; if there is none, of a group whose limit is soft.
function Pool:_take()
  local running, main = {}, 0
  for _, t in pairs(self.slots) do
    if t.group then running[t.group] = (running[t.group] or 0) + 1 end
    if not self.lanes[t.group] then main = main + 1 end
  end
  local function room(t)
    local lane = self.lanes[t.group]
    if lane then return (running[t.group] or 0) < lane end
    return main < self.jobs
  end
  local function best_of(soft_too)
    local best, at = nil, nil
    for i, t in ipairs(self.queue) do
      local limit = t.group and self.limits[t.group]
      if room(t) and (not limit or (running[t.group] or 0) < limit or (soft_too and self.soft[t.group]))
          and (not best or t.cost > best.cost or (t.cost == best.cost and t.seq < best.seq)) then
        best, at = t, i
      end
    end
    return best, at
  end
  local best, at = best_of(false)
  if not best and next(self.soft) then best, at = best_of(true) end
  if at then table.remove(self.queue, at) end
  return best
end

-- The share of the slots nothing will use of the task being started (it
-- is out of the queue, not running yet): the free slots once it and the
-- queued tasks have theirs, shared out between them, rounded up (the first
-- to start gets the odd one).
function Pool:_idle_share()
  local busy, queued = 0, 0
  for _, t in pairs(self.slots) do
    if not self.lanes[t.group] then busy = busy + 1 + (t.lent or 0) end
  end
  for _, t in ipairs(self.queue) do if not self.lanes[t.group] then queued = queued + 1 end end
  local spare = self.jobs - busy - 1 - queued
  if spare <= 0 then return 0 end
  return (spare + queued) // (queued + 1)
end

-- A slot's worker: one process serving the slot's tasks one after another,
-- each sent as a JSON line on its stdin; w.task is the one it runs (nil:
-- idle). Its lines go to the events of the task it runs.
function Pool:_spawn_worker(slot)
  local pool_ = self
  local w = { slot = slot }
  -- the last lines a task's worker wrote that were not events: the detail of
  -- its failure (a worker between tasks writes nothing)
  local function keep_line(line)
    local out = w.task and w.task.stderr
    if not out then return end
    out[#out + 1] = line
    if #out > 20 then table.remove(out, 1) end
  end
  local spec, werr = host.worker_spec{ "-e", "require('migrun.pool').child()",
    stdin = { pipe = true }, die_with_parent = true,
    wake = true, -- its events end the parent's wait: acted on at once, without polling for them
    env = { table.unpack(proc.LIBPQ_ENV) }, -- a worker connects to PostgreSQL: libpq's variables, no password
    stdout = function(line)
      local ev = json.decode(line) -- nil for a line that is not JSON
      if type(ev) == "table" and w.task then
        local events = pool_.events -- replaced at each dispatch
        events[#events + 1] = { task = w.task, ev = ev }
      else
        keep_line(line)
      end
    end,
    stderr = keep_line }
  if not spec then return nil, werr end
  local h, err = proc.spawn(spec)
  if not h then return nil, err end
  w.handle = h
  self.workers[slot], self.handles[h] = w, w
  return w
end

function Pool:_start(task, slot)
  task.stream = slot
  task.stderr = {}
  local w = self.workers[slot]
  if not w then
    local err
    w, err = self:_spawn_worker(slot)
    if not w then return nil, err end
  end
  -- the job is never in argv: it may hold connection strings
  local ok, err = w.handle:send(json.encode{ entry = self.entry, job = task.job } .. "\n")
  if not ok then return nil, err end
  w.task, task.pid = task, w.handle.pid
  self.slots[slot] = task
  return true
end

-- Every worker ended: busy or not, TERM, then KILL.
function Pool:_stop_all()
  for _, w in pairs(self.workers) do
    if w.handle.running then w.handle:kill("TERM") end
  end
  self:_reap_all(10)
end

-- Waits for every worker to exit (KILL after `timeout` seconds) and forgets it.
function Pool:_reap_all(timeout)
  for slot, w in pairs(self.workers) do
    local _, how = w.handle:wait(timeout)
    if how == "timeout" then w.handle:kill("KILL") w.handle:wait(5) end
    w.handle:close()
    self.handles[w.handle] = nil
    self.workers[slot] = nil
    self.slots[slot] = nil
  end
end

-- The workers told that there is no more work (EOF) and waited for.
function Pool:_finish()
  for _, w in pairs(self.workers) do w.handle:close_stdin() end
  self:_reap_all(10)
end

-- A task its worker has finished: the slot free for the next, on_done.
function Pool:_done(task)
  self.workers[task.stream].task = nil
  self.slots[task.stream] = nil
  if self.on_done then
    local dres, derr = self.on_done(task)
    if dres == nil and derr ~= nil then
      return nil, { task = task, stream = task.stream, message = tostring(derr), error = derr }
    end
  end
  return true
end

-- Decoded lines, handed to on_event outside the output callbacks (which may
-- not start or wait for processes). -> true | nil, failure
function Pool:_dispatch()
  while #self.events > 0 do
    local batch = self.events
    self.events = {}
    for _, e in ipairs(batch) do
      if e.ev.event == "error" then
        return nil, { task = e.task, stream = e.task.stream, message = e.ev.message, where = e.ev.where,
          detail = e.ev.detail, table = e.ev.table }
      end
      if e.ev.event == DONE then
        local ok, failure = self:_done(e.task)
        if not ok then return nil, failure end
      elseif self.on_event then
        local ok, err = self.on_event(e.task, e.ev)
        if ok == nil and err ~= nil then
          return nil, { task = e.task, stream = e.task.stream, message = tostring(err), error = err }
        end
      end
    end
  end
  return true
end

-- A worker that exited: a failure if it had a task (it ends only between
-- tasks, at EOF); an idle one is forgotten, its slot gets a new one.
function Pool:_exited(h, ok, how, code)
  local w = self.handles[h]
  self.handles[h], self.workers[w.slot] = nil, nil
  h:close()
  local task = w.task
  if not task then return true end
  self.slots[w.slot] = nil
  local what = how == "signal" and ("was killed by signal " .. tostring(code))
    or ok and "exited before its task was done" or ("exited with " .. tostring(how) .. " " .. tostring(code))
  return nil, { task = task, stream = task.stream,
    message = ("the worker of stream %d %s%s"):format(task.stream, what, task.label and (" while " .. task.label) or ""),
    detail = table.concat(task.stderr, "\n") }
end

function Pool:_loop()
  while true do
    for slot = 1, self.width do
      local task = not self.slots[slot] and #self.queue > 0 and self:_take()
      if task then
        if self.on_start then
          local idle = self:_idle_share()
          local used = self.on_start(task, idle)
          task.lent = math.max(0, math.min(idle, math.tointeger(used or 0) or 0))
        end
        local ok, err = self:_start(task, slot)
        if not ok then
          return nil, { task = task, stream = slot, message = "cannot start a worker process: " .. tostring(err) }
        end
      end
    end
    if not next(self.slots) then return true end
    local list = {}
    for h in pairs(self.handles) do list[#list + 1] = h end
    local h, ok, how, code = proc.wait_any(list, self.interval)
    local dok, failure = self:_dispatch()
    if not dok then return nil, failure end
    if self.on_tick then self.on_tick() end
    if h then
      local eok, efailure = self:_exited(h, ok, how, code)
      if not eok then return nil, efailure end
    end
  end
end

function Pool:run()
  local ok, res, failure = pcall(self._loop, self)
  if not ok then
    self:_stop_all()
    error(res, 0)
  end
  if not res then
    self:_stop_all()
    self.queue = {}
    return nil, failure
  end
  self:_finish()
  return true
end

-- The child: tasks as JSON lines on stdin, one after another, until EOF;
-- each task's events as JSON lines on stdout, then DONE. A task that fails
-- ends the process (the parent stops the run).
function pool.child()
  local function emit(t)
    io.stdout:write(json.encode(t), "\n")
    io.stdout:flush()
  end
  for line in io.lines() do
    local job = json.decode(line)
    local ok, res, err = pcall(function() return require(job.entry).task(job.job, emit) end)
    if not (ok and (res ~= nil or err == nil)) then
      local e = ok and err or res
      emit{ event = "error", message = tostring(e), where = type(e) == "table" and e.where or nil,
            table = type(e) == "table" and e.table or nil }
      os.exit(1)
    end
    collectgarbage() -- what the task left open (a connection it did not close) closed before the next
    emit{ event = DONE }
  end
  os.exit(0, true) -- the state closed: what the tasks kept (connections) closed properly
end

return pool
