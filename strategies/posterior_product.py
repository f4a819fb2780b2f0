"""``posterior_product``: the product of the K clients' diagonal Gaussian posteriors that share a
prior p0 = N(m0, diag(1/s0)) (docs/methods.md#posterior-product; standard Bayesian-committee
algebra: p(theta | D_1..D_K) ∝ prod_k p(theta | D_k) / p0(theta)^(K-1)). Element-wise:

    S_g = sum_k s_k - (K - 1) s0
    m_g = (sum_k s_k m_k - (K - 1) s0 m0) / S_g

Client k sends ``mean.<n>`` = m_k and ``precision.<n>`` = s_k (IVON: s_k = ess_k (hess_k + wd)).
With exact conjugate client posteriors (e.g. Bayesian linear regression with a diagonal posterior)
this is the centralised posterior exactly.

Params (scenario ``strategy.params``):
- ``prior``: "fixed" (default) or "global".
  - "fixed": p0 = N(0, 1/prior_precision), a scalar precision and m0 = 0. The ``ivon`` learner's
    own prior is client-specific (precision ess_k * weight_decay = n_k * 1e-4 by default), so one
    scalar is an approximation; the default ``prior_precision=0.01`` is that prior for a client of
    100 examples (digits with 10 clients has ~130 per client).
  - "global": p0 = the round's global posterior (``mean.*``/``precision.*`` the clients started
    from). In a multi-round run every client imports the global posterior as its starting point,
    so the global is the prior the clients share; with "fixed", K clients that barely moved give
    S_g ~ K * S_prev and the precision grows geometrically over rounds (fine for one-shot
    aggregation, the setting the algebra is for).
  Measured (digits, 3 clients, MLP [32], ivon, seed 3, 3 rounds; test accuracy / NLL after
  round 3): "fixed" 0.939 / 0.251, "global" 0.696 / 1.232 (worse after round 2: IVON's local mean
  moves are not "prior times likelihood" evidence, and dividing the global out K-1 times turns
  the merge into roughly theta_0 + sum_k (m_k - theta_0), the sum of the client updates, not
  their average). Hence "fixed" is the default; "global" is there for exact-posterior clients.
- ``prior_precision``: s0 for "fixed", > 0 (default 0.01).
- ``min_precision``: floor for S_g, > 0 (default 1e-8). Subtracting (K-1) s0 can leave S_g <= 0
  where the client posteriors are not really "prior times likelihood" (approximate posteriors,
  a large s0); there S_g is set to ``min_precision`` and the mean to the clients'
  precision-weighted mean sum_k s_k m_k / sum_k s_k (dividing by the tiny floor instead would send
  the mean to +-1e8 and wreck the network). Exact client posteriors never trigger it.

Multi-round use (``prior: fixed``): a client that imports the global posterior ``S_g`` as its
starting point returns ``s_k ≈ S_g + (its new evidence)``, so the product would count the global
K times and ``S_g`` would grow K-fold every round (it overflowed to NaN within 20 rounds of 20
clients). So from round 2 on the strategy sends the clients the global posterior with its
precision split evenly over the K clients of the last round, ``S_g / K`` (a fractional prior,
as in power EP): then ``sum_k s_k ≈ S_g + sum_k (new evidence)`` holds the global (and with it
the prior) exactly once, so nothing is divided out, and the mean update is the
precision-weighted average of the clients' moves, not their sum. If only K' < K clients reply,
the K − K' missing shares ``(m_g, S_g/K)`` are multiplied in. The server's own global
posterior (evaluated, checkpointed) keeps the full ``S_g``. ``split_global: false`` turns this
off (one-shot aggregation, or exact-posterior clients that use the global as a prior).

Decisions: non-posterior arrays (buffers) are the plain weighted average; the FedAvg weights are
not used by the product itself (each client's data enters through its likelihood, i.e. s_k); math
in float64, cast back to the arrays' dtype.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedens.options import Options as BaseOptions
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy, join_posterior, split_posterior, weighted_average


def posterior_product(
    means: list[np.ndarray], precisions: list[np.ndarray], prior_mean: np.ndarray | float, prior_precision: np.ndarray | float,
    min_precision: float = 1e-8, prior_count: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(m_g, S_g)`` in float64 (module docstring): the product of the K posteriors with the
    prior divided out ``prior_count`` times (default K - 1; negative multiplies it in). Where
    ``S_g <= min_precision`` it is set to ``min_precision`` and the mean to the
    precision-weighted mean ``sum_k s_k m_k / sum_k s_k``."""
    count = len(means) - 1 if prior_count is None else prior_count
    s = [np.asarray(p, dtype=np.float64) for p in precisions]
    ms = [np.asarray(m, dtype=np.float64) for m in means]
    s0 = np.asarray(prior_precision, dtype=np.float64)
    m0 = np.asarray(prior_mean, dtype=np.float64)
    raw = sum(s) - count * s0
    floored = raw <= min_precision
    total = np.where(floored, min_precision, raw)
    product_mean = (sum(sk * mk for sk, mk in zip(s, ms)) - count * s0 * m0) / np.where(floored, 1.0, raw)
    fallback = sum(sk * mk for sk, mk in zip(s, ms)) / np.maximum(sum(s), np.finfo(np.float64).tiny)
    mean = np.where(floored, fallback, product_mean)
    return mean, total


