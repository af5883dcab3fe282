"""Head importance, gating curves and per-layer effectiveness against independent computations:
the reference's head maxima, autograd through transformers' own modules with hooks, and plain loops."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attattr_fast import heads, reference
from attattr_fast.adapters import adapter_for
from attattr_fast.cli import main
from attattr_fast.errors import AttAttrError

from conftest import WORDS, padded_batch, tiny_classifier
from tolerances import ADAPTER_ATOL, RTOL_F32


def sharpen(model, seed=3):
    """Weights of std 0.3 instead of the 0.02 init: logits of order 1 that single heads can change."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _batch(family="bert", lengths=(7, 5, 9, 4, 6, 8), seed=3, labels_from_model=False):
    model = sharpen(tiny_classifier(family), seed)
    ids, mask, types = padded_batch(model, list(lengths), seed=seed, pair_at=3)
    if labels_from_model:
        with torch.no_grad():
            labels = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.argmax(-1)
    else:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, model.config.num_labels, (len(lengths),), generator=g)
    return model, ids, mask, types, labels


class HeadHooks:
    """Scales every head's context inside transformers' own self-attention modules (not the adapter):
    context of head h in layer l of example b × scale[b, l, h]."""

    def __init__(self, model, scale):
        self.handles = []
        for layer_index, layer in enumerate(model.base_model.encoder.layer):
            self.handles.append(layer.attention.self.register_forward_hook(self._hook(layer_index, scale)))

    @staticmethod
    def _hook(layer_index, scale):
        def hook(module, args, output):
            context, weights = output
            b, n, _ = context.shape
            per_head = context.view(b, n, scale.shape[-1], -1) * scale[:, layer_index, None, :, None]
            return per_head.reshape(b, n, -1), weights

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _logits(model, ids, mask, types, scale=None):
    if scale is None:
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    with HeadHooks(model, scale):
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


def test_attattr_importance_is_the_mean_of_the_reference_head_maxima():
    model, ids, mask, types, labels = _batch("roberta", lengths=(6, 4, 5))
    ours = heads.head_importance(model, ids, labels, mask, types, kind="attattr", n_steps=2, batch_size=2,
                                 backend="torch")  # fmt: skip
    ref = reference.attribute(model, ids, mask, types, target=labels, n_steps=2)
    expected = ref.head_max.double().mean(0).float()
    assert ours.shape == (3, 4) and ours.dtype == torch.float32
    assert (ours - expected).abs().max() <= RTOL_F32 * expected.abs().max()
    assert (ref.target == labels).all()  # the gold label was the target


def test_taylor_importance_equals_gate_gradients_through_transformers():
    model, ids, mask, types, labels = _batch("bert")
    ours = heads.head_importance(model, ids, labels, mask, types, kind="taylor", batch_size=4)
    # independent: autograd through the transformers model, gates as hooks on its self-attention modules
    scale = torch.ones(len(labels), 3, 4, requires_grad=True)
    loss = F.cross_entropy(_logits(model, ids, mask, types, scale), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, scale)
    expected = grad.abs().mean(0)
    assert expected.abs().min() > 0  # every head has a gradient: a zero result would show
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    layer_normed = heads.head_importance(model, ids, labels, mask, types, kind="taylor", normalize="layer")
    torch.testing.assert_close(layer_normed, expected / expected.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer_normed.norm(dim=1), torch.ones(3))


def test_accuracy_importance_equals_accuracy_drops_through_transformers():
    model, ids, mask, types, labels = _batch("bert", lengths=tuple(range(3, 11)) * 2, labels_from_model=True)
    ours = heads.head_importance(model, ids, labels, mask, types, kind="accuracy")
    with torch.no_grad():
        base = (_logits(model, ids, mask, types).argmax(-1) == labels).float().mean()
        expected = torch.zeros(3, 4)
        for layer in range(3):
            for head in range(4):
                scale = torch.ones(len(labels), 3, 4)
                scale[:, layer, head] = 0
                gated = _logits(model, ids, mask, types, scale)
                expected[layer, head] = base - (gated.argmax(-1) == labels).float().mean()
    assert expected.abs().max() > 0  # some head matters, so the comparison has something to check
    torch.testing.assert_close(ours, expected)


