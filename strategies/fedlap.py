"""FedLap (Swaroop, Khan, Doshi-Velez, "Connecting Federated ADMM to Bayes", ICLR 2025;
docs/methods.md#fedlap): federated ADMM as Bayes with isotropic Gaussian sites. The client's
term and the server's step (and the order of its dual step) are in ``fedens.algorithms.fedlap``;
the server keeps every client's dual by partition id.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedens.algorithms.fedlap import FedLapOptions, LapTerm, fedlap_server_step
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy, ServerContext

log = logging.getLogger("fedens")


class FedLap(FedensStrategy):
    """FedLap: federated ADMM as Bayes with isotropic Gaussian sites, w_g = sum_k v_k."""

    supported_learners = ("single",)
    Options = FedLapOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.duals: dict[int, Arrays] = {}  # partition id -> {DUAL + name: v_k}

    def bind(self, ctx: ServerContext) -> None:
        super().bind(ctx)
        o, scn = self.options, ctx.scenario
        sampled = max(1, round(scn.fraction_train * scn.data.num_clients))
        if o.dual_against == "trained_from" and o.rho * sampled >= 2:  # docs/methods.md#fedlap's table
            log.warning("fedlap: rho x sampled clients = %.3g >= 2, where the authors' dual order (trained_from) "
                        "diverged on quadratics; lower rho below %.3g or use dual_against: new_global",
                        o.rho * sampled, 2 / sampled)

    def train_config(self, server_round: int) -> dict[str, Any]:
        return LapTerm.message_config(self.options)

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        assert self.global_arrays is not None
        trained = dict(zip(self.reply_partitions, arrays))
        new, self.duals = fedlap_server_step(self.duals, trained, self.global_arrays, self.options.rho,
                                             self.options.dual_against)
        return new


STRATEGIES.add("fedlap", FedLap)
