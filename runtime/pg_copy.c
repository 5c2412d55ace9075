/*
 * COPY for migrun.pg.core: conn:copy_out and conn:copy_in, which stream a
 * COPY through Lua callbacks (the sink gets chunks of about 64 KiB; the
 * source returns strings until nil), and pg.copy, which streams COPY OUT from
 * one server into COPY IN on another entirely in C, both sockets non-blocking
 * and the buffering bounded. Every wait polls, so Ctrl-C reaches a COPY; when
 * one side fails or is interrupted, the source is cancelled, the target's
 * COPY is failed, and both connections are brought back to idle before the
 * error reaches Lua. pg.c owns the handles this works on (pg_internal.h).
 */
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "migrun_internal.h"
#include "pg_internal.h"

#define COPY_FLUSH_BYTES (64 * 1024) /* pg.copy: flush the target after this much */
#define COPY_CHUNK_BYTES (64 * 1024) /* copy_out: hand the sink chunks of about this size */

/* ---- COPY with Lua callbacks ----------------------------------------------- */

/*
 * Sends sql (a COPY) and waits until the server is in the expected COPY state.
 * Returns 1 when it is; else pushes nil, err and returns 0 (connection idle);
 * on Ctrl-C returns -1 with the command cancelled and nothing pushed (the
 * caller cleans up its other side, then raises). r holds the results so their
 * memory is GC-managed.
 */
