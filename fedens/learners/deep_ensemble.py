"""``deep_ensemble``: K independently initialised networks trained side by side.

Lakshminarayanan, Pritzel, Blundell, "Simple and Scalable Predictive Uncertainty Estimation
using Deep Ensembles", NeurIPS 2017 (arXiv 1612.01474). The predictive is the average of the
members' softmax outputs; diversity comes from random initialisation and data order (the paper
found bagging unnecessary, even harmful; it is here as ``bootstrap`` for ablations).

Decisions
- Members are called ``model_fn()`` K times (different initialisations from torch's RNG) and
  their tensors stacked, ``torch.func.stack_module_state``: parameter ``name`` becomes one leaf
  tensor ``(K, *shape)``. All members train in ONE forward/backward per step, not a Python loop:
  ``nn.Sequential`` nets of ``Linear``, ``Conv2d`` and parameter-free layers run as grouped
  kernels (``baddbmm`` over ``(K, in, out)`` weights, grouped convolution), which measured
  faster than ``vmap`` on CPU (bench/bench_learners.py); any other net runs through
  ``vmap(functional_call)``. ``vectorized=False`` trains K separate modules with K optimisers in a
  Python loop over the same batches: the reference the tests compare against.
- One optimiser over the stacked tensors. SGD (momentum, weight decay), Adam and AdamW update
  every element from that element's own gradient and state (their step counters agree because
  all members step together), so member k's update reads only member k's slice: exactly K
  separate optimisers. The loss is Σ_k mean-CE_k, so member k's gradient is that of its own
  loss. (A global-norm gradient clip or LARS-like layer norms would couple members; none is used.)
- Each member draws its own permutation of the data every epoch from ``generator``; with
  ``bootstrap`` each member also trains on its own resample of n indices with replacement,
  drawn once per ``fit`` (clients are stateless across rounds, so a new resample every round).
- Export: member k's tensors as ``member.{k}.<state_dict name>``. FedAvg averages member k with
  member k across clients, so the federated ensemble is K FedAvg runs sharing the rounds; the
  members start from K different global initialisations (the server's initial model) and stay
  apart because nothing mixes members.

- ``backbone``: the LoRA-Ensemble paper's explicit ensemble (Halbheer et al. 2024; the authors'
  ``VisionTransformerEnsemble``) fine-tunes M copies of one pretrained ViT, every parameter
  trained, each member with its own freshly initialised head. ``backbone: pretrained`` does that
  here: ``prepare`` runs lora_ensemble's pretraining (``pretrain_backbone``, the same file byte
  for byte for the same scenario and seed), and every member loads it except its head, which
  keeps the member's own draw (the scratch ensemble's head k); ``pretrained_head`` copies the
  head too. The whole network still travels and trains (unlike lora_ensemble's frozen backbone).

Shapes: member batches ``x (K, b, ...)``, ``y (K, b)``; predictions ``(K, batch, classes)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.base import Learner, PrepareContext, make_optimizer
from fedens.learners.lora_ensemble import (
    PRETRAIN_EPOCHS,
    PRETRAIN_LR,
    PRETRAIN_WEIGHT_DECAY,
    given_backbone,
    load_backbone,
    pretrain_backbone,
)
from fedens.scenario import TrainConfig
from fedens.payload import MEMBER_WEIGHTS

Tensors = dict[str, torch.Tensor]


PRETRAINED = "pretrained"  # ``backbone``: pretrain in ``prepare``, as lora_ensemble does


class DeepEnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: int = Field(5, ge=1, description="ensemble size K (the paper uses 5)")
    bootstrap: bool = Field(False, description="each member trains on its own bootstrap resample")
    vectorized: bool = Field(True, description="one stacked pass (True) or a Python loop over members (reference)")
    backbone: str | None = Field(None, description="None: members from scratch; 'pretrained': every member starts "
                                 "from the backbone lora_ensemble's prepare pretrains; or a state_dict file (.pt)")
    pretrained_head: bool = Field(False, description="members also copy the backbone's head (default: each keeps its "
                                  "own freshly initialised head, as the LoRA-Ensemble paper's explicit ensemble)")
    pretrain_epochs: int = Field(PRETRAIN_EPOCHS, ge=1, description="backbone: pretrained: epochs of AdamW on the public split")
    pretrain_lr: float = Field(PRETRAIN_LR, gt=0)
    pretrain_weight_decay: float = Field(PRETRAIN_WEIGHT_DECAY, ge=0)


def bootstrap_indices(n: int, members: int, generator: torch.Generator) -> torch.Tensor:
    """Per-member bootstrap resamples ``(K, n)``: n indices drawn with replacement."""
    return torch.randint(n, (members, n), generator=generator)


def member_batches(
    n: int, members: int, batch_size: int, generator: torch.Generator, resample: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """One epoch of per-member minibatch indices ``(K, b)`` into a dataset of ``n`` examples:
    row k is member k's own shuffle of ``0..n-1``, or of its resample ``resample[k]`` (``(K, n)``)."""
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(members)])  # (K, n)
    if resample is not None:
        order = resample.gather(1, order)
    for start in range(0, n, batch_size):
        yield order[:, start : start + batch_size]


