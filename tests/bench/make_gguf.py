#!/usr/bin/python3
"""Writes a Llama-family safetensors checkpoint as GGUF (F16 or Q8_0) so that llama.cpp can run the
same weights adapterd serves, for side-by-side speed figures (tests/bench/llama_cpp_bench.mjs).
Neither llama.cpp's converter (it needs PyPI's `gguf`) nor node-llama-cpp reads safetensors, and
there is no PyPI here, so this writes the container itself.

It does what llama.cpp's convert_hf_to_gguf.py does for LlamaForCausalLM:
  - tensor names: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,
    ffn_gate,ffn_up,ffn_down}, output_norm, output (a tied model gets no output tensor);
  - q_proj and k_proj rows permuted from transformers' rotate-half layout to llama.cpp's
    interleaved one (LlamaModel.permute);
  - 1-D tensors in F32; 2-D in F16, or Q8_0 (blocks of 32: d = max|x| / 127 stored as F16,
    q = roundf(x / d), as ggml's quantize_row_q8_0_ref);
  - the llama.* hyperparameters and a SentencePiece-style vocabulary from tokenizer.json
    (tokens in id order, scores -id, byte tokens <0xNN> typed BYTE, special tokens CONTROL).
Usage: make_gguf.py MODEL_DIR OUT.gguf f16|q8_0
"""
import glob
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import safetensors_io  # noqa: E402

GGUF_MAGIC = 0x46554747
ALIGN = 32
T_UINT32, T_INT32, T_FLOAT32, T_STRING, T_ARRAY = 4, 5, 6, 8, 9
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
FILE_TYPE = {"f16": 1, "q8_0": 7}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gguf_string(key) + struct.pack("<I", vtype)
    if vtype == T_STRING:
        return out + gguf_string(value)
    if vtype == T_ARRAY:
        item_type, items = value
        out += struct.pack("<IQ", item_type, len(items))
        if item_type == T_STRING:
            return out + b"".join(gguf_string(i) for i in items)
        fmt = {T_INT32: "<i", T_FLOAT32: "<f", T_UINT32: "<I"}[item_type]
        return out + b"".join(struct.pack(fmt, i) for i in items)
    fmt = {T_UINT32: "<I", T_INT32: "<i", T_FLOAT32: "<f"}[vtype]
    return out + struct.pack(fmt, value)


