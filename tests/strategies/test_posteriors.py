"""Aggregating diagonal Gaussian posteriors (docs/methods.md#posterior-avg and after): ``posterior_avg``,
``posterior_product``, ``uncertainty_merge``."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.strategies import STRATEGIES
from fedens.algorithms.arrays import precision_weighted_average
from fedens.strategies.posterior_avg import PosteriorAveraging
from fedens.strategies.posterior_product import PosteriorProduct, posterior_product
from fedens.strategies.uncertainty_merge import UncertaintyMerge, gradient_matching_merge

HALF = np.array([0.5, 0.5])


def posterior(mean, precision, **rest) -> dict[str, np.ndarray]:
    """Arrays named as the ivon learner names them (one Linear layer ``0``)."""
    out = {"mean.0.weight": np.asarray(mean, dtype=np.float32), "precision.0.weight": np.asarray(precision, dtype=np.float32)}
    out.update({k: np.asarray(v, dtype=np.float32) for k, v in rest.items()})
    return out


def test_registered_and_for_gaussian_posteriors_only():
    for name, cls in (("posterior_avg", PosteriorAveraging), ("posterior_product", PosteriorProduct), ("uncertainty_merge", UncertaintyMerge)):
        assert STRATEGIES.get(name) is cls and cls.supported_learners == ("ivon", "ivon_mixture")


# --------------------------------------------------------------------------- posterior_avg


def test_posterior_avg_two_1d_gaussians_by_hand():
    m, s = precision_weighted_average([np.array([0.0]), np.array([4.0])], [np.array([1.0]), np.array([3.0])], HALF)
    assert m == pytest.approx([3.0]) and s == pytest.approx([2.0])  # S = (1+3)/2, m = (0 + 3*4)/2 / 2


def test_posterior_avg_through_the_strategy():
    arrays = [posterior([[0.0, 1.0]], [[1.0, 2.0]], **{"1.running_mean": [1.0]}),
              posterior([[4.0, 1.0]], [[3.0, 6.0]], **{"1.running_mean": [3.0]})]
    out = PosteriorAveraging().aggregate_arrays(1, arrays, HALF)
    assert set(out) == set(arrays[0])
    np.testing.assert_allclose(out["mean.0.weight"], [[3.0, 1.0]])
    np.testing.assert_allclose(out["precision.0.weight"], [[2.0, 4.0]])
    np.testing.assert_allclose(out["1.running_mean"], [2.0])  # plain average
    assert out["mean.0.weight"].dtype == np.float32
    # unequal weights: S = 0.25*1 + 0.75*3, m = 0.75*3*4 / S
    out = PosteriorAveraging().aggregate_arrays(1, arrays, np.array([0.25, 0.75]))
    assert out["precision.0.weight"][0, 0] == pytest.approx(2.5) and out["mean.0.weight"][0, 0] == pytest.approx(9 / 2.5)


def test_posterior_avg_equal_precisions_is_fedavg():
    rng = np.random.default_rng(0)
    ms = [rng.normal(size=(3, 4)) for _ in range(3)]
    w = np.array([0.2, 0.3, 0.5])
    m, s = precision_weighted_average(ms, [np.full((3, 4), 7.0)] * 3, w)
    np.testing.assert_allclose(m, sum(wk * mk for wk, mk in zip(w, ms)))
    np.testing.assert_allclose(s, 7.0)


# --------------------------------------------------------------------------- posterior_product


def conjugate_posterior(x: np.ndarray, y: np.ndarray, s0: float, noise_var: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior of Bayesian linear regression y = x w + noise, prior N(0, I/s0), as
    (mean, diagonal precision); the design must make x^T x diagonal."""
    gram = x.T @ x
    assert np.allclose(gram, np.diag(np.diag(gram)))
    precision = s0 + np.diag(gram) / noise_var
    mean = np.linalg.solve(s0 * np.eye(x.shape[1]) + gram / noise_var, x.T @ y / noise_var)
    return mean, precision


