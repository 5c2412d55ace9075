/*
 * Running Lua code from C the way the migrun host does, for any host that
 * embeds migrun: one protected call (migrun_docall) whose message handler adds
 * a traceback and honours __tostring on error objects, and Ctrl-C. As in Lua's
 * lua.c, the SIGINT handler never touches the Lua state beyond lua_sethook: it
 * sets a flag that C code blocked in poll()/waitpid()/nanosleep() checks when
 * the call returns EINTR (migrun_check_interrupt), and a hook that stops Lua
 * code at its next instruction. A second Ctrl-C kills the process. Either
 * way the code sees one error value: a migrun error of kind "interrupted".
 *
 * Signals are the process's, interrupts are a state's. A disposition belongs
 * to the whole process, so one SIGINT handler and one SIGUSR1 handler serve
 * every lua_State of the host; what they act on is per state: each state has a
 * record (Rt) of its pending interrupt and its cause, its stop-request
 * settings and the thread of its innermost migrun_docall, and the handlers
 * dispatch to records:
 *   - Ctrl-C (SIGINT) interrupts every state that is inside migrun_docall (or
 *     migrun_install_interrupt) at that moment, each at its innermost call:
 *     a terminal's Ctrl-C is addressed to the program, not to one of its
 *     states, and a state that runs nothing of migrun's is left alone;
 *   - a stop request (SIGUSR1) interrupts the state whose guard sent it: a
 *     state listens to one process (host.listen_stop(true, pid)), or to any
 *     while it has named none; the sender is the signal's si_pid. Another
 *     state's guard never stops this one.
 * A signal handler may not look into a Lua registry (not async-signal-safe)
 * and must never write to freed memory, so the records are plain C structs
 * on one process-wide list that only grows: a state takes a free record the
 * first time it needs one (migrun_openlibs does it) and gives it back when it
 * is closed (the __gc of its registry entry); records are reused, never
 * freed. The list and the SIGINT/SIGUSR1 bookkeeping are changed under a
 * mutex (states may run in threads of their own); the handlers only read it.
 */
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "migrun_internal.h"

/* Deep enough for any nesting Lua allows (LUAI_MAXCCALLS is 200). */
#define MAX_NESTING 256

typedef struct Rt {
    struct Rt *next; /* the process-wide list: never unlinked */
    volatile sig_atomic_t in_use;
    lua_State *volatile main;    /* the state's main thread */
    lua_State *volatile running; /* the thread of its innermost migrun_docall, or NULL */
    lua_State *stack[MAX_NESTING];
    int depth;
    volatile sig_atomic_t pending;
    volatile sig_atomic_t pending_cause; /* why the pending interrupt was raised */
    int consumed_cause;                  /* why the one consumed last was */
    /* stop requests: listened to (from stop_from, 0: any), armed, one arrived,
     * held while output lines go to their callbacks (one that comes then is
     * deferred to the release, so no callback is cut in half) */
    volatile sig_atomic_t listening, armed, requested, held, deferred;
    volatile sig_atomic_t stop_from;
} Rt;

static Rt *volatile rt_list = NULL;
static pthread_mutex_t rt_lock = PTHREAD_MUTEX_INITIALIZER;

/* The record of a closed state (its finalizers still run): never interrupted. */
static Rt rt_closed;

/* Set whenever any record is interrupted, cleared when none is pending: the
 * fast path of migrun_check_interrupt, and what migrun_interrupt_pending reads
 * in a thread that runs no migrun_docall. */
static volatile sig_atomic_t any_pending = 0;
/* migrun_interrupt(L) for an L that is no state's (a coroutine outside any
 * migrun_docall): any state that checks takes it, as before records. */
static volatile sig_atomic_t unrouted = 0;

/* migrun_interrupt_pending (migrun_internal.h) reads through this: the flag of
 * the state whose innermost migrun_docall runs in this thread, so that a C
 * call waiting in one state (pg's waits read the macro) is not stopped by
 * another state's interrupt. */
