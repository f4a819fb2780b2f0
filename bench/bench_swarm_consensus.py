"""Why swarm consensus did not settle, and the rule that does: the consensus of
``fedens.algorithms.swarm`` against its first version on simulated validator scores.

Each draw: ``nodes`` nodes with ``members`` candidates each, true accuracies uniform in [0.6, 0.9];
validator v scores every other node's candidates as true accuracy + N(0, noise²); confidence
0.8 everywhere. Printed per rule and noise: mean belief moves, agreement (share of validators
whose final top-k set is the ensemble), share of draws that settled within T, and regret (the
true top-k's mean accuracy minus the chosen set's).

    python bench/bench_swarm_consensus.py          # 200 draws per row, a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedens.algorithms.swarm import rank, swarm_consensus  # noqa: E402


def first_version(s: np.ndarray, c: np.ndarray, k: int, T: int, tau: float, omega: float, phi1: float,
                  phi2: float) -> tuple[list[int], int, float]:
    """The rule before the change: pulls to the one-hot of the node's own best and of the
    swarm's single best (``g = argmax B``)."""
    n_cand, n_val = s.shape
    scored = ~np.isnan(s)
    conf = np.where(scored, np.nan_to_num(c), 0.0)
    cum, total = conf.sum(1), conf.sum(1)
    z = np.where(scored, s / tau, -np.inf)
    b = np.exp(z - z.max(0, keepdims=True))
    b /= b.sum(0, keepdims=True)

    def mean(b: np.ndarray) -> np.ndarray:
        return np.divide((conf * b).sum(1), total, out=np.zeros(n_cand), where=total > 0)

    def tops(b: np.ndarray) -> list[frozenset[int]]:
        view = np.where(scored, b, mean(b)[:, None])
        return [frozenset(int(i) for i in rank(view[:, j], cum)[:k]) for j in range(n_val)]

    own_best = [rank(np.where(scored[:, j], s[:, j], -np.inf), cum)[0] for j in range(n_val)]
    steps = 0
    while len(set(tops(b))) > 1 and steps < T:
        moved = omega * b
        moved[own_best, np.arange(n_val)] += phi1
        moved[rank(mean(b), cum)[0], :] += phi2
        b = moved / moved.sum(0, keepdims=True)
        steps += 1
    final, order = tops(b), rank(mean(b), cum)
    agreed = final[0] if len(set(final)) == 1 else frozenset(int(i) for i in order[:k])
    return [int(i) for i in order if int(i) in agreed], steps, float(np.mean([f == agreed for f in final]))


def draw(rng: np.random.Generator, nodes: int, members: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    quality = rng.uniform(0.6, 0.9, nodes * members)
    owner = np.repeat(np.arange(nodes), members)
    scores = quality[:, None] + noise * rng.normal(size=(nodes * members, nodes))
    scores[owner[:, None] == np.arange(nodes)[None, :]] = np.nan  # a node does not score its own
    return quality, scores


def main(draws: int = 200, nodes: int = 10, members: int = 3, k: int = 3, T: int = 10) -> None:
    print(f"{nodes} nodes x {members} members, k={k}, T={T}, tau=0.1, omega=0.5, {draws} draws per row")
    print("| rule | phi1 | phi2 | noise | steps | agreement | settled | regret |")
    print("|---|---|---|---|---|---|---|---|")
    for noise in (0.01, 0.03):
        for rule, phi1, phi2 in (("first version", 0.3, 0.2), ("top-k sets", 0.3, 0.2), ("top-k sets", 0.2, 0.3)):
            rng = np.random.default_rng(0)
            rows = []
            for _ in range(draws):
                quality, scores = draw(rng, nodes, members, noise)
                conf = np.full_like(scores, 0.8)
                if rule == "first version":
                    chosen, steps, agreement = first_version(scores, conf, k, T, 0.1, 0.5, phi1, phi2)
                else:
                    chosen, _, steps, agreement = swarm_consensus(scores, conf, k, T, 0.1, 0.5, phi1, phi2)
                rows.append((steps, agreement, steps < T or agreement == 1.0,
                             np.sort(quality)[-k:].mean() - quality[chosen].mean()))
            r = np.array(rows, dtype=np.float64)
            print(f"| {rule} | {phi1} | {phi2} | {noise} | {r[:, 0].mean():.1f} | {r[:, 1].mean():.2f} | "
                  f"{r[:, 2].mean():.2f} | {r[:, 3].mean():.4f} |")


if __name__ == "__main__":
    main()
