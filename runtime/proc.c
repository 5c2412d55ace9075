/*
 * migrun.proc: child processes without a shell. A Process handle owns one or
 * more stages (one for spawn, several for a pipeline) started from argv arrays
 * in a process group of their own, their output streams (captured into
 * strings, sent to a file, or delivered line by line to a Lua function) and
 * the stdin data fed to them. One poll loop ("pump") serves every live handle
 * at once, so a child writing to both streams, or many children at once, never
 * deadlock on a full pipe whichever handle the script is waiting for. Child
 * exit is watched through pidfds; every child is reaped, and a handle that is
 * closed or collected while its process runs kills the process group first.
 * Every descriptor spawning opens belongs to the handle from the moment it is
 * open, so a spawn that fails half-way leaks none (see "spawning" below).
 * A child's environment is an allow-list, not migrun's: what it needs is
 * passed explicitly (see "the children's environment" below).
 *
 * Every lua_State has children of its own: the list of its running
 * processes, and whether one of its output callbacks runs, are the state's
 * (a ProcState in its registry), so a pump serves the state that waits and
 * runs only that state's callbacks, and several states (in one thread or in
 * threads of their own) spawn and wait side by side. Exits are the state's
 * too, without a SIGCHLD handler: a disposition is the process's (one for the
 * host and all its states), a handler would have to find, inside a signal,
 * which state owns the pid, and its waitpid(-1) would reap the other states'
 * and the host's own children. A pidfd per child makes the kernel do that
 * dispatch: it becomes readable for its process only, and each state polls
 * only its own and reaps them by pid (waitpid(pid), never -1; where there is
 * no pidfd, each state polls waitpid(pid, WNOHANG) for its own). What a host
 * must leave alone: SIGCHLD not ignored (SIG_IGN or SA_NOCLDWAIT makes the
 * kernel reap every child and lose its status: spawning refuses then), and
 * no wait()/waitpid(-1) of its own that would take migrun's children.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "migrun_internal.h"

#define PROC_MT "migrun.proc.Process"
#define ACTIVE_KEY "migrun.proc.active"
#define WITHHELD_KEY "migrun.proc.withheld"
#define ALLOW_KEY "migrun.proc.allowed"
#define STATE_KEY "migrun.proc.state"

extern char **environ;

enum { OUT_INHERIT, OUT_NULL, OUT_FILE, OUT_CAPTURE, OUT_LINES, OUT_MERGE };

/* user value slots of a Process userdata */
enum {
    UV_STDOUT_FN = 1,
    UV_STDERR_FN,
    UV_STDIN_DATA,
    UV_COMMAND,
    UV_STDOUT,
    UV_STDERR,
    UV_COUNT = UV_STDERR
};

typedef struct {
    int mode;
    int fd;    /* parent's read end of the pipe, -1 once at EOF or closed */
    char *buf; /* captured bytes, or the partial line for OUT_LINES */
    size_t len, cap;
} Stream;

typedef struct {
    pid_t pid;
    int pidfd;
    int reaped;
    int status;          /* as from waitpid */
    int pipefail_killed; /* still running when another stage failed: we sent TERM */
} Stage;

/* Every descriptor start() opens, recorded the moment it is open (-1 when
 * not): the children's ends of the stdio pipes and files, the parent's ends
 * until they are handed to the handle, the exec error pipe and the links
 * between pipeline stages. The closer closes whatever is left. */
typedef struct {
    int out_child, err_child, in_child; /* a file or /dev/null the child gets as 1, 2, 0 */
    int out_pipe[2], err_pipe[2], in_pipe[2];
    int exec_pipe[2]; /* closes on exec, or carries the errno of a failed one */
    int link[2], prev_read;
} Stdio;

typedef struct Process {
    int closed;
    int finished; /* every stage reaped and the streams drained */
    int nstages;
    Stage *stages;
    pid_t pgid;
    Stream out, err;
    int in_fd;           /* write end of the child's stdin, -1 when done */
    const char *in_data; /* what is still to write: in_data[in_off..in_len) */
    size_t in_len, in_off;
    int in_keep;      /* stdin = {pipe = true}: open for h:send until h:close_stdin */
    int wake;         /* wake = true: a line delivered to a callback ends a wait for this process */
    int woken;        /* such a line was delivered since a wait for it last returned */
    int failed_stage; /* the first stage seen failing, -1 if none */
    Stdio io;         /* what start() opened and has not handed over or closed */
    struct ProcState *owner;
    struct Process *next, *prev;
} Process;

/* A state's children: a userdata in its registry (STATE_KEY), without __gc,
 * so that its memory lasts until lua_close has run every finalizer (a
 * Process's __gc unlinks itself from it). */
typedef struct ProcState {
    Process *head;   /* started and not yet finalized */
    int in_callback; /* one of this state's line callbacks is running */
} ProcState;

static ProcState *proc_state(lua_State *L) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, STATE_KEY) != LUA_TUSERDATA) {
        lua_pop(L, 1);
        ProcState *ps = lua_newuserdatauv(L, sizeof *ps, 0);
        ps->head = NULL;
        ps->in_callback = 0;
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, STATE_KEY);
    }
    ProcState *ps = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return ps;
}

/* ---- small helpers ------------------------------------------------------ */

/* -1 where the kernel (or valgrind) has no pidfd_open: exits are then found
 * by polling waitpid every POLL_EXIT_MS. */
static int pidfd_open(pid_t pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

#define POLL_EXIT_MS 20

static void buf_append(Stream *s, const char *data, size_t n) {
    if (s->len + n > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n)
            cap *= 2;
        char *nb = realloc(s->buf, cap);
        if (nb == NULL)
            abort(); /* out of memory while capturing: nothing sensible to do */
        s->buf = nb;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, data, n);
    s->len += n;
}

static void close_fd(int *fd) {
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void stdio_init(Stdio *io) {
    io->out_child = io->err_child = io->in_child = -1;
    io->out_pipe[0] = io->out_pipe[1] = io->err_pipe[0] = io->err_pipe[1] = -1;
    io->in_pipe[0] = io->in_pipe[1] = io->exec_pipe[0] = io->exec_pipe[1] = -1;
    io->link[0] = io->link[1] = io->prev_read = -1;
}

/* Closes every descriptor the Stdio still holds. Idempotent. */
static void stdio_close(Stdio *io) {
    int *fds[] = {&io->out_child,   &io->err_child,    &io->in_child,     &io->out_pipe[0],
                  &io->out_pipe[1], &io->err_pipe[0],  &io->err_pipe[1],  &io->in_pipe[0],
                  &io->in_pipe[1],  &io->exec_pipe[0], &io->exec_pipe[1], &io->link[0],
                  &io->link[1],     &io->prev_read};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        close_fd(fds[i]);
}

static int is_safe_word(const char *s) {
    if (*s == '\0')
        return 0;
    for (; *s; s++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-", *s))
            return 0;
    return 1;
}

/* Appends argv (a table at idx) to b in shell-quoted, printable form; raises
 * on an element that is not a string or a number. */
static void quote_argv(lua_State *L, luaL_Buffer *b, int idx) {
    lua_Integer n = luaL_len(L, idx);
    for (lua_Integer i = 1; i <= n; i++) {
        if (i > 1)
            luaL_addchar(b, ' ');
        int t = lua_geti(L, idx, i); /* ... arg */
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "argv[%d] is a %s, expected a string", (int)i, lua_typename(L, t));
        const char *a = lua_tostring(L, -1);
        if (t == LUA_TNUMBER || is_safe_word(a)) {
            luaL_addvalue(b); /* numbers never need quotes */
            continue;
        }
        lua_pop(L, 1); /* the argv table keeps the string alive */
        luaL_addchar(b, '\'');
        for (; *a; a++) {
            if (*a == '\'')
                luaL_addstring(b, "'\\''");
            else
                luaL_addchar(b, *a);
        }
        luaL_addchar(b, '\'');
    }
}

/* proc.quote(argv) -> "pg_dump -t 'my table'" */
static int proc_quote(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    quote_argv(L, &b, 1);
    luaL_pushresult(&b);
    return 1;
}

static const struct {
    const char *name;
    int sig;
} signames[] = {
    {"TERM", SIGTERM}, {"KILL", SIGKILL}, {"INT", SIGINT},   {"HUP", SIGHUP},
    {"QUIT", SIGQUIT}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"STOP", SIGSTOP},
    {"CONT", SIGCONT}, {"PIPE", SIGPIPE}, {"ALRM", SIGALRM}, {NULL, 0},
};

