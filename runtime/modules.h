/* The C modules compiled into migrun: MIGRUN_MODULE(require name, luaopen function).
 * Included with MIGRUN_MODULE defined by the includer (X-macro). */
MIGRUN_MODULE("migrun.error", luaopen_migrun_error)
MIGRUN_MODULE("migrun.lsn", luaopen_migrun_lsn)
MIGRUN_MODULE("migrun.pg.core", luaopen_migrun_pg_core)
MIGRUN_MODULE("migrun.proc", luaopen_migrun_proc)
MIGRUN_MODULE("migrun.aws", luaopen_migrun_aws)
MIGRUN_MODULE("migrun.host", luaopen_migrun_host)
