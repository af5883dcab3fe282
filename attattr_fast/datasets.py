"""Reading labelled examples: the generic TSV (with a header) / CSV / JSONL format, or plain text.

Columns: `text` (required), `text_pair` (optional; blank = no pair), `label` (optional; a label name or an index). A
TSV field is
taken as it stands (no quoting, as in GLUE's files: a text may begin with a quote); a .txt file holds one text per
line.
"""

from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from attattr_fast.errors import AttAttrError, require_file

COLUMNS = ("text", "text_pair", "label")  # the columns read; any others are ignored


@dataclass
class Example:
    text: str
    text_pair: str | None = None
    label: str | None = None


def is_unicode(text: str) -> bool:
    """Whether a str is valid Unicode text: no lone surrogate (a half emoji from a cut, or bytes a shell passed
    through undecoded), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def _csv_fields_of_any_size():
    """csv refuses fields over 128 KiB by default; a long text is truncated later, like any other."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a .tsv, .csv or .jsonl file (format by extension; .txt = one text per line)."""
    path = Path(path)
    require_file(path, "input file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            with path.open(newline="", encoding="utf-8-sig") as f, _csv_fields_of_any_size():
                # strict: an unterminated CSV quote is an error, not a text that swallows the rest of the file
                dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"delimiter": ","}
                reader = csv.DictReader(f, strict=True, **dialect)
                header = reader.fieldnames or []
                repeated = [name for name in COLUMNS if header.count(name) > 1]  # others are not read
                if repeated:
                    raise AttAttrError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once")
                records = []
                for r in reader:
                    extra = r.pop(None, [])  # DictReader's key for fields beyond the header
                    missing = sum(value is None for value in r.values())  # its filling for fields short of it
                    if extra or missing:
                        found = len(header) + len(extra) - missing
                        raise AttAttrError(f"{path}:{reader.line_num}: {found} field{'s' * (found != 1)} where the "
                                           f"header has {len(header)}")  # fmt: skip
                    records.append(r)
        elif suffix in (".jsonl", ".json"):
            records = []
            with path.open(encoding="utf-8-sig") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise AttAttrError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
                    if not isinstance(record, dict):
                        raise AttAttrError(f"{path}:{line_no}: expected a JSON object per line")
                    records.append(record)
            header = sorted({k for r in records for k in r})
        elif suffix == ".txt":
            # "\n" only (universal newlines turned \r\n and \r into it): splitlines() would also split at
            # U+2028, form feeds and other separators inside a text
            lines = path.read_text(encoding="utf-8-sig").split("\n")
            tabbed = next((number for number, line in enumerate(lines, 1) if "\t" in line), None)
            if tabbed is not None:  # most likely columns: a TSV under another name
                raise AttAttrError(f"{path}:{tabbed}: a tab in a .txt file, which holds one text per line; "
                                   "for text and label columns name it .tsv")
            records, header = [{"text": line} for line in lines if line.strip()], ["text"]
        else:
            raise AttAttrError(f"{path}: unknown input format {suffix!r}; use .tsv, .csv, .jsonl or .txt")
    except UnicodeDecodeError:
        raise AttAttrError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise AttAttrError(f"{path}: malformed {suffix[1:].upper()} ({exc})") from None
    if records and "text" not in header:
        raise AttAttrError(f"{path}: no 'text' column (found: {', '.join(map(str, header)) or 'none'})")
    if not records:
        raise AttAttrError(f"{path}: no examples")
    examples = []
    for i, r in enumerate(records):
        text = r.get("text")
        if text is None or not str(text).strip():
            raise AttAttrError(f"{path}: example {i} has an empty text")
        pair = r.get("text_pair")
        if not isinstance(text, str) or not isinstance(pair, (str, type(None))):
            raise AttAttrError(f"{path}: example {i}: text and text_pair must be strings")
        if not is_unicode(text) or (pair is not None and not is_unicode(pair)):
            raise AttAttrError(f"{path}: example {i}: not valid Unicode text (a lone surrogate)")
        label = r.get("label")
        examples.append(
            Example(
                text=str(text),
                text_pair=pair if pair is not None and pair.strip() else None,  # blank: a single sentence
                label=str(label) if label not in (None, "") else None,
            )
        )
    return examples


BUILTIN_SENTIMENT = "builtin:sentiment"  # the name the CLI's --input takes for the built-in sentences


def _builtin_sentiment_file():
    return resources.files("attattr_fast") / "data" / "sentiment.tsv"


def builtin_sentiment_examples() -> list[Example]:
    """The project's balanced set of labelled review sentences (negative / positive)."""
    with resources.as_file(_builtin_sentiment_file()) as p:
        return read_examples(p)


def builtin_sentiment_bytes() -> bytes:
    """The built-in sentences' file as stored in the package (for checksums)."""
    return _builtin_sentiment_file().read_bytes()


def load_examples(source: str | Path) -> list[Example]:
    """`read_examples(source)`, or the built-in sentences for `BUILTIN_SENTIMENT`."""
    return builtin_sentiment_examples() if str(source) == BUILTIN_SENTIMENT else read_examples(source)


def label_index(label: str, label2id: dict[str, int], num_labels: int) -> int:
    """A label name (or index) as a class index; clear error for an unknown one."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        label = str(int(label))
    if not isinstance(label, str):
        raise AttAttrError(f"a label must be a name or a class index, got {label!r}")
    if label in label2id:
        return int(label2id[label])
    lowered = {k.lower(): v for k, v in label2id.items()}
    if label.lower() in lowered:
        return int(lowered[label.lower()])
    if label.lstrip("-").isdigit() and 0 <= int(label) < num_labels:
        return int(label)
    names = ", ".join(str(k) for k in label2id) or f"0..{num_labels - 1}"
    raise AttAttrError(f"unknown label {label!r}; the model's labels are: {names}")
