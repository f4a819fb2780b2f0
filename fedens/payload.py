"""How a learner's state travels: named numpy arrays in one Flower ``ArrayRecord``.

The naming rule (one place, so strategies can find what they need):

- A plain network's tensors travel under their ``state_dict`` names (``0.weight``), so Flower's
  own strategies aggregate them as they would any PyTorch model.
- Learners with more structure use dotted prefixes (introduced with those learners):
  ``member.{k}.<name>`` for member k of an ensemble, ``mean.<name>`` / ``precision.<name>`` for
  a Gaussian posterior. A name without such a prefix is a shared part.

Element-wise aggregation (FedAvg) is meaningful for all of them: shared parts are averaged,
member k with member k.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays -> ``ArrayRecord`` (insertion order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> named arrays."""
    return {k: v.numpy() for k, v in record.items()}


def single_arrayrecord(content: RecordDict) -> ArrayRecord:
    """The one ArrayRecord of a message, whatever key the strategy stored it under."""
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, found {len(records)}")
    return records[0]


def record_nbytes(content: RecordDict) -> int:
    """Bytes of array data a message carries (the model payload; config and metrics, a few
    dozen bytes, are not counted)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
