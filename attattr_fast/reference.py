"""The literal AttAttr algorithm, the yardstick for the engine (DESIGN §6).

For every example (at its real length), every target layer l and every quadrature node α_k, the
`transformers` model itself runs with layer l's attention probabilities replaced by α_k·A^l (a leaf
n×n matrix per head), and autograd gives ∂F/∂(α_k A^l). Then

    Attr(A^l) = A^l ⊙ Σ_k w_k ∂F(α_k A^l)/∂A^l.

The substitution goes through transformers' attention interface, so the model's own modules compute
everything else. Pass `dtype=torch.float64` for a float64 run (on a copy of the model). This module
imports neither the engine nor the kernels.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor

from attattr_fast.adapters import EncoderAdapter, adapter_for
from attattr_fast.errors import AttAttrError
from attattr_fast.inputs import (
    allows_autograd,
    as_dtype,
    check_backend,
    check_options,
    evaluation_mode,
    row_dtype,
    validate_inputs,
)
from attattr_fast.reductions import masked_head_max, top_interactions
from attattr_fast.result import AttributionResult

_IMPLEMENTATION = "attattr_reference"


class _Substitution:
    """What the attention function does now: record A, or replace one layer's A by a given matrix."""

    def __init__(self):
        self.layer_of: dict[int, int] = {}
        self.record: dict[int, Tensor] | None = None
        self.layer: int | None = None
        self.matrix: Tensor | None = None


_current = _Substitution()


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = _current.layer_of[id(module)]
    if _current.layer == layer:
        probs = _current.matrix
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
    if _current.record is not None:
        _current.record[layer] = probs.detach()
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(_IMPLEMENTATION, eager_mask)


def _transformers_model(model: torch.nn.Module):
    """The PreTrainedModel whose config selects the attention implementation."""
    return model if hasattr(model, "set_attn_implementation") else model.base_model


@contextlib.contextmanager
def _substituting(model: torch.nn.Module):
    _register()
    owner = _transformers_model(model)
    previous = owner.config._attn_implementation
    base = model.base_model
    _current.layer_of = {id(layer.attention.self): i for i, layer in enumerate(base.encoder.layer)}
    owner.set_attn_implementation(_IMPLEMENTATION)
    try:
        with evaluation_mode(model):
            yield
    finally:
        owner.set_attn_implementation(previous)
        _current.__init__()


def _probability(model, ids, types, target) -> Tensor:
    logits = model(input_ids=ids, token_type_ids=types).logits
    return torch.softmax(logits.double(), dim=-1)[0, target]


