--[[
migrun.repl.sqlcheck: what the console lets a statement do before it reaches a
server. The console's sessions run read-only (default_transaction_read_only),
but a read-only transaction does not stop the functions that matter most here:
pg_drop_replication_slot, pg_replication_slot_advance and
pg_logical_slot_get_changes run in one (the slot is not a table), and on a
dms_slot_* each silently loses CDC data; pglogical's functions write its
catalogs from C. So every statement typed at the console is read first, the
way PostgreSQL's lexer reads it (comments, quoted identifiers, string and
dollar-quoted literals), and refused when it
  - calls a function that consumes, advances, copies, creates or drops a
    replication slot or origin, changes pglogical's setup, pauses, resumes or
    promotes a server, ends a backend, or writes (setval, large objects,
    dblink, set_config, ...) -- named anywhere: schema-qualified, quoted, or
    inside a string or a DO body (query_to_xml('select pg_drop_...') too);
  - is not a read (INSERT, UPDATE, DELETE, DDL, COPY, DO, CALL, VACUUM, ...);
  - would turn the session's read-only mode or role off (SET/RESET of
    default_transaction_read_only, transaction_read_only, role, session
    authorization, SET SESSION CHARACTERISTICS, BEGIN/START ... READ WRITE,
    RESET ALL, DISCARD ALL).
The server still refuses any write that got past this (read-only sessions).
Deliberate work goes through the console's write_session(), which asks first.

  local sqlcheck = require "migrun.repl.sqlcheck"
  local why = sqlcheck.refusal("select pg_drop_replication_slot('dms_slot_01')")
  -- why = { what = "pg_drop_replication_slot", reason = "drops a replication slot ..." } | nil

  sqlcheck.refusal(sql) -> nil (a read) | { what, reason }
  sqlcheck.tokens(sql) -> { { kind = "word"|"quoted"|"string"|"punct", text }, ... }, for tests
]]
local sqlcheck = {}

local SLOT_LOSS = "on a dms_slot_* that silently loses CDC data"

-- Functions refused wherever they are named, with what they do.
local FUNCTIONS = {
  pg_logical_slot_get_changes = "consumes a replication slot's changes (" .. SLOT_LOSS .. ")",
  pg_logical_slot_get_binary_changes = "consumes a replication slot's changes (" .. SLOT_LOSS .. ")",
  pg_replication_slot_advance = "advances a replication slot (" .. SLOT_LOSS .. ")",
  pg_drop_replication_slot = "drops a replication slot (" .. SLOT_LOSS .. ")",
  pg_create_logical_replication_slot = "creates a replication slot, which holds WAL back on the primary",
  pg_create_physical_replication_slot = "creates a replication slot, which holds WAL back on the primary",
  pg_copy_logical_replication_slot = "creates a replication slot, which holds WAL back on the primary",
  pg_copy_physical_replication_slot = "creates a replication slot, which holds WAL back on the primary",
  pg_replication_origin_create = "changes replication origins",
  pg_replication_origin_drop = "changes replication origins",
  pg_replication_origin_advance = "changes replication origins",
  pg_replication_origin_session_setup = "changes replication origins",
  pg_replication_origin_xact_setup = "changes replication origins",
  pg_logical_emit_message = "writes to the WAL that the slots decode",
  pg_wal_replay_pause = "pauses or resumes the replica (the full load's snapshot depends on it)",
  pg_wal_replay_resume = "pauses or resumes the replica (the full load's snapshot depends on it)",
  pg_xlog_replay_pause = "pauses or resumes the replica (the full load's snapshot depends on it)",
  pg_xlog_replay_resume = "pauses or resumes the replica (the full load's snapshot depends on it)",
  pg_promote = "promotes a standby",
  pg_terminate_backend = "ends a backend (a DMS task's walsender, a load stream)",
  pg_cancel_backend = "cancels a backend's query (a DMS task's, a load stream's)",
  pg_reload_conf = "reloads the server's configuration",
  pg_rotate_logfile = "rotates the server's log",
  pg_switch_wal = "switches WAL files", pg_switch_xlog = "switches WAL files",
  pg_create_restore_point = "writes a restore point",
  pg_start_backup = "starts or stops a backup", pg_stop_backup = "starts or stops a backup",
  pg_backup_start = "starts or stops a backup", pg_backup_stop = "starts or stops a backup",
  pg_stat_reset = "resets statistics", pg_stat_reset_shared = "resets statistics",
  pg_stat_reset_single_table_counters = "resets statistics", pg_stat_reset_single_function_counters = "resets statistics",
  pg_stat_reset_replication_slot = "resets statistics", pg_stat_reset_slru = "resets statistics",
  pg_file_write = "writes a file on the server", pg_file_unlink = "removes a file on the server",
  pg_file_rename = "renames a file on the server",
  set_config = "changes session settings (the console's read-only mode among them)",
  setval = "writes a sequence", nextval = "writes a sequence",
  lo_unlink = "writes large objects", lo_import = "writes large objects", lo_export = "writes a file on the server",
  lo_create = "writes large objects", lo_creat = "writes large objects", lo_from_bytea = "writes large objects",
  lo_put = "writes large objects", lo_truncate = "writes large objects", lo_truncate64 = "writes large objects",
  dblink = "runs statements through another connection", dblink_exec = "runs statements through another connection",
  dblink_connect = "runs statements through another connection",
  dblink_connect_u = "runs statements through another connection",
  dblink_send_query = "runs statements through another connection",
}

