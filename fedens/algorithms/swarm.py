"""Swarm consensus, the pure part (docs/methods.md#swarm-consensus): ranking with tie-breaks,
the PSO-style belief consensus of validators over candidates, and filling an ensemble's slots
with the agreed members. Used by the ``swarm`` strategy and the ``swarm`` gossip rule alike.

Shapes: ``scores`` and ``confidence`` ``(N_cand, N_val)``, NaN where a validator gave no score.
"""

from __future__ import annotations

import numpy as np

from fedens.algorithms.arrays import Arrays

# The consensus' parameters and defaults, shared by the strategy and the gossip rule.
DEFAULTS = {"k": 3, "T": 10, "tau": 0.1, "omega": 0.5, "phi1": 0.3, "phi2": 0.2}


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
    check_params(k, T, tau, omega, phi1, phi2)
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
    own_best = np.array([rank(np.where(scored[:, j], s[:, j], -np.inf), cumulative)[0] for j in range(n_val)])
    conf_total = conf.sum(1)

    def swarm_mean(b: np.ndarray) -> np.ndarray:  # (C,): Σ_j c_ij b_ij / Σ_j c_ij
        return np.divide((conf * b).sum(1), conf_total, out=np.zeros(n_cand), where=conf_total > 0)

    def top_sets(b: np.ndarray) -> list[frozenset[int]]:
        # A node ranks its own candidates by the swarm's mean belief: it defers to the swarm.
        view = np.where(scored, b, swarm_mean(b)[:, None])
        return [frozenset(int(i) for i in rank(view[:, j], cumulative)[:k]) for j in range(n_val)]

    steps = 0
    while len(set(top_sets(belief))) > 1 and steps < T:
        g = rank(swarm_mean(belief), cumulative)[0]
        moved = omega * belief
        moved[own_best, np.arange(n_val)] += phi1
        moved[g, :] += phi2
        belief = moved / moved.sum(0, keepdims=True)
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


def check_params(k: int, T: int, tau: float, omega: float, phi1: float, phi2: float) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if T < 0:
        raise ValueError(f"T must be >= 0, got {T}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if min(omega, phi1, phi2) < 0 or omega + phi1 + phi2 <= 0:
        raise ValueError(f"omega, phi1, phi2 must be >= 0 with a positive sum, got {omega}, {phi1}, {phi2}")
