"""``vca``: variance-corrected model averaging (VCMA; Tian, Al-Ars, Kitsak, Hofstee, "Vanishing
Variance Problem in Fully Decentralized Neural-Network Systems", arXiv 2404.04616, 2024;
docs/methods.md#vca; the authors' public code is the reference).

Averaging uncorrelated models shrinks each layer's weight variance (K uncorrelated layers: about
1/K of the members' variance). VCMA rescales the spread of every averaged layer back to a target
variance while keeping the layer mean. Per tensor (layer) ``l``:

    avg_l   = sum_k w_k W_k,l                                   (the server's weighted average)
    tgt_l   = "others":       mean_k Var(W_k,l)                  (FollowOthers, the paper's default)
              "self":         Var(G_l)                           (FollowSelfVariance)
              "conservative": c Var(G_l) + (1 - c) mean_k Var(W_k,l)   (FollowConservative)
    out_l   = (avg_l - mean(avg_l)) * sqrt((tgt_l + eps) / (Var(avg_l) + eps)) + mean(avg_l)

``G`` is the global model of the round (the arrays the clients started from) and ``Var`` the
unbiased variance over all elements of the tensor (``torch.var`` / ``np.var(ddof=1)``).

Decisions:
- The corrected quantity is the server's weighted average (FedAvg weights ``w_k``), not the
  gossip node's ``c W_self + (1 - c) avg``: a FL server has no model of its own to mix in, so
  ``c`` only enters the "conservative" target.
- "conservative" reading: ``Var(G_l)`` is the variance of the global model *as the clients
  received it* (the unmixed reading of the paper's equation). The reference code mixes the
  node's own model in place before reading its variance, so there the "self" term is the variance
  of the already-mixed model; that reading is not implemented.
- ``mean.<n>`` tensors of a posterior are weights and are corrected; ``precision.<n>`` tensors
  are left as the plain average (rescaling a precision's spread has no meaning). Normalisation
  statistics (names containing ``running_mean``, ``running_var``, ``num_batches_tracked``),
  one-element tensors, masks/flags (names ending in ``.filled``) and non-float (integer, bool)
  arrays are left as the plain average, i.e. untouched when the clients agree on them.
- Ensembles are corrected member-wise without special code: member k's tensors
  (``member.{k}.<n>``) have their own names, so each is a layer of its own.
- The math runs in float64 and is cast back to the array's dtype; identical client tensors give
  the plain average (the scale factor is 1).
- A zero-variance tensor (e.g. a bias initialised to 0 in every client) with a zero target stays
  put; with ``eps = 0`` and ``Var(avg) = 0`` there is no spread to rescale and the average is
  returned unchanged.

Params (scenario ``strategy.params``): ``target`` ("others" | "self" | "conservative", default
"others"), ``eps`` (>= 0, default 1e-4, the reference code's), ``c`` (in [0, 1], default 0.5, the
reference preset's; used by "conservative" only).
"""

from __future__ import annotations

import numpy as np

from fedens.algorithms.vca import VCAOptions, is_corrected, target_variance, variance_correct
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy, weighted_average


class VarianceCorrectedAveraging(FedensStrategy):
    """FedAvg followed by per-tensor variance correction (VCMA)."""

    Options = VCAOptions

    def target_var(self, name: str, arrays: list[Arrays]) -> float:
        own, target = None, self.options.target
        if target != "others":
            if self.global_arrays is None or name not in self.global_arrays:
                raise ValueError(f"vca: target {target!r} needs the round's global tensor {name!r} (none was sent)")
            own = self.global_arrays[name]
        return target_variance(target, self.options.c, own, [a[name] for a in arrays])

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        out = weighted_average(arrays, weights)
        for name, first in arrays[0].items():
            if not is_corrected(name, first):
                continue
            avg = sum(w * a[name].astype(np.float64) for a, w in zip(arrays, weights))
            out[name] = variance_correct(avg, self.target_var(name, arrays), self.options.eps).astype(first.dtype)
        return out


STRATEGIES.add("vca", VarianceCorrectedAveraging)
