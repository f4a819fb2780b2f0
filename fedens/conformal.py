"""Split-conformal prediction sets from a (federated) predictive (docs/methods.md#conformal).

Scores (non-conformity of label y for input x, higher = stranger), from predictive
probabilities ``p`` ``(n, classes)``:

- ``lac`` (least ambiguous set-valued classifier; Sadinle, Lei, Wasserman 2019, *Least Ambiguous
  Set-Valued Classifiers with Bounded Error Levels*): ``s(x, y) = 1 - p_y(x)``.
- ``aps`` (adaptive prediction sets; Romano, Sesia, Candès 2020, *Classification with Valid and
  Adaptive Coverage*), non-randomised: ``s(x, y) = sum_{y': p_y' >= p_y} p_y'``, the mass of the
  labels at least as likely as y, y included.

The set of x is ``{y : s(x, y) <= q}``. Thresholds ``q`` from calibration scores (the true
labels' scores on held-out data):

- ``split_quantile``: the exact split-conformal quantile (Vovk, Gammerman, Shafer 2005; Lei et
  al. 2018): the ``ceil((n + 1)(1 - alpha))``-th smallest of the n scores, +inf if that exceeds
  n. For exchangeable calibration and test points, ``P(y in set) >= 1 - alpha``, and
  ``<= 1 - alpha + 1/(n + 1)`` when scores have no ties.
- ``quantile_of_quantiles``: one-shot federated conformal prediction (Humbert, Le Bars, Bellet,
  Arlot 2023, *One-Shot Federated Conformal Prediction*): every client j sends only its local
  ``k_j``-th smallest score, ``k_j = ceil((n_j + 1)(1 - alpha))`` (its own split-conformal
  order), and the server takes the ``l``-th smallest of those m values, with l the smallest
  order whose exact coverage ``qoq_coverage`` is at least ``1 - alpha``. Departure: the paper
  chooses (l, k) jointly for equal n_j; fedens fixes each client's k_j (clients may differ in
  size) and chooses l, with the coverage computed exactly for those sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SCORES = ("lac", "aps")


def label_scores(probs: torch.Tensor, kind: str) -> torch.Tensor:
    """The score of every label: ``(n, classes)`` from predictive probabilities ``(n, classes)``."""
    p = probs.detach().double().cpu()
    if kind == "lac":
        return 1.0 - p
    if kind == "aps":
        # s(x, y) = sum of p_y' over labels with p_y' >= p_y: sort descending, cumulative sum,
        # and give tied labels the largest cumulative mass of their tie (so ties share a score)
        order = p.argsort(dim=1, descending=True)
        sorted_p = p.gather(1, order)
        cum = sorted_p.cumsum(1)  # (n, classes)
        for r in range(p.shape[1] - 2, -1, -1):  # a tie takes the mass up to its last member
            tied = sorted_p[:, r] == sorted_p[:, r + 1]
            cum[:, r] = torch.where(tied, cum[:, r + 1], cum[:, r])
        return torch.empty_like(p).scatter_(1, order, cum)
    raise ValueError(f"unknown conformal score {kind!r} (one of {', '.join(SCORES)})")


def true_scores(probs: torch.Tensor, labels: torch.Tensor, kind: str) -> np.ndarray:
    """The true labels' scores ``(n,)``: the calibration scores."""
    s = label_scores(probs, kind)
    return s.gather(1, labels.long().cpu().view(-1, 1)).squeeze(1).numpy()


def split_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``scores`` ``(n,)``; +inf if that order
    exceeds n (too few calibration points for this alpha: every set is every label)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = local_order(len(s), alpha)
    return float(s[k - 1]) if k <= len(s) else math.inf


def local_order(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``, the order of the split-conformal quantile of n scores (a
    tiny tolerance keeps e.g. (9 + 1) * 0.9 = 9 from rounding up to 10)."""
    return int(math.ceil((n + 1) * (1 - alpha) - 1e-9))


def qoq_coverage(ell: int, ns: Sequence[int], alpha: float, grid: int = 2000) -> float:
    """The coverage of order ``ell`` (``qoq_coverages``' entry ``ell - 1``)."""
    return float(qoq_coverages(ns, alpha, grid)[ell - 1])


def qoq_coverages(ns: Sequence[int], alpha: float, grid: int = 2000) -> np.ndarray:
    """Exact coverage of the quantile-of-quantiles threshold for i.i.d. continuous scores: the
    l-th smallest of the clients' local ``k_j``-th order statistics (``k_j = local_order(n_j)``;
    a client whose k_j exceeds n_j contributes +inf).

    With u = F(s) of the test score s uniform on (0, 1), client j's statistic is >= s iff fewer
    than k_j of its n_j scores are below s: probability ``b_j(u) = P(Bin(n_j, u) <= k_j - 1)``,
    independently over clients. The threshold is >= s iff at least ``m - l + 1`` statistics are,
    so ``coverage = int_0^1 P(PoissonBinomial(b(u)) >= m - l + 1) du``, integrated by the midpoint
    rule on ``grid`` points (error far below 1/grid for these smooth integrands). Returns the
    coverage of every order l = 1..m, ``(m,)``, from one pass (O(m² grid))."""
    from scipy.stats import binom

    m = len(ns)
    u = (np.arange(grid) + 0.5) / grid  # (G,)
    b = np.stack([binom.cdf(local_order(n, alpha) - 1, n, u) for n in ns])  # (m, G)
    # Poisson-binomial distribution of the count of statistics >= s, per grid point: (m + 1, G)
    dist = np.zeros((m + 1, grid))
    dist[0] = 1.0
    for j in range(m):
        dist[1:] = dist[1:] * (1 - b[j]) + dist[:-1] * b[j]
        dist[0] = dist[0] * (1 - b[j])
    at_least = np.cumsum(dist[::-1], axis=0)[::-1]  # [c] = P(count >= c), (m + 1, G)
    return at_least[m - np.arange(1, m + 1) + 1].mean(1)  # order l needs count >= m - l + 1


def qoq_threshold(local_quantiles: Sequence[float], ns: Sequence[int], alpha: float) -> tuple[float, int]:
    """``(q, l)``: the l-th smallest local quantile, l the smallest order with
    ``qoq_coverage >= 1 - alpha``; ``(inf, 0)`` when no order reaches it."""
    q = np.sort(np.asarray(local_quantiles, dtype=np.float64))
    grid = 2000 if len(q) <= 200 else 400  # the pass is O(m² grid)
    reached = np.nonzero(qoq_coverages(ns, alpha, grid) >= 1 - alpha)[0]  # coverage grows with l
    return (float(q[reached[0]]), int(reached[0]) + 1) if len(reached) else (math.inf, 0)


def set_metrics(probs: torch.Tensor, labels: torch.Tensor, q: float, kind: str) -> dict[str, float]:
    """Empirical ``coverage`` (share of inputs whose set holds the true label) and mean set
    ``size`` of ``{y : s(x, y) <= q}`` on ``(n, classes)`` predictive probabilities."""
    s = label_scores(probs, kind)
    inside = s <= q + 1e-12  # the threshold is one of the scores: float noise must not drop it
    hit = inside.gather(1, labels.long().cpu().view(-1, 1)).squeeze(1)
    return {"coverage": float(hit.double().mean()), "size": float(inside.double().sum(1).mean())}
