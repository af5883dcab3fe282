"""Fused attribution reduction: A ⊙ (Ḡ Vᵀ) and its reductions, tile by tile, never an [H, n, n] tensor.

Math (DESIGN §2.1 and §2.6). For one example and target layer, heads h, queries i, keys j, n tokens:

    P_h[i, j]    = exp(s · ⟨q_h,i, k_h,j⟩ − lse_h,i)       recomputed from Q, K and the saved row log-sum-exp
    Ḡ_h          = Σ_k w_k G_h,k                            the quadrature sum over K nodes, in registers
    Attr_h[i, j] = P_h[i, j] · (Ḡ_h V_hᵀ)[i, j]             where query i and key j are both real, else 0

and the kernel returns, per example (float32; positions int64):

    head_max[h]     max over real (i, j) of Attr_h            (Eq. 5 of the paper, signed)
    head_argmax[h]  its (i, j): the first in row-major order among equal maxima (as reductions.masked_head_max)
    layer_attr      Σ_h Attr_h  [n, n]                        (the attribution graph's layer matrix)
    attributions    Attr  [H, n, n]                           only when full=True

Top-k edges are not computed here: reductions.top_interactions takes them from layer_attr for both backends.

Shapes. q, k, v: [..., H, n, d], all float32, all bfloat16 or all float16, any strides. lse: [..., H, n], any
float dtype, read as float32. key_mask: [..., n], True (or 1) for real tokens, any pattern. context_grad:
[..., H, n, d] (one node of weight 1) or [K, ..., H, n, d] with quad_weights [K]; read as float32. The
outputs keep the leading dims "...".

Grid. One program per (example, query tile, key tile), B·⌈n/BLOCK_M⌉·⌈n/BLOCK_N⌉ programs on axis 0, ordered
so that consecutive programs share an example and a query tile (their Q and Ḡ rows stay in L2). A program
loops over the heads: the sum over heads stays in registers and is stored once (no atomics, deterministic),
and each head's tile maximum and its row-major position go to a [B, H, tiles] buffer. A second, tiny step on
the device (three torch reductions over that buffer, no host synchronisation) keeps the largest value and,
among equal values, the smallest position, which is the first in row-major order over the whole matrix.

Precision. float32 inputs: both products are IEEE float32 dots (TF32 would miss the 1e-5 relative agreement
with torch that the package promises). bfloat16 / float16 inputs: Q Kᵀ is a tensor-core dot with float32
accumulation (a product of two 16-bit floats is exact in float32). Ḡ is summed in float32, scaled by a power
of two (so float16's narrow range cannot flush small gradients) and split into a 16-bit part and a 16-bit
remainder; two dots against V keep Ḡ Vᵀ close to float32 accuracy instead of rounding Ḡ to 16 bits.
Everything after the dots is float32.

Why the engine passes K = 1. The kernel can sum the K nodes in registers, fusing the step reduction into this
pass. The engine sums Ḡ over the nodes itself and passes K = 1 with weight 1, because the rows of one
(example, layer) can fall in different row chunks of the batched backward, and keeping all K gradients until
the last chunk costs K times the memory of Ḡ (K·H·n·d floats per example and layer), which is what limits
the chunk size. General K is supported and tested for callers that hold every node's gradient at once.

Limits. head_dim up to 256, any value (padded to a power of two ≥ 16 inside the tile, padding masked). Any
n ≥ 1 (tiles past the end are masked). Offsets are int64, so B·H·n² may exceed 2³¹. NaN inputs propagate
to the sums; the position of a NaN maximum is undefined. float64 is not supported (use backend="torch").
Launch settings are fixed heuristics (`launch_config`), not autotuned and not yet tuned on a GPU. Under
TRITON_INTERPRET=1 the 16-bit operands are converted to float32 before each dot, because the interpreter
cannot multiply bfloat16 (triton-lang/triton#11584); the result equals the GPU's exact products with
float32 accumulation up to summation order.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from attattr_fast.errors import AttAttrError

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
# Position stored for a tile with no real (i, j); larger than any i·n + j.
NO_POSITION = tl.constexpr(1 << 62)


# -- reference ---------------------------------------------------------------------------------------------
def _ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    context_grad: Tensor,
    key_mask: Tensor,
    scale: float,
    quad_weights: Tensor | None = None,
    full: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """The same outputs as `reduce_attributions`, in plain torch, computed in `dtype` (float64 for tests)."""
    q, k, v, lse = q.to(dtype), k.to(dtype), v.to(dtype), lse.to(dtype)
    grad = context_grad.to(dtype)
    if quad_weights is not None:
        grad = torch.tensordot(quad_weights.to(device=grad.device, dtype=dtype), grad, dims=1)
    real = key_mask.bool()
    pair = (real.unsqueeze(-1) & real.unsqueeze(-2)).unsqueeze(-3)  # [..., 1, n, n]
    probs = torch.exp(q @ k.transpose(-1, -2) * scale - lse.unsqueeze(-1))
    attr = torch.where(pair, probs * (grad @ v.transpose(-1, -2)), 0.0)
    n = attr.shape[-1]
    head_max, pos = attr.masked_fill(~pair, float("-inf")).flatten(-2).max(dim=-1)
    return (attr if full else None), head_max, torch.stack([pos // n, pos % n], dim=-1), attr.sum(dim=-3)


# -- kernel ------------------------------------------------------------------------------------------------
@triton.jit
def _attribution_tiles(
    Q, K, V, LSE, G, W, MASK,
    ATTR, LAYER, TILE_MAX, TILE_POS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_lb, stride_lh, stride_ln,
    stride_gk, stride_gb, stride_gh, stride_gn, stride_gd,
    stride_mb, stride_mn,
    n_heads, seq_len, head_dim, n_nodes, tiles_n, tiles, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LOW_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    # int64 from the start: b·stride and (b·H + h)·n² overflow int32 on large batches.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles
    tile = pid % tiles
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    in_rows = rows < seq_len
    in_cols = cols < seq_len
    in_dims = dims < head_dim
    real_rows = tl.load(MASK + b * stride_mb + rows * stride_mn, mask=in_rows, other=0) != 0
    real_cols = tl.load(MASK + b * stride_mb + cols * stride_mn, mask=in_cols, other=0) != 0
    real = real_rows[:, None] & real_cols[None, :]
    inside = in_rows[:, None] & in_cols[None, :]
    flat = rows[:, None] * seq_len + cols[None, :]  # row-major position i·n + j
    row_dims = in_rows[:, None] & in_dims[None, :]
    dims_cols = in_dims[:, None] & in_cols[None, :]

    layer_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(n_heads):
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                    mask=row_dims, other=0.0)
        kt = tl.load(K + b * stride_kb + h * stride_kh + dims[:, None] * stride_kd + cols[None, :] * stride_kn,
                     mask=dims_cols, other=0.0)
        vt = tl.load(V + b * stride_vb + h * stride_vh + dims[:, None] * stride_vd + cols[None, :] * stride_vn,
                     mask=dims_cols, other=0.0)
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows * stride_ln, mask=in_rows, other=0.0)
        grad = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        g_ptr = G + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + dims[None, :] * stride_gd
        for node in range(n_nodes):
            grad += tl.load(W + node) * tl.load(g_ptr, mask=row_dims, other=0.0).to(tl.float32)
            g_ptr += stride_gk  # advancing the pointer, not node·stride in int32, which overflows for large K·B

        if LOW_PRECISION:
            # Power-of-two scale, undone after the dots: float16 would flush gradients below 6e-8 to zero.
            shift = tl.floor(tl.log2(tl.maximum(tl.max(tl.max(tl.abs(grad), 1), 0), 1e-30)))
            grad = grad * tl.exp2(-shift)
            g_hi = grad.to(q.dtype)
            g_lo = (grad - g_hi.to(tl.float32)).to(q.dtype)  # what 16 bits of Ḡ would lose
            if UPCAST_DOTS:
                scores = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
                vt32 = vt.to(tl.float32)
                gv = tl.dot(g_hi.to(tl.float32), vt32, input_precision="ieee")
                gv += tl.dot(g_lo.to(tl.float32), vt32, input_precision="ieee")
            else:
                scores = tl.dot(q, kt)
                gv = tl.dot(g_hi, vt) + tl.dot(g_lo, vt)
            gv = gv * tl.exp2(shift)
        else:
            scores = tl.dot(q, kt, input_precision="ieee")
            gv = tl.dot(grad, vt, input_precision="ieee")

        # Padded keys are dropped by `real` rather than by a −inf bias: exp of their score is never used.
        probs = tl.exp(scores * sm_scale - lse.to(tl.float32)[:, None])
        attr = tl.where(real, probs * gv, 0.0)
        layer_sum += attr
        if FULL:
            tl.store(ATTR + (b * n_heads + h) * seq_len * seq_len + flat, attr, mask=inside)

        candidates = tl.where(real, attr, float("-inf"))
        best = tl.max(tl.max(candidates, 1), 0)
        pos = tl.min(tl.min(tl.where(real & (candidates == best), flat, NO_POSITION), 1), 0)
        slot = (b * n_heads + h) * tiles + tile
        tl.store(TILE_MAX + slot, best)
        tl.store(TILE_POS + slot, pos)

    tl.store(LAYER + b * seq_len * seq_len + flat, layer_sum, mask=inside)


# -- launch configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def launch_config(seq_len: int, head_dim: int) -> LaunchConfig:
    """Fixed tile sizes (deterministic, no autotuning): 64×64 tiles up to head_dim 64, 32×32 above."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = 64 if block_d <= 64 else 32  # four [tile, block_d] operands per head must fit in registers
    tile = min(tile, max(16, triton.next_power_of_2(seq_len)))  # tl.dot needs ≥ 16; no wider than n
    return LaunchConfig(block_m=tile, block_n=tile, block_d=block_d, num_warps=4, num_stages=2)


