"""Quadrature rules for the path integral ∫_0^1 f(α) dα, with captum's method names.

``n_steps`` is the number of sub-intervals of [0, 1] for the Riemann rules and the number of nodes
for Gauss–Legendre. Left, right and middle evaluate one node per sub-interval; the trapezoid rule
evaluates both ends of every sub-interval, so it uses ``n_steps + 1`` nodes (it equals the mean of
the left and right sums, which is what makes it second-order).
"""

from __future__ import annotations

import numpy as np

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


MAX_STEPS = 1024  # more is a typo more likely than a need, and a run that seems to hang (an n² node computation)


def too_many_steps(n_steps: int, name: str) -> str | None:
    """Why `n_steps` (the option `name`) is more than MAX_STEPS, or None."""
    if n_steps > MAX_STEPS:
        return f"{name} {n_steps} is more than {MAX_STEPS}, which no float32 result needs (Gauss–Legendre converges " \
               "within 64 nodes)"
    return None


def nodes_and_weights(method: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α_k in [0, 1] and weights w_k with Σ_k w_k f(α_k) ≈ ∫_0^1 f(α) dα.

    Args:
        method: one of ``METHODS``.
        n_steps: number of sub-intervals (Riemann rules) or nodes (Gauss–Legendre), at least 1.

    Returns:
        (alphas, weights): float64 arrays of equal length, alphas ascending, weights summing to 1.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if too_many := too_many_steps(n_steps, "n_steps"):
        raise ValueError(too_many)
    m = int(n_steps)
    k = np.arange(m, dtype=np.float64)
    if method == "riemann_left":
        return k / m, np.full(m, 1.0 / m)
    if method == "riemann_right":
        return (k + 1) / m, np.full(m, 1.0 / m)
    if method == "riemann_middle":
        return (k + 0.5) / m, np.full(m, 1.0 / m)
    if method == "riemann_trapezoid":
        alphas = np.arange(m + 1, dtype=np.float64) / m
        weights = np.full(m + 1, 1.0 / m)
        weights[[0, -1]] = 0.5 / m
        return alphas, weights
    x, w = np.polynomial.legendre.leggauss(m)
    return (x + 1.0) / 2.0, w / 2.0
