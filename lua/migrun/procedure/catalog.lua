--[[
migrun.catalog: knowing the data (runbook Phase I, "know your tables"). Reads
only: every function takes a migrun.db Db (or anything with :query) and runs
catalog queries and SELECTs, never a write. Works on PostgreSQL 9.6 and later.

  local catalog = require "migrun.catalog"
  local tables = assert(catalog.tables(source, { schemas = { "public" }, exclude = { "public.tmp" } }))
  assert(catalog.measure_lobs(replica, tables))

catalog.tables(db, { schemas = {...} | nil, exclude = {"s.t", ...} }) -> list | nil, err
    The tables to migrate, largest first (bytes, then "s.t"). schemas nil: every
    schema except the system ones; pglogical, information_schema, pg_* and
    migrun (migrun.fence) are never listed (catalog.is_system_schema(name) says
    which schemas those are). A listed schema that does not exist is an error (a typo would
    otherwise migrate nothing). Each table:
      schema, name, qualified ('"s"."t"'), key ("s.t", the config spelling),
      bytes (pg_total_relation_size: heap, TOAST and indexes), table_bytes
      (pg_relation_size of the heap), rows_estimate (reltuples; for a table never
      analyzed, pg_stat_user_tables.n_live_tup: no full scan), unlogged,
      has_pk, pk_columns = {names}, unique = { {name, columns, is_constraint,
      definition, partial} } (unique indexes and UNIQUE constraints other than
      the PK; definition is pg_get_constraintdef for a constraint, else
      pg_get_indexdef), separate_unique (has_pk and #unique > 0),
      lob_columns = { {name, type, bytea} }, columns = { {name, type, not_null,
      generated} }, partition_of ("s.root" for a partition, else nil).
    LOB columns are those DMS maps to NCLOB/CLOB/BLOB (dms-api.md §8): text,
    json, jsonb, bytea, xml, tsvector, hstore, character varying WITHOUT a
    length (varchar(n) becomes a WSTRING), arrays and composite types; a domain
    counts as its base type.
    Partitioned tables: the leaf partitions are listed (they hold the rows,
    pglogical and DMS replicate them by their own names, logical decoding
    reports changes against them); the partitioned parent itself is not.
    Excluding "s.parent" excludes all of its partitions.
    Tables that belong to an extension (pg_depend 'e') are not listed: the
    extension creates them on the target.

catalog.measure_lobs(db, tables, { on_progress = fn(done, total, "s.t") }) -> tables | nil, err
    One scan per table with LOB columns: each lob column gets max_bytes (the
    largest octet_length of its text form; of the value itself for bytea);
    the table gets lob_max_bytes and lob_max_kb (ceil(bytes / 1024); 0 when
    every value is NULL or the table is empty). Run it on the replica.

catalog.write_rates(db, tables, seconds, sleep_fn) -> tables | nil, err
    Two samples of pg_stat_user_tables `seconds` apart (default 10; sleep_fn
    default host.sleep); each table gets write_rate = { inserts, updates,
    deletes, total } per second. On the primary: a standby has no such counters.

catalog.constraints_and_indexes(db, tables) -> { {table = "s.t", kind = "index" |
    "constraint", name, definition} } | nil, err
    Every constraint (pg_get_constraintdef) and every index that does not back a
    constraint (pg_get_indexdef) of the tables, for comparing two servers.
catalog.missing_on_target(source_list, target_list) -> list
    The source items the target lacks: same table, same kind and the same
    definition once the index name is taken out of an index definition and
    whitespace is collapsed (a renamed index still counts; a constraint with
    the same definition under another name too).

catalog.separate_unique_indexes(db, tables) -> { {table = "s.t", schema, table_name,
    name, kind = "constraint" | "index", definition, drop_sql, create_sql,
    referenced_by = { {table, name, definition, drop_sql, create_sql} }} } | nil, err
    The unique indexes and UNIQUE constraints of primary-key tables other than
    the PK (runbook: dropped on the target before the full load, recreated
    after). A constraint is dropped with ALTER TABLE ... DROP CONSTRAINT and
    recreated with ADD CONSTRAINT; an index with DROP INDEX / its CREATE UNIQUE
    INDEX. referenced_by lists the foreign keys that need it: they must be
    dropped first and added back after it.


All definitions are read with search_path emptied, so every name in them is
schema-qualified and two servers print them alike.
]]
local pg = require "migrun.pg"
local errors = require "migrun.error"
local text = require "migrun.text"
local pgversion = require "migrun.pgversion"

local catalog = {}

-- migrun: migrun's own (migrun.fence), on the source and the target alike
local SYSTEM_SCHEMAS = { pg_catalog = true, information_schema = true, pglogical = true, migrun = true }

local function is_system_schema(s)
  return SYSTEM_SCHEMAS[s] or s:match("^pg_") ~= nil
end
-- the same selection for what else a module lists by schema (migrun.matviews)
catalog.is_system_schema = is_system_schema

-- The same list as an SQL condition on a schema name column: every module
-- that reads the catalog by schema (drift, fidelity, preflight, sequences)
-- leaves out what migrun leaves out, its own objects included.
function catalog.not_system_sql(column)
  local names = {}
  for s in pairs(SYSTEM_SCHEMAS) do names[#names + 1] = "'" .. s .. "'" end
  table.sort(names)
  return ("(%s not in (%s) and %s !~ '^pg_')"):format(column, table.concat(names, ", "), column)
end

-- Base types DMS reads as LOBs (dms-api.md §8). varchar only without a length.
local LOB_BASE_TYPES = { text = true, json = true, jsonb = true, bytea = true, xml = true,
                         tsvector = true, hstore = true }

local key_of = text.key

local function query(db, ...)
  local res, err = db:query(...)
  if not res then return nil, err end
  return res
end

-- Runs fn() with the session settings changed (set_config, restored after, also
-- when fn fails), so that definitions and text forms print the same on every
-- server. Reads only: set_config changes this session, nothing on the server.
function catalog._with_settings(db, settings, fn)
  local saved = {}
  for _, kv in ipairs(settings) do
    local res, err = query(db, "select current_setting($1) as v", kv[1])
    if not res then return nil, err end
    saved[#saved + 1] = { kv[1], res[1].v }
    res, err = query(db, "select set_config($1, $2, false)", kv[1], kv[2])
    if not res then return nil, err end
  end
  local r = table.pack(pcall(fn))
  for i = #saved, 1, -1 do
    query(db, "select set_config($1, $2, false)", saved[i][1], saved[i][2])
  end
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

local function is_null(v) return v == nil or v == pg.null end

-- The ordinary tables -> by_oid, by key ("s.t").
local function read_tables(db, version)
  local partition_col = pgversion.pick(version, "relispartition", "c.relispartition", "false")
  local res, qerr = query(db, ([[
    select c.oid::bigint as oid, n.nspname as schema, c.relname as name,
           c.relpersistence = 'u' as unlogged, %s as is_partition,
           pg_total_relation_size(c.oid) as bytes, pg_relation_size(c.oid) as table_bytes,
           c.reltuples::float8 as reltuples, c.relpages::bigint as relpages,
           coalesce(s.n_live_tup, 0) as live_tuples,
           exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass
                     and d.objid = c.oid and d.deptype = 'e') as in_extension
      from pg_class c
      join pg_namespace n on n.oid = c.relnamespace
      left join pg_stat_user_tables s on s.relid = c.oid
     where c.relkind = 'r'
  ]]):format(partition_col))
  if not res then return nil, qerr end
  local by_oid, all = {}, {}
  for row in res:rows() do
    local t = { oid = row.oid, schema = row.schema, name = row.name,
                key = key_of(row.schema, row.name), qualified = pg.qualify(row.schema, row.name),
                unlogged = row.unlogged, is_partition = row.is_partition,
                bytes = row.bytes, table_bytes = row.table_bytes,
                in_extension = row.in_extension,
                has_pk = false, pk_columns = {}, unique = {}, lob_columns = {}, columns = {},
                constraints = {}, indexes = {} }
    -- reltuples is -1 (PG 14+) or 0 with relpages 0 (before) until the first
    -- VACUUM/ANALYZE: the statistics collector's live count is better then.
    if row.reltuples < 0 or (row.reltuples == 0 and row.relpages == 0) then
      t.rows_estimate = row.live_tuples
    else
      t.rows_estimate = math.floor(row.reltuples + 0.5)
    end
    by_oid[t.oid] = t
    all[t.key] = t
  end
  return by_oid, all
end

-- Partitions: the root partitioned table of each leaf (t.partition_of).
local function read_partitions(db, by_oid)
  local res, qerr = query(db, [[
    select i.inhrelid::bigint as child, i.inhparent::bigint as parent,
           n.nspname as schema, p.relname as name, p.relkind::text as kind
      from pg_inherits i
      join pg_class p on p.oid = i.inhparent
      join pg_namespace n on n.oid = p.relnamespace]])
  if not res then return nil, qerr end
  local parent_of = {}
  for row in res:rows() do
    if row.kind == "p" then parent_of[row.child] = row end
  end
  for oid, t in pairs(by_oid) do
    local p, root = parent_of[oid], nil
    while p do root = p; p = parent_of[p.parent] end
    if root then t.partition_of = key_of(root.schema, root.name) end
  end
  return true
end

-- Columns, with the base type of domains; the LOB columns among them.
local function read_columns(db, version, by_oid)
  local generated = pgversion.pick(version, "attgenerated", "a.attgenerated::text <> ''", "false")
  local res, qerr = query(db, ([[
    select a.attrelid::bigint as oid, a.attname as name,
           format_type(a.atttypid, a.atttypmod) as type, a.attnotnull as not_null,
           %s as generated,
           bt.typname as base_type, bt.typtype::text as base_kind, bt.typcategory::text as category,
           case when t.typtype = 'd' then t.typtypmod else a.atttypmod end as typmod
      from pg_attribute a
      join pg_class c on c.oid = a.attrelid and c.relkind = 'r'
      join pg_type t on t.oid = a.atttypid
      join pg_type bt on bt.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
     where a.attnum > 0 and not a.attisdropped
     order by a.attrelid, a.attnum]]):format(generated))
  if not res then return nil, qerr end
  for row in res:rows() do
    local t = by_oid[row.oid]
    if t then
      t.columns[#t.columns + 1] = { name = row.name, type = row.type, not_null = row.not_null,
                                    generated = row.generated, base_type = row.base_type }
      local lob = LOB_BASE_TYPES[row.base_type]
        or (row.base_type == "varchar" and row.typmod < 0)
        or row.category == "A" or row.base_kind == "c"
      if lob and not row.generated then
        t.lob_columns[#t.lob_columns + 1] = { name = row.name, type = row.type,
                                              bytea = row.base_type == "bytea" }
      end
    end
  end
  return true
end

-- An index row of read_indexes, recorded on its table (its key, its unique
-- constraints) -> the index.
local function add_index(t, row)
  local cols = {}
  for c in row.columns:gmatch("[^,]+") do
    -- quote_ident: unquote what it quoted (names with commas are quoted, so split is safe
    -- only for unquoted ones; rare enough to accept the quoted spelling then)
    cols[#cols + 1] = c:match('^"(.*)"$') and c:sub(2, -2):gsub('""', '"') or c
  end
  local ix = { name = row.name, oid = row.index_oid, columns = cols, is_primary = row.is_primary,
               is_unique = row.is_unique, is_valid = row.is_valid, partial = row.partial,
               definition = row.index_def,
               constraint_name = not is_null(row.constraint_name) and row.constraint_name or nil }
  t.indexes[#t.indexes + 1] = ix
  if ix.is_primary then
    t.has_pk, t.pk_columns = true, cols
  elseif ix.is_unique and ix.is_valid then
    t.unique[#t.unique + 1] = { name = ix.constraint_name or ix.name, columns = cols,
      is_constraint = ix.constraint_name ~= nil, definition = ix.definition,
      partial = ix.partial, index_name = ix.name, index_oid = ix.oid }
  end
  return ix
end

-- Indexes and the constraints they back -> index_by_oid.
local function read_indexes(db, version, by_oid)
  local nkey = pgversion.pick(version, "indnkeyatts", "i.indnkeyatts", "i.indnatts")
  local res, qerr = query(db, ([[
    select i.indrelid::bigint as oid, i.indexrelid::bigint as index_oid, ic.relname as name,
           i.indisprimary as is_primary, i.indisunique as is_unique, i.indisvalid as is_valid,
           i.indpred is not null as partial, pg_get_indexdef(i.indexrelid) as index_def,
           con.conname as constraint_name,
           array_to_string(array(
             select coalesce(quote_ident(a.attname), '(expression)')
               from unnest(i.indkey[0:%s - 1]) with ordinality k(attnum, ord)
               left join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
              order by k.ord), ',') as columns
      from pg_index i
      join pg_class ic on ic.oid = i.indexrelid
      left join pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid
                                 and con.contype in ('p', 'u', 'x')
     order by i.indrelid, ic.relname]]):format(nkey))
  if not res then return nil, qerr end
  local index_by_oid = {}
  for row in res:rows() do
    local t = by_oid[row.oid]
    if t then
      local ix = add_index(t, row)
      index_by_oid[ix.oid] = ix
    end
  end
  return index_by_oid
end

-- Constraints (all kinds; NOT NULL lives in pg_attribute before PG 18); the
-- foreign keys that reference each index (ix.referenced_by).
local function read_constraints(db, by_oid, index_by_oid)
  local res, qerr = query(db, [[
    select con.conrelid::bigint as oid, con.conname as name, con.contype::text as type,
           pg_get_constraintdef(con.oid) as definition, con.conindid::bigint as index_oid
      from pg_constraint con
     where con.conrelid <> 0
     order by con.conrelid, con.conname]])
  if not res then return nil, qerr end
  for row in res:rows() do
    local t = by_oid[row.oid]
    if t then
      local c = { name = row.name, type = row.type, definition = row.definition,
                  index_oid = row.index_oid }
      t.constraints[#t.constraints + 1] = c
      if row.type == "f" then
        local ix = index_by_oid[row.index_oid]
        if ix then
          ix.referenced_by = ix.referenced_by or {}
          ix.referenced_by[#ix.referenced_by + 1] = { table = t, constraint = c }
        end
      end
    end
  end
  return true
end

-- Everything about the ordinary tables of the database, keyed by "s.t", read in
-- a few catalog queries. Names are matched by spelling, so the same call works
-- on the source and on the target (oids differ).
local function load(db)
  local version, err = pgversion.of(db)
  if not version then return nil, err end
  return catalog._with_settings(db, { { "search_path", "" } }, function()
    local by_oid, all = read_tables(db, version)
    if not by_oid then return nil, all end
    local ok, qerr = read_partitions(db, by_oid)
    if ok then ok, qerr = read_columns(db, version, by_oid) end
    if not ok then return nil, qerr end
    local index_by_oid
    index_by_oid, qerr = read_indexes(db, version, by_oid)
    if not index_by_oid then return nil, qerr end
    ok, qerr = read_constraints(db, by_oid, index_by_oid)
    if not ok then return nil, qerr end
    for _, t in pairs(all) do
      for _, u in ipairs(t.unique) do
        if u.is_constraint then
          for _, c in ipairs(t.constraints) do
            if c.name == u.name then u.definition = c.definition end
          end
        end
      end
      t.separate_unique = t.has_pk and #t.unique > 0
    end
    return all, index_by_oid
  end)
end

-- The public fields of a loaded table (what catalog.tables documents).
local function public(t)
  local unique = {}
  for i, u in ipairs(t.unique) do
    unique[i] = { name = u.name, columns = u.columns, is_constraint = u.is_constraint,
                  definition = u.definition, partial = u.partial }
  end
  local lobs = {}
  for i, c in ipairs(t.lob_columns) do lobs[i] = { name = c.name, type = c.type, bytea = c.bytea } end
  local cols = {}
  for i, c in ipairs(t.columns) do
    cols[i] = { name = c.name, type = c.type, not_null = c.not_null, generated = c.generated }
  end
  return { schema = t.schema, name = t.name, key = t.key, qualified = t.qualified,
           bytes = t.bytes, table_bytes = t.table_bytes, rows_estimate = t.rows_estimate,
           unlogged = t.unlogged, has_pk = t.has_pk, pk_columns = t.pk_columns, unique = unique,
           separate_unique = t.separate_unique, lob_columns = lobs, columns = cols,
           partition_of = t.partition_of }
end

local function by_size(a, b)
  if a.bytes ~= b.bytes then return a.bytes > b.bytes end
  return a.key < b.key
end

function catalog.tables(db, opts)
  assert(db and db.query, "catalog.tables: a Db expected")
  opts = opts or {}
  local exclude = {}
  for _, k in ipairs(opts.exclude or {}) do
    assert(type(k) == "string", "catalog.tables: exclude entries are \"schema.table\" strings")
    exclude[k] = true
  end
  local wanted
  if opts.schemas then
    wanted = {}
    for _, s in ipairs(opts.schemas) do wanted[s] = true end
  end
  local all, err = load(db)
  if not all then return nil, err end
  if wanted then
    local res
    res, err = query(db, "select nspname from pg_namespace")
    if not res then return nil, err end
    local present, missing = {}, {}
    for row in res:rows() do present[row.nspname] = true end
    for _, s in ipairs(opts.schemas) do
      if not present[s] then missing[#missing + 1] = s end
    end
    if #missing > 0 then
      return nil, errors.new{ kind = "catalog", where = db.name and db:name() or "catalog",
        message = "schema(s) not found: " .. table.concat(missing, ", "),
        hint = "check `schemas` in the migration config" }
    end
  end
  local list = {}
  for key, t in pairs(all) do
    if not is_system_schema(t.schema) and not t.in_extension
        and (not wanted or wanted[t.schema])
        and not exclude[key] and not (t.partition_of and exclude[t.partition_of]) then
      list[#list + 1] = public(t)
    end
  end
  table.sort(list, by_size)
  return list
end

local function table_key(t)
  if type(t) == "string" then return t end
  assert(type(t) == "table" and t.schema and t.name, "a table {schema=, name=} expected")
  return key_of(t.schema, t.name)
end

function catalog.measure_lobs(db, tables, opts)
  assert(db and db.query, "catalog.measure_lobs: a Db expected")
  opts = opts or {}
  local todo = {}
  for _, t in ipairs(tables) do
    if t.lob_columns and #t.lob_columns > 0 then todo[#todo + 1] = t end
  end
  for i, t in ipairs(todo) do
    local exprs = {}
    for j, c in ipairs(t.lob_columns) do
      local col = pg.quote_ident(c.name)
      local bytea = c.bytea or (c.type == "bytea")
      exprs[j] = ("coalesce(max(octet_length(%s)), 0)::bigint as c%d"):format(
        bytea and col or (col .. "::text"), j)
    end
    local res, err = query(db, ("select %s from %s"):format(table.concat(exprs, ", "),
      pg.qualify(t.schema, t.name)))
    if not res then return nil, err end
    local largest = 0
    for j, c in ipairs(t.lob_columns) do
      c.max_bytes = res[1]["c" .. j]
      if c.max_bytes > largest then largest = c.max_bytes end
    end
    t.lob_max_bytes = largest
    t.lob_max_kb = math.ceil(largest / 1024)
    if opts.on_progress then opts.on_progress(i, #todo, table_key(t)) end
  end
  return tables
end

local function stat_sample(db)
  local res, err = query(db, [[
    select schemaname as schema, relname as name, n_tup_ins as ins, n_tup_upd as upd,
           n_tup_del as del
      from pg_stat_user_tables]])
  if not res then return nil, err end
  local sample = {}
  for row in res:rows() do sample[key_of(row.schema, row.name)] = row end
  return sample
end

function catalog.write_rates(db, tables, seconds, sleep_fn)
  assert(db and db.query, "catalog.write_rates: a Db expected")
  seconds = seconds or 10
  assert(type(seconds) == "number" and seconds > 0, "catalog.write_rates: seconds > 0 expected")
  sleep_fn = sleep_fn or require("migrun.host").sleep
  local clock = require("migrun.host").monotonic
  local first, err = stat_sample(db)
  if not first then return nil, err end
  local t0 = clock()
  sleep_fn(seconds)
  local second
  second, err = stat_sample(db)
  if not second then return nil, err end
  local elapsed = math.max(clock() - t0, 1e-3)
  for _, t in ipairs(tables) do
    local k = table_key(t)
    local a, b = first[k], second[k]
    local r = { inserts = 0, updates = 0, deletes = 0, seconds = elapsed }
    if a and b then
      r.inserts = (b.ins - a.ins) / elapsed
      r.updates = (b.upd - a.upd) / elapsed
      r.deletes = (b.del - a.del) / elapsed
    end
    r.total = r.inserts + r.updates + r.deletes
    t.write_rate = r
  end
  return tables
end

local function wanted_set(tables)
  local set = {}
  for _, t in ipairs(tables) do set[table_key(t)] = true end
  return set
end

local function sorted_keys(all, set)
  local keys = {}
  for k in pairs(set) do if all[k] then keys[#keys + 1] = k end end
  table.sort(keys)
  return keys
end

function catalog.constraints_and_indexes(db, tables)
  assert(db and db.query, "catalog.constraints_and_indexes: a Db expected")
  local all, err = load(db)
  if not all then return nil, err end
  local list = {}
  for _, k in ipairs(sorted_keys(all, wanted_set(tables))) do
    local t = all[k]
    for _, c in ipairs(t.constraints) do
      list[#list + 1] = { table = k, kind = "constraint", name = c.name, definition = c.definition }
    end
    for _, ix in ipairs(t.indexes) do
      if not ix.constraint_name then
        list[#list + 1] = { table = k, kind = "index", name = ix.name, definition = ix.definition }
      end
    end
  end
  return list
end

-- A definition as compared between servers: the index name taken out, the
-- whitespace collapsed.
local function normalized(item)
  local d = item.definition:gsub("%s+", " ")
  if item.kind == "index" then
    d = d:gsub("^CREATE UNIQUE INDEX .- ON ", "CREATE UNIQUE INDEX ON ", 1)
         :gsub("^CREATE INDEX .- ON ", "CREATE INDEX ON ", 1)
  end
  return d
end

function catalog.missing_on_target(source_list, target_list)
  local have = {}
  for _, item in ipairs(target_list) do
    have[item.table .. "\0" .. item.kind .. "\0" .. normalized(item)] = true
  end
  local missing = {}
  for _, item in ipairs(source_list) do
    if not have[item.table .. "\0" .. item.kind .. "\0" .. normalized(item)] then
      missing[#missing + 1] = item
    end
  end
  return missing
end

local function constraint_sql(t, name, definition)
  local tq = pg.qualify(t.schema, t.name)
  return ("ALTER TABLE %s DROP CONSTRAINT %s"):format(tq, pg.quote_ident(name)),
         ("ALTER TABLE %s ADD CONSTRAINT %s %s"):format(tq, pg.quote_ident(name), definition)
end

-- The statement that creates an item of catalog.constraints_and_indexes.
function catalog.create_sql(item)
  if item.kind == "index" then return item.definition end
  local schema, name = text.split_key(item.table)
  return select(2, constraint_sql({ schema = schema, name = name }, item.name, item.definition))
end

function catalog.separate_unique_indexes(db, tables)
  assert(db and db.query, "catalog.separate_unique_indexes: a Db expected")
  local all, index_by_oid = load(db)
  if not all then return nil, index_by_oid end
  local list = {}
  for _, k in ipairs(sorted_keys(all, wanted_set(tables))) do
    local t = all[k]
    if t.has_pk then
      for _, u in ipairs(t.unique) do
        local item = { table = k, schema = t.schema, table_name = t.name, name = u.name,
                       kind = u.is_constraint and "constraint" or "index",
                       definition = u.definition, referenced_by = {} }
        if u.is_constraint then
          item.drop_sql, item.create_sql = constraint_sql(t, u.name, u.definition)
        else
          item.drop_sql = "DROP INDEX " .. pg.qualify(t.schema, u.name)
          item.create_sql = u.definition
        end
        local ix = index_by_oid[u.index_oid]
        for _, ref in ipairs(ix and ix.referenced_by or {}) do
          local drop, create = constraint_sql(ref.table, ref.constraint.name, ref.constraint.definition)
          item.referenced_by[#item.referenced_by + 1] = { table = ref.table.key,
            name = ref.constraint.name, definition = ref.constraint.definition,
            drop_sql = drop, create_sql = create }
        end
        list[#list + 1] = item
      end
    end
  end
  return list
end

-- Rows for the report's table of tables.
function catalog.summary_rows(tables)
  local rows = {}
  for _, t in ipairs(tables) do
    local rate = t.write_rate and t.write_rate.total
    rows[#rows + 1] = { text.key(t), text.bytes(t.bytes or 0),
      tostring(math.floor(t.rows_estimate or 0)), t.has_pk and "yes" or "NO",
      t.separate_unique and "yes" or "", t.lob_max_kb and (t.lob_max_kb .. " KB") or "",
      rate and ("%.1f"):format(rate) or "" }
  end
  return rows
end

--[[ catalog.drop_present(db, held, say) -> { dropped names } | nil, err
     Drops (through db:write) those of catalog.separate_unique_indexes' items
     that exist on db, foreign keys that depend on them first. ]]
function catalog.drop_present(db, held, say)
  local dropped = {}
  for _, ix in ipairs(held) do
    local res, err
    if ix.kind == "constraint" then
      res, err = db:query("select 1 from pg_constraint where conname = $1 and conrelid = to_regclass($2)",
        ix.name, pg.qualify(ix.schema, ix.table_name))
    else
      res, err = db:query("select 1 from pg_class where oid = to_regclass($1)", pg.qualify(ix.schema, ix.name))
    end
    if not res then return nil, err end
    if #res > 0 then
      for _, ref in ipairs(ix.referenced_by or {}) do
        if say then say("dropping " .. tostring(ref.drop_sql)) end
        local ok, derr = db:write(ref.drop_sql)
        if not ok then return nil, derr end
      end
      if say then say("dropping " .. ix.drop_sql) end
      local ok, derr = db:write(ix.drop_sql)
      if not ok then return nil, derr end
      dropped[#dropped + 1] = ix.name
    end
  end
  return dropped
end

return catalog
