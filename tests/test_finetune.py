"""Fine-tuning: the recipe's schedule and weight-decay groups, learning on a separable toy task, and the
`finetune` command's saved model (loadable, its logged accuracy reproducible) and one-line errors."""

import json
import os

import pytest
import torch

from attattr_fast.cli import main
from attattr_fast.errors import AttAttrError
from attattr_fast.finetune import FinetuneConfig, evaluate, finetune, parameter_groups, warmup_linear_factor
from attattr_fast.glue import class_indices
from attattr_fast.heads import encode_labelled
from attattr_fast.models import load_classifier

POSITIVE, NEGATIVE = "good great wonderful fun loved".split(), "bad awful dull boring hated".split()


def _sst2_file(path, n, offset=0):
    lines = ["sentence\tlabel"]
    for i in range(offset, offset + n):
        words = POSITIVE if i % 2 else NEGATIVE
        lines.append(f"the {'film' if i % 3 else 'movie'} was {words[i % 5]} , {words[(i // 2) % 5]} !\t{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_warmup_then_linear_decay_by_hand():
    # 20 steps, 2 of warm-up: 0, 0.5, then 1 falling by 1/18 per step to 0
    assert [warmup_linear_factor(s, 20, 2) for s in (0, 1, 2, 3, 11, 20)] == pytest.approx(
        [0.0, 0.5, 1.0, 17 / 18, 9 / 18, 0.0])
    assert warmup_linear_factor(0, 5, 0) == 1.0


def test_a_single_step_run_changes_the_weights(tmp_path, tiny_model_dir):
    # ten percent warm-up of one step would leave that step at rate 0
    model, tokenizer = load_classifier(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _encoded(model, tokenizer, _sst2_file(tmp_path / "train.tsv", 4))
    finetune(model, data, config=FinetuneConfig(epochs=1, batch_size=8, learning_rate=1e-2), progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_biases_and_layer_norm_weights_are_not_decayed(tiny_model_dir):
    model, _ = load_classifier(tiny_model_dir)
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values()
                                                          if n.endswith("bias") or "LayerNorm" in n}  # fmt: skip
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def _encoded(model, tokenizer, path):
    from attattr_fast.glue import read_glue

    data = read_glue(path, "sst2")
    return encode_labelled(tokenizer, data.examples, class_indices(data, model.config), max_length=128)


def test_finetuning_learns_a_separable_task(tmp_path, tiny_model_dir):
    model, tokenizer = load_classifier(tiny_model_dir)
    train = _encoded(model, tokenizer, _sst2_file(tmp_path / "train.tsv", 64))
    held_out = _encoded(model, tokenizer, _sst2_file(tmp_path / "dev.tsv", 20, offset=64))
    config = FinetuneConfig(learning_rate=1e-2, epochs=3, batch_size=8, seed=0)
    reports = finetune(model, train, held_out, config, progress=False)
    assert [r.epoch for r in reports] == [0, 1, 2, 3]
    assert reports[-1].eval_accuracy >= 0.9 > reports[0].eval_accuracy
    assert reports[-1].train_loss < reports[1].train_loss
    assert reports[-1].eval_accuracy == evaluate(model, held_out)
    with torch.no_grad():  # independent accuracy: the model's own forward, one example at a time
        right = sum(int(model(input_ids=held_out.input_ids[i:i + 1, :int(held_out.attention_mask[i].sum())]).logits
                        .argmax(-1)) == int(held_out.labels[i]) for i in range(len(held_out)))
    assert reports[-1].eval_accuracy == right / len(held_out)
    assert not model.training


@pytest.mark.parametrize("config, message", [
    (FinetuneConfig(learning_rate=0.0), "learning rate must be positive"),
    (FinetuneConfig(epochs=0), "epochs must be a positive integer"),
    (FinetuneConfig(warmup_ratio=1.0), "warm-up ratio"),
])  # fmt: skip
def test_bad_configs(tiny_model_dir, tmp_path, config, message):
    model, tokenizer = load_classifier(tiny_model_dir)
    train = _encoded(model, tokenizer, _sst2_file(tmp_path / "train.tsv", 4))
    with pytest.raises(AttAttrError, match=message):
        finetune(model, train, None, config, progress=False)


def test_finetune_cli_replaces_a_head_of_another_size_and_caps_the_length(capsys, tmp_path, tiny_model_dir):
    rows = [f"{i}\t1\t{i}e\tfiction\tx\ty\tx\ty\tthe film was good\t{'good ' * (150 if i == 0 else 2)}\t{gold}"
            for i, gold in enumerate(["entailment", "neutral", "contradiction"])]  # fmt: skip
    header = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tgold_label"
    train = tmp_path / "train.tsv"
    train.write_text("\n".join([header, *rows]) + "\n")
    out = tmp_path / "tuned"
    code = main(["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--task", "mnli", "--out", str(out),
                 "--epochs", "1", "--max-length", "1000"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "--max-length 1000 is more than the model takes; using 160" in err, err
    model, _ = load_classifier(out)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3


def test_finetune_cli_saves_a_loadable_model(capsys, tmp_path, tiny_model_dir):
    train, dev = _sst2_file(tmp_path / "train.tsv", 16), _sst2_file(tmp_path / "dev.tsv", 8, offset=16)
    out = tmp_path / "tuned"
    code = main(["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--eval", str(dev),
                 "--task", "sst2", "--out", str(out), "--lr", "1e-2", "--batch-size", "8",
                 "--epochs", "2"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    assert [line.split(":")[0] for line in stdout.splitlines()] == ["epoch 0", "epoch 1", "epoch 2"]
    log = json.loads((out / "finetune.json").read_text())
    assert log["config"]["learning_rate"] == 1e-2 and log["config"]["warmup_ratio"] == 0.1
    assert log["config"]["weight_decay"] == 0.01 and log["config"]["max_length"] == 128
    model, tokenizer = load_classifier(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}["model.safetensors"] == 0o666 & ~umask
    data = _encoded(model, tokenizer, dev)
    assert evaluate(model, data) == log["epochs"][-1]["eval_accuracy"]
    assert f"held-out accuracy {100 * log['epochs'][-1]['eval_accuracy']:.1f}%" in stdout.splitlines()[-1]


def test_finetune_cli_keeps_the_class_order_of_a_head_it_keeps(capsys, tmp_path, tiny_model_dir):
    """The tiny model's head names its classes negative, positive; data that orders them otherwise must be mapped
    onto that head, not rename its classes (the trained weights stay)."""
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"film {i}\t{('negative', 'positive')[i % 2]}\n" for i in range(8)))
    out = tmp_path / "tuned"
    code = main(["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--labels", "positive,negative",
                 "--out", str(out), "--epochs", "1", "--lr", "1e-12"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    before, _ = load_classifier(tiny_model_dir)
    after, _ = load_classifier(out)
    assert after.config.id2label == before.config.id2label == {0: "negative", 1: "positive"}
    torch.testing.assert_close(after.classifier.weight, before.classifier.weight)


@pytest.mark.parametrize("args, message", [
    (["--lr", "fast"], "--lr: 'fast' is not a number"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--warmup", "1.5"], "warm-up ratio must be in [0, 1)"),
    (["--task", "stsb"], "no 'sentence1' column for task stsb"),
    (["--eval", "BAD_EVAL"], "unknown sst2 label '7'"),
    (["--out", "NONEMPTY"], "exists and is not an empty directory"),
    (["--seed", "²"], "--seed must be an integer"),
    (["--seed", str(2**64)], "--seed must be an integer"),
    (["--labels", "0,1"], "sst2 has its own label names"),
    (["--task", "generic", "--train", "ONE_CLASS"], "needs at least 2 labels"),
    (["--task", "generic", "--train", "ONE_CLASS", "--labels", " , "], "--labels is empty"),
])  # fmt: skip
def test_finetune_cli_errors_are_one_line_and_write_nothing(capsys, tmp_path, tiny_model_dir, args, message):
    train = _sst2_file(tmp_path / "train.tsv", 8)
    bad_eval = tmp_path / "bad.tsv"
    bad_eval.write_text("sentence\tlabel\nfine\t7\n")
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    out = tmp_path / "tuned"
    one_class = tmp_path / "bad.tsv" if "ONE_CLASS" in args else None
    if one_class is not None:
        one_class.write_text("text\tlabel\ngood\tpositive\ngreat\tpositive\n")
    args = [str(bad_eval) if a == "BAD_EVAL" else str(nonempty) if a == "NONEMPTY" else str(one_class)
            if a == "ONE_CLASS" else a for a in args]  # fmt: skip
    full = ["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--task", "sst2", "--out", str(out)]
    code = main(full + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "full", "train.tsv"]



def test_a_diverging_run_is_an_error_and_saves_nothing(capsys, tmp_path, tiny_model_dir):
    train = _sst2_file(tmp_path / "train.tsv", 8)
    out = tmp_path / "tuned"
    code = main(["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--task", "sst2", "--out",
                 str(out), "--lr", "1e10"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "training diverged" in err[-1] and err[-1].startswith("attattr-fast: error:"), err
    assert not out.exists()


def test_a_multi_label_checkpoint_is_fine_tuned_into_a_model_every_command_takes(capsys, tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from attattr_fast.adapters import adapter_for
    from attattr_fast.models import save_classifier

    model, tokenizer = load_classifier(tiny_model_dir)
    model.config.problem_type = "multi_label_classification"
    source = save_classifier(model, tokenizer, tmp_path / "multi")
    out = tmp_path / "tuned"
    code = main(["finetune", "--model", str(source), "--train", str(_sst2_file(tmp_path / "train.tsv", 8)),
                 "--task", "sst2", "--out", str(out), "--epochs", "1"])  # fmt: skip
    assert code == 0 and "configured for multi_label_classification" in capsys.readouterr().err
    assert AutoConfig.from_pretrained(out).problem_type == "single_label_classification"
    adapter_for(load_classifier(out)[0])  # attributable: no "configured for" refusal
