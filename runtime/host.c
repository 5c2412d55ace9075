/*
 * migrun.host: facts about the running program and the few operating system
 * calls the Lua library needs that Lua's io/os do not offer: the path of the
 * running executable (whatever the host is: the migrun executable, a C
 * program linking libmigrun, the stock lua5.4), the worker executable that
 * every child running migrun Lua code is started with (host.worker,
 * host.worker_spec: see "the worker" below), the version and pid, whether a
 * stream is a terminal (live progress lines or plain ones), free space on a
 * file system, private directories, and crash-safe file replacement for
 * journals (written to a temporary file, fsynced, renamed over the old one,
 * the directory fsynced, so a SIGKILL or power loss leaves the old or the new
 * file, never a torn one), an exclusive lock on a file so two migruns never
 * drive one state directory, the one monotonic clock and the one
 * interruptible sleep of migrun (migrun_monotonic, migrun_sleep: C code uses
 * them too), and stop requests between a migrun and its guard process.
 */
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "migrun_internal.h"

static int os_error(lua_State *L, const char *where, int err) {
    lua_pushnil(L);
    migrun_error_push(L, "os", where, NULL, strerror(err));
    lua_pushinteger(L, err);
    lua_setfield(L, -2, "errno");
    return 2;
}

/* host.isatty(fd | file) -> boolean: 0/1/2 or an io file handle */
static int host_isatty(lua_State *L) {
    int fd;
    if (lua_isinteger(L, 1)) {
        fd = (int)lua_tointeger(L, 1);
    } else {
        luaL_Stream *s = luaL_checkudata(L, 1, LUA_FILEHANDLE);
        luaL_argcheck(L, s->closef != NULL && s->f != NULL, 1, "closed file");
        fd = fileno(s->f);
    }
    lua_pushboolean(L, isatty(fd));
    return 1;
}

/* host.statvfs(path) -> { free = bytes available to unprivileged users,
 * total = bytes } | nil, err */
static int host_statvfs(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    struct statvfs st;
    if (statvfs(path, &st) != 0)
        return os_error(L, path, errno);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, (lua_Integer)st.f_bavail * (lua_Integer)st.f_frsize);
    lua_setfield(L, -2, "free");
    lua_pushinteger(L, (lua_Integer)st.f_blocks * (lua_Integer)st.f_frsize);
    lua_setfield(L, -2, "total");
    return 1;
}

/* host.mkdir(path [, mode = 0700]) -> true | nil, err; an existing directory
 * is fine (its mode is left alone). */
static int host_mkdir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    mode_t mode = (mode_t)luaL_optinteger(L, 2, 0700);
    if (mkdir(path, mode) != 0) {
        struct stat st;
        if (errno != EEXIST)
            return os_error(L, path, errno);
        if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
            return os_error(L, path, ENOTDIR);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int fsync_dir_of(const char *path) {
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        strcpy(dir, ".");
    } else if (slash == path) {
        strcpy(dir, "/");
    } else {
        size_t n = (size_t)(slash - path);
        if (n >= sizeof dir)
            return ENAMETOOLONG;
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int rc = fsync(fd) == 0 ? 0 : errno;
    close(fd);
    return rc;
}

/* Writes all of data to fd (a write cut short by a signal goes on) -> 0 | errno */
static int write_all(int fd, const char *data, size_t len) {
    for (size_t off = 0; off < len;) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0) {
            if (errno != EINTR)
                return errno;
        } else {
            off += (size_t)n;
        }
    }
    return 0;
}

/* host.write_file(path, data [, mode = 0600]) -> true | nil, err
 * Replaces path atomically and durably: path.tmp is created with mode (never
 * wider, whatever the umask), written, fsynced and renamed over path; then the
 * directory is fsynced. */
