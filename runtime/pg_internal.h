/*
 * What pg.c (connections, results, exec) and pg_copy.c (COPY) share: the
 * handle types, the waits that poll the socket so timeouts and Ctrl-C reach
 * them, cancelling a command and draining a connection back to idle, and the
 * error values built from a connection or a result. Internal to migrun.
 */
#ifndef MIGRUN_PG_INTERNAL_H
#define MIGRUN_PG_INTERNAL_H

#include <poll.h>

#include <libpq-fe.h>

#include "migrun_internal.h"

#define CONN_MT "migrun.pg.Conn"

/* Seconds a COPY may go without moving a byte on a connection (stall_timeout):
 * under tcp_user_timeout (30 s, pg.c), so that a stalled COPY ends with
 * migrun's error naming the side rather than with the kernel's. */
#define PG_STALL_TIMEOUT 20.0

/* migrun.pg.Conn: a PGconn in non-blocking mode. */
typedef struct {
    PGconn *conn;                     /* NULL when closed */
    int pid;                          /* backend pid, for "where" */
    double timeout;                   /* client-side statement timeout in seconds; 0 = none */
    double stall;                     /* COPY: seconds without progress before failing; 0 = none */
    int has_handler;                  /* a Lua notice handler is set (user value 1) */
    struct notice_rec *nhead, *ntail; /* notices not yet handed to Lua (pg.c) */
    void *scratch;          /* libpq buffer in flight while Lua may raise; freed by the closer */
    const char *closed_why; /* why migrun closed it itself (a static string), for the error */
    char name[64];
} pg_Conn;

typedef struct {
    PGresult *res; /* NULL once freed, or while a command is still running */
} pg_Result;

/* How a wait ended: ready, deadline passed, Ctrl-C, or the connection failed. */
enum { W_READY, W_TIMEOUT, W_INTR, W_ERR };

/* poll() the fds until one is ready, the deadline (<0: none) passes, or (when
 * interruptible) Ctrl-C is pressed. */
int pg_wait_fds(struct pollfd *fds, int nfds, double deadline, int interruptible);
int pg_wait_sock(PGconn *conn, short events, double deadline, int interruptible);
/* Sends what libpq has queued, reading input meanwhile. */
int pg_conn_flush(PGconn *conn, double deadline, int interruptible);
/* Waits until PQgetResult will not block. */
int pg_conn_wait_result(PGconn *conn, double deadline, int interruptible);
/* Asks the server to cancel the running command, waiting CANCEL_TIMEOUT at
 * most: 1 when the server took the request, 0 when it could not be sent, -1
 * when nothing answered in time (the path to the server is dead). */
int pg_conn_cancel(PGconn *conn);
/* Closes the connection (the handle stays, closed): for one that stalled. */
void pg_conn_close(pg_Conn *c);
/* Marks the error at the top of the stack as a lost connection when the
 * connection is gone (lost = true and a hint); returns whether it is. */
int pg_mark_lost(lua_State *L, pg_Conn *c);
/* Brings a connection back to idle after an abandoned command (ending a COPY
 * IN with abort_msg); 0 when that failed and the connection was closed. */
int pg_conn_drain(pg_Conn *c, const char *abort_msg);

/* "target 4711": the connection's name and backend pid, into buf. */
const char *pg_conn_where(pg_Conn *c, char *buf, size_t size);
/* Hands queued server notices to the handler of the Conn at idx. */
void pg_dispatch_notices(lua_State *L, int idx, pg_Conn *c);
/* The Conn at idx, open and idle; raises otherwise. */
pg_Conn *pg_check_idle(lua_State *L, int idx);
/* Pushes a Result holding nothing yet, keeping the Conn at conn_idx alive. */
pg_Result *pg_result_new(lua_State *L, int conn_idx);
/* Stores res in r, clearing what r held. */
void pg_result_set(pg_Result *r, PGresult *res);
/* Push the error made from the connection's message / carried by a result. */
void pg_push_conn_error(lua_State *L, pg_Conn *c, PGconn *conn, const char *kind, const char *code,
                        const char *fallback);
void pg_push_result_error(lua_State *L, pg_Conn *c, const PGresult *res, const char *kind);
/* Ctrl-C, the connection back to idle: raises the interrupted error. */
int pg_raise_interrupted(lua_State *L, pg_Conn *c);
/* opts[key] as seconds (def when absent); raises on a bad value. */
double pg_opt_seconds(lua_State *L, int opts, const char *key, double def);

/* pg_copy.c: conn:copy_out, conn:copy_in and pg.copy, registered by pg.c. */
int pg_conn_copy_out(lua_State *L);
int pg_conn_copy_in(lua_State *L);
int pg_copy(lua_State *L);

#endif
