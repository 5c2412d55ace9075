--[[
migrun.playbook.notify: telling people that something happened while nobody
watches the terminal: a migration runs for days. The configuration's notify
section names a command (an argv list, run without a shell, the event's JSON
on its stdin) and/or a webhook (the JSON POSTed with libcurl); both get the
same body:

  { "event": "step_failed", "migration": "billing", "playbook": "full",
    "step": "catch_up", "message": "catch_up failed: ...", "time": "2026-11-21T12:01:03Z",
    "host": "db-admin-1", "details": { ... } }

Events (notify.EVENTS): the runner sends step_failed and run_failed; the
rest come from ctx:notify(event, message, details) in the library and the
playbooks (the WAL guard, cdc watching, full.lua, cutover.lua).

The command runs with migrun's environment less every variable whose name
names a secret (AWS_SECRET_ACCESS_KEY, PGPASSWORD, ..._TOKEN): it is the
team's program, not migrun's.

A notification never stops or slows the migration for long: each channel
has a short timeout (notify.timeout seconds), and a failure is logged as a
warning and otherwise ignored. Nothing secret goes out: the body is
mask.scrub'bed (keys that name a secret, password=..., user:pass@ in
URIs) and the configured connection strings' passwords are masked; the
webhook's URL (which often is itself the secret, as Slack's are) is never
logged, only its scheme and host. In a dry run nothing is sent: what would be
is printed.

  notify.send(cfg, body, { say =, warn =, log =, dry_run = }) -> { command = ok|nil, webhook = ok|nil }
      cfg = config.notify; body from notify.body; say/warn/log: line printers
  notify.body{ event =, migration =, playbook =, step =, message =, details =,
               secrets = { conninfo, ... } } -> the table sent
  notify.wanted(cfg, event) -> whether cfg sends that event
  notify.redact_url(url) -> "https://hooks.example.com/…"
]]
local errors = require "migrun.error"
local aws = require "migrun.aws"
local proc = require "migrun.proc"
local json = require "migrun.json"
local journal = require "migrun.playbook.journal"
local masking = require "migrun.mask"

local notify = {}

notify.EVENTS = {
  { "step_failed", "a step failed (the run stopped)" },
  { "run_failed", "the run stopped for another reason: a check, a watcher, Ctrl-C" },
  { "wal_guard_warn", "the guard warns: WAL or a disk near its threshold, or the schema changed (schema_drift = warn)" },
  { "wal_guard_stop", "the guard stopped the run: WAL or a disk past its threshold, or the schema changed" },
  { "task_failed", "a DMS task failed or stopped while migrun watched it" },
  { "ready_for_cutover", "every task has caught up and every table is verified equal under writes" },
  { "cutover_done", "the cutover is done (cutover.lua finished)" },
}
notify.KNOWN = {}
for _, e in ipairs(notify.EVENTS) do notify.KNOWN[e[1]] = e[2] end

function notify.wanted(cfg, event)
  if not cfg or (not cfg.command and not cfg.webhook) then return false end
  if not cfg.events then return true end
  for _, e in ipairs(cfg.events) do if e == event then return true end end
  return false
end

function notify.redact_url(url)
  local scheme, hostpart = tostring(url):match("^(%a[%w+.-]*)://([^/?#]+)")
  if not scheme then return "(the webhook)" end
  hostpart = hostpart:gsub("^[^@]*@", "") -- user:password@
  return scheme .. "://" .. hostpart .. "/…"
end

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local h = f and f:read("l")
  if f then f:close() end
  return h
end

function notify.body(b)
  assert(type(b) == "table" and type(b.event) == "string", "notify.body{ event = ..., ... } expected")
  local function mask(s)
    if s == nil then return nil end
    s = tostring(s)
    for _, c in ipairs(b.secrets or {}) do s = masking.message(s, c) end
    return masking.string(s)
  end
  local details = b.details and masking.scrub(b.details) or nil
  if details then
    -- strings inside the details too: a connection string's own password
    local function walk(v)
      if type(v) == "string" then return mask(v) end
      if type(v) ~= "table" then return v end
      for k, x in pairs(v) do v[k] = walk(x) end
      return v
    end
    details = walk(details)
  end
  return { event = b.event, migration = b.migration, playbook = b.playbook, step = b.step,
           message = mask(b.message), time = journal.timestamp(), host = hostname(), details = details }
