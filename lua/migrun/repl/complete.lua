--- Tab completion for the REPL. The C side passes the word under the cursor
-- (Lua identifiers joined by "." with maybe one final ":", e.g. "string.fo"
-- or "x:to") and gets back the sorted list of full words it may become.
--
-- Names are looked up without running user code: tables are read with
-- rawget, and fields reached through metatables are followed only when
-- __index is a table (so an LSN's `x:` offers `tonumber`, a string's `s:`
-- offers `format`). After ":" only functions are offered.
local M = {}

local keywords = {}
for w in ([[and break do else elseif end false for function goto if in
    local nil not or repeat return then true until while]]):gmatch("%a+") do
    keywords[#keywords + 1] = w
end

-- Calls fn(key, value) for the fields of v: its own (tables) then those of
-- the __index tables of its metatable chain.
local function each_field(v, fn)
    local seen = {}
    while v ~= nil and not seen[v] do
        seen[v] = true
        if type(v) == "table" then
            for k, x in next, v do fn(k, x) end
        end
        local mt = debug.getmetatable(v)
        local index = mt and rawget(mt, "__index")
        if type(index) ~= "table" then break end
        v = index
    end
end

-- v[k] without running metamethods other than table __index chains.
local function field(v, k)
    local found
    each_field(v, function(key, x)
        if found == nil and key == k then found = x end
    end)
    return found
end

--- The completions of word, looked up in env (default _G).
function M.complete(word, env)
    env = env or _G
    local prefix, sep, partial = word:match("^(.-)([.:]?)([%a_]?[%w_]*)$")
    if prefix == nil then return {} end
    local base, found = env, {}
    if sep ~= "" then
        for name in (prefix .. "."):gmatch("([^.]*)%.") do
            if not name:match("^[%a_][%w_]*$") then return {} end
            base = field(base, name)
            if base == nil then return {} end
        end
    elseif prefix ~= "" then
        return {}
    end
    local seen = {}
    local function offer(k, x)
        if type(k) == "string" and k:match("^[%a_][%w_]*$") and k:sub(1, #partial) == partial
            and not seen[k] and (sep ~= ":" or type(x) == "function") then
            seen[k] = true
            found[#found + 1] = prefix .. sep .. k
        end
    end
    each_field(base, offer)
    if sep == "" then
        for _, w in ipairs(keywords) do offer(w, true) end
    end
    table.sort(found)
    return found
end

return M
