"""Where the engine's time goes on workload (a) (issue 4's profile evidence), and the device's ceilings.

One engine call on the workload-(a) examples of bench_compare (BERT-base shape, random weights, all 12 layers,
full output) under torch.profiler, per (backend, dtype, rule) case. Per case: wall time, the summed GPU kernel
time and its share of the wall (the rest is the GPU waiting on the host: launches, syncs, Python), kernel
launches, host syncs, GPU time by category (matmuls, attention, the Triton reduction, copies, element-wise and
normalisation), the top kernels, and the groups the engine ran (examples, padded length, rows per chunk; the
padding they computed), and the matrix-product FLOPs the call executed (torch.profiler's count) over the
cost model's (bench/common.py engine_flops, what TFLOP/s figures divide). Before that, the ceilings measured
on this device: a large bf16 and a float32 matrix product, and bf16 products at the engine's own shapes
(rows·n tokens × 768 → 768/3072); after the cases (or alone, with --group-overhead), what one more group
costs (`group_scaling`: the same sentences split into 2, 4, 8, … groups), in row-tokens: the figure
`engine.GROUP_OVERHEAD_TOKENS` stands for.

With --phases (and in --quick), each case also runs phase by phase (`engine.phase_hook`): prefix, gather, rows
forward, rows backward, accumulate, baseline, reduce, collect, each between two device synchronisations. Per
phase: its seconds and share of the call, and under the profiler the device time of the kernels that ran in it
(binned by their start time; on the CPU the aten ops' own time), by category, over the phase's length: a phase
whose device is busy most of its time is bound by its kernels, one whose device idles is bound by the host.

    python bench/profile_engine.py                 # GPU: 256 examples (a), the cases in --help, group overhead
    python bench/profile_engine.py --quick         # CPU smoke test: small shape, 4 examples, CPU activity only
    python bench/profile_engine.py --group-overhead  # the group overhead only (CPU: BERT-base, 16 sentences)
    python bench/profile_engine.py --phases        # GPU: torch bf16 gl 2 and rr 20 on 256 examples, phase by phase

Writes bench/results/<device>-profile_engine[-quick|-group-overhead|-phases].json.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_compare  # noqa: E402
import common  # noqa: E402

from attattr_fast import AttentionAttribution, engine  # noqa: E402

# Kernel-name substrings per category, first match wins (lower-cased names).
CATEGORIES = (
    ("attribution_reduce (triton)", ("_attribution_tiles",)),
    ("attention (sdpa/flash)", ("flash", "fmha", "attention", "efficient_attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "sm80", "wgmma", "matmul", "cublas", "aten::mm",
                "aten::addmm", "aten::bmm", "aten::linear")),
    ("softmax", ("softmax",)),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copy / cat / index", ("copy", "cat", "index", "gather", "scatter", "memcpy", "memset", "fill")),
    ("reduce", ("reduce",)),
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "element-wise / other"


def matmul_ceiling(device, dtype, m: int, k: int, n: int, repeats: int = 20) -> float:
    """TFLOP/s of an m×k @ k×n product (median of `repeats`, random data, after warm-up)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * m * k * n / float(np.median(times)) / 1e12


def ceilings(device) -> dict:
    out = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    out["bf16 8192^3"] = matmul_ceiling(device, torch.bfloat16, 8192, 8192, 8192)
    out["float32 8192^3"] = matmul_ceiling(device, torch.float32, 8192, 8192, 8192, repeats=5)
    for tokens in (4096, 16384, 65536):  # rows × n tokens of one engine chunk
        out[f"bf16 {tokens}x768 @ 768x768"] = matmul_ceiling(device, torch.bfloat16, tokens, 768, 768)
        out[f"bf16 {tokens}x768 @ 768x3072"] = matmul_ceiling(device, torch.bfloat16, tokens, 768, 3072)
    for key, value in out.items():
        if key != "float32_matmul_precision":
            print(f"  ceiling {key}: {value:.0f} TFLOP/s")
    return out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # the leaves torch.profiler counts FLOPs on


