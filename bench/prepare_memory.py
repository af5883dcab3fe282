"""What a corpus costs before any attribution: the peak resident-set growth of `corpus.prepare` (tokenising
and checking every example up front) for N copies of a short review, alone and with one long example added.

Each case runs in its own process, so one case's freed memory does not hide the next one's peak. Since
`text.Tokenized` (unpadded tokens), one long example adds its own tokens only; before, the whole corpus was
padded to the longest example (three int64 [N, longest] tensors on every rank). Since the token strings are
interned, each token costs a pointer rather than a string of its own.

    python bench/prepare_memory.py                  # 100,000 examples on the built-in model's tokenizer
    python bench/prepare_memory.py --examples 1000000
    python bench/prepare_memory.py --text "good movie"     # 4 tokens each
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


REVIEW = "the acting is wonderful but the plot of this long film is slow and the ending is clumsy"


def measure(examples: int, long_tokens: int, text: str) -> dict:
    """In this process: prepare's peak RSS growth (MiB) and seconds."""
    from attattr_fast import AttentionAttribution, load_classifier
    from attattr_fast.corpus import prepare
    from attattr_fast.datasets import Example

    model, tokenizer = load_classifier()
    aa = AttentionAttribution(model)
    data = [Example(text) for _ in range(examples)]
    if long_tokens:
        data.append(Example(" ".join(["good"] * long_tokens)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    corpus = prepare(aa, tokenizer, data)
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in KiB on Linux
    return {"examples": len(data), "longest": max(corpus.lengths), "tokens": sum(corpus.lengths),
            "peak_rss_growth_mib": growth, "seconds": seconds}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--long-tokens", type=int, default=500, help="words of the one long example")
    parser.add_argument("--text", default=REVIEW, help="the text of every short example (default: 20 tokens)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.text)))
        return 0

    import torch
    from common import environment, write_json

    rows = []
    for long_tokens in (0, args.long_tokens):
        child = subprocess.run([sys.executable, __file__, "--child", str(args.examples), str(long_tokens),
                                "--text", args.text], capture_output=True, text=True, check=True)  # fmt: skip
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['examples']:>9,} examples, longest {row['longest']:>4} tokens: prepare's peak RSS grew "
              f"{row['peak_rss_growth_mib']:.0f} MiB in {row['seconds']:.1f} s")
    payload = {"benchmark": "prepare_memory", "environment": environment(torch.device("cpu")), "text": args.text,
               "rows": rows}
    print(f"wrote {write_json(payload, 'prepare_memory', torch.device('cpu'), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
