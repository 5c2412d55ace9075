--[[
migrun.playbook.cli: the one command-line parser of playbooks and tools.
Options and positional arguments are declared once; --help is generated from
the same declaration.

  local cli = require "migrun.playbook.cli"
  local spec = {
    usage = "migrun tools/demo.lua",           -- the command, for the usage line
    about = "The whole migration on the lab",  -- a line under it (optional)
    options = {
      { "--scale", "N", "size of the sample (1 = ~1 GB)", default = 1, number = true },
      { "--dir", "DIR", "where the lab lives" },
      { "--yes", nil, "do not ask" },               -- a flag: true when given
    },
    args = { { "slot", "a slot of this migration, e.g. dms_slot_02",     -- positional, in order
               check = function(v) if not v:match("^[a-z0-9_]+$") then return "not a slot name" end end } },
    min_args = 1,                               -- default: every declared one
    max_args = 1,                               -- default: as many as declared
  }
  cli.parse(spec, argv) -> opts | nil, err
      opts["scale"], opts["dir"], opts["yes"], opts.args = { ... },
      opts.args.slot (positional ones by name too), opts.help = true on --help/-h.
      An argument's check(value) -> nil | what is wrong refuses it before
      anything uses it (a journal section, a report's file name).
      "--name=value" works too; "--" ends the options. err is a migrun.error
      of kind "usage" that prints as one line.
  cli.help(spec, extra) -> text: usage line, about, arguments, options (each
      with its default), then extra (a string) if given.
  cli.run(spec, argv) -> opts     for tools: parse, and on --help print the
      help and exit 0, on an error print it with "see --help" and exit 2.
]]
local errors = require "migrun.error"

local cli = {}

local function usage_error(message)
  return errors.new{ kind = "usage", message = message }
end

local function key_of(name) return (name:gsub("^%-%-", ""):gsub("-", "_")) end

local function find(spec, name)
  for _, o in ipairs(spec.options or {}) do
    if o[1] == name then return o end
  end
end

function cli.parse(spec, argv)
  local opts, positional = {}, {}
  for _, o in ipairs(spec.options or {}) do
    if o.default ~= nil then opts[key_of(o[1])] = o.default end
  end
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      table.move(argv, i + 1, #argv, #positional + 1, positional)
      break
    elseif a == "--help" or a == "-h" then
      opts.help = true
    elseif a:sub(1, 2) == "--" then
      local name, value = a:match("^(%-%-[%w-]+)=(.*)$")
      name = name or a
      local o = find(spec, name)
      if not o then return nil, usage_error(("unknown option %s (see --help)"):format(name)) end
      if o[2] then
        if value == nil then
          i = i + 1
          value = argv[i]
          if value == nil then return nil, usage_error(name .. " needs a value (" .. o[2] .. ")") end
        end
        if o.number then
          local n = tonumber(value)
          if not n then return nil, usage_error(("%s takes a number, not %q"):format(name, value)) end
          value = n
        end
        opts[key_of(name)] = value
      else
        if value ~= nil then return nil, usage_error(name .. " takes no value") end
        opts[key_of(name)] = true
      end
    else
      positional[#positional + 1] = a
    end
    i = i + 1
  end
  opts.args = positional
  if opts.help then return opts end
  local declared = spec.args or {}
  local min = spec.min_args or #declared
  local max = spec.max_args or #declared
  if #positional < min then
    local missing = declared[#positional + 1]
    return nil, usage_error(("missing <%s>: %s (see --help)"):format(missing and missing[1] or "argument",
      missing and missing[2] or "see --help"))
  end
  if max >= 0 and #positional > max then
    return nil, usage_error(("unexpected argument %q (see --help)"):format(positional[max + 1]))
  end
  for j, a in ipairs(declared) do
    local problem = a.check and positional[j] ~= nil and a.check(positional[j])
    if problem then return nil, usage_error(("<%s> %q: %s"):format(a[1], positional[j], problem)) end
    positional[a[1]] = positional[j]
  end
  return opts
end

function cli.help(spec, extra)
  local args = {}
  for _, a in ipairs(spec.args or {}) do args[#args + 1] = "<" .. a[1] .. ">" end
  local lines = { ("usage: %s [options]%s"):format(spec.usage, #args > 0 and " " .. table.concat(args, " ") or "") }
  if spec.about then lines[#lines + 1] = "" lines[#lines + 1] = spec.about end
  if #args > 0 then
    lines[#lines + 1] = ""
    lines[#lines + 1] = "arguments:"
    for _, a in ipairs(spec.args) do lines[#lines + 1] = ("  %-20s %s"):format("<" .. a[1] .. ">", a[2]) end
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "options:"
  local options = { table.unpack(spec.options or {}) }
  options[#options + 1] = { "--help", nil, "this help" }
  for _, o in ipairs(options) do
    local default = o.default ~= nil and (" (default %s)"):format(tostring(o.default)) or ""
    lines[#lines + 1] = ("  %-20s %s%s"):format(o[1] .. (o[2] and " " .. o[2] or ""), o[3], default)
  end
  if extra then lines[#lines + 1] = "" lines[#lines + 1] = extra end
  return table.concat(lines, "\n") .. "\n"
end

function cli.run(spec, argv)
  local opts, err = cli.parse(spec, argv)
  if not opts then
    io.stderr:write(("%s: %s\n"):format(spec.usage, tostring(err.message or err)))
    os.exit(2)
  end
  if opts.help then
    io.stdout:write(cli.help(spec))
    os.exit(0)
  end
  return opts
end

return cli
