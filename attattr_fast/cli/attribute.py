"""`attattr-fast attribute`: attribute texts or a file of examples and write a results directory."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.errors import AttAttrError


def register(sub) -> None:
    p = sub.add_parser("attribute", help="attribute texts or an input file; write a results directory",
                       description="Self-attention attribution of every target layer of each example.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to attribute (repeatable)")
    source.add_argument("--input", help="TSV (with header), CSV or JSONL with columns text[, text_pair][, label]")
    p.add_argument("--text-pair", action="append", help="second segment for each --text (sentence pairs)")
    common.add_model_options(p)
    common.add_attribution_options(p)
    p.add_argument("--output", default="full", choices=("full", "reduced"),
                   help="full: keep [L, H, n, n] attributions and attention; reduced: head maxima, layer sums, top-k")
    p.add_argument("--target", default="predicted", help="predicted (default), gold, or a label name")
    p.add_argument("--top", default="3", help="strongest interactions to print per layer (default 3)")
    p.add_argument("--out", default=None, help="results directory to write (must be new or empty)")
    p.add_argument("--no-truncate", action="store_true", help="refuse texts longer than the model takes")
    p.add_argument("--quiet", action="store_true", help="print nothing per example")
    p.set_defaults(func=run)


def _examples(args):
    from attattr_fast.datasets import Example, read_examples

    if args.input is not None:
        return read_examples(args.input), {"path": str(Path(args.input).resolve()),
                                           "sha256": hashlib.sha256(Path(args.input).read_bytes()).hexdigest()}
    pairs = args.text_pair or []
    if pairs and len(pairs) != len(args.text):
        raise AttAttrError("give one --text-pair per --text")
    examples = [Example(text=t, text_pair=pairs[i] if pairs else None) for i, t in enumerate(args.text)]
    for i, e in enumerate(examples):
        if not e.text.strip():
            raise AttAttrError(f"--text {i + 1} is empty")
    return examples, {"texts": len(examples)}


def run(args: argparse.Namespace) -> int:
    from attattr_fast.api import AttentionAttribution
    from attattr_fast.corpus import attribute_corpus, prepare, resolve_targets
    from attattr_fast.results import ResultsWriter

    n_steps = common.parse_positive_int(args.steps, "--steps")
    method = common.parse_method(args.method)
    dtype = common.parse_dtype(args.dtype)
    batch_size = common.parse_positive_int(args.batch_size, "--batch-size")
    top = common.parse_positive_int(args.top, "--top")
    device = common.parse_device(args.device)
    examples, source = _examples(args)
    if args.out is not None and Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        raise AttAttrError(f"--out {args.out} exists and is not an empty directory")
    model, tokenizer = common.load_model(args.model, device)
    aa = AttentionAttribution(model)
    layers = common.parse_layers(args.layers, aa.adapter.n_layers)
    corpus = prepare(aa, tokenizer, examples, truncate=not args.no_truncate)
    targets = resolve_targets(args.target, corpus, aa)

    writer = None
    if args.out is not None:
        writer = ResultsWriter(args.out, {
            "model": args.model or "builtin:minilm-sentiment", "method": method, "n_steps": n_steps,
            "dtype": args.dtype, "layers": layers if layers is not None else list(range(aa.adapter.n_layers)),
            "output": args.output, "target": args.target, "input": source,
            "labels": {str(k): v for k, v in (aa.adapter.config.id2label or {}).items()},
        })  # fmt: skip
    records = attribute_corpus(aa, corpus, targets, batch_size=batch_size, top_k=top, progress=True,
                               layers=layers, n_steps=n_steps, method=method, output=args.output, dtype=dtype)
    for record in records:
        if writer is not None:
            writer.add(record)
        if not args.quiet:
            print_record(record, top)
    if writer is not None:
        writer.close()
        print(f"wrote {writer.n_written} examples to {args.out}", file=sys.stderr)
    return 0


def print_record(record, top: int) -> None:
    tokens = record.tokens
    text = record.text if record.text_pair is None else f"{record.text} || {record.text_pair}"
    print(f"[{record.index}] {record.target_label} p={record.prob:.3f}  {text}")
    for li, layer in enumerate(record.layers):
        parts = []
        for q, k, s in zip(record.top_query[li].tolist(), record.top_key[li].tolist(), record.top_score[li].tolist()):
            if q < 0:
                break
            parts.append(f"{tokens[k]}→{tokens[q]} {s:+.3g}")
        print(f"  layer {layer:>2}: " + ", ".join(parts[:top]))
