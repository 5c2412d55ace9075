/*
 * migrun.lsn: the PostgreSQL log sequence number as a Lua value. The parser is
 * as strict as PostgreSQL's pg_lsn input (two groups of 1 to 8 hex digits
 * around a "/", nothing else), printing is PostgreSQL's "%X/%X", and the
 * arithmetic is checked so a lag computation never silently wraps. This file
 * also owns the one function that maps a server version to the names of the
 * WAL functions and columns that were renamed in PostgreSQL 10.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "migrun_internal.h"

#define LSN_MT "migrun.lsn.LSN"
#define HEXDIGITS "0123456789abcdefABCDEF"

/* Returns 1 and sets *out when s is a valid pg_lsn text (pg_lsn_in_internal's rules). */
static int lsn_parse_text(const char *s, size_t len, uint64_t *out) {
    if (strlen(s) != len) /* embedded NUL */
        return 0;
    size_t len1 = strspn(s, HEXDIGITS);
    if (len1 < 1 || len1 > 8 || s[len1] != '/')
        return 0;
    size_t len2 = strspn(s + len1 + 1, HEXDIGITS);
    if (len2 < 1 || len2 > 8 || s[len1 + 1 + len2] != '\0')
        return 0;
    uint32_t hi = 0, lo = 0;
    for (size_t i = 0; i < len1; i++)
        hi = hi * 16 + (uint32_t)(s[i] <= '9' ? s[i] - '0' : (s[i] | 0x20) - 'a' + 10);
    for (size_t i = len1 + 1; i < len1 + 1 + len2; i++)
        lo = lo * 16 + (uint32_t)(s[i] <= '9' ? s[i] - '0' : (s[i] | 0x20) - 'a' + 10);
    *out = ((uint64_t)hi << 32) | lo;
    return 1;
}

static void lsn_push(lua_State *L, uint64_t v) {
    uint64_t *u = lua_newuserdatauv(L, sizeof *u, 0);
    *u = v;
    luaL_setmetatable(L, LSN_MT);
}

static uint64_t *lsn_test(lua_State *L, int idx) {
    return luaL_testudata(L, idx, LSN_MT);
}

static uint64_t lsn_check(lua_State *L, int idx) {
    return *(uint64_t *)luaL_checkudata(L, idx, LSN_MT);
}

static const char *invalid_text(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TSTRING)
        return lua_pushfstring(L, "invalid LSN: expected text like 16/B374D848, got %s",
                               luaL_typename(L, idx));
    /* %q so that control characters and NULs in the bad text are visible */
    lua_getglobal(L, "string");
    lua_getfield(L, -1, "format");
    lua_pushliteral(L, "invalid LSN %q: expected two groups of 1 to 8 hexadecimal digits "
                       "separated by \"/\", like 16/B374D848");
    lua_pushvalue(L, idx);
    lua_call(L, 2, 1);
    lua_remove(L, -2);
    return lua_tostring(L, -1);
}

/* Pushes the LSN for the value at idx, or returns 0 leaving nothing pushed. */
static int lsn_from_value(lua_State *L, int idx, uint64_t *out) {
    uint64_t *u = lsn_test(L, idx);
    if (u) {
        *out = *u;
        return 1;
    }
    if (lua_type(L, idx) != LUA_TSTRING)
        return 0;
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    return lsn_parse_text(s, len, out);
}

/* lsn.parse(s) -> LSN | nil, err */
static int lsn_parse(lua_State *L) {
    luaL_checkany(L, 1);
    uint64_t v;
    if (lsn_from_value(L, 1, &v)) {
        lsn_push(L, v);
        return 1;
    }
    const char *msg = invalid_text(L, 1);
    migrun_error_return(L, "lsn", NULL, "22P02", msg);
    return 2;
}

/* lsn(s): like parse, but raises */
static int lsn_call(lua_State *L) {
    lua_remove(L, 1); /* the module table */
    luaL_checkany(L, 1);
    uint64_t v;
    if (!lsn_from_value(L, 1, &v)) {
        invalid_text(L, 1);
        return lua_error(L);
    }
    lsn_push(L, v);
    return 1;
}