def profile_case(call, device, flops: float, rows_per_example: int) -> dict:
    call()  # warm-up (Triton compilation, cuBLAS handles)
    common.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with common.GroupLog() as groups, profile(activities=activities, with_flops=True) as prof:
        t0 = time.perf_counter()
        call()
        common.synchronize(device)
        wall = time.perf_counter() - t0
    by_cat, kernels, launches, syncs = defaultdict(float), defaultdict(lambda: [0.0, 0]), 0, 0
    # Matrix-product FLOPs the profiler counted on the ops the call ran, forward and backward; the attention
    # inside scaled_dot_product_attention is not counted (by the cost model 0.5% of a layer at n = 25, 2.7% at
    # 128). Op counts: the aten ops the call dispatched, views and allocations included.
    executed = 0.0
    op_counts = Counter()
    for evt in prof.events():
        name = evt.name
        if name.startswith("aten::"):
            op_counts[name] += 1
        if name in MATMUL_OPS:
            executed += evt.flops or 0
        if is_gpu_work(evt):
            us = evt.time_range.elapsed_us()
            by_cat[category(name)] += us
            kernels[name][0] += us
            kernels[name][1] += 1
        elif name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            launches += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize"):
            syncs += 1
    gpu_s = sum(by_cat.values()) / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "plan": groups.summary(rows_per_example),
        "wall_s": wall, "gpu_kernel_s": gpu_s, "gpu_busy_fraction": gpu_s / wall if device.type == "cuda" else None,
        "tflops_wall": flops / wall / 1e12, "tflops_gpu_busy": flops / gpu_s / 1e12 if gpu_s else None,
        "executed_matmul_flops": executed, "executed_over_cost_model": executed / flops,
        "aten_ops": sum(op_counts.values()), "aten_op_counts_top": dict(op_counts.most_common(20)),
        "kernel_launches": launches, "host_syncs_and_copies": syncs,
        "gpu_seconds_by_category": {k: v / 1e6 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "gpu_s": t / 1e6, "calls": c} for n, (t, c) in top],
        "cpu_top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        if device.type != "cuda" else None,
    }


PHASE_MARK = "phase::"  # the profiler range each phase runs in


class PhaseClock:
    """`engine.phase_hook` for --phases: each phase between two device synchronisations, timed on the host and
    marked for the profiler, so the kernels that ran in it can be found by their start time."""

    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        common.synchronize(self.device)
        start = time.perf_counter()
        with record_function(PHASE_MARK + name):
            yield
            common.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1


@contextlib.contextmanager
def phases_timed_by(clock: PhaseClock):
    engine.phase_hook = clock
    try:
        yield clock
    finally:
        engine.phase_hook = None


def is_gpu_work(event) -> bool:
    """Whether a profiler event is a GPU kernel, copy or fill: not a range (the phases', or any other
    `record_function`) that the GPU trace repeats as a user annotation."""
    return (event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith(PHASE_MARK))


def device_work(prof, device) -> list[tuple[str, float, float]]:
    """(name, start µs, µs) of what ran on the device: the GPU's kernels, copies and fills; on the CPU, each aten
    op's own time (its children's excluded, so nothing counts twice) under the name of the outermost aten op it ran
    in (addmm's copy of its bias is matrix-product time, attention's zeroed buffers attention time)."""
    if device.type == "cuda":
        return [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events() if is_gpu_work(e)]
    work = []
    for e in prof.events():
        if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU:
            outermost, parent = e, e.cpu_parent
            while parent is not None:
                if parent.name.startswith("aten::"):
                    outermost = parent
                parent = parent.cpu_parent
            work.append((outermost.name, e.time_range.start, e.self_cpu_time_total))
    return work


def phase_case(call, device) -> dict:
    """One call phase by phase (see the module's docstring), after a warm-up and one call without synchronisations
    (the phases' sum exceeds it by what the synchronisations cost: the overlap of host and device they prevent)."""
    call()
    common.synchronize(device)
    start = time.perf_counter()
    call()
    common.synchronize(device)
    unsynced = time.perf_counter() - start
    with phases_timed_by(PhaseClock(device)) as clock:
        start = time.perf_counter()
        call()
        common.synchronize(device)
        phased = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with phases_timed_by(PhaseClock(device)), profile(activities=activities) as prof:
        call()
        common.synchronize(device)
    windows = sorted((e.time_range.start, e.time_range.end, e.name[len(PHASE_MARK):]) for e in prof.events()
                     if e.name.startswith(PHASE_MARK) and e.device_type == torch.autograd.DeviceType.CPU)
    starts = [w[0] for w in windows]
    window_us, busy_us = defaultdict(float), defaultdict(float)
    by_category = defaultdict(lambda: defaultdict(float))
    for begin, end, name in windows:
        window_us[name] += end - begin
    outside_us = 0.0  # device work that started in no phase: the call's own work between phases
    for name, begin, us in device_work(prof, device):
        i = bisect.bisect_right(starts, begin) - 1
        if i < 0 or begin >= windows[i][1]:
            outside_us += us
            continue
        phase = windows[i][2]
        busy_us[phase] += us
        by_category[phase][category(name)] += us
    phases = {}
    for name in sorted(clock.seconds, key=lambda k: -clock.seconds[k]):
        cats = by_category[name]
        total = sum(cats.values())
        phases[name] = {
            "calls": clock.calls[name], "seconds": clock.seconds[name], "share_of_call": clock.seconds[name] / phased,
            "profiled_seconds": window_us[name] / 1e6,
            "device_busy_fraction": busy_us[name] / window_us[name] if window_us[name] else None,
            "device_seconds_by_category": {k: v / 1e6 for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "category_shares": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])} if total else {},
        }
    return {"wall_s_unsynced": unsynced, "wall_s_phased": phased,
            "outside_phases_s": phased - sum(clock.seconds.values()),
            "device_work_outside_phases_s": outside_us / 1e6,
            "device_work_kind": "CUDA kernels, copies and fills" if device.type == "cuda" else "aten ops' own CPU time",
            "phases": phases}