static int host_write_file(lua_State *L) {
    size_t len;
    const char *path = luaL_checkstring(L, 1);
    const char *data = luaL_checklstring(L, 2, &len);
    mode_t mode = (mode_t)luaL_optinteger(L, 3, 0600);
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return os_error(L, path, ENAMETOOLONG);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return os_error(L, tmp, errno);
    int err = 0;
    if (fchmod(fd, mode) != 0)
        err = errno;
    if (err == 0)
        err = write_all(fd, data, len);
    if (err == 0 && fsync(fd) != 0)
        err = errno;
    if (close(fd) != 0 && err == 0)
        err = errno;
    if (err == 0 && rename(tmp, path) != 0)
        err = errno;
    if (err != 0) {
        unlink(tmp);
        return os_error(L, path, err);
    }
    if ((err = fsync_dir_of(path)) != 0)
        return os_error(L, path, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* host.append_file(path, data [, mode = 0600]) -> true | nil, err
 * Appends data to path durably: written whole, then fdatasynced, before it
 * returns true; a new file is created with mode (never wider) and its
 * directory fsynced. A write that fails part way is cut off again, so the
 * file holds what it held before or all of data, never a torn tail that a
 * later append would bury. One writer at a time (the caller's lock). */
static int host_append_file(lua_State *L) {
    size_t len;
    const char *path = luaL_checkstring(L, 1);
    const char *data = luaL_checklstring(L, 2, &len);
    mode_t mode = (mode_t)luaL_optinteger(L, 3, 0600);
    int created = 0;
    int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC, mode);
        created = fd >= 0;
    }
    if (fd < 0)
        return os_error(L, path, errno);
    int err = 0;
    struct stat st;
    int sized = fstat(fd, &st) == 0;
    if (!sized)
        err = errno;
    if (err == 0 && created && fchmod(fd, mode) != 0)
        err = errno;
    if (err == 0)
        err = write_all(fd, data, len);
    if (err == 0 && fdatasync(fd) != 0)
        err = errno;
    if (err != 0 && sized && ftruncate(fd, st.st_size) != 0) {
        /* the tail stays; the error below is the one that matters */
    }
    if (close(fd) != 0 && err == 0)
        err = errno;
    if (err == 0 && created)
        err = fsync_dir_of(path);
    if (err != 0)
        return os_error(L, path, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* host.read_file(path) -> the whole file | nil, err (err.errno says why:
 * ENOENT for a file that is not there) */
static int host_read_file(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return os_error(L, path, errno);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int err = 0;
    for (;;) {
        char *dst = luaL_prepbuffer(&b);
        ssize_t n = read(fd, dst, LUAL_BUFFERSIZE);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (n == 0)
            break;
        luaL_addsize(&b, (size_t)n);
    }
    close(fd);
    if (err != 0)
        return os_error(L, path, err);
    luaL_pushresult(&b);
    return 1;
}

/* host.cwd() -> the current directory | nil, err (unlike $PWD, always true) */
static int host_cwd(lua_State *L) {
    char buf[PATH_MAX];
    if (getcwd(buf, sizeof buf) == NULL)
        return os_error(L, ".", errno);
    lua_pushstring(L, buf);
    return 1;
}

/* host.now() -> seconds since the epoch, with microseconds */
static int host_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

/* ---- the clock and the sleep ----------------------------------------------
 * One monotonic clock for every deadline in migrun (pg timeouts, proc waits,
 * retry loops) and one sleep that Ctrl-C interrupts. */

double migrun_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void migrun_sleep(lua_State *L, double seconds) {
    struct timespec ts = {(time_t)seconds, (long)((seconds - floor(seconds)) * 1e9)};
    migrun_check_interrupt(L); /* one that came before: its signal is gone */
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        migrun_check_interrupt(L);
    migrun_check_interrupt(L);
}

/* host.monotonic() -> seconds on a clock that never jumps, for deadlines */
int migrun_host_monotonic(lua_State *L) {
    lua_pushnumber(L, (lua_Number)migrun_monotonic());
    return 1;
}

/* host.sleep(seconds): for polling and retry backoff; Ctrl-C raises the
 * interrupted error (kind "interrupted"). */
int migrun_host_sleep(lua_State *L) {
    double s = (double)luaL_checknumber(L, 1);
    luaL_argcheck(L, s >= 0 && s < 1e9, 1, "seconds out of range");
    migrun_sleep(L, s);
    return 0;
}

/* ---- stop requests ---------------------------------------------------------
 * migrun's guard (a child process) stops the playbook that started it with
 * SIGUSR1; call.c turns the signal into an interrupt of kind "guard".
 *
 * host.listen_stop(on [, pid]): true listens (requests are remembered), to
 *     pid only when given (the guard, once started: another state's guard
 *     never stops this one), else to any process; false stops listening and
 *     forgets them. The process-wide handler is in place while any state
 *     listens (call.c).
 * host.arm_stop(on) -> whether a request has arrived: while armed, a request
 *     interrupts what runs (Lua code, a query, a wait, a sleep) with an error
 *     of kind "guard"; arming with a request already in stops at once.
 * host.request_stop(pid) -> true | nil, err: sends the request to pid (the
 *     guard's parent; refused for any pid but the caller's parent, so a
 *     stale pid can never hit another process). */
static int host_listen_stop(lua_State *L) {
    luaL_checktype(L, 1, LUA_TBOOLEAN);
    lua_Integer from = luaL_optinteger(L, 2, 0);
    luaL_argcheck(L, from == 0 || (from > 1 && from <= INT_MAX), 2, "a process id expected");
    migrun_listen_stop(L, lua_toboolean(L, 1), (int)from);
    return 0;
}

static int host_arm_stop(lua_State *L) {
    luaL_checktype(L, 1, LUA_TBOOLEAN);
    lua_pushboolean(L, migrun_arm_stop(L, lua_toboolean(L, 1)));
    return 1;
}

static int host_request_stop(lua_State *L) {
    lua_Integer pid = luaL_checkinteger(L, 1);
    luaL_argcheck(L, pid > 1, 1, "a process id expected");
    if ((pid_t)pid != getppid())
        return migrun_error_return(
            L, "os", "request_stop", "ESRCH",
            "the process to stop is not this process's parent (it has exited)");
    if (kill((pid_t)pid, SIGUSR1) != 0)
        return os_error(L, "request_stop", errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- the worker -------------------------------------------------------------
 * Every child process that runs migrun Lua code (the pool's workers, the
 * guard, the metrics server, the playbook of a then_run) is the worker
 * executable migrun-worker (main.c: the migrun interpreter of libmigrun),
 * never the host's own executable, which may be any program (a C host, the
 * stock lua5.4). The first of these that is an executable file is it:
 *   1. the path a host gave migrun_set_worker();
 *   2. $MIGRUN_WORKER (not with registry.LUA_NOENV, as lua -E);
 *   3. beside the file holding libmigrun's code (dladdr: libmigrun.so,
 *      migrun.so, or the executable linking libmigrun.a): in its directory
 *      (a build tree; a host that ships the worker beside it), then where
 *      cmake --install puts the worker relative to that file's own install
 *      directory (MIGRUN_WORKER_FROM_*: lib/, lib/lua/5.4/, bin/);
 *   4. the install path compiled in (MIGRUN_WORKER_INSTALLED).
 * An explicit choice (1, 2) that is not an executable file is an error, not
 * passed over. The copy beside the library comes before the compiled-in
 * path so that a build tree or an install moved elsewhere (--prefix at
 * install time, DESTDIR) never runs the worker of another installation. */

/* Set by the host before its states run, like the environment it reads. */
static char worker_chosen[PATH_MAX];

static int is_executable_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

int migrun_set_worker(const char *path) {
    char real[PATH_MAX];
    if (path == NULL || *path == '\0') {
        worker_chosen[0] = '\0';
        return 0;
    }
    /* absolute: a child's spec may change directory before the exec */
    if (realpath(path, real) == NULL)
        return -1;
    if (!is_executable_file(real)) {
        errno = EACCES;
        return -1;
    }
    memcpy(worker_chosen, real, strlen(real) + 1);
    return 0;
}

/* The file holding this code, resolved (symlinks, relative names) into out. */
static int library_file(char *out) {
    Dl_info info;
    struct link_map *map = NULL;
    if (dladdr1((void *)migrun_openlibs, &info, (void **)&map, RTLD_DL_LINKMAP) == 0 ||
        info.dli_fname == NULL)
        return 0;
    char exe[PATH_MAX];
    const char *file = info.dli_fname;
    if (map == NULL || map->l_name[0] == '\0') {
        /* the main program: its name in the link map is empty (dladdr gives
         * argv[0]); the kernel's link names it, " (deleted)" once a rebuild
         * or an upgrade replaced it while it runs */
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n <= 0)
            return 0;
        exe[n] = '\0';
        const char *gone = " (deleted)";
        size_t g = strlen(gone);
        if ((size_t)n > g && strcmp(exe + n - g, gone) == 0)
            exe[n - g] = '\0';
        file = exe;
    }
    if (realpath(file, out) != NULL)
        return 1;
    if (file[0] != '/' || strlen(file) >= PATH_MAX)
        return 0;
    strcpy(out, file); /* replaced and gone: its directory still says where to look */
    return 1;
}

/* Appends a candidate to the list tried; 1 (with path resolved into found)
 * when it is the worker. */
static int try_worker(const char *dir, const char *rel, char *found, char *tried, size_t cap) {
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s%s%s", dir, dir[0] ? "/" : "", rel) >= (int)sizeof path)
        return 0;
    size_t used = strlen(tried);
    snprintf(tried + used, cap - used, "%s%s", used ? ", " : "", path);
    return is_executable_file(path) && realpath(path, found) != NULL;
}

/* Pushes the worker's absolute path, or nil and an error saying where it looked. */
static int push_worker(lua_State *L) {
    if (worker_chosen[0] != '\0') {
        lua_pushstring(L, worker_chosen);
        return 1;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
    int noenv = lua_toboolean(L, -1);
    lua_pop(L, 1);
    const char *env = noenv ? NULL : getenv("MIGRUN_WORKER");
    char found[PATH_MAX];
    if (env != NULL && *env != '\0') {
        if (env[0] == '/' && is_executable_file(env) && realpath(env, found) != NULL) {
            lua_pushstring(L, found);
            return 1;
        }
        lua_pushfstring(L,
                        "MIGRUN_WORKER=%s is not %s: point it at the migrun-worker "
                        "executable of this libmigrun (an absolute path), or unset it",
                        env, env[0] == '/' ? "an executable file" : "an absolute path");
        migrun_error_return(L, "spawn", "worker", NULL, lua_tostring(L, -1));
        return 2;
    }
    char tried[4 * PATH_MAX + 16] = "";
    char lib[PATH_MAX];
    if (library_file(lib)) {
        char *slash = strrchr(lib, '/');
        *slash = '\0';
        const char *base = slash + 1;
        const char *rel = strncmp(base, "libmigrun.so", 12) == 0 ? MIGRUN_WORKER_FROM_LIBDIR
                          : strcmp(base, "migrun.so") == 0       ? MIGRUN_WORKER_FROM_MODULEDIR
                                                                 : MIGRUN_WORKER_FROM_BINDIR;
        if (try_worker(lib, "migrun-worker", found, tried, sizeof tried) ||
            try_worker(lib, rel, found, tried, sizeof tried)) {
            lua_pushstring(L, found);
            return 1;
        }
    }
    if (try_worker("", MIGRUN_WORKER_INSTALLED, found, tried, sizeof tried)) {
        lua_pushstring(L, found);
        return 1;
    }
    lua_pushfstring(L,
                    "no migrun-worker executable (looked at %s): install migrun with its worker "
                    "(cmake --install), or name it with MIGRUN_WORKER=/path/to/migrun-worker or "
                    "migrun_set_worker() in the host",
                    tried);
    migrun_error_return(L, "spawn", "worker", NULL, lua_tostring(L, -1));
    return 2;
}

/* host.worker() -> the worker executable's absolute path | nil, err */
static int host_worker(lua_State *L) {
    return push_worker(L);
}

/* Sets t[key] = package[field] unless t has key (the caller's choice wins). */
static void set_lua_path(lua_State *L, int t, const char *key, const char *field) {
    if (lua_getfield(L, t, key) != LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    lua_pop(L, 1);
    if (lua_getglobal(L, "package") == LUA_TTABLE && lua_getfield(L, -1, field) == LUA_TSTRING) {
        lua_setfield(L, t, key);
        lua_pop(L, 1);
    } else {
        lua_pop(L, 2);
    }
}

/* host.worker_spec(spec) -> spec | nil, err
 * The migrun.proc spec of a child that runs migrun Lua code: spec's array
 * part is the worker's arguments ({ "-e", code } or { script, args... }),
 * its other fields are the spawn's options. Returns a new spec: the worker
 * first, then those arguments; env gets the Lua module paths of this state
 * (LUA_PATH_5_4 = package.path, LUA_CPATH_5_4 = package.cpath, unless spec.env
 * sets them), so the child requires what the parent can, whatever the host,
 * and the version of this library, which the worker checks (interp.c). The
 * embedded library and MIGRUN_LUA_PATH come with the worker and the
 * allow-list (proc.c). */
static int host_worker_spec(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    int envt = lua_getfield(L, 1, "env"); /* 2 */
    luaL_argcheck(L, envt == LUA_TNIL || envt == LUA_TTABLE, 1, "env must be a table");
    if (push_worker(L) == 2) /* 3 */
        return 2;
    lua_Integer n = luaL_len(L, 1);
    lua_createtable(L, (int)(n + 1), 4); /* 4: the new spec */
    lua_pushvalue(L, 3);
    lua_rawseti(L, 4, 1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, 1, i);
        lua_rawseti(L, 4, i + 1);
    }
    lua_pushnil(L);
    while (lua_next(L, 1)) { /* the options */
        if (lua_isinteger(L, -2) && lua_tointeger(L, -2) >= 1 && lua_tointeger(L, -2) <= n) {
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, 4);
    }
    lua_newtable(L); /* 5: env, a copy */
    if (envt == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, 2)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, 5);
        }
    }
    set_lua_path(L, 5, "LUA_PATH_5_4", "path");
    set_lua_path(L, 5, "LUA_CPATH_5_4", "cpath");
    lua_pushliteral(L, MIGRUN_VERSION);
    lua_setfield(L, 5, "MIGRUN_WORKER_VERSION");
    lua_setfield(L, 4, "env");
    return 1;
}

