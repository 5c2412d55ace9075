/*
 * The migrun executable, and the worker executable migrun-worker that
 * libmigrun starts for every child process running migrun Lua code (the
 * pool's workers, the guard, the metrics server, a then_run playbook): both
 * are the interpreter of libmigrun (interp.c), nothing else. The worker is a
 * program of its own so that the library never assumes what its host's
 * executable understands (docs/embedding.md).
 */
#include "migrun.h"

int main(int argc, char **argv) {
    return migrun_main(argc, argv);
}
