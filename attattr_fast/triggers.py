"""Adversarial triggers from attribution patterns (Hao et al. 2021, §5.3, Tables 1 and 2).

The interactions with the largest attribution are patterns the model over-relies on; inserted into
other inputs they can flip its predictions. Three steps:

1. Extraction (`extract`). For each example (target = the predicted class) the engine runs with
   output="reduced": every head of every layer gives its strongest entry, head_max[l, h] at
   head_argmax[l, h] = (i, j) (i = query, the receiving token; j = key, the sending token). The
   `entries` strongest distinct (i, j) among those with a positive score form the pattern: the tokens at
   the union of their positions, in source order, at most `max_tokens` (≤ 4, "fewer than 5 tokens");
   an entry that would push the pattern past that is skipped. The pattern's score is its largest entry.
   No [L, H, n, n] tensor is kept. Patterns are grouped by predicted class; identical patterns (same
   tokens, same segments) merge, keeping the count, the best score and the positions of the best-scoring
   occurrence; they rank by count, then score (or by score, then count).

   mode="release" follows the authors' released script: the single head holding the largest entry over
   all layers and heads (first in (layer, head) order on ties, as the script's strict comparison does),
   and that head's top `entries` entries (default 2: at most 2 tokens each, 4 with both). head_max only
   says which head; its second entry needs that head's full matrix, so the engine reruns only that
   layer for that example (output="full", layers=[l]), batched over examples that chose the same layer.

2. Insertion (`insert_trigger`). Each trigger token goes into the same segment at the same relative
   position as in its source: a token at offset k of a segment with m content tokens has relative
   position k / m; in an example whose segment has m' content tokens it goes before content token
   round(k / m · m') (half up; m' means at the segment's end, before its closing special token).
   Tokens that were adjacent in the source form a block inserted at its first token's slot, so "not
   good" or the pieces of one word stay together; blocks keep source order. If the example grows past
   the maximum length it is truncated like the tokenizer's longest-first rule (content tokens come off
   the end of the longest segment, ties: the later one), except that inserted tokens are never removed.

3. Evaluation (`evaluate`): for the top-k triggers of each class, accuracy per gold class with and
   without each trigger and the change (the layout of the paper's Table 2), the attack success rate and
   a control: the same number of random vocabulary tokens inserted at the same positions.

Word pieces. A pattern is made of the pieces exactly as the model sees them: token ids (strings for
display), never re-tokenised text, so "##less" is inserted as that piece and the model sees the same
ids it over-relied on. Whole words matter only for the exclusion lexicon: a position is excluded when
the word it belongs to (its pieces joined, lower-cased) is in the lexicon, so "lifeless" excludes both
"life" and "##less" if split. Special tokens ([CLS], [SEP], <s>, </s>, padding; not [UNK] or [MASK],
which stand for text): excluded by default, i.e. an entry touching one is skipped. Because extraction
sees only each head's strongest entry, a head whose strongest entry touches one contributes nothing
(its next entry is not available from reduced output). With include_special=True (the release's
behaviour, the default in release mode) they can be part of a pattern and of its identity; at insertion
they stand for the example's own special tokens, so nothing is inserted for them, and a pattern made
only of special tokens is not a trigger.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attattr_fast.datasets import Example, label_index
from attattr_fast.errors import AttAttrError, require_file

log = logging.getLogger(__name__)

MODES = ("strongest", "release")
RANKINGS = ("count", "score")
MAX_PATTERN_TOKENS = 4  # the paper's patterns have fewer than 5 tokens
FORMAT = "attattr-fast-triggers"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where an example's segments are.

    special: per position, True for a structural special token ([CLS], [SEP], <s>, </s>, padding).
    runs:    [start, end) of each segment's content, in order (segment 0, 1, …).
    segment: per position, its segment; a special token belongs to the segment before it (0 at the start).
    """

    special: tuple[bool, ...]
    runs: tuple[tuple[int, int], ...]
    segment: tuple[int, ...]

    def relative_position(self, position: int) -> float | None:
        """Offset in its segment's content over the content length, in [0, 1); None for a special token."""
        if self.special[position]:
            return None
        start, end = self.runs[self.segment[position]]
        return (position - start) / (end - start)


def layout(token_ids: Sequence[int], special_ids: Collection[int]) -> Layout:
    """The segments of one example's real tokens (no padding): maximal runs of non-special tokens."""
    special = tuple(int(t) in special_ids for t in token_ids)
    runs: list[tuple[int, int]] = []
    segment = []
    start = None
    for p, is_special in enumerate(special):
        if not is_special and start is None:
            start = p
        if is_special and start is not None:
            runs.append((start, p))
            start = None
        # content belongs to the run being built; a special token to the last finished run
        segment.append(len(runs) if not is_special else max(len(runs) - 1, 0))
    if start is not None:
        runs.append((start, len(special)))
    return Layout(special=special, runs=tuple(runs), segment=tuple(segment))


def structural_special_ids(tokenizer) -> set[int]:
    """Ids of the tokens that frame segments: CLS/SEP/BOS/EOS/PAD (UNK and MASK stand for text)."""
    ids = set()
    for name in ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return ids


def piece_marker(tokenizer) -> str:
    """How the tokenizer marks word boundaries: "##" (WordPiece continuation) or "Ġ" / "▁" (word start)."""
    pieces = tokenizer.tokenize("a b")
    for marker in ("Ġ", "▁"):
        if any(p.startswith(marker) for p in pieces):
            return marker
    return "##"


