"""Corpus runs: length bucketing, memory-sized calls, out-of-memory retries, resume after SIGKILL, repair.

Every run is compared with an independent computation: a direct `AttentionAttribution.attribute` call per
example, or an uninterrupted run of the same command.
"""

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from attattr_fast import AttentionAttribution, engine, load_classifier, load_results, results
from attattr_fast.cli import main
from attattr_fast.corpus import ChunkPlanner, attribute_corpus, plan_shards, prepare, resolve_targets, run_corpus
from attattr_fast.errors import AttAttrError

from conftest import WORDS

N_EXAMPLES = 40
SHARD = 4  # 10 shards
FAST = ["--steps", "3", "--shard-size", str(SHARD), "--quiet", "--no-progress"]


def write_corpus(path: Path, n: int = N_EXAMPLES, seed: int = 0) -> Path:
    """A TSV of n labelled texts of 2–24 words (lengths spread so shards differ in length)."""
    rng = random.Random(seed)
    lines = ["text\tlabel"]
    for _ in range(n):
        words = [rng.choice(WORDS[:-3]) for _ in range(rng.randint(2, 24))]
        lines.append(" ".join(words) + "\t" + rng.choice(("positive", "negative")))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module", autouse=True)
def cpu_settings():
    """One thread, as in the subprocesses (OMP_NUM_THREADS=1): identical arithmetic, and fast on a shared CPU.
    The torch backend: these tests are about scheduling and storage, not the kernel (tested on its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "reviews.tsv")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file, tiny_model_dir):
    """An uninterrupted run of the command the other tests interrupt, resume or repair."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run_cli("attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST) == 0
    return out