/* ---- locks ---------------------------------------------------------------
 * host.lock(path) -> Lock | nil, err
 * Takes an exclusive flock on path (created 0600) without waiting, and writes
 * this process's pid into it. When another process holds it, err.kind is
 * "locked" and err.pid the holder's pid (read from the file; nil if it could
 * not be read). The descriptor is close-on-exec, so children never inherit
 * the lock. Lock:unlock() (also __close and __gc) releases it; unlocking
 * twice is an error, like closing a file twice. */
#define LOCK_MT "migrun.host.Lock"

typedef struct {
    int fd; /* -1 when released */
} Lock;

static int lock_release(lua_State *L) {
    Lock *lk = luaL_checkudata(L, 1, LOCK_MT);
    if (lk->fd >= 0) {
        int fd = lk->fd;
        lk->fd = -1; /* marked released before releasing */
        close(fd);   /* drops the flock */
    }
    return 0;
}

static int lock_unlock(lua_State *L) {
    Lock *lk = luaL_checkudata(L, 1, LOCK_MT);
    luaL_argcheck(L, lk->fd >= 0, 1, "lock already released");
    return lock_release(L);
}

static int lock_tostring(lua_State *L) {
    Lock *lk = luaL_checkudata(L, 1, LOCK_MT);
    lua_pushstring(L, lk->fd >= 0 ? "migrun.host.Lock (held)" : "migrun.host.Lock (released)");
    return 1;
}

