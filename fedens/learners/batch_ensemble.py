"""``batch_ensemble``: BatchEnsemble (Wen, Tran, Ba, ICLR 2020, arXiv 2002.06715).

Every Linear/Conv2d layer of the scenario's model keeps ONE shared weight W and gives member i
rank-1 "fast weights" r_i (outputs), s_i (inputs) and its own bias b_i. Member i's weight is
W_i = W ⊙ (r_i s_iᵀ), computed without forming W_i:

    y_i = ((x ⊙ s_i) W) ⊙ r_i + b_i

For a Conv2d, s_i scales the input channels and r_i the output channels (W_i = W ⊙ r_i s_iᵀ
broadcast over the kernel). The batch is tiled over the M members in training and prediction
(``fedens.learners._implicit``), and W is trained together with the fast weights on the mean
cross-entropy of all members, as in the paper.

Decisions:
- Fast-weight init: N(1, 0.5²) by default (``fast_init="normal"``, ``fast_init_std=0.5``), the
  setting of the authors' uncertainty-baselines BatchEnsemble configs (``random_sign_init=-0.5``);
  ``fast_init="sign"`` gives the paper's random ±1 sign vectors instead. Members differ from the
  first step only through r and s.
- Member biases start as copies of the layer's own (PyTorch-initialised) bias.
- Every Linear/Conv2d layer, the output layer included, is a BatchEnsemble layer.

Exported arrays: the shared W of layer ``<l>`` as ``<l>.weight`` (the plain network's name, so
FedAvg averages it like any shared weight), member k's ``member.{k}.<l>.r``, ``.s`` and
``.bias``; FedAvg averages member k's fast weights with member k's of the other clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.learners import LEARNERS
from fedens.learners._implicit import CONV_FUNCTIONS, TiledEnsembleLearner, conv_kwargs, per_member, rewrite, untile


class BatchEnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: int = Field(4, ge=1, le=64, description="ensemble size M (the batch is tiled M times)")
    fast_init: Literal["normal", "sign"] = Field("normal", description="r, s ~ N(1, fast_init_std²), or random ±1 signs")
    fast_init_std: float = Field(0.5, ge=0, description="standard deviation of the 'normal' fast-weight init")


class BatchEnsembleLayer(nn.Module):
    """A Linear, Conv1d or Conv2d layer with a shared weight and per-member rank-1 factors.

    Tensors: ``weight`` as the wrapped layer's (shared), ``r`` ``(M, out)``, ``s`` ``(M, in)``,
    ``bias`` ``(M, out)``. Maps a tiled batch ``(M*B, in, *spatial)`` to ``(M*B, out, *spatial')``.
    """

    member_tensors = ("r", "s", "bias")

    def __init__(self, layer: nn.Linear | nn.Conv1d | nn.Conv2d, members: int,
                 fast_init: Callable[[tuple[int, int]], torch.Tensor]) -> None:
        super().__init__()
        self.conv = None if isinstance(layer, nn.Linear) else conv_kwargs(layer)
        self.conv_fn = None if isinstance(layer, nn.Linear) else CONV_FUNCTIONS[type(layer)]
        out_f, in_f = layer.weight.shape[:2]
        bias = layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(out_f)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.r = nn.Parameter(fast_init((members, out_f)).to(layer.weight))
        self.s = nn.Parameter(fast_init((members, in_f)).to(layer.weight))
        self.bias = nn.Parameter(bias.expand(members, out_f).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.r.shape[0]
        x = (untile(x, m) * per_member(self.s, x.ndim)).flatten(0, 1)  # x ⊙ s_i on member i's rows
        y = F.linear(x, self.weight) if self.conv is None else self.conv_fn(x, self.weight, **self.conv)
        return (untile(y, m) * per_member(self.r, y.ndim) + per_member(self.bias, y.ndim)).flatten(0, 1)


@LEARNERS.register("batch_ensemble")
class BatchEnsembleLearner(TiledEnsembleLearner):
    """M members sharing every weight matrix up to rank-1 factors; ``(M, batch, classes)``."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = BatchEnsembleOptions
    options: BatchEnsembleOptions

    def build(self, model_fn: Callable[..., nn.Module]) -> nn.Sequential:
        opts = self.options
        if opts.fast_init == "sign":
            init = lambda shape: torch.randint(0, 2, shape).float() * 2 - 1  # noqa: E731
        else:
            init = lambda shape: 1 + opts.fast_init_std * torch.randn(shape)  # noqa: E731
        return rewrite(model_fn(), lambda name, layer, last: {name: BatchEnsembleLayer(layer, opts.members, init)})