def test_attention_importance_is_the_mean_max_attention_of_transformers():
    model, ids, mask, types, labels = _batch("electra")
    ours = heads.head_importance(model, ids, labels, mask, types, kind="attention")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True).attentions
    expected = torch.zeros(3, 4)
    for b, m in enumerate(mask.sum(1).tolist()):
        for layer, att in enumerate(attentions):
            expected[layer] += att[b, :, :m, :m].flatten(1).max(1).values / len(labels)
    torch.testing.assert_close(ours, expected)


def test_gating_no_head_gives_the_unpruned_accuracy_and_gating_all_gives_zero_attention_output():
    model, ids, mask, types, labels = _batch("bert", lengths=tuple(range(3, 15)))
    importance = {"random": torch.rand(3, 4, generator=torch.Generator().manual_seed(0))}
    curves = heads.pruning_curves(model, importance, ids, labels, mask, types, fractions=(0.0, 0.5, 1.0))
    with torch.no_grad():
        plain = _logits(model, ids, mask, types)
        silent = _logits(model, ids, mask, types, torch.zeros(len(labels), 3, 4))
    assert curves["heads_gated"] == [0, 6, 12]
    assert curves["accuracy"]["random"][0] == pytest.approx((plain.argmax(-1) == labels).float().mean().item())
    assert curves["accuracy"]["random"][2] == pytest.approx((silent.argmax(-1) == labels).float().mean().item())
    gold = torch.softmax(plain, -1).gather(1, labels[:, None]).mean().item()
    assert curves["gold_probability"]["random"][0] == pytest.approx(gold, rel=1e-6)
    assert plain.argmax(-1).ne(silent.argmax(-1)).any() or not torch.allclose(plain, silent)
    # half the heads: the 6 lowest-scored, gated by hand on transformers' model
    scale = torch.ones(len(labels), 3, 4)
    for flat in torch.argsort(importance["random"].flatten())[:6].tolist():
        scale[:, flat // 4, flat % 4] = 0
    with torch.no_grad():
        half = _logits(model, ids, mask, types, scale)
    assert curves["accuracy"]["random"][1] == pytest.approx((half.argmax(-1) == labels).float().mean().item())
    half_gold = torch.softmax(half, -1).gather(1, labels[:, None]).mean().item()
    assert curves["gold_probability"]["random"][1] == pytest.approx(half_gold, rel=1e-5)
    reverse = heads.pruning_curves(model, {"reverse": -importance["random"]}, ids, labels, mask, types,
                                   fractions=(0.5,))  # fmt: skip
    assert reverse["gold_probability"]["reverse"][0] != pytest.approx(half_gold, rel=1e-3)  # the order matters


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_gating_every_head_of_a_layer_equals_zeroing_its_attention_output(family):
    model, ids, mask, types, _ = _batch(family)
    adapter = adapter_for(model)
    for layer in range(3):
        adapter.head_gates = torch.ones(3, 4)
        adapter.head_gates[layer] = 0
        gated = adapter.forward(ids, mask, types)
        scale = torch.ones(len(ids), 3, 4)
        scale[:, layer] = 0
        with torch.no_grad():
            zeroed = _logits(model, ids, mask, types, scale)
            plain = _logits(model, ids, mask, types)
        assert (gated - zeroed).abs().max() <= ADAPTER_ATOL
        assert (plain - zeroed).abs().max() > 100 * ADAPTER_ATOL  # the layer's attention did matter


def test_gates_for_fraction_removes_the_least_important_first():
    scores = torch.tensor([[0.5, -1.0, 2.0], [0.1, 3.0, -0.2]])
    expected_order = [(0, 1), (1, 2), (1, 0), (0, 0), (0, 2), (1, 1)]  # ascending scores, by hand
    for count, fraction in [(0, 0.0), (1, 0.1), (2, 0.3), (3, 0.5), (5, 0.8), (6, 1.0)]:
        gates = heads.gates_for_fraction(scores, fraction)
        off = {(int(i), int(j)) for i, j in torch.nonzero(gates == 0)}
        assert off == set(expected_order[:count]), fraction
    with pytest.raises(AttAttrError, match="fraction"):
        heads.gates_for_fraction(scores, 1.5)
    on = torch.tensor([[True, False, True], [True, True, False]])  # (0, 1) and (1, 2) are off already
    for count, fraction in [(0, 0.0), (1, 0.3), (2, 0.5), (4, 1.0)]:  # of the 4 heads on, by hand
        off = {(int(i), int(j)) for i, j in torch.nonzero(heads.gates_for_fraction(scores, fraction, on) == 0)}
        assert off == {(0, 1), (1, 2)} | set([(1, 0), (0, 0), (0, 2), (1, 1)][:count]), fraction


def test_layer_effectiveness_matches_explicit_gates():
    model, ids, mask, types, labels = _batch("bert", lengths=tuple(range(3, 11)), labels_from_model=True)
    scores = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(1))}
    effect = heads.layer_effectiveness(model, scores, ids, labels, mask, types, batch_size=4)
    for kind, s in scores.items():
        for direction, sign in (("largest_first", -1), ("smallest_first", 1)):
            for layer in range(3):
                order = np.argsort(sign * s[layer].numpy(), kind="stable")
                for k in range(5):
                    scale = torch.ones(len(labels), 3, 4)
                    scale[:, layer, torch.as_tensor(order[:k], dtype=torch.long)] = 0
                    with torch.no_grad():
                        logits = _logits(model, ids, mask, types, scale)
                    acc = (logits.argmax(-1) == labels).float().mean().item()
                    prob = torch.softmax(logits, -1).gather(1, labels[:, None]).mean().item()
                    assert effect["accuracy"][kind][direction][layer][k] == pytest.approx(acc, abs=1e-6)
                    assert effect["gold_probability"][kind][direction][layer][k] == pytest.approx(prob, abs=1e-6)


