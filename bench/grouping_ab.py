"""Before/after for the grouping: the engine on workload (a) with `engine.plan_groups` and with the grouping
it replaced (fixed-size groups sized by the batch's longest example, `plan_report.sized_by_longest`), in one
process, everything else equal. Per case and grouping: seconds (median), examples/s, the groups and their
padding; and the largest difference between the two groupings' layer sums (they must agree to rounding).

    python bench/grouping_ab.py                  # GPU: 256 examples; bf16 gl 2 and rr 20, float32 gl 2
    python bench/grouping_ab.py --examples 32    # CPU: float32 gl 2 (about 3 minutes on 2 cores)

Writes bench/results/<device>-grouping_ab.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_compare  # noqa: E402
import common  # noqa: E402
import plan_report  # noqa: E402

from attattr_fast import AttentionAttribution, engine  # noqa: E402

GROUPINGS = {"plan_groups": engine.plan_groups, "sized_by_longest": plan_report.sized_by_longest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--examples", type=int, default=None, help="workload (a) examples (GPU 256, CPU 64)")
    parser.add_argument("--cases", default=None, help="comma list of dtype:method:steps")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (GPU 3, CPU 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    common.set_threads(args.threads, device)
    count = args.examples or (256 if gpu else 64)
    repeats = args.repeats or (3 if gpu else 1)
    default = "bf16:gausslegendre:2,bf16:riemann_right:20,float32:gausslegendre:2" if gpu else "float32:gausslegendre:2"
    cases = (args.cases or default).split(",")
    env = common.environment(device)
    print(f"device: {env['device']}; torch {env['versions']['torch']}")
    model = common.random_bert(**bench_compare.SHAPES["bert-base"], seed=0, device=device)
    lengths, _ = bench_compare.workload_lengths("a", count, seed=ord("a"))
    ids, mask, types = (t.to(device) for t in common.random_batch(lengths, model.config.vocab_size, seed=ord("a")))
    aa = AttentionAttribution(model)
    rows = []
    payload = {"benchmark": "grouping_ab", "environment": env, "examples": count,
               "mean_length": float(np.mean(lengths)), "repeats": repeats,
               "group_overhead_tokens": engine.GROUP_OVERHEAD_TOKENS, "rows": rows}
    for case in cases:
        dtype_name, method, steps = case.split(":")
        if dtype_name == "bf16" and not gpu:
            print(f"  {case}: skipped (bf16 on CUDA only)")
            continue
        dtype = None if dtype_name == "float32" else bench_compare.DTYPES[dtype_name]
        results = {}
        for name, planner in GROUPINGS.items():
            groups = []

            def recording(sorted_lengths, rows_per_example, rows_for, overhead_tokens, planner=planner, groups=groups):
                planned = planner(sorted_lengths, rows_per_example, rows_for, overhead_tokens)
                groups[:] = [(end - begin, sorted_lengths[end - 1], rows) for begin, end, rows in planned]
                return planned

            def call(dtype=dtype, method=method, steps=int(steps)):
                return aa.attribute(ids, mask, types, method=method, n_steps=steps, dtype=dtype, backend="torch",
                                    output="reduced", result_device=device)

            engine.plan_groups = recording
            try:
                timing = common.measure(call, device, repeats=repeats, warmup=1)
            finally:
                engine.plan_groups = GROUPINGS["plan_groups"]
            results[name] = timing.result.layer_attr.float().cpu()
            padded = sum(b * n for b, n, _ in groups)
            row = {"case": case, "grouping": name, "seconds": timing.seconds, "times": timing.times,
                   "ex_per_s": count / timing.seconds, "peak_mib": timing.peak_mib, "groups": groups,
                   "padding_fraction": padded / sum(lengths) - 1}
            rows.append(row)
            print(f"  {case:26s} {name:17s} {timing.seconds:9.3f} s  {row['ex_per_s']:8.2f} ex/s  "
                  f"{len(groups):3d} groups, padding {100 * row['padding_fraction']:.0f}%")
        new, old = results["plan_groups"], results["sized_by_longest"]
        diff = float((new - old).abs().max() / old.abs().max())
        speedup = rows[-1]["seconds"] / rows[-2]["seconds"]
        rows[-2].update(speedup_over_sized_by_longest=speedup, rel_diff_layer_attr=diff)
        print(f"  {case:26s} plan_groups / sized_by_longest: {speedup:.2f}x, layer sums differ by {diff:.1e}")
        common.write_json(payload, "grouping_ab", device, args.out)  # after every case: a step limit loses none
    path = common.write_json(payload, "grouping_ab", device, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
