"""How a learner's state travels: named numpy arrays in one Flower ``ArrayRecord``.

The naming rule (one place, so strategies can find what they need):

- A plain network's tensors travel under their ``state_dict`` names (``0.weight``), so Flower's
  own strategies aggregate them as they would any PyTorch model.
- Learners with more structure use dotted prefixes (introduced with those learners):
  ``member.{k}.<name>`` for member k of an ensemble, ``mean.<name>`` / ``precision.<name>`` for
  a Gaussian posterior, ``mean.member.{k}.<name>`` / ``precision.member.{k}.<name>`` for
  component k of a mixture of Gaussians (the role first, so posterior rules see the name
  ``member.{k}.<name>`` and merge component k with component k); early-exit networks use
  ``blocks.<l>.*``, ``heads.<l>.*``, ``gates.<l>.*``, and a client with a depth budget sends
  only the ones it holds. A name without such a prefix is a shared part, except
  ``MEMBER_WEIGHTS``: an ensemble's predictive weights ``(members,)``, which the swarm strategy
  sets (its consensus beliefs) and an ensemble learner carries; absent = uniform.

Element-wise aggregation (FedAvg) is meaningful for all of them: shared parts are averaged,
member k with member k.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

T = TypeVar("T")
ROUND_KEY = "fedens"  # a ConfigRecord the fedens grid adds to every message: {"round": r}
DELAY_KEY = "fedens.injected_delay_s"  # an injected straggler's simulated delay, in its reply's metrics
MEMBER_WEIGHTS = "member_weights"  # an ensemble's predictive weights (members,), summing to 1


class NpyArray(Array):
    """Flower's ``Array`` (the same ``.npy`` bytes, so any Flower code reads it as usual) with a
    fast ``numpy()``. Flower's ``Array.numpy()`` goes through ``np.load``, which parses the
    header with ``ast.literal_eval`` (~70 us per array); Flower's FedAvg calls it for every
    array of every reply. Here the header is skipped by its stored length and the data read
    with ``np.frombuffer`` (~5 us), using the array's own ``dtype`` and ``shape`` fields."""

    def numpy(self) -> np.ndarray:
        data = self.data
        if self.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
            return Array.numpy(self)
        start = 10 if data[6] == 1 else 12  # .npy format 1.0: 2-byte header length, 2.0/3.0: 4
        end = start + int.from_bytes(data[start - (2 if data[6] == 1 else 4) : start], "little")
        if b"'fortran_order': False" not in data[start:end]:
            return Array.numpy(self)
        return np.frombuffer(data, dtype=np.dtype(self.dtype), offset=end).reshape(self.shape).copy()

    def deflate(self) -> bytes:
        """Flower's serialised ``Array``: its header names the class, and a SuperLink or
        SuperNode (Flower's deployment engine) inflates only the classes Flower knows, so this
        one travels as the plain ``Array`` it is (same bytes, same object id)."""
        from flwr.supercore.inflatable.inflatable_object import HEAD_BODY_DIVIDER

        head, divider, body = Array.deflate(self).partition(HEAD_BODY_DIVIDER)
        return head.replace(type(self).__qualname__.encode(), Array.__qualname__.encode(), 1) + divider + body


def to_array(a: np.ndarray) -> NpyArray:
    """An array as Flower's ``.npy`` bytes (``np.save``'s, byte for byte) in an ``NpyArray``;
    at least 1-d and C-contiguous, as ``np.ascontiguousarray`` makes it."""
    a = np.ascontiguousarray(a)
    return NpyArray(str(a.dtype), tuple(a.shape), "numpy.ndarray", _npy_header(a.dtype.str, a.shape) + a.tobytes())


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` 1.0 header of a C-ordered array (the same few shapes travel every round)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays -> ``ArrayRecord`` (insertion order kept). Filled item by item: the
    ``ArrayRecord(dict)`` constructor copies every array into a plain ``Array``."""
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = to_array(v)
    return record


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> named arrays (writable copies; any Flower ``Array`` works)."""
    return {k: NpyArray.numpy(v) for k, v in record.items()}


def records_of(content: RecordDict, kind: type[T]) -> dict[str, T]:
    """The records of one kind in a message's content, by key. The same as Flower's
    ``content.array_records`` (and ``metric_records``, ...) without building the synced view
    that each of those properties makes, a cost paid on every message."""
    return {k: r for k, r in content.items() if isinstance(r, kind)}


def single_arrayrecord(content: RecordDict) -> ArrayRecord:
    """The one ArrayRecord of a message, whatever key the strategy stored it under."""
    records = list(records_of(content, ArrayRecord).values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, found {len(records)}")
    return records[0]


def record_nbytes(content: RecordDict) -> int:
    """Bytes of array data a message carries (the model payload; config and metrics, a few
    dozen bytes, are not counted)."""
    return sum(len(a.data) for rec in records_of(content, ArrayRecord).values() for a in rec.values())