def test_layer_effectiveness_keeps_the_adapters_own_gates():
    model, ids, mask, types, labels = _batch("bert", lengths=tuple(range(3, 11)), labels_from_model=True)
    adapter = adapter_for(model)
    adapter.head_gates[1, 2] = 0.0  # pruned before the analysis
    effect = heads.layer_effectiveness(adapter, {"a": torch.rand(3, 4)}, ids, labels, mask, types, batch_size=4)
    gated = heads.accuracy(adapter, ids, labels, mask, types)
    for layer in range(3):  # no head of the layer taken off: the gated model itself, in every layer
        assert effect["accuracy"]["a"]["largest_first"][layer][0] == pytest.approx(gated, abs=1e-6)


def test_pruning_curves_keep_the_adapters_own_gates():
    model, ids, mask, types, labels = _batch("bert", lengths=tuple(range(3, 15)))
    adapter = adapter_for(model)
    adapter.head_gates[:, :2] = 0.0  # half the heads pruned before the analysis
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    scores[:, 0], scores[:, 1] = -1.0, 5.0  # gated heads, lowest and highest: off either way, and not in the budget
    curves = heads.pruning_curves(adapter, {"a": scores}, ids, labels, mask, types, fractions=(0.0, 0.5, 1.0))
    assert curves["heads_gated"] == [6, 9, 12]  # the 6 off, then half and all of the 6 still on
    scale = torch.ones(len(labels), 3, 4)
    scale[:, :, :2] = 0.0
    on = [(layer, head) for layer in range(3) for head in (2, 3)]
    by_rank = sorted(on, key=lambda lh: float(scores[lh]))  # the heads still on, lowest score first
    expected = []
    with torch.no_grad():
        for k in (0, 3, 6):
            s = scale.clone()
            for layer, head in by_rank[:k]:
                s[:, layer, head] = 0.0
            expected.append(_logits(model, ids, mask, types, s))  # transformers' model with those heads zeroed
        whole = _logits(model, ids, mask, types)
    for k, logits in enumerate(expected):
        assert curves["accuracy"]["a"][k] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
        gold = torch.softmax(logits, -1).gather(1, labels[:, None]).mean().item()
        assert curves["gold_probability"]["a"][k] == pytest.approx(gold, rel=1e-5)
    whole_gold = torch.softmax(whole, -1).gather(1, labels[:, None]).mean().item()
    assert curves["gold_probability"]["a"][0] != pytest.approx(whole_gold, rel=1e-3)  # the pruning mattered
    assert curves["gold_probability"]["a"][1] != pytest.approx(curves["gold_probability"]["a"][0], rel=1e-4)


