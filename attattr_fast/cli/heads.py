"""`attattr-fast heads`: head importance (AttAttr, Taylor, accuracy drop, attention) to JSON and PNG,
and the correlation of importance between two data sets (the paper's Figure 6)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.errors import AttAttrError

TASK_HELP = "generic (TSV/CSV/JSONL: text[, text_pair], label) or a GLUE task: sst2, cola, mnli, rte, mrpc, qnli, qqp"


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default=None,
                   help="labelled examples (default: the package's 48 built-in sentiment sentences)")
    p.add_argument("--task", default="generic", help=TASK_HELP)
    p.add_argument("--max-examples", default=None,
                   help="use only the first N examples of each input file (--input, and --compare-input or "
                        "--eval-input)")


def add_importance_options(p: argparse.ArgumentParser, default_kinds: str) -> None:
    p.add_argument("--kinds", default=default_kinds, help="comma-separated: attattr, taylor, accuracy, attention")
    p.add_argument("--steps", default="20", help="quadrature steps of attattr (default 20)")
    p.add_argument("--method", default="riemann_right", help="quadrature rule of attattr (default riemann_right)")
    p.add_argument("--normalize", default="none", choices=("none", "layer", "taylor"),
                   help="layer: divide each layer's scores by their L2 norm (Michel et al.), for every kind; taylor: "
                        "the taylor scores only, the baseline as Michel et al. rank it, the others raw")
    p.add_argument("--batch-size", default="16", help="examples per forward (default 16)")


def register(sub) -> None:
    p = sub.add_parser("heads", help="head importance scores (JSON, heat-map PNG, cross-data correlation)",
                       description="Importance of every attention head: mean AttAttr head maximum with gold "
                                   "labels (Eq. 5), Taylor |dloss/dgate|, accuracy drop, or max attention.")
    common.add_model_options(p)
    add_data_options(p)
    add_importance_options(p, "attattr,taylor,accuracy,attention")
    p.add_argument("--compare-input", default=None, help="a second labelled file: report Pearson r per kind")
    p.add_argument("--compare-task", default=None, help="task of --compare-input (default: --task)")
    p.add_argument("--out", default=None, help="JSON file for the scores")
    p.add_argument("--plot", default=None, help="PNG of the [layer, head] heat maps")
    p.add_argument("--scatter", default=None, help="PNG scatter of --input against --compare-input (first kind)")
    p.set_defaults(func=run, reads=("input", "compare_input"), writes=("out", "plot", "scatter"))


def parse_kinds(value: str, option: str = "--kinds") -> list[str]:
    from attattr_fast.heads import KINDS

    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise AttAttrError(f"{option}: unknown kind {bad[0] if bad else value!r}; choose from {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise AttAttrError(f"{option}: duplicates in {value!r}")
    return kinds


def load_labelled(path: str | None, task: str, model, tokenizer, max_examples: int | None = None):
    """(LabelledInputs, description) of a labelled file, or of the built-in sentences when `path` is None."""
    from attattr_fast.adapters import adapter_for
    from attattr_fast.datasets import builtin_sentiment_examples
    from attattr_fast.glue import TaskData, class_indices, read_task
    from attattr_fast.heads import encode_labelled
    from attattr_fast.text import model_max_length

    if path is None:
        if task != "generic":
            raise AttAttrError(f"--task {task} needs an input file; the built-in sentences are a generic set")
        data, name = TaskData("generic", builtin_sentiment_examples(), None, None), "built-in sentiment sentences"
    else:
        data, name = read_task(path, task), str(path)
    if max_examples is not None:
        data.examples = data.examples[:max_examples]
    labels = class_indices(data, model.config)
    if len(set(labels)) == 1 and len(labels) > 1:  # e.g. --max-examples cut a file sorted by label
        print(f"attattr-fast: warning: all {len(labels)} examples of {name} have the same label; accuracy and "
              "gold-class probability against one class say little about the heads", file=sys.stderr)  # fmt: skip
    max_length = model_max_length(tokenizer, adapter_for(model).max_length)
    return encode_labelled(tokenizer, data.examples, labels, max_length=max_length), name


def importance_options(args) -> dict:
    """`head_importance`'s options from the command line, checked (before any model or data is loaded)."""
    return {"n_steps": common.parse_steps(args.steps), "method": common.parse_method(args.method),
            "batch_size": common.parse_positive_int(args.batch_size, "--batch-size"),
            "normalize": args.normalize}


