"""Before/after rows for one engine change, both arms in one process, everything else equal: the engine on
workload (a) (BERT-base shape, random weights), per case and arm the seconds (median), examples/s, the
groups, their padding and which ran packed, and the largest difference between the arms' layer sums (they
must agree to rounding).

    --compare grouping   engine.plan_groups against the grouping it replaced (fixed-size groups sized by
                         the batch's longest example, plan_report.sized_by_longest)
    --compare compile    the rows' layers eager against torch.compile (AttentionAttribution(compile=True));
                         the untimed warm-up call compiles, its time is recorded as warmup_seconds
    --compare packing    rows packed to their real tokens where a group's padding exceeds
                         engine.PACK_ABOVE_PADDING, against rows always padded
    --compare memory     chunks sized by engine.row_bytes against the memory model it replaced
                         (`row_bytes_before`: every row charged all layers and 12D + 3I + 3H·n per token)
    --compare tf32       bf16 rows with the call's float32 products (the prefix, and the torch reduction's
                         Ḡ·Vᵀ) in TF32 (float32_matmul_precision "high") against full FP32 ("highest"): the
                         remedy GPU_NOTES names if the prefix takes over 15% of a bf16 call (CUDA only)

    python bench/engine_ab.py --compare grouping              # GPU: 256 examples; bf16 gl 2 and rr 20, float32 gl 2
    python bench/engine_ab.py --compare compile --examples 32 # CPU: float32 gl 2
    python bench/engine_ab.py --compare packing --examples 8 --rows-per-chunk 192 --group-overhead 1e9
                                                              # CPU: the 8 sentences in one group
    python bench/engine_ab.py --compare tf32 --cases bf16:gausslegendre:2,bf16:riemann_right:20  # GPU

Writes bench/results/<device>-<compare>_ab.json.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_compare  # noqa: E402
import common  # noqa: E402
import plan_report  # noqa: E402

from attattr_fast import AttentionAttribution, engine  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: AttentionAttribution's keyword arguments, the grouping (engine.plan_groups
    or its replacement), engine.PACK_ABOVE_PADDING, the memory model and torch's float32 matmul precision."""

    kwargs: dict = field(default_factory=dict)
    plan: Callable = engine.plan_groups
    pack_above_padding: float = engine.PACK_ABOVE_PADDING
    row_bytes: Callable = engine.row_bytes
    matmul_precision: str = "highest"


def row_bytes_before(adapter, n: int, layers_per_row: float, dtype) -> int:
    """The memory model up to commit 477bee3 (same signature as engine.row_bytes): every row charged with all the
    layers from the lowest targeted one (here all of them, as in every case of this script), n·(12D + 3I) + 3·H·n²
    per layer."""
    item = torch.finfo(dtype).bits // 8
    hidden, intermediate = adapter.hidden_size, adapter.model.config.intermediate_size
    per_layer = n * (12 * hidden + 3 * intermediate) + 3 * adapter.n_heads * n * n
    return adapter.n_layers * per_layer * item


@contextlib.contextmanager
def arm_settings(arm: Arm):
    """The engine with the arm's grouping, packing, memory model and float32 matmul precision."""
    original = engine.plan_groups, engine.PACK_ABOVE_PADDING, engine.row_bytes
    precision = torch.get_float32_matmul_precision()
    engine.plan_groups, engine.PACK_ABOVE_PADDING, engine.row_bytes = arm.plan, arm.pack_above_padding, arm.row_bytes
    torch.set_float32_matmul_precision(arm.matmul_precision)
    try:
        yield
    finally:
        engine.plan_groups, engine.PACK_ABOVE_PADDING, engine.row_bytes = original
        torch.set_float32_matmul_precision(precision)