def test_split_is_disjoint_and_stratified():
    labels = [0] * 30 + [1] * 10 + [2] * 20
    first, rest = heads.split_indices(labels, 30, seed=4)
    assert len(first) == 30 and len(rest) == 30 and not set(first) & set(rest)
    assert sorted(first + rest) == list(range(60))
    assert [sum(labels[i] == c for i in first) for c in range(3)] == [15, 5, 10]
    assert heads.split_indices(labels, 30, seed=4) == (first, rest)
    with pytest.raises(AttAttrError, match="cannot take 60 of 60"):
        heads.split_indices(labels, 60)


def test_importance_correlation_is_pearson():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    b = b + a
    expected = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
    assert heads.importance_correlation(a, b) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(AttAttrError, match="constant"):
        heads.importance_correlation(torch.ones(2, 2), a[:2, :2])
    on = torch.rand(4, 6, generator=g) > 0.3  # the heads a pruned model has
    expected = np.corrcoef(a[on].numpy(), b[on].numpy())[0, 1]
    assert heads.importance_correlation(a, b, on) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "gradient"}, "unknown importance kind"),
    ({"normalize": "global"}, "unknown normalize"),
    ({"labels": torch.tensor([0, 1])}, "2 labels for 3 examples"),
    ({"labels": torch.tensor([0, 1, 7])}, "labels out of range"),
    ({"labels": torch.tensor([0.0, 1.0, 1.0])}, "LongTensor"),
    ({"n_steps": 0, "kind": "attattr"}, "n_steps"),
])  # fmt: skip
def test_bad_arguments_are_one_line_errors(kwargs, message):
    model, ids, mask, types, labels = _batch("bert", lengths=(4, 5, 6))
    args = {"labels": labels, **kwargs}
    with pytest.raises(AttAttrError, match=message) as info:
        heads.head_importance(model, ids, args.pop("labels"), mask, types, **args)
    assert "\n" not in str(info.value)


def test_plots_are_written(tmp_path):
    curves = {"fractions": [0.0, 0.5, 1.0], "heads_gated": [0, 6, 12], "n_examples": 4,
              "accuracy": {"attattr": [1.0, 0.75, 0.5]}, "gold_probability": {"attattr": [0.9, 0.7, 0.5]}}
    table = [[1.0, 0.9, 0.8, 0.7, 0.5]] * 3
    effect = {m: {"attattr": {"largest_first": table, "smallest_first": table}}
              for m in ("accuracy", "gold_probability")}
    paths = [heads.plot_pruning_curves(curves, tmp_path / "fig5.png"),
             heads.plot_layer_effectiveness(effect, tmp_path / "fig3.png"),
             heads.plot_layer_effectiveness(effect, tmp_path / "fig3p.png", metric="gold_probability"),
             heads.plot_importance({"attattr": torch.rand(3, 4)}, tmp_path / "imp.png"),
             heads.plot_correlation(torch.rand(3, 4), torch.rand(3, 4), tmp_path / "fig6.png")]  # fmt: skip
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig3.png", "fig3p.png", "fig5.png", "fig6.png", "imp.png"]
    with pytest.raises(AttAttrError, match="unknown metric 'loss'"):
        heads.plot_layer_effectiveness(effect, tmp_path / "x.png", metric="loss")
    assert not (tmp_path / "x.png").exists()


