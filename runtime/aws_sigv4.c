/*
 * AWS Signature Version 4, as botocore's SigV4Auth computes it: the canonical
 * request (normalized and percent-encoded URI, sorted and re-encoded query,
 * lower-cased trimmed headers, signed-header list, payload hash), the string
 * to sign with its credential scope, the derived signing key and the
 * signature, each a step of its own (see "aws.sign, step by step"). The texts
 * are built from Lua strings on the Lua stack, so an error raised halfway (bad
 * argument, out of memory) leaks nothing; the key material is built apart, in
 * C buffers that no Lua call can jump over and that are wiped (OPENSSL_cleanse)
 * before the signer goes on; OpenSSL is only called for one-shot SHA-256 and
 * HMAC-SHA256. The signer returns its intermediate texts too, so tests compare
 * them with the published vectors byte for byte and a DMS stand-in can verify
 * a request by recomputing it. The secret key never leaves this file except
 * folded into the signature.
 */
#include <assert.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "migrun_internal.h"
#include "aws_sigv4.h"

static const char HEX_LOWER[] = "0123456789abcdef";
static const char HEX_UPPER[] = "0123456789ABCDEF";

static void hex_encode(const unsigned char *in, size_t n, char *out) {
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = HEX_LOWER[in[i] >> 4];
        out[2 * i + 1] = HEX_LOWER[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static void sha256_hex(const char *data, size_t len, char out[65]) {
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)data, len, md);
    hex_encode(md, sizeof md, out);
}

/* -> 1, or 0 when OpenSSL failed */
static int hmac_sha256(const unsigned char *key, size_t keylen, const char *data, size_t len,
                       unsigned char out[32]) {
    unsigned int outlen = 32;
    return HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)data, len, out, &outlen) !=
           NULL;
}

static int is_unreserved(unsigned char c) {
    return isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~';
}

/* Appends s percent-encoded: unreserved bytes (and '/' when keep_slash) stay. */
static void add_encoded(luaL_Buffer *b, const char *s, size_t len, int keep_slash) {
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (is_unreserved(c) || (keep_slash && c == '/')) {
            luaL_addchar(b, (char)c);
        } else {
            luaL_addchar(b, '%');
            luaL_addchar(b, HEX_UPPER[c >> 4]);
            luaL_addchar(b, HEX_UPPER[c & 15]);
        }
    }
}

static int hexval(int c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Pushes s form-decoded ("+" is a space, %XX a byte), as Python's parse_qsl does. */
static void push_decoded(lua_State *L, const char *s, size_t len) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '+') {
            luaL_addchar(&b, ' ');
        } else if (s[i] == '%' && i + 2 < len && hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
            luaL_addchar(&b, (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2])));
            i += 2;
        } else {
            luaL_addchar(&b, s[i]);
        }
    }
    luaL_pushresult(&b);
}

/*
 * Pushes the canonical URI of path: dot segments removed and repeated slashes
 * collapsed (posixpath.normpath, keeping a trailing slash), then every byte
 * but unreserved characters and '/' percent-encoded.
 */
static void push_canonical_uri(lua_State *L, const char *path) {
    size_t len = strlen(path);
    /* segment start offsets kept on a Lua-owned buffer so errors cannot leak */
    size_t *seg = lua_newuserdatauv(L, (len + 1) * sizeof *seg, 0);       /* segs */
    size_t *seglen = lua_newuserdatauv(L, (len + 1) * sizeof *seglen, 0); /* segs lens */
    size_t nseg = 0;
    for (size_t i = 0; i < len;) {
        while (i < len && path[i] == '/')
            i++;
        size_t start = i;
        while (i < len && path[i] != '/')
            i++;
        size_t n = i - start;
        if (n == 0 || (n == 1 && path[start] == '.'))
            continue;
        if (n == 2 && path[start] == '.' && path[start + 1] == '.') {
            if (nseg > 0)
                nseg--;
            continue;
        }
        seg[nseg] = start;
        seglen[nseg] = n;
        nseg++;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '/');
    for (size_t k = 0; k < nseg; k++) {
        if (k > 0)
            luaL_addchar(&b, '/');
        add_encoded(&b, path + seg[k], seglen[k], 0);
    }
    if (nseg > 0 && len > 0 && path[len - 1] == '/')
        luaL_addchar(&b, '/');
    luaL_pushresult(&b); /* segs lens uri */
    lua_replace(L, -3);  /* uri lens */
    lua_pop(L, 1);       /* uri */
}

