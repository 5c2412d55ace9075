/*
 * migrun.pg.core: the libpq binding. This file owns the connection handle
 * (migrun.pg.Conn: a PGconn opened without blocking so Ctrl-C and timeouts
 * reach it, its notices, its client-side statement timeout), the result handle
 * (migrun.pg.Result: a PGresult freed by __gc, holding its connection through
 * a user value, turning rows into Lua tables with lossless type conversion),
 * the pg.null sentinel, quoting, and the structured errors built from server
 * error fields. Every wait polls the socket, so a statement can be cancelled
 * (PQcancel) on timeout or Ctrl-C and the connection brought back to idle
 * before the error reaches Lua. COPY (conn:copy_out, conn:copy_in, pg.copy)
 * lives in pg_copy.c, which shares this file's helpers through
 * pg_internal.h. lua/migrun/base/pg.lua wraps this module (transaction(), file
 * sinks/sources).
 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "migrun_internal.h"
#include "pg_internal.h"

#define RESULT_MT "migrun.pg.Result"
#define NULL_MT "migrun.pg.Null"
#define NULL_KEY "migrun.pg.null"
#define LSNPARSE_KEY "migrun.pg.lsn_parse"

#define CONNECT_TIMEOUT 10.0 /* seconds, when opts.connect_timeout is not given */
#define DRAIN_TIMEOUT 15.0   /* seconds to bring a connection back to idle after a cancel */
#define CANCEL_TIMEOUT 5     /* seconds a cancel request may take (it is abandoned then) */
#define POLL_SLICE_MS 250    /* poll at most this long so a missed EINTR is noticed anyway */

/* Type OIDs (pg_type.dat) of the types converted to something other than text. */
#define BOOLOID 16
#define BYTEAOID 17
#define INT8OID 20
#define INT2OID 21
#define INT4OID 23
#define OIDOID 26
#define FLOAT4OID 700
#define FLOAT8OID 701
#define PG_LSNOID 3220

/* A server notice waiting to be handed to the Lua handler (fields point into data[]). */
typedef struct notice_rec {
    struct notice_rec *next;
    const char *field[7]; /* severity sqlstate message detail hint context full */
    char data[];
} notice_rec;

static const char *const notice_keys[7] = {"severity", "sqlstate", "message", "detail",
                                           "hint",     "context",  "text"};
static const int notice_codes[6] = {PG_DIAG_SEVERITY_NONLOCALIZED, PG_DIAG_SQLSTATE,
                                    PG_DIAG_MESSAGE_PRIMARY,       PG_DIAG_MESSAGE_DETAIL,
                                    PG_DIAG_MESSAGE_HINT,          PG_DIAG_CONTEXT};

/* ---- waiting ------------------------------------------------------------ */

/*
 * poll() the fds until one is ready, the deadline (<0: none) passes, or Ctrl-C
 * is pressed (only when interruptible). Polls in slices so a signal that
 * arrives just before poll() is still noticed.
 */
int pg_wait_fds(struct pollfd *fds, int nfds, double deadline, int interruptible) {
    for (;;) {
        if (interruptible && migrun_interrupt_pending)
            return W_INTR;
        int ms = POLL_SLICE_MS;
        if (deadline >= 0) {
            double left = deadline - migrun_monotonic();
            if (left <= 0)
                return W_TIMEOUT;
            if (left * 1000 < ms)
                ms = (int)(left * 1000) + 1;
        }
        int rc = poll(fds, (nfds_t)nfds, ms);
        if (rc > 0)
            return W_READY;
        if (rc < 0 && errno != EINTR)
            return W_ERR;
    }
}

int pg_wait_sock(PGconn *conn, short events, double deadline, int interruptible) {
    struct pollfd p = {.fd = PQsocket(conn), .events = events, .revents = 0};
    if (p.fd < 0)
        return W_ERR;
    return pg_wait_fds(&p, 1, deadline, interruptible);
}

/* Sends everything libpq has queued, reading input meanwhile (so the server never blocks on us). */
int pg_conn_flush(PGconn *conn, double deadline, int interruptible) {
    for (;;) {
        int r = PQflush(conn);
        if (r == 0)
            return W_READY;
        if (r < 0)
            return W_ERR;
        int w = pg_wait_sock(conn, POLLIN | POLLOUT, deadline, interruptible);
        if (w != W_READY)
            return w;
        if (!PQconsumeInput(conn))
            return W_ERR;
    }
}

/* Waits until PQgetResult will not block. */
int pg_conn_wait_result(PGconn *conn, double deadline, int interruptible) {
    int w = pg_conn_flush(conn, deadline, interruptible);
    if (w != W_READY)
        return w;
    while (PQisBusy(conn)) {
        w = pg_wait_sock(conn, POLLIN, deadline, interruptible);
        if (w != W_READY)
            return w;
        if (!PQconsumeInput(conn))
            return W_ERR;
    }
    return W_READY;
}

/*
 * Asks the server to cancel the running command. PQcancel opens a separate
 * connection and blocks until the server closes it, with no timeout of its own
 * (libpq 15): against a server that accepts and never answers (a stalled
 * network path, a frozen host) it would block forever. It runs in a thread
 * of its own, with every signal blocked there so that Ctrl-C still reaches
 * the main thread, and is waited for at most CANCEL_TIMEOUT; a cancel still
 * blocked then is abandoned (the thread frees its request when it ends).
 */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t done_cond;
    int done, abandoned;
    PGcancel *k;
} cancel_req;

static void cancel_req_free(cancel_req *r) {
    PQfreeCancel(r->k);
    pthread_cond_destroy(&r->done_cond);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

static void *cancel_thread(void *arg) {
    cancel_req *r = arg;
    char errbuf[256];
    PQcancel(r->k, errbuf, sizeof errbuf);
    pthread_mutex_lock(&r->lock);
    r->done = 1;
    int abandoned = r->abandoned;
    pthread_cond_signal(&r->done_cond);
    pthread_mutex_unlock(&r->lock);
    if (abandoned)
        cancel_req_free(r);
    return NULL;
}

int pg_conn_cancel(PGconn *conn) {
    PGcancel *k = conn ? PQgetCancel(conn) : NULL;
    if (k == NULL)
        return 0;
    cancel_req *r = calloc(1, sizeof *r);
    if (r == NULL) {
        PQfreeCancel(k);
        return 0;
    }
    r->k = k;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->done_cond, NULL);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    int started = pthread_create(&t, NULL, cancel_thread, r) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!started) {
        cancel_req_free(r);
        return 0;
    }
    pthread_detach(t);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)CANCEL_TIMEOUT;
    pthread_mutex_lock(&r->lock);
    while (!r->done)
        if (pthread_cond_timedwait(&r->done_cond, &r->lock, &until) == ETIMEDOUT)
            break;
    int done = r->done;
    r->abandoned = !done;
    pthread_mutex_unlock(&r->lock);
    if (done)
        cancel_req_free(r);
    return done ? 1 : -1;
}

