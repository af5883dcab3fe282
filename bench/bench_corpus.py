"""Corpus scale on this machine: `attattr-fast attribute` over 10,000 short examples, with bounded memory.

Builds a small random BERT classifier (saved with save_pretrained, word-level tokenizer) and a TSV of short
random sentences, then runs the real command line in a child process for a small and a large corpus, the child's
progress bar shown as it goes. For each run: wall time, examples/s, how long the engine waited for shard writes
(the child's summary line), the child's peak resident set (from wait4) and its resident set sampled through the
run. Memory is bounded when the large run's peak is about the small
run's: nothing in a run grows with the corpus except the encoded input (a few bytes per token).

Correctness first: every run must hold every example once, in input order, and sampled records must match a
direct `AttentionAttribution.attribute` call on that example alone (to float16 storage precision; bf16 rows
to 5e-2, as they differ with the batch they ran in).

    python bench/bench_corpus.py                    # 1,000 and 10,000 examples
    python bench/bench_corpus.py --sizes 10000 --memory-budget 256MiB
    # on a GPU, BERT-base: is a full-output run bound by the engine or by writing its results?
    python bench/bench_corpus.py --device cuda --sizes 4096 --layers 12 --heads 12 --hidden 768 \
        --method gausslegendre --steps 2 --dtype bfloat16 --name corpus-bert-base
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, format_table, random_bert, write_json  # noqa: E402

WORDS = ("the a an and of to is was it this that film movie story plot actors acting music scene ending "
         "good great fine wonderful moving funny clever bad awful dull boring clumsy slow long short not very "
         "too quite really loved hated liked enjoyed , . !").split()  # fmt: skip


def build_model(directory: Path, layers: int, heads: int, hidden: int) -> Path:
    """A random BERT sentiment classifier with a word-level tokenizer, saved to `directory`."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    model = random_bert(layers=layers, heads=heads, hidden=hidden, intermediate=4 * hidden, vocab_size=len(vocab),
                        max_positions=128)  # fmt: skip
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(directory)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=128).save_pretrained(directory)
    return directory


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """n short sentences (3–16 words) with labels."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        f.write("text\tlabel\n")
        for _ in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16)))
            f.write(f"{words}\t{rng.choice(('negative', 'positive'))}\n")
    return path


def _vm_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_cli(argv: list[str], env: dict[str, str]) -> dict:
    """Run the command line in a child, sampling its RSS; (seconds, peak RSS from wait4, RSS samples, the
    seconds its summary line says it waited for shard writes). Its stderr is shown as it comes."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "attattr_fast.cli", *argv], env=env, stderr=subprocess.PIPE)
    tail = bytearray()

    def relay():  # the progress bar as it comes, and the last lines for the summary
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.extend(chunk)
            del tail[:-8192]

    relayer = threading.Thread(target=relay, daemon=True)
    relayer.start()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = _vm_rss(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    relayer.join()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"attattr-fast exited with {proc.returncode}")
    waited = re.search(r"; ([0-9.]+) s waiting for shard writes", tail.decode("utf-8", "replace"))
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "samples": samples,
            "write_wait_s": float(waited.group(1)) if waited else 0.0}  # fmt: skip


