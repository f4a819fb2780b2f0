"""Multi-layer perceptron over flattened inputs: ``(batch, *shape) -> (batch, classes)``."""

from __future__ import annotations

import math

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.models import MODELS, ModelSpec


class MLPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128])
    dropout: float = Field(0.0, ge=0, lt=1)


def build_mlp(opts: MLPOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in opts.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if opts.dropout > 0:
            layers.append(nn.Dropout(opts.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


MODELS.add("mlp", ModelSpec(Options=MLPOptions, build=build_mlp))