static int cmp_pairs(const void *a, const void *b) {
    const char *const *pa = a, *const *pb = b;
    int c = strcmp(pa[0], pb[0]);
    return c != 0 ? c : strcmp(pa[1], pb[1]);
}

/* Collects the encoded (key, value) pair on top of the stack into list at idx. */
static void list_append_pair(lua_State *L, int list) {
    lua_Integer n = luaL_len(L, list);
    lua_seti(L, list, n + 2); /* value */
    lua_seti(L, list, n + 1); /* key */
}

static void push_encoded_value(lua_State *L, int idx) {
    size_t len;
    const char *s = luaL_tolstring(L, idx, &len); /* ... s */
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    add_encoded(&b, s, len, 0);
    luaL_pushresult(&b); /* ... s enc */
    lua_remove(L, -2);
}

/*
 * Pushes the canonical query string. q is a query string ("b=2&a=1", decoded
 * then re-encoded) or a table {name = value | {value, ...}} of raw values.
 */
static void push_canonical_query(lua_State *L, int q) {
    q = lua_absindex(L, q);
    lua_newtable(L); /* list: k1 v1 k2 v2 ... (encoded) */
    int list = lua_gettop(L);
    if (lua_type(L, q) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(L, q, &len);
        size_t i = 0;
        while (i < len) {
            size_t start = i;
            while (i < len && s[i] != '&')
                i++;
            size_t n = i - start;
            i++;
            if (n == 0)
                continue;
            const char *eq = memchr(s + start, '=', n);
            size_t klen = eq ? (size_t)(eq - (s + start)) : n;
            push_decoded(L, s + start, klen);
            push_encoded_value(L, -1);
            lua_remove(L, -2); /* list key */
            if (eq)
                push_decoded(L, eq + 1, n - klen - 1);
            else
                lua_pushliteral(L, "");
            push_encoded_value(L, -1);
            lua_remove(L, -2); /* list key value */
            list_append_pair(L, list);
        }
    } else if (lua_type(L, q) == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, q)) { /* list k v */
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "aws.sign: query keys must be strings");
            if (lua_type(L, -1) == LUA_TTABLE) {
                int vals = lua_gettop(L);
                lua_Integer nv = luaL_len(L, vals);
                for (lua_Integer j = 1; j <= nv; j++) {
                    push_encoded_value(L, vals - 1);
                    lua_geti(L, vals, j);
                    push_encoded_value(L, -1);
                    lua_remove(L, -2); /* list k v enck encv */
                    list_append_pair(L, list);
                }
            } else {
                push_encoded_value(L, -2);
                push_encoded_value(L, -2); /* list k v enck encv */
                list_append_pair(L, list);
            }
            lua_pop(L, 1); /* list k */
        }
    } else if (!lua_isnoneornil(L, q)) {
        luaL_error(L, "aws.sign: query must be a string or a table");
    }
    size_t npairs = (size_t)luaL_len(L, list) / 2;
    const char **pairs = lua_newuserdatauv(L, (npairs + 1) * 2 * sizeof *pairs, 0);
    for (size_t k = 0; k < npairs; k++) {
        lua_geti(L, list, (lua_Integer)(2 * k + 1));
        pairs[2 * k] = lua_tostring(L, -1); /* anchored in list */
        lua_pop(L, 1);
        lua_geti(L, list, (lua_Integer)(2 * k + 2));
        pairs[2 * k + 1] = lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    qsort(pairs, npairs, 2 * sizeof *pairs, cmp_pairs);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t k = 0; k < npairs; k++) {
        if (k > 0)
            luaL_addchar(&b, '&');
        luaL_addstring(&b, pairs[2 * k]);
        luaL_addchar(&b, '=');
        luaL_addstring(&b, pairs[2 * k + 1]);
    }
    luaL_pushresult(&b);  /* list pairs query */
    lua_replace(L, list); /* query pairs */
    lua_pop(L, 1);        /* query */
}

