"""Several processes: torchrun on the CPU (gloo) writes the same records as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_corpus import N_EXAMPLES, SHARD, assert_each_example_once, assert_same_records, run_cli, write_corpus

from attattr_fast import load_results
from attattr_fast import results as results_module
from attattr_fast.distributed import assign, from_environment
from attattr_fast.errors import AttAttrError

TORCHRUN = Path(sys.executable).with_name("torchrun")
FAST = ["--steps", "3", "--shard-size", str(SHARD), "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def cpu_settings():
    """As in test_corpus: one thread per process (torchrun's default too) and the torch backend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "reviews.tsv", seed=3)


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus_file, tiny_model_dir):
    out = tmp_path_factory.mktemp("single") / "out"
    assert run_cli("attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST,
                   "--no-progress") == 0  # fmt: skip
    return out


def torchrun(argv, timeout=120) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "attattr_fast.cli",
                           *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_two_processes_write_the_records_of_one(tmp_path, single, corpus_file, tiny_model_dir):
    out = tmp_path / "out"
    proc = torchrun(["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    ranks = [s["rank"] for s in manifest["shards"]]
    assert sorted(set(ranks)) == [0, 1] and manifest["processes"] == 2
    assert abs(ranks.count(0) - ranks.count(1)) <= 2  # balanced shares
    assert "with 2 processes" in proc.stderr and f"attributed {N_EXAMPLES} examples" in proc.stderr
    assert proc.stderr.count("attributing (rank 0 of 2)") >= 1  # one progress bar, rank 0's
    assert_each_example_once(out)
    assert_same_records(load_results(out), load_results(single))


class Stop(Exception):
    pass


def test_two_processes_resume_a_one_process_run(tmp_path, single, corpus_file, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    real, written = results_module.write_shard, []

    def write_shard(*args, **kwargs):
        if len(written) == 3:
            raise Stop  # the single-process run stops after three shards
        commit = real(*args, **kwargs)
        written.append(commit["name"])
        return commit

    monkeypatch.setattr(results_module, "write_shard", write_shard)
    with pytest.raises(Stop):
        run_cli("attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST, "--no-progress")
    monkeypatch.undo()
    kept = {name: (out / f"{name}.safetensors").stat().st_mtime_ns for name in written}
    proc = torchrun(["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{3 * SHARD} examples already done" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    new = [s for s in manifest["shards"] if s["name"] not in kept]
    assert {s["rank"] for s in new} == {0, 1}
    assert {name: (out / f"{name}.safetensors").stat().st_mtime_ns for name in written} == kept
    assert_each_example_once(out)
    assert_same_records(load_results(out), load_results(single))


def test_torchrun_errors_are_one_line_on_every_rank(tmp_path, single, corpus_file, tiny_model_dir):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    proc = torchrun(["attribute", "--input", corpus_file, "--model", tiny_model_dir, "--out", out, *FAST,
                     "--steps", "4"])  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "attattr-fast: error:" in line]
    # both ranks stop with the same one-line error (rank 1 learns it from rank 0 instead of waiting forever)
    assert len(errors) == 2 and all("n_steps: 3 there, 4 now" in e for e in errors), proc.stderr[-3000:]


def test_assign_balances_and_covers_every_item():
    costs = [float(c) for c in (9, 1, 4, 4, 7, 2, 2, 8, 3, 5)]
    shares = assign(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert shares == assign(costs, 3)  # every rank computes the same split
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert assign(costs, 1) == [list(range(len(costs)))]
    assert assign([], 2) == [[], []]


def test_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = from_environment("cpu")
    assert (ctx.world_size, ctx.rank, ctx.is_main, ctx.broadcast("x"), ctx.gather(1)) == (1, 0, True, "x", [1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(AttAttrError, match="MASTER_ADDR and MASTER_PORT unset: start the run with torchrun"):
        from_environment("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(AttAttrError, match="RANK=2 does not fit WORLD_SIZE=2"):
        from_environment("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(AttAttrError, match="RANK='one' is not an integer"):
        from_environment("cpu")


def test_cuda_rank_device(monkeypatch):
    """cuda:LOCAL_RANK when the rank sees every GPU; cuda:0 when the launcher gave it one GPU
    (CUDA_VISIBLE_DEVICES per rank); a LOCAL_RANK beyond the visible GPUs is a one-line error."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    for visible, expected in ((4, [3]), (1, [0])):
        chosen.clear()
        monkeypatch.setattr(torch.cuda, "device_count", lambda visible=visible: visible)
        with pytest.raises(AttAttrError, match="MASTER_ADDR"):  # stops after choosing the device
            from_environment("cuda")
        assert chosen == expected
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(AttAttrError, match="LOCAL_RANK=3 but only 2 CUDA devices are visible"):
        from_environment("cuda")
