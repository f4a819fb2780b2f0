"""``FedensStrategy``: Flower's FedAvg with the fedens payload handled, so that an algorithm file
holds its math and little else.

A subclass overrides ``aggregate_arrays``, which gets the clients' named arrays (as numpy, in
partition-id order, errors already dropped) and their weights, and returns the new global
arrays. Helpers split arrays by the naming rule of ``fedens.payload``: shared parts,
``member.{k}.*``, ``mean.*`` / ``precision.*``.

Three optional hooks:
- ``bind(ctx)`` — called by the fedens ServerApp before the first round with a ``ServerContext``
  (the scenario, the server's data, a learner factory), for strategies that compute on the
  server (distillation, validation).
- ``outgoing(server_round, arrays)`` — what the clients get, if not the global arrays themselves.
- ``train_config(server_round)`` — extra values for the train messages' ConfigRecord (e.g. a
  proximal coefficient the client-side objective reads).

``supported_learners`` (``None`` = all) is checked when a scenario is validated: an unsupported
learner/strategy pair is an invalid scenario.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedens.algorithms.arrays import Arrays, join_posterior, split_members, split_posterior, weighted_average  # noqa: F401
from fedens.data import ServerData
from fedens.learners.base import Learner
from fedens.options import Options as BaseOptions
from fedens.options import split_options
from fedens.payload import from_record, to_record
from fedens.scenario import Scenario



@dataclass(frozen=True)
class ServerContext:
    """What a strategy may use on the server. ``new_learner()`` builds the scenario's learner
    (CPU); ``data`` is ``fedens.data.ServerData`` (test, shift, public split, ...)."""

    scenario: Scenario
    data: ServerData
    new_learner: Callable[[], Learner]
    seed: int


FACT = "fedens.fact."  # metrics aggregate_train returns under this prefix are facts of the round: the train row gets them
REJECTED_KEY = "rejected_by_strategy"  # replies reject_reason left out this round (added to the row's rejected)


def with_facts(metrics: MetricRecord | None, facts: dict[str, Any]) -> MetricRecord:
    """``metrics`` (what aggregate_train returns) plus the round's ``facts`` under ``FACT``."""
    out = metrics if metrics is not None else MetricRecord()
    for key, value in facts.items():
        out[FACT + key] = value
    return out


def round_facts(metrics: MetricRecord | None) -> dict[str, Any]:
    """The facts a strategy returned with ``with_facts``, without the prefix."""
    return {k[len(FACT):]: v for k, v in (metrics or {}).items() if k.startswith(FACT)}
log = logging.getLogger("fedens")


