"""Physical head pruning: the smaller model computes what the gated model computes, saves, loads, and
attributes, ranks and prunes again like the gated model, with the heads numbered as in the unpruned model."""

import json

import pytest
import torch
from test_heads import _labelled_tsv, sharpen

from attattr_fast import AttentionAttribution, heads, reference
from attattr_fast.adapters import KEPT_HEADS_CONFIG_KEY, adapter_for
from attattr_fast.cli import main
from attattr_fast.errors import AttAttrError
from attattr_fast.models import load_classifier, save_classifier
from attattr_fast.pruning import current_heads, parameter_count, prune_heads

from conftest import padded_batch, tiny_classifier
from tolerances import ADAPTER_ATOL, RTOL_F32

UNEQUAL = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1.0]])  # layer 1 loses every head
EQUAL = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0.0]])


def _gated_logits(model, gates, ids, mask, types):
    adapter = adapter_for(model)
    adapter.head_gates = gates
    return adapter.forward(ids, mask, types)


def _own_logits(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("gates", [UNEQUAL, EQUAL], ids=["unequal", "equal"])
def test_pruned_model_equals_gated_model(family, gates):
    model = sharpen(tiny_classifier(family))
    ids, mask, types = padded_batch(model, [7, 5, 3, 6], pair_at=2)
    pruned = prune_heads(model, gates)
    difference = (_own_logits(pruned, ids, mask, types) - _gated_logits(model, gates, ids, mask, types)).abs().max()
    assert difference <= ADAPTER_ATOL
    assert (_own_logits(model, ids, mask, types) - _own_logits(pruned, ids, mask, types)).abs().max() > 1e-2
    # per removed head: its d rows (weights and biases) of Q, K, V and its d columns of the output projection
    d, hidden = model.config.hidden_size // 4, model.config.hidden_size
    removed = int((gates == 0).sum())
    assert parameter_count(model) - parameter_count(pruned) == removed * (3 * (hidden * d + d) + hidden * d)
    assert current_heads(pruned) == [[0, 2], [], [0, 1, 2, 3]] if gates is UNEQUAL else [[0, 2], [1, 2], [0, 1]]
    assert current_heads(model) == [[0, 1, 2, 3]] * 3  # the original is untouched


def test_pruning_twice_composes(tiny_model_dir):
    model = sharpen(load_classifier(tiny_model_dir).model)
    ids, mask, types = padded_batch(model, [6, 4])
    once = prune_heads(model, [[0, 1, 3], [1, 2, 3], [0, 1, 2, 3]])
    twice = prune_heads(once, [[0, 3], [1], [3]])  # heads keep their original numbers
    assert current_heads(twice) == [[0, 3], [1], [3]]
    combined = torch.zeros(3, 4)
    combined[0, [0, 3]] = combined[1, 1] = combined[2, 3] = 1
    difference = (_own_logits(twice, ids, mask, types) - _gated_logits(model, combined, ids, mask, types)).abs().max()
    assert difference <= ADAPTER_ATOL


@pytest.mark.parametrize("gates", [UNEQUAL, EQUAL], ids=["unequal", "equal"])
def test_saved_pruned_model_loads_with_load_classifier(tmp_path, tiny_model_dir, gates):
    model, tokenizer = load_classifier(tiny_model_dir)
    sharpen(model)
    ids, mask, types = padded_batch(model, [7, 5, 3], pair_at=2)
    pruned = prune_heads(model, gates)
    path = save_classifier(pruned, tokenizer, tmp_path / "pruned")
    assert json.loads((path / "config.json").read_text())[KEPT_HEADS_CONFIG_KEY] == current_heads(pruned)
    loaded, _ = load_classifier(path)
    assert parameter_count(loaded) == parameter_count(pruned)
    difference = (_own_logits(loaded, ids, mask, types) - _gated_logits(model, gates, ids, mask, types)).abs().max()
    assert difference <= ADAPTER_ATOL
    with pytest.raises(AttAttrError, match="exists and is not an empty directory"):
        save_classifier(pruned, tokenizer, path)


def test_a_failed_save_is_an_os_error_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors import SafetensorError

    model, tokenizer = load_classifier(tiny_model_dir)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="could not be saved.*No space left"):
        save_classifier(model, tokenizer, tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []


def test_an_unevenly_pruned_model_still_fine_tunes_and_takes_trigger_evaluation(capsys, tmp_path, tiny_model_dir):
    """Neither command attributes, so neither needs the adapter that such a model cannot have."""
    from attattr_fast.triggers import Extraction, Pattern, save_patterns

    model, tokenizer = load_classifier(tiny_model_dir)
    path = save_classifier(prune_heads(model, UNEQUAL), tokenizer, tmp_path / "pruned")
    data = _labelled_tsv(tmp_path / "data.tsv")
    assert main(["finetune", "--model", str(path), "--train", str(data), "--out", str(tmp_path / "tuned"),
                 "--epochs", "1"]) == 0, capsys.readouterr().err  # fmt: skip
    assert current_heads(load_classifier(tmp_path / "tuned")[0]) == [[0, 2], [], [0, 1, 2, 3]]
    word = tokenizer.convert_tokens_to_ids("awful")
    pattern = Pattern(label=1, token_ids=(word,), tokens=("awful",), segments=(0,), rel_positions=(0.5,),
                      special=(False,), positions=(3,), score=1.0, source=0, sources=[0])  # fmt: skip
    save_patterns(Extraction(labels=["negative", "positive"], patterns={1: [pattern]}, n_examples=1,
                             n_without_pattern=0), tmp_path / "patterns.json")  # fmt: skip
    code = main(["triggers", "evaluate", "--model", str(path), "--patterns", str(tmp_path / "patterns.json"),
                 "--input", str(data), "--out", str(tmp_path / "attack.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "attack.json").exists()


def test_an_unevenly_pruned_model_goes_through_every_attributing_command(capsys, tmp_path, tiny_model_dir):
    """attribute, heads and prune take a model pruned to different head counts per layer, numbering heads as the
    unpruned model does; pruning it again removes only heads it still has."""
    from attattr_fast.results import load_results

    model, tokenizer = load_classifier(tiny_model_dir)
    path = save_classifier(prune_heads(model, UNEQUAL), tokenizer, tmp_path / "pruned")
    data = _labelled_tsv(tmp_path / "data.tsv", n=12)
    results = tmp_path / "results"
    assert main(["attribute", "--model", str(path), "--input", str(data), "--steps", "2", "--out", str(results),
                 "--quiet", "--no-progress"]) == 0, capsys.readouterr().err  # fmt: skip
    stored = load_results(results)
    assert len(stored) == 12 and stored[0].attributions.shape[1] == 4
    assert stored[0].attributions[1].abs().max() == 0 and stored[0].attention[UNEQUAL == 0].abs().max() == 0
    capsys.readouterr()
    header, *rows = data.read_text().splitlines()
    other = tmp_path / "other.tsv"
    other.write_text("\n".join([header, *rows[::-1]]) + "\n")  # its first 8 examples are others than data's
    assert main(["heads", "--model", str(path), "--input", str(data), "--kinds", "taylor,attention", "--out",
                 str(tmp_path / "heads.json"), "--compare-input", str(other), "--max-examples", "8"]) == 0, \
        capsys.readouterr().err  # fmt: skip
    scores = json.loads((tmp_path / "heads.json").read_text())
    for kind in ("taylor", "attention"):
        assert torch.tensor(scores["scores"][kind])[UNEQUAL == 0].abs().max() == 0
        # Pearson r over the 6 heads the model has: the removed heads' zeros in both maps say nothing
        a, b = torch.tensor(scores["scores"][kind]), torch.tensor(scores["compare"]["scores"][kind])
        on = UNEQUAL.bool()
        expected = float(torch.corrcoef(torch.stack([a[on], b[on]]).double())[0, 1])
        assert scores["compare"]["pearson"][kind] == pytest.approx(expected, rel=1e-9)
        assert expected != pytest.approx(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1]))
    printed = capsys.readouterr().out
    assert "  L1          -         -         -         -" in printed  # layer 1 has no heads left
    tops = [line for line in printed.splitlines() if line.startswith("  top: ")]
    assert tops and not any(f"L{layer}H{h}" in line for line in tops for layer, h in (UNEQUAL == 0).nonzero().tolist())
    assert main(["prune", "--model", str(path), "--input", str(data), "--importance-examples", "6", "--kinds",
                 "taylor", "--fractions", "0,1", "--fraction", "0.5", "--by", "taylor", "--json",
                 str(tmp_path / "prune.json"), "--save", str(tmp_path / "again"), "--timing-repeats", "1"]) == 0, \
        capsys.readouterr().err  # fmt: skip
    report = json.loads((tmp_path / "prune.json").read_text())["pruned"]
    assert report["heads_removed"] == 3  # half of the 6 heads it still has
    kept = current_heads(load_classifier(tmp_path / "again")[0])
    assert sum(map(len, kept)) == 3 and all(set(k) <= set(h) for k, h in zip(kept, [[0, 2], [], [0, 1, 2, 3]]))
    assert report["max_abs_logit_difference_vs_gated"] <= ADAPTER_ATOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gates", [UNEQUAL, EQUAL], ids=["unequal", "equal"])
def test_pruned_model_attributes_like_the_gated_model(gates, backend):
    model = sharpen(tiny_classifier("bert"))
    ids, mask, types = padded_batch(model, [6, 4], pair_at=2)
    pruned = prune_heads(model, gates)
    target = torch.tensor([0, 2])
    small = AttentionAttribution(pruned).attribute(ids, mask, types, target=target, n_steps=3, backend=backend)
    ref = reference.attribute(pruned, ids, mask, types, target=target, n_steps=3)  # transformers' pruned modules
    assert small.attributions.shape == ref.attributions.shape == (2, 3, 4, 6, 6)  # the original head numbers
    for name in ("attributions", "attention", "layer_attr", "head_max"):
        mine, theirs = getattr(small, name), getattr(ref, name)
        assert (mine - theirs).abs().max() <= RTOL_F32 * theirs.abs().max(), name
    torch.testing.assert_close(small.baseline, ref.baseline, rtol=RTOL_F32, atol=RTOL_F32)
    removed = (gates == 0).view(1, 3, 4)
    assert small.attention[removed.expand(2, 3, 4)].abs().max() == 0  # a removed head attends nowhere
    assert small.attributions[removed.expand(2, 3, 4)].abs().max() == 0
    gated = AttentionAttribution(model)
    gated.adapter.head_gates = gates
    full = gated.attribute(ids, mask, types, target=target, n_steps=3, backend=backend)
    assert (full.attributions - small.attributions).abs().max() <= RTOL_F32 * full.attributions.abs().max()
    assert (full.attention * ~removed.view(1, 3, 4, 1, 1) - small.attention).abs().max() <= RTOL_F32


def test_a_pruned_models_removed_heads_stay_off_and_rank_last():
    """The adapter of a pruned model gates its removed heads; gates cannot switch them back on, and every
    importance kind scores them 0."""
    model = sharpen(tiny_classifier("bert"))
    ids, mask, types = padded_batch(model, [7, 5, 6], pair_at=2)
    labels = torch.tensor([0, 2, 1])
    pruned = prune_heads(model, UNEQUAL)
    adapter = adapter_for(pruned)
    assert torch.equal(adapter.head_gates, UNEQUAL) and torch.equal(adapter.present_heads, UNEQUAL.bool())
    adapter.head_gates = torch.ones(3, 4)
    torch.testing.assert_close(adapter.forward(ids, mask, types), _own_logits(pruned, ids, mask, types),
                               rtol=0, atol=ADAPTER_ATOL)  # fmt: skip
    # what runs, ranks or counts heads reads the gates in effect, not the gates as set
    assert torch.equal(adapter.gates_in_effect, UNEQUAL)
    ref = reference.attribute(adapter, ids, mask, types, n_steps=2, dtype=torch.float64)  # every head it has is on
    assert ref.attributions.transpose(0, 2)[UNEQUAL.T == 0].abs().max() == 0
    curves = heads.pruning_curves(adapter, {"taylor": torch.rand(3, 4)}, ids, labels, mask, types, fractions=(0, 1))
    assert curves["heads_gated"] == [6, 12]  # the 6 removed heads are off from the start (gates as set: 0, 12)
    for kind in heads.KINDS:
        scores = heads.head_importance(pruned, ids, labels, mask, types, kind=kind, n_steps=2)
        assert scores[UNEQUAL == 0].abs().max() == 0, kind
        if kind != "attattr":  # AttAttr's signed max is 0 for a gated head, as for the removed ones
            gated = adapter_for(model)
            gated.head_gates = UNEQUAL
            expected = heads.head_importance(gated, ids, labels, mask, types, kind=kind)
            expected[UNEQUAL == 0] = 0  # a gated head still attends: "attention" scores it, a removed one not
            torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    # pruning the pruned model again: gates in the original numbering, removed heads stay removed
    again = prune_heads(pruned, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1.0]]))
    assert current_heads(again) == [[0], [], [1, 2, 3]]


