-- The library's layers are its folders (docs/architecture.md): lua/migrun/base,
-- cloud, procedure and machinery hold each layer's modules, the folder not
-- part of a module's name (lua/migrun/procedure/qa.lua is migrun.qa: a
-- playbook's requires do not change when a module's layer does), and
-- lua/migrun/rehearsal and lua/migrun/repl the rehearsal world and the REPL,
-- whose folders are part of their names. A module's layer is read from its
-- folder; no module requires one above its layer, the rehearsal world and the
-- REPL never require each other, and the require graph has no cycle.
local proc = require "migrun.proc"

local root = (os.getenv("MIGRUN_SOURCE_DIR") or ".") .. "/lua/migrun"

-- Lowest first.
local ORDER = { base = 1, cloud = 2, procedure = 3, machinery = 4, rehearsal = 5, repl = 5 }
-- The folders whose name is not part of their modules' names.
local UNNAMED = { base = true, cloud = true, procedure = true, machinery = true }
-- The modules written in C (runtime/modules.h) and the Debian ones migrun uses: base.
local OUTSIDE = { ["migrun"] = "base", ["migrun.host"] = "base", ["migrun.error"] = "base",
  ["migrun.lsn"] = "base", ["migrun.proc"] = "base", ["migrun.pg.core"] = "base", ["migrun.aws"] = "base",
  ["cjson"] = "base", ["cjson.safe"] = "base", ["socket"] = "base" }

-- Source without comments, so that the API examples at the top of each
-- module (`local x = require "migrun.x"`) are not taken for requires.
local function code_of(path)
  local f = assert(io.open(path))
  local src = f:read("a")
  f:close()
  src = src:gsub("%-%-%[(=*)%[.-%]%1%]", "")
  src = src:gsub("%-%-[^\n]*", "")
  return src
end

-- lua/migrun/<folder>/<rest>.lua -> the module's name and its folder
local function name_of(rel)
  local folder, rest = rel:match("^([^/]+)/(.+)%.lua$")
  if not folder then return "migrun." .. rel:gsub("%.lua$", ""), nil end
  local name = (UNNAMED[folder] and rest or (folder .. "/" .. rest)):gsub("/init$", ""):gsub("/", ".")
  return "migrun." .. name, folder
end

local function modules()
  local out, layer = {}, {}
  local ok, _, _, listing = proc.run{ "find", root, "-name", "*.lua" }
  assert(ok, "find " .. root)
  for path in listing:gmatch("[^\n]+") do
    local name, folder = name_of(path:sub(#root + 2))
    local requires = {}
    for dep in code_of(path):gmatch("require%s*%(?%s*[\"']([%w_.]+)[\"']") do
      if dep ~= name then requires[dep] = true end
    end
    out[name], layer[name] = requires, folder or "(none)"
  end
  return out, layer
end

local function layer_of(layer, name) return layer[name] or OUTSIDE[name] end

describe("the library's layers", function()
  local graph, layer = modules()

  it("puts every module in a layer's folder", function()
    local unplaced = {}
    for name in pairs(graph) do
      if not ORDER[layer[name]] then unplaced[#unplaced + 1] = name .. " (" .. layer[name] .. ")" end
    end
    table.sort(unplaced)
    assert.same({}, unplaced)
  end)

  it("names each module as the runtime has it (the embedded library, package.preload)", function()
    local missing = {}
    for name in pairs(graph) do
      if not package.preload[name] then missing[#missing + 1] = name end
    end
    table.sort(missing)
    assert.same({}, missing)
  end)

  it("has no module that requires one above its layer", function()
    local wrong = {}
    for name, requires in pairs(graph) do
      local mine = ORDER[layer[name]]
      for dep in pairs(requires) do
        local theirs = layer_of(layer, dep)
        if theirs and mine and ORDER[theirs] > mine then
          wrong[#wrong + 1] = ("%s (%s) requires %s (%s)"):format(name, layer[name], dep, theirs)
        end
      end
    end
    table.sort(wrong)
    assert.same({}, wrong)
  end)

  it("keeps the rehearsal world and the REPL apart", function()
    local wrong = {}
    for name, requires in pairs(graph) do
      for dep in pairs(requires) do
        if layer[name] == "repl" and layer[dep] == "rehearsal" or layer[name] == "rehearsal" and layer[dep] == "repl" then
          wrong[#wrong + 1] = name .. " requires " .. dep
        end
      end
    end
    assert.same({}, wrong)
  end)

  it("has no cycle", function()
    local state, cycle = {}, nil
    local function visit(name, path)
      if cycle then return end
      if state[name] == "open" then
        cycle = table.concat(path, " -> ") .. " -> " .. name
        return
      end
      if state[name] == "done" or not graph[name] then return end
      state[name] = "open"
      path[#path + 1] = name
      local deps = {}
      for dep in pairs(graph[name]) do deps[#deps + 1] = dep end
      table.sort(deps)
      for _, dep in ipairs(deps) do visit(dep, path) end
      path[#path] = nil
      state[name] = "done"
    end
    local names = {}
    for name in pairs(graph) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do visit(name, {}) end
    assert.is_nil(cycle)
  end)

  it("sees the requires and the folders it is meant to see (the scanner works)", function()
    assert.truthy(graph["migrun.playbook"]["migrun.playbook.journal"])
    assert.truthy(graph["migrun.rehearsal.lab"]["migrun.proc"])
    assert.is_nil(graph["migrun.catalog"]["migrun.catalog"])
    assert.equal("procedure", layer["migrun.qa"])
    assert.equal("machinery", layer["migrun.playbook.journal"])
    assert.equal("base", layer["migrun.pg"])
    assert.equal("cloud", layer["migrun.dms.builders"])
    -- a module moved into the wrong folder is found: the procedure's verify in base
    local up = {}
    for dep in pairs(graph["migrun.verify"]) do
      if ORDER[layer_of(layer, dep)] > ORDER.base then up[#up + 1] = dep end
    end
    assert.is_true(#up > 0, "verify requires nothing above base: the check would not see it misplaced")
  end)
end)
