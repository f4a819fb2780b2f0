"""Shared machinery of the implicit ensembles: BatchEnsemble, FiLM-Ensemble and subnetworks.

The three learners run their M members as ONE network on a batch tiled M times, so a training
step or a prediction costs one forward pass over ``M * batch`` rows instead of M passes:

- ``tile`` / ``untile``: the layout is member-major, rows ``[k*B, (k+1)*B)`` of a tiled batch
  belong to member k (``x.repeat``; the FiLM-Ensemble code interleaves instead, which is the same
  computation since every member-aware layer slices the batch by member).
- ``rewrite``: turns the scenario's ``nn.Sequential`` (Linear/Conv1d/Conv2d/ReLU/pooling/Flatten/Dropout)
  into a member-aware one, keeping the child names, so shared tensors keep their ``state_dict``
  names (``1.weight``) and FedAvg pairs them with a plain network's. Parameter-free layers act
  row by row and need no change; any other layer with parameters is refused, because silently
  sharing it would change the method.
- Member-aware modules list in ``member_tensors`` the tensors whose leading axis is the member
  axis. ``member_arrays`` exports those as ``member.{k}.<module>.<tensor>`` (member k's slice)
  and everything else under its plain name (the rule of ``fedens.payload``), so element-wise
  FedAvg averages shared parts together and member k with member k.
- ``TiledEnsembleLearner``: the one training loop and predictive of the three learners; a
  learner only says how to build its member-aware network (``build``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners.base import Learner, make_optimizer, minibatches
from fedens.scenario import TrainConfig

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


def tile(x: torch.Tensor, members: int) -> torch.Tensor:
    """``(B, ...) -> (M*B, ...)``: the batch repeated once per member, member-major."""
    return x.repeat(members, *([1] * (x.ndim - 1)))


def untile(y: torch.Tensor, members: int) -> torch.Tensor:
    """``(M*B, ...) -> (M, B, ...)``: the inverse view of ``tile``'s layout."""
    return y.view(members, y.shape[0] // members, *y.shape[1:])


def per_member(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Member-by-channel values ``(M, C)`` viewed as ``(M, 1, C, 1, ...)`` to broadcast against
    untiled activations ``(M, B, C, *spatial)`` of ``ndim`` dims (``ndim`` of the tiled tensor)."""
    return v.view(v.shape[0], 1, v.shape[1], *([1] * (ndim - 2)))


def conv_kwargs(conv: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    """``F.conv1d`` / ``F.conv2d`` keyword arguments of a plain conv layer (grouped or
    padded-mode convs are not rewritten: their member-aware forms would be different layers)."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise TypeError(f"implicit ensembles support Conv1d/Conv2d with groups=1 and zero padding, got {conv}")
    return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}


def rewrite(model: nn.Module, make: Callable[[str, nn.Module, bool], dict[str, nn.Module]]) -> nn.Sequential:
    """A member-aware copy of a sequential net.

    ``make(name, layer, is_last)`` is called for every Linear/Conv1d/Conv2d child (``is_last`` marks the
    output layer) and returns the modules that take its place, in order: ``{name: new}`` swaps it,
    ``{name: layer, f"{name}_x": extra}`` inserts ``extra`` after it. Other children are kept.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"implicit ensembles rewrite an nn.Sequential model, got {type(model).__name__}")
    names = [n for n, m in model.named_children() if isinstance(m, WEIGHT_LAYERS)]
    if not names:
        raise TypeError("implicit ensembles need a model with Linear or Conv1d/Conv2d layers")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in model.named_children():
        if isinstance(child, WEIGHT_LAYERS):
            layers.update(make(name, child, name == names[-1]))
        elif any(True for _ in child.parameters()):
            raise TypeError(f"implicit ensembles cannot make layer {name} ({type(child).__name__}) member-aware")
        else:
            layers[name] = child
    return nn.Sequential(layers)


def _member_tensor_names(net: nn.Module) -> set[str]:
    return {f"{mod}.{t}" if mod else t for mod, m in net.named_modules() for t in getattr(m, "member_tensors", ())}


def member_arrays(net: nn.Module, members: int) -> dict[str, np.ndarray]:
    """A member-aware net's state as named numpy arrays: shared tensors under their plain names,
    member k's slice of a member tensor as ``member.{k}.<name>``. Parameters are float32;
    buffers keep their dtype."""
    params = {n for n, _ in net.named_parameters()}
    split = _member_tensor_names(net)
    shared: dict[str, np.ndarray] = {}
    own: list[dict[str, np.ndarray]] = [{} for _ in range(members)]
    for name, t in net.state_dict().items():
        a = t.detach().cpu().numpy()
        a = a.astype(np.float32) if name in params else a
        if name in split:
            for k in range(members):
                own[k][f"member.{k}.{name}"] = a[k].copy()
        else:
            shared[name] = a.copy()
    return {**shared, **{k: v for d in own for k, v in d.items()}}


def load_member_arrays(net: nn.Module, arrays: Mapping[str, np.ndarray], members: int) -> None:
    """Inverse of ``member_arrays``: every tensor of the net must be present, with its shape."""
    split = _member_tensor_names(net)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            keys = [f"member.{k}.{name}" for k in range(members)] if name in split else [name]
            missing = [k for k in keys if k not in arrays]
            if missing:
                raise KeyError(f"arrays lack tensors of the model, e.g. {missing[0]!r}")
            value = np.stack([np.asarray(arrays[k]) for k in keys]) if name in split else np.asarray(arrays[name])
            if tuple(value.shape) != tuple(t.shape):  # copy_ would broadcast a wrong shape silently
                skip = int(name in split)  # compare one member's shape
                raise ValueError(f"array {keys[0]!r} has shape {value.shape[skip:]}, the model wants {tuple(t.shape)[skip:]}")
            t.copy_(torch.as_tensor(value).to(t.dtype))


class TiledEnsembleLearner(Learner):
    """Base of learners whose members run as one member-aware network on a tiled batch.

    Subclasses define ``Options`` (with ``members``) and ``build``; the predictive is the members'
    softmax ``(members, batch, classes)``.
    """

    # Members that share no parameter train as if alone: the objective sums their losses. Members
    # that share a body average them, so the shared weights get one network's gradient scale
    # (the BatchEnsemble and FiLM-Ensemble reference implementations do this).
    sum_member_losses: ClassVar[bool] = False

    def __init__(self, model_fn: Callable[..., nn.Module], options: Any, train: TrainConfig, device: torch.device) -> None:
        super().__init__(model_fn, options, train, device)
        self.members: int = options.members
        self.net = self.build(model_fn).to(device)

    @abstractmethod
    def build(self, model_fn: Callable[..., nn.Module]) -> nn.Sequential:
        """The member-aware network: ``(M*B, *input_shape) -> (M*B, classes)`` on a tiled batch."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits ``(members, batch, classes)`` for inputs ``(batch, ...)``."""
        return untile(self.net(tile(x, self.members)), self.members)

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        self.net.train()
        opt = make_optimizer(self.net.parameters(), self.train_cfg)
        total, count = 0.0, 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in minibatches(data, self.train_cfg.batch_size, generator, self.device):
                logits = self.logits(x)  # (M, B, classes)
                member_loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.members), reduction="none")
                member_loss = member_loss.view(self.members, -1).mean(1)  # (M,)
                loss = member_loss.sum() if self.sum_member_losses else member_loss.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + member_loss.detach().mean().item() * len(y), count + len(y)
        return {"train_loss": total / max(count, 1)}  # mean member cross-entropy

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return F.softmax(self.logits(x), dim=-1)

    def get_arrays(self) -> dict[str, np.ndarray]:
        return member_arrays(self.net, self.members)

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        load_member_arrays(self.net, arrays, self.members)
