"""`attattr-fast prune`: pruning curves by head importance (Figure 5), per-layer effectiveness (Figure 3),
and a physically pruned model (checked against gating, timed, saved)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.cli.heads import (
    add_data_options,
    add_importance_options,
    compute_importance,
    importance_options,
    load_labelled,
    parse_kinds,
)
from attattr_fast.errors import AttAttrError


def register(sub) -> None:
    p = sub.add_parser("prune", help="pruning curves by head importance; save a physically pruned model",
                       description="Rank heads by importance on some examples, gate the least important "
                                   "0..100% and measure accuracy on the other examples; optionally remove "
                                   "heads physically and save the smaller model.")
    common.add_model_options(p)
    add_data_options(p)
    add_importance_options(p, "attattr,taylor,accuracy,attention")
    p.add_argument("--eval-input", default=None,
                   help="held-out file for the accuracy curves (default: the --input examples not used for importance)")
    p.add_argument("--importance-examples", default=None,
                   help="examples of --input for importance (default 200; without --eval-input at most half, "
                        "the rest evaluate)")
    p.add_argument("--seed", default="0", help="seed of the importance/evaluation split (default 0)")
    p.add_argument("--fractions", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="fractions of all heads to gate (default 0,0.1,…,1)")
    p.add_argument("--json", default=None, help="JSON file for scores, curves and pruning results")
    p.add_argument("--plot", default=None, help="PNG of the pruning curves (Figure 5)")
    p.add_argument("--layer-plot", default=None,
                   help="PNG of the per-layer analysis (Figure 3): gate k heads of one layer by --layer-kinds")
    p.add_argument("--layer-kinds", default=None,
                   help="scores of the per-layer analysis (default attattr,attention; needs --layer-plot)")
    p.add_argument("--layer-metric", default="accuracy", choices=("accuracy", "gold_probability"),
                   help="what --layer-plot shows (default accuracy; gold_probability: mean gold-class probability)")
    p.add_argument("--fraction", default=None, help="prune this fraction of heads physically (with --by)")
    p.add_argument("--by", default=None, help="importance kind that ranks heads for --fraction (default attattr)")
    p.add_argument("--save", default=None, help="directory for the pruned model (needs --fraction)")
    p.add_argument("--timing-repeats", default="10", help="timed passes of each model (default 10)")
    p.set_defaults(func=run, reads=("input", "eval_input"), writes=("json", "plot", "layer_plot", "save"))


def parse_fraction(value: str, option: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise AttAttrError(f"{option}: {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise AttAttrError(f"{option}: {value} is not in [0, 1]")
    return number


def print_curves(curves: dict) -> None:
    kinds = list(curves["accuracy"])
    for metric in ("accuracy", "gold_probability"):
        print(f"{metric} (%) on {curves['n_examples']} held-out examples, least important heads gated first")
        print("heads gated     " + "".join(k.rjust(11) for k in kinds))
        for i, (fraction, count) in enumerate(zip(curves["fractions"], curves["heads_gated"])):
            row = "".join(f"{100 * curves[metric][k][i]:11.1f}" for k in kinds)
            print(f"{count:4d} ({100 * fraction:5.1f}%)  {row}")


def print_layer_effect(effect: dict) -> None:
    import torch

    for metric, by_kind in effect.items():
        for kind, by_direction in by_kind.items():
            for direction, table in by_direction.items():
                mean = torch.tensor(table).mean(0)
                print(f"{metric} {kind:>9} {direction:<15} mean over layers, k = 0..{len(mean) - 1}: "
                      + " ".join(f"{100 * float(a):.1f}" for a in mean))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch

    from attattr_fast import heads, pruning
    from attattr_fast.adapters import adapter_for
    from attattr_fast.models import BUILTIN_NAME, save_classifier
    from attattr_fast.results import atomic_write_bytes

    kinds = parse_kinds(args.kinds)
    if args.layer_kinds is not None and args.layer_plot is None:
        raise AttAttrError("--layer-kinds goes with --layer-plot, the per-layer analysis it chooses scores for")
    layer_kinds = [] if args.layer_plot is None else parse_kinds(
        "attattr,attention" if args.layer_kinds is None else args.layer_kinds, "--layer-kinds")
    importance_options(args)
    fractions = tuple(parse_fraction(f.strip(), "--fractions") for f in args.fractions.split(",") if f.strip())
    if not fractions:
        raise AttAttrError("--fractions is empty")
    if len(set(fractions)) != len(fractions):
        raise AttAttrError(f"--fractions: {args.fractions!r} names a fraction twice")
    seed = common.parse_seed(args.seed)
    fraction = None if args.fraction is None else parse_fraction(args.fraction, "--fraction")
    if args.by is not None and fraction is None:
        raise AttAttrError("--by goes with --fraction, the pruning it ranks heads for")
    args.by = "attattr" if args.by is None else args.by
    if args.by not in heads.KINDS:
        raise AttAttrError(f"--by: unknown kind {args.by!r}; choose from {', '.join(heads.KINDS)}")
    if args.save is not None and fraction is None:
        raise AttAttrError("--save needs --fraction")
    if args.save is not None and (args.model is None or args.model == BUILTIN_NAME):
        raise AttAttrError("--save: the built-in zero-shot model has no save format; prune a saved classifier "
                           "(e.g. one from `attattr-fast finetune`) or drop --save")  # fmt: skip
    save = None if args.save is None else Path(args.save)
    if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise AttAttrError(f"--save {save} exists and is not an empty directory")
    out_json = common.check_output_path(args.json, "--json")
    plot, layer_plot = (common.check_output_path(value, option, image=True) for value, option in (
        (args.plot, "--plot"), (args.layer_plot, "--layer-plot")))
    common.check_output_path(args.save, "--save", directory=True)
    repeats = common.parse_positive_int(args.timing_repeats, "--timing-repeats")
    max_examples = None if args.max_examples is None else common.parse_positive_int(args.max_examples,
                                                                                     "--max-examples")
    device = common.parse_device(args.device)
    model, tokenizer = common.load_model(args.model, device)
    n_importance = None
    if args.importance_examples is not None:
        n_importance = common.parse_positive_int(args.importance_examples, "--importance-examples")
    data, source = load_labelled(args.input, args.task, model, tokenizer, max_examples)
    if args.eval_input is not None:  # two files: importance from (up to 200 of) --input, accuracy on --eval-input
        eval_data, eval_source = load_labelled(args.eval_input, args.task, model, tokenizer, max_examples)
        n_importance = min(len(data), 200) if n_importance is None else n_importance
        if n_importance > len(data):
            raise AttAttrError(f"--importance-examples {n_importance}: {source} has only {len(data)} examples")
        first = list(range(len(data))) if n_importance == len(data) else \
            heads.split_indices(data.labels, n_importance, seed=seed)[0]  # fmt: skip
        importance_data = data.subset(first)
        print(f"{len(first)} importance examples of {source}, {len(eval_data)} held-out examples of {eval_source}",
              file=sys.stderr)  # fmt: skip
    else:
        if n_importance is None:
            n_importance = min(200, len(data) // 2)
            if n_importance < 200:
                print(f"using {n_importance} of {len(data)} examples for importance (half; default 200)",
                      file=sys.stderr)  # fmt: skip
        first, rest = heads.split_indices(data.labels, n_importance, seed=seed)
        importance_data, eval_data, eval_source = data.subset(first), data.subset(rest), source
        print(f"{len(first)} importance examples, {len(rest)} held-out examples of {source}", file=sys.stderr)

    needed = list(dict.fromkeys([*kinds, *layer_kinds, *([args.by] if fraction is not None else [])]))
    scores = compute_importance(model, importance_data, needed, args)
    ev = (eval_data.input_ids, eval_data.labels, eval_data.attention_mask, eval_data.token_type_ids)
    curves = heads.pruning_curves(model, {k: scores[k] for k in kinds}, *ev, fractions=fractions, progress=True)
    print_curves(curves)
    report = {"model": args.model or BUILTIN_NAME, "input": source, "eval_input": eval_source,
              "n_importance": len(first), "n_eval": len(eval_data), "seed": seed, "steps": int(args.steps),
              "method": args.method, "normalize": args.normalize,
              "importance": {k: v.tolist() for k, v in scores.items()},
              "curves": curves}  # fmt: skip
    if layer_kinds:
        effect = heads.layer_effectiveness(model, {k: scores[k] for k in layer_kinds}, *ev, progress=True)
        print_layer_effect(effect)
        report["layer_effectiveness"] = effect

    pruned = None
    if fraction is not None:
        adapter = adapter_for(model)
        present = adapter.present_heads  # a model pruned before: its removed heads stay off, outside the fraction
        gates = heads.gates_for_fraction(scores[args.by], fraction, on=present)
        pruned = pruning.prune_heads(model, gates)
        adapter.head_gates = gates
        with torch.no_grad():
            gated_logits = adapter.forward(eval_data.input_ids.to(device), eval_data.attention_mask.to(device),
                                           None if eval_data.token_type_ids is None
                                           else eval_data.token_type_ids.to(device))  # fmt: skip
            batch = {"input_ids": eval_data.input_ids.to(device), "attention_mask": eval_data.attention_mask.to(device)}
            if eval_data.token_type_ids is not None:
                batch["token_type_ids"] = eval_data.token_type_ids.to(device)
            pruned_logits = pruned(**batch).logits.float()
        difference = float((pruned_logits - gated_logits).abs().max())
        labels = eval_data.labels.to(device)
        timing = pruning.measure_speedup(model, pruned, _timing_batches(eval_data, device), repeats=repeats)
        kept = pruning.current_heads(pruned)
        report["pruned"] = {
            "fraction": fraction, "by": args.by, "heads_removed": int((present & (gates == 0)).sum()),
            "heads_per_layer": [len(k) for k in kept], "kept_heads": kept,
            "max_abs_logit_difference_vs_gated": difference,
            "accuracy_gated": float((gated_logits.argmax(-1) == labels).float().mean()),
            "accuracy_pruned": float((pruned_logits.argmax(-1) == labels).float().mean()),
            "parameters": {"original": pruning.parameter_count(model), "pruned": pruning.parameter_count(pruned)},
            "timing": {**timing, "device": str(device), "examples": len(eval_data), "threads": torch.get_num_threads()},
        }  # fmt: skip
        r = report["pruned"]
        print(f"pruned {r['heads_removed']} heads by {args.by} (heads per layer {r['heads_per_layer']}); "
              f"max |logit(pruned) − logit(gated)| = {difference:.2e}; "
              f"accuracy gated {100 * r['accuracy_gated']:.1f}%, pruned {100 * r['accuracy_pruned']:.1f}%")  # fmt: skip
        print(f"parameters {r['parameters']['original']:,} → {r['parameters']['pruned']:,}; forward over "
              f"{len(eval_data)} examples on {device}: {1e3 * timing['original_s']:.1f} ms → "
              f"{1e3 * timing['pruned_s']:.1f} ms (speed-up {timing['speedup']:.2f}×)")  # fmt: skip

    with common.Outputs(save, out_json, plot, layer_plot) as outputs:
        if save is not None:
            save_classifier(pruned, tokenizer, save,
                            extra_files={"pruning.json": json.dumps(report["pruned"], indent=1)})  # fmt: skip
            outputs.wrote(save, f"wrote the pruned model to {save}")
        if out_json is not None:
            atomic_write_bytes(out_json, (json.dumps(report, indent=1) + "\n").encode())
            outputs.wrote(out_json)
        if plot is not None:
            heads.plot_pruning_curves(curves, plot, title=f"Pruning heads: {Path(args.model or BUILTIN_NAME).name}, "
                                                          f"held-out {Path(eval_source).name}")
            outputs.wrote(plot)
        if layer_kinds:
            heads.plot_layer_effectiveness(report["layer_effectiveness"], layer_plot, metric=args.layer_metric)
            outputs.wrote(layer_plot)
    return 0


def _timing_batches(data, device, batch_size: int = 32) -> list[dict]:
    import torch

    order = torch.sort(data.attention_mask.sum(1), stable=True).indices
    batches = []
    for idx in torch.split(order, batch_size):
        part = data.subset(idx)
        batch = {"input_ids": part.input_ids.to(device), "attention_mask": part.attention_mask.to(device)}
        if part.token_type_ids is not None:
            batch["token_type_ids"] = part.token_type_ids.to(device)
        batches.append(batch)
    return batches
