/*
 * migrun.aws: the C half of migrun's AWS client. It owns one HTTP exchange
 * over libcurl's easy API (aws.request) and exposes the SigV4 signer of
 * aws_sigv4.c (aws.sign, aws.sha256_hex, aws.hmac_sha256_hex). A request is a
 * short-lived handle ("migrun.aws.Request") born closed, so the curl handle,
 * the header list and the response buffers are released by its one closer
 * even when building the Lua result raises. Transfers are interruptible: the
 * progress callback aborts as soon as Ctrl-C is pending and the call then
 * raises the interrupted error (kind "interrupted"). aws.sleep and
 * aws.monotonic are host.sleep and host.monotonic (host.c), kept under the old
 * names while the Lua library moves to the host's.
 * Transport failures come back as nil plus a structured error of kind
 * "connection"; request headers (which carry signatures and session tokens)
 * never appear in an error. HTTP statuses, 4xx/5xx included, are results, not
 * errors: the Lua layer decides what they mean.
 */
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "migrun_internal.h"
#include "aws_sigv4.h"

#define REQUEST_MT "migrun.aws.Request"
#define DEFAULT_MAX_BODY (64u * 1024u * 1024u)

struct growbuf {
    char *data;
    size_t len, cap;
};

typedef struct {
    CURL *curl;                 /* NULL once closed */
    struct curl_slist *headers; /* request headers */
    struct growbuf body, head;  /* response body, raw response header lines */
    size_t max_body;
    int too_large, interrupted;
    char errbuf[CURL_ERROR_SIZE];
} aws_request;

static int growbuf_add(struct growbuf *g, const char *p, size_t n) {
    if (g->len + n + 1 > g->cap) {
        size_t cap = g->cap ? g->cap : 1024;
        while (cap < g->len + n + 1)
            cap *= 2;
        char *d = realloc(g->data, cap);
        if (d == NULL)
            return 0;
        g->data = d;
        g->cap = cap;
    }
    memcpy(g->data + g->len, p, n);
    g->len += n;
    g->data[g->len] = '\0';
    return 1;
}

static void growbuf_free(struct growbuf *g) {
    free(g->data);
    g->data = NULL;
    g->len = g->cap = 0;
}

/* The one closer, for __gc, __close and the end of a request. Idempotent. */
static void request_close(aws_request *r) {
    CURL *c = r->curl;
    r->curl = NULL; /* closed before released */
    if (c)
        curl_easy_cleanup(c);
    curl_slist_free_all(r->headers);
    r->headers = NULL;
    growbuf_free(&r->body);
    growbuf_free(&r->head);
}

static int request_gc(lua_State *L) {
    request_close(luaL_checkudata(L, 1, REQUEST_MT));
    return 0;
}

static int request_tostring(lua_State *L) {
    aws_request *r = luaL_checkudata(L, 1, REQUEST_MT);
    if (r->curl == NULL)
        lua_pushliteral(L, "migrun.aws.Request (closed)");
    else
        lua_pushfstring(L, "migrun.aws.Request (%p)", (void *)r);
    return 1;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud) {
    aws_request *r = ud;
    size_t len = size * n;
    if (r->body.len + len > r->max_body) {
        r->too_large = 1;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    return growbuf_add(&r->body, p, len) ? len : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
    aws_request *r = ud;
    size_t len = size * n;
    /* a new status line (100 Continue, a second response) starts afresh */
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0)
        r->head.len = 0;
    return growbuf_add(&r->head, p, len) ? len : 0;
}

static int on_progress(void *ud, curl_off_t dlt, curl_off_t dln, curl_off_t ult, curl_off_t uln) {
    (void)dlt;
    (void)dln;
    (void)ult;
    (void)uln;
    aws_request *r = ud;
    if (migrun_interrupt_pending) {
        r->interrupted = 1;
        return 1;
    }
    return 0;
}

static void append_line(lua_State *L, aws_request *r, const char *line) {
    struct curl_slist *l = curl_slist_append(r->headers, line);
    if (l == NULL)
        luaL_error(L, "aws.request: out of memory");
    r->headers = l;
}

/* Appends "Name: value" to the request's list; raises on header injection. */
static void add_header(lua_State *L, aws_request *r, const char *name, const char *value) {
    if (strpbrk(name, ":\r\n") != NULL || *name == '\0')
        luaL_error(L, "aws.request: invalid header name '%s'", name);
    if (strpbrk(value, "\r\n") != NULL)
        luaL_error(L, "aws.request: header '%s' has a line break in its value", name);
    /* "Name;" is curl's way to send an empty value ("Name:" would remove it) */
    append_line(
        L, r, *value ? lua_pushfstring(L, "%s: %s", name, value) : lua_pushfstring(L, "%s;", name));
    lua_pop(L, 1);
}

