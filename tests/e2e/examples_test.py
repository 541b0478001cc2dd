#!/usr/bin/python3
"""Runs the client examples in deploy/examples against the real adapterd: the Python client
(python3-grpcio) and `buf curl` through server reflection. The same greedy request must give
the same token ids through both. Prints 'N passed, N failed'.

Usage: examples_test.py ADAPTERD_BINARY FIXTURES_DIR BUF_BINARY
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    adapterd, fixtures, buf = sys.argv[1:4]
    work = tempfile.mkdtemp(prefix="adapterd_examples_")
    port_file = os.path.join(work, "ports.json")
    server = subprocess.Popen(
        [adapterd, "serve", "--model_dir=" + os.path.join(fixtures, "llama_tok"),
         "--adapter_root=" + os.path.join(fixtures, "adapters"), "--listen=127.0.0.1:0",
         "--admin_listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
         "--port_file=" + port_file, "--preload=qv=lora_qv"],
        stderr=open(os.path.join(work, "server.log"), "w"))
    passed = failed = 0

    def check(name, cond, detail=""):
        nonlocal passed, failed
        if cond:
            passed += 1
        else:
            failed += 1
            print(f"FAILED {name} {detail}")

    try:
        deadline = time.time() + 60
        while not os.path.exists(port_file):
            assert server.poll() is None and time.time() < deadline, "adapterd did not start"
            time.sleep(0.02)
        ports = json.load(open(port_file))
        addr, admin = f"127.0.0.1:{ports['listen']}", f"127.0.0.1:{ports['admin']}"

        def python_example(*extra):
            out = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "deploy/examples/python_client.py"),
                                  "--addr", addr, "--admin_addr", admin, "--max_new_tokens", "8", *extra,
                                  "Hello"], check=True, capture_output=True, text=True, timeout=120)
            return json.loads(out.stdout)

        base = python_example()
        adapted = python_example("--adapter", "qv")
        check("python example tokens", len(base["token_ids"]) == 8, str(base))
        check("python example finish", base["finish_reason"] == "FINISH_REASON_LENGTH", str(base))
        check("python example admin", base["adapters"] == ["qv"], str(base))
        check("adapter changes output", adapted["token_ids"] != base["token_ids"])
        out = subprocess.run([os.path.join(ROOT, "deploy/examples/buf_curl.sh"), addr, "Hello"],
                             env=dict(os.environ, BUF=buf), check=True, capture_output=True,
                             text=True, timeout=120)
        reply = json.loads(out.stdout)
        check("buf curl ids", reply.get("tokenIds") == base["token_ids"], out.stdout)
        check("buf curl text", reply.get("text") == base["text"], out.stdout)
    finally:
        server.send_signal(signal.SIGTERM)
        check("clean exit", server.wait(timeout=60) == 0)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
