-- migration.example.lua: the configuration of one migration, annotated.
--
-- Copy it to migration.lua (the playbooks read ./migration.lua unless given
-- --config FILE), then edit. It is Lua: it runs with os.getenv, string, math
-- and table only, and returns one table. Every key is checked before anything
-- runs; a typo is reported with the key's path and the nearest known key.
-- Keys left out take the default shown here. `migrun -e 'print(require("migrun.playbook.config").describe())'`
-- prints them all.
--
-- Never write a password here: read it from the environment (os.getenv) or
-- let libpq find it in ~/.pgpass (PGPASSFILE). migrun never prints it.

local GiB = 2 ^ 30

return {
  -- Names this migration: DMS identifiers (endpoints, tasks) and the report
  -- title. Letters, digits and hyphens, starting with a letter.
  name = "app",

  -- Journal, report and log of the runs; relative to this file's directory.
  -- A run that stops (failure, Ctrl-C, a lost session) is resumed from here.
  state_dir = "migrun-state",

  -- The three servers, as libpq connection strings (keywords or URIs).
  -- The source primary: slots, the pglogical node and replication sets are created here.
  source = { conninfo = "host=10.0.0.5 port=5432 dbname=app user=migrun" },
  -- The maintenance streaming replica of the source: paused for the full load.
  replica = { conninfo = "host=10.0.0.6 port=5432 dbname=app user=migrun" },
  -- The target (RDS). Its password from the environment, for example:
  target = { conninfo = "host=app.cluster-xyz.us-east-1.rds.amazonaws.com port=5432 dbname=app " ..
                        "user=migrun sslmode=require password=" .. (os.getenv("TARGET_PASSWORD") or "") },

  -- Schemas to migrate. Left out: every non-system schema of the source.
  schemas = { "public" },
  -- Tables not migrated at all, as "schema.name".
  exclude_tables = { "public.audit_tmp" },

  -- Replication slots are <prefix>01, <prefix>02, ... (one per group), on
  -- the pglogical node <node>.
  slots = { prefix = "dms_slot_", node = "migrun_provider" },

  groups = {
    -- Each of the N largest tables in its own group (own slot, own DMS task).
    largest_alone = 5,
    -- The team's groups: these tables go together and override the computed grouping.
    explicit = {
      { name = "billing", tables = { "public.invoices", "public.payments" } },
    },
  },

  -- LOB policy (DMS limited LOB mode): the largest value DMS copies whole
  -- (KB), and whether larger values may be truncated. truncation_ok = false
  -- gives the table a table-settings rule in full LOB mode, so nothing of it
  -- is cut (slower, for that table only). Without a per-table entry the limit
  -- is raised to the largest value measured while getting to know the data.
  lobs = {
    default = { max_kb = 32, truncation_ok = true },
    tables = {
      ["public.events"] = { max_kb = 512, truncation_ok = false },
    },
  },

  -- Getting to know the data: write rates are sampled on the primary.
  know_data = { write_rate_seconds = 5 },

  -- The full load from the paused replica: parallel streams (they also
  -- compute the final QA's row hashes). Tables larger than split_bytes are
  -- cut into chunks of chunk_bytes (by ranges of an integer primary key, else
  -- of blocks) that load side by side and resume one by one after a kill;
  -- each table is indexed and analyzed as soon as it is complete. Leave the
  -- sizes out to take them from the data (chunks of the data / (4 x jobs),
  -- between 64 MiB and 1 GiB; split above twice that).
  full_load = {
    jobs = 2,
    -- chunk_bytes = 1024 * 1024 * 1024,
    -- split_bytes = 2 * 1024 * 1024 * 1024,
    analyze = true,
  },

  qa = {
    -- Per-month row counts use this column where a table has it ...
    timestamp_column = "created_at",
    -- ... or this one for the tables listed.
    timestamp_columns = { ["public.orders"] = "ordered_at" },
    -- Per-month counts for the N largest tables and a random sample of N
    -- others; exact counts for the rest.
    large_tables = 5,
    small_sample = 10,
    -- Read-only queries compared between both sides.
    queries = {
      { name = "paid orders", sql = "select count(*) from orders where paid" },
    },
  },

  -- Watches the WAL retained by migrun's slots on the source during the whole
  -- run (and free disk on the paused replica): warns, then stops the run
  -- before a disk fills. interval: seconds between checks.
  wal_guard = { warn_bytes = 50 * GiB, stop_bytes = 200 * GiB,
                replica_min_free_bytes = 20 * GiB, interval = 30 },

  preflight = {
    -- Replication slots not created by migrun that may exist on the source
    -- (any other one stops the run: it may be a forgotten consumer).
    allow_slots = { "other_tool_slot" },
    -- Free disk the source must have before slots start retaining WAL.
    min_free_bytes = 10 * GiB,
  },

  dms = {
    -- AWS region; left out: AWS_REGION or the profile's. Credentials come from
    -- the usual AWS chain (environment, profile, instance role), never from here.
    region = "us-east-1",
    -- The DMS API endpoint: only for rehearsals against the emulator
    -- (http://127.0.0.1:PORT). Left out: AWS.
    endpoint_url = nil,
    -- The replication instance the tasks run on.
    replication_instance_arn = "arn:aws:dms:us-east-1:123456789012:rep:EXAMPLE",
    -- Overrides of the endpoint definitions (as DMS names them), e.g. when DMS
    -- reaches the servers under other names than migrun does.
    source_endpoint = { server_name = "10.0.0.5", port = 5432 },
    target_endpoint = {},
    -- Task settings: batch apply (left out: DMS's default) and LobMaxSize
    -- (left out: from lobs).
    task = { batch_apply = false, lob_max_kb = nil },
    -- Seconds between task starts.
    start_pause = 5,
    -- Tries per DMS API call (throttling, 5xx, a dropped connection) before a
    -- step fails; each retry is logged. Default: AWS_MAX_ATTEMPTS, else 10.
    max_attempts = 10,
    -- Catch-up: a task has caught up when its slot lags less than lag_bytes;
    -- give up after timeout seconds; poll every poll seconds.
    catch_up = { lag_bytes = 1024 * 1024, timeout = 6 * 3600, poll = 5 },
  },

  -- The cutover (playbooks/cutover.lua), once full.lua says READY FOR CUTOVER.
  cutover = {
    -- How writes stop on the source before its final LSN is taken:
    --   "none"       the team has stopped the application itself (the default);
    --   "read_only"  ALTER DATABASE ... SET default_transaction_read_only = on
    --                (new sessions cannot write; asked before, shown in --dry-run);
    --   { "systemctl", "stop", "app-workers" }   a command of the team's, as argv.
    stop_writes = "read_only",
    -- read_only only applies to new sessions. Those opened before are waited
    -- for ("wait") or ended with pg_terminate_backend ("terminate"); sessions
    -- of the role migrun (and DMS) connect as are never touched.
    existing_sessions = "wait",
    sessions_timeout = 300,
    -- Give up waiting for the tasks to confirm the final LSN after this long.
    apply_timeout = 1800,
    -- Target sequences are set this many increments past the source's last
    -- value (DMS never migrates sequences).
    sequence_margin = 1000,
    -- Tables the final QA compares by row count only instead of row hashes:
    -- tables without a primary key, whose updates DMS cannot carry, when the
    -- team has accepted that.
    count_only = {},
    -- Give up waiting for the tasks to stop after this long.
    stop_timeout = 600,
  },
  -- Restarts (the runbook's "Managing Restarts"). playbooks/full_restart.lua
  -- empties the target before starting again: "truncate" empties the
  -- migrated tables and keeps their schema, indexes and roles (the new
  -- attempt skips the schema step); "drop_schema" drops the migrated schemas
  -- and restores them from a fresh dump (when the schema itself was wrong).
  restart = { target = "truncate" },
}
