/*
 * migrun_main: the migrun interpreter, a drop-in for the lua interpreter (same
 * options, same `arg` table, LUA_INIT, REPL) with the migrun modules built in.
 * Modelled on Lua 5.4's lua.c: everything runs under migrun_docall (call.c:
 * one protected call whose message handler adds a traceback and honours
 * __tostring on error objects, with Ctrl-C routed to the running code); this
 * file owns only the command line, the messages and finding the script.
 *
 * It is in libmigrun (not in the Lua module migrun.so, which has no REPL), so
 * that every program built on the library runs it the same way: the migrun
 * executable and the worker executable migrun-worker are both
 * `int main(int argc, char **argv) { return migrun_main(argc, argv); }`
 * (main.c), and a host may offer it as a command of its own.
 */
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>
#include <libpq-fe.h>
#include <openssl/crypto.h>

#include "migrun_internal.h"

static const char *progname = "migrun";

/* ---- messages ---------------------------------------------------------- */

static void print_usage(const char *badoption) {
    if (badoption[1] == 'e' || badoption[1] == 'l' || strcmp(badoption, "--config") == 0)
        fprintf(stderr, "%s: '%s' needs argument\n", progname, badoption);
    else
        fprintf(stderr, "%s: unrecognized option '%s'\n", progname, badoption);
    fprintf(stderr,
            "usage: %s [options] [script [args]]\n"
            "Available options are:\n"
            "  -e stat   execute string 'stat'\n"
            "  -i        enter interactive mode after executing 'script'\n"
            "  -l mod    require library 'mod' into global 'mod'\n"
            "  -l g=mod  require library 'mod' into global 'g'\n"
            "  -v        show version information (migrun, Lua, libpq, libcurl, OpenSSL)\n"
            "  -E        ignore environment variables (LUA_INIT, MIGRUN_LUA_PATH)\n"
            "  -W        turn warnings on\n"
            "  --config FILE  open the slot-inspection console on FILE's migration (with -i)\n"
            "  --        stop handling options\n"
            "  -         stop handling options and execute stdin\n",
            progname);
}

static void l_message(const char *pname, const char *msg) {
    if (pname)
        fprintf(stderr, "%s: ", pname);
    fprintf(stderr, "%s\n", msg);
    fflush(stderr);
}

static int report(lua_State *L, int status) {
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        l_message(progname, msg ? msg : "(error object is not a string)");
        lua_pop(L, 1);
    }
    return status;
}

static void print_version(void) {
    int pq = PQlibVersion();
    printf("migrun %s\n", MIGRUN_VERSION);
    printf("  %s\n", LUA_RELEASE);
    printf("  libpq %d.%d\n", pq / 10000, pq % 10000);
    printf("  libcurl %s\n", curl_version_info(CURLVERSION_NOW)->version);
    printf("  OpenSSL %s\n", OpenSSL_version(OPENSSL_VERSION_STRING));
    fflush(stdout);
}

/* arg table: script at index 0, its arguments positive, interpreter options negative. */
static void createargtable(lua_State *L, char **argv, int argc, int script) {
    if (script == argc)
        script = 0;
    int narg = argc - (script + 1);
    lua_createtable(L, narg, script + 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - script);
    }
    lua_setglobal(L, "arg");
}

static int dochunk(lua_State *L, int status) {
    if (status == LUA_OK)
        status = migrun_docall(L, 0, 0);
    return report(L, status);
}

static int dofile(lua_State *L, const char *name) {
    return dochunk(L, luaL_loadfile(L, name));
}

static int dostring(lua_State *L, const char *s, const char *name) {
    return dochunk(L, luaL_loadbuffer(L, s, strlen(s), name));
}

/* -l [g=]mod: for a dotted module with no g=, the global is its last part
 * (-l migrun.rehearsal.lab gives `lab`). */
static int dolibrary(lua_State *L, char *spec) {
    char *modname = strchr(spec, '=');
    const char *globname;
    if (modname != NULL) {
        *modname++ = '\0';
        globname = spec;
    } else {
        modname = spec;
        const char *dot = strrchr(modname, '.');
        globname = dot ? dot + 1 : modname;
    }
    lua_getglobal(L, "require");
    lua_pushstring(L, modname);
    int status = migrun_docall(L, 1, 1);
    if (status == LUA_OK)
        lua_setglobal(L, globname);
    return report(L, status);
}

/* --config FILE: the slot-inspection console (lua/migrun/repl/console.lua) as the
 * global `console`, opened on FILE. The option wins over MIGRUN_CONFIG, which
 * is removed so that requiring the module does not open that one first. */
