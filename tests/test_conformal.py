"""Split-conformal sets: scores by hand, the exact quantile, coverage within its finite-sample
bound over many seeded draws, the quantile-of-quantiles coverage formula against simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedens.conformal import label_scores, local_order, qoq_coverage, qoq_threshold, set_metrics, split_quantile, true_scores


def test_scores_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.5, 0.25]])
    np.testing.assert_allclose(label_scores(p, "lac"), [[0.5, 0.7, 0.8], [0.75, 0.5, 0.75]], atol=1e-7)
    # aps: mass of the labels at least as likely, the label included; tied labels share it
    np.testing.assert_allclose(label_scores(p, "aps"), [[0.5, 0.8, 1.0], [1.0, 0.5, 1.0]], atol=1e-7)
    assert true_scores(p, torch.tensor([1, 0]), "aps").tolist() == pytest.approx([0.8, 1.0])


def test_split_quantile_is_the_ceil_order_statistic():
    s = np.array([0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    assert split_quantile(s, 0.1) == 0.9  # ceil(10 * 0.9) = 9th smallest
    assert split_quantile(s, 0.2) == 0.8  # ceil(10 * 0.8) = 8th
    assert split_quantile(s, 0.05) == math.inf  # ceil(10 * 0.95) = 10 > 9: every label
    assert local_order(19, 0.1) == 18


@pytest.mark.parametrize("kind", ["lac", "aps"])
def test_coverage_meets_one_minus_alpha_within_its_finite_sample_bound(kind):
    # Exchangeable calibration and test points from one fixed noisy classifier: over 4000 seeded
    # draws the mean coverage lies in [1 - alpha, 1 - alpha + 1/(n + 1)], up to the simulation's error.
    rng = np.random.default_rng(0)
    n, alpha, classes, draws = 40, 0.1, 5, 4000
    covered = []
    for _ in range(draws):
        logits = rng.normal(size=(n + 1, classes))
        labels = np.array([rng.choice(classes, p=np.exp(row) / np.exp(row).sum()) for row in logits])
        probs = torch.softmax(torch.tensor(logits) * 0.7, 1)  # a miscalibrated model of the labels
        q = split_quantile(true_scores(probs[:n], torch.tensor(labels[:n]), kind), alpha)
        covered.append(set_metrics(probs[n:], torch.tensor(labels[n:]), q, kind)["coverage"])
    mean, err = float(np.mean(covered)), 3 * float(np.std(covered)) / math.sqrt(draws)
    assert 1 - alpha - err <= mean <= 1 - alpha + 1 / (n + 1) + err


def test_a_perfect_classifier_gives_sets_of_one_label():
    labels = torch.arange(10) % 4
    probs = torch.full((10, 4), 0.01 / 3)
    probs[torch.arange(10), labels] = 0.99
    for kind in ("lac", "aps"):
        q = split_quantile(true_scores(probs, labels, kind), 0.1)
        assert set_metrics(probs, labels, q, kind) == {"coverage": 1.0, "size": 1.0}


def test_quantile_of_quantiles_coverage_formula():
    # one client: the split-conformal coverage k/(n + 1) exactly
    assert qoq_coverage(1, [19], 0.1) == pytest.approx(18 / 20, abs=1e-9)
    # several clients of unequal size, against simulation of i.i.d. uniform scores
    ns, alpha, ell = [8, 15, 30, 12], 0.2, 2
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(20000):
        locals_ = [np.sort(rng.uniform(size=n))[local_order(n, alpha) - 1] for n in ns]
        hits.append(rng.uniform() <= np.sort(locals_)[ell - 1])
    assert qoq_coverage(ell, ns, alpha) == pytest.approx(float(np.mean(hits)), abs=0.01)
    # the chosen order is the smallest that reaches 1 - alpha
    q, chosen = qoq_threshold([0.4, 0.1, 0.3, 0.2], ns, alpha)
    assert qoq_coverage(chosen, ns, alpha) >= 1 - alpha > qoq_coverage(chosen - 1, ns, alpha)
    assert q == sorted([0.4, 0.1, 0.3, 0.2])[chosen - 1]
