/*
 * COPY for migrun.pg.core: conn:copy_out and conn:copy_in, which stream a
 * COPY through Lua callbacks (the sink gets chunks of about 64 KiB; the
 * source returns strings until nil), and pg.copy, which streams COPY OUT from
 * one server into COPY IN on another entirely in C, both sockets non-blocking
 * and the buffering bounded: the source's rows gathered and handed to the
 * target a whole buffer at a time (one CopyData message: the target reads a
 * COPY stream whatever its message boundaries), so that relaying costs the
 * client a send() per buffer, not a message per row and a send() per 8 KiB
 * waking the target's backend each time. Every wait polls, so Ctrl-C reaches a COPY; when
 * one side fails or is interrupted, the source is cancelled, the target's
 * COPY is failed, and both connections are brought back to idle before the
 * error reaches Lua. Every wait is also bounded by the connection's stall
 * timeout (pg_Conn.stall, default PG_STALL_TIMEOUT): a socket that neither
 * brings nor takes a byte for that long is a stalled COPY (a network path
 * that drops packets, a server that stopped answering), and libpq alone would
 * wait for it forever. The stalled side's connection is closed (a cancel or a
 * drain through the same path would stall too), the other side aborted, and
 * the error names the side. pg.c owns the handles this works on (pg_internal.h).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include <linux/sockios.h>

#include <libpq-fe.h>

#include "migrun_internal.h"
#include "pg_internal.h"

#define COPY_FLUSH_BYTES (64 * 1024) /* copy_in: flush the target after this much */
#define COPY_CHUNK_BYTES (64 * 1024) /* copy_out: hand the sink chunks of about this size */
/* pg.copy: the rows read are handed to the target RELAY_BYTES at a time, or
 * once they have waited RELAY_IDLE seconds for more from the source */
#define RELAY_BYTES (256 * 1024)
#define RELAY_IDLE 0.002

/* ---- waits bounded by the stall timeout ----------------------------------------- */

/* The deadline of one wait: each wait that ends ready is progress, so the
 * bound counts from the last time the socket moved (stall <= 0: none). */
static double stall_at(double stall) {
    return stall > 0 ? migrun_monotonic() + stall : -1;
}

/* Bytes sent on the socket and not yet acknowledged by the peer (SIOCOUTQ); -1 when unknown. */
static int out_queue(PGconn *conn) {
    int n = 0;
    if (ioctl(PQsocket(conn), SIOCOUTQ, &n) != 0)
        return -1;
    return n;
}

/* Did the socket's send queue shrink since *queued (then updated)? A path
 * that moves bytes slowly is not stalled, even while its queue stays too full
 * for POLLOUT (the kernel signals room only once much of it is free). */
static int out_moved(PGconn *conn, int *queued) {
    int q = out_queue(conn), moved = q >= 0 && *queued >= 0 && q < *queued;
    *queued = q;
    return moved;
}

/* Waits for events on a socket that has data to send: W_TIMEOUT only once
 * neither the events came nor the send queue shrank for stall seconds. */
static int wait_out(PGconn *conn, short events, double stall, int interruptible) {
    if (stall <= 0)
        return pg_wait_sock(conn, events, -1, interruptible);
    double slice = stall / 4 < 0.05 ? 0.05 : stall / 4 > 1 ? 1 : stall / 4;
    double last = migrun_monotonic();
    int queued = out_queue(conn);
    for (;;) {
        double now = migrun_monotonic();
        double deadline = now + slice < last + stall ? now + slice : last + stall;
        int w = pg_wait_sock(conn, events, deadline, interruptible);
        if (w != W_TIMEOUT)
            return w;
        now = migrun_monotonic();
        if (out_moved(conn, &queued))
            last = now;
        if (now >= last + stall)
            return W_TIMEOUT;
    }
}

/* Sends what libpq has queued, reading input meanwhile; W_TIMEOUT when the
 * socket took nothing for stall seconds. */