# -- launcher ----------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    # Decided when this module was imported (TRITON_INTERPRET=1 then), not by the environment now.
    return type(_attribution_tiles).__name__ == "InterpretedFunction"


def _check_inputs(q, k, v, lse, context_grad, key_mask, scale, quad_weights) -> int:
    """Validates the launcher's arguments; returns K, the number of quadrature nodes."""
    named = {"q": q, "k": k, "v": v, "lse": lse, "context_grad": context_grad, "key_mask": key_mask}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise AttAttrError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() < 3:
        raise AttAttrError(f"q must have shape [..., H, n, d], got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise AttAttrError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttAttrError(
            f"q, k, v must all be float32, bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype} "
            "(use backend='torch' for other dtypes)"
        )
    *batch, heads, n, d = q.shape
    if n == 0 or heads == 0 or q.numel() == 0:
        raise AttAttrError(f"q is empty: shape {tuple(q.shape)}")
    if d > MAX_HEAD_DIM:
        raise AttAttrError(f"head_dim {d} is above the kernel's limit of {MAX_HEAD_DIM}")
    if tuple(lse.shape) != (*batch, heads, n) or not lse.is_floating_point():
        raise AttAttrError(f"lse must be a float tensor of shape {(*batch, heads, n)}, got {tuple(lse.shape)}")
    if tuple(key_mask.shape) != (*batch, n):
        raise AttAttrError(f"key_mask must have shape {(*batch, n)}, got {tuple(key_mask.shape)}")
    if not context_grad.is_floating_point():
        raise AttAttrError(f"context_grad must be a float tensor, got {context_grad.dtype}")
    if quad_weights is None:
        if context_grad.shape != q.shape:
            raise AttAttrError(f"context_grad must have shape {tuple(q.shape)}, got {tuple(context_grad.shape)}")
        n_nodes = 1
    else:
        if not isinstance(quad_weights, Tensor) or quad_weights.dim() != 1 or len(quad_weights) == 0:
            raise AttAttrError("quad_weights must be a non-empty 1-D tensor [K]")
        n_nodes = len(quad_weights)
        if tuple(context_grad.shape) != (n_nodes, *q.shape):
            raise AttAttrError(
                f"context_grad must have shape {(n_nodes, *q.shape)} for {n_nodes} quadrature weights, "
                f"got {tuple(context_grad.shape)}"
            )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise AttAttrError(f"scale must be a positive finite number, got {scale!r}")
    tensors = [*named.values()] + ([quad_weights] if quad_weights is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise AttAttrError(f"all inputs must be on one device, got {sorted(str(x) for x in devices)}")
    device = devices.pop()
    if device.type != "cuda" and not _interpreted():
        raise AttAttrError(
            f"the Triton kernel runs on CUDA tensors, or on the CPU with TRITON_INTERPRET=1 set before "
            f"attattr_fast.kernels is imported; got {device.type} tensors"
        )
    return n_nodes


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of `_attribution_tiles`: grid, arguments, and the outputs (attr, layer, tile_max, tile_pos)
    it writes, which are among the arguments."""

    grid: tuple[int]
    args: tuple
    kwargs: dict
    outputs: tuple[Tensor, Tensor, Tensor, Tensor]


def prepare_launch(q, k, v, lse, context_grad, key_mask, *, scale: float, n_nodes: int,
                   quad_weights: Tensor | None, full: bool, block_m: int | None = None,
                   block_n: int | None = None) -> KernelLaunch:
    """The kernel's arguments for inputs `_check_inputs` accepted (n_nodes: what it returned); allocates the
    outputs. Separate from the launch so that bench/kernel_offline.py compiles exactly what is launched."""
    *batch, heads, n, d = q.shape
    device = q.device
    cfg = launch_config(n, d)
    block_m, block_n = block_m or cfg.block_m, block_n or cfg.block_n
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise AttAttrError(f"{name} must be a power of two >= 16, got {size}")

    n_ex = 1
    for size in batch:
        n_ex *= size
    q4, k4, v4 = (t.reshape(n_ex, heads, n, d) for t in (q, k, v))
    lse3 = lse.reshape(n_ex, heads, n)
    grad5 = context_grad.reshape(n_nodes, n_ex, heads, n, d)
    if quad_weights is None:
        weights = torch.ones(1, dtype=torch.float32, device=device)
    else:
        weights = quad_weights.to(torch.float32).contiguous()
    mask2 = key_mask.reshape(n_ex, n).to(torch.int8)

    tiles_m, tiles_n = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    tiles = tiles_m * tiles_n
    f32 = dict(dtype=torch.float32, device=device)
    attr = torch.empty((n_ex, heads, n, n), **f32) if full else torch.empty(1, **f32)
    layer = torch.empty((n_ex, n, n), **f32)
    tile_max = torch.empty((n_ex, heads, tiles), **f32)
    tile_pos = torch.empty((n_ex, heads, tiles), dtype=torch.int64, device=device)
    low_precision = q.dtype != torch.float32
    log.debug("attribution_reduce: B=%d H=%d n=%d d=%d K=%d dtype=%s tiles %dx%d block_d=%d full=%s",
              n_ex, heads, n, d, n_nodes, q.dtype, block_m, block_n, cfg.block_d, full)
    args = (
        q4, k4, v4, lse3, grad5, weights, mask2,
        attr, layer, tile_max, tile_pos,
        *q4.stride(), *k4.stride(), *v4.stride(), *lse3.stride(), *grad5.stride(), *mask2.stride(),
        heads, n, d, n_nodes, tiles_n, tiles, float(scale),
    )  # fmt: skip
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg.block_d, LOW_PRECISION=low_precision,
                  UPCAST_DOTS=low_precision and _interpreted(), FULL=full, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    return KernelLaunch((n_ex * tiles,), args, kwargs, (attr, layer, tile_max, tile_pos))


def reduce_attributions(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    context_grad: Tensor,
    key_mask: Tensor,
    *,
    scale: float,
    quad_weights: Tensor | None = None,
    full: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """A ⊙ (Ḡ Vᵀ) reduced on the device (see the module docstring for the math and shapes).

    Args:
        q, k, v: queries, keys, values [..., H, n, d] of the target layer (float32 / bfloat16 / float16).
        lse: row log-sum-exp of QKᵀ·scale + padding bias [..., H, n].
        context_grad: Ḡ [..., H, n, d], or per-node gradients [K, ..., H, n, d] with `quad_weights`.
        key_mask: [..., n], True / 1 for real tokens.
        scale: the softmax scale the scores were computed with (usually head_dim ** -0.5).
        quad_weights: [K] quadrature weights, or None when context_grad is already Ḡ.
        full: also return the [..., H, n, n] attributions.
        block_m, block_n: tile sizes (powers of two ≥ 16) instead of `launch_config`'s.

    Returns:
        (attributions [..., H, n, n] or None, head_max [..., H], head_argmax long [..., H, 2] holding (i, j),
        layer_attr [..., n, n]), float32; zero wherever query or key is padding.
    """
    n_nodes = _check_inputs(q, k, v, lse, context_grad, key_mask, scale, quad_weights)
    *batch, heads, n, _ = q.shape
    launch = prepare_launch(q, k, v, lse, context_grad, key_mask, scale=scale, n_nodes=n_nodes,
                            quad_weights=quad_weights, full=full, block_m=block_m, block_n=block_n)
    # Triton launches on the current CUDA device: make it the tensors' (a model on cuda:1, say).
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _attribution_tiles[launch.grid](*launch.args, **launch.kwargs)
    attr, layer, tile_max, tile_pos = launch.outputs

    # Second step: the best tile per head; on equal values the smallest row-major position wins.
    head_max = tile_max.amax(dim=-1)
    pos = torch.where(tile_max == head_max.unsqueeze(-1), tile_pos, NO_POSITION.value).amin(dim=-1)
    pos = torch.where(pos == NO_POSITION.value, 0, pos)  # no real pair: (0, 0), as torch's argmax of all −inf
    head_argmax = torch.stack([pos // n, pos % n], dim=-1)

    return (
        attr.view(*batch, heads, n, n) if full else None,
        head_max.view(*batch, heads),
        head_argmax.view(*batch, heads, 2),
        layer.view(*batch, n, n),
    )


def reduce_layer_triton(state, context_grad: Tensor, key_mask: Tensor, full: bool):
    """The engine's Triton backend: `engine.reduce_layer_torch`'s contract, from Q, K, lse instead of A.

    state: engine.LayerState with queries, keys, values [B, H, n, d], lse [B, H, n] and the softmax scale;
    context_grad: Ḡ [B, H, n, d] float32; key_mask: [B, n] bool.
    """
    missing = [name for name in ("queries", "keys", "values", "lse", "scale") if getattr(state, name, None) is None]
    if missing:
        raise AttAttrError(f"the Triton backend needs the layer's {', '.join(missing)} from the prefix (needs_qk)")
    return reduce_attributions(
        state.queries, state.keys, state.values, state.lse, context_grad, key_mask, scale=state.scale, full=full
    )


# The engine keeps Q, K and lse (not the probabilities) in the prefix for a backend with this flag.
reduce_layer_triton.needs_qk = True
