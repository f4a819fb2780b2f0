"""mc_dropout: dropout stays on at prediction (samples differ), p=0 gives identical samples."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fedens.learners.mc_dropout import MCDropoutLearner, MCDropoutOptions
from fedens.models import build_model
from fedens.scenario import TrainConfig

SHAPE = (1, 8, 8)


def make(model: str = "mlp", **opts) -> MCDropoutLearner:
    model_opts = {"hidden": [32]} if model == "mlp" else {"channels": [4, 8], "hidden": 16}
    torch.manual_seed(0)
    return MCDropoutLearner(lambda **o: build_model(model, {**model_opts, **o}, SHAPE, 10), MCDropoutOptions(**opts),
                            TrainConfig(), torch.device("cpu"))


def test_the_model_is_built_with_dropout_p():
    learner = make(p=0.3)
    drops = [m for m in learner.model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_samples_shape_and_dropout_on_at_prediction(model):
    learner = make(model, p=0.5, samples=6)
    x = torch.randn(5, *SHAPE)
    probs = learner.predict_proba(x)
    assert probs.shape == (6, 5, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(6, 5), atol=1e-6)
    assert not torch.allclose(probs[0], probs[1])  # different masks per sample
    assert not torch.allclose(learner.predict_proba(x), probs)  # and per call
    learner.model.eval()  # the deterministic network is none of the samples
    plain = torch.softmax(learner.model(x), -1)
    assert not any(torch.allclose(plain, p) for p in probs)


def test_p_zero_gives_identical_samples_equal_to_eval():
    learner = make(p=0.0, samples=4)
    x = torch.randn(5, *SHAPE)
    probs = learner.predict_proba(x)
    learner.model.eval()
    assert torch.equal(probs, torch.softmax(learner.model(x), -1).expand(4, 5, 10))


def test_predictions_are_reproducible_under_the_global_seed():
    learner = make(p=0.5, samples=3)
    x = torch.randn(5, *SHAPE)
    torch.manual_seed(1)
    a = learner.predict_proba(x)
    torch.manual_seed(1)
    assert torch.equal(a, learner.predict_proba(x))


def test_bad_options_are_rejected():
    for bad in ({"p": 1.0}, {"p": -0.1}, {"samples": 0}, {"dropout": 0.1}):
        with pytest.raises(ValidationError):
            MCDropoutOptions(**bad)