_Thread_local volatile sig_atomic_t *migrun_pending_here = &any_pending;

/* This thread's migrun_docall/migrun_install_interrupt calls, innermost last:
 * migrun_remove_interrupt() takes no state and pairs with the last one. */
static _Thread_local Rt *tl_calls[MAX_NESTING];
static _Thread_local int tl_depth = 0;

/* SIGINT: the disposition found by the first install, and how many calls
 * are installed; SIGUSR1: the same for the states listening. Under rt_lock. */
static int sigint_users = 0;
static struct sigaction saved_sigint;
static int usr1_users = 0;
static struct sigaction saved_usr1;

/* ---- records ---------------------------------------------------------- */

#define RT_KEY "migrun.runtime"
#define RT_MT "migrun.runtime.Record"

typedef struct {
    Rt *rt; /* NULL once given back */
} RtBox;

static void stop_listening_locked(Rt *r) {
    if (!r->listening)
        return;
    r->armed = 0;
    r->listening = 0;
    r->requested = r->deferred = 0;
    r->stop_from = 0;
    if (--usr1_users == 0)
        sigaction(SIGUSR1, &saved_usr1, NULL);
}

/* __gc of the registry entry: the state is being closed. */
static int rt_release(lua_State *L) {
    RtBox *b = luaL_checkudata(L, 1, RT_MT);
    Rt *r = b->rt;
    b->rt = NULL;
    if (r == NULL)
        return 0;
    pthread_mutex_lock(&rt_lock);
    stop_listening_locked(r);
    r->running = NULL;
    r->main = NULL;
    r->pending = 0;
    r->in_use = 0;
    pthread_mutex_unlock(&rt_lock);
    return 0;
}

/* A free record, or a new one put on the list once it is complete. */
static Rt *rt_take(lua_State *main) {
    pthread_mutex_lock(&rt_lock);
    Rt *r = rt_list;
    while (r != NULL && r->in_use)
        r = r->next;
    int fresh = r == NULL;
    if (fresh && (r = calloc(1, sizeof *r)) == NULL) {
        pthread_mutex_unlock(&rt_lock);
        return NULL;
    }
    r->running = NULL;
    r->depth = 0;
    r->pending = r->listening = r->armed = r->requested = r->held = r->deferred = 0;
    r->stop_from = 0;
    r->pending_cause = r->consumed_cause = MIGRUN_CAUSE_CTRL_C;
    r->main = main;
    r->in_use = 1;
    if (fresh) {
        r->next = rt_list;
        rt_list = r;
    }
    pthread_mutex_unlock(&rt_lock);
    return r;
}

/* The record of L's state, taken on first use (raises on out of memory). */
static Rt *rt_of(lua_State *L) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, RT_KEY) == LUA_TUSERDATA) {
        RtBox *b = lua_touserdata(L, -1);
        lua_pop(L, 1);
        return b->rt ? b->rt : &rt_closed;
    }
    lua_pop(L, 1);
    RtBox *b = lua_newuserdatauv(L, sizeof *b, 0); /* box */
    b->rt = NULL;
    if (luaL_newmetatable(L, RT_MT)) {
        lua_pushcfunction(L, rt_release);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, RT_KEY);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    lua_State *main = lua_tothread(L, -1);
    lua_pop(L, 1);
    if ((b->rt = rt_take(main)) == NULL)
        luaL_error(L, "out of memory");
    return b->rt;
}

void migrun_runtime_open(lua_State *L) {
    rt_of(L);
}

/* ---- interrupting ----------------------------------------------------- */

#define HOOK_MASK (LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT)

static void lstop(lua_State *L, lua_Debug *ar);

/* Async-signal-safe: marks r interrupted for cause and stops its Lua code
 * (the thread of its innermost call, and also hook when given). */
