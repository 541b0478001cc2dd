# Run at build time (cmake -P) after a test binary links: lists its GoogleTest suites and
# writes one ctest per suite (`Suite.*`, run as `binary --gtest_filter=Suite.*`) into OUT.
# Used where a process start is dear (the sanitizer builds: LibTorch's start-up under
# ThreadSanitizer alone is ~2.5 s a process); the default build keeps one ctest per TEST.
# Inputs: -D EXE=<binary> -D OUT=<file> -D WORKDIR=<dir>.
execute_process(COMMAND "${EXE}" --gtest_list_tests
                WORKING_DIRECTORY "${WORKDIR}" OUTPUT_VARIABLE listing RESULT_VARIABLE rc
                TIMEOUT 120)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${EXE} --gtest_list_tests failed (${rc}):\n${listing}")
endif()
string(REPLACE ";" "\\;" listing "${listing}")
string(REPLACE "\n" ";" lines "${listing}")
set(content "")
set(names "")
foreach(line IN LISTS lines)
  # Suite lines start in column one ("Suite." or "Suite.  # TypeParam = ..."); tests are
  # indented under them.
  if(line MATCHES "^([^ #][^ ]*)\\.( |$)")
    set(suite "${CMAKE_MATCH_1}")
    if(suite MATCHES "^DISABLED_")
      continue()
    endif()
    string(APPEND content
      "add_test([==[${suite}.*]==] [==[${EXE}]==] [==[--gtest_filter=${suite}.*]==])\n")
    list(APPEND names "${suite}.*")
  endif()
endforeach()
string(APPEND content "set(suites_of_binary [==[${names}]==])\n")
file(WRITE "${OUT}" "${content}")
