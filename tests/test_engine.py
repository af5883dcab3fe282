"""The engine against the literal algorithm (attattr_fast.reference) and against invariants."""

import contextlib
import copy
import functools
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from attattr_fast import AttAttrError, AttentionAttribution, engine, reference
from attattr_fast.quadrature import METHODS

from conftest import FAMILIES, padded_batch, tiny_classifier
from tolerances import COMPLETENESS_ABS, COMPLETENESS_REL, LOW_PRECISION_FACTOR, PROB_ATOL_F32, RTOL_F32

LENGTHS = [9, 6, 1]  # a padded batch of different lengths, down to a single token


def assert_close_per_layer(got, expected, rtol=RTOL_F32):
    for layer in range(expected.shape[1]):
        scale = expected[:, layer].abs().max().item()
        err = (got[:, layer] - expected[:, layer]).abs().max().item()
        assert err <= rtol * scale, f"layer {layer}: max |diff| {err:.3g} > {rtol} × {scale:.3g}"


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model = tiny_classifier(request.param, layers=2)
    return model, padded_batch(model, LENGTHS, pair_at=4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_steps", [1, 7, 20])
def test_engine_equals_reference(family_model, method, n_steps):
    model, (ids, mask, types) = family_model
    got = AttentionAttribution(model).attribute(ids, mask, types, n_steps=n_steps, method=method,
                                                backend="torch", top_k=4)  # fmt: skip
    ref = reference.attribute(model, ids, mask, types, n_steps=n_steps, method=method, dtype=torch.float64, top_k=4)
    assert got.attributions.shape == (3, 2, 4, 9, 9) and got.attributions.dtype == torch.float32
    assert_close_per_layer(got.attributions, ref.attributions)
    assert_close_per_layer(got.layer_attr, ref.layer_attr)
    torch.testing.assert_close(got.attention, ref.attention, atol=PROB_ATOL_F32, rtol=0)
    assert torch.equal(got.target, ref.target)
    torch.testing.assert_close(got.prob, ref.prob, atol=PROB_ATOL_F32, rtol=0)
    torch.testing.assert_close(got.baseline, ref.baseline, atol=PROB_ATOL_F32, rtol=0)
    scale = ref.attributions.abs().max().item()
    assert (got.head_max - ref.head_max).abs().max().item() <= RTOL_F32 * scale
    # delta is Σ attributions − (F(A) − F(0)), with F(0) from the reference's own forward
    expected_delta = got.attributions.double().sum(dim=(2, 3, 4)) - (ref.prob.double()[:, None] - ref.baseline)
    torch.testing.assert_close(got.delta.double(), expected_delta, atol=PROB_ATOL_F32, rtol=0)


def test_head_argmax_and_top_k_point_at_the_reference_scores(family_model):
    """Checked against the reference's own tensors with numpy, not through the shared reductions: each head's
    (i, j) holds its maximum, and each top-k entry (query, key) holds its score and is among the k largest."""
    model, (ids, mask, types) = family_model
    k = 6
    got = AttentionAttribution(model).attribute(ids, mask, types, n_steps=7, method="gausslegendre", top_k=k,
                                                layers=[1, 0], internal_batch_size=5)  # fmt: skip
    ref = reference.attribute(model, ids, mask, types, n_steps=7, method="gausslegendre", dtype=torch.float64,
                              layers=[1, 0])  # fmt: skip
    assert_close_per_layer(got.attributions, ref.attributions)  # layers out of order, chunks across examples
    attributions, layer_attr = ref.attributions.double().numpy(), ref.layer_attr.double().numpy()
    for b, length in enumerate(mask.sum(1).tolist()):
        for li in range(2):
            tol = RTOL_F32 * np.abs(attributions[b, li]).max()
            for h in range(attributions.shape[2]):
                real = attributions[b, li, h, :length, :length]
                i, j = got.head_argmax[b, li, h].tolist()
                assert i < length and j < length and real[i, j] >= real.max() - tol
                assert abs(got.head_max[b, li, h].item() - real.max()) <= tol
            real = layer_attr[b, li, :length, :length]
            assert length == 1 or not np.allclose(real, real.T)  # a swapped query and key would show
            kth = np.sort(real.ravel())[::-1][: min(k, real.size)]
            query, key, score = (t[b, li].numpy() for t in (got.top_k.query, got.top_k.key, got.top_k.score))
            present = query >= 0
            assert present.sum() == min(k, real.size) and (query[~present] == -1).all()
            picked = real[query[present], key[present]]
            np.testing.assert_allclose(score[present], picked, rtol=0, atol=tol)
            np.testing.assert_allclose(picked, kth, rtol=0, atol=2 * tol)


def test_padding_is_zero_and_head_max_ignores_it():
    model = tiny_classifier("bert")
    ids, mask, types = padded_batch(model, [7, 3])
    res = AttentionAttribution(model).attribute(ids, mask, types, n_steps=3, backend="torch", top_k=50)
    assert torch.all(res.attributions[1, :, :, 3:, :] == 0) and torch.all(res.attributions[1, :, :, :, 3:] == 0)
    assert torch.all(res.attention[1, :, :, :, 3:] == 0)
    real = res.attributions[1, :, :, :3, :3]
    torch.testing.assert_close(res.head_max[1], real.amax(dim=(-1, -2)))
    i, j = res.head_argmax[1].unbind(-1)
    assert torch.all((i < 3) & (j < 3))
    picked = res.attributions[1].gather(-1, j[..., None, None].expand(-1, -1, 7, 1)).squeeze(-1)
    torch.testing.assert_close(picked.gather(-1, i[..., None]).squeeze(-1), res.head_max[1])
    # top-k over real pairs only: 9 real pairs, the rest padded with -1 / NaN
    assert torch.all(res.top_k.query[1, :, 9:] == -1) and torch.isnan(res.top_k.score[1, :, 9:]).all()
    assert torch.all(res.top_k.score[1, :, :8] >= res.top_k.score[1, :, 1:9])


def test_example_in_a_padded_batch_equals_example_alone():
    model = tiny_classifier("roberta")
    ids, mask, types = padded_batch(model, [8, 5, 8])
    aa = AttentionAttribution(model)
    batch = aa.attribute(ids, mask, types, n_steps=4, backend="torch")
    alone = aa.attribute(ids[1:2, :5], mask[1:2, :5], types[1:2, :5], n_steps=4, backend="torch")
    assert_close_per_layer(batch.attributions[1:2, :, :, :5, :5], alone.attributions)
    torch.testing.assert_close(batch.prob[1], alone.prob[0])


def test_chunking_layer_subset_and_determinism():
    model = tiny_classifier("electra", layers=3)
    ids, mask, types = padded_batch(model, [6, 4])
    aa = AttentionAttribution(model)
    whole = aa.attribute(ids, mask, types, n_steps=5, backend="torch")
    chunked = aa.attribute(ids, mask, types, n_steps=5, backend="torch", internal_batch_size=1)
    subset = aa.attribute(ids, mask, types, n_steps=5, backend="torch", layers=[2, 0], internal_batch_size=7)
    assert_close_per_layer(chunked.attributions, whole.attributions)
    assert_close_per_layer(subset.attributions, whole.attributions[:, [2, 0]])
    assert subset.layers == [2, 0]
    again = aa.attribute(ids, mask, types, n_steps=5, backend="torch")
    assert torch.equal(again.attributions, whole.attributions)
    # unequal weights and nodes: chunks that cut an (example, layer) block must keep each row's α and weight
    for layers, rows in (([2, 0], 7), ([1, 2, 0], 5)):
        gl_whole = aa.attribute(ids, mask, types, n_steps=4, method="gausslegendre", layers=layers, backend="torch")
        gl_cut = aa.attribute(ids, mask, types, n_steps=4, method="gausslegendre", layers=layers, backend="torch",
                              internal_batch_size=rows)
        assert_close_per_layer(gl_cut.attributions, gl_whole.attributions)
        torch.testing.assert_close(gl_cut.baseline, gl_whole.baseline, atol=1e-6, rtol=0)


def test_phase_hook_sees_every_phase_once_at_a_time_and_changes_nothing(monkeypatch):
    """bench/profile_engine.py --phases times a call through `engine.phase_hook`: the phases must not nest (a
    phase's time would count twice) and must leave the result as it is."""
    model = tiny_classifier("bert", layers=3)
    ids, mask, types = padded_batch(model, [7, 3])
    aa = AttentionAttribution(model)
    plain = aa.attribute(ids, mask, types, n_steps=3, backend="torch", internal_batch_size=4, top_k=3)
    seen, open_phases = [], []

    @contextlib.contextmanager
    def hook(name):
        assert not open_phases, f"{name} inside {open_phases}"
        open_phases.append(name)
        seen.append(name)
        yield
        open_phases.pop()

    monkeypatch.setattr(engine, "phase_hook", hook)
    hooked = aa.attribute(ids, mask, types, n_steps=3, backend="torch", internal_batch_size=4, top_k=3)
    # chunks of 4 rows hold less than one example's 3 layers × 3 nodes: a group per example, 3 chunks each
    groups, chunks = 2, 2 * 3
    assert seen.count("prefix") == seen.count("baseline") == seen.count("reduce") == groups
    assert seen.count("gather") == seen.count("rows forward") == seen.count("rows backward") == chunks
    assert seen.count("accumulate") == 2 * chunks and seen.count("collect") == groups + 1
    assert set(seen) == set(engine.PHASES)
    for field in ("attributions", "layer_attr", "head_max", "baseline", "delta", "prob"):
        assert torch.equal(getattr(hooked, field), getattr(plain, field)), field
    assert torch.equal(hooked.top_k.key, plain.top_k.key) and torch.equal(hooked.top_k.query, plain.top_k.query)


def test_compiled_layers_equal_the_reference_and_serve_every_layer():
    """compile=True: the float64 reference's attributions, over batches that change the chunk shapes; the
    graphs are per variant (mask bias or none, top layer, one-row blocks), not per layer or shape."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_classifier("bert", layers=3)
    aa = AttentionAttribution(model, compile=True)
    for lengths, rows in (([9, 5, 9], None), ([4, 4], None), ([12, 7, 3, 6], 5), ([11, 10, 2], 7)):
        ids, mask, types = padded_batch(model, lengths)
        got = aa.attribute(ids, mask, types, n_steps=3, method="gausslegendre", backend="torch",
                           internal_batch_size=rows)
        ref = reference.attribute(model, ids, mask, types, n_steps=3, method="gausslegendre", dtype=torch.float64)
        assert_close_per_layer(got.attributions, ref.attributions)
        torch.testing.assert_close(got.baseline, ref.baseline.float(), atol=PROB_ATOL_F32, rtol=0)
    # per-layer head gates (each a view into the gate matrix) on another family, against the eager engine
    model = tiny_classifier("roberta", layers=3)
    gates = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    runs = []
    for compiled in (True, False):
        aa = AttentionAttribution(model, compile=compiled)
        aa.adapter.head_gates.copy_(gates)
        ids, mask, types = padded_batch(model, [8, 6])
        runs.append(aa.attribute(ids, mask, types, n_steps=3, method="gausslegendre", backend="torch"))
    assert_close_per_layer(runs[0].attributions, runs[1].attributions)
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # none fell back to eager
    # per function: bias or none, one row or more, the join at full length or position 0 only; never per
    # layer or per shape (14 on torch 2.13, 5 of them for the second model; per layer and shape, dozens)
    assert 4 <= counters["stats"]["unique_graphs"] <= 18, dict(counters["stats"])


@pytest.fixture
def one_group_packed(monkeypatch):
    """The batch in one group (no split is worth its overhead), its rows packed; counts the packed layers."""
    monkeypatch.setitem(engine.GROUP_OVERHEAD_TOKENS, "cpu", 10**9)
    monkeypatch.setattr(engine, "PACK_ABOVE_PADDING", 0.0)
    calls = []
    real = engine.packed_full_layer

    def counted(*args):
        calls.append(args[3].shape)
        return real(*args)

    monkeypatch.setattr(engine, "packed_full_layer", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_the_reference(family, one_group_packed, monkeypatch):
    """Rows packed to their real tokens (a long and a one-token example among others, a sentence pair) give the
    literal algorithm's attributions, baselines and probabilities; with head gates, the padded rows' ones."""
    model = tiny_classifier(family, layers=4)
    ids, mask, types = padded_batch(model, [9, 6, 1, 4, 9], pair_at=4)
    got = AttentionAttribution(model).attribute(ids, mask, types, n_steps=3, method="gausslegendre",
                                                backend="torch")
    # the rows of layers 0-1 run layers 1-2 packed: 29 real tokens of 45 per (start layer, node)
    assert one_group_packed and all(shape[0] % 29 == 0 for shape in one_group_packed), one_group_packed
    ref = reference.attribute(model, ids, mask, types, n_steps=3, method="gausslegendre", dtype=torch.float64)
    assert_close_per_layer(got.attributions, ref.attributions)
    torch.testing.assert_close(got.baseline, ref.baseline.float(), atol=PROB_ATOL_F32, rtol=0)
    torch.testing.assert_close(got.prob, ref.prob.float(), atol=PROB_ATOL_F32, rtol=0)

    gates = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) + 0.5
    runs = []
    for pack_above in (0.0, float("inf")):
        monkeypatch.setattr(engine, "PACK_ABOVE_PADDING", pack_above)
        aa = AttentionAttribution(model)
        aa.adapter.head_gates.copy_(gates)
        runs.append(aa.attribute(ids, mask, types, n_steps=3, method="gausslegendre", backend="torch"))
    assert_close_per_layer(runs[0].attributions, runs[1].attributions)
    assert not torch.allclose(runs[0].attributions, got.attributions)  # the gates changed the scores


def test_packed_rows_under_a_head_that_reads_every_position(builtin, one_group_packed):
    """The built-in model's head mean-pools every token, so packed rows are padded again before it."""
    model, tokenizer = builtin
    texts = ["A wonderful, moving film with a clumsy ending.", "Dull.", "Not even for free would I watch it again."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    got = AttentionAttribution(model).attribute(*args, n_steps=2, method="gausslegendre", backend="torch")
    assert one_group_packed
    ref = reference.attribute(model, *args, n_steps=2, method="gausslegendre", dtype=torch.float64)
    assert_close_per_layer(got.attributions, ref.attributions)
    torch.testing.assert_close(got.baseline, ref.baseline.float(), atol=PROB_ATOL_F32, rtol=0)


def test_token_layout_packs_and_pads_the_real_tokens():
    """pack takes rows begin..end (any begin) to their real tokens in row order; pad puts the first rows' back,
    zero at padding (against a per-row loop)."""
    lengths, n = torch.tensor([3, 1, 5, 2]), 5
    layout = engine.TokenLayout.of(lengths, n, torch.device("cpu"))
    x = torch.randn(4, n, 2, generator=torch.Generator().manual_seed(0))
    for begin in range(4):
        for end in range(begin + 1, 5):
            expected = torch.cat([x[r, : lengths[r]] for r in range(begin, end)])
            assert torch.equal(layout.pack(x[begin:end], begin, end), expected), (begin, end)
    for rows in range(1, 5):
        packed = torch.cat([x[r, : lengths[r]] for r in range(rows)]).unsqueeze(1)
        padded = layout.pad(packed, rows)
        real = torch.arange(n) < lengths[:rows, None]
        assert torch.equal(padded[real], x[:rows][real]) and torch.all(padded[~real] == 0)


def test_rows_pack_only_where_padding_exceeds_the_threshold(monkeypatch):
    """Packing is chosen per group from its real lengths: above PACK_ABOVE_PADDING, eager rows only."""
    monkeypatch.setitem(engine.GROUP_OVERHEAD_TOKENS, "cpu", 10**9)
    model = tiny_classifier("bert", layers=3)
    packed = []
    real = engine.packed_full_layer
    monkeypatch.setattr(engine, "packed_full_layer", lambda *args: packed.append(1) or real(*args))
    for lengths, expect in (([10, 10, 9], False), ([10, 10, 7], True)):  # 3% and 11% padding
        packed.clear()
        ids, mask, types = padded_batch(model, lengths)
        AttentionAttribution(model).attribute(ids, mask, types, n_steps=2, backend="torch", output="reduced")
        assert bool(packed) == expect, lengths
    packed.clear()
    monkeypatch.setattr(engine, "PACK_ABOVE_PADDING", 0.0)
    AttentionAttribution(model, compile=True).attribute(ids, mask, types, n_steps=2, backend="torch",
                                                        output="reduced")
    assert not packed  # compiled rows run padded


def _splits(count):
    """Every split of range(count) into consecutive groups, as lists of (begin, end)."""
    if count == 0:
        yield []
        return
    for first in range(1, count + 1):
        for rest in _splits(count - first):
            yield [(0, first)] + [(b + first, e + first) for b, e in rest]


@pytest.mark.parametrize("seed", range(6))
def test_plan_groups_is_the_cheapest_split_that_fits(seed):
    from attattr_fast.engine import plan_groups

    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(2, 40, size=9).tolist())
    rows_per_example, overhead = int(rng.integers(1, 7)), int(rng.choice([0, 20, 150, 2000]))

    def rows_for(n):
        return 600 // n

    def fits(b, e):
        return e - b == 1 or (e - b) * rows_per_example <= rows_for(lengths[e - 1])

    def work(split):
        return sum(overhead + (e - b) * rows_per_example * lengths[e - 1] for b, e in split)

    groups = plan_groups(lengths, rows_per_example, rows_for, overhead)
    split = [(b, e) for b, e, _ in groups]
    assert [b for b, _ in split] == [0] + [e for _, e in split[:-1]] and split[-1][1] == len(lengths)
    assert all(fits(b, e) and rows == rows_for(lengths[e - 1]) for b, e, rows in groups)
    brute = min(work(s) for s in _splits(len(lengths)) if all(fits(b, e) for b, e in s))
    assert work(split) == brute


def test_plan_groups_trades_padding_against_group_count():
    from attattr_fast.engine import plan_groups

    lengths = [5] * 4 + [40] * 4
    # no overhead: no padding; a large one: one group, as the rows allow
    assert plan_groups(lengths, 2, lambda n: 100, 0) == [(0, 4, 100), (4, 8, 100)]
    assert plan_groups(lengths, 2, lambda n: 100, 10_000) == [(0, 8, 100)]
    assert len(plan_groups(lengths, 2, lambda n: 6, 10_000)) == 3  # the fewest groups of 3 examples (6 rows)
    assert plan_groups([7], 500, lambda n: 3, 0) == [(0, 1, 3)]  # one example in several chunks


def test_chunks_are_sized_by_the_layers_their_rows_run():
    adapter = AttentionAttribution(tiny_classifier("bert", layers=4)).adapter
    f32, cpu = torch.float32, torch.device("cpu")
    # rows of layers 0..3 run 4, 3, 2 and 1 layers: 2.5 on average over a chunk of whole examples
    per_row = engine.row_bytes(adapter, 20, 2.5, f32)
    assert engine.row_bytes(adapter, 20, 4, f32) > per_row > engine.row_bytes(adapter, 20, 1, f32)
    assert engine.default_rows_per_chunk(adapter, 20, [0, 1, 2, 3], 2, f32, cpu, budget=20 * per_row) == 20
    # a chunk smaller than one example's 8 rows may hold only layer 0's rows, each running all 4 layers
    lowest = engine.row_bytes(adapter, 20, 4, f32)
    rows = engine.default_rows_per_chunk(adapter, 20, [0, 1, 2, 3], 2, f32, cpu, budget=7 * per_row)
    assert rows == 7 * per_row // lowest
    # targeting only the top two layers, rows run 2 or 1 layers
    assert engine.default_rows_per_chunk(adapter, 20, [2, 3], 2, f32, cpu, budget=10 * per_row) == (
        10 * per_row // engine.row_bytes(adapter, 20, 1.5, f32))


def test_default_grouping_sizes_groups_by_their_length(monkeypatch):
    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [3, 12, 3, 4, 12])
    aa = AttentionAttribution(model)
    ref = reference.attribute(model, ids, mask, types, n_steps=3, dtype=torch.float64)
    # 2 layers × 3 nodes = 6 rows per example; a budget of 8 rows at length 12 (one long example per group)
    # leaves the three short examples room to share one chunk, as sizing by the longest (12) would not
    budget = 8 * engine.row_bytes(aa.adapter, 12, 1.5, torch.float32)  # rows run 2 or 1 layers: 1.5 on average
    monkeypatch.setattr(engine, "memory_budget", lambda device: budget)
    calls = []
    real = engine.attribute_group

    def spy(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs).arguments
        calls.append((*call["input_ids"].shape, call["rows_per_chunk"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "attribute_group", spy)
    grouped = aa.attribute(ids, mask, types, n_steps=3, backend="torch")
    assert [(b, n) for b, n, _ in calls] == [(3, 4), (1, 12), (1, 12)], calls
    assert calls[0][2] > calls[1][2]  # the short group's chunk holds more rows
    assert_close_per_layer(grouped.attributions, ref.attributions)
    torch.testing.assert_close(grouped.baseline, ref.baseline.float(), atol=PROB_ATOL_F32, rtol=0)


def test_position_zero_head_leaves_only_row_zero_of_the_last_layer():
    model = tiny_classifier("bert", layers=3)
    ids, mask, types = padded_batch(model, [7])
    res = AttentionAttribution(model).attribute(ids, mask, types, n_steps=3, backend="torch")
    ref = reference.attribute(model, ids, mask, types, n_steps=3, dtype=torch.float64)  # no shortcut there
    for out in (res, ref):
        last = out.attributions[0, -1]
        assert torch.all(last[:, 1:, :] == 0)
        assert last[:, 0, :].abs().max() > 0
        assert out.attributions[0, 0, :, 1:, :].abs().max() > 0  # lower layers use every row


def test_zero_attention_gives_zero_attribution():
    """Sharp layer-0 queries make softmax underflow to exact zeros at valid positions (not padding)."""
    model = tiny_classifier("bert", layers=2)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(200.0)
        model.bert.encoder.layer[0].attention.self.key.weight.mul_(200.0)
    ids, mask, types = padded_batch(model, [12])
    res = AttentionAttribution(model).attribute(ids, mask, types, n_steps=3, backend="torch", layers=[0])
    zero = res.attention[0, 0] == 0
    assert zero.sum() > 10 and (~zero).sum() > 10, "the setting must give both zero and non-zero attention"
    assert torch.all(res.attributions[0, 0][zero] == 0)
    assert res.attributions[0, 0][~zero].abs().max() > 0


def test_dtype_none_computes_in_float32_for_a_half_precision_model():
    """DESIGN §3: dtype=None means float32, whatever the model's own dtype."""
    half = tiny_classifier("electra", layers=2, dtype=torch.bfloat16)
    upcast = copy.deepcopy(half).float()
    ids, mask, types = padded_batch(half, [8, 5], pair_at=3)
    for attribute in (AttentionAttribution(half).attribute, functools.partial(reference.attribute, half)):
        got = attribute(ids, mask, types, n_steps=3, top_k=2)
        assert got.attributions.dtype == torch.float32
        want = reference.attribute(upcast, ids, mask, types, n_steps=3, top_k=2)
        assert_close_per_layer(got.attributions, want.attributions)
        torch.testing.assert_close(got.prob, want.prob, atol=1e-6, rtol=0)
    assert next(half.parameters()).dtype == torch.bfloat16  # the caller's model is left as it was


def test_single_layer_and_scalar_targets_are_accepted():
    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [5, 4])
    aa = AttentionAttribution(model)
    listed = aa.attribute(ids, mask, types, layers=[1], target=torch.tensor([2, 2]), n_steps=2, backend="torch")
    for layers, target in ((1, 2), (np.int64(1), np.int64(2)), ([1], torch.tensor(2))):
        got = aa.attribute(ids, mask, types, layers=layers, target=target, n_steps=2, backend="torch")
        assert got.layers == [1] and torch.equal(got.target, listed.target)
        assert torch.equal(got.attributions, listed.attributions)


def test_gated_head_has_zero_attribution():
    model = tiny_classifier("bert")
    aa = AttentionAttribution(model)
    aa.adapter.head_gates[1, 3] = 0.0
    ids, mask, types = padded_batch(model, [6])
    res = aa.attribute(ids, mask, types, n_steps=3, backend="torch")
    assert torch.all(res.attributions[0, 1, 3] == 0)
    assert res.attributions[0, 1, 2].abs().max() > 0


def test_the_reference_takes_an_ungated_adapter_and_refuses_gates_it_cannot_run():
    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [5])
    aa = AttentionAttribution(model)
    by_model = reference.attribute(model, ids, mask, types, n_steps=2, dtype=torch.float64)
    by_adapter = reference.attribute(aa.adapter, ids, mask, types, n_steps=2, dtype=torch.float64)
    assert torch.equal(by_adapter.attributions, by_model.attributions)
    aa.adapter.head_gates[1, 3] = 0.0
    with pytest.raises(AttAttrError, match="no head gates: prune the gated heads"):
        reference.attribute(aa.adapter, ids, mask, types, n_steps=2)


def test_non_finite_scores_are_an_error_not_a_result():
    from attattr_fast import heads

    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [5, 4])
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")  # broken weights
    with pytest.raises(AttAttrError, match="the model's output for example 0 is not finite"):
        AttentionAttribution(model).attribute(ids, mask, types, n_steps=2, backend="torch")
    with pytest.raises(AttAttrError, match="the taylor importance is not finite"):
        heads.head_importance(model, ids, torch.tensor([0, 1]), mask, types, kind="taylor")


