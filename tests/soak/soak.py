#!/usr/bin/python3
"""A bounded soak of the real adapterd: mixed clients at up to 4x its capacity for a set time
(10 minutes by default), with adapter churn, cancellations, clients killed mid-stream, bad
and poisoned requests. At the end it drains, checks that the server counted every request
sent (lost must be 0) and that nothing failed with a status no client caused, and prints:
requests sent, answered by status, lost, RSS at start and end, p50/p99 latency.

Traffic goes to 127.0.0.1 only, and every loop is bounded by the duration.

Usage: tests/soak/soak.py [--duration 600] [--build build] [--model DIR] [--clients 32]
                          [--max_kv_bytes N]
Exit code 0 when lost == 0 and no unexpected status was seen.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from adapterd_process import Adapterd, load_stubs  # noqa: E402

# A status only the client's own request can cause; anything else is a server fault.
EXPECTED = {"OK", "RESOURCE_EXHAUSTED", "NOT_FOUND", "INVALID_ARGUMENT", "CANCELLED",
            "DEADLINE_EXCEEDED"}

KILLED_CLIENT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import grpc
from adapterd.v1 import generation_pb2, generation_pb2_grpc
stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(sys.argv[2]))
req = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 450, 4996]),
                                     max_new_tokens=200, ignore_eos=True)
for _ in range(200):
    try:
        for chunk in stub.GenerateStream(req, timeout=120):
            print("started", flush=True)  # The server streams to us: the parent kills us now.
            time.sleep(60)
    except grpc.RpcError as e:
        print("refused " + e.code().name, flush=True)  # Queue full: a request it counted.
        time.sleep(0.05)
"""


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def counted_requests(metrics_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total = 0.0
    by_code = Counter()
    for m in re.finditer(r'^adapterd_requests_total\{adapter="[^"]*",code="(\w+)"\} (\S+)$', text, re.M):
        by_code[m.group(1)] += float(m.group(2))
        total += float(m.group(2))
    return int(total), by_code


def preemptions(metrics_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r"^adapterd_preemptions_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", help="model folder (default: the build's llama_tok fixture)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (4x --max_batch_rows 8)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max_kv_bytes", type=int, default=0,
                    help="the server's KV pool (default: its own); a small one soaks preemption")
    args = ap.parse_args()
    fixtures = os.path.join(args.build, "fixtures")
    stubs = load_stubs(os.path.join(ROOT, "proto"))
    grpc, gen_pb, gen_grpc = stubs.grpc, stubs.generation_pb2, stubs.generation_pb2_grpc
    admin_pb, admin_grpc = stubs.admin_pb2, stubs.admin_pb2_grpc
    stub_dir = os.path.dirname(os.path.dirname(os.path.dirname(stubs.generation_pb2.__file__)))
    extra = ["--max_batch_rows=8", "--max_queue=16", "--preload=qv=lora_qv,pre=prefix_llama",
             "--grace_period_s=30"]
    if args.model:
        extra.append("--model_dir=" + args.model)
    if args.max_kv_bytes > 0:
        extra.append("--max_kv_bytes=%d" % args.max_kv_bytes)
    server = Adapterd(os.path.join(args.build, "server", "adapterd"), fixtures, extra)
    channel = grpc.insecure_channel(server.addr)
    stub = gen_grpc.GenerationStub(channel)
    admin = admin_grpc.AdminStub(grpc.insecure_channel(server.admin_addr))
    stub.Generate(gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=[1, 2, 3]), max_new_tokens=4),
                  timeout=60)  # Warm-up, counted like any other.
    rss_start = rss_kib(server.process.pid)
    end = time.time() + args.duration
    lock = threading.Lock()
    sent = 1
    statuses = Counter({"OK": 1})
    latencies = []
    unexpected = []
    killed = [0]
    refused_killers = [0]  # Requests of killed clients refused before they streamed.

    def request(rng):
        ids = [1] + [rng.randrange(2, 32000) for _ in range(rng.randrange(1, 40))]
        r = gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=ids),
                                   max_new_tokens=rng.randrange(1, 48), ignore_eos=rng.random() < 0.5)
        kind = rng.random()
        r.adapter = rng.choice(["", "", "qv", "pre", "churn"])
        if kind < 0.3:
            r.temperature, r.top_k, r.seed = 0.8, 40, rng.randrange(1 << 30)
        elif kind < 0.35:
            r.temperature, r.repetition_penalty = 0.8, 1e-45  # Overflows: INVALID_ARGUMENT alone.
        elif kind < 0.40:
            r.top_p = 3.0  # Refused by validation.
        elif kind < 0.43:
            r.adapter = f"missing-{rng.randrange(1 << 20)}"
        return r

    def client(n):
        nonlocal sent
        rng = random.Random(args.seed * 1000 + n)
        while time.time() < end:
            req = request(rng)
            streamed = rng.random() < 0.5
            # Only a stream that delivered a chunk is cancelled: the server surely has it, so
            # it must count it (a call cancelled before it arrives is never seen).
            cancel_after = streamed and rng.random() < 0.3
            timeout = 0.3 if rng.random() < 0.05 else 120
            start = time.time()
            code = "OK"
            try:
                if streamed:
                    call = stub.GenerateStream(req, timeout=timeout)
                    for i, _ in enumerate(call):
                        if cancel_after and i == 1:
                            call.cancel()
                else:
                    stub.Generate(req, timeout=timeout)
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                sent += 1
                statuses[code] += 1
                if code == "OK":
                    latencies.append(time.time() - start)
                if code not in EXPECTED:
                    unexpected.append(f"{code} for {req}")

    def churn():
        rng = random.Random(args.seed)
        while time.time() < end:
            try:
                if rng.random() < 0.6:
                    admin.LoadAdapter(admin_pb.LoadAdapterRequest(
                        name="churn", path=rng.choice(["lora_qv", "prefix_llama", "lora_all_rslora"]),
                        replace=True), timeout=30)
                else:
                    admin.UnloadAdapter(admin_pb.UnloadAdapterRequest(name="churn"), timeout=30)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    with lock:
                        unexpected.append(f"admin: {e.code().name} {e.details()}")
            time.sleep(0.1)

    def killer():
        rng = random.Random(args.seed + 7)
        while time.time() < end:
            p = subprocess.Popen(["/usr/bin/python3", "-c", KILLED_CLIENT, stub_dir, server.addr],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            # Killed once the server streams to it; each refusal before that is a request too.
            started, refused = False, 0
            for line in p.stdout:
                if line.startswith("started"):
                    started = True
                    break
                refused += 1
            time.sleep(rng.random() * 0.5)
            p.send_signal(signal.SIGKILL)
            p.wait()
            with lock:
                killed[0] += 1 if started else 0
                refused_killers[0] += refused
            time.sleep(rng.random())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    threads += [threading.Thread(target=churn), threading.Thread(target=killer)]
    last_report = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        if time.time() - last_report >= 30:
            last_report = time.time()
            with lock:
                print(f"[{int(end - time.time())} s left] sent {sent}, {dict(statuses)}", flush=True)
    for t in threads:
        t.join()
    # Drain: every request sent (killed clients' included) must be counted by the server.
    expected_total = sent + killed[0] + refused_killers[0]
    deadline = time.time() + 60
    counted, by_code = counted_requests(server.metrics_port)
    while counted < expected_total and time.time() < deadline:
        time.sleep(0.5)
        counted, by_code = counted_requests(server.metrics_port)
    rss_end = rss_kib(server.process.pid)
    preempted = preemptions(server.metrics_port)
    exit_code = server.stop()
    lost = expected_total - counted
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0
    print(f"duration {args.duration:.0f} s, {args.clients} clients (4x capacity), adapter churn every 100 ms")
    print(f"requests sent: {sent} by clients + {killed[0]} by clients killed mid-stream"
          f" + {refused_killers[0]} refused attempts of those clients")
    print(f"answered by status (client side): {dict(sorted(statuses.items()))}")
    print(f"counted by the server: {counted} {dict(sorted(by_code.items()))}")
    print(f"lost: {lost}")
    print(f"preemptions (KV pool full): {preempted}")
    print(f"RSS: {rss_start / 1024:.1f} MiB at start, {rss_end / 1024:.1f} MiB at end")
    print(f"latency of OK requests: p50 {pct(0.5) * 1000:.1f} ms, p99 {pct(0.99) * 1000:.1f} ms")
    print(f"server exit code after SIGTERM: {exit_code}")
    for u in unexpected[:20]:
        print("UNEXPECTED", u)
    ok = lost == 0 and not unexpected and exit_code == 0
    print("soak: passed" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
