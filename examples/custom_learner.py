"""An example plug-in learner: a single network whose predictive is temperature-scaled,
p = softmax(logits / T). T > 1 softens over-confident predictions.

Use it from a scenario by path (or as ``package.module:Class``)::

    learner: {kind: examples/custom_learner.py:TemperatureLearner, temperature: 1.5}

A learner subclasses ``fedens.learners.base.Learner`` (here ``SingleLearner``, to reuse its
training loop) and declares its scenario options as a pydantic model named ``Options``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedens.learners.single import SingleLearner


class TemperatureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.5, gt=0)


class TemperatureLearner(SingleLearner):
    Options = TemperatureOptions

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, batch, classes)``: the softmax of the logits divided by the temperature."""
        self.model.eval()
        return F.softmax(self.model(x) / self.options.temperature, dim=-1).unsqueeze(0)