def assert_same_records(got, want, exact: bool = True):
    """Record for record: same examples in input order, same fields (tensors bit-identical when exact)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for name in ("index", "tokens", "text", "text_pair", "label", "target", "target_label", "layers"):
            assert getattr(a, name) == getattr(b, name), (a.index, name)
        for name in ("prob", "head_max", "head_argmax", "layer_attr", "delta", "attributions", "attention",
                     "top_query", "top_key", "top_score"):  # fmt: skip
            x, y = getattr(a, name), getattr(b, name)
            if name == "prob":
                x, y = torch.tensor(x), torch.tensor(y)
            assert (x is None) == (y is None), (a.index, name)
            if x is None:
                continue
            if exact:
                assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.nan_to_num(), y.nan_to_num())
                                             and torch.equal(x.isnan(), y.isnan())), (a.index, name)  # fmt: skip
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{a.index} {name}")


def assert_each_example_once(out: Path, n: int = N_EXAMPLES):
    manifest = json.loads((out / "manifest.json").read_text())
    indices = [i for shard in manifest["shards"] for i in shard["indices"]]
    assert sorted(indices) == list(range(n)) and manifest["complete"] and manifest["n_done"] == n
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert not leftovers, leftovers
    names = {p.name.split(".")[0] for p in out.glob("shard-*")}
    assert names == {s["name"] for s in manifest["shards"]}


def test_records_equal_direct_attribution(reference, corpus_file, tiny_model_dir):
    """Each stored record is what a direct call on that example alone gives, in input order."""
    records = load_results(reference)
    assert [r.index for r in records] == list(range(N_EXAMPLES))
    model, tokenizer = load_classifier(tiny_model_dir)
    aa = AttentionAttribution(model)
    lines = corpus_file.read_text().splitlines()[1:]
    for i in (0, 7, 23, N_EXAMPLES - 1):
        text, label = lines[i].split("\t")
        enc = tokenizer([text], return_tensors="pt")
        direct = aa.attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], n_steps=3, top_k=3)
        r = records[i]
        assert r.text == text and r.label == label
        assert r.tokens == tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
        assert r.target == int(direct.target[0])
        torch.testing.assert_close(torch.tensor(r.prob), direct.prob[0])
        for name in ("head_max", "layer_attr", "delta", "attributions", "attention"):
            torch.testing.assert_close(getattr(r, name), getattr(direct, name)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.top_score, direct.top_k.score[0], equal_nan=True)


def test_gold_targets_follow_their_examples_through_the_length_order(corpus_file, tiny_model_dir):
    from attattr_fast.datasets import read_examples

    model, tokenizer = load_classifier(tiny_model_dir)
    aa = AttentionAttribution(model)
    examples = read_examples(corpus_file)[:12]
    corpus = prepare(aa, tokenizer, examples)
    assert corpus.lengths != sorted(corpus.lengths)  # the engine's order is not the input order
    targets = resolve_targets("gold", corpus, aa)
    assert targets == [model.config.label2id[e.label] for e in examples] and len(set(targets)) == 2
    records = {r.index: r for r in attribute_corpus(aa, corpus, targets, batch_size=5, progress=False, n_steps=3)}
    assert [records[i].target for i in range(12)] == targets
    for i in range(12):
        enc = tokenizer([examples[i].text], return_tensors="pt")
        direct = aa.attribute(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], target=targets[i],
                              n_steps=3, output="reduced")  # fmt: skip
        torch.testing.assert_close(records[i].layer_attr, direct.layer_attr[0], rtol=1e-5, atol=1e-6)


def test_shards_are_length_buckets(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    records = load_results(reference)
    spans = [[len(records[i].tokens) for i in shard["indices"]] for shard in manifest["shards"]]
    assert all(len(s) == SHARD for s in spans) and len(spans) == N_EXAMPLES // SHARD
    flat = [n for s in spans for n in s]
    assert flat == sorted(flat)  # shard p holds the p-th group of SHARD examples by length
    for key in ("model", "method", "n_steps", "dtype", "layers", "output", "version", "input", "store_dtype"):
        assert key in manifest, key
    assert manifest["model"]["sha256"] and manifest["input"]["sha256"] and manifest["method"] == "riemann_right"
    assert all(set(s["sha256"]) == {f"{s['name']}.safetensors", f"{s['name']}.jsonl"} for s in manifest["shards"])


KILLER = textwrap.dedent("""
    # Runs the CLI and SIGKILLs itself at the KILL_AT-th file write of attattr_fast.results (the data already
    # complete under its temporary name when KILL_PHASE is "tmp"), or just slows every engine call by SLOW s.
    import os, signal, sys, time
    import attattr_fast.results as results
    import attattr_fast.api as api

    kill_at, phase = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_PHASE")
    slow = float(os.environ.get("SLOW", "0"))
    import attattr_fast.corpus as corpus
    corpus.MANIFEST_INTERVAL_S = 1e9  # no manifest refresh in the middle: the write count stays predictable
    real_write, calls = results.atomic_write_bytes, [0]

    def write(path, data):
        calls[0] += 1
        if calls[0] == kill_at:
            if phase == "tmp":
                whole = data if isinstance(data, bytes) else b"".join(data)
                path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(whole)
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)

    results.atomic_write_bytes = write
    real_attribute = api.AttentionAttribution.attribute

    def attribute(self, *args, **kwargs):
        time.sleep(slow)
        return real_attribute(self, *args, **kwargs)

    api.AttentionAttribution.attribute = attribute
    from attattr_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start(script: Path, argv, **env) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, str(script), *map(str, argv)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def commits(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*.commit.json"))


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, reference, corpus_file, tiny_model_dir):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    # Writes of a run: settings.json and the manifest, then per shard .safetensors, .jsonl, .commit.json, and the
    # final manifest.
    # 1) Mid-shard: shard 0 finished, shard 1's tensors written, its metadata complete but not yet renamed.
    proc = start(script, argv, KILL_AT=3 + 3 * 1 + 1, KILL_PHASE="tmp")
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read()
    assert commits(out) == ["shard-00000.commit.json"]
    assert (out / "shard-00001.safetensors").exists() and list(out.glob(".shard-00001.jsonl.tmp-*"))
    kept = (out / "shard-00000.safetensors").stat()

    # 2) Resumed, then killed after both data files of its second shard, before that shard's commit.
    proc = start(script, argv, KILL_AT=1 + 3 * 2)
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read()
    assert commits(out) == ["shard-00000.commit.json", "shard-00001.commit.json"]
    assert (out / "shard-00002.jsonl").exists() and not (out / "shard-00002.commit.json").exists()
    assert not list(out.glob(".*.tmp-*"))  # the resume cleared the first run's temporary file

    # 3) Resumed with slowed engine calls; killed from outside once at least 5 shards are present.
    proc = start(script, argv, SLOW=0.3)
    deadline = time.monotonic() + 90
    while len(commits(out)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    present = commits(out)
    assert 5 <= len(present) < N_EXAMPLES // SHARD, present
    written = {name: (out / name.replace(".commit.json", ".safetensors")).stat().st_mtime_ns for name in present}

    # 4) The same command finishes the run, recomputing only what is missing.
    assert run_cli(*argv) == 0
    after = (out / "shard-00000.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    for name, mtime in written.items():
        assert (out / name.replace(".commit.json", ".safetensors")).stat().st_mtime_ns == mtime, name
    assert_each_example_once(out)
    assert_same_records(load_results(out), load_results(reference))


def test_rerun_of_a_finished_run_recomputes_nothing(tmp_path, reference, corpus_file, tiny_model_dir, capsys):
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    capsys.readouterr()
    assert run_cli(*argv, "--batch-size", "2") == 0  # speed settings may change between runs
    assert "nothing to do: all 40 examples were already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before
    assert_same_records(load_results(out), load_results(reference))


@pytest.mark.parametrize("change, message", [
    (["--method", "gausslegendre"], "method: \"riemann_right\" there, \"gausslegendre\" now"),
    (["--steps", "4"], "n_steps: 3 there, 4 now"),
    (["--layers", "0,1"], "layers: [0, 1, 2] there, [0, 1] now"),
    (["--store-dtype", "float16"], "store_dtype"),
    (["--output", "reduced"], "output"),
    (["--shard-size", "5"], "shard_size: 4 there, 5 now"),
    (["--top", "5"], "top_k: 3 there, 5 now"),
    (["--dtype", "bfloat16"], "dtype: \"float32\" there, \"bfloat16\" now"),
    (["--target", "positive"], "targets_sha256: \"predicted\""),
])  # fmt: skip
def test_different_settings_are_refused(tmp_path, reference, corpus_file, tiny_model_dir, capsys, change, message):
    out = tmp_path / "out"
    base = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*base) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run_cli(*base, *change) == 2  # the last --steps / --shard-size given wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds results of a different run" in err and message in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_different_model_or_input_is_refused(tmp_path, reference, corpus_file, tiny_model_dir, capsys):
    from conftest import save_tiny_classifier

    other_model = tmp_path / "other"
    save_tiny_classifier(other_model)
    model, _ = load_classifier(other_model)
    with torch.no_grad():
        model.classifier.bias.add_(0.5)  # same config and path layout, different weights
    model.save_pretrained(other_model)
    out = tmp_path / "out"
    base = ["attribute", "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*base, "--input", corpus_file) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run_cli("attribute", "--model", other_model, "--out", out, *FAST, "--input", corpus_file) == 2
    err = capsys.readouterr().err
    assert "different run (model:" in err and "weights sha256" in err and err.count("\n") == 1, err
    edited = write_corpus(tmp_path / "reviews.tsv", seed=1)
    assert run_cli(*base, "--input", edited) == 2
    err = capsys.readouterr().err
    assert "different run (input:" in err and str(edited) in err, err
    # same weights, another config: the label names swapped (and the activation, which changes every score)
    relabelled = tmp_path / "relabelled"
    model, tokenizer = load_classifier(tiny_model_dir)
    model.config.id2label = {0: model.config.id2label[1], 1: model.config.id2label[0]}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.config.hidden_act = "relu"
    model.save_pretrained(relabelled)
    tokenizer.save_pretrained(relabelled)
    assert run_cli("attribute", "--model", relabelled, "--out", out, *FAST, "--input", corpus_file) == 2
    err = capsys.readouterr().err
    assert "different run (model:" in err and "config sha256" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_other_targets_is_refused(tmp_path, prepared):
    aa, corpus, _ = prepared
    n = len(corpus.examples)
    run_library(aa, corpus, [0] * n, tmp_path / "out")
    with pytest.raises(AttAttrError, match="targets_sha256"):
        run_library(aa, corpus, [1] * n, tmp_path / "out")


@pytest.mark.parametrize("settings", [False, True])
def test_directory_of_a_run_killed_in_its_first_manifest_write_starts_afresh(tmp_path, reference, prepared, settings):
    aa, corpus, targets = prepared
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").touch()
    if settings:  # killed after writing settings.json, which comes first: another run's settings are no matter
        (out / "settings.json").write_text('{"format": "attattr-fast-results", "n_steps": 99}')
    (out / ".manifest.json.tmp-4242").write_bytes(b'{"format": "attattr-')
    run_library(aa, corpus, targets, out)
    assert not list(out.glob(".*.tmp-*"))
    assert json.loads((out / "settings.json").read_text())["n_steps"] == json.loads(
        (out / "manifest.json").read_text())["n_steps"]
    assert_same_records(load_results(out), load_results(reference))


def test_damaged_shards_are_named_and_repaired(tmp_path, reference, corpus_file, tiny_model_dir, capsys):
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*argv) == 0
    data = bytearray((out / "shard-00003.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor value: same size, wrong sha256
    (out / "shard-00003.safetensors").write_bytes(bytes(data))
    (out / "shard-00007.jsonl").unlink()
    records = load_results(out)
    position = json.loads((out / "manifest.json").read_text())["shards"][3]["indices"][0]
    with pytest.raises(AttAttrError, match="shard shard-00003 .* does not match its sha256.*--repair"):
        records[position]
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 damaged shard(s)" in err and "--repair" in err, err
    assert "shard-00003: shard-00003.safetensors does not match its sha256" in err
    assert "shard-00007: shard-00007.jsonl is missing" in err
    untouched = (out / "shard-00005.safetensors").stat().st_mtime_ns
    assert run_cli(*argv, "--repair") == 0
    assert (out / "shard-00005.safetensors").stat().st_mtime_ns == untouched
    assert_each_example_once(out)
    assert_same_records(load_results(out), load_results(reference))


def _edit_indices(commit):
    entry = json.loads(commit.read_text())
    commit.write_text(json.dumps({**entry, "indices": [N_EXAMPLES + 5, *entry["indices"][1:]]}))


@pytest.mark.parametrize("shard, damage, message", [
    ("shard-00002", lambda commit: commit.unlink(), "shard-00002: shard-00002.commit.json is missing"),
    ("shard-00001", _edit_indices, "shard-00001: shard-00001.commit.json lists other examples than this run plans"),
])  # fmt: skip
def test_a_missing_or_edited_commit_is_damage_that_repair_recomputes(tmp_path, reference, corpus_file,
                                                                      tiny_model_dir, capsys, shard, damage, message):
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*argv) == 0
    damage(out / f"{shard}.commit.json")
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and "--repair" in err, err
    assert run_cli(*argv, "--repair") == 0
    assert_each_example_once(out)
    assert_same_records(load_results(out), load_results(reference))


def test_a_manifest_cut_short_is_rebuilt_by_repair_without_recomputing(tmp_path, reference, corpus_file,
                                                                      tiny_model_dir, capsys):
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*argv) == 0
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:300])
    capsys.readouterr()
    assert run_cli("graph", "--results", out, "--index", "0", "--out", tmp_path / "g.json") == 2
    assert "manifest.json is corrupt (not valid JSON); rerun the attribute command that wrote it, with --repair" in \
        capsys.readouterr().err
    assert run_cli(*argv) == 2
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert run_cli(*argv, "--repair") == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == untouched
    assert_each_example_once(out)
    assert_same_records(load_results(out), load_results(reference))


