"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020;
docs/methods.md#fedprox): FedAvg on the server; the clients train with the proximal term of
``fedens.algorithms.fedprox``.
"""

from __future__ import annotations

from typing import Any

from fedens.algorithms.fedprox import FedProxOptions, ProxTerm
from fedens.strategies import STRATEGIES
from fedens.strategies.base import FedensStrategy


class FedProx(FedensStrategy):
    """FedProx: FedAvg whose clients add the proximal term (mu / 2) ||w - w_g||^2 to their loss."""

    supported_learners = ("single",)  # and its subclasses: the term is added in single's loop
    Options = FedProxOptions

    def train_config(self, server_round: int) -> dict[str, Any]:
        return ProxTerm.message_config(self.options)


STRATEGIES.add("fedprox", FedProx)
