/*
 * migrun's public C API: what a program needs to run migrun's Lua library
 * and C modules in a lua_State of its own, as the migrun executable does.
 * Link with libmigrun (pkg-config --cflags --libs migrun); docs/embedding.md
 * shows a whole host. Lua's own headers come through <lua.h>; the functions
 * here follow Lua's conventions (misuse raises a Lua error).
 *
 *   lua_State *L = luaL_newstate();
 *   luaL_openlibs(L);                 // the standard libraries first
 *   migrun_openlibs(L);               // then require "migrun.pg" etc. work
 *   luaL_loadfile(L, path) || migrun_docall(L, 0, 0);  // Ctrl-C stops it
 *
 * Or the whole migrun interpreter: return migrun_main(argc, argv);
 *
 * Every piece of migrun's runtime state lives in the lua_State (its
 * registry): a host may run several states side by side, in one thread or
 * one thread each (one state used by one thread at a time, as for any
 * lua_State). Process-wide are only what the process has once: signal
 * dispositions (SIGINT, SIGUSR1, SIGPIPE: see below), libcurl's global init,
 * and the worker executable (migrun_set_worker).
 */
#ifndef MIGRUN_H
#define MIGRUN_H

#include <lua.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define MIGRUN_API __attribute__((visibility("default")))
#else
#define MIGRUN_API
#endif

/* The version of the library, "0.1.0". */
MIGRUN_API const char *migrun_version(void);

/*
 * Makes every migrun module requirable: the C modules (migrun.pg.core,
 * migrun.proc, migrun.lsn, migrun.aws, migrun.host, migrun.error) and the Lua
 * library compiled into libmigrun (migrun.pg, migrun.lab, ...) are put in
 * package.preload; nothing is loaded until required. It does NOT open the
 * standard libraries: call luaL_openlibs(L) (at least the package library)
 * first. When the environment variable MIGRUN_LUA_PATH names an on-disk lua/
 * tree, a searcher placed before the preload one loads Lua modules from there
 * first (for development), unless registry["LUA_NOENV"] is true, as lua.c's
 * -E sets it. Requiring migrun.proc ignores SIGPIPE for the whole process (a
 * child that stops reading must not kill the host); requiring migrun.aws
 * calls curl_global_init once (a threaded host calls it itself first).
 * require "migrun" is preloaded too (luaopen_migrun), so a script written
 * for the stock lua5.4 runs unchanged.
 */
MIGRUN_API void migrun_openlibs(lua_State *L);

/*
 * The migrun interpreter: lua.c's command line (-e, -l, -i, -v, -E, -W,
 * script and its arguments, LUA_INIT, the REPL) with migrun_openlibs, Ctrl-C,
 * the stock playbooks found in the installed data directory and --config FILE
 * (the slot-inspection console). The migrun executable and the worker are
 * `return migrun_main(argc, argv);`. Returns the process's exit status;
 * call it once per process (it owns the process's SIGCHLD disposition, reset
 * to the default, and libcurl's global init).
 */
MIGRUN_API int migrun_main(int argc, char **argv);

/*
 * Children that run migrun Lua code (the full load's workers, the guard, the
 * metrics server, a then_run playbook) are started as the worker executable,
 * migrun-worker, which `cmake --install` puts in <libdir>/migrun/. The
 * library finds it beside itself (dladdr), at the install path compiled in,
 * or in $MIGRUN_WORKER; a host that ships it elsewhere names it here before
 * running any state (the path is kept, made absolute, for the process).
 * NULL or "" forgets it. Returns 0, or -1 with errno set (ENOENT, EACCES:
 * not an executable file; ENAMETOOLONG).
 */
MIGRUN_API int migrun_set_worker(const char *path);

/*
 * lua_CFunction for require "migrun" from a stock interpreter (the Lua
 * module migrun.so): migrun_openlibs(L), then returns a table
 * { version = "0.1.0", lua = "Lua 5.4.x" (compiled against),
 *   modules = { "migrun.aws", ... } (every name it registered, sorted) }.
 */
MIGRUN_API int luaopen_migrun(lua_State *L);

/*
 * Calls the function below narg arguments on top of the stack, like
 * lua_pcall(L, narg, nres, handler), with a message handler that turns the
 * error into text (an error object with __tostring prints through it, other
 * errors get a traceback; an interrupted error gets both) and with Ctrl-C
 * routed to L for the duration of the call. Returns the lua_pcall status; on
 * error the message (a string) is on top of the stack.
 */
MIGRUN_API int migrun_docall(lua_State *L, int narg, int nres);

/*
 * Ctrl-C, as lua.c does it, for hosts that run Lua some other way than
 * migrun_docall. migrun_install_interrupt(L) installs a SIGINT handler that
 * marks L's state interrupted (which migrun's C calls blocked in poll,
 * waitpid or nanosleep check) and sets a hook on L that stops Lua code at its
 * next instruction; either raises the interrupted error. A Ctrl-C interrupts
 * every state inside such a call at that moment (each at its innermost call),
 * no other. A second Ctrl-C during the call kills the process. Calls nest,
 * per thread; each is paired with migrun_remove_interrupt() in the same
 * thread, and the last one out puts back the SIGINT disposition the first
 * install found.
 */
MIGRUN_API void migrun_install_interrupt(lua_State *L);
MIGRUN_API void migrun_remove_interrupt(void);
/* What the SIGINT handler does, for L's state only (async-signal-safe): for
 * hosts that handle signals themselves (signalfd, an event loop) and want to
 * stop L. */
MIGRUN_API void migrun_interrupt(lua_State *L);
/* For a host's own blocking C functions: when Ctrl-C is pending, clears it
 * and raises the interrupted error; else returns. */
MIGRUN_API void migrun_check_interrupt(lua_State *L);

/*
 * The error values of migrun: a table with the metatable "migrun.Error",
 * fields kind (what went wrong, to branch on: "sql", "connection", "timeout",
 * "spawn", "interrupted", ...), where (who failed: "target 4711", "dms"),
 * code (sqlstate, AWS code, errno name), message, and more per module;
 * tostring(err) is one line, "[where] code message DETAIL: ... HINT: ...".
 * migrun_error_push pushes one (NULL leaves a field unset);
 * migrun_error_return pushes nil and one and returns 2, for
 * "return migrun_error_return(L, ...);" in a lua_CFunction.
 */
MIGRUN_API void migrun_error_push(lua_State *L, const char *kind, const char *where,
                                  const char *code, const char *message);
MIGRUN_API int migrun_error_return(lua_State *L, const char *kind, const char *where,
                                   const char *code, const char *message);
/* The one Ctrl-C error: kind "interrupted", message "interrupted!", where
 * (may be NULL); tostring gives "interrupted!" or "[where] interrupted!".
 * When the interrupt consumed last was a stop request of migrun's guard
 * (SIGUSR1, host.arm_stop), the error has kind "guard" instead. */
MIGRUN_API void migrun_push_interrupted(lua_State *L, const char *where);
/* 1 when the value at idx is such an error (for a host's own message
 * handler, or after a plain lua_pcall; migrun_docall leaves text). */
MIGRUN_API int migrun_error_is_interrupted(lua_State *L, int idx);

#ifdef __cplusplus
}
#endif

#endif