def test_store_float16_halves_the_wide_tensors(tmp_path, reference, corpus_file, tiny_model_dir):
    out = tmp_path / "out"
    assert run_cli("attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST,
                   "--store-dtype", "float16") == 0  # fmt: skip
    half = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    full = sum(p.stat().st_size for p in reference.glob("*.safetensors"))
    assert 0.45 * full < half < 0.6 * full, (half, full)
    for a, b in zip(load_results(out), load_results(reference)):
        assert a.attributions.dtype == torch.float32
        for name in ("attributions", "attention", "layer_attr"):
            got, want = getattr(a, name), getattr(b, name)  # float16 scaled by a power of two: 11 bits each
            assert ((got - want).abs() <= want.abs() * 2**-11 + want.abs().max() * 2**-24).all(), (a.index, name)
        torch.testing.assert_close(a.head_max, b.head_max, rtol=0, atol=0)  # small tensors stay float32


def test_reduced_output_keeps_layer_sums_and_top_k(tmp_path, reference, corpus_file, tiny_model_dir):
    out = tmp_path / "out"
    assert run_cli("attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST,
                   "--output", "reduced") == 0  # fmt: skip
    for a, b in zip(load_results(out), load_results(reference)):
        assert a.attributions is None and a.attention is None
        torch.testing.assert_close(a.layer_attr, b.layer_attr, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.top_query, b.top_query) and torch.equal(a.top_key, b.top_key)