static void interrupt_rt(Rt *r, int cause, lua_State *hook) {
    r->pending_cause = cause;
    r->pending = 1;
    any_pending = 1;
    lua_State *t = r->running;
    if (t != NULL)
        lua_sethook(t, lstop, HOOK_MASK, 1);
    if (hook != NULL && hook != t)
        lua_sethook(hook, lstop, HOOK_MASK, 1);
}

static int pending_for(lua_State *L) {
    return any_pending && (rt_of(L)->pending || unrouted);
}

/* The hook set by an interrupt: stops the Lua code at its next instruction
 * (unless C code already raised the interrupt and consumed it). */
static void lstop(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    if (pending_for(L))
        migrun_raise_interrupted(L, NULL);
}

static void set_signal(int sig, void (*handler)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = 0; /* no SA_RESTART: blocking calls return EINTR and C modules notice */
    sigemptyset(&sa.sa_mask);
    /* the two handlers never interleave: each sets the cause, then the flag */
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGUSR1);
    sigaction(sig, &sa, NULL);
}

/* Ctrl-C: every state inside a migrun call, at its innermost call. Ctrl-C
 * wins over a stop request already pending. */
static void laction(int sig) {
    (void)sig;
    set_signal(SIGINT, SIG_DFL); /* a second Ctrl-C kills the process */
    for (Rt *r = rt_list; r != NULL; r = r->next)
        if (r->in_use && r->running != NULL)
            interrupt_rt(r, MIGRUN_CAUSE_CTRL_C, NULL);
}

/* A stop request to r: interrupts only armed code, never replaces an
 * interrupt already pending, and waits while r is held. */
static void request(Rt *r, lua_State *hook) {
    r->requested = 1;
    if (!r->armed || r->pending)
        return;
    if (r->held) {
        r->deferred = 1;
        return;
    }
    interrupt_rt(r, MIGRUN_CAUSE_STOP, hook);
}

/* SIGUSR1: to the states listening to its sender, else to those listening
 * to any process. */
static void lrequest(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    sig_atomic_t from = si != NULL ? (sig_atomic_t)si->si_pid : 0;
    int claimed = 0;
    for (Rt *r = rt_list; from != 0 && r != NULL; r = r->next)
        if (r->in_use && r->listening && r->stop_from == from) {
            request(r, NULL);
            claimed = 1;
        }
    for (Rt *r = rt_list; !claimed && r != NULL; r = r->next)
        if (r->in_use && r->listening && r->stop_from == 0)
            request(r, NULL);
}

void migrun_interrupt(lua_State *L) {
    for (Rt *r = rt_list; r != NULL; r = r->next) {
        if (!r->in_use)
            continue;
        int mine = r->main == L || r->running == L;
        for (int i = 0; !mine && i < r->depth && i < MAX_NESTING; i++)
            mine = r->stack[i] == L;
        if (mine) {
            interrupt_rt(r, MIGRUN_CAUSE_CTRL_C, L);
            return;
        }
    }
    /* no state's thread that migrun knows: whichever checks first takes it */
    unrouted = 1;
    any_pending = 1;
    if (L != NULL)
        lua_sethook(L, lstop, HOOK_MASK, 1);
}

/* ---- stop requests ---------------------------------------------------- */

void migrun_listen_stop(lua_State *L, int on, int from) {
    Rt *r = rt_of(L);
    pthread_mutex_lock(&rt_lock);
    if (on) {
        r->stop_from = from; /* before listening: the handler never sees a stale sender */
        if (!r->listening) {
            r->listening = 1;
            if (usr1_users++ == 0) {
                struct sigaction sa;
                memset(&sa, 0, sizeof sa);
                sa.sa_sigaction = lrequest;
                sa.sa_flags = SA_SIGINFO; /* si_pid: who asks */
                sigemptyset(&sa.sa_mask);
                sigaddset(&sa.sa_mask, SIGINT);
                sigaddset(&sa.sa_mask, SIGUSR1);
                sigaction(SIGUSR1, &sa, &saved_usr1);
            }
        }
    } else {
        stop_listening_locked(r);
    }
    pthread_mutex_unlock(&rt_lock);
}

