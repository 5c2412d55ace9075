--[[
migrun.schema: the schema and the roles of the source, copied to the target with
PostgreSQL's own client tools (issue step 2, and step 10's index restore).

Why two sections (as pgcopydb does). pg_dump splits a schema into pre-data
(types, functions, tables, sequences, views) and post-data (indexes,
constraints including primary keys, triggers, foreign keys, rules). The
pre-data part is restored before the full load so the tables exist; the
post-data part is restored AFTER it, with `pg_restore -j N --section=post-data`:
filling tables that carry no index and building each index once afterwards is
faster than maintaining the indexes row by row, and foreign keys cannot fail
on a half-loaded table. The runbook's "drop the separate unique indexes, load,
restore them" is the special case of this for a schema restored whole.

The dump is one custom-format archive in a directory the caller owns (the
state directory), so the post-data part survives until it is needed and a
re-run restores from the same file. Its table of contents is filtered
(pg_restore -l, then -L) so the pglogical extension never reaches the target:
RDS does not need it to receive DMS changes and would refuse its CREATE
EXTENSION. The tools are those of the TARGET server's major version (a newer
pg_dump reads an older source; the archive must suit the server it restores
into), else the newest between the source's and the target's (schema.tools,
docs/versions.md). Connection strings reach child processes without their password, which
travels in PGPASSWORD; every command is printed with proc.quote.

  local schema = require "migrun.schema"
  local tools = assert(schema.tools(target_conn:server_version()))
  local dump = assert(schema.dump(source_conninfo, state_dir, { tools = tools, schemas = {"public"} }))
  assert(schema.copy_roles(source_conninfo, target_db, { tools = tools, say = print }))
  assert(schema.restore("pre-data", target_conninfo, dump, { echo = print }))
  -- ... the full load ...
  assert(schema.restore("post-data", target_conninfo, dump, { jobs = 2, echo = print }))

  schema.tools(version [, opts]) -> { pg_dump=, pg_restore=, pg_dumpall=, psql=, bindir=, major=,
      env=, rule=, note= } | nil, err
      version: the TARGET's server_version_num (150020, 90624) or major ("15", 15, "9.6");
      opts.source: the source's (the same forms). Looks for the target's major
      in /usr/lib/postgresql/<major>/bin, the cache of tools/install-pg-versions
      (migrun.pgbin; env: what its programs need), then on PATH, where the
      tool's --version must be of that major (opts.bindirs, a list: only there).
      Without them, the newest major below the target's that is at least the
      source's (rule = "older than the target", note says so): PostgreSQL
      recommends the newer version's pg_dump, an older one refuses a newer
      server (docs/versions.md). rule = "the target's major" otherwise.
  schema.dump(source_conninfo, dir, opts) -> dump | nil, err
      opts.tools (required), opts.schemas (list; default every schema),
      opts.exclude_tables ({"s.t"}), opts.echo(line) for the commands.
      Writes dir/schema.dump (pg_dump -Fc --schema-only) and dir/schema.list
      (its filtered table of contents). dump = { file=, list=, toc = { entries=,
      kept=, excluded = {lines} }, notes = {lines}, tools= }.
      Reads only: runs in a dry run too.
  schema.restore(section, target_conninfo, dump, opts) -> { command=, seconds= } | true (dry run) | nil, err
      section "pre-data" | "post-data"; opts.jobs (pg_restore -j), opts.dry_run
      (print the command, run nothing), opts.echo(line), opts.no_owner (--no-owner).
  schema.copy_roles(source_conninfo, target_db, opts) -> report | nil, err
      pg_dumpall --globals-only --no-role-passwords from the source; creates on
      the target (through target_db:write, so a dry run prints) the roles it
      lacks, without SUPERUSER, REPLICATION or BYPASSRLS (RDS refuses them),
      with their settings, comments and memberships. When the target role is
      not a superuser (RDS), it is made a member of each role it creates, so
      that the restore can give objects to them (report.joined), and a role
      created without SUPERUSER gets CREATE on the database and on the
      schema public (opts.schemas: the migrated schemas, default all), which
      owning its objects requires. Tablespaces are not
      created (RDS manages its own). opts.tools (required), opts.say(line).
      report = { created = {names}, existing = {names}, stripped = { name = {attrs} },
                 skipped = {statements}, statements = {run or printed}, joined = {names} }
  schema.target_has_tables(target_db, tables) -> { present = {"s.t"}, nonempty = {"s.t"} } | nil, err
      tables: { {schema=, name=} | "s.t" }. Empty `present`: a fresh target;
      present but all empty: a load that can resume.
  schema.restore_pre_data(target_conninfo, dump, target_db, tables, opts)
      -> { how = "restored" | "already there", seconds = } | nil, err
      Step 2 made safe to run again: the pre-data section is restored in one
      transaction, so a killed attempt left either none of the source's tables
      on the target or all of them (the restore may have committed just
      after the kill). None: restore; all of them: nothing to do; some: an
      error that names them, nothing done. tables: the source's tables
      (catalog.tables). opts as schema.restore.
  schema.split_conninfo(conninfo) -> conninfo without password, password | nil
      (and without application_name when the process names its sessions,
      pg.identity: the tools get PGAPPNAME = "<identity>/<tool>" instead)
  schema.table_post_data(source_db, target_db, tables) -> { ["s.t"] = { item... } } | nil, err
      The indexes and the primary key, unique and exclusion constraints of
      each table as they are on the source (the paused replica), that the
      target lacks, each item = { table = "s.t", name =, kind = "index" |
      "primary key" | "unique" | "exclusion", sql = { statements } }: what the
      full load builds as soon as a table is complete (foreign keys wait for
      the post-data restore: they need the referenced table too). A key or
      unique constraint is built as CREATE UNIQUE INDEX IF NOT EXISTS, then
      ALTER TABLE ... ADD CONSTRAINT ... USING INDEX: the index build takes a
      SHARE lock, so the indexes of one table build side by side, and the
      ALTER is then a catalog change. Running an item again after a kill is
      safe (IF NOT EXISTS; the ALTER comes only once the index is there). A
      table missing on the target (a dry run, before the pre-data restore)
      lacks everything.

