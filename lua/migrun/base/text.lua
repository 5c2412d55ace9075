--[[
migrun.text: how migrun writes numbers and tables for people, in one place,
so that a size reads the same in a warning, a progress line, the console and
the report.

  local text = require "migrun.text"
  text.bytes(n)            -> "0 B", "1023 B", "1.5 KiB", "287.9 MiB" (1024-based,
                              one decimal; nil -> "?", math.huge -> "inf")
  text.duration(seconds)   -> "4.2 s", "42.0 s", "3 min 07 s", "2 h 05 min"
  text.thousands(n)        -> "1,234,567"
  text.key(t)              -> "schema.name" of a table record (t.key when it has one)
  text.key(schema, name)   -> "schema.name"
  text.split_key(t)        -> schema, name of a "schema.name" key, split at its first
                              dot (a table's name may hold dots, a schema's may not:
                              the key cannot tell), or of a table record
                              { schema =, name = }; nil when t is neither
  text.epoch(iso)          -> Unix time (an integer) of an ISO 8601 UTC time, or nil:
                              "2026-11-21T12:01:03Z" (the journal's, IMDS's Expiration),
                              "20261121T120103Z" (SigV4's X-Amz-Date); a fraction of a
                              second is dropped, an offset (+02:00, -0500) applied, no
                              zone read as UTC. The one date parser of migrun.
  text.utc_seconds(y, mo, d, h, mi, s) -> Unix time of that UTC date and time
  text.nearest(word, names) -> the name closest to a typo (for "did you mean"), or nil

  text.aligned(rows)       -> lines: rows of strings as aligned columns, two
                              spaces apart, the last column not padded
  text.columns(columns, records, opts) -> a value that prints as an aligned
      table with titles and a rule. columns: { key, title, align = "right",
      format = fn } or { "key", "title" }; records: tables keyed by column key.
      opts: noun = { "slot", "slots" } (a count line), empty = "(none)",
      notes = { lines after the table }. The records stay readable by index.
  text.markdown(columns, rows) -> a Markdown table (numbers right-aligned);
      rows are arrays (positional) or tables keyed by column key; columns are
      titles or { key, title, format = fn } (fn(value) -> text, nil included).
]]
local text = {}

local BYTE_UNITS = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" }

function text.bytes(n)
  if n == nil then return "?" end
  if n == math.huge then return "inf" end
  local sign = n < 0 and "-" or ""
  n = math.abs(n)
  local i = 1
  while n >= 1024 and i < #BYTE_UNITS do n, i = n / 1024, i + 1 end
  if i == 1 then return ("%s%d B"):format(sign, math.floor(n)) end
  return ("%s%.1f %s"):format(sign, n, BYTE_UNITS[i])
end

function text.duration(seconds)
  if seconds == nil then return "?" end
  if seconds < 59.95 then return ("%.1f s"):format(seconds) end
  seconds = math.floor(seconds + 0.5)
  if seconds < 3600 then return ("%d min %02d s"):format(seconds // 60, seconds % 60) end
  return ("%d h %02d min"):format(seconds // 3600, seconds % 3600 // 60)
end

function text.thousands(n)
  local s = tostring(math.floor(n))
  local sign, digits = s:match("^(-?)(%d+)$")
  if not digits then return s end
  return sign .. digits:reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")
end

function text.key(t, name)
  if name ~= nil then return t .. "." .. name end
  return t.key or (t.schema .. "." .. t.name)
end

function text.split_key(t)
  if type(t) == "string" then return t:match("^([^.]+)%.(.+)$") end
  if type(t) == "table" and t.schema and t.name then return t.schema, t.name end
  return nil
end

-- Seconds since 1970-01-01T00:00:00Z of a UTC date and time, whatever this
-- machine's time zone (os.time reads its fields as local time): days from the
-- civil date by Howard Hinnant's algorithm (proleptic Gregorian calendar).
function text.utc_seconds(y, mo, d, h, mi, s)
  y = mo <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (mo + (mo > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return (era * 146097 + doe - 719468) * 86400 + (h or 0) * 3600 + (mi or 0) * 60 + (s or 0)
end

function text.epoch(iso)
  if type(iso) ~= "string" then return nil end
  local y, mo, d, h, mi, s, rest = iso:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)(.*)$")
  if not y then y, mo, d, h, mi, s, rest = iso:match("^(%d%d%d%d)(%d%d)(%d%d)T(%d%d)(%d%d)(%d%d)(.*)$") end
  if not y then return nil end
  rest = rest:gsub("^[.,]%d+", "", 1)
  local offset = 0
  if rest ~= "" and rest ~= "Z" then
    local sign, oh, om = rest:match("^([+-])(%d%d):?(%d%d)$")
    if not sign then return nil end
    offset = (tonumber(oh) * 3600 + tonumber(om) * 60) * (sign == "+" and 1 or -1)
  end
  return text.utc_seconds(tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(s)) - offset
end

local function width(s) return utf8.len(s) or #s end

local function pad(s, w, right)
  local fill = (" "):rep(w - width(s))
  return right and fill .. s or s .. fill
end

function text.aligned(rows)
  local widths = {}
  for _, row in ipairs(rows) do
    for i, cell in ipairs(row) do widths[i] = math.max(widths[i] or 0, width(cell)) end
  end
  local out = {}
  for _, row in ipairs(rows) do
    local cells = {}
    for i, cell in ipairs(row) do cells[i] = i < #row and pad(cell, widths[i]) or cell end
    out[#out + 1] = table.concat(cells, "  ")
  end
  return out
end

---------------------------------------------------------------------------
-- Aligned tables of records
---------------------------------------------------------------------------

local Columns = { __name = "migrun.text.Columns" }
Columns.__index = Columns

local function cell(v, format)
  if format then v = format(v) end
  if v == nil then return "-" end
  if v == true then return "yes" end
  if v == false then return "no" end
  if math.type(v) == "float" then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return ("%d"):format(v) end
    return ("%.1f"):format(v)
  end
  return (tostring(v):gsub("[%c]", " "))
end

function Columns:__tostring()
  local columns, out = self.columns, {}
  if #self == 0 then
    out[1] = self.empty or "(none)"
  else
    local widths, cells = {}, {}
    for c, col in ipairs(columns) do widths[c] = width(col.title) end
    for r, record in ipairs(self) do
      cells[r] = {}
      for c, col in ipairs(columns) do
        local s = cell(record[col.key], col.format)
        cells[r][c] = s
        widths[c] = math.max(widths[c], width(s))
      end
    end
    local function line(values)
      local parts = {}
      for c, col in ipairs(columns) do parts[c] = pad(values[c], widths[c], col.align == "right") end
      return (table.concat(parts, "  "):gsub("%s+$", ""))
    end
    local titles, rules = {}, {}
    for c, col in ipairs(columns) do titles[c], rules[c] = col.title, ("-"):rep(widths[c]) end
    out[#out + 1] = line(titles)
    out[#out + 1] = line(rules)
    for r = 1, #cells do out[#out + 1] = line(cells[r]) end
    if self.noun then
      out[#out + 1] = ("(%d %s)"):format(#self, #self == 1 and self.noun[1] or self.noun[2])
    end
  end
  for _, note in ipairs(self.notes or {}) do out[#out + 1] = note end
  return table.concat(out, "\n")
end

function text.columns(columns, records, opts)
  assert(type(columns) == "table", "text.columns: columns expected")
  opts = opts or {}
  local cols = {}
  for i, c in ipairs(columns) do
    cols[i] = { key = c.key or c[1], title = c.title or c[2] or c[1], align = c.align, format = c.format }
  end
  local t = { columns = cols, notes = opts.notes or {}, noun = opts.noun, empty = opts.empty }
  for i, r in ipairs(records or {}) do t[i] = r end
  return setmetatable(t, Columns)
end

---------------------------------------------------------------------------
-- Markdown
---------------------------------------------------------------------------

local function md_cell(v)
  if v == nil then return "" end
  return (tostring(v):gsub("|", "\\|"):gsub("\n", " "))
end

local function column_key(c) return type(c) == "table" and c[1] or c end
local function column_title(c) return type(c) == "table" and (c[2] or c[1]) or c end

function text.markdown(columns, rows)
  local n = #columns
  local cells, right, widths = {}, {}, {}
  for j = 1, n do
    widths[j] = math.max(3, width(md_cell(column_title(columns[j]))))
    right[j] = #rows > 0
  end
  for i, row in ipairs(rows) do
    cells[i] = {}
    for j = 1, n do
      local v = row[j]
      if v == nil then v = row[column_key(columns[j])] end
      local format = type(columns[j]) == "table" and columns[j].format
      if format then v = format(v) end
      if type(v) ~= "number" and v ~= nil and v ~= "" then right[j] = false end
      cells[i][j] = md_cell(v)
      widths[j] = math.max(widths[j], width(cells[i][j]))
    end
  end
  local head, rule = {}, {}
  for j = 1, n do
    head[j] = pad(md_cell(column_title(columns[j])), widths[j], right[j])
    rule[j] = right[j] and ("-"):rep(widths[j] - 1) .. ":" or ("-"):rep(widths[j])
  end
  local lines = { "| " .. table.concat(head, " | ") .. " |", "| " .. table.concat(rule, " | ") .. " |" }
  for i = 1, #rows do
    local r = {}
    for j = 1, n do r[j] = pad(cells[i][j], widths[j], right[j]) end
    lines[#lines + 1] = "| " .. table.concat(r, " | ") .. " |"
  end
  return table.concat(lines, "\n") .. "\n"
end

-- The name closest to a typo, for "did you mean" (within a third of its
-- length in edits), or nil.
local function levenshtein(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

function text.nearest(word, names)
  assert(type(word) == "string" and type(names) == "table", "text.nearest: a word and a list of names expected")
  local best, best_d
  local w = word:lower()
  for _, name in ipairs(names) do
    -- a name far longer or shorter cannot be within reach: skip the O(n*m) distance
    if math.abs(#name - #w) <= math.max(2, #w // 3) then
      local d = levenshtein(w, name:lower())
      if not best_d or d < best_d then best, best_d = name, d end
    end
  end
  if best and best_d <= math.max(2, #word // 3) then return best end
end

return text
