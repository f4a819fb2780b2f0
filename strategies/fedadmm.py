"""FedADMM (Gong, Li, Freris, "FedADMM: A Robust Federated Deep Learning Framework with
Adaptivity to System Heterogeneity", ICDE 2022).

- Client (``fedens.objectives.Admm``): ``l_k(w) + <y_k, w - w_g> + (rho/2) ||w - w_g||^2`` (squared
  norm), then ``y_k <- y_k + rho (w_k - w_g)``; ``y_k`` persists in the client's ``context.state``.
- Server, on the augmented models ``w_k + y_k / rho``: ``w_g <- w_g + (eta / K) sum_{k sampled}
  (2 w_k^new - w_g - w_k^old)`` (docs/methods.md#fedadmm; the difference of a client's augmented
  models since it last trained, because ``y_k`` moved by ``rho (w_k^new - w_g)``), K the number
  of all clients. The server keeps each client's last model ``w_k^old`` by partition id; before
  a client's first round it is the initial global model (``y_k = 0``, ``w_k^0 = w^0``).
Defaults: ``rho`` 0.01, ``eta`` 1.0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy


def fedadmm_server_step(global_arrays: Arrays, new: dict[int, Arrays], old: dict[int, Arrays], eta: float,
                        num_clients: int) -> Arrays:
    """``w_g + (eta / K) sum_k (2 w_k^new - w_g - w_k^old)`` over the sampled clients."""
    out = {}
    for name, wg in global_arrays.items():
        if not np.issubdtype(wg.dtype, np.floating):
            out[name] = wg
            continue
        step = sum(2 * new[k][name].astype(np.float64) - wg - old[k][name] for k in new)
        out[name] = (wg + eta / num_clients * step).astype(wg.dtype)
    return out


class FedADMM(FedensStrategy):
    supported_learners = ("single",)

    def __init__(self, rho: float = 0.01, eta: float = 1.0, **fedavg_kwargs: Any) -> None:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        super().__init__(**fedavg_kwargs)
        self.rho, self.eta = rho, eta
        self.initial: Arrays | None = None
        self.last: dict[int, Arrays] = {}  # partition id -> the client's last trained model

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"objective": "admm", "objective.rho": float(self.rho)}

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        assert self.global_arrays is not None
        if self.initial is None:
            self.initial = self.global_arrays
        new = dict(zip(self.reply_partitions, arrays))
        old = {k: self.last.get(k, self.initial) for k in new}
        num_clients = self.ctx.scenario.data.num_clients if self.ctx is not None else len(arrays)
        self.last.update(new)
        return fedadmm_server_step(self.global_arrays, new, old, self.eta, num_clients)


STRATEGIES.add("fedadmm", FedADMM)