class PosteriorProductOptions(BaseOptions):
    prior: Literal["fixed", "global"] = Field("fixed", description="the prior divided out: N(0, 1/prior_precision) or the round's global")
    prior_precision: float = Field(0.01, gt=0, allow_inf_nan=False, description="precision of the fixed prior")
    min_precision: float = Field(1e-8, gt=0, allow_inf_nan=False, description="floor of the merged precision")
    split_global: bool = Field(True, description="send each client S_g / K (power EP; prior 'fixed' only)")


class PosteriorProduct(FedensStrategy):
    """Product of the clients' Gaussian posteriors divided by the shared prior K-1 times."""

    supported_learners = ("ivon", "ivon_mixture")
    Options = PosteriorProductOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.split_global = self.options.split_global and self.options.prior == "fixed"
        self.last_k = 0  # clients merged in the last round: the global's precision is split over them
        self.split_k = 0  # the K the arrays sent this round were split over (0: not split)

    def outgoing(self, server_round: int, arrays: Arrays) -> Arrays:
        self.split_k = self.last_k if self.split_global and self.last_k > 1 else 0
        if not self.split_k:
            return arrays
        # module docstring: the clients start from a fractional prior S_g / K
        return {k: (v / self.split_k).astype(v.dtype) if k.startswith("precision.") else v for k, v in arrays.items()}

    def _prior(self, name: str) -> tuple[np.ndarray | float, np.ndarray | float]:
        if self.split_k:  # each reply holds a share S_g / K of the global: the shares are the prior
            g = self.global_arrays or {}
            return g[f"mean.{name}"], g[f"precision.{name}"]
        if self.options.prior == "fixed":
            return 0.0, self.options.prior_precision
        g = self.global_arrays or {}
        if f"mean.{name}" not in g or f"precision.{name}" not in g:
            raise ValueError(f"posterior_product: prior 'global' needs the round's global posterior of {name!r} (none was sent)")
        return g[f"mean.{name}"], g[f"precision.{name}"]

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        parts = [split_posterior(a) for a in arrays]
        self.last_k = len(arrays)
        means0, precs0, rest0 = parts[0]
        if not means0 or set(means0) != set(precs0):
            raise ValueError("posterior_product: clients must send mean.<n> and precision.<n> for the same names")
        means, precs = {}, {}
        for n in means0:
            m0, s0 = self._prior(n)
            # With a split global the K replies hold the global once in all (power EP): its
            # shares are not divided out; a client that did not reply is missing its share.
            count = len(parts) - self.split_k if self.split_k else None
            m, s = posterior_product([p[0][n] for p in parts], [p[1][n] for p in parts], m0, s0, self.options.min_precision, count)
            means[n], precs[n] = m.astype(means0[n].dtype), s.astype(precs0[n].dtype)
        rest = weighted_average([p[2] for p in parts], weights) if rest0 else {}
        return join_posterior(means, precs, rest)


STRATEGIES.add("posterior_product", PosteriorProduct)