/* Pushes a header value trimmed, with runs of whitespace collapsed to one space. */
static void push_header_value(lua_State *L, const char *s, size_t len) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int pending = 0, any = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
            pending = any;
        } else {
            if (pending)
                luaL_addchar(&b, ' ');
            pending = 0;
            any = 1;
            luaL_addchar(&b, (char)c);
        }
    }
    luaL_pushresult(&b);
}

static void push_lower(lua_State *L, const char *s) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (; *s; s++)
        luaL_addchar(&b, (char)tolower((unsigned char)*s));
    luaL_pushresult(&b);
}

/* Headers botocore never signs. */
static int unsigned_header(const char *lname) {
    static const char *const skip[] = {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
        "authorization",
        NULL,
    };
    for (int i = 0; skip[i]; i++)
        if (strcmp(lname, skip[i]) == 0)
            return 1;
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sets out[name] = value, first deleting any key equal to name ignoring case. */
static void set_header(lua_State *L, int out, const char *name, const char *value) {
    lua_pushnil(L);
    while (lua_next(L, out)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING && strcasecmp(lua_tostring(L, -1), name) == 0) {
            lua_pushvalue(L, -1);
            lua_pushnil(L);
            lua_settable(L, out); /* safe during traversal: assigning nil */
        }
    }
    lua_pushstring(L, value);
    lua_setfield(L, out, name);
}

/* Splits url into host (with port unless default for the scheme), path and query. */
static void split_url(lua_State *L, const char *url) {
    const char *p = strstr(url, "://");
    if (p == NULL)
        luaL_error(L, "aws.sign: url must look like https://host/path");
    int https = (p - url == 5 && strncasecmp(url, "https", 5) == 0);
    const char *h = p + 3;
    size_t hl = strcspn(h, "/?#");
    const char *at = memchr(h, '@', hl);
    if (at)
        luaL_error(L, "aws.sign: url must not carry user information");
    const char *colon = NULL;
    if (h[0] == '[') {
        const char *rb = memchr(h, ']', hl);
        if (rb && (size_t)(rb - h) + 1 < hl && rb[1] == ':')
            colon = rb + 1;
    } else {
        colon = memchr(h, ':', hl);
    }
    if (colon &&
        ((https && (size_t)(h + hl - colon - 1) == 3 && strncmp(colon + 1, "443", 3) == 0) ||
         (!https && (size_t)(h + hl - colon - 1) == 2 && strncmp(colon + 1, "80", 2) == 0)))
        lua_pushlstring(L, h, (size_t)(colon - h));
    else
        lua_pushlstring(L, h, hl); /* host */
    const char *rest = h + hl;
    size_t pl = strcspn(rest, "?#");
    if (pl == 0)
        lua_pushliteral(L, "/");
    else
        lua_pushlstring(L, rest, pl); /* host path */
    if (rest[pl] == '?') {
        const char *q = rest + pl + 1;
        lua_pushlstring(L, q, strcspn(q, "#"));
    } else {
        lua_pushliteral(L, ""); /* host path query */
    }
}