/* ---- notices ------------------------------------------------------------ */

static void notice_receiver(void *arg, const PGresult *r) {
    pg_Conn *c = arg;
    if (!c->has_handler) { /* default: stderr, prefixed with the connection name */
        fprintf(stderr, "[%s] %s", c->name, PQresultErrorMessage(r));
        return;
    }
    const char *f[7];
    size_t len = 0;
    for (int i = 0; i < 7; i++) {
        f[i] = i < 6 ? PQresultErrorField(r, notice_codes[i]) : PQresultErrorMessage(r);
        if (f[i] != NULL)
            len += strlen(f[i]) + 1;
    }
    notice_rec *n = malloc(sizeof *n + len);
    if (n == NULL) {
        fprintf(stderr, "[%s] %s", c->name, PQresultErrorMessage(r));
        return;
    }
    n->next = NULL;
    char *p = n->data;
    for (int i = 0; i < 7; i++) {
        n->field[i] = NULL;
        if (f[i] != NULL) {
            size_t l = strlen(f[i]);
            if (i == 6 && l > 0 && f[i][l - 1] == '\n')
                l--;
            memcpy(p, f[i], l);
            p[l] = '\0';
            n->field[i] = p;
            p += l + 1;
        }
    }
    if (c->ntail)
        c->ntail->next = n;
    else
        c->nhead = n;
    c->ntail = n;
}

static void free_notices(pg_Conn *c) {
    while (c->nhead) {
        notice_rec *n = c->nhead;
        c->nhead = n->next;
        free(n);
    }
    c->ntail = NULL;
}

const char *pg_conn_where(pg_Conn *c, char *buf, size_t size) {
    if (c->pid > 0)
        snprintf(buf, size, "%s %d", c->name, c->pid);
    else
        snprintf(buf, size, "%s", c->name);
    return buf;
}

/* Hands queued notices to the handler (user value 1 of the Conn at idx). Stack balanced. */
void pg_dispatch_notices(lua_State *L, int idx, pg_Conn *c) {
    idx = lua_absindex(L, idx);
    char where[96];
    while (c->nhead) {
        notice_rec *n = c->nhead;
        lua_getiuservalue(L, idx, 1); /* handler */
        migrun_error_push(L, "notice", pg_conn_where(c, where, sizeof where), n->field[1],
                          n->field[2] ? n->field[2] : n->field[6]); /* handler notice */
        for (int i = 0; i < 7; i++)
            if (i != 2)
                migrun_setfield(L, -1, notice_keys[i], n->field[i]);
        migrun_setfield(L, -1, "conn", c->name);
        c->nhead = n->next; /* everything copied: unlink before calling Lua */
        if (c->nhead == NULL)
            c->ntail = NULL;
        free(n);
        if (lua_isfunction(L, -2))
            lua_call(L, 1, 0);
        else
            lua_pop(L, 2);
    }
}

/* ---- handles -------------------------------------------------------------- */

/* The one closer: marks closed first, then releases. Idempotent. */
static void conn_release(pg_Conn *c) {
    PGconn *conn = c->conn;
    c->conn = NULL;
    if (conn != NULL)
        PQfinish(conn);
    if (c->scratch) {
        PQfreemem(c->scratch);
        c->scratch = NULL;
    }
    free_notices(c);
}

void pg_conn_close(pg_Conn *c) {
    conn_release(c);
}

static int conn_gc(lua_State *L) {
    conn_release(luaL_checkudata(L, 1, CONN_MT));
    return 0;
}

static pg_Conn *check_conn(lua_State *L, int idx) {
    pg_Conn *c = luaL_checkudata(L, idx, CONN_MT);
    if (c->conn == NULL)
        luaL_error(L, "attempt to use a closed connection");
    if (c->scratch) {
        PQfreemem(c->scratch);
        c->scratch = NULL;
    }
    return c;
}

/* A connection must be idle to start a command (a callback may try to reuse one mid-COPY). */
pg_Conn *pg_check_idle(lua_State *L, int idx) {
    pg_Conn *c = check_conn(L, idx);
    if (PQtransactionStatus(c->conn) == PQTRANS_ACTIVE)
        luaL_error(L, "connection %s is busy (a command or COPY is in progress on it)", c->name);
    return c;
}

/* Pushes a Result holding nothing yet, keeping the Conn at conn_idx alive. */
pg_Result *pg_result_new(lua_State *L, int conn_idx) {
    conn_idx = lua_absindex(L, conn_idx);
    pg_Result *r = lua_newuserdatauv(L, sizeof *r, 1);
    r->res = NULL;
    luaL_setmetatable(L, RESULT_MT);
    lua_pushvalue(L, conn_idx);
    lua_setiuservalue(L, -2, 1);
    return r;
}

void pg_result_set(pg_Result *r, PGresult *res) {
    if (r->res)
        PQclear(r->res);
    r->res = res;
}

static int result_gc(lua_State *L) {
    pg_Result *r = luaL_checkudata(L, 1, RESULT_MT);
    pg_result_set(r, NULL);
    return 0;
}

/* ---- errors --------------------------------------------------------------- */

/* Copies s into buf, turning the line breaks of libpq messages into spaces, trimming the end. */
static const char *one_line(const char *s, char *buf, size_t size) {
    size_t j = 0;
    int space = 0;
    for (size_t i = 0; s[i] && j + 1 < size; i++) {
        if (s[i] == '\n' || s[i] == '\t' || s[i] == '\r') {
            space = 1;
            continue;
        }
        if (space && j > 0)
            buf[j++] = ' ';
        space = 0;
        if (j + 1 < size)
            buf[j++] = s[i];
    }
    buf[j] = '\0';
    return buf;
}