static int flush_stall(PGconn *conn, double stall, int interruptible) {
    for (;;) {
        int r = PQflush(conn);
        if (r == 0)
            return W_READY;
        if (r < 0)
            return W_ERR;
        int w = wait_out(conn, POLLIN | POLLOUT, stall, interruptible);
        if (w != W_READY)
            return w;
        if (!PQconsumeInput(conn))
            return W_ERR;
    }
}

/* Waits until PQgetResult will not block; W_TIMEOUT when nothing came, and
 * nothing of what was sent was acknowledged, for stall seconds. */
static int wait_result_stall(PGconn *conn, double stall, int interruptible) {
    int w = flush_stall(conn, stall, interruptible);
    if (w != W_READY)
        return w;
    while (PQisBusy(conn)) {
        w = wait_out(conn, POLLIN, stall, interruptible);
        if (w != W_READY)
            return w;
        if (!PQconsumeInput(conn))
            return W_ERR;
    }
    return W_READY;
}

/*
 * A stalled side: its connection is closed (whatever is under way on it can
 * neither finish nor be cancelled through a path that carries nothing) and
 * nil, err pushed: kind "connection", lost = true, stalled = true, side, the
 * bound in stall_timeout, and a message that says which side and what.
 */
static void push_stalled(lua_State *L, pg_Conn *c, const char *side, double stall,
                         const char *what) {
    char where[96];
    pg_conn_where(c, where, sizeof where);
    pg_conn_close(c);
    lua_pushnil(L);
    migrun_error_push(L, "connection", where, "08006", NULL);
    lua_pushfstring(L,
                    "connection lost: COPY stalled on the %s side: %s for %f s; migrun closed it",
                    strcmp(side, "from") == 0 ? "source" : "target", what, (lua_Number)stall);
    lua_setfield(L, -2, "message");
    migrun_setfield(L, -1, "side", side);
    migrun_setfield(L, -1, "conn", c->name);
    migrun_setfield(L, -1, "hint",
                    "a network path that drops packets or a server that stopped answering: "
                    "connect again and redo the COPY (its rows were not committed); "
                    "stall_timeout sets the bound");
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "lost");
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "stalled");
    lua_pushnumber(L, stall);
    lua_setfield(L, -2, "stall_timeout");
}

/* ---- COPY with Lua callbacks ----------------------------------------------- */

/*
 * Sends sql (a COPY) and waits until the server is in the expected COPY state.
 * Returns 1 when it is; else pushes nil, err and returns 0 (connection idle);
 * on Ctrl-C returns -1 with the command cancelled and nothing pushed (the
 * caller cleans up its other side, then raises). r holds the results so their
 * memory is GC-managed.
 */
static int start_copy(lua_State *L, pg_Conn *c, int conn_idx, pg_Result *r, const char *sql,
                      ExecStatusType want, const char *side, double stall) {
    char where[96];
    if (!PQsendQuery(c->conn, sql)) {
        lua_pushnil(L);
        pg_push_conn_error(L, c, c->conn, "connection", "08006", NULL);
        migrun_setfield(L, -1, "side", side);
        return 0;
    }
    int w = wait_result_stall(c->conn, stall, 1);
    if (w == W_INTR) {
        pg_conn_cancel(c->conn);
        pg_conn_drain(c, "interrupted");
        return -1;
    }
    if (w == W_TIMEOUT) {
        push_stalled(L, c, side, stall, "no answer to the COPY statement");
        return 0;
    }
    if (w != W_READY) {
        lua_pushnil(L);
        pg_push_conn_error(L, c, c->conn, "connection", "08006", "connection lost");
        migrun_setfield(L, -1, "side", side);
        return 0;
    }
    pg_result_set(r, PQgetResult(c->conn));
    ExecStatusType st = r->res ? PQresultStatus(r->res) : PGRES_FATAL_ERROR;
    if (st == want)
        return 1;
    int failed = st == PGRES_FATAL_ERROR;
    if (failed && r->res != NULL) { /* keep the error result; drain the rest */
        PGresult *keep = r->res;
        r->res = NULL;
        pg_conn_drain(c, "unexpected COPY");
        r->res = keep;
    } else {
        pg_result_set(r, NULL);
        pg_conn_drain(c, "unexpected COPY");
    }
    pg_dispatch_notices(L, conn_idx, c);
    lua_pushnil(L);
    if (failed && r->res != NULL) {
        pg_push_result_error(L, c, r->res, "sql");
    } else {
        migrun_error_push(L, "copy", pg_conn_where(c, where, sizeof where), NULL,
                          want == PGRES_COPY_OUT ? "not a COPY ... TO STDOUT statement"
                                                 : "not a COPY ... FROM STDIN statement");
        migrun_setfield(L, -1, "conn", c->name);
    }
    migrun_setfield(L, -1, "side", side);
    return 0;
}