def check(out: Path, corpus: Path, model_dir: Path, n: int, options: dict, device: str, n_checks: int = 5) -> float:
    """Every example once in input order; sampled records equal a direct call with the same options. Returns the
    worst relative error of the layer sums (float16 storage; bf16 rows also differ with the batch they ran in)."""
    from attattr_fast import AttentionAttribution, load_classifier, load_results

    res = load_results(out)
    assert len(res) == n and res.complete and res.indices == list(range(n)), "missing or extra examples"
    model, tokenizer = load_classifier(model_dir)
    aa = AttentionAttribution(model.to(device))
    texts = [line.split("\t")[0] for line in corpus.read_text(encoding="utf-8").splitlines()[1:]]
    tolerance = 2e-3 if options["dtype"] in (None, "float32") else 5e-2
    worst = 0.0
    for i in random.Random(1).sample(range(n), n_checks):
        record = res[i]
        assert record.text == texts[i]
        enc = tokenizer([texts[i]], return_tensors="pt")
        direct = aa.attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], backend="torch",
                              n_steps=options["steps"], method=options["method"], dtype=options["dtype"],
                              output="reduced")  # fmt: skip
        want = direct.layer_attr[0].cpu()
        err = float((record.layer_attr - want).abs().max() / want.abs().max())
        assert err < tolerance, f"example {i}: relative error {err:.2e} against a direct call"
        worst = max(worst, err)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="corpus sizes to run (default 1000,10000)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--memory-budget", default="auto", help="passed to attattr-fast (default auto: 1GiB on CPU)")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the child (default 1: a shared CPU)")
    parser.add_argument("--work-dir", default=None, help="where to put model, corpus and results (default: a tmp dir)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the JSON is named after the device)")
    parser.add_argument("--method", default="riemann_right")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output", default="full", choices=("full", "reduced"))
    parser.add_argument("--name", default=None, help="the JSON's name after the device (default: corpus[-budget-B])")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(int(args.threads))  # the checks here; the environment record reports it

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.layers, args.heads, args.hidden)
        env = {**os.environ, "OMP_NUM_THREADS": args.threads, "TRITON_INTERPRET": "0"}
        rows = []
        for n in sizes:
            corpus = write_corpus(tmp / f"corpus-{n}.tsv", n)
            out = tmp / f"out-{n}"
            argv = ["attribute", "--input", str(corpus), "--model", str(model_dir), "--out", str(out), "--steps",
                    str(args.steps), "--method", args.method, "--dtype", args.dtype, "--output", args.output,
                    "--store-dtype", "float16", "--quiet", "--device", args.device,
                    "--memory-budget", args.memory_budget]  # fmt: skip
            print(f"\n$ attattr-fast {' '.join(argv)}", flush=True)
            run = run_cli(argv, env)
            error = check(out, corpus, model_dir, n, vars(args), args.device)
            rss = [r for _, r in run["samples"]]
            quarter = {q: rss[min(len(rss) - 1, int(q * len(rss)))] if rss else None for q in (0.25, 0.5, 0.75)}
            rows.append({
                "examples": n, "seconds": run["seconds"], "examples_per_s": n / run["seconds"],
                "write_wait_s": run["write_wait_s"],
                "peak_rss_mib": run["peak_rss"] / 2**20,
                "rss_25_mib": quarter[0.25] / 2**20 if rss else None,
                "rss_50_mib": quarter[0.5] / 2**20 if rss else None,
                "rss_75_mib": quarter[0.75] / 2**20 if rss else None,
                "output_mib": sum(p.stat().st_size for p in out.iterdir()) / 2**20,
                "shards": len(list(out.glob("shard-*.safetensors"))),
                "max_rel_error": error,
                "rss_samples": [(round(t, 2), r) for t, r in run["samples"]],
            })  # fmt: skip
    columns = [("examples", "examples", "d"), ("seconds", "wall s", ".1f"), ("examples_per_s", "ex/s", ".1f"),
               ("write_wait_s", "write wait s", ".1f"),
               ("peak_rss_mib", "peak RSS MiB", ".0f"), ("rss_25_mib", "RSS@25%", ".0f"),
               ("rss_50_mib", "RSS@50%", ".0f"), ("rss_75_mib", "RSS@75%", ".0f"),
               ("output_mib", "output MiB", ".1f"), ("shards", "shards", "d"),
               ("max_rel_error", "max rel err", ".1e")]  # fmt: skip
    print()
    print(format_table(rows, columns))
    settings = {"sizes": sizes, "steps": args.steps, "method": args.method, "dtype": args.dtype, "output": args.output,
                "store_dtype": "float16", "model": f"random BERT {args.layers} layers, {args.heads} heads, "
                f"hidden {args.hidden}", "omp_num_threads": args.threads, "words_per_example": "3-16",
                "memory_budget": args.memory_budget}  # fmt: skip
    name = args.name or ("corpus" if args.memory_budget == "auto" else f"corpus-budget-{args.memory_budget}")
    device = torch.device(args.device)
    path = write_json({"benchmark": "corpus", "settings": settings, "environment": environment(device),
                       "runs": rows}, name, device)  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
