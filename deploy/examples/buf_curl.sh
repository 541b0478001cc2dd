#!/usr/bin/env bash
# Example: call adapterd with `buf curl` (a grpcurl-style CLI, npm @bufbuild/buf) through the
# server's reflection service — no proto files needed.
# Usage: deploy/examples/buf_curl.sh [ADDR] [PROMPT]   (BUF=path/to/buf, default: buf on PATH)
set -euo pipefail
addr=${1:-127.0.0.1:50051}
prompt=${2:-Hello}
buf=${BUF:-buf}
"$buf" curl --protocol grpc --http2-prior-knowledge \
  --data "{\"text\": \"$prompt\", \"maxNewTokens\": 8, \"ignoreEos\": true}" \
  "http://$addr/adapterd.v1.Generation/Generate"
