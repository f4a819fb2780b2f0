"""The payload's arrays: Flower's .npy bytes exactly, read back faster."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from flwr.app import Array

from fedens.payload import NpyArray, from_record, to_array, to_record

RNG = np.random.default_rng(0)
CASES = [
    RNG.random((128, 64)).astype(np.float32),
    np.arange(5),
    np.array(3.0),  # 0-d: stored 1-d, as np.ascontiguousarray makes it
    np.zeros((0, 3), np.float32),
    RNG.random((3, 4)).T,  # not C-contiguous
    np.array([True, False]),
    RNG.random((2, 3, 4, 5)).astype(np.float16),
]


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_bytes_are_flowers_and_read_back_equal(a: np.ndarray):
    ref = Array(np.ascontiguousarray(a))
    mine = to_array(a)
    assert isinstance(mine, Array)
    assert mine.data == ref.data and mine.dtype == ref.dtype and tuple(mine.shape) == tuple(ref.shape)
    back = mine.numpy()
    assert back.dtype == ref.numpy().dtype and np.array_equal(back, ref.numpy()) and back.flags.writeable
    assert np.array_equal(NpyArray.numpy(ref), ref.numpy())  # any Flower Array reads the same way
    again = pickle.loads(pickle.dumps(mine))  # how Ray ships it
    assert type(again) is NpyArray and np.array_equal(again.numpy(), back)


def test_fortran_order_falls_back_to_numpy_load():
    f = Array(np.asfortranarray(RNG.random((3, 4))))
    assert np.array_equal(NpyArray.numpy(f), f.numpy())


def test_record_round_trip_keeps_order_and_values():
    arrays = {"b": np.ones(3, np.float32), "a": np.arange(6).reshape(2, 3)}
    back = from_record(to_record(arrays))
    assert list(back) == ["b", "a"] and all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_records_keep_the_fast_arrays_through_pickling():
    """Flower's FedAvg calls ``Array.numpy()`` on every reply: the replies must carry NpyArray
    after Ray pickles them (the ArrayRecord(dict) constructor would make plain Arrays)."""
    record = pickle.loads(pickle.dumps(to_record({"w": np.ones((2, 2), np.float32)})))
    assert type(record["w"]) is NpyArray
