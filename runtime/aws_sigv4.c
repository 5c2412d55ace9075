/*
 * AWS Signature Version 4, as botocore's SigV4Auth computes it: the canonical
 * request (normalized and percent-encoded URI, sorted and re-encoded query,
 * lower-cased trimmed headers, signed-header list, payload hash), the string
 * to sign with its credential scope, the derived signing key and the
 * signature. Everything is built from Lua strings on the Lua stack, so an
 * error raised halfway (bad argument, out of memory) leaks nothing; OpenSSL is
 * only called for one-shot SHA-256 and HMAC-SHA256 into stack buffers. The
 * signer returns its intermediate texts too, so tests compare them with the
 * published vectors byte for byte and a DMS stand-in can verify a request by
 * recomputing it. The secret key never leaves this file except folded into
 * the signature.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static void hmac_sha256(const unsigned char *key, size_t keylen, const char *data, size_t len,
                        unsigned char out[32]) {
    unsigned int outlen = 32;
    HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)data, len, out, &outlen);
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

/* Looks a field up as a string or nil; raises when it has another type. */
static const char *opt_field(lua_State *L, int t, const char *key) {
    lua_getfield(L, t, key);
    const char *s = NULL;
    if (lua_type(L, -1) == LUA_TSTRING)
        s = lua_tostring(L, -1);
    else if (!lua_isnil(L, -1))
        luaL_error(L, "aws.sign: field '%s' must be a string", key);
    lua_pop(L, 1); /* the string stays reachable through the argument table */
    return s;
}

