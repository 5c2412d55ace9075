# Every tests/spec/*_spec.lua is one ctest test, run by busted *inside* migrun so
# the modules are tested in the runtime users get.
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
foreach(spec IN LISTS MIGRUN_SPECS)
  get_filename_component(name ${spec} NAME_WE)
  add_test(NAME ${name}
    COMMAND migrun ${BUSTED_RUNNER} --output=plainTerminal
            --lpath=${CMAKE_SOURCE_DIR}/tests/?.lua ${spec}
    WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(${name} PROPERTIES
    TIMEOUT 1200
    ENVIRONMENT "MIGRUN_BIN=$<TARGET_FILE:migrun>;MIGRUN_SOURCE_DIR=${CMAKE_SOURCE_DIR};MIGRUN_SANITIZE=$<IF:$<BOOL:${MIGRUN_SANITIZE}>,1,0>;MIGRUN_MODULE=$<TARGET_FILE:migrun_module>;MIGRUN_EXAMPLE=$<TARGET_FILE:migrun_embed>;MIGRUN_SANITIZE_PRELOAD=${MIGRUN_SANITIZE_PRELOAD}")
endforeach()

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
