import numpy as np
import pytest

from attattr_fast.quadrature import METHODS, nodes_and_weights


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_steps", [1, 2, 7, 20])
def test_nodes_in_unit_interval_and_weights_sum_to_one(method, n_steps):
    alphas, weights = nodes_and_weights(method, n_steps)
    assert alphas.shape == weights.shape
    assert np.all((alphas >= 0) & (alphas <= 1))
    assert np.all(np.diff(alphas) > 0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_riemann_rules_match_their_closed_forms():
    m = 4
    f = lambda a: a**2  # noqa: E731
    left = sum(f(k / m) for k in range(m)) / m
    right = sum(f(k / m) for k in range(1, m + 1)) / m
    middle = sum(f((k + 0.5) / m) for k in range(m)) / m
    for method, expected in [("riemann_left", left), ("riemann_right", right), ("riemann_middle", middle)]:
        a, w = nodes_and_weights(method, m)
        assert np.dot(w, f(a)) == pytest.approx(expected, abs=1e-15)
    a, w = nodes_and_weights("riemann_trapezoid", m)
    assert np.dot(w, f(a)) == pytest.approx((left + right) / 2, abs=1e-15)


def test_paper_and_release_nodes():
    a, _ = nodes_and_weights("riemann_right", 20)  # the paper's Eq. 4: k/m, k = 1..m
    assert a[0] == pytest.approx(0.05) and a[-1] == 1.0
    a, _ = nodes_and_weights("riemann_left", 64)  # the authors' release: (k-1)/m
    assert a[0] == 0.0 and a[-1] == pytest.approx(63 / 64)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_gauss_legendre_is_exact_to_degree_2m_minus_1(m):
    a, w = nodes_and_weights("gausslegendre", m)
    for degree in range(2 * m):
        assert np.dot(w, a**degree) == pytest.approx(1.0 / (degree + 1), abs=1e-13)
    # and not beyond: degree 2m is integrated with an error (visible in float64 for small m)
    if m <= 5:
        assert abs(np.dot(w, a ** (2 * m)) - 1.0 / (2 * m + 1)) > 1e-10


def test_second_order_rules_converge_faster():
    f = np.exp
    exact = np.e - 1
    err = {method: [abs(np.dot(w, f(a)) - exact) for a, w in (nodes_and_weights(method, m) for m in (10, 20))]
           for method in ("riemann_right", "riemann_middle", "riemann_trapezoid")}  # fmt: skip
    assert err["riemann_right"][0] / err["riemann_right"][1] == pytest.approx(2, rel=0.1)
    assert err["riemann_middle"][0] / err["riemann_middle"][1] == pytest.approx(4, rel=0.05)
    assert err["riemann_trapezoid"][0] / err["riemann_trapezoid"][1] == pytest.approx(4, rel=0.05)


@pytest.mark.parametrize("method, n_steps", [("simpson", 4), ("riemann_right", 0), ("gausslegendre", -1),
                                             ("riemann_left", 2.5), ("riemann_left", True)])
def test_bad_arguments_raise(method, n_steps):
    with pytest.raises(ValueError):
        nodes_and_weights(method, n_steps)