/* ---- aws.sign, step by step ----------------------------------------------
 * migrun_aws_sign reads its argument table (read_args), then each step pushes
 * its result on the Lua stack, at the slot below named after it, so that the
 * later steps and the result table find it there. The key material (the
 * "AWS4" + secret key, the derived keys, the intermediate HMACs) never goes
 * on the Lua stack: it lives in C buffers of sign_with_secret, which calls no
 * Lua function (nothing can raise and jump over the wipe) and wipes every one
 * of them with OPENSSL_cleanse before it returns, whether OpenSSL failed or
 * not. Only the signature, which is sent anyway, leaves it. */
enum {
    SLOT_ARGS = 1, /* the argument table: the strings of struct sign_args live in it */
    SLOT_HOST,     /* the host (with a non-default port), or nil: the Host header names it */
    SLOT_PATH,     /* the path as sent on the wire */
    SLOT_QUERY,    /* the query: a string, a table of raw values, or nil */
    SLOT_HEADERS,  /* the headers to send: the caller's, then Host, X-Amz-Date, the token */
    SLOT_CANON,    /* the canonical headers: lower-case name -> canonical value */
    SLOT_NAMES,  /* userdata: const char *[], SLOT_CANON's names sorted (strings anchored there) */
    SLOT_SIGNED, /* the signed headers, "host;x-amz-date" */
    SLOT_CREQ,   /* the canonical request */
    SLOT_SCOPE,  /* the credential scope, "20150830/us-east-1/dms/aws4_request" */
    SLOT_STS,    /* the string to sign */
    SLOT_AUTH,   /* the Authorization header's value */
    SLOT_RESULT, /* the result table */
};

/* What aws.sign takes from its argument table. The strings belong to the
 * table (SLOT_ARGS), which outlives the call. */
struct sign_args {
    const char *method, *region, *service, *access_key, *token, *only, *amzdate;
    const char *secret; /* the caller's string: read, never copied outside sign_with_secret */
    size_t secret_len;
    char payload[65]; /* the body's SHA-256 in hex */
    char day[9];      /* YYYYMMDD, the first 8 characters of amzdate */
    char now[17];     /* amzdate when the caller gives no time */
};

/* Looks a field up as a string or nil (len, when given, gets its length);
 * raises when it has another type. */
static const char *opt_lfield(lua_State *L, int t, const char *key, size_t *len) {
    lua_getfield(L, t, key);
    const char *s = NULL;
    if (lua_type(L, -1) == LUA_TSTRING)
        s = lua_tolstring(L, -1, len);
    else if (!lua_isnil(L, -1))
        luaL_error(L, "aws.sign: field '%s' must be a string", key);
    lua_pop(L, 1); /* the string stays reachable through the argument table */
    return s;
}

static const char *opt_field(lua_State *L, int t, const char *key) {
    return opt_lfield(L, t, key, NULL);
}

static const char *req_field(lua_State *L, int t, const char *key, size_t *len) {
    const char *s = opt_lfield(L, t, key, len);
    if (s == NULL || *s == '\0')
        luaL_error(L, "aws.sign: field '%s' is required", key);
    return s;
}

/* Step 0: the arguments (nothing pushed). */
static void read_args(lua_State *L, struct sign_args *a) {
    a->method = opt_field(L, SLOT_ARGS, "method");
    if (a->method == NULL)
        a->method = "GET";
    a->region = req_field(L, SLOT_ARGS, "region", NULL);
    a->service = req_field(L, SLOT_ARGS, "service", NULL);
    a->access_key = req_field(L, SLOT_ARGS, "access_key", NULL);
    a->secret = req_field(L, SLOT_ARGS, "secret_key", &a->secret_len);
    a->token = opt_field(L, SLOT_ARGS, "session_token");
    if (a->token && *a->token == '\0')
        a->token = NULL;
    a->only = opt_field(L, SLOT_ARGS, "signed_headers");
    a->amzdate = opt_field(L, SLOT_ARGS, "time");
    if (a->amzdate == NULL) {
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(a->now, sizeof a->now, "%Y%m%dT%H%M%SZ", &tm);
        a->amzdate = a->now;
    } else if (strlen(a->amzdate) != 16 || a->amzdate[8] != 'T' || a->amzdate[15] != 'Z') {
        luaL_error(L, "aws.sign: time must look like 20150830T123600Z");
    }
    memcpy(a->day, a->amzdate, 8);
    a->day[8] = '\0';
    lua_getfield(L, SLOT_ARGS, "body");
    size_t len = 0;
    const char *body = lua_isnil(L, -1) ? "" : luaL_checklstring(L, -1, &len);
    sha256_hex(body, len, a->payload); /* now: a number given is a string only the stack holds */
    lua_pop(L, 1);
}

