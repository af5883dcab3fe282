"""`attattr-fast triggers extract|evaluate`: adversarial triggers from attribution patterns (paper §5.3).

extract   attributes the examples (reduced output), writes the ranked patterns per predicted class as
          JSON and prints them as a markdown table.
evaluate  inserts the top-k patterns of each class into labelled examples and prints the Table 2-style
          markdown table (accuracy per gold class with and without each trigger, attack success rate,
          random-token control); writes it as JSON.
Outputs are written atomically, only after everything has been computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.datasets import BUILTIN_SENTIMENT
from attattr_fast.errors import AttAttrError


def register(sub) -> None:
    p = sub.add_parser("triggers", help="adversarial triggers: extract patterns, evaluate them as attacks",
                       description="Adversarial triggers from the strongest attribution patterns (paper §5.3).")
    tsub = p.add_subparsers(dest="triggers_command", required=True, parser_class=type(p))

    ex = tsub.add_parser("extract", help="extract ranked patterns per predicted class",
                         description="Attribute examples (reduced output) and rank their strongest patterns.")
    _add_data_options(ex)
    common.add_model_options(ex)
    common.add_attribution_options(ex)
    ex.add_argument("--n", default="3000", help="use the first N examples (default 3000)")
    ex.add_argument("--mode", default="strongest", choices=("strongest", "release"),
                    help="strongest: strongest entries across all layers and heads (default); release: the "
                         "single head holding the largest entry, its top entries (the authors' script)")
    ex.add_argument("--entries", default="2", help="entries per example (default 2)")
    ex.add_argument("--max-tokens", default="4", help="most tokens in a pattern, 1-4 (default 4)")
    ex.add_argument("--include-special", action=argparse.BooleanOptionalAction, default=None,
                    help="allow [CLS]/[SEP] in patterns (default: no; yes in release mode)")
    ex.add_argument("--exclude-words", default=None, help="file of words no pattern may contain, one per line")
    ex.add_argument("--rank-by", default="count", choices=("count", "score"), help="ranking (default count)")
    ex.add_argument("--show", default="10", help="patterns per class to print (default 10)")
    ex.add_argument("--out", required=True, help="JSON file to write the patterns to")
    ex.add_argument("--markdown", default=None, help="also write the printed table to this file")
    ex.set_defaults(func=run_extract, reads=("input", "exclude_words"), writes=("out", "markdown"))

    ev = tsub.add_parser("evaluate", help="insert the top patterns into labelled examples; Table 2-style result",
                         description="Accuracy per gold class with and without each trigger, vs random tokens.")
    ev.add_argument("--patterns", required=True, help="JSON written by `triggers extract`")
    _add_data_options(ev)
    common.add_model_options(ev)
    ev.add_argument("--top", default="3", help="triggers per class (default 3)")
    ev.add_argument("--control-draws", default="5", help="random-token controls per trigger (default 5; 0: none)")
    ev.add_argument("--seed", default="0", help="seed of the random controls (default 0)")
    ev.add_argument("--batch-size", default="32", help="examples per forward (default 32)")
    ev.add_argument("--out", required=True, help="JSON file to write the result to")
    ev.add_argument("--markdown", default=None, help="also write the printed table to this file")
    ev.set_defaults(func=run_evaluate, reads=("input", "patterns"), writes=("out", "markdown"))


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help=f"TSV/CSV/JSONL with text[, text_pair][, label], .txt (one text per line), or "
                             f"{BUILTIN_SENTIMENT} for the "
                             "project's labelled review sentences (a file of that name: ./builtin:sentiment)")
    parser.add_argument("--slice", default=None,
                        help="a Python slice of the examples, e.g. '0::2' (even ones) or ':100' (default: all)")


def parse_slice(value: str | None) -> slice:
    if value is None:
        return slice(None)
    parts = value.split(":")
    try:
        if len(parts) == 1:
            raise ValueError
        numbers = [int(x) if x.strip() else None for x in parts]
        if len(numbers) > 3 or (len(numbers) == 3 and numbers[2] == 0):
            raise ValueError
    except ValueError:
        raise AttAttrError(f"--slice: cannot parse {value!r}; use start:stop[:step], e.g. '0::2'") from None
    return slice(*numbers)


def _examples(args):
    from attattr_fast.datasets import load_examples

    examples = load_examples(args.input)
    chosen = examples[parse_slice(args.slice)]
    if not chosen:
        raise AttAttrError(f"--slice {args.slice} selects no example of {len(examples)}")
    return chosen


def _write(out: Path, payload: str, markdown_out: Path | None, table: str) -> None:
    """The JSON, and the markdown table if asked for: both or neither (`out` is named by the caller)."""
    from attattr_fast.results import atomic_write_bytes

    with common.Outputs(out, markdown_out) as outputs:
        atomic_write_bytes(out, payload.encode("utf-8"))
        outputs.wrote(out, quiet=True)
        if markdown_out is not None:
            atomic_write_bytes(markdown_out, (table + "\n").encode("utf-8"))
            outputs.wrote(markdown_out)


def run_extract(args: argparse.Namespace) -> int:
    from attattr_fast.api import AttentionAttribution
    from attattr_fast.triggers import extract, read_lexicon

    n = common.parse_positive_int(args.n, "--n")
    entries = common.parse_positive_int(args.entries, "--entries")
    max_tokens = common.parse_positive_int(args.max_tokens, "--max-tokens")
    if max_tokens > 4:
        raise AttAttrError(f"--max-tokens must be 1 to 4 (patterns have fewer than 5 tokens), got {max_tokens}")
    show = common.parse_positive_int(args.show, "--show")
    n_steps = common.parse_steps(args.steps)
    method = common.parse_method(args.method)
    dtype = common.parse_dtype(args.dtype)
    batch_size = common.parse_positive_int(args.batch_size, "--batch-size")
    device = common.parse_device(args.device)
    out = common.check_output_path(args.out, "--out")
    markdown_out = common.check_output_path(args.markdown, "--markdown")
    lexicon = read_lexicon(args.exclude_words) if args.exclude_words else None
    examples = _examples(args)
    model, tokenizer = common.load_model(args.model, device)
    aa = AttentionAttribution(model)
    layers = common.parse_layers(args.layers, aa.adapter.n_layers)

    extraction = extract(aa, tokenizer, examples, n_examples=n, entries=entries, mode=args.mode,
                         include_special=args.include_special, exclude_words=lexicon, max_tokens=max_tokens,
                         rank_by=args.rank_by, batch_size=batch_size, n_steps=n_steps, method=method,
                         layers=layers, dtype=dtype, progress=True)  # fmt: skip
    extraction.options.update(model=args.model or "builtin:minilm-sentiment", input=args.input, slice=args.slice,
                              exclude_words_file=args.exclude_words)  # fmt: skip
    table = extraction.markdown(show)
    payload = json.dumps(extraction.to_dict(), indent=1, ensure_ascii=False) + "\n"
    _write(out, payload, markdown_out, table)
    print(table)
    print(f"{extraction.n_examples} examples, {extraction.n_without_pattern} without a pattern; "
          f"wrote {out}", file=sys.stderr)  # fmt: skip
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from attattr_fast.triggers import MAX_CONTROL_DRAWS, evaluate, load_patterns

    top = common.parse_positive_int(args.top, "--top")
    try:
        draws = int(args.control_draws)
    except ValueError:
        raise AttAttrError("--control-draws must be an integer") from None
    seed = common.parse_seed(args.seed)
    if not 0 <= draws <= MAX_CONTROL_DRAWS:
        raise AttAttrError(f"--control-draws must be in 0..{MAX_CONTROL_DRAWS}, got {draws}")
    batch_size = common.parse_positive_int(args.batch_size, "--batch-size")
    device = common.parse_device(args.device)
    out = common.check_output_path(args.out, "--out")
    markdown_out = common.check_output_path(args.markdown, "--markdown")
    patterns = load_patterns(args.patterns)
    examples = _examples(args)
    model, tokenizer = common.load_model(args.model, device)

    result = evaluate(model, tokenizer, examples, patterns, top_k=top, control_draws=draws, seed=seed,
                      batch_size=batch_size, progress=True)  # fmt: skip
    result.options.update(model=args.model or "builtin:minilm-sentiment", input=args.input, slice=args.slice,
                          patterns=str(Path(args.patterns).resolve()), extraction=patterns.options)  # fmt: skip
    table = result.markdown()
    _write(out, json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n", markdown_out, table)
    print(table)
    print(f"wrote {out}", file=sys.stderr)
    return 0
