"""``ivon_mixture``: a mixture of K diagonal-Gaussian posteriors, each trained with IVON, with
mixture weights and an annealed temperature (Natural Variational Annealing: Le-Minh, Arbel,
Möllenhoff, Khan & Forbes, "Natural Variational Annealing for Multimodal Optimization", 2025;
mixture natural gradients: Lin, Khan & Schmidt, ICML 2019; docs/methods.md#ivon-mixture).

The variational family is q(θ) = Σ_k π_k q_k(θ), q_k = N(m_k, diag(1/s_k)), and the objective
per training example, with temperature τ and N examples,

    E_q[ℓ̄(θ)] + (τ/N) (E_q[log q(θ)] − E_q[log p(θ)]).

Writing log q = log q_k + log π_k − log r_k, with the responsibility r_k(θ) = π_k q_k(θ) / q(θ),
it splits into one IVON objective per component with effective sample size ``ess / τ`` (IVON's
own entropy and prior terms), plus the coupling −(τ/N) E_{q_k}[log r_k], plus the weights'
entropy. So, per component and step:

- IVON's step with ``ess_τ = ess / τ``, its gradient at the sample θ ~ q_k augmented by the
  coupling's, −(1/ess_τ) ∇ log r_k(θ) with ∇ log r_k(θ) = −s_k ⊙ (θ − m_k) + Σ_j r_j(θ) s_j ⊙
  (θ − m_j) (it pushes components apart where they overlap; it vanishes where r_k = 1, which in
  high dimension is almost everywhere once components have separated);
- after training, the weights take a damped natural-gradient step on their log-odds towards the
  minimiser of the objective in π, log π_k* = −ess_τ E_{q_k}[ℓ̄] + H(q_k) + E_{q_k}[log p] +
  E_{q_k}[log r_k] + const
  (Monte Carlo over ``weight_samples`` draws on the client's data):
  log π ← (1 − ``weight_lr``) log π + ``weight_lr`` log π*, normalised.
- Annealing: τ_r goes geometrically from ``temperature`` (round 1) to 1 at round
  ``anneal_rounds`` + 1 and stays there; a high τ widens every component (it explores), τ = 1 is
  the variational posterior.

Predictive: ``samples`` draws of each component, weighted by π_k / samples
(``predictive_weights``), so the metrics are those of the mixture.

The authors' code (NVA) steps each component on f = ℓ − τ log q and the weights' log-odds by
ρ (F_k − F_K): the same gradient as IVON-at-ess/τ plus the coupling (log q = log q_k + log π_k −
log r_k) and the same fixed point of the weights; NVA anneals τ to 0 to find modes, fedens to 1
(the posterior) (docs/methods.md#ivon-mixture).

``independent: true`` is the equal-compute baseline, K independent ``ivon`` posteriors averaged
uniformly (a deep ensemble of IVON posteriors): each component runs the ``ivon`` learner's own
``fit`` at the full sample size (τ = 1, no coupling), with its own minibatch order and posterior
noise (seeded per component, ``component_seeds``), and the weights stay uniform (a received
``member_weights`` is ignored); the mixture's options are then unused.

Payload (``fedens.payload``): component k's posterior as ``mean.member.<k>.<n>`` /
``precision.member.<k>.<n>`` and its buffers as ``member.<k>.<b>``, the weights as
``member_weights``. A posterior strategy sees names ``member.<k>.<n>`` and, being element-wise,
merges component k with component k; ``member_weights`` is averaged with the FedAvg weights.
Importing and exporting each component is the ``ivon`` learner's (same conversions, clamps and
bit-for-bit round trip).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.base import Learner, minibatches
from fedens.learners.ivon import IVONLearner, IVONOptions
from fedens.payload import MEMBER_WEIGHTS
from fedens.scenario import TrainConfig
from fedens.seeding import derive_seed, seed_torch


class IVONMixtureOptions(IVONOptions):
    """Options of ``ivon_mixture``: ``ivon``'s (per component) and the mixture's."""

    components: int = Field(3, ge=1, description="K mixture components")
    temperature: float = Field(2.0, ge=1, description="tau in round 1, annealed geometrically to 1")
    anneal_rounds: int = Field(10, ge=0, description="rounds over which tau falls to 1 (0: tau = 1 throughout)")
    weight_lr: float = Field(0.1, ge=0, le=1, description="damping of the weights' natural-gradient step (0: fixed)")
    weight_samples: int = Field(2, ge=1, description="draws per component for the weights' step")
    coupling: bool = Field(True, description="add the responsibilities' gradient (the mixture's entropy coupling)")
    independent: bool = Field(False, description="K independent ivon learners averaged uniformly (the equal-compute "
                              "baseline): no coupling, tau = 1, fixed uniform weights, each its own data order and noise")


def temperature_at(options: IVONMixtureOptions, server_round: int) -> float:
    """τ in ``server_round`` (1-based): ``temperature`` ** (1 - (r-1)/anneal_rounds), then 1."""
    if options.anneal_rounds == 0:
        return 1.0
    frac = min(1.0, (server_round - 1) / options.anneal_rounds)
    return float(options.temperature ** (1.0 - frac))


def log_gaussians(theta: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """log N(θ; m_j, diag(1/s_j)) for every component j: ``(K,)`` from θ ``(P,)``, m and s ``(K, P)``."""
    diff = theta.double() - means.double()
    s = precisions.double()
    return 0.5 * (torch.log(s).sum(1) - (s * diff.square()).sum(1) - theta.numel() * math.log(2 * math.pi))


def responsibilities(theta: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """r_j(θ) = π_j q_j(θ) / q(θ), ``(K,)`` (on θ's device)."""
    return torch.softmax(log_pi.to(theta.device).double() + log_gaussians(theta, means, precisions), dim=0)


def coupling_gradient(theta: torch.Tensor, k: int, means: torch.Tensor, precisions: torch.Tensor,
                      log_pi: torch.Tensor) -> torch.Tensor:
    """∇_θ log r_k(θ) = −s_k ⊙ (θ − m_k) + Σ_j r_j(θ) s_j ⊙ (θ − m_j), ``(P,)``."""
    r = responsibilities(theta, means, precisions, log_pi)  # (K,)
    scaled = precisions.double() * (theta.double() - means.double())  # (K, P)
    return (-scaled[k] + (r[:, None] * scaled).sum(0)).to(theta.dtype)


def gaussian_entropy(precision: torch.Tensor) -> float:
    """H(N(m, diag(1/s))) = ½ Σ log(2πe / s)."""
    return float(0.5 * (math.log(2 * math.pi * math.e) * precision.numel() - torch.log(precision.double()).sum()))


@LEARNERS.register("ivon_mixture")
class IVONMixtureLearner(Learner):
    """K IVON posteriors and their weights; the predictive has K x ``samples`` members."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)
    Options = IVONMixtureOptions

    def __init__(self, model_fn: Callable[[], nn.Module], options: IVONMixtureOptions, train: TrainConfig,
                 device: torch.device) -> None:
        super().__init__(model_fn, options, train, device)
        ivon_options = IVONOptions(**{k: getattr(options, k) for k in IVONOptions.model_fields})
        self.components = [IVONLearner(model_fn, ivon_options, train, device) for _ in range(options.components)]
        self.log_pi = torch.full((options.components,), -math.log(options.components), dtype=torch.float64)

    @property
    def pi(self) -> torch.Tensor:
        return torch.softmax(self.log_pi, 0)

    @property
    def predictive_weights(self) -> torch.Tensor:  # type: ignore[override]
        """π_k / samples for each of component k's draws, ``(K * samples,)``."""
        return (self.pi / self.options.samples).float().repeat_interleave(self.options.samples)

    @predictive_weights.setter
    def predictive_weights(self, value: torch.Tensor | None) -> None:  # the base class sets None
        pass

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every component's flat mean and precision, ``(K, P)`` each (detached)."""
        means = torch.stack([torch.cat([p.detach().flatten() for p in c.model.parameters()]) for c in self.components])
        return means, torch.stack([c.precision.detach() for c in self.components])

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        if self.options.independent:
            return self._fit_independent(data, generator, server_round)
        o = self.options
        tau = temperature_at(o, server_round)
        ess = (o.ess or float(len(data))) / tau
        # The received precision was made at the previous round's temperature: converted to hess
        # with that round's sample size, the new one tempers it at once (precision x tau_{r-1}/tau_r).
        ess_before = (o.ess or float(len(data))) / temperature_at(o, max(server_round - 1, 1))
        for c in self.components:  # as ivon's fit, at the tempered sample size
            fresh = o.ess is None and server_round == 1  # the received precision is a placeholder
            c.opt = c._optimizer(ess, None if fresh else c._hess_from_precision(c.precision, ess_before))
            c._imported = None
            c.model.train()
        couple = o.coupling and len(self.components) > 1
        total, count = 0.0, 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in minibatches(data, self.train_cfg.batch_size, generator, self.device):
                means, precisions = self._stack() if couple else (None, None)
                for k, c in enumerate(self.components):
                    for _ in range(o.mc_train):
                        with c.opt.sampled_params(train=True):
                            c.opt.zero_grad(set_to_none=True)
                            loss = F.cross_entropy(c.model(x), y)
                            loss.backward()
                            if couple:
                                self._add_coupling(c, k, means, precisions, ess)
                        total, count = total + loss.item() * len(y), count + len(y)
                    c.opt.step()
        self._update_weights(data, ess)
        return {"train_loss": total / max(count, 1), "temperature": tau,
                **{f"weight{k}": float(w) for k, w in enumerate(self.pi)}}

    def _fit_independent(self, data: ArrayDataset, generator: torch.Generator, server_round: int) -> dict[str, float]:
        """``independent``: component k is the ``ivon`` learner's ``fit``, with the full sample size,
        its own minibatch order (a generator seeded by ``component_seeds``) and its own posterior
        noise (torch's global RNG seeded the same, restored afterwards)."""
        losses = []
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.device.type == "cuda" else []
        for c, seed in zip(self.components, component_seeds(generator, len(self.components))):
            with torch.random.fork_rng(devices=cuda):
                seed_torch(seed)
                losses.append(c.fit(data, torch.Generator().manual_seed(seed), server_round)["train_loss"])
        return {"train_loss": float(np.mean(losses)), "temperature": 1.0,
                **{f"weight{k}": float(w) for k, w in enumerate(self.pi)}}

    def _add_coupling(self, c: IVONLearner, k: int, means: torch.Tensor, precisions: torch.Tensor, ess: float) -> None:
        """Adds −(1/ess_τ) ∇ log r_k(θ) at the current sample θ to the parameters' gradients."""
        params = list(c.model.parameters())
        theta = torch.cat([p.detach().flatten() for p in params])
        extra = -coupling_gradient(theta, k, means, precisions, self.log_pi) / ess
        for p, g in zip(params, extra.split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone() if p.grad is None else p.grad + g.view_as(p)

    @torch.no_grad()
    def _update_weights(self, data: ArrayDataset, ess: float) -> None:
        """The damped natural-gradient step of the weights (module docstring)."""
        if self.options.weight_lr == 0 or len(self.components) == 1 or len(data) == 0:
            return
        x = torch.from_numpy(data.x).to(self.device)
        y = torch.from_numpy(data.y).to(self.device)
        means, precisions = self._stack()
        target = torch.zeros(len(self.components), dtype=torch.float64)
        for k, c in enumerate(self.components):
            c.model.eval()
            losses, log_r = [], []
            for _ in range(self.options.weight_samples):
                with c.opt.sampled_params():
                    losses.append(float(F.cross_entropy(c.model(x), y)))
                    theta = torch.cat([p.detach().flatten() for p in c.model.parameters()])
                    log_r.append(float(torch.log(responsibilities(theta, means, precisions, self.log_pi)[k].clamp_min(1e-300))))
            # E_{q_k}[log p] for IVON's prior N(0, 1/(ess_tau wd)), up to a constant shared by all k
            log_prior = -0.5 * ess * self.options.weight_decay * float((means[k].double().square() + 1 / precisions[k].double()).sum())
            target[k] = -ess * float(np.mean(losses)) + gaussian_entropy(precisions[k]) + log_prior + float(np.mean(log_r))
        lr = self.options.weight_lr
        self.log_pi = torch.log_softmax((1 - lr) * self.log_pi + lr * torch.log_softmax(target, 0), 0)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``samples`` draws of every component, ``(K * samples, batch, classes)``."""
        return torch.cat([c.predict_proba(x) for c in self.components])

    def get_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, c in enumerate(self.components):
            out.update({_to_mixture(name, k): v for name, v in c.get_arrays().items()})
        out[MEMBER_WEIGHTS] = self.pi.numpy().astype(np.float32)
        return out

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        for k, c in enumerate(self.components):
            c.set_arrays({_from_mixture(name, k): v for name, v in arrays.items() if _component_of(name) == k})
        weights = np.asarray(arrays[MEMBER_WEIGHTS], dtype=np.float64) if MEMBER_WEIGHTS in arrays else None
        if weights is None or weights.shape != (len(self.components),) or not (weights > 0).all():
            raise KeyError(f"arrays lack positive {MEMBER_WEIGHTS!r} of shape ({len(self.components)},)")
        if self.options.independent:  # the weights stay uniform, whatever the strategy made of them
            weights = np.ones(len(self.components))
        self.log_pi = torch.log_softmax(torch.log(torch.from_numpy(weights)), 0)


def component_seeds(generator: torch.Generator, components: int) -> list[int]:
    """The seeds of ``independent`` components in one ``fit``: one draw from ``generator``, then
    ``derive_seed(draw, k)`` for component k."""
    draw = int(torch.randint(2**62, (1,), generator=generator))
    return [derive_seed(draw, k) for k in range(components)]


def _to_mixture(name: str, k: int) -> str:
    """A component's payload name in the mixture: ``mean.<n>`` -> ``mean.member.<k>.<n>``, a
    buffer ``<b>`` -> ``member.<k>.<b>``."""
    for role in ("mean.", "precision."):
        if name.startswith(role):
            return f"{role}member.{k}.{name[len(role):]}"
    return f"member.{k}.{name}"


def _component_of(name: str) -> int | None:
    for role in ("mean.", "precision.", ""):
        if name.startswith(role + "member."):
            return int(name[len(role) + 7 :].split(".", 1)[0])
    return None


def _from_mixture(name: str, k: int) -> str:
    for role in ("mean.", "precision."):
        if name.startswith(f"{role}member.{k}."):
            return role + name[len(f"{role}member.{k}.") :]
    return name[len(f"member.{k}.") :]
