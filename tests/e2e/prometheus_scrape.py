#!/usr/bin/python3
"""A real Prometheus server (Debian's `prometheus`) scrapes a real adapterd; its HTTP API must
show adapterd_requests_total rising as requests are served. Prints 'N passed, N failed'.

Usage: prometheus_scrape.py ADAPTERD_BINARY ADAPTERCTL_BINARY FIXTURES_DIR
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(prom_port, expr):
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        data = json.load(r)
    return data["data"]["result"]


def main():
    adapterd, adapterctl, fixtures = sys.argv[1:4]
    if shutil.which("prometheus") is None:
        print("prometheus is not installed (deploy/setup.sh installs it)")
        print("0 passed, 1 failed")
        return 1
    server = Adapterd(adapterd, fixtures, ["--preload=qv=lora_qv"])
    work, ports = server.work, server.ports
    prom = None
    check = Checks()

    def generate(n):
        for _ in range(n):
            subprocess.run([adapterctl, "--addr", server.addr, "generate",
                            "--prompt", "Hello", "--adapter", "qv", "--max_new_tokens", "3"],
                           check=True, capture_output=True, timeout=60)

    try:
        prom_port = free_port()
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            f.write("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                    "scrape_configs:\n"
                    "  - job_name: adapterd\n"
                    f"    static_configs: [{{targets: ['127.0.0.1:{ports['metrics']}']}}]\n")
        prom = subprocess.Popen(
            ["prometheus", "--config.file=" + os.path.join(work, "prometheus.yml"),
             "--storage.tsdb.path=" + os.path.join(work, "data"),
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w"))
        generate(2)
        expr = 'sum(adapterd_requests_total{adapter="qv",code="OK"})'
        first = None
        deadline = time.time() + 40  # Prometheus 2.42 takes ~6 s to its first scrape.
        while time.time() < deadline:
            try:
                res = query(prom_port, expr)
                if res:
                    first = float(res[0]["value"][1])
                    break
            except OSError:
                pass
            time.sleep(0.2)
        check("first scrape", first is not None and first >= 2, str(first))
        generate(3)
        later = first
        deadline = time.time() + 30
        while time.time() < deadline and (later is None or later < (first or 0) + 3):
            res = query(prom_port, expr)
            later = float(res[0]["value"][1]) if res else None
            time.sleep(0.2)
        check("counter rises", later is not None and first is not None and later >= first + 3,
              f"{first} -> {later}")
        up = query(prom_port, 'up{job="adapterd"}')
        check("target up", up and up[0]["value"][1] == "1", str(up))
        ttft = query(prom_port, "sum(adapterd_time_to_first_token_seconds_count)")
        check("histogram scraped", ttft and float(ttft[0]["value"][1]) >= 5, str(ttft))
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        check("clean exit", server.stop() == 0)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