@pytest.mark.parametrize("keep, message", [
    (torch.tensor([[1, 0.5, 1, 1]] * 3), "exactly 0"),
    (torch.ones(2, 4), "gates have shape"),
    ([[0, 1], [0]], "keep lists 2 layers"),
    ([[0, 0], [1], [2]], "must be distinct"),
    ([[4], [1], [2]], "must be distinct, in 0..3"),
    ([[0, 1], [], [2]], r"layer 0: heads \[1\] were removed before; it has \[0, 2\]"),
])  # fmt: skip
def test_bad_pruning_requests(keep, message):
    model = tiny_classifier("bert")
    if "removed before" in message:
        model = prune_heads(model, UNEQUAL)
    with pytest.raises(AttAttrError, match=message):
        prune_heads(model, keep)


def test_a_corrupt_kept_heads_list_is_a_clear_error(tmp_path, tiny_model_dir):
    model, tokenizer = load_classifier(tiny_model_dir)
    path = save_classifier(prune_heads(model, EQUAL), tokenizer, tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())
    config[KEPT_HEADS_CONFIG_KEY] = [[0, 1, 2], [1, 2], [0, 1]]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttAttrError, match="do not match the pruned shapes"):
        load_classifier(path)
    config[KEPT_HEADS_CONFIG_KEY] = [[0, 9], [1, 2], [0, 1]]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttAttrError, match="expected distinct indices in 0..3"):
        load_classifier(path)


