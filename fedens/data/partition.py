"""Split example indices over clients: flwr-datasets' partitioners, on numpy arrays.

The three kinds are flwr-datasets' ``IidPartitioner``, ``DirichletPartitioner`` (with
``self_balancing=False``) and ``PathologicalPartitioner`` (``class_assignment_mode=
"first-deterministic"``), run on the rows in a seeded random order. They are written out here
because flwr-datasets works on a ``datasets.Dataset``: importing it costs about 2.6 s (it pulls
in datasets, pandas, matplotlib and seaborn), paid by every cold run, and reading a partition
back costs about 1 ms (a ``Dataset.select``), 100 s for 100,000 clients. ``tests/
test_partition.py`` checks that each gives exactly flwr-datasets' partitions for many sizes and
seeds (flwr-datasets is a test dependency for that).

Every partitioner gets the labels of the shuffled rows, ``targets`` ``(n,)``, and returns the
rows of each partition; ``partition_indices`` maps rows back to example indices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedens.scenario import PartitionConfig


def iid(targets: np.ndarray, k: int, cfg: Any, seed: int) -> list[np.ndarray]:
    """``IidPartitioner``: contiguous shards of the rows (``Dataset.shard(contiguous=True)``),
    the first ``n % k`` one row longer."""
    div, mod = divmod(len(targets), k)
    sizes = np.full(k, div, dtype=np.int64)
    sizes[:mod] += 1
    return np.split(np.arange(len(targets)), np.cumsum(sizes)[:-1])


def dirichlet(targets: np.ndarray, k: int, cfg: Any, seed: int) -> list[np.ndarray]:
    """``DirichletPartitioner`` without self-balancing: for each class (sorted), shares
    p ~ Dirichlet(alpha * 1_k) cut the class's rows (in order) at ``floor(cumsum(p) * n_c)``;
    the whole draw is repeated until every client has ``min_partition_size`` rows, at most 11
    times, with one generator seeded once."""
    rng = np.random.default_rng(seed)
    alpha = np.full(k, float(cfg.alpha))
    rows_of = [np.nonzero(targets == c)[0] for c in np.unique(targets)]
    for attempt in range(11):
        parts: list[list[int]] = [[] for _ in range(k)]
        for rows in rows_of:
            cuts = (np.cumsum(rng.dirichlet(alpha)) * len(rows)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(rows, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= cfg.min_partition_size:
            return [np.asarray(p, dtype=np.int64) for p in parts]
    raise ValueError("The max number of attempts (10) was reached. Please update the values of alpha and try again.")


def pathological(targets: np.ndarray, k: int, cfg: Any, seed: int) -> list[np.ndarray]:
    """``PathologicalPartitioner``, first-deterministic: client i's first class is class
    ``i mod C``, the others are drawn with the seed until it has ``classes_per_client``; each
    class's rows are then split evenly (``np.array_split``) over the clients that hold it."""
    rng = np.random.default_rng(seed)
    labels = np.unique(targets).tolist()
    m = cfg.classes_per_client
    if m > len(labels):
        raise ValueError(f"The specified `num_classes_per_partition`={m} is greater than the number of unique classes "
                         f"in the given dataset={len(labels)}.")
    classes_of: list[list[int]] = []
    for pid in range(k):
        held = [labels[pid % len(labels)]]
        while len(held) < m:
            label = rng.choice(labels, size=1)[0]
            if label not in held:
                held.append(label)
        classes_of.append(held)
    holders = {c: [pid for pid in range(k) if c in classes_of[pid]] for c in labels}
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in labels:
        rows = np.where(targets == c)[0]
        if len(holders[c]) > len(rows):
            raise ValueError(f"Label: {c} is needed to be assigned to more partitions ({len(holders[c])}) than there "
                             f"are samples (corresponding to this label) in the dataset ({len(rows)}).")
        if holders[c]:
            for pid, chunk in zip(holders[c], np.array_split(rows, len(holders[c]))):
                parts[pid].extend(chunk.tolist())
    return [np.asarray(p, dtype=np.int64) for p in parts]


# One function per ``data.partition.kind``: (targets of the shuffled rows, clients, config, seed)
# -> the rows of each client.
PARTITIONERS: dict[str, Callable[[np.ndarray, int, Any, int], list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "pathological": pathological,
}


def partition_indices(labels: np.ndarray, num_partitions: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Indices into ``labels`` (shape ``(n,)``) for each of ``num_partitions`` clients, each sorted.

    Partitions are disjoint; iid and dirichlet also cover all n examples (pathological may leave
    classes unused). Raises ``ValueError`` (one line) when the partitioning is impossible,
    e.g. Dirichlet cannot meet ``min_partition_size``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_partitions > n:
        raise ValueError(f"data.num_clients: {num_partitions} clients but only {n} training examples")
    # Shuffled rows: IidPartitioner takes contiguous shards, and the shuffle makes which
    # examples of a class a client gets depend on the seed for every kind.
    order = np.random.default_rng(seed).permutation(n)
    try:
        parts = PARTITIONERS[cfg.kind](labels[order], num_partitions, cfg, seed)
    except ValueError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"data.partition: cannot split {n} examples over {num_partitions} clients with {cfg!r}: {reason}") from None
    return [np.sort(order[rows]).astype(np.int64) for rows in parts]