/*
 * A connection that was up and is gone (the server restarted or crashed, the
 * network or tcp_user_timeout ended it, migrun closed it after a stall):
 * whatever the server said last, the error says so in the same words for
 * every caller: kind "connection", lost = true, the message prefixed with
 * "connection lost: " and a hint. A failed connect is not "lost".
 */
int pg_mark_lost(lua_State *L, pg_Conn *c) {
    if (c->pid <= 0 || (c->conn != NULL && PQstatus(c->conn) != CONNECTION_BAD))
        return 0;
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "lost");
    migrun_setfield(L, -1, "kind", "connection");
    if (lua_getfield(L, -1, "message") == LUA_TSTRING &&
        strncmp(lua_tostring(L, -1), "connection lost", 15) != 0) {
        lua_pushfstring(L, "connection lost: %s", lua_tostring(L, -1));
        lua_setfield(L, -3, "message");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, -1, "hint") == LUA_TNIL)
        migrun_setfield(L, -2, "hint",
                        "the server restarted or crashed, or the network failed: connect again; "
                        "a transaction open on this connection did not commit (unless its COMMIT "
                        "was under way)");
    lua_pop(L, 1);
    return 1;
}

/* Pushes an error of the given kind made from the connection's error message. */
void pg_push_conn_error(lua_State *L, pg_Conn *c, PGconn *conn, const char *kind, const char *code,
                        const char *fallback) {
    char where[96], msg[1024];
    const char *m = conn ? PQerrorMessage(conn) : "";
    if ((m == NULL || *m == '\0') && c->conn == NULL && c->closed_why != NULL)
        m = c->closed_why;
    if (m == NULL || *m == '\0')
        m = fallback ? fallback : "connection failed";
    migrun_error_push(L, kind, pg_conn_where(c, where, sizeof where), code,
                      one_line(m, msg, sizeof msg));
    migrun_setfield(L, -1, "conn", c->name);
    pg_mark_lost(L, c);
}

/* Pushes the error carried by a PGresult (server fields when it has them). */
void pg_push_result_error(lua_State *L, pg_Conn *c, const PGresult *res, const char *kind) {
    char where[96], msg[1024];
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (primary == NULL) {
        const char *m = PQresultErrorMessage(res);
        if (m == NULL || *m == '\0')
            m = c->conn ? PQerrorMessage(c->conn) : "unknown error";
        primary = one_line(m, msg, sizeof msg);
    }
    migrun_error_push(L, kind, pg_conn_where(c, where, sizeof where), state, primary);
    migrun_setfield(L, -1, "sqlstate", state);
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    migrun_setfield(L, -1, "severity", sev ? sev : PQresultErrorField(res, PG_DIAG_SEVERITY));
    migrun_setfield(L, -1, "detail", PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL));
    migrun_setfield(L, -1, "hint", PQresultErrorField(res, PG_DIAG_MESSAGE_HINT));
    migrun_setfield(L, -1, "context", PQresultErrorField(res, PG_DIAG_CONTEXT));
    migrun_setfield(L, -1, "conn", c->name);
    if (state != NULL && strcmp(state, "53100") == 0) { /* disk_full: a playbook stops on it */
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "disk_full");
    }
    pg_mark_lost(L, c);
}

/* Ctrl-C: the connection has been brought back to idle; raises the interrupted error. */
int pg_raise_interrupted(lua_State *L, pg_Conn *c) {
    char where[96];
    migrun_interrupt_consume(L);
    migrun_push_interrupted(L, pg_conn_where(c, where, sizeof where));
    migrun_setfield(L, -1, "conn", c->name);
    return lua_error(L);
}

/*
 * Brings a connection back to idle after an abandoned command: ends a COPY IN
 * with abort_msg, reads away a COPY OUT (after asking the server to cancel it),
 * discards results. Ignores Ctrl-C (a second one kills the process). Returns 1
 * when idle; 0 when that failed, and then the connection is closed so that
 * nothing uses it half-way through a protocol exchange.
 */
int pg_conn_drain(pg_Conn *c, const char *abort_msg) {
    PGconn *conn = c->conn;
    double deadline = migrun_monotonic() + DRAIN_TIMEOUT;
    int cancelled = 0;
    for (;;) {
        if (pg_conn_wait_result(conn, deadline, 0) != W_READY)
            break;
        PGresult *res = PQgetResult(conn);
        if (res == NULL)
            return 1;
        ExecStatusType st = PQresultStatus(res);
        PQclear(res);
        if (st == PGRES_COPY_IN) {
            int r;
            while ((r = PQputCopyEnd(conn, abort_msg ? abort_msg : "aborted by migrun")) == 0)
                if (pg_wait_sock(conn, POLLOUT, deadline, 0) != W_READY)
                    goto fail;
            if (r < 0)
                break;
        } else if (st == PGRES_COPY_OUT) {
            if (!cancelled) {
                pg_conn_cancel(conn);
                cancelled = 1;
            }
            for (;;) {
                char *buf = NULL;
                int n = PQgetCopyData(conn, &buf, 1);
                if (buf)
                    PQfreemem(buf);
                if (n > 0)
                    continue;
                if (n < 0)
                    break;
                if (pg_wait_sock(conn, POLLIN, deadline, 0) != W_READY || !PQconsumeInput(conn))
                    goto fail;
            }
        } else if (st == PGRES_COPY_BOTH) {
            break;
        }
    }
fail:
    fprintf(stderr, "[%s] could not bring the connection back to idle; closing it\n", c->name);
    c->closed_why = "it did not come back to idle after an abandoned command: migrun closed it";
    conn_release(c);
    return 0;
}

/* ---- connect ------------------------------------------------------------ */

/* Reads a number of seconds from opts[key]; def when absent. */
double pg_opt_seconds(lua_State *L, int opts, const char *key, double def) {
    if (opts == 0)
        return def;
    int t = lua_getfield(L, opts, key);
    double v = def;
    if (t == LUA_TNUMBER)
        v = lua_tonumber(L, -1);
    else if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1))
        v = 0;
    else if (t != LUA_TNIL)
        luaL_error(L, "option '%s' must be a number of seconds, got %s", key, luaL_typename(L, -1));
    lua_pop(L, 1);
    luaL_argcheck(L, v >= 0 && !isnan(v), opts, "timeouts cannot be negative");
    return v;
}

