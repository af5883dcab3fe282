"""`attattr-fast attribute`: attribute texts or a file of examples and write a resumable results directory.

With --out the run is resumable: the same command on the same directory continues where it stopped. Under
`torchrun --nproc_per_node=N` every process takes its share of the shards (see `attattr_fast.distributed`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.datasets import BUILTIN_SENTIMENT
from attattr_fast.errors import AttAttrError

STORE_DTYPES = ("float32", "float16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}  # fmt: skip


def register(sub) -> None:
    p = sub.add_parser("attribute", help="attribute texts or an input file; write a results directory",
                       description="Self-attention attribution of every target layer of each example. With --out "
                                   "the run is resumable: rerun the same command to continue it. Under torchrun "
                                   "each process takes a share of the examples.")  # fmt: skip
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to attribute (repeatable)")
    source.add_argument("--input", help="TSV (with header), CSV or JSONL with columns text[, text_pair][, label], "
                                        ".txt with one text per line, "
                                        f"or {BUILTIN_SENTIMENT} for the project's labelled review sentences (a "
                                        "file of that name: ./builtin:sentiment)")
    p.add_argument("--text-pair", action="append", help="second segment for each --text (sentence pairs)")
    common.add_model_options(p)
    common.add_attribution_options(p)
    # A corpus run sizes its engine calls from the memory budget; --batch-size only caps them.
    p.set_defaults(batch_size="auto")
    p._option_string_actions["--batch-size"].help = "most examples per engine call (default auto: the memory budget)"
    p.add_argument("--output", default="full", choices=("full", "reduced"),
                   help="full: keep [L, H, n, n] attributions and attention; reduced: head maxima, layer sums, top-k")
    p.add_argument("--target", default="predicted", help="predicted (default), gold, or a label name")
    p.add_argument("--top", default="3", help="strongest interactions per layer to keep and print (default 3)")
    p.add_argument("--out", default=None,
                   help="results directory: new or empty, or the directory of an interrupted run of this command")
    p.add_argument("--shard-size", default=None, help="with --out: examples per shard file (default 256)")
    p.add_argument("--store-dtype", default=None, choices=STORE_DTYPES,
                   help="with --out: dtype of the stored attributions, attention and layer sums (default float32; "
                        "float16 halves them)")
    p.add_argument("--memory-budget", default="auto",
                   help="memory for one engine call's rows, e.g. 2GiB (default: half the free GPU memory, 1GiB on CPU)")
    p.add_argument("--repair", action="store_true", help="recompute damaged or missing shards of --out")
    p.add_argument("--no-truncate", action="store_true", help="refuse texts longer than the model takes")
    p.add_argument("--compile", action="store_true",
                   help="run the layers above each target under torch.compile (compiles first: for long runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="with --out: print nothing per example")
    p.set_defaults(func=run, reads=("input",), writes=("out",))


def parse_size(value: str, name: str) -> int | None:
    """'auto' → None; '2GiB', '512MiB', '1.5G' or a plain byte count → bytes."""
    if value.strip().lower() == "auto":
        return None
    match = _SIZE.match(value)
    unit = (match.group(2) or "").lower() if match else None
    if unit not in _UNITS:
        raise AttAttrError(f"{name}: cannot parse {value!r}; use e.g. 512MiB, 2GiB or auto")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 2**20:
        raise AttAttrError(f"{name} {value} is less than 1MiB, too little for one example; use e.g. 512MiB or auto")
    return size


def _examples(args):
    from attattr_fast.datasets import Example, builtin_sentiment_bytes, is_unicode, load_examples

    if args.input is not None:
        if args.text_pair:
            raise AttAttrError("--text-pair goes with --text; in an --input file give a text_pair column")
        examples = load_examples(args.input)
        if args.input == BUILTIN_SENTIMENT:
            name, content = BUILTIN_SENTIMENT, builtin_sentiment_bytes()
        else:
            name, content = str(Path(args.input).resolve()), Path(args.input).read_bytes()
        return examples, {"path": name, "sha256": hashlib.sha256(content).hexdigest()}
    pairs = args.text_pair or []
    if pairs and len(pairs) != len(args.text):
        raise AttAttrError("give one --text-pair per --text")
    examples = [Example(text=t, text_pair=pairs[i] if pairs else None) for i, t in enumerate(args.text)]
    for i, e in enumerate(examples):
        for option, value in (("--text", e.text), ("--text-pair", e.text_pair)):
            if value is not None and not value.strip():
                raise AttAttrError(f"{option} {i + 1} is empty")
            if value is not None and not is_unicode(value):
                raise AttAttrError(f"{option} {i + 1} is not valid UTF-8 text")
    texts = json.dumps([[e.text, e.text_pair] for e in examples], ensure_ascii=False).encode("utf-8")
    return examples, {"texts": len(examples), "sha256": hashlib.sha256(texts).hexdigest()}


def run(args: argparse.Namespace) -> int:
    import torch

    from attattr_fast import corpus as corpora
    from attattr_fast import distributed
    from attattr_fast.api import AttentionAttribution

    n_steps = common.parse_steps(args.steps)
    method = common.parse_method(args.method)
    dtype = common.parse_dtype(args.dtype)
    batch_size = None if args.batch_size == "auto" else common.parse_positive_int(args.batch_size, "--batch-size")
    top = common.parse_top(args.top)
    if args.out is None:
        stored_only = [name for name, value in (("--shard-size", args.shard_size), ("--store-dtype", args.store_dtype),
                                                ("--repair", args.repair or None)) if value is not None]
        if stored_only:
            raise AttAttrError(f"{stored_only[0]} needs --out, the results directory it applies to")
        if args.quiet:
            raise AttAttrError("--quiet without --out would compute the scores, then print and keep nothing")
    shard_size = common.parse_positive_int(args.shard_size or "256", "--shard-size")
    budget = parse_size(args.memory_budget, "--memory-budget")
    store_dtype = {"float32": torch.float32, "float16": torch.float16}[args.store_dtype or "float32"]
    device = common.parse_device(args.device)
    examples, source = _examples(args)
    common.check_output_path(args.out, "--out", directory=True)

    dist = distributed.from_environment(device.type)
    try:
        if dist.world_size > 1 and args.out is None:
            raise AttAttrError("several processes need --out: each writes its share of the shards there")
        if dist.world_size > 1 and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)  # one GPU per process
        model, tokenizer = common.load_model(args.model, device)
        aa = AttentionAttribution(model, compile=args.compile)
        layers = common.parse_layers(args.layers, aa.adapter.n_layers)
        corpus = corpora.prepare(aa, tokenizer, examples, truncate=not args.no_truncate)
        targets = corpora.resolve_targets(args.target, corpus, aa)
        options = dict(layers=layers, n_steps=n_steps, method=method, output=args.output, dtype=dtype)
        progress = not args.no_progress
        predicted = args.target == "predicted"

        if args.out is None:
            records = corpora.attribute_corpus(aa, corpus, targets, batch_size=batch_size, top_k=top,
                                               progress=progress, memory_budget=budget, **options)  # fmt: skip
            # The engine runs them shortest first; each prints once the ones before it in the input have (held
            # as text meanwhile: the tensors go).
            waiting, following = {}, 0
            for record in records:
                waiting[record.index] = format_record(record, top, predicted)
                while following in waiting:
                    print(waiting.pop(following), flush=True)
                    following += 1
            return 0

        meta = {
            "model": corpora.describe_model(args.model or "builtin:minilm-sentiment", model, tokenizer),
            "input": corpora.describe_input(source, corpus),
            "target": args.target,
            "truncate": not args.no_truncate,
            "labels": {str(k): v for k, v in (aa.adapter.config.id2label or {}).items()},
            "processes": dist.world_size,
        }
        show = None if args.quiet else (lambda records: [print(format_record(r, top, predicted)) for r in records])
        stats = corpora.run_corpus(aa, corpus, targets, args.out, meta, shard_size=shard_size,
                                   store_dtype=store_dtype, top_k=top, repair=args.repair, progress=progress,
                                   batch_size=batch_size, memory_budget=budget, dist=dist, on_records=show,
                                   **options)  # fmt: skip
        if dist.is_main:
            print(stats.summary(), file=sys.stderr)
            print(f"results in {args.out} ({stats.skipped + stats.examples} of {stats.total} examples)",
                  file=sys.stderr)
        return 0
    finally:
        dist.close()


def format_record(record, top: int, predicted: bool = True) -> str:
    """A record's target class (the prediction, or marked "target") with its probability and, per layer, its `top`
    strongest interactions (key→query score), as lines."""
    tokens = record.tokens
    text = record.text if record.text_pair is None else f"{record.text} || {record.text_pair}"
    label = record.target_label if predicted else f"target {record.target_label}"
    lines = [f"[{record.index}] {label} p={record.prob:.3f}  {text}"]
    for li, layer in enumerate(record.layers):
        parts = []
        for q, k, s in zip(record.top_query[li].tolist(), record.top_key[li].tolist(), record.top_score[li].tolist()):
            if q < 0:
                break
            parts.append(f"{tokens[k]}→{tokens[q]} {s:+.3g}")
        lines.append(f"  layer {layer:>2}: " + ", ".join(parts[:top]))
    return "\n".join(lines)
