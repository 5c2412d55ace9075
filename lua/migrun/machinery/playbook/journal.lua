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
  J:save() -> true | nil, err          no-op (true) for a read-only journal; err
      (kind "journal") says the state directory's disk and what to do
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
     Moves journal.json, report.md, reports/, migrun.log, report.html,
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
  for _, f in ipairs{ "journal.json", "report.md", "reports", "migrun.log", "report.html", "samples.jsonl",
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

local read_file = host.read_file

function journal.open(state_dir, opts)
  assert(type(state_dir) == "string", "journal.open: state_dir expected")
  opts = opts or {}
  local path = journal.path(state_dir)
  local J = setmetatable({ path = path, read_only = opts.read_only and true or false,
                           existed = false, data = { format = 1, playbooks = {}, runs = {} } }, Journal)
  local text = read_file(path)
  if text then
    local data, err = json.decode(text)
    if type(data) ~= "table" then
      return nil, errors.new{ kind = "journal", where = path,
        message = "the journal cannot be read: " .. tostring(err or "not a JSON object"),
        hint = "it is only ever replaced atomically: was it edited by hand?" }
    end
    data.playbooks = data.playbooks or {}
    data.runs = data.runs or {}
    J.data, J.existed = data, true
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
function Journal:save()
  if self.read_only then return true end
  local ok, err = host.write_file(self.path, self:encode(), journal.FILE_MODE)
  if not ok then
    return nil, errors.new{ kind = "journal", where = self.path, errno = type(err) == "table" and err.errno or nil,
      message = ("cannot write the journal %s: %s"):format(self.path,
        tostring(type(err) == "table" and err.message or err)),
      hint = "the state directory's disk is full or failing: free space there (or move the state directory and "
        .. "give --state-dir), then run the same command again; the journal on disk is the last one written "
        .. "whole, and the run resumes from it" }
  end
  self.existed = true
  return true
end

journal.Journal = Journal
return journal