static int doconsole(lua_State *L, const char *path) {
    unsetenv("MIGRUN_CONFIG");
    lua_getglobal(L, "require");
    lua_pushliteral(L, "migrun.repl.console");
    int status = migrun_docall(L, 1, 1); /* console | msg */
    if (status != LUA_OK)
        return report(L, status);
    lua_pushvalue(L, -1);
    lua_setglobal(L, "console"); /* console */
    lua_getfield(L, -1, "main"); /* console main */
    lua_remove(L, -2);           /* main */
    lua_pushstring(L, path);     /* main path */
    return report(L, migrun_docall(L, 1, 0));
}

/* "--config FILE" or "--config=FILE": the FILE, or NULL for another argument. */
static const char *config_option(char **argv, int i) {
    if (strcmp(argv[i], "--config") == 0)
        return argv[i + 1];
    if (strncmp(argv[i], "--config=", 9) == 0)
        return argv[i] + 9;
    return NULL;
}

static int pushargs(lua_State *L) {
    if (lua_getglobal(L, "arg") != LUA_TTABLE)
        luaL_error(L, "'arg' is not a table");
    int n = (int)luaL_len(L, -1);
    luaL_checkstack(L, n + 3, "too many arguments to script");
    int i;
    for (i = 1; i <= n; i++)
        lua_rawgeti(L, -i, i);
    lua_remove(L, -i);
    return n;
}

/* An installed migrun finds its stock playbooks from any directory: a relative
 * path that does not exist here is looked up in <prefix>/share/migrun, the
 * prefix being where this executable is installed (so --prefix and DESTDIR
 * installs work), then in the configured data directory. */
static const char *resolve_script(lua_State *L, const char *fname) {
    if (fname == NULL || strcmp(fname, "-") == 0 || fname[0] == '/' || access(fname, F_OK) == 0)
        return fname;
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            const char *p = lua_pushfstring(L, "%s/../share/migrun/%s", exe, fname);
            if (access(p, R_OK) == 0)
                return p;
            lua_pop(L, 1);
        }
    }
    const char *installed = lua_pushfstring(L, "%s/%s", MIGRUN_DATADIR, fname);
    if (access(installed, R_OK) == 0)
        return installed;
    lua_pop(L, 1);
    return fname;
}

static int handle_script(lua_State *L, char **argv) {
    const char *fname = argv[0];
    if (strcmp(fname, "-") == 0 && strcmp(argv[-1], "--") != 0)
        fname = NULL; /* stdin */
    fname = resolve_script(L, fname);
    int status = luaL_loadfile(L, fname);
    if (status == LUA_OK) {
        int n = pushargs(L);
        status = migrun_docall(L, n, LUA_MULTRET);
    }
    return report(L, status);
}

/* ---- options (as lua.c) ------------------------------------------------ */

#define has_error 1
#define has_i 2
#define has_v 4
#define has_e 8
#define has_E 16

static int collectargs(char **argv, int *first) {
    int args = 0;
    int i;
    if (argv[0] != NULL) {
        if (argv[0][0])
            progname = argv[0];
    } else {
        *first = -1;
        return 0;
    }
    for (i = 1; argv[i] != NULL; i++) {
        *first = i;
        if (argv[i][0] != '-')
            return args;
        switch (argv[i][1]) {
        case '-':
            if (strcmp(argv[i], "--config") == 0) { /* migrun's one long option */
                i++;
                if (argv[i] == NULL || argv[i][0] == '-')
                    return has_error;
                break;
            }
            if (strncmp(argv[i], "--config=", 9) == 0 && argv[i][9] != '\0')
                break;
            if (argv[i][2] != '\0')
                return has_error;
            *first = i + 1;
            return args;
        case '\0':
            return args;
        case 'E':
            if (argv[i][2] != '\0')
                return has_error;
            args |= has_E;
            break;
        case 'W':
            if (argv[i][2] != '\0')
                return has_error;
            break;
        case 'i':
            args |= has_i; /* -i implies -v in lua; migrun keeps the banner short */
            /* FALLTHROUGH */
        case 'v':
            if (argv[i][2] != '\0')
                return has_error;
            if (argv[i][1] == 'v')
                args |= has_v;
            break;
        case 'e':
            args |= has_e;
            /* FALLTHROUGH */
        case 'l':
            if (argv[i][2] == '\0') {
                i++;
                if (argv[i] == NULL || argv[i][0] == '-')
                    return has_error;
            }
            break;
        default:
            return has_error;
        }
    }
    *first = 0;
    return args;
}