def print_phases(case: str, res: dict) -> None:
    print(f"\n== {case}, phase by phase: {res['wall_s_unsynced']:.3f} s unsynchronised, {res['wall_s_phased']:.3f} s "
          f"with a synchronisation around each phase ({res['outside_phases_s']:.3f} s outside the phases)")
    print(f"   {'phase':14s} {'calls':>5s} {'seconds':>8s} {'share':>6s} {'busy':>5s}  device time by category")
    for name, p in res["phases"].items():
        busy = "" if p["device_busy_fraction"] is None else f"{100 * p['device_busy_fraction']:4.0f}%"
        cats = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(p["category_shares"].items())[:4])
        print(f"   {name:14s} {p['calls']:5d} {p['seconds']:8.3f} {100 * p['share_of_call']:5.0f}% {busy:>5s}  {cats}")


def group_scaling(aa, device, vocab_size: int, dtype, n: int = 24, examples: int = 64, splits=(2, 4, 8, 16, 32),
                  repeats: int = 3) -> dict:
    """What one more group costs, in row-tokens (engine.GROUP_OVERHEAD_TOKENS). `examples` sentences of n tokens
    (gausslegendre 2, all layers, reduced output) run as k groups of equal size (internal_batch_size), and half
    of them in half as many groups; least squares fits time = c + a·k + b·T (T: row-tokens) to all runs, so
    the call's own costs (c: validation, weight casts, collection) stay out of a and b. Returns the fit, its
    residuals and a/b."""
    rows_per_example = 2 * aa.adapter.n_layers

    def timed(count: int, groups: int) -> float:
        ids, mask, types = (t.to(device) for t in common.random_batch([n] * count, vocab_size, seed=count))
        rows = count // groups * rows_per_example

        def call():
            return aa.attribute(ids, mask, types, method="gausslegendre", n_steps=2, dtype=dtype, backend="torch",
                                output="reduced", internal_batch_size=rows, result_device=device)

        seconds = common.measure(call, device, repeats=repeats, warmup=1).seconds
        print(f"  {count:3d} examples in {groups:2d} groups ({count * rows_per_example * n} row-tokens): "
              f"{1e3 * seconds:9.1f} ms")
        return seconds

    runs = [(examples, k) for k in splits] + [(examples // 2, max(splits) // 2)]
    seconds = np.array([timed(count, k) for count, k in runs])
    design = np.array([[1.0, k, count * rows_per_example * n] for count, k in runs])
    (c, a, b), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    residuals = seconds - design @ np.array([c, a, b])
    print(f"  fit: c = {1e3 * c:.1f} ms per call, a = {1e3 * a:.2f} ms per group, b = {1e6 * b:.3f} us per row-token, "
          f"largest residual {1e3 * np.abs(residuals).max():.1f} ms: a/b = {a / b:.0f} row-tokens "
          f"(engine.GROUP_OVERHEAD_TOKENS: {engine.GROUP_OVERHEAD_TOKENS})")
    timed_runs = [{"examples": count, "groups": k, "seconds": float(t)} for (count, k), t in zip(runs, seconds)]
    return {"n": n, "runs": timed_runs,
            "c_s_per_call": float(c), "a_s_per_group": float(a), "b_s_per_row_token": float(b),
            "residuals_s": residuals.tolist(), "overhead_row_tokens": float(a / b)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: small shape, 4 examples")
    parser.add_argument("--device", default=None)
    parser.add_argument("--examples", type=int, default=None, help="workload (a) examples (GPU 256, quick 4)")
    parser.add_argument("--cases", default=None,
                        help="comma list of backend:dtype:method:steps[:rows per chunk] (GPU default: torch bf16 "
                             "rr 20, gl 2 and rr 20 with 6144 rows per chunk, torch float32 gl 2, triton bf16 gl 2 "
                             "last, as its compilation is slow)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--group-overhead", action="store_true", help="only the group-overhead measurement")
    parser.add_argument("--phases", action="store_true",
                        help="each case phase by phase only (GPU default cases: torch bf16 gl 2 and rr 20)")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    shape = bench_compare.SHAPES["small" if args.quick else "bert-base"]
    count = args.examples or (4 if args.quick or not gpu else 256)
    default = ["torch:bf16:riemann_right:20", "torch:bf16:gausslegendre:2", "torch:bf16:riemann_right:20:6144",
               "torch:float32:gausslegendre:2", "triton:bf16:gausslegendre:2"]
    if args.phases:
        default = ["torch:bf16:gausslegendre:2", "torch:bf16:riemann_right:20"]
    if not gpu:
        default = ["torch:float32:gausslegendre:2" if args.phases else "torch:float32:riemann_right:20"]
    cases = [] if args.group_overhead else args.cases.split(",") if args.cases else default
    env = common.environment(device)
    print(f"device: {env['device']}; torch {env['versions']['torch']}, triton {env['versions']['triton']}")
    model = common.random_bert(**shape, seed=0, device=device)
    lengths, _ = bench_compare.workload_lengths("a", count, seed=ord("a"))
    ids, mask, types = (t.to(device) for t in common.random_batch(lengths, model.config.vocab_size, seed=ord("a")))
    aa = AttentionAttribution(model)
    name = "profile_engine" + ("-quick" if args.quick else "-group-overhead" if args.group_overhead
                               else "-phases" if args.phases else "")
    payload = {"benchmark": "profile_engine", "environment": env, "shape": shape, "examples": count,
               "mean_length": float(np.mean(lengths)),
               "ceilings_tflops": ceilings(device) if gpu and not (args.group_overhead or args.phases) else None,
               "cases": {}}
    for case in cases:
        backend, dtype_name, method, steps, *chunk = case.split(":")
        chunk = int(chunk[0]) if chunk else None
        if dtype_name == "bf16" and not gpu:
            print(f"  {case}: skipped (bf16 on CUDA only)")
            continue
        dtype = None if dtype_name == "float32" else bench_compare.DTYPES[dtype_name]
        flops = float(sum(common.engine_flops(n, shape["layers"], int(steps), shape["hidden"], shape["intermediate"])
                          for n in lengths))

        def call(backend=backend, dtype=dtype, method=method, steps=int(steps), chunk=chunk):
            return aa.attribute(ids, mask, types, method=method, n_steps=steps, dtype=dtype, backend=backend,
                                output="full", internal_batch_size=chunk, result_device=device)

        try:
            if args.phases:
                res = {"phases": phase_case(call, device)}
            else:
                res = profile_case(call, device, flops, rows_per_example=shape["layers"] * int(steps))
                if args.quick:
                    res["phases"] = phase_case(call, device)
        except Exception as exc:  # one failing case must not lose the others
            print(f"\n== {case}: failed: {type(exc).__name__}: {exc}")
            payload["cases"][case] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        payload["cases"][case] = res
        common.write_json(payload, name, device, args.out)
        if "phases" in res:
            print_phases(case, res["phases"])
        if args.phases:
            continue
        busy = f", GPU busy {100 * res['gpu_busy_fraction']:.0f}%" if gpu else ""
        print(f"\n== {case}: wall {res['wall_s']:.3f} s, {res['tflops_wall']:.1f} TFLOP/s{busy}, "
              f"{res['kernel_launches']} launches, {res['host_syncs_and_copies']} syncs/copies; matrix products "
              f"executed {res['executed_over_cost_model']:.2f}x the cost model's FLOPs")
        plan = res["plan"]
        print(f"   {common.GroupLog.describe(plan)}, {plan['row_tokens_per_group_mean']:.0f} row-tokens per group")
        for cat, secs in res["gpu_seconds_by_category"].items():
            print(f"   {cat:30s} {secs:8.4f} s")
        for k in res["top_kernels"][:8]:
            print(f"   {k['gpu_s']:8.4f} s {k['calls']:6d}x  {k['name'][:90]}")
    if args.quick or args.group_overhead:
        print("\n== group overhead (time = c + a · groups + b · row-tokens)")
        if args.quick:
            sizes = dict(examples=8, splits=(2, 4, 8))
        else:  # the GPU's defaults; on the CPU (a BERT-base call of 16 sentences takes about 20 s) groups of 1
            # to 8 sentences, where the CPU's default 1 GiB budget holds 2 at n = 24
            sizes = {} if gpu else dict(examples=16, splits=(2, 4, 8, 16), repeats=2)
        payload["group_scaling"] = group_scaling(aa, device, model.config.vocab_size,
                                                 torch.bfloat16 if gpu else None, **sizes)
    path = common.write_json(payload, name, device, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
