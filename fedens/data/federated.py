"""The federated view of a dataset: a global test set, its shifted copy, and client splits.

``build_federated_data`` does, given ``DataConfig`` and a seed:
  1. load the whole dataset from the registry (raw scale);
  2. hold out a stratified global test set (``test_fraction``);
  3. if ``server_fraction`` > 0, hold out a stratified server-held public split of the rest
     (for learners that pretrain before federation and strategies that distil on the server);
     partition what remains over ``num_clients`` clients (``data.partition``);
  4. split each client's share into train and validation (``val_fraction``, stratified);
  5. standardise every input with per-channel mean/std of the non-test pool;
  6. make the shifted test set (``data.shift.severity``);
  7. make the OOD set (``data.ood``): the dataset's own (``DatasetSpec.ood``) or noise.
Same (config, seed) -> identical arrays; another seed -> another test split and partition.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedens.data.base import DATASETS, ArrayDataset, DatasetSpec
from fedens.data.partition import partition_indices
from fedens.data.shift import shift_dataset
from fedens.scenario import DataConfig


@dataclass(frozen=True)
class ClientData:
    """One client's data, standardised: ``train`` and ``val`` (``val`` is empty iff val_fraction is 0)."""

    train: ArrayDataset
    val: ArrayDataset


@dataclass(frozen=True)
class ServerData:
    """The global held-out ``test`` set, its covariate-shifted copy ``shift`` (same labels), the
    server-held ``public`` split (labelled; empty unless ``server_fraction`` > 0; a strategy that
    treats it as unlabelled ignores ``y``), the ``ood`` inputs for the out-of-distribution
    AUROC (as many as the test set, labels all 0 and meaningless) and which set they are,
    ``ood_kind`` (``"noise"`` or the dataset's ``OodSpec.name``, e.g. ``"blank-signals"``), and
    the facts a model needs: ``num_classes`` and ``input_shape`` (one input, without batch axis)."""

    test: ArrayDataset
    shift: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    public: ArrayDataset
    ood: ArrayDataset
    ood_kind: str = "noise"


class ClientSplits(Sequence[ClientData]):
    """Every client's train and validation split as index arrays into one standardised pool.

    ``clients[i]`` is a ``ClientData`` made on first access (the examples copied out of the
    pool, so its arrays are writable even when the pool is a read-only buffer shared through
    Ray's object store) and kept in a small cache. Stored this way, 100,000 clients cost four
    index arrays instead of 400,000 small ones: cheap to pickle and to ship to every actor.

    x : float32 ``(n, *input_shape)``, y : int64 ``(n,)`` (the whole standardised dataset)
    train_index, val_index : int64 positions in x, client after client
    train_offsets, val_offsets : int64 ``(num_clients + 1,)``; client i's examples are
        ``index[offsets[i]:offsets[i + 1]]``
    """

    CACHE = 1024  # clients kept per process (an actor serves many clients over a run)

    def __init__(self, x: np.ndarray, y: np.ndarray, train: list[np.ndarray], val: list[np.ndarray]) -> None:
        self.x, self.y = x, y
        self.train_index, self.train_offsets = _csr(train)
        self.val_index, self.val_offsets = _csr(val)
        self._cache: OrderedDict[int, ClientData] = OrderedDict()

    def __len__(self) -> int:
        return len(self.train_offsets) - 1

    def __getitem__(self, i: int) -> ClientData:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise IndexError(f"client {i!r} out of range 0..{len(self) - 1}")
        i = int(i)
        if (hit := self._cache.get(i)) is not None:
            self._cache.move_to_end(i)
            return hit
        tr = self.train_index[self.train_offsets[i] : self.train_offsets[i + 1]]
        va = self.val_index[self.val_offsets[i] : self.val_offsets[i + 1]]
        client = ClientData(train=ArrayDataset(self.x[tr], self.y[tr]), val=ArrayDataset(self.x[va], self.y[va]))
        self._cache[i] = client
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return client

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = OrderedDict()