/* Collects the final result of a COPY into r; returns 1 on success or pushes nil, err. */
static int finish_copy(lua_State *L, pg_Conn *c, pg_Result *r, const char *side, double stall) {
    int w;
    PGresult *last = NULL;
    for (;;) {
        w = wait_result_stall(c->conn, stall, 0);
        if (w != W_READY)
            break;
        PGresult *res = PQgetResult(c->conn);
        if (res == NULL)
            break;
        if (last == NULL || PQresultStatus(res) == PGRES_FATAL_ERROR) {
            pg_result_set(r, res);
            last = res;
        } else {
            PQclear(res);
        }
    }
    if (w == W_TIMEOUT) {
        push_stalled(L, c, side, stall, "no result after the end of the data");
        return 0;
    }
    if (w != W_READY) {
        lua_pushnil(L);
        pg_push_conn_error(L, c, c->conn, "connection", "08006", "connection lost");
        migrun_setfield(L, -1, "side", side);
        return 0;
    }
    if (last == NULL || PQresultStatus(last) != PGRES_COMMAND_OK) {
        lua_pushnil(L);
        if (last)
            pg_push_result_error(L, c, last, "copy");
        else
            pg_push_conn_error(L, c, c->conn, "copy", NULL, "COPY ended without a result");
        migrun_setfield(L, -1, "side", side);
        return 0;
    }
    return 1;
}

static void push_copy_totals(lua_State *L, lua_Integer bytes, PGresult *res) {
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, bytes);
    lua_setfield(L, -2, "bytes");
    const char *t = res ? PQcmdTuples(res) : NULL;
    if (t && *t) {
        lua_pushinteger(L, (lua_Integer)strtoll(t, NULL, 10));
        lua_setfield(L, -2, "rows");
    }
}

/* conn:copy_out(sql, fn) -> {bytes=, rows=} | nil, err; fn(chunk) gets ~64 KiB chunks */
int pg_conn_copy_out(lua_State *L) {
    pg_Conn *c = pg_check_idle(L, 1);
    const char *sql = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_settop(L, 3);
    pg_Result *r = pg_result_new(L, 1); /* conn sql fn res */
    double stall = c->stall;
    int started = start_copy(L, c, 1, r, sql, PGRES_COPY_OUT, "from", stall);
    if (started < 0)
        return pg_raise_interrupted(L, c);
    if (started == 0)
        return 2;
    lua_Integer bytes = 0;
    int pieces = 0;
    size_t pending = 0;
    for (;;) {
        char *buf = NULL;
        int n = PQgetCopyData(c->conn, &buf, 1);
        if (n > 0) {
            c->scratch = buf;                   /* freed by the closer if the push raises */
            lua_pushlstring(L, buf, (size_t)n); /* ... pieces */
            c->scratch = NULL;
            PQfreemem(buf);
            bytes += n;
            pending += (size_t)n;
            if (++pieces == 32) {
                lua_concat(L, pieces);
                pieces = 1;
            }
        }
        if (pieces > 0 && (n <= 0 || pending >= COPY_CHUNK_BYTES)) {
            lua_concat(L, pieces); /* conn sql fn res chunk */
            lua_pushvalue(L, 3);
            lua_insert(L, -2); /* conn sql fn res fn chunk */
            pieces = 0;
            pending = 0;
            if (lua_pcall(L, 1, 0, 0) != LUA_OK) { /* conn sql fn res msg */
                pg_conn_drain(c, "aborted");
                return lua_error(L);
            }
        }
        if (n > 0)
            continue;
        if (n == 0) {
            int w = pg_wait_sock(c->conn, POLLIN, stall_at(stall), 1);
            if (w == W_INTR) {
                pg_conn_drain(c, "interrupted");
                return pg_raise_interrupted(L, c);
            }
            if (w == W_TIMEOUT) {
                push_stalled(L, c, "from", stall, "nothing received");
                return 2;
            }
            if (w == W_READY && PQconsumeInput(c->conn))
                continue;
        }
        break; /* -1 done, -2 failed: the result says which */
    }
    if (!finish_copy(L, c, r, "from", stall))
        return 2;
    pg_dispatch_notices(L, 1, c);
    push_copy_totals(L, bytes, r->res);
    return 1;
}