static int check_signal(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx))
        return SIGTERM;
    if (lua_type(L, idx) == LUA_TNUMBER)
        return (int)luaL_checkinteger(L, idx);
    const char *name = luaL_checkstring(L, idx);
    if (strncmp(name, "SIG", 3) == 0)
        name += 3;
    for (int i = 0; signames[i].name; i++)
        if (strcmp(signames[i].name, name) == 0)
            return signames[i].sig;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", name));
}

/* ---- the active registry -------------------------------------------------
 * registry[ACTIVE_KEY][lightuserdata p] = userdata: keeps a running process's
 * handle (and its callbacks) alive until it is finished, so its output keeps
 * being read even when the script dropped its last reference. */

static void active_table(lua_State *L) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, ACTIVE_KEY) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, ACTIVE_KEY);
    }
}

static void active_add(lua_State *L, Process *p, int ud) {
    ud = lua_absindex(L, ud);
    active_table(L);
    lua_pushlightuserdata(L, p);
    lua_pushvalue(L, ud);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    ProcState *ps = p->owner;
    p->prev = NULL;
    p->next = ps->head;
    if (ps->head)
        ps->head->prev = p;
    ps->head = p;
}

static int active_contains(Process *p) {
    for (Process *q = p->owner ? p->owner->head : NULL; q; q = q->next)
        if (q == p)
            return 1;
    return 0;
}

static void active_remove(lua_State *L, Process *p) {
    if (!active_contains(p))
        return;
    if (p->prev)
        p->prev->next = p->next;
    else
        p->owner->head = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->next = p->prev = NULL;
    if (L != NULL) {
        active_table(L);
        lua_pushlightuserdata(L, p);
        lua_pushnil(L);
        lua_rawset(L, -3);
        lua_pop(L, 1);
    }
}

/* Pushes the userdata of an active process (or nil). */
static void push_active(lua_State *L, Process *p) {
    active_table(L);
    lua_pushlightuserdata(L, p);
    lua_rawget(L, -2);
    lua_remove(L, -2);
}

/* ---- reading, writing and reaping --------------------------------------- */

static void deliver_lines(lua_State *L, Process *p, Stream *s, int uv, int at_eof) {
    size_t start = 0;
    for (;;) {
        /* buf is NULL while nothing was read (a stream that closes empty) */
        char *nl = s->len > start ? memchr(s->buf + start, '\n', s->len - start) : NULL;
        size_t end = nl ? (size_t)(nl - s->buf) : s->len;
        if (nl == NULL && !(at_eof && end > start))
            break;
        push_active(L, p);
        lua_getiuservalue(L, -1, uv); /* ud fn */
        lua_remove(L, -2);
        lua_pushlstring(L, s->buf + start, end - start);
        p->owner->in_callback = 1;
        int status = lua_pcall(L, 1, 0, 0);
        p->owner->in_callback = 0;
        if (p->wake)
            p->woken = 1;
        start = nl ? end + 1 : s->len;
        if (status != LUA_OK) {
            memmove(s->buf, s->buf + start, s->len - start);
            s->len -= start;
            migrun_release_stop(L); /* held by pump: it does not reach its release */
            lua_error(L);           /* the callback's error, after the buffer is consistent */
        }
    }
    if (start > 0)
        memmove(s->buf, s->buf + start, s->len - start);
    s->len -= start;
}

/* Reads what is available on a stream; returns 0 at EOF. */
static int read_stream(lua_State *L, Process *p, Stream *s, int uv) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(s->fd, chunk, sizeof chunk);
        if (n > 0) {
            buf_append(s, chunk, (size_t)n);
            if (s->mode == OUT_LINES)
                deliver_lines(L, p, s, uv, 0);
            if ((size_t)n < sizeof chunk)
                return 1;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 1;
        close_fd(&s->fd); /* EOF or error */
        if (s->mode == OUT_LINES)
            deliver_lines(L, p, s, uv, 1);
        return 0;
    }
}

static void write_stdin(Process *p) {
    while (p->in_fd >= 0 && p->in_off < p->in_len) {
        ssize_t n = write(p->in_fd, p->in_data + p->in_off, p->in_len - p->in_off);
        if (n > 0)
            p->in_off += (size_t)n;
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && errno == EAGAIN)
            return;
        else {
            close_fd(&p->in_fd); /* EPIPE: the child stopped reading */
            return;
        }
    }
    if (!p->in_keep)
        close_fd(&p->in_fd); /* all written: EOF */
}

static int stage_failed(const Stage *s) {
    return !(WIFEXITED(s->status) && WEXITSTATUS(s->status) == 0);
}

static void reap_stage(Process *p, int i) {
    Stage *s = &p->stages[i];
    if (s->reaped)
        return;
    pid_t r;
    do
        r = waitpid(s->pid, &s->status, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r == 0)
        return;
    if (r < 0)
        s->status = 0; /* already reaped by someone else: nothing to report */
    s->reaped = 1;
    close_fd(&s->pidfd);
    if (stage_failed(s) && p->failed_stage < 0) {
        p->failed_stage = i;
        /* pipefail: a failed stage must not leave the others hanging */
        if (p->nstages > 1) {
            for (int j = 0; j < p->nstages; j++)
                p->stages[j].pipefail_killed = !p->stages[j].reaped;
            kill(-p->pgid, SIGTERM);
        }
    }
}

static int all_reaped(Process *p) {
    for (int i = 0; i < p->nstages; i++)
        if (!p->stages[i].reaped)
            return 0;
    return 1;
}

/* After every stage exited: read what is left in the pipes without waiting for
 * an EOF that a grandchild (a daemon that inherited stdout) could hold off. */
static void drain_and_close(lua_State *L, Process *p) {
    Stream *streams[2] = {&p->out, &p->err};
    for (int k = 0; k < 2; k++) {
        Stream *s = streams[k];
        if (s->fd >= 0 && read_stream(L, p, s, k == 0 ? UV_STDOUT_FN : UV_STDERR_FN))
            close_fd(&s->fd);
        if (s->mode == OUT_LINES && s->len > 0)
            deliver_lines(L, p, s, k == 0 ? UV_STDOUT_FN : UV_STDERR_FN, 1);
    }
    close_fd(&p->in_fd);
}

/* Marks a process finished: captured output becomes strings in user values. */
static void finish(lua_State *L, Process *p) {
    if (p->finished)
        return;
    drain_and_close(L, p);
    p->finished = 1;
    push_active(L, p);
    if (!lua_isnil(L, -1)) {
        Stream *streams[2] = {&p->out, &p->err};
        for (int k = 0; k < 2; k++) {
            if (streams[k]->mode == OUT_CAPTURE) {
                lua_pushlstring(L, streams[k]->buf ? streams[k]->buf : "", streams[k]->len);
                lua_setiuservalue(L, -2, k == 0 ? UV_STDOUT : UV_STDERR);
            }
            free(streams[k]->buf);
            streams[k]->buf = NULL;
            streams[k]->len = streams[k]->cap = 0;
        }
    }
    lua_pop(L, 1);
    active_remove(L, p);
}

/*
 * One round of the poll loop over every active process of L's state: feeds
 * stdin, reads output, reaps children. Waits at most timeout_ms (-1: until
 * something happens). Raises on Ctrl-C.
 */
