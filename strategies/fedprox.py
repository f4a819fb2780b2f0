"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Client: ``l_k(w) + (mu / 2) ||w - w_g||^2`` — the squared norm of the paper. (The bayes-admm
reference implementation uses the unsquared ``torch.norm``; docs/methods.md#fedprox notes it; we
follow the paper.) The term lives on the client (``fedens.objectives.Prox``); the server step
is FedAvg's.
"""

from __future__ import annotations

from typing import Any

from fedens.strategies import STRATEGIES
from fedens.strategies.base import FedensStrategy


class FedProx(FedensStrategy):
    supported_learners = ("single",)  # and its subclasses: the term is added in single's loop

    def __init__(self, mu: float = 0.01, **fedavg_kwargs: Any) -> None:
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu!r}")
        super().__init__(**fedavg_kwargs)
        self.mu = mu

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"objective": "prox", "objective.mu": float(self.mu)}


STRATEGIES.add("fedprox", FedProx)
