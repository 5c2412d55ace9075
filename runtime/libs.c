/*
 * How migrun modules are found: the C modules listed in modules.h and the Lua
 * library compiled into libmigrun are registered in package.preload
 * (migrun_openlibs, for any host; luaopen_migrun, for require "migrun" from a
 * stock lua5.4); when MIGRUN_LUA_PATH names an on-disk lua/ tree, a searcher
 * placed before the preload searcher loads from there first, so developers
 * edit without rebuilding. package.path and package.cpath are left as the Lua
 * library set them, so Debian's Lua modules (lua-cjson, busted) are still
 * found.
 */
#include <stdlib.h>
#include <string.h>

#include "migrun_internal.h"

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

/* package.searchers[1] when MIGRUN_LUA_PATH is set: upvalue 1 is the path
 * template, upvalue 2 the template of the layers' folders, where a module is
 * found by its name without "migrun." (lua/migrun/procedure/qa.lua is
 * migrun.qa: a layer's folder is not part of its modules' names). */
static int search_dev_tree(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchpath");
    lua_pushstring(L, name);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_call(L, 2, 2); /* package filename|nil errmsg */
    if (lua_isnil(L, -2) && strncmp(name, "migrun.", 7) == 0) {
        lua_pop(L, 2); /* package */
        lua_getfield(L, -1, "searchpath");
        lua_pushstring(L, name + 7);
        lua_pushvalue(L, lua_upvalueindex(2));
        lua_call(L, 2, 2); /* package filename|nil errmsg */
    }
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
    if (lua_getglobal(L, "package") != LUA_TTABLE ||
        lua_getfield(L, -1, "searchers") != LUA_TTABLE) { /* package searchers */
        lua_pop(L, 2); /* no package library: nothing to search with */
        return;
    }
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", root, root);
    luaL_Buffer b; /* the layers' folders, lowest first */
    luaL_buffinit(L, &b);
    static const char *const layers[] = {"base", "cloud", "procedure", "machinery"};
    for (size_t i = 0; i < sizeof layers / sizeof layers[0]; i++) {
        lua_pushfstring(L, "%s%s/migrun/%s/?.lua;%s/migrun/%s/?/init.lua", i ? ";" : "", root,
                        layers[i], root, layers[i]);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    lua_pushcclosure(L, search_dev_tree, 2);
    /* insert at position 1, shifting the others up */
    lua_Integer n = (lua_Integer)luaL_len(L, -2);
    for (lua_Integer i = n; i >= 1; i--) {
        lua_geti(L, -2, i);
        lua_seti(L, -3, i + 1);
    }
    lua_seti(L, -2, 1);
    lua_pop(L, 2);
}

const char *migrun_version(void) {
    return MIGRUN_VERSION;
}

void migrun_openlibs(lua_State *L) {
    migrun_runtime_open(L); /* the state's record for interrupts (call.c) */
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE); /* preload */
    /* require "migrun", as a script written for the stock lua5.4 starts,
     * gives this library's table instead of loading a second copy of the
     * runtime from an installed migrun.so */
    lua_pushcfunction(L, luaopen_migrun);
    lua_setfield(L, -2, "migrun");
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

    /* once per state: require "migrun" after migrun_openlibs comes here again */
    if (lua_getfield(L, LUA_REGISTRYINDEX, "migrun.searcher") != LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "migrun.searcher");
    lua_getfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
    int noenv = lua_toboolean(L, -1);
    lua_pop(L, 1);
    const char *dev = noenv ? NULL : getenv("MIGRUN_LUA_PATH");
    if (dev != NULL && *dev != '\0')
        install_dev_searcher(L, dev);
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int luaopen_migrun(lua_State *L) {
    static const char *const c_modules[] = {
#define MIGRUN_MODULE(name, fn) name,
#include "modules.h"
#undef MIGRUN_MODULE
    };
    size_t nc = sizeof c_modules / sizeof c_modules[0], n = nc;
    luaL_checkversion(L); /* the interpreter's Lua is the one this was built for */
    migrun_openlibs(L);
    for (size_t i = 0; migrun_embedded[i].module != NULL; i++)
        n++;
    const char **names = lua_newuserdatauv(L, n * sizeof *names, 0); /* names */
    for (size_t i = 0; i < n; i++)
        names[i] = i < nc ? c_modules[i] : migrun_embedded[i - nc].module;
    qsort(names, n, sizeof *names, cmp_names);
    lua_createtable(L, 0, 3); /* names migrun */
    lua_pushstring(L, migrun_version());
    lua_setfield(L, -2, "version");
    lua_pushliteral(L, LUA_RELEASE);
    lua_setfield(L, -2, "lua");
    lua_createtable(L, (int)n, 0); /* names migrun modules */
    for (size_t i = 0; i < n; i++) {
        lua_pushstring(L, names[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "modules"); /* names migrun */
    return 1;
}