Every tool runs as a child that dies with migrun (a killed migrun leaves no
pg_dump or pg_restore running on behind its back).
]]
local pg = require "migrun.pg"
local proc = require "migrun.proc"
local errors = require "migrun.error"
local host = require "migrun.host"
local pgbin = require "migrun.pgbin"
local pgversion = require "migrun.pgversion"
local text = require "migrun.text"

local schema = {}

local TOOL_NAMES = { "pg_dump", "pg_restore", "pg_dumpall", "psql" }

local function fail(where, message, detail, hint, extra)
  local e = { kind = "schema", where = where, message = message, detail = detail, hint = hint }
  for k, v in pairs(extra or {}) do e[k] = v end
  return nil, errors.new(e)
end

local function is_executable(path)
  local ok = proc.run{ "test", "-x", path }
  return ok == true
end

local function last_lines(output, n)
  local lines = {}
  for line in (output or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  return table.concat(lines, "\n", math.max(1, #lines - (n or 10) + 1))
end

-- "15" from 150020 / "15" / 15 / "15.4"; "9.6" from 90624 / "9.6".
local function major_of(version)
  local n = tonumber(version)
  if n and n >= 10000 then
    if n >= 100000 then return ("%d"):format(n // 10000) end
    return ("%d.%d"):format(n // 10000, n // 100 % 100)
  end
  local s = tostring(version)
  local major = s:match("^(9%.%d+)") or s:match("^(%d+)")
  assert(major, "schema.tools: bad server version " .. s)
  return major
end

-- The major version a tool reports ("pg_dump (PostgreSQL) 15.20 (Debian ...)").
local function tool_major(path)
  local ok, _, _, out = proc.run{ path, "--version", timeout = 30 }
  if not ok then return nil end
  local v = out:match("%(PostgreSQL%)%s+(%S+)")
  return v and major_of(v)
end

local function on_path(name)
  for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    local p = dir .. "/" .. name
    if is_executable(p) then return p end
  end
end

-- The four tools in one of dirs (or, unless opts.bindirs, on PATH when their
-- --version is of major) -> found | nil, missing.
local function tools_of(major, dirs, env, use_path)
  local found = { major = major, env = env }
  for _, dir in ipairs(dirs) do
    if is_executable(dir .. "/pg_dump") then found.bindir = dir break end
  end
  local missing = {}
  for _, name in ipairs(TOOL_NAMES) do
    local path = found.bindir and found.bindir .. "/" .. name
    if not (path and is_executable(path)) then
      path = nil
      local p = use_path and on_path(name)
      if p and tool_major(p) == major then path = p end
    end
    if not path then missing[#missing + 1] = name end
    found[name] = path
  end
  if #missing > 0 then return nil, missing end
  return found
end

-- The rule PostgreSQL documents for moving to a newer major: dump with the
-- newer version's pg_dump (it reads any older server; an older pg_dump refuses
-- a newer server, and its output is not guaranteed to load into an older
-- one). So: the target's major; where that is not installed, the newest major
-- below the target that is at least the source's (its archive restores into
-- the newer target), said in found.note; never one older than the source.
function schema.tools(version, opts)
  opts = opts or {}
  local major = major_of(version)
  local source = opts.source and major_of(opts.source)
  if source and pgversion.major_num(source) > pgversion.major_num(major) then
    return fail("schema", ("the source's PostgreSQL %s is newer than the target's %s: no pg_dump serves both"):format(
      source, major), "a pg_dump refuses a server newer than itself, and its output is not guaranteed to load "
      .. "into an older major", "migrate into the same or a newer major", { major = major })
  end
  local inst = not opts.bindirs and pgbin.find(major)
  local dirs = opts.bindirs or { "/usr/lib/postgresql/" .. major .. "/bin" }
  if inst and inst.client_tools and inst.bindir ~= dirs[1] then dirs[#dirs + 1] = inst.bindir end
  local found, missing = tools_of(major, dirs, inst and inst.client_tools and inst.env or nil, not opts.bindirs)
  if found then
    found.rule = "the target's major"
    return found
  end
  if not opts.bindirs then
    local list = pgbin.list()
    for i = #list, 1, -1 do
      local m = tostring(list[i].major)
      local n = pgversion.major_num(m)
      if list[i].client_tools and n < pgversion.major_num(major) and (not source or n >= pgversion.major_num(source)) then
        local older = tools_of(m, { list[i].bindir }, list[i].env, false)
        if older then
          older.rule = "older than the target"
          older.note = ("no pg_dump of PostgreSQL %s (the target's major) here: the schema is dumped and "
            .. "restored with %s's, the newest at least as new as the source%s, whose archive a newer server "
            .. "restores; PostgreSQL recommends the newer version's pg_dump for an upgrade"):format(major, m,
            source and (" (" .. source .. ")") or "")
          return older
        end
      end
    end
  end
  return fail("schema", ("no %s of PostgreSQL %s (the target's major version)%s"):format(
    table.concat(missing, ", "), major, source and (", nor of a major between the source's " .. source
      .. " and it") or ""),
    ("looked in %s, %s and on PATH"):format(table.concat(dirs, ", "), pgbin.cache_dir()),
    ("install postgresql-client-%s"):format(major), { missing = missing, major = major })
end

---------------------------------------------------------------------------
-- Connections for child processes
---------------------------------------------------------------------------

local function conninfo_value(v)
  v = tostring(v)
  if v ~= "" and not v:find("[%s'\\]") then return v end
  return "'" .. v:gsub("[\\']", "\\%0") .. "'"
end

local FIRST_KEYS = { "host", "hostaddr", "port", "dbname", "user" }

function schema.split_conninfo(conninfo)
  local parts, err = pg.conninfo_parse(conninfo)
  if not parts then return nil, err end
  local password = parts.password
  parts.password = nil
  -- the run's identity (PGAPPNAME, below) goes over the user's name
  if pg.application_name() then parts.application_name = nil end
  local out, seen = {}, {}
  for _, k in ipairs(FIRST_KEYS) do
    if parts[k] then out[#out + 1] = k .. "=" .. conninfo_value(parts[k]) seen[k] = true end
  end
  local rest = {}
  for k in pairs(parts) do if not seen[k] then rest[#rest + 1] = k end end
  table.sort(rest)
  for _, k in ipairs(rest) do out[#out + 1] = k .. "=" .. conninfo_value(parts[k]) end
  return table.concat(out, " "), password
end

-- A child process spec: argv plus env carrying the password, if any, and
-- the name of its session (migrun.playbook.sessions: a rerun finds a killed
-- run's pg_restore by it).
local function child(argv, password, tools)
  local env = { table.unpack(proc.LIBPQ_ENV) } -- libpq's variables by name; the password only explicitly
  for k, v in pairs(tools and tools.env or {}) do env[k] = v end
  env.PGPASSWORD = password
  env.PGAPPNAME = pg.application_name(argv[1]:match("[^/]+$"))
  argv.env = env
  return argv
end

local function run_tool(spec, echo)
  if echo then echo(proc.quote(spec)) end
  local t0 = host.monotonic()
  spec.stdin = spec.stdin or false
  spec.stdout = spec.stdout or "capture"
  spec.stderr = "capture"
  spec.die_with_parent = true
  local ok, how, code, out, errout = proc.run(spec)
  if not ok then
    local name = spec[1]:match("[^/]+$")
    local reason = how == "exit" and ("exit " .. tostring(code)) or (tostring(how) .. " " .. tostring(code))
    return fail(name, ("%s failed (%s)"):format(name, reason), last_lines(errout, 10), nil,
      { command = proc.quote(spec), code = code })
  end
  return { output = out, stderr = errout, seconds = host.monotonic() - t0, command = proc.quote(spec) }
end

---------------------------------------------------------------------------
-- Dump and restore
---------------------------------------------------------------------------

-- Entries of the archive that must not reach the target: the pglogical
-- extension and its comment (its schema and objects are excluded by -N), and
-- the public schema, which every database already has (pg_dump --schema=public
-- emits a CREATE SCHEMA public that would stop the restore).
local function excluded_entry(line)
  local rest = line:match("^%s*%d+;%s+%d+%s+%d+%s+(.*)$")
  if not rest then return false end
  return rest:match("^EXTENSION %- pglogical%s") ~= nil or rest:match("^EXTENSION %- pglogical$") ~= nil
    or rest:match("^COMMENT %- EXTENSION pglogical%s") ~= nil
    or rest:match("^SCHEMA %- pglogical%s") ~= nil
    or rest:match("^SCHEMA %- public%s") ~= nil
end

function schema.dump(source_conninfo, dir, opts)
  assert(type(source_conninfo) == "string", "schema.dump: source conninfo (a string) expected")
  assert(type(dir) == "string", "schema.dump: a directory expected")
  opts = opts or {}
  local tools = assert(opts.tools, "schema.dump: opts.tools (from schema.tools) is required")
  local conninfo, password = schema.split_conninfo(source_conninfo)
  if not conninfo then return nil, password end
  local ok, err = host.mkdir(dir)
  if not ok then return fail("schema", "cannot create " .. dir, tostring(err)) end

  local file, list = dir .. "/schema.dump", dir .. "/schema.list"
  -- pg_dump creates its file with the umask's mode (0644); one that exists
  -- keeps its own: the schema is the team's, readable by its owner only
  ok, err = host.write_file(file, "", tonumber("600", 8))
  if not ok then return fail("schema", "cannot create " .. file, tostring(err)) end
  local argv = { tools.pg_dump, "--format=custom", "--schema-only", "--no-subscriptions",
    "--exclude-schema=pglogical", "--file=" .. file }
  for _, s in ipairs(opts.schemas or {}) do argv[#argv + 1] = "--schema=" .. pg.quote_ident(s) end
  for _, t in ipairs(opts.exclude_tables or {}) do
    local s, n = text.split_key(t)
    assert(type(t) == "string" and s, "schema.dump: exclude_tables entries are \"schema.table\", got " .. tostring(t))
    argv[#argv + 1] = "--exclude-table=" .. pg.qualify(s, n)
  end
  argv[#argv + 1] = "--dbname=" .. conninfo
  local r
  r, err = run_tool(child(argv, password, tools), opts.echo)
  if not r then return nil, err end

  -- The table of contents, filtered.
  r, err = run_tool(child({ tools.pg_restore, "--list", file }, nil, tools), opts.echo)
  if not r then return nil, err end
  local kept, excluded, entries = {}, {}, 0
  for line in r.output:gmatch("[^\n]*") do
    if line:match("^%s*%d+;") then
      entries = entries + 1
      if excluded_entry(line) then
        excluded[#excluded + 1] = line
        kept[#kept + 1] = ";" .. line
      else
        kept[#kept + 1] = line
      end
    elseif line ~= "" then
      kept[#kept + 1] = line
    end
  end
  ok, err = host.write_file(list, table.concat(kept, "\n") .. "\n", tonumber("600", 8))
  if not ok then return fail("schema", "cannot write " .. list, tostring(err)) end
  return {
    file = file, list = list, tools = tools,
    toc = { entries = entries, kept = entries - #excluded, excluded = excluded },
    notes = { "the pglogical extension and schema are left out of the target: RDS does not need "
      .. "pglogical to receive DMS changes (and would refuse CREATE EXTENSION pglogical); "
      .. #excluded .. " archive entr" .. (#excluded == 1 and "y" or "ies") .. " filtered out" },
  }
end

local SECTIONS = { ["pre-data"] = true, ["post-data"] = true }

function schema.restore(section, target_conninfo, dump, opts)
  assert(SECTIONS[section], "schema.restore: section must be \"pre-data\" or \"post-data\", got "
    .. tostring(section))
  assert(type(target_conninfo) == "string", "schema.restore: target conninfo (a string) expected")
  assert(type(dump) == "table" and dump.file and dump.list and dump.tools,
    "schema.restore: a dump from schema.dump expected")
  opts = opts or {}
  local conninfo, password = schema.split_conninfo(target_conninfo)
  if not conninfo then return nil, password end
  local argv = { dump.tools.pg_restore, "--section=" .. section, "--use-list=" .. dump.list,
    "--exit-on-error" }
  if section == "pre-data" then
    -- all or nothing: a run killed here restores again from a clean target
    argv[#argv + 1] = "--single-transaction"
  elseif opts.jobs and opts.jobs > 1 then
    argv[#argv + 1] = "--jobs=" .. math.tointeger(opts.jobs)
  end
  if opts.no_owner then argv[#argv + 1] = "--no-owner" end
  argv[#argv + 1] = "--dbname=" .. conninfo
  argv[#argv + 1] = dump.file
  local spec = child(argv, password, dump.tools)
  if opts.dry_run then
    if opts.echo then opts.echo("(dry run) " .. proc.quote(spec)) end
    return true
  end
  local r, err = run_tool(spec, opts.echo)
  if not r then return nil, err end
  return { command = r.command, seconds = r.seconds }
end

function schema.restore_pre_data(target_conninfo, dump, target_db, tables, opts)
  opts = opts or {}
  local there, err = schema.target_has_tables(target_db, tables)
  if not there then return nil, err end
  if #there.present == 0 or #tables == 0 then
    local r
    r, err = schema.restore("pre-data", target_conninfo, dump, opts)
    if not r then return nil, err end
    return { how = "restored", seconds = type(r) == "table" and r.seconds or 0 }
  end
  if #there.present == #tables then
    if opts.echo then
      opts.echo(("the pre-data section is on the target already (all %d tables: restored by an earlier attempt)")
        :format(#tables))
    end
    return { how = "already there", seconds = 0 }
  end
  local missing, present = {}, {}
  for _, k in ipairs(there.present) do present[k] = true end
  for _, t in ipairs(tables) do
    local key = type(t) == "string" and t or (t.schema .. "." .. t.name)
    if not present[key] then missing[#missing + 1] = key end
  end
  return fail("target", ("the target holds %d of the %d tables to migrate (missing: %s)"):format(#there.present,
    #tables, table.concat(missing, ", ", 1, math.min(#missing, 10)) .. (#missing > 10 and ", ..." or "")),
    nil, "the pre-data restore is all or nothing, so these were made by something else: drop them, or empty "
    .. "the target (restart.target = \"drop_schema\" and playbooks/full_restart.lua), then run again")
end

---------------------------------------------------------------------------
-- Roles
---------------------------------------------------------------------------

-- Reads one role name at the start of s: "quoted ""name""" or bare. -> name, rest
local function read_ident(s)
  if s:sub(1, 1) == '"' then
    local i, name = 2, {}
    while i <= #s do
      local c = s:sub(i, i)
      if c == '"' then
        if s:sub(i + 1, i + 1) == '"' then name[#name + 1] = '"' i = i + 2
        else return table.concat(name), s:sub(i + 1) end
      else name[#name + 1] = c i = i + 1 end
    end
    return nil
  end
  local name, rest = s:match("^([%w_$]+)(.*)$")
  return name, rest
end

-- Attributes RDS refuses to a non-rdsadmin role.
local REFUSED = { SUPERUSER = true, REPLICATION = true, BYPASSRLS = true }
-- Their negations are what a new role has anyway, and a role that is not a
-- superuser may not even name them (PostgreSQL 15: "must be superuser to
-- alter superuser roles or change superuser attribute"): left out.
local DEFAULTS = { NOSUPERUSER = true, NOREPLICATION = true, NOBYPASSRLS = true }

-- Parses pg_dumpall --globals-only output into roles and statements.
local function parse_globals(dumped)
  local roles, order, others = {}, {}, {}
  local function role(name)
    if not roles[name] then
      roles[name] = { name = name, statements = {}, stripped = {} }
      order[#order + 1] = name
    end
    return roles[name]
  end
  for line in dumped:gmatch("[^\n]+") do
    local create = line:match("^CREATE ROLE (.*);$")
    local alter = line:match("^ALTER ROLE (.*);$")
    local comment = line:match("^COMMENT ON ROLE (.*);$")
    if create then
      local name = read_ident(create)
      if name then role(name).create = line end
    elseif alter then
      local name, rest = read_ident(alter)
      if name then
        local r = role(name)
        local attrs = rest:match("^ WITH (.*)$")
        if attrs then
          local keep = {}
          for word in attrs:gmatch("%S+") do
            -- PASSWORD never comes (--no-role-passwords); a quoted value after
            -- VALID UNTIL is kept whole by rejoining below.
            if REFUSED[word] then r.stripped[#r.stripped + 1] = word
            elseif not DEFAULTS[word] then keep[#keep + 1] = word end
          end
          r.statements[#r.statements + 1] = ("ALTER ROLE %s WITH %s;"):format(pg.quote_ident(name),
            table.concat(keep, " "))
        else
          r.statements[#r.statements + 1] = line -- ALTER ROLE x SET ... / IN DATABASE ...
        end
      end
    elseif comment then
      local name = read_ident(comment)
      if name then local r = role(name) r.statements[#r.statements + 1] = line end
    elseif line:match("^GRANT ") then
      others[#others + 1] = { kind = "grant", sql = line }
    elseif line:match("^CREATE TABLESPACE ") or line:match("^ALTER TABLESPACE ")
        or line:match("^GRANT .* ON TABLESPACE ") then
      others[#others + 1] = { kind = "tablespace", sql = line }
    end
  end
  return roles, order, others
end

-- "GRANT a TO b [WITH ...] [GRANTED BY c];" -> a, b (names), without GRANTED BY
local function parse_grant(sql)
  local body = sql:match("^GRANT (.*);$")
  if not body then return nil end
  local granted, rest = read_ident(body)
  if not granted then return nil end
  rest = rest:match("^ TO (.*)$")
  if not rest then return nil end
  local member, tail = read_ident(rest)
  if not member then return nil end
  tail = tail:gsub("%s*GRANTED BY .*$", "")
  return granted, member, ("GRANT %s TO %s%s;"):format(pg.quote_ident(granted), pg.quote_ident(member), tail)
end

-- What copy_roles needs of the target: its roles (and which are
-- superusers), whether the role migrun uses is one, the database, who it is.
local function target_roles(target_db)
  local res, err = target_db:query("select rolname, rolsuper from pg_roles")
  if not res then return nil, err end
  local t = { exists = {}, super_there = {} }
  for row in res:rows() do t.exists[row.rolname] = true t.super_there[row.rolname] = row.rolsuper end
  -- A role that is not a superuser (the RDS master user) may give objects to
  -- a role only as a member of it: the restore's ALTER ... OWNER TO needs that.
  res, err = target_db:query("select rolsuper, current_database() as db, current_user as me from pg_roles "
    .. "where rolname = current_user")
  if not res then return nil, err end
  t.join_created = not (res[1] and res[1].rolsuper)
  t.database, t.me = res[1] and res[1].db, res[1] and res[1].me
  return t
end

-- Each role of the source the target lacks: CREATE ROLE, its ALTERs (what
-- RDS refuses stripped), membership of it for a role migrun uses that is not
-- a superuser.
local function create_roles(c)
  local report, say = c.report, c.say
  for _, name in ipairs(c.order) do
    local role = c.roles[name]
    if name:match("^pg_") or not role.create then
      -- built-in roles, and ALTERs of roles pg_dumpall did not create (the bootstrap superuser)
      if not name:match("^pg_") and c.exists[name] then report.existing[#report.existing + 1] = name end
    elseif c.exists[name] then
      report.existing[#report.existing + 1] = name
    else
      local ok, werr = c.write(("CREATE ROLE %s;"):format(pg.quote_ident(name)))
      if not ok then return nil, werr end
      for _, sql in ipairs(role.statements) do
        ok, werr = c.write(sql)
        if not ok then return nil, werr end
      end
      if c.join_created then
        ok, werr = c.write(("GRANT %s TO CURRENT_USER;"):format(pg.quote_ident(name)))
        if not ok then return nil, werr end
        report.joined[#report.joined + 1] = name
      end
      c.created[name] = true
      report.created[#report.created + 1] = name
      if #role.stripped > 0 then
        report.stripped[name] = role.stripped
        say(("role %s created without %s (not allowed on RDS)"):format(name, table.concat(role.stripped, ", ")))
      else
        say(("role %s created"):format(name))
      end
    end
  end
  if #report.existing > 0 then
    say("roles already on the target, left as they are: " .. table.concat(report.existing, ", "))
  end
  return true
end

-- A superuser of the source owned its objects without any grant; as an
-- ordinary role here (created now, or by an earlier run whose schema public
-- a restart has made again) it needs what ownership requires of it:
-- CREATE on the database (its schemas) and on the schema public.
local function grant_ownership_needs(c)
  if not c.join_created then return true end
  for _, name in ipairs(c.order) do
    local role = c.roles[name]
    local was_super = false
    for _, a in ipairs(role.stripped) do was_super = was_super or a == "SUPERUSER" end
    if was_super and role.create and name ~= c.me and not name:match("^pg_")
        and (c.created[name] or (c.exists[name] and not c.super_there[name])) then
      local ok, werr = c.write(("GRANT CREATE ON DATABASE %s TO %s;"):format(pg.quote_ident(c.database),
        pg.quote_ident(name)))
      if ok and c.public_migrated then
        ok, werr = c.write(("GRANT CREATE ON SCHEMA public TO %s;"):format(pg.quote_ident(name)))
      end
      if not ok then return nil, werr end
    end
  end
  return true
end

-- The memberships that involve a role created now; what is not copied
-- (memberships of built-in roles, tablespaces) reported as skipped.
local function copy_grants(c)
  for _, o in ipairs(c.others) do
    if o.kind == "grant" then
      local granted, member, sql = parse_grant(o.sql)
      if granted and (c.created[granted] or c.created[member]) and not granted:match("^pg_") then
        local ok, werr = c.write(sql)
        if not ok then return nil, werr end
      elseif granted and granted:match("^pg_") and c.created[member] then
        c.report.skipped[#c.report.skipped + 1] = o.sql
      end
    else
      c.report.skipped[#c.report.skipped + 1] = o.sql
      c.say("not copied (tablespaces are managed by RDS): " .. o.sql)
    end
  end
  return true
end

function schema.copy_roles(source_conninfo, target_db, opts)
  assert(type(source_conninfo) == "string", "schema.copy_roles: source conninfo (a string) expected")
  assert(type(target_db) == "table" and target_db.write, "schema.copy_roles: a migrun.db Db expected for the target")
  opts = opts or {}
  local tools = assert(opts.tools, "schema.copy_roles: opts.tools (from schema.tools) is required")
  local conninfo, password = schema.split_conninfo(source_conninfo)
  if not conninfo then return nil, password end
  local r, err = run_tool(child({ tools.pg_dumpall, "--globals-only", "--no-role-passwords",
    "--dbname=" .. conninfo }, password, tools), opts.echo)
  if not r then return nil, err end
  local c
  c, err = target_roles(target_db)
  if not c then return nil, err end
  c.roles, c.order, c.others = parse_globals(r.output)
  c.say = opts.say or function() end
  c.public_migrated = opts.schemas == nil
  for _, sname in ipairs(opts.schemas or {}) do
    if sname == "public" then c.public_migrated = true end
  end
  local report = { created = {}, existing = {}, stripped = {}, skipped = {}, statements = {}, joined = {} }
  c.report, c.created = report, {}
  function c.write(sql)
    report.statements[#report.statements + 1] = sql
    local ok, werr = target_db:write(sql)
    if not ok then return nil, werr end
    return true
  end
  for _, step in ipairs{ create_roles, grant_ownership_needs, copy_grants } do
    local ok, serr = step(c)
    if not ok then return nil, serr end
  end
  return report
end

---------------------------------------------------------------------------
-- The target before the load
---------------------------------------------------------------------------

function schema.target_has_tables(target_db, tables)
  assert(type(target_db) == "table" and target_db.query, "schema.target_has_tables: a migrun.db Db expected")
  assert(type(tables) == "table", "schema.target_has_tables: a list of tables expected")
  local out = { present = {}, nonempty = {} }
  for _, t in ipairs(tables) do
    local s, n = text.split_key(t)
    assert(s and n, "schema.target_has_tables: tables are {schema=, name=} or \"schema.table\"")
    local res, err = target_db:query(
      "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace "
      .. "where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')", s, n)
    if not res then return nil, err end
    if #res > 0 then
      local key = s .. "." .. n
      out.present[#out.present + 1] = key
      res, err = target_db:query(("select exists (select 1 from %s) as e"):format(pg.qualify(s, n)))
      if not res then return nil, err end
      if res[1].e then out.nonempty[#out.nonempty + 1] = key end
    end
  end
  return out
end

--[[ schema.restore_missing(target_conninfo, dump, source_db, target_db, tables, opts)
       -> { restored = n, how = "pg_restore" | "pg_restore (rest)", already = n } | nil, err
     Step 10 made safe to run again, and the end of a full load that built
     each table's indexes as soon as the table was complete. When none of the
     source's indexes and constraints exist on the target yet, the post-data
     section is restored whole with pg_restore (in parallel, opts.jobs). When
     some do (built during the load, or a run killed in the middle of the
     restore), the section is restored with the entries already on the
     target left out of its list (`already` counts them): foreign keys,
     triggers, rules, policies, statistics and comments still come from the
     archive, and pg_restore never stops at an "already exists". An entry is
     matched by the catalog oid the archive records, looked up on source_db
     (the dump's server or its physical replica: same oids), then by name
     on the target. "Begun" is judged by indexes and key, unique, foreign and
     exclusion constraints only: CHECK constraints come with the tables.
     opts as schema.restore. ]]

-- A text[] literal.
local function array_literal(list)
  local out = {}
  for i, v in ipairs(list) do out[i] = '"' .. tostring(v):gsub('[\\"]', "\\%0") .. '"' end
  return "{" .. table.concat(out, ",") .. "}"
end

-- The two queries of an object that belongs to a table (a constraint, a
-- trigger, ...): on the source by the archive's oids, on the target all, both
-- keyed "schema.table.name".
local function on_table(catalog, alias, table_column, name_column)
  local from = ([[%s %s join pg_class t on t.oid = %s.%s
                 join pg_namespace n on n.oid = t.relnamespace]]):format(catalog, alias, alias, table_column)
  local key = ("n.nspname || '.' || t.relname || '.' || %s.%s as k"):format(alias, name_column)
  return { source = ("select %s.oid::bigint as oid, %s from %s where %s.oid = any($1::oid[])"):format(alias, key, from, alias),
           target = ("select %s from %s"):format(key, from) }
end

-- What the archive's list entries of these catalogs name (on source_db), and
-- whether the target has it: { [oid] = present }.
local PRESENCE = {
  [1259] = { -- pg_class: indexes
    source = [[select c.oid::bigint as oid, n.nspname || '.' || c.relname as k from pg_class c
                 join pg_namespace n on n.oid = c.relnamespace where c.oid = any($1::oid[])]],
    target = [[select n.nspname || '.' || c.relname as k from pg_class c
                 join pg_namespace n on n.oid = c.relnamespace where c.relkind in ('i', 'I')]] },
  [2606] = on_table("pg_constraint", "con", "conrelid", "conname"), -- keys, unique, exclusion, foreign keys, checks
  [2620] = on_table("pg_trigger", "g", "tgrelid", "tgname"),
  [2618] = on_table("pg_rewrite", "r", "ev_class", "rulename"), -- rules
  [3256] = on_table("pg_policy", "p", "polrelid", "polname"),
  [3381] = { -- pg_statistic_ext
    source = [[select s.oid::bigint as oid, n.nspname || '.' || s.stxname as k from pg_statistic_ext s
                 join pg_namespace n on n.oid = s.stxnamespace where s.oid = any($1::oid[])]],
    target = [[select n.nspname || '.' || s.stxname as k from pg_statistic_ext s
                 join pg_namespace n on n.oid = s.stxnamespace]] },
}

-- The archive's list with the entries already on the target commented out.
-- -> list text, count left out | nil, err
local function list_without_present(dump, source_db, target_db)
  local f, ferr = io.open(dump.list, "rb")
  if not f then return fail("schema", "cannot read " .. dump.list, tostring(ferr)) end
  local lines = {}
  for line in f:lines() do lines[#lines + 1] = line end
  f:close()
  local wanted = {} -- catalog -> { oids }
  for _, line in ipairs(lines) do
    local cls, oid = line:match("^%s*%d+;%s+(%d+)%s+(%d+)%s")
    cls = tonumber(cls)
    if cls and PRESENCE[cls] then
      wanted[cls] = wanted[cls] or {}
      table.insert(wanted[cls], oid)
    end
  end
  local present = {} -- catalog -> { [oid] = true }
  for cls, oids in pairs(wanted) do
    local res, err = source_db:query(PRESENCE[cls].source, array_literal(oids))
    if not res then return nil, err end
    local name_of = {}
    for row in res:rows() do name_of[math.tointeger(row.oid)] = row.k end
    res, err = target_db:query(PRESENCE[cls].target)
    if not res then return nil, err end
    local have = {}
    for row in res:rows() do have[row.k] = true end
    present[cls] = {}
    for oid, k in pairs(name_of) do present[cls][oid] = have[k] or nil end
  end
  local out, left_out = {}, 0
  for _, line in ipairs(lines) do
    local cls, oid = line:match("^%s*%d+;%s+(%d+)%s+(%d+)%s")
    cls, oid = tonumber(cls), math.tointeger(tonumber(oid))
    if cls and present[cls] and present[cls][oid] then
      out[#out + 1] = ";" .. line
      left_out = left_out + 1
    else
      out[#out + 1] = line
    end
  end
  return table.concat(out, "\n") .. "\n", left_out
end

function schema.restore_missing(target_conninfo, dump, source_db, target_db, tables, opts)
  local catalog = require "migrun.catalog"
  opts = opts or {}
  local src, err = catalog.constraints_and_indexes(source_db, tables)
  if not src then return nil, err end
  local tgt
  tgt, err = catalog.constraints_and_indexes(target_db, tables)
  if not tgt then return nil, err end
  local missing = catalog.missing_on_target(src, tgt)
  -- CHECK constraints come with the tables (pre-data): only indexes and
  -- key/unique/foreign/exclusion constraints tell that post-data has begun.
  local function post_data(item)
    return item.kind == "index" or item.definition:match("^PRIMARY KEY") or item.definition:match("^UNIQUE")
      or item.definition:match("^FOREIGN KEY") or item.definition:match("^EXCLUDE")
  end
  local begun = false
  local missing_set = {}
  for _, m in ipairs(missing) do missing_set[m] = true end
  for _, item in ipairs(src) do
    if post_data(item) and not missing_set[item] then begun = true end
  end
  if not begun or opts.dry_run then
    local r
    r, err = schema.restore("post-data", target_conninfo, dump, opts)
    if not r then return nil, err end
    return { restored = #missing, how = "pg_restore", already = 0 }
  end
  local list, left_out = list_without_present(dump, source_db, target_db)
  if not list then return nil, left_out end
  local rest = dump.list:gsub("%.list$", "") .. ".rest.list"
  local ok, werr = host.write_file(rest, list, tonumber("600", 8))
  if not ok then return fail("schema", "cannot write " .. rest, tostring(werr)) end
  if opts.echo then
    opts.echo(("post-data: %d entr%s already on the target left out of the list (%s)"):format(left_out,
      left_out == 1 and "y" or "ies", rest))
  end
  local r
  r, err = schema.restore("post-data", target_conninfo, { file = dump.file, list = rest, tools = dump.tools }, opts)
  if not r then return nil, err end
  return { restored = #missing, how = "pg_restore (rest)", already = left_out }
end

---------------------------------------------------------------------------
-- Post-data per table (built during the full load)
---------------------------------------------------------------------------

local function if_not_exists(indexdef)
  for _, head in ipairs{ "CREATE UNIQUE INDEX ", "CREATE INDEX " } do
    if indexdef:sub(1, #head) == head then return head .. "IF NOT EXISTS " .. indexdef:sub(#head + 1) end
  end
  error("schema: not an index definition: " .. indexdef)
end

function schema.table_post_data(source_db, target_db, tables)
  assert(source_db and source_db.query and target_db and target_db.query,
    "schema.table_post_data: two migrun.db Dbs expected")
  assert(type(tables) == "table", "schema.table_post_data: a list of tables expected")
  local catalog = require "migrun.catalog"
  local schemas, names = {}, {}
  for _, t in ipairs(tables) do
    local s, n = text.split_key(t)
    assert(s and n, "schema.table_post_data: tables are {schema=, name=} or \"schema.table\"")
    schemas[#schemas + 1], names[#names + 1] = s, n
  end
  local out = {}
  if #names == 0 then return out end
  -- Definitions with search_path emptied: every name in them is qualified.
  local res, err = catalog._with_settings(source_db, { { "search_path", "" } }, function()
    return source_db:query([[
      select n.nspname as schema, c.relname as tbl, ic.relname as index_name,
             pg_get_indexdef(i.indexrelid) as indexdef, coalesce(con.conname, '') as conname,
             coalesce(con.contype::text, '') as contype, coalesce(pg_get_constraintdef(con.oid), '') as condef,
             coalesce(con.condeferrable, false) as deferrable, coalesce(con.condeferred, false) as deferred
        from pg_index i
        join pg_class c on c.oid = i.indrelid
        join pg_namespace n on n.oid = c.relnamespace
        join pg_class ic on ic.oid = i.indexrelid
        join unnest($1::text[], $2::text[]) as w(s, t) on w.s = n.nspname and w.t = c.relname
        left join pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid
                                   and con.contype in ('p', 'u', 'x')
       order by n.nspname, c.relname, (con.contype = 'p') is not true, ic.relname]],
      array_literal(schemas), array_literal(names))
  end)
  if not res then return nil, err end
  local have_index, have_con = {}, {}
  local tres
  tres, err = target_db:query([[
    select n.nspname || '.' || ic.relname as k from pg_index i
      join pg_class ic on ic.oid = i.indexrelid join pg_namespace n on n.oid = ic.relnamespace
      join pg_class c on c.oid = i.indrelid join pg_namespace cn on cn.oid = c.relnamespace
      join unnest($1::text[], $2::text[]) as w(s, t) on w.s = cn.nspname and w.t = c.relname]],
    array_literal(schemas), array_literal(names))
  if not tres then return nil, err end
  for row in tres:rows() do have_index[row.k] = true end
  tres, err = target_db:query([[
    select n.nspname || '.' || c.relname || '.' || con.conname as k from pg_constraint con
      join pg_class c on c.oid = con.conrelid join pg_namespace n on n.oid = c.relnamespace
      join unnest($1::text[], $2::text[]) as w(s, t) on w.s = n.nspname and w.t = c.relname]],
    array_literal(schemas), array_literal(names))
  if not tres then return nil, err end
  for row in tres:rows() do have_con[row.k] = true end

  local KIND = { p = "primary key", u = "unique", x = "exclusion" }
  for row in res:rows() do
    local k = row.schema .. "." .. row.tbl
    local qualified = pg.qualify(row.schema, row.tbl)
    local item
    if row.contype == "" then
      if not have_index[row.schema .. "." .. row.index_name] then
        item = { name = row.index_name, kind = "index", sql = { if_not_exists(row.indexdef) } }
      end
    elseif not have_con[k .. "." .. row.conname] then
      item = { name = row.conname, kind = KIND[row.contype] }
      if row.contype == "x" then
        item.sql = { ("ALTER TABLE %s ADD CONSTRAINT %s %s"):format(qualified, pg.quote_ident(row.conname), row.condef) }
      else
        local flags = row.deferrable and (" DEFERRABLE" .. (row.deferred and " INITIALLY DEFERRED" or "")) or ""
        item.sql = { if_not_exists(row.indexdef),
          ("ALTER TABLE %s ADD CONSTRAINT %s %s USING INDEX %s%s"):format(qualified, pg.quote_ident(row.conname),
            row.contype == "p" and "PRIMARY KEY" or "UNIQUE", pg.quote_ident(row.index_name), flags) }
      end
    end
    if item then
      item.table = k
      out[k] = out[k] or {}
      table.insert(out[k], item)
    end
  end
  return out
end

return schema