@pytest.fixture
def prepared(tiny_model_dir, corpus_file):
    model, tokenizer = load_classifier(tiny_model_dir)
    aa = AttentionAttribution(model)
    from attattr_fast.datasets import read_examples

    corpus = prepare(aa, tokenizer, read_examples(corpus_file))
    return aa, corpus, resolve_targets("predicted", corpus, aa)


def run_library(aa, corpus, targets, out, **kwargs):
    meta = {"model": {"name": "tiny", "sha256": "x"}, "input": {"sha256": "y", "n_examples": len(corpus.examples)}}
    return run_corpus(aa, corpus, targets, out, meta, shard_size=SHARD, top_k=3, progress=False, n_steps=3, **kwargs)


def test_corpus_runs_take_dtype_names_like_attribute(prepared):
    aa, corpus, targets = prepared
    named = list(attribute_corpus(aa, corpus, targets, n_steps=2, dtype="bfloat16", output="reduced", progress=False))
    typed = list(attribute_corpus(aa, corpus, targets, n_steps=2, dtype=torch.bfloat16, output="reduced",
                                  progress=False))  # fmt: skip
    assert len(named) == len(corpus.examples)
    assert all(torch.equal(a.layer_attr, b.layer_attr) for a, b in zip(named, typed))


def test_out_of_memory_halves_the_chunk_and_loses_nothing(tmp_path, reference, prepared, monkeypatch, caplog):
    aa, corpus, targets = prepared
    real, calls = engine.attribute_group, []

    def attribute_group(*args):
        call = inspect.signature(real).bind(*args).arguments
        rows, examples = call["rows_per_chunk"], call["input_ids"].shape[0]
        calls.append(min(rows, examples * len(call["layers"]) * len(call["alphas"])))  # rows run at once
        if len(calls) in (3, 4):  # the third call fails, and its retry with half the rows once more
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected, {rows} rows)")
        return real(*args)

    monkeypatch.setattr(engine, "attribute_group", attribute_group)
    stats = run_library(aa, corpus, targets, tmp_path / "out")
    # Each retry runs at most half the rows of the call that failed (not half of a larger planner figure,
    # which would repeat the same work when the batch was short).
    assert calls[3] <= calls[2] // 2 and calls[4] <= calls[3] // 2, calls
    assert stats.oom_retries == 2 and stats.examples == N_EXAMPLES
    assert "out of memory with" in caplog.text
    assert_each_example_once(tmp_path / "out")
    assert_same_records(load_results(tmp_path / "out"), load_results(reference), exact=False)


