"""The groups the engine plans for a workload at a given memory budget: no model run, no device needed.

For each group: examples, the padded length, rows per chunk; in total the padding computed, the mean
row-tokens (rows × padded length) per group, and the groups whose rows run packed (eager rows).
`--sized-by-longest` shows the grouping used up to the H200 session of 2026-11-30 (fixed-size groups, each
sized by the batch's longest example) for comparison.

    python bench/plan_report.py --budget 74.6e9                         # workload (a), 256, bf16 gl 2 and rr 20
    python bench/plan_report.py --workload c --budget 74.6e9 --sized-by-longest
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_compare  # noqa: E402
import common  # noqa: E402

from attattr_fast import engine  # noqa: E402
from attattr_fast.adapters import adapter_for  # noqa: E402


def sized_by_longest(sorted_lengths: list[int], rows_per_example: int, rows_for,
                     overhead_tokens: int = 0) -> list[tuple[int, int, int]]:
    """The grouping before `engine.plan_groups` (same signature): groups of a fixed number of examples, as
    many as fill one chunk at the batch's longest length."""
    rows = rows_for(sorted_lengths[-1])
    per = max(1, rows // rows_per_example)
    return [(b, min(b + per, len(sorted_lengths)), rows) for b in range(0, len(sorted_lengths), per)]


def plan(adapter, lengths: list[int], n_nodes: int, dtype, budget: int, device_type: str,
         old: bool) -> list[tuple[int, int, int]]:
    """The groups of `lengths` at `budget`, all layers targeted (old: `sized_by_longest`, else `plan_groups`)."""
    return engine.plan_batch(adapter, sorted(lengths), list(range(adapter.n_layers)), n_nodes, dtype,
                             torch.device(device_type), budget=budget, planner=sized_by_longest if old else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="a", choices=sorted(bench_compare.WORKLOADS))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--budget", type=float, required=True, help="bytes for the rows of one chunk")
    parser.add_argument("--device-type", default="cuda", choices=sorted(engine.GROUP_OVERHEAD_TOKENS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(bench_compare.DTYPES))
    parser.add_argument("--cases", default="gausslegendre:2,riemann_right:20", help="comma list of method:steps")
    parser.add_argument("--sized-by-longest", action="store_true", help="the grouping before plan_groups")
    args = parser.parse_args(argv)
    model = common.random_bert(**bench_compare.SHAPES["bert-base"], seed=0, device=torch.device("meta"))
    adapter = adapter_for(model)
    lengths, _ = bench_compare.workload_lengths(args.workload, args.examples, seed=ord(args.workload))
    srt = sorted(lengths)
    policy = "sized by the longest" if args.sized_by_longest else "plan_groups"
    print(f"workload ({args.workload}), {len(lengths)} examples, mean length {np.mean(lengths):.1f}; budget "
          f"{args.budget / 1e9:.1f} GB, {args.dtype}, {policy}")
    for case in args.cases.split(","):
        method, steps = case.split(":")
        rows_per_example = adapter.n_layers * int(steps)
        groups = plan(adapter, lengths, int(steps), bench_compare.DTYPES[args.dtype], int(args.budget),
                      args.device_type, args.sized_by_longest)
        padded = sum((e - b) * srt[e - 1] for b, e, _ in groups)
        row_tokens = [(e - b) * rows_per_example * srt[e - 1] for b, e, _ in groups]
        packed = [engine.runs_packed(torch.tensor(srt[b:e]), srt[e - 1]) for b, e, _ in groups]
        packed_share = sum(t for t, p in zip(row_tokens, packed) if p) / sum(row_tokens)
        print(f"  {method} {steps}: {len(groups)} groups, padding {padded / sum(srt) - 1:.0%}, row-tokens per group "
              f"mean {np.mean(row_tokens):.0f}, min {min(row_tokens)}; {sum(packed)} groups packed "
              f"({packed_share:.0%} of the row-tokens)")
        print("    (examples, padded length, rows per chunk): "
              + ", ".join(f"({e - b}, {srt[e - 1]}, {r})" for b, e, r in groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
