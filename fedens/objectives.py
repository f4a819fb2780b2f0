"""Client-side objective terms: what a server strategy adds to a client's training loss.

The ADMM family (FedProx, FedDyn, FedADMM, FedLap, ...) changes the *client's* objective: a
proximal term to the global model, a dual (Lagrangian) term, a prior. A strategy asks for one by
name in the train messages' config (``"objective": "prox"`` plus ``"objective.<param>"``
values); the ClientApp builds it with the client's persistent state (``context.state``) and the
global arrays of the message, hands it to the learner, and stores the state it returns after
training. The learner adds ``penalty(params)`` to its mean minibatch loss in its own loop, so
there is one training loop per learner, not one per algorithm.

State of a client that is not sampled for a while: it stays in ``context.state`` untouched (a
dual is not decayed while its client is away) and is used as it is when the client is next
sampled; this is what the papers' algorithms do under partial participation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedens.registry import Registry

Arrays = dict[str, np.ndarray]
PREFIX = "objective."


class Objective:
    """A term added to a client's loss. ``config`` holds the ``objective.*`` values the
    strategy sent (prefix removed); ``state`` the client's persistent arrays (empty at first);
    ``global_arrays`` the arrays the round started from, by payload name. Learners minimise the
    *mean* loss over their N_k examples, so a term the paper adds to the summed loss
    ``N_k l_k(w)`` is divided by N_k here."""

    def __init__(self, config: Mapping[str, Any], state: Arrays, global_arrays: Arrays, device: torch.device,
                 num_examples: int = 1) -> None:
        self.config = dict(config)
        self.state = dict(state)
        self.device = device
        self.global_arrays = global_arrays
        self.num_examples = num_examples  # N_k: terms written for a summed loss are divided by it
        self._tensors: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, source: Mapping[str, np.ndarray]) -> torch.Tensor:
        """``source[name]`` as a float32 tensor on the device, converted once and cached."""
        key = f"{id(source)}:{name}"
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(np.asarray(source[name]), dtype=torch.float32, device=self.device)
        return self._tensors[key]

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The term for the current parameters (by payload name), added to the mean loss."""
        raise NotImplementedError

    def measure(self, learner: Any, data: Any) -> None:
        """After training, before ``after_fit``: look at the trained learner and its data (e.g.
        curvature at the trained weights). Default: nothing."""

    def after_fit(self, trained: Arrays) -> Arrays:
        """The state to keep for the next time this client trains (default: unchanged)."""
        return self.state

    def reply_arrays(self) -> Arrays:
        """Extra arrays the client sends back with its trained ones (default: none)."""
        return {}

    def ivon_setup(self, names: list[str], num_examples: int) -> IVONSetup | None:
        """For a learner that trains with IVON: the prior, Lagrangian terms and starting
        posterior to train under instead of a loss penalty (``names`` = the network's parameter
        names in order). Default: ``None``, plain IVON."""
        return None


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register("prox")
class Prox(Objective):
    """FedProx (Li et al. 2020): ``(mu / 2) * ||w - w_g||^2``, the squared norm of the paper
    (one reference implementation uses the unsquared ``torch.norm``; we do not)."""

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mu = float(self.config["mu"])
        sq = sum(((p - self.tensor(n, self.global_arrays)) ** 2).sum() for n, p in params.items())
        return 0.5 * mu * sq


@OBJECTIVES.register("dyn")
class Dyn(Objective):
    """FedDyn (Acar et al. 2021), client side: ``(alpha / 2) ||w - w_g||^2 - <w, g_k>``, where
    ``g_k`` is the client's accumulated linear term (the state ``grad.<name>``, zero at first).
    After training: ``g_k <- g_k - alpha (w_k - w_g)`` (the paper's first-order condition
    update, so that ``-<w, g_k>`` and the dual form ``+<w, lambda_k>`` of docs/methods.md#feddyn agree with
    ``lambda_k = -g_k``)."""

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        alpha = float(self.config["alpha"])
        total = torch.zeros((), device=self.device)
        for n, p in params.items():
            total = total + 0.5 * alpha * ((p - self.tensor(n, self.global_arrays)) ** 2).sum()
            if f"grad.{n}" in self.state:
                total = total - (p * self.tensor(f"grad.{n}", self.state)).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        alpha = float(self.config["alpha"])
        out = dict(self.state)
        for n, w in trained.items():
            if n in self.global_arrays and np.issubdtype(w.dtype, np.floating):
                g = self.state.get(f"grad.{n}", np.zeros_like(w, dtype=np.float32))
                out[f"grad.{n}"] = (g - alpha * (w - self.global_arrays[n])).astype(np.float32)
        return out


