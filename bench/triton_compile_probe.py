"""How long the Triton kernel's first launch takes against its second, per specialisation (GPU).

The engine's Triton rows on the H200 were far slower than its torch rows in a process's first calls
(bench/GPU_NOTES.md). This separates compilation from run time: per length n (LENGTHS: differing in tile
size, in divisibility by 16 and in the number of tiles, with one control), the first launch and a second one
with the same shapes, each synchronised (B = 8, H = 12, d = 64, full output), in float32 (what the engine
passes) and bfloat16.
Run it in a fresh process with an empty Triton cache, or the first launch may be a cache hit:

    TRITON_CACHE_DIR=$(mktemp -d) python bench/triton_compile_probe.py

Writes bench/results/<device>-triton_compile_probe.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from attattr_fast.kernels.attribution_reduce import launch_config, reduce_attributions  # noqa: E402

# 24 and 28 share tile 32 and every integer specialisation Triton makes: neither is divisible by 16, and both
# make the log-sum-exp's batch stride H·n divisible by 16 (288, 336; 25 would not: 300). So 28 is the control: a
# slow first launch there too would mean something other than one compilation per specialisation. 32: tile
# 32, divisible by 16; 48: tile 64, divisible; 66: tile 64, four tiles.
LENGTHS = (24, 28, 32, 48, 66)


def launch_seconds(n: int, dtype: torch.dtype, device: torch.device) -> list[float]:
    q, k, v = (torch.randn(8, 12, n, 64, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn(8, 12, n, 64, device=device)
    lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * 0.125, dim=-1)
    mask = torch.ones(8, n, dtype=torch.bool, device=device)
    times = []
    for _ in range(2):
        common.synchronize(device)
        t0 = time.perf_counter()
        reduce_attributions(q, k, v, lse, grad, mask, scale=0.125, full=True)
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = common.pick_device(None)
    if device.type != "cuda":
        print("triton_compile_probe: needs a CUDA GPU (compilation is what it measures)", file=sys.stderr)
        return 2
    rows, env = [], common.environment(device)
    for dtype in (torch.float32, torch.bfloat16):
        for n in args.lengths:
            first, second = launch_seconds(n, dtype, device)
            tile = launch_config(n, 64).block_m
            rows.append({"dtype": str(dtype).replace("torch.", ""), "n": n, "tile": tile, "first_s": first,
                         "second_s": second})
            print(f"  {rows[-1]['dtype']:8s} n = {n:4d} (tile {tile}): first launch {first:7.3f} s, "
                  f"second {second * 1e3:7.2f} ms")
            path = common.write_json({"benchmark": "triton_compile_probe", "environment": env, "rows": rows},
                                     "triton_compile_probe", device, args.out)  # after every row: a stop keeps them
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
