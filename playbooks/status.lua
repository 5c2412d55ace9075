--[[
playbooks/status.lua: what the migration is doing, from another terminal,
while a playbook runs or after it stopped.

    migrun playbooks/status.lua --config migration.lua [--json] [--offline]

The step under way and since when; the progress with its rate over the last
half minute and the expected end; the full load per stream; each slot's lag
in bytes and in time and the WAL it retains, against the WAL guard's
thresholds; each DMS task's state and its apply exceptions; the last error;
whether a migrun holds the state directory, and its pid.

It only reads (the journal, the progress and samples files, the lock through
/proc/locks, read-only sessions on the servers, DMS Describe calls): safe at
any time, it never takes the lock and never writes. --json is for scripts
and stable (docs/status.md); --offline skips the servers and DMS.
]]
os.exit(require("migrun.status").main(arg))
