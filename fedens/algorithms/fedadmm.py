"""FedADMM (Gong, Li, Freris, "FedADMM: A Robust Federated Deep Learning Framework with
Adaptivity to System Heterogeneity", ICDE 2022; docs/methods.md#fedadmm): the client's term, the
ADMM dual step (shared with FedLap) and the server's step.

- Client: ``l_k(w) + <y_k, w - w_g> + (rho/2) ||w - w_g||^2`` (squared norm), then
  ``y_k <- y_k + rho (w_k - w_g)``; ``y_k`` (state ``DUAL + <name>``) persists in the client's
  ``context.state``.
- Server, on the augmented models ``w_k + y_k / rho``: ``w_g <- w_g + (eta / K) sum_{k sampled}
  (2 w_k^new - w_g - w_k^old)`` (the difference of a client's augmented models since it last
  trained, because ``y_k`` moved by ``rho (w_k^new - w_g)``), K the number of all clients. The
  server keeps each client's last model ``w_k^old`` by partition id; before a client's first
  round it is the initial global model (``y_k = 0``, ``w_k^0 = w^0``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from pydantic import Field

from fedens.algorithms.arrays import Arrays
from fedens.objectives import Objective, register
from fedens.options import Options

DUAL = "dual."  # state: the dual variable per parameter (FedADMM's y_k, FedLap's v_k)


class FedADMMOptions(Options):
    rho: float = Field(0.01, gt=0, allow_inf_nan=False, description="ADMM penalty")
    eta: float = Field(1.0, gt=0, allow_inf_nan=False, description="server step size")


def dual_update(duals: Arrays, trained: Arrays, global_arrays: Arrays, rho: float) -> Arrays:
    """``DUAL<n> <- DUAL<n> + rho (w_k - w_g)`` for every float array of the global model (a
    missing dual is 0); the same step on the client (for its loss) and on the server."""
    out = {}
    for name, wg in global_arrays.items():
        if name in trained and np.issubdtype(wg.dtype, np.floating):
            v = duals.get(DUAL + name, np.zeros_like(wg, dtype=np.float64))
            out[DUAL + name] = v + rho * (trained[name].astype(np.float64) - wg)
    return out


@register
class AdmmTerm(Objective):
    """``<y_k, w - w_g> + (rho/2) ||w - w_g||^2`` with the dual ``y_k`` (zero at first); after
    training ``y_k <- y_k + rho (w_k - w_g)`` against the global the client trained from."""

    name = "admm"
    Options = FedADMMOptions

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rho = self.options.rho
        total = torch.zeros((), device=self.device)
        for name, p in params.items():
            diff = p - self.tensor(name, self.global_arrays)
            total = total + 0.5 * rho * (diff**2).sum()
            if DUAL + name in self.state:
                total = total + (self.tensor(DUAL + name, self.state) * diff).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        return dual_update(self.state, trained, self.global_arrays, self.options.rho)


def fedadmm_server_step(global_arrays: Arrays, new: dict[int, Arrays], old: dict[int, Arrays], eta: float,
                        num_clients: int) -> Arrays:
    """``w_g + (eta / K) sum_k (2 w_k^new - w_g - w_k^old)`` over the sampled clients (by
    partition id in ``new`` and ``old``)."""
    out = {}
    for name, wg in global_arrays.items():
        if not np.issubdtype(wg.dtype, np.floating):
            out[name] = wg
            continue
        step = sum(2 * new[k][name].astype(np.float64) - wg - old[k][name] for k in new)
        out[name] = (wg + eta / num_clients * step).astype(wg.dtype)
    return out
