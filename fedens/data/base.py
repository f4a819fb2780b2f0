"""The dataset interface: an in-memory array dataset and the spec a dataset registers.

A dataset is registered in ``DATASETS`` as a ``DatasetSpec``: its options model (the scenario's
``data.params``), a loader returning the whole dataset at raw scale, two cheap functions
(no loading) that let a scenario be validated before any data is read, and optionally an
``OodSpec``: the out-of-distribution inputs its OOD AUROC is measured on (``data.ood``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from fedens.registry import Registry


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``x`` float32 ``(n, *input_shape)`` (images ``(n, C, H, W)``, vectors ``(n, F)``)
    and labels ``y`` int64 ``(n,)``.

    Built datasets are shared through a per-process cache: never modify the arrays in place.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        # Checked here so a plug-in loader with wrong dtypes fails at once, not deep in torch.
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise ValueError(f"ArrayDataset needs float32 x and int64 y, got {self.x.dtype} and {self.y.dtype}")
        if self.y.ndim != 1 or self.x.ndim < 2 or len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset needs x (n, ...) and y (n,), got {self.x.shape} and {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)


class DatasetOptions(BaseModel):
    """Base for a dataset's options: frozen, and any unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Options that are file-system paths: the scenario loader makes them absolute (relative to
    # the scenario file's folder), because Ray actors do not run in the user's working directory.
    path_fields: ClassVar[tuple[str, ...]] = ()


def standardise_set(x: np.ndarray) -> np.ndarray:
    """``x`` ``(n, C, ...)`` or ``(n, F)`` with per-channel (vectors: per-feature) mean 0 and std 1
    over the whole set, float32; a channel with std < 1e-6 is only centred."""
    axes = (0, *range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std < 1e-6] = 1.0
    return ((x - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class OodSpec:
    """A dataset's own out-of-distribution set, the one ``data.ood.kind: auto`` (or ``dataset``)
    evaluates the OOD AUROC on.

    name : short name, reported with the run (e.g. ``"mnist1d-as-8x8"``).
    make : ``(options, n, seed) -> float32 (n, *input_shape)``: ``n`` inputs with no label of
        the dataset, already in the standardised input space and with per-channel mean 0 and
        std 1 over the set (``standardise_set``), so that neither their mean nor their scale
        tells them from the standardised test set, only their structure does. Deterministic in
        ``seed``; it must not touch global random states, nor download anything.
    """

    name: str
    make: Callable[[Any, int, int], np.ndarray]


@dataclass(frozen=True)
class DatasetSpec:
    """What a registered dataset provides.

    Options : pydantic model of the dataset's options (the scenario's ``data.params``).
    load : ``(options, seed) -> ArrayDataset``, the whole dataset at raw scale.
    input_shape : ``options -> shape of one input``; cheap, no loading.
    num_classes : ``options -> number of classes``; cheap, no loading.
    ood : the dataset's own OOD set, or ``None``: then ``data.ood.kind: auto`` falls back to
        the Gaussian-noise set (and ``kind: dataset`` is an error).

    Options that name missing files raise ``ValueError`` with a one-line message.
    """

    Options: type[BaseModel]
    load: Callable[[Any, int], ArrayDataset]
    input_shape: Callable[[Any], tuple[int, ...]]
    num_classes: Callable[[Any], int]
    ood: OodSpec | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")