@OBJECTIVES.register("lap")
class Lap(Objective):
    """FedLap (Swaroop et al. 2025, isotropic Gaussian sites), client side:
    ``argmin N_k l_k(w) + delta v_k^T w + (delta / 2) ||w - w_g||^2``, divided by N_k for the
    learner's mean loss.

    The dual step ``v_k <- v_k + rho (w_k - w_g)`` uses the global model computed *from* ``w_k``
    (see ``strategies/fedlap.py``), which the client only sees in the next message it gets. So
    the client keeps ``dual.<n>`` and its last trained ``last.<n>`` and applies the step when the
    next round starts. With full participation that is exactly the server's step; a client that
    skipped rounds applies it with the newer global it receives (the server's copy of its dual
    used the global of the round it trained in)."""

    def __init__(self, config: Mapping[str, Any], state: Arrays, global_arrays: Arrays, device: torch.device,
                 num_examples: int = 1) -> None:
        super().__init__(config, state, global_arrays, device, num_examples)
        last = {k[5:]: v for k, v in self.state.items() if k.startswith("last.")}
        if last:
            self.state.update(lap_dual_update(self.state, last, global_arrays, float(self.config["rho"])))

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        delta, n = float(self.config["delta"]), float(self.num_examples)
        total = torch.zeros((), device=self.device)
        for name, p in params.items():
            total = total + 0.5 * delta / n * ((p - self.tensor(name, self.global_arrays)) ** 2).sum()
            if f"dual.{name}" in self.state:
                total = total + delta / n * (p * self.tensor(f"dual.{name}", self.state)).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        duals = {k: v for k, v in self.state.items() if k.startswith("dual.")}
        return {**duals, **{f"last.{k}": v for k, v in trained.items() if k in self.global_arrays}}


def lap_dual_update(duals: Arrays, trained: Arrays, global_arrays: Arrays, rho: float) -> Arrays:
    """``dual.<n> <- dual.<n> + rho (w_k - w_g)`` for every float array of the global model;
    the same step on the client (for its loss) and on the server (for ``w_g``)."""
    out = {}
    for name, wg in global_arrays.items():
        if name in trained and np.issubdtype(wg.dtype, np.floating):
            v = duals.get(f"dual.{name}", np.zeros_like(wg, dtype=np.float64))
            out[f"dual.{name}"] = v + rho * (trained[name].astype(np.float64) - wg)
    return out


@OBJECTIVES.register("admm")
class Admm(Objective):
    """FedADMM (Gong et al. 2022), client side: ``l_k(w) + <y_k, w - w_g> + (rho/2) ||w - w_g||^2``
    with the dual ``y_k`` (state ``dual.<name>``, zero at first); after training
    ``y_k <- y_k + rho (w_k - w_g)`` against the global the client trained from."""

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rho = float(self.config["rho"])
        total = torch.zeros((), device=self.device)
        for name, p in params.items():
            diff = p - self.tensor(name, self.global_arrays)
            total = total + 0.5 * rho * (diff**2).sum()
            if f"dual.{name}" in self.state:
                total = total + (self.tensor(f"dual.{name}", self.state) * diff).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        return lap_dual_update(self.state, trained, self.global_arrays, float(self.config["rho"]))


