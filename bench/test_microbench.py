"""pytest-benchmark micro-benchmarks: one engine call and the attribution reduction (torch path; the Triton
kernel on CUDA only). These time things, they do not test correctness (tests/ does that); they live in
bench/, outside the default test run (setup.cfg: testpaths = tests).

    pytest bench/test_microbench.py --benchmark-columns=min,median,max,rounds
    pytest bench/test_microbench.py --benchmark-json bench/results/cpu-microbench.json

Each benchmark first checks that its call returns what it should (shapes, finite values), then times it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402

from attattr_fast import AttentionAttribution, engine  # noqa: E402
from attattr_fast.adapters import adapter_for  # noqa: E402

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = dict(layers=4, heads=4, hidden=128, intermediate=512)
BASE = dict(layers=12, heads=12, hidden=768, intermediate=3072)


@pytest.fixture(scope="module")
def small_model():
    return common.random_bert(**SMALL, device=DEVICE)


@pytest.fixture(scope="module")
def base_model():
    return common.random_bert(**BASE, device=DEVICE)


def _batch(model, lengths):
    ids, mask, types = common.random_batch(lengths, model.config.vocab_size, seed=3)
    return ids.to(DEVICE), mask.to(DEVICE), types.to(DEVICE)


def _info(benchmark, **settings):
    benchmark.extra_info.update({"device": common.device_name(DEVICE), "torch": torch.__version__, **settings})


@pytest.mark.parametrize("method, steps", [("riemann_right", 20), ("gausslegendre", 4)])
def test_engine_call_small(benchmark, small_model, method, steps):
    """One `attribute` call: small random BERT (4 layers, hidden 128), 4 examples of 12–32 tokens."""
    ids, mask, types = _batch(small_model, [32, 24, 17, 12])
    aa = AttentionAttribution(small_model)
    call = lambda: aa.attribute(ids, mask, types, method=method, n_steps=steps, backend="torch", output="reduced")
    res = call()
    assert res.head_max.shape == (4, SMALL["layers"], SMALL["heads"]) and torch.isfinite(res.layer_attr).all()
    _info(benchmark, model="small", examples=4, method=method, n_steps=steps, output="reduced")
    benchmark.pedantic(_synced(call), rounds=5, iterations=1, warmup_rounds=1)


def test_engine_call_bert_base(benchmark, base_model):
    """One `attribute` call: BERT-base shape, 1 example of 32 tokens, all 12 layers, gausslegendre 4."""
    ids, mask, types = _batch(base_model, [32])
    aa = AttentionAttribution(base_model)
    call = lambda: aa.attribute(ids, mask, types, method="gausslegendre", n_steps=4, backend="torch",
                                output="reduced")
    res = call()
    assert res.head_max.shape == (1, 12, 12) and torch.isfinite(res.layer_attr).all()
    _info(benchmark, model="bert-base", examples=1, length=32, method="gausslegendre", n_steps=4)
    benchmark.pedantic(_synced(call), rounds=3, iterations=1, warmup_rounds=1)


def _synced(call):
    """`call` followed by a CUDA synchronisation, so that a GPU benchmark times the work, not the launch."""

    def run():
        out = call()
        common.synchronize(DEVICE)
        return out

    return run


def _layer_state(model, lengths):
    """A LayerState of layer 0 from the engine's own prefix pass, and a random context gradient."""
    adapter = adapter_for(model)
    ids, mask, types = _batch(model, lengths)
    prefix = engine.run_prefix(adapter, adapter.weights(), ids, mask.bool(), types, [0], keep_probs=True,
                               keep_qk=True)
    state = prefix.layers[0]
    grad = torch.randn(state.context.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    return state, grad, prefix.key_mask


@pytest.mark.parametrize("n", [32, 128])
def test_reduce_layer_torch(benchmark, base_model, n):
    """The reduction A ⊙ (Ḡ Vᵀ) → head max, layer sum, full tensor, torch ops; 8 examples, BERT-base heads."""
    state, grad, key_mask = _layer_state(base_model, [n] * 7 + [n // 2])
    call = lambda: engine.reduce_layer_torch(state, grad, key_mask, True)
    attr, head_max, head_argmax, layer_attr = call()
    assert attr.shape == (8, 12, n, n) and head_max.shape == (8, 12) and layer_attr.shape == (8, n, n)
    _info(benchmark, examples=8, length=n, heads=12, full=True)
    benchmark.pedantic(_synced(call), rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel is timed on CUDA only (on the CPU "
                    "it runs in Triton's interpreter, which says nothing about its speed)")
@pytest.mark.parametrize("n", [32, 128])
def test_reduce_layer_triton(benchmark, base_model, n):
    """The fused kernel on the same inputs as `test_reduce_layer_torch` (CUDA)."""
    from attattr_fast.kernels.attribution_reduce import reduce_layer_triton

    state, grad, key_mask = _layer_state(base_model, [n] * 7 + [n // 2])
    call = lambda: reduce_layer_triton(state, grad, key_mask, False)
    _, head_max, _, layer_attr = call()
    _, ref_max, _, ref_sum = engine.reduce_layer_torch(state, grad, key_mask, False)
    torch.testing.assert_close(head_max, ref_max, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer_attr, ref_sum, rtol=1e-4, atol=1e-6)
    _info(benchmark, examples=8, length=n, heads=12, full=False)
    benchmark.pedantic(_synced(call), rounds=20, iterations=1, warmup_rounds=2)
