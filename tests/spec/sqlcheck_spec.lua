-- migrun.repl.sqlcheck: what the console refuses before a statement reaches a
-- server, however the statement is written. (That the refused statements
-- would otherwise run, read-only session or not, is shown on a real server in
-- console_spec.)
local sqlcheck = require "migrun.repl.sqlcheck"

local function refused(sql)
  local r = sqlcheck.refusal(sql)
  return r and r.what
end

describe("migrun.repl.sqlcheck", function()
  it("refuses every function that consumes, advances, drops or creates a slot, however it is written", function()
    for sql, what in pairs{
      ["select pg_logical_slot_get_changes('dms_slot_01', null, null)"] = "pg_logical_slot_get_changes",
      ["SELECT * FROM PG_LOGICAL_SLOT_GET_BINARY_CHANGES('dms_slot_01', NULL, NULL)"] = "pg_logical_slot_get_binary_changes",
      ["select pg_catalog.pg_replication_slot_advance('dms_slot_01', pg_current_wal_lsn())"] = "pg_replication_slot_advance",
      ['select "pg_drop_replication_slot"(\'dms_slot_01\')'] = "pg_drop_replication_slot",
      ["select pg_drop_replication_slot /* a comment */ ('dms_slot_01')"] = "pg_drop_replication_slot",
      ["select pg_create_logical_replication_slot('x', 'pglogical')"] = "pg_create_logical_replication_slot",
      ["select pg_create_physical_replication_slot('x')"] = "pg_create_physical_replication_slot",
      ["select pg_copy_logical_replication_slot('a', 'b')"] = "pg_copy_logical_replication_slot",
      ["select pg_replication_origin_advance('o', '0/1')"] = "pg_replication_origin_advance",
      -- named inside a string or a body: executed all the same
      ["select query_to_xml('select pg_drop_replication_slot(''dms_slot_01'')', true, true, '')"] =
        "pg_drop_replication_slot",
      ["select query_to_xml($q$select pg_replication_slot_advance('s', '0/0')$q$, true, true, '')"] =
        "pg_replication_slot_advance",
      -- pglogical's setup
      ["select pglogical.drop_replication_set('dms_slot_01')"] = "pglogical.drop_replication_set",
      ["select pglogical.drop_node('migrun_provider')"] = "pglogical.drop_node",
      ["select pglogical.replication_set_remove_table('dms_slot_01', 'public.t')"] =
        "pglogical.replication_set_remove_table",
      ['select "pglogical"."alter_replication_set"(\'x\')'] = "pglogical.alter_replication_set",
      ["select drop_replication_set('dms_slot_01')"] = "drop_replication_set",
      -- the paused replica, other sessions, settings, writes through a select
      ["select pg_wal_replay_resume()"] = "pg_wal_replay_resume",
      ["select pg_wal_replay_pause()"] = "pg_wal_replay_pause",
      ["select pg_terminate_backend(123)"] = "pg_terminate_backend",
      ["select set_config('default_transaction_read_only', 'off', false)"] = "set_config",
      ["select setval('s', 1)"] = "setval",
      ["select lo_unlink(1)"] = "lo_unlink",
      ["select dblink_exec('dbname=app', 'drop table t')"] = "dblink_exec",
    } do
      assert.equal(what, refused(sql), sql)
    end
  end)

  it("refuses writes, DDL and what would make the session writable", function()
    for sql, what in pairs{
      ["create table t (id int)"] = "CREATE", ["drop table t"] = "DROP", ["insert into t values (1)"] = "INSERT",
      ["UPDATE t SET a = 1"] = "UPDATE", ["delete from t"] = "DELETE", ["truncate t"] = "TRUNCATE",
      ["copy t to '/tmp/x'"] = "COPY", ["do $$ begin perform 1; end $$"] = "DO", ["call p()"] = "CALL",
      ["vacuum t"] = "VACUUM", ["alter system set wal_level = minimal"] = "ALTER",
      ["with d as (delete from t returning *) select * from d"] = "DELETE",
      ["explain analyze update t set a = 1"] = "UPDATE",
      ["set default_transaction_read_only = off"] = "SET default_transaction_read_only",
      ["SET SESSION default_transaction_read_only TO off"] = "SET default_transaction_read_only",
      ["set transaction read write"] = "READ WRITE", ["begin read write"] = "READ WRITE",
      ["start transaction isolation level serializable, read write"] = "READ WRITE",
      ["set session characteristics as transaction read write"] = "READ WRITE",
      ["set session characteristics as transaction isolation level serializable"] = "SET SESSION CHARACTERISTICS",
      ["set role postgres"] = "SET role", ["reset role"] = "RESET role", ["reset all"] = "RESET all",
      ["reset default_transaction_read_only"] = "RESET default_transaction_read_only",
      ["set session authorization postgres"] = "SET SESSION AUTHORIZATION",
      ["discard all"] = "DISCARD",
      ["select 1; drop table t"] = "DROP",
    } do
      assert.equal(what, refused(sql), sql)
    end
  end)

  it("lets reads through, and is not fooled by names in comments, identifiers or strings that only look alike", function()
    for _, sql in ipairs{
      "select 1",
      "select * from pg_replication_slots",
      "select pg_logical_slot_peek_changes('dms_slot_01', null, 10)",
      "select * from pglogical.replication_set", "select * from pglogical.show_subscription_status()",
      "select slot_name, pg_current_wal_lsn() - restart_lsn from pg_replication_slots",
      "-- pg_drop_replication_slot would be refused\nselect 2",
      "/* nested /* drop */ comment */ select 3",
      "select 'insert into t values (1)' as text_only",
      "select * from t for update", "select * from t for no key update",
      "with x as (select 1) select * from x",
      "show default_transaction_read_only", "set statement_timeout = '5s'", "explain select 1",
      "begin; select 1; commit", "(select 1)", "values (1)", "table pg_settings",
      "select dropped_count from s",
      "select * from pg_logical_slot_peek_changes('s', null, 1, 'pglogical.replication_set_names', 'a,b')",
    } do
      assert.is_nil(sqlcheck.refusal(sql), sql)
    end
  end)

  it("reads SQL the way PostgreSQL does", function()
    local t = sqlcheck.tokens([[select "A ""q""", E'it\'s', 'x''y', $f$ body $f$ -- c
      /* a /* b */ c */ from t]])
    local texts = {}
    for i, tok in ipairs(t) do texts[i] = tok.kind .. ":" .. tok.text end
    assert.same({ "word:select", 'quoted:A "q"', "punct:,", "string:it's", "punct:,", "string:x'y", "punct:,",
      "string: body ", "word:from", "word:t" }, texts)
    assert.has_error(function() sqlcheck.refusal(nil) end, "sqlcheck.refusal: SQL text expected")
  end)
end)
