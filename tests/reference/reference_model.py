#!/usr/bin/python3
"""Independent reference for adapterd's forward pass: plain PyTorch written from
transformers' modeling code (modeling_llama.py / modeling_gpt2.py), evaluated on the whole
sequence with a causal mask and no KV cache. It reads the checkpoint files itself.

Usage: reference_model.py MODEL_DIR [MODEL_DIR ...]
Writes MODEL_DIR/reference.json: a seeded prompt, float32 logits of every prompt position,
and a greedy continuation (full recompute per token) with its log-probabilities.
"""
import glob
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import safetensors_io  # noqa: E402

GREEDY_TOKENS = 8


def load_state(model_dir):
    state = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        state.update(safetensors_io.load(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(cfg, dim):
    base = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.get("rope_scaling") or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv_l)
    return inv


def llama_logits(cfg, w, ids, prefix=None, soft=None, kv_dtype=None):
    """Logits of every real token. `prefix`: per-layer (K, V) [kv_heads, P, d] past entries
    (prefix tuning, no rotary on them); `soft`: [S, H] embeddings prepended (prompt tuning);
    `kv_dtype`: keys (after rotary) and values rounded to that dtype, as a KV cache kept in it
    stores them (a query reads its own key and value from the cache too)."""
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    S = 0 if soft is None else soft.shape[0]
    P = 0 if prefix is None else prefix[0][0].shape[1]
    T = len(ids) + S
    qwen = cfg["model_type"] in ("qwen2", "qwen3")
    qk_norm = cfg["model_type"] == "qwen3"  # modeling_qwen3: RMSNorm per head of q and k
    window = None
    if cfg["model_type"] == "mistral":
        window = cfg.get("sliding_window", 4096)
    if qwen and cfg.get("use_sliding_window"):
        raise NotImplementedError("qwen sliding window fixture")

    def rms(x, weight):
        v = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(v + eps))

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        if name + ".bias" in w:
            y = y + w[name + ".bias"]
        return y

    pos = torch.arange(P, P + T)  # cache_position starts after the prefix
    inv = rope_inv_freq(cfg, d)
    freqs = pos[:, None].float() * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]  # [1, T, d]
    qpos, kpos = pos[:, None], torch.arange(P + T)[None, :]
    mask = torch.zeros(T, P + T).masked_fill(kpos > qpos, float("-inf"))
    if window is not None:
        mask = mask.masked_fill(kpos <= qpos - window, float("-inf"))

    x = w["model.embed_tokens.weight"][torch.tensor(ids, dtype=torch.long)]
    if soft is not None:
        x = torch.cat([soft, x], dim=0)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(T, nh, d).transpose(0, 1)
        k = lin(h, p + "self_attn.k_proj").view(T, nkv, d).transpose(0, 1)
        v = lin(h, p + "self_attn.v_proj").view(T, nkv, d).transpose(0, 1)
        if qk_norm:  # over head_dim, before the rotation
            q = rms(q, w[p + "self_attn.q_norm.weight"])
            k = rms(k, w[p + "self_attn.k_norm.weight"])
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_dtype is not None:
            k, v = k.to(kv_dtype).float(), v.to(kv_dtype).float()
        if prefix is not None:
            k = torch.cat([prefix[layer][0], k], dim=1)
            v = torch.cat([prefix[layer][1], v], dim=1)
        rep = nh // nkv  # repeat_kv
        k = k[:, None].expand(nkv, rep, P + T, d).reshape(nh, P + T, d)
        v = v[:, None].expand(nkv, rep, P + T, d).reshape(nh, P + T, d)
        s = q @ k.transpose(1, 2) * d ** -0.5 + mask
        a = torch.softmax(s, dim=-1, dtype=torch.float32) @ v
        x = x + lin(a.transpose(0, 1).reshape(T, nh * d), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"),
                    p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight")
    if head is None and cfg.get("tie_word_embeddings", False):
        head = w["model.embed_tokens.weight"]
    return (x @ head.T)[S:]


def gpt2_logits(cfg, w, ids, prefix=None, soft=None):
    if not any(k.startswith("transformer.") for k in w):
        w = {("transformer." + k if k != "lm_head.weight" else k): v for k, v in w.items()}
    E, nh = cfg["n_embd"], cfg["n_head"]
    d = E // nh
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    S = 0 if soft is None else soft.shape[0]
    P = 0 if prefix is None else prefix[0][0].shape[1]
    T = len(ids) + S

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (E,), w[p + ".weight"], w[p + ".bias"], eps)

    def conv1d(x, p):  # transformers.pytorch_utils.Conv1D: addmm(bias, x, weight)
        return torch.addmm(w[p + ".bias"], x, w[p + ".weight"])

    def gelu_new(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    t = "transformer."
    x = w[t + "wte.weight"][torch.tensor(ids, dtype=torch.long)]
    if soft is not None:
        x = torch.cat([soft, x], dim=0)
    x = x + w[t + "wpe.weight"][torch.arange(P, P + T)]
    causal = torch.arange(P + T)[None, :] <= torch.arange(P, P + T)[:, None]
    for layer in range(cfg["n_layer"]):
        p = f"{t}h.{layer}."
        qkv = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = (z.view(T, nh, d).transpose(0, 1) for z in qkv.split(E, dim=-1))
        if prefix is not None:
            k = torch.cat([prefix[layer][0], k], dim=1)
            v = torch.cat([prefix[layer][1], v], dim=1)
        s = q @ k.transpose(-1, -2) / (v.size(-1) ** 0.5)
        s = torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min))
        a = torch.softmax(s, dim=-1) @ v
        x = x + conv1d(a.transpose(0, 1).reshape(T, E), p + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    x = ln(x, t + "ln_f")
    return (x @ w.get("lm_head.weight", w[t + "wte.weight"]).T)[S:]


def logits_of(cfg, w, ids, prefix=None, soft=None):
    if cfg["architectures"][0] == "GPT2LMHeadModel":
        return gpt2_logits(cfg, w, ids, prefix, soft)
    return llama_logits(cfg, w, ids, prefix, soft)


def peft_prompt_learning(adapter_dir):
    """Returns (prefix, soft) built from a PEFT prompt-learning adapter exactly as PEFT's
    get_prompt does (prefix: view/permute/split of prompt_embeddings)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    emb = safetensors_io.load(os.path.join(adapter_dir, "adapter_model.safetensors"))[
        "prompt_embeddings"].float()
    if acfg["peft_type"] == "PREFIX_TUNING":
        nvt, L, nh = acfg["num_virtual_tokens"], acfg["num_layers"], acfg["num_attention_heads"]
        D = acfg["token_dim"]
        p = emb[None].view(1, nvt, L * 2, nh, D // nh).permute(2, 0, 3, 1, 4).split(2)
        return [(kv[0][0], kv[1][0]) for kv in p], None
    return None, emb


def reference(model_dir, adapter_dir=None, out_dir=None):
    """Writes reference.json into `out_dir` (default: the model or adapter folder)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    w = load_state(model_dir)
    vocab = cfg["vocab_size"]
    prefix = soft = None
    if adapter_dir is not None:
        prefix, soft = peft_prompt_learning(adapter_dir)
    out_dir = out_dir or adapter_dir or model_dir
    gen = torch.Generator().manual_seed(sum(map(ord, os.path.basename(out_dir))))
    prompt = torch.randint(3, vocab, (12,), generator=gen).tolist()
    with torch.no_grad():
        logits = logits_of(cfg, w, prompt, prefix, soft)
        ids, greedy, logprobs = list(prompt), [], []
        for _ in range(GREEDY_TOKENS):
            last = logits_of(cfg, w, ids, prefix, soft)[-1]
            tok = int(torch.argmax(last))
            greedy.append(tok)
            logprobs.append(float(torch.log_softmax(last, -1)[tok]))
            ids.append(tok)
    out = {"prompt": prompt, "logits": logits.tolist(), "greedy": greedy,
           "greedy_logprobs": logprobs}
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(out, f)


def main():
    for d in sys.argv[1:]:
        reference(d)
        print(f"reference {os.path.basename(d)}")


if __name__ == "__main__":
    main()