/* Step 1: pushes SLOT_HOST, SLOT_PATH, SLOT_QUERY, from url or host/path/query. */
static void push_target(lua_State *L) {
    const char *url = opt_field(L, SLOT_ARGS, "url");
    if (url) {
        split_url(L, url);
    } else {
        lua_pushstring(L, opt_field(L, SLOT_ARGS, "host")); /* nil when absent */
        const char *path = opt_field(L, SLOT_ARGS, "path");
        lua_pushstring(L, path ? path : "/");
        lua_getfield(L, SLOT_ARGS, "query");
    }
}

/* Step 2: pushes SLOT_HEADERS, the headers to send: a copy of the caller's,
 * Host unless the caller gave one, X-Amz-Date and the session token (any
 * spelling of those names replaced), no Authorization yet. */
static void push_headers_to_send(lua_State *L, const struct sign_args *a) {
    lua_newtable(L);                       /* SLOT_HEADERS */
    lua_getfield(L, SLOT_ARGS, "headers"); /* SLOT_HEADERS caller's */
    int given = lua_gettop(L);
    if (lua_istable(L, given)) {
        lua_pushnil(L);
        while (lua_next(L, given)) { /* ... caller's name value */
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "aws.sign: header names must be strings");
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, SLOT_HEADERS); /* ... caller's name */
        }
    } else if (!lua_isnil(L, given)) {
        luaL_argerror(L, 1, "headers must be a table");
    }
    lua_pop(L, 1); /* SLOT_HEADERS */
    int have_host = 0;
    lua_pushnil(L);
    while (lua_next(L, SLOT_HEADERS)) {
        lua_pop(L, 1);
        if (strcasecmp(lua_tostring(L, -1), "host") == 0)
            have_host = 1;
    }
    if (!have_host) {
        if (lua_isnil(L, SLOT_HOST))
            luaL_error(L, "aws.sign: url, host or a Host header is required");
        lua_pushvalue(L, SLOT_HOST);
        lua_setfield(L, SLOT_HEADERS, "Host");
    }
    set_header(L, SLOT_HEADERS, "X-Amz-Date", a->amzdate);
    if (a->token)
        set_header(L, SLOT_HEADERS, "X-Amz-Security-Token", a->token);
    set_header(L, SLOT_HEADERS, "Authorization", ""); /* drop an old one; set again at the end */
    lua_pushnil(L);
    lua_setfield(L, SLOT_HEADERS, "Authorization");
}

/* Pushes the canonical value of the header value at idx: trimmed, inner
 * whitespace collapsed; a list's values so, joined by ','. */
static void push_canonical_value(lua_State *L, int idx) {
    size_t len;
    if (!lua_istable(L, idx)) {
        const char *v = luaL_tolstring(L, idx, &len); /* ... v */
        push_header_value(L, v, len);                 /* ... v canonical */
        lua_remove(L, -2);
        return;
    }
    lua_Integer n = luaL_len(L, idx);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (lua_Integer j = 1; j <= n; j++) {
        if (j > 1)
            luaL_addchar(&b, ','); /* before pushing: the buffer may use the top of the stack */
        lua_geti(L, idx, j);
        const char *v = luaL_tolstring(L, -1, &len); /* ... (buffer) vj vj' */
        push_header_value(L, v, len);                /* ... (buffer) vj vj' canonical */
        lua_replace(L, -3);
        lua_pop(L, 1);     /* ... (buffer) canonical */
        luaL_addvalue(&b); /* ... (buffer) */
    }
    luaL_pushresult(&b);
}

