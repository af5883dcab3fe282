"""The results format: shards, commits, manifest, the lazy reader, and the checks a resume relies on."""

import json
import logging
import random

import numpy as np
import pytest
import torch

from attattr_fast import load_results
from attattr_fast.errors import AttAttrError
from attattr_fast.results import (
    COMMIT_SUFFIX,
    Record,
    Results,
    ResultsWriter,
    open_run_directory,
    read_manifest,
    shard_name,
    write_shard,
)


def make_record(index: int, n: int, full: bool = True, layers=(0, 2), heads: int = 3, k: int = 2) -> Record:
    g = torch.Generator().manual_seed(index)
    L = len(layers)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return Record(
        index=index, tokens=[f"t{index}_{i}" for i in range(n)], text=f"text {index} ü", text_pair=None,
        label=random.Random(index).choice(["negative", "positive", None]), target=index % 2,
        target_label=["negative", "positive"][index % 2], prob=float(torch.rand(1, generator=g)), layers=list(layers),
        head_max=rand(L, heads), head_argmax=torch.randint(0, n, (L, heads, 2), generator=g), layer_attr=rand(L, n, n),
        delta=rand(L), attributions=rand(L, heads, n, n) if full else None, attention=rand(L, heads, n, n) if full
        else None, top_query=torch.randint(-1, n, (L, k), generator=g), top_key=torch.randint(-1, n, (L, k),
        generator=g), top_score=rand(L, k),
    )  # fmt: skip


def within_float16(got, want) -> bool:
    """What float16 with a power-of-two scale keeps: 11 significant bits of every value not far below the max."""
    bound = want.abs() * 2**-11 + want.abs().max() * 2**-24
    return bool(((got - want).abs() <= bound).all())