def permute(w, n_head):
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def q8_0(w):
    x = w.float().numpy().reshape(-1, 32)
    d = np.abs(x).max(axis=1) / 127.0
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    q = np.clip(np.trunc(x * inv[:, None] + np.copysign(0.5, x)), -127, 127).astype(np.int8)  # roundf
    blocks = np.empty(x.shape[0], dtype=[("d", "<f2"), ("q", "i1", 32)])
    blocks["d"] = d.astype(np.float16)
    blocks["q"] = q
    return blocks.tobytes()


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in FILE_TYPE:
        print(__doc__)
        return 2
    model_dir, out_path, kind = sys.argv[1:]
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    vocab = cfg["vocab_size"]

    tokens = [""] * vocab
    for t, i in tok["model"]["vocab"].items():
        if i < vocab:
            tokens[i] = t
    types = [TOKEN_NORMAL] * vocab
    specials = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    for i, t in enumerate(tokens):
        if not t:
            tokens[i], types[i] = f"[PAD{i}]", TOKEN_CONTROL
        elif t == "<unk>":
            types[i] = TOKEN_UNKNOWN
        elif i in specials:
            types[i] = TOKEN_CONTROL
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = TOKEN_BYTE

    meta = [
        kv("general.architecture", T_STRING, "llama"),
        kv("general.name", T_STRING, cfg.get("_name_or_path", os.path.basename(model_dir.rstrip("/")))),
        kv("general.file_type", T_UINT32, FILE_TYPE[kind]),
        kv("general.alignment", T_UINT32, ALIGN),
        kv("llama.vocab_size", T_UINT32, vocab),
        kv("llama.context_length", T_UINT32, cfg.get("max_position_embeddings", 2048)),
        kv("llama.embedding_length", T_UINT32, cfg["hidden_size"]),
        kv("llama.block_count", T_UINT32, cfg["num_hidden_layers"]),
        kv("llama.feed_forward_length", T_UINT32, cfg["intermediate_size"]),
        kv("llama.rope.dimension_count", T_UINT32, head_dim),
        kv("llama.attention.head_count", T_UINT32, n_head),
        kv("llama.attention.head_count_kv", T_UINT32, n_kv),
        kv("llama.attention.layer_norm_rms_epsilon", T_FLOAT32, cfg.get("rms_norm_eps", 1e-6)),
        kv("llama.rope.freq_base", T_FLOAT32, cfg.get("rope_theta", 10000.0)),
        kv("tokenizer.ggml.model", T_STRING, "llama"),
        kv("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens)),
        kv("tokenizer.ggml.scores", T_ARRAY, (T_FLOAT32, [-float(i) for i in range(vocab)])),
        kv("tokenizer.ggml.token_type", T_ARRAY, (T_INT32, types)),
        kv("tokenizer.ggml.bos_token_id", T_UINT32, cfg.get("bos_token_id", 1)),
        kv("tokenizer.ggml.eos_token_id", T_UINT32, cfg.get("eos_token_id", 2)),
    ]

    # HF name -> GGUF name, in llama.cpp's order.
    names = [("model.embed_tokens.weight", "token_embd.weight")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", f"blk.{i}.attn_norm.weight"),
                  (p + "self_attn.q_proj.weight", f"blk.{i}.attn_q.weight"),
                  (p + "self_attn.k_proj.weight", f"blk.{i}.attn_k.weight"),
                  (p + "self_attn.v_proj.weight", f"blk.{i}.attn_v.weight"),
                  (p + "self_attn.o_proj.weight", f"blk.{i}.attn_output.weight"),
                  (p + "post_attention_layernorm.weight", f"blk.{i}.ffn_norm.weight"),
                  (p + "mlp.gate_proj.weight", f"blk.{i}.ffn_gate.weight"),
                  (p + "mlp.up_proj.weight", f"blk.{i}.ffn_up.weight"),
                  (p + "mlp.down_proj.weight", f"blk.{i}.ffn_down.weight")]
    names.append(("model.norm.weight", "output_norm.weight"))

    where = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                where[key] = (path, info)
    if "lm_head.weight" in where:
        names.append(("lm_head.weight", "output.weight"))

    # Tensor infos first (shapes and types are known from the headers), then the data.
    infos, sizes, offset = [], [], 0
    for hf, gg in names:
        shape = where[hf][1]["shape"]
        ggml_type = GGML_F32 if len(shape) == 1 else (GGML_F16 if kind == "f16" else GGML_Q8_0)
        count = int(np.prod(shape))
        nbytes = count * 4 if ggml_type == GGML_F32 else (count * 2 if ggml_type == GGML_F16 else count // 32 * 34)
        info = gguf_string(gg) + struct.pack("<I", len(shape))
        info += b"".join(struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", ggml_type, offset)
        infos.append(info)
        sizes.append(nbytes)
        offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN

    with open(out_path, "wb") as out:
        out.write(struct.pack("<IIQQ", GGUF_MAGIC, 3, len(names), len(meta)))
        for m in meta:
            out.write(m)
        for i in infos:
            out.write(i)
        out.write(b"\0" * ((-out.tell()) % ALIGN))
        loaded_path, shard = None, None
        for (hf, gg), nbytes in zip(names, sizes):
            path = where[hf][0]
            if path != loaded_path:
                shard, loaded_path = safetensors_io.load(path), path
            w = shard[hf]
            if hf.endswith("q_proj.weight"):
                w = permute(w, n_head)
            elif hf.endswith("k_proj.weight"):
                w = permute(w, n_kv)
            if w.dim() == 1:
                raw = w.float().numpy().tobytes()
            elif kind == "f16":
                raw = w.to(torch.float16).view(torch.int16).numpy().tobytes()
            else:
                raw = q8_0(w)
            assert len(raw) == nbytes, (hf, len(raw), nbytes)
            out.write(raw)
            out.write(b"\0" * ((-len(raw)) % ALIGN))
    print(f"wrote {out_path}: {len(names)} tensors, {os.path.getsize(out_path) / 2**30:.2f} GiB, {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