/* Step 3: pushes SLOT_CANON, the canonical headers of SLOT_HEADERS: names
 * lower-cased (values of names that differ only by case joined by ','), the
 * headers botocore never signs left out; with a->only, exactly the names it
 * lists (the verifying side: what the client declared), "" for one absent. */
static void push_canonical_headers(lua_State *L, const struct sign_args *a) {
    lua_newtable(L); /* SLOT_CANON */
    lua_pushnil(L);
    while (lua_next(L, SLOT_HEADERS)) {     /* ... name value */
        push_lower(L, lua_tostring(L, -2)); /* ... name value lname */
        if (unsigned_header(lua_tostring(L, -1)) && a->only == NULL) {
            lua_pop(L, 2); /* ... name */
            continue;
        }
        push_canonical_value(L, lua_absindex(L, -2)); /* ... name value lname canonical */
        lua_pushvalue(L, -2);
        if (lua_gettable(L, SLOT_CANON) == LUA_TSTRING) { /* ... lname canonical earlier */
            lua_insert(L, -2);
            lua_pushliteral(L, ",");
            lua_insert(L, -2);
            lua_concat(L, 3); /* ... lname "earlier,canonical" */
        } else {
            lua_pop(L, 1);
        }
        lua_settable(L, SLOT_CANON); /* ... name value */
        lua_pop(L, 1);               /* ... name */
    }
    if (a->only == NULL)
        return;
    lua_newtable(L); /* SLOT_CANON listed */
    for (const char *s = a->only; *s;) {
        size_t n = strcspn(s, ";");
        lua_pushlstring(L, s, n); /* ... listed lname */
        lua_pushvalue(L, -1);
        if (lua_gettable(L, SLOT_CANON) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushliteral(L, "");
        }
        lua_settable(L, -3); /* ... listed */
        s += n;
        if (*s == ';')
            s++;
    }
    lua_replace(L, SLOT_CANON);
}

/* Step 4: pushes SLOT_NAMES, the names of SLOT_CANON sorted, and
 * SLOT_SIGNED, them joined by ';'. -> the names (n of them in *nh) */
static const char **push_names(lua_State *L, size_t *nh) {
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, SLOT_CANON)) {
        lua_pop(L, 1);
        n++;
    }
    const char **names = lua_newuserdatauv(L, (n + 1) * sizeof *names, 0); /* SLOT_NAMES */
    n = 0;
    lua_pushnil(L);
    while (lua_next(L, SLOT_CANON)) {
        lua_pop(L, 1);
        names[n++] = lua_tostring(L, -1); /* anchored: a key of SLOT_CANON */
    }
    qsort(names, n, sizeof *names, cmp_str);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            luaL_addchar(&b, ';');
        luaL_addstring(&b, names[i]);
    }
    luaL_pushresult(&b); /* SLOT_SIGNED */
    *nh = n;
    return names;
}

/* Step 5: pushes SLOT_CREQ, the canonical request:
 * method \n uri \n query \n (name:value \n)* \n signed headers \n payload hash */