def assert_record_equal(a: Record, b: Record, wide=torch.equal):
    for name in ("index", "tokens", "text", "text_pair", "label", "target", "target_label", "prob", "layers"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("head_max", "head_argmax", "delta", "top_query", "top_key", "top_score"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("layer_attr", "attributions", "attention"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == torch.float32 and wide(x, y), name


META = {"model": {"name": "m", "sha256": "aa"}, "input": {"sha256": "bb", "n_examples": 10}, "method": "riemann_right",
        "n_steps": 3, "layers": [0, 2], "output": "full"}  # fmt: skip


def test_writer_round_trip_in_input_order(tmp_path):
    records = [make_record(i, n=2 + (7 * i) % 9) for i in range(10)]
    writer = ResultsWriter(tmp_path / "res", META, shard_size=3)
    for r in sorted(records, key=lambda r: len(r.tokens)):  # written by length, as a corpus run does
        writer.add(r)
    writer.close()
    res = load_results(tmp_path / "res")
    assert len(res) == 10 and res.complete and res.indices == list(range(10))
    for got, want in zip(res, records):
        assert_record_equal(got, want)
    assert_record_equal(res[-1], records[-1])
    assert [r.index for r in res[2:5]] == [2, 3, 4]
    with pytest.raises(IndexError):
        res[10]
    manifest = read_manifest(tmp_path / "res")
    assert manifest["n_shards"] == 4 and manifest["n_done"] == 10 and manifest["method"] == "riemann_right"


def test_float16_store_and_reduced_records(tmp_path):
    records = [make_record(i, n=16, full=i % 2 == 0) for i in range(4)]
    tiny = records[2]  # attributions of a confident prediction: far below float16's smallest normal (6e-5)
    tiny.attributions, tiny.layer_attr = tiny.attributions * 1e-7, tiny.layer_attr * 3e-9
    assert not within_float16(tiny.attributions.half().float(), tiny.attributions)  # a plain cast loses them
    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16")):
        writer = ResultsWriter(tmp_path / name, META, store_dtype=dtype)
        for r in records:
            writer.add(r)
        writer.close()
    f32, f16 = load_results(tmp_path / "f32"), load_results(tmp_path / "f16")
    for a, b, want in zip(f32, f16, records):
        assert_record_equal(a, want)
        assert_record_equal(b, want, wide=within_float16)
    assert f16[1].attributions is None and f16[1].attention is None and f16[1].layer_attr is not None
    size = {n: (tmp_path / n / "shard-00000.safetensors").stat().st_size for n in ("f32", "f16")}
    assert size["f16"] < 0.6 * size["f32"]


def test_float16_store_keeps_values_near_float32s_smallest():
    """The scale 2**shift exceeds float32's range below about 1e-34; the values must stay finite and exact to
    float16's 11 bits (a vanished gradient of a very confident classifier)."""
    from attattr_fast.results import decode_wide, encode_wide

    for largest in (1e-3, 1e-34, 1e-36, 1e-40):
        value = torch.tensor([largest, 0.0, -largest / 3])
        stored, shift = encode_wide(value, torch.float16)
        back = decode_wide(stored, shift)
        assert torch.isfinite(back).all() and back[1] == 0, (largest, back)
        assert ((back - value).abs() <= 2**-11 * largest).all(), (largest, back)


def test_float16_store_scales_exactly_like_float64_arithmetic():
    """Scaling in float32 (in two steps where 2**shift is outside its range) rounds like the exact product."""
    from attattr_fast.results import decode_wide, encode_wide

    generator = torch.Generator().manual_seed(0)
    for exponent in (-149, -140, -126, -60, 0, 14, 15, 60, 126, 127):
        value = torch.randn(2000, generator=generator).clamp(-1.9, 1.9)
        value = value * torch.exp2(torch.randint(-40, 1, (2000,), generator=generator).float()) * 2.0**exponent
        stored, shift = encode_wide(value, torch.float16)
        exact = torch.ldexp(value.double(), torch.tensor(float(shift), dtype=torch.float64)).to(torch.float16)
        assert torch.equal(stored.view(torch.int16), exact.view(torch.int16)), exponent
        back = torch.ldexp(stored.double(), torch.tensor(float(-shift), dtype=torch.float64)).float()
        assert torch.equal(decode_wide(stored, shift).view(torch.int32), back.view(torch.int32)), exponent


def test_reader_is_lazy_and_checks_only_the_shards_it_touches(tmp_path, monkeypatch):
    records = [make_record(i, n=4) for i in range(12)]
    writer = ResultsWriter(tmp_path / "res", META, shard_size=2)
    for r in records:
        writer.add(r)
    writer.close()
    damaged = tmp_path / "res" / "shard-00004.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(Results, "OPEN_SHARDS", 2)
    res = load_results(tmp_path / "res")
    assert not res._open  # nothing read yet
    assert_record_equal(res[1], records[1])
    assert list(res._open) == [0]
    for i in (2, 4, 6, 0):
        assert_record_equal(res[i], records[i])
    assert len(res._open) == 2  # the least recently used shards were closed
    with pytest.raises(AttAttrError, match=r"shard shard-00004 of .* is damaged \(shard-00004.safetensors does not "
                                           r"match its sha256\); rerun .* --repair"):  # fmt: skip
        res[8]
    assert load_results(tmp_path / "res", verify=False)[8].index == 8  # the damage is in a tensor value


def test_writer_takes_any_distinct_indices(tmp_path):
    records = [make_record(i, n=3) for i in (30, 10, 20, 5)]
    writer = ResultsWriter(tmp_path / "res", META, shard_size=3)
    for r in records:
        writer.add(r)
    writer.close()
    res = load_results(tmp_path / "res")
    assert res.complete and res.indices == [5, 10, 20, 30] and [r.index for r in res] == [5, 10, 20, 30]


def test_commit_lists_offsets_sizes_and_checksums(tmp_path):
    import hashlib

    records = [make_record(i, n=3 + i) for i in (5, 2, 9)]
    commit = write_shard(tmp_path, "shard-00000", records, rank=1)
    assert json.loads((tmp_path / f"shard-00000{COMMIT_SUFFIX}").read_text()) == commit
    assert commit["indices"] == [5, 2, 9] and commit["rank"] == 1 and commit["n"] == 3
    lines = (tmp_path / "shard-00000.jsonl").read_bytes()
    for offset, r in zip(commit["offsets"], records):
        assert json.loads(lines[offset:].split(b"\n", 1)[0])["index"] == r.index
    for fname, digest in commit["sha256"].items():
        data = (tmp_path / fname).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and len(data) == commit["bytes"][fname]


PLAN = [[0, 1], [2, 3], [4]]


def test_open_run_directory_new_resume_and_refusals(tmp_path):
    out = tmp_path / "res"
    commits, lock = open_run_directory(out, META, PLAN)
    assert commits == {} and read_manifest(out)["complete"] is False
    with pytest.raises(AttAttrError, match="in use by another run"):
        open_run_directory(out, META, PLAN)
    write_shard(out, "shard-00001", [make_record(i, 4) for i in PLAN[1]])
    lock.release()
    # a killed run's leftovers: a temporary file and the data of a shard without a commit
    (out / ".shard-00000.jsonl.tmp-123").write_bytes(b"partial")
    write_shard(out, "shard-00002", [make_record(4, 4)])
    (out / f"shard-00002{COMMIT_SUFFIX}").unlink()
    commits, lock = open_run_directory(out, META, PLAN)
    lock.release()
    assert sorted(commits) == ["shard-00001"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "settings.json",
                                                     "shard-00001.commit.json", "shard-00001.jsonl",
                                                     "shard-00001.safetensors"]  # fmt: skip
    other = {**META, "n_steps": 20, "model": {"name": "m2", "sha256": "cc"}}
    with pytest.raises(AttAttrError) as err:
        open_run_directory(out, other, PLAN)
    assert str(err.value).count("\n") == 0
    assert "model: m (weights sha256 aa) there, m2 (weights sha256 cc) now; n_steps: 3 there, 20 now" in str(err.value)
    # the settings match, so a commit listing other examples than the plan is damaged, which --repair recomputes
    with pytest.raises(AttAttrError, match=r"shard-00001: shard-00001.commit.json lists other examples than this "
                                           r"run plans for the shard\); rerun the same command with --repair"):
        open_run_directory(out, META, [[0, 1], [3, 2], [4]])


def test_damaged_shard_refused_then_repaired(tmp_path, caplog):
    out = tmp_path / "res"
    _, lock = open_run_directory(out, META, PLAN)
    for p, indices in enumerate(PLAN):
        write_shard(out, shard_name(p), [make_record(i, 4) for i in indices])
    lock.release()
    (out / "shard-00000.jsonl").write_text("{}\n")
    with pytest.raises(AttAttrError, match=r"1 damaged shard\(s\) \(shard-00000: shard-00000.jsonl has 3 bytes, "
                                           r"its commit says \d+\); rerun the same command with --repair"):  # fmt: skip
        open_run_directory(out, META, PLAN)
    assert (out / "shard-00000.safetensors").exists()  # refusing changes nothing
    with caplog.at_level(logging.WARNING):
        commits, lock = open_run_directory(out, META, PLAN, repair=True)
    lock.release()
    assert sorted(commits) == ["shard-00001", "shard-00002"] and "recomputing shard-00000" in caplog.text
    assert not list(out.glob("shard-00000*"))


def test_incomplete_directory_reads_what_is_there(tmp_path, caplog):
    out = tmp_path / "res"
    _, lock = open_run_directory(out, META, PLAN)
    commit = write_shard(out, "shard-00001", [make_record(i, 4) for i in PLAN[1]])
    from attattr_fast.results import write_manifest

    write_manifest(out, META, PLAN, {"shard-00001": commit}, complete=False)
    lock.release()
    with caplog.at_level(logging.WARNING):
        res = load_results(out)
    assert "incomplete run, 2 of 5 examples present" in caplog.text
    assert not res.complete and [r.index for r in res] == [2, 3]
    # a shard finished after the manifest's last refresh (a run refreshes it every few seconds) is read too
    write_shard(out, "shard-00000", [make_record(i, 4) for i in PLAN[0]])
    res = load_results(out)
    assert not res.complete and [r.index for r in res] == [*PLAN[0], 2, 3] and res[0].index == PLAN[0][0]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "results directory not found"),
    (lambda d: d.mkdir(), "is not a results directory (no manifest.json)"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text("{not json")), "is corrupt (not valid JSON)"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"a": 1}')), "is not an attattr-fast manifest"),
])  # fmt: skip
def test_load_results_errors(tmp_path, setup, message):
    setup(tmp_path / "res")
    with pytest.raises(AttAttrError) as err:
        load_results(tmp_path / "res")
    assert message in str(err.value)


