"""``posterior_avg``: precision-weighted averaging of diagonal Gaussian posteriors (docs/methods.md#posterior-avg;
section 4, option (i); the IVON posterior of Shen et al., ICML 2024, arXiv 2402.17641).

Client k sends ``mean.<n>`` = m_k and ``precision.<n>`` = s_k (IVON: s_k = ess_k (hess_k + wd)).
With the FedAvg weights w_k (data sizes, summing to 1), element-wise:

    S_g = sum_k w_k s_k
    m_g = sum_k w_k s_k m_k / S_g

Decisions:
- ``w_k`` are the usual FedAvg weights, so equal precisions give FedAvg exactly; a client's
  data size enters twice (through w_k and through s_k, which IVON scales with ess = n_k), as the
  equation in docs/methods.md#posterior-avg prescribes.
- Arrays that are neither ``mean.*`` nor ``precision.*`` (buffers, e.g. BatchNorm statistics)
  are the plain weighted average.
- Math in float64, cast back to the arrays' dtype. Precisions are positive for the ``ivon``
  learner (weight_decay > 0); a zero total precision is an error, not a silent 0/0.

No params (besides Flower's FedAvg sampling arguments).
"""

from __future__ import annotations

import numpy as np

from fedens.algorithms.arrays import precision_weighted_average
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy, join_posterior, split_posterior, weighted_average


class PosteriorAveraging(FedensStrategy):
    """Precision-weighted average of the clients' Gaussian posteriors."""

    supported_learners = ("ivon", "ivon_mixture")
    partial_replies = True  # element-wise; a mean and its precision always travel together

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        parts = [split_posterior(a) for a in arrays]
        means0, precs0, rest0 = parts[0]
        if not means0 or set(means0) != set(precs0):
            raise ValueError("posterior_avg: clients must send mean.<n> and precision.<n> for the same names")
        means, precs = {}, {}
        for n in means0:
            m, s = precision_weighted_average([p[0][n] for p in parts], [p[1][n] for p in parts], weights)
            if np.any(s <= 0):
                raise ValueError("posterior_avg: the weighted sum of precisions is not positive everywhere")
            means[n], precs[n] = m.astype(means0[n].dtype), s.astype(precs0[n].dtype)
        rest = weighted_average([p[2] for p in parts], weights) if rest0 else {}
        return join_posterior(means, precs, rest)


STRATEGIES.add("posterior_avg", PosteriorAveraging)