static void push_canonical_request(lua_State *L, const struct sign_args *a, const char **names,
                                   size_t nh) {
    push_canonical_uri(L, lua_tostring(L, SLOT_PATH)); /* SLOT_SIGNED uri */
    push_canonical_query(L, SLOT_QUERY);               /* SLOT_SIGNED uri query */
    int uri = lua_gettop(L) - 1, query = uri + 1;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, a->method);
    luaL_addchar(&b, '\n');
    lua_pushvalue(L, uri);
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    lua_pushvalue(L, query);
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    for (size_t i = 0; i < nh; i++) {
        luaL_addstring(&b, names[i]);
        luaL_addchar(&b, ':');
        lua_getfield(L, SLOT_CANON, names[i]);
        luaL_addvalue(&b);
        luaL_addchar(&b, '\n');
    }
    luaL_addchar(&b, '\n');
    lua_pushvalue(L, SLOT_SIGNED);
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    luaL_addstring(&b, a->payload);
    luaL_pushresult(&b); /* SLOT_SIGNED uri query request */
    lua_replace(L, uri);
    lua_pop(L, 1); /* SLOT_CREQ */
}

/* Step 6: pushes SLOT_SCOPE, the credential scope, and SLOT_STS, the string to sign. */
static void push_string_to_sign(lua_State *L, const struct sign_args *a) {
    lua_pushfstring(L, "%s/%s/%s/aws4_request", a->day, a->region, a->service); /* SLOT_SCOPE */
    size_t len;
    const char *creq = lua_tolstring(L, SLOT_CREQ, &len);
    char hash[65];
    sha256_hex(creq, len, hash);
    lua_pushfstring(L, "AWS4-HMAC-SHA256\n%s\n%s\n%s", a->amzdate, lua_tostring(L, SLOT_SCOPE),
                    hash); /* SLOT_STS */
}

/* Step 7, without Lua: the signing key, HMAC chained from "AWS4" + secret
 * over the day, the region, the service and "aws4_request", then the
 * signature, HMAC of the string to sign with it, in lower-case hex. Every
 * buffer that held the secret or a key is wiped before returning, on
 * failure too. -> 1, or 0 when OpenSSL failed (sighex then empty) */
static int sign_with_secret(const struct sign_args *a, const char *sts, size_t stslen,
                            char sighex[65]) {
    unsigned char kdate[32], kregion[32], kservice[32], ksigning[32], sig[32];
    size_t kslen = 4 + a->secret_len;
    unsigned char *ks = OPENSSL_malloc(kslen); /* "AWS4" + secret */
    int ok = ks != NULL;
    if (ok) {
        memcpy(ks, "AWS4", 4);
        memcpy(ks + 4, a->secret, a->secret_len);
        ok = hmac_sha256(ks, kslen, a->day, 8, kdate) &&
             hmac_sha256(kdate, 32, a->region, strlen(a->region), kregion) &&
             hmac_sha256(kregion, 32, a->service, strlen(a->service), kservice) &&
             hmac_sha256(kservice, 32, "aws4_request", 12, ksigning) &&
             hmac_sha256(ksigning, 32, sts, stslen, sig);
        OPENSSL_clear_free(ks, kslen);
    }
    if (ok)
        hex_encode(sig, 32, sighex);
    else
        sighex[0] = '\0';
    OPENSSL_cleanse(kdate, sizeof kdate);
    OPENSSL_cleanse(kregion, sizeof kregion);
    OPENSSL_cleanse(kservice, sizeof kservice);
    OPENSSL_cleanse(ksigning, sizeof ksigning);
    OPENSSL_cleanse(sig, sizeof sig);
    return ok;
}

/* Step 8: pushes SLOT_AUTH, the Authorization value, also set in SLOT_HEADERS. */
static void push_authorization(lua_State *L, const struct sign_args *a, const char *sighex) {
    lua_pushfstring(L, "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s",
                    a->access_key, lua_tostring(L, SLOT_SCOPE), lua_tostring(L, SLOT_SIGNED),
                    sighex); /* SLOT_AUTH */
    lua_pushvalue(L, SLOT_AUTH);
    lua_setfield(L, SLOT_HEADERS, "Authorization");
}