def _labelled_tsv(path, n=12):
    positive, negative = "good great wonderful fun loved".split(), "bad awful dull boring hated".split()
    lines = ["text\tlabel"]
    for i in range(n):
        words = positive if i % 2 else negative
        lines.append(f"the film was {words[i % 5]} and {words[(i + 2) % 5]}\t{'positive' if i % 2 else 'negative'}")
    path.write_text("\n".join(lines) + "\n")
    assert all(w in WORDS for w in positive + negative)
    return path


def test_heads_cli_writes_the_api_scores(capsys, tmp_path, tiny_model_dir):
    from attattr_fast.cli.heads import load_labelled
    from attattr_fast.models import load_classifier

    data = _labelled_tsv(tmp_path / "data.tsv")
    out, plot = tmp_path / "heads.json", tmp_path / "heads.png"
    code = main(["heads", "--model", str(tiny_model_dir), "--input", str(data), "--kinds", "taylor,attention",
                 "--out", str(out), "--plot", str(plot), "--compare-input", str(data)])
    stdout = capsys.readouterr().out
    assert code == 0 and "taylor importance" in stdout and "Pearson r (taylor)" in stdout
    report = json.loads(out.read_text())
    model, tokenizer = load_classifier(tiny_model_dir)
    inputs, _ = load_labelled(str(data), "generic", model, tokenizer)
    direct = heads.head_importance(model, inputs.input_ids, inputs.labels, inputs.attention_mask,
                                   inputs.token_type_ids, kind="taylor")  # fmt: skip
    torch.testing.assert_close(torch.tensor(report["scores"]["taylor"]), direct)
    assert report["compare"]["pearson"]["taylor"] == pytest.approx(1.0)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_heads_cli_reports_an_undefined_correlation_and_keeps_every_score(capsys, tmp_path, tiny_model_dir,
                                                                         monkeypatch):
    original = heads.head_importance

    def constant_attention(model, *args, kind, **kwargs):  # a constant map, as accuracy drops of 0 everywhere give
        scores = original(model, *args, kind=kind, **kwargs)
        return torch.zeros_like(scores) if kind == "attention" else scores

    monkeypatch.setattr(heads, "head_importance", constant_attention)
    data = _labelled_tsv(tmp_path / "data.tsv")
    out, scatter = tmp_path / "heads.json", tmp_path / "scatter.png"
    code = main(["heads", "--model", str(tiny_model_dir), "--input", str(data), "--kinds", "attention,taylor",
                 "--out", str(out), "--compare-input", str(data), "--scatter", str(scatter)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Pearson r (attention), " in captured.out and "undefined (an importance map is constant)" in captured.out
    report = json.loads(out.read_text())
    assert report["compare"]["pearson"] == {"attention": None, "taylor": pytest.approx(1.0)}
    assert scatter.read_bytes()[:4] == b"\x89PNG"


def test_heads_cli_normalize_taylor_normalises_the_taylor_scores_only(capsys, tmp_path, tiny_model_dir):
    from attattr_fast.cli.heads import load_labelled
    from attattr_fast.models import load_classifier

    data = _labelled_tsv(tmp_path / "data.tsv")
    out = tmp_path / "heads.json"
    assert main(["heads", "--model", str(tiny_model_dir), "--input", str(data), "--kinds", "taylor,attention",
                 "--normalize", "taylor", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    model, tokenizer = load_classifier(tiny_model_dir)
    inputs, _ = load_labelled(str(data), "generic", model, tokenizer)
    args = (model, inputs.input_ids, inputs.labels, inputs.attention_mask, inputs.token_type_ids)
    taylor = heads.head_importance(*args, kind="taylor")
    norms = taylor.norm(dim=1, keepdim=True)
    assert float(norms.min()) > 0 and not torch.allclose(norms, torch.ones_like(norms))
    torch.testing.assert_close(torch.tensor(report["scores"]["taylor"]), taylor / norms)
    torch.testing.assert_close(torch.tensor(report["scores"]["attention"]), heads.head_importance(*args,
                                                                                                  kind="attention"))
    assert report["normalize"] == "taylor"


def test_single_class_subset_is_warned_about(capsys, tmp_path, tiny_model_dir):
    from attattr_fast.cli.heads import load_labelled
    from attattr_fast.models import load_classifier

    path = tmp_path / "sorted.tsv"
    path.write_text("text\tlabel\nthe film was good\tpositive\nthe film was fine\tpositive\n"
                    "the film was bad\tnegative\n")  # fmt: skip
    model, tokenizer = load_classifier(tiny_model_dir)
    load_labelled(str(path), "generic", model, tokenizer, max_examples=2)
    assert "all 2 examples of" in capsys.readouterr().err
    load_labelled(str(path), "generic", model, tokenizer)
    assert "same label" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--kinds", "attattr,magic"], "--kinds: unknown kind 'magic'"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--scatter", "x.png"], "--scatter needs --compare-input"),
    (["--compare-task", "sst2"], "--compare-task goes with --compare-input"),
    (["--out", "scores.png"], "--out scores.png is the JSON of the scores; name the picture with --plot"),
    (["--task", "sst9", "--input", "DATA"], "unknown task 'sst9'"),
    (["--input", "MISSING"], "input file not found"),
    (["--task", "sst2"], "needs an input file"),
    (["--plot", "heads.txt"], "name the picture .png, .svg, .pdf"),
])  # fmt: skip
def test_heads_cli_errors_are_one_line_and_write_nothing(capsys, tmp_path, tiny_model_dir, args, message):
    data = _labelled_tsv(tmp_path / "data.tsv")
    args = [str(data) if a == "DATA" else str(tmp_path / "missing.tsv") if a == "MISSING" else a for a in args]
    out = tmp_path / "out.json"
    code = main(["heads", "--model", str(tiny_model_dir), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_heads_cli_writes_all_its_outputs_or_none(capsys, tmp_path, tiny_model_dir, monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(heads, "plot_importance", full_disk)  # the JSON is written first, then the plot fails
    data = _labelled_tsv(tmp_path / "data.tsv")
    out, plot = tmp_path / "heads.json", tmp_path / "heads.png"
    code = main(["heads", "--model", str(tiny_model_dir), "--input", str(data), "--kinds", "attention", "--out",
                 str(out), "--plot", str(plot)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "wrote" not in err
    assert not out.exists() and not plot.exists()
    out.write_text("the user's older scores")  # a file that was there before is not removed: it holds the new scores
    assert main(["heads", "--model", str(tiny_model_dir), "--input", str(data), "--kinds", "attention", "--out",
                 str(out), "--plot", str(plot)]) == 2  # fmt: skip
    assert json.loads(out.read_text())["scores"]["attention"] and not plot.exists()


def test_gate_helpers_refuse_what_they_cannot_rank_or_run():
    model = tiny_classifier("bert")
    ids, mask, types = padded_batch(model, [5, 4])
    labels = torch.tensor([0, 1])
    with pytest.raises(AttAttrError, match="importance scores must be finite"):
        heads.gates_for_fraction(torch.tensor([[float("nan"), 0.1], [0.2, 0.3]]), 0.25)
    with pytest.raises(AttAttrError, match="fraction must be a number in"):
        heads.gates_for_fraction(torch.rand(2, 2), "0.5")
    with pytest.raises(AttAttrError, match="on has shape"):
        heads.gates_for_fraction(torch.rand(2, 2), 0.5, on=torch.ones(3, 2, dtype=torch.bool))
    assert heads.gates_for_fraction([[0.3, 0.1], [0.2, 0.4]], 0.5).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(AttAttrError, match="batch_size must be a positive integer"):
        heads.evaluate_gates(model, ids, labels, mask, types, batch_size=0)
    gates = torch.ones(3, 4)
    gates[0, 0] = float("nan")
    with pytest.raises(AttAttrError, match="gates must be finite"):
        heads.evaluate_gates(model, ids, labels, mask, types, gates=gates)
