#!/usr/bin/env bash
# Checks the lock annotations (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED, ...) with
# clang's -Wthread-safety, which gcc does not implement: every translation unit of server/ and
# adapters/ is compiled with clang (-fsyntax-only) using the flags of a configured build's
# compile_commands.json, and any thread-safety warning fails the check.
# Usage: tests/lint/thread_safety.sh [BUILD_DIR]   (default build/, configured by setup.sh)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-"$root/build"}
command -v clang++ >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null
}
[[ -f "$build/compile_commands.json" ]] || "$root/deploy/setup.sh" "$build"
/usr/bin/python3 - "$root" "$build" <<'PY'
import json, os, shlex, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
root, build = sys.argv[1:3]
units = [c for c in json.load(open(os.path.join(build, "compile_commands.json")))
         if c["file"].startswith((os.path.join(root, "server") + "/", os.path.join(root, "adapters") + "/"))]
def check(c):
    args = shlex.split(c["command"])[1:]
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-c", "-include", "-Winvalid-pch"):
            skip = a in ("-o", "-include")  # Drops the output and gcc's precompiled header.
            continue
        keep.append(a)
    cmd = ["clang++", "-fsyntax-only", "-Wno-everything", "-Wthread-safety",
           "-Wthread-safety-beta", "-Werror=thread-safety", "-Werror=thread-safety-beta"]
    cmd += [a for a in keep if a != c["file"]] + [c["file"]]
    r = subprocess.run(cmd, cwd=c["directory"], capture_output=True, text=True)
    return c["file"], r.returncode, r.stderr
failed = 0
with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    for path, code, err in pool.map(check, units):
        if code != 0:
            failed += 1
            print(f"FAILED {os.path.relpath(path, root)}\n{err}")
print(f"thread-safety: {len(units) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
