"""FedLap (Swaroop, Khan, Doshi-Velez, "Connecting Federated ADMM to Bayes", ICLR 2025):
federated ADMM read as Bayesian learning with isotropic Gaussian (Laplace) sites.

- Client (``fedens.objectives.Lap``): ``w_k = argmin N_k l_k(w) + delta v_k^T w + (delta/2)
  ||w - w_g||^2``; ``delta`` is both the prior precision and the ADMM penalty.
- Dual: ``v_k <- v_k + rho (w_k - w_g)``. Server: ``w_g = sum_k v_k``.
- Fixed point: ``sum_k N_k grad l_k(w) + delta w = 0``, the MAP of the pooled data under the
  prior N(0, 1/delta) (tested on ridge regression against the closed form).

Order of the server's step (our reading of the paper's "dual, then w_g = sum_k v_k"; docs/methods.md#fedlap): the duals
are stepped against the *new* global model, and the new global is the sum of the new duals.
Both at once have the closed form

    w_g = (sum_{all k} v_k + rho sum_{k sampled} w_k) / (1 + rho |sampled|),
    v_k <- v_k + rho (w_k - w_g)   for the sampled k,

so ``w_g = sum_k v_k`` holds exactly after every round; with ``rho = 1`` this is standard
consensus ADMM with the prior as the z-step's regulariser, ``rho < 1`` damps it. (Stepping the
duals against the *old* global and then summing diverges at ``rho = 1`` on quadratics; we
checked.) The server keeps every client's dual by partition id; a client keeps its own in
``context.state`` (``fedens.objectives.Lap``).

Newton-like one-step convergence on quadratics is a property of the variant with exact
curvature (FedLap-Cov with the true Hessian as the site precision); this isotropic variant uses
``delta`` in place of the Hessian and converges geometrically instead (tested).
Defaults: ``delta`` 1.0 (the prior precision of the summed loss), ``rho`` 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy


def fedlap_server_step(duals: dict[int, Arrays], trained: dict[int, Arrays], global_arrays: Arrays,
                       rho: float) -> tuple[Arrays, dict[int, Arrays]]:
    """``(new global, new duals)`` from every client's dual (``dual.<name>``, by partition id) and
    the sampled clients' trained arrays (by partition id)."""
    new_global: Arrays = {}
    for name, wg in global_arrays.items():
        if not np.issubdtype(wg.dtype, np.floating):
            new_global[name] = wg
            continue
        v_sum = sum((d[f"dual.{name}"] for d in duals.values() if f"dual.{name}" in d), np.zeros_like(wg, np.float64))
        w_sum = sum(t[name].astype(np.float64) for t in trained.values())
        new_global[name] = (v_sum + rho * w_sum) / (1 + rho * len(trained))
    new_duals = dict(duals)
    for pid, w in trained.items():
        old = duals.get(pid, {})
        new_duals[pid] = {
            f"dual.{n}": old.get(f"dual.{n}", np.zeros_like(g)) + rho * (w[n].astype(np.float64) - g)
            for n, g in new_global.items() if np.issubdtype(global_arrays[n].dtype, np.floating)
        }
    cast = {n: g.astype(global_arrays[n].dtype) for n, g in new_global.items()}
    return cast, new_duals


class FedLap(FedensStrategy):
    supported_learners = ("single",)

    def __init__(self, delta: float = 1.0, rho: float = 0.5, **fedavg_kwargs: Any) -> None:
        if not delta > 0:
            raise ValueError(f"delta must be > 0, got {delta!r}")
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        super().__init__(**fedavg_kwargs)
        self.delta, self.rho = delta, rho
        self.duals: dict[int, Arrays] = {}  # partition id -> {"dual.<name>": v_k}

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"objective": "lap", "objective.delta": float(self.delta), "objective.rho": float(self.rho)}

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        assert self.global_arrays is not None
        trained = dict(zip(self.reply_partitions, arrays))
        new, self.duals = fedlap_server_step(self.duals, trained, self.global_arrays, self.rho)
        return new


STRATEGIES.add("fedlap", FedLap)
