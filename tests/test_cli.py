"""`attattr-fast attribute`: results on good input, one-line errors and no output on bad input."""

import json
import subprocess
import sys

import pytest
import torch

import attattr_fast
from attattr_fast import AttAttrError, AttentionAttribution, load_classifier, load_results
from attattr_fast.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_attribute_writes_results_equal_to_the_api(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "res"
    code, stdout, _ = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--text", "a good film",
                              "--text", "the plot was dull and too long", "--steps", "3", "--out", str(out))
    assert code == 0
    assert "layer" in stdout and ("positive" in stdout or "negative" in stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "riemann_right" and manifest["n_steps"] == 3 and manifest["complete"]
    records = load_results(out)
    assert len(records) == 2 and records[1].text == "the plot was dull and too long"

    model, tokenizer = load_classifier(tiny_model_dir)
    enc = tokenizer(["the plot was dull and too long"], return_tensors="pt")
    direct = AttentionAttribution(model).attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                                   n_steps=3)  # fmt: skip
    torch.testing.assert_close(records[1].layer_attr, direct.layer_attr[0])
    torch.testing.assert_close(records[1].attributions, direct.attributions[0])
    assert records[1].tokens == tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert records[1].target == int(direct.target[0])


def test_printed_records_come_in_input_order(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--steps", "1", "--no-progress",
                           "--text", "a much longer text than the next one", "--text", "short")  # fmt: skip
    heads = [line.split("]")[0] for line in out.splitlines() if line.startswith("[")]
    assert code == 0 and heads == ["[0", "[1"], out


def test_compile_option_reaches_the_engine(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """--compile builds the attributor with compile=True (compiled results: tests/test_engine.py)."""
    import attattr_fast.api

    asked = []

    class Recording(AttentionAttribution):
        def __init__(self, model, compile=False):
            asked.append(compile)
            super().__init__(model)

    monkeypatch.setattr(attattr_fast.api, "AttentionAttribution", Recording)
    for flags in ([], ["--compile"]):
        code, _, _ = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--text", "a good film",
                             "--steps", "1", *flags)
        assert code == 0
    assert asked == [False, True]


def test_compile_failure_is_one_line(capsys, tiny_model_dir):
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    try:  # no C++ compiler, and no cached graph that would spare the compile
        with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
            code, out, err = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--text", "a good film",
                                     "--steps", "1", "--no-progress", "--compile")
    finally:
        torch._dynamo.reset()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "torch.compile of the layers failed" in err and "C++ compiler" in err, err


def test_input_file_with_pairs_and_gold_labels(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "good film", "text_pair": "loved it", "label": "positive"}\n'
                    '{"text": "bad plot", "label": "negative"}\n')
    out = tmp_path / "res"
    code, _, _ = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--input", str(data), "--steps", "2",
                         "--target", "gold", "--output", "reduced", "--out", str(out), "--quiet")
    assert code == 0
    records = load_results(out)
    assert [r.target for r in records] == [1, 0]
    assert records[0].attributions is None and records[0].layer_attr is not None
    assert "[SEP]" in records[0].tokens[:-1]  # the pair's separator sits inside the sequence


def test_input_builtin_sentiment(capsys, tmp_path, tiny_model_dir):
    """--input builtin:sentiment reads the packaged sentences, as `triggers` does, from any directory."""
    from attattr_fast.datasets import builtin_sentiment_examples

    out = tmp_path / "res"
    code, _, err = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--input", "builtin:sentiment",
                           "--steps", "1", "--target", "gold", "--output", "reduced", "--out", str(out), "--quiet",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    expected = builtin_sentiment_examples()
    records = load_results(out)
    assert [r.text for r in records] == [e.text for e in expected]
    assert [r.target for r in records] == [0 if e.label == "negative" else 1 for e in expected]
    assert "builtin:sentiment" in (out / "manifest.json").read_text()