static int host_lock(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    Lock *lk = lua_newuserdatauv(L, sizeof *lk, 0); /* lock */
    lk->fd = -1; /* born released: __gc is harmless whatever happens next */
    luaL_setmetatable(L, LOCK_MT);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return os_error(L, path, errno);
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        if (err != EWOULDBLOCK) {
            close(fd);
            return os_error(L, path, err);
        }
        char buf[32];
        ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
        close(fd);
        long pid = 0;
        if (n > 0) {
            buf[n] = '\0';
            pid = strtol(buf, NULL, 10);
        }
        lua_pushnil(L);
        if (pid > 0) {
            lua_pushfstring(L, "locked by another migrun (pid %d)", (int)pid);
        } else {
            lua_pushliteral(L, "locked by another migrun");
        }
        migrun_error_push(L, "locked", path, NULL, lua_tostring(L, -1)); /* nil msg err */
        if (pid > 0) {
            lua_pushinteger(L, pid);
            lua_setfield(L, -2, "pid");
        }
        lua_remove(L, -2); /* nil err */
        return 2;
    }
    lk->fd = fd;
    char buf[32];
    int len = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)len, 0) != len) {
        int err = errno;
        lk->fd = -1;
        close(fd);
        return os_error(L, path, err);
    }
    return 1;
}

