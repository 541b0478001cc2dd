#!/usr/bin/env bash
# Builds the test suite under a sanitizer in its own build folder and runs it with ctest.
# Usage: tests/sanitize.sh address|thread [extra ctest args]
#   address: AddressSanitizer (+ leak checks off: LibTorch keeps process-lifetime pools)
#   thread:  ThreadSanitizer, for the concurrency tests
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kind=${1:?usage: tests/sanitize.sh address|thread}
shift
"$root/deploy/setup.sh" --no-build
build="$root/build-$kind"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DADAPTERD_SANITIZER="$kind" \
  -DADAPTERD_BUILD_BENCHMARKS=OFF "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$root/tests/tsan.supp"
cd "$build"
ctest --output-on-failure -j"$(nproc)" --timeout 900 "$@"
