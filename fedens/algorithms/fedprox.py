"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020;
docs/methods.md#fedprox). The server step is FedAvg's; the algorithm is the client's term

    l_k(w) + (mu / 2) ||w - w_g||^2

with the squared norm of the paper (the bayes-admm reference code uses the unsquared
``torch.norm``; we follow the paper).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from fedens.objectives import Objective, register
from fedens.options import Options


class FedProxOptions(Options):
    mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="proximal coefficient")


@register
class ProxTerm(Objective):
    """``(mu / 2) * ||w - w_g||^2`` over the network's parameters."""

    name = "prox"
    Options = FedProxOptions

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sq = sum(((p - self.tensor(n, self.global_arrays)) ** 2).sum() for n, p in params.items())
        return 0.5 * self.options.mu * sq
