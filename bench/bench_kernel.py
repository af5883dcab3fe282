"""Benchmark: the fused attribution kernel against the torch ops it replaces (engine.reduce_layer_torch).

Both sides get what the engine gives a backend for one target layer: Ḡ [B, H, n, d] float32 and a padding
mask; the torch ops read the stored probabilities A [B, H, n, n], the kernel reads Q, K and the row lse.

On CUDA: H = 12, d = 64, n in {128, 512, 2048}, float32 and bfloat16, output "full" and "reduced". Every
setting is checked for correctness first (float32: within 1e-5 of the torch ops relative to their largest
magnitude; bfloat16: error against a float64 reference at most twice that of the torch ops), then timed
(triton.testing.do_bench, median) and its peak memory above the inputs measured.
On a machine without CUDA it runs the kernel under TRITON_INTERPRET=1 at small n, checks correctness only,
and says so: no timings. Either way it prints a table and writes JSON (device, versions, git revision, every
setting) to bench/results/.

    python bench/bench_kernel.py                  # the settings above
    python bench/bench_kernel.py --n 512 --dtypes float32
    python bench/bench_kernel.py --quick          # CI smoke run: one small n, 4 heads, float32
    python bench/bench_kernel.py --configs default 32:8 64:8   # launch configurations (tile:warps) compared

`--configs` times the kernel under each launch configuration in place of `launch_config`'s (ptxas, run
offline for sm_90a, reports register spills at 4 warps for float32 tiles of 32 and 64 and bf16 tiles of 64;
none at 8 warps except float32 tile 64: bench/GPU_NOTES.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import triton  # noqa: E402

from attattr_fast.engine import LayerState, reduce_layer_torch  # noqa: E402
from attattr_fast.kernels import attribution_reduce as ar  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP32_RTOL = 1e-5
MIB = 2**20


def make_states(batch: int, heads: int, n: int, head_dim: int, dtype: torch.dtype, device: str, seed: int):
    """(torch-backend state, kernel state, Ḡ, key_mask, lengths): one random layer, right-padded."""
    g = torch.Generator(device=device).manual_seed(seed)
    lengths = [n - (i * n) // (2 * batch) for i in range(batch)]  # from n down to about n/2
    mask = torch.arange(n, device=device).unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, device=device).to(dtype) for _ in range(3))
    grad = torch.randn(batch, heads, n, head_dim, generator=g, device=device) * 1e-2
    scale = head_dim**-0.5
    bias = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(dtype)
    del scores
    common = dict(hidden_in=None, context=None, values=v, scale=scale)
    torch_state = LayerState(probs=probs, queries=None, keys=None, lse=None, **common)
    kernel_state = LayerState(probs=None, queries=q, keys=k, lse=lse, **common)
    return torch_state, kernel_state, grad, mask, lengths


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def check(torch_state, kernel_state, grad, mask, dtype, full: bool) -> dict:
    """Correctness of the kernel on these inputs; 'ok' says whether it passes the rule for its dtype."""
    fast = ar.reduce_layer_triton(kernel_state, grad, mask, full)
    plain = reduce_layer_torch(torch_state, grad, mask, full)
    outputs = [("head_max", 1), ("layer_attr", 3)] + ([("attributions", 0)] if full else [])
    out = {"argmax_equal_fraction": float((fast[2] == plain[2]).all(-1).float().mean())}
    if dtype == torch.float32:
        errs = {name: rel_err(fast[i], plain[i]) for name, i in outputs}
        out.update(rule="kernel vs torch ops <= 1e-5 relative", errors=errs, ok=max(errs.values()) <= FP32_RTOL)
        return out
    exact = ar._ref(kernel_state.queries, kernel_state.keys, kernel_state.values, kernel_state.lse, grad, mask,
                    kernel_state.scale, full=full, dtype=torch.float64)  # fmt: skip
    errs = {name: {"kernel": rel_err(fast[i], exact[i]), "torch": rel_err(plain[i], exact[i])} for name, i in outputs}
    ok = all(e["kernel"] <= 2 * e["torch"] for e in errs.values())
    out.update(rule="error vs float64 <= 2 x torch ops' error", errors=errs, ok=ok)
    return out


def measure(fn, device: str) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was allocated before the call)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return float(ms), float(peak)


def time_torch(torch_state, grad, mask, full: bool, device: str, batch: int) -> dict:
    torch_ms, torch_mib = measure(lambda: reduce_layer_torch(torch_state, grad, mask, full), device)
    return dict(torch_ms=torch_ms, torch_peak_mib_per_example=torch_mib / batch)


def time_kernel(kernel_state, grad, mask, full: bool, device: str, batch: int) -> dict:
    kernel_ms, kernel_mib = measure(lambda: ar.reduce_layer_triton(kernel_state, grad, mask, full), device)
    return dict(kernel_ms=kernel_ms, kernel_peak_mib_per_example=kernel_mib / batch)


@contextlib.contextmanager
def launch_override(config: str):
    """'default', or 'tile:warps' in place of launch_config's tile size and warp count."""
    if config == "default":
        yield
        return
    tile, warps = (int(x) for x in config.split(":"))
    real = ar.launch_config

    def override(seq_len: int, head_dim: int) -> ar.LaunchConfig:
        cfg = real(seq_len, head_dim)
        return ar.LaunchConfig(block_m=tile, block_n=tile, block_d=cfg.block_d, num_warps=warps,
                               num_stages=cfg.num_stages)

    ar.launch_config = override
    try:
        yield
    finally:
        ar.launch_config = real



