# The two commands of the README: `make demo` and `make test`. Each installs
# what is missing (Debian packages), builds, then runs.
BUILD      ?= build
ASAN_BUILD ?= build-asan
JOBS       ?= $(shell nproc)
MIGRUN      = $(BUILD)/migrun

.PHONY: all deps build build-asan test test-fast test-asan demo install clean

all: build

deps:
	@tools/install-deps

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

build-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DMIGRUN_SANITIZE=ON >/dev/null
	@cmake --build $(ASAN_BUILD) -j$(JOBS)

# The whole suite, then again under AddressSanitizer/UBSan.
test: build build-asan
	ctest --test-dir $(BUILD) --output-on-failure
	ASAN_OPTIONS=detect_leaks=1 ctest --test-dir $(ASAN_BUILD) --output-on-failure

test-fast: build
	ctest --test-dir $(BUILD) --output-on-failure

test-asan: build-asan
	ASAN_OPTIONS=detect_leaks=1 ctest --test-dir $(ASAN_BUILD) --output-on-failure

demo: build
	$(MIGRUN) tools/demo.lua

install: build
	cmake --install $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)

# The full-load benchmark, kept out of `make test`: migrun vs the runbook's
# pg_dump|psql vs pgcopydb on one lab (docs/benchmarks.md). Scale 1 is ~1 GB.
BENCH_SCALE ?= 1
.PHONY: bench
bench: build
	@command -v pgcopydb >/dev/null || apt-get install -y pgcopydb || echo "pgcopydb not installed: measured without it"
	$(MIGRUN) bench/fullload.lua $(BENCH_SCALE)