-- pglogical: its catalog tables and these read-only functions may be named;
-- anything else under pglogical. changes the node, sets or subscriptions.
local PGLOGICAL_READS = {
  node = true, node_interface = true, local_node = true, replication_set = true, replication_set_table = true,
  replication_set_seq = true, subscription = true, queue = true, depend = true, sequence_state = true,
  local_sync_status = true, tables = true,
  show_subscription_status = true, show_subscription_table = true, show_repset_table_info = true,
  pglogical_version = true, pglogical_version_num = true, pglogical_max_proto_version = true,
  pglogical_min_proto_version = true, pglogical_node_info = true, pglogical_gen_slot_name = true,
  table_data_filtered = true,
}
-- pglogical's writing functions, refused even without the schema (a search_path may hold it)
local PGLOGICAL_WRITES = { "^create_", "^drop_", "^alter_", "^replication_set_add", "^replication_set_remove",
  "^replicate_ddl_command$", "^synchronize_sequence$", "^wait_for_", "^xact_commit_timestamp_origin$" }

-- Statements that only read (their first word). Anything else writes.
local READS = { select = true, with = true, values = true, table = true, show = true, explain = true,
  begin = true, start = true, commit = true, ["end"] = true, rollback = true, abort = true,
  savepoint = true, release = true, set = true, reset = true, fetch = true, declare = true,
  close = true, move = true }

-- Settings a SET or RESET may not touch: they turn read-only off or change who we are.
local GUARDED_SETTINGS = { default_transaction_read_only = true, transaction_read_only = true, role = true,
  session_authorization = true, all = true, session = true, transaction = true }

---------------------------------------------------------------------------
-- Reading SQL
---------------------------------------------------------------------------