static int has_header(lua_State *L, int t, const char *name) {
    int found = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING && strcasecmp(lua_tostring(L, -1), name) == 0)
            found = 1;
    }
    return found;
}

static long ms_field(lua_State *L, int t, const char *key, double dflt) {
    lua_getfield(L, t, key);
    double s = luaL_optnumber(L, -1, dflt);
    lua_pop(L, 1);
    if (s < 0)
        luaL_error(L, "aws.request: %s must not be negative", key);
    long ms = (long)(s * 1000.0);
    return (s > 0 && ms == 0) ? 1 : ms;
}

static const char *curl_code_name(CURLcode rc) {
    switch (rc) {
    case CURLE_COULDNT_CONNECT:
        return "connect_failed";
    case CURLE_COULDNT_RESOLVE_HOST:
        return "resolve_failed";
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_SEND_ERROR:
        return "send_failed";
    case CURLE_RECV_ERROR:
        return "recv_failed";
    case CURLE_GOT_NOTHING:
        return "empty_reply";
    case CURLE_PARTIAL_FILE:
        return "partial_reply";
    case CURLE_SSL_CONNECT_ERROR:
        return "tls_failed";
    case CURLE_PEER_FAILED_VERIFICATION:
        return "tls_verify_failed";
    case CURLE_UNSUPPORTED_PROTOCOL:
        return "unsupported_protocol";
    case CURLE_URL_MALFORMAT:
        return "bad_url";
    default:
        return "transfer_failed";
    }
}

/* Pushes the response header table: lower-case names, repeats joined by ", ". */
static void push_response_headers(lua_State *L, const struct growbuf *g) {
    lua_newtable(L); /* hdrs */
    int t = lua_gettop(L);
    const char *p = g->data, *end = g->data ? g->data + g->len : NULL;
    while (p && p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL)
            eol = end;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon && !(eol - p >= 5 && memcmp(p, "HTTP/", 5) == 0)) {
            luaL_Buffer b;
            luaL_buffinit(L, &b);
            for (const char *q = p; q < colon; q++)
                luaL_addchar(&b, (char)(*q >= 'A' && *q <= 'Z' ? *q + 32 : *q));
            luaL_pushresult(&b); /* hdrs name */
            const char *v = colon + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            lua_pushvalue(L, -1);
            if (lua_gettable(L, t) == LUA_TSTRING) { /* hdrs name old */
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t)(ve - v)); /* hdrs name value */
            }
            lua_settable(L, t);
        }
        p = eol + 1;
    }
}

/*
 * aws.request{ url=, method="GET", headers={name=value|{values}}, body=,
 *              connect_timeout=seconds, timeout=seconds, max_body=bytes,
 *              where="dms" }
 *   -> {status=, headers=, body=}  |  nil, err (kind "connection")
 * Response header names are lower-cased (res.headers["x-amzn-requestid"]);
 * repeated headers are joined with ", ". Timeouts are in seconds.
 */
/* The request's headers from the table at index hidx (a value or a list of
 * values per name); no "Expect: 100-continue" round trip, no invented content
 * type. */
static void request_headers(lua_State *L, aws_request *r, int hidx) {
    if (lua_istable(L, hidx)) {
        lua_pushnil(L);
        while (lua_next(L, hidx)) { /* ... name value */
            const char *name = luaL_checkstring(L, -2);
            if (lua_istable(L, -1)) {
                lua_Integer n = luaL_len(L, -1);
                for (lua_Integer j = 1; j <= n; j++) {
                    lua_geti(L, -1, j);
                    add_header(L, r, name, luaL_checkstring(L, -1));
                    lua_pop(L, 1);
                }
            } else {
                add_header(L, r, name, luaL_checkstring(L, -1));
            }
            lua_pop(L, 1);
        }
    }
    if (!lua_istable(L, hidx) || !has_header(L, hidx, "Expect"))
        append_line(L, r, "Expect:");
    if (!lua_istable(L, hidx) || !has_header(L, hidx, "Content-Type"))
        append_line(L, r, "Content-Type:");
}

struct request_spec {
    const char *url, *method, *body, *where;
    size_t bodylen;
    long connect_ms, total_ms;
};

