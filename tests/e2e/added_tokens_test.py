#!/usr/bin/python3
"""An adapter that adds tokens, served by the real adapterd binary to real gRPC and HTTP clients.

mts_tok grows llama_tok's 32000-id vocabulary by three tokens (modules_to_save copies of
embed_tokens and lm_head, added_tokens.json); mts_tok_json carries the same tensors with a whole
tokenizer.json and is loaded on demand. Requests for either tokenize with the adapter's tokenizer:
the ids equal the Hugging Face tokenizers library's with those tokens added (the golden file
tests/tokenizer/golden/llama2_added.json), over gRPC, over HTTP, and for a request that waited for
its adapter to load. Added ids are valid in prompts and stop_token_ids for the adapter only, and
generated text is decoded with the adapter's tokenizer. Prints 'N passed, N failed'.

Usage: added_tokens_test.py ADAPTERD_BINARY FIXTURES_DIR PROTO_DIR
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks, load_stubs, post  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tokenizer", "golden",
                      "llama2_added.json")


def main():
    binary, fixtures, proto_dir = sys.argv[1:4]
    stubs = load_stubs(proto_dir)
    grpc = stubs.grpc
    g, admin_pb2 = stubs.generation_pb2, stubs.admin_pb2
    golden = json.load(open(GOLDEN))
    cases = golden["cases"]
    check = Checks()
    server = Adapterd(binary, fixtures, ["--load_on_demand", "--preload=mts_tok=mts_tok", "--http_listen=127.0.0.1:0"])
    try:
        stub = stubs.generation_pb2_grpc.GenerationStub(grpc.insecure_channel(server.addr))
        admin = stubs.admin_pb2_grpc.AdminStub(grpc.insecure_channel(server.admin_addr))
        http_port = server.ports["http"]

        for c in cases:
            ids = list(stub.Tokenize(g.TokenizeRequest(text=c["text"], adapter="mts_tok"), timeout=30).ids)
            check(f"Tokenize as the adapter: {c['text']!r}", ids == c["ids"], f"{ids} != {c['ids']}")
        base_ids = list(stub.Tokenize(g.TokenizeRequest(text=cases[1]["text"]), timeout=30).ids)
        check("the base's tokenizer has no added tokens", max(base_ids) < 32000 and base_ids != cases[1]["ids"],
              str(base_ids))
        try:
            stub.Tokenize(g.TokenizeRequest(text="x", adapter="not_loaded"), timeout=30)
            check("Tokenize for an adapter not loaded", False, "no error")
        except grpc.RpcError as e:
            check("Tokenize for an adapter not loaded", e.code() == grpc.StatusCode.NOT_FOUND, e.details())

        def generate(adapter, **prompt):
            return stub.Generate(g.GenerateRequest(adapter=adapter, max_new_tokens=8, ignore_eos=True, **prompt),
                                 timeout=60)

        # Text and the golden ids give the same answer: the text was tokenized by the adapter.
        for c in cases[:4]:
            by_text = generate("mts_tok", text=c["text"])
            by_ids = generate("mts_tok", token_ids=g.TokenIds(ids=c["ids"]))
            check(f"text prompt tokenized by the adapter: {c['text']!r}",
                  list(by_text.token_ids) == list(by_ids.token_ids) and by_text.stats.prompt_tokens == len(c["ids"]),
                  f"{list(by_text.token_ids)} vs {list(by_ids.token_ids)}, {by_text.stats.prompt_tokens} prompt tokens")
            st, detok = post(http_port, "/detokenize", {"model": "mts_tok", "tokens": list(by_text.token_ids)})
            check(f"generated text decoded by the adapter: {c['text']!r}",
                  st == 200 and detok["prompt"] == by_text.text, f"{st} {detok} vs {by_text.text!r}")
        reference = generate("mts_tok", text=cases[0]["text"])
        check("the adapter generates its added ids", any(t >= 32000 for t in reference.token_ids),
              str(list(reference.token_ids)))

        # The first request for mts_tok_json waits for its load, then is tokenized by it.
        on_demand = generate("mts_tok_json", text=cases[0]["text"])
        check("on-demand load: text tokenized by the adapter once loaded",
              list(on_demand.token_ids) == list(reference.token_ids) and on_demand.text == reference.text,
              f"{list(on_demand.token_ids)} vs {list(reference.token_ids)}")

        # Added ids belong to the adapter's requests only.
        out = generate("mts_tok", token_ids=g.TokenIds(ids=[1, 32000, 32002, 5]))
        check("added ids in a prompt for the adapter", len(out.token_ids) == 8, str(out))
        for what, req in [("prompt", dict(token_ids=g.TokenIds(ids=[1, 32000]))),
                          ("stop_token_ids", dict(token_ids=g.TokenIds(ids=[1, 5]), stop_token_ids=[32001]))]:
            try:
                stub.Generate(g.GenerateRequest(max_new_tokens=4, **req), timeout=60)
                check(f"added ids in {what} for the base refused", False, "no error")
            except grpc.RpcError as e:
                check(f"added ids in {what} for the base refused",
                      e.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary [0, 32000)" in e.details(),
                      e.details())
        try:
            generate("mts_tok", token_ids=g.TokenIds(ids=[1, 32003]))
            check("ids past the adapter's vocabulary refused", False, "no error")
        except grpc.RpcError as e:
            check("ids past the adapter's vocabulary refused",
                  e.code() == grpc.StatusCode.INVALID_ARGUMENT and "[0, 32003)" in e.details(), e.details())
        stopped = stub.Generate(g.GenerateRequest(adapter="mts_tok", text=cases[0]["text"], max_new_tokens=8,
                                                  stop_token_ids=[reference.token_ids[0]]), timeout=60)
        check("an added id stops the adapter's request",
              stopped.finish_reason == g.FINISH_REASON_STOP and list(stopped.token_ids) == [reference.token_ids[0]],
              str(stopped))

        # The OpenAI front tokenizes with the adapter too.
        st, body = post(http_port, "/v1/completions", {"model": "mts_tok", "prompt": cases[0]["text"],
                                                        "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        check("http completion tokenized by the adapter",
              st == 200 and body["usage"]["prompt_tokens"] == len(cases[0]["ids"])
              and body["choices"][0]["text"] == reference.text, f"{st} {body}")
        st, body = post(http_port, "/tokenize", {"model": "mts_tok", "prompt": cases[1]["text"]})
        check("http /tokenize as the adapter", st == 200 and body["tokens"] == cases[1]["ids"], f"{st} {body}")

        # The report says what the adapter changes.
        listed = {a.name: a for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=30).adapters}
        report = listed.get("mts_tok")
        check("report: vocabulary, added tokens, saved modules, tokenizer",
              report is not None and report.vocab_size == 32003
              and list(report.added_tokens) == ["<|tool|>", "<|end_tool|>", "ünïcorn"]
              and len(report.saved_modules) == 2 and "replaces the base's" in report.saved_modules[0]
              and report.tokenizer == "the base's tokenizer.json with added_tokens.json", str(report))
        check("server exits cleanly", server.stop() == 0)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
