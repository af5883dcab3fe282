"""Write a small SST-2-format data set for the fine-tuning demo (no data can be downloaded here).

train.tsv: templated review sentences (sentence<TAB>label, 1 = positive), built from word lists
written for this demo, shuffled with a fixed seed. dev.tsv: the package's 48 hand-written sentiment
sentences in the same layout, so held-out accuracy is measured on sentences of a different making.

    python docs/heads/make_sst2_style.py docs/heads/data
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from attattr_fast.datasets import builtin_sentiment_examples

SUBJECTS = ["the movie", "this film", "the story", "the acting", "the plot", "the ending", "the dialogue",
            "the script", "the music", "the cast", "the pacing", "the camera work", "the sequel", "the show"]
POSITIVE = ["great", "lovely", "moving", "clever", "funny", "beautiful", "memorable", "thrilling", "charming",
            "excellent", "touching", "delightful", "impressive", "enjoyable", "wonderful", "superb"]
NEGATIVE = ["bad", "boring", "awful", "dull", "weak", "ugly", "forgettable", "tiresome", "silly", "terrible",
            "clumsy", "annoying", "disappointing", "messy", "painful", "lazy"]
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly ", "incredibly "]
TEMPLATES = [
    "{s} was {i}{a}.",
    "{s} is {i}{a} and {a2}.",
    "i thought {s} was {i}{a}.",
    "honestly, {s} felt {i}{a}.",
    "what a {a} experience; {s} was {a2}.",
    "{s} turned out {i}{a}, {a2} even.",
    "my friends found {s} {i}{a}.",
]
NEGATED = ["{s} was not {a}.", "{s} is never {a}.", "i would not call {s} {a}."]  # label flips


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.randrange(2)
        words, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        if rng.random() < 0.15:  # a few negations: "not <opposite word>" carries the label
            text = rng.choice(NEGATED).format(s=rng.choice(SUBJECTS), a=rng.choice(other))
        else:
            a, a2 = rng.sample(words, 2)
            text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), i=rng.choice(INTENSIFIERS), a=a, a2=a2)
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(out: str) -> None:
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / "train.tsv", sentences(320))
    dev = [(e.text, 1 if e.label == "positive" else 0) for e in builtin_sentiment_examples()]
    write(directory / "dev.tsv", dev)
    print(f"wrote {directory / 'train.tsv'} (320) and {directory / 'dev.tsv'} ({len(dev)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/heads/data")
