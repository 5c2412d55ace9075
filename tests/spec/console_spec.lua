-- The slot-inspection console (migrun.repl.console, `migrun -i --config FILE`):
-- its tables in process, then piped REPL sessions of the migrun binary on a
-- rehearsal that full.lua has migrated (slots, tasks, a paused-then-resumed
-- replica), compared with tests/golden/console/*.txt once LSNs, ports, pids,
-- sizes and times are normalised. One more slot of migrun's, read by no task,
-- holds pending changes for peek(), with transactions between them that
-- touch none of its tables. The console cannot hurt: what would consume,
-- advance or drop a slot, and any write, is refused (and shown to run
-- otherwise, read-only session or not), unless a write session is opened.
local H = require "helpers.rehearsal"
local cli = require "helpers.cli"
local demo = require "migrun.rehearsal.demo"
local host = require "migrun.host"
local console = require "migrun.repl.console"

-- What varies from run to run, made constant; then runs of spaces and rules
-- shortened, so the goldens hold the tables' columns and cells, not widths
-- (alignment itself is checked on console.rows).
local function normalize(text, R)
  text = text:gsub("\r", "")
  text = cli.normalize(text)
  if R then
    for _, p in ipairs{ { R.config_path, "$CONFIG" }, { R.dir, "$DIR" } } do -- the longer first
      text = text:gsub(p[1]:gsub("%p", "%%%0"), p[2])
    end
  end
  text = text:gsub("[%w%._/%-]*/migrun%-[%w%-]+%.%w+", "$TMP") -- under $TMPDIR, whatever it is
  text = text:gsub("%d%d%d%d%-%d%d%-%d%d[ T]%d%d:%d%d:%d%d[%.%d]*[%+%-Z]?%d*", "TIME")
  text = text:gsub("%f[%w]%x+/%x+%f[%W]", "X/X")
  text = text:gsub("port=%d+", "port=P"):gsub("pid=%d+", "pid=N"):gsub("127%.0%.0%.1:%d+", "127.0.0.1:P")
  text = text:gsub("%d+%.?%d* [KMGT]?i?B%f[%W]", "SIZE")
  text = text:gsub("(version%s+)[^\n]+", "%1V"):gsub("%[(%a+) %d+%]", "[%1 N]")
  text = text:gsub("(running%s+)[%d-]+\n", "%1S\n") -- seconds behind: 0, or - before anything was applied
  text = text:gsub("(dms_slot_%d+%s+pglogical%s+)%a+", "%1A") -- active while a task polls its slot
  text = text:gsub("(%s)%d+%f[%s]", "%1N")
  text = text:gsub("%-%-+", "--"):gsub("  +", "  "):gsub(" +\n", "\n")
  return text
end