def test_failed_write_leaves_no_temporary_file_and_names_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from attattr_fast.results import atomic_write_bytes

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    target = tmp_path / "report.json"
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"{}")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def _finished(out):
    _, lock = open_run_directory(out, META, PLAN)
    commits = {shard_name(p): write_shard(out, shard_name(p), [make_record(i, 4) for i in indices])
               for p, indices in enumerate(PLAN)}  # fmt: skip
    from attattr_fast.results import write_manifest

    write_manifest(out, META, PLAN, commits, complete=True)
    lock.release()
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("edit", [
    lambda m: m["shards"][0].pop("indices"),
    lambda m: m.update(shards={"a": 1}),
    lambda m: m["shards"][1].update(offsets=[0]),
    lambda m: m["shards"][2]["sha256"].pop("shard-00002.jsonl"),
    # wrong types and ranges: a traceback before, or a seek past the end
    lambda m: m["shards"][1].update(offsets=[0, 10**30]),  # past the end of the .jsonl file
    lambda m: m["shards"][1].update(offsets=[-1, 3]),
    lambda m: m["shards"][1].update(offsets=[5, 5]),  # two records on one line
    lambda m: m["shards"][1].update(indices=[2, -3]),
    lambda m: m["shards"][1].update(n="2"),
    lambda m: m["shards"][1]["bytes"].update({"shard-00001.jsonl": "many"}),
    lambda m: m["shards"][1]["sha256"].update({"shard-00001.jsonl": 7}),
    lambda m: m["shards"][1].update(name="../shard-00001"),
])  # fmt: skip
def test_malformed_shard_list_is_a_clear_error(tmp_path, edit):
    out = tmp_path / "res"
    manifest = _finished(out)
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for read in (load_results, lambda d: open_run_directory(d, META, PLAN)):
        with pytest.raises(AttAttrError, match=r"corrupt \(its list of shards is malformed\); rerun the attribute "
                                               r"command that wrote it, with --repair"):  # fmt: skip
            read(out)


