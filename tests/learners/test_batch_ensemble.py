"""BatchEnsemble: the vectorised forward is the ensemble of networks with W_i = W ⊙ (r_i s_iᵀ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners.batch_ensemble import BatchEnsembleLayer, BatchEnsembleLearner, BatchEnsembleOptions
from fedens.models import build_model
from fedens.scenario import TrainConfig

MODELS = {"mlp": {"hidden": [16, 8]}, "cnn": {"channels": [4, 8], "hidden": 16}, "cnn1d": {"channels": [4, 8]}}
SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "cnn1d": (1, 40)}
SHAPE = (1, 8, 8)


def make(kind: str, members: int = 3, **opts) -> BatchEnsembleLearner:
    torch.manual_seed(0)
    return BatchEnsembleLearner(lambda **o: build_model(kind, {**MODELS[kind], **o}, SHAPES[kind], 10),
                                BatchEnsembleOptions(members=members, **opts), TrainConfig(lr=0.1), torch.device("cpu"))


def toy_data(n: int = 64, shape: tuple[int, ...] = SHAPE) -> ArrayDataset:
    g = np.random.default_rng(0)
    return ArrayDataset(g.normal(size=(n, *shape)).astype(np.float32), g.integers(0, 10, n))


def explicit_member(learner: BatchEnsembleLearner, kind: str, i: int) -> nn.Sequential:
    """Member i as a plain network whose weights are W ⊙ (r_i s_iᵀ), built outside the layer."""
    plain = build_model(kind, MODELS[kind], SHAPES[kind], 10)
    with torch.no_grad():
        for name, layer in learner.net.named_children():
            if isinstance(layer, BatchEnsembleLayer):
                outer = torch.outer(layer.r[i], layer.s[i])  # (out, in)
                w_i = layer.weight * outer.view(*outer.shape, *([1] * (layer.weight.ndim - 2)))
                getattr(plain, name).weight.copy_(w_i)
                getattr(plain, name).bias.copy_(layer.bias[i])
    return plain.eval()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn1d"])
def test_vectorised_forward_equals_explicit_member_weights(kind: str):
    learner = make(kind)
    learner.fit(toy_data(shape=SHAPES[kind]), torch.Generator().manual_seed(0))  # move W, r, s, b away from their init
    x = torch.randn(5, *SHAPES[kind])
    learner.net.eval()
    logits = learner.logits(x)  # (M, B, classes)
    assert logits.shape == (3, 5, 10)
    for i in range(3):
        assert torch.allclose(logits[i], explicit_member(learner, kind, i)(x), atol=1e-5), i


@pytest.mark.parametrize("fast_init", ["normal", "sign"])
def test_members_differ(fast_init: str):
    probs = make("mlp", members=4, fast_init=fast_init).predict_proba(torch.randn(32, *SHAPE))
    for i in range(4):
        for j in range(i):
            assert (probs[i] - probs[j]).abs().max() > 1e-3, (i, j)


def test_sign_init_gives_plus_minus_one():
    layer = make("mlp", fast_init="sign").net[1]
    assert set(layer.r.unique().tolist()) == {-1.0, 1.0} and set(layer.s.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_parameter_count_is_shared_plus_rank_one_per_member(kind: str):
    members = 4
    learner = make(kind, members=members)
    plain = build_model(kind, MODELS[kind], SHAPE, 10)
    expected = sum(m.weight.numel() + members * (m.in_features + 2 * m.out_features) if isinstance(m, nn.Linear)
                   else m.weight.numel() + members * (m.in_channels + 2 * m.out_channels)
                   for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert sum(p.numel() for p in learner.net.parameters()) == expected


def test_export_names_shared_weight_plain_and_fast_weights_per_member():
    learner = make("mlp", members=3)
    arrays = learner.get_arrays()
    assert arrays["1.weight"].shape == (16, 64) and arrays["1.weight"].dtype == np.float32
    assert arrays["member.2.1.r"].shape == (16,) and arrays["member.2.1.s"].shape == (64,)
    assert arrays["member.0.5.bias"].shape == (10,)
    assert {k for k in arrays if not k.startswith("member.")} == {"1.weight", "3.weight", "5.weight"}
    assert np.array_equal(arrays["member.1.3.r"], learner.net[3].r[1].detach().numpy())