-- Lines of the table that follows the first line matching header_pattern.
local function table_after(out, header_pattern)
  local rows, inside = {}, false
  for line in out:gmatch("[^\n]*") do
    if inside then
      if line:match("^%(%d+ %a+%)$") or line == "" then break end
      if not line:match("^%-") then rows[#rows + 1] = line end
    elseif line:match(header_pattern) then
      inside = true
    end
  end
  return rows
end

describe("console.rows", function()
  it("prints records as an aligned table, nil as -, booleans as yes/no, with a count and notes", function()
    local t = console.rows({ { "name", "slot" }, { "bytes", align = "right" }, { "ok" }, { "at" } }, {
      { name = "dms_slot_01", bytes = 1048576, ok = true, at = require("migrun.lsn")("16/B374D848") },
      { name = "s2", bytes = 7, ok = false },
      { name = "tab\tand\nnewline", bytes = 2.5 },
    }, { noun = { "slot", "slots" }, notes = { "a note" } })
    assert.equal(3, #t)
    assert.equal("s2", t[2].name)
    cli.golden("console/rows", tostring(t) .. "\n")
    assert.equal("nothing", tostring(console.rows({ { "a" } }, {}, { empty = "nothing" })))
    -- the REPL prints it through migrun.repl.pretty, which honours __tostring
    assert.equal(tostring(t), require("migrun.repl.pretty").format(t))
  end)

  it("refuses a config that does not load, setting nothing", function()
    local env = {}
    local s, err = console.open("/nonexistent/migration.lua", { env = env, say = function() end })
    assert.is_nil(s)
    assert.matches("migration.lua", tostring(err))
    assert.is_nil(next(env))
  end)
end)

describe("the console on a migrated rehearsal", function()
  local R, extra_slot_lsn
  local PEEKED = "dms_slot_90"

  setup(function()
    R = H.rehearsal("console", { scale = 0.05, config = { dms = { start_pause = 0 } } })
    local r = H.run(R, "full.lua", { "--yes" })
    assert(r.ok, r.output)
    -- sets and table first, then the slot: it holds only the changes below
    assert(R.lab.source:psql([[
      create table public.peeked (id int primary key, v text);
      select pglogical.create_replication_set(']] .. PEEKED .. [[', false, true, true, false);
      select pglogical.create_replication_set('i]] .. PEEKED .. [[', true, false, false, true);
      select pglogical.replication_set_add_table(']] .. PEEKED .. [[', 'public.peeked');
      select pglogical.replication_set_add_table('i]] .. PEEKED .. [[', 'public.peeked');
      select pg_create_logical_replication_slot(']] .. PEEKED .. [[', 'pglogical');
      insert into public.peeked select g, 'row ' || g from generate_series(1, 20) g;]]))
    extra_slot_lsn = assert(R.lab.source:psql("select pg_current_wal_lsn()"))
    -- transactions in none of the slot's sets: empty for it
    assert(R.lab.source:psql([[create table public.unpeeked (id int);
      insert into public.unpeeked values (1); insert into public.unpeeked values (2);]]))
    assert(R.lab.source:psql([[update public.peeked set v = 'changed' where id = 1;
      delete from public.peeked where id = 2;]]))
  end)
  teardown(function() if R then R:close() end end)

  local function session(input, args, env)
    local e = {}
    for k, v in pairs(R.env) do e[k] = v end
    for k, v in pairs(env or {}) do e[k] = v end
    local out, _, code = cli.run(args or { "-i", "--config", R.config_path }, input, e, true)
    assert.falsy(out:find(R.lab.password, 1, true), "a password was printed:\n" .. out)
    assert.falsy(out:find(R.lab.dms.secret_key, 1, true), "the AWS secret was printed:\n" .. out)
    return out, code
  end

  it("lists its helpers with help()", function()
    local out, code = session("help()\n")
    assert.equal(0, code, out)
    local help = out:match("\n(helper .*)$")
    cli.golden("console/help", (help:gsub(R.dir:gsub("%p", "%%%0"), "$DIR")))
  end)

  it("shows slots, pending changes, lag, tasks and the replica as tables, and writes nothing", function()
    local out, code = session(table.concat({
      "slots()",
      ("peek(%q, 3)"):format(PEEKED),
      "lag()",
      "tasks()",
      "replica()",
      "source:write('create table public.never (id int)')",
      "source:query('create table public.never (id int)')",
      [[source:query("select g as n, 'row ' || g as label, null::text as nothing, repeat('x', 70) as long]]
        .. [[ from generate_series(1, 3) g")]],
      "r = source:query('select g from generate_series(1, 60) g')",
      "r",
      "#r, r[60].g, r:columns()[1], r.command",
      "source:query('select 1 where false')",
      "source.conn:exec('set statement_timeout = 0')",
      "config.source.conninfo",
      "#slots(), slots()[1].owned, lsn'0/10' < lsn'0/20'",
    }, "\n") .. "\n")
    assert.equal(0, code, out)
    cli.golden("console/session", normalize(out, R))

    -- every slot of the plan, the extra one too (migrun's by its prefix), and the
    -- live verification's watch slot, last by name
    local slot_rows = table_after(out, "^slot%s+plugin")
    assert.is_true(#slot_rows >= 3, out)
    assert.matches("^" .. PEEKED .. "%s+pglogical%s+no%s+%x+/%x+%s+%x+/%x+%s+[%d.]+ [KMG]?i?B%s+yes$",
      slot_rows[#slot_rows - 1])
    assert.matches("^dms_slot_watch%s+pglogical%s+no%s+", slot_rows[#slot_rows])
    -- lag(): every slot of the plan has its running task; seconds are a number or -
    local lag_rows = table_after(out, "^slot%s+bytes behind")
    assert.equal(#slot_rows, #lag_rows)
    for i = 1, #lag_rows - 2 do
      assert.matches("^dms_slot_%d+%s+%d+%s+[%d.]+ [KMG]?i?B%s+console%-dms%-slot%-%d+%-cdc%s+running%s+[%d-]+$",
        lag_rows[i])
    end
    assert.matches("^" .. PEEKED .. "%s+%d+%s+[%d.]+ [KMG]?i?B%s+console%-dms%-slot%-90%-cdc%s+no task%s+[%d-]+$",
      lag_rows[#lag_rows - 1])
    -- the watch slot: no task of its own, the verification's
    assert.matches("^dms_slot_watch%s+%d+%s+[%d.]+ [KMG]?i?B%s+%-%s+verification's", lag_rows[#lag_rows])
    assert.equal(#slot_rows - 2, #table_after(out, "^task%s+slot%s+status"))
    -- nothing was created on the source
    assert.equal("", assert(R.lab.source:psql("select to_regclass('public.never')")))
  end)

  it("peeks within its bound, decodes with both sets and never consumes the slot", function()
    local before = assert(R.lab.source:psql(("select confirmed_flush_lsn from pg_replication_slots where slot_name = '%s'")
      :format(PEEKED)))
    -- counts the actions of a peek's rows; the LSN bound holds for every row
    local out = session(table.concat({
      "function count(rows) local n = {} for _, r in ipairs(rows) do n[r.action] = (n[r.action] or 0) + 1 end "
        .. "return n end",
      ("p = peek(%q, 3)"):format(PEEKED),
      "#p, p[1].action, p[2].action, p[2].relation, p[2].data, p[22].action",
      ("#peek(%q)"):format(PEEKED),
      ("q = peek(%q, { upto = %q }) n = count(q)"):format(PEEKED, extra_slot_lsn),
      ("n.insert, n.update, n.delete, q[#q].lsn <= lsn%q"):format(extra_slot_lsn),
      ("u = peek(%q, 1000) n = count(u)"):format(PEEKED),
      "#u, n.insert, n.update, n.delete, n.begin, n.commit, u[1].lsn == p[1].lsn",
      "u.notes[1]",
      ("#peek(%q, lsn%q)"):format(PEEKED, extra_slot_lsn),
      "peek('dms_slot_01', { upto = 'not an lsn' })",
      "peek('no_such_slot')",
      ("peek(%q, 3, 4)"):format(PEEKED),
      ("peek(%q, true)"):format(PEEKED),
    }, "\n") .. "\n")
    -- a count of 3 shows the whole first transaction: begin, its 20 inserts, commit
    assert.truthy(out:find('\n22\t"begin"\t"insert"\t"public.peeked"\t"id=1 v=\\"row 1\\""\t"commit"\n',
      1, true), out)
    assert.truthy(out:find("\n22\n", 1, true), out)                  -- the default bound (10): the same transaction
    assert.truthy(out:find("\n20\tnil\tnil\ttrue\n", 1, true), out) -- up to an LSN: the first transaction only
    -- everything pending from the same start, in whole transactions; the
    -- ones that touch none of the slot's tables are not shown
    assert.truthy(out:find("\n28\t20\t1\t1\t3\t3\ttrue\n", 1, true), out)
    assert.matches('"3 transactions, 22 changes %(at least 1000 changes, whole transactions%); %d+ empty transactions hidden',
      out)
    assert.matches("upto: a count or an LSN", out)
    assert.matches("no replication slot no_such_slot on the source", out)
    assert.matches("peek takes a slot and one bound", out)
    assert.matches("peek%(slot %[, n | lsn | { upto = n | lsn }%]%)", out)
    assert.falsy(out:find("stack traceback", 1, true), out)
    local after = assert(R.lab.source:psql(("select confirmed_flush_lsn from pg_replication_slots where slot_name = '%s'")
      :format(PEEKED)))
    assert.equal(before, after)
  end)

  it("refuses what would consume, advance or drop a slot, and any write, on every connection", function()
    local function slot_state()
      return assert(R.lab.source:psql(("select slot_name || ' ' || restart_lsn || ' ' || confirmed_flush_lsn"
        .. " from pg_replication_slots where slot_name = '%s'"):format(PEEKED)))
    end
    local before = slot_state()
    local statements = {
      ([[source:query("select pg_drop_replication_slot('%s')")]]):format(PEEKED),
      ([[source.conn:exec("select pg_replication_slot_advance('%s', pg_current_wal_lsn())")]]):format(PEEKED),
      ([[source:query("select count(*) from pg_logical_slot_get_changes('%s', null, null)")]]):format(PEEKED),
      ([[source:query("select count(*) from pg_logical_slot_get_binary_changes('%s', null, null)")]]):format(PEEKED),
      ([[source:query("select pglogical.drop_replication_set('%s')")]]):format(PEEKED),
      ([[source:query("select query_to_xml('select pg_drop_replication_slot(''%s'')', true, true, '')")]]):format(PEEKED),
      [[source:query("select pg_create_logical_replication_slot('console_made', 'pglogical')")]],
      [[source:query('set default_transaction_read_only = off')]],
      [[source.conn:exec('begin read write')]],
      [[replica:query('select pg_wal_replay_pause()')]],
      [[target:query('drop table public.ref_01')]],
    }
    local out, code = session(table.concat(statements, "\n") .. "\n")
    assert.equal(0, code, out)
    local refusals = select(2, out:gsub("migrun: %[%a+%] refused: ", ""))
    assert.equal(#statements, refusals, out)
    assert.truthy(out:find([[refused: pg_drop_replication_slot drops a replication slot (on a dms_slot_* that silently]]
      .. [[ loses CDC data). The console is read-only; write_session("source") opens a write session on the source]],
      1, true), out)
    -- nothing changed
    assert.equal(before, slot_state())
    assert.equal(PEEKED, assert(R.lab.source:psql(("select set_name from pglogical.replication_set where set_name = '%s'")
      :format(PEEKED))))
    assert.equal("", assert(R.lab.source:psql("select slot_name from pg_replication_slots where slot_name = 'console_made'")))
    assert.equal("f", assert(R.lab.replica:psql("select pg_is_wal_replay_paused()")))
    assert.equal("ref_01", assert(R.lab.target:psql("select to_regclass('public.ref_01')")))
  end)

  it("knows why: a read-only session alone lets pg_drop_replication_slot run", function()
    assert(R.lab.source:psql("select pg_create_logical_replication_slot('ro_probe', 'test_decoding')"))
    local c = assert(require("migrun.pg").connect(R.lab.source.conninfo))
    assert(c:exec("set default_transaction_read_only = on"))
    local res, err = c:exec("select pg_drop_replication_slot('ro_probe')")
    c:close()
    assert(res, tostring(err))
    assert.equal("", assert(R.lab.source:psql("select slot_name from pg_replication_slots where slot_name = 'ro_probe'")))
  end)

  it("opens a write session only when asked and confirmed, saying what it allows; read_only() ends it", function()
    local out, code = session(table.concat({
      [[write_session("source")]], "no",
      [[source:query('create table public.ws_probe (id int)')]],
      [[write_session("source")]], "source",
      [[source:query('create table public.ws_probe (id int)')]],
      "source",
      "read_only()",
      [[source:query('drop table public.ws_probe')]],
      [[write_session("elsewhere")]],
    }, "\n") .. "\n")
    assert.equal(0, code, out)
    assert.truthy(out:find("pg_drop_replication_slot drops one", 1, true), out)
    assert.truthy(out:find("On dms_slot_* (each read by a DMS task) consuming, advancing or dropping loses CDC data", 1,
      true), out)
    assert.truthy(out:find("not opened: the source stays read-only", 1, true), out)
    assert.truthy(out:find("write session open on the source", 1, true), out)
    assert.truthy(out:find("\nCREATE TABLE\n", 1, true), out)
    assert.truthy(out:find("(WRITE SESSION)", 1, true), out)
    assert.truthy(out:find("read-only again: source", 1, true), out)
    assert.equal(1, select(2, out:gsub("refused: CREATE", "")), out)
    assert.equal(1, select(2, out:gsub("refused: DROP", "")), out)
    assert.truthy(out:find("write_session(name): a server expected", 1, true), out)
    assert.equal("ws_probe", assert(R.lab.source:psql("select to_regclass('public.ws_probe')")))
  end)

  it("leaves on exit and quit", function()
    for _, word in ipairs{ "exit", "quit", "exit()", "quit();" } do
      local out, code = session("slots()[1].name\n" .. word .. "\nprint('after')\n")
      assert.equal(0, code, out)
      assert.matches('\n"dms_slot_01"\n$', out)
    end
  end)

  it("opens with a message when a server cannot be reached, and never prints a password", function()
    local cfg = {}
    for k, v in pairs(R.config) do cfg[k] = v end
    cfg.state_dir = R.dir .. "/state"
    -- the source with its password in the conninfo, the target on a closed port
    cfg.source = { conninfo = R.lab.source.migrun_conninfo .. " password=" .. R.lab.password }
    cfg.target = { conninfo = "host=127.0.0.1 port=1 dbname=app user=migrun password=" .. R.lab.password }
    cfg.dms = nil
    local path = R.dir .. "/unreachable.lua"
    assert(host.write_file(path, "return " .. demo.literal(cfg) .. "\n", tonumber("600", 8)))
    local out, code = session("#slots() > 0\ntarget:query('select 1')\nlag()\ntasks()\nconfig.target.conninfo\n",
      { "--config", path, "-i" })
    assert.equal(0, code, out)
    out = out:gsub(path:gsub("%p", "%%%0"), "$UNREACHABLE")
    cli.golden("console/unreachable", normalize(out, R))
  end)

  it("opens the same from MIGRUN_CONFIG with -l migrun.repl.console, and with --config=FILE -e", function()
    local out, code = session("slots()[1].name\n", { "-l", "migrun.repl.console", "-i" },
      { MIGRUN_CONFIG = R.config_path })
    assert.equal(0, code, out)
    assert.matches('\n"dms_slot_01"\n$', out)
    out, code = session(nil, { "--config=" .. R.config_path, "-e", "print(#tasks() > 0, type(console.open))" })
    assert.equal(0, code, out)
    assert.matches("\ntrue\tfunction\n$", out)
    -- --config FILE wins over MIGRUN_CONFIG (opened once, the right file)
    out = session("", { "--config", R.config_path, "-i" }, { MIGRUN_CONFIG = "/nonexistent.lua" })
    assert.equal(1, select(2, out:gsub("migrun console:", "")), out)
  end)

  it("errors on --config without a file, and on a config that does not load", function()
    local out, code = session("", { "--config" })
    assert.equal(1, code)
    assert.matches("^migrun: '%-%-config' needs argument\nusage:", cli.normalize(out))
    out, code = session("", { "--config", R.dir .. "/missing.lua", "-i" })
    assert.equal(1, code)
    assert.matches("missing.lua", out)
    out, code = session("", { "--configure" })
    assert.equal(1, code)
    assert.matches("unrecognized option '%-%-configure'", out)
  end)
end)
