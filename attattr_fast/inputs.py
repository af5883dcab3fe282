"""Argument checks shared by the engine's API and the reference (one message per mistake)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import Tensor

from attattr_fast import quadrature
from attattr_fast.adapters import EncoderAdapter
from attattr_fast.errors import AttAttrError

OUTPUTS = ("full", "reduced")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")


def allows_autograd(fn):
    """Runs `fn` outside `torch.inference_mode`, which a caller's context would otherwise impose on the integration
    rows' autograd (no `enable_grad` lifts it), on normal copies of the inference tensors among its arguments
    (autograd may not save those)."""

    def normal(value):
        return value.clone() if isinstance(value, Tensor) and value.is_inference() else value

    @functools.wraps(fn)
    def outside_inference_mode(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*map(normal, args), **{key: normal(value) for key, value in kwargs.items()})

    return outside_inference_mode


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """`model` in eval mode (no dropout) for the block; then every submodule back in its own mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def as_dtype(dtype):
    """A torch dtype, or None, from a dtype or its name ("bfloat16", "float16", …)."""
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    return dtype


MAX_TOP_K = 4096  # strongest interactions kept per layer: each result holds that many entries per layer and example


def checked_device(value, name: str) -> torch.device:
    """`value` (the option `name`) as a CPU or CUDA device that exists here; AttAttrError otherwise."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise AttAttrError(f"{name}: unknown device {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise AttAttrError(f"{name}: {value!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttAttrError(f"{name}: CUDA was requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AttAttrError(f"{name}: {value!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise AttAttrError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def check_options(
    method: str, n_steps: int, output: str, dtype, internal_batch_size, top_k
) -> tuple[np.ndarray, np.ndarray]:
    """Validates the scalar options; returns the quadrature (alphas, weights)."""
    try:
        alphas, weights = quadrature.nodes_and_weights(method, n_steps)
    except ValueError as exc:
        raise AttAttrError(str(exc)) from None
    if output not in OUTPUTS:
        raise AttAttrError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if dtype is not None and as_dtype(dtype) not in DTYPES:
        raise AttAttrError(f"unsupported dtype {dtype!r}; use torch.float32, torch.float64, torch.bfloat16 or "
                           "torch.float16 (or their names)")
    if internal_batch_size is not None and (not is_integer(internal_batch_size) or internal_batch_size < 1):
        raise AttAttrError(f"internal_batch_size must be a positive integer, got {internal_batch_size!r}")
    if not is_integer(top_k) or not 0 <= top_k <= MAX_TOP_K:
        raise AttAttrError(f"top_k must be an integer in 0..{MAX_TOP_K}, got {top_k!r}")
    return alphas, weights


def state_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the real-input forward and of everything reduced from it: float32 (float64 models
    stay float64; half-precision models are upcast)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def row_dtype(model_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the integration rows' forward and backward: `dtype` when given, else `state_dtype`."""
    return dtype if dtype is not None else state_dtype(model_dtype)


def validate_inputs(
    adapter: EncoderAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    token_type_ids: Tensor | None,
    target: int | Tensor | None,
    layers: list[int] | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, list[int]]:
    """Checks shapes and ranges; returns (key_mask bool [B, n], token types, target, layers)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise AttAttrError("input_ids must be a LongTensor of shape [batch, length]")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise AttAttrError("input_ids is empty: nothing to attribute")
    if length > adapter.max_length:
        raise AttAttrError(f"sequence length {length} exceeds the model's maximum of {adapter.max_length} tokens")
    vocab = adapter.config.vocab_size
    if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        raise AttAttrError(f"input_ids holds ids outside the model's vocabulary (0..{vocab - 1})")
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if value is not None and not isinstance(value, Tensor):
            raise AttAttrError(f"{name} must be None or a tensor of shape [batch, length], got {type(value).__name__}")
    if attention_mask is None:
        key_mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise AttAttrError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, length)}")
        key_mask = attention_mask.to(input_ids.device).bool()
        if not bool(key_mask[:, 0].all()):
            raise AttAttrError("every example needs at least one real token, and padding must be on the right")
        if bool((key_mask[:, 1:] & ~key_mask[:, :-1]).any()):
            raise AttAttrError("attention_mask must be right-padded (1s then 0s in every row)")
    if token_type_ids is not None:
        if tuple(token_type_ids.shape) != (batch, length):
            raise AttAttrError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, expected {(batch, length)}")
        types = getattr(adapter.config, "type_vocab_size", 1)
        if token_type_ids.dtype != torch.long or bool(((token_type_ids < 0) | (token_type_ids >= types)).any()):
            raise AttAttrError(f"token_type_ids must be a LongTensor of segment ids in 0..{types - 1}")
        token_type_ids = token_type_ids.to(input_ids.device)
    n_labels = adapter.num_labels
    if target is not None:
        if is_integer(target):
            target = torch.full((batch,), int(target), dtype=torch.long)
        elif isinstance(target, Tensor) and target.dim() == 0 and target.dtype == torch.long:
            target = target.expand(batch)
        if not isinstance(target, Tensor) or target.dtype != torch.long or tuple(target.shape) != (batch,):
            raise AttAttrError(f"target must be None, an int or a LongTensor of shape [{batch}]")
        if bool(((target < 0) | (target >= n_labels)).any()):
            raise AttAttrError(f"target out of range: the model has {n_labels} classes (0..{n_labels - 1})")
        target = target.to(input_ids.device)
    if layers is None:
        layers = list(range(adapter.n_layers))
    if is_integer(layers):
        layers = [layers]
    try:
        if any(isinstance(x, bool) or int(x) != x for x in layers):
            raise ValueError
        layers = [int(x) for x in layers]
    except (TypeError, ValueError):
        raise AttAttrError(f"layers must be a list of integer layer indices, got {layers!r}") from None
    if not layers:
        raise AttAttrError("layers is empty")
    bad = [x for x in layers if not 0 <= x < adapter.n_layers]
    if bad:
        raise AttAttrError(
            f"layer index {bad[0]} out of range: the model has {adapter.n_layers} layers (0..{adapter.n_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        raise AttAttrError(f"layers has duplicates: {layers}")
    return key_mask, token_type_ids, target, layers