static void pump(lua_State *L, int timeout_ms) {
    ProcState *ps = proc_state(L);
    int n = 0;
    for (Process *p = ps->head; p; p = p->next)
        n += p->nstages + 3;
    if (n == 0)
        return;
    struct pollfd *fds = lua_newuserdatauv(L, sizeof *fds * (size_t)n, 0);
    Process **owner = lua_newuserdatauv(L, sizeof *owner * (size_t)n, 0); /* fds owner */
    int k = 0, no_pidfd = 0;
    for (Process *p = ps->head; p; p = p->next) {
        for (int i = 0; i < p->nstages; i++)
            if (!p->stages[i].reaped && p->stages[i].pidfd < 0)
                no_pidfd = 1;
            else if (!p->stages[i].reaped) {
                owner[k] = p;
                fds[k++] = (struct pollfd){p->stages[i].pidfd, POLLIN, 0};
            }
        if (p->out.fd >= 0) {
            owner[k] = p;
            fds[k++] = (struct pollfd){p->out.fd, POLLIN, 0};
        }
        if (p->err.fd >= 0) {
            owner[k] = p;
            fds[k++] = (struct pollfd){p->err.fd, POLLIN, 0};
        }
        if (p->in_fd >= 0 && p->in_off < p->in_len) { /* a kept pipe with nothing to write waits */
            owner[k] = p;
            fds[k++] = (struct pollfd){p->in_fd, POLLOUT, 0};
        }
    }
    if (no_pidfd && (timeout_ms < 0 || timeout_ms > POLL_EXIT_MS))
        timeout_ms = POLL_EXIT_MS;
    migrun_check_interrupt(L); /* one that came during the last round's callbacks */
    int r = poll(fds, (nfds_t)k, timeout_ms);
    if (no_pidfd)
        for (Process *p = ps->head; p; p = p->next)
            for (int i = 0; i < p->nstages; i++)
                if (p->stages[i].pidfd < 0)
                    reap_stage(p, i);
    if (r < 0 && errno != EINTR)
        luaL_error(L, "poll failed: %s", strerror(errno));
    migrun_check_interrupt(L);
    /* A stop request (SIGUSR1) waits while this round hands lines to their
     * callbacks: one cut in half would lose its line (the guard's reason). */
    migrun_hold_stop(L);
    for (int j = 0; r > 0 && j < k; j++) {
        if (fds[j].revents == 0)
            continue;
        Process *p = owner[j];
        if (p->closed || !active_contains(p))
            continue; /* closed by a callback during this round */
        int fd = fds[j].fd;
        if (fd == p->out.fd)
            read_stream(L, p, &p->out, UV_STDOUT_FN);
        else if (fd == p->err.fd)
            read_stream(L, p, &p->err, UV_STDERR_FN);
        else if (fd == p->in_fd)
            write_stdin(p);
        else
            for (int i = 0; i < p->nstages; i++)
                if (p->stages[i].pidfd == fd)
                    reap_stage(p, i);
    }
    lua_pop(L, 2);
    /* finalize outside the event loop, so no Process above is collected mid-round */
    Process *p = ps->head;
    while (p) {
        Process *next = p->next;
        if (!p->closed && all_reaped(p))
            finish(L, p);
        p = next;
    }
    migrun_release_stop(L);
}

/* ---- results ------------------------------------------------------------ */