def test_explicit_target_matches_reference():
    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [5, 4])
    target = torch.tensor([2, 0])
    got = AttentionAttribution(model).attribute(ids, mask, types, target=target, n_steps=3, backend="torch")
    ref = reference.attribute(model, ids, mask, types, target=target, n_steps=3, dtype=torch.float64)
    assert torch.equal(got.target, target)
    assert_close_per_layer(got.attributions, ref.attributions)
    as_int = AttentionAttribution(model).attribute(ids, mask, types, target=1, n_steps=3, backend="torch")
    assert torch.equal(as_int.target, torch.tensor([1, 1]))


def test_reduced_output_keeps_the_reductions():
    model = tiny_classifier("bert")
    ids, mask, types = padded_batch(model, [6, 4])
    aa = AttentionAttribution(model)
    full = aa.attribute(ids, mask, types, n_steps=3, backend="torch", top_k=3)
    reduced = aa.attribute(ids, mask, types, n_steps=3, backend="torch", top_k=3, output="reduced")
    assert reduced.attributions is None and reduced.attention is None
    torch.testing.assert_close(reduced.layer_attr, full.layer_attr)
    torch.testing.assert_close(reduced.head_max, full.head_max)
    assert torch.equal(reduced.top_k.query, full.top_k.query)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch_error(dtype):
    """Engine with the upper layers in low precision vs float64, against the whole model in that dtype."""
    model = tiny_classifier("bert", layers=3, hidden=64)
    ids, mask, types = padded_batch(model, [12, 9])
    exact = reference.attribute(model, ids, mask, types, n_steps=4, dtype=torch.float64)
    plain = reference.attribute(model, ids, mask, types, n_steps=4, dtype=dtype, target=exact.target)
    got = AttentionAttribution(model).attribute(ids, mask, types, n_steps=4, dtype=dtype, target=exact.target,
                                                backend="torch")  # fmt: skip
    err_plain = (plain.attributions - exact.attributions).abs().max().item()
    err_engine = (got.attributions - exact.attributions).abs().max().item()
    assert err_plain > 0
    assert err_engine <= LOW_PRECISION_FACTOR * err_plain, (err_engine, err_plain)


