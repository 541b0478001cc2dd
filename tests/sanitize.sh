#!/usr/bin/env bash
# Builds the test suite under a sanitizer in its own build folder and runs it with ctest.
# Usage: tests/sanitize.sh address|thread [extra ctest args]
#   address: AddressSanitizer over everything, the real server in the end-to-end tests
#            included (leak checks off: LibTorch keeps process-lifetime pools).
#   thread:  ThreadSanitizer over the in-process tests (the adapter table's readers and
#            writers, the engine, the tokenizer). The end-to-end tests are left out: Debian's
#            gRPC and Abseil are not built with TSan, so absl::Mutex and gRPC's event engine
#            synchronise invisibly to it and every server test drowns in false reports. For
#            the same reason so are the scheduler's and the admin worker's tests (their
#            threads meet only in absl::Mutex::Await); clang's -Wthread-safety
#            (tests/lint/thread_safety.sh), AddressSanitizer and the soak cover them. The
#            end-to-end test binaries and deploy checks are not even built
#            (-DADAPTERD_BUILD_E2E=OFF). Suites that run on one thread are left out too
#            (the tokenizer, chat-template, config and safetensors parsers, the step governor's
#            arithmetic, and the CLI's one-request subprocesses): TSan has
#            nothing to find there; AddressSanitizer still runs them all.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kind=${1:?usage: tests/sanitize.sh address|thread}
shift
"$root/deploy/setup.sh" --no-build
build="$root/build-$kind"
launcher=()
command -v ccache >/dev/null && launcher=(  # As deploy/setup.sh's.
  "-DCMAKE_CXX_COMPILER_LAUNCHER=$(command -v cmake);-E;env;LANG=C.UTF-8;LC_ALL=C.UTF-8;LC_CTYPE=C.UTF-8;LC_MESSAGES=C.UTF-8;CCACHE_SLOPPINESS=pch_defines,time_macros;CCACHE_BASEDIR=$root;ccache")
# -O1 -g1 (line tables): the reports keep their file:line stacks, and a LibTorch-heavy unit
# compiles in half the time of -O2 -g (the two sanitizer builds were most of CI's time).
e2e=ON
[[ "$kind" == thread ]] && e2e=OFF
# One ctest per test suite, not per TEST: a process start under a sanitizer costs 1.7 s (ASan)
# to 2.5 s (TSan), mostly LibTorch's loading, and one per TEST was half of each step's time.
cmake -S "$root" -B "$build" -DADAPTERD_BUILD_E2E=$e2e -DADAPTERD_CTEST_PER_SUITE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
  -DADAPTERD_SANITIZER="$kind" -DADAPTERD_BUILD_BENCHMARKS=OFF "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$root/tests/tsan.supp"
cd "$build"
exclude=()
[[ "$kind" == thread ]] && exclude=(-E 'E2e|e2e\.|SchedulerTest\.|AdminWorkerTest\.|CliTest\.|GoldenTest\.|TokenizerTest\.|JinjaEngineTest\.|ModelConfigTest\.|SafetensorsTest\.|StepGovernorTest\.')
ctest --output-on-failure -j"$(nproc)" --timeout 900 "${exclude[@]}" "$@"
