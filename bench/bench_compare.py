"""The project's performance table in one command (issue 4): the naive loop, Captum and the engine.

Rows per workload:
  naive m=64, naive m=20   the original release's loop (`naive.naive_attribute`): per example, per layer,
                           chunks of 16 scaled attentions through the whole transformers model, left
                           Riemann sum, padded to 128 tokens, float32
  captum rr 20             `captum.attr.IntegratedGradients` on a forward that takes one layer's attention
                           (`naive.captum_attribute`), per example at its real length; skipped without captum
  engine                   torch and triton backends (triton on CUDA only); bf16, tf32 (float32 with TF32
                           products: float32_matmul_precision "high") and float32 ("highest"), the first two
                           on CUDA only; riemann_right 20 and gausslegendre with the fewest nodes K* whose
                           error is at most riemann_right 20's (searched on this workload)

Workloads on a BERT-base-shaped model (12 layers, 12 heads, hidden 768, random weights): (a) single
sentences with SST-2-like lengths (mean about 25 tokens), (b) sentence pairs with MNLI-like lengths (about
40), (c) n = 128 fixed. All 12 layers are attributed, full output.

Per row: examples/s, speed-up over the naive loop (m = 20 and m = 64) and Captum, FLOPs per example from
DESIGN §2's cost model (each method's own passes: the loop runs L layers forward and L − l + 1 backward per
node; the engine 2·(L − l + 1) per node plus one forward), achieved TFLOP/s and its fraction of the device's
peak (bf16 for bf16 rows, tf32 for tf32 and float32 rows; n/a on the CPU), peak memory, and the error against a
converged reference (the engine, gausslegendre 64, float32): worst layer's max |attr − ref| / max |ref|.

    python bench/bench_compare.py             # GPU: 256 examples per workload (baselines on 32 of them)
    python bench/bench_compare.py --quick     # CI: a small 4-layer model, 4 examples, baselines on 1

The naive loop and Captum are per-example loops; they are timed on a subset of each workload chosen at
evenly spaced quantiles of its length distribution (--baseline-examples), and their examples/s is measured
on that subset. Writes bench/results/<device>-bench_compare[-quick].json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
import naive  # noqa: E402

from attattr_fast import AttentionAttribution  # noqa: E402
from attattr_fast.api import resolve_backend  # noqa: E402
from attattr_fast.errors import AttAttrError  # noqa: E402

SHAPES = {
    "bert-base": dict(layers=12, heads=12, hidden=768, intermediate=3072),
    "small": dict(layers=2, heads=4, hidden=128, intermediate=512),  # --quick: a smoke test, not a result
}
WORKLOADS = {
    "a": "single sentences, SST-2-like lengths (gamma k=4, mean 25, clipped to 5..66)",
    "b": "sentence pairs, MNLI-like lengths (gamma k=5, mean 40, clipped to 12..128; 60% first segment)",
    "c": "n = 128 fixed",
}
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
# The engine's rows: (name, dtype, torch's float32 matmul precision). tf32 is float32 throughout with the
# products on TF32 tensor cores (inputs rounded to a 10-bit mantissa, float32 accumulation), CUDA only.
ENGINE_PRECISIONS = (("bf16", torch.bfloat16, "highest"), ("float32", torch.float32, "highest"),
                     ("tf32", torch.float32, "high"))


# -- workloads ------------------------------------------------------------------------------------------
def workload_lengths(kind: str, count: int, seed: int) -> tuple[list[int], list[int] | None]:
    """Lengths at evenly spaced quantiles of the workload's distribution, in a seeded random order (so a
    handful of examples already has the distribution's mean), and the first segment's length for pairs."""
    rng = np.random.default_rng(seed)
    if kind == "c":
        return [128] * count, None
    shape, mean, low, high = (4, 25, 5, 66) if kind == "a" else (5, 40, 12, 128)
    sample = np.clip(np.rint(rng.gamma(shape, mean / shape, 200_000)), low, high)
    lengths = np.quantile(sample, (np.arange(count) + 0.5) / count, method="nearest").astype(int)
    lengths = lengths[rng.permutation(count)].tolist()
    if kind == "a":
        return lengths, None
    # [CLS] first [SEP] | second [SEP]: segment 0 holds about 60% of the words
    return lengths, [1 + max(1, round(0.6 * (n - 3))) + 1 for n in lengths]


def quantile_subset(lengths: list[int], k: int) -> list[int]:
    """Indices of k examples at evenly spaced quantiles of the lengths (k = 1: the median length)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    picks = [order[min(len(order) - 1, int((j + 0.5) * len(order) / k))] for j in range(min(k, len(order)))]
    return sorted(set(picks))


