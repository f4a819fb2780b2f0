"""low_precision: stochastic rounding is unbiased and lands on a grid of at most 2^bits levels;
members are fixed roundings of the weights (biases kept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedens.data import ArrayDataset
from fedens.learners.base import predict_dataset
from fedens.learners.low_precision import LowPrecisionLearner, LowPrecisionOptions, stochastic_round
from fedens.models import build_model
from fedens.scenario import TrainConfig

SHAPE = (1, 8, 8)


def make(**opts) -> LowPrecisionLearner:
    torch.manual_seed(0)
    return LowPrecisionLearner(lambda **o: build_model("mlp", {"hidden": [32], **o}, SHAPE, 10),
                               LowPrecisionOptions(**opts), TrainConfig(), torch.device("cpu"))


def test_mean_of_many_roundings_approaches_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, generator=g)
    n, bits = 20000, 3
    delta = float(w.max() - w.min()) / (2**bits - 1)
    mean = stochastic_round(w.expand(n, -1), bits, g).mean(0)  # n roundings at once (same grid)
    # each rounding has std <= delta/2, so the mean is within a few delta/(2 sqrt n) of w;
    # rounding to nearest would be off by up to delta/2 (about 70 times more)
    assert (mean - w).abs().max() < 5 * delta / (2 * n**0.5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_rounded_values_lie_on_the_grid(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 32, generator=g) * 0.3
    r = stochastic_round(w, bits, g)
    lo, hi = w.min(), w.max()
    delta = (hi - lo) / (2**bits - 1)
    steps = (r - lo) / delta
    assert r.shape == w.shape and r.dtype == w.dtype
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert steps.min() >= -1e-4 and steps.max() <= 2**bits - 1 + 1e-4
    assert len(torch.unique(r)) <= 2**bits
    assert ((r - w).abs() <= delta + 1e-6).all()  # a neighbour of w, never further


def test_constant_tensor_is_kept():
    w = torch.full((3, 3), 0.7)
    assert torch.equal(stochastic_round(w, 4), w)


def test_members_round_weights_keep_biases_and_stay_fixed_across_batches():
    learner = make(members=3, bits=2)
    state = learner.model.state_dict()
    members = learner.member_weights()
    assert len(members) == 3
    for name, t in state.items():
        if t.ndim == 1:
            assert all(torch.equal(m[name], t) for m in members), name
        else:
            assert all(len(torch.unique(m[name])) <= 4 for m in members), name
            assert not torch.equal(members[0][name], members[1][name])
    # predict_dataset calls predict_proba per chunk: one member is the same network on every chunk
    g = np.random.default_rng(0)
    ds = ArrayDataset(g.normal(size=(20, *SHAPE)).astype(np.float32), g.integers(0, 10, 20))
    whole = predict_dataset(learner, ds, batch_size=20)
    chunked = predict_dataset(learner, ds, batch_size=7)
    assert whole.shape == (3, 20, 10) and torch.allclose(whole, chunked, atol=1e-6)


def test_new_weights_draw_new_members():
    learner = make(members=2)
    first = learner.member_weights()
    learner.set_arrays(learner.get_arrays())
    assert learner.member_weights() is not first


def test_export_is_the_full_precision_network():
    learner = make()
    assert set(learner.get_arrays()) == set(learner.model.state_dict())


def test_bad_options_are_rejected():
    for bad in ({"bits": 0}, {"bits": 17}, {"members": 0}, {"round_bias": True}):
        with pytest.raises(ValidationError):
            LowPrecisionOptions(**bad)
