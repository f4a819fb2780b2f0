"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021).

Client (``fedens.objectives.Dyn``): ``l_k(w) - <g_k, w> + (alpha / 2) ||w - w_g||^2`` with the
squared norm of the paper; after training ``g_k <- g_k - alpha (w_k - w_g)``. ``g_k`` persists in
the client's ``context.state`` across rounds (untouched while the client is not sampled).

Server: ``h <- h - (alpha / K) sum_{k in S} (w_k - w_g)`` over the sampled clients S, K the number
of all clients; ``w_g <- mean_{k in S}(w_k) - h / alpha``. (docs/methods.md#feddyn writes the same with
``lambda_k = -g_k`` and its ``h = -h`` here.) The paper's alpha is used as it is; the bayes-admm
code scales it by N_k / N on the client, which we do not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy


def feddyn_server_step(global_arrays: Arrays, client_arrays: list[Arrays], h: Arrays, alpha: float,
                       num_clients: int) -> tuple[Arrays, Arrays]:
    """One server step: ``(new global, new h)``. Plain (unweighted) means, as in the paper."""
    new_h, new_g = {}, {}
    for name, wg in global_arrays.items():
        stack = np.stack([a[name].astype(np.float64) for a in client_arrays])
        hk = h.get(name, np.zeros_like(wg, dtype=np.float64)) - alpha / num_clients * (stack - wg).sum(0)
        new_h[name] = hk
        new_g[name] = (stack.mean(0) - hk / alpha).astype(wg.dtype)
    return new_g, new_h


class FedDyn(FedensStrategy):
    supported_learners = ("single",)

    def __init__(self, alpha: float = 0.01, **fedavg_kwargs: Any) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        super().__init__(**fedavg_kwargs)
        self.alpha = alpha
        self.h: Arrays = {}

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"objective": "dyn", "objective.alpha": float(self.alpha)}

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        assert self.global_arrays is not None
        num_clients = self.ctx.scenario.data.num_clients if self.ctx is not None else len(arrays)
        new, self.h = feddyn_server_step(self.global_arrays, arrays, self.h, self.alpha, num_clients)
        return new


STRATEGIES.add("feddyn", FedDyn)