end

local function short(s, n)
  s = tostring(s or ""):gsub("%s+$", ""):gsub("\n", " | ")
  if #s > n then s = s:sub(1, n - 3) .. "..." end
  return s
end

-- The command is the team's (a chat poster): it gets migrun's environment
-- without what names a secret (AWS keys, PGPASSWORD, tokens), read from
-- /proc/self/environ since Lua cannot list the environment.
local SECRET_NAME = { "PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIAL", "PRIVATE_KEY", "ACCESS_KEY", "PGPASS" }
function notify.command_env(event)
  local env = { MIGRUN_EVENT = event }
  local f = io.open("/proc/self/environ", "rb")
  local all = f and f:read("a") or ""
  if f then f:close() end
  for name in all:gmatch("([^%z=]+)=[^%z]*") do
    local upper = name:upper()
    for _, word in ipairs(SECRET_NAME) do
      if upper:find(word, 1, true) then env[name] = false break end
    end
  end
  return env
end

local function run_command(cfg, payload, event, o)
  local spec = { stdin = payload .. "\n", timeout = cfg.timeout or 5, env = notify.command_env(event) }
  for i, a in ipairs(cfg.command) do spec[i] = a end
  if o.dry_run then
    o.say(("dry run: would notify %s: %s (the event's JSON on its stdin)"):format(event, proc.quote(cfg.command)))
    return true
  end
  local ok, how, code, out, err = proc.run(spec)
  if ok then
    o.log(("notified %s: %s"):format(event, proc.quote(cfg.command)))
    return true
  end
  local why = how == "timeout" and ("did not finish within %gs"):format(cfg.timeout or 5)
    or ("%s %s"):format(tostring(how), tostring(code))
  local said = short((err or "") ~= "" and err or out, 200)
  o.warn(("notify %s: the command %s %s%s; the migration goes on"):format(event, proc.quote({ cfg.command[1] }),
    why, said ~= "" and (": " .. said) or ""))
  return nil
end

local function post_webhook(cfg, payload, event, o)
  local shown = notify.redact_url(cfg.webhook)
  if o.dry_run then
    o.say(("dry run: would notify %s: POST %s (the event's JSON)"):format(event, shown))
    return true
  end
  local headers = { ["Content-Type"] = "application/json" }
  for k, v in pairs(cfg.headers or {}) do headers[k] = v end
  local t = cfg.timeout or 5
  local res, err = aws.request{ url = cfg.webhook, method = "POST", headers = headers, body = payload,
    connect_timeout = math.min(t, 3), timeout = t, max_body = 64 * 1024, where = "notify" }
  if res and res.status >= 200 and res.status < 300 then
    o.log(("notified %s: POST %s: %d"):format(event, shown, res.status))
    return true
  end
  local why
  if res then
    why = ("answered HTTP %d"):format(res.status)
  else
    -- curl names the host, sometimes the URL: never the URL
    why = tostring(err and err.message or err):gsub(cfg.webhook:gsub("%p", "%%%0"), shown)
  end
  o.warn(("notify %s: the webhook %s %s; the migration goes on"):format(event, shown, why))
  return nil
end

-- Ctrl-C or the guard's stop while a channel runs stops the run as anywhere else
local function reraise_interrupt(e)
  if errors.is_interrupt(e) then error(e, 0) end
end

function notify.send(cfg, body, o)
  assert(type(body) == "table" and body.event, "notify.send: a body from notify.body expected")
  o = o or {}
  local nop = function() end
  o = { say = o.say or nop, warn = o.warn or nop, log = o.log or nop, dry_run = o.dry_run }
  local out = {}
  if not notify.wanted(cfg, body.event) then return out end
  local payload = json.encode(body)
  if cfg.command then
    local ok, r = pcall(run_command, cfg, payload, body.event, o)
    out.command = ok and r or nil
    if not ok then reraise_interrupt(r) end
    if not ok then o.warn(("notify %s: the command could not run: %s"):format(body.event, short(r, 200))) end
  end
  if cfg.webhook then
    local ok, r = pcall(post_webhook, cfg, payload, body.event, o)
    out.webhook = ok and r or nil
    if not ok then reraise_interrupt(r) end
    if not ok then o.warn(("notify %s: the webhook could not be called: %s"):format(body.event, short(r, 200))) end
  end
  return out
end

return notify