def test_prune_cli_curves_figures_and_saved_model(capsys, tmp_path, tiny_model_dir):
    data = _labelled_tsv(tmp_path / "data.tsv", n=16)
    out, fig5, fig3, saved = tmp_path / "prune.json", tmp_path / "fig5.png", tmp_path / "fig3.png", tmp_path / "small"
    code = main(["prune", "--model", str(tiny_model_dir), "--input", str(data), "--importance-examples", "8",
                 "--kinds", "taylor,attention", "--fractions", "0,0.5,1", "--layer-plot", str(fig3),
                 "--layer-kinds", "taylor", "--plot", str(fig5), "--json", str(out), "--fraction", "0.5",
                 "--by", "taylor", "--save", str(saved), "--timing-repeats", "2"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0 and "speed-up" in stdout
    report = json.loads(out.read_text())
    assert report["n_importance"] == 8 and report["n_eval"] == 8
    assert fig5.read_bytes()[:4] == fig3.read_bytes()[:4] == b"\x89PNG"

    from attattr_fast.cli.heads import load_labelled

    model, tokenizer = load_classifier(tiny_model_dir)
    inputs, _ = load_labelled(str(data), "generic", model, tokenizer)
    first, rest = heads.split_indices(inputs.labels, 8, seed=0)
    imp, ev = inputs.subset(first), inputs.subset(rest)
    taylor = heads.head_importance(model, imp.input_ids, imp.labels, imp.attention_mask, imp.token_type_ids,
                                   kind="taylor")  # fmt: skip
    torch.testing.assert_close(torch.tensor(report["importance"]["taylor"]), taylor)
    plain = _own_logits(model, ev.input_ids, ev.attention_mask, ev.token_type_ids)
    assert report["curves"]["accuracy"]["taylor"][0] == pytest.approx((plain.argmax(-1) == ev.labels).float().mean())
    gates = heads.gates_for_fraction(taylor, 0.5)
    small, _ = load_classifier(saved)
    small_logits = _own_logits(small, ev.input_ids, ev.attention_mask, ev.token_type_ids)
    gated = _gated_logits(model, gates, ev.input_ids, ev.attention_mask, ev.token_type_ids)
    assert (small_logits - gated).abs().max() <= ADAPTER_ATOL
    assert report["pruned"]["heads_removed"] == 6
    assert report["pruned"]["max_abs_logit_difference_vs_gated"] <= ADAPTER_ATOL
    assert (saved / "pruning.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--fraction", "2"], "--fraction: 2 is not in [0, 1]"),
    (["--save", "SAVE"], "--save needs --fraction"),
    (["--by", "luck", "--fraction", "0.5"], "--by: unknown kind 'luck'"),
    (["--by", "taylor"], "--by goes with --fraction"),
    (["--by", "", "--fraction", "0.5"], "--by: unknown kind ''"),
    (["--layer-plot", "lp.png", "--layer-kinds", ""], "--layer-kinds"),
    (["--layer-kinds", "taylor"], "--layer-kinds goes with --layer-plot"),
    (["--fractions", "0.5,0.5"], "names a fraction twice"),
    (["--fractions", "0,x"], "--fractions: 'x' is not a number"),
    (["--importance-examples", "16"], "cannot take 16 of 16"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2^63)"),
    (["--seed", "²"], "--seed must be an integer in [0, 2^63)"),
    (["--plot", "curves.txt"], "name the picture .png, .svg, .pdf"),
    (["--steps", "0", "--model", "/nonexistent"], "--steps must be a positive integer"),  # checked before loading
    (["--method", "simpson", "--model", "/nonexistent"], "unknown method 'simpson'"),
])  # fmt: skip
def test_prune_cli_errors_are_one_line_and_write_nothing(capsys, tmp_path, tiny_model_dir, args, message):
    data = _labelled_tsv(tmp_path / "data.tsv", n=16)
    save = tmp_path / "small"
    args = [str(save) if a == "SAVE" else a for a in args]
    out = tmp_path / "prune.json"
    code = main(["prune", "--model", str(tiny_model_dir), "--input", str(data), "--json", str(out),
                 "--kinds", "attention", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not save.exists()


def test_prune_cli_refuses_to_save_the_builtin_model_before_working(capsys, tmp_path):
    code = main(["prune", "--fraction", "0.5", "--save", str(tmp_path / "small")])
    err = capsys.readouterr().err
    assert code == 2 and "built-in zero-shot model has no save format" in err
    assert not (tmp_path / "small").exists()


def test_prune_cli_with_a_separate_held_out_file(capsys, tmp_path, tiny_model_dir):
    from attattr_fast.cli.heads import load_labelled

    train, dev = _labelled_tsv(tmp_path / "train.tsv", n=10), _labelled_tsv(tmp_path / "dev.tsv", n=6)
    out = tmp_path / "prune.json"
    code = main(["prune", "--model", str(tiny_model_dir), "--input", str(train), "--eval-input", str(dev),
                 "--importance-examples", "4", "--kinds", "attention", "--fractions", "0,1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["n_importance"], report["n_eval"]) == (4, 6)
    model, tokenizer = load_classifier(tiny_model_dir)
    ev, _ = load_labelled(str(dev), "generic", model, tokenizer)
    silent = torch.zeros(3, 4)
    for value, gates in zip(report["curves"]["accuracy"]["attention"], (torch.ones(3, 4), silent)):
        logits = _gated_logits(model, gates, ev.input_ids, ev.attention_mask, ev.token_type_ids)
        assert value == pytest.approx((logits.argmax(-1) == ev.labels).float().mean().item())
    code = main(["prune", "--model", str(tiny_model_dir), "--input", str(train), "--eval-input", str(dev),
                 "--importance-examples", "11", "--kinds", "attention"])
    assert code == 2 and "has only 10 examples" in capsys.readouterr().err


def test_prune_heads_takes_numpy_gates_as_gates():
    import numpy as np

    model = tiny_classifier("bert")
    pruned = prune_heads(model, UNEQUAL.numpy().astype(np.int64))
    assert current_heads(pruned) == current_heads(prune_heads(model, UNEQUAL))
