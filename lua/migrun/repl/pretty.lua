--- Readable, deterministic printing of Lua values, used by the REPL for
-- results. `pretty.format(v, opts)` returns a string; `pretty.print(...)`
-- writes each value formatted, tab-separated, on stdout.
--
-- Strings are quoted and escaped; tables print with sorted keys, short ones
-- on one line and others indented; long arrays are elided after `max_items`
-- with "... (N more)"; a table met again inside itself prints as <cycle>;
-- values whose metatable has __tostring (LSNs, errors, handles) print
-- through it.
--
-- opts (all optional):
--   indent     string per level (default two spaces)
--   max_items  array items shown before eliding (default 20)
--   max_keys   other keys shown before eliding (default 200)
--   max_depth  nesting shown before printing {...} (default 10)
--   width      widest single-line table (default 72)
--   raw        ignore __tostring on tables
local M = {}

local defaults = { indent = "  ", max_items = 20, max_keys = 200, max_depth = 10, width = 72 }

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
                  ["\a"] = "\\a", ["\b"] = "\\b", ["\f"] = "\\f", ["\v"] = "\\v" }

--- A string as a Lua literal; UTF-8 and other high bytes are kept as they are.
function M.quote(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return escapes[c] or string.format("\\%03d", c:byte())
    end) .. '"'
end

local keywords = {}
for w in ([[and break do else elseif end false for function goto if in
    local nil not or repeat return then true until while]]):gmatch("%a+") do
    keywords[w] = true
end

local function is_identifier(k)
    return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil and not keywords[k]
end

local function has_tostring(v)
    local mt = debug.getmetatable(v)
    return mt ~= nil and mt.__tostring ~= nil
end

-- tostring, but a failing __tostring still gives something printable.
local function safe_tostring(v)
    local ok, s = pcall(tostring, v)
    if ok and type(s) == "string" then return s end
    return "<" .. type(v) .. ": __tostring failed>"
end

local function scalar(v)
    local t = type(v)
    if t == "string" then return M.quote(v) end
    return safe_tostring(v)
end

-- Keys sort by type (numbers, strings, booleans, the rest), then by value.
local type_order = { number = 1, string = 2, boolean = 3 }
local function key_less(a, b)
    local ta, tb = type(a), type(b)
    local oa, ob = type_order[ta] or 4, type_order[tb] or 4
    if oa ~= ob then return oa < ob end
    if ta == "number" or ta == "string" then return a < b end
    if ta == "boolean" then return (not a) and b end
    return safe_tostring(a) < safe_tostring(b)
end

local function format_key(k)
    if is_identifier(k) then return k end
    return "[" .. scalar(k) .. "]"
end

local format_value

local function format_table(t, opts, depth, path)
    if path[t] then return "<cycle>" end
    if depth >= opts.max_depth then return "{...}" end
    path[t] = true

    -- array part: 1..n without holes
    local n = 0
    while rawget(t, n + 1) ~= nil do n = n + 1 end
    local keys = {}
    for k in next, t do
        if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
    end
    table.sort(keys, key_less)

    local items, multiline = {}, false
    local function add(s)
        items[#items + 1] = s
        if s:find("\n", 1, true) then multiline = true end
    end
    for i = 1, math.min(n, opts.max_items) do
        add(format_value(rawget(t, i), opts, depth + 1, path))
    end
    if n > opts.max_items then add(string.format("... (%d more)", n - opts.max_items)) end
    for i = 1, math.min(#keys, opts.max_keys) do
        local k = keys[i]
        add(format_key(k) .. " = " .. format_value(rawget(t, k), opts, depth + 1, path))
    end
    if #keys > opts.max_keys then add(string.format("... (%d more)", #keys - opts.max_keys)) end
    path[t] = nil

    if #items == 0 then return "{}" end
    if not multiline then
        local line = "{ " .. table.concat(items, ", ") .. " }"
        if #line + #opts.indent * depth <= opts.width then return line end
    end
    -- one entry per line, except that short array items share lines
    local pad = opts.indent:rep(depth + 1)
    local narray = math.min(n, opts.max_items)
    local out, line = { "{" }, nil
    for i, s in ipairs(items) do
        local entry = s:sub(1, 4) == "... " and s or s .. ","
        local packable = i <= narray and s:sub(1, 1) ~= "{" and not s:find("\n", 1, true)
        if packable and line and #line + 1 + #entry <= opts.width then
            line = line .. " " .. entry
        else
            if line then out[#out + 1] = line end
            line = pad .. entry
        end
        if not packable then
            out[#out + 1] = line
            line = nil
        end
    end
    if line then out[#out + 1] = line end
    out[#out + 1] = opts.indent:rep(depth) .. "}"
    return table.concat(out, "\n")
end

function format_value(v, opts, depth, path)
    if type(v) == "table" and not (has_tostring(v) and not opts.raw) then
        return format_table(v, opts, depth, path)
    end
    return scalar(v)
end

--- One value as a string (see the options at the top of this file).
function M.format(v, opts)
    local o = {}
    for k, d in pairs(defaults) do o[k] = d end
    if opts then for k, x in pairs(opts) do o[k] = x end end
    return format_value(v, o, 0, {})
end

--- Prints every argument formatted, tab-separated, then a newline.
function M.print(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = M.format((select(i, ...))) end
    io.stdout:write(table.concat(parts, "\t"), "\n")
    io.stdout:flush()
end

return M
