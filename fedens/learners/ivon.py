"""``ivon``: a diagonal-Gaussian variational posterior trained with IVON (Shen et al., "Variational
Learning is Effective for Large Deep Networks", ICML 2024, arXiv 2402.17641), using the
``ivon-opt`` package (``ivon.IVON``).

The posterior is ``N(m, diag(1 / (ess * (hess + weight_decay))))``: ``m`` are the network's
parameters, ``hess`` is IVON's running Hessian estimate (``param_groups[0]["hess"]``, one flat
tensor over all parameters). It travels as ``mean.<name>`` (= the parameter) and
``precision.<name>`` (= ``ess * (hess + weight_decay)``), so FedAvg averages means and precisions
element-wise; a precision-aware strategy can combine them properly (docs/methods.md#ivon).

Decisions:
- Training is the package's loop: per step, ``mc_train`` times ``with opt.sampled_params(train=True):
  loss.backward()``, then ``opt.step()``. Prediction averages nothing itself: it returns the
  ``samples`` Monte Carlo predictives ``(samples, batch, classes)`` and the metrics average them.
- Import (as ``ivonwithprior._set_posterior``): parameters = mean, ``hess = precision / ess -
  weight_decay``, clamped at 0, i.e. an imported precision never falls below the prior precision
  ``ess * weight_decay`` (an average of client precisions scaled by other clients' data sizes
  can). ``weight_decay`` must be > 0 so every precision is positive.
- Under IVON-ADMM (``strategies/ivon_admm.py``) the objective's ``ivon_setup`` replaces the
  optimiser by ``fedens.optim.ivon_prior.IVONPrior`` with the global posterior as prior and the
  dual terms; otherwise the package's ``ivon.IVON`` is used.
- Only the posterior travels. IVON's momentum and step count are local and start afresh in
  every ``fit`` (every round), as a fresh optimiser would.
- ``ess=None`` means the client's number of training examples, known only in ``fit``. Before
  that (e.g. the server's learner, which never trains) ``ess`` is 1 and only the precision
  matters; the server's fresh posterior (round 0) has precision ``hess_init + weight_decay``, a
  placeholder. Changing ``ess`` keeps the precision (the posterior), not ``hess``. In round 1
  the imported precision is that placeholder, so with ``ess=None`` the client starts from
  ``hess_init`` as a centralised run would; from round 2 on it imports the global posterior.
- Importing then exporting without training returns the received precision bit for bit (unless
  the clamp changed it): ``precision -> hess -> precision`` would round in float32.
- Defaults are tuned for short federated runs on small clients (digits, 10 clients of ~100
  examples, 2 local epochs of batch 32, i.e. ~10 steps per round, 20 rounds, FedAvg; 3 seeds):
  - ``hess_init=3``: the initial posterior std is ``1/sqrt(ess * hess_init)``; with ess ~100 the
    paper's 0.1 (tuned for ess 5e4) gives std ~0.3, noise larger than the weights themselves, and
    the MLP underfits (accuracy 0.91). 3 to 10 give std 0.03 to 0.06 (the paper's CIFAR setting
    gives 0.014) and the best accuracy and NLL; 3 keeps more posterior spread than 10.
  - ``beta2=0.999``: the paper's 0.99999 is for ~1e5 steps; in ~200 steps it leaves ``hess`` at
    ``hess_init``. 0.999 lets it move and is stable; 0.99 was worse everywhere and collapses for
    ``hess_init`` >= 10 (``hess`` drops to the small, noisy per-weight estimates while the step is
    scaled by ``hess_init + wd``: steps and noise blow up, accuracy 0.2 to 0.4).
  - ``lr=0.5``: the mean's step is ``lr * momentum / (hess + wd) * (hess_init + wd)``, ~SGD with
    ``lr`` while ``hess`` stays near ``hess_init``. 0.1 and 0.2 underfit in 20 rounds; 1.0 is
    slightly better in distribution but more overconfident on the shifted test set.
  - ``samples=32``: half the paper's 64 test samples; the Monte Carlo error of the averaged
    predictive is already small next to the differences between methods.
  Measured (3 seeds, test set): accuracy 0.962, NLL 0.135, ECE 0.019, against the quickstart's
  single MLP (SGD, lr 0.1) 0.951, 0.218, 0.084.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ivon
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.base import Learner, minibatches
from fedens.objectives import IVONSetup
from fedens.optim.ivon_prior import IVONPrior
from fedens.scenario import TrainConfig


# Named configurations of the options a preset sets (docs/methods.md#ivon; sources there).
PRESETS: dict[str, dict[str, Any]] = {
    # fedens' plain-IVON defaults: beta2 and the constant schedule are the authors' (the ivon-opt
    # package default, and every CIFAR run of team-approx-bayes/ivon-experiments,
    # image_classification/train_ivon.sh: momentum_hess=0.99999); lr and hess_init are fedens'
    # for ~100-400 examples per client (module docstring).
    "fedens": {"lr": 0.5, "hess_init": 3.0, "beta2": 0.99999, "lr_schedule": "constant"},
    # IVON-ADMM's local IVON, team-approx-bayes/bayes-admm configs/mnist_heterog/fedivon.yaml:
    # learning_rate_local 0.02, h0_local 0.005, beta2_local 0.9998, use_scheduler True (a
    # cosine over the communication rounds, local_client_worker.py). Step not rescaled.
    "bayes_admm": {"lr": 0.02, "hess_init": 0.005, "beta2": 0.9998, "lr_schedule": "cosine"},
}


@dataclass(frozen=True)
class IVONHyper:
    """The options a preset sets, resolved (``IVONOptions.resolve``)."""

    preset: str
    lr: float
    hess_init: float
    beta2: float
    lr_schedule: str
    schedule_rounds: int | None


def lr_factor(schedule: str, server_round: int, rounds: int | None) -> float:
    """The learning rate's factor in ``server_round`` (1-based): 1 for ``constant``; for
    ``cosine`` ``(1 + cos(pi * min(r - 1, T) / T)) / 2``, ``T = rounds``: torch's
    ``CosineAnnealingLR(T_max=T, eta_min=0)`` stepped once after every round, as the
    bayes-admm clients do (1 in round 1, then down to 0 at round T + 1, and 0 after)."""
    if schedule == "constant":
        return 1.0
    if rounds is None:
        raise ValueError("ivon: lr_schedule 'cosine' needs schedule_rounds (the run's rounds); only the ivon_admm "
                         "strategy tells its clients the rounds")
    return 0.5 * (1.0 + math.cos(math.pi * min(server_round - 1, rounds) / rounds))


class IVONOptions(BaseModel):
    """Options of ``ivon`` (the scenario's ``learner:`` keys). ``train.lr``/``train.optimizer``
    are not used: IVON is the optimiser; ``train.local_epochs`` and ``train.batch_size`` are.
    ``lr``, ``hess_init``, ``beta2`` and ``lr_schedule`` left at ``None`` are the preset's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Literal["fedens", "bayes_admm"] = Field(
        "fedens", description="named defaults of lr, hess_init, beta2, lr_schedule (docs/methods.md#ivon)")
    lr: float | None = Field(None, gt=0, description="IVON's learning rate (None: the preset's; fedens 0.5, bayes_admm 0.02)")
    ess: float | None = Field(None, gt=0, description="effective sample size; None = the client's training examples")
    hess_init: float | None = Field(None, gt=0, description="initial Hessian h0 (None: the preset's; fedens 3, bayes_admm 0.005)")
    beta1: float = Field(0.9, ge=0, lt=1, description="gradient momentum")
    beta2: float | None = Field(None, ge=0, lt=1, description="Hessian averaging (None: the preset's; fedens 0.99999, "
                                                              "bayes_admm 0.9998)")
    lr_schedule: Literal["constant", "cosine"] | None = Field(
        None, description="per-round lr factor (None: the preset's; fedens constant, bayes_admm cosine)")
    schedule_rounds: int | None = Field(None, ge=1, description="T of the cosine schedule; None = the run's rounds, "
                                                                "which only ivon_admm sends (elsewhere give it)")
    weight_decay: float = Field(1e-4, gt=0, description="prior precision per example (must be > 0)")
    mc_train: int = Field(1, ge=1, description="posterior samples per training step")
    samples: int = Field(32, ge=1, description="Monte Carlo samples at prediction (the paper tests with 64)")
    clip_radius: float = Field(math.inf, gt=0, description="element-wise clip of the preconditioned step")

    def resolve(self) -> IVONHyper:
        """The preset's values where an option is ``None``."""
        preset = PRESETS[self.preset]
        values = {k: v if (v := getattr(self, k)) is not None else preset[k] for k in preset}
        return IVONHyper(preset=self.preset, schedule_rounds=self.schedule_rounds, **values)


