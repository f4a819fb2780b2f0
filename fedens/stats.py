"""Statistics over seeds: means with Student-t intervals, and paired comparisons.

A comparison runs every variant once per seed, and a seed fixes the split, the initialisation
and all client randomness; so two variants run on the same seeds are paired, and their
difference per seed removes the variation that the seed causes in both. Everything here is a
pure function of plain lists of numbers.

- ``summary(xs)``: n, mean, standard deviation (n - 1 in the denominator) and the 95% interval
  ``mean ± t_{0.975, n-1} · sd / sqrt(n)`` (Student t; no interval for n < 2).
- ``paired(xs, ys)``: the same for the differences ``x_i - y_i`` over the seeds both have, and
  the two-sided p-value of the paired t-test ``t = mean(d) / (sd(d) / sqrt(n))`` with n - 1
  degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Paired:
    """The mean difference (variant - reference) over common seeds, its interval, the paired
    t-test's p-value and the seeds used."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    seeds: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "seeds": list(self.seeds)}


def t_quantile(q: float, dof: int) -> float:
    """The q-quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(q, dof))


def t_two_sided_p(t_value: float, dof: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(2 * t.sf(abs(t_value), dof))


def summary(xs: Sequence[float | None], level: float = LEVEL) -> Summary:
    """Mean, standard deviation and the Student-t interval of the finite values of ``xs``."""
    values = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired(xs: Mapping[int, float | None], ys: Mapping[int, float | None], level: float = LEVEL) -> Paired:
    """``xs`` and ``ys`` map seed -> value; the differences ``x - y`` on the seeds where both are
    finite, summarised as in ``summary``, with the paired t-test's two-sided p-value. Equal
    differences on every seed (sd 0) give p = 0 unless they are all 0 (p = 1)."""
    seeds = tuple(sorted(s for s in xs if s in ys and _finite(xs[s]) and _finite(ys[s])))
    d = [float(xs[s]) - float(ys[s]) for s in seeds]
    base = summary(d, level)
    p = None
    if base.n >= 2 and base.std is not None:
        if base.std == 0:
            p = 1.0 if base.mean == 0 else 0.0
        else:
            p = t_two_sided_p(base.mean / (base.std / math.sqrt(base.n)), base.n - 1)
    return Paired(base.n, base.mean, base.std, base.ci_low, base.ci_high, p, seeds)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(float(x))


def curve_band(curves: Sequence[Sequence[tuple[int, float]]], level: float = LEVEL) -> list[tuple[int, float, float, float]]:
    """Per round, over runs: ``(round, mean, ci_low, ci_high)`` of the runs that have a value at
    that round (the interval collapses to the mean where only one run has one)."""
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for r, v in curve:
            if _finite(v):
                by_round.setdefault(int(r), []).append(float(v))
    out = []
    for r in sorted(by_round):
        s = summary(by_round[r], level)
        low = s.ci_low if s.ci_low is not None else s.mean
        high = s.ci_high if s.ci_high is not None else s.mean
        out.append((r, s.mean, low, high))
    return out
