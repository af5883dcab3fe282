"""Readers for the GLUE benchmark's TSV files, and the generic format of the `attribute` command.

GLUE files are read as plain tab-separated text without quote handling (their sentences contain
unbalanced quotes). Columns are found by header name where a file has a header; CoLA's train/dev
files have none and use fixed positions. Test files carry no labels; their examples get label None.

| task      | text (, pair)              | label column   | labels                                   |
|-----------|----------------------------|----------------|------------------------------------------|
| sst2      | sentence                   | label          | 0, 1 (negative, positive)                |
| cola      | column 3 (no header)       | column 1       | 0, 1 (unacceptable, acceptable)          |
| mnli      | sentence1, sentence2       | gold_label     | contradiction, entailment, neutral       |
| rte, qnli | sentence1, sentence2 / question, sentence | label | entailment, not_entailment        |
| mrpc      | #1 String, #2 String       | Quality        | 0, 1 (not_equivalent, equivalent)        |
| qqp       | question1, question2       | is_duplicate   | 0, 1 (not_duplicate, duplicate)          |
| stsb      | sentence1, sentence2       | score          | a similarity in [0, 5] (regression)      |

MNLI's matched and mismatched sets are the files dev_matched.tsv / dev_mismatched.tsv (and the
test_* files) read with task "mnli"; "mnli-mm" is accepted as a name for the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attattr_fast.datasets import Example, read_examples
from attattr_fast.errors import AttAttrError, require_file


@dataclass(frozen=True)
class TaskSpec:
    """Where a GLUE task keeps its fields and which labels it has.

    `text`, `pair`, `label` are header names, or for headerless files 0-based column positions.
    `labels` are the raw label values in class-index order; `label_names` name them for humans
    (the model's id2label). Regression tasks (STS-B) have no label set.
    """

    name: str
    text: str | int
    pair: str | int | None
    label: str | int
    labels: tuple[str, ...] | None
    label_names: tuple[str, ...] | None
    has_header: bool = True
    columns: int | None = None  # fixed column count of headerless files


GLUE_TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "sentence", None, "label", ("0", "1"), ("negative", "positive")),
    "cola": TaskSpec("cola", 3, None, 1, ("0", "1"), ("unacceptable", "acceptable"), has_header=False, columns=4),
    "mnli": TaskSpec("mnli", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                     ("contradiction", "entailment", "neutral")),
    "rte": TaskSpec("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                    ("entailment", "not_entailment")),
    "qnli": TaskSpec("qnli", "question", "sentence", "label", ("entailment", "not_entailment"),
                     ("entailment", "not_entailment")),
    "mrpc": TaskSpec("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent")),
    "qqp": TaskSpec("qqp", "question1", "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate")),
    "stsb": TaskSpec("stsb", "sentence1", "sentence2", "score", None, None),
}  # fmt: skip
ALIASES = {"sst-2": "sst2", "mnli-m": "mnli", "mnli-mm": "mnli", "mnli_matched": "mnli", "mnli_mismatched": "mnli",
           "sts-b": "stsb", "glue-sst2": "sst2"}  # fmt: skip
TASKS = (*GLUE_TASKS, "generic")


@dataclass
class TaskData:
    """Examples of one file and the label set that orders the classes (None: take the model's)."""

    task: str
    examples: list[Example]
    labels: tuple[str, ...] | None  # raw label values, class-index order
    label_names: tuple[str, ...] | None  # names for id2label
    regression: bool = False


def task_spec(task: str) -> TaskSpec:
    """The spec of a GLUE task by name (case-insensitive, 'SST-2' and 'sst2' alike)."""
    key = task.strip().lower()
    key = ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise AttAttrError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return GLUE_TASKS[key]


def _read_rows(path: Path) -> list[list[str]]:
    require_file(path, "input file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise AttAttrError(f"{path}: not UTF-8 text") from None
    # only \n (and \r\n) end a row: str.splitlines would also break at U+2028, \x85, \x0c, … inside a text
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r").split("\t") for line in lines]


def read_glue(path: str | Path, task: str) -> TaskData:
    """Examples of a GLUE TSV file (train, dev or test split) of `task`.

    Labels are kept as the raw strings of the file (e.g. "1", "entailment"); `TaskData.labels` gives
    their class-index order. Unknown labels, missing columns and rows of the wrong width are errors
    naming the file and line.
    """
    spec = task_spec(task)
    path = Path(path)
    rows = _read_rows(path)
    if not rows or all(not any(field.strip() for field in row) for row in rows):
        raise AttAttrError(f"{path}: no examples")
    first_line = 1
    text_col, pair_col, label_col = spec.text, spec.pair, spec.label
    header = rows[0]
    if spec.has_header or header == ["index", "sentence"]:  # CoLA's test file has a header
        rows = rows[1:]
        first_line = 2
        position = {name: i for i, name in enumerate(header)}

        def column(name, required: bool):
            if name in position:
                return position[name]
            if required:
                raise AttAttrError(f"{path}: no {name!r} column for task {spec.name} (found: {', '.join(header)})")
            return None

        text_col = column("sentence" if header == ["index", "sentence"] else spec.text, True)
        pair_col = None if spec.pair is None else column(spec.pair, True)
        label_col = column(spec.label, False)  # test files have no labels
        width = len(header)
    else:
        width = spec.columns
    examples = []
    for offset, row in enumerate(rows):
        line = first_line + offset
        if not any(field.strip() for field in row):
            continue
        if len(row) != width:  # a stray tab inside a text would shift the columns
            raise AttAttrError(f"{path}:{line}: {len(row)} tab-separated fields, expected {width} for {spec.name}")
        text = row[text_col].strip()
        pair = None if pair_col is None else row[pair_col].strip()
        if not text or (pair_col is not None and not pair):
            raise AttAttrError(f"{path}:{line}: empty text")
        label = None if label_col is None else row[label_col].strip()
        if label is not None:
            if spec.labels is None:
                try:
                    float(label)
                except ValueError:
                    raise AttAttrError(f"{path}:{line}: {spec.name} score {label!r} is not a number") from None
            elif label not in spec.labels:
                raise AttAttrError(
                    f"{path}:{line}: unknown {spec.name} label {label!r}; expected one of {', '.join(spec.labels)}"
                )
        examples.append(Example(text=text, text_pair=pair, label=label))
    if not examples:
        raise AttAttrError(f"{path}: no examples")
    return TaskData(spec.name, examples, spec.labels, spec.label_names, regression=spec.labels is None)


def read_task(path: str | Path, task: str = "generic") -> TaskData:
    """A GLUE file of `task`, or with task "generic" a TSV/CSV/JSONL file with text[, text_pair][, label]."""
    if task.strip().lower() == "generic":
        return TaskData("generic", read_examples(path), None, None)
    return read_glue(path, task)


def label_set(data: TaskData, given: list[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(raw labels, names) in class order: the task's, the `given` list, or for generic data the
    sorted distinct labels of the file (numerically when all are integers)."""
    if given:
        labels = tuple(given)
        if len(set(labels)) != len(labels):
            raise AttAttrError(f"duplicate labels in {', '.join(labels)}")
        unknown = sorted({e.label for e in data.examples if e.label is not None} - set(labels))
        if unknown:
            raise AttAttrError(f"label {unknown[0]!r} of the data is not among the given labels {', '.join(labels)}")
        return labels, labels
    if data.labels is not None:
        return data.labels, data.label_names
    if data.regression:
        raise AttAttrError(f"{data.task} is a regression task; classification needs a label set")
    values = sorted({e.label for e in data.examples if e.label is not None})
    if not values:
        raise AttAttrError("the examples have no labels")
    if all(v.lstrip("-").isdigit() for v in values):
        values = sorted(values, key=int)
    return tuple(values), tuple(values)


def class_indices(data: TaskData, config) -> list[int]:
    """The class index of every example's label for a model with `config` (its label2id / num_labels).

    A GLUE label maps through its name (SST-2 "1" → "positive") when the model names its classes,
    else through the task's class order (models with the default LABEL_k names, e.g. fresh from
    fine-tuning); generic labels go through `datasets.label_index` (a name or an index).
    """
    from attattr_fast.datasets import label_index

    if data.regression:
        raise AttAttrError(f"{data.task} is a regression task; head importance and pruning need class labels")
    label2id = dict(getattr(config, "label2id", None) or {})
    num_labels = int(config.num_labels)
    default_names = all(str(k).startswith("LABEL_") for k in label2id)
    indices = []
    for i, example in enumerate(data.examples):
        if example.label is None:
            raise AttAttrError(f"{data.task} example {i} has no label (labelled data is needed here, not a test split)")
        if data.labels is None:
            indices.append(label_index(example.label, label2id, num_labels))
            continue
        position = data.labels.index(example.label)
        if len(data.labels) != num_labels:
            raise AttAttrError(f"{data.task} has {len(data.labels)} classes, the model has {num_labels}")
        if default_names:
            indices.append(position)
        else:
            indices.append(label_index(data.label_names[position], label2id, num_labels))
    return indices
