"""Head importance and head pruning (the paper's §5.2, Figures 3, 5 and 6).

Importance of head h of layer l, each a mean over labelled examples x with gold class y:

    attattr    E_x[ max_ij Attr_h(A^l)(i, j) ]                  signed max, target = y (Eq. 5)
    taylor     E_x[ |∂ CE(x, y) / ∂ξ_h| ]  at ξ = 1            ξ_h: the head's gate (Michel et al. 2019);
               = |Σ_ij A_h ⊙ ∂CE/∂A_h|, since ctx_h = ξ_h A_h V_h   (Eq. 6)
    accuracy   acc(all heads) − acc(head h gated off)
    attention  E_x[ max_ij A_h(i, j) ]                         the attention-score baseline of Figure 3
               (a head's mean over (i, j) is 1/n for every head, since rows sum to 1, so the max is
               what can rank heads)

`normalize="layer"` divides each layer's scores by their L2 norm, as Michel et al. do.

Gating (`EncoderAdapter.head_gates`, 0 = the head's context is zero) is how heads are pruned here;
`attattr_fast.pruning` then removes gated heads physically. Pruning curves rank all heads globally
and gate the least important 0 %, 10 %, …, 100 %; the per-layer effectiveness analysis gates, within
one layer at a time, the k heads with the largest or the smallest score, k = 0 … H. Accuracy is
measured on examples disjoint from those the scores came from (`split_indices`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attattr_fast.adapters import EncoderAdapter, Weights, adapter_for
from attattr_fast.errors import AttAttrError, NonFiniteScores
from attattr_fast.inputs import allows_autograd, check_options, validate_inputs
from attattr_fast.reductions import masked_head_max

log = logging.getLogger(__name__)

KINDS = ("attattr", "taylor", "accuracy", "attention")
NORMALIZATIONS = (None, "layer")
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))


# -- inputs ----------------------------------------------------------------------------------------
@dataclass
class LabelledInputs:
    """A right-padded batch with gold classes: input_ids, attention_mask, token_type_ids [B, n]; labels [B]."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None
    labels: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, index: list[int] | Tensor) -> LabelledInputs:
        """The examples at `index`, trimmed to their longest real length."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.attention_mask[index]
        n = int(mask.sum(1).max())
        types = None if self.token_type_ids is None else self.token_type_ids[index, :n]
        return LabelledInputs(self.input_ids[index, :n], mask[:, :n], types, self.labels[index])


def encode_labelled(tokenizer, examples, labels: list[int], max_length: int = 512) -> LabelledInputs:
    """Tokenised `examples` (datasets.Example) with their class indices (see glue.class_indices)."""
    from attattr_fast.text import encode

    if len(labels) != len(examples):
        raise AttAttrError(f"{len(labels)} labels for {len(examples)} examples")
    enc = encode(tokenizer, [e.text for e in examples], [e.text_pair for e in examples], max_length=max_length)
    return LabelledInputs(enc.input_ids, enc.attention_mask, enc.token_type_ids, torch.tensor(labels, dtype=torch.long))


def split_indices(labels: list[int] | Tensor, n_first: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint index lists, `n_first` and the rest, with the classes in both in proportion
    (each class shuffled with `seed`, then split by its share; rounding is settled in class order)."""
    labels = [int(x) for x in labels]
    n = len(labels)
    if not 0 < n_first < n:
        raise AttAttrError(f"cannot take {n_first} of {n} examples for importance and keep some for evaluation")
    g = torch.Generator().manual_seed(seed)
    classes = sorted(set(labels))
    pools = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    pools = {c: [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()] for c, pool in pools.items()}
    take = {c: math.floor(n_first * len(pools[c]) / n) for c in classes}
    for c in classes:  # hand out what flooring left over, one per class while it has examples left
        if sum(take.values()) == n_first:
            break
        if take[c] < len(pools[c]):
            take[c] += 1
    first = sorted(i for c in classes for i in pools[c][: take[c]])
    rest = sorted(i for c in classes for i in pools[c][take[c] :])
    return first, rest


def _check_labels(adapter: EncoderAdapter, input_ids: Tensor, labels: Tensor) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype != torch.long or labels.dim() != 1:
        raise AttAttrError("labels must be a LongTensor of shape [batch]")
    if isinstance(input_ids, Tensor) and input_ids.dim() == 2 and labels.shape[0] != input_ids.shape[0]:
        raise AttAttrError(f"{labels.shape[0]} labels for {input_ids.shape[0]} examples")
    if bool(((labels < 0) | (labels >= adapter.num_labels)).any()):
        raise AttAttrError(f"labels out of range: the model has {adapter.num_labels} classes")
    return labels


