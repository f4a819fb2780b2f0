"""``fedbe``: FedBE, Bayesian model ensembling distilled into the global model on the server.

Chen & Chao, "FedBE: Making Bayesian Model Ensemble Applicable to Federated Learning", ICLR 2021
(arXiv 2009.01974; the authors' public code). Every round, after the clients have trained:

1. Fit a diagonal Gaussian to the client weights θ_k (client weights w_k, Σ w_k = 1):
   μ = Σ w_k θ_k (the FedAvg model), σ² = Σ w_k (θ_k − μ)², per element (``fit_gaussian``).
2. Sample M = ``num_samples`` models θ_m ~ N(μ, ``var_scale``·σ²) (``sample_models``), from a
   numpy generator seeded by ``derive_seed(seed, round, SAMPLE_STREAM)``.
3. Teachers: the FedAvg model, the K client models and the M samples (1 + K + M networks). Their
   softmax, averaged on the server-held public split (``data.server_fraction``; its labels are
   never read), is the soft pseudo-label p̄ (``teacher_probabilities``).
4. Distil into the global model, initialised at the FedAvg model (``distill``): SGD (``distill_lr``
   0.01, ``distill_momentum`` 0.9, ``distill_weight_decay`` 0) on KL(target ‖ student) for
   ``distill_epochs`` (20) epochs of ``distill_batch_size`` (128) examples; the new global model is
   the SWA average of the student's weights at the end of every epoch.

Decisions
- Temperature (``temperature`` 0.5): applied as in FedBE's public code (its temperature-sharpening helper,
  used for the KL loss): the averaged teacher probabilities are sharpened,
  target ∝ p̄^(1/T) (with T = 0.5 this squares and renormalises them), and the student is trained
  at temperature 1 (plain softmax), so the model it produces predicts at temperature 1 like every
  other fedens model. It is not Hinton-style logit division of both sides (there is no T² factor).
  ``temperature=1`` distils p̄ itself. The pseudo-labels p̄ are the plain average (step 3); the
  sharpening is a separate step (``sharpen``).
- Variance scaling: the paper's description gives θ ~ N(μ, var_scale·σ²), i.e. ``var_scale`` scales
  the VARIANCE. FedBE's code (``swag.py``, gaussian mode) computes mean + sqrt(var)·ε·var_scale,
  i.e. it scales the standard deviation, and fits the Gaussian to per-tensor-normalised client
  updates θ_k − θ_global; here the Gaussian is fitted to the weights themselves, as in the paper.
  Non-floating arrays (e.g. BatchNorm's ``num_batches_tracked``) are not sampled: every sample
  keeps their FedAvg value.
- Which arrays: the Gaussian is fitted to and sampled over the network's weights, i.e. the names
  of ``learner.model``'s state dict (``single`` and its subclasses; this is why
  ``supported_learners = ("single",)``). Other arrays a subclass exports (e.g. ``snapshot``'s
  ``member.*`` slots) stay at their FedAvg value in the samples and in the result: only the
  network is distilled.
- SWA: by hand, the equal-weight running mean of the student's (floating) arrays at the end of
  each of the ``distill_epochs`` epochs (FedBE's code uses torchcontrib SWA with step-based
  ``swa_start``/``swa_freq``; fedens averages over epochs). Non-floating buffers
  take the last epoch's value. No BatchNorm statistics update is run after averaging (the fedens
  mlp/cnn have no BatchNorm; FedBE only runs ``bn_update`` for its ResNets).
- Optimiser: lr 0.01 (docs/methods.md#fedbe); momentum 0.9 follows FedBE's server optimiser
  (``ServerUpdate.set_opt``). A fresh optimiser every round.
- Teacher predictions use ``predict_proba`` averaged over its members axis (1 for ``single``), in
  eval mode; the student is trained in train mode (dropout active for ``mc_dropout``).
- Randomness: the Gaussian samples come from ``derive_seed(seed, round, SAMPLE_STREAM)``; the
  distillation shuffling (and torch's global RNG, for dropout) from
  ``seeded_generator(seed, round, DISTILL_STREAM)``. The stream tags keep these streams apart
  from the clients' ``(seed, round, partition_id)`` and the evaluation's ``2**32 + k``.
- An empty public split is an error at ``bind`` time (``ValueError``: set data.server_fraction
  > 0). ``check_scenario`` reports the same problem from a scenario alone, for a validation hook.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from fedens.data import ArrayDataset
from fedens.distill import distill, sharpen
from fedens.learners.base import Learner, module_arrays, predict_dataset
from fedens.options import Options as BaseOptions
from fedens.seeding import derive_seed, seeded_generator
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy, ServerContext, weighted_average

log = logging.getLogger("fedens")

SAMPLE_STREAM = 2**33  # derive_seed(seed, round, SAMPLE_STREAM): the Gaussian samples
DISTILL_STREAM = 2**33 + 1  # derive_seed(seed, round, DISTILL_STREAM): distillation minibatches
EMPTY_PUBLIC = "strategy fedbe distils on the server-held public split, which is empty: set data.server_fraction > 0 (e.g. 0.1)"


# --------------------------------------------------------------------------- pure functions


def fit_gaussian(arrays: list[Arrays], weights: np.ndarray) -> tuple[Arrays, Arrays]:
    """``(mean, var)`` of a diagonal Gaussian fitted to K models with weights ``w`` ``(K,)``
    (normalised to sum to 1): mean = Σ w_k θ_k, var = Σ w_k (θ_k − mean)², per element.

    Accumulates in float64; floating arrays come back in their input dtype, non-floating ones
    as the (cast) weighted mean with a float64 zero variance."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(arrays) or len(arrays) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"need K >= 1 models and K non-negative weights with a positive sum, got {len(arrays)} and {w}")
    w = w / w.sum()
    mean: Arrays = {}
    var: Arrays = {}
    for name, first in arrays[0].items():
        stack = np.stack([np.asarray(a[name], dtype=np.float64) for a in arrays])  # (K, *shape)
        wk = w.reshape((-1,) + (1,) * (stack.ndim - 1))
        mu = (wk * stack).sum(0)
        sigma2 = (wk * (stack - mu) ** 2).sum(0)
        if np.issubdtype(first.dtype, np.floating):
            mean[name], var[name] = mu.astype(first.dtype), sigma2.astype(first.dtype)
        else:
            mean[name], var[name] = mu.astype(first.dtype), np.zeros(first.shape, np.float64)
    return mean, var


