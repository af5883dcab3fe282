"""The fused attribution kernel (kernels/attribution_reduce.py) against plain torch and the torch backend.

On a CPU-only machine conftest sets TRITON_INTERPRET=1 before the kernel module is imported here; the
interpreter runs every program in numpy, so shapes are small and tiles few. Tests under `gpu` need CUDA.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attattr_fast import AttAttrError, AttentionAttribution, reductions
from attattr_fast.engine import LayerState
from attattr_fast.kernels import attribution_reduce as ar

from conftest import padded_batch, tiny_classifier
from tolerances import KERNEL_LOW_PRECISION_RTOL, LOW_PRECISION_FACTOR, RTOL_F32

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(lengths, heads, head_dim, nodes=None, dtype=torch.float32, seed=0, device=DEVICE, batch_shape=None):
    """Random Q, K, V [B, H, n, d] in `dtype`, right-padded key mask, fp32 lse and context gradients.

    nodes=None: Ḡ [B, H, n, d] and no weights; else per-node gradients [K, B, H, n, d] and weights [K].
    batch_shape reshapes B into several leading dims.
    """
    g = torch.Generator().manual_seed(seed)
    n, b = max(lengths), len(lengths)
    scale = head_dim**-0.5
    q, k, v = (torch.randn(b, heads, n, head_dim, generator=g).to(dtype) for _ in range(3))
    mask = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    shape = (b, heads, n, head_dim) if nodes is None else (nodes, b, heads, n, head_dim)
    grad = torch.randn(shape, generator=g) * 1e-2
    weights = None if nodes is None else torch.rand(nodes, generator=g) + 0.1
    q, k, v, mask = q.to(device), k.to(device), v.to(device), mask.to(device)
    lse = torch.cat([  # in float64, an example at a time (the GPU test has 43 examples of 2048 tokens)
        torch.logsumexp(q[i:i + 1].double() @ k[i:i + 1].double().transpose(-1, -2) * scale
                        + padding_bias(mask[i:i + 1]), -1).float()
        for i in range(b)
    ])  # fmt: skip
    out = dict(q=q, k=k, v=v, lse=lse, context_grad=grad, key_mask=mask, scale=scale, quad_weights=weights)
    if batch_shape is not None:
        for name in ("q", "k", "v", "lse", "key_mask"):
            out[name] = out[name].reshape(*batch_shape, *out[name].shape[1:])
        lead = () if nodes is None else (nodes,)
        out["context_grad"] = grad.reshape(*lead, *batch_shape, *grad.shape[len(lead) + 1 :])
    return {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in out.items()}


def padding_bias(mask, dtype=torch.float64):
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[..., None, None, :]


def torch_ops(inp, dtype):
    """What the kernel replaces, in plain torch at `dtype`: softmax(QKᵀ·s + bias) ⊙ (Ḡ Vᵀ), masked, reduced.

    Independent of the lse input and of the kernel file; for float32 it goes through `reductions`.
    """
    q, k, v, mask = inp["q"].to(dtype), inp["k"].to(dtype), inp["v"].to(dtype), inp["key_mask"]
    grad, w = inp["context_grad"].double(), inp["quad_weights"]
    grad_bar = grad if w is None else sum(w[i].double() * grad[i] for i in range(len(w)))
    probs = torch.softmax(q @ k.transpose(-1, -2) * inp["scale"] + padding_bias(mask, dtype), -1)
    if dtype == torch.float32:
        attr = reductions.attribution_from_context_grad(probs, v, grad_bar.float())
    else:
        attr = probs * (grad_bar.to(dtype) @ v.transpose(-1, -2))
    attr = attr.masked_fill(~reductions.pair_mask(mask).unsqueeze(-3), 0.0)
    head_max, head_argmax = reductions.masked_head_max(attr, mask)
    return attr, head_max, head_argmax, attr.sum(dim=-3)


def rel_err(got, want):
    """max |got − want| over max |want|, in float64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def run_kernel(inp, full=True, **kw):
    return ar.reduce_attributions(
        inp["q"], inp["k"], inp["v"], inp["lse"], inp["context_grad"], inp["key_mask"],
        scale=inp["scale"], quad_weights=inp["quad_weights"], full=full, **kw,
    )  # fmt: skip


