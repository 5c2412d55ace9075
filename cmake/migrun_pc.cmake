# Writes <libdir>/pkgconfig/migrun.pc under the prefix being installed to.
# Run by `cmake --install` (install(CODE) in CMakeLists.txt), which sets
# CMAKE_INSTALL_PREFIX (from --prefix if given) and honours DESTDIR; the
# caller sets MIGRUN_PC_VERSION, MIGRUN_PC_LIBDIR and MIGRUN_PC_INCLUDEDIR
# (relative to the prefix, or absolute).
foreach(dir IN ITEMS LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${MIGRUN_PC_${dir}}")
    set(pc_${dir} "${MIGRUN_PC_${dir}}")
  else()
    set(pc_${dir} "\${prefix}/${MIGRUN_PC_${dir}}")
  endif()
endforeach()
set(pc_file "$ENV{DESTDIR}${CMAKE_INSTALL_PREFIX}/${MIGRUN_PC_LIBDIR}/pkgconfig/migrun.pc")
if(IS_ABSOLUTE "${MIGRUN_PC_LIBDIR}")
  set(pc_file "$ENV{DESTDIR}${MIGRUN_PC_LIBDIR}/pkgconfig/migrun.pc")
endif()
file(WRITE "${pc_file}" "prefix=${CMAKE_INSTALL_PREFIX}
libdir=${pc_LIBDIR}
includedir=${pc_INCLUDEDIR}

Name: migrun
Description: Lua 5.4-scripted PostgreSQL migration runtime, to embed in a program
Version: ${MIGRUN_PC_VERSION}
Requires: lua5.4
Requires.private: libpq libcurl openssl libedit
Libs: -L\${libdir} -lmigrun
Libs.private: -lm
Cflags: -I\${includedir}
")
message(STATUS "Installing: ${pc_file}")