def _chunks(key_mask: Tensor, batch_size: int) -> list[tuple[Tensor, int]]:
    """(example indices, their longest length) of batches of similar length."""
    lengths = key_mask.sum(1).cpu()
    order = torch.sort(lengths, stable=True).indices
    return [(idx, int(lengths[idx].max())) for idx in torch.split(order, batch_size)]


def _prepared(model, input_ids, labels, attention_mask, token_type_ids):
    adapter = adapter_for(model)
    device = adapter.device
    if not isinstance(input_ids, Tensor):
        raise AttAttrError("input_ids must be a LongTensor of shape [batch, length]")
    input_ids = input_ids.to(device)
    labels = _check_labels(adapter, input_ids, labels).to(device)
    key_mask, token_type_ids, _, _ = validate_inputs(adapter, input_ids, attention_mask, token_type_ids, None, None)
    return adapter, input_ids, labels, key_mask, token_type_ids


def _take(idx: Tensor, n: int, input_ids: Tensor, key_mask: Tensor, types: Tensor | None):
    idx = idx.to(input_ids.device)
    return input_ids[idx, :n], key_mask[idx, :n], None if types is None else types[idx, :n]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


# -- the model through the adapter, entered at any layer --------------------------------------------
def _run_layers(adapter: EncoderAdapter, w: Weights, x: Tensor, key_mask: Tensor, start: int = 0,
                multipliers: Tensor | None = None, keep_inputs: bool = False, keep_probs: bool = False):
    """Layers start … L−1 from their input x; returns (logits [B, C], inputs X^l, attention probs).

    `multipliers` [B, L, H] scale each example's head contexts on top of the gates (for per-example
    gate gradients).
    """
    bias = adapter.mask_bias(key_mask, w.dtype)
    inputs, probs_of = [], []
    for layer in range(start, adapter.n_layers):
        if keep_inputs:
            inputs.append(x)
        lw = w.layers[layer]
        q, k, v = adapter.project_qkv(lw, x)
        probs, _ = adapter.attention_probs(q, k, bias)
        if keep_probs:
            probs_of.append(probs)
        context = probs @ v
        if multipliers is not None:
            context = context * multipliers[:, layer, :, None, None].to(context.dtype)
        x = adapter.layer_output(lw, w.layer_gates[layer], context, x)
    return adapter.classify(w, x, key_mask).float(), inputs, probs_of


def _tally(logits: Tensor, labels: Tensor) -> tuple[int, float]:
    """(correct predictions, Σ softmax probability of the gold class) of a batch."""
    gold = torch.softmax(logits.float(), dim=-1).gather(-1, labels.view(-1, 1))
    return int((logits.argmax(-1) == labels).sum()), float(gold.double().sum())


@torch.no_grad()
def evaluate_gates(
    model: torch.nn.Module | EncoderAdapter,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    gates: Tensor | None = None,
    batch_size: int = 64,
) -> tuple[float, float]:
    """(accuracy, mean softmax probability of the gold class) against `labels` [B] with head `gates`
    [L, H] (None: the adapter's own)."""
    _check_batch_size(batch_size)
    adapter, input_ids, labels, key_mask, types = _prepared(model, input_ids, labels, attention_mask, token_type_ids)
    w = adapter.weights()
    if gates is not None:
        w = replace(w, gates=_checked_gates(adapter, gates).to(device=w.gates.device, dtype=w.dtype))
    correct, gold = 0, 0.0
    for idx, n in _chunks(key_mask, batch_size):
        ids, mask, tt = _take(idx, n, input_ids, key_mask, types)
        x = adapter.embed(ids, tt, mask, w.dtype)
        logits, _, _ = _run_layers(adapter, w, x, mask)
        c, p = _tally(logits, labels[idx.to(labels.device)])
        correct, gold = correct + c, gold + p
    return correct / len(labels), gold / len(labels)


def accuracy(
    model: torch.nn.Module | EncoderAdapter,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    gates: Tensor | None = None,
    batch_size: int = 64,
) -> float:
    """Accuracy of argmax logits against `labels` [B] with head `gates` [L, H] (None: the adapter's own)."""
    return evaluate_gates(model, input_ids, labels, attention_mask, token_type_ids, gates, batch_size)[0]