@pytest.mark.parametrize("line", [b"{not json\n", b'{"index": 0, "extra": 1}\n'])
def test_unverified_read_of_a_damaged_line_is_a_clear_error(tmp_path, line):
    out = tmp_path / "res"
    _finished(out)
    jsonl = out / "shard-00000.jsonl"
    jsonl.write_bytes(line + jsonl.read_bytes()[len(line):])
    res = load_results(out, verify=False)
    with pytest.raises(AttAttrError, match="shard-00000 .* is damaged"):
        res[0]
    assert load_results(out)[2].index == 2  # the other shards still read


def test_resume_by_another_version_is_refused(tmp_path):
    out = tmp_path / "res"
    manifest = _finished(out)
    manifest["version"] = "0.0.9"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AttAttrError, match=r"version: \"0.0.9\" there"):
        open_run_directory(out, META, PLAN)


def test_a_commit_missing_a_field_is_damage_that_repair_recomputes(tmp_path):
    out = tmp_path / "res"
    _finished(out)
    commit = out / f"shard-00001{COMMIT_SUFFIX}"
    commit.write_text(json.dumps({k: v for k, v in json.loads(commit.read_text()).items() if k != "sha256"}))
    with pytest.raises(AttAttrError, match=r"shard-00001: shard-00001.commit.json is unreadable"):
        open_run_directory(out, META, PLAN)
    commits, lock = open_run_directory(out, META, PLAN, repair=True)
    lock.release()
    assert sorted(commits) == ["shard-00000", "shard-00002"]