def test_out_of_memory_halves_the_failing_group_not_the_call(prepared, monkeypatch):
    # One engine call can run several groups (split by length); the retry halves the group that failed.
    aa, _, _ = prepared
    planner = ChunkPlanner(aa, [0, 1, 2], 3, full=False, budget=1 << 30)
    rows = planner.rows(30)
    assert rows > 4 * 18  # the call could hold far more than the failing group's 18 rows
    real, seen = engine.attribute_group, []

    def attribute_group(*args):
        call = inspect.signature(real).bind(*args).arguments
        seen.append(call["input_ids"].shape)
        if call["input_ids"].shape[1] == 30:  # the group of the two long examples runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(engine, "attribute_group", attribute_group)
    monkeypatch.setitem(engine.GROUP_OVERHEAD_TOKENS, "cpu", 0)  # no padding is worth it: the two lengths split
    ids = torch.full((8, 30), 5)
    mask = (torch.arange(30) < torch.tensor([10] * 6 + [30] * 2).unsqueeze(1)).long()
    with pytest.raises(torch.OutOfMemoryError) as failure:
        aa.attribute(ids, mask, layers=[0, 1, 2], n_steps=3, internal_batch_size=rows)
    assert [tuple(shape) for shape in seen] == [(6, 10), (2, 30)]
    assert failure.value.rows_in_chunk == 2 * 9
    assert planner.shrink(30, 8, failure.value.rows_in_chunk)
    assert planner.rows(30) <= 9


