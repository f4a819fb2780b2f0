"""FedLap-Cov (Swaroop, Khan, Doshi-Velez, "Connecting Federated ADMM to Bayes", ICLR 2025):
federated ADMM as Bayesian learning with *diagonal* Gaussian (Laplace) sites.

The client's term, the dual step both sides take and the server's step (``S_g = delta + sum_k
V_k``, ``w_g = S_g^-1 sum_k v_k``) are in ``fedens.algorithms.fedlap_cov``; the server repeats
each replying client's dual step from the ``hess.<name>`` it sends and keeps v_k, V_k by
partition id. On a quadratic with diagonal Hessian and ``rho = 1`` the first round already
lands on the pooled MAP (Newton-like one-step convergence, tested).
Defaults: ``delta`` 1.0, ``rho`` 0.1 (the paper's CIFAR-10 baseline config; MNIST uses 0.01).
With ``rho = 1`` the site precisions jump to the full GGN in round 1, and a small client's
proximal curvature ``(S_g - V_k)/N_k`` (about ``N/N_k`` times the per-example Hessian) exceeds
what SGD with lr 0.1 (or Adam with lr 1e-3) can take: measured on digits, 20 clients,
Dirichlet 0.1 (clients of 10 to ~200 examples), accuracy 0.59 after round 1, then NaN / 0.10
from round 3 on; with ``rho = 0.1`` 0.855 after round 5 and 0.889 after round 10.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedens.algorithms.fedlap_cov import HESS, PRECISION, FedLapCovOptions, LapCovTerm, fedlap_cov_server_step, lapcov_dual_update
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy


class FedLapCov(FedensStrategy):
    """FedLap-Cov: federated ADMM as Bayes with diagonal Gaussian (Laplace) sites."""

    supported_learners = ("single",)
    Options = FedLapCovOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sites: dict[int, Arrays] = {}  # partition id -> {DUAL + n: v_k, SITE + n: V_k}

    def train_config(self, server_round: int) -> dict[str, Any]:
        return LapCovTerm.message_config(self.options)

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        wg = self.global_arrays
        assert wg is not None
        delta, rho = self.options.delta, self.options.rho
        names = [n for n in wg if not n.startswith(PRECISION) and np.issubdtype(wg[n].dtype, np.floating)]
        precision = {n: wg.get(PRECISION + n, np.full(wg[n].shape, delta)).astype(np.float64) for n in names}
        for pid, reply in zip(self.reply_partitions, arrays):
            hess = {n: reply[HESS + n].astype(np.float64) for n in names}
            self.sites[pid] = lapcov_dual_update(self.sites.get(pid, {}), reply, hess, wg, precision, rho)
        return fedlap_cov_server_step(self.sites, {n: wg[n] for n in names}, delta)


STRATEGIES.add("fedlap_cov", FedLapCov)
