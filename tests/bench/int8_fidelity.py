#!/usr/bin/python3
"""Benchmark (printed figures, not a test): what int8 weights cost in fidelity, measured with the
independent PyTorch reference (tests/reference/reference_model.py) rather than adapterd.

For a Llama-family MODEL_DIR it runs a fixed, seeded set of prompts through the reference for
each scheme: on the float32 weights, on the projection matrices and lm_head quantized per block of 32
inputs (what `--quantize int8_weight_only` serves: scale = max|w| / 127, q = round-half-even(w / scale)),
quantized per output channel (one scale per row, the other layout #11 names), and per block of
32 with every projection's input rows quantized the same way at run time (`--quantize int8`,
w8a8: llama.cpp's Q8_0 x Q8_0); then w8a8 and the float32 weights each with the keys and values
rounded to float16 and to bfloat16, as a KV cache kept in that dtype stores them (what
`--kv_cache_dtype` chooses; `auto` under `--quantize` is float16, llama.cpp's default cache). For each
scheme it prints the largest and the mean |logit error| against float32 (also relative to the
largest |logit|), the top-1 agreement over every position, the mean KL divergence of the
next-token distributions, and the bytes per weight.

Usage: int8_fidelity.py MODEL_DIR [PROMPTS=8] [LENGTH=64]
"""
import json
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "reference"))
import reference_model  # noqa: E402

BLOCK = 32


def per_block(w):
    n, k = w.shape
    x = w.view(n, k // BLOCK, BLOCK)
    scale = x.abs().amax(-1) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inverse[..., None]).clamp(-127, 127)
    return (q * scale[..., None]).view(n, k)


def per_channel(w):
    scale = w.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round(w * inverse).clamp(-127, 127) * scale


def per_block_rows(x):
    """x's rows quantized per block of 32 along the last axis, as --quantize int8 quantizes a
    projection's input at run time (the same formula as the weights), dequantized."""
    shape = x.shape
    v = x.reshape(-1, shape[-1] // BLOCK, BLOCK)
    scale = v.abs().amax(-1) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(v * inverse[..., None]).clamp(-127, 127) * scale[..., None]).reshape(shape)


class QuantizedInputs:
    """A weight matrix in place of the reference's `w[name]`: the reference computes x @ w.T,
    which comes here (torch hands an unknown right operand to its __rmatmul__) and multiplies
    x's quantized rows by the weights. The block sums of integers are exact in float32 here as
    in adapterd's int32, so only the order of the float steps differs."""

    def __init__(self, weight):
        self.weight = weight

    @property
    def T(self):
        return self

    def __rmatmul__(self, x):
        return per_block_rows(x) @ self.weight.T


def w8a8(w):
    return QuantizedInputs(per_block(w))


def quantized(state, cfg, fn):
    out = dict(state)
    if "lm_head.weight" not in out and cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = state["model.embed_tokens.weight"]
    for name, w in out.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            out[name] = fn(w)
    return out


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    model_dir = sys.argv[1]
    prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    length = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    torch.set_grad_enabled(False)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    state = reference_model.load_state(model_dir)
    gen = torch.Generator().manual_seed(1234)
    vocab = cfg["vocab_size"]
    batch = [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(prompts)]
    base = [reference_model.llama_logits(cfg, state, ids) for ids in batch]
    print(f"model {model_dir}: {prompts} prompts x {length} tokens, float32 reference")
    schemes = (("per block of 32 (--quantize int8_weight_only)", per_block, 1 + 4 / BLOCK, None),
               ("per output channel", per_channel, 1.0, None),
               ("w8a8, inputs too (--quantize int8)", w8a8, 1 + 4 / BLOCK, None),
               ("w8a8 + float16 KV cache", w8a8, 1 + 4 / BLOCK, torch.float16),
               ("w8a8 + bfloat16 KV cache", w8a8, 1 + 4 / BLOCK, torch.bfloat16),
               ("float32 weights, float16 KV cache", None, 4.0, torch.float16),
               ("float32 weights, bfloat16 KV cache", None, 4.0, torch.bfloat16))
    for label, fn, bytes_per_weight, kv_dtype in schemes:
        w = quantized(state, cfg, fn) if fn is not None else state
        worst = total = count = agree = positions = kl = 0.0
        largest = 0.0
        for ids, ref in zip(batch, base):
            got = reference_model.llama_logits(cfg, w, ids, kv_dtype=kv_dtype)
            err = (got - ref).abs()
            worst = max(worst, err.max().item())
            total += err.sum().item()
            count += err.numel()
            largest = max(largest, ref.abs().max().item())
            agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
            positions += ref.shape[0]
            p = torch.log_softmax(ref, -1)
            kl += (p.exp() * (p - torch.log_softmax(got, -1))).sum(-1).sum().item()
        print(f"{label:45s} max |err| {worst:.4f} ({100 * worst / largest:.2f}% of max |logit| {largest:.2f}), "
              f"mean |err| {total / count:.5f}, top-1 agreement {100 * agree / positions:.2f}% "
              f"({int(agree)}/{int(positions)}), mean KL {kl / positions:.2e}, {bytes_per_weight:.3f} bytes/weight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