@pytest.mark.parametrize("key, value", [("model", {"name": "m", "sha256": "aa", "config_sha256": 5}),
                                        ("input", {"sha256": "bb", "n_examples": 10, "encoded_sha256": 7})])
def test_a_setting_of_the_wrong_type_is_named_in_the_refusal(tmp_path, key, value):
    out = tmp_path / "res"
    manifest = _finished(out)
    manifest[key] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    number = value.get("config_sha256", value.get("encoded_sha256"))
    with pytest.raises(AttAttrError, match=f"holds results of a different run \\({key}: .*sha256 {number}[,)]"):
        open_run_directory(out, META, PLAN)


def test_a_commit_for_a_shard_the_run_does_not_have_is_damage_that_repair_removes(tmp_path):
    out = tmp_path / "res"
    _finished(out)
    write_shard(out, "shard-00009", [make_record(4, 4)])  # intact, but not of this run's plan
    with pytest.raises(AttAttrError, match="shard-00009.commit.json is for a shard this run does not have"):
        open_run_directory(out, META, PLAN)
    commits, lock = open_run_directory(out, META, PLAN, repair=True)
    lock.release()
    assert sorted(commits) == ["shard-00000", "shard-00001", "shard-00002"]
    assert not list(out.glob("shard-00009*"))


def test_an_incomplete_run_reads_the_manifests_entry_over_a_damaged_commit_and_names_a_bad_commit(tmp_path,
                                                                                                  caplog):
    out = tmp_path / "res"
    _, lock = open_run_directory(out, META, PLAN)
    from attattr_fast.results import write_manifest

    first = write_shard(out, "shard-00000", [make_record(i, 4) for i in PLAN[0]])
    write_manifest(out, META, PLAN, {"shard-00000": first}, complete=False)
    lock.release()
    path = out / f"shard-00000{COMMIT_SUFFIX}"
    path.write_text(json.dumps({**first, "indices": [0, 3]}))  # damaged after the manifest copied it
    assert [r.index for r in load_results(out)] == [0, 1]
    # a shard finished after the manifest's last refresh has only its commit, which is named when wrong
    second = write_shard(out, "shard-00001", [make_record(i, 4) for i in PLAN[1]])
    (out / f"shard-00001{COMMIT_SUFFIX}").write_text(json.dumps({**second, "indices": [1, 3]}))
    with pytest.raises(AttAttrError, match=r"shard-00001.commit.json is corrupt \(example 1 is in two places\)"):
        load_results(out)
    (out / f"shard-00001{COMMIT_SUFFIX}").write_text("{")  # unreadable: its examples are left out, and said so
    with caplog.at_level(logging.WARNING):
        assert [r.index for r in load_results(out)] == [0, 1]
    assert "shard-00001.commit.json is unreadable, so its examples are left out" in caplog.text
    caplog.clear()
    path.write_text("{")  # the manifest lists shard 0: its examples are read, so no word of leaving them out
    with caplog.at_level(logging.WARNING):
        assert [r.index for r in load_results(out)] == [0, 1]
    assert "shard-00000" not in caplog.text