static int lsn_is(lua_State *L) {
    lua_pushboolean(L, lsn_test(L, 1) != NULL);
    return 1;
}

static int lsn_fromnumber(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 0, 1, "an LSN cannot be negative");
    lsn_push(L, (uint64_t)n);
    return 1;
}

static int lsn_tonumber(lua_State *L) {
    uint64_t v = lsn_check(L, 1);
    if (v > (uint64_t)LUA_MAXINTEGER)
        return luaL_error(L, "LSN %X/%X does not fit in a Lua integer", (unsigned)(v >> 32),
                          (unsigned)v);
    lua_pushinteger(L, (lua_Integer)v);
    return 1;
}

static int lsn_tostring(lua_State *L) {
    uint64_t v = lsn_check(L, 1);
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRIX32 "/%" PRIX32, (uint32_t)(v >> 32), (uint32_t)v);
    lua_pushstring(L, buf);
    return 1;
}

static int lsn_eq(lua_State *L) {
    lua_pushboolean(L, lsn_check(L, 1) == lsn_check(L, 2));
    return 1;
}

static int lsn_lt(lua_State *L) {
    lua_pushboolean(L, lsn_check(L, 1) < lsn_check(L, 2));
    return 1;
}

static int lsn_le(lua_State *L) {
    lua_pushboolean(L, lsn_check(L, 1) <= lsn_check(L, 2));
    return 1;
}

static uint64_t lsn_move(lua_State *L, uint64_t v, lua_Integer n) {
    if (n >= 0 ? (uint64_t)n > UINT64_MAX - v : (uint64_t)0 - (uint64_t)n > v)
        luaL_error(L, "LSN arithmetic out of range: %s %s %I bytes", lua_tostring(L, -1),
                   n >= 0 ? "+" : "-", n >= 0 ? n : -n);
    return n >= 0 ? v + (uint64_t)n : v - ((uint64_t)0 - (uint64_t)n);
}

static lua_Integer check_bytes(lua_State *L, int idx) {
    if (!lua_isinteger(L, idx))
        luaL_error(L, "LSN arithmetic needs an integer number of bytes, got %s",
                   luaL_typename(L, idx));
    return lua_tointeger(L, idx);
}

/* x + n, n + x */
static int lsn_add(lua_State *L) {
    int l = lsn_test(L, 1) ? 1 : 2;
    uint64_t v = lsn_check(L, l);
    lua_Integer n = check_bytes(L, 3 - l);
    luaL_tolstring(L, l, NULL);
    lsn_push(L, lsn_move(L, v, n));
    return 1;
}

/* a - b -> signed bytes; x - n -> LSN */
static int lsn_sub(lua_State *L) {
    uint64_t a = lsn_check(L, 1);
    uint64_t *b = lsn_test(L, 2);
    if (b) {
        uint64_t d = a >= *b ? a - *b : *b - a;
        if (d > (uint64_t)LUA_MAXINTEGER)
            return luaL_error(L, "distance between LSNs does not fit in a Lua integer");
        lua_pushinteger(L, a >= *b ? (lua_Integer)d : -(lua_Integer)d);
        return 1;
    }
    lua_Integer n = check_bytes(L, 2);
    if (n == LUA_MININTEGER)
        return luaL_error(L, "LSN arithmetic out of range");
    luaL_tolstring(L, 1, NULL);
    lsn_push(L, lsn_move(L, a, -n));
    return 1;
}

static int lsn_concat(lua_State *L) {
    luaL_tolstring(L, 1, NULL);
    luaL_tolstring(L, 2, NULL);
    lua_concat(L, 2);
    return 1;
}

