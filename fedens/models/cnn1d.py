"""A small 1-D CNN for signals such as MNIST-1D: ``(batch, C, L) -> (batch, classes)``.

The MNIST-1D paper's CNN in spirit (Greydanus & Kobak, ICML 2024): a few convolutions with
stride 2 over the sequence, ReLU, then a linear head. The paper reports about 95% for its CNN and
about 70% for an MLP; this one, trained centrally on fedens' split (scenarios/mnist1d.yaml's
settings), reaches about 86% and the MLP about 62%: the gap is what makes the dataset separate
methods. No batch norm, as in
``cnn``: statistics averaged across non-IID clients are a known source of trouble.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.models import MODELS, ModelSpec


class CNN1dOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: list[int] = Field(default_factory=lambda: [25, 25, 25], min_length=1)
    kernel: int = Field(5, ge=1, description="kernel size of every convolution (odd keeps lengths simple)")
    hidden: int = Field(0, ge=0, description="a hidden linear layer of this width before the head (0: none)")
    dropout: float = Field(0.0, ge=0, lt=1)


def check_cnn1d(opts: CNN1dOptions, input_shape: tuple[int, ...]) -> str | None:
    if len(input_shape) != 2:
        return f"cnn1d needs signals (C, L), this dataset gives shape {tuple(input_shape)}"
    if input_shape[1] < 2 ** len(opts.channels):
        return f"cnn1d with {len(opts.channels)} stride-2 layers needs signals of length >= {2 ** len(opts.channels)}"
    return None


def build_cnn1d(opts: CNN1dOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    in_ch, length = input_shape
    layers: list[nn.Module] = []
    for ch in opts.channels:
        layers += [nn.Conv1d(in_ch, ch, opts.kernel, stride=2, padding=opts.kernel // 2), nn.ReLU()]
        length = (length + 2 * (opts.kernel // 2) - opts.kernel) // 2 + 1
        in_ch = ch
    layers.append(nn.Flatten())
    width = in_ch * length
    if opts.hidden:
        layers += [nn.Linear(width, opts.hidden), nn.ReLU()]
        width = opts.hidden
    if opts.dropout > 0:
        layers.append(nn.Dropout(opts.dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


MODELS.add("cnn1d", ModelSpec(Options=CNN1dOptions, build=build_cnn1d, check=check_cnn1d))
