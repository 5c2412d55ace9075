/*
 * Running Lua code from C the way the migrun host does, for any host that
 * embeds migrun: one protected call (migrun_docall) whose message handler adds
 * a traceback and honours __tostring on error objects, and Ctrl-C. As in Lua's
 * lua.c, the SIGINT handler never touches the Lua state beyond lua_sethook: it
 * sets a flag that C code blocked in poll()/waitpid()/nanosleep() checks when
 * the call returns EINTR (migrun_check_interrupt), and a hook that stops Lua
 * code at its next instruction. A second Ctrl-C kills the process. Either
 * way the code sees one error value: a migrun error of kind "interrupted".
 */
#include <signal.h>
#include <stddef.h>

#include "migrun_internal.h"

volatile sig_atomic_t migrun_interrupt_pending = 0;

/* Why the pending interrupt was raised, and why the one just consumed was
 * (read by migrun_push_interrupted after migrun_interrupt_consume). */
static volatile sig_atomic_t pending_cause = MIGRUN_CAUSE_CTRL_C;
static int consumed_cause = MIGRUN_CAUSE_CTRL_C;

/* Stop requests (SIGUSR1): installed, armed, and whether one has arrived. */
static volatile sig_atomic_t stop_armed = 0;
static volatile sig_atomic_t stop_requested = 0;
/* While held (output lines being handed to their callbacks), a request waits
 * (deferred) until the release, so that no callback is cut in half. */
static volatile sig_atomic_t stop_held = 0;
static volatile sig_atomic_t stop_deferred = 0;
static int stop_listening = 0;
static struct sigaction saved_usr1;

/* The state a SIGINT interrupts: the one of the innermost migrun_docall (or
 * migrun_install_interrupt). Read by the signal handler. */
static lua_State *volatile interrupt_L = NULL;

/* Nested installs: the states to go back to, and the SIGINT disposition the
 * outermost install replaced. */
#define MAX_NESTING 32
static lua_State *nested[MAX_NESTING];
static int nesting = 0;
static struct sigaction saved_action;

/* The hook set by a Ctrl-C: stops the Lua code at its next instruction
 * (unless C code already raised the interrupt and consumed the flag). */
static void lstop(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    if (migrun_interrupt_pending)
        migrun_raise_interrupted(L, NULL);
}

static void set_signal(int sig, void (*handler)(int)) {
    struct sigaction sa;
    sa.sa_handler = handler;
    sa.sa_flags = 0; /* no SA_RESTART: blocking calls return EINTR and C modules notice */
    sigemptyset(&sa.sa_mask);
    /* the two handlers never interleave: each sets the cause, then the flag */
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGUSR1);
    sigaction(sig, &sa, NULL);
}

static void set_handler(void (*handler)(int)) {
    set_signal(SIGINT, handler);
}

static void laction(int sig) {
    (void)sig;
    set_handler(SIG_DFL);                /* a second Ctrl-C kills the process */
    pending_cause = MIGRUN_CAUSE_CTRL_C; /* Ctrl-C wins over a stop request */
    migrun_interrupt(interrupt_L);
}

/* SIGUSR1: a stop request. Interrupts only armed code, and never replaces a
 * Ctrl-C already pending. */
static void lrequest(int sig) {
    (void)sig;
    stop_requested = 1;
    if (stop_armed && !migrun_interrupt_pending) {
        if (stop_held) {
            stop_deferred = 1;
            return;
        }
        pending_cause = MIGRUN_CAUSE_STOP;
        migrun_interrupt(interrupt_L);
    }
}

void migrun_hold_stop(void) {
    stop_held = 1;
}

void migrun_release_stop(void) {
    stop_held = 0;
    /* a request that came in between has not interrupted: it does now */
    if (stop_deferred) {
        stop_deferred = 0;
        if (stop_armed && !migrun_interrupt_pending) {
            pending_cause = MIGRUN_CAUSE_STOP;
            migrun_interrupt(interrupt_L);
        }
    }
}

void migrun_listen_stop(int on) {
    if (on && !stop_listening) {
        sigaction(SIGUSR1, NULL, &saved_usr1);
        set_signal(SIGUSR1, lrequest);
        stop_listening = 1;
    } else if (!on && stop_listening) {
        stop_armed = 0;
        sigaction(SIGUSR1, &saved_usr1, NULL);
        stop_listening = 0;
        stop_requested = 0;
        stop_deferred = 0;
    }
}

int migrun_arm_stop(int on) {
    stop_armed = on ? 1 : 0;
    if (on && stop_requested && !migrun_interrupt_pending) {
        /* a request that came while disarmed stops the armed code at once */
        pending_cause = MIGRUN_CAUSE_STOP;
        migrun_interrupt(interrupt_L);
    }
    return stop_requested ? 1 : 0;
}

int migrun_interrupt_cause(void) {
    return consumed_cause;
}

void migrun_interrupt(lua_State *L) {
    int flag = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
    migrun_interrupt_pending = 1;
    if (L != NULL)
        lua_sethook(L, lstop, flag, 1);
}

void migrun_install_interrupt(lua_State *L) {
    if (nesting < MAX_NESTING)
        nested[nesting] = L;
    interrupt_L = L;
    if (nesting++ == 0)
        sigaction(SIGINT, NULL, &saved_action);
    set_handler(laction);
}

void migrun_remove_interrupt(void) {
    if (nesting == 0)
        return;
    if (--nesting == 0) {
        sigaction(SIGINT, &saved_action, NULL);
        interrupt_L = NULL;
        return;
    }
    /* back to the enclosing call, which a Ctrl-C interrupts again */
    interrupt_L = nested[(nesting < MAX_NESTING ? nesting : MAX_NESTING) - 1];
    set_handler(laction);
}

/* Clears the flag and removes the hook from L and from the state the signal
 * handler set it on (not someone else's hook, such as a debugger's). */
void migrun_interrupt_consume(lua_State *L) {
    consumed_cause = pending_cause;
    pending_cause = MIGRUN_CAUSE_CTRL_C;
    migrun_interrupt_pending = 0;
    if (lua_gethook(L) == lstop)
        lua_sethook(L, NULL, 0, 0);
    lua_State *target = interrupt_L;
    if (target != NULL && target != L && lua_gethook(target) == lstop)
        lua_sethook(target, NULL, 0, 0);
}

int migrun_raise_interrupted(lua_State *L, const char *where) {
    migrun_interrupt_consume(L);
    migrun_push_interrupted(L, where);
    return lua_error(L);
}

void migrun_check_interrupt(lua_State *L) {
    if (migrun_interrupt_pending)
        migrun_raise_interrupted(L, NULL);
}

/* Message handler: error objects with __tostring print through it, without
 * a traceback, except a Ctrl-C's, where the traceback says where it stopped. */
static int msghandler(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
            if (!migrun_error_is_interrupted(L, 1))
                return 1; /* the object's own text, no traceback added (a guard's stop too) */
            msg = lua_tostring(L, -1);
        } else {
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

int migrun_docall(lua_State *L, int narg, int nres) {
    int base = lua_gettop(L) - narg;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base); /* handler fn args... */
    migrun_install_interrupt(L);
    int status = lua_pcall(L, narg, nres, base);
    migrun_remove_interrupt();
    lua_remove(L, base);
    return status;
}