@LEARNERS.register("ivon")
class IVONLearner(Learner):
    """A Gaussian posterior over one network; its predictive has ``samples`` members."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = IVONOptions

    def __init__(self, model_fn: Callable[[], nn.Module], options: IVONOptions, train: TrainConfig, device: torch.device) -> None:
        super().__init__(model_fn, options, train, device)
        self.model = model_fn().to(device)
        # Built now so that a learner that never trains (the server's) can sample.
        self.opt = self._optimizer(options.ess or 1.0)
        self._imported: dict[str, np.ndarray] | None = None  # precisions as received, until the next fit

    def _optimizer(self, ess: float, hess: torch.Tensor | None = None, server_round: int | None = None) -> ivon.IVON:
        """Plain IVON (the options' preset where they leave a value at ``None``); with
        ``server_round`` its learning rate is the schedule's for that round."""
        o, hp = self.options, self.options.resolve()
        opt = ivon.IVON(self.model.parameters(), lr=hp.lr, ess=ess, hess_init=hp.hess_init, beta1=o.beta1,
                        beta2=hp.beta2, weight_decay=o.weight_decay, mc_samples=o.mc_train, clip_radius=o.clip_radius)
        if hess is not None:
            opt.param_groups[0]["hess"] = hess
        if server_round is not None:  # set after building: ivon.IVON refuses lr = 0 (the cosine's end)
            opt.param_groups[0]["lr"] = hp.lr * lr_factor(hp.lr_schedule, server_round, hp.schedule_rounds)
        return opt

    def _prior_optimizer(self, setup: IVONSetup, server_round: int = 1) -> IVONPrior:
        """``IVONPrior`` with the prior N(m_g, 1/S_g), the Lagrangian terms and, from round 2 on,
        the posterior started at the global one (``fedens.objectives.IvonAdmm``); lr, hess_init,
        beta2 and schedule as resolved by the options (``preset: bayes_admm`` for the authors'),
        the cosine's T the options' ``schedule_rounds`` or else the run's rounds the strategy sent."""
        o, hp = self.options, self.options.resolve()
        opt = IVONPrior(self.model.parameters(), lr=hp.lr, ess=setup.ess, hess_init=hp.hess_init, beta1=o.beta1,
                        beta2=hp.beta2, weight_decay=o.weight_decay, mc_samples=o.mc_train, clip_radius=o.clip_radius,
                        rescale_lr=setup.rescale_lr)
        rounds = hp.schedule_rounds or getattr(setup, "rounds", None)
        opt.param_groups[0]["lr"] = hp.lr * lr_factor(hp.lr_schedule, server_round, rounds)
        opt.set_prior(setup.prior_mean, precision=setup.prior_precision)
        opt.set_lagrangian(setup.v_tilde, setup.V_tilde)
        if setup.start_at_prior:
            opt.set_posterior(setup.prior_mean, setup.prior_precision)
        return opt

    @property
    def precision(self) -> torch.Tensor:
        """The flat posterior precision ``ess * (hess + weight_decay)``, ``(num_params,)``."""
        group = self.opt.param_groups[0]
        return group["ess"] * (group["hess"] + group["weight_decay"])

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        setup = self.objective.ivon_setup([n for n, _ in self.model.named_parameters()], len(data)) if self.objective else None
        if setup is not None:  # IVON-ADMM: train under the global posterior as prior, plus the duals
            self.opt = self._prior_optimizer(setup, server_round)
        else:
            ess = self.options.ess or float(len(data))
            if self.options.ess is None and server_round == 1:
                hess = None  # the received precision is a placeholder: start at hess_init
            else:
                hess = self._hess_from_precision(self.precision, ess)
            self.opt = self._optimizer(ess, hess, server_round)  # fresh momentum and step count; the posterior carries over
        self._imported = None
        self.model.train()
        total, count = 0.0, 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in minibatches(data, self.train_cfg.batch_size, generator, self.device):
                for _ in range(self.options.mc_train):
                    with self.opt.sampled_params(train=True):
                        self.opt.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(self.model(x), y)
                        loss.backward()
                    total, count = total + loss.item() * len(y), count + len(y)
                self.opt.step()
        return {"train_loss": total / max(count, 1)}

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``samples`` posterior draws' probabilities ``(samples, batch, classes)``."""
        self.model.eval()
        probs = []
        for _ in range(self.options.samples):
            with self.opt.sampled_params():
                probs.append(F.softmax(self.model(x), dim=-1))
        return torch.stack(probs)

    def get_arrays(self) -> dict[str, np.ndarray]:
        params = dict(self.model.named_parameters())
        arrays = {f"mean.{k}": p.detach().cpu().numpy().copy() for k, p in params.items()}
        if self._imported is not None:  # bit for bit: precision -> hess -> precision would round
            arrays.update({f"precision.{k}": v.copy() for k, v in self._imported.items()})
        else:
            precisions = self.precision.detach().split([p.numel() for p in params.values()])
            arrays.update({f"precision.{k}": v.view_as(p).cpu().numpy().copy() for (k, p), v in zip(params.items(), precisions)})
        arrays.update({k: b.detach().cpu().numpy().copy() for k, b in self.model.named_buffers()})
        return arrays

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for k in params for n in (f"mean.{k}", f"precision.{k}") if n not in arrays]
        missing += [k for k, _ in self.model.named_buffers() if k not in arrays]
        if missing:
            raise KeyError(f"arrays lack {len(missing)} tensors of the posterior, e.g. {missing[0]!r}")
        # A fresh optimiser, as a newly built learner has: its ess (options.ess or 1) is the one
        # the precision is converted with, so a reused learner imports exactly what a new one does.
        self.opt = self._optimizer(self.options.ess or 1.0)
        group = self.opt.param_groups[0]
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(torch.as_tensor(np.asarray(arrays[f"mean.{k}"])).to(p))
            for k, b in self.model.named_buffers():
                b.copy_(torch.as_tensor(np.asarray(arrays[k])).to(b))
            precision = torch.cat([torch.as_tensor(np.asarray(arrays[f"precision.{k}"])).flatten() for k in params])
            group["hess"] = self._hess_from_precision(precision.to(group["hess"]), group["ess"])
        clamped = bool((precision < group["ess"] * group["weight_decay"]).any())
        self._imported = None if clamped else {k: np.array(arrays[f"precision.{k}"], dtype=np.float32) for k in params}

    def _hess_from_precision(self, precision: torch.Tensor, ess: float) -> torch.Tensor:
        """``hess = precision / ess - weight_decay``, clamped at 0 (module docstring)."""
        return (precision / ess - self.options.weight_decay).clamp_min(0.0)
