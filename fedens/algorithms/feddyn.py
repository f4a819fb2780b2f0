"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021;
docs/methods.md#feddyn): the client's term and the server's step.

Client: ``l_k(w) - <g_k, w> + (alpha / 2) ||w - w_g||^2`` (the paper's squared norm); after
training ``g_k <- g_k - alpha (w_k - w_g)``. ``g_k`` (state ``GRAD + <name>``) persists in the
client's ``context.state`` (untouched while the client is not sampled).

Server: ``h <- h - (alpha / K) sum_{k in S} (w_k - w_g)`` over the sampled clients S, K the number
of all clients; ``w_g <- mean_{k in S}(w_k) - h / alpha``. (docs/methods.md#feddyn writes the
same with ``lambda_k = -g_k`` and its ``h = -h`` here.) The paper's alpha is used as it is; the
bayes-admm code scales it by N_k / N on the client, which we do not.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from pydantic import Field

from fedens.algorithms.arrays import Arrays
from fedens.objectives import Objective, register
from fedens.options import Options

GRAD = "grad."  # client state: g_k per parameter


class FedDynOptions(Options):
    alpha: float = Field(0.01, gt=0, allow_inf_nan=False, description="dynamic regularisation coefficient")


@register
class DynTerm(Objective):
    """``(alpha / 2) ||w - w_g||^2 - <w, g_k>``; after training ``g_k <- g_k - alpha (w_k - w_g)``
    (the paper's first-order condition update, so that ``-<w, g_k>`` and the dual form
    ``+<w, lambda_k>`` of docs/methods.md#feddyn agree with ``lambda_k = -g_k``)."""

    name = "dyn"
    Options = FedDynOptions

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        alpha = self.options.alpha
        total = torch.zeros((), device=self.device)
        for n, p in params.items():
            total = total + 0.5 * alpha * ((p - self.tensor(n, self.global_arrays)) ** 2).sum()
            if GRAD + n in self.state:
                total = total - (p * self.tensor(GRAD + n, self.state)).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        out = dict(self.state)
        for n, w in trained.items():
            if n in self.global_arrays and np.issubdtype(w.dtype, np.floating):
                g = self.state.get(GRAD + n, np.zeros_like(w, dtype=np.float32))
                out[GRAD + n] = (g - self.options.alpha * (w - self.global_arrays[n])).astype(np.float32)
        return out


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