# comparison → {arm name: Arm}; the first arm is the new one, the second what it replaces.
COMPARISONS = {
    "grouping": {"plan_groups": Arm(), "sized_by_longest": Arm(plan=plan_report.sized_by_longest)},
    "compile": {"compiled": Arm(kwargs={"compile": True}), "eager": Arm()},
    "packing": {"packed": Arm(), "padded": Arm(pack_above_padding=math.inf)},
    "memory": {"row_bytes": Arm(), "row_bytes_before": Arm(row_bytes=row_bytes_before)},
    "tf32": {"tf32_products": Arm(matmul_precision="high"), "fp32_products": Arm()},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--examples", type=int, default=None, help="workload (a) examples (GPU 256, CPU 64)")
    parser.add_argument("--cases", default=None, help="comma list of dtype:method:steps")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (GPU 3, CPU 1)")
    parser.add_argument("--rows-per-chunk", type=int, default=None,
                        help="internal_batch_size (default: from the memory budget)")
    parser.add_argument("--group-overhead", type=float, default=None,
                        help="engine.GROUP_OVERHEAD_TOKENS for this device (e.g. the GPU's on the CPU, 1e9: one group "
                             "per chunk)")
    parser.add_argument("--pack-above-padding", type=float, default=None,
                        help="engine.PACK_ABOVE_PADDING of the packed arm (--compare packing; default the engine's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    common.set_threads(args.threads, device)
    if args.group_overhead is not None:
        engine.GROUP_OVERHEAD_TOKENS[device.type] = args.group_overhead
    count = args.examples or (256 if gpu else 64)
    repeats = args.repeats or (3 if gpu else 1)
    default = "bf16:gausslegendre:2,bf16:riemann_right:20,float32:gausslegendre:2" if gpu else "float32:gausslegendre:2"
    cases = (args.cases or default).split(",")
    name = f"{args.compare}_ab"
    env = common.environment(device)
    print(f"device: {env['device']}; torch {env['versions']['torch']}")
    model = common.random_bert(**bench_compare.SHAPES["bert-base"], seed=0, device=device)
    lengths, _ = bench_compare.workload_lengths("a", count, seed=ord("a"))
    ids, mask, types = (t.to(device) for t in common.random_batch(lengths, model.config.vocab_size, seed=ord("a")))
    arms = dict(COMPARISONS[args.compare])
    if args.compare == "packing" and args.pack_above_padding is not None:
        arms["packed"] = Arm(pack_above_padding=args.pack_above_padding)
    attributors = {name: AttentionAttribution(model, **arm.kwargs) for name, arm in arms.items()}
    rows = []
    payload = {"benchmark": name, "environment": env, "examples": count, "mean_length": float(np.mean(lengths)),
               "repeats": repeats, "group_overhead_tokens": engine.GROUP_OVERHEAD_TOKENS,
               "rows_per_chunk": args.rows_per_chunk,
               "pack_above_padding": {name: arm.pack_above_padding for name, arm in arms.items()}, "rows": rows}
    for case in cases:
        dtype_name, method, steps = case.split(":")
        if dtype_name == "bf16" and not gpu:
            print(f"  {case}: skipped (bf16 on CUDA only)")
            continue
        dtype = None if dtype_name == "float32" else bench_compare.DTYPES[dtype_name]
        results = {}
        for arm, settings in arms.items():
            plan, warmup = common.GroupLog(), []  # the groups of the last call

            def call(aa=attributors[arm], dtype=dtype, method=method, steps=int(steps), plan=plan):
                with plan:
                    return aa.attribute(ids, mask, types, method=method, n_steps=steps, dtype=dtype,
                                        backend="torch", output="reduced", internal_batch_size=args.rows_per_chunk,
                                        result_device=device)

            def timed_warmup(call=call, warmup=warmup):
                start = time.perf_counter()
                call()
                common.synchronize(device)
                warmup.append(time.perf_counter() - start)

            with arm_settings(settings):
                timing = common.measure(call, device, repeats=repeats, warmup=1, warmup_fn=timed_warmup)
            results[arm] = timing.result.layer_attr.float().cpu()
            groups = plan.summary(bench_compare.SHAPES["bert-base"]["layers"] * int(steps))
            row = {"case": case, "arm": arm, "seconds": timing.seconds, "times": timing.times,
                   "warmup_seconds": warmup[0], "ex_per_s": count / timing.seconds, "peak_mib": timing.peak_mib,
                   "groups": groups["groups"], "packed": groups["packed"],
                   "padding_fraction": groups["padding_fraction"]}
            rows.append(row)
            print(f"  {case:26s} {arm:17s} {timing.seconds:9.3f} s  {row['ex_per_s']:8.2f} ex/s  "
                  f"(warm-up {warmup[0]:.1f} s)  {common.GroupLog.describe(groups)}")
        new, old = list(arms)
        diff = float((results[new] - results[old]).abs().max() / results[old].abs().max())
        speedup = rows[-1]["seconds"] / rows[-2]["seconds"]
        rows[-2].update({f"speedup_over_{old}": speedup, "rel_diff_layer_attr": diff})
        print(f"  {case:26s} {new}: {speedup:.2f}x the speed of {old}, layer sums differ by {diff:.1e}")
        common.write_json(payload, name, device, args.out)  # after every case: a step limit loses none
    path = common.write_json(payload, name, device, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