@pytest.mark.parametrize("damage, why", [
    ('{"format": "attattr-fast-results", "shards": [', "not valid JSON"),  # cut short
    ("{}", "not an attattr-fast manifest"),  # valid JSON, but the shards beside it say whose directory it is
    ('{"format": "attattr-fast-results", "shards": 3}', "its list of shards is malformed"),
])  # fmt: skip
def test_a_corrupt_manifest_is_rebuilt_by_repair_from_the_settings_and_the_commits(tmp_path, caplog, damage, why):
    out = tmp_path / "res"
    _finished(out)
    (out / "manifest.json").write_text(damage)
    for read in (load_results, lambda d: open_run_directory(d, META, PLAN)):
        with pytest.raises(AttAttrError, match=f"manifest.json is corrupt \\({why}\\); rerun the attribute "
                                               "command that wrote it, with --repair, to rebuild it"):  # fmt: skip
            read(out)
    # the settings that made the shards are in settings.json: another run's settings are refused
    with pytest.raises(AttAttrError, match="holds results of a different run \\(n_steps: 3 there, 4 now\\)"):
        open_run_directory(out, {**META, "n_steps": 4}, PLAN, repair=True)
    with caplog.at_level(logging.WARNING):
        commits, lock = open_run_directory(out, META, PLAN, repair=True)
    lock.release()
    assert "rebuilding it from settings.json and the shards' commits" in caplog.text
    assert sorted(commits) == ["shard-00000", "shard-00001", "shard-00002"]  # nothing lost, nothing to recompute
    manifest = read_manifest(out)
    assert manifest["n_done"] == 5 and manifest["method"] == META["method"] and not manifest["complete"]
    assert [r.index for r in load_results(out)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("settings, what", [(None, "missing"), ("{", "damaged too")])
def test_a_corrupt_manifest_without_its_settings_is_refused_even_with_repair(tmp_path, settings, what):
    out = tmp_path / "res"
    _finished(out)
    (out / "manifest.json").write_text("{")
    if settings is None:
        (out / "settings.json").unlink()
    else:
        (out / "settings.json").write_text(settings)
    with pytest.raises(AttAttrError, match=f"and settings.json, the other record of the run's settings, is {what}: "
                                           "the shards cannot be checked against this run"):  # fmt: skip
        open_run_directory(out, META, PLAN, repair=True)
    assert len(list(out.glob("shard-*"))) == 9  # refusing changes nothing


def test_a_commit_whose_line_offsets_miss_the_lines_is_damage(tmp_path):
    out = tmp_path / "res"
    _finished(out)
    path = out / f"shard-00001{COMMIT_SUFFIX}"
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "offsets": [0, entry["offsets"][1] + 1]}))
    with pytest.raises(AttAttrError, match="shard-00001: its commit's line offsets do not match shard-00001.jsonl"):
        open_run_directory(out, META, PLAN)
    commits, lock = open_run_directory(out, META, PLAN, repair=True)
    lock.release()
    assert sorted(commits) == ["shard-00000", "shard-00002"]


def test_shards_without_a_manifest_are_named_not_mistaken_for_a_stranger(tmp_path):
    out = tmp_path / "res"
    _finished(out)
    (out / "manifest.json").unlink()
    message = "manifest.json is missing; rerun the attribute command that wrote it, with --repair, to rebuild it"
    for read in (load_results, lambda d: open_run_directory(d, META, PLAN)):
        with pytest.raises(AttAttrError, match=message):
            read(out)
    assert (out / "shard-00000.safetensors").exists()  # refusing changes nothing
    commits, lock = open_run_directory(out, META, PLAN, repair=True)  # settings.json vouches for the shards
    lock.release()
    assert sorted(commits) == ["shard-00000", "shard-00001", "shard-00002"]
    # shard files without any commit and no manifest: nothing says what they are
    for path in out.iterdir():
        if path.name.endswith(COMMIT_SUFFIX) or path.name == "manifest.json":
            path.unlink()
    with pytest.raises(AttAttrError, match="holds shards but no manifest.json: the settings that made them are lost"):
        open_run_directory(out, META, PLAN)


def test_duplicate_or_missing_examples_are_refused_not_lost(tmp_path):
    writer = ResultsWriter(tmp_path / "w", META, shard_size=2)
    writer.add(make_record(0, 3))
    with pytest.raises(AttAttrError, match="record index 0 was already added"):
        writer.add(make_record(0, 3))
    out = tmp_path / "res"
    manifest = _finished(out)
    twice = json.loads(json.dumps(manifest))
    twice["shards"][2]["indices"] = [3]
    (out / "manifest.json").write_text(json.dumps(twice))
    with pytest.raises(AttAttrError, match=r"corrupt \(example 3 is in two places\)"):
        load_results(out)
    short = {**manifest, "shards": manifest["shards"][:2]}
    (out / "manifest.json").write_text(json.dumps(short))
    with pytest.raises(AttAttrError, match=r"corrupt \(complete, with 4 of 5 examples\)"):
        load_results(out)


