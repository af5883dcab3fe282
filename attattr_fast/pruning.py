"""Physical head pruning: a smaller model that computes what the gated model computes.

Gating head h of layer l (`EncoderAdapter.head_gates[l, h] = 0`) zeroes its context ctx_h before the
output projection, so W_o's columns of that head and the head's rows of W_q, W_k, W_v no longer
touch the result. Removing them gives a model with fewer parameters whose logits equal the gated
model's (up to float rounding):

    X' = LN(X + Σ_{h kept} W_o[:, h] ctx_h + b_o)

A layer left with no heads keeps only b_o (X' = LN(X + b_o)), which is what gating all its heads gives.

Saved models record the original indices of the kept heads per layer in their config
(`adapters.KEPT_HEADS_CONFIG_KEY`, a list of lists); `models.load_classifier` rebuilds the smaller
Linear shapes from it before loading the weights. `config.num_attention_heads` keeps its original
value so that the head size (hidden_size / num_attention_heads) is unchanged. Heads keep their original numbers
everywhere: here, and in the adapter of a pruned model, which puts the kept heads back in their places among
zero, gated heads so that it attributes, ranks and gates like the unpruned model with the same heads gated.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from attattr_fast.adapters import KEPT_HEADS_CONFIG_KEY
from attattr_fast.errors import AttAttrError, UnsupportedModelError

log = logging.getLogger(__name__)


class EmptySelfAttention(nn.Module):
    """Self-attention of a layer whose heads were all removed: a context of width 0.

    transformers' self-attention reshapes to (..., -1, head_size), which is undefined for zero heads,
    so this module stands in for it; the output projection (in_features = 0) then yields its bias.
    """

    def __init__(self, head_size: int):
        super().__init__()
        self.attention_head_size = head_size
        self.num_attention_heads = 0
        self.all_head_size = 0

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(layer, "attention") for layer in layers):
        raise UnsupportedModelError(f"{type(model).__name__}: no BERT-style encoder layers to prune")
    return list(layers)


def _head_size(model: nn.Module) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


def current_heads(model: nn.Module) -> list[list[int]]:
    """The original indices of the heads each layer has now (all heads for an unpruned model)."""
    kept = getattr(model.config, KEPT_HEADS_CONFIG_KEY, None)
    if kept is not None:
        return [list(map(int, heads)) for heads in kept]
    return [list(range(model.config.num_attention_heads)) for _ in range(model.config.num_hidden_layers)]


def kept_heads_from_gates(gates: Tensor) -> list[list[int]]:
    """Indices of the heads with gate 1 in each layer; gates [L, H] must be exactly 0 or 1."""
    if not isinstance(gates, Tensor) or gates.dim() != 2:
        raise AttAttrError("gates must be a tensor of shape [layers, heads]")
    if not bool(((gates == 0) | (gates == 1)).all()):
        raise AttAttrError("physical pruning needs gates of exactly 0 (removed) or 1 (kept)")
    return [torch.nonzero(row == 1).flatten().tolist() for row in gates.cpu()]


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: Tensor) -> None:
    weight = linear.weight.detach()[:, columns].clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.in_features = len(columns)


def _shrink_layer(layer: nn.Module, keep: list[int], head_size: int) -> None:
    """Keep heads `keep` (indices into the layer's current heads) of one encoder layer, in place."""
    attention = layer.attention
    device = attention.output.dense.weight.device
    index = torch.tensor(keep, dtype=torch.long, device=device)
    # head h owns features h·d … h·d + d − 1 of Q, K, V and of the output projection's input
    features = (index.view(-1, 1) * head_size + torch.arange(head_size, device=device)).flatten()
    _keep_columns(attention.output.dense, features)
    if not keep:
        attention.self = EmptySelfAttention(head_size)
        return
    for name in ("query", "key", "value"):
        _keep_rows(getattr(attention.self, name), features)
    attention.self.num_attention_heads = len(keep)
    attention.self.all_head_size = len(keep) * head_size


def prune_heads(model: nn.Module, keep: Tensor | list[list[int]], inplace: bool = False) -> nn.Module:
    """Remove heads physically. Heads are numbered as in the unpruned model, before pruning or after.

    Args:
        model: a BERT / RoBERTa / ELECTRA *ForSequenceClassification (or the built-in model), pruned
            before or not.
        keep: gates [L, H] as a tensor or numpy array (1 kept, 0 removed; a head removed before stays removed,
            as gating cannot switch it back on), or for every layer a list of the heads to keep, each one the
            layer still has.
        inplace: modify `model` itself rather than a deep copy.

    Returns:
        The pruned model in eval mode; its config records the kept heads of each layer.
    """
    layers = _encoder_layers(model)
    have = current_heads(model)
    n_heads = model.config.num_attention_heads
    if isinstance(keep, np.ndarray):  # an array is gates, as a tensor is; nested lists are head numbers
        keep = torch.from_numpy(keep)
    if isinstance(keep, Tensor):
        if tuple(keep.shape) != (len(layers), n_heads):
            raise AttAttrError(f"gates have shape {tuple(keep.shape)}; this model has {len(layers)} layers of "
                               f"{n_heads} heads")  # fmt: skip
        keep = [sorted(set(on) & set(heads)) for on, heads in zip(kept_heads_from_gates(keep), have)]
    if len(keep) != len(layers):
        raise AttAttrError(f"keep lists {len(keep)} layers; the model has {len(layers)}")
    for layer_index, (wanted, heads) in enumerate(zip(keep, have)):
        if len(set(wanted)) != len(wanted) or any(not 0 <= h < n_heads for h in wanted):
            raise AttAttrError(f"layer {layer_index}: heads {wanted} must be distinct, in 0..{n_heads - 1}")
        gone = sorted(set(wanted) - set(heads))
        if gone:
            raise AttAttrError(f"layer {layer_index}: heads {gone} were removed before; it has {heads}")
    if not inplace:
        model = copy.deepcopy(model)
        layers = _encoder_layers(model)
    head_size = _head_size(model)
    kept = [sorted(int(h) for h in wanted) for wanted in keep]
    for layer, wanted, heads in zip(layers, kept, have):
        _shrink_layer(layer, [heads.index(h) for h in wanted], head_size)
    setattr(model.config, KEPT_HEADS_CONFIG_KEY, kept)
    removed = sum(len(h) for h in have) - sum(len(k) for k in kept)
    log.info("pruned %d heads; heads per layer now %s", removed, [len(k) for k in kept])
    return model.eval()


def load_pruned(path: str | Path, config) -> nn.Module:
    """A pruned checkpoint saved with `save_pretrained`: build the full model from its config, shrink it
    to the recorded heads, then load the weights (their own dtype). Used by `models.load_classifier`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    kept = getattr(config, KEPT_HEADS_CONFIG_KEY)
    if len(kept) != config.num_hidden_layers:
        raise AttAttrError(
            f"{path}: {KEPT_HEADS_CONFIG_KEY} lists {len(kept)} layers, the config has {config.num_hidden_layers}"
        )
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise AttAttrError(f"{path}: a pruned model needs its weights in model.safetensors")
    state = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    full = copy.deepcopy(config)
    delattr(full, KEPT_HEADS_CONFIG_KEY)
    model = AutoModelForSequenceClassification.from_config(full)
    n_heads = config.num_attention_heads
    for layer_index, heads in enumerate(kept):
        if len(set(heads)) != len(heads) or any(not 0 <= int(h) < n_heads for h in heads):
            raise AttAttrError(
                f"{path}: layer {layer_index} keeps heads {heads}, expected distinct indices in 0..{n_heads - 1}"
            )
    prune_heads(model, [[int(h) for h in heads] for heads in kept], inplace=True)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise AttAttrError(f"{path}: the weights do not match the pruned shapes ({str(exc).splitlines()[0]})") from None
    return model.eval()


@torch.inference_mode()
def seconds_per_forward(model: nn.Module, batches: list[dict[str, Tensor]], repeats: int = 10,
                        warmup: int = 2) -> float:
    """Median wall time of one pass of `model` over all `batches` (dicts of model inputs)."""
    model.eval()
    device = next(model.parameters()).device
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speedup(original: nn.Module, pruned: nn.Module, batches: list[dict[str, Tensor]],
                    repeats: int = 10) -> dict[str, float]:
    """Times both models on the same batches, alternating so that load changes hit both alike.

    Returns {"original_s", "pruned_s", "speedup"} (seconds per pass over the batches; speedup =
    original / pruned).
    """
    original_times, pruned_times = [], []
    for _ in range(repeats):
        original_times.append(seconds_per_forward(original, batches, repeats=1, warmup=1))
        pruned_times.append(seconds_per_forward(pruned, batches, repeats=1, warmup=1))
    t0, t1 = statistics.median(original_times), statistics.median(pruned_times)
    return {"original_s": t0, "pruned_s": t1, "speedup": t0 / t1}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
