"""``lora_ensemble``: LoRA-Ensemble (Halbheer, Mühlematter et al., "LoRA-Ensemble: Efficient
Uncertainty Modelling for Self-attention Networks", arXiv 2405.14438;
the authors' public code).

One frozen, pretrained attention backbone (model kind ``vit``) is shared by all members. Member
i adds its own low-rank update to the q, k, v and o projections of every block,
``h_i = W0 x + (alpha / rank) B_i A_i x``, and has its own classification head. Predictions are
``(members, batch, classes)``; the metrics average them.

Decisions:
- Pretraining: ``prepare`` trains the vit on the server-held public split (``data.server_fraction``)
  with AdamW for ``pretrain_epochs`` before federation, saves it as ``<run>/backbone.pt`` and hands
  its absolute path to every client and the server (``backbone``). A given ``backbone`` file is
  used as is. Each process loads a file once (a deliberate per-actor cache keyed by path and
  modification time).
- Init as the paper: ``B_i = 0`` and ``A_i`` Xavier-uniform with gain ``init_gain`` (10), so at the
  start every member computes exactly the backbone's function; members diverge because their
  ``A_i`` differ (the gradient of ``B_i`` is ``A_i x`` times the upstream gradient).
- Scaling ``alpha / rank`` as in LoRA (Hu et al. 2021); ``alpha`` defaults to ``rank``, i.e. scale 1,
  which is what the reference code does (``w(x) + w_b(w_a(x))``, no scaling).
- Heads: one per member, as the reference (``EnsembleHead``: a separate linear head per member,
  trained with the adapters). Each starts as a copy of the pretrained head (the reference starts
  from a fresh head because its ImageNet head has other classes; ours was pretrained on the same
  classes, and the copy keeps "member == backbone at start").
- Training: the batch is tiled over the members (the reference's ``BatchMode.REPEAT``), one
  forward pass computes all members with batched matmuls; the loss is the sum over members of
  each member's mean cross-entropy, so every member gets the gradient it would get alone. The
  optimiser is the scenario's ``train`` section (AdamW in the paper) over adapters and heads only.
- Gradient clipping per member (``grad_clip``, by norm). The paper clips at 1 with AdamW. The
  gradient of ``B_i`` grows with ``A_i``, i.e. with the gain 10, so with plain SGD (lr 0.05,
  momentum 0.9) the training loss rises even when clipped at 1; at 0.1 it falls. With AdamW clipping hardly matters
  (digits, 20 rounds: accuracy 0.875 at 0.1, 0.877 at 1, 0.872 without), so 0.1 is the default.
- Travels: ``member.{k}.<block path>.{q,k,v,o}.A`` ``(rank, in)``, ``...B`` ``(out, rank)`` and
  ``member.{k}.head.weight`` / ``.bias``. The backbone never travels. FedAvg averages member k
  with member k, and A and B separately: the mean of the clients' ``B_i A_i`` is not the product
  of the means, the usual approximation of federated LoRA (clients start every round from the
  same global adapters, so the difference is second order in the round's updates).

Measured (``scenarios/lora_ensemble.yaml``: digits, 20% public split of ~290 examples, vit
dim 64 depth 2, 4 members of rank 8, AdamW lr 1e-3, 20 rounds of FedAvg): the pretrained backbone
alone has test accuracy 0.774, NLL 0.760, ECE 0.092; the ensemble ends at 0.880, 0.415, 0.055.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.base import Learner, PrepareContext, make_optimizer, minibatches
from fedens.models.vit import ViT
from fedens.scenario import TrainConfig
from fedens.seeding import derive_seed

PROJECTIONS = ("q", "k", "v", "o")
# The backbone's pretraining (``pretrain_backbone``), shared with deep_ensemble's ``backbone: pretrained``.
PRETRAIN_EPOCHS, PRETRAIN_LR, PRETRAIN_WEIGHT_DECAY = 30, 1e-3, 0.01


class LoRAEnsembleOptions(BaseModel):
    """Options of ``lora_ensemble`` (the scenario's ``learner:`` keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    members: int = Field(4, ge=1, description="ensemble members (the paper uses 16)")
    rank: int = Field(4, ge=1, description="rank of every A_i, B_i (the paper uses 8 on ViT-B/32)")
    alpha: float | None = Field(None, gt=0, description="LoRA scale alpha/rank; None = rank (scale 1, as the reference)")
    init_gain: float = Field(10.0, gt=0, description="Xavier-uniform gain of A_i (the paper: 10)")
    grad_clip: float | None = Field(0.1, gt=0, description="clip each member's gradient norm (the paper: 1); None = off")
    backbone: str | None = Field(None, description="pretrained vit state_dict (.pt); None = pretrain in prepare")
    pretrain_epochs: int = Field(PRETRAIN_EPOCHS, ge=1, description="epochs of AdamW on the public split")
    pretrain_lr: float = Field(PRETRAIN_LR, gt=0)
    pretrain_weight_decay: float = Field(PRETRAIN_WEIGHT_DECAY, ge=0)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one low-rank update per member.

    Inputs are ``(members * n, ..., in)``, member-major (rows ``k*n : (k+1)*n`` belong to member
    k); outputs ``(members * n, ..., out)``.
    """

    def __init__(self, base: nn.Linear, members: int, rank: int, scale: float, gain: float) -> None:
        super().__init__()
        self.base, self.members, self.scale = base, members, scale
        self.A = nn.Parameter(torch.empty(members, rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(members, base.out_features, rank, device=base.weight.device))
        for a in self.A.data:  # each member's A_i as its own (rank, in) matrix, like nn.Linear(in, rank)
            nn.init.xavier_uniform_(a, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xm = x.reshape(self.members, -1, x.shape[-1])  # (members, rows, in)
        delta = torch.bmm(torch.bmm(xm, self.A.transpose(1, 2)), self.B.transpose(1, 2))  # (members, rows, out)
        return self.base(x) + self.scale * delta.view(*x.shape[:-1], -1)


@torch.no_grad()
def clip_per_member(params: list[nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` for each member separately: every tensor's leading axis is the member,
    so one member's large gradient does not shrink the others' steps."""
    norms = torch.stack([p.grad.flatten(1).square().sum(1) for p in params if p.grad is not None]).sum(0).sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (members,)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor.view(-1, *[1] * (p.dim() - 1)))