def _checked_gates(adapter: EncoderAdapter, gates: Tensor) -> Tensor:
    if not isinstance(gates, Tensor) or tuple(gates.shape) != (adapter.n_layers, adapter.n_heads):
        shape = tuple(gates.shape) if isinstance(gates, Tensor) else type(gates).__name__
        raise AttAttrError(f"gates must have shape ({adapter.n_layers}, {adapter.n_heads}), got {shape}")
    if not bool(torch.isfinite(gates).all()):
        raise AttAttrError("gates must be finite numbers (1 = kept, 0 = gated off)")
    return gates


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttAttrError(f"batch_size must be a positive integer, got {batch_size!r}")


# -- importance --------------------------------------------------------------------------------------
@allows_autograd
def head_importance(
    model: torch.nn.Module | EncoderAdapter,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    kind: str = "attattr",
    n_steps: int = 20,
    method: str = "riemann_right",
    normalize: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Importance of every head, float32 [L, H] on the CPU (definitions in the module docstring).

    Args:
        model: a supported classifier, or its adapter (whose `head_gates` then apply: heads gated
            off score 0 under "taylor" and "accuracy", and the others are scored with them off).
        input_ids: LongTensor [B, n], right-padded.
        labels: LongTensor [B], the gold classes (the attribution target and the loss's class).
        attention_mask: [B, n] of 1/0 (None: no padding). token_type_ids: [B, n] (None: all 0).
        kind: "attattr" | "taylor" | "accuracy" | "attention".
        n_steps, method: the quadrature of "attattr" (see `AttentionAttribution.attribute`).
        normalize: None (raw means) or "layer" (each layer divided by its L2 norm).
        batch_size: examples per forward (and per `attribute` call).
        progress: show a progress bar.
        backend: the attribution backend of "attattr" ("auto", "triton" or "torch").
    """
    if kind not in KINDS:
        raise AttAttrError(f"unknown importance kind {kind!r}; choose one of {', '.join(KINDS)}")
    if normalize not in NORMALIZATIONS:
        raise AttAttrError(f"unknown normalize {normalize!r}; choose None or 'layer'")
    _check_batch_size(batch_size)
    if kind == "attattr":
        check_options(method, n_steps, "reduced", None, None, 0)
    adapter, input_ids, labels, key_mask, types = _prepared(model, input_ids, labels, attention_mask, token_type_ids)
    scores = {
        "attattr": _attattr_scores,
        "taylor": _taylor_scores,
        "accuracy": _accuracy_scores,
        "attention": _attention_scores,
    }[kind](adapter, input_ids, labels, key_mask, types, batch_size=batch_size, n_steps=n_steps, method=method,
            progress=progress, backend=backend)  # fmt: skip
    if not bool(torch.isfinite(scores).all()):
        raise AttAttrError(f"the {kind} importance is not finite (NaN or inf): the model's outputs or gradients "
                           "are; its weights may be broken (a fine-tuning run that diverged?)")  # fmt: skip
    return normalize_scores(scores.float().cpu(), normalize)


def normalize_scores(scores: Tensor, normalize: str | None) -> Tensor:
    """`scores` [L, H] as they are (None) or with each layer divided by its L2 norm ("layer"; a layer
    of zeros stays zero)."""
    if normalize is None:
        return scores
    if normalize != "layer":
        raise AttAttrError(f"unknown normalize {normalize!r}; choose None or 'layer'")
    norm = scores.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, scores / norm.clamp_min(torch.finfo(scores.dtype).tiny), scores)


def _attattr_scores(adapter, input_ids, labels, key_mask, types, *, batch_size, n_steps, method, progress, backend):
    from attattr_fast.api import AttentionAttribution

    aa = AttentionAttribution(adapter)
    total = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
    chunks = _chunks(key_mask, batch_size)
    with _progress(len(labels), "attattr importance", progress) as bar:
        for idx, n in chunks:
            ids, mask, tt = _take(idx, n, input_ids, key_mask, types)
            try:
                res = aa.attribute(ids, mask.long(), tt, target=labels[idx.to(labels.device)], n_steps=n_steps,
                                   method=method, output="reduced", backend=backend)  # fmt: skip
            except NonFiniteScores as exc:  # named by its position in the input, not in the chunk
                raise exc.renamed(f"example {int(idx[exc.position])}") from None
            total += res.head_max.double().sum(0).cpu()
            bar.update(len(idx))
    return total / len(labels)


def _taylor_scores(adapter, input_ids, labels, key_mask, types, *, batch_size, progress, **_):
    w = adapter.weights()
    total = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
    with _progress(len(labels), "taylor importance", progress) as bar:
        for idx, n in _chunks(key_mask, batch_size):
            ids, mask, tt = _take(idx, n, input_ids, key_mask, types)
            with torch.enable_grad():
                # one gate copy per example: the examples are independent, so the gradient of the summed
                # loss with respect to copy b is example b's own gate gradient
                xi = torch.ones(len(idx), adapter.n_layers, adapter.n_heads, device=ids.device, requires_grad=True)
                x = adapter.embed(ids, tt, mask, w.dtype)
                logits, _, _ = _run_layers(adapter, w, x, mask, multipliers=xi)
                loss = F.cross_entropy(logits, labels[idx.to(labels.device)], reduction="sum")
                (grad,) = torch.autograd.grad(loss, xi)
            total += grad.double().abs().sum(0).cpu()
            bar.update(len(idx))
    return total / len(labels)


@torch.no_grad()
def _attention_scores(adapter, input_ids, labels, key_mask, types, *, batch_size, progress, **_):
    w = adapter.weights()
    total = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
    for idx, n in _chunks(key_mask, batch_size):
        ids, mask, tt = _take(idx, n, input_ids, key_mask, types)
        x = adapter.embed(ids, tt, mask, w.dtype)
        _, _, probs = _run_layers(adapter, w, x, mask, keep_probs=True)
        for layer, p in enumerate(probs):
            total[layer] += masked_head_max(p.float(), mask)[0].double().sum(0).cpu()
    return total / len(labels) * adapter.present_heads  # a pruned model's removed heads attend nowhere


def _gated_accuracies(adapter: EncoderAdapter, input_ids, labels, key_mask, types,
                      layer_gates: list[tuple[int, Tensor]], batch_size: int, progress: bool,
                      desc: str) -> list[tuple[float, float]]:
    """(accuracy, mean gold probability) for each (layer l, gates of layer l [H]) with every other
    layer at the adapter's gates.

    Layers below l do not depend on l's gates, so their output X^l is computed once per batch.
    """
    w = adapter.weights()
    correct, gold_prob = [0] * len(layer_gates), [0.0] * len(layer_gates)
    chunks = _chunks(key_mask, batch_size)
    with _progress(len(chunks) * len(layer_gates), desc, progress) as bar:
        with torch.no_grad():
            for idx, n in chunks:
                ids, mask, tt = _take(idx, n, input_ids, key_mask, types)
                gold = labels[idx.to(labels.device)]
                x = adapter.embed(ids, tt, mask, w.dtype)
                _, inputs, _ = _run_layers(adapter, w, x, mask, keep_inputs=True)
                for c, (layer, gates) in enumerate(layer_gates):
                    all_gates = w.gates.clone()
                    all_gates[layer] = gates.to(all_gates)
                    logits, _, _ = _run_layers(adapter, replace(w, gates=all_gates), inputs[layer], mask, start=layer)
                    right, prob = _tally(logits, gold)
                    correct[c] += right
                    gold_prob[c] += prob
                    bar.update(1)
    return [(c / len(labels), p / len(labels)) for c, p in zip(correct, gold_prob)]


def _accuracy_scores(adapter, input_ids, labels, key_mask, types, *, batch_size, progress, **_):
    base = adapter.gates_in_effect
    configs = []
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            gates = base[layer].clone()
            gates[head] = 0.0
            configs.append((layer, gates))
    full = accuracy(adapter, input_ids, labels, key_mask.long(), types, batch_size=max(batch_size, 64))
    gated = _gated_accuracies(adapter, input_ids, labels, key_mask, types, configs, max(batch_size, 64), progress,
                              "accuracy importance")  # fmt: skip
    return full - torch.tensor([a for a, _ in gated], dtype=torch.float64).view(adapter.n_layers, adapter.n_heads)


# -- pruning curves ----------------------------------------------------------------------------------
def gates_for_fraction(importance: Tensor, fraction: float, on: Tensor | None = None) -> Tensor:
    """Gates [L, H] with the round(fraction · N) least important of the N heads `on` (bool [L, H]; None: every
    head) off, and the heads not on off as well (global ranking; ties go in flat (layer, head) order)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise AttAttrError(f"fraction must be a number in [0, 1], got {fraction!r}")
    importance = torch.as_tensor(importance)
    if not bool(torch.isfinite(importance).all()):  # a NaN would sort last and never be pruned
        raise AttAttrError("the importance scores must be finite (a NaN or inf cannot be ranked)")
    if on is not None and tuple(on.shape) != tuple(importance.shape):
        raise AttAttrError(f"on has shape {tuple(on.shape)}, the importance {tuple(importance.shape)}")
    flat = importance.detach().float().flatten().cpu()
    on_flat = torch.ones(flat.shape, dtype=torch.bool) if on is None else on.detach().flatten().cpu().bool()
    count = int((~on_flat).sum()) + math.floor(fraction * int(on_flat.sum()) + 0.5)
    order = torch.sort(torch.where(on_flat, flat, -math.inf), stable=True).indices  # heads not on come first
    gates = torch.ones_like(flat)
    gates[order[:count]] = 0.0
    return gates.view(importance.shape)


def pruning_curves(
    model: torch.nn.Module | EncoderAdapter,
    importance: dict[str, Tensor],
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Accuracy with the least important heads gated, by a global ranking of each importance [L, H]. Heads the
    adapter already gates stay off, and the fractions count the heads it has on: at fraction f the round(f · on)
    lowest-ranked of those go off too ("heads_gated" counts every head off).

    Returns {"fractions": [...], "heads_gated": [...], "n_examples": B,
             "accuracy": {kind: [accuracy at each fraction]},
             "gold_probability": {kind: [mean softmax probability of the gold class at each fraction]}}.
    """
    adapter = adapter_for(model)
    fractions = tuple(float(f) for f in fractions)
    own_gates = adapter.gates_in_effect
    on = own_gates != 0
    counts = [int((gates_for_fraction(own_gates, f, on) == 0).sum()) for f in fractions]
    acc, prob = {}, {}
    with _progress(len(importance) * len(fractions), "pruning curves", progress) as bar:
        for kind, scores in importance.items():
            _checked_gates(adapter, scores)
            acc[kind], prob[kind] = [], []
            for fraction in fractions:
                gates = gates_for_fraction(scores, fraction, on) * own_gates
                a, p = evaluate_gates(adapter, input_ids, labels, attention_mask, token_type_ids, gates, batch_size)
                acc[kind].append(a)
                prob[kind].append(p)
                bar.update(1)
    return {"fractions": list(fractions), "heads_gated": counts, "n_examples": int(input_ids.shape[0]),
            "accuracy": acc, "gold_probability": prob}  # fmt: skip


def layer_effectiveness(
    model: torch.nn.Module | EncoderAdapter,
    scores: dict[str, Tensor],
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Figure 3: within each layer alone, gate the k heads with the largest (or smallest) score.

    Returns {"accuracy": {kind: {"largest_first": [L][H + 1], "smallest_first": [L][H + 1]}},
             "gold_probability": {the same layout}}: entry [l][k] with the k heads of layer l with the
    largest (smallest) score gated and every other layer intact. An adapter's own gates stay: heads it gates are
    gated in every entry.
    """
    adapter, input_ids, labels, key_mask, types = _prepared(model, input_ids, labels, attention_mask, token_type_ids)
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    base = adapter.gates_in_effect
    plans: dict[tuple, int] = {}  # identical gate settings (k = 0, k = H, ties) are evaluated once
    configs: list[tuple[int, Tensor]] = []
    slots: dict[str, dict[str, list[list[int]]]] = {}
    for kind, s in scores.items():
        _checked_gates(adapter, s)
        slots[kind] = {}
        for direction, descending in (("largest_first", True), ("smallest_first", False)):
            rows = []
            for layer in range(n_layers):
                order = torch.sort(s[layer].float().cpu(), descending=descending, stable=True).indices
                row = []
                for k in range(n_heads + 1):
                    gates = base[layer].clone()
                    gates[order[:k]] = 0.0
                    key = (layer, *gates.tolist())
                    if key not in plans:
                        plans[key] = len(configs)
                        configs.append((layer, gates))
                    row.append(plans[key])
                rows.append(row)
            slots[kind][direction] = rows
    acc = _gated_accuracies(adapter, input_ids, labels, key_mask, types, configs, batch_size, progress,
                            "layer effectiveness")  # fmt: skip
    return {metric: {kind: {d: [[acc[i][m] for i in row] for row in rows] for d, rows in by_dir.items()}
                     for kind, by_dir in slots.items()}
            for m, metric in enumerate(("accuracy", "gold_probability"))}  # fmt: skip


def importance_correlation(a: Tensor, b: Tensor, on: Tensor | None = None) -> float:
    """Pearson correlation of two importance maps [L, H] over all heads (Figure 6), or over the heads `on`
    ([L, H] bool: a pruned model's removed heads score 0 in both maps, which says nothing)."""
    if a.shape != b.shape:
        raise AttAttrError(f"importance maps of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.double().flatten(), b.double().flatten()
    if on is not None:
        x, y = x[on.flatten()], y[on.flatten()]
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    if denom == 0.0:
        raise AttAttrError("a constant importance map has no correlation")
    return float((x @ y) / denom)


# -- plots -------------------------------------------------------------------------------------------
def _save_figure(fig, path: str | Path) -> Path:
    """Write atomically: a temporary file beside `path`, then rename."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


KIND_STYLE = {"attattr": ("tab:red", "o"), "taylor": ("tab:blue", "s"), "accuracy": ("tab:green", "^"),
              "attention": ("tab:gray", "x")}  # fmt: skip


def plot_pruning_curves(curves: dict, path: str | Path, title: str = "") -> Path:
    """Figure 5: accuracy (left) and mean gold-class probability (right) against the fraction of heads
    gated, one line per importance kind."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [100 * f for f in curves["fractions"]]
    for ax, metric, label in ((axes[0], "accuracy", "accuracy (%)"),
                              (axes[1], "gold_probability", "mean gold-class probability (%)")):
        for kind, values in curves[metric].items():
            color, marker = KIND_STYLE.get(kind, (None, "."))
            ax.plot(x, [100 * v for v in values], marker=marker, color=color, label=kind)
        ax.set_xlabel("heads gated, least important first (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Pruning heads by importance")
    axes[0].set_title(f"{curves['n_examples']} held-out examples", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_layer_effectiveness(effect: dict, path: str | Path, title: str = "", metric: str = "accuracy") -> Path:
    """Figure 3: `metric` ("accuracy" or "gold_probability") against k heads gated within a layer;
    the first panel averages the layers. Solid: smallest scores first; dashed: largest first."""
    from matplotlib.ticker import MaxNLocator

    if metric not in effect:
        raise AttAttrError(f"unknown metric {metric!r}; choose accuracy or gold_probability")
    plt = _pyplot()
    effect = effect[metric]
    kinds = list(effect)
    n_layers = len(next(iter(effect.values()))["largest_first"])
    n_heads = len(next(iter(effect.values()))["largest_first"][0]) - 1
    cols = 4
    rows = math.ceil((n_layers + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True, sharey=True, squeeze=False)
    k = list(range(n_heads + 1))
    for panel, ax in enumerate(axes.flat):
        if panel > n_layers:
            ax.axis("off")
            continue
        for kind in kinds:
            color, _ = KIND_STYLE.get(kind, (None, "."))
            for direction, style in (("smallest_first", "-"), ("largest_first", "--")):
                table = torch.tensor(effect[kind][direction])
                curve = table.mean(0) if panel == 0 else table[panel - 1]
                ax.plot(k, (100 * curve).tolist(), style, color=color,
                        label=f"{kind}, {direction.replace('_', ' ')}")  # fmt: skip
        ax.set_title("mean over layers" if panel == 0 else f"layer {panel - 1}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("heads gated in the layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "gold-class probability (%)")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.04 * (3 / rows)))
    fig.suptitle(title or "Gating heads within one layer: by attribution vs attention score")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_importance(scores: dict[str, Tensor], path: str | Path, title: str = "") -> Path:
    """Heat maps [L, H] of each importance kind."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.0), squeeze=False)
    for ax, (kind, s) in zip(axes[0], scores.items()):
        image = ax.imshow(s.float().numpy(), cmap="viridis", aspect="auto")
        ax.set_title(kind)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_correlation(a: Tensor, b: Tensor, path: str | Path, names: tuple[str, str] = ("A", "B"),
                     title: str = "", on: Tensor | None = None) -> Path:
    """Figure 6: scatter of two importance maps, one point per head (of the heads `on`), with Pearson's r."""
    plt = _pyplot()
    keep = torch.ones(a.numel(), dtype=torch.bool) if on is None else on.flatten()
    fig, ax = plt.subplots(figsize=(4.0, 4.0))
    ax.scatter(a.flatten()[keep].numpy(), b.flatten()[keep].numpy(), s=14, alpha=0.7)
    ax.set_xlabel(f"importance on {names[0]}")
    ax.set_ylabel(f"importance on {names[1]}")
    ax.set_title(title or f"Pearson r = {importance_correlation(a, b, on):.3f}")
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)