/* Queues data for COPY IN, waiting for room; W_READY or W_ERR / W_INTR / W_TIMEOUT (no room
 * for stall seconds). */
static int put_copy(PGconn *conn, const char *data, int n, int interruptible, double stall) {
    for (;;) {
        int r = PQputCopyData(conn, data, n);
        if (r > 0)
            return W_READY;
        if (r < 0)
            return W_ERR;
        int w = wait_out(conn, POLLOUT, stall, interruptible);
        if (w != W_READY)
            return w;
    }
}

/* Ends a COPY IN (with errmsg: fails it) and sends it; W_READY, W_ERR or W_TIMEOUT. */
static int end_copy(PGconn *conn, const char *errmsg, double stall) {
    for (;;) {
        int r = PQputCopyEnd(conn, errmsg);
        if (r > 0)
            return flush_stall(conn, stall, 0);
        if (r < 0)
            return W_ERR;
        int w = wait_out(conn, POLLOUT, stall, 0);
        if (w != W_READY)
            return w == W_TIMEOUT ? W_TIMEOUT : W_ERR;
    }
}

/* conn:copy_in(sql, fn) -> {bytes=, rows=} | nil, err; fn() returns chunks, nil at the end */
int pg_conn_copy_in(lua_State *L) {
    pg_Conn *c = pg_check_idle(L, 1);
    const char *sql = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_settop(L, 3);
    pg_Result *r = pg_result_new(L, 1); /* conn sql fn res */
    double stall = c->stall;
    int started = start_copy(L, c, 1, r, sql, PGRES_COPY_IN, "to", stall);
    if (started < 0)
        return pg_raise_interrupted(L, c);
    if (started == 0)
        return 2;
    lua_Integer bytes = 0;
    size_t since_flush = 0;
    for (;;) {
        lua_pushvalue(L, 3);
        if (lua_pcall(L, 0, 1, 0) != LUA_OK) { /* conn sql fn res msg */
            pg_conn_drain(c, "aborted: the source raised an error");
            return lua_error(L);
        }
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            break;
        }
        if (lua_type(L, -1) != LUA_TSTRING) {
            pg_conn_drain(c, "aborted: the source returned a non-string");
            return luaL_error(L, "copy_in source must return strings (or nil at the end), got %s",
                              luaL_typename(L, -1));
        }
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        while (len > 0) { /* PQputCopyData takes an int */
            int n = len > (1 << 20) ? (1 << 20) : (int)len;
            int w = put_copy(c->conn, s, n, 1, stall);
            if (w == W_INTR) {
                pg_conn_drain(c, "interrupted");
                return pg_raise_interrupted(L, c);
            }
            if (w == W_TIMEOUT) {
                push_stalled(L, c, "to", stall, "it took no data");
                return 2;
            }
            if (w != W_READY)
                break;
            s += n;
            len -= (size_t)n;
            bytes += n;
            since_flush += (size_t)n;
        }
        lua_pop(L, 1);
        if (len > 0)
            break; /* the connection failed: finish_copy reports it */
        if (since_flush >= COPY_FLUSH_BYTES) {
            since_flush = 0;
            int w = flush_stall(c->conn, stall, 1);
            if (w == W_INTR) {
                pg_conn_drain(c, "interrupted");
                return pg_raise_interrupted(L, c);
            }
            if (w == W_TIMEOUT) {
                push_stalled(L, c, "to", stall, "it took no data");
                return 2;
            }
            if (w != W_READY)
                break;
        }
    }
    if (end_copy(c->conn, NULL, stall) == W_TIMEOUT) {
        push_stalled(L, c, "to", stall, "it took no data");
        return 2;
    }
    if (!finish_copy(L, c, r, "to", stall))
        return 2;
    pg_dispatch_notices(L, 1, c);
    push_copy_totals(L, bytes, r->res);
    return 1;
}

