#!/usr/bin/python3
"""A real Python gRPC client (Debian's python3-grpcio, stubs generated from proto/ with
Debian's protoc and grpc_python_plugin) against the real adapterd binary: health, a streamed and a unary generate, a
tokenize and admin calls. Prints 'N passed, N failed'.

Usage: python_client.py ADAPTERD_BINARY FIXTURES_DIR PROTO_DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks, load_stubs  # noqa: E402


def main():
    binary, fixtures, proto_dir = sys.argv[1:4]
    stubs = load_stubs(proto_dir)
    grpc = stubs.grpc
    admin_pb2, admin_pb2_grpc = stubs.admin_pb2, stubs.admin_pb2_grpc
    generation_pb2, generation_pb2_grpc = stubs.generation_pb2, stubs.generation_pb2_grpc

    server = Adapterd(binary, fixtures, ["--preload=qv=lora_qv"])
    check = Checks()
    try:
        channel = grpc.insecure_channel(server.addr)
        admin_channel = grpc.insecure_channel(server.admin_addr)
        gen_stub = generation_pb2_grpc.GenerationStub(channel)
        admin_stub = admin_pb2_grpc.AdminStub(admin_channel)

        if stubs.health_pb2 is not None:
            health_pb2, health_pb2_grpc = stubs.health_pb2, stubs.health_pb2_grpc
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            check("health", resp.status == health_pb2.HealthCheckResponse.SERVING, str(resp))

        req = generation_pb2.GenerateRequest(text="Hello from Python", adapter="qv",
                                             max_new_tokens=8, ignore_eos=True)
        unary = gen_stub.Generate(req, timeout=60)
        check("unary tokens", len(unary.token_ids) == 8, str(unary))
        check("unary adapter", unary.adapter == "qv")
        chunks = list(gen_stub.GenerateStream(req, timeout=60))
        streamed_ids = [i for c in chunks for i in c.token_ids]
        check("stream equals unary ids", streamed_ids == list(unary.token_ids))
        check("stream equals unary text", "".join(c.text for c in chunks) == unary.text)
        check("stream finish", chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH)
        tok = gen_stub.Tokenize(generation_pb2.TokenizeRequest(text="Hello from Python"), timeout=10)
        check("tokenize", len(tok.ids) == unary.stats.prompt_tokens and tok.ids[0] == 1, str(tok))
        try:
            gen_stub.Generate(generation_pb2.GenerateRequest(text="x", adapter="missing"), timeout=10)
            check("unknown adapter", False, "no error")
        except grpc.RpcError as e:
            check("unknown adapter", e.code() == grpc.StatusCode.NOT_FOUND, str(e.code()))

        loaded = admin_stub.LoadAdapter(admin_pb2.LoadAdapterRequest(name="py", path="prefix_llama"),
                                        timeout=30)
        check("admin load", loaded.loaded and loaded.report.type == "PREFIX_TUNING", str(loaded))
        names = [a.name for a in admin_stub.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10).adapters]
        check("admin list", names == ["py", "qv"], str(names))
        state = admin_stub.GetModelState(admin_pb2.GetModelStateRequest(), timeout=10)
        check("admin state", state.base.ok and state.base.tied[0].same_storage, str(state.base))
        admin_stub.UnloadAdapter(admin_pb2.UnloadAdapterRequest(name="py"), timeout=10)
    finally:
        code = server.stop()
        check("clean exit", code == 0, f"exit code {code}")
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
