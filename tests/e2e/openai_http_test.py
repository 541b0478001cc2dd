#!/usr/bin/python3
"""The OpenAI-compatible HTTP front at the wire level (Python's http.client, no OpenAI code):
response and error shapes, SSE framing, HTTP answers equal to the gRPC answers for the same
request (greedy and seeded, base and adapter), the API key, vLLM's adapter endpoints, a slow
reader, a client that hangs up mid-stream (its slot freed), and 64 concurrent streams.
Prints 'N passed, N failed'.

Usage: openai_http_test.py ADAPTERD_BINARY FIXTURES_DIR PROTO_DIR
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterd_process import Adapterd, Checks, load_stubs  # noqa: E402

KEY = "sk-test-0123456789"


def call(port, method, path, body=None, key=KEY, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    text = r.read().decode("utf-8")
    c.close()
    try:
        return r.status, json.loads(text), r.getheader("Content-Type", "")
    except json.JSONDecodeError:
        return r.status, text, r.getheader("Content-Type", "")


def sse(port, body, key=KEY):
    """Returns (status, [parsed data payloads], raw text) of a streamed request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", body.pop("_path"), body=json.dumps(body),
              headers={"Content-Type": "application/json", "Authorization": "Bearer " + key})
    r = c.getresponse()
    raw = r.read().decode("utf-8")
    c.close()
    events = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return r.status, events, raw, r.getheader("Content-Type", "")


