--[[
migrun.playbook.journal: what a migration has done so far, in state_dir/journal.json.
Pretty-printed JSON with sorted keys (a person can read and diff it), written
with host.write_file (atomic and fsynced, mode 0600) after every change that
matters, so a SIGKILL leaves the previous or the new journal, never a torn
one. It never holds a secret: facts are scrubbed before they are stored.

  local journal = require "migrun.playbook.journal"
  local J = assert(journal.open("/srv/migrun-state"))     -- reads it if it exists
  local S = J:step("full", "preflight")   -- the step's record (created empty)
  S.status = "done"; assert(J:save())

  journal.open(state_dir [, {read_only = true}]) -> J | nil, err
      A missing journal is an empty one (J.existed = false). A journal that
      does not parse is an error (never silently replaced).
  J.data: {
    migration = cfg.name, format = 1,
    main = { playbook = "full", script = "/abs/path/full.lua" }, -- the main playbook
    playbooks = { [playbook] = { steps = { [step] = {
        status = "running" | "done" | "failed",
        started_at = "2026-11-21T12:01:03Z", ended_at =, duration = seconds,
        error = "one line", facts = {...},
        tables = { {title =, columns = {...}, rows = {{...}}} } } } } },
    runs = { { playbook =, started_at =, ended_at =, argv = {...}, dry_run =,
               outcome = "running" | "ok" | "failed" | "aborted",
               error =, ran = {steps}, skipped = {steps} } },
  }
  J:step(playbook, step) -> record     J:steps(playbook) -> { [step] = record }
  J:save() -> true | nil, err          the whole journal, written again (no-op,
      true, for a read-only journal); err (kind "journal") says the state
      directory's disk and what to do
  J:save_change(path) -> true | nil, err   what is now at path (a list of keys
      from J.data, e.g. {"playbooks", "full", "steps", "full_load", "facts",
      "chunks", "public.events", "done", "17"}; nil there: removed), saved
      at the cost of that value, not of the whole journal (below)
  J:save_changes(paths [, under]) -> true | nil, err   the same for each
      path, each below the keys `under` ({"playbooks", "full", "steps", step,
      "facts"}: paths into a step's facts), in one write
  J.writes: the journal's writes so far (each one fsync)

Saving a change: journal.json is rewritten whole by J:save(); between two
such saves, J:save_change appends one line to journal.log, fsynced before it
returns. A full load saves each chunk's transaction before it may commit,
and the chunk once done: rewriting the whole journal each time cost
O(chunks) per chunk (bench/journal.lua: 50 ms of CPU and 0.5 MB written per
chunk at 1,000 chunks, 35 s for that load's saves in all), so the load's
own bookkeeping grew with the square of its chunks. A line costs what it
says (0.3-0.5 ms of CPU per chunk at 100 or 10,000 chunks alike).
journal.open replays the lines over journal.json, in order.
The log's first line names the generation of journal.json it follows; each
J:save() starts a new generation, so a log left behind by a kill between
the two files' writes is recognised as already contained and ignored. A
last line cut short by a kill was never acknowledged and is dropped; any
other line that does not read is an error. Once the log outgrows
journal.json (and 1 MiB), the next change rewrites journal.json instead,
so reading the journal stays O(its size).
  journal.scrub(value) -> a copy fit for JSON and free of secrets: keys that
      name a secret (password, secret, token, ...) get "****", password=...
      in strings and user:password@ in URIs are masked, values JSON cannot
      hold (LSNs, functions) become their tostring.
  journal.timestamp([t]) -> "2026-11-21T12:01:03Z" (UTC)
  journal.make_dir(path), journal.set_aside(state_dir), journal.FILE_MODE (0600),
  journal.DIR_MODE (0700): the state directory (see each below)
]]
local host = require "migrun.host"
local json = require "migrun.json"
local mask = require "migrun.mask"
local errors = require "migrun.error"

local journal = {}

local Journal = {}
Journal.__index = Journal
Journal.__name = "migrun.playbook.journal.Journal"

function journal.timestamp(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t or host.now()))
end

-- Secrets are masked by migrun.mask (below every layer that prints); the
-- journal's names for it stay for the callers that have them.
journal.mask_string = mask.string
journal.mask = mask.message
journal.scrub = mask.scrub

-- Modes of everything migrun writes under the state directory: it may hold
-- data and configuration, so only its owner reads it.
journal.FILE_MODE = tonumber("600", 8)
journal.DIR_MODE = tonumber("700", 8)

-- journal.make_dir(path) -> true | nil, err: path and its missing parents, 0700.
function journal.make_dir(path)
  local prefix = path:sub(1, 1) == "/" and "" or "."
  for part in path:gmatch("[^/]+") do
    prefix = prefix .. "/" .. part
    local ok, err = host.mkdir(prefix, journal.DIR_MODE)
    if not ok then return nil, err end
  end
  return true
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

--[[ journal.set_aside(state_dir) -> dir | false (nothing to set aside) | nil, err
     Moves journal.json, journal.log, report.md, reports/, migrun.log, report.html,
     samples.jsonl and progress.json into
     state_dir/attempt-<n>/ (n: the first unused number). The caller holds the
     state directory. ]]
function journal.set_aside(state_dir)
  local n = 1
  while exists(("%s/attempt-%d/journal.json"):format(state_dir, n)) do n = n + 1 end
  if not exists(state_dir .. "/journal.json") then return false end
  local dir = ("%s/attempt-%d"):format(state_dir, n)
  local ok, err = host.mkdir(dir, journal.DIR_MODE)
  if not ok then return nil, err end
  for _, f in ipairs{ "journal.json", "journal.log", "report.md", "reports", "migrun.log", "report.html", "samples.jsonl",
                      "progress.json" } do
    if exists(state_dir .. "/" .. f) then
      local moved, merr = os.rename(state_dir .. "/" .. f, dir .. "/" .. f)
      if not moved then
        return nil, errors.new{ kind = "state", where = state_dir, message = "cannot move " .. f .. ": " .. tostring(merr) }
      end
    end
  end
  return dir
end

function journal.path(state_dir)
  return state_dir .. "/journal.json"
end

function journal.log_path(state_dir)
  return state_dir .. "/journal.log"
end

-- looked up at each call: a test puts a writer between a reader's two reads
local function read_file(path) return host.read_file(path) end

-- The log is compacted into journal.json once it is larger than this and
-- than journal.json itself.
journal.COMPACT_BYTES = 1024 * 1024

local function unreadable(where, message)
  return errors.new{ kind = "journal", where = where, message = message,
    hint = "it is only ever replaced atomically or appended to: was it edited by hand?" }
end

-- Sets data[path] = value, making the tables on the way; false if something
-- on the way is not a table.
local function put(data, path, value)
  local node = data
  for i = 1, #path - 1 do
    local k = path[i]
    if node[k] == nil then node[k] = {} end
    node = node[k]
    if type(node) ~= "table" then return false end
  end
  node[path[#path]] = value
  return true
end

-- The changes journal.log holds over data (of its generation), applied in
-- order -> the bytes read, whether a last line was cut short | nil, err
local function replay(data, log_path)
  local text = read_file(log_path)
  if not text or text == "" then return 0 end
  local n, at = 0, 1
  local header
  while at <= #text do
    local nl = text:find("\n", at, true)
    if not nl then return at - 1, true end -- a last line cut short: never acknowledged
    local line = json.decode(text:sub(at, nl - 1))
    n = n + 1
    if not header then
      header = line
      if type(header) ~= "table" or math.type(header.generation) ~= "integer" then
        return nil, unreadable(log_path, "the journal's log does not begin with its generation")
      end
      if header.generation ~= data.log_generation then return 0 end -- contained in journal.json already
    else
      if type(line) ~= "table" or type(line.p) ~= "table" or #line.p == 0 or not put(data, line.p, line.v) then
        return nil, unreadable(log_path, ("line %d of the journal's log cannot be applied"):format(n))
      end
    end
    at = nl + 1
  end
  return at - 1
end

function journal.open(state_dir, opts)
  assert(type(state_dir) == "string", "journal.open: state_dir expected")
  opts = opts or {}
  local path = journal.path(state_dir)
  local J = setmetatable({ path = path, log_path = journal.log_path(state_dir),
                           read_only = opts.read_only and true or false, existed = false,
                           data = { format = 1, playbooks = {}, runs = {} },
                           snapshot_bytes = 0, log_bytes = 0, log_generation = nil, writes = 0 }, Journal)
  local text = read_file(path)
  if text then
    local data, log_bytes, torn, size
    for _ = 1, 3 do
      local err
      data, err = json.decode(text)
      size = #text
      if type(data) ~= "table" then
        return nil, errors.new{ kind = "journal", where = path,
          message = "the journal cannot be read: " .. tostring(err or "not a JSON object"),
          hint = "it is only ever replaced atomically: was it edited by hand?" }
      end
      log_bytes, torn = replay(data, J.log_path)
      if not log_bytes then return nil, torn end
      -- a reader beside a running migrun: journal.json rewritten between the
      -- two reads (the log then follows the new one) is read again
      local again = log_bytes == 0 and read_file(path)
      if not again or again == text then break end
      text = again
    end
    -- a line appended after a torn one would be lost with it: the next change saves all
    J.torn = torn == true
    data.playbooks = data.playbooks or {}
    data.runs = data.runs or {}
    J.data, J.existed, J.snapshot_bytes, J.log_bytes = data, true, size, log_bytes
    if log_bytes > 0 then J.log_generation = data.log_generation end
  end
  return J
end

function Journal:steps(playbook)
  local p = self.data.playbooks[playbook]
  if not p then
    p = { steps = {} }
    self.data.playbooks[playbook] = p
  end
  p.steps = p.steps or {}
  return p.steps
end

function Journal:step(playbook, step)
  local steps = self:steps(playbook)
  local s = steps[step]
  if not s then
    s = {}
    steps[step] = s
  end
  return s
end

-- Steps of a playbook that are done (for ctx.resuming).
function Journal:done_count(playbook)
  local n = 0
  for _, s in pairs(self:steps(playbook)) do
    if s.status == "done" then n = n + 1 end
  end
  return n
end

-- Lists stay lists in JSON even when empty.
local function arrays(data)
  for _, run in ipairs(data.runs) do
    if run.argv then run.argv = json.array(run.argv) end
    if run.ran then run.ran = json.array(run.ran) end
    if run.skipped then run.skipped = json.array(run.skipped) end
  end
  data.runs = json.array(data.runs)
end

function Journal:encode()
  arrays(self.data)
  return json.encode(journal.scrub(self.data), { indent = "  " }) .. "\n"
end

-- A journal that cannot be written (the state directory's disk full or
-- failing) stops the run: what was done is on the servers, and the journal on
-- disk, replaced atomically, is the one before this change, from which a
-- rerun resumes (a chunk is journaled before it may commit).
local function write_failed(path, err)
  return errors.new{ kind = "journal", where = path, errno = type(err) == "table" and err.errno or nil,
    message = ("cannot write the journal %s: %s"):format(path, tostring(type(err) == "table" and err.message or err)),
    hint = "the state directory's disk is full or failing: free space there (or move the state directory and "
      .. "give --state-dir), then run the same command again; the journal on disk is the last one written "
      .. "whole, and the run resumes from it" }
end

function Journal:save()
  if self.read_only then return true end
  -- a new generation: a log of the one before, if a kill leaves it, is contained here
  local before = self.data.log_generation
  self.data.log_generation = (before or 0) + 1
  local text = self:encode()
  local ok, err = host.write_file(self.path, text, journal.FILE_MODE)
  if not ok then
    -- journal.json on disk is still the one the log follows: changes go on there
    self.data.log_generation = before
    return nil, write_failed(self.path, err)
  end
  self.existed, self.snapshot_bytes, self.writes = true, #text, self.writes + 1
  if self.log_generation then os.remove(self.log_path) end -- contained now; ignored if it stays
  self.log_generation, self.log_bytes, self.torn = nil, 0, false
  return true
end

-- The value saved for path: scrubbed as J:save scrubs it, a key that names a
-- secret on the way masking all below it.
local function scrubbed_change(path, value)
  for i, k in ipairs(path) do
    if mask.secret_key(k) then
      return table.move(path, 1, i, 1, {}), "****"
    end
  end
  return path, journal.scrub(value)
end

-- One path's line for the log: the value now at path, scrubbed.
function Journal:_change_line(path)
  local value = self.data
  for _, k in ipairs(path) do
    if type(value) ~= "table" then value = nil break end
    value = value[k]
  end
  local p, v = scrubbed_change(path, value)
  return json.encode{ p = json.array(p), v = v } .. "\n"
end

function Journal:save_change(path)
  return self:save_changes{ path }
end

-- The changes of one call land in one write (one fsync): a flush of many
-- records (a second's worth of small tables) costs one disk sync, as the
-- whole journal's rewrite did, not one per record.
function Journal:save_changes(paths, under)
  for _, path in ipairs(paths) do
    assert(type(path) == "table" and #path > 0, "journal:save_changes: paths (lists of keys) expected")
  end
  if self.read_only or #paths == 0 then return true end
  -- a log applies to a journal.json of its generation: the first change has none yet
  if not self.existed or not self.data.log_generation or self.torn
      or self.log_bytes > math.max(journal.COMPACT_BYTES, self.snapshot_bytes) then
    return self:save()
  end
  under = under or {}
  local lines = {}
  for i, path in ipairs(paths) do
    lines[i] = self:_change_line(table.move(path, 1, #path, #under + 1, table.move(under, 1, #under, 1, {})))
  end
  local text = table.concat(lines)
  local ok, err
  if self.log_generation ~= self.data.log_generation then
    local head = json.encode{ generation = self.data.log_generation } .. "\n"
    ok, err = host.write_file(self.log_path, head .. text, journal.FILE_MODE)
    if ok then self.log_generation, self.log_bytes = self.data.log_generation, #head + #text end
  else
    ok, err = host.append_file(self.log_path, text, journal.FILE_MODE)
    if ok then self.log_bytes = self.log_bytes + #text end
  end
  if not ok then return nil, write_failed(self.log_path, err) end
  self.writes = self.writes + 1
  return true
end

journal.Journal = Journal
return journal