def compute_importance(model, data, kinds: list[str], args, progress: bool = True) -> dict:
    from attattr_fast.heads import head_importance

    options = importance_options(args)
    normalize = options.pop("normalize")
    scores = {}
    for kind in kinds:
        print(f"importance: {kind} on {len(data)} examples", file=sys.stderr)
        by_layer = normalize == "layer" or (normalize == "taylor" and kind == "taylor")
        scores[kind] = head_importance(model, data.input_ids, data.labels, data.attention_mask, data.token_type_ids,
                                       kind=kind, progress=progress, normalize="layer" if by_layer else None,
                                       **options)  # fmt: skip
    return scores


def print_scores(scores: dict, on, top: int = 5) -> None:
    """Each map, a pruned model's removed heads (not `on`) shown as "-" and left out of the top heads."""
    for kind, s in scores.items():
        n_layers, n_heads = s.shape
        print(f"{kind} importance [layer × head]:")
        for layer in range(n_layers):
            print(f"  L{layer:<2} " + " ".join((f"{float(v):+.3g}" if kept else "-").rjust(9)
                                               for v, kept in zip(s[layer], on[layer])))  # fmt: skip
        ranked = s.flatten().argsort(descending=True).tolist()
        best = [i for i in ranked if on.flatten()[i]][:top]
        print("  top: " + ", ".join(f"L{i // n_heads}H{i % n_heads} {float(s.flatten()[i]):+.3g}" for i in best))


def _max_examples(value: str | None) -> int | None:
    return None if value is None else common.parse_positive_int(value, "--max-examples")


def run(args: argparse.Namespace) -> int:
    from attattr_fast.adapters import adapter_for
    from attattr_fast.heads import importance_correlation, plot_correlation, plot_importance
    from attattr_fast.results import atomic_write_bytes

    kinds = parse_kinds(args.kinds)
    importance_options(args)
    out = common.check_output_path(args.out, "--out")
    plot, scatter = (common.check_output_path(getattr(args, o), f"--{o}", image=True) for o in ("plot", "scatter"))
    if scatter is not None and args.compare_input is None:
        raise AttAttrError("--scatter needs --compare-input")
    if args.compare_task is not None and args.compare_input is None:
        raise AttAttrError("--compare-task goes with --compare-input, the file it reads")
    if out is not None and out.suffix.lower().lstrip(".") in common.IMAGE_FORMATS:
        raise AttAttrError(f"--out {out} is the JSON of the scores; name the picture with --plot")
    max_examples = _max_examples(args.max_examples)
    device = common.parse_device(args.device)
    model, tokenizer = common.load_model(args.model, device)
    data, source = load_labelled(args.input, args.task, model, tokenizer, max_examples)
    other = None
    if args.compare_input is not None:
        other, other_source = load_labelled(args.compare_input, args.compare_task or args.task, model, tokenizer,
                                            max_examples)  # fmt: skip
    scores = compute_importance(model, data, kinds, args)
    on = adapter_for(model).present_heads  # a pruned model's removed heads score 0, which says nothing
    print_scores(scores, on)
    report = {"model": args.model or "builtin:minilm-sentiment", "input": source, "n_examples": len(data),
              "steps": int(args.steps), "method": args.method, "normalize": args.normalize,
              "scores": {k: v.tolist() for k, v in scores.items()}}  # fmt: skip
    if other is not None:
        other_scores = compute_importance(model, other, kinds, args)

        def pearson(kind: str) -> float | None:  # None: a constant map has no correlation
            try:
                return importance_correlation(scores[kind], other_scores[kind], on)
            except AttAttrError:
                return None

        report["compare"] = {"input": other_source, "n_examples": len(other),
                             "scores": {k: v.tolist() for k, v in other_scores.items()},
                             "pearson": {k: pearson(k) for k in kinds}}  # fmt: skip
        for kind, r in report["compare"]["pearson"].items():
            shown = "undefined (an importance map is constant)" if r is None else f"{r:.4f}"
            print(f"Pearson r ({kind}), {source} vs {other_source}: {shown}")
    with common.Outputs(out, plot, scatter) as outputs:
        if out is not None:
            atomic_write_bytes(out, (json.dumps(report, indent=1) + "\n").encode())
            outputs.wrote(out)
        if plot is not None:
            plot_importance(scores, plot, title=f"head importance, {len(data)} examples of {Path(source).name}")
            outputs.wrote(plot)
        if scatter is not None:
            kind = kinds[0]
            r = report["compare"]["pearson"][kind]
            plot_correlation(scores[kind], other_scores[kind], scatter,
                             names=(Path(source).name, Path(other_source).name),
                             title=f"{kind} importance, Pearson r = {'undefined' if r is None else f'{r:.3f}'}",
                             on=on)  # fmt: skip
            outputs.wrote(scatter)
    return 0
