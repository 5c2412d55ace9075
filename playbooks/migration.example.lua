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
  -- gives the table a table-settings rule in full LOB mode (for a PostgreSQL
  -- source: mode "unlimited", bulk-max-size 0), so nothing of it is cut; it
  -- is slower, and DMS batch-applies LOBs only in limited LOB mode, so that
  -- table's whole group runs with batch apply off (the printed plan says so;
  -- give the table an explicit group of its own to keep batch apply for the
  -- others). Without a per-table entry the limit is raised above the largest
  -- value measured while getting to know the data, with a margin: DMS sizes
  -- LobMaxSize by the largest LOB, and a value that grows during CDC past a
  -- limit set to exactly that would be cut. The rule: max(2 x largest,
  -- largest + 1 MiB), in whole KB (largest 200,012 bytes -> 1220 KB; 20 MB ->
  -- 40 MB), at most DMS's 102400 KB. Twice covers a value that doubles and
  -- text, which DMS holds as NCLOB at two bytes a character; 1 MiB covers
  -- small values that grow a lot. A team that knows its data better sets
  -- max_kb per table (taken as is). Whatever the limit, migrun checks after
  -- the catch-up and again before the cutover that nothing was truncated (the
  -- tasks' logs and the LOB lengths, source against target) and stops,
  -- naming table, column and key, if anything was.
  lobs = {
    default = { max_kb = 32, truncation_ok = true },
    tables = {
      ["public.events"] = { max_kb = 512, truncation_ok = false },
    },
  },

  -- Getting to know the data: write rates are sampled on the primary.
  know_data = { write_rate_seconds = 5 },

  -- The full load from the paused replica: parallel streams (they also
  -- compute the verification's row hashes). Tables larger than split_bytes are
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
    -- Each chunk and table hashed on the replica and the target as soon as it
    -- commits: the QA step after the load then reads none of them again.
    hash = true,
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

  -- The guard: a process of its own that checks through every step (index
  -- builds, QA, DMS setup, catch-up, restarts, cutover) every `interval`
  -- seconds, warns, then stops the run (the step is left resumable) before a
  -- disk fills. It counts the WAL migrun's slots hold back as a DBA does:
  -- the current LSN minus their oldest restart_lsn (shared WAL counted once).
  wal_guard = {
    warn_bytes = 50 * GiB, stop_bytes = 200 * GiB,
    -- The same as free space left on the primary's WAL disk, in percent
    -- (when its free space can be measured: on this machine, or by
    -- source_free_command). Left out: not used.
    warn_free_percent = 20, stop_free_percent = 10,
    -- Warn when, at the rate of the last rate_window seconds, the stop or a
    -- full disk is less than warn_ahead seconds away ("at this rate the
    -- primary's disk is full in about 3 h 10 min").
    warn_ahead = 3600, rate_window = 600,
    -- The paused replica keeps every WAL segment it receives: stop when its
    -- disk has less free space than this (bytes, or percent).
    replica_min_free_bytes = 20 * GiB, replica_min_free_percent = nil,
    -- A server on another machine: migrun cannot see its disk. Give a command
    -- of your own (argv list, no shell) that prints its free bytes, then
    -- optionally the disk's size, e.g. df's last line:
    source_free_command = { "ssh", "db-primary", "df", "-B1", "--output=avail,size", "/var/lib/postgresql" },
    replica_free_command = { "ssh", "db-replica", "df", "-B1", "--output=avail,size", "/var/lib/postgresql" },
    -- ... or say you accept that the replica's disk is not watched (preflight
    -- stops otherwise: never silently unwatched).
    replica_disk_unwatched = false,
    interval = 30,
  },

  -- DDL on the source during the migration: DMS does not carry it through
  -- pglogical. The guard compares the migrated schemas (tables, columns,
  -- types, constraints) with what know_data saw: "stop" (the default) or "warn".
  schema_drift = { on_change = "stop" },

  preflight = {
    -- Replication slots not created by migrun that may exist on the source
    -- (any other one stops the run: it may be a forgotten consumer).
    allow_slots = { "other_tool_slot" },
    -- Free disk the source must have before slots start retaining WAL.
    min_free_bytes = 10 * GiB,
    -- When the source limits what slots may keep (max_slot_wal_keep_size),
    -- preflight measures its WAL rate over this many seconds and sizes what
    -- the slots will hold by the load's expected speed (bytes per second):
    -- too little is refused before the slots exist (docs/mistakes.md).
    wal_rate_seconds = 5,
    load_rate = 32 * 1024 * 1024,
    -- Each qa.queries entry is run once, read-only, on the replica: at most
    -- this many seconds (longer: judged by its plan).
    query_timeout = 10,
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
    -- reaches the servers under other names than migrun does. The DMS
    -- boundary's settings (docs/dms-boundary.md) are added unless given here:
    -- after_connect_script (target: "SET session_replication_role = replica"
    -- when the tables have triggers, foreign keys or rules),
    -- map_unbounded_numeric (both: numeric without precision), capture_ddls
    -- (source: false).
    source_endpoint = { server_name = "10.0.0.5", port = 5432 },
    target_endpoint = {},
    -- CloudWatch Logs endpoint, where migrun reads the tasks' logs for LOB
    -- truncation warnings (needs logs:FilterLogEvents). Left out:
    -- endpoint_url when given (the emulator serves both), else AWS.
    logs_endpoint_url = nil,
    -- Task settings: batch apply (left out: on, except for the groups DMS
    -- cannot batch-apply: a table with a primary key and a separate unique
    -- constraint, or one in full LOB mode; true on such a group is refused)
    -- and LobMaxSize (left out: from lobs).
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
    -- Tables the verification compares by row count only instead of row hashes:
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

  -- Notifications: a migration runs for days and nobody watches the terminal.
  -- Each event goes to a command and/or a webhook as JSON: { event, migration,
  -- playbook, step, message, time, host, details }, secrets masked. Events:
  -- step_failed, run_failed, wal_guard_warn, wal_guard_stop (once when reached),
  -- task_failed, ready_for_cutover, cutover_done. A channel that fails or
  -- takes longer than timeout seconds is a warning in the log, never a reason
  -- to stop the migration.
  notify = {
    -- An argv list, run without a shell; the JSON comes on its stdin and
    -- MIGRUN_EVENT names the event. Left out: no command.
    command = { "/usr/local/bin/post-to-chat", "--channel", "#db-migration" },
    -- POSTed the JSON (Content-Type: application/json). The URL is never
    -- logged (a chat webhook's URL is its secret): keep it in the environment.
    webhook = os.getenv("MIGRATION_WEBHOOK_URL"),
    -- Extra headers of the webhook, e.g. a token; never logged.
    headers = { Authorization = os.getenv("MIGRATION_WEBHOOK_TOKEN") },
    -- Only these events (left out: all of them).
    events = nil,
    timeout = 5,
  },

  -- Metrics: OpenMetrics/Prometheus on http://<listen>/metrics while a
  -- playbook runs (docs/metrics.md: every metric, alerts, Grafana queries).
  -- Served by a child process that reads the state directory and the
  -- primary over its own read-only connection: scraping never slows the run.
  -- Left out: no metrics. Watching without Prometheus: playbooks/status.lua.
  metrics = { listen = "127.0.0.1:9187", interval = 5 },
}
