/*
 * The structured error value every migrun module returns as the second result
 * of a failed call ("nil, err"). It is a plain table, so code branches on its
 * fields (err.sqlstate, err.code, err.retryable), with a metatable whose
 * __tostring prints it on one line, so assert(conn:exec(...)) reads well.
 * Lua code makes them with require("migrun.error").new{...}.
 */
#include <string.h>

#include "migrun_internal.h"

#define ERROR_MT "migrun.Error"

static void add_field(luaL_Buffer *b, lua_State *L, int err, const char *key, const char *prefix,
                      const char *suffix) {
    if (lua_getfield(L, err, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    const char *s = luaL_tolstring(L, -1, NULL); /* value str */
    luaL_addstring(b, prefix);
    luaL_addstring(b, s);
    luaL_addstring(b, suffix);
    lua_pop(L, 2);
}

static int error_tostring(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    /* luaL_Buffer may keep a box on the stack: address the error absolutely. */
    add_field(&b, L, 1, "where", "[", "] ");
    add_field(&b, L, 1, "code", "", " ");
    if (lua_getfield(L, 1, "message") == LUA_TNIL)
        lua_pushliteral(L, "error");
    const char *msg = luaL_tolstring(L, -1, NULL);
    luaL_addstring(&b, msg);
    lua_pop(L, 2);
    add_field(&b, L, 1, "detail", " DETAIL: ", "");
    add_field(&b, L, 1, "hint", " HINT: ", "");
    luaL_pushresult(&b);
    return 1;
}

static void push_metatable(lua_State *L) {
    if (luaL_newmetatable(L, ERROR_MT)) {
        lua_pushcfunction(L, error_tostring);
        lua_setfield(L, -2, "__tostring");
    }
}

void migrun_setfield(lua_State *L, int idx, const char *key, const char *value) {
    if (value == NULL)
        return;
    idx = lua_absindex(L, idx);
    lua_pushstring(L, value);
    lua_setfield(L, idx, key);
}

void migrun_error_push(lua_State *L, const char *kind, const char *where, const char *code,
                       const char *message) {
    lua_createtable(L, 0, 6);
    migrun_setfield(L, -1, "kind", kind);
    migrun_setfield(L, -1, "where", where);
    migrun_setfield(L, -1, "code", code);
    migrun_setfield(L, -1, "message", message);
    push_metatable(L);
    lua_setmetatable(L, -2);
}

int migrun_error_return(lua_State *L, const char *kind, const char *where, const char *code,
                        const char *message) {
    lua_pushnil(L);
    migrun_error_push(L, kind, where, code, message);
    return 2;
}

void migrun_push_interrupted(lua_State *L, const char *where) {
    if (migrun_interrupt_cause(L) == MIGRUN_CAUSE_STOP)
        migrun_error_push(L, "guard", where, NULL, "stopped by migrun's guard");
    else
        migrun_error_push(L, "interrupted", where, NULL, "interrupted!");
    /* raised once: a pcall that catches everything must hand it on
     * (error.is_interrupt), or the stop is lost and the run goes on */
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "interrupt");
}

/* Is the value at idx a migrun error of kind "interrupted"? */
int migrun_error_is_interrupted(lua_State *L, int idx) {
    int is = 0;
    idx = lua_absindex(L, idx);
    if (lua_type(L, idx) == LUA_TTABLE && lua_getmetatable(L, idx)) { /* ... mt */
        luaL_getmetatable(L, ERROR_MT);                               /* ... mt Error */
        lua_getfield(L, idx, "kind");                                 /* ... mt Error kind */
        is = lua_rawequal(L, -2, -3) && lua_type(L, -1) == LUA_TSTRING &&
             strcmp(lua_tostring(L, -1), "interrupted") == 0;
        lua_pop(L, 3);
    }
    return is;
}

/* error.new{ kind=..., message=..., ... } -> the table, now an error */
static int error_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    push_metatable(L);
    lua_setmetatable(L, 1);
    return 1;
}

/* error.is(v) -> true if v is a migrun error */
static int error_is(lua_State *L) {
    int is = 0;
    if (lua_getmetatable(L, 1)) {
        luaL_getmetatable(L, ERROR_MT);
        is = lua_rawequal(L, -1, -2);
    }
    lua_pushboolean(L, is);
    return 1;
}

/* error.is_interrupt(v) -> true if v is the error a Ctrl-C or the guard's
 * stop raised: code that catches every error raises it again. */
static int error_is_interrupt(lua_State *L) {
    int is = 0;
    if (lua_getmetatable(L, 1)) {
        luaL_getmetatable(L, ERROR_MT);
        is = lua_rawequal(L, -1, -2) && lua_type(L, 1) == LUA_TTABLE &&
             lua_getfield(L, 1, "interrupt") == LUA_TBOOLEAN && lua_toboolean(L, -1);
    }
    lua_pushboolean(L, is);
    return 1;
}

int luaopen_migrun_error(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"new", error_new},
        {"is", error_is},
        {"tostring", error_tostring},
        {"is_interrupt", error_is_interrupt},
        {NULL, NULL},
    };
    luaL_newlib(L, funcs);
    return 1;
}