def test_posterior_product_equals_centralised_bayesian_linear_regression():
    rng = np.random.default_rng(7)
    d, s0, noise_var = 5, 0.5, 0.3
    w_true = rng.normal(size=d)
    # Orthogonal design: every row is a scaled unit vector, so every Gram matrix is diagonal
    # and the exact posteriors are diagonal Gaussians.
    xs, ys = [], []
    for n in (20, 35, 12):
        x = np.zeros((n, d))
        x[np.arange(n), rng.integers(0, d, n)] = rng.uniform(0.5, 2.0, n)
        xs.append(x)
        ys.append(x @ w_true + rng.normal(0, np.sqrt(noise_var), n))
    central_m, central_s = conjugate_posterior(np.vstack(xs), np.concatenate(ys), s0, noise_var)
    client = [conjugate_posterior(x, y, s0, noise_var) for x, y in zip(xs, ys)]

    m, s = posterior_product([c[0] for c in client], [c[1] for c in client], 0.0, s0)
    np.testing.assert_allclose(m, central_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s, central_s, rtol=1e-12)

    # through the strategy (float64 arrays keep the comparison exact)
    arrays = [{"mean.0.weight": c[0], "precision.0.weight": c[1]} for c in client]
    out = PosteriorProduct(prior_precision=s0).aggregate_arrays(1, arrays, np.array([20, 35, 12]) / 67)
    np.testing.assert_allclose(out["mean.0.weight"], central_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["precision.0.weight"], central_s, rtol=1e-12)


def test_posterior_product_floor_and_global_prior():
    # element 0: S = 1 + 3 - (2 - 1) * 5 < 0: floored at min_precision, mean = precision-weighted
    # mean (1*1 + 3*3) / 4; element 1 (S = 10 + 30 - 5 > 0) follows the product formula
    m, s = posterior_product([np.array([1.0, 1.0]), np.array([3.0, 3.0])], [np.array([1.0, 10.0]), np.array([3.0, 30.0])],
                             0.0, 5.0, min_precision=1e-3)
    np.testing.assert_allclose(s, [1e-3, 35.0])
    np.testing.assert_allclose(m, [2.5, 100 / 35])
    # prior "global": clients that did not move from the global posterior return it
    glob = posterior([[0.5, -2.0]], [[4.0, 9.0]])
    strat = PosteriorProduct(prior="global")
    strat.global_arrays = glob
    out = strat.aggregate_arrays(2, [dict(glob) for _ in range(3)], np.full(3, 1 / 3))
    np.testing.assert_allclose(out["mean.0.weight"], glob["mean.0.weight"], rtol=1e-6)
    np.testing.assert_allclose(out["precision.0.weight"], glob["precision.0.weight"], rtol=1e-6)
    with pytest.raises(ValueError, match="global"):
        PosteriorProduct(prior="global").aggregate_arrays(1, [glob, glob], HALF)


# --------------------------------------------------------------------------- uncertainty_merge


def test_uncertainty_merge_equal_precisions_is_the_plain_average():
    """docs/methods.md#uncertainty-merge: plain averaging is a special case (equal H_t, alpha = 1/K)."""
    rng = np.random.default_rng(3)
    theta0, h0 = rng.normal(size=(4, 3)), rng.uniform(0.1, 5, (4, 3))
    thetas, h = [rng.normal(size=(4, 3)) for _ in range(3)], rng.uniform(1, 9, (4, 3))
    merged = gradient_matching_merge(theta0, h0, thetas, [h] * 3, alpha=1 / 3)
    np.testing.assert_allclose(merged, np.mean(thetas, axis=0), rtol=1e-12, atol=1e-12)


