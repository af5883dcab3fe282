"""The baselines the engine is measured against, written on top of transformers' own model.

`naive_attribute` is the loop that users of the original AttAttr release know: for every example
(padded to a fixed 128 tokens), every layer l and every chunk of 16 scaled copies α_k·A^l of that
layer's attention, the whole model runs forward with layer l's attention replaced by the copies, and
autograd gives ∂F/∂(α_k A^l); a left Riemann sum (α_k = k/m, m = 64 for attribution, 20 for pruning)
times A^l is the attribution. Cost per example, in layer passes at 128 tokens: m·Σ_l (L + (L − l + 1)).

`captum_attribute` is how a Captum user would do AttAttr: `IntegratedGradients` on a forward whose
input is one layer's attention matrix, per example (at its real length) and per layer, all n_steps
points in one batch.

Both substitute the attention through transformers' `AttentionInterface` (an implementation name of
their own), so everything except the substituted matrix is computed by the transformers modules.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

IMPLEMENTATION = "attattr_bench_substitute"
NAIVE_LENGTH = 128  # the original release pads every example to max_seq_length = 128
NAIVE_CHUNK = 16  # scaled copies per forward in the original release


class _State:
    """Module-level switchboard read by the attention function."""

    def __init__(self):
        self.layer_of: dict[int, int] = {}
        self.layer: int | None = None  # the layer whose probabilities are replaced
        self.matrix: Tensor | None = None  # [R, H, n, n] replacement (broadcast over the batch)
        self.record: dict[int, Tensor] | None = None  # layer → detached probabilities


_state = _State()


def _substituting_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = _state.layer_of[id(module)]
    if layer == _state.layer:
        probs = _state.matrix
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
    if _state.record is not None:
        _state.record[layer] = probs.detach()
    context = torch.matmul(probs.to(value.dtype), value)
    return context.transpose(1, 2).contiguous(), probs


@contextlib.contextmanager
def substitution(model: torch.nn.Module):
    """Route `model`'s attention through `_substituting_attention` while the block runs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _substituting_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    owner = model if hasattr(model, "set_attn_implementation") else model.base_model
    previous = owner.config._attn_implementation
    _state.layer_of = {id(block.attention.self): i for i, block in enumerate(model.base_model.encoder.layer)}
    was_training = model.training
    model.eval()
    owner.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        owner.set_attn_implementation(previous)
        model.train(was_training)
        _state.__init__()


def _recorded_attention(model, ids: Tensor, mask: Tensor | None, types: Tensor | None) -> tuple[Tensor, dict]:
    """(logits [1, C], {layer: probabilities [1, H, n, n]}) of one plain forward."""
    _state.layer, _state.record = None, {}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    record, _state.record = _state.record, None
    return logits, record


def naive_attribute(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
    n_steps: int = 64,
    layers: list[int] | None = None,
    chunk: int = NAIVE_CHUNK,
    length: int = NAIVE_LENGTH,
) -> tuple[list[Tensor], Tensor]:
    """The original release's loop: left Riemann sum, chunks of `chunk` copies, padded to `length`.

    Args:
        input_ids, attention_mask, token_type_ids: [B, n] right-padded, n ≤ `length`.
        n_steps: m, the number of left Riemann points α_k = k/m, k = 0 … m−1.
        layers: target layers (None: all).

    Returns:
        (attributions, target): per example a float32 [L', H, n_b, n_b] tensor cropped to its real
        length n_b, and the predicted class of each example (long [B]).
    """
    device = next(model.parameters()).device
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    alphas = torch.arange(n_steps, dtype=torch.float32, device=device) / n_steps
    lengths = attention_mask.sum(1).tolist()
    results, targets = [], []
    with substitution(model):
        for b, n in enumerate(lengths):
            ids = torch.zeros(1, length, dtype=torch.long, device=device)
            mask = torch.zeros(1, length, dtype=torch.long, device=device)
            types = torch.zeros(1, length, dtype=torch.long, device=device)
            pad = model.config.pad_token_id or 0
            ids.fill_(pad)
            ids[0, :n] = input_ids[b, :n]
            mask[0, :n] = 1
            if token_type_ids is not None:
                types[0, :n] = token_type_ids[b, :n]
            logits, record = _recorded_attention(model, ids, mask, types)
            target = int(logits.argmax(-1))
            targets.append(target)
            per_layer = []
            for layer in layers:
                probs = record[layer]  # [1, H, 128, 128]
                grad_sum = torch.zeros_like(probs[0])
                for begin in range(0, n_steps, chunk):
                    alpha = alphas[begin : begin + chunk]
                    rows = len(alpha)
                    scaled = (alpha.view(-1, 1, 1, 1) * probs).requires_grad_(True)
                    _state.layer, _state.matrix = layer, scaled
                    out = model(input_ids=ids.expand(rows, -1), attention_mask=mask.expand(rows, -1),
                                token_type_ids=types.expand(rows, -1)).logits
                    prob = torch.softmax(out, dim=-1)[:, target]
                    (grad,) = torch.autograd.grad(prob.sum(), scaled)
                    grad_sum += grad.sum(0)
                    _state.layer, _state.matrix = None, None
                attr = probs[0] * grad_sum / n_steps
                per_layer.append(attr[:, :n, :n].float())
            results.append(torch.stack(per_layer))
    return results, torch.tensor(targets, dtype=torch.long)


def _attention_to_probabilities(model, ids: Tensor, types: Tensor | None, layer: int):
    """The function Captum integrates: layer `layer`'s attention [S, H, n, n] → class probabilities [S, C]."""

    def forward(matrix: Tensor) -> Tensor:
        rows = matrix.shape[0]
        _state.layer, _state.matrix = layer, matrix
        try:
            out = model(input_ids=ids.expand(rows, -1),
                        token_type_ids=None if types is None else types.expand(rows, -1)).logits
        finally:
            _state.layer, _state.matrix = None, None
        return torch.softmax(out, dim=-1)

    return forward


def captum_attribute(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
    n_steps: int = 20,
    method: str = "riemann_right",
    layers: list[int] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """AttAttr through `captum.attr.IntegratedGradients`, per example at its real length, per layer.

    The forward takes layer l's attention probabilities [S, H, n, n] (S = the n_steps scaled copies
    that Captum stacks) and returns the class probabilities; the baseline is the zero matrix, so
    Captum's (input − baseline) · mean gradient is A ⊙ ∫ ∂F/∂A dα.

    Returns:
        (attributions, target) as `naive_attribute`. Raises ImportError when captum is absent.
    """
    from captum.attr import IntegratedGradients

    device = next(model.parameters()).device
    layers = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
    lengths = attention_mask.sum(1).tolist()
    results, targets = [], []
    with substitution(model):
        for b, n in enumerate(lengths):
            ids = input_ids[b : b + 1, :n].to(device)
            types = None if token_type_ids is None else token_type_ids[b : b + 1, :n].to(device)
            logits, record = _recorded_attention(model, ids, None, types)
            target = int(logits.argmax(-1))
            targets.append(target)
            per_layer = []
            for layer in layers:
                forward = _attention_to_probabilities(model, ids, types, layer)
                probs = record[layer]
                attr = IntegratedGradients(forward).attribute(
                    probs, baselines=torch.zeros_like(probs), target=target, n_steps=n_steps, method=method
                )
                per_layer.append(attr[0].detach().float())
            results.append(torch.stack(per_layer))
    return results, torch.tensor(targets, dtype=torch.long)