def words(tokens: Sequence[str], special: Sequence[bool], marker: str = "##") -> list[str | None]:
    """The lower-cased whole word each position belongs to (None for special tokens).

    marker "##": a piece starting with "##" continues the previous word (WordPiece). "Ġ" or "▁": a piece
    starting with the marker begins a word, any other continues one (byte-level BPE, SentencePiece);
    the first piece after a special token always begins a word.
    """
    groups: list[list[int]] = []
    for p, token in enumerate(tokens):
        if special[p]:
            continue
        continues = token.startswith("##") if marker == "##" else not token.startswith(marker)
        if continues and groups and groups[-1][-1] == p - 1:
            groups[-1].append(p)
        else:
            groups.append([p])
    out: list[str | None] = [None] * len(tokens)
    for group in groups:
        text = "".join(tokens[p][2:] if marker == "##" and tokens[p].startswith("##") else tokens[p] for p in group)
        word = text.replace(marker, "").lower() if marker != "##" else text.lower()
        for p in group:
            out[p] = word
    return out


def blocked_positions(
    tokens: Sequence[str],
    lay: Layout,
    include_special: bool,
    exclude_words: Collection[str] | None = None,
    marker: str = "##",
) -> list[bool]:
    """Per position, True where no pattern may touch: special tokens (unless included), lexicon words."""
    blocked = [bool(s) and not include_special for s in lay.special]
    if exclude_words:
        lexicon = {w.lower() for w in exclude_words}
        for p, word in enumerate(words(tokens, lay.special, marker)):
            if word is not None and (word in lexicon or tokens[p].lower() in lexicon):
                blocked[p] = True
    return blocked


