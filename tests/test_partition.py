"""partition_indices: disjoint, covering, skew controlled by alpha, k classes per client, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.data import partition_indices
from fedens.scenario import DirichletPartition, IidPartition, PathologicalPartition

LABELS = np.repeat(np.arange(10), 50)  # 500 examples, 50 of each of 10 classes, sorted by class
IID = IidPartition()
DIR = DirichletPartition(kind="dirichlet", alpha=0.5, min_partition_size=5)
PATH = PathologicalPartition(kind="pathological", classes_per_client=3)


def entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=10) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("cfg", [IID, DIR], ids=["iid", "dirichlet"])
def test_disjoint_and_covering(cfg):
    parts = partition_indices(LABELS, 7, cfg, seed=0)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(500))


def test_iid_sizes_within_one():
    # 500 = 7 * 71 + 3: three clients get 72, four get 71.
    sizes = sorted(len(p) for p in partition_indices(LABELS, 7, IID, seed=3))
    assert sizes == [71, 71, 71, 71, 72, 72, 72]


def test_iid_is_shuffled_not_contiguous():
    # Contiguous shards of class-sorted labels would give client 0 only classes 0 and 1.
    parts = partition_indices(LABELS, 5, IID, seed=0)
    assert all(len(np.unique(LABELS[p])) >= 8 for p in parts)


def test_dirichlet_small_alpha_is_more_skewed():
    def mean_entropy(alpha: float) -> float:
        cfg = DirichletPartition(kind="dirichlet", alpha=alpha, min_partition_size=5)
        return np.mean([entropy(LABELS[p]) for p in partition_indices(LABELS, 10, cfg, seed=1)])

    skewed, flat = mean_entropy(0.1), mean_entropy(100.0)
    assert flat > 2.2  # close to the uniform ln(10) = 2.303
    assert skewed < flat - 0.8


def test_pathological_k_classes_per_client():
    parts = partition_indices(LABELS, 10, PATH, seed=0)
    assert [len(np.unique(LABELS[p])) for p in parts] == [3] * 10
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)  # disjoint


def test_pathological_one_class_each_by_hand():
    # "first-deterministic": client i's first class is i, so with k=1 client i holds class i.
    cfg = PathologicalPartition(kind="pathological", classes_per_client=1)
    parts = partition_indices(LABELS, 10, cfg, seed=4)
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p, np.arange(50 * i, 50 * (i + 1)))


@pytest.mark.parametrize("cfg", [IID, DIR, PATH], ids=["iid", "dirichlet", "pathological"])
def test_seeded(cfg):
    a, b, c = (partition_indices(LABELS, 5, cfg, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_impossible_dirichlet_is_one_line_value_error():
    cfg = DirichletPartition(kind="dirichlet", alpha=0.01, min_partition_size=45)
    with pytest.raises(ValueError, match="^data.partition: ") as err:
        partition_indices(LABELS, 10, cfg, seed=0)
    assert "\n" not in str(err.value) and "min_partition_size=45" in str(err.value)


def test_more_clients_than_examples():
    with pytest.raises(ValueError, match="data.num_clients"):
        partition_indices(LABELS[:4], 5, IID, seed=0)


def flwr_datasets_partitions(labels: np.ndarray, k: int, cfg, seed: int) -> list[np.ndarray]:
    """The same split made by flwr-datasets itself, as fedens first did it."""
    import warnings

    import flwr_datasets.partitioner as P
    from datasets import Dataset

    make = {
        "iid": lambda: P.IidPartitioner(k),
        "dirichlet": lambda: P.DirichletPartitioner(k, partition_by="label", alpha=cfg.alpha,
                                                    min_partition_size=cfg.min_partition_size, self_balancing=False, seed=seed),
        "pathological": lambda: P.PathologicalPartitioner(k, partition_by="label", num_classes_per_partition=cfg.classes_per_client,
                                                          class_assignment_mode="first-deterministic", seed=seed),
    }[cfg.kind]
    order = np.random.default_rng(seed).permutation(len(labels))
    part = make()
    part.dataset = Dataset.from_dict({"idx": order, "label": labels[order]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(k)]


CASES = [
    (IidPartition(), 10, 3), (IidPartition(), 1797, 10), (IidPartition(), 100, 100), (IidPartition(), 5003, 1000),
    *[(DirichletPartition(kind="dirichlet", alpha=a, min_partition_size=m), n, k)
      for a, m, n, k in [(0.5, 10, 1437, 10), (0.1, 10, 1437, 20), (1.0, 0, 300, 7), (0.3, 5, 800, 30), (2, 10, 500, 5)]],
    *[(PathologicalPartition(kind="pathological", classes_per_client=c), n, k)
      for c, n, k in [(2, 1437, 10), (1, 600, 4), (3, 1000, 25), (5, 800, 12)]],
]


@pytest.mark.parametrize("cfg,n,k", CASES, ids=lambda x: getattr(x, "kind", str(x)))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_partitions_are_flwr_datasets_partitions(cfg, n: int, k: int, seed: int):
    """fedens runs flwr-datasets' algorithms on numpy arrays (importing flwr-datasets costs
    ~2.6 s per process); the partitions must be exactly theirs."""
    labels = np.random.default_rng([n, seed]).integers(0, 10, n)
    mine = partition_indices(labels, k, cfg, seed)
    ref = flwr_datasets_partitions(labels, k, cfg, seed)
    assert len(mine) == len(ref) == k
    for a, b in zip(mine, ref):
        np.testing.assert_array_equal(a, b)


def test_impossible_dirichlet_fails_like_flwr_datasets():
    cfg = DirichletPartition(kind="dirichlet", alpha=0.01, min_partition_size=50)
    labels = np.random.default_rng(0).integers(0, 10, 300)
    with pytest.raises(ValueError, match="max number of attempts"):
        flwr_datasets_partitions(labels, 6, cfg, 0)
    with pytest.raises(ValueError, match=r"^data.partition: cannot split 300 examples over 6 clients .*max number of attempts"):
        partition_indices(labels, 6, cfg, 0)