/* The easy handle set for the request: timeouts, callbacks, method and body. */
static void request_options(aws_request *r, const struct request_spec *q) {
    CURL *c = r->curl;
    curl_easy_setopt(c, CURLOPT_URL, q->url);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, q->connect_ms);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, q->total_ms);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, r);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "migrun/" MIGRUN_VERSION);
    if (strcmp(q->method, "GET") == 0 && q->body == NULL) {
        curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(q->method, "HEAD") == 0) {
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    } else {
        if (strcmp(q->method, "POST") != 0)
            curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, q->method);
        if (q->body != NULL || strcmp(q->method, "POST") == 0 || strcmp(q->method, "PUT") == 0) {
            curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)q->bodylen);
            curl_easy_setopt(c, CURLOPT_COPYPOSTFIELDS, q->body ? q->body : "");
        }
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, r->headers);
}

/* What the transfer gave: {status, headers, body}, or nil and a connection
 * error. The request is closed either way. -> number of results */
static int request_result(lua_State *L, aws_request *r, CURLcode rc, const char *where) {
    if (rc != CURLE_OK) {
        const char *code = r->too_large ? "response_too_large" : curl_code_name(rc);
        const char *msg = r->too_large   ? "response body larger than max_body"
                          : r->errbuf[0] ? r->errbuf
                                         : curl_easy_strerror(rc);
        lua_pushnil(L);
        migrun_error_push(L, "connection", where, code, msg); /* ... nil err */
        lua_pushinteger(L, (lua_Integer)rc);
        lua_setfield(L, -2, "curl_code");
        lua_pushboolean(L, rc == CURLE_OPERATION_TIMEDOUT);
        lua_setfield(L, -2, "timeout");
        request_close(r);
        return 2;
    }
    long status = 0;
    curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &status);
    lua_createtable(L, 0, 3); /* ... res */
    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");
    push_response_headers(L, &r->head);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, r->body.data ? r->body.data : "", r->body.len);
    lua_setfield(L, -2, "body");
    request_close(r);
    return 1;
}

static int aws_request_call(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    struct request_spec q = {0};
    lua_getfield(L, 1, "url");
    q.url = luaL_checkstring(L, -1); /* stays alive: referenced by arg 1 */
    lua_getfield(L, 1, "method");
    q.method = luaL_optstring(L, -1, "GET");
    lua_getfield(L, 1, "body");
    q.body = luaL_optlstring(L, -1, NULL, &q.bodylen);
    lua_getfield(L, 1, "where");
    q.where = luaL_optstring(L, -1, "aws");
    lua_pop(L, 4); /* the strings stay alive: arg 1 references them */
    q.connect_ms = ms_field(L, 1, "connect_timeout", 10);
    q.total_ms = ms_field(L, 1, "timeout", 60);
    lua_getfield(L, 1, "max_body");
    lua_Integer max_body = luaL_optinteger(L, -1, DEFAULT_MAX_BODY);
    lua_pop(L, 1);
    luaL_argcheck(L, max_body > 0, 1, "max_body must be positive");
    lua_getfield(L, 1, "headers"); /* 2 */
    if (!lua_isnil(L, 2))
        luaL_checktype(L, 2, LUA_TTABLE);

    /* born closed: metatable first, then the resource */
    aws_request *r = lua_newuserdatauv(L, sizeof *r, 0); /* 3 */
    memset(r, 0, sizeof *r);
    luaL_setmetatable(L, REQUEST_MT);
    r->max_body = (size_t)max_body;
    r->curl = curl_easy_init();
    if (r->curl == NULL)
        return luaL_error(L, "aws.request: curl_easy_init failed");
    request_headers(L, r, 2);
    request_options(r, &q);

    CURLcode rc = curl_easy_perform(r->curl);
    if (r->interrupted) {
        request_close(r);
        return migrun_raise_interrupted(L, NULL);
    }
    return request_result(L, r, rc, q.where);
}

static const luaL_Reg aws_funcs[] = {
    /* aliases of host.sleep and host.monotonic, while the Lua library moves to those */
    {"sleep", migrun_host_sleep},
    {"monotonic", migrun_host_monotonic},
    {"request", aws_request_call},
    {"sign", migrun_aws_sign},
    {"sha256_hex", migrun_aws_sha256_hex},
    {"hmac_sha256_hex", migrun_aws_hmac_sha256_hex},
    {NULL, NULL},
};

int luaopen_migrun_aws(lua_State *L) {
    static int curl_ready = 0;
    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
            return luaL_error(L, "migrun.aws: curl_global_init failed");
        curl_ready = 1;
    }
    if (luaL_newmetatable(L, REQUEST_MT)) {
        lua_pushcfunction(L, request_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, request_gc);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, request_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    luaL_newlib(L, aws_funcs);
    lua_pushstring(L, curl_version());
    lua_setfield(L, -2, "curl_version");
    return 1;
}
