"""Data: the dataset registry, partitioning over clients, covariate shift, the OOD sets, and the
cached federated build every Ray actor reads its client's data from."""

from __future__ import annotations

from fedens.data import datasets as _datasets  # noqa: F401  (registers the built-in datasets)
from fedens.data.base import DATASETS, ArrayDataset, DatasetOptions, DatasetSpec, OodSpec
from fedens.data.federated import (
    ClientData,
    FederatedData,
    ServerData,
    build_federated_data,
    load_client_data,
    load_server_data,
)
from fedens.data.partition import partition_indices
from fedens.data.shift import shift_dataset

__all__ = [
    "ArrayDataset",
    "DatasetOptions",
    "DatasetSpec",
    "OodSpec",
    "DATASETS",
    "ClientData",
    "ServerData",
    "FederatedData",
    "build_federated_data",
    "load_client_data",
    "load_server_data",
    "partition_indices",
    "shift_dataset",
]
