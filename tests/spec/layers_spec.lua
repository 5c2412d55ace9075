-- The library's layers (docs/architecture.md): no module requires one above
-- its layer, and the require graph has no cycle.
local proc = require "migrun.proc"

local root = (os.getenv("MIGRUN_SOURCE_DIR") or ".") .. "/lua"

-- Lowest first. A module's layer is the first pattern its name matches.
local LAYERS = {
  { "base", { "^migrun%.host$", "^migrun%.error$", "^migrun%.lsn$", "^migrun%.proc$", "^migrun%.pg$",
              "^migrun%.pg%.core$", "^migrun%.aws$", "^migrun%.json$", "^migrun%.text$", "^migrun%.db$", "^migrun%.mask$",
              "^cjson", "^socket" } },
  { "cloud", { "^migrun%.aws%.", "^migrun%.dms$", "^migrun%.dms%." } },
  { "machinery", { "^migrun%.playbook$", "^migrun%.playbook%." } },
  { "rehearsal and repl", { "^migrun%.rehearsal%.", "^migrun%.repl%." } },
  { "procedure", { "^migrun%.[%w_]+$" } },
}
local ORDER = { base = 1, cloud = 2, machinery = 3, procedure = 4, ["rehearsal and repl"] = 5 }

local function layer_of(module)
  for _, l in ipairs(LAYERS) do
    for _, pat in ipairs(l[2]) do
      if module:match(pat) then return l[1] end
    end
  end
end

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

local function modules()
  local out = {}
  local ok, _, _, listing = proc.run{ "find", root, "-name", "*.lua" }
  assert(ok, "find " .. root)
  for path in listing:gmatch("[^\n]+") do
    local name = path:sub(#root + 2):gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
    local requires = {}
    for dep in code_of(path):gmatch("require%s*%(?%s*[\"']([%w_.]+)[\"']") do
      if dep ~= name then requires[dep] = true end
    end
    out[name] = requires
  end
  return out
end

describe("the library's layers", function()
  local graph = modules()

  it("puts every module in a layer", function()
    local unplaced = {}
    for name in pairs(graph) do
      if not layer_of(name) then unplaced[#unplaced + 1] = name end
    end
    table.sort(unplaced)
    assert.same({}, unplaced)
  end)

  it("has no module that requires one above its layer", function()
    local wrong = {}
    for name, requires in pairs(graph) do
      local mine = ORDER[layer_of(name)]
      for dep in pairs(requires) do
        local theirs = layer_of(dep)
        if theirs and ORDER[theirs] > mine then
          wrong[#wrong + 1] = ("%s (%s) requires %s (%s)"):format(name, layer_of(name), dep, theirs)
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
        if name:match("^migrun%.repl%.") and dep:match("^migrun%.rehearsal%.")
          or name:match("^migrun%.rehearsal%.") and dep:match("^migrun%.repl%.") then
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

  it("sees the requires it is meant to see (the scanner works)", function()
    assert.truthy(graph["migrun.playbook"]["migrun.playbook.journal"])
    assert.truthy(graph["migrun.rehearsal.lab"]["migrun.proc"])
    assert.is_nil(graph["migrun.catalog"]["migrun.catalog"])
  end)
end)