def sample_models(mean: Arrays, var: Arrays, var_scale: float, num: int, generator: np.random.Generator) -> list[Arrays]:
    """``num`` models θ_m = mean + sqrt(var_scale·var)·ε, ε ~ N(0, I), in the dtype of ``mean``.
    Non-floating arrays are copied from ``mean``."""
    if var_scale < 0 or num < 0:
        raise ValueError(f"need var_scale >= 0 and num >= 0, got {var_scale} and {num}")
    out = []
    for _ in range(num):
        model = {}
        for name, mu in mean.items():
            if np.issubdtype(mu.dtype, np.floating):
                std = np.sqrt(var_scale * np.asarray(var[name], dtype=np.float64))
                model[name] = (mu.astype(np.float64) + std * generator.standard_normal(mu.shape)).astype(mu.dtype)
            else:
                model[name] = mu.copy()
        out.append(model)
    return out


@torch.no_grad()
def teacher_probabilities(learner: Learner, teachers: list[Arrays], data: ArrayDataset, batch_size: int = 512) -> torch.Tensor:
    """The teachers' softmax averaged over teachers (and each teacher's members): ``(n, classes)``.
    Only ``data.x`` is used."""
    total = None
    for arrays in teachers:
        learner.set_arrays(arrays)
        probs = predict_dataset(learner, data, batch_size).mean(0).double()  # (n, classes)
        total = probs if total is None else total + probs
    assert total is not None, "no teachers"
    return (total / len(teachers)).float()


# --------------------------------------------------------------------------- the strategy


