"""A small CNN for 8x8, 28x28 and 32x32 images: ``(batch, C, H, W) -> (batch, classes)``.

Two 3x3 conv blocks (the second halves the resolution twice only when the image is large
enough), global average pooling to a fixed 2x2 grid so one head serves every input size, then
a hidden linear layer. No batch norm: BN statistics averaged across non-IID clients are a
known source of trouble, and the normalisation-based ensembles add their own layers.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.models import MODELS, ModelSpec


class CNNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    hidden: int = Field(64, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


def check_cnn(opts: CNNOptions, input_shape: tuple[int, ...]) -> str | None:
    if len(input_shape) != 3:
        return f"cnn needs image inputs (C, H, W), this dataset gives shape {tuple(input_shape)}"
    if min(input_shape[1:]) < 4:
        return f"cnn needs images of at least 4x4, got {input_shape[1]}x{input_shape[2]}"
    return None


def build_cnn(opts: CNNOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    in_ch, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for ch in opts.channels:
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.ReLU()]
        if size >= 8:  # pool while the map is large enough to stay >= 4x4
            layers.append(nn.MaxPool2d(2))
            size //= 2
        in_ch = ch
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(in_ch * 4, opts.hidden), nn.ReLU()]
    if opts.dropout > 0:
        layers.append(nn.Dropout(opts.dropout))
    layers.append(nn.Linear(opts.hidden, num_classes))
    return nn.Sequential(*layers)


MODELS.add("cnn", ModelSpec(Options=CNNOptions, build=build_cnn, check=check_cnn))