def assert_matches(got, want, rtol=RTOL_F32):
    attr, head_max, head_argmax, layer = got
    want_attr, want_max, want_argmax, want_layer = want
    if attr is not None:
        assert attr.dtype == torch.float32 and rel_err(attr, want_attr) <= rtol
    assert rel_err(head_max, want_max) <= rtol
    assert rel_err(layer, want_layer) <= rtol
    assert head_argmax.dtype == torch.long
    assert torch.equal(head_argmax.cpu(), want_argmax.cpu())


# -- the launcher --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [32, 64, 128, 48])
def test_fp32_matches_ref_and_reductions(head_dim):
    # n = 40 with 16×16 / 32×32 tiles: several tiles per axis, the last one partly past the end.
    inp = make_inputs([40, 23], heads=2, head_dim=head_dim)
    block = 16 if head_dim <= 64 else 32
    got = run_kernel(inp, full=True, block_m=block, block_n=block)
    assert got[0].shape == (2, 2, 40, 40) and got[1].shape == (2, 2) and got[3].shape == (2, 40, 40)
    ref = ar._ref(**{**inp, "full": True})
    assert_matches(got, ref)
    assert_matches(got, torch_ops(inp, torch.float32))
    # padding pairs are exact zeros, real pairs are not all zero
    pad_pairs = ~reductions.pair_mask(inp["key_mask"]).unsqueeze(1)
    assert bool((got[0][pad_pairs.expand_as(got[0])] == 0).all()) and bool(got[0][1, :, :23, :23].abs().gt(0).all())


@pytest.mark.parametrize("full", [True, False])
def test_quadrature_nodes_summed_in_kernel(full):
    inp = make_inputs([33, 17, 5], heads=3, head_dim=32, nodes=4, seed=3)
    got = run_kernel(inp, full=full)
    assert (got[0] is None) == (not full)
    assert_matches(got, ar._ref(**{**inp, "full": full}))
    assert_matches(got, torch_ops(inp, torch.float32))
    # Summing Ḡ first and launching with K = 1 (what the engine does) agrees too.
    w, grad = inp["quad_weights"], inp["context_grad"]
    summed = {**inp, "context_grad": (w.view(-1, 1, 1, 1, 1) * grad).sum(0), "quad_weights": None}
    assert_matches(got, run_kernel(summed, full=full))


