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

static void set_handler(void (*handler)(int)) {
    struct sigaction sa;
    sa.sa_handler = handler;
    sa.sa_flags = 0; /* no SA_RESTART: blocking calls return EINTR and C modules notice */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

static void laction(int sig) {
    (void)sig;
    set_handler(SIG_DFL); /* a second Ctrl-C kills the process */
    migrun_interrupt(interrupt_L);
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
                return 1; /* the object's own text, no traceback added */
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
