"""The attribution formula and its reductions: the one place for this math (both backends use it).

    Attr_h = A_h ⊙ (Ḡ_h V_hᵀ),   Ḡ_h = Σ_k w_k ∂F/∂ctx_h(α_k)        (DESIGN §2.1)

Shapes: A [..., H, n, n], V and Ḡ [..., H, n, d]; `valid` [..., n] marks real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def pair_mask(valid: Tensor) -> Tensor:
    """[..., n, n] True where both the query i and the key j are real tokens."""
    return valid.unsqueeze(-1) & valid.unsqueeze(-2)


def attribution_from_context_grad(probs: Tensor, values: Tensor, context_grad: Tensor) -> Tensor:
    """A ⊙ (Ḡ Vᵀ) in float32: [..., H, n, n]."""
    return probs.float() * torch.matmul(context_grad.float(), values.float().transpose(-1, -2))


def masked_head_max(attr: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Signed maximum over real (i, j) of every head and where it is (first in row-major order).

    [..., H, n, n] → (max [..., H], argmax long [..., H, 2] holding (i, j)).
    """
    keep = pair_mask(valid).unsqueeze(-3)
    flat = attr.masked_fill(~keep, float("-inf")).flatten(-2)
    value, index = flat.max(dim=-1)
    n = attr.shape[-1]
    return value, torch.stack([index // n, index % n], dim=-1)


@dataclass
class TopInteractions:
    """The k strongest (query i, key j) entries of each layer matrix, strongest first.

    query, key: long [..., k] (−1 where the example has fewer than k real pairs);
    score: float32 [..., k] (NaN there).
    """

    query: Tensor
    key: Tensor
    score: Tensor


def top_interactions(layer_attr: Tensor, valid: Tensor, k: int) -> TopInteractions:
    """Top-k of `layer_attr` [..., n, n] over real pairs; ties broken by (i, j) ascending."""
    n = layer_attr.shape[-1]
    keep = pair_mask(valid)
    flat = layer_attr.float().masked_fill(~keep, float("-inf")).flatten(-2)
    k_eff = min(k, n * n)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :k_eff]
    score = torch.gather(flat, -1, order)
    present = torch.isfinite(score)
    query = torch.where(present, order // n, -1)
    key = torch.where(present, order % n, -1)
    score = torch.where(present, score, float("nan"))
    if k_eff < k:
        pad = [*score.shape[:-1], k - k_eff]
        query = torch.cat([query, query.new_full(pad, -1)], -1)
        key = torch.cat([key, key.new_full(pad, -1)], -1)
        score = torch.cat([score, score.new_full(pad, float("nan"))], -1)
    return TopInteractions(query=query, key=key, score=score)
