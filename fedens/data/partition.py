"""Split example indices over clients with the flwr-datasets partitioners.

The partitioners work on a ``datasets.Dataset``; we hand them an in-memory one with two columns,
the original index and the label, and read the index column back out of each partition.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from fedens.scenario import PartitionConfig

# One builder per ``data.partition.kind``: (P, config, num_partitions, seed) -> a partitioner,
# where P is ``flwr_datasets.partitioner``. It is imported on first use: importing flwr-datasets
# takes seconds (it pulls in seaborn and scipy), which validating a scenario should not pay.
PARTITIONERS: dict[str, Callable[[ModuleType, Any, int, int], Any]] = {
    "iid": lambda P, c, n, seed: P.IidPartitioner(n),  # used through iid_shards (the same shards)
    "dirichlet": lambda P, c, n, seed: P.DirichletPartitioner(
        n, partition_by="label", alpha=c.alpha, min_partition_size=c.min_partition_size,
        self_balancing=False, seed=seed,
    ),
    # "first-deterministic": client i's first class is class i mod K, so every class is used
    # when there are at least K clients; the other classes are drawn with the seed.
    "pathological": lambda P, c, n, seed: P.PathologicalPartitioner(
        n, partition_by="label", num_classes_per_partition=c.classes_per_client,
        class_assignment_mode="first-deterministic", seed=seed,
    ),
}


def partition_indices(labels: np.ndarray, num_partitions: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Indices into ``labels`` (shape ``(n,)``) for each of ``num_partitions`` clients, each sorted.

    Partitions are disjoint; iid and dirichlet also cover all n examples (pathological may leave
    classes unused). Raises ``ValueError`` (one line) when the
    partitioning is impossible, e.g. Dirichlet cannot meet ``min_partition_size``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_partitions > n:
        raise ValueError(f"data.num_clients: {num_partitions} clients but only {n} training examples")
    # Shuffled rows: IidPartitioner takes contiguous shards, and the shuffle makes which
    # examples of a class a client gets depend on the seed for every kind.
    order = np.random.default_rng(seed).permutation(n)
    if cfg.kind == "iid":
        return iid_shards(order, num_partitions)

    import flwr_datasets.partitioner as P
    from datasets import Dataset

    partitioner = PARTITIONERS[cfg.kind](P, cfg, num_partitions, seed)
    partitioner.dataset = Dataset.from_dict({"idx": order, "label": labels[order]})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dirichlet warns at every resampling; we raise instead
            parts = [partitioner.load_partition(i)["idx"] for i in range(num_partitions)]
    except ValueError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"data.partition: cannot split {n} examples over {num_partitions} clients with {cfg!r}: {reason}") from None
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_shards(order: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """flwr-datasets' ``IidPartitioner`` on rows in ``order``, without its per-partition
    ``Dataset.shard`` calls (about 1 ms each, so 100 s for 100,000 clients): contiguous shards,
    the first ``n % num_partitions`` one example longer, each sorted. A test checks that the
    shards are IidPartitioner's."""
    n = len(order)
    div, mod = divmod(n, num_partitions)
    sizes = np.full(num_partitions, div, dtype=np.int64)
    sizes[:mod] += 1
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]
