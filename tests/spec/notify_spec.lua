-- Notifications (migrun.playbook.notify): a real command and a real HTTP
-- receiver (a child process on loopback) get the event's JSON; a failing,
-- hanging or unreachable channel is a warning, never an error; no secret in
-- the body, and the webhook's URL (itself a secret) never in a message.
-- The config section is checked here too. No server.
local notify = require "migrun.playbook.notify"
local config = require "migrun.playbook.config"
local stub = require "helpers.http_stub"
local host = require "migrun.host"
local proc = require "migrun.proc"
local cjson = require "cjson"

local PASSWORD = "S3cr3t-pw"
local CONNINFO = "host=db.example.com dbname=app user=migrun password=" .. PASSWORD

local function collect()
  local lines = { say = {}, warn = {}, log = {} }
  return lines, { say = function(l) table.insert(lines.say, l) end, warn = function(l) table.insert(lines.warn, l) end,
                  log = function(l) table.insert(lines.log, l) end }
end

local function body(event)
  return notify.body{ event = event or "step_failed", migration = "billing", playbook = "full", step = "catch_up",
    message = "catch_up failed: cannot connect: " .. CONNINFO .. " and postgresql://migrun:" .. PASSWORD .. "@db/app",
    details = { error = "password=" .. PASSWORD, aws_secret_access_key = "AKIAXXSECRET", tables = { "public.a" },
                note = "the server said " .. PASSWORD },
    secrets = { CONNINFO } }
end

