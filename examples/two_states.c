/*
 * Two lua_States in one process, each with children of its own: what a host
 * that runs two migrations (or a migration and a monitor) relies on. Each
 * state has its own list of children, its own output callbacks and its own
 * stop requests (docs/embedding.md); this program shows it three ways:
 *
 *   interleaved  A and B each start a child whose lines go to a callback;
 *                A waits for its own while B's child writes, then B waits:
 *                each callback runs in its own state, each gets its lines.
 *   threads      A and B in a thread each, at the same time, start and wait
 *                for children with callbacks, many rounds.
 *   stop         A's guard (a worker child) asks the process to stop while
 *                B, armed, waits for a child of its own: B is not stopped;
 *                A, once armed, is.
 *
 * Usage: two_states [interleaved|threads|stop]...  (no argument: all three)
 * Prints one line per state and case; exit status 0 when every one is right.
 * Built against libmigrun by CMake as build/examples/two_states.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>
#include <migrun.h>

static lua_State *new_state(const char *name) {
    lua_State *L = luaL_newstate();
    if (L == NULL)
        return NULL;
    luaL_openlibs(L);
    migrun_openlibs(L);
    lua_pushstring(L, name);
    lua_setglobal(L, "NAME");
    return L;
}

/* Runs code in L under migrun_docall; prints the error and returns 0 on one. */
static int run(lua_State *L, const char *code) {
    int status = luaL_loadstring(L, code);
    if (status == LUA_OK)
        status = migrun_docall(L, 0, 0);
    if (status != LUA_OK) {
        lua_getglobal(L, "NAME");
        fprintf(stderr, "state %s: %s\n", lua_tostring(L, -1), lua_tostring(L, -2));
        lua_pop(L, 2);
        return 0;
    }
    return 1;
}

/* ---- interleaved: one thread ------------------------------------------- */

static const char START[] = "proc = require 'migrun.proc'\n"
                            "lines = {}\n"
                            "h = assert(proc.spawn{ 'seq', '1', '500', stdout = function(line)\n"
                            "  lines[#lines + 1] = line\n"
                            "end })\n";

/* after a pause, so that both children have written when A waits */
static const char FINISH[] = "require('migrun.host').sleep(0.2)\n"
                             "assert(h:wait(30))\n"
                             "assert(#lines == 500 and lines[500] == '500', #lines)\n"
                             "print(('interleaved: state %s got its 500 lines'):format(NAME))\n";

static int interleaved(void) {
    lua_State *a = new_state("A"), *b = new_state("B");
    int ok = a != NULL && b != NULL;
    /* B's child writes while A waits: A's wait must neither run B's callback
     * nor take B's lines */
    ok = ok && run(a, START) && run(b, START) && run(a, FINISH) && run(b, FINISH);
    if (a)
        lua_close(a);
    if (b)
        lua_close(b);
    return ok;
}

/* ---- threads: one state each ------------------------------------------- */

static const char ROUNDS[] =
    "local proc = require 'migrun.proc'\n"
    "for round = 1, 40 do\n"
    "  local hs, counts = {}, {}\n"
    "  for i = 1, 3 do\n"
    "    counts[i] = 0\n"
    "    hs[i] = assert(proc.spawn{ 'seq', '1', tostring(100 * i),\n"
    "      stdout = function() counts[i] = counts[i] + 1 end })\n"
    "  end\n"
    "  for i = 1, 3 do assert(hs[i]:wait(30)) hs[i]:close() end\n"
    "  for i = 1, 3 do assert(counts[i] == 100 * i, ('round %d child %d: %d lines'):format(\n"
    "    round, i, counts[i])) end\n"
    "end\n"
    "print(('threads: state %s ran 40 rounds of 3 children, every line to its callback')\n"
    "  :format(NAME))\n";

typedef struct {
    const char *name;
    int ok;
} Job;

static void *thread_main(void *arg) {
    Job *job = arg;
    lua_State *L = new_state(job->name);
    job->ok = L != NULL && run(L, ROUNDS);
    if (L)
        lua_close(L);
    return NULL;
}