def test_uncertainty_merge_two_clients_by_hand():
    # theta0 = 0, H0 = 1; clients (1, H=1) and (4, H=3); alpha = 1/2, delta0 = 0:
    # H_bar = (1 + 3)/2 + 1 = 3; theta = 1/2 * ((1+1)/3 * 1 + (1+3)/3 * 4) = 1/2 * 6 = 3
    m = gradient_matching_merge(np.array([0.0]), np.array([1.0]), [np.array([1.0]), np.array([4.0])],
                                [np.array([1.0]), np.array([3.0])], alpha=0.5, delta0=0.0)
    assert m == pytest.approx([3.0])

    strat = UncertaintyMerge()  # alpha = 1/K, delta0 = 1e-12
    strat.global_arrays = posterior([[0.0, 2.0]], [[1.0, 1.0]], **{"1.running_var": [1.0]})
    arrays = [posterior([[1.0, 2.0]], [[1.0, 5.0]], **{"1.running_var": [2.0]}),
              posterior([[4.0, 2.0]], [[3.0, 5.0]], **{"1.running_var": [4.0]})]
    out = strat.aggregate_arrays(1, arrays, HALF)
    np.testing.assert_allclose(out["mean.0.weight"], [[3.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(out["precision.0.weight"], [[2.0, 5.0]])  # documented: sum_k w_k H_k
    np.testing.assert_allclose(out["1.running_var"], [3.0])


def test_uncertainty_merge_needs_the_global_posterior():
    arrays = [posterior([1.0], [1.0]), posterior([2.0], [1.0])]
    with pytest.raises(ValueError, match="global"):
        UncertaintyMerge().aggregate_arrays(1, arrays, HALF)


@pytest.mark.parametrize("cls, kwargs", [
    (PosteriorProduct, {"prior": "flat"}), (PosteriorProduct, {"prior_precision": 0.0}), (PosteriorProduct, {"min_precision": -1.0}),
    (UncertaintyMerge, {"alpha": 0.0}), (UncertaintyMerge, {"alpha": float("inf")}), (UncertaintyMerge, {"delta0": -1e-3}),
])
def test_bad_params_rejected(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_missing_precision_rejected():
    with pytest.raises(ValueError, match="precision"):
        PosteriorAveraging().aggregate_arrays(1, [{"mean.0.weight": np.ones(2)}] * 2, HALF)


def test_posterior_product_sends_clients_the_global_split_over_k():
    """From round 2 on the clients start from S_g / K (a fractional prior), so that the product
    does not count the global K times; the strategy's own global keeps S_g."""
    strat = PosteriorProduct()
    first = posterior([1.0], [8.0])
    assert strat.outgoing(1, first) is first  # nothing merged yet
    strat.global_arrays = {}
    new = strat.aggregate_arrays(1, [posterior([1.0], [4.0]), posterior([3.0], [6.0])], np.array([0.5, 0.5]))
    # S_g = 4 + 6 - 1 * 0.01; the clients get half of it
    assert new["precision.0.weight"] == pytest.approx([9.99])
    sent = strat.outgoing(2, new)
    assert sent["precision.0.weight"] == pytest.approx([9.99 / 2]) and sent["mean.0.weight"] is new["mean.0.weight"]
    off = PosteriorProduct(split_global=False)
    off.aggregate_arrays(1, [posterior([1.0], [4.0]), posterior([3.0], [6.0])], np.array([0.5, 0.5]))
    assert off.outgoing(2, new) is new


def test_posterior_product_with_a_split_global_multiplies_the_replies_once():
    """Clients that started from S_g / K each hold one share of the global, so the product is
    their plain natural-parameter sum; a client that did not reply is missing its share."""
    strat = PosteriorProduct()
    strat.aggregate_arrays(1, [posterior([0.0], [1.0]), posterior([0.0], [1.0])], np.array([0.5, 0.5]))
    sent = strat.outgoing(2, posterior([1.0], [8.0]))  # global (1, 8) split over K = 2: shares (1, 4)
    strat.global_arrays = sent
    both = strat.aggregate_arrays(2, [posterior([2.0], [6.0]), posterior([4.0], [10.0])], np.array([0.5, 0.5]))
    # S = 6 + 10 = 16; m = (12 + 40) / 16 = 3.25 (no prior divided out)
    assert both["precision.0.weight"] == pytest.approx([16.0]) and both["mean.0.weight"] == pytest.approx([3.25])
    strat.global_arrays = strat.outgoing(3, posterior([1.0], [8.0]))
    one = strat.aggregate_arrays(3, [posterior([2.0], [6.0])], np.array([1.0]))
    # the missing client's share (1, 4) multiplied in: S = 6 + 4 = 10; m = (12 + 4) / 10 = 1.6
    assert one["precision.0.weight"] == pytest.approx([10.0]) and one["mean.0.weight"] == pytest.approx([1.6])


def test_a_reply_with_a_non_positive_precision_is_rejected_not_fatal():
    s = PosteriorAveraging()
    assert s.reject_reason(posterior([[0.0, 1.0]], [[1.0, 2.0]])) is None
    assert s.reject_reason(posterior([[0.0, 1.0]], [[1.0, 0.0]])) == "precision.0.weight has non-positive values"
    assert s.reject_reason(posterior([[0.0, 1.0]], [[-3.0, 2.0]])) is not None


def test_round_facts_travel_in_the_returned_metrics():
    from flwr.app import MetricRecord

    from fedens.strategies.base import round_facts, with_facts

    m = with_facts(MetricRecord({"train_loss": 0.5}), {"rejected_by_strategy": 2, "swarm_weights": [0.25, 0.75]})
    assert m["train_loss"] == 0.5  # the aggregated client metrics stay as Flower's
    assert round_facts(m) == {"rejected_by_strategy": 2, "swarm_weights": [0.25, 0.75]}
    assert round_facts(None) == {} and round_facts(MetricRecord({"train_loss": 1.0})) == {}