/* ---- pg.copy: server to server, in C ------------------------------------------- */

/* Calls on_progress(bytes, rows) at stack index fn; 0 on success, else leaves the error. */
static int call_progress(lua_State *L, int fn, lua_Integer bytes, lua_Integer rows) {
    if (fn == 0)
        return 0;
    lua_pushvalue(L, fn);
    lua_pushinteger(L, bytes);
    lua_pushinteger(L, rows);
    return lua_pcall(L, 2, 0, 0) != LUA_OK;
}

/* One pg.copy under way: the two sides, their stall bounds, what moved, and
 * the rows read and not yet handed to libpq (buf, len bytes of RELAY_BYTES). */
typedef struct {
    pg_Conn *src, *dst;
    double src_stall, dst_stall;
    int fn; /* stack index of on_progress, 0 when none */
    double interval;
    lua_Integer bytes, rows;
    char *buf;
    size_t len;
    double gathered_at; /* when the first of the rows in buf was read */
} copy_run;

/* How the streaming loop ended. */
enum { S_DONE, S_FAILED_FROM, S_FAILED_TO, S_STALLED_FROM, S_STALLED_TO, S_INTR, S_RAISED };

/* The loop's end for a wait on the target that did not end ready. */
static int target_failed(int w) {
    return w == W_INTR ? S_INTR : w == W_TIMEOUT ? S_STALLED_TO : S_FAILED_TO;
}

/* Hands the gathered rows to libpq as one CopyData message (the target reads
 * a COPY stream whatever its message boundaries), once libpq has sent what
 * the last one left: libpq holds one buffer at most, so the memory is
 * bounded and a target slower than the source holds the source back. */
static int hand_over(copy_run *cr) {
    if (cr->len == 0)
        return W_READY;
    int w = flush_stall(cr->dst->conn, cr->dst_stall, 1);
    if (w == W_READY)
        w = put_copy(cr->dst->conn, cr->buf, (int)cr->len, 1, cr->dst_stall);
    if (w == W_READY)
        cr->len = 0;
    return w;
}

/* One row from the source into the buffer (handed over first when it would
 * not fit; a row larger than the buffer goes alone). */
static int gather(copy_run *cr, const char *row, int n) {
    int w = W_READY;
    if (cr->len + (size_t)n > RELAY_BYTES)
        w = hand_over(cr);
    if (w != W_READY)
        return w;
    if ((size_t)n > RELAY_BYTES)
        return put_copy(cr->dst->conn, row, n, 1, cr->dst_stall);
    if (cr->len == 0)
        cr->gathered_at = migrun_monotonic();
    memcpy(cr->buf + cr->len, row, (size_t)n);
    cr->len += (size_t)n;
    return W_READY;
}

