"""Shared by the Python end-to-end tests: start the real adapterd on the fixtures with every
listener on port 0, wait for its port file, and count checks the way ctest's summary reads."""
import json
import os
import signal
import subprocess
import tempfile
import time


class Adapterd:
    """adapterd serve on FIXTURES/llama_tok with FIXTURES/adapters as adapter root."""

    def __init__(self, binary, fixtures, extra=()):
        self.work = tempfile.mkdtemp(prefix="adapterd_e2e_")
        port_file = os.path.join(self.work, "ports.json")
        self.process = subprocess.Popen(
            [binary, "serve", "--model_dir=" + os.path.join(fixtures, "llama_tok"),
             "--adapter_root=" + os.path.join(fixtures, "adapters"), "--listen=127.0.0.1:0",
             "--admin_listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
             "--port_file=" + port_file, *extra],
            stderr=open(os.path.join(self.work, "server.log"), "w"))
        deadline = time.time() + 60
        while not os.path.exists(port_file):
            assert self.process.poll() is None, "adapterd exited before serving"
            assert time.time() < deadline, "adapterd did not start in 60 s"
            time.sleep(0.02)
        self.ports = json.load(open(port_file))
        self.addr = f"127.0.0.1:{self.ports['listen']}"
        self.admin_addr = f"127.0.0.1:{self.ports['admin']}"

    def stop(self):
        """Sends SIGTERM and returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


class Checks:
    """Counts named checks and prints 'N passed, N failed' at the end."""

    def __init__(self):
        self.passed = self.failed = 0

    def __call__(self, name, cond, detail=""):
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAILED {name} {detail}")

    def summary(self):
        print(f"{self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0
