/*
 * Declarations shared by the files of libmigrun and the migrun executable,
 * beyond the public API of include/migrun.h (which this includes): the table
 * of embedded Lua sources, the list of C modules, the REPL, the interrupt
 * flag that long-running C calls poll so Ctrl-C reaches them, the clock and
 * the sleep, and error helpers. Not installed.
 */
#ifndef MIGRUN_INTERNAL_H
#define MIGRUN_INTERNAL_H

#include <signal.h>
#include <stddef.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "migrun.h"

/* Every lua/ source file, compiled in by cmake/embed_lua.cmake; terminated by a NULL module. */
struct migrun_embedded {
    const char *module;    /* "migrun.rehearsal.lab" */
    const char *chunkname; /* "@/path/to/lua/migrun/rehearsal/lab.lua" */
    const char *source;
    size_t len;
};
extern const struct migrun_embedded migrun_embedded[];

/* Every C module's luaopen_* function, declared from the list in modules.h. */
#define MIGRUN_MODULE(name, fn) int fn(lua_State *L);
#include "modules.h"
#undef MIGRUN_MODULE

/* The REPL (repl.c, in libmigrun but not in the Lua module migrun.so).
 * Returns when the user ends input. */
void migrun_repl(lua_State *L, const char *progname);

/*
 * Ctrl-C (call.c; the public part is in migrun.h). Signals are the process's,
 * interrupts are a state's: the signal handler marks the record of a state
 * (pending, cause) and sets a count hook on the thread it runs; Lua code is
 * interrupted by the hook, and C code blocked in poll()/waitpid() must check
 * (poll returns EINTR) with migrun_check_interrupt(L).
 *
 * migrun_interrupt_pending reads, without a lua_State, the flag of the state
 * whose innermost migrun_docall runs in the calling thread (any state's, in a
 * thread that runs none): for C code that has no L at hand (pg's waits, a
 * libcurl progress callback). Code that has L uses migrun_check_interrupt.
 */
extern _Thread_local volatile sig_atomic_t *migrun_pending_here;
#define migrun_interrupt_pending (*migrun_pending_here)
/* Takes the state's record (migrun_openlibs does it once per state). */
void migrun_runtime_open(lua_State *L);
/* Clears L's interrupt and its hook (for C code that raises the error itself). */
void migrun_interrupt_consume(lua_State *L);
/* Consumes the interrupt and raises migrun_push_interrupted(L, where). */
int migrun_raise_interrupted(lua_State *L, const char *where);

/*
 * Stop requests (call.c): SIGUSR1 from migrun's guard process, to the state
 * that listens to the sender. While listening and armed, a request interrupts
 * like Ctrl-C (same record, same hook), and migrun_push_interrupted then
 * pushes an error of kind "guard" instead of "interrupted".
 * migrun_listen_stop(L, 1, pid) listens to requests from pid (0: from any
 * process; the process-wide handler is installed while any state listens),
 * (L, 0, 0) stops listening and forgets requests; migrun_arm_stop(L, on)
 * returns whether a request has arrived (arming with one pending interrupts
 * at once).
 */
enum { MIGRUN_CAUSE_CTRL_C = 0, MIGRUN_CAUSE_STOP = 1 };
void migrun_listen_stop(lua_State *L, int on, int from);
int migrun_arm_stop(lua_State *L, int on);
/* Between hold and release a stop request does not interrupt L; one that came
 * meanwhile interrupts at the release (proc.c: a round of output callbacks). */
void migrun_hold_stop(lua_State *L);
void migrun_release_stop(lua_State *L);
/* The cause of L's interrupt consumed last (MIGRUN_CAUSE_*). */
int migrun_interrupt_cause(lua_State *L);

/* host.c: the one monotonic clock (seconds) for every deadline, and the one
 * sleep, which raises the interrupted error on Ctrl-C. */
double migrun_monotonic(void);
void migrun_sleep(lua_State *L, double seconds);
/* host.monotonic and host.sleep, also registered as aws.monotonic, aws.sleep */
int migrun_host_monotonic(lua_State *L);
int migrun_host_sleep(lua_State *L);

/* err.c: sets t[key] = value on the error (or any table) at idx, if value != NULL. */
void migrun_setfield(lua_State *L, int idx, const char *key, const char *value);

#endif