/* Streams rows from src to dst until the source ends (S_DONE) or something
 * fails. The rows are gathered into a buffer handed to the target whole,
 * RELAY_BYTES at a time (rather than a message and, every 8 KiB, a send()
 * per row, each waking the target's backend): when it is full, when the
 * source ends, or when the source brought nothing for RELAY_IDLE. Each side
 * has its own stall clock: the source's restarts whenever it brings bytes,
 * the target's whenever it takes some or has nothing pending. S_RAISED:
 * on_progress raised (its error on the stack). */
static int stream_rows(lua_State *L, copy_run *cr) {
    PGconn *src = cr->src->conn, *dst = cr->dst->conn;
    int dst_pending = 0, src_moved = 1, dst_queued = -1, consumed = 0;
    double src_last = 0, dst_last = 0;
    double next_progress = migrun_monotonic() + cr->interval;
    for (;;) {
        char *row = NULL;
        int n = PQgetCopyData(src, &row, 1);
        if (n > 0) {
            src_moved = 1;
            consumed = 0;
            int w = gather(cr, row, n);
            PQfreemem(row);
            if (w != W_READY)
                return target_failed(w);
            cr->bytes += n;
            cr->rows++;
            if (cr->fn && (cr->rows & 255) == 0 && migrun_monotonic() >= next_progress) {
                if (call_progress(L, cr->fn, cr->bytes, cr->rows))
                    return S_RAISED;
                next_progress = migrun_monotonic() + cr->interval;
            }
            continue;
        }
        if (n == -1) { /* the source is done: the rest goes to the target */
            int w = hand_over(cr);
            return w == W_READY ? S_DONE : target_failed(w);
        }
        if (n < 0)
            return S_DONE; /* -2: the source failed (finish_copy tells) */
        /* no whole row in libpq's buffer: read what the socket has, once, before waiting */
        if (!consumed) {
            consumed = 1;
            if (!PQconsumeInput(src))
                return S_FAILED_FROM;
            continue;
        }
        consumed = 0;
        double now = migrun_monotonic();
        if (cr->len > 0 && now >= cr->gathered_at + RELAY_IDLE) { /* a slow source */
            int w = hand_over(cr);
            if (w != W_READY)
                return target_failed(w);
        }
        /* push out what the target has, then wait for either side */
        int f = PQflush(dst);
        if (f < 0)
            return S_FAILED_TO;
        now = migrun_monotonic();
        if (src_moved) /* the stall clock of the source counts from its last bytes */
            src_last = now;
        src_moved = 0;
        if (f == 1 && !dst_pending) {
            dst_last = now;
            dst_queued = out_queue(dst);
        }
        dst_pending = f == 1;
        double deadline = cr->src_stall > 0 ? src_last + cr->src_stall : -1;
        if (dst_pending && cr->dst_stall > 0 &&
            (deadline < 0 || dst_last + cr->dst_stall < deadline))
            deadline = dst_last + cr->dst_stall;
        double idle = cr->len > 0 ? cr->gathered_at + RELAY_IDLE : -1;
        if (idle >= 0 && (deadline < 0 || idle < deadline))
            deadline = idle;
        struct pollfd p[2] = {{.fd = PQsocket(src), .events = POLLIN, .revents = 0},
                              {.fd = PQsocket(dst), .events = POLLOUT, .revents = 0}};
        int w = pg_wait_fds(p, dst_pending ? 2 : 1, deadline, 1);
        if (w == W_INTR)
            return S_INTR;
        if (w == W_TIMEOUT) {
            now = migrun_monotonic();
            if (idle >= 0 && now >= idle)
                continue; /* the rows gathered go now (the stall clocks go on) */
            if (!dst_pending || cr->dst_stall <= 0 || now < dst_last + cr->dst_stall)
                return S_STALLED_FROM;
            if (!out_moved(dst, &dst_queued))
                return S_STALLED_TO;
            dst_last = now; /* slow, not stalled */
            continue;
        }
        if (w != W_READY)
            return S_FAILED_FROM;
        if (p[0].revents & (POLLIN | POLLERR | POLLHUP)) {
            src_moved = 1;
            consumed = 1;
            if (!PQconsumeInput(src))
                return S_FAILED_FROM;
        }
        if (dst_pending && (p[1].revents & (POLLERR | POLLHUP)))
            return S_FAILED_TO;
        if (dst_pending && (p[1].revents & POLLOUT)) {
            dst_last = migrun_monotonic();
            dst_queued = out_queue(dst);
        }
    }
}

