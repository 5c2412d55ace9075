# Every tests/spec/*_spec.lua is one ctest test, run by busted *inside* migrun so
# the modules are tested in the runtime users get. Labels:
#   unit  no server: pure Lua and pure C (make test-unit, seconds)
#   lab   starts its own PostgreSQL lab (and maybe the DMS emulator)
#   e2e   a whole rehearsal: lab, emulator, workload, playbooks run as a team runs them
#   faults  the fault campaign (kills at every step, DMS faults): make test-faults
# Each lab picks free ports and its own directory, so specs run in parallel
# (ctest -j); an e2e spec counts as two processors so that two of them at most
# share a 2-core machine with the lighter ones; the longest start first (COST,
# until ctest has timings of its own).
find_program(BUSTED_RUNNER busted PATHS /usr/bin REQUIRED)
# The sanitizer build's migrun.so needs the sanitizer runtimes preloaded into
# a stock interpreter (tests/spec/lua_module_spec.lua passes them as LD_PRELOAD).
set(MIGRUN_SANITIZE_PRELOAD "")
if(MIGRUN_SANITIZE)
  foreach(lib IN ITEMS libasan.so libubsan.so)
    execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=${lib}
      OUTPUT_VARIABLE path OUTPUT_STRIP_TRAILING_WHITESPACE)
    list(APPEND MIGRUN_SANITIZE_PRELOAD ${path})
  endforeach()
  string(REPLACE ";" ":" MIGRUN_SANITIZE_PRELOAD "${MIGRUN_SANITIZE_PRELOAD}")
