-- Function lengths, to keep functions under ~100 lines (issue 22).
--
--   migrun tools/funclen.lua [--over N] FILE...      (Lua and C files)
--
-- Lua: every function prototype as luac5.4 -l -l lists it (so the numbers
-- are the compiler's, not a guess from indentation): its lines, the
-- closures nested in it (at any depth) and its upvalues. The main chunk is
-- left out. C: every top-level function definition of a file formatted as
-- the runtime is (clang-format: the signature starts at column 0 and the
-- body ends with a "}" at column 0), its lines from signature to brace.
-- Prints one line per function, longest first; --over N prints only those
-- longer than N lines and exits 1 when there is one.
local proc = require "migrun.proc"

local function lua_functions(path)
  local ok, how, code, out, err = proc.run{ "luac5.4", "-p", "-l", "-l", path, timeout = 60 }
  if not ok then
    error(("luac5.4 on %s: %s %s\n%s"):format(path, tostring(how), tostring(code), err or ""), 0)
  end
  local list, current = {}, nil
  for line in out:gmatch("[^\n]+") do
    local first, last = line:match("^function <[^:]+:(%d+),(%d+)>")
    if first then
      current = { first = tonumber(first), last = tonumber(last) }
      list[#list + 1] = current
    elseif line:match("^main <") then
      current = nil
    elseif current and not current.upvalues then
      local up = line:match("(%d+) upvalues?,")
      if up then current.upvalues = tonumber(up) end
    end
  end
  -- a name: the text after "function" on its first line, else "(anonymous)"
  local lines = {}
  for l in io.lines(path) do lines[#lines + 1] = l end
  for _, f in ipairs(list) do
    local src = lines[f.first] or ""
    f.name = src:match("function%s+([%w_.:]+)%s*%(") or src:match("([%w_.]+)%s*=%s*function") or "(anonymous)"
    f.lines = f.last - f.first + 1
    f.nested = 0
    for _, g in ipairs(list) do
      if g ~= f and g.first >= f.first and g.last <= f.last and (g.first > f.first or g.last < f.last) then
        f.nested = f.nested + 1
      end
    end
  end
  return list
end

local function c_functions(path)
  local list, lineno, start, name = {}, 0, nil, nil
  local sig_at, sig_name
  for line in io.lines(path) do
    lineno = lineno + 1
    if not start then
      -- a signature begins at column 0 with a name followed by "("
      local n = line:match("^[%a_][%w_%s%*]-([%a_][%w_]*)%(")
      if n and not line:match("^static const") and not line:match(";%s*$") then
        sig_at, sig_name = lineno, n
      end
      if line:match("{%s*$") and sig_at and not line:match("^%s") or (line == "{" and sig_at) then
        start, name = sig_at, sig_name
      elseif line:match(";%s*$") or line == "" then
        sig_at = nil
      end
    elseif line:match("^}") then
      list[#list + 1] = { name = name, first = start, last = lineno, lines = lineno - start + 1 }
      start, sig_at = nil, nil
    end
  end
  return list
end

local over, files = nil, {}
local i = 1
while arg[i] do
  if arg[i] == "--over" then
    over = tonumber(arg[i + 1]) or error("--over needs a number of lines", 0)
    i = i + 2
  elseif arg[i] == "--help" or arg[i] == "-h" then
    print("usage: migrun tools/funclen.lua [--over N] FILE...  (Lua and C files)")
    os.exit(0)
  else
    files[#files + 1] = arg[i]
    i = i + 1
  end
end
if #files == 0 then
  io.stderr:write("usage: migrun tools/funclen.lua [--over N] FILE...  (Lua and C files)\n")
  os.exit(2)
end

local all = {}
for _, path in ipairs(files) do
  local list = path:match("%.c$") and c_functions(path) or lua_functions(path)
  for _, f in ipairs(list) do
    f.file = path
    all[#all + 1] = f
  end
end
table.sort(all, function(a, b)
  if a.lines ~= b.lines then return a.lines > b.lines end
  return a.file .. a.first < b.file .. b.first
end)
local found = false
for _, f in ipairs(all) do
  if not over or f.lines > over then
    found = found or (over ~= nil)
    local extra = f.upvalues and ("  closures %d  upvalues %d"):format(f.nested, f.upvalues) or ""
    print(("%5d  %s:%d  %s%s"):format(f.lines, f.file, f.first, f.name, extra))
  end
end
os.exit(found and 1 or 0)