def test_resume_refusal_names_the_tokenization_and_the_resolved_targets(tmp_path):
    out = tmp_path / "res"
    meta = {**META, "input": {"sha256": "bb", "encoded_sha256": "e1", "n_examples": 5}, "target": "gold",
            "targets_sha256": "t1"}  # fmt: skip
    _, lock = open_run_directory(out, meta, PLAN)
    write_shard(out, "shard-00000", [make_record(i, 4) for i in PLAN[0]])  # a finished shard worth keeping
    lock.release()
    retokenized = {**meta, "input": {**meta["input"], "encoded_sha256": "e2"}}
    with pytest.raises(AttAttrError, match=r"tokenized sha256 e1, 5 examples\) there, .*tokenized sha256 e2"):
        open_run_directory(out, retokenized, PLAN)
    with pytest.raises(AttAttrError, match=r'targets_sha256: "gold" \(resolved targets sha256 t1\) there, '
                                           r'"negative" \(resolved targets sha256 t2\) now'):  # fmt: skip
        open_run_directory(out, {**meta, "target": "negative", "targets_sha256": "t2"}, PLAN)
    _, lock = open_run_directory(out, {**meta, "target": "1"}, PLAN)  # another name for the same targets
    lock.release()


def test_a_directory_whose_run_finished_no_shard_takes_a_run_with_other_settings(tmp_path, caplog):
    out = tmp_path / "res"
    _, lock = open_run_directory(out, META, PLAN)  # then the run failed before its first shard
    lock.release()
    other = {**META, "n_steps": 7}
    with caplog.at_level(logging.WARNING):
        commits, lock = open_run_directory(out, other, PLAN)
    assert commits == {} and "finished no shard; starting afresh" in caplog.text
    assert read_manifest(out)["n_steps"] == 7 and json.loads((out / "settings.json").read_text())["n_steps"] == 7
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(AttAttrError, match="in use by another run"):
        open_run_directory(out, META, PLAN)  # while the run with n_steps 7 holds it: nothing said, nothing changed
    lock.release()
    assert "afresh" not in caplog.text and read_manifest(out)["n_steps"] == 7


def test_bfloat16_fields_of_a_hand_made_record_are_stored_as_float32(tmp_path):
    record = make_record(0, n=3)
    record.head_max = record.head_max.bfloat16()
    write_shard(tmp_path, "shard-00000", [record])
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "shard-00000.safetensors")["0/head_max"]
    assert stored.dtype == torch.float32 and torch.equal(stored, record.head_max.float())


def test_shard_files_are_the_bytes_safetensors_torch_writes(tmp_path):
    """Shards are serialised from numpy views; a directory written by safetensors.torch.save (all versions before)
    must hold the same bytes, so a recomputed shard still matches its old checksum."""
    from safetensors.torch import load, save

    records = [make_record(i, n=3 + i) for i in range(4)]
    for store in (torch.float32, torch.float16):
        write_shard(tmp_path, "shard-00000", records, store)
        data = (tmp_path / "shard-00000.safetensors").read_bytes()
        assert save(load(data)) == data


def test_safetensors_buffers_are_the_bytes_safetensors_numpy_saves():
    """Every dtype safetensors' numpy writer takes, in its storage order, with empty, scalar and non-ASCII cases."""
    from safetensors.numpy import save

    from attattr_fast.results import SAFETENSORS_DTYPES, safetensors_buffers

    rng = np.random.default_rng(0)
    tensors = {f"{i}/{dtype.name}": (rng.standard_normal((i % 3 + 1, 5)) * 100).astype(dtype)
               for i, dtype in enumerate(SAFETENSORS_DTYPES)}  # fmt: skip
    tensors |= {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(7, np.int64), "é/x": np.ones(3, np.int8)}
    for subset in (tensors, {}, {"one": np.ones(1, np.bool_)}):
        assert b"".join(safetensors_buffers(subset)) == save(subset), sorted(subset)
    strided = np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2]  # save itself needs contiguous arrays
    assert b"".join(safetensors_buffers({"s": strided})) == save({"s": np.ascontiguousarray(strided)})