describe("notify", function()
  local dir
  setup(function() dir = stub.tmpdir() end)
  teardown(function() proc.run{ "rm", "-rf", dir } end)

  it("builds a body with the event's fields and no secret in it", function()
    local b = body()
    assert.same({ "billing", "full", "catch_up", "step_failed" }, { b.migration, b.playbook, b.step, b.event })
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", b.time)
    local text = cjson.encode(b)
    assert.falsy(text:find(PASSWORD, 1, true), text)
    assert.falsy(text:find("AKIAXXSECRET", 1, true), text)
    assert.truthy(text:find("public.a", 1, true))
    assert.truthy(b.message:find("cannot connect", 1, true))
  end)

  it("runs the command with the JSON on its stdin and MIGRUN_EVENT set", function()
    local out = dir .. "/events.jsonl"
    local cfg = { command = { host.exe, "-e", ([[
      local f = io.open(%q, "a") f:write(os.getenv("MIGRUN_EVENT"), " ", io.read("a")) f:close()]]):format(out) },
      timeout = 5 }
    local lines, o = collect()
    local r = notify.send(cfg, body("task_failed"), o)
    assert.is_true(r.command)
    local f = assert(io.open(out))
    local got = f:read("a")
    f:close()
    local event, json = got:match("^(%S+) (.*)$")
    assert.equal("task_failed", event)
    assert.equal("task_failed", cjson.decode(json).event)
    assert.equal(0, #lines.warn)
    assert.equal(1, #lines.log)
  end)

  it("keeps migrun's secrets out of the command's environment", function()
    local out = dir .. "/env.txt"
    -- a migrun whose environment holds secrets sends an event to `env`
    local ok, _, _, _, err = proc.run{ host.exe, "-e", ([[
      local notify = require "migrun.playbook.notify"
      local r = notify.send({ command = { "sh", "-c", "env > %s" }, timeout = 5 }, notify.body{ event = "run_failed" })
      assert(r.command)]]):format(out),
      env = { AWS_SECRET_ACCESS_KEY = "aws-s3cret", PGPASSWORD = "pg-s3cret", MIGRATION_WEBHOOK_TOKEN = "tok-s3cret",
              MIGRUN_TEST_PLAIN = "plain-value" } }
    assert.is_true(ok, err)
    local env = assert(io.open(out)):read("a")
    assert.truthy(env:find("MIGRUN_EVENT=run_failed", 1, true))
    assert.truthy(env:find("MIGRUN_TEST_PLAIN=plain-value", 1, true))
    for _, secret in ipairs{ "aws-s3cret", "pg-s3cret", "tok-s3cret" } do
      assert.falsy(env:find(secret, 1, true), secret .. " reached the command")
    end
  end)

  it("warns about a failing or hanging command, and goes on", function()
    local lines, o = collect()
    local r = notify.send({ command = { "sh", "-c", "echo 'no route to chat' >&2; exit 3" }, timeout = 5 }, body(), o)
    assert.is_nil(r.command)
    assert.matches("notify step_failed: the command sh exit 3: no route to chat; the migration goes on", lines.warn[1])
    local t0 = host.monotonic()
    r = notify.send({ command = { "sleep", "30" }, timeout = 0.5 }, body(), o)
    assert.is_nil(r.command)
    assert.is_true(host.monotonic() - t0 < 5, "the timeout did not hold")
    assert.matches("did not finish within 0.5s", lines.warn[2])
  end)

  it("POSTs the JSON to the webhook with its headers; the URL is never shown", function()
    local s = stub.start[[ return function(req, n) return { status = 200, body = "ok" } end ]]
    finally(function() s:close() end)
    local url = s.url .. "/hooks/T000/B000/XXXXSECRETPATH"
    local lines, o = collect()
    local r = notify.send({ webhook = url, headers = { Authorization = "Bearer tok-123" }, timeout = 5 },
      body("ready_for_cutover"), o)
    assert.is_true(r.webhook)
    local reqs = s:requests()
    assert.equal(1, #reqs)
    assert.equal("POST", reqs[1].method)
    assert.equal("/hooks/T000/B000/XXXXSECRETPATH", reqs[1].path)
    assert.equal("application/json", reqs[1].headers["content-type"])
    assert.equal("Bearer tok-123", reqs[1].headers.authorization)
    assert.equal("ready_for_cutover", cjson.decode(reqs[1].body).event)
    for _, l in ipairs(lines.log) do assert.falsy(l:find("SECRETPATH", 1, true), l) end
    assert.truthy(lines.log[1]:find(s.url:match("//(.*)$") .. "/…", 1, true), lines.log[1])
  end)

  it("warns about a webhook that fails or is not there, quickly, without its URL", function()
    local s = stub.start[[ return function(req, n) return { status = 500, body = "down" } end ]]
    finally(function() s:close() end)
    local lines, o = collect()
    local r = notify.send({ webhook = s.url .. "/SECRETPATH", timeout = 5 }, body(), o)
    assert.is_nil(r.webhook)
    assert.matches("the webhook http://127%.0%.0%.1:%d+/… answered HTTP 500; the migration goes on", lines.warn[1])
    -- a port nobody listens on
    local socket = require "socket"
    local probe = assert(socket.bind("127.0.0.1", 0))
    local _, port = probe:getsockname()
    probe:close()
    local t0 = host.monotonic()
    r = notify.send({ webhook = ("http://127.0.0.1:%s/SECRETPATH"):format(port), timeout = 2 }, body(), o)
    assert.is_nil(r.webhook)
    assert.is_true(host.monotonic() - t0 < 5)
    for _, l in ipairs(lines.warn) do assert.falsy(l:find("SECRETPATH", 1, true), l) end
    assert.equal(2, #lines.warn)
  end)

  it("sends only the configured events, and only says what it would in a dry run", function()
    local out = dir .. "/dry.jsonl"
    local cfg = { command = { "tee", "-a", out }, events = { "cutover_done" }, timeout = 5 }
    local lines, o = collect()
    assert.same({}, notify.send(cfg, body("step_failed"), o))
    assert.is_nil(io.open(out))
    o.dry_run = true
    notify.send(cfg, body("cutover_done"), o)
    assert.is_nil(io.open(out), "a dry run ran the command")
    assert.matches("dry run: would notify cutover_done: tee %-a ", lines.say[1])
    assert.is_false(notify.wanted({}, "step_failed"))
    assert.is_false(notify.wanted(nil, "step_failed"))
  end)

  it("is configured in the notify section, checked like every other", function()
    local base = { source = { conninfo = "host=a" }, replica = { conninfo = "host=b" }, target = { conninfo = "host=c" } }
    local function check(n)
      local t = {}
      for k, v in pairs(base) do t[k] = v end
      t.notify = n
      return config.check(t, "migration.lua")
    end
    local cfg = assert(check{ command = { "notify-chat", "--channel", "db" }, webhook = "https://hooks.example.com/x" })
    assert.equal(5, cfg.notify.timeout)
    assert.same({}, cfg.notify.headers)
    local _, err = check{ events = { "step_faild" } }
    assert.matches("notify.events%[1%]: expected one of step_failed, run_failed, ", tostring(err))
    _, err = check{ command = "notify-chat --channel db" }
    assert.matches("notify.command: expected a command as an argv list", tostring(err))
    _, err = check{ command = {} }
    assert.matches("notify: expected command = { \"prog\", ... }", tostring(err))
    _, err = check{ webhook = "hooks.example.com/secret-token" }
    assert.matches("notify.webhook: expected an http:// or https:// URL with a host, found a string$", tostring(err))
    assert.falsy(tostring(err):find("secret-token", 1, true))
    _, err = check{ timeout = 0 }
    assert.matches("notify.timeout: expected a number of seconds >= 0.1", tostring(err))
  end)
end)