def write_report(args, device, device_name: str, lengths_n: list[int], rows: list[dict], complete: bool) -> None:
    """The JSON of the rows so far (written after each row too, so a run cut at its time limit keeps them)."""
    report = {
        "benchmark": "bench/bench_kernel.py",
        "device": device_name,
        "timed": ON_GPU,
        "complete": complete,
        "note": None if ON_GPU else "CPU: correctness only under the Triton interpreter; no timings measured",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda},  # fmt: skip
        "git_revision": common.git_revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"heads": args.heads, "head_dim": args.head_dim, "n": lengths_n, "dtypes": args.dtypes,
                     "tokens_per_call": args.tokens, "context_grad_dtype": "float32", "lse_dtype": "float32",
                     "timer": "triton.testing.do_bench(warmup=25, rep=200, median)" if ON_GPU else None,
                     "launch_config": {str(n): vars(ar.launch_config(n, args.head_dim)) for n in lengths_n},
                     "configs": args.configs},
        "rows": rows,
    }  # fmt: skip
    slug = common.device_slug(torch.device(device)) + ("" if ON_GPU else "-interpreter")
    out = args.out or REPO / "bench" / "results" / f"{slug}-bench_kernel{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    if complete:
        print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths (GPU default 128 512 2048)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8192, help="examples per call = max(1, tokens // n)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--quick", action="store_true", help="smoke run: n=24, 4 heads, float32 (CI)")
    parser.add_argument("--configs", nargs="+", default=["default"],
                        help="launch configurations to compare: 'default' or tile:warps (e.g. 32:8)")
    args = parser.parse_args(argv)
    for config in args.configs:
        if config != "default" and not (len(config.split(":")) == 2 and all(x.isdigit() for x in config.split(":"))):
            parser.error(f"--configs: {config!r} is neither 'default' nor tile:warps")
    if args.quick:
        args.n, args.dtypes, args.heads = args.n or [24], ["float32"], 4

    device = "cuda" if ON_GPU else "cpu"
    lengths_n = args.n or ([128, 512, 2048] if ON_GPU else [24, 70])
    device_name = common.device_name(torch.device(device))
    if not ON_GPU:
        print("No CUDA device: correctness only, under the Triton interpreter (TRITON_INTERPRET=1), at small n;")
        print("no timings or memory figures are measured on the CPU.")
        args.tokens = min(args.tokens, 140)

    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in lengths_n:
            batch = max(1, args.tokens // n)
            torch_state, kernel_state, grad, mask, lengths = make_states(
                batch, args.heads, n, args.head_dim, dtype, device, seed=n)
            for output in ("full", "reduced"):
                full = output == "full"
                torch_timing = time_torch(torch_state, grad, mask, full, device, batch) if ON_GPU else {}
                for config in args.configs:
                    row = {"dtype": dtype_name, "n": n, "batch": batch, "lengths": lengths, "output": output,
                           "config": config}
                    with launch_override(config):
                        row["check"] = check(torch_state, kernel_state, grad, mask, dtype, full)
                        if ON_GPU and row["check"]["ok"]:
                            row.update(torch_timing, **time_kernel(kernel_state, grad, mask, full, device, batch))
                            row["speedup"] = row["torch_ms"] / row["kernel_ms"]
                    rows.append(row)
                    write_report(args, device, device_name, lengths_n, rows, complete=False)
                if ON_GPU:
                    torch.cuda.empty_cache()
            del torch_state, kernel_state, grad, mask

    header = f"{'dtype':>8} {'n':>5} {'B':>3} {'output':>7} {'config':>7} {'check':>5}"
    if ON_GPU:
        header += f" {'torch ms':>9} {'kernel ms':>9} {'speedup':>7} {'torch MiB/ex':>12} {'kernel MiB/ex':>13}"
    print(f"device: {device_name}; H={args.heads}, d={args.head_dim}")
    print(header)
    for r in rows:
        line = f"{r['dtype']:>8} {r['n']:>5} {r['batch']:>3} {r['output']:>7} {r['config']:>7}"
        line += f" {'ok' if r['check']['ok'] else 'FAIL':>5}"
        if "torch_ms" in r:
            line += f" {r['torch_ms']:>9.3f} {r['kernel_ms']:>9.3f} {r['speedup']:>7.2f}"
            line += f" {r['torch_peak_mib_per_example']:>12.1f} {r['kernel_peak_mib_per_example']:>13.1f}"
        print(line)

    write_report(args, device, device_name, lengths_n, rows, complete=True)
    return 0 if all(r["check"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