def main():
    binary, fixtures, proto = sys.argv[1:4]
    stubs = load_stubs(proto)
    work = tempfile.mkdtemp(prefix="adapterd_http_")
    key_file = os.path.join(work, "key")
    with open(key_file, "w") as f:
        f.write(KEY + "\n")
    os.chmod(key_file, 0o600)
    server = Adapterd(binary, fixtures, ["--preload=qv=lora_qv", "--http_listen=127.0.0.1:0", "--http_admin",
                                         "--api_key_file=" + key_file, "--served_model_name=base-llama",
                                         "--max_batch_rows=16", "--prefix_cache_bytes=67108864"])
    port = server.ports["http"]
    check = Checks()
    channel = stubs.grpc.insecure_channel(server.addr)
    gen = stubs.generation_pb2_grpc.GenerationStub(channel)
    pb = stubs.generation_pb2

    # Models: the base and the adapter, with its parent.
    st, models, _ = call(port, "GET", "/v1/models")
    ids = {m["id"]: m for m in models["data"]}
    check("models.list", st == 200 and models["object"] == "list" and set(ids) == {"base-llama", "qv"}, models)
    check("models.parent", ids.get("qv", {}).get("parent") == "base-llama")

    # Completions equal gRPC, greedy, base and adapter.
    for model, adapter in (("base-llama", ""), ("qv", "qv")):
        st, body, ctype = call(port, "POST", "/v1/completions",
                               {"model": model, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0})
        ref = gen.Generate(pb.GenerateRequest(text="The quick brown fox", adapter=adapter, max_new_tokens=12,
                                              skip_special_tokens=True))
        check(f"completions.{model}.status", st == 200 and ctype.startswith("application/json"), body)
        choice = body["choices"][0]
        check(f"completions.{model}.equals_grpc", choice["text"] == ref.text, (choice["text"], ref.text))
        check(f"completions.{model}.shape", body["object"] == "text_completion" and body["id"].startswith("cmpl-")
              and body["model"] == model and choice["index"] == 0 and choice["finish_reason"] == "length"
              and body["usage"] == {"prompt_tokens": ref.stats.prompt_tokens, "completion_tokens": 12,
                                    "total_tokens": ref.stats.prompt_tokens + 12,
                                    "prompt_tokens_details": {"cached_tokens": 0}}, body)

    # usage.prompt_tokens_details.cached_tokens: a 40-token prompt fills two 16-token blocks of
    # the prefix cache; the same prompt again takes both (32 tokens) and answers the same.
    long_prompt = [1] + [300 + 7 * i for i in range(39)]
    first = call(port, "POST", "/v1/completions", {"model": "qv", "prompt": long_prompt, "max_tokens": 5,
                                                   "temperature": 0, "logprobs": 2})[1]
    again = call(port, "POST", "/v1/completions", {"model": "qv", "prompt": long_prompt, "max_tokens": 5,
                                                   "temperature": 0, "logprobs": 2})[1]
    check("usage.cached_tokens", first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
          and again["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
          and again["usage"]["prompt_tokens"] == 40, (first["usage"], again["usage"]))
    check("usage.cached_answers_equal", first["choices"][0]["text"] == again["choices"][0]["text"]
          and first["choices"][0]["logprobs"] == again["choices"][0]["logprobs"], (first["choices"], again["choices"]))

    # Seeded sampling equals gRPC with the same seed; n > 1 uses seed + i.
    st, body, _ = call(port, "POST", "/v1/completions", {"model": "qv", "prompt": "Once upon", "max_tokens": 10,
                                                         "temperature": 0.8, "top_p": 0.9, "seed": 1234, "n": 3})
    texts = [c["text"] for c in body["choices"]]
    refs = [gen.Generate(pb.GenerateRequest(text="Once upon", adapter="qv", max_new_tokens=10, temperature=0.8,
                                            top_p=0.9, seed=1234 + i, skip_special_tokens=True)).text for i in range(3)]
    check("completions.seeded_n3_equals_grpc", texts == refs, (texts, refs))
    check("completions.n_indexes", [c["index"] for c in body["choices"]] == [0, 1, 2])

    # Several prompts, token-id prompts, echo.
    st, body, _ = call(port, "POST", "/v1/completions", {"prompt": ["a b", [1, 450, 4996]], "max_tokens": 3,
                                                         "temperature": 0, "echo": True})
    check("completions.multi_prompt", st == 200 and len(body["choices"]) == 2 and body["choices"][0]["text"].startswith("a b"),
          body)

    # Stop strings are cut from the text (OpenAI semantics); streaming gives the same text.
    st, full, _ = call(port, "POST", "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0})
    full_text = full["choices"][0]["text"]
    stop = full_text[4:7] if len(full_text) > 8 else None
    if stop:
        st, body, _ = call(port, "POST", "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 12,
                                                             "temperature": 0, "stop": [stop]})
        expect = full_text[:full_text.find(stop)]
        check("completions.stop_cut", body["choices"][0]["text"] == expect and body["choices"][0]["finish_reason"] == "stop",
              (body["choices"][0], expect))
        st, events, raw, _ = sse(port, {"_path": "/v1/completions", "prompt": "The quick brown fox", "max_tokens": 12,
                                        "temperature": 0, "stop": stop, "stream": True})
        streamed = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])
        check("stream.stop_cut", streamed == expect, (streamed, expect))

    # Logprobs: completions' legacy shape, chat's shape.
    st, body, _ = call(port, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 3})
    lp = body["choices"][0]["logprobs"]
    check("completions.logprobs_shape", set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
          and len(lp["tokens"]) == 4 and all(len(t) >= 1 for t in lp["top_logprobs"]), lp)
    ref = gen.Generate(pb.GenerateRequest(text="Hello", max_new_tokens=4, top_logprobs=3))
    check("completions.logprobs_equal_grpc", all(abs(a - t.logprob) < 1e-6 for a, t in zip(lp["token_logprobs"], ref.tokens)))

    # Chat: the template's prompt, streamed and not, equal to gRPC on the rendered prompt.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                                       {"type": "text", "text": "there"}]}]
    st, body, _ = call(port, "POST", "/v1/chat/completions", {"model": "qv", "messages": messages, "max_tokens": 8,
                                                              "temperature": 0, "logprobs": True, "top_logprobs": 2})
    msg = body["choices"][0]["message"]
    check("chat.shape", st == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
          and msg["role"] == "assistant" and isinstance(msg["content"], str), body)
    rendered = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi\nthere [/INST]"
    st, tok, _ = call(port, "POST", "/tokenize", {"model": "qv", "messages": messages})
    ref_ids = gen.Tokenize(pb.TokenizeRequest(text=rendered, add_special_tokens=False)).ids
    check("chat.rendered_prompt", st == 200 and tok["tokens"] == list(ref_ids) and tok["count"] == len(ref_ids), tok)
    # `adapterd chat-template` renders offline what Jinja itself renders (transformers' settings).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jinja"))
    from make_golden import make_env  # noqa: E402
    config = json.load(open(os.path.join(fixtures, "llama_tok", "tokenizer_config.json")))
    conv = [{"role": "system", "content": "Sys ünï"}, {"role": "user", "content": " a "},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    conv_file = os.path.join(work, "messages.json")
    with open(conv_file, "w") as f:
        json.dump(conv, f)
    cli = subprocess.run([binary, "chat-template", "--model_dir=" + os.path.join(fixtures, "llama_tok"),
                          "--messages_json=" + conv_file], capture_output=True, text=True)
    expect = make_env().from_string(config["chat_template"]).render(
        messages=conv, tools=None, documents=None, add_generation_prompt=False, bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")
    check("cli.chat_template_equals_jinja", cli.returncode == 0 and cli.stdout == expect, (cli.stdout, expect, cli.stderr))
    ref = gen.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ref_ids), adapter="qv", max_new_tokens=8,
                                          skip_special_tokens=True))
    check("chat.equals_grpc", msg["content"] == ref.text, (msg["content"], ref.text))
    content = body["choices"][0]["logprobs"]["content"]
    check("chat.logprobs", len(content) == 8 and all(len(c["top_logprobs"]) == 2 and "bytes" in c for c in content))
    st, events, raw, ctype = sse(port, {"_path": "/v1/chat/completions", "model": "qv", "messages": messages,
                                        "max_tokens": 8, "temperature": 0, "stream": True,
                                        "stream_options": {"include_usage": True}})
    check("stream.content_type", ctype.startswith("text/event-stream"), ctype)
    check("stream.framing", raw.endswith("data: [DONE]\n\n") and events[-1] == "[DONE]", raw[-200:])
    chunks = [e for e in events[:-1]]
    check("stream.first_delta_role", chunks[0]["choices"][0]["delta"].get("role") == "assistant")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    check("stream.equals_unary", text == msg["content"], (text, msg["content"]))
    check("stream.finish", [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length")
    check("stream.usage_chunk", chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8, chunks[-1])

    # Errors: OpenAI's error object with the right status.
    def err(name, status, method, path, body=None, key=KEY, raw=None, param=None):
        st, b, _ = call(port, method, path, body, key=key, raw=raw)
        ok = st == status and isinstance(b, dict) and set(b.get("error", {})) == {"message", "type", "param", "code"}
        if param is not None:
            ok = ok and b["error"]["param"] == param
        check("error." + name, ok, (st, b))
    err("bad_key", 401, "POST", "/v1/completions", {"prompt": "x"}, key="wrong")
    err("no_key", 401, "GET", "/v1/models", key=None)
    err("unknown_model", 404, "POST", "/v1/completions", {"model": "nope", "prompt": "x"}, param="model")
    err("bad_json", 400, "POST", "/v1/completions", raw="{not json")
    err("bad_temperature", 400, "POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, param="temperature")
    err("negative_temperature", 400, "POST", "/v1/completions", {"prompt": "x", "temperature": -1})
    err("tools_refused", 400, "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, param="tools")
    err("logit_bias_refused", 400, "POST", "/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, param="logit_bias")
    err("response_format_refused", 400, "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, param="response_format")
    err("n_too_large", 400, "POST", "/v1/completions", {"prompt": "x", "n": 1000}, param="n")
    err("too_long", 400, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, param="prompt")
    err("image_part", 400, "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    err("template_raises", 400, "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    err("huge_body", 413, "POST", "/v1/completions", raw='{"prompt": "' + "x" * (9 << 20) + '"}')
    err("no_endpoint", 404, "GET", "/v1/nothing")
    # Deep nesting is refused before anything recurses over it (it used to overflow the stack).
    deep = '{"messages": [{"role": "user", "content": "hi", "x": ' + "[" * 200000 + "]" * 200000 + '}]}'
    err("deep_json", 400, "POST", "/v1/chat/completions", raw=deep)
    st, b, _ = call(port, "POST", "/v1/completions", {"prompt": "[" * 100 + "{" * 100, "max_tokens": 1})
    check("deep_json.brackets_in_strings_pass", st == 200, (st, b))
    st, _, _ = call(port, "GET", "/health", key=None)
    check("health.open", st == 200)
    st, metrics, _ = call(port, "GET", "/metrics", key=None)
    check("metrics.on_http_port", st == 200 and "adapterd_requests_total" in metrics)

    # Adapter endpoints (vLLM's), behind the key (no admin token configured here).
    st, text, _ = call(port, "POST", "/v1/load_lora_adapter", {"lora_name": "px", "lora_path": "prefix_llama"})
    check("lora.load", st == 200 and "added successfully" in text, (st, text))
    st, models, _ = call(port, "GET", "/v1/models")
    check("lora.listed", "px" in {m["id"] for m in models["data"]})
    st, b, _ = call(port, "POST", "/v1/load_lora_adapter", {"lora_name": "esc", "lora_path": "../../etc"})
    check("lora.escape_refused", st in (400, 403) and "error" in b, (st, b))
    st, b, _ = call(port, "POST", "/v1/load_lora_adapter", {"lora_name": "px", "lora_path": "prefix_llama"})
    check("lora.duplicate_refused", st == 400, (st, b))
    st, b, _ = call(port, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "prefix_llama"}, key="bad")
    check("lora.needs_key", st == 401)
    st, text, _ = call(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "px"})
    check("lora.unload", st == 200 and "removed successfully" in text, (st, text))
    st, b, _ = call(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "px"})
    check("lora.unload_unknown", st == 404, (st, b))

    # A client that hangs up mid-stream frees its slot: the server's running count drops.
    s = socket.create_connection(("127.0.0.1", port))
    payload = json.dumps({"prompt": "hang", "max_tokens": 200, "stream": True, "ignore_eos": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}").encode())
    s.recv(4096)
    s.close()
    freed = False
    for _ in range(100):
        st, m, _ = call(port, "GET", "/metrics", key=None)
        running = [ln for ln in m.splitlines() if ln.startswith("adapterd_running_requests")]
        if running and float(running[0].split()[-1]) == 0:
            freed = True
            break
        time.sleep(0.05)
    check("hangup.frees_slot", freed, running)

    # A slow reader gets everything, and does not hold others back.
    s = socket.create_connection(("127.0.0.1", port))
    payload = json.dumps({"prompt": "slow", "max_tokens": 30, "stream": True, "temperature": 0, "ignore_eos": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n{payload}").encode())
    st, fast, _ = call(port, "POST", "/v1/completions", {"prompt": "fast", "max_tokens": 5, "temperature": 0})
    check("slow_reader.others_served", st == 200)
    got = b""
    while True:
        time.sleep(0.05)
        chunk = s.recv(64)
        if not chunk:
            break
        got += chunk
    s.close()
    check("slow_reader.complete", b"data: [DONE]" in got, got[-100:])

    # 64 concurrent streams, each equal to its own unary answer.
    results = {}

    def worker(i):
        prompt = f"stream number {i % 8}"
        st, events, raw, _ = sse(port, {"_path": "/v1/completions", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                        "stream": True})
        results[i] = (prompt, "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"]),
                      events[-1] == "[DONE]")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    solo = {}
    for p in {r[0] for r in results.values()}:
        st, b, _ = call(port, "POST", "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0})
        solo[p] = b["choices"][0]["text"]
    check("concurrent64.all_done", len(results) == 64 and all(r[2] for r in results.values()))
    check("concurrent64.equal_solo", all(r[1] == solo[r[0]] for r in results.values()),
          [(r, solo[r[0]]) for r in results.values() if r[1] != solo[r[0]]][:3])

    code = server.stop()
    check("clean_exit", code == 0, code)

    # Queue full answers 429; draining answers 503 while in-flight streams finish.
    # One row per step and 15 choices of 250 tokens: the first request runs for seconds and
    # leaves at most four queue slots; a second request with n=5 cannot fit.
    admin_file = os.path.join(work, "admin")
    with open(admin_file, "w") as f:
        f.write("admin-secret-1")
    os.chmod(admin_file, 0o600)
    small = Adapterd(binary, fixtures, ["--http_listen=127.0.0.1:0", "--max_queue=16", "--max_batch_rows=1",
                                        "--grace_period_s=120", "--http_admin", "--admin_token_file=" + admin_file])
    sport = small.ports["http"]
    # With an admin token, the adapter endpoints take it (and nothing else) as Bearer.
    st, _, _ = call(sport, "POST", "/v1/load_lora_adapter", {"lora_name": "t", "lora_path": "lora_qv"}, key=None)
    check("admin_token.required", st == 401, st)
    st, _, _ = call(sport, "POST", "/v1/load_lora_adapter", {"lora_name": "t", "lora_path": "lora_qv"}, key="wrong")
    check("admin_token.wrong", st == 401, st)
    st, text, _ = call(sport, "POST", "/v1/load_lora_adapter", {"lora_name": "t", "lora_path": "lora_qv"},
                       key="admin-secret-1")
    check("admin_token.loads", st == 200 and "added successfully" in text, (st, text))
    long_req = {"prompt": "long", "max_tokens": 250, "ignore_eos": True, "temperature": 0, "stream": True, "n": 15,
                "logprobs": 20}
    streams = []

    def open_stream():
        s = socket.create_connection(("127.0.0.1", sport))
        payload = json.dumps(long_req)
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n{payload}").encode())
        streams.append(s)
    open_stream()
    queued = 0
    for _ in range(200):  # Until the long request's choices wait in the queue.
        m = call(sport, "GET", "/metrics", key=None)[1]
        queued = int(float(next(ln for ln in m.splitlines() if ln.startswith("adapterd_queue_depth")).split()[-1]))
        if queued >= 12:
            break
        time.sleep(0.01)
    st, b, _ = call(sport, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 5}, key=None)
    check("error.queue_full_429", st == 429 and b["error"]["code"] == "rate_limit_exceeded", (st, b))
    small.process.send_signal(15)
    time.sleep(0.1)
    st, _, _ = call(sport, "GET", "/health", key=None)
    check("draining.health_503", st == 503, st)
    st, b, _ = call(sport, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=None)
    check("error.draining_503", st == 503 and "error" in b, (st, b))
    finished = 0
    for s in streams:
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        s.close()
        finished += got.count(b'"finish_reason":"length"') if b"data: [DONE]" in got else 0
    check("draining.in_flight_finish", finished == 15, finished)
    code = small.process.wait(timeout=60)
    check("draining.clean_exit", code == 0, code)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
