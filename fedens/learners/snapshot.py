"""``snapshot``: snapshot ensembles over cyclic learning rates, run over server rounds.

Huang, Li, Pleiss, Liu, Hopcroft, Weinberger, "Snapshot Ensembles: Train 1, get M for free",
ICLR 2017 (arXiv 1704.00109): the learning rate follows α(t) = α0/2·(cos(π·mod(t−1,
⌈T/M⌉)/⌈T/M⌉) + 1); the model at the end of each cycle (small learning rate, a local minimum)
is saved, and the predictive averages the saved models' softmaxes. Two variants
(docs/methods.md#snapshot): ``schedule: fge``, Fast Geometric Ensembling (Garipov et al.,
NeurIPS 2018, arXiv 1802.10026): piecewise-linear cycles, the snapshot at the middle round
(``fge_lr``); ``start: star``, StarSSE (Sadrtdinov et al., NeurIPS 2023): every cycle restarts
from the global model at the end of ``warmup_rounds``, carried as ``center.<name>``. Cycles
count from the end of warm-up (``round_plan``); what follows is written for the cosine default.

Decisions
- The trajectory runs over server ROUNDS, not local epochs: t is the round, the cycle is
  ``cycle_rounds`` rounds, and a client's whole local training in round r uses
  α(r) = lr/2·(cos(π·mod(r−1, cycle_rounds)/cycle_rounds) + 1), with ``lr`` from ``train:``.
  Why: the model worth ensembling is the global one. Local cycles would save client models
  fitted to one non-IID shard, a few epochs apart, and clients keep no state between rounds
  anyway (every round builds a fresh learner from the global arrays). Over rounds, each
  snapshot is the FedAvg model at a low-learning-rate point, and the restart to ``lr`` at the
  next cycle's first round moves the global model to a new basin, as in the paper.
- Slots: at the snapshot round of cycle c (cosine: its last, r % cycle_rounds == 0 without
  warm-up; fge: its middle) each client copies its trained
  weights into slot (c − 1) mod ``members`` after training, and sets that slot's flag to 1.
  FedAvg averages slot k across clients like any array, so the averaged slot is exactly the
  average of the clients' trained weights: the new global model at the end of the cycle. In the
  other rounds every client returns the slots it received, and their average is that same
  value. When there are more cycles than slots the oldest snapshot is overwritten.
- Payload: the current weights under plain names, snapshot k as ``member.{k}.<name>``, and
  ``member.{k}.filled`` (float32 ``(1,)``, 0 or 1; averaging keeps it 0 or 1, so prediction tests
  ``> 0.5``). A round carries (members + 1) networks.
- This relies on the strategy averaging every array with convex weights (FedAvg and its
  weighted variants). A server optimiser (FedAdam, FedAvgM) would move slots and flags by a
  pseudo-gradient; a strategy that combines ``member.*`` arrays as ensemble members would
  treat the slots as members, which is what they are, but must keep ``member.{k}.filled``.
- Prediction averages the filled slots only ``(filled, batch, classes)``; before the first
  cycle ends it is the current model ``(1, batch, classes)``.
- The optimiser is rebuilt every round (as in ``single``), so momentum does not carry across
  the restart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.func import functional_call

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.single import SingleLearner
from fedens.scenario import TrainConfig


class SnapshotOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: int = Field(5, ge=1, description="snapshot slots M; the oldest is overwritten after M cycles")
    cycle_rounds: int = Field(4, ge=1, description="server rounds per cycle, ⌈T/M⌉ in the paper")
    schedule: Literal["cosine", "fge"] = Field(
        "cosine", description="cosine restarts, snapshot at a cycle's end (Huang et al.); or FGE's piecewise-linear "
        "cycle, snapshot at its middle (Garipov et al.)")
    lr_low: float = Field(0.01, gt=0, le=1, description="fge: the cycle's lowest learning rate, as a fraction of train.lr")
    start: Literal["continue", "star"] = Field(
        "continue", description="continue: a cycle starts where the last ended; star: every cycle restarts from the "
        "model at the end of warm-up (StarSSE)")
    warmup_rounds: int = Field(0, ge=0, description="rounds of plain training at train.lr before the first cycle")

    @model_validator(mode="after")
    def _even_fge_cycles(self) -> "SnapshotOptions":
        if self.schedule == "fge" and self.cycle_rounds % 2:
            raise ValueError("cycle_rounds: fge takes its snapshot at a cycle's middle round: must be even")
        return self


def cyclic_lr(t: int, lr0: float, cycle: int) -> float:
    """α(t) = α0/2·(cos(π·mod(t−1, cycle)/cycle) + 1) for steps (here rounds) t = 1, 2, ...:
    α0 at a cycle's first step, falling towards 0 at its last."""
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % cycle) / cycle) + 1)