/*
 * TCP keepalives and tcp_user_timeout on every connection (docs/faults.md):
 * without them a server that vanishes without a RST (packets dropped, a host
 * or a NAT gone) leaves a wait for a result hanging for the kernel's two
 * hours; with them the kernel ends the connection about 30 s after the peer
 * stopped answering (keepalive probes from 15 s of silence, every 5 s;
 * unacknowledged data or probes for 30 s abort it, since tcp_user_timeout
 * overrides the keepalive count on Linux). They come before the caller's
 * keywords: a conninfo that names one of them overrides it (libpq: the last
 * value of a keyword wins, a conninfo string's expanded values included).
 */
#define NETWORK_DEFAULTS 5
static const char *const network_defaults[NETWORK_DEFAULTS][2] = {
    {"keepalives", "1"},       {"keepalives_idle", "15"},     {"keepalives_interval", "5"},
    {"keepalives_count", "3"}, {"tcp_user_timeout", "30000"},
};

/*
 * The keyword and value arrays for PQconnectStartParams from the conninfo at
 * index 1 (a string, expanded by libpq, or a table): the network defaults
 * first, so that the caller's keywords, which come later, win; then
 * fallback_application_name; NULL-terminated. Pushes a scratch table keeping
 * the strings alive and the userdata holding both arrays; returns the
 * keywords, and the values in *values.
 */
static const char **connect_params(lua_State *L, const char ***values) {
    int is_table = lua_istable(L, 1);
    lua_newtable(L); /* ... keep */
    int keep = lua_gettop(L);
    int n = 2 + NETWORK_DEFAULTS;
    if (is_table) {
        lua_pushnil(L);
        while (lua_next(L, 1)) {
            n++;
            lua_pop(L, 1);
        }
    }
    const char **kw = lua_newuserdatauv(L, sizeof(char *) * 2 * (size_t)(n + 1), 0);
    const char **val = kw + n + 1;
    int i = 0;
    for (int d = 0; d < NETWORK_DEFAULTS; d++, i++) {
        kw[i] = network_defaults[d][0];
        val[i] = network_defaults[d][1];
    }
    if (is_table) {
        lua_pushnil(L);
        while (lua_next(L, 1)) { /* ... keep arrays key value */
            luaL_argcheck(L, lua_type(L, -2) == LUA_TSTRING, 1,
                          "connection keywords must be strings");
            const char *k = lua_tostring(L, -2);
            const char *v = luaL_tolstring(L, -1, NULL); /* ... key value vstr */
            lua_rawseti(L, keep, i * 2 + 1);             /* keep the value string */
            lua_pushvalue(L, -2);
            lua_rawseti(L, keep, i * 2 + 2); /* and the key */
            kw[i] = k;
            val[i] = v;
            i++;
            lua_pop(L, 1);
        }
    } else {
        kw[i] = "dbname";
        val[i] = lua_tostring(L, 1);
        i++;
    }
    kw[i] = "fallback_application_name";
    val[i] = "migrun";
    i++;
    kw[i] = NULL;
    val[i] = NULL;
    *values = val;
    return kw;
}

/*
 * pg.connect(conninfo | {keyword=value...} [, opts]) -> Conn | nil, err
 * opts: name, connect_timeout (s, default 10), statement_timeout (s, client side),
 * stall_timeout (s, default PG_STALL_TIMEOUT: COPY progress, see pg_copy.c).
 */
static int pg_connect(lua_State *L) {
    int is_table = lua_istable(L, 1);
    if (!is_table)
        luaL_checkstring(L, 1);
    int opts = 0;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        opts = 2;
    }
    lua_settop(L, 2);
    const char *name = "pg";
    if (opts && lua_getfield(L, opts, "name") != LUA_TNIL) {
        luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "opts.name must be a string");
        name = lua_tostring(L, -1);
    }
    double connect_timeout = pg_opt_seconds(L, opts, "connect_timeout", CONNECT_TIMEOUT);
    double stmt_timeout = pg_opt_seconds(L, opts, "statement_timeout", 0);
    double stall_timeout = pg_opt_seconds(L, opts, "stall_timeout", PG_STALL_TIMEOUT);

    const char **val;
    const char **kw = connect_params(L, &val); /* ... keep arrays */

    /* born closed: the handle exists, with its metatable, before the PGconn does */
    pg_Conn *c = lua_newuserdatauv(L, sizeof *c, 1); /* ... keep arrays conn */
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, CONN_MT);
    snprintf(c->name, sizeof c->name, "%s", name);
    c->timeout = stmt_timeout;
    c->stall = stall_timeout;

    c->conn = PQconnectStartParams(kw, val, is_table ? 0 : 1);
    if (c->conn == NULL)
        return luaL_error(L, "out of memory starting a connection");
    if (PQstatus(c->conn) == CONNECTION_BAD) {
        pg_push_conn_error(L, c, c->conn, "connection", "08001", NULL);
        conn_release(c);
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    double deadline = connect_timeout > 0 ? migrun_monotonic() + connect_timeout : -1;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED) {
            pg_push_conn_error(L, c, c->conn, "connection", "08001", NULL);
            conn_release(c);
            lua_pushnil(L);
            lua_insert(L, -2);
            return 2;
        }
        int w = pg_wait_sock(c->conn, st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline, 1);
        if (w == W_INTR) {
            conn_release(c);
            return pg_raise_interrupted(L, c);
        }
        if (w == W_TIMEOUT) {
            conn_release(c);
            char where[96];
            lua_pushnil(L);
            migrun_error_push(L, "timeout", pg_conn_where(c, where, sizeof where), "08001", NULL);
            lua_pushfstring(L, "timeout expired after %f s while connecting", connect_timeout);
            lua_setfield(L, -2, "message");
            migrun_setfield(L, -1, "conn", c->name);
            return 2;
        }
        st = PQconnectPoll(c->conn);
    }
    c->pid = PQbackendPID(c->conn);
    PQsetNoticeReceiver(c->conn, notice_receiver, c);
    if (PQsetnonblocking(c->conn, 1) != 0) {
        pg_push_conn_error(L, c, c->conn, "connection", "08001", "could not set non-blocking mode");
        conn_release(c);
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    return 1;
}

/* ---- exec ------------------------------------------------------------------ */

