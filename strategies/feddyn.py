"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021;
docs/methods.md#feddyn). The client's term and the server's step are in
``fedens.algorithms.feddyn``; the server keeps ``h`` across rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedens.algorithms.feddyn import DynTerm, FedDynOptions, feddyn_server_step
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy


class FedDyn(FedensStrategy):
    """FedDyn: dynamic regularisation, the clients' linear terms and the server's correction h."""

    supported_learners = ("single",)
    Options = FedDynOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.h: Arrays = {}

    def train_config(self, server_round: int) -> dict[str, Any]:
        return DynTerm.message_config(self.options)

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        assert self.global_arrays is not None
        num_clients = self.ctx.scenario.data.num_clients if self.ctx is not None else len(arrays)
        new, self.h = feddyn_server_step(self.global_arrays, arrays, self.h, self.options.alpha, num_clients)
        return new


STRATEGIES.add("feddyn", FedDyn)
