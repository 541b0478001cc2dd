#!/usr/bin/env bash
# Sets up (idempotent apt installs), builds in Release and runs the whole test suite with ctest.
# Usage: deploy/test.sh [extra ctest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/deploy/setup.sh" "$root/build"
cd "$root/build"
ctest --output-on-failure -j"$(nproc)" --timeout 600 "$@"