def test_leading_batch_dims_and_strided_inputs():
    inp = make_inputs([20, 9, 20, 14, 3, 20], heads=2, head_dim=32, nodes=2, seed=5, batch_shape=(2, 3))
    # Q, K, V as the adapters make them: [B, H, n, d] views of [B, n, H, d] (not contiguous).
    for name in ("q", "k", "v"):
        inp[name] = inp[name].transpose(-3, -2).contiguous().transpose(-3, -2)
        assert not inp[name].is_contiguous()
    got = run_kernel(inp, full=True)
    assert got[0].shape == (2, 3, 2, 20, 20) and got[2].shape == (2, 3, 2, 2) and got[3].shape == (2, 3, 20, 20)
    assert_matches(got, torch_ops(inp, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    inp = make_inputs([48, 30], heads=2, head_dim=64, nodes=3, dtype=dtype, seed=7)
    exact = torch_ops(inp, torch.float64)  # the same 16-bit inputs, computed in float64
    plain = torch_ops(inp, dtype)
    got = run_kernel(inp, full=True)
    for index, name in ((0, "attributions"), (1, "head_max"), (3, "layer_attr")):
        kernel_err, torch_err = rel_err(got[index], exact[index]), rel_err(plain[index], exact[index])
        assert torch_err > 0, name
        message = f"{name}: kernel {kernel_err:.2e}, torch {dtype} {torch_err:.2e}"
        assert kernel_err <= LOW_PRECISION_FACTOR * torch_err, message
        # Ḡ split into two 16-bit parts keeps about 16 significant bits (bfloat16) instead of 8: far
        # tighter than the criterion above, which rounding Ḡ to 16 bits once would also meet.
        assert kernel_err <= KERNEL_LOW_PRECISION_RTOL, message


def test_float16_keeps_tiny_gradients():
    # Ḡ ~ 1e-11 is below float16's smallest subnormal (6e-8): the kernel must not round it to zero.
    inp = make_inputs([40, 21], heads=2, head_dim=32, dtype=torch.float16, seed=9)
    inp["context_grad"] = inp["context_grad"] * 1e-9
    got = run_kernel(inp, full=True)
    exact = torch_ops(inp, torch.float64)
    assert float(exact[0].abs().max()) > 0
    for index in (0, 1, 3):
        assert rel_err(got[index], exact[index]) <= KERNEL_LOW_PRECISION_RTOL


def test_head_argmax_first_in_row_major_order_across_tiles():
    # Q = 0 makes every row of P uniform, so A ⊙ (Ḡ Vᵀ) has exact ties wherever Ḡ Vᵀ does.
    n, d, block = 48, 32, 16
    q = torch.zeros(3, 2, n, d)
    k = torch.randn(3, 2, n, d)
    grad, v = torch.zeros(3, 2, n, d), torch.zeros(3, 2, n, d)
    # head 0: equal maxima at (1, 3) in tile (0, 0) and (0, 40) in tile (0, 2): row-major wants (0, 40)
    grad[:, 0, 0, 0], v[:, 0, 40, 0] = 1.0, 1.0
    grad[:, 0, 1, 1], v[:, 0, 3, 1] = 1.0, 1.0
    # head 1: equal maxima inside one tile, (3, 9) and (2, 12): row-major wants (2, 12)
    grad[:, 1, 3, 2], v[:, 1, 9, 2] = 1.0, 1.0
    grad[:, 1, 2, 3], v[:, 1, 12, 3] = 1.0, 1.0
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, 40:] = False  # key 40 is padding: (1, 3) is the maximum among real pairs
    mask[2, 1:] = False  # a single real token: only (0, 0) counts, and there Ḡ Vᵀ = 0
    lse = torch.logsumexp(torch.zeros(3, 2, n, n) + padding_bias(mask, torch.float32), -1)
    inp = dict(q=q, k=k, v=v, lse=lse, context_grad=grad, key_mask=mask, scale=d**-0.5, quad_weights=None)
    inp = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for name, t in inp.items()}
    _, head_max, head_argmax, _ = run_kernel(inp, full=False, block_m=block, block_n=block)
    expected = torch.tensor([[[0, 40], [2, 12]], [[1, 3], [2, 12]], [[0, 0], [0, 0]]])
    assert torch.equal(head_argmax.cpu(), expected)
    assert torch.equal(head_argmax.cpu(), torch_ops(inp, torch.float32)[2].cpu())
    assert torch.allclose(head_max[0].cpu(), torch.full((2,), 1 / n))


@pytest.mark.parametrize("lengths", [[26, 26], [26, 11]])  # with padding: its zeros must not win the maximum
def test_negative_attributions_give_the_least_negative_maximum(lengths):
    inp = make_inputs(lengths, heads=2, head_dim=32, seed=11)
    inp["context_grad"] = -inp["context_grad"].abs()
    inp["v"] = inp["v"].abs()
    got = run_kernel(inp, full=False, block_m=16, block_n=16)
    assert bool((got[1] < 0).all())
    assert_matches(got, torch_ops(inp, torch.float32))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(k=i["k"][..., :-1, :]), "one shape"),
        (lambda i: i.update(q=i["q"].double(), k=i["k"].double(), v=i["v"].double()), "float32, bfloat16 or float16"),
        (lambda i: i.update(v=i["v"].half()), "float32, bfloat16 or float16"),
        (lambda i: i.update(lse=i["lse"][..., :-1]), "lse must be"),
        (lambda i: i.update(key_mask=i["key_mask"][:1]), "key_mask must have shape"),
        (lambda i: i.update(context_grad=i["context_grad"][:, :1]), "context_grad must have shape"),
        (lambda i: i.update(quad_weights=torch.ones(2)), "for 2 quadrature weights"),
        (lambda i: i.update(scale=0.0), "scale must be"),
        (lambda i: i.update(q=None), "q must be a torch.Tensor"),
    ],
)
def test_launcher_rejects_bad_input(change, message):
    inp = make_inputs([5, 3], heads=2, head_dim=16, device="cpu")
    change(inp)
    with pytest.raises(AttAttrError, match=message):
        run_kernel(inp)