static int runargs(lua_State *L, char **argv, int n) {
    for (int i = 1; i < n; i++) {
        int option = argv[i][1];
        switch (option) {
        case 'e':
        case 'l': {
            char *extra = argv[i] + 2;
            if (*extra == '\0')
                extra = argv[++i];
            int status =
                (option == 'e') ? dostring(L, extra, "=(command line)") : dolibrary(L, extra);
            if (status != LUA_OK)
                return 0;
            break;
        }
        case 'W':
            lua_warning(L, "@on", 0);
            break;
        case '-': {
            const char *path = config_option(argv, i);
            if (path == NULL)
                break; /* "--" */
            if (argv[i][8] == '\0')
                i++; /* the FILE of "--config FILE" */
            if (doconsole(L, path) != LUA_OK)
                return 0;
            break;
        }
        }
    }
    return 1;
}

static int handle_luainit(lua_State *L) {
    const char *name = "=LUA_INIT_5_4";
    const char *init = getenv(name + 1);
    if (init == NULL) {
        name = "=LUA_INIT";
        init = getenv(name + 1);
    }
    if (init == NULL)
        return LUA_OK;
    if (init[0] == '@')
        return dofile(L, init + 1);
    return dostring(L, init, name);
}

static int pmain(lua_State *L) {
    int argc = (int)lua_tointeger(L, 1);
    char **argv = (char **)lua_touserdata(L, 2);
    int script;
    int args = collectargs(argv, &script);
    int optlim = (script > 0) ? script : argc;
    luaL_checkversion(L);
    if (args == has_error) {
        print_usage(argv[script]);
        return 0;
    }
    if (args & has_v)
        print_version();
    if (args & has_E) {
        lua_pushboolean(L, 1);
        lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
        unsetenv("MIGRUN_LUA_PATH"); /* -E: the embedded library only */
    }
    luaL_openlibs(L);
    migrun_openlibs(L);
    createargtable(L, argv, argc, script);
    lua_gc(L, LUA_GCRESTART);
    lua_gc(L, LUA_GCGEN, 0, 0);
    if (!(args & has_E)) {
        if (handle_luainit(L) != LUA_OK)
            return 0;
    }
    if (!runargs(L, argv, optlim))
        return 0;
    if (script > 0) {
        if (handle_script(L, argv + script) != LUA_OK)
            return 0;
    }
    if (args & has_i)
        migrun_repl(L, progname);
    else if (script < 1 && !(args & (has_e | has_v))) {
        if (isatty(STDIN_FILENO)) {
            print_version();
            migrun_repl(L, progname);
        } else
            dofile(L, NULL); /* executes stdin as a file */
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* A worker started by a library of another version would speak another
 * protocol with it (the pool's events, the guard's lines): refused at once,
 * naming both. The variable is the parent's (host.worker_spec sets it) and
 * is removed, so the worker's own children are not judged by it. */
static int check_worker_version(const char *pname) {
    const char *want = getenv("MIGRUN_WORKER_VERSION");
    if (want == NULL)
        return 1;
    int same = strcmp(want, MIGRUN_VERSION) == 0;
    if (!same)
        fprintf(stderr,
                "%s: this migrun worker is version %s, the migrun library that started it is "
                "%s: install both from one build, or point MIGRUN_WORKER (or "
                "migrun_set_worker) at the worker of the library's version\n",
                pname, MIGRUN_VERSION, want);
    unsetenv("MIGRUN_WORKER_VERSION");
    return same;
}

int migrun_main(int argc, char **argv) {
    if (!check_worker_version(argc > 0 && argv[0] ? argv[0] : progname))
        return EXIT_FAILURE;
    /* A child's exit status is read with waitpid(pid): a SIGCHLD ignored by
     * whoever started this program (dispositions survive exec) would make
     * the kernel reap children itself and lose every status. This program
     * owns its dispositions, so it puts back the default (a library only
     * refuses to spawn then: see proc.c). */
    signal(SIGCHLD, SIG_DFL);
    lua_State *L = luaL_newstate();
    if (L == NULL) {
        l_message(argv[0], "cannot create state: not enough memory");
        return EXIT_FAILURE;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    lua_gc(L, LUA_GCSTOP);
    lua_pushcfunction(L, pmain);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int status = lua_pcall(L, 2, 1, 0);
    int result = lua_toboolean(L, -1);
    report(L, status);
    lua_close(L);
    curl_global_cleanup();
    return (result && status == LUA_OK) ? EXIT_SUCCESS : EXIT_FAILURE;
}