/* Pushes true|nil, "exit"|"signal", code for a stage status (as os.execute). */
static int push_status(lua_State *L, int status) {
    if (WIFSIGNALED(status)) {
        lua_pushnil(L);
        lua_pushliteral(L, "signal");
        lua_pushinteger(L, WTERMSIG(status));
        return 3;
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 255;
    if (code == 0)
        lua_pushboolean(L, 1);
    else
        lua_pushnil(L);
    lua_pushliteral(L, "exit");
    lua_pushinteger(L, code);
    return 3;
}

/*
 * The status of a pipeline is that of its rightmost failed stage (bash's
 * pipefail), not counting the stages that only died of the failure of another:
 * those killed by SIGPIPE, and those we stopped with SIGTERM after it.
 */
static int decisive_stage(Process *p) {
    int any_failed = -1;
    for (int i = p->nstages - 1; i >= 0; i--) {
        const Stage *s = &p->stages[i];
        if (!stage_failed(s))
            continue;
        if (any_failed < 0)
            any_failed = i;
        int sig = WIFSIGNALED(s->status) ? WTERMSIG(s->status) : 0;
        if (sig == SIGPIPE || (sig == SIGTERM && s->pipefail_killed))
            continue;
        return i;
    }
    return any_failed >= 0 ? any_failed : p->nstages - 1;
}

static int push_result(lua_State *L, Process *p) {
    return push_status(L, p->stages[decisive_stage(p)].status);
}

/* ---- closing -------------------------------------------------------------- */

static int wait_pidfds(Process *p, int timeout_ms) {
    double deadline = migrun_monotonic() + timeout_ms / 1000.0;
    for (;;) {
        for (int i = 0; i < p->nstages; i++)
            reap_stage(p, i);
        if (all_reaped(p))
            return 1;
        int left = (int)((deadline - migrun_monotonic()) * 1000);
        if (left <= 0)
            return 0;
        struct pollfd fds[64];
        int k = 0;
        for (int i = 0; i < p->nstages && k < 64; i++)
            if (!p->stages[i].reaped && p->stages[i].pidfd >= 0)
                fds[k++] = (struct pollfd){p->stages[i].pidfd, POLLIN, 0};
        poll(fds, (nfds_t)k, left > 50 ? 50 : left);
    }
}

/* The one closer: kills what still runs (TERM, then KILL after a grace
 * period), reaps, closes and frees. Idempotent; also releases what a start()
 * that did not finish had opened (the handle is closed until it started). */
static void process_release(lua_State *L, Process *p) {
    if (!p->closed) {
        p->closed = 1; /* marked closed before anything is released */
        if (!all_reaped(p)) {
            kill(-p->pgid, SIGTERM);
            if (!wait_pidfds(p, 2000)) {
                kill(-p->pgid, SIGKILL);
                for (int i = 0; i < p->nstages; i++)
                    if (!p->stages[i].reaped) {
                        while (waitpid(p->stages[i].pid, &p->stages[i].status, 0) < 0 &&
                               errno == EINTR)
                            ;
                        p->stages[i].reaped = 1;
                    }
            }
        }
        for (int i = 0; i < p->nstages; i++)
            close_fd(&p->stages[i].pidfd);
        close_fd(&p->out.fd);
        close_fd(&p->err.fd);
        close_fd(&p->in_fd);
        active_remove(L, p);
    }
    stdio_close(&p->io);
    free(p->out.buf);
    free(p->err.buf);
    p->out.buf = p->err.buf = NULL;
    free(p->stages);
    p->stages = NULL;
    p->nstages = 0;
}

static Process *check_process(lua_State *L, int idx) {
    Process *p = luaL_checkudata(L, idx, PROC_MT);
    if (p->closed)
        luaL_error(L, "attempt to use a closed process handle");
    return p;
}

static int proc_gc(lua_State *L) {
    Process *p = luaL_checkudata(L, 1, PROC_MT);
    /* at lua_close the registry may already be gone: do not touch it then */
    process_release(active_contains(p) ? L : NULL, p);
    return 0;
}

/* h:close(): idempotent; kills and reaps a process that still runs */
static int proc_close(lua_State *L) {
    Process *p = luaL_checkudata(L, 1, PROC_MT);
    if (proc_state(L)->in_callback && !p->closed)
        return luaL_error(L, "cannot close a process from inside an output callback");
    process_release(L, p);
    return 0;
}

/* ---- spawning -------------------------------------------------------------
 * start() runs in three steps. parse_spec reads and checks the whole spec and
 * raises on misuse, but opens nothing. open_stdio opens every descriptor the
 * children will need and records each in the handle's Stdio the moment it is
 * open; if one cannot be opened it closes the others before reporting.
 * fork_exec starts the stages and hands the parent's ends of the pipes to the
 * handle. stdio_close, which the handle's closer also calls, closes whatever
 * the Stdio still holds, so no way out of start() leaves a descriptor open. */

typedef struct {
    int err; /* errno */
    int stage;
    char what[32];
} ExecFailure;

enum { IN_INHERIT, IN_NULL, IN_DATA, IN_FILE, IN_PIPE };

/* One output stream as the spec asks for it; nothing is open yet. */
typedef struct {
    int mode;         /* OUT_* */
    const char *path; /* OUT_FILE from {file = path}; anchored on the Lua stack */
    int append;
    FILE *file; /* OUT_FILE from an io file; the file is anchored on the Lua stack */
} OutSpec;

/* The whole spec, checked. Every pointer is anchored on the Lua stack of start(). */
typedef struct {
    int nstages;
    OutSpec out, err;
    int in_mode;         /* IN_* */
    const char *in_path; /* IN_FILE */
    const char *cwd;
    int die_with_parent;
    char **envp;
    char ***argvs;
} Spec;

/* Parses spec[key] (an output spec) into o; a function goes to user value uv
 * of the handle at ud. Leaves one value on the stack (the anchor of a path or
 * file). Raises on a bad spec. */
static void parse_output(lua_State *L, int spec, const char *key, OutSpec *o, int uv, int ud,
                         int allow_merge) {
    o->mode = OUT_INHERIT;
    o->path = NULL;
    o->append = 0;
    o->file = NULL;
    int t = lua_getfield(L, spec, key); /* ... value */
    if (t == LUA_TNIL) {
        /* inherit */
    } else if (t == LUA_TSTRING) {
        const char *m = lua_tostring(L, -1);
        if (strcmp(m, "capture") == 0)
            o->mode = OUT_CAPTURE;
        else if (strcmp(m, "null") == 0)
            o->mode = OUT_NULL;
        else if (strcmp(m, "inherit") == 0)
            o->mode = OUT_INHERIT;
        else if (allow_merge && strcmp(m, "stdout") == 0)
            o->mode = OUT_MERGE;
        else
            luaL_error(L,
                       "bad %s: expected \"capture\", \"null\", \"inherit\"%s, a function or "
                       "{file=path}, got \"%s\"",
                       key, allow_merge ? ", \"stdout\"" : "", m);
    } else if (t == LUA_TFUNCTION) {
        o->mode = OUT_LINES;
        lua_pushvalue(L, -1);
        lua_setiuservalue(L, ud, uv);
    } else if (t == LUA_TTABLE) {
        o->mode = OUT_FILE;
        lua_getfield(L, -1, "append");
        o->append = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (lua_getfield(L, -1, "file") != LUA_TSTRING) /* ... value path */
            luaL_error(L, "bad %s: {file = path} needs a path string", key);
        o->path = lua_tostring(L, -1);
        lua_remove(L, -2); /* ... path */
    } else if (t == LUA_TUSERDATA && luaL_testudata(L, -1, LUA_FILEHANDLE)) {
        luaL_Stream *fh = lua_touserdata(L, -1);
        if (fh->closef == NULL)
            luaL_error(L, "bad %s: the file is closed", key);
        o->mode = OUT_FILE;
        o->file = fh->f;
    } else {
        luaL_error(L, "bad %s: %s not supported", key, luaL_typename(L, -1));
    }
}

/* Builds a NULL-terminated char* array from the argv table at idx. Leaves two
 * values on the stack: the array and a table anchoring the argument strings. */
static char **build_argv(lua_State *L, int idx, int stage) {
    idx = lua_absindex(L, idx);
    lua_Integer n = luaL_len(L, idx);
    if (n < 1)
        luaL_error(L, "stage %d: argv is empty (expected {\"program\", args...})", stage);
    char **argv = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
    lua_createtable(L, (int)n, 0); /* argv anchor */
    for (lua_Integer i = 1; i <= n; i++) {
        int t = lua_geti(L, idx, i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "stage %d: argv[%d] is a %s, expected a string", stage, (int)i,
                       lua_typename(L, t));
        argv[i - 1] = (char *)lua_tostring(L, -1);
        lua_rawseti(L, -2, i);
    }
    argv[n] = NULL;
    return argv;
}

/* ---- the children's environment -----------------------------------------
 * A child gets an allow-list, not migrun's environment: a secret in a variable
 * nothing asked for (TARGET_PASSWORD while the conninfo holds the password, a
 * token of another tool) never reaches pg_dump, a pool worker or a notify
 * command. What a child gets, in order:
 *   - from migrun's environment, the names of the allow-list (ALLOW_BASE and
 *     what proc.allow added; "NAME*" is a prefix), the names listed in the
 *     spec's env array part (passed on by name: env = { "PGSSLMODE" }), or
 *     every name when spec.inherit_env is true (migrun running itself);
 *     never a withheld name (proc.withhold, WITHHELD_BASE), never one the
 *     spec's env names as a key;
 *   - then the spec's env keys: a string (or number) value set, false unset.
 * See docs/environment.md. */

/* What any program needs to run as the operator's: its programs and
 * libraries, locale and time zone, home and temporary directory, migrun's
 * own internal variables (MIGRUN_LUA_PATH: the children run the same Lua),
 * Lua's module paths and the sanitizers' options of a test build. */
static const char *const ALLOW_BASE[] = {
    "PATH",         "HOME",      "TMPDIR",          "TZ",           "LANG",
    "LANGUAGE",     "LC_*",      "LD_LIBRARY_PATH", "MIGRUN_*",     "LUA_PATH",
    "LUA_PATH_5_4", "LUA_CPATH", "LUA_CPATH_5_4",   "ASAN_OPTIONS", "UBSAN_OPTIONS",
    "LSAN_OPTIONS", NULL};

/* Never passed on by the allow-list or inherit_env, only by an explicit
 * env = { NAME = value }: secrets in migrun's own namespace. */
static const char *const WITHHELD_BASE[] = {"MIGRUN_DMS_EMULATOR_SECRET", NULL};

/* libpq's environment variables (https://www.postgresql.org/docs/current/libpq-envars.html)
 * but PGPASSWORD, for a child that connects to PostgreSQL as migrun does:
 * env = { table.unpack(proc.LIBPQ_ENV) }. A password goes to a child only
 * explicitly (env = { PGPASSWORD = pw } from the conninfo), never inherited. */
static const char LIBPQ_ENV[] =
    "PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSFILE PGSERVICE PGSERVICEFILE PGSYSCONFDIR "
    "PGOPTIONS PGAPPNAME PGSSLMODE PGREQUIRESSL PGSSLNEGOTIATION PGSSLCOMPRESSION PGSSLCERT "
    "PGSSLKEY PGSSLCERTMODE PGSSLROOTCERT PGSSLCRL PGSSLCRLDIR PGSSLSNI PGREQUIREPEER "
    "PGSSLMINPROTOCOLVERSION PGSSLMAXPROTOCOLVERSION PGGSSENCMODE PGKRBSRVNAME PGGSSLIB "
    "PGGSSDELEGATION PGREQUIREAUTH PGCHANNELBINDING PGCONNECT_TIMEOUT PGCLIENTENCODING "
    "PGTARGETSESSIONATTRS PGLOADBALANCEHOSTS PGDATESTYLE PGTZ PGGEQO PGLOCALEDIR";

/* Pushes the registry's set at key, made from base on first use. */
static void push_set(lua_State *L, const char *key, const char *const *base) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, key) == LUA_TTABLE)
        return;
    lua_pop(L, 1);
    lua_newtable(L);
    for (const char *const *n = base; *n; n++) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, *n);
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, key);
}

/* Whether the set at index set holds name[0..n): the name, or "PREFIX*".
 * Leaves the stack as it found it (build_env keeps its envp below). */
static int in_set(lua_State *L, int set, const char *name, size_t n) {
    lua_pushlstring(L, name, n);
    int hit = lua_rawget(L, set) != LUA_TNIL;
    lua_pop(L, 1);
    if (hit)
        return 1;
    lua_pushnil(L);
    while (lua_next(L, set)) {
        lua_pop(L, 1);
        size_t kl;
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &kl) : NULL;
        if (k && kl > 0 && k[kl - 1] == '*' && n >= kl - 1 && memcmp(name, k, kl - 1) == 0) {
            lua_pop(L, 1); /* the key: the traversal ends here */
            return 1;
        }
    }
    return 0;
}

/* A variable's name as the allow-list takes it: no '=', not empty; a '*' only
 * at its end (a prefix) when pattern. */
static int valid_name(const char *name, int pattern) {
    size_t n = strlen(name);
    if (n == 0 || strchr(name, '=') != NULL)
        return 0;
    const char *star = strchr(name, '*');
    return star == NULL || (pattern && star == name + n - 1 && n > 1);
}

/* envp for a child of the spec at index spec (see above). Leaves two values
 * on the stack: the envp array and a table anchoring its strings. */
