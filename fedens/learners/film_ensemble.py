"""``film_ensemble``: FiLM-Ensemble (Turkoglu et al., NeurIPS 2022, arXiv 2206.00050;
the authors' public code).

FiLM-Ensemble replaces a network's batch-norm layers by member-conditioned ones,

    y_i = γ_i ⊙ (x − μ_i) / √(σ_i² + ε) + β_i,

with separate γ, β and running statistics per member; all other weights are shared and the
batch is tiled over the M members (``fedens.learners._implicit``). Diversity comes only from
the initialisation of γ and β.

Decisions:
- Our mlp/cnn have no normalisation layers, so one ``FiLMNorm`` is inserted after every hidden
  Linear/Conv2d, before its ReLU (the VGG placement of the reference code); the output layer
  gets none. It is named ``<layer>_film`` (after Linear ``1``: ``1_film``), so the shared
  weights keep the plain network's names.
- Normalisation is PyTorch batch norm applied per member: in training, μ_i and σ_i² are the
  (biased) mean and variance of member i's slice of the batch, per channel (over batch and
  spatial positions), and the running statistics move by ``momentum`` towards them (unbiased
  variance); in evaluation the running statistics are used. (The reference code normalises with
  the unbiased variance; the difference is a factor n/(n−1) inside the square root.) A training
  batch with a single value per channel cannot be normalised by its own statistics: such a
  batch (a last minibatch of one example) uses the running statistics and leaves them unchanged.
- Init of γ and β: independent ±gain entries (the reference code's ``init_type='bernoulli'``),
  gain 1. The reference's default, Xavier-uniform on each (M, C) matrix (U(−a, a) with
  a = gain·√(6/(M + C)), about ±0.21 for 128 channels), is ``init="xavier"``: centred on zero
  and that small, it shrinks every hidden activation and the gradients through it, and with
  SGD at our few local epochs it learns far slower (digits, MLP [128], one client, 5 epochs:
  test accuracy 0.63 with xavier at gain 1, 0.87 at gain 3, 0.93 with ±1, 0.89 for a single
  network). Either way members start with different signs and scales per channel.
  Running statistics start at mean 0, variance 1.

Exported arrays: shared weights and biases under their plain names; member k's
``member.{k}.<layer>_film.gamma``, ``.beta``, ``.running_mean``, ``.running_var``. FedAvg
averages the running statistics of member k across clients element-wise, which is the standard
behaviour of FedAvg with batch norm (under label skew, clients' statistics differ and their
average is not the statistics of the pooled data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.learners import LEARNERS
from fedens.learners._implicit import TiledEnsembleLearner, rewrite, untile


class FiLMEnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: int = Field(4, ge=1, le=64, description="ensemble size M (the batch is tiled M times)")
    gain: float = Field(1.0, gt=0, description="init scale of γ and β (the reference code's cbn_gain)")
    init: Literal["bernoulli", "xavier"] = Field("bernoulli", description="γ, β entries ±gain, or Xavier-uniform(gain)")
    momentum: float = Field(0.1, gt=0, le=1, description="running-statistics update rate (PyTorch convention)")
    eps: float = Field(1e-5, gt=0)


class FiLMNorm(nn.Module):
    """Batch norm with per-member affine parameters and statistics.

    Tensors ``gamma``, ``beta``, ``running_mean``, ``running_var``: ``(M, C)``. Maps a tiled batch
    ``(M*B, C, *spatial)`` to the same shape; member i's rows are normalised with member i's
    statistics and modulated by γ_i, β_i.
    """

    member_tensors = ("gamma", "beta", "running_mean", "running_var")

    def __init__(self, members: int, channels: int, gain: float, init: str, momentum: float, eps: float) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.empty(members, channels))
        self.beta = nn.Parameter(torch.empty(members, channels))
        with torch.no_grad():
            for p in (self.gamma, self.beta):
                if init == "bernoulli":
                    p.copy_((torch.randint(0, 2, p.shape) * 2 - 1) * gain)
                else:
                    nn.init.xavier_uniform_(p, gain=gain)  # fan_in = C, fan_out = M, as in the reference
        self.register_buffer("running_mean", torch.zeros(members, channels))
        self.register_buffer("running_var", torch.ones(members, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, c = self.gamma.shape
        # Members as extra channels, (B, M*C, *spatial): per-channel batch norm over M*C channels
        # is exactly per-member batch norm, and updates the (M, C) running buffers through views.
        xc = untile(x, m).transpose(0, 1).flatten(1, 2)
        use_batch = self.training and xc.numel() // xc.shape[1] > 1
        y = F.batch_norm(xc, self.running_mean.view(-1), self.running_var.view(-1), self.gamma.view(-1),
                         self.beta.view(-1), use_batch, self.momentum, self.eps)
        return y.view(y.shape[0], m, c, *y.shape[2:]).transpose(0, 1).flatten(0, 1)


@LEARNERS.register("film_ensemble")
class FiLMEnsembleLearner(TiledEnsembleLearner):
    """M members sharing all weights but their normalisation's γ, β and statistics;
    ``(M, batch, classes)``."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = FiLMEnsembleOptions
    options: FiLMEnsembleOptions

    def build(self, model_fn: Callable[..., nn.Module]) -> nn.Sequential:
        o = self.options

        def make(name: str, layer: nn.Module, last: bool) -> dict[str, nn.Module]:
            if last:
                return {name: layer}
            norm = FiLMNorm(o.members, layer.weight.shape[0], o.gain, o.init, o.momentum, o.eps)
            return {name: layer, f"{name}_film": norm}

        return rewrite(model_fn(), make)
