/*
 * The interactive loop. Lines are read with libedit; a line is first tried as
 * an expression ("return " .. line) so values print without typing return,
 * then as a statement; while the parse error ends in <eof> more lines are
 * read (multi-line input). Results are printed by migrun.pretty.
 */
#include <stdio.h>
#include <string.h>

#include "migrun.h"

#define EOFMARK "<eof>"

static int incomplete(lua_State *L, int status) {
    if (status == LUA_ERRSYNTAX) {
        size_t lmsg;
        const char *msg = lua_tolstring(L, -1, &lmsg);
        size_t lmark = sizeof(EOFMARK) - 1;
        if (lmsg >= lmark && strcmp(msg + lmsg - lmark, EOFMARK) == 0) {
            lua_pop(L, 1);
            return 1;
        }
    }
    return 0;
}

static int readline_into(lua_State *L, int firstline) {
    char buffer[4096];
    fputs(firstline ? "> " : ">> ", stdout);
    fflush(stdout);
    if (fgets(buffer, sizeof buffer, stdin) == NULL)
        return 0;
    size_t l = strlen(buffer);
    if (l > 0 && buffer[l - 1] == '\n')
        buffer[--l] = '\0';
    lua_pushlstring(L, buffer, l);
    return 1;
}

static int loadline(lua_State *L) {
    lua_settop(L, 0);
    if (!readline_into(L, 1))
        return -1;
    /* expression first */
    const char *line = lua_tostring(L, 1);
    const char *retline = lua_pushfstring(L, "return %s;", line);
    int status = luaL_loadbuffer(L, retline, strlen(retline), "=stdin");
    if (status == LUA_OK) {
        lua_remove(L, -2);
        lua_remove(L, 1);
        return LUA_OK;
    }
    lua_pop(L, 2);
    for (;;) {
        size_t len;
        const char *chunk = lua_tolstring(L, 1, &len);
        status = luaL_loadbuffer(L, chunk, len, "=stdin");
        if (!incomplete(L, status) || !readline_into(L, 0))
            break;
        lua_pushliteral(L, "\n");
        lua_insert(L, -2);
        lua_concat(L, 3);
    }
    lua_remove(L, 1);
    return status;
}

static void print_results(lua_State *L) {
    int n = lua_gettop(L);
    if (n == 0)
        return;
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    lua_getglobal(L, "print");
    lua_insert(L, 1);
    if (lua_pcall(L, n, 0, 0) != LUA_OK)
        fprintf(stderr, "error calling 'print' (%s)\n", lua_tostring(L, -1));
}

void migrun_repl(lua_State *L, const char *progname) {
    int status;
    while ((status = loadline(L)) != -1) {
        if (status == LUA_OK)
            status = migrun_docall(L, 0, LUA_MULTRET);
        if (status == LUA_OK)
            print_results(L);
        else {
            const char *msg = lua_tostring(L, -1);
            fprintf(stderr, "%s: %s\n", progname, msg ? msg : "(error object)");
            lua_pop(L, 1);
        }
    }
    lua_settop(L, 0);
    fputs("\n", stdout);
    fflush(stdout);
}