static char **build_env(lua_State *L, int spec) {
    int top = lua_gettop(L);
    push_set(L, WITHHELD_KEY, WITHHELD_BASE); /* top+1 */
    push_set(L, ALLOW_KEY, ALLOW_BASE);       /* top+2 */
    lua_getfield(L, spec, "inherit_env");
    int inherit = lua_toboolean(L, -1);
    lua_pop(L, 1);
    int t = lua_getfield(L, spec, "env"); /* top+3 */
    if (t == LUA_TNIL) {
        lua_pop(L, 1);
        lua_newtable(L);
    } else if (t != LUA_TTABLE) {
        luaL_error(L, "bad env: expected a table, got %s", luaL_typename(L, -1));
    }
    int withheld = top + 1, allowed = top + 2, envt = top + 3;
    lua_newtable(L); /* top+4: the names passed on by name */
    int pass = top + 4;
    size_t extra = 0;
    lua_pushnil(L);
    while (lua_next(L, envt)) {
        if (lua_type(L, -2) == LUA_TNUMBER) {
            if (lua_type(L, -1) != LUA_TSTRING || !valid_name(lua_tostring(L, -1), 0))
                luaL_error(L, "bad env[%d]: expected the name of a variable to pass on",
                           (int)lua_tointeger(L, -2));
            lua_pushvalue(L, -1);
            lua_pushboolean(L, 1);
            lua_rawset(L, pass);
        } else if (lua_type(L, -2) != LUA_TSTRING) {
            luaL_error(L, "bad env: keys must be variable names (or a list of names to pass on)");
        } else if (lua_toboolean(L, -1) || lua_type(L, -1) != LUA_TBOOLEAN) {
            if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
                luaL_error(L, "bad env.%s: expected a string or false", lua_tostring(L, -2));
            extra++;
        }
        lua_pop(L, 1);
    }
    size_t n = 0;
    for (char **e = environ; *e; e++)
        n++;
    char **envp = lua_newuserdatauv(L, sizeof(char *) * (n + extra + 1), 0); /* top+5 */
    lua_newtable(L); /* top+6: keeps the "K=V" strings alive */
    int keep = top + 6;
    size_t k = 0;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL) {
            if (inherit)
                envp[k++] = *e;
            continue;
        }
        size_t len = (size_t)(eq - *e);
        lua_pushlstring(L, *e, len);
        int named = lua_rawget(L, envt) != LUA_TNIL; /* the spec sets or unsets it */
        lua_pushlstring(L, *e, len);
        int held = lua_rawget(L, withheld) != LUA_TNIL;
        lua_pushlstring(L, *e, len);
        int passed = lua_rawget(L, pass) != LUA_TNIL;
        lua_pop(L, 3);
        if (named || held)
            continue;
        if (inherit || passed || in_set(L, allowed, *e, len))
            envp[k++] = *e;
    }
    lua_pushnil(L);
    while (lua_next(L, envt)) {
        if (lua_type(L, -2) == LUA_TSTRING &&
            (lua_toboolean(L, -1) || lua_type(L, -1) != LUA_TBOOLEAN)) {
            lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
            envp[k++] = (char *)lua_tostring(L, -1);
            lua_rawseti(L, keep, (lua_Integer)k);
        }
        lua_pop(L, 1);
    }
    envp[k] = NULL;
    /* envp and keep stay, at top+1 and top+2 */
    lua_rotate(L, top + 1, 2);
    lua_settop(L, top + 2);
    return envp;
}

/* Step 1: reads and checks the spec at index spec into s, for the handle at
 * ud (callbacks, stdin data and the printable command go to its user values).
 * Raises on misuse; opens nothing; leaves its anchors on the stack. */
static void parse_spec(lua_State *L, int spec, int pipeline, int ud, Spec *s) {
    Process *p = lua_touserdata(L, ud);
    /* per stage: its table, argv array and anchor, its printed part and a " | " */
    luaL_checkstack(L, 5 * s->nstages + LUA_MINSTACK, "too many pipeline stages");
    parse_output(L, spec, "stdout", &s->out, UV_STDOUT_FN, ud, 0);
    parse_output(L, spec, "stderr", &s->err, UV_STDERR_FN, ud, 1);
    p->out.mode = s->out.mode;
    p->err.mode = s->err.mode;

    s->in_mode = IN_INHERIT;
    s->in_path = NULL;
    switch (lua_getfield(L, spec, "stdin")) { /* ... stdin */
    case LUA_TNIL:
        break;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, -1))
            luaL_error(L, "bad stdin: expected a string (data), false (/dev/null) or {file=path}");
        s->in_mode = IN_NULL;
        break;
    case LUA_TSTRING:
        s->in_mode = IN_DATA;
        lua_pushvalue(L, -1);
        lua_setiuservalue(L, ud, UV_STDIN_DATA);
        p->in_data = lua_tolstring(L, -1, &p->in_len);
        break;
    case LUA_TTABLE:
        if (lua_getfield(L, -1, "pipe") != LUA_TNIL) { /* ... stdin pipe */
            if (lua_toboolean(L, -1) != 1 || !lua_isboolean(L, -1))
                luaL_error(L, "bad stdin: {pipe = true} expected");
            s->in_mode = IN_PIPE;
            p->in_keep = 1;
            break;
        }
        lua_pop(L, 1);
        if (lua_getfield(L, -1, "file") != LUA_TSTRING) /* ... stdin path */
            luaL_error(L, "bad stdin: {file = path} or {pipe = true} needs a path string");
        s->in_mode = IN_FILE;
        s->in_path = lua_tostring(L, -1);
        break;
    default:
        luaL_error(L, "bad stdin: %s not supported", luaL_typename(L, -1));
    }

    /* die_with_parent: the kernel kills the child when migrun dies, even by
     * SIGKILL, so workers never outlive the run that owns their work */
    lua_getfield(L, spec, "die_with_parent");
    s->die_with_parent = lua_toboolean(L, -1);
    lua_pop(L, 1);
    /* wake: its lines end a wait, so that a parent acts on a worker's events
     * at once instead of polling for them */
    lua_getfield(L, spec, "wake");
    p->wake = lua_toboolean(L, -1);
    lua_pop(L, 1);

    s->cwd = NULL;
    if (lua_getfield(L, spec, "cwd") != LUA_TNIL)
        s->cwd = luaL_checkstring(L, -1); /* stays on the stack */
    s->envp = build_env(L, spec);         /* leaves its storage on the stack */

    s->argvs = lua_newuserdatauv(L, sizeof(char **) * (size_t)s->nstages, 0);
    for (int i = 0; i < s->nstages; i++) {
        if (pipeline) {
            lua_geti(L, spec, i + 1);
            s->argvs[i] = build_argv(L, -1, i + 1); /* stage array anchor stay on the stack */
        } else {
            s->argvs[i] = build_argv(L, spec, 1);
        }
    }

    /* printable command line, never the environment */
    int parts = 0;
    for (int i = 1; i <= s->nstages; i++) {
        if (i > 1) {
            lua_pushliteral(L, " | ");
            parts++;
        }
        if (pipeline)
            lua_geti(L, spec, i);
        else
            lua_pushvalue(L, spec);
        int argv_idx = lua_gettop(L);
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        quote_argv(L, &b, argv_idx);
        luaL_pushresult(&b);
        lua_remove(L, argv_idx);
        parts++;
    }
    lua_concat(L, parts);
    lua_setiuservalue(L, ud, UV_COMMAND);

    /* allocated before any descriptor is opened: running out of memory here leaks nothing */
    p->stages = calloc((size_t)s->nstages, sizeof(Stage));
    if (p->stages == NULL)
        luaL_error(L, "out of memory");
}

/* Opens what one output stream gives the child (a file, /dev/null, a dup of an
 * io file) into *child. Returns 0, or -1 with errno set. */
static int open_output(const OutSpec *o, int *child) {
    if (o->mode == OUT_FILE && o->path != NULL) {
        int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (o->append ? O_APPEND : O_TRUNC);
        *child = open(o->path, flags, 0640);
    } else if (o->mode == OUT_FILE) {
        fflush(o->file);
        *child = fcntl(fileno(o->file), F_DUPFD_CLOEXEC, 3);
    } else if (o->mode == OUT_NULL) {
        *child = open("/dev/null", O_WRONLY | O_CLOEXEC);
    } else {
        return 0;
    }
    return *child < 0 ? -1 : 0;
}

