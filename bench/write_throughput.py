"""What storing results costs the host: `results.write_shard` (float16 encoding, serialising, checksums, the file
writes and their fsync) per record, for a shard of BERT-base records (12 layers, 12 heads) at the lengths of
workload (a) (mean 25 tokens), full and reduced output, stored as float32 and float16.

A corpus run on a GPU waits for the device while the host writes; since the background writes of
`corpus.BackgroundWrites` a shard is written while the next one computes, so a run goes at the slower of the
two rather than their sum. This measures the host's side; compare it with the engine's seconds per example.

    python bench/write_throughput.py                        # 256 records per shard, 3 repeats
    python bench/write_throughput.py --examples 64 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_compare  # noqa: E402
from common import environment, format_table, write_json  # noqa: E402

from attattr_fast import results  # noqa: E402
from attattr_fast.results import Record  # noqa: E402

LAYERS = HEADS = 12
TOP_K = 5


def record(index: int, n: int, full: bool, generator: torch.Generator) -> Record:
    """A record shaped as a corpus run makes it (values random; attributions at a typical small scale)."""

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    wide = (LAYERS, HEADS, n, n)
    return Record(
        index=index, tokens=["word"] * n, text=" ".join(["word"] * (n - 2)), text_pair=None, label="positive",
        target=1, target_label="positive", prob=0.9, layers=list(range(LAYERS)),
        head_max=randn(LAYERS, HEADS), head_argmax=torch.zeros(LAYERS, HEADS, 2, dtype=torch.long),
        layer_attr=randn(LAYERS, n, n, scale=1e-3), delta=randn(LAYERS, scale=1e-7),
        attributions=randn(*wide, scale=1e-4) if full else None,
        attention=torch.rand(*wide, generator=generator) if full else None,
        top_query=torch.zeros(LAYERS, TOP_K, dtype=torch.long), top_key=torch.zeros(LAYERS, TOP_K, dtype=torch.long),
        top_score=randn(LAYERS, TOP_K, scale=1e-3),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256, help="records per shard (a corpus run's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: what the host spares)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths, _ = bench_compare.workload_lengths("a", args.examples, seed=ord("a"))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for output in ("full", "reduced"):
            generator = torch.Generator().manual_seed(0)
            shard = [record(i, n, output == "full", generator) for i, n in enumerate(lengths)]
            for store in (torch.float16, torch.float32):
                results.write_shard(directory, "shard-00000", shard, store)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    commit = results.write_shard(directory, "shard-00000", shard, store)
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                rows.append({"output": output, "store_dtype": str(store).removeprefix("torch."),
                             "records": len(shard), "mean_length": sum(lengths) / len(lengths),
                             "seconds": seconds, "times": times, "ms_per_record": 1e3 * seconds / len(shard),
                             "bytes_per_record": sum(commit["bytes"].values()) / len(shard)})  # fmt: skip
    print(format_table(rows, [("output", "output", ""), ("store_dtype", "stored as", ""),
                              ("ms_per_record", "ms/record", ".2f"), ("bytes_per_record", "bytes/record", ".0f")]))
    path = write_json({"benchmark": "write_throughput", "environment": environment(torch.device("cpu")),
                       "threads": args.threads, "rows": rows}, "write_throughput", torch.device("cpu"),
                      args.out_dir)  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
