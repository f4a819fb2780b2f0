"""FedLap (Swaroop, Khan, Doshi-Velez, "Connecting Federated ADMM to Bayes", ICLR 2025;
docs/methods.md#fedlap): federated ADMM read as Bayesian learning with isotropic Gaussian
(Laplace) sites. The client's term and the server's step.

- Client: ``w_k = argmin N_k l_k(w) + delta v_k^T w + (delta/2) ||w - w_g||^2``; ``delta`` is
  both the prior precision and the ADMM penalty.
- Dual: ``v_k <- v_k + rho (w_k - w_g)``. Server: ``w_g = sum_k v_k``.
- Fixed point: ``sum_k N_k grad l_k(w) + delta w = 0``, the MAP of the pooled data under the
  prior N(0, 1/delta) (tested on ridge regression against the closed form).

Which ``w_g`` the dual step uses (``dual_against``):

- ``trained_from`` (default; the authors' code): the global model the client trained from. The
  client steps its own dual right after training, the server repeats the step, and the new
  global is the sum of the new duals: ``v_k <- v_k + rho (w_k - w_g^old)``, ``w_g = sum_k v_k``.
- ``new_global`` (fedens' earlier reading of the paper's "dual, then w_g = sum_k v_k"): the duals
  are stepped against the *new* global model, which then is the sum of the new duals. Both at
  once have the closed form ``w_g = (sum_{all k} v_k + rho sum_{k sampled} w_k) / (1 + rho
  |sampled|)``, then ``v_k <- v_k + rho (w_k - w_g)``; with ``rho = 1`` this is standard consensus
  ADMM with the prior as the z-step's regulariser. The client sees that ``w_g`` only in its next
  message, so it keeps its last weights (``LAST``) and applies the step then.

Stability, measured (docs/methods.md#fedlap has the tables): on ridge regression with exact
client solves, ``trained_from`` diverges once ``rho`` times the number of clients is about 2 or
more (3 clients: rho 1; 20 clients: rho 0.2), ``new_global`` converges for every rho in (0, 1].
Both reach ``w_g = sum_k v_k`` exactly after every round. The server keeps every client's dual by
partition id; a client keeps its own in ``context.state``.

Newton-like one-step convergence on quadratics is a property of the variant with exact
curvature (FedLap-Cov with the true Hessian as the site precision); this isotropic variant uses
``delta`` in place of the Hessian and converges geometrically instead (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from fedens.algorithms.arrays import Arrays
from fedens.algorithms.fedadmm import DUAL, dual_update
from fedens.objectives import Objective, register
from fedens.options import Options

LAST = "last."  # client state: its last trained weights, for the deferred dual step


class FedLapOptions(Options):
    delta: float = Field(1.0, gt=0, allow_inf_nan=False, description="prior precision and ADMM penalty")
    rho: float = Field(0.1, gt=0, le=1, description="dual step size (trained_from: stable while rho K < ~2)")
    dual_against: Literal["trained_from", "new_global"] = Field(
        "trained_from", description="the global model the dual step uses (trained_from: the authors' code)")


@register
class LapTerm(Objective):
    """``delta v_k^T w + (delta / 2) ||w - w_g||^2``, divided by N_k for the learner's mean loss.

    ``dual_against: trained_from``: after training, ``v_k <- v_k + rho (w_k - w_g)`` with the
    global the client trained from, as the server repeats it. ``new_global``: the step uses the
    global model computed *from* ``w_k`` (module docstring), which the client only sees in the
    next message it gets, so it keeps ``DUAL<n>`` and its last trained ``LAST<n>`` and applies the
    step when the next round starts. With full participation that is exactly the server's step;
    a client that skipped rounds applies it with the newer global it receives (the server's copy
    of its dual used the global of the round it trained in)."""

    name = "lap"
    Options = FedLapOptions

    def __init__(self, options: BaseModel | Mapping[str, Any], state: Arrays, global_arrays: Arrays,
                 device: torch.device, num_examples: int = 1, server_round: int = 0) -> None:
        super().__init__(options, state, global_arrays, device, num_examples, server_round)
        last = {k[len(LAST):]: v for k, v in self.state.items() if k.startswith(LAST)}
        if last:
            self.state.update(dual_update(self.state, last, global_arrays, self.options.rho))

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        delta, n = self.options.delta, float(self.num_examples)
        total = torch.zeros((), device=self.device)
        for name, p in params.items():
            total = total + 0.5 * delta / n * ((p - self.tensor(name, self.global_arrays)) ** 2).sum()
            if DUAL + name in self.state:
                total = total + delta / n * (p * self.tensor(DUAL + name, self.state)).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        if self.options.dual_against == "trained_from":
            return dual_update(self.state, trained, self.global_arrays, self.options.rho)
        duals = {k: v for k, v in self.state.items() if k.startswith(DUAL)}
        return {**duals, **{LAST + k: v for k, v in trained.items() if k in self.global_arrays}}


def fedlap_server_step(duals: dict[int, Arrays], trained: dict[int, Arrays], global_arrays: Arrays,
                       rho: float, dual_against: str = "trained_from") -> tuple[Arrays, dict[int, Arrays]]:
    """``(new global, new duals)`` from every client's duals (``DUAL<name>``, by partition id)
    and the sampled clients' trained arrays (by partition id); ``w_g = sum_k v_k`` after both."""
    if dual_against == "trained_from":
        new_duals = dict(duals)
        for pid, w in trained.items():
            new_duals[pid] = dual_update(duals.get(pid, {}), w, global_arrays, rho)
        out: Arrays = {}
        for name, wg in global_arrays.items():
            floats = np.issubdtype(wg.dtype, np.floating)
            out[name] = sum((d[DUAL + name] for d in new_duals.values() if DUAL + name in d),
                            np.zeros_like(wg, np.float64)).astype(wg.dtype) if floats else wg
        return out, new_duals
    new_global: Arrays = {}
    for name, wg in global_arrays.items():
        if not np.issubdtype(wg.dtype, np.floating):
            new_global[name] = wg
            continue
        v_sum = sum((d[DUAL + name] for d in duals.values() if DUAL + name in d), np.zeros_like(wg, np.float64))
        w_sum = sum(t[name].astype(np.float64) for t in trained.values())
        new_global[name] = (v_sum + rho * w_sum) / (1 + rho * len(trained))
    new_duals = dict(duals)
    floats = {n: g for n, g in new_global.items() if np.issubdtype(global_arrays[n].dtype, np.floating)}
    for pid, w in trained.items():
        new_duals[pid] = dual_update(duals.get(pid, {}), w, floats, rho)
    cast = {n: g.astype(global_arrays[n].dtype) for n, g in new_global.items()}
    return cast, new_duals