/* Step 9: pushes SLOT_RESULT. */
static void push_result(lua_State *L, const struct sign_args *a, const char *sighex) {
    static const struct {
        const char *name;
        int slot;
    } fields[] = {
        {"headers", SLOT_HEADERS},        {"authorization", SLOT_AUTH},
        {"canonical_request", SLOT_CREQ}, {"string_to_sign", SLOT_STS},
        {"signed_headers", SLOT_SIGNED},  {"credential_scope", SLOT_SCOPE},
    };
    lua_createtable(L, 0, 10); /* SLOT_RESULT */
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        lua_pushvalue(L, fields[i].slot);
        lua_setfield(L, SLOT_RESULT, fields[i].name);
    }
    lua_pushstring(L, sighex);
    lua_setfield(L, SLOT_RESULT, "signature");
    lua_pushstring(L, a->payload);
    lua_setfield(L, SLOT_RESULT, "payload_hash");
    lua_pushstring(L, a->amzdate);
    lua_setfield(L, SLOT_RESULT, "amz_date");
}

/*
 * aws.sign{ method=, url= | host=,path=,query=, headers=, body=, region=,
 *           service=, access_key=, secret_key=, session_token=, time=,
 *           signed_headers= } -> result table
 * The path is taken as the bytes sent on the wire and encoded once more, as
 * SigV4 wants for every service but S3. time ("20150830T123600Z") defaults to
 * now. signed_headers ("host;x-amz-date") restricts the canonical headers to
 * that list: the verifying side passes what the client declared. The result:
 * headers (the caller's plus Host, X-Amz-Date, X-Amz-Security-Token and
 * Authorization, ready to send), authorization, canonical_request,
 * string_to_sign, signature, signed_headers, credential_scope, payload_hash,
 * amz_date.
 */
int migrun_aws_sign(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, SLOT_ARGS);
    struct sign_args a;
    read_args(L, &a);
    push_target(L);
    assert(lua_gettop(L) == SLOT_QUERY);
    push_headers_to_send(L, &a);
    assert(lua_gettop(L) == SLOT_HEADERS);
    push_canonical_headers(L, &a);
    assert(lua_gettop(L) == SLOT_CANON);
    size_t nh;
    const char **names = push_names(L, &nh);
    assert(lua_gettop(L) == SLOT_SIGNED);
    push_canonical_request(L, &a, names, nh);
    assert(lua_gettop(L) == SLOT_CREQ);
    push_string_to_sign(L, &a);
    assert(lua_gettop(L) == SLOT_STS);
    size_t stslen;
    const char *sts = lua_tolstring(L, SLOT_STS, &stslen);
    char sighex[65];
    if (!sign_with_secret(&a, sts, stslen, sighex))
        return luaL_error(L, "aws.sign: OpenSSL could not compute HMAC-SHA256");
    push_authorization(L, &a, sighex);
    push_result(L, &a, sighex);
    assert(lua_gettop(L) == SLOT_RESULT);
    return 1;
}

/* aws.sha256_hex(data) -> lower-case hex digest */
int migrun_aws_sha256_hex(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char out[65];
    sha256_hex(s, len, out);
    lua_pushstring(L, out);
    return 1;
}

/* aws.hmac_sha256_hex(key, data) -> lower-case hex MAC */
int migrun_aws_hmac_sha256_hex(lua_State *L) {
    size_t klen, dlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *data = luaL_checklstring(L, 2, &dlen);
    unsigned char mac[32];
    char out[65];
    int ok = hmac_sha256((const unsigned char *)key, klen, data, dlen, mac);
    if (ok)
        hex_encode(mac, 32, out);
    OPENSSL_cleanse(mac, sizeof mac); /* a derived key, when the caller chains them */
    if (!ok)
        return luaL_error(L, "aws.hmac_sha256_hex: OpenSSL could not compute HMAC-SHA256");
    lua_pushstring(L, out);
    OPENSSL_cleanse(out, sizeof out);
    return 1;
}