int migrun_arm_stop(lua_State *L, int on) {
    Rt *r = rt_of(L);
    r->armed = on ? 1 : 0;
    if (on && r->requested && !r->pending && !r->held)
        interrupt_rt(r, MIGRUN_CAUSE_STOP, L); /* one that came while disarmed: at once */
    return r->requested ? 1 : 0;
}

void migrun_hold_stop(lua_State *L) {
    rt_of(L)->held = 1;
}

void migrun_release_stop(lua_State *L) {
    Rt *r = rt_of(L);
    r->held = 0;
    /* a request that came in between has not interrupted: it does now */
    if (r->deferred) {
        r->deferred = 0;
        request(r, L);
    }
}

int migrun_interrupt_cause(lua_State *L) {
    return rt_of(L)->consumed_cause;
}

/* ---- installing ------------------------------------------------------- */

void migrun_install_interrupt(lua_State *L) {
    Rt *r = rt_of(L);
    pthread_mutex_lock(&rt_lock);
    if (r->depth < MAX_NESTING)
        r->stack[r->depth] = L;
    r->depth++;
    r->running = L;
    if (tl_depth < MAX_NESTING)
        tl_calls[tl_depth] = r;
    tl_depth++;
    migrun_pending_here = &r->pending;
    /* interrupted while it ran nothing (another state's call ran when its
     * guard asked): its Lua code stops at once */
    if (r->pending)
        lua_sethook(L, lstop, HOOK_MASK, 1);
    if (sigint_users++ == 0)
        sigaction(SIGINT, NULL, &saved_sigint);
    set_signal(SIGINT, laction);
    pthread_mutex_unlock(&rt_lock);
}

void migrun_remove_interrupt(void) {
    if (tl_depth == 0)
        return;
    pthread_mutex_lock(&rt_lock);
    tl_depth--;
    Rt *r = tl_depth < MAX_NESTING ? tl_calls[tl_depth] : NULL;
    if (r != NULL && r->depth > 0) {
        r->depth--;
        int top = r->depth < MAX_NESTING ? r->depth : MAX_NESTING;
        r->running = top > 0 ? r->stack[top - 1] : NULL;
    }
    /* back to the enclosing call of this thread, if any */
    int up = tl_depth < MAX_NESTING ? tl_depth : MAX_NESTING;
    migrun_pending_here = up > 0 ? &tl_calls[up - 1]->pending : &any_pending;
    if (--sigint_users == 0)
        sigaction(SIGINT, &saved_sigint, NULL);
    else
        set_signal(SIGINT, laction); /* a Ctrl-C interrupts the enclosing calls again */
    pthread_mutex_unlock(&rt_lock);
}

/* ---- consuming -------------------------------------------------------- */

/* Clears L's interrupt and removes the hook from L and from the thread the
 * handler set it on (not someone else's hook, such as a debugger's). */
void migrun_interrupt_consume(lua_State *L) {
    Rt *r = rt_of(L);
    r->consumed_cause = r->pending_cause;
    r->pending_cause = MIGRUN_CAUSE_CTRL_C;
    r->pending = 0;
    unrouted = 0;
    if (lua_gethook(L) == lstop)
        lua_sethook(L, NULL, 0, 0);
    lua_State *target = r->running;
    if (target != NULL && target != L && lua_gethook(target) == lstop)
        lua_sethook(target, NULL, 0, 0);
    /* still set while another state's interrupt waits to be taken: cleared
     * first, so one the handler sets meanwhile is found by the scan */
    any_pending = 0;
    for (Rt *q = rt_list; q != NULL; q = q->next)
        if (q->in_use && q->pending)
            any_pending = 1;
}

int migrun_raise_interrupted(lua_State *L, const char *where) {
    migrun_interrupt_consume(L);
    migrun_push_interrupted(L, where);
    return lua_error(L);
}

void migrun_check_interrupt(lua_State *L) {
    if (pending_for(L))
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