# -- rows -----------------------------------------------------------------------------------------------
def cost(args, shape: dict, n: int, kind: str, steps: int) -> float:
    if kind == "engine":
        return common.engine_flops(n, shape["layers"], steps, shape["hidden"], shape["intermediate"])
    # a per-example loop: its own passes plus the forward that records the attention
    loop = common.loop_flops(n, shape["layers"], steps, shape["hidden"], shape["intermediate"])
    return loop + shape["layers"] * common.layer_flops(n, shape["hidden"], shape["intermediate"])


def finish_row(row: dict, timing: common.Timing, examples: list[int], lengths: list[int], flops_lengths: list[int],
               kind: str, steps: int, args, shape, device, dtype) -> dict:
    count = len(examples)
    row.update(status="ok", examples=count, mean_length=float(np.mean([lengths[i] for i in examples])),
               seconds=timing.seconds, ex_per_s=count / timing.seconds, peak_mib=timing.peak_mib,
               timing=timing.as_dict())
    flops = float(np.mean([cost(args, shape, n, kind, steps) for n in flops_lengths]))
    row["gflop_per_ex"] = flops / 1e9
    row["tflops"] = flops * row["ex_per_s"] / 1e12
    peak, peak_name = common.peak_tflops(device, dtype)
    row["peak_tflops"], row["peak_name"] = peak, peak_name
    row["peak_fraction"] = row["tflops"] / peak if peak else None
    return row


def skipped(name: str, reason: str, **fields) -> dict:
    print(f"  {name}: skipped: {reason}")
    return {"row": name, "status": f"skipped: {reason}", **fields}