def fge_lr(t: int, lr1: float, lr2: float, cycle: int) -> float:
    """FGE's piecewise-linear cycle (Garipov et al. 2018, eq. 2) for steps t = 1, 2, ...: with
    s = (mod(t−1, cycle) + 1)/cycle, ``(1 − 2s) lr1 + 2s lr2`` for s ≤ 1/2 and ``(2 − 2s) lr2 +
    (2s − 1) lr1`` after: from near lr1 down to lr2 at the middle (the snapshot) and back."""
    s = ((t - 1) % cycle + 1) / cycle
    return (1 - 2 * s) * lr1 + 2 * s * lr2 if s <= 0.5 else (2 - 2 * s) * lr2 + (2 * s - 1) * lr1


@LEARNERS.register("snapshot")
class SnapshotLearner(SingleLearner):
    """The current network plus ``members`` snapshot slots; predictive over the filled slots."""

    reusable = True  # set_arrays restores the whole state (tests/learners/test_contract.py)

    Options = SnapshotOptions

    def __init__(
        self, model_fn: Callable[[], nn.Module], options: SnapshotOptions, train: TrainConfig, device: torch.device
    ) -> None:
        super().__init__(model_fn, options, train, device)
        self.base_train = train  # self.train_cfg is this with the round's learning rate
        M = options.members
        state = self.model.state_dict()
        # slot k of tensor ``name`` is snapshots[name][k]: (M, *shape)
        self.snapshots = {name: torch.zeros(M, *t.shape, dtype=t.dtype, device=device) for name, t in state.items()}
        self.filled = torch.zeros(M, device=device)  # (M,), 1.0 where a slot holds a snapshot
        # star: the model every cycle restarts from (the initial one until warm-up ends)
        self.center = {name: t.detach().clone() for name, t in state.items()} if options.start == "star" else None

    def round_plan(self, server_round: int) -> tuple[float, bool, bool]:
        """``(lr, restart, snapshot)`` of a round: its learning rate, whether it starts from the
        star centre (first round of a cycle, ``start: star``), whether it ends in a snapshot."""
        o, lr0 = self.options, self.base_train.lr
        t = server_round - o.warmup_rounds  # the round within the cycles, 1-based
        if t < 1:
            return lr0, False, False
        position = (t - 1) % o.cycle_rounds + 1
        restart = o.start == "star" and position == 1
        if o.schedule == "fge":
            return fge_lr(t, lr0, o.lr_low * lr0, o.cycle_rounds), restart, position == o.cycle_rounds // 2
        return cyclic_lr(t, lr0, o.cycle_rounds), restart, position == o.cycle_rounds

    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        if server_round < 1:
            raise ValueError(f"snapshot: server rounds start at 1, got {server_round}")
        o = self.options
        lr, restart, snapshot = self.round_plan(server_round)
        if restart:  # StarSSE: every cycle begins at the centre, not where the last one ended
            self.model.load_state_dict(self.center)
        self.train_cfg = self.base_train.model_copy(update={"lr": lr})
        metrics = super().fit(data, generator, server_round)
        with torch.no_grad():
            if snapshot:  # the trained weights become snapshot c (c = the cycle's index)
                slot = ((server_round - o.warmup_rounds - 1) // o.cycle_rounds) % o.members
                for name, t in self.model.state_dict().items():
                    self.snapshots[name][slot].copy_(t)
                self.filled[slot] = 1.0
            if self.center is not None and o.warmup_rounds and server_round == o.warmup_rounds:
                self.center = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        return {**metrics, "lr": lr}

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``x (b, ...) -> (filled slots, b, classes)``, or ``(1, b, classes)`` from the current
        model while no slot is filled."""
        self.model.eval()
        slots = (self.filled > 0.5).nonzero().flatten().tolist()
        if not slots:
            return F.softmax(self.model(x), dim=-1).unsqueeze(0)
        snapshot = lambda k: {n: s[k] for n, s in self.snapshots.items()}  # noqa: E731
        return torch.stack([F.softmax(functional_call(self.model, snapshot(k), (x,)), dim=-1) for k in slots])

    def get_arrays(self) -> dict[str, np.ndarray]:
        arrays = super().get_arrays()
        for k in range(self.options.members):
            arrays.update({f"member.{k}.{name}": s[k].cpu().numpy().copy() for name, s in self.snapshots.items()})
            arrays[f"member.{k}.filled"] = self.filled[k : k + 1].cpu().numpy().astype(np.float32)
        if self.center is not None:  # FedAvg averages it like any array: the global centre
            arrays.update({f"center.{name}": t.cpu().numpy().copy() for name, t in self.center.items()})
        return arrays

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().set_arrays(arrays)
        with torch.no_grad():
            for k in range(self.options.members):
                for name, s in self.snapshots.items():
                    s[k].copy_(torch.as_tensor(np.asarray(arrays[f"member.{k}.{name}"])))
                self.filled[k] = float(np.asarray(arrays[f"member.{k}.filled"]).reshape(()))
            if self.center is not None:
                self.center = {name: torch.as_tensor(np.asarray(arrays[f"center.{name}"])).to(t)
                               for name, t in self.center.items()}
