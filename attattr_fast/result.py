"""The result of an attribution call, shared by the engine and the reference."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from attattr_fast.reductions import TopInteractions


@dataclass
class AttributionResult:
    """Attribution scores of a batch; B examples, L' = len(layers) target layers, n tokens.

    attributions: float32 [B, L', H, n, n], zero where query or key is padding (None if "reduced").
    attention:    float32 [B, L', H, n, n] attention probabilities (None if "reduced").
    head_max:     float32 [B, L', H] signed max of each head's attributions over real (i, j).
    head_argmax:  long [B, L', H, 2] the (i, j) where that maximum is (first in row-major order).
    layer_attr:   float32 [B, L', n, n] sum over heads (the attribution graph's layer matrix).
    target:       long [B] the attributed class.
    prob:         float32 [B] F, the target's probability at the real input.
    delta:        float32 [B, L'] Σ attributions − (F(A) − F(layer's attention = 0)).
    top_k:        the k strongest (i, j, score) of each layer matrix, [B, L', k] each (None if k = 0).
    """

    attributions: Tensor | None
    attention: Tensor | None
    head_max: Tensor
    head_argmax: Tensor
    layer_attr: Tensor
    target: Tensor
    prob: Tensor
    delta: Tensor
    top_k: TopInteractions | None = None
    layers: list[int] = field(default_factory=list)
    lengths: Tensor | None = None  # long [B] real tokens per example
    baseline: Tensor | None = None  # float32 [B, L'] F with the layer's attention set to zero
    method: str = "riemann_right"
    n_steps: int = 20
    model_layers: int | None = None  # encoder layers of the model (a graph needs the scores of all of them)
