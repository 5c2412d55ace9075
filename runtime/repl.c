/*
 * The interactive loop (migrun with no script on a terminal, or -i). It owns
 * reading input and printing results: on a terminal, lines come from libedit
 * (readline API) with persistent history (~/.migrun_history or
 * $MIGRUN_HISTORY, created 0600) and tab completion of globals and fields
 * (candidates come from the Lua module migrun.repl.complete); otherwise lines are
 * read plainly from stdin with no prompts, so piped sessions give
 * deterministic output. As in lua.c, a line is first tried as an expression
 * ("return " .. line) so values print without typing return, then as a
 * statement, and while the parse error ends in <eof> more lines are read.
 * Results print through migrun.repl.pretty; errors print (honouring __tostring)
 * and the loop goes on. Ctrl-C while a command runs interrupts it (the hook
 * installed by migrun_docall); Ctrl-C at the prompt drops the line. `exit`
 * and `quit` (bare or called, as people type them) end the loop like end of
 * input, unless a global of that name exists.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <editline/readline.h>

#include "migrun_internal.h"

#define EOFMARK "<eof>"
#define HISTORY_MAX 1000

/* The state the completion callback needs: libedit gives it no user data. */
static lua_State *repl_L = NULL;
static int repl_tty = 0;
static char *repl_histfile = NULL;
static volatile sig_atomic_t repl_sigint = 0;

/* ---- Ctrl-C at the prompt ---------------------------------------------- */

static void prompt_sigint(int sig) {
    (void)sig;
    repl_sigint = 1;
}

/* Installs (on 1) or removes (on 0) the REPL's own handler, in place for the
 * whole loop except while migrun_docall runs a command (which installs the
 * interrupting hook and leaves SIG_DFL behind, hence the re-installs), so a
 * Ctrl-C between commands never kills migrun. No SA_RESTART: the read in
 * libedit (or getline) fails with EINTR and returns. */
static void prompt_signal(int on) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on ? prompt_sigint : SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

/* ---- history ----------------------------------------------------------- */

static char *history_path(void) {
    const char *env = getenv("MIGRUN_HISTORY");
    if (env != NULL && *env != '\0')
        return strdup(env);
    const char *home = getenv("HOME");
    if (home == NULL || *home == '\0')
        return NULL;
    size_t len = strlen(home) + sizeof "/.migrun_history";
    char *path = malloc(len);
    if (path != NULL)
        snprintf(path, len, "%s/.migrun_history", home);
    return path;
}

static void history_open(void) {
    repl_histfile = history_path();
    stifle_history(HISTORY_MAX);
    if (repl_histfile != NULL)
        read_history(repl_histfile); /* a missing file is not an error */
}

/* Adds an entry and saves the whole history, so nothing is lost if the
 * process is killed. The file is created 0600 before libedit rewrites it. */
static void history_add(const char *entry) {
    if (entry[0] == '\0')
        return;
    add_history(entry);
    if (repl_histfile == NULL)
        return;
    int fd = open(repl_histfile, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        close(fd);
        write_history(repl_histfile);
    }
}

static void history_close(void) {
    clear_history();
    free(repl_histfile);
    repl_histfile = NULL;
}

/* ---- completion -------------------------------------------------------- */

/* Candidates of the current completion: a Lua array in the registry. */
static int candidates_ref = LUA_NOREF;

/* Under lua_pcall: the word (a light userdata char *) -> migrun.repl.complete.complete(word). */
static int complete_call(lua_State *L) {
    const char *word = lua_touserdata(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "migrun.repl.complete");
    lua_call(L, 1, 1);               /* complete */
    lua_getfield(L, -1, "complete"); /* complete fn */
    lua_pushstring(L, word);         /* complete fn word */
    lua_call(L, 1, 1);               /* complete list */
    return 1;
}

/* readline's generator: state 0 computes the list, then one strdup'd match
 * per call until NULL. */