@functools.lru_cache(maxsize=4)
def _read_backbone(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The backbone's state_dict from ``path``, read once per process (and again if the file
    changes). Callers copy from it (``load_state_dict``) and never modify it."""
    return _read_backbone(str(path), os.stat(path).st_mtime_ns)


def given_backbone(backbone: str) -> str:
    """The absolute path of a given backbone file (a ``ValueError`` if there is none)."""
    path = Path(backbone).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"backbone {path} is not a file")
    return str(path)


def pretrain_backbone(ctx: PrepareContext, epochs: int, lr: float, weight_decay: float, learner: str = "lora_ensemble",
                      check: Callable[[nn.Module], nn.Module] = lambda m: m) -> str:
    """The backbone's pretraining (``prepare``): ``ctx.model_fn()`` trained with AdamW on the
    server's public split ``ctx.public`` for ``epochs``, minibatches of ``train.batch_size`` drawn
    from a generator seeded by (seed, 0, 2), saved to ``ctx.run_dir/backbone.pt``; returns its
    absolute path. Every learner that pretrains calls this, so for the same scenario (data, model,
    ``train.batch_size``, seed) and pretraining options they get byte-identical backbones
    (``deep_ensemble``'s ``backbone: pretrained``). ``check`` vets the built model."""
    if len(ctx.public) == 0:
        raise ValueError(f"{learner} pretrains its backbone on the server's public split, which is empty: "
                         "set data.server_fraction > 0 or give learner.backbone: path/to/backbone.pt")
    model = check(ctx.model_fn()).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(derive_seed(ctx.seed, 0, 2))
    model.train()
    for _ in range(epochs):
        for x, y in minibatches(ctx.public, ctx.train.batch_size, generator, ctx.device):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    path = (ctx.run_dir / "backbone.pt").resolve()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return str(path)


def _require_vit(model: nn.Module) -> ViT:
    if not isinstance(model, ViT):
        raise ValueError(f"lora_ensemble needs model kind vit, got {type(model).__name__}")
    return model


@LEARNERS.register("lora_ensemble")
class LoRAEnsembleLearner(Learner):
    """``members`` low-rank adaptations of one frozen vit: predictive ``(members, batch, classes)``."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = LoRAEnsembleOptions

    def __init__(self, model_fn: Callable[[], nn.Module], options: LoRAEnsembleOptions, train: TrainConfig, device: torch.device) -> None:
        super().__init__(model_fn, options, train, device)
        if options.backbone is None:
            raise ValueError("lora_ensemble has no backbone: run Learner.prepare first or set learner.backbone")
        self.model = _require_vit(model_fn())
        self.model.load_state_dict(load_backbone(options.backbone))
        self.model.requires_grad_(False).to(device)
        m, scale = options.members, (options.alpha or options.rank) / options.rank
        self.adapters: dict[str, LoRALinear] = {}
        for i, block in enumerate(self.model.blocks):
            for p in PROJECTIONS:
                lora = LoRALinear(getattr(block.attn, p), m, options.rank, scale, options.init_gain)
                setattr(block.attn, p, lora)
                self.adapters[f"blocks.{i}.attn.{p}"] = lora
        head = self.model.head  # pretrained; every member's head starts as a copy of it
        self.head_weight = nn.Parameter(head.weight.detach().repeat(m, 1, 1))  # (members, classes, dim)
        self.head_bias = nn.Parameter(head.bias.detach().repeat(m, 1))  # (members, classes)

    # ------------------------------------------------------------------ preparation

    @classmethod
    def check_scenario(cls, options: LoRAEnsembleOptions, scn: Any) -> str | None:
        if options.backbone is None and scn.data.server_fraction <= 0:
            return ("data.server_fraction: lora_ensemble pretrains its backbone on the server's public split: "
                    "set it > 0 (e.g. 0.1) or give learner.backbone: path/to/backbone.pt")
        return None

    @classmethod
    def prepares(cls, options: LoRAEnsembleOptions) -> bool:
        return options.backbone is None  # no backbone given: pretrain one

    @classmethod
    def prepare(cls, options: LoRAEnsembleOptions, ctx: PrepareContext) -> LoRAEnsembleOptions:
        """Pretrain the backbone on ``ctx.public`` and save it to ``ctx.run_dir/backbone.pt``
        (or check the given ``backbone`` exists); returns the options with its absolute path."""
        if options.backbone is not None:
            return options.model_copy(update={"backbone": given_backbone(options.backbone)})
        path = pretrain_backbone(ctx, options.pretrain_epochs, options.pretrain_lr, options.pretrain_weight_decay,
                                 "lora_ensemble", _require_vit)
        return options.model_copy(update={"backbone": path})

    # ------------------------------------------------------------------ training and prediction

    def trainable(self) -> list[nn.Parameter]:
        """Adapters and heads: the only parameters that train and travel."""
        return [t for a in self.adapters.values() for t in (a.A, a.B)] + [self.head_weight, self.head_bias]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits ``(members, n, classes)`` for inputs ``(n, C, H, W)``."""
        m, n = self.options.members, len(x)
        feats = self.model.features(x.repeat(m, *([1] * (x.dim() - 1)))).view(m, n, -1)  # member-major tiling
        return torch.baddbmm(self.head_bias.unsqueeze(1), feats, self.head_weight.transpose(1, 2))

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        self.model.eval()  # the backbone has no dropout or BN; eval keeps it that way if one is added
        opt = make_optimizer(self.trainable(), self.train_cfg)
        total, count = 0.0, 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in minibatches(data, self.train_cfg.batch_size, generator, self.device):
                logits = self.logits(x)  # (members, b, classes)
                per_member = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.options.members), reduction="none")
                loss = per_member.view(self.options.members, -1).mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.options.grad_clip is not None:
                    clip_per_member(self.trainable(), self.options.grad_clip)
                opt.step()
                total, count = total + float(loss.detach()) / self.options.members * len(y), count + len(y)
        return {"train_loss": total / max(count, 1)}

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Members' probabilities ``(members, batch, classes)``."""
        self.model.eval()
        return F.softmax(self.logits(x), dim=-1)

    # ------------------------------------------------------------------ what travels

    def _named(self) -> dict[str, torch.Tensor]:
        """Travelling name -> a view of the member's slice: ``member.{k}.<path>.A`` etc."""
        out: dict[str, torch.Tensor] = {}
        for k in range(self.options.members):
            for path, a in self.adapters.items():
                out[f"member.{k}.{path}.A"], out[f"member.{k}.{path}.B"] = a.A.data[k], a.B.data[k]
            out[f"member.{k}.head.weight"], out[f"member.{k}.head.bias"] = self.head_weight.data[k], self.head_bias.data[k]
        return out

    def get_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy().copy() for k, v in self._named().items()}

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        named = self._named()
        missing = [k for k in named if k not in arrays]
        if missing:
            raise KeyError(f"arrays lack {len(missing)} adapter/head tensors, e.g. {missing[0]!r}")
        with torch.no_grad():
            for k, t in named.items():
                t.copy_(torch.as_tensor(np.asarray(arrays[k])).to(t))