def read_lexicon(path: str | Path) -> set[str]:
    """Words to exclude, one per line (blank lines and lines starting with # are ignored), lower-cased."""
    path = Path(path)
    require_file(path, "lexicon file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AttAttrError(f"{path}: not UTF-8 text") from None
    return {line.strip().lower() for line in lines if line.strip() and not line.lstrip().startswith("#")}


# ------------------------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Entry:
    """One attribution entry: layer (model index), head, query i (receiving), key j (sending), score."""

    layer: int
    head: int
    query: int
    key: int
    score: float


@dataclass
class Pattern:
    """Tokens of one (merged) pattern, in source order, with where they sat in the best-scoring source.

    token_ids, tokens, segments: per token. rel_positions: offset / content length within its segment
    (None for a special token). positions: the tokens' positions in that source example. score: the
    largest attribution inside the pattern (best over merged occurrences). count: merged occurrences.
    label: the predicted class of the source examples. source: index of the best-scoring source.
    """

    label: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    segments: tuple[int, ...]
    rel_positions: tuple[float | None, ...]
    special: tuple[bool, ...]
    positions: tuple[int, ...]
    score: float
    source: int
    entries: list[Entry] = field(default_factory=list)
    count: int = 1
    sources: list[int] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """Identity for merging: the same pieces in the same segments."""
        return (self.token_ids, self.segments)

    @property
    def insertable(self) -> bool:
        """Whether inserting it adds anything (special tokens map to the example's own)."""
        return not all(self.special)

    def text(self) -> str:
        return " ".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("token_ids", "tokens", "segments", "rel_positions", "special", "positions"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pattern:
        try:
            pattern = cls(
                label=int(data["label"]),
                token_ids=tuple(int(t) for t in data["token_ids"]),
                tokens=tuple(str(t) for t in data["tokens"]),
                segments=tuple(int(s) for s in data["segments"]),
                rel_positions=tuple(None if r is None else float(r) for r in data["rel_positions"]),
                special=tuple(bool(s) for s in data["special"]),
                positions=tuple(int(p) for p in data["positions"]),
                score=float(data["score"]),
                source=int(data["source"]),
                entries=[Entry(**e) for e in data.get("entries", [])],
                count=int(data.get("count", 1)),
                sources=[int(s) for s in data.get("sources", [])],
            )
            per_token = (pattern.token_ids, pattern.tokens, pattern.segments, pattern.rel_positions, pattern.special,
                         pattern.positions)  # fmt: skip
            if len({len(values) for values in per_token}) != 1:
                raise ValueError("its per-token lists differ in length")
            if any(r is None and not special for r, special in zip(pattern.rel_positions, pattern.special)):
                raise ValueError("a token that is not special has no relative position")
            if any(r is not None and not 0.0 <= r < 1.0 for r in pattern.rel_positions):
                raise ValueError("a relative position is outside [0, 1)")
            if any(s < 0 for s in pattern.segments):
                raise ValueError("a segment number is negative")
        except (KeyError, TypeError, ValueError) as exc:
            raise AttAttrError(f"malformed pattern ({exc.__class__.__name__}: {exc})") from None
        return pattern


def _select(candidates: list[tuple[float, int, int, int, int]], blocked: Sequence[bool], entries: int,
            max_tokens: int, positive_only: bool = True) -> list[tuple[float, int, int, int, int]]:
    """The `entries` strongest distinct (i, j) with no blocked position, ≤ max_tokens tokens, and (with
    `positive_only`) a positive score.

    candidates: (score, layer, head, i, j), already in priority order (strongest first).
    """
    chosen, seen, positions = [], set(), set()
    for cand in candidates:
        score, _, _, i, j = cand
        if len(chosen) == entries or (positive_only and not score > 0):
            break
        if (i, j) in seen or blocked[i] or blocked[j]:
            continue
        seen.add((i, j))
        if len(positions | {i, j}) > max_tokens:
            continue
        positions |= {i, j}
        chosen.append(cand)
    return chosen


def strongest_entries(
    head_max: Tensor,
    head_argmax: Tensor,
    layers: Sequence[int],
    blocked: Sequence[bool],
    entries: int = 2,
    max_tokens: int = MAX_PATTERN_TOKENS,
) -> list[Entry]:
    """The strongest distinct entries of one example across layers and heads, from reduced output.

    Args:
        head_max: [L', H] each head's signed maximum attribution.
        head_argmax: long [L', H, 2] its (i, j).
        layers: the model layer of each of the L' rows.
        blocked: per position, True where a pattern may not touch (special tokens, lexicon words).
        entries: how many distinct (i, j) to take (a head's entry at an (i, j) already taken is skipped).
        max_tokens: most tokens in the union of positions; an entry that would exceed it is skipped.

    Returns:
        Entries strongest first (ties: lower layer, then lower head).
    """
    n_layers, n_heads = head_max.shape
    scores = head_max.reshape(-1).tolist()
    where = head_argmax.reshape(-1, 2).tolist()
    order = sorted(range(len(scores)), key=lambda k: -scores[k])  # stable: ties keep (layer, head) order
    candidates = [(scores[k], layers[k // n_heads], k % n_heads, where[k][0], where[k][1]) for k in order]
    return [Entry(layer=c[1], head=c[2], query=c[3], key=c[4], score=float(c[0]))
            for c in _select(candidates, blocked, entries, max_tokens)]  # fmt: skip


def release_head(head_max: Tensor, on: Tensor | None = None) -> tuple[int, int]:
    """(row in L', head) of the largest entry over all layers and heads; the first on ties. head_max [L', H];
    `on` [L', H] bool: the heads that may be chosen (a gated or pruned head's zeros are no score)."""
    scores = head_max if on is None else head_max.masked_fill(~on, float("-inf"))
    if on is not None:
        _check_some_head_on(on)
    flat = int(torch.argmax(scores.reshape(-1)))  # torch returns the first maximum
    return flat // head_max.shape[1], flat % head_max.shape[1]


def _check_some_head_on(on: Tensor) -> None:
    if not bool(on.any()):
        raise AttAttrError("every head of the attributed layers is gated off or pruned; choose other layers")


def head_entries(
    head_attr: Tensor,
    layer: int,
    head: int,
    blocked: Sequence[bool],
    entries: int = 2,
    max_tokens: int = MAX_PATTERN_TOKENS,
) -> list[Entry]:
    """The top `entries` entries of one head's attribution matrix head_attr [n, n] (real tokens only),
    strongest first (ties: row-major order), skipping blocked positions and entries past max_tokens; of any sign,
    as the authors' script takes its head's top entries."""
    n = head_attr.shape[-1]
    flat = head_attr.reshape(-1).float()
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    values = flat.tolist()
    candidates = [(values[k], layer, head, k // n, k % n) for k in order]
    return [Entry(layer=layer, head=head, query=c[3], key=c[4], score=float(c[0]))
            for c in _select(candidates, blocked, entries, max_tokens, positive_only=False)]  # fmt: skip


def pattern_from_entries(
    entries: Sequence[Entry],
    token_ids: Sequence[int],
    tokens: Sequence[str],
    lay: Layout,
    label: int,
    source: int,
) -> Pattern | None:
    """The pattern of one example: the tokens at the union of the entries' positions, in source order."""
    if not entries:
        return None
    positions = sorted({p for e in entries for p in (e.query, e.key)})
    return Pattern(
        label=int(label),
        token_ids=tuple(int(token_ids[p]) for p in positions),
        tokens=tuple(tokens[p] for p in positions),
        segments=tuple(lay.segment[p] for p in positions),
        rel_positions=tuple(lay.relative_position(p) for p in positions),
        special=tuple(lay.special[p] for p in positions),
        positions=tuple(positions),
        score=max(e.score for e in entries),
        source=int(source),
        entries=list(entries),
        count=1,
        sources=[int(source)],
    )


def merge_patterns(patterns: Sequence[Pattern], rank_by: str = "count") -> dict[int, list[Pattern]]:
    """Group by label, merge identical patterns (count, best score, best occurrence's positions), rank.

    rank_by "count": count, then score, both descending; "score": score, then count. Remaining ties:
    the earlier source example first.
    """
    if rank_by not in RANKINGS:
        raise AttAttrError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANKINGS)}")
    merged: dict[int, dict[tuple, Pattern]] = {}
    for p in patterns:
        group = merged.setdefault(p.label, {})
        if p.key not in group:
            group[p.key] = replace(p, entries=list(p.entries), sources=list(p.sources))
            continue
        kept = group[p.key]
        count, sources = kept.count + p.count, kept.sources + p.sources
        if p.score > kept.score:
            kept = replace(p, entries=list(p.entries))
        group[p.key] = replace(kept, count=count, sources=sources)
    if rank_by == "count":
        def sort_key(p):
            return (-p.count, -p.score, p.source)
    else:
        def sort_key(p):
            return (-p.score, -p.count, p.source)
    return {label: sorted(group.values(), key=sort_key) for label, group in sorted(merged.items())}


@dataclass
class Extraction:
    """Ranked patterns per predicted class, and how they were found.

    labels: class names by index. patterns: class index → patterns, best first. n_examples: examples
    attributed; n_without_pattern: those left without a pattern (every candidate entry blocked or ≤ 0).
    A pattern's `source` and `sources` index the examples given to `extract`.
    """

    labels: list[str]
    patterns: dict[int, list[Pattern]]
    n_examples: int
    n_without_pattern: int
    options: dict[str, Any] = field(default_factory=dict)

    def top(self, label: int, k: int) -> list[Pattern]:
        """The best k insertable patterns of a class (fewer if it has fewer)."""
        return [p for p in self.patterns.get(label, []) if p.insertable][:k]

    def to_dict(self) -> dict[str, Any]:
        from attattr_fast import __version__

        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__,
            "labels": self.labels, "n_examples": self.n_examples, "n_without_pattern": self.n_without_pattern,
            "options": self.options,
            "patterns": {str(k): [p.to_dict() for p in v] for k, v in self.patterns.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> Extraction:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AttAttrError("not an attattr-fast triggers file (missing format marker)")
        if data.get("format_version") != FORMAT_VERSION:
            raise AttAttrError(f"a triggers file of format version {data.get('format_version')}; this version reads "
                               f"format {FORMAT_VERSION}: extract the patterns again")  # fmt: skip
        try:
            patterns = {int(k): [Pattern.from_dict(p) for p in v] for k, v in data["patterns"].items()}
            return cls(labels=[str(x) for x in data["labels"]], patterns=patterns,
                       n_examples=int(data["n_examples"]), n_without_pattern=int(data["n_without_pattern"]),
                       options=dict(data.get("options", {})))  # fmt: skip
        except AttAttrError as exc:  # a malformed pattern, already explained
            raise AttAttrError(f"malformed triggers file: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AttAttrError(f"malformed triggers file ({exc.__class__.__name__}: {exc})") from None

    def markdown(self, k: int = 10) -> str:
        """The top-k patterns of each class as a markdown table (the paper's Table 1)."""
        lines = ["| class | rank | pattern | segments | count | score |", "|---|---:|---|---|---:|---:|"]
        for label, patterns in self.patterns.items():
            for rank, p in enumerate(patterns[:k], 1):
                name = self.labels[label] if label < len(self.labels) else str(label)
                lines.append(f"| {name} | {rank} | {_md(p.text())} | {','.join(map(str, p.segments))} "
                             f"| {p.count} | {p.score:.4g} |")  # fmt: skip
        return "\n".join(lines)


def save_patterns(extraction: Extraction, path: str | Path) -> None:
    """Write an extraction as JSON, atomically."""
    from attattr_fast.results import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(extraction.to_dict(), indent=1, ensure_ascii=False) + "\n").encode())


def load_patterns(path: str | Path) -> Extraction:
    """Read a file written by `save_patterns`."""
    path = Path(path)
    require_file(path, "triggers file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AttAttrError(f"{path} is not valid JSON") from None
    return Extraction.from_dict(data)


def _md(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


MAX_CONTROL_DRAWS = 1000  # random controls per trigger: each is a pass over every example


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise AttAttrError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def extract(
    model,
    tokenizer,
    examples: Sequence[Example],
    n_examples: int = 3000,
    entries: int = 2,
    mode: str = "strongest",
    include_special: bool | None = None,
    exclude_words: Collection[str] | None = None,
    max_tokens: int = MAX_PATTERN_TOKENS,
    rank_by: str = "count",
    batch_size: int = 8,
    n_steps: int = 20,
    method: str = "riemann_right",
    layers: list[int] | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> Extraction:
    """Attribution patterns of the first `n_examples` examples, grouped by predicted class and ranked.

    Args:
        model: a supported classifier, or an `AttentionAttribution`.
        tokenizer: its tokenizer.
        examples: texts (and pairs); labels are not needed (the target is the predicted class).
        n_examples: how many of the examples to use, from the start (default 3000).
        entries: strongest distinct (i, j) entries per example (default 2).
        mode: "strongest" (across all layers and heads, from reduced output) or "release" (the single
            head holding the largest entry, its top entries; reruns that layer with full output).
        include_special: whether [CLS]/[SEP]-type tokens may be in a pattern (None: False for
            "strongest", True for "release", as the authors' script does).
        exclude_words: words no pattern may contain (whole words, case-insensitive).
        max_tokens: most tokens in a pattern, 1..4.
        rank_by: "count" or "score".
        batch_size: examples per engine call.
        n_steps, method, layers, dtype, backend: as in `AttentionAttribution.attribute`.
        progress: show a progress bar.

    Returns:
        Extraction (patterns per predicted class, best first).
    """
    from tqdm.auto import tqdm

    from attattr_fast.api import AttentionAttribution
    from attattr_fast.corpus import attribute_corpus, prepare

    if mode not in MODES:
        raise AttAttrError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if rank_by not in RANKINGS:
        raise AttAttrError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANKINGS)}")
    _check_int(n_examples, "n_examples", 1)
    _check_int(entries, "entries", 1)
    _check_int(max_tokens, "max_tokens", 1, MAX_PATTERN_TOKENS)
    _check_int(batch_size, "batch_size", 1)
    if not examples:
        raise AttAttrError("no examples to extract patterns from")
    if include_special is None:
        include_special = mode == "release"
    aa = model if isinstance(model, AttentionAttribution) else AttentionAttribution(model)
    examples = list(examples)[:n_examples]
    corpus = prepare(aa, tokenizer, examples)
    special_ids = structural_special_ids(tokenizer)
    marker = piece_marker(tokenizer)
    options = dict(n_steps=n_steps, method=method, dtype=dtype, backend=backend)

    heads_on = aa.adapter.gates_in_effect != 0  # [L, H]: release mode never picks a head that is off
    chosen = [layer for layer in (range(aa.adapter.n_layers) if layers is None else layers)
              if isinstance(layer, int) and 0 <= layer < aa.adapter.n_layers]  # bad layers: attribute says why
    if mode == "release" and chosen:
        _check_some_head_on(heads_on[chosen])
    found: list[Pattern] = []
    reruns: dict[int, list[tuple[int, int, int, list[bool]]]] = {}  # layer → (example, target, head, blocked)
    records = attribute_corpus(aa, corpus, [None] * len(examples), batch_size=batch_size, top_k=0,
                               progress=progress, layers=layers, output="reduced", **options)  # fmt: skip
    per_example: dict[int, tuple[Layout, list[bool]]] = {}
    for record in records:
        ids, _ = corpus.tokenized.example(record.index)
        lay = layout(ids, special_ids)
        blocked = blocked_positions(record.tokens, lay, include_special, exclude_words, marker)
        per_example[record.index] = (lay, blocked)
        if mode == "strongest":
            chosen = strongest_entries(record.head_max, record.head_argmax, record.layers, blocked, entries, max_tokens)
            pattern = pattern_from_entries(chosen, ids, record.tokens, lay, record.target, record.index)
            if pattern is not None:
                found.append(pattern)
        else:
            row, head = release_head(record.head_max, heads_on[record.layers])
            reruns.setdefault(record.layers[row], []).append((record.index, record.target, head, blocked))

    bar = tqdm(total=sum(map(len, reruns.values())), unit="ex", disable=not progress or not reruns,
               desc="strongest heads")  # fmt: skip
    lengths = corpus.lengths
    for layer, jobs in sorted(reruns.items()):
        # one layer, full output, only for the examples whose strongest head is in it
        jobs.sort(key=lambda job: lengths[job[0]])
        for begin in range(0, len(jobs), batch_size):
            batch = jobs[begin : begin + batch_size]
            res = aa.attribute(*corpus.tokenized.padded([job[0] for job in batch]),
                               target=torch.tensor([job[1] for job in batch]), layers=[layer], output="full",
                               **options)  # fmt: skip
            for b, (index, target, head, blocked) in enumerate(batch):
                m = lengths[index]
                chosen = head_entries(res.attributions[b, 0, head, :m, :m], layer, head, blocked, entries, max_tokens)
                ids, _ = corpus.tokenized.example(index)
                pattern = pattern_from_entries(chosen, ids, corpus.tokenized.tokens[index], per_example[index][0],
                                               target, index)  # fmt: skip
                if pattern is not None:
                    found.append(pattern)
            bar.update(len(batch))
    bar.close()

    found.sort(key=lambda p: p.source)  # merge in input order whatever the batching order was
    id2label = dict(getattr(aa.adapter.config, "id2label", {}) or {})
    labels = [str(id2label.get(c, c)) for c in range(aa.adapter.num_labels)]
    n_without = len(examples) - len(found)
    if n_without:
        log.info("%d of %d examples gave no pattern (every candidate entry blocked or not positive)",
                 n_without, len(examples))  # fmt: skip
    return Extraction(
        labels=labels,
        patterns=merge_patterns(found, rank_by),
        n_examples=len(examples),
        n_without_pattern=n_without,
        options=dict(mode=mode, entries=entries, include_special=include_special, max_tokens=max_tokens,
                     rank_by=rank_by, exclude_words=sorted(exclude_words or []), n_steps=n_steps, method=method,
                     layers=layers, dtype=None if dtype is None else str(dtype).replace("torch.", ""),
                     backend=backend),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ insertion


@dataclass
class Inserted:
    """An example with a trigger: token_ids, token_types (lists), positions of the inserted tokens,
    and how many original content tokens truncation removed."""

    token_ids: list[int]
    token_types: list[int]
    positions: list[int]
    removed: int = 0


def _blocks(pattern: Pattern) -> list[tuple[int, float, list[int]]]:
    """(segment, relative position, token ids) of each run of source-adjacent insertable tokens."""
    blocks: list[tuple[int, float, list[int]]] = []
    last = None
    for k in range(len(pattern.token_ids)):
        if pattern.special[k]:
            last = None
            continue
        pos, seg = pattern.positions[k], pattern.segments[k]
        if last is not None and pos == last[0] + 1 and seg == last[1]:
            blocks[-1][2].append(pattern.token_ids[k])
        else:
            blocks.append((seg, float(pattern.rel_positions[k]), [pattern.token_ids[k]]))
        last = (pos, seg)
    return blocks


def insert_trigger(
    token_ids: Sequence[int],
    token_types: Sequence[int],
    pattern: Pattern,
    special_ids: Collection[int],
    max_length: int,
) -> Inserted:
    """Insert a pattern's non-special tokens into one example (real tokens only, no padding).

    Each block of source-adjacent tokens goes into its segment before content token
    floor(rel · m + 0.5) of that segment (m its content length; m = at the end); inserted tokens take
    the segment's token type. Past `max_length`, content tokens come off the end of the longest
    segment (ties: the later), never inserted ones.
    """
    lay = layout(token_ids, special_ids)
    per_segment: dict[int, list[tuple[int, list[int]]]] = {}
    for seg, rel, ids in _blocks(pattern):
        if seg >= len(lay.runs):
            raise AttAttrError(
                f"the trigger has tokens in segment {seg + 1} but the example has {len(lay.runs)} segment(s)"
            )
        m = lay.runs[seg][1] - lay.runs[seg][0]
        slot = min(max(math.floor(rel * m + 0.5), 0), m)
        per_segment.setdefault(seg, []).append((slot, ids))
    # items: [token id, token type, is trigger, segment or None]
    items: list[list] = []
    for p in range(len(token_ids)):
        seg = lay.segment[p]
        if lay.special[p]:
            items.append([int(token_ids[p]), int(token_types[p]), False, None])
            continue
        start, end = lay.runs[seg]
        for slot, ids in per_segment.get(seg, []):
            if start + slot == p:
                items.extend([[t, int(token_types[start]), True, seg] for t in ids])
        items.append([int(token_ids[p]), int(token_types[p]), False, seg])
        if p == end - 1:
            for slot, ids in per_segment.get(seg, []):
                if slot == end - start:
                    items.extend([[t, int(token_types[start]), True, seg] for t in ids])
    removed = 0
    while len(items) > max_length:
        lengths = {}
        for item in items:
            if item[3] is not None:
                lengths[item[3]] = lengths.get(item[3], 0) + 1
        removable = {s for s in lengths if any(it[3] == s and not it[2] for it in items)}
        if not removable:
            raise AttAttrError(f"the trigger does not fit: {len(items)} tokens with it, the maximum is {max_length}")
        seg = max(removable, key=lambda s: (lengths[s], s))
        last = max(k for k, it in enumerate(items) if it[3] == seg and not it[2])
        del items[last]
        removed += 1
    return Inserted(
        token_ids=[it[0] for it in items],
        token_types=[it[1] for it in items],
        positions=[k for k, it in enumerate(items) if it[2]],
        removed=removed,
    )


def control_vocabulary(tokenizer) -> list[int]:
    """Ids a random control token is drawn from: every vocabulary entry but special tokens and
    placeholders ([unused7], <mask>, …), which have no trained meaning."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    placeholder = re.compile(r"^(\[.*\]|<.*>)$")
    return [i for i, t in enumerate(tokens) if i not in special and t and not placeholder.match(t)]


def random_control(pattern: Pattern, vocabulary: Sequence[int], generator: torch.Generator, tokenizer=None) -> Pattern:
    """The pattern with each insertable token replaced by a uniformly drawn vocabulary id (same
    segments, relative positions and adjacency)."""
    draws = torch.randint(len(vocabulary), (len(pattern.token_ids),), generator=generator).tolist()
    ids = tuple(t if s else int(vocabulary[d]) for t, s, d in zip(pattern.token_ids, pattern.special, draws))
    tokens = tuple(tokenizer.convert_ids_to_tokens(list(ids))) if tokenizer is not None else tuple(map(str, ids))
    return replace(pattern, token_ids=ids, tokens=tokens, entries=[], sources=[])


# ----------------------------------------------------------------------------------------- evaluation


def attack_metrics(gold: Tensor, before: Tensor, after: Tensor, source_class: int, n_classes: int) -> dict[str, Any]:
    """Accuracy per gold class after the attack and the rates of a trigger from `source_class`.

    gold, before, after: long [N] gold labels, predictions without and with the trigger.

    Returns:
        accuracy: [C] accuracy per gold class with the trigger (NaN for a class with no examples).
        attack_success_rate: among examples of the other gold classes that were correctly classified
            without the trigger, the fraction misclassified with it (NaN if there are none).
        flip_rate: among all correctly classified examples, the fraction whose prediction changes.
        n_attacked: the denominator of attack_success_rate.
    """
    accuracy = []
    for c in range(n_classes):
        sel = gold == c
        accuracy.append(float((after[sel] == c).double().mean()) if bool(sel.any()) else float("nan"))
    correct = before == gold
    attacked = correct & (gold != source_class)
    n_attacked = int(attacked.sum())
    asr = float((after[attacked] != gold[attacked]).double().mean()) if n_attacked else float("nan")
    flip = float((after[correct] != before[correct]).double().mean()) if bool(correct.any()) else float("nan")
    return {"accuracy": accuracy, "attack_success_rate": asr, "flip_rate": flip, "n_attacked": n_attacked}


@dataclass
class TriggerRow:
    """One row of the table: a trigger (kind "trigger") or its random control (kind "control", averaged
    over `draws` random draws). accuracy, delta: [C] per gold class; delta = accuracy − baseline."""

    kind: str
    source_class: int
    rank: int
    tokens: list[str]
    accuracy: list[float]
    delta: list[float]
    attack_success_rate: float
    flip_rate: float
    draws: int = 1
    control_tokens: list[list[str]] = field(default_factory=list)


@dataclass
class TriggerEvaluation:
    """The Table 2-style result. labels: class names; counts: examples per gold class; baseline: [C]
    accuracy per gold class without a trigger; rows: triggers and controls."""

    labels: list[str]
    counts: list[int]
    baseline: list[float]
    rows: list[TriggerRow]
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self, source_class: int, kind: str) -> dict[str, Any] | None:
        """Means over the class's rows of one kind: delta [C], attack_success_rate, flip_rate."""
        rows = [r for r in self.rows if r.source_class == source_class and r.kind == kind]
        if not rows:
            return None
        delta = [_nanmean([r.delta[c] for r in rows]) for c in range(len(self.labels))]
        return {"delta": delta, "attack_success_rate": _nanmean([r.attack_success_rate for r in rows]),
                "flip_rate": _nanmean([r.flip_rate for r in rows]), "n": len(rows)}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        from attattr_fast import __version__

        classes = sorted({r.source_class for r in self.rows})
        return {
            "format": "attattr-fast-trigger-evaluation", "version": __version__,
            "labels": self.labels, "counts": self.counts, "baseline": _jsonable(self.baseline),
            "rows": [_jsonable(asdict(r)) for r in self.rows],
            "average": {self.labels[c]: {k: _jsonable(self.summary(c, k)) for k in ("trigger", "control")}
                        for c in classes},
            "options": self.options,
        }  # fmt: skip

    def markdown(self) -> str:
        """Accuracy per gold class (change in parentheses), in %, one row per trigger, then the class
        average and the random-token control; ASR = attack success rate."""
        head = "| trigger | tokens | " + " | ".join(f"acc {name} (Δ)" for name in self.labels) + " | ASR | flips |"
        lines = [head, "|---|---|" + "---:|" * (len(self.labels) + 2)]
        counts = ", ".join(f"{n} {name}" for name, n in zip(self.labels, self.counts))
        lines.append(f"| no trigger | ({counts}) | " + " | ".join(_pct(a) for a in self.baseline) + " | | |")
        for c in sorted({r.source_class for r in self.rows}):
            name = self.labels[c]
            for r in [r for r in self.rows if r.source_class == c and r.kind == "trigger"]:
                cells = " | ".join(f"{_pct(a)} ({_signed(d)})" for a, d in zip(r.accuracy, r.delta))
                lines.append(f"| {name} #{r.rank} | {_md(' '.join(r.tokens))} | {cells} | "
                             f"{_pct(r.attack_success_rate)} | {_pct(r.flip_rate)} |")  # fmt: skip
            for kind, title in (("trigger", "avg Δ"), ("control", "random control, avg Δ")):
                s = self.summary(c, kind)
                if s is None:
                    continue
                what = (f"{s['n']} triggers" if kind == "trigger"
                        else f"{s['n']} × {self._draws(c)} draws, same token counts and positions")
                cells = " | ".join(f"({_signed(d)})" for d in s["delta"])
                lines.append(f"| {name} {title} | {what} | {cells} | {_pct(s['attack_success_rate'])} | "
                             f"{_pct(s['flip_rate'])} |")  # fmt: skip
        return "\n".join(lines)

    def _draws(self, c: int) -> int:
        return max((r.draws for r in self.rows if r.source_class == c and r.kind == "control"), default=0)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:+.1f}"


def _jsonable(value):
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def predict(model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
            batch_size: int = 32) -> Tensor:
    """Predicted classes, long [N], of (token ids, token types) sequences, right-padded per batch."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for begin in range(0, len(sequences), batch_size):
            chunk = sequences[begin : begin + batch_size]
            n = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            types = torch.zeros((len(chunk), n), dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for b, (t, s) in enumerate(chunk):
                ids[b, : len(t)] = torch.tensor(list(t))
                types[b, : len(s)] = torch.tensor(list(s))
                mask[b, : len(t)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           token_type_ids=types.to(device)).logits  # fmt: skip
            out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    patterns: Extraction,
    top_k: int = 3,
    control_draws: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> TriggerEvaluation:
    """Insert each of the top-k triggers of every class into every example; Table 2-style accuracies.

    Args:
        model: the classifier (a `*ForSequenceClassification`-like module returning `.logits`).
        tokenizer: its tokenizer; the patterns' ids must mean the same tokens in it.
        examples: labelled examples (every one needs a label).
        patterns: an `Extraction` (from `extract` or `load_patterns`).
        top_k: triggers per class (the best insertable ones; default 3).
        control_draws: random-token controls per trigger (default 5); 0 for none.
        seed: seed of the control draws.
        batch_size: examples per forward.
        progress: show a progress bar.

    Returns:
        TriggerEvaluation; its `markdown()` is the table.
    """
    from tqdm.auto import tqdm

    from attattr_fast.adapters import EncoderAdapter
    from attattr_fast.adapters import max_length as longest_input
    from attattr_fast.text import model_max_length, tokenize

    _check_int(top_k, "top_k", 1)
    _check_int(control_draws, "control_draws", 0, MAX_CONTROL_DRAWS)
    _check_int(batch_size, "batch_size", 1)
    if not examples:
        raise AttAttrError("no examples to evaluate on")
    # the model only predicts here: no adapter needed
    model = model.model if isinstance(model, EncoderAdapter) else model
    max_length = model_max_length(tokenizer, longest_input(model))  # and a supported family
    config = model.config
    n_classes = int(config.num_labels)
    label2id = dict(getattr(config, "label2id", {}) or {})
    missing = [i for i, e in enumerate(examples) if e.label is None]
    if missing:
        raise AttAttrError(f"example {missing[0]} has no label; evaluation needs gold labels")
    gold = torch.tensor([label_index(e.label, label2id, n_classes) for e in examples])
    labels = [str(dict(getattr(config, "id2label", {}) or {}).get(c, c)) for c in range(n_classes)]
    if patterns.labels and patterns.labels != labels:
        raise AttAttrError(f"the patterns are for classes {patterns.labels}, the model has {labels}")
    foreign = sorted(c for c, found in patterns.patterns.items() if found and not 0 <= c < n_classes)
    if foreign:
        raise AttAttrError(f"the patterns file holds patterns of class {foreign[0]}; the model has classes "
                           f"0..{n_classes - 1}")
    _check_vocabulary(patterns, tokenizer)

    tokenized = tokenize(tokenizer, [e.text for e in examples], [e.text_pair for e in examples], max_length=max_length)
    clean = [tokenized.example(b) for b in range(len(examples))]
    special_ids = structural_special_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    triggers = [(c, rank, p) for c in range(n_classes) for rank, p in enumerate(patterns.top(c, top_k), 1)]
    for c in range(n_classes):
        if len(patterns.top(c, top_k)) < top_k:
            log.warning("class %s has %d insertable patterns, fewer than the %d asked for",
                        patterns.labels[c] if c < len(patterns.labels) else c, len(patterns.top(c, top_k)), top_k)
    if not triggers:
        raise AttAttrError("the patterns file has no insertable pattern to evaluate")
    _check_segments(triggers, clean, special_ids, labels)
    before = predict(model, clean, pad_id, batch_size)
    baseline = attack_metrics(gold, before, before, -1, n_classes)["accuracy"]

    def run(pattern: Pattern) -> Tensor:
        inserted = [insert_trigger(ids, types, pattern, special_ids, max_length) for ids, types in clean]
        return predict(model, [(x.token_ids, x.token_types) for x in inserted], pad_id, batch_size)
    vocabulary = control_vocabulary(tokenizer) if control_draws else []
    generator = torch.Generator().manual_seed(seed)
    rows: list[TriggerRow] = []
    for c, rank, pattern in tqdm(triggers, unit="trigger", disable=not progress, desc="evaluating triggers"):
        m = attack_metrics(gold, before, run(pattern), c, n_classes)
        rows.append(_row("trigger", c, rank, list(pattern.tokens), [m], baseline))
        if control_draws:
            controls = [random_control(pattern, vocabulary, generator, tokenizer) for _ in range(control_draws)]
            metrics = [attack_metrics(gold, before, run(p), c, n_classes) for p in controls]
            row = _row("control", c, rank, list(pattern.tokens), metrics, baseline)
            row.control_tokens = [list(p.tokens) for p in controls]
            rows.append(row)
    counts = [int((gold == c).sum()) for c in range(n_classes)]
    return TriggerEvaluation(labels=labels, counts=counts, baseline=baseline, rows=rows,
                             options=dict(top_k=top_k, control_draws=control_draws, seed=seed,
                                          max_length=max_length, n_examples=len(examples)))  # fmt: skip


def _check_segments(triggers, clean, special_ids: Collection[int], labels: list[str]) -> None:
    """Every trigger must find its segments in every example (a pair's trigger needs pairs), checked before work."""
    counts = [len(layout(ids, special_ids).runs) for ids, _ in clean]
    fewest = min(range(len(counts)), key=counts.__getitem__)
    for c, rank, pattern in triggers:
        needs = max((seg for seg, _, _ in _blocks(pattern)), default=-1) + 1
        if needs > counts[fewest]:
            raise AttAttrError(f"trigger {rank} of class {labels[c]} ({pattern.text()!r}) has tokens in segment "
                               f"{needs}, but example {fewest} has {counts[fewest]} segment(s); evaluate the "
                               "triggers of sentence pairs on sentence pairs")  # fmt: skip


def _row(kind: str, c: int, rank: int, tokens: list[str], metrics: list[dict], baseline: list[float]) -> TriggerRow:
    """A table row from one or more metric dicts (averaged: the controls' draws)."""
    n_classes = len(baseline)
    accuracy = [_nanmean([m["accuracy"][k] for m in metrics]) for k in range(n_classes)]
    return TriggerRow(
        kind=kind, source_class=c, rank=rank, tokens=tokens, accuracy=accuracy,
        delta=[a - b for a, b in zip(accuracy, baseline)],
        attack_success_rate=_nanmean([m["attack_success_rate"] for m in metrics]),
        flip_rate=_nanmean([m["flip_rate"] for m in metrics]), draws=len(metrics),
    )  # fmt: skip


def _check_vocabulary(patterns: Extraction, tokenizer) -> None:
    """The patterns' ids must be the same tokens in this tokenizer (else they come from another model)."""
    for group in patterns.patterns.values():
        for p in group:
            if any(t >= len(tokenizer) or t < 0 for t in p.token_ids):
                raise AttAttrError(f"pattern {p.text()!r} has token ids outside this tokenizer's vocabulary")
            if tuple(tokenizer.convert_ids_to_tokens(list(p.token_ids))) != p.tokens:
                raise AttAttrError(f"pattern {p.text()!r} means other tokens in this tokenizer; "
                                   "were the patterns extracted with another model?")  # fmt: skip
