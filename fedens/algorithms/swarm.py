"""Swarm consensus, the pure part (docs/methods.md#swarm-consensus): ranking with tie-breaks,
the PSO-style belief consensus of validators over candidates, and filling an ensemble's slots
with the agreed members. Used by the ``swarm`` strategy and the ``swarm`` gossip rule alike.

Shapes: ``scores`` and ``confidence`` ``(N_cand, N_val)``, NaN where a validator gave no score.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fedens.algorithms.arrays import Arrays
from fedens.options import Options, split_options


class SwarmOptions(Options):
    """The consensus' parameters and defaults, shared by the ``swarm`` strategy and the ``swarm``
    gossip rule (docs/methods.md#swarm-consensus)."""

    k: int = Field(3, ge=1, description="members agreed on (at most the ensemble's slots)")
    T: int = Field(10, ge=0, description="belief-consensus steps")
    tau: float = Field(0.1, gt=0, allow_inf_nan=False, description="softmax temperature of the scores")
    omega: float = Field(0.5, ge=0, allow_inf_nan=False, description="inertia of a validator's belief")
    phi1: float = Field(0.2, ge=0, allow_inf_nan=False, description="pull to the validator's own top-k")
    phi2: float = Field(0.3, ge=0, allow_inf_nan=False, description="pull to the swarm's top-k (> phi1 to settle)")
    score: Literal["accuracy", "nll"] = Field("accuracy", description="what a validator measures on its validation split")

    @model_validator(mode="after")
    def _positive_mix(self) -> "SwarmOptions":
        if self.omega + self.phi1 + self.phi2 <= 0:
            raise ValueError("omega, phi1, phi2: their sum must be > 0")
        return self


DEFAULTS = SwarmOptions().model_dump(exclude={"score"})  # the consensus function's keyword defaults
SIGN = {"accuracy": 1.0, "nll": -1.0}  # scores are higher-is-better: an NLL enters negated


def validator_scores(values: Mapping[str, Any], candidate: str, score: str) -> list[tuple[float, float]] | None:
    """``[(score, confidence)]`` per member of ``candidate`` from a validator's reply to
    ``query.validate`` (``values`` holds ``<candidate>.accuracy``, ``.nll``, ``.confidence``,
    one value per member), the score signed so that higher is better; ``None`` if absent.
    The ``swarm`` strategy and the gossip engine read validators' replies with this."""
    s, c = values.get(f"{candidate}.{score}"), values.get(f"{candidate}.confidence")
    if s is None or c is None:
        return None
    return [(SIGN[score] * float(a), float(q)) for a, q in zip(s, c)]


def rank(values: np.ndarray, cumulative_confidence: np.ndarray) -> np.ndarray:
    """Indices ``(C,)`` best first: higher value, then higher cumulative confidence, then lower
    index. Values are compared to 12 decimals, so float noise does not break a tie."""
    idx = np.arange(len(values))
    return np.lexsort((idx, -np.round(cumulative_confidence, 12), -np.round(values, 12)))


def swarm_consensus(
    scores: np.ndarray,
    confidence: np.ndarray,
    k: int = DEFAULTS["k"],
    T: int = DEFAULTS["T"],
    tau: float = DEFAULTS["tau"],
    omega: float = DEFAULTS["omega"],
    phi1: float = DEFAULTS["phi1"],
    phi2: float = DEFAULTS["phi2"],
) -> tuple[list[int], np.ndarray, int, float]:
    """PSO-style consensus of validators over candidates (module docstring, step 3).

    scores, confidence : ``(N_cand, N_val)``; entry ``[i, j]`` is validator j's score s_ij
        (higher is better) and confidence c_ij of candidate i; NaN in ``scores`` = not scored
        (a node's own candidates).
    Returns ``(members, weights, steps, agreement)``: up to k candidate indices best first,
    their weights ``(len(members),)`` summing to 1, the number of belief moves (0..T), and the
    share of scoring validators whose final top-k set equals ``members``.
    """
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(confidence, dtype=np.float64)
    if s.ndim != 2 or s.shape != c.shape or s.shape[0] == 0:
        raise ValueError(f"scores and confidence must be equal (N_cand, N_val) arrays, got {s.shape} and {c.shape}")
    split_options(SwarmOptions, dict(k=k, T=T, tau=tau, omega=omega, phi1=phi1, phi2=phi2))  # a scenario's checks
    n_cand = s.shape[0]
    k = min(k, n_cand)
    scored = ~np.isnan(s)
    conf = np.where(scored, np.nan_to_num(c, nan=0.0), 0.0)  # own / missing entries weigh nothing
    cumulative = conf.sum(1)  # Σ_j c_ij, the first tie-break
    active = scored.any(0)  # validators that scored something
    if not active.any():
        return [int(i) for i in rank(np.zeros(n_cand), cumulative)[:k]], np.full(k, 1.0 / k), 0, 0.0
    s, scored, conf = s[:, active], scored[:, active], conf[:, active]
    n_val = s.shape[1]

    z = np.where(scored, s / tau, -np.inf)
    belief = np.exp(z - z.max(0, keepdims=True))  # (C, V); unscored -> 0
    belief /= belief.sum(0, keepdims=True)
    # each validator's personal best: the top-k of its own scores (among what it scored)
    own_top = [rank(np.where(scored[:, j], s[:, j], -np.inf), cumulative)[: min(k, int(scored[:, j].sum()))]
               for j in range(n_val)]
    conf_total = conf.sum(1)

    def swarm_mean(b: np.ndarray) -> np.ndarray:  # (C,): Σ_j c_ij b_ij / Σ_j c_ij
        return np.divide((conf * b).sum(1), conf_total, out=np.zeros(n_cand), where=conf_total > 0)

    def top_sets(b: np.ndarray) -> list[frozenset[int]]:
        # A node ranks its own candidates by the swarm's mean belief: it defers to the swarm.
        view = np.where(scored, b, swarm_mean(b)[:, None])
        return [frozenset(int(i) for i in rank(view[:, j], cumulative)[:k]) for j in range(n_val)]

    steps = 0
    while len(set(top_sets(belief))) > 1 and steps < T:
        swarm_top = rank(swarm_mean(belief), cumulative)[:k]  # the swarm's best: its top-k set
        moved = omega * belief
        for j in range(n_val):
            moved[own_top[j], j] += phi1 / len(own_top[j])
        # also on a validator's own candidates: that mass is its deference to the swarm there
        moved[swarm_top, :] += phi2 / k
        total = moved.sum(0, keepdims=True)
        belief = np.divide(moved, total, out=belief.copy(), where=total > 0)
        steps += 1

    sets, mean = top_sets(belief), swarm_mean(belief)
    order = rank(mean, cumulative)
    agreed = sets[0] if len(set(sets)) == 1 else frozenset(int(i) for i in order[:k])
    members = [int(i) for i in order if int(i) in agreed]
    w = mean[members]
    weights = w / w.sum() if w.sum() > 0 else np.full(len(members), 1.0 / len(members))
    agreement = float(np.mean([s_j == agreed for s_j in sets]))
    return members, weights, steps, agreement


def allocate_slots(weights: np.ndarray, slots: int) -> np.ndarray:
    """Slots per member ``(k,)`` for a pool of ``slots`` ≥ k: at least one each, Σ = slots, as
    close to ``weights · slots`` as whole numbers allow (largest remainder; earlier members win
    ties, and lose slots last)."""
    w = np.asarray(weights, dtype=np.float64)
    if slots < len(w):
        raise ValueError(f"{len(w)} members do not fit in {slots} slots")
    quota = w / w.sum() * slots
    counts = np.maximum(1, np.floor(quota)).astype(int)
    while counts.sum() > slots:  # the floor of one slot each overshot: take from the most over-served
        excess = np.where(counts > 1, counts - quota, -np.inf)
        counts[len(w) - 1 - int(np.argmax(excess[::-1]))] -= 1
    while counts.sum() < slots:
        counts[int(np.argmax(quota - counts))] += 1
    return counts


def slot_weights(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The predictive weight of every slot ``(sum(counts),)``: member j's weight split evenly
    over its ``counts[j]`` slots, so the slots' mixture weighs member j by ``weights[j]``."""
    w = np.asarray(weights, dtype=np.float64)
    return np.repeat(w / w.sum() / np.asarray(counts), np.asarray(counts))


def fill_slots(candidates: list[Arrays], members: list[int], counts: np.ndarray) -> Arrays:
    """A ``sum(counts)``-slot ensemble: member ``members[j]`` (an index into ``candidates``, each
    one member's arrays) fills ``counts[j]`` consecutive slots ``member.{slot}.<name>``."""
    ensemble: Arrays = {}
    slot = 0
    for i, n in zip(members, counts):
        for _ in range(int(n)):
            ensemble.update({f"member.{slot}.{name}": a for name, a in candidates[i].items()})
            slot += 1
    return ensemble