/* Converts the parameter at idx to text (or binary for strings with NUL bytes); pushes a keeper. */
static void param_value(lua_State *L, int idx, const char **val, int *len, int *fmt) {
    *fmt = 0;
    *len = 0;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        *val = NULL;
        lua_pushnil(L);
        return;
    case LUA_TBOOLEAN:
        *val = lua_toboolean(L, idx) ? "true" : "false";
        lua_pushnil(L);
        return;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            *val = lua_pushfstring(L, "%I", lua_tointeger(L, idx));
        } else {
            double d = lua_tonumber(L, idx);
            char buf[64];
            if (isnan(d))
                snprintf(buf, sizeof buf, "NaN");
            else if (isinf(d))
                snprintf(buf, sizeof buf, "%sInfinity", d < 0 ? "-" : "");
            else
                snprintf(buf, sizeof buf, "%.17g", d);
            *val = lua_pushstring(L, buf);
        }
        return;
    case LUA_TSTRING: {
        size_t l;
        *val = lua_tolstring(L, idx, &l);
        lua_pushvalue(L, idx);
        if (strlen(*val) != l) { /* NUL bytes cannot travel as text: send the raw bytes */
            *fmt = 1;
            *len = (int)l;
        }
        return;
    }
    case LUA_TUSERDATA:
        lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY);
        if (lua_rawequal(L, -1, idx)) {
            *val = NULL;
            return; /* the pushed null is the keeper */
        }
        lua_pop(L, 1);
        if (luaL_getmetafield(L, idx, "__tostring") != LUA_TNIL) {
            lua_pop(L, 1);
            *val = luaL_tolstring(L, idx, NULL); /* LSN and friends */
            return;
        }
        /* fall through */
    default:
        luaL_error(L, "cannot send a %s as a query parameter", luaL_typename(L, idx));
    }
}

/*
 * Runs the command already sent on c and stores its last result in r; waits
 * with the deadline. On timeout or Ctrl-C it asks the server to cancel and
 * keeps reading until the connection is idle. Returns W_READY (r holds the
 * last result: a statement that finished before the cancel arrived counts as
 * done), W_TIMEOUT (the server cancelled it), W_INTR (Ctrl-C; idle) or W_ERR
 * (connection lost, or closed because it would not come back to idle).
 */
static int run_command(pg_Conn *c, pg_Result *r, double deadline, const char **copy_state) {
    PGconn *conn = c->conn;
    int cancelled = 0; /* W_TIMEOUT or W_INTR once the cancel was sent */
    for (;;) {
        int w = pg_conn_wait_result(conn, deadline, !cancelled);
        if (w == W_TIMEOUT || w == W_INTR) {
            if (cancelled) { /* the server did not answer the cancel in time */
                c->closed_why =
                    "the cancelled statement did not end within 15 s: migrun closed the "
                    "connection";
                conn_release(c);
                return W_ERR;
            }
            cancelled = w;
            if (pg_conn_cancel(conn) < 0) { /* nothing answers on the way to the server */
                c->closed_why = "the server did not take a cancel request within 5 s (a stalled "
                                "network path or a frozen server): migrun closed the connection";
                conn_release(c);
                return w == W_INTR ? W_INTR : W_ERR;
            }
            deadline = migrun_monotonic() + DRAIN_TIMEOUT;
            continue;
        }
        if (w == W_ERR)
            return W_ERR;
        PGresult *res = PQgetResult(conn);
        if (res == NULL)
            break;
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            PQclear(res);
            *copy_state = st == PGRES_COPY_IN ? "in" : "out";
            return pg_conn_drain(c, "use conn:copy_in for COPY FROM STDIN")
                       ? (cancelled ? cancelled : W_READY)
                       : W_ERR;
        }
        /* the last result wins; after an error the server runs nothing more */
        pg_result_set(r, res);
    }
    if (cancelled == W_INTR)
        return W_INTR;
    if (cancelled == W_TIMEOUT && r->res != NULL) {
        const char *state = PQresultErrorField(r->res, PG_DIAG_SQLSTATE);
        if (state != NULL && strcmp(state, "57014") == 0)
            return W_TIMEOUT;
    }
    return W_READY;
}

/*
 * conn:exec(sql, ...) or conn:exec{sql, p1, ..., n = count, timeout = s}
 * -> Result | nil, err
 * Without parameters the simple protocol runs: several statements may be
 * given and the last result is returned. With parameters only one statement.
 */
