"""A complete strategy on the fedens base: FedAvg of norm-clipped client updates.

Each client's update ``u_k = w_k - w_g`` (all its arrays together) is scaled down to norm at most
``clip``, then the weighted mean update is applied: ``w_g <- w_g + sum_k p_k u_k min(1, clip/||u_k||)``.
Scenario: ``strategy: {name: examples/clipped_fedavg.py:ClippedFedAvg, params: {clip: 1.0}}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from fedens.options import Options
from fedens.strategies.base import Arrays, FedensStrategy


class ClippedFedAvgOptions(Options):
    clip: float = Field(1.0, gt=0, description="largest norm of a client's update")


class ClippedFedAvg(FedensStrategy):
    """FedAvg of norm-clipped client updates."""

    Options = ClippedFedAvgOptions  # checked when the scenario loads; read as self.options.clip

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clipped: list[float] = []  # the scale applied to each reply, for inspection

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        start = self.global_arrays  # what this round's training started from
        updates = [{k: a[k] - start[k] for k in start} for a in arrays]
        norms = [np.sqrt(sum(float((u**2).sum()) for u in upd.values())) for upd in updates]
        self.clipped = [min(1.0, self.options.clip / max(n, 1e-12)) for n in norms]
        return {
            k: (start[k] + sum(p * s * upd[k] for p, s, upd in zip(weights, self.clipped, updates))).astype(start[k].dtype)
            for k in start
        }