def run_workload(kind: str, model, shape: dict, args, device, checkpoint=lambda partial: None) -> dict:
    lengths, pair_first = workload_lengths(kind, args.examples, seed=ord(kind))
    ids, mask, types = common.random_batch(lengths, model.config.vocab_size, seed=ord(kind), pair_first=pair_first)
    ids, mask, types = ids.to(device), mask.to(device), types.to(device)
    n_all = list(range(len(lengths)))
    print(f"\n== workload ({kind}) {WORKLOADS[kind]}: {len(lengths)} examples, mean length {np.mean(lengths):.1f}, "
          f"min {min(lengths)}, max {max(lengths)}")
    aa = AttentionAttribution(model)

    def engine_call(method, steps, dtype=None, backend="torch", examples=None):
        sel = slice(None) if examples is None else torch.tensor(examples, device=device)
        return aa.attribute(ids[sel], mask[sel], types[sel], method=method, n_steps=steps, dtype=dtype,
                            backend=backend, output=args.output, result_device=device)

    def attr_of(res):
        out = res.attributions if args.output == "full" else res.layer_attr.unsqueeze(2)
        return out.float().cpu()

    # The converged reference, and the fewest Gauss–Legendre nodes that match riemann_right 20.
    t0 = time.perf_counter()
    reference = attr_of(engine_call("gausslegendre", args.reference_nodes))
    print(f"  reference: engine gausslegendre {args.reference_nodes}, float32 ({time.perf_counter() - t0:.1f} s)")
    search = quantile_subset(lengths, args.search_examples)
    ref_search = reference[search]
    rr_error = common.relative_error(attr_of(engine_call("riemann_right", 20, examples=search)), ref_search)
    search_log, k_star = [], args.gl_nodes
    for k in range(2, args.max_nodes + 1 if args.gl_nodes is None else 1):
        err = common.relative_error(attr_of(engine_call("gausslegendre", k, examples=search)), ref_search)
        search_log.append({"nodes": k, "rel_error": err})
        if err <= rr_error:
            k_star = k
            break
    if k_star is None:
        k_star = args.max_nodes
        print(f"  no gausslegendre rule up to {args.max_nodes} nodes reaches riemann_right 20's error; using {k_star}")
    if args.gl_nodes is not None:
        print(f"  gausslegendre nodes fixed by --gl-nodes: {k_star} (riemann_right 20's error {rr_error:.2e})")
    else:
        tried = ", ".join(f"{s['nodes']}: {s['rel_error']:.1e}" for s in search_log)
        print(f"  gausslegendre nodes matching riemann_right 20 (error {rr_error:.2e} on {len(search)} examples): "
              f"K* = {k_star} (tried {tried})")

    rows = []
    base = quantile_subset(lengths, args.baseline_examples)

    def summary() -> dict:
        speedups(rows)
        return {"workload": kind, "description": WORKLOADS[kind], "lengths": lengths,
                "pair_first_segment": pair_first, "mean_length": float(np.mean(lengths)),
                "baseline_examples": base, "search_examples": search, "gausslegendre_nodes_matching_rr20": k_star,
                "rr20_error_on_search": rr_error, "search": search_log, "rows": rows}
    checkpoint(summary())  # the reference and K* so far, no rows yet
    base_t = torch.tensor(base, device=device)
    warm_ex = base[:1]

    def per_example_error(per_example):
        refs = [reference[i, :, :, : lengths[i], : lengths[i]] for i in base]
        values = per_example if args.output == "full" else [a.sum(1, keepdim=True) for a in per_example]
        return common.relative_error([v.cpu() for v in values], refs)

    # The naive loop of the original release.
    for m in (64, 20):
        name = f"naive m={m}"
        if m == 64 and args.no_naive64:
            rows.append(skipped(name, "--no-naive64"))
            continue
        timing = common.measure(
            lambda m=m: naive.naive_attribute(model, ids[base_t], mask[base_t], types[base_t], n_steps=m),
            device, repeats=args.baseline_repeats, warmup=1,
            warmup_fn=lambda: naive.naive_attribute(model, ids[warm_ex], mask[warm_ex], types[warm_ex], n_steps=1,
                                                    layers=[shape["layers"] - 1]))
        row = {"row": name, "method": "riemann_left", "steps": m, "backend": "transformers", "dtype": "float32",
               "length": f"padded to {naive.NAIVE_LENGTH}", "rel_error": per_example_error(timing.result[0])}
        rows.append(finish_row(row, timing, base, lengths, [naive.NAIVE_LENGTH] * len(base), "loop", m, args, shape,
                               device, torch.float32))
        print(f"  {name}: {row['seconds']:.2f} s for {len(base)} examples, error {row['rel_error']:.2e}")
        checkpoint(summary())

    # Captum.
    try:
        import captum  # noqa: F401

        timing = common.measure(
            lambda: naive.captum_attribute(model, ids[base_t], mask[base_t], types[base_t], n_steps=20,
                                           method="riemann_right"),
            device, repeats=args.baseline_repeats, warmup=1,
            warmup_fn=lambda: naive.captum_attribute(model, ids[warm_ex], mask[warm_ex], types[warm_ex], n_steps=2,
                                                     layers=[shape["layers"] - 1]))
        row = {"row": "captum rr 20", "method": "riemann_right", "steps": 20, "backend": "captum", "dtype": "float32",
               "length": "real", "rel_error": per_example_error(timing.result[0])}
        rows.append(finish_row(row, timing, base, lengths, [lengths[i] for i in base], "loop", 20, args, shape,
                               device, torch.float32))
        print(f"  captum rr 20: {row['seconds']:.2f} s for {len(base)} examples, error {row['rel_error']:.2e}")
        checkpoint(summary())
    except ImportError:
        rows.append(skipped("captum rr 20", "captum is not installed (pip install captum)"))

    # The engine.
    warm = n_all[: 8 if device.type == "cuda" else 1]
    triton_reason = None
    if device.type != "cuda":
        triton_reason = f"the Triton backend runs on CUDA only; this run is on {device.type}"
    else:
        try:
            resolve_backend("triton", device)
        except AttAttrError as exc:
            triton_reason = str(exc)
    precision_before = torch.get_float32_matmul_precision()
    try:
        # Every torch row before any Triton row: the Triton rows were the slowest (bf16 rr 20 took 107 s on the H200),
        # and a step that runs out of time keeps the rows it finished (`checkpoint`). bf16 first, the headline rows;
        # tf32 on the torch backend only (its reduction product runs in TF32 too).
        for backend in ("torch", "triton"):
            for dtype_name, dtype, precision in ENGINE_PRECISIONS:
                if backend == "triton" and dtype_name == "tf32":
                    continue
                torch.set_float32_matmul_precision(precision)
                reason = triton_reason if backend == "triton" else None
                for method, steps, label in (("riemann_right", 20, "rr 20"), ("gausslegendre", k_star, f"gl {k_star}")):
                    name = f"engine {backend} {dtype_name} {label}"
                    fields = {"method": method, "steps": steps, "backend": backend, "dtype": dtype_name}
                    if reason:
                        rows.append(skipped(name, reason, **fields))
                        continue
                    if dtype_name != "float32" and device.type != "cuda":
                        rows.append(skipped(name, f"{dtype_name} rows run on CUDA only; this run is on {device.type}",
                                            **fields))
                        continue
                    run_dtype = None if dtype is torch.float32 else dtype
                    plan = common.GroupLog()  # the groups of the last timed call

                    def timed_call(m=method, s=steps, d=run_dtype, b=backend, plan=plan):
                        with plan:
                            return engine_call(m, s, d, b)

                    timing = common.measure(
                        timed_call, device, repeats=args.repeats, warmup=1,
                        warmup_fn=lambda m=method, s=steps, d=run_dtype, b=backend: engine_call(m, s, d, b, warm))
                    row = {"row": name, **fields, "length": "real", "rel_error": common.relative_error(
                        attr_of(timing.result), reference), "plan": plan.summary(shape["layers"] * steps)}
                    timing.result = None
                    rows.append(finish_row(row, timing, n_all, lengths, lengths, "engine", steps, args, shape, device,
                                           dtype))
                    # The speed-ups compare equal work: the engine again on the baselines' examples alone (unless
                    # those are all the examples, timed just above).
                    if base == n_all:
                        same, same_error = timing, row["rel_error"]
                    else:
                        same = common.measure(
                            lambda m=method, s=steps, d=run_dtype, b=backend: engine_call(m, s, d, b, base), device,
                            repeats=args.repeats, warmup=0)
                        same_error = common.relative_error(attr_of(same.result), reference[base])
                        same.result = None
                    row["on_baseline_examples"] = {
                        "examples": base, "seconds": same.seconds, "ex_per_s": len(base) / same.seconds,
                        "rel_error": same_error}
                    print(f"  {name}: {row['seconds']:.2f} s for {len(n_all)} examples, error {row['rel_error']:.2e}; "
                          f"{same.seconds:.2f} s on the baselines' {len(base)}, error "
                          f"{row['on_baseline_examples']['rel_error']:.2e}; {common.GroupLog.describe(row['plan'])}")
                    checkpoint(summary())
    finally:
        torch.set_float32_matmul_precision(precision_before)

    return summary()


