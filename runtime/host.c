/*
 * migrun.host: facts about the running migrun program that Lua cannot find
 * by itself: the path of this executable (so the library can start helper
 * processes such as the DMS emulator with the same migrun) and its version.
 */
#include <limits.h>
#include <unistd.h>

#include "migrun.h"

int luaopen_migrun_host(lua_State *L) {
    lua_createtable(L, 0, 2);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        lua_pushlstring(L, exe, (size_t)n);
        lua_setfield(L, -2, "exe");
    }
    lua_pushliteral(L, MIGRUN_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