/* lsn.format_bytes(n) -> "1.5 GiB" */
static int lsn_format_bytes(lua_State *L) {
    lua_Number n = luaL_checknumber(L, 1);
    static const char *units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    lua_Number a = n < 0 ? -n : n;
    if (a < 1024) {
        if (lua_isinteger(L, 1))
            lua_pushfstring(L, "%I B", lua_tointeger(L, 1));
        else
            lua_pushfstring(L, "%d B", (int)n);
        return 1;
    }
    int u = -1;
    while (a >= 1024 && u < 5) {
        a /= 1024;
        u++;
    }
    char buf[48];
    snprintf(buf, sizeof buf, "%s%.1f %s", n < 0 ? "-" : "", (double)a, units[u]);
    lua_pushstring(L, buf);
    return 1;
}

/*
 * lsn.names(server_version_num) -> the WAL function and column names of that
 * server: PostgreSQL 10 renamed xlog to wal and location to lsn.
 */
static int lsn_names(lua_State *L) {
    lua_Integer v = luaL_checkinteger(L, 1);
    luaL_argcheck(L, v >= 90400, 1, "server versions before 9.4 have no logical decoding");
    int pg10 = v >= 100000;
    static const struct {
        const char *key, *v96, *v10;
    } names[] = {
        {"wal_replay_pause", "pg_xlog_replay_pause", "pg_wal_replay_pause"},
        {"wal_replay_resume", "pg_xlog_replay_resume", "pg_wal_replay_resume"},
        {"is_wal_replay_paused", "pg_is_xlog_replay_paused", "pg_is_wal_replay_paused"},
        {"last_wal_replay_lsn", "pg_last_xlog_replay_location", "pg_last_wal_replay_lsn"},
        {"last_wal_receive_lsn", "pg_last_xlog_receive_location", "pg_last_wal_receive_lsn"},
        {"current_wal_lsn", "pg_current_xlog_location", "pg_current_wal_lsn"},
        {"current_wal_flush_lsn", "pg_current_xlog_flush_location", "pg_current_wal_flush_lsn"},
        {"current_wal_insert_lsn", "pg_current_xlog_insert_location", "pg_current_wal_insert_lsn"},
        {"wal_lsn_diff", "pg_xlog_location_diff", "pg_wal_lsn_diff"},
        {"walfile_name", "pg_xlogfile_name", "pg_walfile_name"},
        {"wal_dir", "pg_xlog", "pg_wal"},
        {"peek_lsn_column", "location", "lsn"},
        {"stat_replication_sent", "sent_location", "sent_lsn"},
        {"stat_replication_write", "write_location", "write_lsn"},
        {"stat_replication_flush", "flush_location", "flush_lsn"},
        {"stat_replication_replay", "replay_location", "replay_lsn"},
    };
    size_t n = sizeof names / sizeof names[0];
    lua_createtable(L, 0, (int)n + 2);
    for (size_t i = 0; i < n; i++) {
        lua_pushstring(L, pg10 ? names[i].v10 : names[i].v96);
        lua_setfield(L, -2, names[i].key);
    }
    /* 14 made pause asynchronous: only this function tells when replay has really stopped */
    if (v >= 140000) {
        lua_pushliteral(L, "pg_get_wal_replay_pause_state");
        lua_setfield(L, -2, "wal_replay_pause_state");
    }
    lua_pushinteger(L, v);
    lua_setfield(L, -2, "server_version_num");
    return 1;
}

int luaopen_migrun_lsn(lua_State *L) {
    static const luaL_Reg meta[] = {
        {"__tostring", lsn_tostring},
        {"__eq", lsn_eq},
        {"__lt", lsn_lt},
        {"__le", lsn_le},
        {"__add", lsn_add},
        {"__sub", lsn_sub},
        {"__concat", lsn_concat},
        {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"tonumber", lsn_tonumber},
        {"tostring", lsn_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"parse", lsn_parse},
        {"is", lsn_is},
        {"fromnumber", lsn_fromnumber},
        {"tonumber", lsn_tonumber},
        {"format_bytes", lsn_format_bytes},
        {"names", lsn_names},
        {NULL, NULL},
    };
    luaL_newmetatable(L, LSN_MT);
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newlib(L, funcs);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, lsn_call);
    lua_setfield(L, -2, "__call");
    lua_setmetatable(L, -2);
    return 1;
}