/* Raises the error of an output stream that could not be opened. */
static int output_error(lua_State *L, const OutSpec *o, const char *key, int err) {
    if (o->path != NULL)
        return luaL_error(L, "cannot open %s for %s: %s", o->path, key, strerror(err));
    if (o->mode == OUT_NULL)
        return luaL_error(L, "cannot open /dev/null: %s", strerror(err));
    return luaL_error(L, "cannot duplicate the file given as %s: %s", key, strerror(err));
}

static int wants_pipe(int mode) {
    return mode == OUT_CAPTURE || mode == OUT_LINES;
}

/* Step 2: opens every descriptor the children need into p->io. When one
 * cannot be opened, everything opened so far is closed first; then a file the
 * spec names raises (as a bad spec does) and a failing pipe2 pushes nil, err
 * and returns 2. Returns 0 when all is open. */
static int open_stdio(lua_State *L, Process *p, const Spec *s) {
    Stdio *io = &p->io;
    if (open_output(&s->out, &io->out_child) < 0) {
        int e = errno;
        stdio_close(io);
        return output_error(L, &s->out, "stdout", e);
    }
    if (open_output(&s->err, &io->err_child) < 0) {
        int e = errno;
        stdio_close(io);
        return output_error(L, &s->err, "stderr", e);
    }
    if (s->in_mode == IN_FILE || s->in_mode == IN_NULL) {
        io->in_child = open(s->in_path ? s->in_path : "/dev/null", O_RDONLY | O_CLOEXEC);
        if (io->in_child < 0) {
            int e = errno;
            stdio_close(io);
            if (s->in_path == NULL)
                return luaL_error(L, "cannot open /dev/null: %s", strerror(e));
            return luaL_error(L, "cannot open %s for stdin: %s", s->in_path, strerror(e));
        }
    }
    /* pipes: the parent's ends are close-on-exec (and made non-blocking later) */
    if ((wants_pipe(s->out.mode) && pipe2(io->out_pipe, O_CLOEXEC) < 0) ||
        (wants_pipe(s->err.mode) && pipe2(io->err_pipe, O_CLOEXEC) < 0) ||
        ((s->in_mode == IN_DATA || s->in_mode == IN_PIPE) && pipe2(io->in_pipe, O_CLOEXEC) < 0) ||
        pipe2(io->exec_pipe, O_CLOEXEC) < 0) {
        int e = errno;
        stdio_close(io);
        return migrun_error_return(L, "spawn", NULL, NULL,
                                   lua_pushfstring(L, "cannot create pipes: %s", strerror(e)));
    }
    return 0;
}

static void child_fail(int errfd, int stage, const char *what) {
    ExecFailure f = {errno, stage, {0}};
    strncpy(f.what, what, sizeof f.what - 1);
    ssize_t w = write(errfd, &f, sizeof f);
    (void)w;
    _exit(127);
}

/* In the child of stage i: wires up the descriptors and execs; never returns. */
static void exec_stage(Process *p, const Spec *s, int i, pid_t parent_pid) {
    /* only async-signal-safe calls from here */
    Stdio *io = &p->io;
    setpgid(0, i == 0 ? 0 : p->pgid);
    if (s->die_with_parent) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent_pid) /* the parent died before prctl */
            _exit(127);
    }
    signal(SIGPIPE, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int piped = s->in_mode == IN_DATA || s->in_mode == IN_PIPE;
    int fd_in = i == 0 ? (piped ? io->in_pipe[0] : io->in_child) : io->prev_read;
    int fd_out = i < s->nstages - 1        ? io->link[1]
                 : wants_pipe(s->out.mode) ? io->out_pipe[1]
                                           : io->out_child;
    int fd_err = wants_pipe(s->err.mode) ? io->err_pipe[1] : io->err_child;
    if (fd_in >= 0 && dup2(fd_in, 0) < 0)
        child_fail(io->exec_pipe[1], i, "dup2");
    if (fd_out >= 0 && dup2(fd_out, 1) < 0)
        child_fail(io->exec_pipe[1], i, "dup2");
    if (s->err.mode == OUT_MERGE) {
        if (dup2(1, 2) < 0)
            child_fail(io->exec_pipe[1], i, "dup2");
    } else if (fd_err >= 0 && dup2(fd_err, 2) < 0) {
        child_fail(io->exec_pipe[1], i, "dup2");
    }
    if (s->cwd && chdir(s->cwd) < 0)
        child_fail(io->exec_pipe[1], i, "chdir");
    environ = s->envp;
    execvp(s->argvs[i][0], s->argvs[i]);
    child_fail(io->exec_pipe[1], i, "exec");
}

/* fork or pipe2 failed with err: stops what was started, pushes nil, err. */
static int spawn_failed(lua_State *L, Process *p, const Spec *s, int err) {
    process_release(NULL, p); /* kills the stages already started, closes p->io */
    const char *prog = s->argvs[0][0];
    const char *msg = lua_pushfstring(L, "cannot start %s: %s", prog, strerror(err));
    return migrun_error_return(L, "spawn", prog, NULL, msg);
}

/* Step 3: forks and execs every stage. Leaves the handle (returns 1) or nil,
 * err (returns 2) on top of the stack. */
static int fork_exec(lua_State *L, Process *p, const Spec *s, int ud) {
    Stdio *io = &p->io;
    pid_t parent_pid = getpid();
    p->closed = 0; /* from here on the closer also kills and reaps what was started */
    p->nstages = 0;
    for (int i = 0; i < s->nstages; i++) {
        if (i < s->nstages - 1 && pipe2(io->link, O_CLOEXEC) < 0)
            goto spawn_fail_errno;
        pid_t pid = fork();
        if (pid < 0)
            goto spawn_fail_errno;
        if (pid == 0)
            exec_stage(p, s, i, parent_pid);
        if (i == 0)
            p->pgid = pid;
        setpgid(pid, p->pgid); /* also in the parent: no race with kill(-pgid) */
        p->stages[i].pid = pid;
        p->stages[i].pidfd = pidfd_open(pid);
        p->nstages = i + 1;
        close_fd(&io->prev_read);
        close_fd(&io->link[1]);
        io->prev_read = io->link[0];
        io->link[0] = -1;
    }
    /* the parent's ends go to the handle; the children's ends are closed */
    p->out.fd = io->out_pipe[0];
    p->err.fd = io->err_pipe[0];
    p->in_fd = io->in_pipe[1];
    io->out_pipe[0] = io->err_pipe[0] = io->in_pipe[1] = -1;
    int exec_read = io->exec_pipe[0];
    io->exec_pipe[0] = -1;
    stdio_close(io);

    /* did every exec succeed? the error pipe closes on exec, or carries errno */
    ExecFailure f;
    ssize_t got;
    do
        got = read(exec_read, &f, sizeof f);
    while (got < 0 && errno == EINTR);
    close(exec_read);
    if (p->out.fd >= 0)
        fcntl(p->out.fd, F_SETFL, O_NONBLOCK);
    if (p->err.fd >= 0)
        fcntl(p->err.fd, F_SETFL, O_NONBLOCK);
    if (p->in_fd >= 0)
        fcntl(p->in_fd, F_SETFL, O_NONBLOCK);
    if (got == (ssize_t)sizeof f) {
        process_release(NULL, p);
        const char *prog = s->argvs[f.stage][0];
        const char *msg =
            strcmp(f.what, "chdir") == 0
                ? lua_pushfstring(L, "cannot run %s: cannot change directory to %s: %s", prog,
                                  s->cwd, strerror(f.err))
                : lua_pushfstring(L, "cannot run %s: %s", prog, strerror(f.err));
        migrun_error_return(L, "spawn", NULL, NULL, msg);
        migrun_setfield(L, -1, "program", prog);
        lua_pushinteger(L, f.err);
        lua_setfield(L, -2, "errno");
        return 2;
    }
    if (p->in_len == 0 && !p->in_keep)
        close_fd(&p->in_fd); /* empty stdin data: EOF at once */
    lua_settop(L, ud);
    active_add(L, p, ud);
    return 1;

spawn_fail_errno:
    return spawn_failed(L, p, s, errno);
}

