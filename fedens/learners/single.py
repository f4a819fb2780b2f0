"""``single``: one network trained by minibatch SGD on cross-entropy; the baseline learner."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.base import Learner, NoOptions, load_module_arrays, make_optimizer, minibatches, module_arrays
from fedens.scenario import TrainConfig


@LEARNERS.register("single")
class SingleLearner(Learner):
    """One network; its predictive has one member: ``(1, batch, classes)``."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    def __init__(self, model_fn: Callable[[], nn.Module], options: NoOptions, train: TrainConfig, device: torch.device) -> None:
        super().__init__(model_fn, options, train, device)
        self.model = model_fn().to(device)

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        self.model.train()
        opt = make_optimizer(self.model.parameters(), self.train_cfg)
        total, count = 0.0, 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in minibatches(data, self.train_cfg.batch_size, generator, self.device):
                loss = F.cross_entropy(self.model(x), y)
                total_loss = loss if self.objective is None else loss + self.objective_penalty(dict(self.model.named_parameters()))
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                opt.step()
                total, count = total + loss.item() * len(y), count + len(y)
        return {"train_loss": total / max(count, 1)}

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return F.softmax(self.model(x), dim=-1).unsqueeze(0)

    def get_arrays(self) -> dict[str, np.ndarray]:
        return module_arrays(self.model)

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        load_module_arrays(self.model, arrays)