static int conn_exec(lua_State *L) {
    pg_Conn *c = pg_check_idle(L, 1);
    int first, nparams;
    double timeout = c->timeout;
    if (lua_istable(L, 2)) { /* the table's items go on the stack, like the vararg form */
        lua_settop(L, 2);
        lua_Integer n;
        if (lua_getfield(L, 2, "n") != LUA_TNIL)
            n = luaL_checkinteger(L, -1);
        else
            n = (lua_Integer)luaL_len(L, 2);
        lua_pop(L, 1);
        luaL_argcheck(L, n >= 1 && n <= 65536, 2, "expected {sql, parameters...}");
        timeout = pg_opt_seconds(L, 2, "timeout", timeout);
        luaL_checkstack(L, (int)n + 10, "too many parameters");
        for (lua_Integer i = 1; i <= n; i++)
            lua_geti(L, 2, i);
        first = 3;
        nparams = (int)n - 1;
    } else {
        first = 2;
        nparams = lua_gettop(L) - 2;
    }
    const char *sql = luaL_checkstring(L, first);
    luaL_argcheck(L, nparams <= 65535, first + 1, "too many parameters");
    const char **vals = NULL;
    int *lens = NULL, *fmts = NULL;
    if (nparams > 0) {
        luaL_checkstack(L, nparams + 10, "too many parameters");
        vals = lua_newuserdatauv(L, (sizeof(char *) + 2 * sizeof(int)) * (size_t)nparams, 0);
        lens = (int *)(vals + nparams);
        fmts = lens + nparams;
        for (int i = 0; i < nparams; i++)
            param_value(L, first + 1 + i, &vals[i], &lens[i], &fmts[i]); /* ... arrays keepers */
    }
    pg_Result *r = pg_result_new(L, 1); /* ... res */
    int res_idx = lua_gettop(L);

    int sent = nparams > 0 ? PQsendQueryParams(c->conn, sql, nparams, NULL, vals, lens, fmts, 0)
                           : PQsendQuery(c->conn, sql);
    if (!sent) {
        pg_push_conn_error(L, c, c->conn, "connection", "08006", NULL);
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    double deadline = timeout > 0 ? migrun_monotonic() + timeout : -1;
    const char *copy_state = NULL;
    int w = run_command(c, r, deadline, &copy_state);
    if (w == W_INTR)
        return pg_raise_interrupted(L, c);
    if (w == W_ERR) {
        pg_push_conn_error(L, c, c->conn, "connection", "08006", "connection lost");
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    pg_dispatch_notices(L, 1, c);
    if (w == W_TIMEOUT) {
        char where[96];
        lua_pushnil(L);
        migrun_error_push(L, "timeout", pg_conn_where(c, where, sizeof where), "57014", NULL);
        lua_pushfstring(L, "statement cancelled after the timeout of %f s", timeout);
        lua_setfield(L, -2, "message");
        migrun_setfield(L, -1, "sqlstate", "57014");
        migrun_setfield(L, -1, "conn", c->name);
        lua_pushnumber(L, timeout);
        lua_setfield(L, -2, "timeout");
        return 2;
    }
    if (copy_state != NULL) {
        char where[96];
        lua_pushnil(L);
        migrun_error_push(L, "copy", pg_conn_where(c, where, sizeof where), NULL,
                          strcmp(copy_state, "in") == 0
                              ? "COPY FROM STDIN needs conn:copy_in (or pg.copy), not exec"
                              : "COPY TO STDOUT needs conn:copy_out (or pg.copy), not exec");
        migrun_setfield(L, -1, "conn", c->name);
        return 2;
    }
    if (r->res == NULL) { /* "" sends nothing back but EmptyQuery; be safe anyway */
        lua_pushvalue(L, res_idx);
        return 1;
    }
    ExecStatusType st = PQresultStatus(r->res);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
        lua_pushvalue(L, res_idx);
        return 1;
    }
    lua_pushnil(L);
    pg_push_result_error(L, c, r->res, st == PGRES_FATAL_ERROR ? "sql" : "connection");
    return 2;
}

/* ---- results ------------------------------------------------------------------ */

static void push_value(lua_State *L, PGresult *res, int row, int col) {
    if (PQgetisnull(res, row, col)) {
        lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY);
        return;
    }
    const char *v = PQgetvalue(res, row, col);
    int len = PQgetlength(res, row, col);
    switch (PQftype(res, col)) {
    case BOOLOID:
        lua_pushboolean(L, v[0] == 't');
        return;
    case INT2OID:
    case INT4OID:
    case INT8OID:
    case OIDOID:
        lua_pushinteger(L, (lua_Integer)strtoll(v, NULL, 10));
        return;
    case FLOAT4OID:
    case FLOAT8OID:
        lua_pushnumber(L, strtod(v, NULL)); /* strtod reads NaN, Infinity, -Infinity */
        return;
    case PG_LSNOID:
        lua_getfield(L, LUA_REGISTRYINDEX, LSNPARSE_KEY);
        lua_pushlstring(L, v, (size_t)len);
        lua_call(L, 1, 1);
        return;
    case BYTEAOID: {
        luaL_Buffer b;
        char *dst = luaL_buffinitsize(L, &b, (size_t)len + 1); /* decoded is never longer */
        if (len >= 2 && v[0] == '\\' && v[1] == 'x') {
            size_t n = 0;
            for (int i = 2; i + 1 < len; i += 2) {
                int hi = v[i], lo = v[i + 1];
                hi = hi <= '9' ? hi - '0' : (hi | 0x20) - 'a' + 10;
                lo = lo <= '9' ? lo - '0' : (lo | 0x20) - 'a' + 10;
                dst[n++] = (char)(hi << 4 | lo);
            }
            luaL_pushresultsize(&b, n);
        } else { /* bytea_output = escape */
            size_t n = 0;
            unsigned char *u = PQunescapeBytea((const unsigned char *)v, &n);
            if (u != NULL) { /* no Lua call between here and the free */
                memcpy(dst, u, n <= (size_t)len ? n : (size_t)len);
                PQfreemem(u);
            }
            luaL_pushresultsize(&b, u ? n : 0);
        }
        return;
    }
    default:
        lua_pushlstring(L, v, (size_t)len);
    }
}

static void push_row(lua_State *L, PGresult *res, int row) {
    int ncols = PQnfields(res);
    lua_createtable(L, 0, ncols);
    for (int col = 0; col < ncols; col++) {
        push_value(L, res, row, col);
        lua_setfield(L, -2, PQfname(res, col));
    }
}

static PGresult *check_result(lua_State *L, int idx) {
    pg_Result *r = luaL_checkudata(L, idx, RESULT_MT);
    if (r->res == NULL)
        luaL_error(L, "attempt to use a freed result");
    return r->res;
}

static int result_len(lua_State *L) {
    lua_pushinteger(L, PQntuples(check_result(L, 1)));
    return 1;
}

static int result_columns(lua_State *L) {
    PGresult *res = check_result(L, 1);
    int n = PQnfields(res);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushstring(L, PQfname(res, i));
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int result_rows_iter(lua_State *L) {
    PGresult *res = check_result(L, lua_upvalueindex(1));
    lua_Integer i = lua_tointeger(L, lua_upvalueindex(2)) + 1;
    if (i > PQntuples(res))
        return 0;
    lua_pushinteger(L, i);
    lua_replace(L, lua_upvalueindex(2));
    push_row(L, res, (int)i - 1);
    return 1;
}

/* for row in res:rows() do ... end */
static int result_rows(lua_State *L) {
    check_result(L, 1);
    lua_settop(L, 1);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, result_rows_iter, 2);
    return 1;
}

static int result_index(lua_State *L) {
    PGresult *res = check_result(L, 1);
    if (lua_isinteger(L, 2)) {
        lua_Integer i = lua_tointeger(L, 2);
        if (i < 1 || i > PQntuples(res))
            return 0;
        push_row(L, res, (int)i - 1);
        return 1;
    }
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "affected") == 0) {
        const char *t = PQcmdTuples(res);
        if (t == NULL || *t == '\0')
            return 0;
        lua_pushinteger(L, (lua_Integer)strtoll(t, NULL, 10));
        return 1;
    }
    if (strcmp(k, "command") == 0) { /* the command tag, "INSERT 0 1" */
        lua_pushstring(L, PQcmdStatus(res));
        return 1;
    }
    luaL_getmetafield(L, 1, "methods");
    lua_getfield(L, -1, k);
    return 1;
}

static int result_tostring(lua_State *L) {
    pg_Result *r = luaL_checkudata(L, 1, RESULT_MT);
    if (r->res == NULL)
        lua_pushliteral(L, "migrun.pg.Result (freed)");
    else
        lua_pushfstring(L, "migrun.pg.Result (%s, %d rows)", PQcmdStatus(r->res),
                        PQntuples(r->res));
    return 1;
}

