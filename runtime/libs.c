/*
 * How migrun modules are found: the C modules listed in modules.h and the Lua
 * library compiled into the binary are registered in package.preload; when
 * MIGRUN_LUA_PATH names an on-disk lua/ tree, a searcher placed before the
 * preload searcher loads from there first, so developers edit without
 * rebuilding. package.path and package.cpath are left as the Lua library set
 * them, so Debian's Lua modules (lua-cjson, busted) are still found.
 */
#include <stdlib.h>
#include <string.h>

#include "migrun.h"

/* preload loader for an embedded source: upvalue 1 is the index in migrun_embedded. */
static int load_embedded(lua_State *L) {
    const struct migrun_embedded *e = &migrun_embedded[lua_tointeger(L, lua_upvalueindex(1))];
    if (luaL_loadbufferx(L, e->source, e->len, e->chunkname, "t") != LUA_OK)
        return lua_error(L);
    lua_pushstring(L, e->module);        /* chunk name */
    lua_pushstring(L, e->chunkname + 1); /* chunk name file, as the file loader passes */
    lua_call(L, 2, 1);
    return 1;
}

/* package.searchers[1] when MIGRUN_LUA_PATH is set: upvalue 1 is the path template. */
static int search_dev_tree(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchpath");
    lua_pushstring(L, name);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_call(L, 2, 2); /* package filename|nil errmsg */
    if (lua_isnil(L, -2))
        return 1; /* the message says where it looked */
    const char *filename = lua_tostring(L, -2);
    if (luaL_loadfile(L, filename) != LUA_OK)
        return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", name, filename,
                          lua_tostring(L, -1));
    lua_pushstring(L, filename);
    return 2;
}

static void install_dev_searcher(lua_State *L, const char *root) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchers"); /* package searchers */
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", root, root);
    lua_pushcclosure(L, search_dev_tree, 1);
    /* insert at position 1, shifting the others up */
    lua_Integer n = (lua_Integer)luaL_len(L, -2);
    for (lua_Integer i = n; i >= 1; i--) {
        lua_geti(L, -2, i);
        lua_seti(L, -3, i + 1);
    }
    lua_seti(L, -2, 1);
    lua_pop(L, 2);
}

void migrun_openlibs(lua_State *L) {
    luaL_openlibs(L);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE); /* preload */
#define MIGRUN_MODULE(name, fn)                                                                    \
    lua_pushcfunction(L, fn);                                                                      \
    lua_setfield(L, -2, name);
#include "modules.h"
#undef MIGRUN_MODULE
    for (lua_Integer i = 0; migrun_embedded[i].module != NULL; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, load_embedded, 1);
        lua_setfield(L, -2, migrun_embedded[i].module);
    }
    lua_pop(L, 1);

    const char *dev = getenv("MIGRUN_LUA_PATH");
    if (dev != NULL && *dev != '\0')
        install_dev_searcher(L, dev);
}
