"""Shared by the Python end-to-end tests: start the real adapterd on the fixtures with every
listener on port 0, wait for its port file, and count checks the way ctest's summary reads."""
import http.client
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types


def load_stubs(proto_dir):
    """Generates the Python gRPC stubs of proto/ (and grpc.health.v1 when Debian's grpc-proto
    has it) into a temp folder and imports them. Returns a namespace with grpc,
    generation_pb2(_grpc), admin_pb2(_grpc) and health_pb2(_grpc) (None without grpc-proto)."""
    work = tempfile.mkdtemp(prefix="adapterd_stubs_")
    gen = os.path.join(work, "gen")
    os.makedirs(gen)

    # Debian's protoc (3.21, which knows proto3 `optional`) with grpc_python_plugin; the
    # protoc bundled in python3-grpc-tools is 3.5 and does not.
    def protoc(include, protos):
        subprocess.run(["protoc", "-I" + include, "--python_out=" + gen, "--grpc_python_out=" + gen,
                        "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin", *protos],
                       check=True)
    protoc(proto_dir, ["adapterd/v1/generation.proto", "adapterd/v1/admin.proto"])
    # grpc.health.v1 stubs from Debian's grpc-proto copy, flat so they don't shadow `grpc`.
    health = "/usr/share/grpc-proto/grpc/health/v1/health.proto"
    if os.path.exists(health):
        health_dir = os.path.join(work, "health")
        os.makedirs(health_dir)
        with open(health) as src, open(os.path.join(health_dir, "health.proto"), "w") as dst:
            dst.write(src.read())
        protoc(health_dir, ["health.proto"])
    sys.path.insert(0, gen)
    stubs = types.SimpleNamespace(grpc=importlib.import_module("grpc"))
    for name in ("generation_pb2", "generation_pb2_grpc", "admin_pb2", "admin_pb2_grpc"):
        setattr(stubs, name, importlib.import_module("adapterd.v1." + name))
    for name in ("health_pb2", "health_pb2_grpc"):
        setattr(stubs, name, importlib.import_module(name) if os.path.exists(health) else None)
    return stubs


class Adapterd:
    """adapterd serve on FIXTURES/llama_tok with FIXTURES/adapters as adapter root."""

    def __init__(self, binary, fixtures, extra=(), host="127.0.0.1"):
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
        self.addr = f"{host}:{self.ports['listen']}"
        self.admin_addr = f"{host}:{self.ports['admin']}"
        self.metrics_port = self.ports["metrics"]

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


def post(port, path, body):
    """A JSON POST to the OpenAI front on `port`; returns (status, parsed body or the raw text)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode("utf-8")
    c.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text