-- The body of a quoted token from j (just after the opening quote) -> text,
-- the position after the closing quote. A doubled quote stands for one;
-- with escapes (E'...'), a backslash takes the next character as it is.
local function quoted(sql, j, quote, escapes)
  local buf, n = {}, #sql
  while j <= n do
    local d = sql:sub(j, j)
    if escapes and d == "\\" then
      buf[#buf + 1] = sql:sub(j + 1, j + 1)
      j = j + 2
    elseif d == quote then
      if sql:sub(j + 1, j + 1) ~= quote then return table.concat(buf), j + 1 end
      buf[#buf + 1] = quote
      j = j + 2
    else
      buf[#buf + 1] = d
      j = j + 1
    end
  end
  return table.concat(buf), j
end

function sqlcheck.tokens(sql)
  assert(type(sql) == "string", "sqlcheck.tokens: a string expected")
  local out, i, n = {}, 1, #sql
  local function add(kind, text) out[#out + 1] = { kind = kind, text = text } end
  while i <= n do
    local c = sql:sub(i, i)
    local two = sql:sub(i, i + 1)
    if c:match("%s") then
      i = i + 1
    elseif two == "--" then
      local e = sql:find("\n", i, true)
      i = e and e + 1 or n + 1
    elseif two == "/*" then
      -- comments nest in PostgreSQL
      local depth, j = 1, i + 2
      while j <= n and depth > 0 do
        local t = sql:sub(j, j + 1)
        if t == "/*" then depth, j = depth + 1, j + 2
        elseif t == "*/" then depth, j = depth - 1, j + 2
        else j = j + 1 end
      end
      i = j
    elseif c == "'" or ((c == "e" or c == "E") and sql:sub(i + 1, i + 1) == "'") then
      local escapes = c ~= "'"
      local body
      body, i = quoted(sql, escapes and i + 2 or i + 1, "'", escapes)
      add("string", body)
    elseif c == "$" and sql:match("^%$[%a_]*[%w_]*%$", i) then
      local tag = sql:match("^%$[%a_]*[%w_]*%$", i)
      local e = sql:find(tag, i + #tag, true)
      add("string", sql:sub(i + #tag, (e or n + 1) - 1))
      i = e and e + #tag or n + 1
    elseif c == '"' then
      local body
      body, i = quoted(sql, i + 1, '"', false)
      add("quoted", body)
    elseif c:match("[%a_\128-\255]") then
      local w = sql:match("^[%w_$\128-\255]+", i)
      add("word", w:lower())
      i = i + #w
    elseif c:match("%d") then
      local w = sql:match("^[%w_.]+", i)
      add("number", w)
      i = i + #w
    else
      add("punct", c)
      i = i + 1
    end
  end
  return out
end

---------------------------------------------------------------------------
-- Deciding
---------------------------------------------------------------------------

local function pglogical_write(name)
  name = name:lower()
  if PGLOGICAL_READS[name] then return false end
  return true
end

-- Words inside a literal (a DO body, a query_to_xml string) that name a refused function.
local function named_in(text)
  for word in text:lower():gmatch("[%a_][%w_]*") do
    if FUNCTIONS[word] then return word, FUNCTIONS[word] end
  end
  -- a call (not an option such as 'pglogical.replication_set_names')
  for q in text:lower():gmatch("pglogical%s*%.%s*\"?([%a_][%w_]*)\"?%s*%(") do
    if pglogical_write(q) then return "pglogical." .. q, "changes pglogical's node, sets or subscriptions" end
  end
end

local function refuse(what, reason) return { what = what, reason = reason } end

-- One statement's tokens -> refusal | nil
local function statement(toks)
  if #toks == 0 then return nil end
  for k, t in ipairs(toks) do
    if t.kind == "word" or t.kind == "quoted" then
      local name = t.text:lower()
      if FUNCTIONS[name] then return refuse(name, FUNCTIONS[name]) end
      if name == "pglogical" and toks[k + 1] and toks[k + 1].text == "." and toks[k + 2]
          and toks[k + 3] and toks[k + 3].text == "(" then
        local f = toks[k + 2].text:lower()
        if pglogical_write(f) then
          return refuse("pglogical." .. f, "changes pglogical's node, sets or subscriptions")
        end
      end
      for _, p in ipairs(PGLOGICAL_WRITES) do
        if t.kind == "word" and name:match(p) and toks[k + 1] and toks[k + 1].text == "(" then
          return refuse(name, "looks like pglogical's " .. name .. ", which changes its node, sets or subscriptions")
        end
      end
    elseif t.kind == "string" then
      local what, reason = named_in(t.text)
      if what then return refuse(what, reason .. " (named inside a string or a function body)") end
    end
  end
  local first = toks[1].kind == "word" and toks[1].text or ""
  if toks[1].text == "(" then first = "select" end
  if not READS[first] then
    return refuse(first:upper(), "is not a read (writes and DDL run only in a write session)")
  end
  -- turning read-only off, or becoming someone else
  for k = 1, #toks - 1 do
    if toks[k].text == "read" and toks[k + 1].text == "write" then
      return refuse("READ WRITE", "would make the session writable")
    end
  end
  if first == "set" or first == "reset" then
    local k = 2
    if toks[k] and (toks[k].text == "local" or toks[k].text == "session") and first == "set" then
      if toks[k].text == "session" and toks[k + 1] and (toks[k + 1].text == "authorization"
          or toks[k + 1].text == "characteristics") then
        return refuse("SET SESSION " .. toks[k + 1].text:upper(), "would change who the session is or make it writable")
      end
      k = k + 1
    end
    local name = toks[k] and toks[k].text:lower() or "all"
    if GUARDED_SETTINGS[name] then
      return refuse(first:upper() .. " " .. name, "would make the session writable or change its role")
    end
  end
  -- data-modifying parts of a WITH or an EXPLAIN
  for k = 1, #toks - 1 do
    local a, b = toks[k], toks[k + 1]
    if a.kind == "word" and ((a.text == "insert" and b.text == "into") or (a.text == "delete" and b.text == "from")
        or a.text == "merge" and b.text == "into") then
      return refuse(a.text:upper(), "writes (in a WITH or EXPLAIN ANALYZE)")
    end
    if a.kind == "word" and a.text == "update" then
      -- UPDATE t SET ..., not SELECT ... FOR [NO KEY] UPDATE
      for m = k + 1, math.min(k + 6, #toks) do
        if toks[m].kind == "word" and toks[m].text == "set" then
          return refuse("UPDATE", "writes (in a WITH or EXPLAIN ANALYZE)")
        end
      end
    end
  end
  return nil
end

function sqlcheck.refusal(sql)
  assert(type(sql) == "string", "sqlcheck.refusal: SQL text expected")
  local toks = sqlcheck.tokens(sql)
  local cur = {}
  for _, t in ipairs(toks) do
    if t.kind == "punct" and t.text == ";" then
      local r = statement(cur)
      if r then return r end
      cur = {}
    else
      cur[#cur + 1] = t
    end
  end
  return statement(cur)
end

return sqlcheck
