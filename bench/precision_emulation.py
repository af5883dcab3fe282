"""What reduced-precision products would cost in accuracy, measured on the CPU by emulating them.

The engine on workload-(a) sentences (BERT-base shape, random weights, all layers, gausslegendre 2), with
every matrix product (linear layers, attention, the reduction; forward and backward) fed inputs rounded to
a shorter mantissa, in float32 arithmetic, against the plain float32 engine at the same rule (so the
quadrature error cancels):

    tf32-rn      inputs rounded to nearest (ties away from zero) at 10 mantissa bits (TF32, rounding)
    tf32-trunc   inputs truncated to 10 mantissa bits (TF32, truncating conversion)

what `torch.set_float32_matmul_precision("high")` does to an engine call on a GPU, up to the conversion the
tensor cores use and the order of the sums.

    python bench/precision_emulation.py --examples 3

The engine's own bf16 rows (`dtype=torch.bfloat16`, everything above the target in bf16; real arithmetic,
not emulated) are the point of comparison; they run slowly on a CPU, so only with --with-bf16-rows. Writes
bench/results/<device>-precision_emulation.json.
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

MODES = {"tf32-rn": (13, True, False), "tf32-trunc": (13, False, False)}  # (dropped bits, nearest, round outputs)


def rounded(x: torch.Tensor, dropped_bits: int, nearest: bool) -> torch.Tensor:
    """float32 x with its lowest `dropped_bits` mantissa bits cleared (rounded to nearest first if asked)."""
    bits = x.detach().float().contiguous().view(torch.int32)
    if nearest:
        bits = bits + (1 << (dropped_bits - 1))
    return (bits & ~((1 << dropped_bits) - 1)).view(torch.float32)


_MATMUL = torch.matmul  # the real one, kept before `emulating` replaces it


def emulated_product(dropped_bits: int, nearest: bool, round_outputs: bool):
    """A matrix product (autograd Function) on rounded inputs, its outputs rounded too if asked, and the same
    for the two products of its backward."""

    def product(a, b):
        out = _MATMUL(rounded(a, dropped_bits, nearest), rounded(b, dropped_bits, nearest))
        return rounded(out, dropped_bits, nearest) if round_outputs else out

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return product(a, b)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            grad_a = product(grad, b.transpose(-1, -2)).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
            grad_b = product(a.transpose(-1, -2), grad).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
            return grad_a, grad_b

    return Product.apply


@contextlib.contextmanager
def emulating(mode: str):
    """Every matrix product of an engine call emulated: the adapter's linear layers, the attention (the rows'
    as explicit products and softmax instead of the fused kernel; the prefix's), and the reduction's."""
    matmul = emulated_product(*MODES[mode])

    def linear(x, w, b=None):
        out = matmul(x, w.t())
        return out if b is None else out + b

    def attention(q, k, v, attn_mask=None, scale=None):
        scores = matmul(q, k.transpose(-1, -2)) * scale
        if attn_mask is not None:
            scores = scores + attn_mask
        return matmul(torch.softmax(scores, dim=-1), v)

    matmul_operator = torch.Tensor.__matmul__
    adapters.F = types.SimpleNamespace(linear=linear, layer_norm=F.layer_norm)
    engine.F = types.SimpleNamespace(scaled_dot_product_attention=attention)
    torch.matmul, torch.Tensor.__matmul__ = matmul, lambda a, b: matmul(a, b)
    try:
        yield
    finally:
        adapters.F, engine.F = F, F
        torch.matmul, torch.Tensor.__matmul__ = _MATMUL, matmul_operator


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
               "rule": "gausslegendre 2", "rounded": "every matrix product, forward and backward",
               "rel_error_vs_float32": results, "modes": {
                   "tf32-rn": "product inputs rounded to nearest, 10 mantissa bits",
                   "tf32-trunc": "product inputs truncated, 10 mantissa bits",
                   "bf16-rows": "the engine's bf16 rows (real bf16 arithmetic on the CPU)"}}
    path = common.write_json(payload, "precision_emulation", device, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