@pytest.mark.parametrize("args, message", [
    (["--text", "   "], "empty"),
    (["--text", "good", "--steps", "0"], "--steps must be a positive integer"),
    (["--text", "good", "--steps", "many"], "--steps must be a positive integer"),
    (["--text", "good", "--method", "simpson"], "unknown method"),
    (["--text", "good", "--layers", "7"], "layer 7 out of range"),
    (["--text", "good", "--layers", "one"], "cannot parse"),
    (["--text", "good", "--layers", "1-0"], "runs backwards"),
    (["--text", "good", "--layers", ""], "--layers is empty"),
    (["--text", "good", "--steps", "20000"], "--steps 20000 is more than 1024"),
    (["--text", "good", "--top", "99999999999999999999"], "--top 99999999999999999999 is more than 4096"),
    (["--text", "good", "--dtype", "int8"], "unknown dtype"),
    (["--text", "good", "--target", "neutral"], "unknown label 'neutral'"),
    (["--text", "good", "--model", "/nonexistent/model"], "no model at"),
    (["--input", "/nonexistent/file.tsv"], "input file not found"),
    (["--text", "good", "--text-pair", "a", "--text-pair", "b"], "one --text-pair per --text"),
    (["--text", "good", "--text-pair", "   "], "--text-pair 1 is empty"),
    (["--text", "\u200b"], "has no tokens"),
    (["--text", "good", "--text-pair", "\u200b"], "example 0: the text pair has no tokens"),
    (["--text", "\u200b", "--text-pair", "good"], "example 0: the text has no tokens"),
    (["--input", "DATA", "--text-pair", "bad"], "--text-pair goes with --text"),
    (["--text", "good", "--device", "meta"], "is not supported; use cpu, cuda"),
])  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_model_dir, args, message):
    out = tmp_path / "res"
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir)]
    if "DATA" in args:
        (tmp_path / "data.txt").write_text("good\n")
        args = [str(tmp_path / "data.txt") if a == "DATA" else a for a in args]
    code, _, err = run_cli(capsys, "attribute", *args, "--out", str(out))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("attattr-fast: error:") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name, content, message", [
    ("no_text.csv", "sentence,label\nhello,positive\n", "no 'text' column"),
    ("broken.jsonl", '{"text": "fine"}\n{"text": \n', "not valid JSON"),
    ("empty.tsv", "text\tlabel\n", "no examples"),
    ("blank.tsv", "text\tlabel\n \tpositive\n", "empty text"),
    ("labels.tsv", "text\tlabel\ngood film\tneutral\n", "unknown label 'neutral'"),
    ("data.xml", "<text/>", "unknown input format"),
    ("list.jsonl", '{"text": ["a"]}\n', "must be strings"),
    ("quote.csv", 'text,label\n"unterminated,positive\n', "malformed CSV"),
    ("wide.tsv", "text\tlabel\ngood film\tpositive\textra\tfields\n", "4 fields where the header has 2"),
    ("columns.txt", "text\tlabel\nnice film\tpositive\n", "1: a tab in a .txt file"),
    ("short.tsv", "text\ttext_pair\tlabel\ngood\tfine\tpositive\nbad film\n", "3: 1 field where the header has 3"),
    ("twice.tsv", "text\ttext\tlabel\nfirst\tsecond\tpositive\n", "the header names 'text' more than once"),
    ("surrogate.jsonl", '{"text": "good \\ud800 film"}\n', "example 0: not valid Unicode text"),
])  # fmt: skip
def test_malformed_input_files(capsys, tmp_path, tiny_model_dir, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "res"
    code, _, err = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--input", str(path),
                           "--out", str(out))  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_tsv_with_a_byte_order_mark_or_quotes_reads_as_it_stands(tmp_path):
    from attattr_fast.datasets import read_examples

    path = tmp_path / "excel.tsv"
    path.write_bytes("text\tlabel\ngood film\tpositive\n".encode("utf-8-sig"))
    assert [(e.text, e.label) for e in read_examples(path)] == [("good film", "positive")]
    path = tmp_path / "quoted.tsv"  # TSV has no quoting (GLUE's files): a text may start with a quote
    path.write_text('text\tlabel\n"Great" is not the word\tnegative\nit is "fine\tpositive\n')
    assert [(e.text, e.label) for e in read_examples(path)] == [('"Great" is not the word', "negative"),
                                                                 ('it is "fine', "positive")]


def test_text_files_split_only_at_newlines_and_take_long_fields(tmp_path):
    from attattr_fast.datasets import read_examples

    path = tmp_path / "lines.txt"  # U+2028 and a form feed are characters of a text, not line ends
    path.write_text("good film\u2028bad plot\x0cend\r\nsecond line\n", newline="")
    assert [e.text for e in read_examples(path)] == ["good film\u2028bad plot\x0cend", "second line"]
    path = tmp_path / "excel.csv"  # empty trailing columns, named '' twice: not read, so not refused
    path.write_text("text,label,,\ngood film,positive,,\n")
    assert [(e.text, e.label) for e in read_examples(path)] == [("good film", "positive")]
    path = tmp_path / "long.tsv"  # beyond csv's default field limit of 128 KiB
    path.write_text("text\tlabel\n" + "word " * 40000 + "\tpositive\n")
    assert len(read_examples(path)[0].text) == 200000


