#!/usr/bin/python3
"""Runs tests/e2e/openai_client.js (the official `openai` npm client) against a real adapterd
with the HTTP front on, an API key and a preloaded LoRA adapter.

Usage: openai_client.py ADAPTERD_BINARY FIXTURES_DIR NPM_DIR
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd  # noqa: E402

KEY = "sk-openai-client-test"


def main():
    binary, fixtures, npm = sys.argv[1:4]
    work = tempfile.mkdtemp(prefix="adapterd_openai_")
    key_file = os.path.join(work, "key")
    with open(key_file, "w") as f:
        f.write(KEY)
    os.chmod(key_file, 0o600)
    server = Adapterd(binary, fixtures, ["--preload=qv=lora_qv", "--http_listen=127.0.0.1:0",
                                         "--api_key_file=" + key_file, "--served_model_name=base-llama"])
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openai_client.js")
    result = subprocess.run(["node", script, npm, str(server.ports["http"]), KEY], timeout=300)
    code = server.stop()
    if code != 0:
        print(f"adapterd exited with {code}")
        return 1
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
