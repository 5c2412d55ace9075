--[[
migrun.groups: which tables share a replication slot (runbook Phase I, "group
your tables"). Pure functions over the tables migrun.catalog lists.

  local groups = require "migrun.groups"
  local plan = assert(groups.plan(tables, { largest_alone = cfg.groups.largest_alone,
    explicit = cfg.groups.explicit, prefix = cfg.slots.prefix, lobs = cfg.lobs }))
  print(groups.format(plan))

groups.plan(tables, opts) -> plan | nil, err
    tables: catalog.tables' list (schema, name, bytes, has_pk, separate_unique,
    lob_columns, lob_max_kb when measured). opts:
      largest_alone  each of the N largest tables (after explicit groups) gets a
                     group of its own (default 5)
      explicit       { {name = "billing", tables = {"s.t", ...}}, ... }: the
                     team's groups, first and as given
      prefix         slot names are prefix .. two digits (default "dms_slot_")
      lobs           { default = {max_kb, truncation_ok}, tables = {["s.t"] = {...}} }
    The policy, in order: explicit groups (reason "explicit"); each of the N
    largest remaining tables alone ("largest"); the remaining tables with a
    primary key and a separate unique constraint together ("pk+unique": DMS
    batch apply must be off for them, builders.lua switches it off); the rest
    in one group ("rest"). No group is empty. Tables keep the catalog's order
    (largest first) inside a group.
    plan: a list of slot groups in the shape migrun.dms.builders takes:
      { name, slot, reason, bytes, label (explicit groups: the team's name),
        tables = { {schema, name, has_pk, has_separate_unique,
                    lob_columns = {names}, lob_max_kb, lob_truncation_ok} },
        warnings = {lines} }
    name is the slot name, also for explicit groups (slot, task and endpoint
    names then follow one scheme; the team's name is kept as label).
    LOB policy per table with LOB columns: lobs.tables["s.t"] when given, taken
    as is (a measured value above it is a warning when truncation is not
    acceptable); otherwise lobs.default with max_kb raised to
    groups.lob_limit_kb(measured largest LOB): a margin over what is there
    today, since a value that grows during CDC past a limit set to the
    largest measured one would be cut (truncation_ok still says what happens
    to values beyond the margin). Without measurement, the configured max_kb.
    Defaults: max_kb 32 (DMS's), truncation_ok true.
      batch_apply    config dms.task.batch_apply: true forced on a group that
                     DMS cannot batch-apply (builders.check) is a config error
    Each group gets batch_apply (false, or nil: builders decide) and
    batch_note: why batch apply is off for it (a table with a primary key and
    a separate unique constraint, or one in full LOB mode: DMS batch-applies
    LOB columns only in limited LOB mode), printed with the plan.
    Errors (nil, err of kind "config"): an explicit group naming a table that
    is not among the tables, a table in two explicit groups, an explicit group
    without tables. A prefix that cannot make a PostgreSQL slot name (lowercase
    letters, digits, underscore; the name at most 63 bytes) raises.

groups.lob_limit_kb(bytes) -> KB: the LobMaxSize that leaves a margin over a
    largest LOB of `bytes`: max(2 x largest, largest + 1 MiB), rounded up to
    a whole KB, at most builders.MAX_LOB_MAX_KB. DMS sizes by the largest
    LOB; twice it covers a value that doubles (and NCLOB's two bytes per
    character), 1 MiB covers small values that grow a lot.

groups.format(plan) -> text: one aligned line per group (slot, tables, size,
    reason, batch apply), then the warnings (tables without a primary key, whose updates and
    deletes will not replicate; LOB limits below the measured size).
]]
local errors = require "migrun.error"
local text = require "migrun.text"
local builders = require "migrun.dms.builders"

local groups = {}

groups.DEFAULT_PREFIX = "dms_slot_"
groups.DEFAULT_LARGEST_ALONE = 5
groups.DEFAULT_LOB_MAX_KB = 32
local MAX_SLOT_NAME = 63 -- NAMEDATALEN - 1

local key_of = text.key

function groups.lob_limit_kb(largest_bytes)
  assert(type(largest_bytes) == "number" and largest_bytes >= 0, "groups.lob_limit_kb: a number of bytes expected")
  local limit = math.max(2 * largest_bytes, largest_bytes + 1024 * 1024)
  return math.min(math.tointeger(math.ceil(limit / 1024)), builders.MAX_LOB_MAX_KB)
end

local function slot_name(prefix, i)
  local name = prefix .. ("%02d"):format(i)
  assert(name:match("^[a-z0-9_]+$"), ("groups.plan: slot name %q: PostgreSQL allows lowercase "
    .. "letters, digits and underscores only (check slots.prefix)"):format(name))
  assert(#name <= MAX_SLOT_NAME, ("groups.plan: slot name %q is longer than %d bytes"):format(
    name, MAX_SLOT_NAME))
  return name
end

-- The LOB settings of one table (see the header).
local function lob_policy(t, lobs, warnings)
  local names = {}
  for i, c in ipairs(t.lob_columns or {}) do names[i] = type(c) == "table" and c.name or c end
  if #names == 0 then return names, nil, nil end
  local default = lobs.default or {}
  local override = (lobs.tables or {})[key_of(t)]
  local max_kb, ok
  if override then
    max_kb = override.max_kb or default.max_kb or groups.DEFAULT_LOB_MAX_KB
    ok = override.truncation_ok
    if ok == nil then ok = default.truncation_ok end
    if ok == nil then ok = true end
    if t.lob_max_kb and t.lob_max_kb > max_kb then
      warnings[#warnings + 1] = ("%s: largest LOB measured %d KB, above its configured max_kb %d%s"):format(
        key_of(t), t.lob_max_kb, max_kb,
        ok and " (larger values will be truncated)" or " (truncation not acceptable: full LOB mode for it)")
    end
  else
    max_kb = default.max_kb or groups.DEFAULT_LOB_MAX_KB
    local measured = t.lob_max_bytes or (t.lob_max_kb and t.lob_max_kb * 1024)
    if measured then max_kb = math.max(max_kb, groups.lob_limit_kb(measured)) end
    ok = default.truncation_ok
    if ok == nil then ok = true end
  end
  return names, max_kb, ok
end

local function group_table(t, lobs, warnings)
  local names, max_kb, ok = lob_policy(t, lobs, warnings)
  return { schema = t.schema, name = t.name, has_pk = t.has_pk and true or false,
           has_separate_unique = (t.separate_unique or t.has_separate_unique) and true or false,
           lob_columns = names, lob_max_kb = max_kb, lob_truncation_ok = ok }
end

local function config_error(message, detail)
  return nil, errors.new{ kind = "config", where = "groups", message = message, detail = detail,
    hint = "check groups.explicit in the migration config" }
end

-- 1. Explicit groups -> the raw groups | nil, err (a config error).
local function explicit_groups(explicit, by_key, placed, raw)
  local problems = {}
  for gi, eg in ipairs(explicit or {}) do
    assert(type(eg) == "table" and type(eg.tables) == "table",
      ("groups.plan: explicit group %d needs tables"):format(gi))
    local label = eg.name or ("explicit " .. gi)
    if #eg.tables == 0 then
      problems[#problems + 1] = ("explicit group %q has no tables"):format(label)
    end
    local members = {}
    for _, k in ipairs(eg.tables) do
      local t = by_key[k]
      if not t then
        problems[#problems + 1] = ("explicit group %q: table %s is not among the tables to migrate"):format(label, k)
      elseif placed[k] then
        problems[#problems + 1] = ("table %s is in two explicit groups: %q and %q"):format(k, placed[k], label)
      else
        placed[k] = label
        members[#members + 1] = t
      end
    end
    if #members > 0 then raw[#raw + 1] = { reason = "explicit", label = label, tables = members } end
  end
  if #problems > 0 then
    return config_error(problems[1], #problems > 1 and table.concat(problems, "; ") or nil)
  end
  return true
end

-- 2. The N largest remaining tables, each alone.
-- 3. Primary key and a separate unique constraint: together.
-- 4. The rest: together.
local function automatic_groups(ordered, largest_alone, placed, raw)
  local alone = 0
  for _, t in ipairs(ordered) do
    if alone >= largest_alone then break end
    local k = key_of(t)
    if not placed[k] then
      placed[k] = "largest"
      raw[#raw + 1] = { reason = "largest", tables = { t } }
      alone = alone + 1
    end
  end
  local pk_unique, rest = {}, {}
  for _, t in ipairs(ordered) do
    if not placed[key_of(t)] then
      if t.has_pk and (t.separate_unique or t.has_separate_unique) then
        pk_unique[#pk_unique + 1] = t
      else
        rest[#rest + 1] = t
      end
    end
  end
  if #pk_unique > 0 then raw[#raw + 1] = { reason = "pk+unique", tables = pk_unique } end
  if #rest > 0 then raw[#raw + 1] = { reason = "rest", tables = rest } end
end

-- A raw group as the plan has it -> group | nil, err (settings DMS refuses).
local function plan_group(r, i, prefix, lobs, opts)
  local slot = slot_name(prefix, i)
  local g = { name = slot, slot = slot, reason = r.reason, label = r.label, bytes = 0,
              tables = {}, warnings = {} }
  for _, t in ipairs(r.tables) do
    g.bytes = g.bytes + (t.bytes or 0)
    g.tables[#g.tables + 1] = group_table(t, lobs, g.warnings)
    if not t.has_pk then
      g.warnings[#g.warnings + 1] = ("%s has no primary key: only its inserts replicate, "
        .. "its updates and deletes will not"):format(key_of(t))
    end
  end
  if opts.batch_apply ~= nil then g.batch_apply = opts.batch_apply end
  local problem = builders.check(g)
  if problem then
    return nil, errors.new{ kind = "config", where = "groups", message = problem,
      hint = "leave dms.task.batch_apply out (batch apply is then off only for the groups that need it), "
        .. "or accept truncation for the full-LOB-mode tables (lobs.tables[...].truncation_ok = true)" }
  end
  local on, why = builders.batch_apply(g)
  g.batch_note = (not on) and why or nil
  return g
end

function groups.plan(tables, opts)
  assert(type(tables) == "table", "groups.plan: a list of tables expected")
  opts = opts or {}
  local prefix = opts.prefix or groups.DEFAULT_PREFIX
  assert(type(prefix) == "string", "groups.plan: prefix must be a string")
  local largest_alone = opts.largest_alone or groups.DEFAULT_LARGEST_ALONE
  assert(math.type(largest_alone) == "integer" and largest_alone >= 0,
    "groups.plan: largest_alone must be an integer >= 0")
  local lobs = opts.lobs or {}
  assert(opts.batch_apply == nil or type(opts.batch_apply) == "boolean", "groups.plan: batch_apply must be a boolean")

  local by_key, ordered = {}, {}
  for _, t in ipairs(tables) do
    assert(type(t) == "table" and t.schema and t.name, "groups.plan: tables need schema and name")
    by_key[key_of(t)] = t
    ordered[#ordered + 1] = t
  end
  -- Largest first, ties by name: the plan does not depend on the input order.
  table.sort(ordered, function(a, b)
    local ab, bb = a.bytes or 0, b.bytes or 0
    if ab ~= bb then return ab > bb end
    return key_of(a) < key_of(b)
  end)

  local placed = {}
  local raw = {} -- { reason, label, tables = {catalog tables} }
  local ok, err = explicit_groups(opts.explicit, by_key, placed, raw)
  if not ok then return nil, err end
  automatic_groups(ordered, largest_alone, placed, raw)

  local plan = {}
  for i, r in ipairs(raw) do
    local g, gerr = plan_group(r, i, prefix, lobs, opts)
    if not g then return nil, gerr end
    plan[i] = g
  end
  return plan
end


local function table_list(g, limit)
  local names = {}
  for i, t in ipairs(g.tables) do
    if i > limit then
      names[#names + 1] = ("(+%d more)"):format(#g.tables - limit)
      break
    end
    names[i] = text.key(t)
  end
  return table.concat(names, ", ")
end

function groups.format(plan)
  assert(type(plan) == "table", "groups.format: a plan expected")
  local rows = { { "slot", "size", "reason", "batch apply", "tables" } }
  local total, ntables = 0, 0
  for _, g in ipairs(plan) do
    local reason = g.label and ("%s (%s)"):format(g.reason, g.label) or g.reason
    rows[#rows + 1] = { g.slot, text.bytes(g.bytes), reason, g.batch_note and "off" or "on",
                        ("%d: %s"):format(#g.tables, table_list(g, 6)) }
    total, ntables = total + (g.bytes or 0), ntables + #g.tables
  end
  local lines = text.aligned(rows)
  lines[#lines + 1] = ("%d groups, %d tables, %s"):format(#plan, ntables, text.bytes(total))
  local notes = {}
  for _, g in ipairs(plan) do
    if g.batch_note then notes[#notes + 1] = ("  %s: %s"):format(g.slot, g.batch_note) end
  end
  if #notes > 0 then
    -- DMS refuses batch apply for these (builders.transactional_reason): the
    -- whole group applies one transaction at a time, which is slower
    lines[#lines + 1] = "batch apply off (DMS allows it neither with full LOB mode nor on tables with "
      .. "a primary key and a separate unique constraint):"
    table.move(notes, 1, #notes, #lines + 1, lines)
  end
  local warnings = {}
  for _, g in ipairs(plan) do
    for _, w in ipairs(g.warnings or {}) do warnings[#warnings + 1] = ("  %s: %s"):format(g.slot, w) end
  end
  if #warnings > 0 then
    lines[#lines + 1] = "warnings:"
    table.move(warnings, 1, #warnings, #lines + 1, lines)
  end
  return table.concat(lines, "\n")
end

return groups