def test_out_of_memory_at_one_row_is_an_error(tmp_path, prepared, monkeypatch):
    aa, corpus, targets = prepared

    def attribute_group(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine, "attribute_group", attribute_group)
    with pytest.raises(AttAttrError, match="out of memory on example .* even with one row per chunk"):
        run_library(aa, corpus, targets, tmp_path / "out")
    assert not list((tmp_path / "out").glob("shard-*"))  # nothing half-written


def test_a_failed_background_write_stops_the_run_and_a_rerun_completes_it(tmp_path, reference, prepared, monkeypatch):
    """Shards are written while the next one computes: a write's error is the run's error, the shards written
    before it stay, and a rerun resumes to the uninterrupted result."""
    aa, corpus, targets = prepared
    real, calls = results.write_shard, []

    def write_shard(directory, name, *args):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (injected)")
        return real(directory, name, *args)

    monkeypatch.setattr(results, "write_shard", write_shard)
    with pytest.raises(OSError, match="No space left"):
        run_library(aa, corpus, targets, tmp_path / "out")
    # every shard computed by then is written but the failed one (the next one was already queued)
    assert commits(tmp_path / "out") == [f"{name}.commit.json" for name in sorted(calls[:2] + calls[3:])]
    monkeypatch.setattr(results, "write_shard", real)
    run_library(aa, corpus, targets, tmp_path / "out")
    assert_same_records(load_results(tmp_path / "out"), load_results(reference))


