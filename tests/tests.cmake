# Every tests/spec/*_spec.lua is one ctest test, run by busted *inside* migrun so
# the modules are tested in the runtime users get.
find_program(BUSTED_RUNNER busted PATHS /usr/bin REQUIRED)
file(GLOB MIGRUN_SPECS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/spec/*_spec.lua)
foreach(spec IN LISTS MIGRUN_SPECS)
  get_filename_component(name ${spec} NAME_WE)
  add_test(NAME ${name}
    COMMAND migrun ${BUSTED_RUNNER} --output=plainTerminal
            --lpath=${CMAKE_SOURCE_DIR}/tests/?.lua ${spec}
    WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(${name} PROPERTIES
    TIMEOUT 1200
    ENVIRONMENT "MIGRUN_BIN=$<TARGET_FILE:migrun>;MIGRUN_SOURCE_DIR=${CMAKE_SOURCE_DIR};MIGRUN_SANITIZE=$<IF:$<BOOL:${MIGRUN_SANITIZE}>,1,0>")
endforeach()