@OBJECTIVES.register("lapcov")
class LapCov(Objective):
    """FedLap-Cov (Swaroop et al. 2025, diagonal Gaussian sites), client side:
    ``argmin N_k l_k(w) + 1/2 (w - w_g)^T S_g (w - w_g) + v_k^T w - 1/2 w^T V_k w`` (divided by N_k),
    ``S_g`` the global precision (``precision.<name>`` in the message; ``delta`` before the
    server has one). After training: ``H_k`` = the diagonal GGN at ``w_k`` (``diag_ggn``), sent to
    the server as ``hess.<name>``, and the dual step (``lapcov_dual_update``) that the server
    repeats with the same numbers."""

    def _precision(self, name: str) -> np.ndarray:
        key = f"precision.{name}"
        return self.global_arrays[key] if key in self.global_arrays else np.full_like(
            self.global_arrays[name], float(self.config["delta"]), dtype=np.float64)

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = float(self.num_examples)
        total = torch.zeros((), device=self.device)
        for name, p in params.items():
            s_g = torch.as_tensor(self._precision(name), dtype=torch.float32, device=self.device)
            total = total + 0.5 * (s_g * (p - self.tensor(name, self.global_arrays)) ** 2).sum() / n
            if f"dual.{name}" in self.state:
                total = total + ((self.tensor(f"dual.{name}", self.state) * p).sum()
                                 - 0.5 * (self.tensor(f"site.{name}", self.state) * p**2).sum()) / n
        return total

    def measure(self, learner: Any, data: Any) -> None:
        self.hess = {k: v.cpu().numpy().astype(np.float64) for k, v in diag_ggn(learner.model, data.x).items()}

    def after_fit(self, trained: Arrays) -> Arrays:
        precision = {n: self._precision(n) for n in self.hess}
        return lapcov_dual_update(self.state, trained, self.hess, self.global_arrays, precision, float(self.config["rho"]))

    def reply_arrays(self) -> Arrays:
        return {f"hess.{k}": v.astype(np.float32) for k, v in self.hess.items()}


def lapcov_dual_update(state: Arrays, trained: Arrays, hess: Arrays, global_arrays: Arrays, precision: Arrays,
                       rho: float) -> Arrays:
    """FedLap-Cov's dual step (docs/methods.md#fedlap-cov), element-wise for diagonal precisions:
    ``S_k = H_k - V_k + S_g``; ``v_k += rho (S_k w_k - S_g w_g)``; ``V_k <- (1 - rho) V_k + rho H_k``.
    ``state`` holds ``dual.<n>`` (v_k) and ``site.<n>`` (V_k); missing ones are zero."""
    out = {}
    for name, h in hess.items():
        w, wg, s_g = trained[name].astype(np.float64), global_arrays[name].astype(np.float64), precision[name]
        v = state.get(f"dual.{name}", np.zeros_like(w))
        site = state.get(f"site.{name}", np.zeros_like(w))
        s_k = h - site + s_g
        out[f"dual.{name}"] = v + rho * (s_k * w - s_g * wg)
        out[f"site.{name}"] = (1 - rho) * site + rho * h
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


@dataclass(frozen=True)
class IVONSetup:
    """How an IVON learner trains under IVON-ADMM (``fedens.optim.ivon_prior.IVONPrior``); flat
    float32 tensors ``(num_params,)`` in the network's parameter order."""

    ess: float  # λ_k = (N_k / τ) / ρ_s
    prior_mean: torch.Tensor  # m_g
    prior_precision: torch.Tensor  # S_g (δ = S_g / λ_k)
    v_tilde: torch.Tensor  # v_k / (N_k / τ)
    V_tilde: torch.Tensor  # V_k / (N_k / τ)
    start_at_prior: bool  # posterior ← (m_g, S_g); False: the mean m_g with hess = hess_init
    rescale_lr: bool