def test_text_that_is_not_unicode_is_one_line(capsys, tiny_model_dir, tmp_path):
    for option in ("--text", "--text-pair"):
        args = ["--text", "good caf\udce9"] if option == "--text" else ["--text", "good", "--text-pair", "\ud800"]
        code, _, err = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), *args, "--out", str(tmp_path / "o"))
        assert code == 2 and f"{option} 1 is not valid UTF-8 text" in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
    from transformers import AutoTokenizer

    from attattr_fast.errors import AttAttrError
    from attattr_fast.text import encode

    with pytest.raises(AttAttrError, match="example 1: not valid Unicode text"):
        encode(AutoTokenizer.from_pretrained(tiny_model_dir), ["good", "bad \ud800"])


def test_store_options_without_out_and_version(capsys, tiny_model_dir):
    for option, value in (("--shard-size", "5"), ("--store-dtype", "float16")):
        code, _, err = run_cli(capsys, "attribute", "--text", "good", "--model", str(tiny_model_dir), option, value)
        assert code == 2 and f"{option} needs --out" in err and err.count("\n") == 1, err
    code, out, err = run_cli(capsys, "attribute", "--text", "good", "--model", str(tiny_model_dir), "--quiet")
    assert code == 2 and out == "" and "--quiet without --out" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"attattr-fast {attattr_fast.__version__}"


def test_damaged_weights_and_missing_tokenizer_are_one_line(capsys, tmp_path, tiny_model_dir):
    import shutil

    damaged, bare = tmp_path / "damaged", tmp_path / "bare"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    for model, message in ((damaged, "cannot load"), (bare, "has no tokenizer files")):
        code, _, err = run_cli(capsys, "attribute", "--model", str(model), "--text", "good")
        assert code == 2 and err.startswith("attattr-fast: error:") and message in err and err.count("\n") == 1, err


def test_unsupported_family(capsys, tmp_path):
    import transformers as T

    config = T.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    T.DistilBertForSequenceClassification(config).save_pretrained(tmp_path / "m")
    code, _, err = run_cli(capsys, "attribute", "--model", str(tmp_path / "m"), "--text", "good",
                           "--out", str(tmp_path / "res"))  # fmt: skip
    assert code == 2 and "unsupported model family 'distilbert'" in err
    assert not (tmp_path / "res").exists()


def test_text_longer_than_the_model_takes(capsys, caplog, tmp_path, tiny_model_dir):
    long_text = " ".join(["good"] * 300)  # the tiny model takes 160 tokens
    code, _, err = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--text", long_text,
                           "--no-truncate", "--out", str(tmp_path / "refused"))  # fmt: skip
    assert code == 2 and "more than the model's 160" in err
    assert not (tmp_path / "refused").exists()
    code, _, err = run_cli(capsys, "attribute", "--model", str(tiny_model_dir), "--text", long_text, "--steps", "1",
                           "--layers", "0", "--quiet", "--out", str(tmp_path / "cut"))  # fmt: skip
    assert code == 0 and "truncated to 160" in caplog.text
    assert len(load_results(tmp_path / "cut")[0].tokens) == 160


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attattr_fast.cli", "attribute", "--text", "",
                           "--out", str(tmp_path / "res")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "res").exists()