def speedups(rows: list[dict]) -> None:
    """Speed-ups over the naive loop and Captum, on the examples they ran on (engine rows carry a second timing
    on those examples, so a short or long baseline subset does not skew the ratio); the same for the error."""
    ok = {r["row"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        same = r.get("on_baseline_examples", r)
        r["rel_error_baseline_examples"] = same["rel_error"]
        for key, other in (("x_naive20", "naive m=20"), ("x_naive64", "naive m=64"), ("x_captum", "captum rr 20")):
            r[key] = same["ex_per_s"] / ok[other]["ex_per_s"] if other in ok else None


COLUMNS = [
    ("row", "row", ""), ("examples", "ex", "d"), ("mean_length", "mean n", ".1f"), ("ex_per_s", "ex/s", ".3g"),
    ("x_naive20", "x naive20", ".1f"), ("x_naive64", "x naive64", ".1f"), ("x_captum", "x captum", ".1f"),
    ("gflop_per_ex", "GFLOP/ex", ".4g"), ("tflops", "TFLOP/s", ".3g"), ("peak_pct", "% peak", ""),
    ("peak_mib", "peak MiB", ".0f"), ("rel_error", "rel. error", ".1e"),
    ("rel_error_baseline_examples", "error, baseline ex.", ".1e"),
]


def print_table(result: dict) -> None:
    rows, skips = [], {}
    for r in result["rows"]:
        if r["status"] != "ok":
            skips.setdefault(r["status"], []).append(r["row"])
            continue
        pct = f"{100 * r['peak_fraction']:.1f}" if r.get("peak_fraction") is not None else "n/a"
        rows.append({**r, "peak_pct": pct})
    print(f"\n-- ({result['workload']}) {result['description']}, mean length {result['mean_length']:.1f}; "
          f"K* = {result['gausslegendre_nodes_matching_rr20']}")
    print(common.format_table(rows, COLUMNS))
    print("   x columns and 'error, baseline ex.': on the examples the baselines ran on (the engine timed again on "
          "them); ex/s, TFLOP/s and rel. error: on the row's own examples")
    for status, names in skips.items():
        print(f"   {status}: {', '.join(names)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke test: the 'small' shape (2 layers, hidden 128), 4 examples, baselines on 1")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workloads", default="a,b,c", help="comma list of a, b, c")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (default bert-base)")
    parser.add_argument("--examples", type=int, default=None, help="examples per workload (GPU 256, CPU 2, quick 4)")
    parser.add_argument("--baseline-examples", type=int, default=None,
                        help="examples the naive loop and Captum run on (GPU 32, CPU 1, quick 1)")
    parser.add_argument("--search-examples", type=int, default=16, help="examples for the K* search (at most)")
    parser.add_argument("--max-nodes", type=int, default=16, help="largest Gauss-Legendre rule tried for K*")
    parser.add_argument("--gl-nodes", type=int, default=None,
                        help="use this many Gauss-Legendre nodes instead of searching for K* (random weights make "
                             "the integrand nearly polynomial, so a trained model's K* may be larger)")
    parser.add_argument("--reference-nodes", type=int, default=64, help="Gauss-Legendre nodes of the reference")
    parser.add_argument("--output", choices=("full", "reduced"), default="full")
    parser.add_argument("--repeats", type=int, default=None, help="timed engine calls, median (GPU 3, CPU 1)")
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--no-naive64", action="store_true", help="skip the m=64 naive loop (the slowest row)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, or 1 when the CPU is busy)")
    parser.add_argument("--seed", type=int, default=0, help="model weights")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    args.shape = args.shape or ("small" if args.quick else "bert-base")
    args.examples = args.examples or (4 if args.quick else 256 if gpu else 2)
    args.baseline_examples = min(args.examples, args.baseline_examples or (1 if args.quick or not gpu else 32))
    args.search_examples = min(args.examples, args.search_examples)
    args.repeats = args.repeats or (3 if gpu else 1)
    threads_note = common.set_threads(args.threads, device)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "attattr_fast"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    env = common.environment(device)
    shape = SHAPES[args.shape]
    print(f"device: {env['device']}; torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
          f"captum {env['versions']['captum']}, triton {env['versions']['triton']}; git {env['git']['commit'][:10]}"
          f"{' (dirty)' if env['git']['dirty'] else ''}")
    print(f"model: {args.shape} shape {shape}, random weights (seed {args.seed}); {args.examples} examples per "
          f"workload, baselines on {args.baseline_examples}; engine repeats {args.repeats}")
    model = common.random_bert(**shape, seed=args.seed, device=device)
    warning = common.load_warning(device)
    if warning:
        print(warning)
        env["load_warning"] = warning
    if threads_note:
        print(threads_note)
        env["threads_note"] = threads_note
    kinds = args.workloads.split(",")
    name = "bench_compare" + ("-quick" if args.quick else "")
    if args.workloads != "a,b,c":
        name += "-" + "+".join(kinds)
    started = time.perf_counter()
    results = []

    def save(partial: dict | None = None) -> Path:
        """The JSON so far: rewritten at the start (replacing an older file) and after every row, so a run stopped
        by a time limit keeps what it measured; "complete" only once every workload has finished."""
        done = results + ([partial] if partial else [])
        return common.write_json(payload(done, complete=partial is None and len(done) == len(kinds)), name, device,
                                 args.out)

    def payload(workloads: list[dict], complete: bool) -> dict:
        return {
            "benchmark": "bench_compare", "environment": env,
            "settings": {**vars(args), "model_shape": shape, "workload_descriptions": WORKLOADS,
                         "naive": {"length": naive.NAIVE_LENGTH, "chunk": naive.NAIVE_CHUNK, "rule": "riemann_left"},
                         "captum": {"method": "riemann_right", "n_steps": 20, "length": "real", "batch": "all steps"},
                         "error": "worst layer's max |attr - reference| / max |reference|, reference = engine "
                                  f"gausslegendre {args.reference_nodes} float32",
                         "flops": "DESIGN §2 cost model (bench/common.py: layer_flops, engine_flops, loop_flops)"},
            "workloads": workloads, "complete": complete, "wall_seconds": time.perf_counter() - started,
        }

    save()
    for kind in kinds:
        results.append(run_workload(kind, model, shape, args, device, checkpoint=save))
        save()
    for result in results:
        print_table(result)
    path = save()
    print(f"\nwrote {path} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