@allows_autograd
def attribute(
    model: torch.nn.Module,
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
    """Same arguments and result as `AttentionAttribution.attribute`; `model` is a model or its adapter without
    gates switched off (the model's own forward has none). `dtype` is the dtype the whole model
    runs in (None: float32, float64 models stay float64); `backend` is checked and ignored, as is
    `internal_batch_size`: every node is its own forward and backward."""
    alphas, weights = check_options(method, n_steps, output, dtype, internal_batch_size, top_k)
    dtype, top_k = as_dtype(dtype), int(top_k)
    meta = adapter_for(model)  # only for the model's sizes
    if isinstance(model, EncoderAdapter):  # the reference runs the model's own forward, which has no head gates
        if not torch.equal(model.gates_in_effect, model.present_heads.float()):
            raise AttAttrError("the reference runs the model's own forward, which has no head gates: prune the "
                               "gated heads (pruning.prune_heads) and pass the pruned model")  # fmt: skip
        model = model.model
    if any(t.is_inference() for t in (*model.parameters(), *model.buffers())):
        raise AttAttrError("the model's weights were made under torch.inference_mode(), and the reference runs the "
                           "model's own autograd, which cannot use them: load the model outside inference mode")
    device = meta.device
    input_ids = input_ids.to(device) if isinstance(input_ids, Tensor) else input_ids
    key_mask, token_type_ids, target, layers = validate_inputs(
        meta, input_ids, attention_mask, token_type_ids, target, layers
    )
    check_backend(backend)
    compute_dtype = row_dtype(meta.dtype, dtype)
    if compute_dtype != meta.dtype:
        model = copy.deepcopy(model).to(compute_dtype)
    batch, length = input_ids.shape
    n_heads = meta.n_heads
    # the original numbers of each layer's heads (a pruned model's removed heads stay zero, as in the engine)
    heads_of = [list(range(n_heads)) if meta.kept_heads is None else meta.kept_heads[layer]
                for layer in range(meta.n_layers)]  # fmt: skip
    lengths = key_mask.sum(1)
    f32 = dict(dtype=torch.float32)
    attributions = torch.zeros(batch, len(layers), n_heads, length, length, **f32)
    attention = torch.zeros_like(attributions)
    prob = torch.zeros(batch, **f32)
    baseline = torch.zeros(batch, len(layers), **f32)
    targets = torch.zeros(batch, dtype=torch.long)

    with _substituting(model):
        for b in range(batch):
            n = int(lengths[b])
            ids = input_ids[b : b + 1, :n]
            types = None if token_type_ids is None else token_type_ids[b : b + 1, :n]
            _current.record, _current.layer = {}, None
            with torch.no_grad():
                logits = model(input_ids=ids, token_type_ids=types).logits
            real = _current.record
            _current.record = None
            if len(real) != sum(1 for heads in heads_of if heads):  # a layer without heads computes no attention
                raise AttAttrError(f"{type(model).__name__} does not compute attention through transformers' "
                                   "AttentionInterface (transformers >= 5.0 needed)")
            t = int(logits.argmax(-1)) if target is None else int(target[b])
            targets[b] = t
            prob[b] = float(torch.softmax(logits.double(), dim=-1)[0, t])
            for li, layer in enumerate(layers):
                if not heads_of[layer]:  # pruned of every head: F does not depend on this layer's (empty) attention
                    baseline[b, li] = prob[b]
                    continue
                probs = real[layer]
                grad_sum = torch.zeros_like(probs, dtype=torch.float64)
                for alpha, weight in zip(alphas, weights):
                    scaled = (float(alpha) * probs).requires_grad_(True)
                    _current.layer, _current.matrix = layer, scaled
                    with torch.enable_grad():  # whatever grad mode the caller is in
                        (grad,) = torch.autograd.grad(_probability(model, ids, types, t), scaled)
                    grad_sum += float(weight) * grad.double()
                _current.layer, _current.matrix = layer, torch.zeros_like(probs)
                with torch.no_grad():
                    baseline[b, li] = float(_probability(model, ids, types, t))
                _current.layer = None
                attr = (probs.double() * grad_sum)[0]
                attributions[b, li, heads_of[layer], :n, :n] = attr.float()
                attention[b, li, heads_of[layer], :n, :n] = probs[0].float()

    # Σ in float64 over the same float32 values the caller sees
    attr_sum = attributions.double().sum(dim=(-1, -2, -3))
    delta = (attr_sum - (prob.double().unsqueeze(1) - baseline.double())).float()
    layer_attr = attributions.sum(dim=2)
    head_max, head_argmax = masked_head_max(attributions, key_mask.cpu().unsqueeze(1))
    top = top_interactions(layer_attr, key_mask.cpu().unsqueeze(1), top_k) if top_k else None
    full = output == "full"
    result = AttributionResult(
        attributions=attributions if full else None,
        attention=attention if full else None,
        head_max=head_max,
        head_argmax=head_argmax,
        layer_attr=layer_attr,
        target=targets,
        prob=prob,
        delta=delta,
        top_k=top,
        layers=layers,
        lengths=lengths.cpu(),
        baseline=baseline,
        method=method,
        n_steps=n_steps,
        model_layers=meta.n_layers,
    )
    device_out = torch.device(result_device)
    for name, value in vars(result).items():
        if isinstance(value, Tensor):
            setattr(result, name, value.to(device_out))
    return result