class FedensStrategy(FedAvg):
    """FedAvg with the fedens payload handled (module docstring).

    Parameters: a subclass declares its own as a frozen pydantic ``Options`` model (the
    scenario's ``strategy.params`` keys, checked when the scenario loads) and reads them as
    ``self.options.<key>``; every other keyword goes to Flower's FedAvg (``fraction_train``, ...).
    """

    supported_learners: ClassVar[tuple[str, ...] | None] = None
    Options: ClassVar[type[BaseOptions]] = BaseOptions
    # True when ``aggregate_arrays`` is element-wise over names and keeps no per-client state,
    # so that replies holding different parts of the model (clients with a depth budget,
    # ``early_exit``) can be aggregated name by name over the clients that hold each name
    # (``aggregate_partial``). Read from the class itself, not inherited: a subclass that
    # couples names or keeps per-client state must not get it by accident.
    partial_replies: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        self.options, fedavg_kwargs = split_options(self.Options, kwargs)
        super().__init__(**fedavg_kwargs)
        self.global_arrays: Arrays | None = None  # the arrays this round's training started from
        self.model_names: set[str] = set()  # the global model's names this round (configure_train)
        self.ctx: ServerContext | None = None
        # Partition ids of the replies aggregate_arrays gets, in its order (from the FedensGrid;
        # node ids under a plain Flower grid), for strategies that keep per-client state.
        self.reply_partitions: list[int] = []
        self._partition_of: dict[int, int] = {}

    # What ``bind`` and the round give a strategy again after a checkpoint is loaded: not pickled.
    transient: ClassVar[tuple[str, ...]] = ("ctx", "grid", "_learner")

    def __getstate__(self) -> dict[str, Any]:
        """The strategy's own state for a checkpoint, without what ``bind`` gives back (the
        scenario, the server's data, a learner factory) and the grid of the run."""
        return {k: v for k, v in self.__dict__.items() if k not in self.transient}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for key in self.transient:
            self.__dict__.setdefault(key, None)

    # ------------------------------------------------------------------ hooks for subclasses
    @classmethod
    def check_scenario(cls, scn: Any) -> str | None:
        """Why this strategy cannot run the (otherwise valid) scenario, as ``"key.path: why"``,
        or ``None``. Called when a scenario is validated, so the error is exit code 2."""
        return None

    def bind(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def begin(self, grid: Grid, arrays: ArrayRecord, timeout: float | None) -> None:
        """Called before the first round this process runs, also when a run resumes: the grid
        (for a strategy that sends messages of its own) and the arrays training starts from."""

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              **kwargs: Any) -> Any:
        """Flower's loop, for use outside fedens (fedens runs its own, resumable, loop)."""
        self.begin(grid, initial_arrays, timeout)
        return super().start(grid, initial_arrays, num_rounds, timeout, **kwargs)

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {}

    def outgoing(self, server_round: int, arrays: Arrays) -> Arrays:
        """The arrays the clients get this round, from the current global ones (default: the
        same object). A strategy may send clients something other than what it evaluates."""
        return arrays

    def reject_reason(self, arrays: Arrays) -> str | None:
        """Why a client's (finite) reply cannot be aggregated, or None. Default: a posterior's
        precisions (``precision.*``) must be positive; a Byzantine client's need not be."""
        for key, value in arrays.items():
            if key.startswith("precision.") and not (value > 0).all():
                return f"{key} has non-positive values"
        return None

    def aggregate_arrays(self, server_round: int, arrays: list[Arrays], weights: np.ndarray) -> Arrays:
        """Default: the weighted average (FedAvg). ``weights`` ``(K,)`` sum to 1."""
        return weighted_average(arrays, weights)

    def is_partial(self, arrays: list[Arrays]) -> bool:
        """Whether the replies hold different names, or (for a strategy that declares
        ``partial_replies``) some reply lacks a name of the global model: clients that hold part
        of the model. Replies may hold more than the model (a client-side term's extra arrays),
        and the clients may be sent more than the model (``outgoing``); neither is partial."""
        if any(a.keys() != arrays[0].keys() for a in arrays):
            return True
        names = self.model_names if vars(type(self)).get("partial_replies", False) else set()
        return any(not names <= a.keys() for a in arrays)

    def aggregate_partial(self, server_round: int, arrays: list[Arrays], sizes: np.ndarray) -> Arrays:
        """Replies that hold different sets of names (clients that train part of the model):
        every name is aggregated by ``aggregate_arrays`` over the clients that hold it, with
        their sizes ``(K,)`` renormalised among them (HeteroFL's and DepthFL's rule, Diao et
        al. 2021, Kim et al. 2023); a name no client holds keeps its global value. Names that
        the same clients hold go through one call, so a rule that couples a mean with its
        precision still sees both."""
        if not vars(type(self)).get("partial_replies", False):
            raise ValueError(f"{type(self).__name__}: the replies hold different arrays (partial models) and this "
                             "strategy aggregates whole models only (partial_replies is not set)")
        groups: dict[tuple[int, ...], list[str]] = {}
        order = list(self.global_arrays or {}) + [k for a in arrays for k in a]
        for name in dict.fromkeys(order):
            holders = tuple(i for i, a in enumerate(arrays) if name in a)
            if holders:
                groups.setdefault(holders, []).append(name)
        new: Arrays = {}
        for holders, names in groups.items():
            w = sizes[list(holders)]
            if w.sum() <= 0:  # only empty clients hold these: nothing to average, keep the global values
                continue
            new.update(self.aggregate_arrays(server_round, [{k: arrays[i][k] for k in names} for i in holders], w / w.sum()))
        # the global order, with what no client sent left as it was
        return {k: new[k] if k in new else self.global_arrays[k] for k in dict.fromkeys(order) if k in new or k in (self.global_arrays or {})}

    # ------------------------------------------------------------------ Flower plumbing
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        current = from_record(arrays)
        self.model_names = set(current)  # the global model's names, whatever outgoing adds
        self.global_arrays = self.outgoing(server_round, current)
        if self.global_arrays is not current:
            arrays = to_record(self.global_arrays)
        self._partition_of = getattr(grid, "partition_of", {})
        for key, value in self.train_config(server_round).items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        arrays, kept = [], []
        for m in valid:  # a reply this strategy cannot use (e.g. a negative precision) is left out, counted
            a = from_record(next(iter(m.content.array_records.values())))
            why = self.reject_reason(a)
            pid = self._partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id)
            if why is None:
                arrays.append(a)
                kept.append(m)
            else:
                log.info("round %d: train partition %s: rejected, %s", server_round, pid, why)
        facts = {REJECTED_KEY: len(valid) - len(kept)} if len(kept) < len(valid) else {}
        if not kept:
            return None, with_facts(None, facts)  # nothing usable: the global model stays as it was
        contents = [m.content for m in kept]
        self.reply_partitions = [self._partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id) for m in kept]
        n = np.array([float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents])
        if self.is_partial(arrays):
            new = self.aggregate_partial(server_round, arrays, n)
        else:
            new = self.aggregate_arrays(server_round, arrays, n / n.sum())
        return to_record(new), with_facts(self.train_metrics_aggr_fn(contents, self.weighted_by_key), facts)
