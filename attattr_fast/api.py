"""Public API: `AttentionAttribution(model).attribute(...)` (DESIGN §3)."""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from attattr_fast import engine
from attattr_fast.adapters import EncoderAdapter, adapter_for
from attattr_fast.errors import AttAttrError, NonFiniteScores
from attattr_fast.inputs import (
    allows_autograd,
    as_dtype,
    check_backend,
    check_options,
    checked_device,
    row_dtype,
    state_dtype,
    validate_inputs,
)
from attattr_fast.reductions import TopInteractions, top_interactions
from attattr_fast.result import AttributionResult

log = logging.getLogger(__name__)



def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The reduction backend: "torch" ops, or the Triton kernel.

    "auto" takes the torch ops: the engine hands the reduction float32 states (float64 for float64 models),
    and on the one GPU measured (an H200, bench/results/h200-bench_kernel.json and h200-bench_compare-a.json)
    the kernel's float32 path ran at 0.26–0.69× the torch ops, and on 256 sentences the engine's Triton rows were
    slower than its torch rows in all four cases, by far the most in the bf16 rows (107 s against 3.6 s); the
    cause of that gap is not established.
    "triton" runs the kernel on CUDA, or on the CPU under TRITON_INTERPRET=1, and raises an `AttAttrError`
    where it cannot run.
    """
    check_backend(backend)
    if backend == "torch":
        return engine.reduce_layer_torch
    if backend == "auto":
        log.info("backend auto: using torch ops (the Triton kernel is slower on %s states; backend='triton' "
                 "asks for it)", dtype)
        return engine.reduce_layer_torch
    reason = None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"tensors are on {device.type}; the Triton kernel runs on CUDA (or with TRITON_INTERPRET=1)"
    elif dtype == torch.float64:
        reason = "the Triton kernel has no float64 path"
    else:
        try:
            from attattr_fast.kernels import attribution_reduce
        except ImportError as exc:  # triton missing or broken
            reason = f"triton cannot be imported ({exc})"
    if reason is not None:
        raise AttAttrError(f"backend='triton' cannot run: {reason}")
    return attribution_reduce.reduce_layer_triton


class AttentionAttribution:
    """Self-attention attribution (AttAttr) for a BERT / RoBERTa / ELECTRA sequence classifier.

    Example:
        >>> aa = AttentionAttribution(model)
        >>> res = aa.attribute(enc["input_ids"], enc["attention_mask"], n_steps=20)
        >>> res.layer_attr.shape   # [B, L, n, n]
    """

    def __init__(self, model: torch.nn.Module | EncoderAdapter, compile: bool = False):
        """`compile=True` runs the rows' layers under `torch.compile` (`engine.compiled_layer_functions`): the
        first calls compile (tens of seconds), later ones reuse the graphs. Compiled rows always run padded (the
        eager engine packs rows of groups with much padding, `engine.TokenLayout`). Off by default: no
        measurement yet shows it paying (bench/engine_ab.py --compare compile)."""
        self.adapter = adapter_for(model)
        self.layer_functions = engine.compiled_layer_functions() if compile else engine.EAGER

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @allows_autograd
    def attribute(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        target: int | Tensor | None = None,
        layers: list[int] | None = None,
        n_steps: int = 20,
        method: str = "riemann_right",
        output: str = "full",
        dtype: torch.dtype | None = None,
        internal_batch_size: int | None = None,
        backend: str = "auto",
        top_k: int = 0,
        result_device: str | torch.device = "cpu",
    ) -> AttributionResult:
        """Integrated gradients over each target layer's attention probabilities.

        Args:
            input_ids: LongTensor [B, n], right-padded.
            attention_mask: [B, n] of 1/0 (None: no padding).
            token_type_ids: [B, n] segment ids (None: all 0).
            target: None (the predicted class), an int, or a LongTensor [B].
            layers: 0-based target layers (None: all).
            n_steps: sub-intervals of the Riemann rules or Gauss–Legendre nodes (see `quadrature`).
            method: riemann_left | riemann_right | riemann_middle | riemann_trapezoid | gausslegendre.
            output: "full" keeps [B, L', H, n, n] attributions and attention; "reduced" only head_max,
                layer_attr, top_k.
            dtype: None (float32; a float64 model stays float64) or torch.bfloat16 / torch.float16 (or their
                names) for the layers above the target (context gradients and the reduction accumulate in
                float32). Result tensors are float32 either way.
            internal_batch_size: most rows (example × layer × node) per forward/backward; None: as many as
                the memory budget holds (`engine.memory_budget`: half the free GPU memory, 1 GiB on the CPU).
            backend: "auto" (torch ops; see `resolve_backend`), "triton" or "torch".
            top_k: also return the k strongest entries of every layer matrix.
            result_device: where the result tensors go.

        Returns:
            AttributionResult (shapes in its docstring).
        """
        adapter = self.adapter
        alphas_np, weights_np = check_options(method, n_steps, output, dtype, internal_batch_size, top_k)
        dtype, top_k = as_dtype(dtype), int(top_k)
        internal_batch_size = None if internal_batch_size is None else int(internal_batch_size)
        device = adapter.device
        input_ids = input_ids.to(device) if isinstance(input_ids, Tensor) else input_ids
        key_mask, token_type_ids, target, layers = validate_inputs(
            adapter, input_ids, attention_mask, token_type_ids, target, layers
        )
        model_dtype = adapter.dtype
        prefix_weights = adapter.weights(state_dtype(model_dtype))
        reduce_layer = resolve_backend(backend, device, prefix_weights.dtype)
        rows_dtype = row_dtype(model_dtype, dtype)
        if device.type == "cpu" and rows_dtype in (torch.bfloat16, torch.float16):
            _warn_half_precision_rows_on_cpu(rows_dtype)
        row_weights = prefix_weights if rows_dtype == prefix_weights.dtype else adapter.weights(rows_dtype)
        alphas = torch.tensor(alphas_np, dtype=torch.float32)
        quad_weights = torch.tensor(weights_np, dtype=torch.float32)

        batch, length = input_ids.shape
        lengths = key_mask.sum(1)
        lengths_host = lengths.cpu()  # the one read of the lengths on the host; the grouping needs them there
        order = torch.sort(lengths_host, stable=True).indices  # similar lengths share a group
        rows_per_example = len(layers) * len(alphas)
        groups = engine.plan_batch(adapter, lengths_host[order].tolist(), layers, len(alphas), row_weights.dtype,
                                   device, internal_batch_size)
        log.debug("%d groups: (examples, rows per chunk) %s", len(groups), [(e - b, r) for b, e, r in groups])

        # The batch's results gather on result_device group by group, so a large batch bound for the CPU
        # never holds all of its [B, L', H, n, n] tensors on the GPU at once.
        result_device = checked_device(result_device, "result_device")
        out = _Collector(batch, len(layers), adapter.n_heads, length, output == "full", result_device)
        for begin, end, rows_per_chunk in groups:
            idx_host = order[begin:end]
            group_lengths = lengths_host[idx_host]
            n = int(group_lengths.max())  # each group runs at its own longest real length
            idx = idx_host.to(device, non_blocking=True)
            try:
                group = engine.attribute_group(
                    adapter, prefix_weights, row_weights,
                    input_ids[idx, :n], key_mask[idx, :n],
                    None if token_type_ids is None else token_type_ids[idx, :n],
                    None if target is None else target[idx],
                    layers, alphas, quad_weights, output == "full", rows_per_chunk, reduce_layer, group_lengths,
                    self.layer_functions,
                )  # fmt: skip
            except engine.OUT_OF_MEMORY as exc:  # what the failing chunk held, for a caller that retries smaller
                exc.rows_in_chunk = min(rows_per_chunk, (end - begin) * rows_per_example)
                raise
            with engine.phase("collect"):
                out.put(idx, n, group)

        with engine.phase("collect"):
            delta = out.attr_sum - (out.prob.unsqueeze(1) - out.baseline)
            _check_finite(out.prob, delta, row_weights.dtype)
            top = top_interactions(out.layer_attr, key_mask.to(result_device).unsqueeze(1), top_k) if top_k else None
        result = AttributionResult(
            attributions=out.attributions,
            attention=out.attention,
            head_max=out.head_max,
            head_argmax=out.head_argmax,
            layer_attr=out.layer_attr,
            target=out.target,
            prob=out.prob,
            delta=delta,
            top_k=top,
            layers=layers,
            lengths=lengths,
            baseline=out.baseline,
            method=method,
            n_steps=n_steps,
            model_layers=adapter.n_layers,
        )
        return _to_device(result, result_device)


@functools.cache
def _warn_half_precision_rows_on_cpu(dtype: torch.dtype) -> None:
    """Once per process and dtype: half precision pays on a GPU's tensor cores, not on a CPU."""
    log.warning("%s rows on the CPU are slower than float32 (PyTorch's CPU products in half precision: a BERT-base "
                "call took about 40x as long on an AVX2 CPU) and less accurate; on a CPU keep float32, the default",
                str(dtype).removeprefix("torch."))


def _check_finite(prob: Tensor, delta: Tensor, rows_dtype: torch.dtype) -> None:
    """A NaN or infinite score is an error, never a result: from the model's own output (broken weights), or
    from the attribution (a half-precision row dtype that overflowed)."""
    broken = ~torch.isfinite(prob)
    if bool(broken.any()):
        raise NonFiniteScores("the model's output for {example} is not finite (NaN or inf): its weights are broken "
                              "(a fine-tuning run that diverged?)", int(broken.nonzero()[0]))  # fmt: skip
    broken = ~torch.isfinite(delta).all(dim=1)
    if bool(broken.any()):
        hint = "; the half-precision rows may overflow: try float32" if rows_dtype.itemsize < 4 else ""
        raise NonFiniteScores("the attribution of {example} is not finite (NaN or inf) though the model's output is"
                              + hint, int(broken.nonzero()[0]))


class _Collector:
    """Scatters the groups' outputs (each at its own length) into full-batch tensors, zero-padded."""

    def __init__(self, batch: int, n_layers: int, n_heads: int, length: int, full: bool, device):
        self.device = device
        f32 = dict(dtype=torch.float32, device=device)
        self.head_max = torch.zeros(batch, n_layers, n_heads, **f32)
        self.head_argmax = torch.zeros(batch, n_layers, n_heads, 2, dtype=torch.long, device=device)
        self.layer_attr = torch.zeros(batch, n_layers, length, length, **f32)
        self.prob = torch.zeros(batch, **f32)
        self.target = torch.zeros(batch, dtype=torch.long, device=device)
        self.baseline = torch.zeros(batch, n_layers, **f32)
        self.attr_sum = torch.zeros(batch, n_layers, **f32)
        self.attributions = torch.zeros(batch, n_layers, n_heads, length, length, **f32) if full else None
        self.attention = torch.zeros(batch, n_layers, n_heads, length, length, **f32) if full else None

    def put(self, idx: Tensor, n: int, group: engine.GroupResult) -> None:
        idx = idx.to(self.device)
        self.head_max[idx] = group.head_max.to(self.device)
        self.head_argmax[idx] = group.head_argmax.to(self.device)
        self.layer_attr[idx, :, :n, :n] = group.layer_attr.to(self.device)
        self.prob[idx] = group.prob.to(self.device)
        self.target[idx] = group.target.to(self.device)
        self.baseline[idx] = group.baseline.to(self.device)
        self.attr_sum[idx] = group.attr_sum.to(self.device)
        if self.attributions is not None:
            self.attributions[idx, :, :, :n, :n] = group.attributions.to(self.device)
            self.attention[idx, :, :, :n, :n] = group.attention.to(self.device)


def _to_device(result: AttributionResult, device: torch.device) -> AttributionResult:
    for name, value in vars(result).items():
        if isinstance(value, Tensor):
            setattr(result, name, value.to(device))
    if result.top_k is not None:
        top = result.top_k
        result.top_k = TopInteractions(top.query.to(device), top.key.to(device), top.score.to(device))
    return result