class FedBEOptions(BaseOptions):
    """FedBE's parameters (``strategy.params``); other keywords go to Flower's ``FedAvg``."""

    num_samples: int = Field(10, ge=0, description="Gaussian samples M in the teacher ensemble (num_sample_teacher)")
    var_scale: float = Field(0.1, ge=0, allow_inf_nan=False, description="theta ~ N(mu, var_scale sigma^2)")
    temperature: float = Field(0.5, gt=0, allow_inf_nan=False, description="sharpening: target ∝ p̄^(1/T)")
    distill_epochs: int = Field(20, ge=1, description="server distillation epochs (SWA over their ends)")
    distill_lr: float = Field(0.01, gt=0, allow_inf_nan=False, description="server SGD learning rate")
    distill_momentum: float = Field(0.9, ge=0, lt=1, description="server SGD momentum")
    distill_weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="server SGD weight decay")
    distill_batch_size: int = Field(128, ge=1, description="server minibatch size (server_bs)")
    include_clients: bool = Field(True, description="the client models are teachers")
    include_fedavg: bool = Field(True, description="the FedAvg model is a teacher")

    @model_validator(mode="after")
    def _some_teacher(self) -> "FedBEOptions":
        if not (self.include_clients or self.include_fedavg or self.num_samples > 0):
            raise ValueError("include_clients, include_fedavg, num_samples: the teacher ensemble is empty "
                             "(no clients, no FedAvg model, no samples)")
        return self


class FedBE(FedensStrategy):
    """FedBE (Chen & Chao, ICLR 2021): a Bayesian ensemble of client models distilled on the server."""

    supported_learners: ClassVar[tuple[str, ...] | None] = ("single",)
    Options = FedBEOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._learner: Learner | None = None
        self.last_distill_losses: list[float] = []

    @classmethod
    def check_scenario(cls, scn: Any) -> str | None:
        """The problem with running this strategy on ``scn`` (for scenario validation), or None."""
        return f"data.server_fraction: {EMPTY_PUBLIC}" if scn.data.server_fraction <= 0 else None

    def bind(self, ctx: ServerContext) -> None:
        if len(ctx.data.public) == 0:
            raise ValueError(EMPTY_PUBLIC)
        super().bind(ctx)
        self._learner = None  # built on first use, from this context

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        if self.ctx is None:
            raise RuntimeError("fedbe computes on the server: call bind(ctx) before the first round")
        if self._learner is None:
            self._learner = self.ctx.new_learner()
        learner, public, seed = self._learner, self.ctx.data.public, self.ctx.seed

        fedavg = weighted_average(arrays, weights)
        net_names = [k for k in module_arrays(learner.model) if k in fedavg]
        mean, var = fit_gaussian([{k: a[k] for k in net_names} for a in arrays], weights)
        rng = np.random.default_rng(derive_seed(seed, server_round, SAMPLE_STREAM))
        samples = [{**fedavg, **s} for s in sample_models(mean, var, self.options.var_scale, self.options.num_samples, rng)]
        teachers = ([fedavg] if self.options.include_fedavg else []) + (list(arrays) if self.options.include_clients else []) + samples

        pseudo = teacher_probabilities(learner, teachers, public)  # (n, classes)
        targets = sharpen(pseudo, self.options.temperature)
        learner.set_arrays(fedavg)  # the student starts at the FedAvg model
        generator = seeded_generator(seed, server_round, DISTILL_STREAM)
        student, losses = distill(
            learner, targets, public, epochs=self.options.distill_epochs, lr=self.options.distill_lr, momentum=self.options.distill_momentum,
            weight_decay=self.options.distill_weight_decay, batch_size=self.options.distill_batch_size, generator=generator,
        )
        self.last_distill_losses = losses
        log.info("fedbe round %d: %d teachers on %d public examples, distillation KL %.4f -> %.4f",
                 server_round, len(teachers), len(public), losses[0], losses[-1])
        return {**fedavg, **student}


STRATEGIES.add("fedbe", FedBE)