/* A child's exit status exists only while SIGCHLD is not ignored (see the top). */
static int sigchld_ignored(void) {
    struct sigaction sa;
    if (sigaction(SIGCHLD, NULL, &sa) != 0)
        return 0;
    return (sa.sa_flags & SA_NOCLDWAIT) != 0 ||
           (!(sa.sa_flags & SA_SIGINFO) && sa.sa_handler == SIG_IGN);
}

/*
 * Starts a Process from spec at idx: either one argv (spec[1] is a string) or
 * a pipeline (spec[1] is a table). Pushes the handle or nil, err.
 */
static int start(lua_State *L, int spec, int pipeline) {
    luaL_checktype(L, spec, LUA_TTABLE);
    Spec s;
    s.nstages = 1;
    if (pipeline) {
        lua_Integer n = luaL_len(L, spec);
        if (n < 1)
            return luaL_error(L, "pipeline needs at least one stage");
        if (n > INT_MAX / 8) /* parse_spec checks the stack has room for them all */
            return luaL_error(L, "too many pipeline stages");
        s.nstages = (int)n;
        for (int i = 1; i <= s.nstages; i++)
            if (lua_geti(L, spec, i) != LUA_TTABLE)
                return luaL_error(L, "pipeline stage %d is not an argv table", i);
            else
                lua_pop(L, 1);
    } else if (lua_geti(L, spec, 1) != LUA_TSTRING) {
        return luaL_error(L, "spawn expects {\"program\", args..., options}, got %s as the program",
                          luaL_typename(L, -1));
    } else {
        lua_pop(L, 1);
    }

    /* the handle is born closed, with its metatable, before anything is opened */
    Process *p = lua_newuserdatauv(L, sizeof *p, UV_COUNT); /* ud */
    memset(p, 0, sizeof *p);
    p->closed = 1;
    p->in_fd = p->out.fd = p->err.fd = -1;
    stdio_init(&p->io);
    p->failed_stage = -1;
    luaL_setmetatable(L, PROC_MT);
    int ud = lua_gettop(L);
    p->owner = proc_state(L);

    parse_spec(L, spec, pipeline, ud, &s);
    if (sigchld_ignored())
        return migrun_error_return(
            L, "spawn", NULL, "SIGCHLD",
            "SIGCHLD is ignored in this process (SIG_IGN or SA_NOCLDWAIT): the kernel would reap "
            "the children and lose their exit status; the host must give SIGCHLD its default "
            "disposition (signal(SIGCHLD, SIG_DFL)) before migrun starts children");
    if (open_stdio(L, p, &s) != 0)
        return 2; /* nil, err */
    return fork_exec(L, p, &s, ud);
}

/* proc.spawn{ argv..., env=, inherit_env=, cwd=, stdin=, stdout=, stderr= } -> handle | nil, err */
static int proc_spawn(lua_State *L) {
    return start(L, 1, 0);
}

/* proc.pipeline{ {argv}, {argv}, ..., stdout=, stderr=, stdin=, env=, cwd= } */
static int proc_pipeline(lua_State *L) {
    return start(L, 1, 1);
}

/* Runs the poll loop until p finishes or the deadline passes. Returns 1 if
 * finished, 0 at the deadline, WOKEN once a line of one of them spawned with
 * wake = true was delivered (in this wait, or in another since a wait for it
 * last returned). A wait for other processes is not woken by its lines. */
enum { WOKEN = -1 };
static int wait_for(lua_State *L, Process **ps, int n, double timeout, int *which) {
    if (proc_state(L)->in_callback)
        luaL_error(L, "cannot wait from inside an output callback");
    double deadline = timeout >= 0 ? migrun_monotonic() + timeout : -1;
    for (;;) {
        int woken = 0;
        for (int i = 0; i < n; i++) {
            if (ps[i]->finished) {
                *which = i;
                return 1;
            }
            woken |= ps[i]->woken;
        }
        if (woken) {
            for (int i = 0; i < n; i++)
                ps[i]->woken = 0;
            return WOKEN;
        }
        int ms = -1;
        if (deadline >= 0) {
            double left = deadline - migrun_monotonic();
            if (left <= 0)
                return 0;
            ms = (int)(left * 1000) + 1;
        }
        pump(L, ms);
    }
}

static double opt_timeout(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx))
        return -1;
    double t = (double)luaL_checknumber(L, idx);
    luaL_argcheck(L, t >= 0, idx, "timeout must not be negative");
    return t;
}

/* nil, "timeout" | nil, "woken" for a wait that did not end in an exit */
static int push_unfinished(lua_State *L, int r) {
    lua_pushnil(L);
    if (r == WOKEN)
        lua_pushliteral(L, "woken");
    else
        lua_pushliteral(L, "timeout");
    return 2;
}

/* h:wait([timeout_s]) -> true|nil, "exit"|"signal", code | nil, "timeout" | nil, "woken" */
static int proc_wait(lua_State *L) {
    Process *p = check_process(L, 1);
    double timeout = opt_timeout(L, 2);
    int which;
    int r = wait_for(L, &p, 1, timeout, &which);
    if (r != 1)
        return push_unfinished(L, r);
    return push_result(L, p);
}

/* proc.wait_any(handles, [timeout]) -> handle, ok, how, code | nil, "timeout" */
static int proc_wait_any(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    double timeout = opt_timeout(L, 2);
    int n = (int)luaL_len(L, 1);
    luaL_argcheck(L, n > 0, 1, "no handles to wait for");
    Process **ps = lua_newuserdatauv(L, sizeof *ps * (size_t)n, 0);
    for (int i = 0; i < n; i++) {
        lua_geti(L, 1, i + 1);
        ps[i] = check_process(L, -1);
        lua_pop(L, 1);
    }
    int which;
    int r = wait_for(L, ps, n, timeout, &which);
    if (r != 1)
        return push_unfinished(L, r);
    lua_geti(L, 1, which + 1);
    return 1 + push_result(L, ps[which]);
}

/* h:kill([sig]) -> true | nil, err: signals the whole process group */
static int proc_kill(lua_State *L) {
    Process *p = check_process(L, 1);
    int sig = check_signal(L, 2);
    if (all_reaped(p) || p->finished) {
        lua_pushboolean(L, 1); /* already gone: nothing to do */
        return 1;
    }
    if (kill(-p->pgid, sig) < 0 && errno != ESRCH)
        return migrun_error_return(L, "spawn", NULL, NULL, strerror(errno));
    lua_pushboolean(L, 1);
    return 1;
}

/* h:send(data) -> true | nil, err: more for the stdin of a child spawned
 * with stdin = {pipe = true}, written as the child reads it (never waits);
 * err when its stdin is closed (h:close_stdin, or the child stopped reading). */
static int proc_send(lua_State *L) {
    Process *p = check_process(L, 1);
    luaL_checktype(L, 2, LUA_TSTRING);
    if (!p->in_keep)
        return luaL_error(
            L, "h:send needs a process spawned with stdin = {pipe = true}, its stdin still open");
    if (p->in_fd < 0)
        return migrun_error_return(
            L, "spawn", NULL, NULL,
            lua_pushliteral(L, "the child's stdin is closed: it stopped reading or exited"));
    if (p->in_off < p->in_len) { /* what is still unwritten, then data */
        lua_pushlstring(L, p->in_data + p->in_off, p->in_len - p->in_off);
        lua_pushvalue(L, 2);
        lua_concat(L, 2);
    } else {
        lua_pushvalue(L, 2);
    }
    p->in_data = lua_tolstring(L, -1, &p->in_len);
    p->in_off = 0;
    lua_setiuservalue(L, 1, UV_STDIN_DATA); /* anchors in_data */
    write_stdin(p);
    lua_pushboolean(L, 1);
    return 1;
}

/* h:close_stdin(): the child reads EOF once what was sent is written. Idempotent. */
static int proc_close_stdin(lua_State *L) {
    Process *p = check_process(L, 1);
    p->in_keep = 0;
    if (p->in_off >= p->in_len)
        close_fd(&p->in_fd);
    return 0;
}

