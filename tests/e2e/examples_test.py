#!/usr/bin/python3
"""Runs the client examples in deploy/examples against the real adapterd: the Python client
(python3-grpcio) and `buf curl` through server reflection. The same greedy request must give
the same token ids through both. Prints 'N passed, N failed'.

Usage: examples_test.py ADAPTERD_BINARY FIXTURES_DIR BUF_BINARY
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    adapterd, fixtures, buf = sys.argv[1:4]
    server = Adapterd(adapterd, fixtures, ["--preload=qv=lora_qv"])
    check = Checks()
    try:
        addr, admin = server.addr, server.admin_addr

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
        check("clean exit", server.stop() == 0)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
