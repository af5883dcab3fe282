"""`attattr-fast finetune`: fine-tune a BERT-family checkpoint on a GLUE (or generic) file and save it."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.cli.heads import TASK_HELP
from attattr_fast.errors import AttAttrError


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a classifier on a GLUE/generic file; save_pretrained",
                       description="Fine-tune every parameter with AdamW, linear warm-up and decay, weight decay; "
                                   "print accuracy per epoch; save a model every command can load.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or cached hub id (default: the all-MiniLM-L6-v2 encoder of the "
                        "built-in model, with a new classification head)")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--eval", default=None, help="held-out file, evaluated after every epoch")
    p.add_argument("--task", default="generic", help=TASK_HELP)
    p.add_argument("--labels", default=None, help="comma-separated class order of generic data (default: sorted)")
    p.add_argument("--out", required=True, help="directory to save the model in (must be new or empty)")
    p.add_argument("--epochs", default="3", help="epochs (default 3)")
    p.add_argument("--lr", default="3e-5", help="peak learning rate (default 3e-5; the recipe uses 2e-5 … 5e-5)")
    p.add_argument("--batch-size", default="16", help="examples per step (default 16)")
    p.add_argument("--warmup", default="0.1", help="fraction of steps of linear warm-up (default 0.1)")
    p.add_argument("--weight-decay", default="0.01", help="AdamW weight decay (default 0.01)")
    p.add_argument("--max-length", default="128", help="tokens per example, longer ones truncated (default 128)")
    p.add_argument("--seed", default="0", help="seed of the shuffling, dropout and the new head (default 0)")
    p.set_defaults(func=run, reads=("train", "eval"), writes=("out",))


def _float(value: str, option: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise AttAttrError(f"{option}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise AttAttrError(f"{option}: {value!r} is not a finite number")
    return number


def run(args: argparse.Namespace) -> int:
    import torch

    from attattr_fast import adapters
    from attattr_fast.finetune import FinetuneConfig, finetune
    from attattr_fast.glue import class_indices, label_set, read_task
    from attattr_fast.heads import encode_labelled
    from attattr_fast.models import builtin_model_path, load_classifier, save_classifier
    from attattr_fast.text import model_max_length

    config = FinetuneConfig(
        learning_rate=_float(args.lr, "--lr"),
        epochs=common.parse_positive_int(args.epochs, "--epochs"),
        batch_size=common.parse_positive_int(args.batch_size, "--batch-size"),
        warmup_ratio=_float(args.warmup, "--warmup"),
        weight_decay=_float(args.weight_decay, "--weight-decay"),
        max_length=common.parse_positive_int(args.max_length, "--max-length"),
        seed=common.parse_seed(args.seed),
    )
    config.check()
    out = common.check_output_path(args.out, "--out", directory=True)
    if out.exists() and any(out.iterdir()):
        raise AttAttrError(f"--out {out} exists and is not an empty directory")
    device = common.parse_device(args.device)
    train_data = read_task(args.train, args.task)
    eval_data = None if args.eval is None else read_task(args.eval, args.task)
    if args.labels is not None and args.task != "generic":
        raise AttAttrError(f"--labels orders the classes of generic data; {args.task} has its own label names")
    given = None if args.labels is None else [x.strip() for x in args.labels.split(",") if x.strip()]
    if given == []:
        raise AttAttrError("--labels is empty; leave it out to sort the labels")
    labels, names = label_set(train_data, given)
    if len(labels) < 2:
        raise AttAttrError(f"{args.train}: a classifier needs at least 2 labels, the data has only {', '.join(labels)}")
    if eval_data is not None:
        label_set(eval_data, list(labels))  # every held-out label must be one of the training labels

    torch.manual_seed(config.seed)  # the new head's initialisation
    source = args.model if args.model is not None else str(builtin_model_path())
    model, tokenizer = load_classifier(source, num_labels=len(labels))
    labels, names = _in_the_heads_order(model.config, labels, names)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    if getattr(model.config, "problem_type", None) not in (None, "single_label_classification"):
        print(f"attattr-fast: note: {source} is configured for {model.config.problem_type}; fine-tuning trains "
              "single-label classification (one softmax), and the saved model says so", file=sys.stderr)  # fmt: skip
    model.config.problem_type = "single_label_classification"  # what the cross-entropy below trains
    model.to(device)
    limit = model_max_length(tokenizer, adapters.max_length(model))
    if config.max_length > limit:
        print(f"attattr-fast: note: --max-length {config.max_length} is more than the model takes; using {limit}",
              file=sys.stderr)  # fmt: skip
        config.max_length = limit
    encoded = []
    for data in (train_data, eval_data):
        if data is None:
            encoded.append(None)
            continue
        data.labels, data.label_names = tuple(labels), tuple(names)  # class order fixed by the training set
        encoded.append(encode_labelled(tokenizer, data.examples, class_indices(data, model.config), config.max_length))
    train, held_out = encoded
    print(f"fine-tuning {source} on {len(train)} examples ({args.task}; labels {', '.join(names)})"
          + ("" if held_out is None else f", {len(held_out)} held-out"), file=sys.stderr)

    def show(report):
        parts = [f"epoch {report.epoch}"]
        if report.train_loss is not None:
            parts.append(f"train loss {report.train_loss:.4f}, train accuracy {100 * report.train_accuracy:.1f}%")
        if report.eval_accuracy is not None:
            parts.append(f"held-out accuracy {100 * report.eval_accuracy:.1f}%")
        print(": ".join(parts[:1]) + (": " + "; ".join(parts[1:]) if len(parts) > 1 else ""), flush=True)

    reports = finetune(model, train, held_out, config, progress=True, on_epoch=show)
    log = {"model": source, "task": args.task, "train": str(Path(args.train).resolve()),
           "eval": None if args.eval is None else str(Path(args.eval).resolve()), "labels": list(names),
           "config": vars(config), "epochs": [vars(r) for r in reports]}  # fmt: skip
    save_classifier(model.cpu(), tokenizer, out, extra_files={"finetune.json": json.dumps(log, indent=1)})
    print(f"saved to {out}", file=sys.stderr)
    return 0


def _in_the_heads_order(config, labels: tuple[str, ...], names: tuple[str, ...]):
    """(labels, names) in the class order of a kept head that already names these classes (a classifier trained
    on them: its weights stay, so its order must); otherwise as given (a new head, or other class names)."""
    current = [str((config.id2label or {}).get(i, "")) for i in range(int(config.num_labels))]
    if sorted(current) != sorted(names) or current == list(names):
        return labels, names
    order = [names.index(name) for name in current]
    return tuple(labels[k] for k in order), tuple(names[k] for k in order)