static char *complete_generator(const char *text, int state) {
    lua_State *L = repl_L;
    static lua_Integer next;
    if (state == 0) {
        luaL_unref(L, LUA_REGISTRYINDEX, candidates_ref);
        candidates_ref = LUA_NOREF;
        next = 1;
        lua_pushcfunction(L, complete_call);
        lua_pushlightuserdata(L, (void *)text);
        if (lua_pcall(L, 1, 1, 0) != LUA_OK || !lua_istable(L, -1)) {
            lua_pop(L, 1); /* a failing completer just offers nothing */
            return NULL;
        }
        candidates_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (candidates_ref == LUA_NOREF)
        return NULL;
    lua_rawgeti(L, LUA_REGISTRYINDEX, candidates_ref); /* list */
    lua_rawgeti(L, -1, next++);                        /* list candidate */
    const char *s = lua_tostring(L, -1);
    char *match = s ? strdup(s) : NULL;
    lua_pop(L, 2);
    return match;
}

static char **complete_attempt(const char *text, int start, int end) {
    (void)start;
    (void)end;
    rl_attempted_completion_over = 1; /* never fall back to file names */
    return rl_completion_matches(text, complete_generator);
}

/* Everything but the characters of "a.b:c" breaks a word. */
static char word_breaks[] = " \t\n\"\\'`@$><=;|&{}()[],+-*/%^#~";

static void completion_init(void) {
    rl_readline_name = "migrun";
    rl_attempted_completion_function = complete_attempt;
    rl_basic_word_break_characters = word_breaks;
    rl_completer_word_break_characters = word_breaks;
    rl_completion_append_character = '\0';
}

/* ---- reading lines ----------------------------------------------------- */

/* Result of reading one line. */
enum { LINE_OK, LINE_EOF, LINE_INTERRUPTED };

/* Pushes the next line without its newline. */
static int read_line(lua_State *L, int firstline) {
    if (!repl_tty) {
        char *buf = NULL;
        size_t cap = 0;
        repl_sigint = 0;
        ssize_t n = getline(&buf, &cap, stdin);
        if (n < 0) {
            free(buf);
            if (repl_sigint) {
                clearerr(stdin);
                repl_sigint = 0;
                return LINE_INTERRUPTED;
            }
            return LINE_EOF;
        }
        if (n > 0 && buf[n - 1] == '\n')
            buf[--n] = '\0';
        lua_pushlstring(L, buf, (size_t)n);
        free(buf);
        return LINE_OK;
    }
    lua_getglobal(L, firstline ? "_PROMPT" : "_PROMPT2");
    const char *p = lua_tostring(L, -1);
    char *prompt = strdup(p ? p : firstline ? "> " : ">> ");
    lua_pop(L, 1);
    repl_sigint = 0;
    char *line = readline(prompt ? prompt : "> ");
    free(prompt);
    if (line == NULL) {
        if (repl_sigint) {
            repl_sigint = 0;
            fputs("\n", stdout);
            fflush(stdout);
            return LINE_INTERRUPTED;
        }
        return LINE_EOF;
    }
    lua_pushstring(L, line);
    free(line);
    return LINE_OK;
}

/* ---- compiling --------------------------------------------------------- */

/* Is the error on top a syntax error that more input could fix? Pops it if so. */
static int incomplete(lua_State *L, int status) {
    if (status == LUA_ERRSYNTAX) {
        size_t lmsg;
        const char *msg = lua_tolstring(L, -1, &lmsg);
        size_t lmark = sizeof(EOFMARK) - 1;
        if (msg != NULL && lmsg >= lmark && strcmp(msg + lmsg - lmark, EOFMARK) == 0) {
            lua_pop(L, 1);
            return 1;
        }
    }
    return 0;
}

/* With the line at index 1, tries "return line"; on success leaves only the
 * function and records the line in the history. */
static int try_expression(lua_State *L) {
    const char *line = lua_tostring(L, 1);
    const char *retline = lua_pushfstring(L, "return %s;", line); /* line retline */
    int status = luaL_loadbuffer(L, retline, strlen(retline), "=stdin");
    if (status == LUA_OK) {
        lua_remove(L, -2); /* line fn */
        if (repl_tty)
            history_add(line);
        lua_remove(L, 1); /* fn */
    } else
        lua_pop(L, 2); /* line */
    return status;
}

/* With the line at index 1, compiles it as statements, reading more lines
 * while the chunk is incomplete. Leaves the function or the error message. */
static int try_statements(lua_State *L) {
    for (;;) {
        size_t len;
        const char *chunk = lua_tolstring(L, 1, &len);
        int status = luaL_loadbuffer(L, chunk, len, "=stdin"); /* chunk fn|msg */
        if (!incomplete(L, status)) {
            if (repl_tty)
                history_add(chunk);
            lua_remove(L, 1); /* fn|msg */
            return status;
        }
        int r = read_line(L, 0); /* chunk line */
        if (r == LINE_EOF) {
            /* as lua.c: report the unfinished chunk */
            chunk = lua_tolstring(L, 1, &len);
            status = luaL_loadbuffer(L, chunk, len, "=stdin"); /* chunk msg */
            lua_remove(L, 1);
            return status;
        }
        if (r == LINE_INTERRUPTED) {
            lua_settop(L, 0);
            return -2;
        }
        lua_pushliteral(L, "\n");
        lua_insert(L, -2);
        lua_concat(L, 3); /* chunk.."\n"..line */
    }
}

/* Is line "exit" or "quit" (optionally "()" and ";"), with no global of that
 * name to call instead? */
static int is_exit(lua_State *L, const char *line) {
    char word[8];
    size_t n = 0;
    while (isspace((unsigned char)*line))
        line++;
    while (isalpha((unsigned char)*line) && n < sizeof word - 1)
        word[n++] = *line++;
    word[n] = '\0';
    if (strcmp(word, "exit") != 0 && strcmp(word, "quit") != 0)
        return 0;
    while (isspace((unsigned char)*line))
        line++;
    if (*line == '(') {
        line++;
        while (isspace((unsigned char)*line))
            line++;
        if (*line++ != ')')
            return 0;
    }
    while (isspace((unsigned char)*line) || *line == ';')
        line++;
    if (*line != '\0')
        return 0;
    int defined = lua_getglobal(L, word) != LUA_TNIL;
    lua_pop(L, 1);
    return !defined;
}

/* Leaves a compiled function (LUA_OK) or an error message on an empty stack;
 * -1 at end of input (or exit/quit), -2 when Ctrl-C dropped the input. */
static int load_input(lua_State *L) {
    lua_settop(L, 0);
    int r = read_line(L, 1);
    if (r != LINE_OK)
        return r == LINE_EOF ? -1 : -2;
    if (is_exit(L, lua_tostring(L, 1))) {
        lua_settop(L, 0);
        return -1;
    }
    if (try_expression(L) == LUA_OK)
        return LUA_OK;
    return try_statements(L);
}

/* ---- printing ---------------------------------------------------------- */

static void print_error(lua_State *L, const char *progname) {
    const char *msg = lua_tostring(L, -1); /* docall's handler already applied __tostring */
    if (msg == NULL) {
        if (luaL_callmeta(L, -1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            lua_remove(L, -2);
        else
            lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, -1));
        msg = lua_tostring(L, -1);
    }
    fflush(stdout);
    fprintf(stderr, "%s: %s\n", progname, msg);
    fflush(stderr);
    lua_settop(L, 0);
}

/* Prints the results on the stack with migrun.repl.pretty.print. */
static void print_results(lua_State *L, const char *progname) {
    int n = lua_gettop(L);
    if (n == 0)
        return;
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    lua_getglobal(L, "require");
    lua_pushliteral(L, "migrun.repl.pretty");
    int status = migrun_docall(L, 1, 1); /* results... pretty|msg */
    prompt_signal(1);
    if (status != LUA_OK) {
        print_error(L, progname);
        return;
    }
    lua_getfield(L, -1, "print"); /* results... pretty print */
    lua_remove(L, -2);
    lua_insert(L, 1); /* print results... */
    status = migrun_docall(L, n, 0);
    prompt_signal(1);
    if (status != LUA_OK)
        print_error(L, progname);
    fflush(stdout);
}

/* ---- the loop ---------------------------------------------------------- */

void migrun_repl(lua_State *L, const char *progname) {
    repl_L = L;
    repl_tty = isatty(STDIN_FILENO);
    if (repl_tty) {
        completion_init();
        history_open();
    }
    prompt_signal(1);
    int status;
    while ((status = load_input(L)) != -1) {
        if (status == -2)
            continue; /* Ctrl-C at the prompt */
        if (status == LUA_OK) {
            status = migrun_docall(L, 0, LUA_MULTRET);
            prompt_signal(1);
        }
        if (status == LUA_OK)
            print_results(L, progname);
        else
            print_error(L, progname);
        lua_settop(L, 0);
    }
    lua_settop(L, 0);
    prompt_signal(0);
    if (repl_tty) {
        history_close();
        luaL_unref(L, LUA_REGISTRYINDEX, candidates_ref);
        candidates_ref = LUA_NOREF;
        fputs("\n", stdout);
    }
    fflush(stdout);
    repl_L = NULL;
}
