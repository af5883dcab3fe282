"""How well `engine.row_bytes`, the planner's memory model, bounds what a chunk of rows really takes.

Per case (dtype, padded length n, targeted layers, packed or padded rows): one group of `count` and one of
2·count examples, each run as one chunk, and the peak tensor memory of each call (CUDA: max_memory_allocated
above the start; CPU: the profiler's memory timeline). Their difference over the extra rows is the measured
peak per row (it also carries the extra examples' prefix and outputs, a few percent); `row_bytes` at the
chunk's mean layers per row is the model. model / measured must be at least 1, or the planner would fill more
than its budget: the script exits 1 if a case falls below. Above 1 it is room the planner leaves unused. For
comparison, the model before it (`engine_ab.row_bytes_before`) over the same measurement.

    python bench/memory_model.py            # BERT-base shape, the cases in --help
    python bench/memory_model.py --quick    # CI: the small shape

Writes bench/results/<device>-memory_model[-quick].json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_compare  # noqa: E402
import common  # noqa: E402
import engine_ab  # noqa: E402

from attattr_fast import AttentionAttribution, engine  # noqa: E402

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
CASES = "float32:32:all,float32:64:all,float32:128:all,float32:64:lowest,bf16:32:all,float32:64:all:packed"


def measure_case(aa: AttentionAttribution, device, dtype, n: int, layers: list[int], packed: bool, count: int,
                 steps: int) -> dict:
    adapter = aa.adapter
    peaks, rows = {}, {}
    for examples in (count, 2 * count):
        # packed: every other example a third shorter, so the rows run packed; else all at n
        lengths = [n - (i % 2) * (n // 3) if packed else n for i in range(examples)]
        ids, mask, types = (t.to(device) for t in common.random_batch(lengths, adapter.model.config.vocab_size))
        one_chunk = engine_ab.Arm(plan=lambda *args, examples=examples: [(0, examples, 1 << 30)],
                                  pack_above_padding=0.0 if packed else float("inf"))

        def call(ids=ids, mask=mask, types=types):
            return aa.attribute(ids, mask, types, layers=layers, method="gausslegendre", n_steps=steps,
                                dtype=dtype, output="reduced", result_device=device)

        with engine_ab.arm_settings(one_chunk):
            call()  # warm-up: one-time allocations are not the rows'
            peaks[examples] = common.tensor_peak_bytes(call, device)
        rows[examples] = examples * len(layers) * steps
    measured = (peaks[2 * count] - peaks[count]) / (rows[2 * count] - rows[count])
    if measured <= 0:
        raise SystemExit(f"the peak did not grow with the rows ({peaks}): no per-row figure to compare")
    mean_layers = engine.mean_layers_per_row(adapter, layers)
    model = engine.row_bytes(adapter, n, mean_layers, dtype)
    before = engine_ab.row_bytes_before(adapter, n, mean_layers, dtype)  # every case targets layer 0
    return {"dtype": dtype, "n": n, "layers": layers, "packed": packed, "examples": [count, 2 * count],
            "peak_bytes": [peaks[count], peaks[2 * count]], "measured_row_bytes": measured,
            "mean_layers_per_row": mean_layers, "model_row_bytes": model, "model_over_measured": model / measured,
            "model_before_over_measured": before / measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small shape (CI)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cases", default=CASES,
                        help="comma list of dtype:n:layers[:packed], layers all or lowest (layer 0 only)")
    parser.add_argument("--count", type=int, default=2, help="examples in the smaller chunk")
    parser.add_argument("--steps", type=int, default=2, help="Gauss–Legendre nodes (rows per example and layer)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    common.set_threads(args.threads, device)
    shape = bench_compare.SHAPES["small" if args.quick else "bert-base"]
    model = common.random_bert(**shape, seed=0, device=device)
    aa = AttentionAttribution(model)
    results, worst = [], float("inf")
    print(f"engine.row_bytes against the measured peak per row ({common.device_name(device)}, shape {shape})")
    for spec in args.cases.split(","):
        dtype_name, n, which, *rest = spec.split(":")
        layers = list(range(shape["layers"])) if which == "all" else [0]
        row = measure_case(aa, device, DTYPES[dtype_name], int(n), layers, rest == ["packed"], args.count, args.steps)
        results.append(row)
        worst = min(worst, row["model_over_measured"])
        print(f"  {spec:24s} measured {row['measured_row_bytes'] / 2**20:8.2f} MiB/row, model "
              f"{row['model_row_bytes'] / 2**20:8.2f} MiB/row ({row['mean_layers_per_row']:.1f} layers per row): "
              f"model/measured {row['model_over_measured']:.2f} (the model before: "
              f"{row['model_before_over_measured']:.2f})")
    payload = {"environment": common.environment(device), "settings": {**vars(args), "model_shape": shape},
               "cases": results, "worst_model_over_measured": worst}
    path = common.write_json(payload, "memory_model-quick" if args.quick else "memory_model", device)
    print(f"wrote {path}")
    if worst < 1:
        print(f"engine.row_bytes is below the measured peak per row (model/measured {worst:.2f}): the planner "
              "would overfill its budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