/* ---- connection methods ------------------------------------------------------- */

static int conn_close(lua_State *L) {
    conn_release(luaL_checkudata(L, 1, CONN_MT));
    return 0;
}

static int conn_tostring(lua_State *L) {
    pg_Conn *c = luaL_checkudata(L, 1, CONN_MT);
    if (c->conn == NULL) {
        lua_pushfstring(L, "migrun.pg.Conn %s (closed)", c->name);
        return 1;
    }
    const char *host = PQhost(c->conn);
    lua_pushfstring(L, "migrun.pg.Conn %s (host=%s port=%s dbname=%s user=%s pid=%d)", c->name,
                    host ? host : "", PQport(c->conn), PQdb(c->conn), PQuser(c->conn), c->pid);
    return 1;
}

/* conn:password() -> the password libpq used to log in (from the conninfo,
 * PGPASSWORD or the passfile, by libpq's own rules) | nil. For handing to a
 * service that must log in the same way (a DMS endpoint); never to print. */
static int conn_password(lua_State *L) {
    const char *pw = PQpass(check_conn(L, 1)->conn);
    if (pw != NULL && *pw != '\0')
        lua_pushstring(L, pw);
    else
        lua_pushnil(L);
    return 1;
}

/* conn:info() -> {name=, host=, port=, dbname=, user=, pid=, server_version=} (never a password) */
static int conn_info(lua_State *L) {
    pg_Conn *c = check_conn(L, 1);
    lua_createtable(L, 0, 8);
    migrun_setfield(L, -1, "name", c->name);
    migrun_setfield(L, -1, "host", PQhost(c->conn));
    migrun_setfield(L, -1, "port", PQport(c->conn));
    migrun_setfield(L, -1, "dbname", PQdb(c->conn));
    migrun_setfield(L, -1, "user", PQuser(c->conn));
    migrun_setfield(L, -1, "application_name", PQparameterStatus(c->conn, "application_name"));
    lua_pushinteger(L, c->pid);
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, PQserverVersion(c->conn));
    lua_setfield(L, -2, "server_version");
    /* the keepalive settings in effect (the defaults, or the conninfo's) */
    PQconninfoOption *opts = PQconninfo(c->conn);
    lua_createtable(L, 0, NETWORK_DEFAULTS);
    for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++)
        for (int d = 0; d < NETWORK_DEFAULTS; d++)
            if (o->val != NULL && *o->val && strcmp(o->keyword, network_defaults[d][0]) == 0) {
                lua_pushinteger(L, (lua_Integer)strtoll(o->val, NULL, 10));
                lua_setfield(L, -2, o->keyword);
            }
    PQconninfoFree(opts);
    lua_setfield(L, -2, "tcp");
    lua_pushnumber(L, c->stall);
    lua_setfield(L, -2, "stall_timeout");
    return 1;
}

static int conn_is_closed(lua_State *L) {
    pg_Conn *c = luaL_checkudata(L, 1, CONN_MT);
    lua_pushboolean(L, c->conn == NULL);
    return 1;
}

static int conn_name(lua_State *L) {
    lua_pushstring(L, ((pg_Conn *)luaL_checkudata(L, 1, CONN_MT))->name);
    return 1;
}

static int conn_server_version(lua_State *L) {
    lua_pushinteger(L, PQserverVersion(check_conn(L, 1)->conn));
    return 1;
}

static int conn_backend_pid(lua_State *L) {
    lua_pushinteger(L, PQbackendPID(check_conn(L, 1)->conn));
    return 1;
}

/* conn:transaction_status() -> "idle" | "active" | "intrans" | "inerror" | "unknown" */
static int conn_transaction_status(lua_State *L) {
    static const char *names[] = {"idle", "active", "intrans", "inerror", "unknown"};
    PGTransactionStatusType t = PQtransactionStatus(check_conn(L, 1)->conn);
    lua_pushstring(L, (unsigned)t <= PQTRANS_UNKNOWN ? names[t] : "unknown");
    return 1;
}

/* conn:set_timeout(seconds | nil) sets the client-side statement timeout; returns the old one */
static int conn_set_timeout(lua_State *L) {
    pg_Conn *c = check_conn(L, 1);
    double t = luaL_optnumber(L, 2, 0);
    luaL_argcheck(L, t >= 0 && !isnan(t), 2, "timeout cannot be negative");
    double old = c->timeout;
    c->timeout = t;
    if (old > 0)
        lua_pushnumber(L, old);
    else
        lua_pushnil(L);
    return 1;
}

/* conn:set_stall_timeout(seconds | nil) sets how long a COPY may go without progress on this
 * connection (nil or 0: no bound); returns the old one */
static int conn_set_stall_timeout(lua_State *L) {
    pg_Conn *c = check_conn(L, 1);
    double t = luaL_optnumber(L, 2, 0);
    luaL_argcheck(L, t >= 0 && !isnan(t), 2, "stall timeout cannot be negative");
    double old = c->stall;
    c->stall = t;
    if (old > 0)
        lua_pushnumber(L, old);
    else
        lua_pushnil(L);
    return 1;
}

/* conn:on_notice(fn | nil): fn(notice) gets each server notice; nil restores stderr */
static int conn_on_notice(lua_State *L) {
    pg_Conn *c = check_conn(L, 1);
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_getiuservalue(L, 1, 1); /* conn fn old */
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 1, 1);
    c->has_handler = lua_isfunction(L, 2);
    return 1;
}

static int conn_escape(lua_State *L, int literal) {
    pg_Conn *c = check_conn(L, 1);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);
    luaL_argcheck(L, strlen(s) == len, 2, "string contains a NUL byte");
    luaL_argcheck(L, len < (size_t)1 << 30, 2, "string too long");
    luaL_Buffer b;
    /* allocate first (the only part that can raise), then call libpq and free at once */
    char *dst = luaL_buffinitsize(L, &b, 2 * len + 8);
    char *e = literal ? PQescapeLiteral(c->conn, s, len) : PQescapeIdentifier(c->conn, s, len);
    if (e == NULL) {
        char msg[512];
        one_line(PQerrorMessage(c->conn), msg, sizeof msg);
        return luaL_error(L, "%s", msg); /* invalid encoding: the caller's string is bad */
    }
    size_t n = strlen(e);
    if (n > 2 * len + 8)
        n = 2 * len + 8; /* cannot happen: escaping at most doubles, plus quotes and E */
    memcpy(dst, e, n);
    PQfreemem(e);
    luaL_pushresultsize(&b, n);
    return 1;
}

