"""The learner interface: what a client trains.

A learner owns its training loop, its predictive distribution and the named arrays it exports
to the server and imports back. Strategies never see a learner, only its arrays (named by the
rule in ``fedens.payload``), so every learner works with every strategy that understands its
names.

Shapes: inputs ``x`` are ``(batch, *input_shape)``; ``predict_proba`` returns probabilities
``(members, batch, classes)`` (``members == 1`` for a single network; an ensemble's members, or
a posterior's Monte Carlo samples, otherwise). Metrics average over the members axis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedens.data import ArrayDataset
from fedens.scenario import TrainConfig


class NoOptions(BaseModel):
    """A learner without options: any extra key under ``learner:`` is an error.

    A learner's ``Options`` is a frozen pydantic model like this one; options that are file
    paths are listed in a ``path_fields`` class variable, and the scenario loader makes them
    absolute (relative to the scenario file), because Ray actors run in another directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class PrepareContext:
    """What ``Learner.prepare`` gets, in the driver process before federation starts.

    public : the server-held labelled split (``data.server_fraction``; may be empty).
    run_dir : the run folder, where prepared files (a pretrained backbone, masks) are written.
    """

    model_fn: Callable[..., nn.Module]
    train: TrainConfig
    public: ArrayDataset
    run_dir: Path
    seed: int
    device: torch.device


class Learner(ABC):
    """Base class of all learners.

    Randomness: training draws from the ``generator`` passed to ``fit`` and from torch's global
    RNG, both seeded by the caller from (seed, round, partition id); ``predict_proba`` may draw
    from the global RNG (MC samples, dropout masks, roundings), which callers seed before every
    evaluation, so evaluations are reproducible too.

    Parameters
    ----------
    model_fn : builds a fresh network mapping ``(batch, *input_shape)`` to logits
        ``(batch, classes)``; keyword arguments override the scenario's model options (e.g.
        ``dropout=0.1``). Learners call it once per member, or once for a shared body. Built by
        ``build_learner``, it also carries ``input_shape`` and ``num_classes`` attributes.
    options : the learner's validated ``Options`` (the scenario's ``learner:`` keys).
    train : the scenario's ``train:`` section (optimiser, learning rate, epochs, batch size).
    device : where parameters and batches live; nothing in a learner assumes CPU.
    """

    Options: ClassVar[type[BaseModel]] = NoOptions
    # True when ``set_arrays`` restores the learner's whole state, so that a learner reused for
    # many messages computes exactly what a freshly built one would: the ClientApp then builds
    # it once per actor and run instead of once per message. Built-in learners are (tested in
    # tests/learners/test_contract.py); a plug-in says so itself, else it is rebuilt every time.
    # Read from the class itself, not inherited (``is_reusable``): a subclass may add state.
    reusable: ClassVar[bool] = False

    def __init__(self, model_fn: Callable[[], nn.Module], options: Any, train: TrainConfig, device: torch.device) -> None:
        self.options = options
        self.train_cfg = train
        self.device = device
        # A server strategy's client-side term (fedens.objectives), set by the ClientApp before
        # ``fit``; learners that support it add ``objective_penalty`` to their loss.
        self.objective: Any = None
        # The predictive's weights over members ``(members,)``, None = uniform; an ensemble
        # learner takes them from ``fedens.payload.MEMBER_WEIGHTS`` (set by the swarm strategy).
        self.predictive_weights: torch.Tensor | None = None

    def objective_penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
        """The strategy's term for ``params`` (by payload name), or 0 when there is none."""
        return 0.0 if self.objective is None else self.objective.penalty(params)

    @classmethod
    def check_scenario(cls, options: Any, scn: Any) -> str | None:
        """Why this learner cannot run the (otherwise valid) scenario, as ``"key.path: why"``, or
        ``None``; called when a scenario is validated, so the error is exit code 2 before Ray
        starts (e.g. a preparation that needs the server's public split). Default: nothing."""
        return None

    @classmethod
    def prepare(cls, options: Any, ctx: PrepareContext) -> Any:
        """Work done once, before federation, in the driver (e.g. pretrain a backbone on the
        public split and save it under ``ctx.run_dir``). Returns the options that clients and
        server will be built with (e.g. with the checkpoint's path filled in); they are written
        to the run's ``scenario.yaml``. Default: nothing to do."""
        return options

    @classmethod
    def prepares(cls, options: Any) -> bool:
        """Whether ``prepare`` has work to do for these options (a file to make before the run).
        The run skips it otherwise, and the deployment engine, which cannot ship prepared files,
        accepts the scenario. Default: whenever the class overrides ``prepare``."""
        return cls.prepare.__func__ is not Learner.prepare.__func__

    def assign_client(self, partition_id: int, seed: int, num_clients: int) -> None:
        """Called by the ClientApp before every message a client handles, with the client it
        simulates: for learners whose shape depends on the client (``early_exit``'s depth
        budget). The server's learner is never assigned. Default: nothing."""

    def extra_metrics(self, data: ArrayDataset, n_bins: int = 10, batch_size: int = 512) -> dict[str, float]:
        """Metrics of this learner's own kind on ``data``, added to the evaluation rows (e.g.
        ``early_exit``'s exit depth and compute). Default: none."""
        return {}

    @abstractmethod
    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        """Train on ``data`` for ``train.local_epochs``; return metrics, at least ``train_loss``.

        ``server_round`` (1-based) is for learners whose schedule spans rounds (snapshots)."""

    @abstractmethod
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Predictive probabilities ``(members, batch, classes)`` for inputs ``(batch, ...)``."""

    @abstractmethod
    def get_arrays(self) -> dict[str, np.ndarray]:
        """The state that travels, as named numpy arrays (see ``fedens.payload``)."""

    @abstractmethod
    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load arrays exported by ``get_arrays`` (or aggregated from several of them)."""


def is_reusable(cls: type[Learner]) -> bool:
    """Whether ``cls`` itself declares ``reusable = True`` (a subclass that adds state to a
    reusable learner is not reusable until it says so)."""
    return bool(vars(cls).get("reusable", False))


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser the scenario's ``train`` section names (a registry, not a chain of ifs)."""
    return OPTIMIZERS[cfg.optimizer](params, cfg)


OPTIMIZERS: dict[str, Callable[[Any, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
}


def minibatches(
    data: ArrayDataset, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled minibatches ``x (b, ...)``, ``y (b,)`` on ``device``."""
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


@torch.no_grad()
def predict_dataset(learner: Learner, data: ArrayDataset, batch_size: int = 512) -> torch.Tensor:
    """``learner.predict_proba`` over a whole dataset: ``(members, n, classes)`` on CPU."""
    x = torch.from_numpy(data.x)
    out = [learner.predict_proba(x[i : i + batch_size].to(learner.device)).cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(out, dim=1)


def module_arrays(module: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """A module's parameters and buffers as named numpy arrays (copies, on CPU)."""
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_module_arrays(module: nn.Module, arrays: Mapping[str, np.ndarray], prefix: str = "") -> None:
    """Inverse of ``module_arrays``: every tensor of the module must be present."""
    state = module.state_dict()
    missing = [k for k in state if prefix + k not in arrays]
    if missing:
        raise KeyError(f"arrays lack {len(missing)} tensors of the model, e.g. {prefix + missing[0]!r}")
    with torch.no_grad():
        for k, t in state.items():
            t.copy_(torch.as_tensor(np.asarray(arrays[prefix + k])).to(t.dtype))