def test_a_shard_computed_before_an_engine_error_is_still_written(tmp_path, prepared, monkeypatch):
    aa, corpus, targets = prepared
    real, calls = aa.attribute, []

    def attribute(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("engine failed (injected)")
        return real(*args, **kwargs)

    write_shard = results.write_shard

    def slow_write_shard(*args):
        time.sleep(0.5)  # still writing when the engine fails
        return write_shard(*args)

    monkeypatch.setattr(aa, "attribute", attribute)
    monkeypatch.setattr(results, "write_shard", slow_write_shard)
    with pytest.raises(RuntimeError, match="injected"):
        run_library(aa, corpus, targets, tmp_path / "out", batch_size=SHARD)
    assert len(commits(tmp_path / "out")) == 2  # the second was pending when the third call failed


def test_an_interrupt_while_waiting_for_a_write_still_writes_the_shard_just_computed(tmp_path, prepared,
                                                                                     monkeypatch):
    from attattr_fast import corpus as corpus_module

    aa, corpus, targets = prepared
    wait = corpus_module.BackgroundWrites._wait

    def interrupted_wait(self, pending):
        if pending is not None:  # the first wait: for shard 0, with shard 1 computed
            raise KeyboardInterrupt
        return wait(self, pending)

    monkeypatch.setattr(corpus_module.BackgroundWrites, "_wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        run_library(aa, corpus, targets, tmp_path / "out", batch_size=SHARD)
    assert commits(tmp_path / "out") == ["shard-00000.commit.json", "shard-00001.commit.json"]
    monkeypatch.setattr(corpus_module.BackgroundWrites, "_wait", wait)
    assert run_library(aa, corpus, targets, tmp_path / "out").skipped == 2 * SHARD  # the lock was released


def test_the_summary_says_how_long_the_run_waited_for_shard_writes(tmp_path, prepared, monkeypatch):
    aa, corpus, targets = prepared
    write_shard = results.write_shard

    def slow_write_shard(*args):
        time.sleep(0.2)  # a slow disk: 10 shards, each slower to write than to compute
        return write_shard(*args)

    monkeypatch.setattr(results, "write_shard", slow_write_shard)
    stats = run_library(aa, corpus, targets, tmp_path / "out")
    assert 0.2 <= stats.write_wait_seconds <= stats.seconds
    assert f"; {stats.write_wait_seconds:.1f} s waiting for shard writes" in stats.summary()


def test_calls_are_sized_from_the_memory_budget(tmp_path, reference, prepared, monkeypatch):
    aa, corpus, targets = prepared
    budget = 3 << 20
    planner = ChunkPlanner(aa, [0, 1, 2], 3, full=True, budget=budget)
    for n in (5, 20, 60):
        rows = engine.default_rows_per_chunk(aa.adapter, n, [0, 1, 2], 3, torch.float32, aa.adapter.device,
                                             budget=budget)
        assert planner.rows(n) == rows and planner.examples(n) == max(1, rows // 9)
    assert planner.examples(5) >= planner.examples(60)
    real, seen = aa.attribute, []

    def attribute(input_ids, *args, **kwargs):
        seen.append((input_ids.shape, kwargs["internal_batch_size"]))
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(aa, "attribute", attribute)
    run_library(aa, corpus, targets, tmp_path / "out", memory_budget=budget)
    for (examples, n), rows in seen:
        assert rows == planner.rows(n) and examples <= max(1, rows // 9)
    assert max(examples for (examples, _), _ in seen) > 1  # short examples share a call
    assert_same_records(load_results(tmp_path / "out"), load_results(reference), exact=False)


def test_plan_shards():
    lengths = [5, 3, 9, 3, 7, 1, 8]
    assert plan_shards(lengths, 3) == [[5, 1, 3], [0, 4, 6], [2]]
    assert plan_shards(lengths, 10, bytes_per_example=lambda n: n, max_shard_bytes=10) == [[5, 1, 3], [0], [4], [6],
                                                                                            [2]]  # fmt: skip
    with pytest.raises(AttAttrError):
        plan_shards(lengths, 0)


def test_progress_bar_and_summary(tmp_path, corpus_file, tiny_model_dir, capsys):
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, "--steps", "3",
            "--shard-size", "4", "--quiet"]  # fmt: skip
    assert run_cli(*argv) == 0
    err = capsys.readouterr().err
    assert "attributing: 100%" in err and "ex/s" in err and "<00:00" in err  # tqdm: rate and ETA
    assert "attributed 40 examples (" in err and "examples/s" in err and "10 shards written" in err


@pytest.mark.parametrize("args, message", [
    (["--shard-size", "0"], "--shard-size must be a positive integer"),
    (["--memory-budget", "lots"], "--memory-budget: cannot parse 'lots'"),
    (["--memory-budget", "0GiB"], "--memory-budget 0GiB is less than 1MiB"),
    (["--memory-budget", "1"], "--memory-budget 1 is less than 1MiB"),
    (["--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["--repair"], None),
])  # fmt: skip
def test_bad_corpus_options(tmp_path, corpus_file, tiny_model_dir, capsys, args, message):
    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, *args]
    if message is None:
        message = "--repair needs --out"
    else:
        argv += ["--out", out]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_out_that_is_not_a_results_directory(tmp_path, corpus_file, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST) == 2
    assert "has no manifest.json: not a results directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_directory_in_use_is_refused(tmp_path, reference, corpus_file, tiny_model_dir, capsys):
    from attattr_fast.results import DirectoryLock

    out = tmp_path / "out"
    argv = ["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST]
    assert run_cli(*argv) == 0
    lock = DirectoryLock(out)  # another run holding the directory
    try:
        capsys.readouterr()
        assert run_cli(*argv) == 2
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        lock.release()
    assert run_cli(*argv) == 0


def test_a_prepared_corpus_holds_real_tokens_only_and_pads_each_batch_like_the_tokenizer(tiny_model_dir, monkeypatch):
    import hashlib

    from transformers import AutoTokenizer

    import attattr_fast.corpus as corpus_module
    from attattr_fast.text import encode, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["good", "a much longer text than the others", "bad film", "fine"]
    pairs = [None, None, "with a pair", None]
    tokenized = tokenize(tokenizer, texts, pairs)
    assert tokenized.tokens[0][0] is tokenized.tokens[3][0]  # interned: one string per distinct token
    singles = [len(tokenizer(t, p)["input_ids"]) for t, p in zip(texts, pairs)]
    assert tokenized.ids.dtype == torch.int32 and tokenized.lengths == singles and tokenized.ids.numel() == sum(singles)
    ids, mask, types = tokenized.padded([1, 0, 3])  # no pair: the tokenizer's own padding
    expected = tokenizer([texts[i] for i in (1, 0, 3)], padding=True, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert torch.equal(types, expected["token_type_ids"])
    ids, mask, types = tokenized.padded([0, 2], n=12)  # with a pair, padded further than its longest
    alone = tokenizer(texts[2], pairs[2])
    m = len(alone["input_ids"])
    assert ids[1, :m].tolist() == alone["input_ids"] and types[1, :m].tolist() == alone["token_type_ids"]
    assert mask[1].tolist() == [1] * m + [0] * (12 - m) and (ids[1, m:] == tokenizer.pad_token_id).all()
    padded = encode(tokenizer, texts, pairs)
    assert torch.equal(padded.input_ids, tokenized.padded(range(4))[0]) and padded.tokens == tokenized.tokens
    # the fingerprint results directories record: the padded int64 tensors' digest, whatever the chunking
    digest = hashlib.sha256()
    for tensor in (padded.input_ids, padded.attention_mask, padded.token_type_ids):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy())
    for entries in (corpus_module.FINGERPRINT_ENTRIES, 20):  # one chunk, and chunks of 2 examples
        monkeypatch.setattr(corpus_module, "FINGERPRINT_ENTRIES", entries)
        assert corpus_module.encoded_fingerprint(tokenized) == digest.hexdigest()


def test_batched_tokenizing_equals_one_tokenizer_call_per_example(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    import attattr_fast.text as text_module

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["good", "bad", "film", "the", "plot", "fine"]
    texts = [" ".join(words[(i + k) % 6] for k in range(1 + 3 * i)) for i in range(7)]
    pairs = [None, "a pair", None, None, "another much longer pair of words", None, "fine"]
    monkeypatch.setattr(text_module, "TOKENIZE_BATCH", 3)  # batches mixing singles and pairs, a short last one
    tokenized = text_module.tokenize(tokenizer, texts, pairs, max_length=12)
    for i, (text, pair) in enumerate(zip(texts, pairs)):
        alone = tokenizer(text, pair, truncation=True, max_length=12)
        assert tokenized.example(i) == (alone["input_ids"], alone["token_type_ids"])
        assert tokenized.tokens[i] == tokenizer.convert_ids_to_tokens(alone["input_ids"])
        assert tokenized.truncated[i] == (len(tokenizer(text, pair)["input_ids"]) > 12)
    assert any(tokenized.truncated) and not all(tokenized.truncated)
    # the first bad example is named, whatever its kind and whatever follows it in its batch
    with pytest.raises(AttAttrError, match="example 1: the text has no tokens"):
        text_module.tokenize(tokenizer, ["good", "\u200b", "fine", ""], max_length=12)
    kept = [0, 1, 2, 4]  # the first one too long is the second batch's first
    with pytest.raises(AttAttrError, match="example 3: 22 tokens, more than the model's 12"):
        text_module.tokenize(tokenizer, [texts[i] for i in kept], [pairs[i] for i in kept], 12, truncate=False)