static int threads(void) {
    Job jobs[2] = {{"A", 0}, {"B", 0}};
    pthread_t t[2];
    int started = 0;
    for (; started < 2; started++)
        if (pthread_create(&t[started], NULL, thread_main, &jobs[started]) != 0)
            break;
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    fflush(stdout);
    return started == 2 && jobs[0].ok && jobs[1].ok;
}

/* ---- stop: each state's guard stops that state only -------------------- */

/* A's guard: a worker (the migrun Lua library in a child process) that asks
 * its parent to stop, as migrun's WAL guard does, then says it has asked (in
 * the file FLAG, which both states know). */
static const char A_LISTENS[] = "host, proc = require 'migrun.host', require 'migrun.proc'\n"
                                "host.listen_stop(true)\n"
                                "guard = assert(proc.spawn(assert(host.worker_spec{ '-e', ([[\n"
                                "  local host = require 'migrun.host'\n"
                                "  host.sleep(0.2)\n"
                                "  assert(host.request_stop(%d))\n"
                                "  assert(host.write_file(%q, 'asked'))\n"
                                "]]):format(host.pid, FLAG), stdin = false })))\n"
                                "host.listen_stop(true, guard.pid)\n";

/* B listens to a guard of its own, which never asks, and waits, armed, for
 * a child of its own until A's guard has asked. */
static const char B_WAITS[] =
    "local host, proc = require 'migrun.host', require 'migrun.proc'\n"
    "host.listen_stop(true)\n"
    "local quiet = assert(proc.spawn{ 'sleep', '60' })\n"
    "host.listen_stop(true, quiet.pid)\n"
    "local ok, e = pcall(function()\n"
    "  host.arm_stop(true)\n"
    "  local deadline = host.monotonic() + 30\n"
    "  repeat quiet:wait(0.05) until io.open(FLAG) or host.monotonic() > deadline\n"
    "  return io.open(FLAG) ~= nil\n"
    "end)\n"
    "host.arm_stop(false)\n"
    "host.listen_stop(false)\n"
    "quiet:close()\n"
    "assert(ok, 'B was stopped: ' .. tostring(e))\n"
    "assert(e, 'A\\'s guard never asked')\n"
    "print('stop: state B waited while the other state\\'s guard asked, not stopped')\n";

static const char A_STOPPED[] =
    "local ok, e = pcall(function() host.arm_stop(true) host.sleep(10) end)\n"
    "host.arm_stop(false)\n"
    "host.listen_stop(false)\n"
    "guard:wait(10)\n"
    "assert(not ok and e.kind == 'guard', 'A was not stopped: ' .. tostring(e))\n"
    "print('stop: state A was stopped by its guard (' .. e.message .. ')')\n";

static int stop(void) {
    char flag[] = "/tmp/migrun-two-states.XXXXXX";
    int fd = mkstemp(flag);
    if (fd < 0)
        return 0;
    close(fd);
    unlink(flag); /* the guard creates it once it has asked */
    lua_State *a = new_state("A"), *b = new_state("B");
    int ok = a != NULL && b != NULL;
    for (int i = 0; ok && i < 2; i++) {
        lua_State *L = i == 0 ? a : b;
        lua_pushstring(L, flag);
        lua_setglobal(L, "FLAG");
    }
    ok = ok && run(a, A_LISTENS) && run(b, B_WAITS) && run(a, A_STOPPED);
    if (a)
        lua_close(a);
    if (b)
        lua_close(b);
    unlink(flag);
    return ok;
}

int main(int argc, char **argv) {
    static const struct {
        const char *name;
        int (*fn)(void);
    } cases[] = {{"interleaved", interleaved}, {"threads", threads}, {"stop", stop}};
    int failed = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int wanted = argc < 2;
        for (int j = 1; j < argc; j++)
            wanted = wanted || strcmp(argv[j], cases[i].name) == 0;
        if (wanted && !cases[i].fn()) {
            fprintf(stderr, "%s: %s failed\n", argv[0], cases[i].name);
            failed = 1;
        }
        fflush(stdout);
    }
    return failed;
}
