#!/usr/bin/python3
"""Example: call adapterd from Python with Debian's python3-grpcio.

Generates the stubs from proto/ with Debian's protoc and grpc_python_plugin (the protoc inside
python3-grpc-tools is 3.5 and rejects proto3 `optional`), streams a generation and prints the
text as it arrives, then lists the adapters through the admin API and prints the result as
JSON.

Usage: /usr/bin/python3 deploy/examples/python_client.py [--addr 127.0.0.1:50051]
         [--admin_addr 127.0.0.1:50052] [--adapter NAME] [--max_new_tokens N] PROMPT
The admin token, if the server has one, is read from ADAPTERD_ADMIN_TOKEN.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def stubs():
    out = tempfile.mkdtemp(prefix="adapterd_stubs_")
    subprocess.run(["protoc", "-I" + PROTO_DIR, "--python_out=" + out, "--grpc_python_out=" + out,
                    "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                    "adapterd/v1/generation.proto", "adapterd/v1/admin.proto"], check=True)
    sys.path.insert(0, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--admin_addr", default="127.0.0.1:50052")
    ap.add_argument("--adapter", default="")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("prompt")
    args = ap.parse_args()
    stubs()
    import grpc
    from adapterd.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

    generation = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(args.addr))
    request = generation_pb2.GenerateRequest(text=args.prompt, adapter=args.adapter,
                                             max_new_tokens=args.max_new_tokens, ignore_eos=True)
    ids, text, finish = [], "", None
    for chunk in generation.GenerateStream(request, timeout=120):
        sys.stderr.write(chunk.text)
        sys.stderr.flush()
        text += chunk.text
        ids.extend(chunk.token_ids)
        if chunk.finish_reason:
            finish = generation_pb2.FinishReason.Name(chunk.finish_reason)
    sys.stderr.write("\n")

    token = os.environ.get("ADAPTERD_ADMIN_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(args.admin_addr))
    adapters = admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10, metadata=metadata)
    print(json.dumps({"text": text, "token_ids": ids, "finish_reason": finish,
                      "adapters": [a.name for a in adapters.adapters]}))


if __name__ == "__main__":
    main()
