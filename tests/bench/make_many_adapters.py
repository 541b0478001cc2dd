#!/usr/bin/python3
"""Writes COUNT seeded PEFT LoRA adapter folders for a Llama-shaped base (PEFT's layout:
adapter_config.json + adapter_model.safetensors with `base_model.model.` keys), ranks cycling
8, 16, 32, 64 on q/k/v/o of every layer, stored in bfloat16 (as adapters trained in bf16 are
saved). For the adapters-at-scale benchmark (tests/bench/many_adapters.sh). Skips folders that
already exist.

Usage: make_many_adapters.py --base MODEL_DIR --out DIR [--count 1000] [--seed 1]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import safetensors_io  # noqa: E402

PEFT_PREFIX = "base_model.model."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with open(os.path.join(args.base, "config.json")) as f:
        cfg = json.load(f)
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", hidden // heads)
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden)}
    os.makedirs(args.out, exist_ok=True)
    written = 0
    for i in range(args.count):
        d = os.path.join(args.out, f"tenant_{i:04d}")
        if os.path.exists(os.path.join(d, "adapter_model.safetensors")):
            continue
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        r = 8 << (i % 4)
        alpha = 2 * r
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for m, (fan_in, fan_out) in shapes.items():
                key = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{m}"
                std = 0.2 / (alpha / r) ** 0.5
                tensors[key + ".lora_A.weight"] = (torch.randn(r, fan_in, generator=gen) * std).to(torch.bfloat16)
                tensors[key + ".lora_B.weight"] = (torch.randn(fan_out, r, generator=gen) * std).to(torch.bfloat16)
        os.makedirs(d, exist_ok=True)
        config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0,
                      bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=None,
                      rank_pattern={}, alpha_pattern={}, layers_to_transform=None, layers_pattern=None,
                      init_lora_weights=True, inference_mode=True,
                      base_model_name_or_path=cfg.get("_name_or_path"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        safetensors_io.save(os.path.join(d, "adapter_model.safetensors"), tensors, {"format": "pt"})
        written += 1
    print(f"{args.count} adapters in {args.out} ({written} written now)")


if __name__ == "__main__":
    main()
