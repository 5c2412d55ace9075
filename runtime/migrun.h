/*
 * Declarations shared by the migrun host and its C modules: the table of
 * embedded Lua sources, the list of C modules, the structured error value and
 * the interrupt flag that long-running C calls poll so Ctrl-C reaches them.
 */
#ifndef MIGRUN_H
#define MIGRUN_H

#include <signal.h>
#include <stddef.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

/* Every lua/ source file, compiled in by cmake/embed_lua.cmake; terminated by a NULL module. */
struct migrun_embedded {
    const char *module;    /* "migrun.lab" */
    const char *chunkname; /* "@/path/to/lua/migrun/lab.lua" */
    const char *source;
    size_t len;
};
extern const struct migrun_embedded migrun_embedded[];

/* Every C module's luaopen_* function, declared from the list in modules.h. */
#define MIGRUN_MODULE(name, fn) int fn(lua_State *L);
#include "modules.h"
#undef MIGRUN_MODULE

/* Opens the standard libraries and makes every migrun module requirable. */
void migrun_openlibs(lua_State *L);

/* The REPL (repl.c). Returns when the user ends input. */
void migrun_repl(lua_State *L, const char *progname);

/* call.c: runs the function below narg arguments on top of the stack under
 * lua_pcall with the traceback message handler and Ctrl-C routed to L.
 * Returns the lua_pcall status; on error the message is left on the stack. */
int migrun_docall(lua_State *L, int narg, int nres);

/*
 * Ctrl-C (call.c). The signal handler only sets this flag and a count hook on
 * the state being run; Lua code is interrupted by the hook, and C code blocked
 * in poll()/waitpid() must check the flag (poll returns EINTR) and call
 * migrun_check_interrupt().
 */
extern volatile sig_atomic_t migrun_interrupt_pending;
/* Routes SIGINT to L until the matching migrun_remove_interrupt (calls nest;
 * the outermost remove puts back the disposition the first install found). */
void migrun_install_interrupt(lua_State *L);
void migrun_remove_interrupt(void);
/* What the SIGINT handler does: sets the flag and the hook on L (may be
 * NULL). Async-signal-safe, for hosts with signal handling of their own. */
void migrun_interrupt(lua_State *L);
/* When Ctrl-C was pressed: clears the flag and raises the interrupted error. */
void migrun_check_interrupt(lua_State *L);
/* Clears the flag and the hook (for C code that raises the error itself). */
void migrun_interrupt_consume(lua_State *L);
/* Consumes the interrupt and raises migrun_push_interrupted(L, where). */
int migrun_raise_interrupted(lua_State *L, const char *where);

/* host.c: the one monotonic clock (seconds) for every deadline, and the one
 * sleep, which raises the interrupted error on Ctrl-C. */
double migrun_monotonic(void);
void migrun_sleep(lua_State *L, double seconds);
/* host.monotonic and host.sleep, also registered as aws.monotonic, aws.sleep */
int migrun_host_monotonic(lua_State *L);
int migrun_host_sleep(lua_State *L);

/*
 * Structured errors: a table with metatable "migrun.Error". Common fields:
 *   kind     what went wrong, for code to branch on ("sql", "connection",
 *            "timeout", "aws", "spawn", "config", ...)
 *   where    who failed ("target 4711", "dms", "pg_dump")
 *   code     sqlstate / AWS error code / errno name
 *   message, detail, hint
 * Modules add their own fields (sqlstate, retryable, status, ...).
 * tostring(err) gives one line: "[where] code message DETAIL: ... HINT: ...".
 */
/* Pushes a new error; NULL arguments leave the field unset. */
void migrun_error_push(lua_State *L, const char *kind, const char *where, const char *code,
                       const char *message);
/* Sets err[key] = value on the error (or any table) at idx, if value != NULL. */
void migrun_setfield(lua_State *L, int idx, const char *key, const char *value);
/* The one Ctrl-C error, whoever notices the interrupt: kind "interrupted",
 * message "interrupted!", where (may be NULL). tostring gives "interrupted!"
 * (or "[where] interrupted!"). */
void migrun_push_interrupted(lua_State *L, const char *where);
/* Is the value at idx an error pushed by migrun_push_interrupted? */
int migrun_error_is_interrupted(lua_State *L, int idx);
/* Pushes nil and a new error; returns 2, for "return migrun_error_return(...)". */
int migrun_error_return(lua_State *L, const char *kind, const char *where, const char *code,
                        const char *message);

#endif