@OBJECTIVES.register("ivon_admm")
class IvonAdmm(Objective):
    """IVON-ADMM (``FedIVON``; Möllenhoff, Swaroop, Doshi-Velez, Khan, "Federated ADMM from
    Bayesian Duality", arXiv 2506.13150), client side. The client runs IVON with

    - ess ``λ_k = (N_k/τ)/ρ_s``; prior = the global posterior ``N(m_g, diag(1/S_g))``;
    - the Lagrangian ``−ṽᵀθ + ½θᵀṼθ`` with ``ṽ = v_k/(N_k/τ)``, ``Ṽ = V_k/(N_k/τ)`` (its gradient
      enters the mean step, Ṽ the Hessian update: ``fedens.optim.ivon_prior``);
    - the posterior started at the global (from round 2 on; in round 1 the mean is the initial
      network and ``hess = hess_init``, as the reference code, whose clients only get the global
      posterior after the first round).

    After training, with ``(m_k, S_k)`` the client's posterior and ``d`` the damping, the dual
    step ``ivon_admm_dual_update``: ``v_k += d ρ_s (S_g m_g − S_k m_k)``, ``V_k += d ρ_s (S_g − S_k)``,
    which the server repeats with the same numbers. No loss penalty: ``penalty`` is 0.
    Config: ``rho`` (ρ_s), ``tau`` (τ), ``damping`` (d), ``first`` (1 in round 1),
    ``rescale_lr`` (0/1). State: ``dual_mean.<n>`` (v_k), ``dual_prec.<n>`` (V_k), float64."""

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def ivon_setup(self, names: list[str], num_examples: int) -> IVONSetup:
        scale = num_examples / float(self.config["tau"])  # N_k / τ

        def flat(prefix: str, source: Mapping[str, np.ndarray]) -> torch.Tensor:
            parts = [np.asarray(source.get(f"{prefix}{n}", np.zeros_like(self.global_arrays[f"mean.{n}"])),
                                dtype=np.float64).ravel() for n in names]
            return torch.as_tensor(np.concatenate(parts), dtype=torch.float32, device=self.device)

        return IVONSetup(
            ess=scale / float(self.config["rho"]),
            prior_mean=flat("mean.", self.global_arrays),
            prior_precision=flat("precision.", self.global_arrays),
            v_tilde=flat("dual_mean.", self.state) / scale,
            V_tilde=flat("dual_prec.", self.state) / scale,
            start_at_prior=not int(self.config.get("first", 0)),
            rescale_lr=bool(int(self.config.get("rescale_lr", 1))),
        )

    def after_fit(self, trained: Arrays) -> Arrays:
        step = float(self.config["damping"]) * float(self.config["rho"])
        return ivon_admm_dual_update(self.state, trained, self.global_arrays, step)


def ivon_admm_dual_update(state: Arrays, trained: Arrays, global_arrays: Arrays, step: float) -> Arrays:
    """IVON-ADMM's dual step, element-wise, ``step = d ρ_s``: ``v_k += step (S_g m_g − S_k m_k)``,
    ``V_k += step (S_g − S_k)``. ``trained`` / ``global_arrays`` hold ``mean.<n>`` and
    ``precision.<n>``; ``state`` ``dual_mean.<n>`` and ``dual_prec.<n>`` (missing = 0)."""
    out = {}
    for key, m_g in global_arrays.items():
        if not key.startswith("mean."):
            continue
        n = key[5:]
        s_g, m_g = global_arrays[f"precision.{n}"].astype(np.float64), m_g.astype(np.float64)
        s_k, m_k = trained[f"precision.{n}"].astype(np.float64), trained[key].astype(np.float64)
        out[f"dual_mean.{n}"] = state.get(f"dual_mean.{n}", 0.0) + step * (s_g * m_g - s_k * m_k)
        out[f"dual_prec.{n}"] = state.get(f"dual_prec.{n}", 0.0) + step * (s_g - s_k)
    return out


def objective_from_config(config: Mapping[str, Any], state: Arrays, global_arrays: Arrays, device: torch.device,
                          num_examples: int = 1) -> Objective | None:
    """The objective a train message asks for, or ``None``."""
    name = config.get("objective")
    if not name:
        return None
    params = {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}
    return OBJECTIVES.get(str(name))(params, state, global_arrays, device, num_examples)
