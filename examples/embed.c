/*
 * A program that embeds migrun: it runs a Lua script (or a playbook) with the
 * migrun library and modules, under migrun_docall so that errors come with a
 * traceback and Ctrl-C stops the script cleanly, wherever it is blocked. It
 * is the migrun executable without its options and REPL; docs/embedding.md
 * walks through it.
 *
 * Build it against an installed libmigrun:
 *   cc -o embed examples/embed.c $(pkg-config --cflags --libs migrun)
 * Run it:
 *   ./embed script.lua [args...]
 */
#include <stdio.h>

#include <lauxlib.h>
#include <lualib.h>
#include <migrun.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s script.lua [args...]\n", argv[0]);
        return 2;
    }
    lua_State *L = luaL_newstate();
    if (L == NULL) {
        fprintf(stderr, "%s: cannot create a Lua state\n", argv[0]);
        return 1;
    }
    luaL_openlibs(L);   /* the standard libraries first, */
    migrun_openlibs(L); /* then require "migrun.pg", "migrun.proc", ... work */

    /* the global arg, as lua.c makes it: the script at 0, its arguments from 1 */
    lua_createtable(L, argc - 2, 2);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 1);
    }
    lua_setglobal(L, "arg");

    int status = luaL_loadfile(L, argv[1]); /* chunk | msg */
    if (status == LUA_OK) {
        for (int i = 2; i < argc; i++)
            lua_pushstring(L, argv[i]);         /* chunk args... */
        status = migrun_docall(L, argc - 2, 0); /* msg on error */
    }
    if (status != LUA_OK)
        fprintf(stderr, "%s: %s\n", argv[0], lua_tostring(L, -1));
    lua_close(L);
    return status == LUA_OK ? 0 : 1;
}