def groupable(net: nn.Module) -> bool:
    """True when ``grouped_forward`` can run ``net``: an ``nn.Sequential`` of ``Linear``,
    zero-padded ``Conv2d`` and per-example layers without parameters or buffers."""

    def ok(m: nn.Module) -> bool:
        if isinstance(m, nn.Linear):
            return True
        if isinstance(m, nn.Conv2d):
            return m.padding_mode == "zeros"
        return next(m.parameters(), None) is None and next(m.buffers(), None) is None

    return isinstance(net, nn.Sequential) and all(ok(m) for m in net)


def grouped_forward(net: nn.Sequential, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """All members at once: ``x (K, b, ...) -> (K, b, ...)``; ``params[name]`` is ``(K, *shape)``.

    Linear: one batched matmul over ``(K, out, in)`` weights. Conv2d: members become channel
    groups of one grouped convolution. Parameter-free layers act per example, so members'
    batches are merged into one ``(K*b, ...)`` batch (dropout then draws independent masks).
    """
    K, b = x.shape[:2]
    for name, layer in net.named_children():
        w, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
        if isinstance(layer, nn.Linear):
            h = x.flatten(1, -2)  # (K, b*..., in): extra leading dims (tokens) ride along
            wt = w.transpose(1, 2)  # (K, in, out)
            h = torch.bmm(h, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, wt)
            x = h.view(*x.shape[:-1], -1)
        elif isinstance(layer, nn.Conv2d):
            h = x.transpose(0, 1).flatten(1, 2)  # (b, K*C, H, W): member k owns channels [kC, (k+1)C)
            h = F.conv2d(h, w.flatten(0, 1), None if bias is None else bias.flatten(), layer.stride,
                         layer.padding, layer.dilation, layer.groups * K)
            x = h.unflatten(1, (K, -1)).transpose(0, 1)
        else:
            x = layer(x.flatten(0, 1)).unflatten(0, (K, b))
    return x


def head_prefix(net: nn.Module) -> str:
    """The state_dict prefix of a network's classification head: its ``head`` module (vit), else
    the last module that owns parameters (the last layer of a sequential net)."""
    if isinstance(getattr(net, "head", None), nn.Module):
        return "head."
    owners = [name for name, m in net.named_modules() if next(m.parameters(recurse=False), None) is not None]
    return f"{owners[-1]}." if owners else ""


def load_pretrained(nets: list[nn.Module], backbone: str, with_head: bool = False) -> None:
    """Every member's tensors from the pretrained ``backbone`` file, except (unless ``with_head``)
    its head, which keeps the member's own initialisation."""
    if backbone == PRETRAINED:
        raise ValueError("deep_ensemble has backbone: pretrained but no backbone file: run Learner.prepare first "
                         "(fedens run does) or set learner.backbone: path/to/backbone.pt")
    state = load_backbone(backbone)
    for net in nets:
        own, head = net.state_dict(), head_prefix(net)
        if set(state) != set(own):
            raise ValueError(f"backbone {backbone} does not fit the model: its tensors {sorted(set(state) ^ set(own))[:3]} ...")
        try:
            net.load_state_dict({**own, **{k: v for k, v in state.items() if with_head or not k.startswith(head)}})
        except RuntimeError as err:
            raise ValueError(f"backbone {backbone} does not fit the model: {err}") from None


@LEARNERS.register("deep_ensemble")
class DeepEnsembleLearner(Learner):
    """K networks with stacked parameters; predictive ``(K, batch, classes)``."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = DeepEnsembleOptions

    def __init__(
        self, model_fn: Callable[[], nn.Module], options: DeepEnsembleOptions, train: TrainConfig, device: torch.device
    ) -> None:
        super().__init__(model_fn, options, train, device)
        nets = [model_fn().to(device) for _ in range(options.members)]
        if options.backbone is not None:  # after every member's draws: the heads are the scratch ensemble's
            load_pretrained(nets, options.backbone, options.pretrained_head)
        params, buffers = stack_module_state(nets)  # leaves (K, *shape), requires_grad
        self.params: Tensors = params
        self.buffers: Tensors = buffers
        self.skeleton = copy.deepcopy(nets[0]).to("meta")  # structure only; tensors come from params
        self.grouped = groupable(self.skeleton) and not buffers

    @property
    def members(self) -> int:
        return self.options.members

    @classmethod
    def check_scenario(cls, options: DeepEnsembleOptions, scn: Any) -> str | None:
        if options.backbone == PRETRAINED and scn.data.server_fraction <= 0:
            return ("data.server_fraction: deep_ensemble with backbone: pretrained pretrains it on the server's public "
                    "split: set it > 0 (e.g. 0.1) or give learner.backbone: path/to/backbone.pt")
        return None

    @classmethod
    def prepares(cls, options: DeepEnsembleOptions) -> bool:
        return options.backbone == PRETRAINED  # a given file needs nothing made

    @classmethod
    def prepare(cls, options: DeepEnsembleOptions, ctx: PrepareContext) -> DeepEnsembleOptions:
        """``backbone: pretrained``: lora_ensemble's pretraining (``pretrain_backbone``: the same
        model, data, seed and options give the same file, byte for byte), saved to
        ``ctx.run_dir/backbone.pt``; a given file: its absolute path; None: nothing to do."""
        if options.backbone is None:
            return options
        if options.backbone == PRETRAINED:
            path = pretrain_backbone(ctx, options.pretrain_epochs, options.pretrain_lr, options.pretrain_weight_decay,
                                     "deep_ensemble with backbone: pretrained")
        else:
            path = given_backbone(options.backbone)
        return options.model_copy(update={"backbone": path})

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """Logits ``(K, b, classes)`` for member batches ``x (K, b, ...)``, or for one batch
        ``x (b, ...)`` seen by every member when ``shared_input``."""
        if self.grouped:
            return grouped_forward(self.skeleton, self.params, x.expand(self.members, *x.shape) if shared_input else x)
        call = lambda p, bufs, xi: functional_call(self.skeleton, (p, bufs), (xi,))  # noqa: E731
        batched = vmap(call, in_dims=(0, 0, None if shared_input else 0), randomness="different")  # own dropout masks
        with warnings.catch_warnings():  # vit's attention has no batching rule on CPU: vmap loops over members
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return batched(self.params, self.buffers, x)

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        self.skeleton.train()
        step, finish = self._vectorised_step() if self.options.vectorized else self._looped_step()
        x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
        resample = bootstrap_indices(len(data), self.members, generator) if self.options.bootstrap else None
        total, count = 0.0, 0
        for _ in range(self.train_cfg.local_epochs):
            for idx in member_batches(len(data), self.members, self.train_cfg.batch_size, generator, resample):
                x, y = x_all[idx].to(self.device, non_blocking=True), y_all[idx].to(self.device, non_blocking=True)
                total, count = total + step(x, y) * idx.shape[1], count + idx.shape[1]
        finish()
        return {"train_loss": total / max(count, 1)}  # members' mean training loss

    def _vectorised_step(self) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], Callable[[], None]]:
        opt = make_optimizer(self.params.values(), self.train_cfg)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            logits = self.forward(x)  # (K, b, classes)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) * self.members  # Σ_k mean_b CE_k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item() / self.members

        return step, lambda: None

    def _looped_step(self) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], Callable[[], None]]:
        nets = [self.member_module(k) for k in range(self.members)]
        for net in nets:
            net.train()
        opts = [make_optimizer(net.parameters(), self.train_cfg) for net in nets]

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            total = 0.0
            for k, (net, opt) in enumerate(zip(nets, opts)):
                loss = F.cross_entropy(net(x[k]), y[k])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            return total / self.members

        def finish() -> None:  # write the members back into the stacked tensors
            with torch.no_grad():
                for k, net in enumerate(nets):
                    for name, t in net.state_dict().items():
                        (self.params if name in self.params else self.buffers)[name][k].copy_(t)

        return step, finish

    def member_module(self, k: int) -> nn.Module:
        """Member k as a standalone module (a copy of its tensors)."""
        net = copy.deepcopy(self.skeleton).to_empty(device=self.device)
        net.load_state_dict({name: t[k] for name, t in {**self.params, **self.buffers}.items()})
        return net

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.skeleton.eval()
        return F.softmax(self.forward(x, shared_input=True), dim=-1)

    def get_arrays(self) -> dict[str, np.ndarray]:
        stacked = {**self.params, **self.buffers}
        out = {f"member.{k}.{n}": t[k].detach().cpu().numpy().copy() for k in range(self.members) for n, t in stacked.items()}
        if self.predictive_weights is not None:  # carried unchanged through training
            out[MEMBER_WEIGHTS] = self.predictive_weights.numpy().astype(np.float32)
        return out

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        stacked = {**self.params, **self.buffers}
        missing = [f"member.{k}.{n}" for k in range(self.members) for n in stacked if f"member.{k}.{n}" not in arrays]
        if missing:
            raise KeyError(f"arrays lack {len(missing)} tensors of the ensemble, e.g. {missing[0]!r}")
        with torch.no_grad():
            for name, t in stacked.items():
                members = [torch.as_tensor(np.asarray(arrays[f"member.{k}.{name}"])) for k in range(self.members)]
                t.copy_(torch.stack(members).to(t))
        weights = arrays.get(MEMBER_WEIGHTS)
        if weights is not None and len(weights) != self.members:
            raise ValueError(f"{MEMBER_WEIGHTS} has {len(weights)} entries for {self.members} members")
        self.predictive_weights = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
