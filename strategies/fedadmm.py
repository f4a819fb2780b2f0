"""FedADMM (Gong, Li, Freris, ICDE 2022; docs/methods.md#fedadmm). The client's term, the dual
step and the server's step are in ``fedens.algorithms.fedadmm``; the server keeps each client's
last model by partition id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedens.algorithms.fedadmm import AdmmTerm, FedADMMOptions, fedadmm_server_step
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy


class FedADMM(FedensStrategy):
    """FedADMM: ADMM with the clients' duals, the server stepping on their augmented models."""

    supported_learners = ("single",)
    Options = FedADMMOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial: Arrays | None = None
        self.last: dict[int, Arrays] = {}  # partition id -> the client's last trained model

    def train_config(self, server_round: int) -> dict[str, Any]:
        return AdmmTerm.message_config(self.options)

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        assert self.global_arrays is not None
        if self.initial is None:
            self.initial = self.global_arrays
        new = dict(zip(self.reply_partitions, arrays))
        old = {k: self.last.get(k, self.initial) for k in new}
        num_clients = self.ctx.scenario.data.num_clients if self.ctx is not None else len(arrays)
        self.last.update(new)
        return fedadmm_server_step(self.global_arrays, new, old, self.options.eta, num_clients)


STRATEGIES.add("fedadmm", FedADMM)