static int conn_escape_identifier(lua_State *L) {
    return conn_escape(L, 0);
}

static int conn_escape_literal(lua_State *L) {
    return conn_escape(L, 1);
}

/* pg.quote_ident(s): always double-quoted, embedded quotes doubled */
static void add_quoted(lua_State *L, luaL_Buffer *b, int idx) {
    size_t len;
    const char *s = luaL_checklstring(L, idx, &len);
    luaL_argcheck(L, len > 0, idx, "empty identifier");
    luaL_argcheck(L, strlen(s) == len, idx, "identifier contains a NUL byte");
    luaL_addchar(b, '"');
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '"')
            luaL_addchar(b, '"');
        luaL_addchar(b, s[i]);
    }
    luaL_addchar(b, '"');
}

/* pg.conninfo_parse(conninfo) -> {keyword = value, ...} | nil, err: libpq's
 * own parser (keywords or URI), only the keywords that were given. The result
 * may hold a password: it is for building other connection descriptions
 * (DMS endpoints, child process environments), never for printing. */
static int pg_conninfo_parse(lua_State *L) {
    const char *info = luaL_checkstring(L, 1);
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(info, &errmsg);
    if (opts == NULL) {
        /* libpq's message never echoes the value of a password */
        const char *m = errmsg ? errmsg : "out of memory";
        size_t len = strlen(m);
        while (len > 0 && (m[len - 1] == '\n' || m[len - 1] == ' '))
            len--;
        lua_pushlstring(L, m, len);
        PQfreemem(errmsg);
        const char *msg = lua_tostring(L, -1);
        return migrun_error_return(L, "conninfo", "conninfo", NULL, msg);
    }
    lua_newtable(L);
    for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
        if (o->val != NULL)
            migrun_setfield(L, -1, o->keyword, o->val);
    PQconninfoFree(opts);
    return 1;
}

static int pg_quote_ident(lua_State *L) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    add_quoted(L, &b, 1);
    luaL_pushresult(&b);
    return 1;
}

/* pg.qualify(schema, name) -> "schema"."name"; pg.qualify(nil, name) -> "name" */
static int pg_qualify(lua_State *L) {
    luaL_checkstring(L, 2);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    if (!lua_isnil(L, 1)) {
        add_quoted(L, &b, 1);
        luaL_addchar(&b, '.');
    }
    add_quoted(L, &b, 2);
    luaL_pushresult(&b);
    return 1;
}

static int null_tostring(lua_State *L) {
    lua_pushliteral(L, "null");
    return 1;
}

/* ---- module -------------------------------------------------------------------- */

int luaopen_migrun_pg_core(lua_State *L) {
    static const luaL_Reg conn_meta[] = {
        {"__gc", conn_gc},
        {"__close", conn_gc},
        {"__tostring", conn_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg conn_methods[] = {
        {"exec", conn_exec},
        {"close", conn_close},
        {"is_closed", conn_is_closed},
        {"name", conn_name},
        {"info", conn_info},
        {"password", conn_password},
        {"server_version", conn_server_version},
        {"backend_pid", conn_backend_pid},
        {"transaction_status", conn_transaction_status},
        {"set_timeout", conn_set_timeout},
        {"set_stall_timeout", conn_set_stall_timeout},
        {"on_notice", conn_on_notice},
        {"escape_identifier", conn_escape_identifier},
        {"escape_literal", conn_escape_literal},
        {"copy_out", pg_conn_copy_out},
        {"copy_in", pg_conn_copy_in},
        {NULL, NULL},
    };
    /* clang-format off */
    static const luaL_Reg result_meta[] = {
        {"__gc", result_gc},
        {"__close", result_gc},
        {"__len", result_len},
        {"__index", result_index},
        {"__tostring", result_tostring},
        {NULL, NULL},
    };
    /* clang-format on */
    static const luaL_Reg result_methods[] = {
        {"rows", result_rows},
        {"columns", result_columns},
        {NULL, NULL},
    };
    /* clang-format off */
    static const luaL_Reg funcs[] = {
        {"connect", pg_connect},
        {"conninfo_parse", pg_conninfo_parse},
        {"copy", pg_copy},
        {"qualify", pg_qualify},
        {"quote_ident", pg_quote_ident},
        {NULL, NULL},
    };
    /* clang-format on */

    /* lsn.parse, for pg_lsn columns */
    luaL_requiref(L, "migrun.lsn", luaopen_migrun_lsn, 0);
    lua_getfield(L, -1, "parse");
    lua_setfield(L, LUA_REGISTRYINDEX, LSNPARSE_KEY);
    lua_pop(L, 1);

    luaL_newlib(L, funcs); /* pg */

    /* pg.NETWORK_DEFAULTS (as libpq keywords take them) and pg.STALL_TIMEOUT, for docs and tests */
    lua_createtable(L, 0, NETWORK_DEFAULTS);
    for (int d = 0; d < NETWORK_DEFAULTS; d++) {
        lua_pushstring(L, network_defaults[d][1]);
        lua_setfield(L, -2, network_defaults[d][0]);
    }
    lua_setfield(L, -2, "NETWORK_DEFAULTS");
    lua_pushnumber(L, PG_STALL_TIMEOUT);
    lua_setfield(L, -2, "STALL_TIMEOUT");

    luaL_newmetatable(L, CONN_MT);
    luaL_setfuncs(L, conn_meta, 0);
    luaL_newlib(L, conn_methods);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "__index"); /* pg mt methods */
    lua_setfield(L, -3, "Conn");    /* pg.Conn: the method table, for the Lua layer */
    lua_pop(L, 1);

    luaL_newmetatable(L, RESULT_MT);
    luaL_setfuncs(L, result_meta, 0);
    luaL_newlib(L, result_methods);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods");
    lua_setfield(L, -3, "Result");
    lua_pop(L, 1);

    /* pg.null: one userdata, printing "null" */
    lua_newuserdatauv(L, 0, 0);
    if (luaL_newmetatable(L, NULL_MT)) {
        lua_pushcfunction(L, null_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, NULL_KEY);
    lua_setfield(L, -2, "null");
    return 1;
}
