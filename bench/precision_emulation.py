"""What reduced-precision products would cost in accuracy, measured on the CPU by emulating them.

The engine on workload-(a) sentences (BERT-base shape, random weights, all layers, gausslegendre 2), with
some matrix products fed inputs rounded to a shorter mantissa, in float32 arithmetic, against the plain
float32 engine at the same rule (so the quadrature error cancels). Rounded: the inputs of the adapter's
linear layers (rows and prefix, forward and input-gradient backward) and of the rows' attention (its
backward computes in float32 on those inputs; its output is not rounded). Not rounded: the prefix's
attention products and the reduction's product, which TF32 mode would also touch on a GPU.

    tf32-rn      inputs rounded to nearest (ties away from zero) at 10 mantissa bits (TF32, rounding)
    tf32-trunc   inputs truncated to 10 mantissa bits (TF32, truncating conversion)
    bf16-stream  inputs and outputs rounded to nearest at 7 bits (bf16 products; residual stream, LayerNorm
                 and softmax stay float32)

    python bench/precision_emulation.py --examples 3

The engine's own bf16 rows (`dtype=torch.bfloat16`, everything above the target in bf16) are the reference
point; they run slowly on a CPU, so only with --with-bf16-rows. Writes bench/results/<device>-precision_emulation.json.
Emulation, not the GPU's arithmetic: products accumulate in float32 here as on tensor cores, but the order
of the sums differs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_compare  # noqa: E402
import common  # noqa: E402

from attattr_fast import AttentionAttribution, adapters, engine  # noqa: E402

MODES = {"tf32-rn": (13, True, False), "tf32-trunc": (13, False, False), "bf16-stream": (16, True, True)}


def rounded(x: torch.Tensor, dropped_bits: int, nearest: bool) -> torch.Tensor:
    """float32 x with its lowest `dropped_bits` mantissa bits cleared (rounded to nearest first if asked)."""
    bits = x.detach().float().contiguous().view(torch.int32)
    if nearest:
        bits = bits + (1 << (dropped_bits - 1))
    return (bits & ~((1 << dropped_bits) - 1)).view(torch.float32)


def emulated_functions(dropped_bits: int, nearest: bool, round_outputs: bool):
    """Stand-ins for torch.nn.functional in adapters and engine: linear and attention on rounded inputs."""

    def r(t):
        return rounded(t, dropped_bits, nearest)

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(w)
            out = F.linear(r(x), r(w))
            out = r(out) if round_outputs else out
            return out if b is None else out + b

        @staticmethod
        def backward(ctx, grad):
            (w,) = ctx.saved_tensors
            grad_x = r(grad) @ r(w)
            return (r(grad_x) if round_outputs else grad_x), None, None

    def straight_through(t):  # rounded value, identity gradient (the attention's own backward is float32)
        return t + (r(t) - t.detach())

    def attention(q, k, v, attn_mask=None, scale=None):
        return F.scaled_dot_product_attention(straight_through(q), straight_through(k), straight_through(v),
                                              attn_mask=attn_mask, scale=scale)

    linear = types.SimpleNamespace(linear=lambda x, w, b=None: Linear.apply(x, w, b), layer_norm=F.layer_norm)
    return linear, types.SimpleNamespace(scaled_dot_product_attention=attention)


@contextlib.contextmanager
def emulating(mode: str):
    adapters.F, engine.F = emulated_functions(*MODES[mode])
    try:
        yield
    finally:
        adapters.F, engine.F = F, F


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--with-bf16-rows", action="store_true", help="also the engine's bf16 rows (slow on a CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    env = common.environment(device)
    model = common.random_bert(**bench_compare.SHAPES["bert-base"], seed=0, device=device)
    lengths, _ = bench_compare.workload_lengths("a", args.examples, seed=ord("a"))
    ids, mask, types_ = common.random_batch(lengths, model.config.vocab_size, seed=ord("a"))
    aa = AttentionAttribution(model)

    def run(dtype=None):
        return aa.attribute(ids, mask, types_, method="gausslegendre", n_steps=2, dtype=dtype, backend="torch")

    reference = run().attributions
    print(f"{len(lengths)} sentences of {lengths} tokens; error against the float32 engine at the same rule")
    results = {}
    for mode in MODES:
        with emulating(mode):
            results[mode] = common.relative_error(run().attributions, reference)
        print(f"  {mode:12s} {results[mode]:.2e}")
    if args.with_bf16_rows:
        results["bf16-rows"] = common.relative_error(run(torch.bfloat16).attributions, reference)
        print(f"  {'bf16-rows':12s} {results['bf16-rows']:.2e}  (the engine's dtype=torch.bfloat16, not emulated)")
    payload = {"benchmark": "precision_emulation", "environment": env, "lengths": lengths,
               "rule": "gausslegendre 2", "rel_error_vs_float32": results, "modes": {
                   "tf32-rn": "product inputs rounded to nearest, 10 mantissa bits",
                   "tf32-trunc": "product inputs truncated, 10 mantissa bits",
                   "bf16-stream": "product inputs and outputs rounded to nearest, 7 bits; float32 stream",
                   "bf16-rows": "the engine's bf16 rows (real bf16 arithmetic on the CPU)"}}
    path = common.write_json(payload, "precision_emulation", device, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