def test_launcher_rejects_bad_tiles_and_head_dim():
    inp = make_inputs([5], heads=1, head_dim=16, device="cpu")
    with pytest.raises(AttAttrError, match="block_m must be a power of two"):
        run_kernel(inp, block_m=24)
    big = make_inputs([3], heads=1, head_dim=320, device="cpu")
    with pytest.raises(AttAttrError, match="head_dim 320 is above"):
        run_kernel(big)


def test_backend_needs_the_softmax_scale():
    inp = make_inputs([4], heads=1, head_dim=16)
    state = LayerState(hidden_in=None, context=None, values=inp["v"], probs=None, queries=inp["q"],
                       keys=inp["k"], lse=inp["lse"])  # fmt: skip
    assert ar.reduce_layer_triton.needs_qk is True
    with pytest.raises(AttAttrError, match="scale"):
        ar.reduce_layer_triton(state, inp["context_grad"], inp["key_mask"], False)


# -- the engine with backend="triton" -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    # head_dim 32 (hidden 64, 2 heads); 160 positions allow n = 130
    return tiny_classifier("bert", layers=2, heads=2, hidden=64, seed=4)


@pytest.mark.parametrize("output", ["full", "reduced"])
@pytest.mark.parametrize("lengths", [(1, 7), (64, 33), (130, 129)])
def test_engine_triton_matches_torch(model, lengths, output):
    ids, mask, types = padded_batch(model, list(lengths), seed=2)
    aa = AttentionAttribution(model)
    kw = dict(attention_mask=mask, token_type_ids=types, n_steps=3, output=output, top_k=6)
    fast = aa.attribute(ids, backend="triton", **kw)
    ref = aa.attribute(ids, backend="torch", **kw)
    if output == "full":
        assert rel_err(fast.attributions, ref.attributions) <= RTOL_F32
    else:
        assert fast.attributions is None and ref.attributions is None
    assert rel_err(fast.head_max, ref.head_max) <= RTOL_F32
    assert rel_err(fast.layer_attr, ref.layer_attr) <= RTOL_F32
    assert torch.equal(fast.head_argmax, ref.head_argmax)
    for field in ("query", "key"):
        assert torch.equal(getattr(fast.top_k, field), getattr(ref.top_k, field))
    assert torch.allclose(fast.top_k.score, ref.top_k.score, rtol=1e-5, atol=1e-5 * float(ref.layer_attr.abs().max()),
                          equal_nan=True)
    assert float(ref.layer_attr.abs().max()) > 0


def test_backend_choice(caplog):
    """auto: torch ops on every device (the kernel's float32 path measured slower on an H200), with a log
    line; triton: the kernel where it runs, a one-line error elsewhere."""
    from attattr_fast import engine
    from attattr_fast.api import resolve_backend
    from attattr_fast.errors import AttAttrError

    for device in ("cpu", "cuda"):
        caplog.clear()
        with caplog.at_level("INFO", logger="attattr_fast.api"):
            assert resolve_backend("auto", torch.device(device)) is engine.reduce_layer_torch
        assert "using torch ops" in caplog.text
    with pytest.raises(AttAttrError, match="no float64 path"):
        resolve_backend("triton", torch.device("cuda"), torch.float64)
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        assert resolve_backend("triton", torch.device(device)) is ar.reduce_layer_triton


# -- packaging and failure modes, in fresh interpreters ----------------------------------------------------
def _python(code: str, env_drop=(), **env_set) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in env_drop}
    env.update(env_set)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip


def test_import_leaves_no_top_level_kernels_module():
    # cwd is the repository root, where a top-level `kernels` would be importable by mistake.
    proc = _python("""
        import sys
        import attattr_fast, attattr_fast.api
        import attattr_fast.kernels.attribution_reduce as ar
        print("kernels" in sys.modules, ar.__name__, attattr_fast.kernels.__file__)
    """)
    assert proc.returncode == 0, proc.stderr
    top_level, name, path = proc.stdout.split()
    assert top_level == "False"
    assert name == "attattr_fast.kernels.attribution_reduce"
    assert Path(path).resolve() == REPO / "kernels" / "__init__.py"


def test_triton_backend_without_interpreter_or_gpu_raises():
    proc = _python(
        """
        import os
        import torch
        import transformers as T
        from attattr_fast import AttAttrError, AttentionAttribution
        assert "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
        config = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=37, max_position_embeddings=16)
        model = T.BertForSequenceClassification(config).eval()
        ids, mask = torch.randint(5, 50, (2, 4)), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
        try:
            AttentionAttribution(model).attribute(ids, mask, n_steps=1, backend="triton")
        except AttAttrError as exc:
            print("api:", exc)
        from attattr_fast.kernels import attribution_reduce as ar
        q = torch.randn(1, 1, 4, 16)
        try:
            ar.reduce_attributions(q, q, q, q[..., 0], q, torch.ones(1, 4, dtype=torch.bool), scale=0.25)
        except AttAttrError as exc:
            print("kernel:", exc)
        """,
        env_drop=("TRITON_INTERPRET",),
        CUDA_VISIBLE_DEVICES="",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith("api: backend='triton' cannot run")
    assert lines[1].startswith("kernel: the Triton kernel runs on CUDA tensors")


# -- GPU-only checks (no timings) -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_gpu_kernel_matches_torch(dtype, head_dim):
    inp = make_inputs([512, 300, 77], heads=12, head_dim=head_dim, nodes=2, dtype=dtype, seed=13)
    got = run_kernel(inp, full=True)
    if dtype == torch.float32:
        assert_matches(got, torch_ops(inp, torch.float32))
        return
    exact, plain = torch_ops(inp, torch.float64), torch_ops(inp, dtype)
    for index in (0, 1, 3):
        assert rel_err(got[index], exact[index]) <= LOW_PRECISION_FACTOR * rel_err(plain[index], exact[index])


@pytest.mark.gpu
def test_gpu_int64_offsets():
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB for a [B, H, n, n] output above 2**31 elements")
    b, heads, n = 43, 12, 2048  # B·H·n² = 2.16e9 > 2**31
    inp = make_inputs([n] * (b - 1) + [n - 5], heads=heads, head_dim=64, seed=17)
    attr, head_max, head_argmax, layer = run_kernel(inp, full=True)
    last = {name: (t[-1:] if isinstance(t, torch.Tensor) else t) for name, t in inp.items()}
    want = ar._ref(**{**last, "full": True})
    del inp
    assert_matches((attr[-1:], head_max[-1:], head_argmax[-1:], layer[-1:]), want)


@pytest.mark.gpu
@pytest.mark.parametrize("output", ["full", "reduced"])
def test_gpu_engine_triton_matches_torch(output):
    model = tiny_classifier("bert", layers=2, heads=4, hidden=128, seed=4).cuda()
    ids, mask, types = padded_batch(model, [150, 97, 3], seed=2)
    aa = AttentionAttribution(model)
    kw = dict(attention_mask=mask.cuda(), token_type_ids=types.cuda(), n_steps=3, output=output, top_k=6)
    fast = aa.attribute(ids.cuda(), backend="triton", **kw)
    ref = aa.attribute(ids.cuda(), backend="torch", **kw)
    assert rel_err(fast.layer_attr, ref.layer_attr) <= RTOL_F32
    assert rel_err(fast.head_max, ref.head_max) <= RTOL_F32
    assert torch.equal(fast.head_argmax, ref.head_argmax)
    assert torch.equal(fast.top_k.query, ref.top_k.query) and torch.equal(fast.top_k.key, ref.top_k.key)