endif()
file(GLOB MIGRUN_SPECS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/spec/*_spec.lua)
set(MIGRUN_UNIT_SPECS aws_credentials cli config dms_builders dms_client embed groups host_os host json
    host_sleep interrupt layers lsn lua_module playbook_cli pretty proc repl sigv4 text)
# watching a migration (issue 13): no server either
list(APPEND MIGRUN_UNIT_SPECS live metrics notify report_html status)
# the worker pool: child processes, no server
list(APPEND MIGRUN_UNIT_SPECS pool)
# the repair's plan (its run is in e2e_store_spec)
list(APPEND MIGRUN_UNIT_SPECS repair)
# the full load's progress in on-disk bytes
list(APPEND MIGRUN_UNIT_SPECS loadprogress)
# the process watchers' job and lines (a probe in the worker, no server)
list(APPEND MIGRUN_UNIT_SPECS watchdog)
# the journal and its log of changes (files only)
list(APPEND MIGRUN_UNIT_SPECS journal)
# The specs' labs live on a tmpfs when the machine has one with room to spare:
# on an ext4 VM disk, creating and removing a cluster's ~1,500 files costs more
# system time than initdb spends computing them (initdb 1.4 s against 0.8 s on
# tmpfs, a copy of its directory 0.85 s against 0.06 s), and the suite starts
# some 60 labs. -DMIGRUN_TEST_TMPDIR=/some/dir chooses, an empty value keeps $TMPDIR.
if(NOT DEFINED MIGRUN_TEST_TMPDIR)
  set(MIGRUN_TEST_TMPDIR "")
  execute_process(COMMAND df -B1G --output=avail /dev/shm
    OUTPUT_VARIABLE shm_avail ERROR_QUIET RESULT_VARIABLE shm_status)
  string(REGEX MATCH "[0-9]+" shm_avail "${shm_avail}")
  if(shm_status EQUAL 0 AND shm_avail AND shm_avail GREATER_EQUAL 4)
    set(MIGRUN_TEST_TMPDIR /dev/shm)
  endif()
  set(MIGRUN_TEST_TMPDIR "${MIGRUN_TEST_TMPDIR}" CACHE PATH "where the specs' labs live (empty: $TMPDIR)")
endif()
set(MIGRUN_TEST_ENV
  "MIGRUN_BIN=$<TARGET_FILE:migrun>;MIGRUN_SOURCE_DIR=${CMAKE_SOURCE_DIR};MIGRUN_SANITIZE=$<IF:$<BOOL:${MIGRUN_SANITIZE}>,1,0>;MIGRUN_MODULE=$<TARGET_FILE:migrun_module>;MIGRUN_EXAMPLE=$<TARGET_FILE:migrun_embed>;MIGRUN_SANITIZE_PRELOAD=${MIGRUN_SANITIZE_PRELOAD}")
if(MIGRUN_TEST_TMPDIR)
  list(APPEND MIGRUN_TEST_ENV "TMPDIR=${MIGRUN_TEST_TMPDIR}")
endif()
# Seconds each longer spec takes alone on a 2-core machine (the ordinary
# build, measured one at a time; the sanitizer build's are about 1.5 times
# these): ctest starts the longest first (COST) until it has timings of its
# own (build/Testing/Temporary/CTestCostData.txt), so that on a fresh clone
# no long spec starts last and runs alone at the end. A spec not listed
# costs its label's default: unknown e2e specs first, then labs, then units.
set(MIGRUN_SPEC_SECONDS
  e2e_restart=58 e2e_guard=43 e2e_embed=30 e2e_status=27 fullload=23 pg_faults=22 mistakes=16
  e2e_observe=16 pg=14 e2e_preflight=13 e2e_lobs=13 e2e_idle=13 e2e_cutover=13 lab=12 fullload_awkward=12
  e2e_full=12 dms_emulator=12 dms_awscli=12 verify=11 e2e_store=11 sessions=10 lab_faults=10 e2e_awkward=10
  fence=8 qa=7 repl=6 proc=6 interrupt=6 embed=6 e2e_env=6 console=6)
foreach(spec IN LISTS MIGRUN_SPECS)
  get_filename_component(name ${spec} NAME_WE)
  string(REGEX REPLACE "_spec$" "" short ${name})
  if(short IN_LIST MIGRUN_UNIT_SPECS)
    set(label unit)
    set(processors 1)
    set(cost 1)
  elseif(name MATCHES "^faults_")
    set(label faults)
    set(processors 2)
    set(cost 1000)
  elseif(name MATCHES "^e2e_")
    set(label e2e)
    set(processors 2)
    set(cost 100)
  else()
    set(label lab)
    set(processors 1)
    set(cost 5)
  endif()
  foreach(pair IN LISTS MIGRUN_SPEC_SECONDS)
    if(pair MATCHES "^${short}=([0-9]+)$")
      set(cost ${CMAKE_MATCH_1})
    endif()
  endforeach()
  add_test(NAME ${name}
    COMMAND migrun ${BUSTED_RUNNER} --output=plainTerminal
            --lpath=${CMAKE_SOURCE_DIR}/tests/?.lua ${spec}
    WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(${name} PROPERTIES TIMEOUT 1200 LABELS ${label} PROCESSORS ${processors} COST ${cost}
    ENVIRONMENT "${MIGRUN_TEST_ENV}")
endforeach()

# Static checks, in the unit label: luacheck over every Lua file of the tree.
find_program(LUACHECK luacheck PATHS /usr/bin REQUIRED)
add_test(NAME luacheck
  COMMAND ${LUACHECK} --no-color --codes lua playbooks tools bench tests
  WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
set_tests_properties(luacheck PROPERTIES LABELS unit)

# The C follows .clang-format: clang-format reports every line that differs.
# Debian 12's clang-format is version 14; other versions lay some lines out
# differently, so the versioned name is preferred.
find_program(CLANG_FORMAT NAMES clang-format-14 clang-format)
file(GLOB MIGRUN_C_FORMATTED CONFIGURE_DEPENDS
  ${CMAKE_SOURCE_DIR}/runtime/*.c ${CMAKE_SOURCE_DIR}/runtime/*.h
  ${CMAKE_SOURCE_DIR}/runtime/include/*.h ${CMAKE_SOURCE_DIR}/examples/*.c)
if(CLANG_FORMAT)
  add_test(NAME clang_format
    COMMAND ${CLANG_FORMAT} --dry-run --Werror ${MIGRUN_C_FORMATTED}
    WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
else()
  add_test(NAME clang_format
    COMMAND ${CMAKE_COMMAND} -E echo "clang-format is not installed (tools/install-deps installs it)")
  set_tests_properties(clang_format PROPERTIES WILL_FAIL ON)
endif()
set_tests_properties(clang_format PROPERTIES LABELS unit)
