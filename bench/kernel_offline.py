"""The attribution kernel compiled for an NVIDIA GPU on a machine without one: what ptxas says, and which
Triton specialisations the engine's calls would compile.

Triton compiles one binary per specialisation: its constexprs (tile, FULL, ...) and, for integer arguments,
whether each equals 1 or is divisible by 16. This script builds the kernel's arguments with the launcher's
own `prepare_launch`, on states laid out as the engine's (float32 prefix), and
  1. compiles each (dtype, tile, warps) for the target and reports registers and spill bytes (ptxas -v) and
     the compile time on this machine;
  2. counts the distinct specialisations the groups of a workload hit (bench/plan_report.py's plan), that is
     the compilations a fresh process pays for on its first calls.
It uses Triton internals (the JIT's argument binder, ASTSource); written against Triton 3.9.

    python bench/kernel_offline.py                    # sm_90a; workload (a), 256 examples, budget 74.6 GB
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default before 3.10, as on the H200 run

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_compare  # noqa: E402
import common  # noqa: E402
import plan_report  # noqa: E402

from attattr_fast.adapters import adapter_for  # noqa: E402
from attattr_fast.kernels import attribution_reduce as ar  # noqa: E402

KERNEL = ar._attribution_tiles


def kernel_args(n: int, n_ex: int = 8, heads: int = 12, head_dim: int = 64, dtype=torch.float32, full: bool = True,
                tile: int | None = None, warps: int | None = None):
    """(positional args, keyword args) of one launch, from `attribution_reduce.prepare_launch` on states laid
    out as the engine's (Q, K, V split from one [B, n, 3·H·d] projection, seen as [B, H, n, d]; Ḡ one layer of
    [B, L, H, n, d]).
    CPU tensors: only dtypes, strides and alignment matter here."""
    qkv = torch.empty(n_ex, n, 3 * heads * head_dim, dtype=dtype)
    q, k, v = (t.view(n_ex, n, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    lse = torch.empty(n_ex, heads, n)
    grad = torch.empty(n_ex, 12, heads, n, head_dim)[:, 3]
    mask = torch.ones(n_ex, n, dtype=torch.bool)
    launch = ar.prepare_launch(q, k, v, lse, grad, mask, scale=head_dim**-0.5, n_nodes=1, quad_weights=None,
                               full=full, block_m=tile, block_n=tile)
    kwargs = dict(launch.kwargs, UPCAST_DOTS=False)  # as on a GPU, whatever the interpreter setting here
    if warps:
        kwargs["num_warps"] = warps
    return launch.args, kwargs


class Compiler:
    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binder = create_function_from_signature(KERNEL.signature, KERNEL.params, self.backend)

    def key(self, args, kwargs) -> str:
        _, specialization, options = self.binder(*args, **kwargs)
        return str(specialization) + str(options)

    def compile(self, args, kwargs):
        bound, specialization, options = self.binder(*args, **kwargs)
        options, signature, constexprs, attrs = KERNEL._pack_args(self.backend, kwargs, bound, specialization, options)
        start = time.perf_counter()
        kernel = triton.compile(ASTSource(KERNEL, signature, constexprs, attrs), target=self.target,
                                options=options.__dict__)
        return kernel, time.perf_counter() - start


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill-store bytes) from ptxas -v, with the newest ptxas Triton ships."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    candidates = sorted(bin_dir.glob("ptxas*"), key=lambda p: p.name != "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for ptxas in candidates:
            command = [str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(src.with_suffix(".cubin"))]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode == 0:
                regs = re.search(r"Used (\d+) registers", run.stderr)
                spill = re.search(r"(\d+) bytes spill stores", run.stderr)
                return int(regs.group(1)), int(spill.group(1)) if spill else 0
    raise RuntimeError(f"no ptxas in {bin_dir} accepted the PTX: {run.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--budget", type=float, default=74.6e9, help="bytes per chunk for the workload's plan")
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args(argv)
    compiler = Compiler(args.arch)

    print(f"== registers and spills, sm_{args.arch}a (H = 12, d = 64, full output)")
    for dtype in (torch.float32, torch.bfloat16):
        for tile in (16, 32, 64):
            for warps in (4, 8):
                kernel, seconds = compiler.compile(*kernel_args(tile, dtype=dtype, tile=tile, warps=warps))
                regs, spill = ptxas_report(kernel.asm["ptx"], args.arch)
                print(f"  {str(dtype).removeprefix('torch.'):9s} tile {tile:2d}, {warps} warps: {regs:3d} registers, "
                      f"{spill:5d} bytes spill stores; compiled in {seconds:.1f} s")

    print(f"\n== specialisations hit by workload (a), {args.examples} examples, budget {args.budget / 1e9:.1f} GB")
    model = common.random_bert(**bench_compare.SHAPES["bert-base"], seed=0, device=torch.device("meta"))
    adapter = adapter_for(model)
    lengths, _ = bench_compare.workload_lengths("a", args.examples, seed=ord("a"))
    ordered = sorted(lengths)
    for steps in (20, 2):
        for old in (True, False):
            groups = plan_report.plan(adapter, lengths, steps, torch.bfloat16, int(args.budget),
                                      "cuda", old)  # fmt: skip
            keys = {compiler.key(*kernel_args(ordered[end - 1], n_ex=end - begin)) for begin, end, _ in groups}
            policy = "sized by the longest" if old else "plan_groups"
            print(f"  {steps:2d} nodes, {policy:20s}: {len(groups):2d} groups, {len(keys)} specialisations")
    every = {compiler.key(*kernel_args(n, n_ex=4)) for n in range(2, 513)}
    print(f"  any n in 2..512: {len(every)} specialisations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