def test_completeness_on_minilm(builtin):
    """Gauss–Legendre 8 closes the completeness gap; the Riemann gap shrinks as n_steps grows."""
    model, tokenizer = builtin
    enc = tokenizer(["The plot is thin but the actors are wonderful."], return_tensors="pt")
    aa = AttentionAttribution(model)
    res = aa.attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], n_steps=8,
                       method="gausslegendre", backend="torch", output="reduced")  # fmt: skip
    gap = (res.prob[:, None] - res.baseline).abs()
    assert torch.all(gap > 1e-4)  # the layers matter, so the check is not vacuous
    assert torch.all(res.delta.abs() <= COMPLETENESS_REL * gap + COMPLETENESS_ABS), (res.delta, gap)
    deltas = []
    for n_steps in (2, 8, 32):
        r = aa.attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], n_steps=n_steps,
                         backend="torch", output="reduced")  # fmt: skip
        deltas.append(r.delta.abs().sum().item())
    assert deltas[0] > deltas[1] > deltas[2]


def test_confident_predictions_of_a_trained_model_equal_the_reference(builtin):
    """At p ≈ 0.994 the softmax's gradient needs 1 − p to more than float32 gives (it was 2.7e-5 off here)."""
    model, tokenizer = builtin
    enc = tokenizer(["Cold, dishonest and poorly acted."], return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    got = AttentionAttribution(model).attribute(*args, n_steps=2, method="gausslegendre", output="reduced")
    ref = reference.attribute(copy.deepcopy(model).double(), *args, n_steps=2, method="gausslegendre",
                              dtype=torch.float64, output="reduced")  # fmt: skip
    assert (ref.prob > 0.99).all(), ref.prob  # the confident case this checks
    assert_close_per_layer(got.layer_attr, ref.layer_attr)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), "attention_mask has shape"),
    (dict(token_type_ids=torch.zeros(1, 5, dtype=torch.long)), "token_type_ids has shape"),
    (dict(target=3), "target out of range"),
    (dict(target=torch.tensor([0, -1])), "target out of range"),
    (dict(target=torch.tensor([0])), "target must be"),
    (dict(layers=[0, 3]), "layer index 3 out of range"),
    (dict(layers=[1, 1]), "duplicates"),
    (dict(layers="first"), "layers must be"),
    (dict(method="simpson"), "unknown method"),
    (dict(n_steps=0), "n_steps must be"),
    (dict(output="everything"), "unknown output"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(internal_batch_size=0), "internal_batch_size"),
    (dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])), "right-padded"),
    (dict(token_type_ids=torch.full((2, 5), 2)), "segment ids in 0..1"),
    (dict(token_type_ids=torch.zeros(2, 5)), "token_type_ids must be a LongTensor"),
    (dict(layers=[0.5]), "integer layer indices"),
    (dict(dtype="int8"), "unsupported dtype 'int8'"),
    (dict(n_steps=5000), "more than 1024"),
    (dict(top_k=10**20), "top_k must be an integer in 0..4096"),
])  # fmt: skip
@pytest.mark.parametrize("implementation", ["engine", "reference"])
def test_bad_arguments_raise_one_line_errors(kwargs, message, implementation):
    model = tiny_classifier("bert")
    ids = torch.randint(5, 100, (2, 5))
    attribute = AttentionAttribution(model).attribute if implementation == "engine" else (
        functools.partial(reference.attribute, model))
    with pytest.raises(AttAttrError, match=message) as info:
        attribute(ids, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("implementation", ["engine", "reference"])
def test_ids_outside_the_vocabulary_raise(implementation):
    model = tiny_classifier("bert")
    attribute = AttentionAttribution(model).attribute if implementation == "engine" else (
        functools.partial(reference.attribute, model))
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(AttAttrError, match=f"outside the model's vocabulary \\(0..{vocab - 1}\\)"):
            attribute(torch.tensor([[5, bad, 7]]))


def test_a_regression_head_is_refused():
    model = tiny_classifier("bert", num_labels=1)
    with pytest.raises(AttAttrError, match="regression head"):
        AttentionAttribution(model)


def test_dtype_names_and_inference_mode_give_the_same_scores():
    """A dtype may be named; a caller's torch.no_grad or torch.inference_mode (whose tensors autograd may not keep)
    changes nothing."""
    model = tiny_classifier("bert")
    ids, mask, types = padded_batch(model, [6, 4])
    aa = AttentionAttribution(model)
    plain = aa.attribute(ids, mask, types, n_steps=3, backend="torch", dtype=torch.float16)
    named = aa.attribute(ids, mask, types, n_steps=3, backend="torch", dtype="float16")
    assert torch.equal(named.attributions, plain.attributions)
    exact = aa.attribute(ids, mask, types, n_steps=3, backend="torch")
    expected = reference.attribute(model, ids, mask, types, n_steps=3)
    with torch.inference_mode():
        inputs = [t.clone() for t in (ids, mask, types)]  # inference tensors
        engine_scores = aa.attribute(*inputs, n_steps=3, backend="torch")
        reference_scores = reference.attribute(model, *inputs, n_steps=3)
    assert torch.equal(engine_scores.attributions, exact.attributions)
    assert torch.equal(reference_scores.attributions, expected.attributions)
    with torch.no_grad():
        assert torch.equal(aa.attribute(ids, mask, types, n_steps=3, backend="torch").attributions, exact.attributions)
        assert torch.equal(reference.attribute(model, ids, mask, types, n_steps=3).attributions, expected.attributions)


def test_weights_made_in_inference_mode_are_attributed_and_the_reference_says_why_it_cannot():
    """Serving code often loads models under torch.inference_mode(); autograd may not save such weights."""
    model = tiny_classifier("bert")
    ids, mask, types = padded_batch(model, [6, 4])
    expected = AttentionAttribution(model).attribute(ids, mask, types, n_steps=3, backend="torch")
    with torch.inference_mode():
        loaded = copy.deepcopy(model)
        loaded.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert all(p.is_inference() for p in loaded.parameters())
    got = AttentionAttribution(loaded).attribute(ids, mask, types, n_steps=3, backend="torch")
    assert torch.equal(got.attributions, expected.attributions)
    with pytest.raises(AttAttrError, match="made under torch.inference_mode"):
        reference.attribute(loaded, ids, mask, types, n_steps=3)
    buffers_only = copy.deepcopy(model)  # as a model whose position ids were made in inference mode
    with torch.inference_mode():
        for module in buffers_only.modules():
            module._buffers.update({name: b.clone() for name, b in module._buffers.items() if b is not None})
    assert any(b.is_inference() for b in buffers_only.buffers())
    with pytest.raises(AttAttrError, match="made under torch.inference_mode"):
        reference.attribute(buffers_only, ids, mask, types, n_steps=3)


def test_reference_leaves_every_submodule_in_its_own_mode():
    model = tiny_classifier("bert").train()
    model.bert.embeddings.eval()
    ids, mask, types = padded_batch(model, [5])
    modes = {name: module.training for name, module in model.named_modules()}
    reference.attribute(model, ids, mask, types, n_steps=1)
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_masks_and_segments_that_are_not_tensors_are_one_line_errors():
    model = tiny_classifier("bert")
    ids, mask, types = padded_batch(model, [5, 3])
    for call in (AttentionAttribution(model).attribute, functools.partial(reference.attribute, model)):
        with pytest.raises(AttAttrError, match="attention_mask must be None or a tensor .* got ndarray"):
            call(ids, mask.numpy(), n_steps=1)
        with pytest.raises(AttAttrError, match="token_type_ids must be None or a tensor .* got list"):
            call(ids, mask, types.tolist(), n_steps=1)


def test_numpy_integers_are_accepted_for_every_integer_option():
    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [5, 4])
    aa = AttentionAttribution(model)
    plain = aa.attribute(ids, mask, types, n_steps=2, top_k=3, internal_batch_size=5)
    numpy = aa.attribute(ids, mask, types, n_steps=np.int64(2), top_k=np.int64(3), internal_batch_size=np.int32(5))
    assert torch.equal(numpy.attributions, plain.attributions) and torch.equal(numpy.top_k.score, plain.top_k.score)