/* The source is cancelled and read to idle (unless it is the side that
 * stalled: closed then), the target's COPY failed with why and drained. */
static void abort_both(copy_run *cr, const char *why) {
    /* a side whose connection failed is closed: nothing to cancel or drain there */
    if (cr->src->conn != NULL && PQstatus(cr->src->conn) == CONNECTION_BAD)
        pg_conn_close(cr->src);
    if (cr->dst->conn != NULL && PQstatus(cr->dst->conn) == CONNECTION_BAD)
        pg_conn_close(cr->dst);
    if (cr->src->conn != NULL) {
        if (pg_conn_cancel(cr->src->conn) < 0) { /* nothing answers: no use draining */
            cr->src->closed_why = "the source did not take a cancel request within 5 s: migrun "
                                  "closed the connection";
            pg_conn_close(cr->src);
        } else {
            pg_conn_drain(cr->src, NULL);
        }
    }
    if (cr->dst->conn != NULL) {
        end_copy(cr->dst->conn, why, cr->dst_stall);
        pg_conn_drain(cr->dst, "aborted");
    }
}

/* After the loop failed or was interrupted: both sides aborted, nil, err
 * pushed (2 returned) or the interrupted error raised. */
static int copy_failed(lua_State *L, copy_run *cr, int how) {
    if (how == S_RAISED) { /* ... msg */
        abort_both(cr, "aborted by migrun: on_progress raised an error");
        return lua_error(L);
    }
    if (how == S_INTR) {
        abort_both(cr, "aborted by migrun: interrupted");
        return pg_raise_interrupted(L, cr->src);
    }
    if (how == S_STALLED_FROM || how == S_STALLED_TO) {
        int from = how == S_STALLED_FROM;
        pg_Conn *c = from ? cr->src : cr->dst;
        push_stalled(L, c, from ? "from" : "to", from ? cr->src_stall : cr->dst_stall,
                     from ? "nothing received" : "it took no data");
        abort_both(cr, "aborted by migrun: the source stalled");
        return 2;
    }
    /* the error first, while the failed connection still holds libpq's message */
    pg_Conn *c = how == S_FAILED_TO ? cr->dst : cr->src;
    lua_pushnil(L);
    pg_push_conn_error(L, c, c->conn, "connection", "08006", "connection lost during COPY");
    migrun_setfield(L, -1, "side", how == S_FAILED_TO ? "to" : "from");
    abort_both(cr, "aborted by migrun: the source COPY failed");
    return 2;
}

/* The stall bound of each side: opts.stall_timeout (seconds, or false for
 * none) for both, else each connection's own. */
static void copy_stalls(lua_State *L, copy_run *cr) {
    cr->src_stall = cr->src->stall;
    cr->dst_stall = cr->dst->stall;
    int given = lua_getfield(L, 1, "stall_timeout") != LUA_TNIL;
    lua_pop(L, 1);
    if (given)
        cr->src_stall = cr->dst_stall = pg_opt_seconds(L, 1, "stall_timeout", 0);
}

/*
 * pg.copy{ from = c1, from_sql = "COPY t TO STDOUT", to = c2, to_sql = "COPY t FROM STDIN",
 *          on_progress = function(bytes, rows) end, progress_interval = 1.0,
 *          stall_timeout = s }
 * -> {bytes=, rows=} | nil, err (err.side = "from" | "to")
 * rows in the result come from the target's command tag; the progress rows
 * count the COPY data messages read (one per row).
 */
