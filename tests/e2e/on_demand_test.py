#!/usr/bin/python3
"""Adapters loaded on demand, against the real adapterd binary and a real gRPC client.

A reference server loads each adapter explicitly and answers every prompt alone; the server
under test (--load_on_demand, a resident set of 2 with one pinned adapter) must give exactly
the same answers when requests name adapters that are only folders on disk: 16 concurrent
first requests share one load; a broken adapter answers all its waiters with its own error
(remembered, not re-read) while base requests carry on; churn over more adapters than fit
evicts only idle, unpinned adapters and changes no answer. A weighted mix with a part on disk
waits for it and answers as the reference server's mix; mixes that cannot be served are refused
by name. Prints 'N passed, N failed'.

Usage: on_demand_test.py ADAPTERD_BINARY FIXTURES_DIR PROTO_DIR
"""
import json
import os
import subprocess
import sys
import threading
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks, load_stubs, post  # noqa: E402

ADAPTERS = ["lora_qv", "lora_all_rslora", "prefix_llama"]  # Folders under FIXTURES/adapters.
PROMPTS = ["The first prompt", "Another one, longer than the first", "x"]
MIX = [("pinned", 0.5), ("lora_qv", -0.75)]  # A weighted mix: a pinned adapter and one on disk.


def metric(port, name, labels=""):
    """Sum of the samples of `name` whose labels include every `k="v"` in `labels`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if labels and not all(part in line for part in labels.split(",")):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    binary, fixtures, proto_dir = sys.argv[1:4]
    stubs = load_stubs(proto_dir)
    grpc = stubs.grpc
    g, admin_pb2 = stubs.generation_pb2, stubs.admin_pb2
    check = Checks()

    def request(prompt, adapter, seed=0):
        # Greedy and seeded sampling both must match the reference.
        if seed:
            return g.GenerateRequest(text=prompt, adapter=adapter, max_new_tokens=6, ignore_eos=True,
                                     temperature=0.8, top_k=20, seed=seed)
        return g.GenerateRequest(text=prompt, adapter=adapter, max_new_tokens=6, ignore_eos=True)

    def mix_request(prompt, parts):
        return g.GenerateRequest(text=prompt, adapters=[g.WeightedAdapter(name=n, weight=w) for n, w in parts],
                                 max_new_tokens=6, ignore_eos=True)

    # Reference: every adapter loaded by hand, each request alone.
    ref_server = Adapterd(binary, fixtures, [f"--preload={','.join(a + '=' + a for a in ADAPTERS)},pinned=lora_regex"])
    reference = {}
    try:
        stub = stubs.generation_pb2_grpc.GenerationStub(grpc.insecure_channel(ref_server.addr))
        for a in ADAPTERS:
            for i, p in enumerate(PROMPTS):
                for seed in (0, 7 + i):
                    out = stub.Generate(request(p, a, seed), timeout=60)
                    reference[(a, p, seed)] = list(out.token_ids)
                    reference[(a, p, seed, "text")] = out.text
        for parts in (MIX, [("lora_qv", 1.0)]):
            out = stub.Generate(mix_request(PROMPTS[1], parts), timeout=60)
            reference[("mix", tuple(parts))] = list(out.token_ids)
            reference[("mix", tuple(parts), "text")] = out.text
            reference[("mix", tuple(parts), "adapter")] = out.adapter
    finally:
        ref_server.stop()
    check("a mix of one adapter at weight 1 answers as the adapter",
          reference[("mix", (("lora_qv", 1.0),))] == reference[("lora_qv", PROMPTS[1], 0)])
    check("a mix answers otherwise than its parts", all(
        reference[("mix", tuple(MIX))] != reference[(a, PROMPTS[1], 0)] for a in ("lora_qv",)), str(reference))
    check("a mix is named by its parts",
          reference[("mix", tuple(MIX), "adapter")] == "mix(pinned*0.5+lora_qv*-0.75)",
          reference[("mix", tuple(MIX), "adapter")])

    server = Adapterd(binary, fixtures, ["--load_on_demand", "--max_adapters=2", "--adapter_failure_ttl_s=60",
                                         "--preload=pinned=lora_regex", "--max_batch_rows=8",
                                         "--http_listen=127.0.0.1:0"])
    try:
        channel = grpc.insecure_channel(server.addr)
        stub = stubs.generation_pb2_grpc.GenerationStub(channel)
        admin = stubs.admin_pb2_grpc.AdminStub(grpc.insecure_channel(server.admin_addr))
        port = server.metrics_port

        # 16 concurrent first requests for one adapter: one load, every answer equal.
        results = [None] * 16
        def first(i):
            p = PROMPTS[i % len(PROMPTS)]
            seed = 0 if i % 2 == 0 else 7 + i % len(PROMPTS)
            try:
                results[i] = (p, seed, list(stub.Generate(request(p, "lora_qv", seed), timeout=60).token_ids))
            except grpc.RpcError as e:
                results[i] = (p, seed, e)
        threads = [threading.Thread(target=first, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        same = all(not isinstance(r[2], Exception) and r[2] == reference[("lora_qv", r[0], r[1])] for r in results)
        check("16 first requests equal the explicit load's answers", same, str(results))
        loads = metric(port, "adapterd_adapter_loads_total", 'trigger="on_demand",result="loaded"')
        check("16 first requests cause one load", loads == 1, str(loads))
        check("waits were measured", metric(port, "adapterd_adapter_wait_seconds_count") >= 1)

        # The OpenAI front: `model` may name an adapter folder that is not loaded yet.
        http_port = server.ports["http"]
        completion = {"model": "lora_all_rslora", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0,
                      "ignore_eos": True}
        st, body = post(http_port, "/v1/completions", completion)
        check("http first request on demand", st == 200 and body["choices"][0]["text"]
              == reference[("lora_all_rslora", PROMPTS[0], 0, "text")], f"{st} {body}")
        st, body = post(http_port, "/v1/completions", dict(completion, model="no_such_adapter"))
        check("http unknown folder is 404 model_not_found", st == 404 and body["error"]["code"] == "model_not_found"
              and body["error"]["param"] == "model", f"{st} {body}")
        st, body = post(http_port, "/v1/completions", dict(completion, model="bad_missing_b", stream=True))
        check("http stream for a broken adapter answers its error before streaming",
              st == 400 and "lora_B" in body["error"]["message"], f"{st} {body}")

        # The first stream for an adapter on disk works too (and matches).
        chunks = list(stub.GenerateStream(request(PROMPTS[1], "prefix_llama"), timeout=60))
        ids = [i for c in chunks for i in c.token_ids]
        check("stream on demand", ids == reference[("prefix_llama", PROMPTS[1], 0)], str(ids))

        # A weighted mix whose parts are one resident adapter and one on disk (evicted by now):
        # it waits for the load and answers as the reference server with both loaded.
        out = stub.Generate(mix_request(PROMPTS[1], MIX), timeout=60)
        check("mix with a part loaded on demand", list(out.token_ids) == reference[("mix", tuple(MIX))]
              and out.adapter == reference[("mix", tuple(MIX), "adapter")], str(out))
        ctl = subprocess.run([os.path.join(os.path.dirname(binary), "adapterctl"), "--addr=" + server.addr, "generate",
                              "--prompt=" + PROMPTS[1], "--max_new_tokens=6", "--ignore_eos", "--json",
                              "--mix=" + ",".join(f"{n}={w}" for n, w in MIX)], capture_output=True, text=True,
                             timeout=60)
        ids = [i for line in ctl.stdout.splitlines() for i in json.loads(line).get("token_ids", [])]
        check("adapterctl generate --mix", ctl.returncode == 0 and ids == reference[("mix", tuple(MIX))],
              ctl.stdout + ctl.stderr)
        st, body = post(http_port, "/v1/completions", {
            "model": "llama_tok", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "adapters": [{"name": n, "weight": w} for n, w in MIX]})
        check("http mix (the adapters extension)", st == 200 and body["choices"][0]["text"]
              == reference[("mix", tuple(MIX), "text")], f"{st} {body}")
        st, body = post(http_port, "/v1/completions", {"model": "lora_qv", "prompt": "x",
                                                       "adapters": [{"name": "pinned", "weight": 1}]})
        check("http mix over an adapter is refused", st == 400 and body["error"]["param"] == "adapters", f"{st} {body}")
        for parts, code, words in [
                ([("pinned", 1.0), ("prefix_llama", 0.5)], grpc.StatusCode.INVALID_ARGUMENT,
                 "adapter 'prefix_llama' is PREFIX_TUNING; a weighted mix takes LoRA adapters only"),
                ([("pinned", 1.0), ("no_such_folder", 0.5)], grpc.StatusCode.NOT_FOUND, "no_such_folder"),
                ([("pinned", 1.0), ("pinned", 0.5)], grpc.StatusCode.INVALID_ARGUMENT, "'pinned' is named twice"),
                ([("pinned", float("nan"))], grpc.StatusCode.INVALID_ARGUMENT, "adapters[0].weight is not finite"),
                ([(f"a{i}", 1.0) for i in range(9)], grpc.StatusCode.INVALID_ARGUMENT, "at most 8 adapters")]:
            try:
                stub.Generate(mix_request("x", parts), timeout=60)
                check(f"mix refused: {words}", False, "no error")
            except grpc.RpcError as e:
                check(f"mix refused: {words}", e.code() == code and words in e.details(), f"{e.code()} {e.details()}")
        both = g.GenerateRequest(text="x", adapter="pinned", adapters=[g.WeightedAdapter(name="pinned", weight=1)])
        try:
            stub.Generate(both, timeout=60)
            check("adapter and adapters together refused", False, "no error")
        except grpc.RpcError as e:
            check("adapter and adapters together refused", e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details())

        # A broken adapter: every waiter gets its error; base requests are unaffected.
        errors, base = [], []
        def bad():
            try:
                stub.Generate(request("x", "bad_rank"), timeout=60)
                errors.append(None)
            except grpc.RpcError as e:
                errors.append((e.code(), e.details()))
        def plain():
            base.append(len(stub.Generate(request(PROMPTS[0], ""), timeout=60).token_ids))
        threads = [threading.Thread(target=bad) for _ in range(8)] + [threading.Thread(target=plain) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = {e[0] if e else None for e in errors}
        details = {e[1] if e else None for e in errors}
        check("failed load answers every waiter with its code", codes == {grpc.StatusCode.FAILED_PRECONDITION},
              str(errors))
        check("failed load answers every waiter with its message",
              len(details) == 1 and "rank" in next(iter(details)), str(details))
        check("base requests unaffected", base == [6, 6, 6, 6], str(base))
        refused = metric(port, "adapterd_adapter_loads_total", 'trigger="on_demand",result="refused"')
        try:
            stub.Generate(request("x", "bad_rank"), timeout=10)
            check("failure remembered", False, "no error")
        except grpc.RpcError as e:
            check("failure remembered", e.details() in details and e.code() == grpc.StatusCode.FAILED_PRECONDITION,
                  e.details())
        check("failure not re-read", metric(port, "adapterd_adapter_loads_total",
                                             'trigger="on_demand",result="refused"') == refused)
        states = {s.name: s for s in admin.ListAdapters(admin_pb2.ListAdaptersRequest(include_on_disk=True),
                                                         timeout=10).states}
        st = states.get("bad_rank")
        check("failed state listed", st is not None and st.state == admin_pb2.AdapterState.FAILED
              and "FAILED_PRECONDITION" in st.error and 0 < st.retry_after_seconds <= 60, str(st))
        check("on-disk folders listed", "lora_all_rslora" in states
              and states["lora_all_rslora"].state == admin_pb2.AdapterState.ON_DISK, str(list(states)))

        # Names that are not folders, or not plain names: NOT_FOUND, nothing read.
        for name in ("no_such_adapter", "..", ".hidden", "a/b"):
            try:
                stub.Generate(request("x", name), timeout=10)
                check(f"unknown {name!r}", False, "no error")
            except grpc.RpcError as e:
                check(f"unknown {name!r}", e.code() == grpc.StatusCode.NOT_FOUND, f"{e.code()} {e.details()}")

        # Churn: 3 adapters through 1 free slot (2 resident, 1 pinned), concurrently, twice over.
        # Every answer equals the reference; the pinned adapter stays resident.
        churn = []
        def worker(k):
            for j in range(6):
                a = ADAPTERS[(k + j) % len(ADAPTERS)]
                p = PROMPTS[(k * 7 + j) % len(PROMPTS)]
                seed = 0 if (k + j) % 2 == 0 else 7 + (k * 7 + j) % len(PROMPTS)
                try:
                    churn.append((a, p, seed, list(stub.Generate(request(p, a, seed), timeout=120).token_ids)))
                except grpc.RpcError as e:
                    churn.append((a, p, seed, e))
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wrong = [c for c in churn if isinstance(c[3], Exception) or c[3] != reference[(c[0], c[1], c[2])]]
        check("churn: every answer equals the one computed alone", not wrong and len(churn) == 36, str(wrong[:3]))
        evictions = metric(port, "adapterd_adapter_evictions_total")
        check("churn evicted idle adapters", evictions >= 2, str(evictions))
        listed = admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10)
        states = {s.name: s for s in listed.states}
        check("pinned adapter survives", "pinned" in states and states["pinned"].pinned
              and states["pinned"].state == admin_pb2.AdapterState.RESIDENT, str(states.get("pinned")))
        resident = [s for s in listed.states if s.state == admin_pb2.AdapterState.RESIDENT]
        check("resident set within --max_adapters", len(resident) <= 2, str(resident))
        hot = [s for s in resident if s.name != "pinned"]
        if hot:  # A request for a resident adapter counts a hit (waiters of its load do not).
            stub.Generate(request("x", hot[0].name), timeout=60)
            after = {s.name: s for s in admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10).states}
            check("hits counted", after[hot[0].name].hits == hot[0].hits + 1
                  and after[hot[0].name].last_used_unix_seconds > hot[0].last_used_unix_seconds, str(after))
        else:
            check("hits counted", False, str(resident))
        model = admin.GetModelState(admin_pb2.GetModelStateRequest(), timeout=10)
        check("model state says on demand", model.load_on_demand and model.adapter_bytes > 0
              and len(model.adapter_states) >= 2, str(model.adapter_states))
        check("loads by trigger", metric(port, "adapterd_adapter_loads_total", 'trigger="preload",result="loaded"') == 1)
        check("no request waits now", metric(port, "adapterd_adapter_waiting_requests") == 0)
        check("successful requests counted",
              metric(port, "adapterd_requests_total", 'code="OK"') >= 16 + 1 + 4 + 36 + 2)

        # An admin load may pin; the pinned adapter is never evicted by later churn.
        admin.UnloadAdapter(admin_pb2.UnloadAdapterRequest(name="pinned"), timeout=10)
        admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name="lora_all_rslora", path="lora_all_rslora", pin=True,
                                                       replace=True), timeout=30)
        for a in ADAPTERS:
            out = list(stub.Generate(request(PROMPTS[2], a), timeout=60).token_ids)
            check(f"after pin: {a}", out == reference[(a, PROMPTS[2], 0)], str(out))
        states = {s.name: s for s in admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10).states}
        check("admin pin survives churn", states.get("lora_all_rslora") is not None
              and states["lora_all_rslora"].pinned, str(states))
        check("server exits cleanly", server.stop() == 0)
        server = None
    finally:
        if server is not None:
            server.stop()

    # --adapter_dtype bfloat16: float32 factors are rounded once at load (half the bytes), and
    # the load report says so; an unknown value is refused before anything loads.
    bad = subprocess.run([binary, "serve", "--model_dir=" + os.path.join(fixtures, "llama_tok"),
                          "--adapter_dtype=float8"], capture_output=True, text=True, timeout=60)
    check("unknown --adapter_dtype refused", bad.returncode == 2 and "--adapter_dtype must be auto or bfloat16"
          in bad.stderr, (bad.returncode, bad.stderr[-300:]))
    sizes = {}
    for dtype in ("auto", "bfloat16"):
        server = Adapterd(binary, fixtures, [f"--adapter_dtype={dtype}", "--load_on_demand"])
        try:
            admin = stubs.admin_pb2_grpc.AdminStub(grpc.insecure_channel(server.admin_addr))
            stub = stubs.generation_pb2_grpc.GenerationStub(grpc.insecure_channel(server.addr))
            r = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name="q", path="lora_qv"), timeout=30)
            sizes[dtype] = r.report.bytes
            check(f"{dtype}: report says how factors are held",
                  ("rounded from their file's dtype" in r.report.compute_dtype) == (dtype == "bfloat16"),
                  r.report.compute_dtype)
            out = stub.Generate(request(PROMPTS[0], "lora_all_rslora"), timeout=60)  # On demand too.
            check(f"{dtype}: on-demand load generates", len(out.token_ids) == 6, str(out))
            states = {s.name: s for s in admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=10).states}
            sizes[dtype + " on demand"] = states["lora_all_rslora"].bytes
        finally:
            server.stop()
    check("bfloat16 factors take half the bytes", sizes["auto"] == 2 * sizes["bfloat16"]
          and sizes["auto on demand"] == 2 * sizes["bfloat16 on demand"], str(sizes))
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