def test_too_long_and_empty_inputs_raise():
    model = tiny_classifier("bert")
    aa = AttentionAttribution(model)
    with pytest.raises(AttAttrError, match="exceeds the model's maximum"):
        aa.attribute(torch.randint(5, 100, (1, 161)))
    with pytest.raises(AttAttrError, match="empty"):
        aa.attribute(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(AttAttrError, match="LongTensor"):
        aa.attribute(torch.zeros(1, 3))


def test_reference_imports_neither_engine_nor_kernels():
    code = ("import sys, attattr_fast.reference; "
            "print(sorted(m for m in sys.modules if m.startswith(('attattr_fast.engine', 'attattr_fast.api', "
            "'attattr_fast.kernels', 'kernels'))))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_half_precision_rows_on_the_cpu_warn_once(caplog):
    from attattr_fast import api

    api._warn_half_precision_rows_on_cpu.cache_clear()
    model = tiny_classifier("bert", layers=1)
    ids, mask, _ = padded_batch(model, [4])
    aa = AttentionAttribution(model)
    with caplog.at_level("WARNING", logger="attattr_fast.api"):
        aa.attribute(ids, mask, n_steps=1, output="reduced")
        assert not caplog.records  # float32: nothing to say
        for _ in range(2):
            aa.attribute(ids, mask, n_steps=1, output="reduced", dtype=torch.bfloat16)
    assert [r.getMessage().split(" rows")[0] for r in caplog.records] == ["bfloat16"]


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"), (None, "unknown device None"),
                                             ("meta", "'meta' is not supported; use cpu, cuda or cuda:N")])
def test_a_result_device_that_is_not_here_is_a_one_line_error(device, message):
    model = tiny_classifier("bert", layers=2)
    ids, mask, types = padded_batch(model, [5])
    with pytest.raises(AttAttrError, match=f"^result_device: {message}"):
        AttentionAttribution(model).attribute(ids, mask, types, n_steps=2, result_device=device)
    if not torch.cuda.is_available():
        with pytest.raises(AttAttrError, match="result_device: CUDA was requested but no CUDA device is available"):
            AttentionAttribution(model).attribute(ids, mask, types, n_steps=2, result_device="cuda")
