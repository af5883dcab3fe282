"""Adversarial triggers: extraction on hand-made attribution tensors, insertion, evaluation, CLI.

Expected patterns, scores, positions and inserted sequences are worked out by hand in the comments; the
end-to-end checks on a tiny random BERT compare against a brute-force search of the full [L, H, n, n]
attributions.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

from attattr_fast import AttentionAttribution, load_classifier
from attattr_fast.cli import main as cli_main
from attattr_fast.datasets import Example
from attattr_fast.errors import AttAttrError
from attattr_fast.triggers import (
    Entry,
    Extraction,
    Pattern,
    attack_metrics,
    blocked_positions,
    control_vocabulary,
    evaluate,
    extract,
    head_entries,
    insert_trigger,
    layout,
    load_patterns,
    merge_patterns,
    pattern_from_entries,
    release_head,
    save_patterns,
    strongest_entries,
    structural_special_ids,
    words,
)

CLS, SEP = 101, 102
SPECIAL = {CLS, SEP, 0}


def make_pattern(token_ids, segments, rel_positions, positions, special=None, label=1, score=1.0, source=0):
    special = special or [False] * len(token_ids)
    return Pattern(label=label, token_ids=tuple(token_ids), tokens=tuple(f"t{t}" for t in token_ids),
                   segments=tuple(segments), rel_positions=tuple(rel_positions), special=tuple(special),
                   positions=tuple(positions), score=score, source=source, sources=[source])  # fmt: skip


# --------------------------------------------------------------------------------------- layout, words


def test_layout_of_single_sentence_pair_and_roberta_style_pair():
    single = layout([CLS, 11, 12, 13, 14, SEP], SPECIAL)
    assert single.runs == ((1, 5),)
    assert single.segment == (0, 0, 0, 0, 0, 0)
    assert single.relative_position(3) == 0.5  # offset 2 of 4
    assert single.relative_position(0) is None

    pair = layout([CLS, 11, 12, 13, SEP, 21, 22, SEP], SPECIAL)
    assert pair.runs == ((1, 4), (5, 7))
    assert pair.segment == (0, 0, 0, 0, 0, 1, 1, 1)
    assert pair.relative_position(6) == 0.5 and pair.relative_position(3) == pytest.approx(2 / 3)

    roberta = layout([0, 11, 12, 2, 2, 21, 22, 23, 2], {0, 2})  # <s> A </s></s> B </s>
    assert roberta.runs == ((1, 3), (5, 8))
    assert roberta.segment == (0, 0, 0, 0, 0, 1, 1, 1, 1)
    assert roberta.relative_position(7) == pytest.approx(2 / 3)


def test_words_join_pieces_for_wordpiece_and_bpe():
    tokens = ["[CLS]", "a", "life", "##less", "film", "[SEP]"]
    special = [True, False, False, False, False, True]
    assert words(tokens, special, "##") == [None, "a", "lifeless", "lifeless", "film", None]
    bpe = ["<s>", "The", "Ġlife", "less", "Ġfilm", "</s>", "</s>", "Bad", "</s>"]
    bpe_special = [t.startswith("<") for t in bpe]
    assert words(bpe, bpe_special, "Ġ") == [None, "the", "lifeless", "lifeless", "film", None, None, "bad", None]


def test_blocked_positions_lexicon_blocks_every_piece_of_a_word():
    tokens = ["[CLS]", "a", "life", "##less", "film", "[SEP]"]
    lay = layout([CLS, 11, 12, 13, 14, SEP], SPECIAL)
    assert blocked_positions(tokens, lay, include_special=False) == [True, False, False, False, False, True]
    assert blocked_positions(tokens, lay, include_special=True) == [False] * 6
    assert blocked_positions(tokens, lay, False, {"LifeLess"}) == [True, False, True, True, False, True]


# ------------------------------------------------------------------------- extraction on hand-made tensors

# Two layers (model layers 3 and 5), three heads; example "[CLS] a b c d [SEP]" (positions 0..5).
HEAD_MAX = torch.tensor([[0.5, 0.9, 0.2], [0.9, 0.7, -0.1]])
HEAD_ARGMAX = torch.tensor([[[1, 2], [5, 0], [3, 3]], [[2, 1], [1, 2], [4, 4]]])
TOKENS = ["[CLS]", "a", "b", "c", "d", "[SEP]"]
IDS = [CLS, 11, 12, 13, 14, SEP]


def _blocked(include_special, lexicon=None):
    return blocked_positions(TOKENS, layout(IDS, SPECIAL), include_special, lexicon)


def test_strongest_entries_without_special_tokens():
    # Candidates by score: 0.9 (L3 h1: 5,0) touches [SEP]/[CLS] → skipped; 0.9 (L5 h0: 2,1) → taken;
    # 0.7 (L5 h1: 1,2) is another (i, j) → taken. Pattern = positions {1, 2} = "a b", score 0.9.
    got = strongest_entries(HEAD_MAX, HEAD_ARGMAX, [3, 5], _blocked(False), entries=2)
    assert got == [Entry(5, 0, 2, 1, pytest.approx(0.9)), Entry(5, 1, 1, 2, pytest.approx(0.7))]
    pattern = pattern_from_entries(got, IDS, TOKENS, layout(IDS, SPECIAL), label=1, source=7)
    assert pattern.tokens == ("a", "b") and pattern.positions == (1, 2) and pattern.token_ids == (11, 12)
    assert pattern.score == pytest.approx(0.9)
    assert pattern.rel_positions == (0.0, 0.25) and pattern.segments == (0, 0)
    # Three entries: 0.5 (L3 h0: 1,2) repeats (1, 2) → skipped; 0.2 (L3 h2: 3,3) → "a b c"; −0.1 never.
    got3 = strongest_entries(HEAD_MAX, HEAD_ARGMAX, [3, 5], _blocked(False), entries=3)
    assert [(e.query, e.key) for e in got3] == [(2, 1), (1, 2), (3, 3)]
    got9 = strongest_entries(HEAD_MAX, HEAD_ARGMAX, [3, 5], _blocked(False), entries=9)
    assert len(got9) == 3  # the negative maximum is never a candidate


def test_strongest_entries_with_special_tokens_and_token_limit():
    # Ties at 0.9: layer 3 head 1 comes first. (5,0) then (2,1): positions {0,1,2,5}, 4 tokens.
    got = strongest_entries(HEAD_MAX, HEAD_ARGMAX, [3, 5], _blocked(True), entries=2)
    assert [(e.layer, e.head, e.query, e.key) for e in got] == [(3, 1, 5, 0), (5, 0, 2, 1)]
    pattern = pattern_from_entries(got, IDS, TOKENS, layout(IDS, SPECIAL), label=0, source=0)
    assert pattern.tokens == ("[CLS]", "a", "b", "[SEP]") and pattern.special == (True, False, False, True)
    assert pattern.rel_positions == (None, 0.0, 0.25, None) and pattern.insertable
    # At most 3 tokens: (2,1) and (1,2) would make 4 → skipped; (1,2) again → skipped; (3,3) → {0,3,5}.
    got = strongest_entries(HEAD_MAX, HEAD_ARGMAX, [3, 5], _blocked(True), entries=2, max_tokens=3)
    assert [(e.query, e.key) for e in got] == [(5, 0), (3, 3)]


def test_strongest_entries_with_lexicon():
    # "b" excluded: every entry touching position 2 goes; what is left with a positive score is (3,3) 0.2.
    got = strongest_entries(HEAD_MAX, HEAD_ARGMAX, [3, 5], _blocked(False, {"b"}), entries=2)
    assert got == [Entry(3, 2, 3, 3, pytest.approx(0.2))]
    pattern = pattern_from_entries(got, IDS, TOKENS, layout(IDS, SPECIAL), 1, 0)
    assert pattern.tokens == ("c",) and pattern.rel_positions == (0.5,) and pattern.score == pytest.approx(0.2)
    assert pattern_from_entries([], IDS, TOKENS, layout(IDS, SPECIAL), 1, 0) is None


def test_release_mode_head_and_its_top_entries():
    assert release_head(torch.tensor([[0.3, 0.8], [0.8, 0.1]])) == (0, 1)  # first of the tied maxima
    assert release_head(torch.tensor([[0.3, 0.2], [0.1, 0.9]])) == (1, 1)
    # every head that is on scores below zero: a gated head's zero is no score, so it is never chosen
    negative = torch.tensor([[-0.3, 0.0], [-0.2, -0.4]])
    assert release_head(negative) == (0, 1)
    assert release_head(negative, on=torch.tensor([[True, False], [True, True]])) == (1, 0)
    with pytest.raises(AttAttrError, match="every head of the attributed layers is gated off"):
        release_head(negative, on=torch.zeros(2, 2, dtype=torch.bool))
    m = torch.tensor([[0.0, 0.1, 0.0, 0.0],
                      [0.6, 0.0, 0.0, 0.2],
                      [0.0, 0.0, 0.8, 0.0],
                      [0.0, 0.6, 0.0, 0.0]])  # fmt: skip
    # 0.8 at (2,2); 0.6 tie: (1,0) precedes (3,1) in row-major order.
    got = head_entries(m, layer=4, head=2, blocked=[False] * 4, entries=2)
    assert [(e.layer, e.head, e.query, e.key) for e in got] == [(4, 2, 2, 2), (4, 2, 1, 0)]
    assert [e.score for e in got] == [pytest.approx(0.8), pytest.approx(0.6)]
    got = head_entries(m, 4, 2, blocked=[True, False, False, False], entries=2)
    assert [(e.query, e.key) for e in got] == [(2, 2), (3, 1)]
    # Two tokens at most: after (2,2) every positive entry would add two positions; the first that adds one is
    # (0,0), a zero: the head's top entries are taken whatever their sign, as the authors' script does.
    got = head_entries(m, 4, 2, blocked=[False] * 4, entries=2, max_tokens=2)
    assert [(e.query, e.key, e.score) for e in got] == [(2, 2, pytest.approx(0.8)), (0, 0, 0.0)]
    only_one_positive = -(m + 0.05)
    only_one_positive[0, 0] = 0.5
    got = head_entries(only_one_positive, 4, 2, blocked=[False] * 4, entries=2)
    assert [(e.query, e.key, e.score) for e in got] == [(0, 0, 0.5), (0, 2, pytest.approx(-0.05))]


def test_merge_counts_keeps_best_occurrence_and_ranks():
    ab0 = make_pattern([11, 12], [0, 0], [0.0, 0.25], [1, 2], score=0.5, source=0)
    ab1 = make_pattern([11, 12], [0, 0], [0.5, 0.625], [5, 6], score=0.9, source=1)
    c2 = make_pattern([13], [0], [0.1], [2], score=0.95, source=2)
    ab_other_segment = make_pattern([11, 12], [0, 1], [0.5, 0.0], [3, 5], score=0.3, source=3)
    ab_label0 = make_pattern([11, 12], [0, 0], [0.0, 0.25], [1, 2], label=0, score=0.1, source=4)
    ranked = merge_patterns([ab0, ab1, c2, ab_other_segment, ab_label0], rank_by="count")
    assert sorted(ranked) == [0, 1]
    first, second, third = ranked[1]
    assert (first.token_ids, first.count, first.score, first.sources) == ((11, 12), 2, 0.9, [0, 1])
    assert first.positions == (5, 6) and first.rel_positions == (0.5, 0.625) and first.source == 1
    assert (second.token_ids, second.count) == ((13,), 1)  # count ties: higher score first
    assert (third.segments, third.count) == ((0, 1), 1)
    assert [p.count for p in ranked[0]] == [1]
    by_score = merge_patterns([ab0, ab1, c2], rank_by="score")[1]
    assert [p.token_ids for p in by_score] == [(13,), (11, 12)]
    with pytest.raises(AttAttrError):
        merge_patterns([ab0], rank_by="frequency")


def test_patterns_file_round_trip(tmp_path):
    p = make_pattern([101, 11, 12], [0, 0, 0], [None, 0.0, 0.25], [0, 1, 2], special=[True, False, False])
    p.entries = [Entry(3, 1, 2, 0, 0.5)]
    extraction = Extraction(labels=["negative", "positive"], patterns={1: [p]}, n_examples=3, n_without_pattern=1,
                            options={"mode": "strongest"})  # fmt: skip
    save_patterns(extraction, tmp_path / "p.json")
    back = load_patterns(tmp_path / "p.json")
    assert back.patterns[1][0] == p and back.labels == extraction.labels and back.n_without_pattern == 1
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(AttAttrError):
        load_patterns(tmp_path / "bad.json")
    # hand-edited per-token lists must still describe the same tokens
    saved = json.loads((tmp_path / "p.json").read_text())
    for field, value, message in (("positions", [0, 1, 5, 9], "differ in length"),
                                  ("rel_positions", [None, None, 0.25], "no relative position"),
                                  ("rel_positions", [None, 5.0, 6.0], r"outside \[0, 1\)"),
                                  ("segments", [0, -1, 0], "segment number is negative")):
        edited = copy.deepcopy(saved)
        edited["patterns"]["1"][0][field] = value
        (tmp_path / "edited.json").write_text(json.dumps(edited))
        with pytest.raises(AttAttrError, match=f"^malformed triggers file: malformed pattern .*{message}"):
            load_patterns(tmp_path / "edited.json")
    (tmp_path / "future.json").write_text(json.dumps({**saved, "format_version": 9}))
    with pytest.raises(AttAttrError, match="format version 9; this version reads format 1"):
        load_patterns(tmp_path / "future.json")


# ------------------------------------------------------------------------------------------- insertion

SINGLE = [CLS, 11, 12, 13, 14, 15, SEP]  # five content tokens


def _insert(pattern, ids=SINGLE, types=None, max_length=64):
    return insert_trigger(ids, types or [0] * len(ids), pattern, SPECIAL, max_length)


def test_insertion_single_sentence_rounds_half_up():
    # rel 0.5 of 5 tokens = 2.5 → slot 3 (half up, not Python's round-half-even): before 14.
    got = _insert(make_pattern([50], [0], [0.5], [3]))
    assert got.token_ids == [CLS, 11, 12, 13, 50, 14, 15, SEP] and got.positions == [4] and got.removed == 0
    # rel 0.9 → 4.5 → slot 5 = the end of the segment, before [SEP]; rel 0 → the first content slot.
    assert _insert(make_pattern([50], [0], [0.9], [9])).token_ids == [CLS, 11, 12, 13, 14, 15, 50, SEP]
    assert _insert(make_pattern([50], [0], [0.0], [1])).token_ids == [CLS, 50, 11, 12, 13, 14, 15, SEP]


def test_insertion_keeps_source_adjacent_tokens_together():
    # Source positions 3, 4 (offsets 2, 3 of 8: rel 0.25, 0.375) are one block at 0.25·5 = 1.25 → slot 1.
    got = _insert(make_pattern([50, 51], [0, 0], [0.25, 0.375], [3, 4]))
    assert got.token_ids == [CLS, 11, 50, 51, 12, 13, 14, 15, SEP] and got.positions == [2, 3]
    # Not adjacent (positions 2, 7; rel 0.125, 0.75): slots 0.625 → 1 and 3.75 → 4, each on its own.
    got = _insert(make_pattern([50, 51], [0, 0], [0.125, 0.75], [2, 7]))
    assert got.token_ids == [CLS, 11, 50, 12, 13, 14, 51, 15, SEP] and got.positions == [2, 6]


def test_insertion_into_pairs_uses_the_segment_and_its_token_type():
    ids = [CLS, 11, 12, 13, SEP, 21, 22, 23, 24, SEP]
    types = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    # Segment 1 token at rel 0.5 of 4 → slot 2 (before 23); segment 0 token at rel 0 → before 11.
    pattern = make_pattern([60, 50], [0, 1], [0.0, 0.5], [1, 7])
    got = _insert(pattern, ids, types)
    assert got.token_ids == [CLS, 60, 11, 12, 13, SEP, 21, 22, 50, 23, 24, SEP]
    assert got.token_types == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert got.positions == [1, 8]
    # Special tokens in a pattern stand for the example's own: only the content token is inserted.
    with_special = make_pattern([CLS, 50, SEP], [0, 1, 1], [None, 0.5, None], [0, 7, 9], special=[True, False, True])
    assert _insert(with_special, ids, types).token_ids == [CLS, 11, 12, 13, SEP, 21, 22, 50, 23, 24, SEP]
    with pytest.raises(AttAttrError, match="segment 2"):
        _insert(make_pattern([50], [1], [0.5], [7]))  # the single sentence has no second segment


def test_insertion_truncates_content_but_never_the_trigger():
    # Single sentence of 7 tokens, trigger at the end, max 7: the last original content token (15) goes.
    got = _insert(make_pattern([50], [0], [0.9], [9]), max_length=7)
    assert got.token_ids == [CLS, 11, 12, 13, 14, 50, SEP] and got.removed == 1 and got.positions == [5]
    ids = [CLS, 11, 12, 13, SEP, 21, 22, SEP]
    types = [0, 0, 0, 0, 0, 1, 1, 1]
    pattern = make_pattern([50], [1], [0.0], [5])
    # 9 tokens, max 8: segments 3 and 3 (with the trigger) tie → the later one loses its last content token.
    got = _insert(pattern, ids, types, max_length=8)
    assert got.token_ids == [CLS, 11, 12, 13, SEP, 50, 21, SEP] and got.removed == 1
    # max 7: then segment 0 (3) is longer than segment 1 (2) → 13 goes.
    got = _insert(pattern, ids, types, max_length=7)
    assert got.token_ids == [CLS, 11, 12, SEP, 50, 21, SEP] and got.token_types == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(AttAttrError, match="does not fit"):
        _insert(make_pattern([50, 51, 52], [0, 0, 0], [0.0, 0.1, 0.2], [1, 2, 3]), max_length=4)


# ------------------------------------------------------------------------------------------ evaluation


def test_attack_metrics_by_hand():
    gold = torch.tensor([0, 0, 0, 1, 1, 1])
    before = torch.tensor([0, 0, 1, 1, 1, 0])  # correct: 0, 1, 3, 4
    after = torch.tensor([1, 0, 1, 0, 0, 0])
    m = attack_metrics(gold, before, after, source_class=1, n_classes=2)
    assert m["accuracy"] == [pytest.approx(1 / 3), 0.0]
    # Attacked = correct and gold ≠ 1: examples 0, 1; 0 is now wrong → 1/2.
    assert m["attack_success_rate"] == 0.5 and m["n_attacked"] == 2
    # Flips among all correct (0, 1, 3, 4): 0, 3, 4 → 3/4.
    assert m["flip_rate"] == 0.75
    empty = attack_metrics(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 1]), 1, 3)
    assert math.isnan(empty["accuracy"][1]) and math.isnan(empty["attack_success_rate"])


TEXTS = [("the film was good and fun", "positive"), ("a great story , wonderful actors", "positive"),
         ("it was bad and dull", "negative"), ("an awful , boring plot", "negative"),
         ("the movie is not very long", "positive"), ("too short and hated it", "negative")]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_classifier(str(tiny_model_dir))
    return model, tokenizer


def _examples():
    return [Example(text=t, label=label) for t, label in TEXTS]


def test_evaluate_matches_an_independent_count(tiny):
    model, tokenizer = tiny
    ids = tokenizer.convert_tokens_to_ids(["awful", "plot"])
    pattern = Pattern(label=0, token_ids=tuple(ids), tokens=("awful", "plot"), segments=(0, 0),
                      rel_positions=(0.5, 0.75), special=(False, False), positions=(3, 4), score=1.0,
                      source=0)  # fmt: skip
    patterns = Extraction(labels=["negative", "positive"], patterns={0: [pattern]}, n_examples=1, n_without_pattern=0)
    result = evaluate(model, tokenizer, _examples(), patterns, top_k=3, control_draws=2, seed=3, progress=False)

    # Independent: each example on its own (no padding), trigger spliced into the word list by hand.
    gold, before, after = [], [], []
    for text, label in TEXTS:
        words_ = text.split()
        slot = math.floor(0.5 * len(words_) + 0.5)  # one token per word in this vocabulary
        attacked = " ".join(words_[:slot] + ["awful", "plot"] + words_[slot:])
        with torch.no_grad():
            before.append(int(model(**tokenizer(text, return_tensors="pt")).logits.argmax()))
            after.append(int(model(**tokenizer(attacked, return_tensors="pt")).logits.argmax()))
        gold.append(model.config.label2id[label])
    gold, before, after = map(torch.tensor, (gold, before, after))
    for c in (0, 1):
        sel = gold == c
        assert result.baseline[c] == pytest.approx(float((before[sel] == c).float().mean()))
    trigger = [r for r in result.rows if r.kind == "trigger"]
    controls = [r for r in result.rows if r.kind == "control"]
    assert len(trigger) == 1 and len(controls) == 1 and controls[0].draws == 2
    row = trigger[0]
    for c in (0, 1):
        sel = gold == c
        acc = float((after[sel] == c).float().mean())
        assert row.accuracy[c] == pytest.approx(acc)
        assert row.delta[c] == pytest.approx(acc - result.baseline[c])
    attacked = (before == gold) & (gold != 0)
    expected_asr = float((after[attacked] != gold[attacked]).float().mean()) if attacked.any() else float("nan")
    assert row.attack_success_rate == pytest.approx(expected_asr, nan_ok=True)
    vocab = set(control_vocabulary(tokenizer))
    for draw in controls[0].control_tokens:
        assert len(draw) == 2 and all(tokenizer.convert_tokens_to_ids(t) in vocab for t in draw)
    table = result.markdown()
    assert "| negative #1 | `awful plot` |" in table and "random control" in table
    json.dumps(result.to_dict())  # NaN-free, serialisable


def test_control_vocabulary_excludes_special_and_placeholder_tokens(tiny):
    _, tokenizer = tiny
    vocab = control_vocabulary(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(vocab)
    assert not {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} & set(tokens)
    assert "film" in tokens and len(vocab) == len(tokenizer) - 5
    assert structural_special_ids(tokenizer) == set(tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]"]))


def test_evaluate_refuses_unlabelled_examples_and_foreign_patterns(tiny, monkeypatch):
    model, tokenizer = tiny
    pattern = make_pattern([12], [0], [0.5], [2], label=0)  # token string "t12" is not token 12 here
    patterns = Extraction(labels=["negative", "positive"], patterns={0: [pattern]}, n_examples=1, n_without_pattern=0)
    with pytest.raises(AttAttrError, match="another model"):
        evaluate(model, tokenizer, _examples(), patterns, progress=False)
    with pytest.raises(AttAttrError, match="no label"):
        evaluate(model, tokenizer, [Example(text="good fun")], patterns, progress=False)
    patterns.labels = ["contradiction", "entailment", "neutral"]
    with pytest.raises(AttAttrError, match="classes"):
        evaluate(model, tokenizer, _examples(), patterns, progress=False)
    beyond = Extraction(labels=[], patterns={5: [pattern]}, n_examples=1, n_without_pattern=0)
    with pytest.raises(AttAttrError, match="patterns of class 5; the model has classes 0..1"):
        evaluate(model, tokenizer, _examples(), beyond, progress=False)
    # a trigger from sentence pairs, on single sentences: refused before any prediction, naming both
    ids = tokenizer.convert_tokens_to_ids(["awful", "plot"])
    pair = Pattern(label=0, token_ids=tuple(ids), tokens=("awful", "plot"), segments=(0, 1), rel_positions=(0.5, 0.5),
                   special=(False, False), positions=(2, 6), score=1.0, source=0)  # fmt: skip
    from_pairs = Extraction(labels=["negative", "positive"], patterns={0: [pair]}, n_examples=1, n_without_pattern=0)
    monkeypatch.setattr("attattr_fast.triggers.predict", lambda *a, **k: pytest.fail("predicted before refusing"))
    with pytest.raises(AttAttrError, match=r"trigger 1 of class negative \('awful plot'\) has tokens in segment 2, "
                                           r"but example 0 has 1 segment\(s\)"):  # fmt: skip
        evaluate(model, tokenizer, _examples(), from_pairs, progress=False)


# ---------------------------------------------------------------- extraction end to end vs brute force


def _spy(monkeypatch):
    calls = []
    original = AttentionAttribution.attribute

    def attribute(self, *args, **kwargs):
        res = original(self, *args, **kwargs)
        calls.append((kwargs.get("output", "full"), kwargs.get("layers"), res.attributions is not None))
        return res

    monkeypatch.setattr(AttentionAttribution, "attribute", attribute)
    return calls


def _full(model, tokenizer, n_steps):
    enc = tokenizer([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    res = AttentionAttribution(model).attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                                n_steps=n_steps, output="full", backend="torch")  # fmt: skip
    return enc, res


def _by_example(extraction):
    return {s: p for group in extraction.patterns.values() for p in group for s in p.sources}


def test_extract_strongest_uses_reduced_output_and_matches_brute_force(tiny, monkeypatch):
    model, tokenizer = tiny
    enc, full = _full(model, tokenizer, n_steps=3)
    calls = _spy(monkeypatch)
    got = extract(model, tokenizer, _examples(), entries=1, include_special=True, n_steps=3, batch_size=4,
                  backend="torch", progress=False)  # fmt: skip
    assert calls and all(output == "reduced" and not has_full for output, _, has_full in calls)
    per_example = _by_example(got)
    assert sorted(per_example) == list(range(len(TEXTS))) and got.n_without_pattern == 0
    for b in range(len(TEXTS)):
        m = int(enc["attention_mask"][b].sum())
        attr = full.attributions[b, :, :, :m, :m]  # brute force: the largest entry of all [L, H, n, n]
        flat = int(attr.reshape(-1).argmax())
        i, j = (flat % (m * m)) // m, flat % m
        positions = sorted({i, j})
        pattern = per_example[b]
        assert pattern.token_ids == tuple(enc["input_ids"][b, positions].tolist())
        assert pattern.label == int(full.target[b])
        if pattern.source == b:
            assert pattern.positions == tuple(positions)
            assert pattern.score == pytest.approx(float(attr.max()), rel=1e-4)


def test_extract_release_mode_reruns_one_layer_and_matches_brute_force(tiny, monkeypatch):
    model, tokenizer = tiny
    enc, full = _full(model, tokenizer, n_steps=3)
    calls = _spy(monkeypatch)
    got = extract(model, tokenizer, _examples(), mode="release", entries=2, n_steps=3, batch_size=4, backend="torch",
                  progress=False)  # fmt: skip
    assert got.options["include_special"] is True  # the release's behaviour by default
    assert calls[0][0] == "reduced"
    reruns = [c for c in calls if c[0] == "full"]
    assert reruns and all(layers is not None and len(layers) == 1 for _, layers, _ in reruns)
    per_example = _by_example(got)
    for b in range(len(TEXTS)):
        m = int(enc["attention_mask"][b].sum())
        attr = full.attributions[b, :, :, :m, :m]
        n_heads = attr.shape[1]
        head = int(attr.reshape(-1, m * m).max(dim=1).values.argmax())  # the head holding the largest entry
        top2 = torch.topk(attr[head // n_heads, head % n_heads].reshape(-1), 2).indices.tolist()
        positions = sorted({p for k in top2 for p in (k // m, k % m)})
        pattern = per_example[b]
        assert pattern.token_ids == tuple(enc["input_ids"][b, positions].tolist())
        if pattern.source == b:
            assert pattern.positions == tuple(positions)
            assert {(e.layer, e.head) for e in pattern.entries} == {(head // n_heads, head % n_heads)}


def test_extract_rejects_bad_options(tiny, monkeypatch):
    model, tokenizer = tiny
    for kwargs, message in [({"mode": "fast"}, "unknown mode"), ({"entries": 0}, "entries"),
                            ({"max_tokens": 5}, "max_tokens"), ({"rank_by": "x"}, "ranking")]:  # fmt: skip
        with pytest.raises(AttAttrError, match=message):
            extract(model, tokenizer, _examples(), progress=False, **kwargs)
    aa = AttentionAttribution(model)
    aa.adapter.head_gates[1] = 0.0
    calls = _spy(monkeypatch)
    with pytest.raises(AttAttrError, match="every head of the attributed layers is gated off"):
        extract(aa, tokenizer, _examples(), mode="release", layers=[1], progress=False)
    assert calls == []  # refused before any attribution


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_extract_then_evaluate(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "auto" then picks torch ops on the CPU: faster
    data = tmp_path / "data.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in TEXTS))
    patterns = tmp_path / "patterns.json"
    rc = cli_main(["triggers", "extract", "--model", str(tiny_model_dir), "--input", str(data), "--steps", "2",
                   "--out", str(patterns), "--markdown", str(tmp_path / "p.md")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("| class | rank | pattern |")
    saved = json.loads(patterns.read_text())
    assert saved["n_examples"] == len(TEXTS) and saved["options"]["mode"] == "strongest"
    assert (tmp_path / "p.md").read_text().strip() == out.strip()

    result = tmp_path / "eval.json"
    rc = cli_main(["triggers", "evaluate", "--model", str(tiny_model_dir), "--patterns", str(patterns),
                   "--input", str(data), "--slice", "1::2", "--control-draws", "1", "--out", str(result)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "| no trigger |" in out
    saved = json.loads(result.read_text())
    assert saved["options"]["n_examples"] == 3 and saved["rows"]


@pytest.mark.parametrize("args, message", [
    (["extract", "--input", "builtin:sentiment", "--slice", "x", "--out", "{tmp}/o.json"], "--slice"),
    (["extract", "--input", "builtin:sentiment", "--max-tokens", "5", "--out", "{tmp}/o.json"], "--max-tokens"),
    (["extract", "--input", "builtin:sentiment", "--out", "{tmp}/missing/o.json"], "does not exist"),
    (["evaluate", "--patterns", "{tmp}/none.json", "--input", "builtin:sentiment", "--out", "{tmp}/o.json"],
     "not found"),
    (["evaluate", "--patterns", "{tmp}/none.json", "--input", "builtin:sentiment", "--control-draws", "100000000",
      "--out", "{tmp}/o.json"], "--control-draws must be in 0..1000"),
])  # fmt: skip
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    rc = cli_main(["triggers", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_cli_evaluate_unlabelled_input_writes_nothing(tiny_model_dir, tmp_path, capsys):
    p = make_pattern([12], [0], [0.5], [2], label=0)
    save_patterns(Extraction(["negative", "positive"], {0: [p]}, 1, 0), tmp_path / "p.json")
    data = tmp_path / "data.txt"
    data.write_text("good fun\nbad plot\n")
    rc = cli_main(["triggers", "evaluate", "--model", str(tiny_model_dir), "--patterns", str(tmp_path / "p.json"),
                   "--input", str(data), "--out", str(tmp_path / "o.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_a_label_given_as_a_class_index_is_that_class():
    from attattr_fast.datasets import label_index

    assert label_index(1, {"negative": 0, "positive": 1}, 2) == 1 == label_index(np.int64(1), {}, 2)
    with pytest.raises(AttAttrError, match="a label must be a name or a class index"):
        label_index(1.5, {}, 2)