static const char *req_field(lua_State *L, int t, const char *key) {
    const char *s = opt_field(L, t, key);
    if (s == NULL || *s == '\0')
        luaL_error(L, "aws.sign: field '%s' is required", key);
    return s;
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
    lua_settop(L, 1);
    const char *method = opt_field(L, 1, "method");
    if (method == NULL)
        method = "GET";
    const char *region = req_field(L, 1, "region");
    const char *service = req_field(L, 1, "service");
    const char *akid = req_field(L, 1, "access_key");
    const char *secret = req_field(L, 1, "secret_key");
    const char *token = opt_field(L, 1, "session_token");
    if (token && *token == '\0')
        token = NULL;
    const char *only = opt_field(L, 1, "signed_headers");
    const char *amzdate = opt_field(L, 1, "time");
    char datebuf[17];
    if (amzdate == NULL) {
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(datebuf, sizeof datebuf, "%Y%m%dT%H%M%SZ", &tm);
        amzdate = datebuf;
    } else if (strlen(amzdate) != 16 || amzdate[8] != 'T' || amzdate[15] != 'Z') {
        luaL_error(L, "aws.sign: time must look like 20150830T123600Z");
    }
    lua_getfield(L, 1, "body");
    size_t bodylen = 0;
    const char *body = lua_isnil(L, -1) ? "" : luaL_checklstring(L, -1, &bodylen);
    lua_pop(L, 1);

    /* 2: host, 3: path, 4: query (string or table) */
    const char *url = opt_field(L, 1, "url");
    if (url) {
        split_url(L, url);
    } else {
        lua_pushstring(L, opt_field(L, 1, "host"));
        const char *path = opt_field(L, 1, "path");
        lua_pushstring(L, path ? path : "/");
        lua_getfield(L, 1, "query");
    }

    /* 5: the headers to send (copy of the caller's, plus ours) */
    lua_newtable(L);
    int out = 5;
    lua_getfield(L, 1, "headers"); /* 6 */
    if (lua_istable(L, 6)) {
        lua_pushnil(L);
        while (lua_next(L, 6)) {
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "aws.sign: header names must be strings");
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, out);
        }
    } else if (!lua_isnil(L, 6)) {
        luaL_argerror(L, 1, "headers must be a table");
    }
    lua_pop(L, 1);
    int have_host = 0;
    lua_pushnil(L);
    while (lua_next(L, out)) {
        lua_pop(L, 1);
        if (strcasecmp(lua_tostring(L, -1), "host") == 0)
            have_host = 1;
    }
    if (!have_host) {
        if (lua_isnil(L, 2))
            luaL_error(L, "aws.sign: url, host or a Host header is required");
        lua_pushvalue(L, 2);
        lua_setfield(L, out, "Host");
    }
    set_header(L, out, "X-Amz-Date", amzdate);
    if (token)
        set_header(L, out, "X-Amz-Security-Token", token);
    set_header(L, out, "Authorization", ""); /* drop an old one; set again at the end */
    lua_pushnil(L);
    lua_setfield(L, out, "Authorization");

    /* 6: canonical headers lname -> value (repeats joined by ',') */
    lua_newtable(L);
    int canon = 6;
    lua_pushnil(L);
    while (lua_next(L, out)) {              /* ... name value */
        push_lower(L, lua_tostring(L, -2)); /* ... name value lname */
        const char *lname = lua_tostring(L, -1);
        if (unsigned_header(lname) && only == NULL) {
            lua_pop(L, 2);
            continue;
        }
        if (lua_istable(L, -2)) {
            luaL_Buffer b;
            lua_Integer n = luaL_len(L, -2);
            int vals = lua_absindex(L, -2);
            luaL_buffinit(L, &b);
            for (lua_Integer j = 1; j <= n; j++) {
                size_t len;
                lua_geti(L, vals, j);
                const char *v = luaL_tolstring(L, -1, &len);
                push_header_value(L, v, len);
                lua_remove(L, -2);
                lua_remove(L, -2);
                if (j > 1)
                    luaL_addchar(&b, ',');
                luaL_addvalue(&b);
            }
            luaL_pushresult(&b);
        } else {
            size_t len;
            const char *v = luaL_tolstring(L, -2, &len);
            push_header_value(L, v, len);
            lua_remove(L, -2); /* ... name value lname canonvalue */
        }
        lua_pushvalue(L, -2);
        if (lua_gettable(L, canon) == LUA_TSTRING) { /* name differs only by case: join */
            lua_insert(L, -2);
            lua_pushliteral(L, ",");
            lua_insert(L, -2);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
        }
        lua_settable(L, canon); /* ... name value */
        lua_pop(L, 1);
    }
    if (only) {
        /* keep exactly the listed headers (verification side) */
        lua_newtable(L); /* 7 */
        const char *s = only;
        while (*s) {
            size_t n = strcspn(s, ";");
            lua_pushlstring(L, s, n);
            lua_pushvalue(L, -1);
            if (lua_gettable(L, canon) == LUA_TNIL) {
                lua_pop(L, 1);
                lua_pushliteral(L, "");
            }
            lua_settable(L, 7);
            s += n;
            if (*s == ';')
                s++;
        }
        lua_replace(L, canon);
    }
    size_t nh = 0;
    lua_pushnil(L);
    while (lua_next(L, canon)) {
        lua_pop(L, 1);
        nh++;
    }
    const char **names = lua_newuserdatauv(L, (nh + 1) * sizeof *names, 0); /* 7 */
    nh = 0;
    lua_pushnil(L);
    while (lua_next(L, canon)) {
        lua_pop(L, 1);
        names[nh++] = lua_tostring(L, -1);
    }
    qsort(names, nh, sizeof *names, cmp_str);

    /* 8: signed headers */
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < nh; i++) {
        if (i > 0)
            luaL_addchar(&b, ';');
        luaL_addstring(&b, names[i]);
    }
    luaL_pushresult(&b);
    char payload[65];
    sha256_hex(body, bodylen, payload);

    /* 9: canonical uri, 10: canonical query */
    push_canonical_uri(L, lua_tostring(L, 3));
    push_canonical_query(L, 4);

    /* 11: canonical request */
    luaL_buffinit(L, &b);
    luaL_addstring(&b, method);
    luaL_addchar(&b, '\n');
    lua_pushvalue(L, 9);
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    lua_pushvalue(L, 10);
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    for (size_t i = 0; i < nh; i++) {
        luaL_addstring(&b, names[i]);
        luaL_addchar(&b, ':');
        lua_getfield(L, canon, names[i]);
        luaL_addvalue(&b);
        luaL_addchar(&b, '\n');
    }
    luaL_addchar(&b, '\n');
    lua_pushvalue(L, 8);
    luaL_addvalue(&b);
    luaL_addchar(&b, '\n');
    luaL_addstring(&b, payload);
    luaL_pushresult(&b);

    /* 12: credential scope, 13: string to sign */
    char day[9];
    memcpy(day, amzdate, 8);
    day[8] = '\0';
    lua_pushfstring(L, "%s/%s/%s/aws4_request", day, region, service);
    size_t crlen;
    const char *creq = lua_tolstring(L, 11, &crlen);
    char creq_hash[65];
    sha256_hex(creq, crlen, creq_hash);
    lua_pushfstring(L, "AWS4-HMAC-SHA256\n%s\n%s\n%s", amzdate, lua_tostring(L, 12), creq_hash);

    /* signing key: HMAC chain from "AWS4" + secret */
    unsigned char k[32];
    lua_pushfstring(L, "AWS4%s", secret); /* 14, wiped below */
    size_t kslen;
    const char *ks = lua_tolstring(L, 14, &kslen);
    hmac_sha256((const unsigned char *)ks, kslen, day, 8, k);
    lua_pop(L, 1);
    hmac_sha256(k, 32, region, strlen(region), k);
    hmac_sha256(k, 32, service, strlen(service), k);
    hmac_sha256(k, 32, "aws4_request", 12, k);
    size_t stslen;
    const char *sts = lua_tolstring(L, 13, &stslen);
    unsigned char sig[32];
    hmac_sha256(k, 32, sts, stslen, sig);
    char sighex[65];
    hex_encode(sig, 32, sighex);
    OPENSSL_cleanse(k, sizeof k);

    lua_pushfstring(L, "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s", akid,
                    lua_tostring(L, 12), lua_tostring(L, 8), sighex); /* 14 */
    lua_pushvalue(L, 14);
    lua_setfield(L, out, "Authorization");

    lua_createtable(L, 0, 10); /* 15: result */
    lua_pushvalue(L, out);
    lua_setfield(L, -2, "headers");
    lua_pushvalue(L, 14);
    lua_setfield(L, -2, "authorization");
    lua_pushvalue(L, 11);
    lua_setfield(L, -2, "canonical_request");
    lua_pushvalue(L, 13);
    lua_setfield(L, -2, "string_to_sign");
    lua_pushstring(L, sighex);
    lua_setfield(L, -2, "signature");
    lua_pushvalue(L, 8);
    lua_setfield(L, -2, "signed_headers");
    lua_pushvalue(L, 12);
    lua_setfield(L, -2, "credential_scope");
    lua_pushstring(L, payload);
    lua_setfield(L, -2, "payload_hash");
    lua_pushstring(L, amzdate);
    lua_setfield(L, -2, "amz_date");
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
    hmac_sha256((const unsigned char *)key, klen, data, dlen, mac);
    hex_encode(mac, 32, out);
    lua_pushstring(L, out);
    return 1;
}