int pg_copy(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_getfield(L, 1, "from"); /* 2 */
    lua_getfield(L, 1, "to");   /* 3 */
    copy_run cr = {.src = luaL_testudata(L, 2, CONN_MT), .dst = luaL_testudata(L, 3, CONN_MT)};
    luaL_argcheck(L, cr.src != NULL, 1, "'from' must be a migrun.pg.Conn");
    luaL_argcheck(L, cr.dst != NULL, 1, "'to' must be a migrun.pg.Conn");
    luaL_argcheck(L, cr.src != cr.dst, 1, "'from' and 'to' must be different connections");
    pg_check_idle(L, 2);
    pg_check_idle(L, 3);
    lua_getfield(L, 1, "from_sql"); /* 4 */
    lua_getfield(L, 1, "to_sql");   /* 5 */
    const char *from_sql = lua_tostring(L, 4), *to_sql = lua_tostring(L, 5);
    luaL_argcheck(L, from_sql != NULL, 1, "'from_sql' must be a COPY ... TO STDOUT statement");
    luaL_argcheck(L, to_sql != NULL, 1, "'to_sql' must be a COPY ... FROM STDIN statement");
    if (lua_getfield(L, 1, "on_progress") != LUA_TNIL) { /* 6 */
        luaL_argcheck(L, lua_isfunction(L, 6), 1, "'on_progress' must be a function");
        cr.fn = 6;
    }
    cr.interval = pg_opt_seconds(L, 1, "progress_interval", 1.0);
    copy_stalls(L, &cr);
    pg_Result *rs = pg_result_new(L, 2);           /* 7 */
    pg_Result *rd = pg_result_new(L, 3);           /* 8 */
    cr.buf = lua_newuserdatauv(L, RELAY_BYTES, 0); /* 9: collected however pg.copy ends */

    /* the target first: if it refuses, nothing has been read from the source */
    int started = start_copy(L, cr.dst, 3, rd, to_sql, PGRES_COPY_IN, "to", cr.dst_stall);
    if (started < 0)
        return pg_raise_interrupted(L, cr.dst);
    if (started == 0)
        return 2;
    started = start_copy(L, cr.src, 2, rs, from_sql, PGRES_COPY_OUT, "from", cr.src_stall);
    if (started <= 0) { /* ... nil err, or nothing (interrupted) */
        end_copy(cr.dst->conn,
                 started < 0 ? "aborted by migrun: interrupted"
                             : "aborted by migrun: the source COPY failed",
                 cr.dst_stall);
        pg_conn_drain(cr.dst, "aborted");
        if (started < 0)
            return pg_raise_interrupted(L, cr.src);
        return 2;
    }

    int how = stream_rows(L, &cr);
    if (how != S_DONE)
        return copy_failed(L, &cr, how);
    /* the source ended: its result says whether it finished or failed */
    if (!finish_copy(L, cr.src, rs, "from", cr.src_stall)) { /* ... nil err */
        end_copy(cr.dst->conn, "aborted by migrun: the source COPY failed", cr.dst_stall);
        pg_conn_drain(cr.dst, "aborted");
        return 2;
    }
    int w = end_copy(cr.dst->conn, NULL, cr.dst_stall);
    if (w == W_TIMEOUT) {
        push_stalled(L, cr.dst, "to", cr.dst_stall, "it took no data");
        return 2;
    }
    if (w != W_READY) {
        lua_pushnil(L);
        pg_push_conn_error(L, cr.dst, cr.dst->conn, "connection", "08006",
                           "connection lost ending COPY");
        migrun_setfield(L, -1, "side", "to");
        pg_conn_drain(cr.dst, "aborted");
        return 2;
    }
    if (!finish_copy(L, cr.dst, rd, "to", cr.dst_stall))
        return 2;
    pg_dispatch_notices(L, 2, cr.src);
    pg_dispatch_notices(L, 3, cr.dst);
    if (call_progress(L, cr.fn, cr.bytes, cr.rows))
        return lua_error(L);
    push_copy_totals(L, cr.bytes, rd->res);
    return 1;
}
