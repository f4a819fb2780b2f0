"""``partial_avg``: each tensor averaged over the clients that hold it (HeteroFL's rule), and
FedAvg exactly when every client holds everything. Also the base class's refusal of partial
replies for a strategy that aggregates whole models."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.strategies import STRATEGIES
from fedens.strategies.partial_avg import PartialAveraging
from fedens.strategies.vca import VarianceCorrectedAveraging

GLOBAL = {"a": np.array([0.0, 0.0], np.float32), "b": np.array([5.0], np.float32), "c": np.array([7.0], np.float32)}


def aggregate(strategy, replies: list[dict[str, np.ndarray]], sizes: list[float]) -> dict[str, np.ndarray]:
    """What ``aggregate_train`` computes from replies that hold different names (a Flower
    Message needs a running simulation; the end-to-end case is tests/e2e/test_early_exit_e2e.py)."""
    strategy.global_arrays = dict(GLOBAL)
    return strategy.aggregate_partial(1, replies, np.array(sizes, dtype=float))


def test_registered():
    assert STRATEGIES.get("partial_avg") is PartialAveraging


def test_each_tensor_is_averaged_over_its_holders():
    # client 0 (1 example) holds a and b, client 1 (3 examples) holds a only: a is (1*a0 + 3*a1)/4,
    # b is client 0's alone, c (nobody) keeps the global value.
    replies = [{"a": np.array([1.0, 2.0], np.float32), "b": np.array([9.0], np.float32)},
               {"a": np.array([5.0, 6.0], np.float32)}]
    out = aggregate(PartialAveraging(), replies, [1, 3])
    assert list(out) == ["a", "b", "c"]  # the global model's order
    np.testing.assert_allclose(out["a"], [4.0, 5.0])
    np.testing.assert_allclose(out["b"], [9.0])
    np.testing.assert_allclose(out["c"], [7.0])


def test_full_replies_are_fedavg():
    rng = np.random.default_rng(0)
    models = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)]
    sizes = [10, 30, 60]
    ours = aggregate(PartialAveraging(), models, sizes)
    by_hand = {k: (10 * models[0][k] + 30 * models[1][k] + 60 * models[2][k]) / 100 for k in GLOBAL}
    for k in GLOBAL:
        np.testing.assert_allclose(ours[k], by_hand[k], rtol=1e-6)
    assert PartialAveraging().aggregate_arrays(1, models, np.array(sizes) / 100).keys() == GLOBAL.keys()


def test_a_whole_model_strategy_refuses_partial_replies():
    replies = [{"a": np.ones(2, np.float32)}, {"b": np.ones(1, np.float32)}]
    with pytest.raises(ValueError, match="partial models"):
        aggregate(VarianceCorrectedAveraging(), replies, [1, 1])


def test_replies_that_all_hold_the_same_part_are_partial():
    # an integer depth budget: every client sends a and b only; c must keep its global value
    s = PartialAveraging()
    s.global_arrays, s.model_names = dict(GLOBAL), set(GLOBAL)
    replies = [{"a": np.ones(2, np.float32), "b": np.ones(1, np.float32)}] * 2
    assert s.is_partial(replies)
    assert not s.is_partial([dict(GLOBAL), dict(GLOBAL)])
    assert not s.is_partial([{**GLOBAL, "extra": np.ones(1)}] * 2)  # a client-side term's extra arrays
    whole = VarianceCorrectedAveraging()  # a whole-model strategy: only differing replies are partial
    whole.global_arrays, whole.model_names = dict(GLOBAL), set(GLOBAL)
    assert not whole.is_partial(replies) and whole.is_partial([replies[0], dict(GLOBAL)])
    out = s.aggregate_partial(1, replies, np.array([1.0, 1.0]))
    np.testing.assert_allclose(out["c"], GLOBAL["c"])
    zero = s.aggregate_partial(1, [{"a": np.ones(2, np.float32)}, dict(GLOBAL)], np.array([0.0, 2.0]))
    np.testing.assert_allclose(zero["a"], GLOBAL["a"])  # only the other (full) client's a counts
