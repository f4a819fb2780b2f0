"""FedLap-Cov (Swaroop, Khan, Doshi-Velez, "Connecting Federated ADMM to Bayes", ICLR 2025;
docs/methods.md#fedlap-cov): federated ADMM as Bayesian learning with *diagonal* Gaussian
(Laplace) sites. The client's term, the dual step both sides take, and the server's step.

- Server: ``S_g = delta + sum_k V_k``; ``w_g = S_g^-1 sum_k v_k`` (element-wise: diagonal).
- Client: ``argmin N_k l_k(w) + 1/2 (w - w_g)^T S_g (w - w_g) + v_k^T w - 1/2 w^T V_k w``.
- Dual, after training: ``H_k`` = diagonal GGN at ``w_k`` (``diag_ggn``: exact per-example
  Jacobians with torch.func; the laplace-torch ``diag`` Hessian of the reference, minus its
  prior, which is this GGN); ``S_k = H_k - V_k + S_g``; ``v_k += rho (S_k w_k - S_g w_g)``;
  ``V_k <- (1 - rho) V_k + rho H_k``.

What travels: the server sends ``w_g`` under the network's names plus ``precision.<name>`` = S_g;
a client returns ``w_k`` plus ``HESS<name>`` = H_k, and the server repeats the client's dual step
with the same numbers (both keep v_k in ``DUAL<n>`` and V_k in ``SITE<n>``: the client in
``context.state``, the server by partition id).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import Field

from fedens.algorithms.arrays import Arrays
from fedens.algorithms.fedadmm import DUAL
from fedens.objectives import Objective, register
from fedens.options import Options

SITE = "site."  # state: the site precision V_k per parameter
HESS = "hess."  # reply: the client's diagonal GGN H_k per parameter
PRECISION = "precision."  # message: the global precision S_g per parameter


class FedLapCovOptions(Options):
    delta: float = Field(1.0, gt=0, allow_inf_nan=False, description="prior precision")
    rho: float = Field(0.1, gt=0, le=1, description="dual step size")


@register
class LapCovTerm(Objective):
    """``1/2 (w - w_g)^T S_g (w - w_g) + v_k^T w - 1/2 w^T V_k w``, divided by N_k; ``S_g`` is
    the message's ``PRECISION<name>`` (``delta`` before the server has one). After training:
    ``H_k`` = ``diag_ggn`` at ``w_k``, sent back as ``HESS<name>``, and the dual step
    ``lapcov_dual_update`` that the server repeats with the same numbers."""

    name = "lapcov"
    Options = FedLapCovOptions

    def _precision(self, name: str) -> np.ndarray:
        key = PRECISION + name
        return self.global_arrays[key] if key in self.global_arrays else np.full_like(
            self.global_arrays[name], self.options.delta, dtype=np.float64)

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = float(self.num_examples)
        total = torch.zeros((), device=self.device)
        for name, p in params.items():
            s_g = torch.as_tensor(self._precision(name), dtype=torch.float32, device=self.device)
            total = total + 0.5 * (s_g * (p - self.tensor(name, self.global_arrays)) ** 2).sum() / n
            if DUAL + name in self.state:
                total = total + ((self.tensor(DUAL + name, self.state) * p).sum()
                                 - 0.5 * (self.tensor(SITE + name, self.state) * p**2).sum()) / n
        return total

    def measure(self, learner: Any, data: Any) -> None:
        self.hess = {k: v.cpu().numpy().astype(np.float64) for k, v in diag_ggn(learner.model, data.x).items()}

    def after_fit(self, trained: Arrays) -> Arrays:
        precision = {n: self._precision(n) for n in self.hess}
        return lapcov_dual_update(self.state, trained, self.hess, self.global_arrays, precision, self.options.rho)

    def reply_arrays(self) -> Arrays:
        return {HESS + k: v.astype(np.float32) for k, v in self.hess.items()}


def lapcov_dual_update(state: Arrays, trained: Arrays, hess: Arrays, global_arrays: Arrays, precision: Arrays,
                       rho: float) -> Arrays:
    """The dual step, element-wise for diagonal precisions: ``S_k = H_k - V_k + S_g``;
    ``v_k += rho (S_k w_k - S_g w_g)``; ``V_k <- (1 - rho) V_k + rho H_k``. ``state`` holds
    ``DUAL<n>`` (v_k) and ``SITE<n>`` (V_k); missing ones are zero."""
    out = {}
    for name, h in hess.items():
        w, wg, s_g = trained[name].astype(np.float64), global_arrays[name].astype(np.float64), precision[name]
        v = state.get(DUAL + name, np.zeros_like(w))
        site = state.get(SITE + name, np.zeros_like(w))
        s_k = h - site + s_g
        out[DUAL + name] = v + rho * (s_k * w - s_g * wg)
        out[SITE + name] = (1 - rho) * site + rho * h
    return out


def fedlap_cov_server_step(sites: dict[int, Arrays], template: Arrays, delta: float) -> Arrays:
    """``{name: w_g, PRECISION<name>: S_g}`` from every client's ``DUAL<n>`` and ``SITE<n>``
    (by partition id); ``template`` names the network's float arrays."""
    out: Arrays = {}
    for name, w in template.items():
        if name.startswith(PRECISION) or not np.issubdtype(w.dtype, np.floating):
            continue
        s_g = delta + sum((s[SITE + name] for s in sites.values() if SITE + name in s), np.zeros(w.shape))
        v = sum((s[DUAL + name] for s in sites.values() if DUAL + name in s), np.zeros(w.shape))
        out[name] = (v / s_g).astype(w.dtype)
        out[PRECISION + name] = s_g.astype(np.float32)
    return out


def diag_ggn(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Diagonal generalised Gauss-Newton of the summed cross-entropy at the model's parameters:
    ``sum_i diag(J_i^T (diag(p_i) - p_i p_i^T) J_i)``, with ``J_i`` the Jacobian of the logits
    ``(classes, params)`` of input i. Element-wise that is ``sum_i [sum_c p_ic J_icj^2 -
    (sum_c p_ic J_icj)^2]``; computed exactly with per-example Jacobians (torch.func), in
    chunks of ``batch_size`` inputs ``x`` ``(n, ...)``. Equals the Fisher for softmax outputs."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    device = next(iter(params.values())).device
    out = {k: torch.zeros_like(v) for k, v in params.items()}

    def logits(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    was_training = model.training
    model.eval()
    xs = torch.as_tensor(x)
    for i in range(0, len(xs), batch_size):
        xb = xs[i : i + batch_size].to(device)
        with torch.no_grad():
            prob = torch.softmax(functional_call(model, params, (xb,)), -1)  # (b, C)
        jac = vmap(jacrev(logits), in_dims=(None, 0))(params, xb)  # name -> (b, C, *shape)
        for k, j in jac.items():
            pj = prob.view(*prob.shape, *([1] * (j.ndim - 2)))
            out[k] += (pj * j**2).sum((0, 1)) - ((pj * j).sum(1) ** 2).sum(0)
    model.train(was_training)
    return out