def test_unwritable_out_and_failed_writes_are_one_line(capsys, tmp_path, tiny_model_dir, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "attribute", "--text", "good", "--model", str(tiny_model_dir),
                           "--out", str(blocker / "sub" / "res"))  # fmt: skip
    assert code == 2 and "cannot write in" in err and err.count("\n") == 1, err

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "res"))

    monkeypatch.setattr("attattr_fast.results.open_run_directory", disk_full)
    code, _, err = run_cli(capsys, "attribute", "--text", "good", "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "res"))  # fmt: skip
    assert code == 2 and err == f"attattr-fast: error: {tmp_path / 'res'}: No space left on device\n", err


def test_a_target_other_than_the_prediction_is_marked(capsys, tiny_model_dir):
    args = ("attribute", "--model", str(tiny_model_dir), "--text", "a good film", "--steps", "1", "--no-progress")
    _, predicted, _ = run_cli(capsys, *args)
    label = predicted.split()[1]
    other = {"positive": "negative", "negative": "positive"}[label]
    _, marked, _ = run_cli(capsys, *args, "--target", other)
    assert predicted.startswith(f"[0] {label} p=") and marked.startswith(f"[0] target {other} p=")
    p_label, p_other = (float(text.split("p=")[1].split()[0]) for text in (predicted, marked))
    assert p_label + p_other == pytest.approx(1.0, abs=2e-3)  # two classes: the other class's probability


@pytest.mark.parametrize("argv, message", [
    (["triggers", "extract", "--input", "IN", "--out", "p.json", "--markdown", "p.json"],
     "--markdown p.json is also --out"),
    (["triggers", "evaluate", "--patterns", "p.json", "--input", "IN", "--out", "p.json"],
     "--out p.json is also --patterns"),
    (["heads", "--input", "IN", "--out", "IN"], "--out IN is also --input"),
    (["heads", "--input", "IN", "--plot", "h.png", "--scatter", "./h.png", "--compare-input", "IN"], "also --plot"),
    (["prune", "--input", "IN", "--json", "IN"], "--json IN is also --input"),
    (["finetune", "--train", "IN", "--out", "IN"], "--out IN is also --train"),
    (["graph", "--results", "RES", "--out", "RES/manifest.json"], "lies inside --results RES"),
    (["graph", "--results", "RES", "--out", "RES/../RES/x/g.json"], "lies inside --results"),
    (["triggers", "extract", "--input", "IN", "--exclude-words", "p.json", "--out", "x.json", "--markdown", "p.json"],
     "--markdown p.json is also --exclude-words"),
    (["heads", "--input", "IN", "--out", "~nosuchuser/x.json"], "~nosuchuser does not exist"),  # "~" as written
    # an empty path would be the working directory: written into, or read as results
    (["attribute", "--text", "good", "--out", ""], "--out is empty"),
    (["graph", "--results", " ", "--out", "g.json"], "--results is empty"),
    # a directory where a file is read
    (["triggers", "extract", "--input", "IN", "--exclude-words", ".", "--out", "p2.json"],
     "--exclude-words . is a directory; it takes a file"),
    (["triggers", "evaluate", "--patterns", "RES", "--input", "IN", "--out", "x.json"], "--patterns RES is a dir"),
    (["attribute", "--input", "RES"], "--input RES is a directory; it takes a file"),
    (["graph", "--results", "IN", "--out", "g.json"], "IN is a file, not a results directory"),
    (["triggers", "evaluate", "--patterns", "", "--input", "IN", "--out", "x.json"], "--patterns is empty"),
])  # fmt: skip
def test_an_output_that_would_overwrite_an_input_or_output_is_refused(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").write_text("text\tlabel\ngood\tpositive\n")
    (tmp_path / "p.json").write_text("{}")
    (tmp_path / "RES").mkdir()
    (tmp_path / "RES" / "manifest.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_every_subcommand_declares_the_paths_it_reads_and_writes():
    """main checks outputs against inputs through each parser's `reads`/`writes`; a subcommand needs both."""
    import argparse

    from attattr_fast.cli import build_parser

    def leaves(parser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield parser
        for action in subs:
            for child in action.choices.values():
                yield from leaves(child)

    found = list(leaves(build_parser()))
    assert len(found) >= 7
    for parser in found:
        defaults = parser._defaults
        assert {"reads", "writes"} <= set(defaults), parser.prog
        dests = {a.dest for a in parser._actions}
        assert set(defaults["reads"]) | set(defaults["writes"]) <= dests, parser.prog


def test_readers_name_a_directory_given_for_a_file(tmp_path):
    from attattr_fast.datasets import read_examples
    from attattr_fast.glue import read_task
    from attattr_fast.triggers import load_patterns, read_lexicon

    for read in (read_examples, lambda p: read_task(p, "sst2"), load_patterns, read_lexicon):
        with pytest.raises(AttAttrError, match=f"{tmp_path} is a directory, not a file"):
            read(tmp_path)
        with pytest.raises(AttAttrError, match="not found"):
            read(tmp_path / "missing.tsv")


def test_a_blank_text_pair_field_is_a_single_sentence(tmp_path):
    from attattr_fast.datasets import read_examples

    path = tmp_path / "mixed.tsv"
    path.write_text("text\ttext_pair\tlabel\ngood\t\tpositive\nfine\t   \tpositive\nok\tthen\tnegative\n")
    assert [e.text_pair for e in read_examples(path)] == [None, None, "then"]


def test_a_non_finite_score_names_the_example_by_its_input_position(capsys, tmp_path, tiny_model_dir):
    from attattr_fast.models import save_classifier

    model, tokenizer = load_classifier(tiny_model_dir)
    with torch.no_grad():  # broken weights: every example with this word has a NaN output
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("awful")] = float("nan")
    path = save_classifier(model, tokenizer, tmp_path / "broken")
    data = tmp_path / "in.tsv"  # sorted by length, example 2 comes second in its batch
    data.write_text("text\tlabel\nthe film was good and great fun\tpositive\nfine\tpositive\nthe plot was awful\t"
                    "negative\n")  # fmt: skip
    for command in (["attribute", "--steps", "2"], ["heads", "--kinds", "attattr", "--steps", "2"]):
        code, _, err = run_cli(capsys, *command, "--model", str(path), "--input", str(data))
        last = err.strip().splitlines()[-1]  # after the progress bar
        assert code == 2 and last.startswith("attattr-fast: error: the model's output for example 2 is not finite"), err