int luaopen_migrun_host(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"isatty", host_isatty},
        {"statvfs", host_statvfs},
        {"mkdir", host_mkdir},
        {"read_file", host_read_file},
        {"write_file", host_write_file},
        {"append_file", host_append_file},
        {"now", host_now},
        {"monotonic", migrun_host_monotonic},
        {"sleep", migrun_host_sleep},
        {"lock", host_lock},
        {"cwd", host_cwd},
        {"listen_stop", host_listen_stop},
        {"arm_stop", host_arm_stop},
        {"request_stop", host_request_stop},
        {"worker", host_worker},
        {"worker_spec", host_worker_spec},
        {NULL, NULL},
    };
    static const luaL_Reg lock_meta[] = {
        {"__gc", lock_release},
        {"__close", lock_release},
        {"__tostring", lock_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg lock_methods[] = {
        {"unlock", lock_unlock},
        {NULL, NULL},
    };
    luaL_newmetatable(L, LOCK_MT);
    luaL_setfuncs(L, lock_meta, 0);
    luaL_newlib(L, lock_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newlib(L, funcs);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        lua_pushlstring(L, exe, (size_t)n);
        lua_setfield(L, -2, "exe");
    }
    lua_pushliteral(L, MIGRUN_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushinteger(L, (lua_Integer)getpid());
    lua_setfield(L, -2, "pid");
    return 1;
}