/* h:statuses() -> { {ok, how, code, pid}, ... } one per stage (after wait) */
static int proc_statuses(lua_State *L) {
    Process *p = check_process(L, 1);
    lua_createtable(L, p->nstages, 0);
    for (int i = 0; i < p->nstages; i++) {
        lua_createtable(L, 0, 4);
        if (p->stages[i].reaped) {
            push_status(L, p->stages[i].status); /* t st ok how code */
            lua_setfield(L, -4, "code");
            lua_setfield(L, -3, "how");
            lua_setfield(L, -2, "ok");
        } else {
            lua_pushliteral(L, "running");
            lua_setfield(L, -2, "how");
        }
        lua_pushinteger(L, p->stages[i].pid);
        lua_setfield(L, -2, "pid");
        lua_seti(L, -2, i + 1);
    }
    return 1;
}

static int proc_command(lua_State *L) {
    luaL_checkudata(L, 1, PROC_MT);
    lua_getiuservalue(L, 1, UV_COMMAND);
    return 1;
}

static int proc_tostring(lua_State *L) {
    Process *p = luaL_checkudata(L, 1, PROC_MT);
    lua_getiuservalue(L, 1, UV_COMMAND);
    const char *cmd = lua_tostring(L, -1);
    if (p->closed)
        lua_pushfstring(L, PROC_MT " (closed): %s", cmd ? cmd : "");
    else if (!p->finished)
        lua_pushfstring(L, PROC_MT " (pid %d, running): %s", (int)p->pgid, cmd);
    else {
        push_result(L, p); /* ok how code */
        lua_pushfstring(L, PROC_MT " (pid %d, %s %d): %s", (int)p->pgid, lua_tostring(L, -2),
                        (int)lua_tointeger(L, -1), cmd);
    }
    return 1;
}

/* fields: pid, stdout, stderr, running; and the methods */
static int proc_index(lua_State *L) {
    Process *p = luaL_checkudata(L, 1, PROC_MT);
    const char *key = luaL_checkstring(L, 2);
    if (strcmp(key, "pid") == 0) {
        lua_pushinteger(L, p->pgid);
        return 1;
    }
    if (strcmp(key, "running") == 0) {
        lua_pushboolean(L, !p->closed && !p->finished);
        return 1;
    }
    if (strcmp(key, "stdout") == 0 || strcmp(key, "stderr") == 0) {
        int out = key[3] == 'o';
        Stream *s = out ? &p->out : &p->err;
        if (p->finished) {
            lua_getiuservalue(L, 1, out ? UV_STDOUT : UV_STDERR);
        } else if (!p->closed && s->mode == OUT_CAPTURE) {
            lua_pushlstring(L, s->buf ? s->buf : "", s->len); /* so far */
        } else {
            lua_pushnil(L);
        }
        return 1;
    }
    luaL_getmetatable(L, PROC_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, key);
    return 1;
}

/* proc.run{ argv..., timeout = s, ... } -> ok, how, code, stdout, stderr
 * Output is captured unless the spec says otherwise; a timeout kills the group. */
static int proc_run(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    double timeout = -1;
    if (lua_getfield(L, 1, "timeout") != LUA_TNIL)
        timeout = (double)luaL_checknumber(L, -1);
    lua_pop(L, 1);
    /* a shallow copy, so the caller's table is not changed */
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, 2);
    }
    const char *streams[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++)
        if (lua_getfield(L, 2, streams[i]) == LUA_TNIL) {
            lua_pushliteral(L, "capture");
            lua_setfield(L, 2, streams[i]);
        }
    lua_settop(L, 2);
    int nres = start(L, 2, 0);
    if (nres == 2)
        return 2; /* nil, err */
    Process *p = lua_touserdata(L, -1);
    p->wake = 0; /* run waits for the exit alone */
    int ud = lua_gettop(L);
    int which;
    if (!wait_for(L, &p, 1, timeout, &which)) {
        process_release(L, p);
        lua_pushnil(L);
        lua_pushliteral(L, "timeout");
        return 2;
    }
    push_result(L, p);
    lua_getiuservalue(L, ud, UV_STDOUT);
    lua_getiuservalue(L, ud, UV_STDERR);
    return 5;
}

/* Adds the names of the list at index 1 to the set at key (base on first use). */
static void add_names(lua_State *L, const char *key, const char *const *base, int pattern,
                      const char *what) {
    luaL_checktype(L, 1, LUA_TTABLE);
    push_set(L, key, base);
    lua_Integer n = luaL_len(L, 1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, 1, i);
        const char *name = luaL_checkstring(L, -1);
        luaL_argcheck(L, valid_name(name, pattern), 1, what);
        lua_pushboolean(L, 1);
        lua_rawset(L, -3);
    }
}

/* proc.withhold{ "NAME", ... }: from now on no child gets these variables
 * from migrun's environment, even by the allow-list or inherit_env (a secret
 * the run holds, such as the AWS secret key, stays out of a then-run's
 * children); a spec's env = { NAME = value } still passes one on purpose. */
static int proc_withhold(lua_State *L) {
    add_names(L, WITHHELD_KEY, WITHHELD_BASE, 0, "environment variable names expected");
    return 0;
}

/* proc.allow{ "NAME", "PREFIX*", ... }: adds names (or prefixes) to the
 * allow-list every later child gets from migrun's environment (a team's
 * KRB5CCNAME for GSSAPI, SSL_CERT_FILE...). */
static int proc_allow(lua_State *L) {
    add_names(L, ALLOW_KEY, ALLOW_BASE, 1, "environment variable names (or \"PREFIX*\") expected");
    return 0;
}

/* The sorted names of the set at key. */
static int list_set(lua_State *L, const char *key, const char *const *base) {
    lua_newtable(L); /* list */
    push_set(L, key, base);
    lua_Integer k = 0;
    lua_pushnil(L);
    while (lua_next(L, -2)) { /* list set name true */
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_rawseti(L, -4, ++k);
    }
    lua_pop(L, 1);
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "sort");
    lua_pushvalue(L, -3);
    lua_call(L, 1, 0);
    lua_pop(L, 1);
    return 1;
}

/* proc.withheld() -> the sorted names withheld */
static int proc_withheld(lua_State *L) {
    return list_set(L, WITHHELD_KEY, WITHHELD_BASE);
}

/* proc.allowed() -> the sorted allow-list ("PREFIX*" for prefixes) */
static int proc_allowed(lua_State *L) {
    return list_set(L, ALLOW_KEY, ALLOW_BASE);
}

/* proc.environment([spec]) -> { NAME = value }: the environment a child of
 * this spec would get (its env, inherit_env), to look at or to test. */
static int proc_environment(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    char **envp = build_env(L, 1); /* spec envp keep */
    lua_newtable(L);
    for (char **e = envp; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL)
            continue;
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        lua_pushstring(L, eq + 1);
        lua_rawset(L, -3);
    }
    return 1;
}

int luaopen_migrun_proc(lua_State *L) {
    /* clang-format off */
    static const luaL_Reg methods[] = {
        {"wait", proc_wait},
        {"kill", proc_kill},
        {"close", proc_close},
        {"command", proc_command},
        {"statuses", proc_statuses},
        {"send", proc_send},
        {"close_stdin", proc_close_stdin},
        {NULL, NULL},
    };
    static const luaL_Reg meta[] = {
        {"__index", proc_index},
        {"__gc", proc_gc},
        {"__close", proc_gc},
        {"__tostring", proc_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"spawn", proc_spawn},
        {"pipeline", proc_pipeline},
        {"run", proc_run},
        {"wait_any", proc_wait_any},
        {"quote", proc_quote},
        {"withhold", proc_withhold},
        {"withheld", proc_withheld},
        {"allow", proc_allow},
        {"allowed", proc_allowed},
        {"environment", proc_environment},
        {NULL, NULL},
    };
    /* clang-format on */
    /* a child that exits before reading its stdin must not kill migrun */
    signal(SIGPIPE, SIG_IGN);
    luaL_newmetatable(L, PROC_MT);
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
    lua_pop(L, 1);
    luaL_newlib(L, funcs);
    lua_newtable(L); /* LIBPQ_ENV, one name a word */
    lua_Integer n = 0;
    for (const char *w = LIBPQ_ENV; *w;) {
        size_t len = strcspn(w, " ");
        lua_pushlstring(L, w, len);
        lua_rawseti(L, -2, ++n);
        w += len;
        w += strspn(w, " ");
    }
    lua_setfield(L, -2, "LIBPQ_ENV");
    return 1;
}