static int start_copy(lua_State *L, pg_Conn *c, int conn_idx, pg_Result *r, const char *sql,
                      ExecStatusType want, const char *side) {
    char where[96];
    if (!PQsendQuery(c->conn, sql)) {
        lua_pushnil(L);
        pg_push_conn_error(L, c, c->conn, "connection", "08006", NULL);
        migrun_setfield(L, -1, "side", side);
        return 0;
    }
    int w = pg_conn_wait_result(c->conn, -1, 1);
    if (w == W_INTR) {
        pg_conn_cancel(c->conn);
        pg_conn_drain(c, "interrupted");
        return -1;
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
static int finish_copy(lua_State *L, pg_Conn *c, pg_Result *r, const char *side) {
    int w;
    PGresult *last = NULL;
    for (;;) {
        w = pg_conn_wait_result(c->conn, -1, 0);
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
    int started = start_copy(L, c, 1, r, sql, PGRES_COPY_OUT, "from");
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
            int w = pg_wait_sock(c->conn, POLLIN, -1, 1);
            if (w == W_INTR) {
                pg_conn_drain(c, "interrupted");
                return pg_raise_interrupted(L, c);
            }
            if (w == W_READY && PQconsumeInput(c->conn))
                continue;
        }
        break; /* -1 done, -2 failed: the result says which */
    }
    if (!finish_copy(L, c, r, "from"))
        return 2;
    pg_dispatch_notices(L, 1, c);
    push_copy_totals(L, bytes, r->res);
    return 1;
}

/* Queues data for COPY IN, waiting for room; W_READY or W_ERR / W_INTR. */
static int put_copy(PGconn *conn, const char *data, int n, int interruptible) {
    for (;;) {
        int r = PQputCopyData(conn, data, n);
        if (r > 0)
            return W_READY;
        if (r < 0)
            return W_ERR;
        int w = pg_wait_sock(conn, POLLOUT, -1, interruptible);
        if (w != W_READY)
            return w;
    }
}

static int end_copy(PGconn *conn, const char *errmsg) {
    for (;;) {
        int r = PQputCopyEnd(conn, errmsg);
        if (r > 0)
            return pg_conn_flush(conn, -1, 0);
        if (r < 0)
            return W_ERR;
        if (pg_wait_sock(conn, POLLOUT, -1, 0) != W_READY)
            return W_ERR;
    }
}

/* conn:copy_in(sql, fn) -> {bytes=, rows=} | nil, err; fn() returns chunks, nil at the end */
int pg_conn_copy_in(lua_State *L) {
    pg_Conn *c = pg_check_idle(L, 1);
    const char *sql = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_settop(L, 3);
    pg_Result *r = pg_result_new(L, 1); /* conn sql fn res */
    int started = start_copy(L, c, 1, r, sql, PGRES_COPY_IN, "to");
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
            int w = put_copy(c->conn, s, n, 1);
            if (w == W_INTR) {
                pg_conn_drain(c, "interrupted");
                return pg_raise_interrupted(L, c);
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
            int w = pg_conn_flush(c->conn, -1, 1);
            if (w == W_INTR) {
                pg_conn_drain(c, "interrupted");
                return pg_raise_interrupted(L, c);
            }
            if (w != W_READY)
                break;
        }
    }
    end_copy(c->conn, NULL);
    if (!finish_copy(L, c, r, "to"))
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

/*
 * pg.copy{ from = c1, from_sql = "COPY t TO STDOUT", to = c2, to_sql = "COPY t FROM STDIN",
 *          on_progress = function(bytes, rows) end, progress_interval = 1.0 }
 * -> {bytes=, rows=} | nil, err (err.side = "from" | "to")
 * rows in the result come from the target's command tag; the progress rows
 * count the COPY data messages read (one per row).
 */
int pg_copy(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_getfield(L, 1, "from"); /* 2 */
    lua_getfield(L, 1, "to");   /* 3 */
    pg_Conn *src = luaL_testudata(L, 2, CONN_MT);
    pg_Conn *dst = luaL_testudata(L, 3, CONN_MT);
    luaL_argcheck(L, src != NULL, 1, "'from' must be a migrun.pg.Conn");
    luaL_argcheck(L, dst != NULL, 1, "'to' must be a migrun.pg.Conn");
    luaL_argcheck(L, src != dst, 1, "'from' and 'to' must be different connections");
    pg_check_idle(L, 2);
    pg_check_idle(L, 3);
    lua_getfield(L, 1, "from_sql"); /* 4 */
    lua_getfield(L, 1, "to_sql");   /* 5 */
    const char *from_sql = lua_tostring(L, 4), *to_sql = lua_tostring(L, 5);
    luaL_argcheck(L, from_sql != NULL, 1, "'from_sql' must be a COPY ... TO STDOUT statement");
    luaL_argcheck(L, to_sql != NULL, 1, "'to_sql' must be a COPY ... FROM STDIN statement");
    int fn = 0;
    if (lua_getfield(L, 1, "on_progress") != LUA_TNIL) { /* 6 */
        luaL_argcheck(L, lua_isfunction(L, 6), 1, "'on_progress' must be a function");
        fn = 6;
    }
    double interval = pg_opt_seconds(L, 1, "progress_interval", 1.0);
    pg_Result *rs = pg_result_new(L, 2); /* 7 */
    pg_Result *rd = pg_result_new(L, 3); /* 8 */

    /* the target first: if it refuses, nothing has been read from the source */
    int started = start_copy(L, dst, 3, rd, to_sql, PGRES_COPY_IN, "to");
    if (started < 0)
        return pg_raise_interrupted(L, dst);
    if (started == 0)
        return 2;
    started = start_copy(L, src, 2, rs, from_sql, PGRES_COPY_OUT, "from"); /* ... nil err? */
    if (started <= 0) {
        end_copy(dst->conn, started < 0 ? "aborted by migrun: interrupted"
                                        : "aborted by migrun: the source COPY failed");
        pg_conn_drain(dst, "aborted");
        if (started < 0)
            return pg_raise_interrupted(L, src);
        return 2;
    }

    lua_Integer bytes = 0, rows = 0;
    size_t since_flush = 0;
    int dst_pending = 0;       /* the target has unsent data */
    const char *failed = NULL; /* "from" | "to" */
    int interrupted = 0;
    double next_progress = migrun_monotonic() + interval;
    for (;;) {
        char *buf = NULL;
        int n = PQgetCopyData(src->conn, &buf, 1);
        if (n > 0) {
            int w = put_copy(dst->conn, buf, n, 1);
            PQfreemem(buf);
            if (w == W_INTR) {
                interrupted = 1;
                break;
            }
            if (w != W_READY) {
                failed = "to";
                break;
            }
            bytes += n;
            rows++;
            since_flush += (size_t)n;
            if (since_flush >= COPY_FLUSH_BYTES) {
                /* bounded buffering: nothing more is read until the target took this */
                since_flush = 0;
                w = pg_conn_flush(dst->conn, -1, 1);
                if (w == W_INTR) {
                    interrupted = 1;
                    break;
                }
                if (w != W_READY) {
                    failed = "to";
                    break;
                }
                dst_pending = 0;
            }
            if (fn && (rows & 255) == 0 && migrun_monotonic() >= next_progress) {
                if (call_progress(L, fn, bytes, rows)) { /* ... msg */
                    pg_conn_cancel(src->conn);
                    pg_conn_drain(src, NULL);
                    end_copy(dst->conn, "aborted by migrun: on_progress raised an error");
                    pg_conn_drain(dst, "aborted");
                    return lua_error(L);
                }
                next_progress = migrun_monotonic() + interval;
            }
            continue;
        }
        if (n < 0)
            break; /* -1: the source is done; -2: it failed (finish_copy tells) */
        /* nothing to read: push out what the target has, then wait for either side */
        int f = PQflush(dst->conn);
        if (f < 0) {
            failed = "to";
            break;
        }
        dst_pending = f == 1;
        struct pollfd p[2] = {{.fd = PQsocket(src->conn), .events = POLLIN, .revents = 0},
                              {.fd = PQsocket(dst->conn), .events = POLLOUT, .revents = 0}};
        int w = pg_wait_fds(p, dst_pending ? 2 : 1, -1, 1);
        if (w == W_INTR) {
            interrupted = 1;
            break;
        }
        if (w != W_READY) {
            failed = "from";
            break;
        }
        if ((p[0].revents & (POLLIN | POLLERR | POLLHUP)) && !PQconsumeInput(src->conn)) {
            failed = "from";
            break;
        }
        if (dst_pending && (p[1].revents & (POLLERR | POLLHUP))) {
            failed = "to";
            break;
        }
    }

    if (interrupted || failed) {
        /* abort both: cancel the source, fail the target's COPY */
        int src_ok = src->conn != NULL;
        if (src_ok) {
            pg_conn_cancel(src->conn);
            pg_conn_drain(src, NULL);
        }
        if (dst->conn != NULL) {
            end_copy(dst->conn, interrupted ? "aborted by migrun: interrupted"
                                            : "aborted by migrun: the source COPY failed");
            pg_conn_drain(dst, "aborted");
        }
        if (interrupted)
            return pg_raise_interrupted(L, src);
        pg_Conn *c = strcmp(failed, "to") == 0 ? dst : src;
        lua_pushnil(L);
        pg_push_conn_error(L, c, c->conn, "connection", "08006", "connection lost during COPY");
        migrun_setfield(L, -1, "side", failed);
        return 2;
    }
    /* the source ended: its result says whether it finished or failed */
    if (!finish_copy(L, src, rs, "from")) { /* ... nil err */
        end_copy(dst->conn, "aborted by migrun: the source COPY failed");
        pg_conn_drain(dst, "aborted");
        return 2;
    }
    if (end_copy(dst->conn, NULL) != W_READY) {
        lua_pushnil(L);
        pg_push_conn_error(L, dst, dst->conn, "connection", "08006", "connection lost ending COPY");
        migrun_setfield(L, -1, "side", "to");
        pg_conn_drain(dst, "aborted");
        return 2;
    }
    if (!finish_copy(L, dst, rd, "to"))
        return 2;
    pg_dispatch_notices(L, 2, src);
    pg_dispatch_notices(L, 3, dst);
    if (call_progress(L, fn, bytes, rows))
        return lua_error(L);
    push_copy_totals(L, bytes, rd->res);
    return 1;
}