def _csr(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    index = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return index, offsets


@dataclass(frozen=True)
class FederatedData:
    server: ServerData
    clients: ClientSplits


def stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` of labels ``y`` ``(n,)`` into (kept, held out), both sorted.

    ``round(fraction * n)`` are held out, at least 1 if ``fraction > 0`` and at most ``n - 1``,
    so at least one example is always kept. Each class gives its share ``fraction * n_c``,
    rounded by largest remainder (ties at random) so the total is exact.
    """
    n = len(y)
    k = min(max(round(fraction * n), 1 if fraction > 0 else 0), n - 1)
    if n == 0 or k < 0 or (fraction > 0 and k < 1):
        need = "2 (1 kept, 1 held out)" if fraction > 0 else "1"
        raise ValueError(f"{n} example(s), need at least {need}")
    # np.unique, flatnonzero(y == c) per class and setdiff1d, written with bincount, one stable
    # argsort and a mask: the same arrays, about 10x faster, which matters with 100,000 clients.
    counts_all = np.bincount(y)
    classes = np.flatnonzero(counts_all)
    counts = counts_all[classes]
    quota = k * counts / n
    take = np.floor(quota).astype(int)
    # Largest remainders get the leftover examples; a random permutation breaks ties.
    perm = rng.permutation(len(classes))
    best = perm[np.argsort(-(quota - take)[perm], kind="stable")]
    take[best[: k - take.sum()]] += 1
    by_class = np.argsort(y, kind="stable")  # positions of class c, ascending, at ends[c-1]:ends[c]
    ends = np.cumsum(counts).tolist()
    # a choice of 0 draws nothing from rng, so skipping those classes keeps the stream
    held = [rng.choice(by_class[end - count : end], t, replace=False)
            for end, count, t in zip(ends, counts.tolist(), take.tolist()) if t > 0]
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.ones(n, bool)
    kept[held] = False
    return np.flatnonzero(kept), held


def _take(ds: ArrayDataset, idx: np.ndarray) -> ArrayDataset:
    return ArrayDataset(ds.x[idx], ds.y[idx])


def _build(cfg: DataConfig, seed: int) -> FederatedData:
    spec = DATASETS.resolve(cfg.dataset)
    opts = spec.Options.model_validate(cfg.params)
    full = spec.load(opts, seed)
    shape, num_classes = tuple(spec.input_shape(opts)), spec.num_classes(opts)
    if full.x.shape[1:] != shape or (len(full) and not 0 <= full.y.min() <= full.y.max() < num_classes):
        raise ValueError(f"data.dataset: {cfg.dataset!r} loaded inputs of shape {full.x.shape[1:]} with labels "
                         f"{full.y.min()}..{full.y.max()}, but declares {shape} and {num_classes} classes")

    pool, test = stratified_split(full.y, cfg.test_fraction, np.random.default_rng([seed, 0]))

    # Per-channel statistics of the non-test pool (axis 1 = channels of images, features of
    # vectors); the test set must not leak into them.
    axes = (0, *range(2, full.x.ndim))
    mean = full.x[pool].mean(axis=axes, keepdims=True)
    std = full.x[pool].std(axis=axes, keepdims=True)
    std[std < 1e-6] = 1.0  # constant channels (e.g. always-black pixels) stay at 0
    x = ((full.x - mean) / std).astype(np.float32)
    data = ArrayDataset(x, full.y)

    public = pool[:0]
    if cfg.server_fraction > 0:
        keep, held = stratified_split(full.y[pool], cfg.server_fraction, np.random.default_rng([seed, 2]))
        pool, public = pool[keep], pool[held]

    train, val = [], []
    for i, part in enumerate(partition_indices(full.y[pool], cfg.num_clients, cfg.partition, seed)):
        idx = pool[part]
        try:
            tr, va = stratified_split(full.y[idx], cfg.val_fraction, np.random.default_rng([seed, 1, i]))
        except ValueError as err:
            raise ValueError(f"data.partition: client {i}: {err}; use fewer clients or a larger min_partition_size") from None
        train.append(idx[tr])
        val.append(idx[va])

    test_ds = _take(data, test)
    ood_kind, ood_x = ood_inputs(cfg, spec, opts, len(test_ds), shape, seed)
    ood = ArrayDataset(ood_x, np.zeros(len(test_ds), np.int64))
    server = ServerData(test_ds, shift_dataset(test_ds, cfg.shift.severity, seed), num_classes, shape,
                        _take(data, public), ood, ood_kind)
    return FederatedData(server, ClientSplits(data.x, data.y, train, val))


def ood_inputs(cfg: DataConfig, spec: DatasetSpec, opts: object, n: int, shape: tuple[int, ...],
               seed: int) -> tuple[str, np.ndarray]:
    """The OOD set of ``cfg.ood`` (``kind``, float32 inputs ``(n, *shape)``) at ``seed``.

    ``noise``, and ``auto`` for a dataset without an ``OodSpec``: standard-normal noise in the
    standardised input space (stream ``[seed, 3]``). Otherwise the dataset's own set, made with
    the generator seed drawn from stream ``[seed, 4]`` (no other draw uses these streams)."""
    if cfg.ood.kind == "dataset" and spec.ood is None:
        raise ValueError(f"data.ood.kind: dataset {cfg.dataset!r} declares no OOD set of its own; "
                         "use auto (noise for it) or noise")
    if cfg.ood.kind == "noise" or spec.ood is None:
        return "noise", np.random.default_rng([seed, 3]).standard_normal((n, *shape)).astype(np.float32)
    x = spec.ood.make(opts, n, int(np.random.default_rng([seed, 4]).integers(2**31)))
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (n, *shape) or not np.isfinite(x).all():
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"data.ood: dataset {cfg.dataset!r}'s OOD set {spec.ood.name!r} gave {got}, "
                         f"needs finite float32 {(n, *shape)}")
    return spec.ood.name, x


def _cfg_json(cfg: DataConfig) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


# A deliberate per-process cache: every Ray actor process gets the data once (from the driver
# through Ray's object store, see ``install``, or by building it) and then serves many messages
# (clients, rounds) from it. Keyed by the canonical JSON of the config and the seed; the arrays
# are shared, so callers must not modify them in place.
_CACHE: OrderedDict[tuple[str, int], FederatedData] = OrderedDict()
_CACHE_SIZE = 4


def build_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    """The federated data of ``cfg`` at ``seed``, built once per process (cached)."""
    key = (_cfg_json(cfg), seed)
    if (hit := _CACHE.get(key)) is None:
        hit = _build(cfg, seed)
        install(cfg, seed, hit)
    else:
        _CACHE.move_to_end(key)  # least recently *used* goes first, not least recently built
    return hit


def install(cfg: DataConfig, seed: int, data: FederatedData) -> None:
    """Make ``data`` this process's build of ``cfg`` at ``seed``: the engine installs the
    driver's build in every actor instead of letting each one build the same data again."""
    key = (_cfg_json(cfg), seed)
    _CACHE[key] = data
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


def is_installed(cfg: DataConfig, seed: int) -> bool:
    return (_cfg_json(cfg), seed) in _CACHE


def load_client_data(cfg: DataConfig, seed: int, partition_id: int) -> ClientData:
    """Client ``partition_id``'s train/val data from the cached build."""
    clients = build_federated_data(cfg, seed).clients
    if not 0 <= partition_id < len(clients):
        raise ValueError(f"partition id {partition_id} out of range 0..{len(clients) - 1}")
    return clients[partition_id]


def load_server_data(cfg: DataConfig, seed: int) -> ServerData:
    """The global test set, its shifted copy, num_classes and input_shape from the cached build."""
    return build_federated_data(cfg, seed).server
