"""``mc_dropout``: Monte Carlo dropout, dropout kept on at test time.

Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
Learning", ICML 2016 (arXiv 1506.02142): p(y|x) ≈ (1/T) Σ_t softmax(f(x; ẑ_t)), ẑ_t a fresh
dropout mask per sample.

Decisions
- The network is the scenario's model with its ``dropout`` option replaced by ``p`` (mlp: after
  every hidden layer; cnn: before the head). Training is exactly ``single``'s loop.
- At prediction only the dropout layers are put in train mode (anything else with a
  train/eval difference stays in eval); the T samples are T forwards of the batch, each drawing
  fresh masks from torch's global RNG (which callers seed before evaluating). Tiling the batch
  T times into one forward would save little on these nets and multiply activation memory by T.
- It is one network, so it travels under plain names and FedAvg averages it like ``single``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.learners import LEARNERS
from fedens.learners.single import SingleLearner
from fedens.scenario import TrainConfig


class MCDropoutOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    p: float = Field(0.2, ge=0, lt=1, description="dropout probability (0 turns the sampling off)")
    samples: int = Field(16, ge=1, description="T, Monte Carlo samples per prediction")


@LEARNERS.register("mc_dropout")
class MCDropoutLearner(SingleLearner):
    """One network with dropout ``p``; predictive ``(T, batch, classes)``, one mask set per sample."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = MCDropoutOptions

    def __init__(
        self, model_fn: Callable[..., nn.Module], options: MCDropoutOptions, train: TrainConfig, device: torch.device
    ) -> None:
        super().__init__(lambda: model_fn(dropout=options.p), options, train, device)
        self.dropouts = [m for m in self.model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        if options.p > 0 and not self.dropouts:
            raise ValueError("mc_dropout: the model built with dropout=p has no dropout layer to sample")

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``x (b, ...) -> (T, b, classes)``."""
        self.model.eval()
        for m in self.dropouts:
            m.train()
        return torch.stack([F.softmax(self.model(x), dim=-1) for _ in range(self.options.samples)])
