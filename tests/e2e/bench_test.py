#!/usr/bin/python3
"""`adapterctl bench` and `adapterctl bench report` against a real adapterd on port 0: a
closed-loop sweep over gRPC and an open-loop run over the OpenAI HTTP front (from a scenario
file) whose request counts equal the server's own counters, every request's timings recorded,
malformed scenarios refused by name, and a report whose PNGs exist and whose index.html
headless Chromium renders with every chart decoded. Prints 'N passed, N failed'.

Usage: bench_test.py ADAPTERD ADAPTERCTL FIXTURES_DIR
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks  # noqa: E402


def requests_total(metrics_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("adapterd_requests_total{"))


def main():
    adapterd, adapterctl, fixtures = sys.argv[1:4]
    work = tempfile.mkdtemp(prefix="adapterd_bench_")
    check = Checks()
    server = Adapterd(adapterd, fixtures, ["--preload=qv=lora_qv,px=prefix_llama", "--http_listen=127.0.0.1:0"])
    mport, hport = server.metrics_port, server.ports["http"]
    ctl = [adapterctl, "--addr=" + server.addr]

    # Closed loop over gRPC: 2 levels x (1 warm-up + 5) requests over two adapters.
    before = requests_total(mport)
    out = os.path.join(work, "grpc.json")
    r = subprocess.run(ctl + ["bench", "--concurrency=1,3", "--requests=5", "--warmup=1", "--prompt_tokens=uniform:4:12",
                              "--output_tokens=5", "--adapters=qv,px", "--adapter_choice=uniform",
                              f"--metrics_url=http://127.0.0.1:{mport}/metrics", "--out=" + out],
                       capture_output=True, text=True, timeout=300)
    check("grpc.exit", r.returncode == 0, r.stderr)
    res = json.load(open(out))
    after = requests_total(mport)
    check("grpc.sent_equals_server_counter", res["sent"] == 12 and after - before == 12, (res["sent"], after - before))
    check("grpc.sent_equals_answered", res["answered"] == res["sent"] == len(res["requests"]))
    check("grpc.all_ok", all(q["status"] == "OK" for q in res["requests"]), [q for q in res["requests"] if q["status"] != "OK"])
    check("grpc.timings", all(q["ttft_s"] is not None and q["ttft_s"] >= 0 and 0 <= q["queue_s"] <= q["ttft_s"] and len(q["itl_s"]) == q["completion_tokens"] - 1
                              and q["completion_tokens"] == 5 and q["end_s"] >= q["start_s"] for q in res["requests"]))
    check("grpc.levels", [l["level"] for l in res["levels"]] == [1, 3] and all(l["sent"] == 5 for l in res["levels"]))
    check("grpc.per_adapter", set(res["overall"]["per_adapter"]) <= {"qv", "px"} and
          sum(v["sent"] for v in res["overall"]["per_adapter"].values()) == 10)
    check("grpc.server_metrics_scraped", isinstance(res["metrics"]["before"], dict) and
          any(k.startswith("adapterd_requests_total") for k in res["metrics"]["after"]))
    check("grpc.server_info", any("version=" in k for k in res["server_info"]), res["server_info"])
    check("grpc.client_overhead_printed", "client:" in r.stdout and "ms CPU per request" in r.stdout, r.stdout)

    # Open loop over HTTP from a scenario file, Zipf over the adapters.
    scenario = os.path.join(work, "scenario.json")
    json.dump({"mode": "open", "rates": [40], "requests": 8, "prompt_tokens": {"dist": "normal", "mean": 8, "stddev": 2},
               "output_tokens": 3, "adapters": {"choice": "zipf", "names": ["qv", "px"], "zipf_s": 1.2},
               "sampling": {"temperature": 0.7, "seed": 3}}, open(scenario, "w"))
    before = requests_total(mport)
    out_http = os.path.join(work, "http.json")
    r = subprocess.run(ctl + ["bench", f"--http=http://127.0.0.1:{hport}/v1", "--scenario=" + scenario,
                              "--out=" + out_http], capture_output=True, text=True, timeout=300)
    check("http.exit", r.returncode == 0, r.stderr)
    res_http = json.load(open(out_http))
    after = requests_total(mport)
    check("http.sent_equals_server_counter", res_http["sent"] == 8 and after - before == 8, (res_http["sent"], after - before))
    check("http.all_ok", all(q["status"] == "OK" and q["completion_tokens"] == 3 for q in res_http["requests"]),
          res_http["requests"][:2])
    check("http.transport", res_http["target"]["transport"] == "http")

    # Malformed scenarios are refused by name.
    for name, body, needle in (("unknown_key", {"mode": "closed", "concurrency": [1], "colour": 1}, "unknown key \"colour\""),
                               ("bad_mode", {"mode": "sideways", "concurrency": [1]}, "\"mode\""),
                               ("bad_levels", {"mode": "closed", "concurrency": [0]}, "\"concurrency\""),
                               ("missing_rates", {"mode": "open"}, "\"rates\" is required"),
                               ("bad_dist", {"mode": "closed", "concurrency": [1], "prompt_tokens": {"dist": "cauchy"}},
                                "prompt_tokens.dist"),
                               ("bad_adapter_key", {"mode": "closed", "concurrency": [1], "adapters": {"pick": "x"}},
                                "adapters.pick")):
        path = os.path.join(work, name + ".json")
        json.dump(body, open(path, "w"))
        r = subprocess.run(ctl + ["bench", "--scenario=" + path, "--out=" + os.path.join(work, "x.json")],
                           capture_output=True, text=True, timeout=60)
        check("scenario." + name, r.returncode == 2 and needle in r.stderr, (r.returncode, r.stderr))
    with open(os.path.join(work, "not_json.json"), "w") as f:
        f.write("{mode: closed")
    r = subprocess.run(ctl + ["bench", "--scenario=" + os.path.join(work, "not_json.json")], capture_output=True, text=True)
    check("scenario.not_json", r.returncode == 2 and "not a JSON object" in r.stderr, r.stderr)

    # The report: PNGs and an index.html that a real browser renders with every chart decoded.
    report = os.path.join(work, "report")
    r = subprocess.run([adapterctl, "bench", "report", out, "--out=" + report], capture_output=True, text=True, timeout=300)
    check("report.exit", r.returncode == 0, r.stderr + r.stdout)
    pngs = sorted(f for f in os.listdir(report) if f.endswith(".png")) if os.path.isdir(report) else []
    check("report.pngs", len(pngs) == 6 and all(open(os.path.join(report, p), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
                                                for p in pngs), pngs)

    def rendered(folder):
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              "--dump-dom", "file://" + os.path.join(folder, "index.html")],
                             capture_output=True, text=True, timeout=120).stdout
        m = re.search(r'<body data-rendered="(\d+)" data-expected="(\d+)"', dom)
        return (int(m.group(1)), int(m.group(2))) if m else None
    got = rendered(report)
    check("report.renders_in_chromium", got == (6, 6), got)
    # The check can fail: a report missing one chart shows one fewer decoded image.
    broken = os.path.join(work, "broken")
    shutil.copytree(report, broken)
    os.remove(os.path.join(broken, pngs[0]))
    got = rendered(broken)
    check("report.missing_chart_detected", got == (5, 6), got)
    r = subprocess.run([adapterctl, "bench", "report", os.path.join(work, "scenario.json"), "--out=" + report],
                       capture_output=True, text=True, timeout=60)
    check("report.refuses_non_results", r.returncode != 0 and "not an adapterctl bench result" in r.stderr, r.stderr)

    check("clean_exit", server.stop() == 0)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
