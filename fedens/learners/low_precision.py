"""``low_precision``: training-free ensembles by stochastic rounding to a low-bit grid (LPE-BSR).

Nam & Lee, "Ex Uno Pluria: Insights on Ensembling in Low Precision Number Systems", NeurIPS 2024
(arXiv 2411.14860). One trained network; each of M members is a Bernoulli stochastic rounding of
its weights onto a low-precision grid, and the predictive averages the members' softmaxes.

Decisions
- Training is ``single``'s loop; the network travels under plain names (it is one network) and
  FedAvg averages the full-precision weights. The rounding happens only at prediction, so
  members cost no training, no state and no bytes on the wire.
- Grid: per tensor, uniform over [min w, max w] with 2^bits levels, step Δ = (max − min)/(2^bits − 1).
  ŵ = the grid point below w with probability (ceil − w)/Δ, else the one above: E[ŵ] = w
  (unbiased) and every ŵ is on the grid. A constant tensor (Δ = 0) is kept as it is.
- Only weight tensors (two or more dimensions: Linear matrices, conv kernels) are rounded;
  biases stay in full precision. They are well under 1% of the parameters, so rounding them
  saves nothing worth having, and a bias's per-tensor [min, max] range over a handful of values
  makes its 2^bits grid coarse relative to the logits it shifts directly.
- The M roundings are drawn once per set of weights (at the first prediction after ``fit`` or
  ``set_arrays``) and kept, so member m is the same network on every batch of an evaluation;
  they draw from torch's global RNG, which callers seed before each evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.single import SingleLearner
from fedens.scenario import TrainConfig


class LowPrecisionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: int = Field(8, ge=1, description="stochastic roundings averaged at prediction")
    bits: int = Field(4, ge=1, le=16, description="grid of 2^bits levels per weight tensor")


def stochastic_round(w: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli stochastic rounding of ``w`` (any shape) onto the uniform grid of ``2**bits``
    levels spanning ``[w.min(), w.max()]``. Unbiased: ``E[result] = w``. Same shape and dtype."""
    lo, hi = w.min(), w.max()
    levels = 2**bits - 1
    delta = (hi - lo) / levels
    if delta == 0:
        return w.clone()
    t = (w - lo) / delta  # position in grid steps, in [0, levels]
    below = t.floor()
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    up = u < t - below  # P(up) = (w - floor)/Δ, P(down) = (ceil - w)/Δ
    return lo + (below + up).clamp(0, levels) * delta  # clamp: t may overshoot levels by an ulp


@LEARNERS.register("low_precision")
class LowPrecisionLearner(SingleLearner):
    """One full-precision network; predictive ``(M, batch, classes)`` over M stochastic roundings."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = LowPrecisionOptions

    def __init__(
        self, model_fn: Callable[[], nn.Module], options: LowPrecisionOptions, train: TrainConfig, device: torch.device
    ) -> None:
        super().__init__(model_fn, options, train, device)
        self._members: list[dict[str, torch.Tensor]] | None = None  # drawn at the first prediction

    def rounded_weights(self) -> dict[str, torch.Tensor]:
        """One member: every weight tensor (ndim >= 2) rounded, biases and buffers as they are."""
        return {
            name: stochastic_round(t, self.options.bits) if t.ndim >= 2 and t.is_floating_point() else t
            for name, t in self.model.state_dict().items()
        }

    def member_weights(self) -> list[dict[str, torch.Tensor]]:
        """The M roundings, drawn once per set of weights: member m is one network on every
        batch of a dataset (``predict_dataset`` calls ``predict_proba`` per chunk)."""
        if self._members is None:
            self._members = [self.rounded_weights() for _ in range(self.options.members)]
        return self._members

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        self._members = None
        return super().fit(data, generator, server_round)

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._members = None
        super().set_arrays(arrays)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``x (b, ...) -> (M, b, classes)``."""
        self.model.eval()
        return torch.stack([F.softmax(functional_call(self.model, w, (x,)), dim=-1) for w in self.member_weights()])
