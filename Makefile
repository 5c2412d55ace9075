# The two commands of the README: `make demo` and `make test`. Each installs
# what is missing (Debian packages), builds, then runs.
BUILD      ?= build
ASAN_BUILD ?= build-asan
JOBS       ?= $(shell nproc)
# Specs run in parallel: most of their time is spent waiting on servers.
TEST_JOBS  ?= 4
MIGRUN      = $(BUILD)/migrun
CTEST       = ctest --output-on-failure --timeout 1200

.PHONY: all deps build build-asan test test-unit test-faults test-fast test-asan test-matrix demo install clean

all: build

deps:
	@tools/install-deps

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

build-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DMIGRUN_SANITIZE=ON >/dev/null
	@cmake --build $(ASAN_BUILD) -j$(JOBS)

# The whole suite, and at the same time again under AddressSanitizer/UBSan
# (tools/test-builds prints the second run after the first).
test: build build-asan
	@tools/test-builds $(BUILD) $(ASAN_BUILD) $(TEST_JOBS) -LE faults

# The fault campaign: SIGKILL at every step of every playbook, DMS faults at 20%.
test-faults: build
	$(CTEST) --test-dir $(BUILD) -j$(TEST_JOBS) -L faults

# The specs that need no server, and the static checks: seconds.
test-unit: build
	$(CTEST) --test-dir $(BUILD) -j$(TEST_JOBS) -L unit

test-fast: build
	$(CTEST) --test-dir $(BUILD) -j$(TEST_JOBS) -LE faults

test-asan: build-asan
	ASAN_OPTIONS=detect_leaks=1 $(CTEST) --test-dir $(ASAN_BUILD) -j$(TEST_JOBS) -LE faults

# Across PostgreSQL versions (docs/versions.md): the servers of other majors
# fetched into a cache (tools/install-pg-versions), then, one pair at a time,
# the queries that differ by version on each major and the whole migration
# (awkward schema, writes, full load, CDC, cutover, verification).
MATRIX_PAIRS ?= 13-15 13-17 15-17
MATRIX_ENV    = MIGRUN_BIN=$(CURDIR)/$(MIGRUN) MIGRUN_SOURCE_DIR=$(CURDIR)
MATRIX_BUSTED = $(MIGRUN) /usr/bin/busted --output=plainTerminal --lpath=tests/?.lua
test-matrix: build
	@tools/install-pg-versions
	@passed=0; failed=0; \
	if $(MATRIX_ENV) $(MATRIX_BUSTED) tests/matrix/versions_spec.lua; then passed=$$((passed+1)); else failed=$$((failed+1)); fi; \
	for pair in $(MATRIX_PAIRS); do \
	  echo "== PostgreSQL $$pair"; \
	  if MIGRUN_MATRIX_PAIR=$$pair $(MATRIX_ENV) $(MATRIX_BUSTED) tests/matrix/e2e_matrix_spec.lua; \
	  then passed=$$((passed+1)); else failed=$$((failed+1)); fi; \
	done; \
	echo "test-matrix: $$passed passed, $$failed failed"; [ $$failed -eq 0 ]

demo: build
	$(MIGRUN) tools/demo.lua

install: build
	cmake --install $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)

# The full-load benchmark, kept out of `make test`: migrun, its rerun after a
# kill and its verification against their floors and pgcopydb 0.18, in rounds
# of alternating order (docs/benchmarks.md). Scale 1 is ~1 GB. Both datasets,
# 2 streams, 5 rounds; waits up to 10 minutes for an idle machine.
BENCH_SCALE ?= 1
BENCH_ARGS  ?= --jobs 2 --pairs 5 --wait-idle 600
.PHONY: bench bench-cutover
# The cutover window at two sizes under the same writes (docs/benchmarks.md).
BENCH_CUTOVER_ARGS ?= --scales 1,4 --rate 50
bench-cutover: build
	MIGRUN_SOURCE_DIR=$(CURDIR) $(MIGRUN) bench/cutover.lua $(BENCH_CUTOVER_ARGS)

bench: build
	@command -v pgcopydb >/dev/null || apt-get install -y pgcopydb || echo "pgcopydb not installed: measured without it"
	MIGRUN_SOURCE_DIR=$(CURDIR) $(MIGRUN) bench/fullload.lua --scale $(BENCH_SCALE) --shape standard $(BENCH_ARGS)
	MIGRUN_SOURCE_DIR=$(CURDIR) $(MIGRUN) bench/fullload.lua --scale $(BENCH_SCALE) --shape dominant $(BENCH_ARGS)
