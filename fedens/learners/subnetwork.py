"""``subnetwork``: Ex uno plures (Zhang, Gao, Sabuncu 2021, arXiv 2106.04767).

One parent network is split into M subnetworks whose masks do not overlap; the masks come from
a pruning criterion applied to a briefly trained parent. Each subnetwork is then trained
independently and the ensemble's predictive averages their softmax outputs.

Decisions (the paper's exact criterion was not retrieved; this is ours):
- ``prepare`` (once, in the driver) trains the parent for ``parent_epochs`` on the server's
  public split (``data.server_fraction`` must be > 0) with the scenario's ``train`` settings.
- Mask rule, per Linear/Conv2d weight tensor (every one, the output layer included): rank the
  entries by |w| (largest first, ties by position) and deal them round-robin, rank j to
  subnetwork j mod M. The masks are disjoint and their union is the whole tensor. Magnitude
  pruning keeps the largest weights; dealing them in turn gives every subnetwork the same share
  of large weights (within one entry per layer), where pruning the parent M times in sequence
  would leave the last subnetworks only what the criterion deems least important.
- Members start from the pruned parent, rescaled: w_k = M · (w ⊙ mask_k), the inverted-dropout
  scaling for keeping 1/M of the weights, so each subnetwork starts near the parent's function.
  Biases are per member (copies of the parent's), so nothing is shared and each subnetwork trains
  exactly as if alone (the objective sums the members' losses; gradients outside a member's mask
  are zero because its forward uses w_k ⊙ mask_k).
- ``prepare`` writes the parent's weights and each weight entry's owner to
  ``<run_dir>/subnetwork_masks.npz`` and returns the options with ``masks_file`` set to that
  absolute path, so masks travel once, with the options, not every round. A scenario that
  already names a ``masks_file`` (e.g. a run's resolved ``scenario.yaml``) reuses it; a relative
  path is taken from the working directory.

Exported arrays: each subnetwork's weights as ``member.{k}.<layer>.weight`` (zeros outside its
mask) and its biases as ``member.{k}.<layer>.bias``. Every client holds the same masks, so FedAvg
averages member k's weights with member k's and the zeros stay zero; strategies that select or
regroup members get self-contained subnetworks. The cost is M times a sparse network's bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.learners import LEARNERS
from fedens.learners._implicit import CONV_FUNCTIONS, WEIGHT_LAYERS, TiledEnsembleLearner, conv_kwargs, rewrite, untile
from fedens.learners.base import NoOptions, PrepareContext
from fedens.learners.single import SingleLearner
from fedens.seeding import derive_seed

MASKS_FILE = "subnetwork_masks.npz"


class SubnetworkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path_fields: ClassVar[tuple[str, ...]] = ("masks_file",)  # made absolute by the scenario loader
    members: int = Field(2, ge=1, le=16, description="number of subnetworks M; each owns 1/M of every weight tensor")
    parent_epochs: int = Field(3, ge=1, description="epochs of parent training on the public split before pruning")
    masks_file: str | None = Field(None, description="parent weights and masks; filled in by prepare")


def deal_by_magnitude(weight: torch.Tensor, members: int) -> torch.Tensor:
    """Owner (0..M-1) of every entry of ``weight``: entries ranked by |w|, largest first (stable),
    dealt round-robin. Same shape as ``weight``, int64."""
    order = torch.sort(weight.detach().abs().flatten(), descending=True, stable=True).indices
    owner = torch.empty_like(order)
    owner[order] = torch.arange(order.numel(), device=order.device) % members
    return owner.view(weight.shape)


class SubnetworkLayer(nn.Module):
    """M disjointly masked copies of a Linear/Conv1d/Conv2d layer, applied to a tiled batch.

    Tensors: ``weight`` ``(M, *layer.weight.shape)``, ``bias`` ``(M, out)``; buffer ``mask`` (bool,
    like ``weight``, not exported: it comes from the masks file). Member k's rows of the tiled
    batch ``(M*B, in, *spatial)`` go through ``weight[k] ⊙ mask[k]`` only.
    """

    member_tensors = ("weight", "bias")

    def __init__(self, layer: nn.Linear | nn.Conv1d | nn.Conv2d, owner: torch.Tensor, members: int) -> None:
        super().__init__()
        self.conv = None if isinstance(layer, nn.Linear) else conv_kwargs(layer)
        self.conv_fn = None if isinstance(layer, nn.Linear) else CONV_FUNCTIONS[type(layer)]
        mask = torch.stack([owner == k for k in range(members)])
        bias = layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])
        self.register_buffer("mask", mask, persistent=False)
        self.weight = nn.Parameter(members * layer.weight.detach() * mask)  # inverted-dropout scaling
        self.bias = nn.Parameter(bias.expand(members, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.shape[0]
        w = self.weight * self.mask  # so gradients outside a member's mask are exactly zero
        if self.conv is None:  # (M, B, in) @ (M, in, out) + (M, 1, out)
            return torch.baddbmm(self.bias[:, None], untile(x, m), w.transpose(1, 2)).flatten(0, 1)
        # Members as convolution groups: (B, M*C, *spatial) with M groups of C input channels.
        xg = untile(x, m).transpose(0, 1).flatten(1, 2)
        y = self.conv_fn(xg, w.flatten(0, 1), self.bias.flatten(), groups=m, **self.conv)
        return y.view(y.shape[0], m, -1, *y.shape[2:]).transpose(0, 1).flatten(0, 1)


@LEARNERS.register("subnetwork")
class SubnetworkLearner(TiledEnsembleLearner):
    """M non-overlapping subnetworks of one pruned parent, trained independently;
    ``(M, batch, classes)``."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = SubnetworkOptions
    options: SubnetworkOptions
    sum_member_losses = True

    @classmethod
    def check_scenario(cls, options: SubnetworkOptions, scn: Any) -> str | None:
        if options.masks_file is None and scn.data.server_fraction <= 0:
            return ("data.server_fraction: subnetwork trains its parent network on the server's public split: "
                    "set it > 0 (e.g. 0.1) or give learner.masks_file")
        return None

    @classmethod
    def prepares(cls, options: SubnetworkOptions) -> bool:
        return options.masks_file is None  # no masks given: train the parent and deal them

    @classmethod
    def prepare(cls, options: SubnetworkOptions, ctx: PrepareContext) -> SubnetworkOptions:
        """Train the parent on the public split, deal its weights into M masks, save both."""
        if options.masks_file is not None:
            path = Path(options.masks_file).resolve()  # absolute: Ray actors may run elsewhere
            if not path.is_file():
                raise ValueError(f"subnetwork: learner.masks_file {options.masks_file} does not exist")
            return options.model_copy(update={"masks_file": str(path)})
        if len(ctx.public) == 0:
            raise ValueError("subnetwork: the parent network trains on the server's public split, which is empty; "
                             "set data.server_fraction > 0 (e.g. 0.1)")
        train = ctx.train.model_copy(update={"local_epochs": options.parent_epochs})
        parent = SingleLearner(ctx.model_fn, NoOptions(), train, ctx.device)
        parent.fit(ctx.public, torch.Generator().manual_seed(derive_seed(ctx.seed, 0, 2)))
        state = {k: v.detach().cpu() for k, v in parent.model.state_dict().items()}
        owners = {f"{name}.weight": deal_by_magnitude(layer.weight, options.members).to(torch.int8)
                  for name, layer in parent.model.named_children() if isinstance(layer, WEIGHT_LAYERS)}
        path = Path(ctx.run_dir) / MASKS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, members=np.int64(options.members), **{f"parent.{k}": v.numpy() for k, v in state.items()},
                 **{f"owner.{k}": v.cpu().numpy() for k, v in owners.items()})
        return options.model_copy(update={"masks_file": str(path.resolve())})

    def build(self, model_fn: Callable[..., nn.Module]) -> nn.Sequential:
        if self.options.masks_file is None:
            raise ValueError("subnetwork: learner.masks_file is not set; it is made by the learner's prepare step "
                             "(fedens.api.prepare_learner) before federation")
        with np.load(self.options.masks_file) as f:
            if int(f["members"]) != self.members:
                raise ValueError(f"subnetwork: {self.options.masks_file} holds masks for {int(f['members'])} members, "
                                 f"learner.members is {self.members}")
            parent = model_fn()
            parent.load_state_dict({k[7:]: torch.from_numpy(f[k]) for k in f.files if k.startswith("parent.")})
            owners = {k[6:]: torch.from_numpy(f[k]).long() for k in f.files if k.startswith("owner.")}
        return rewrite(parent, lambda name, layer, last: {name: SubnetworkLayer(layer, owners[f"{name}.weight"], self.members)})
