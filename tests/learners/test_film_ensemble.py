"""FiLM-Ensemble: member i is γ_i · normalise_i(x) + β_i after every hidden layer, with its own
statistics; members differ only through the init of γ, β."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedens.data import ArrayDataset
from fedens.learners.film_ensemble import FiLMEnsembleLearner, FiLMEnsembleOptions, FiLMNorm
from fedens.models import build_model
from fedens.scenario import TrainConfig

SHAPE = (1, 8, 8)
EPS = 1e-5


def make(members: int = 3, hidden: list[int] | None = None, **opts) -> FiLMEnsembleLearner:
    torch.manual_seed(0)
    return FiLMEnsembleLearner(lambda **o: build_model("mlp", {"hidden": hidden or [16, 8], **o}, SHAPE, 10),
                               FiLMEnsembleOptions(members=members, **opts), TrainConfig(lr=0.1), torch.device("cpu"))


def toy_data(n: int = 64) -> ArrayDataset:
    g = np.random.default_rng(0)
    return ArrayDataset(g.normal(size=(n, *SHAPE)).astype(np.float32), g.integers(0, 10, n))


@pytest.mark.parametrize("spatial", [(), (3, 3)])
def test_norm_layer_is_per_member_batch_norm(spatial: tuple[int, ...]):
    m, b, c = 3, 6, 5
    torch.manual_seed(0)
    norm = FiLMNorm(m, c, gain=1.0, init="bernoulli", momentum=0.1, eps=EPS)
    # Member slices with different statistics, so mixing members up would show.
    per = (m, 1, 1, *[1] * len(spatial))
    x = torch.randn(m, b, c, *spatial) * torch.arange(1, m + 1).view(per) + 3 * torch.arange(m).view(per)
    dims = (0, *range(2, 2 + len(spatial)))  # batch and spatial axes of one member's slice (B, C, *S)
    ch = lambda t: t.view(1, c, *[1] * len(spatial))  # noqa: E731  (C,) against (B, C, *S)
    y = norm(x.flatten(0, 1)).view_as(x)
    for i in range(m):
        mean, var = x[i].mean(dims), x[i].var(dims, unbiased=False)
        expected = ch(norm.gamma[i]) * (x[i] - ch(mean)) / torch.sqrt(ch(var) + EPS) + ch(norm.beta[i])
        assert torch.allclose(y[i], expected, atol=1e-5), i
        n = x[i].numel() // c
        assert torch.allclose(norm.running_mean[i], 0.1 * mean, atol=1e-5)
        assert torch.allclose(norm.running_var[i], 0.9 + 0.1 * var * n / (n - 1), atol=1e-5)
    norm.eval()  # evaluation: each member's running statistics
    y = norm(x.flatten(0, 1)).view_as(x)
    for i in range(m):
        rm, rv = ch(norm.running_mean[i]), ch(norm.running_var[i])
        assert torch.allclose(y[i], ch(norm.gamma[i]) * (x[i] - rm) / torch.sqrt(rv + EPS) + ch(norm.beta[i]), atol=1e-5)


def test_single_example_batch_uses_running_statistics():
    norm = FiLMNorm(2, 4, gain=1.0, init="bernoulli", momentum=0.1, eps=EPS)
    x = torch.randn(2, 4)  # one example per member
    y = norm(x)
    assert torch.allclose(y, norm.gamma * x / np.sqrt(1 + EPS) + norm.beta, atol=1e-6)
    assert torch.equal(norm.running_mean, torch.zeros(2, 4)) and torch.equal(norm.running_var, torch.ones(2, 4))


def test_member_output_equals_explicit_film_network():
    learner = make(members=3, hidden=[16])
    learner.fit(toy_data(), torch.Generator().manual_seed(0))  # non-trivial weights and running statistics
    net = learner.net  # 0 Flatten, 1 Linear, 1_film, 2 ReLU, 3 Linear
    x = torch.randn(7, *SHAPE)
    net.eval()
    logits = learner.logits(x)
    first, film, out = (net.get_submodule(n) for n in ("1", "1_film", "3"))  # by name: positions shifted
    h = F.linear(x.flatten(1), first.weight, first.bias)
    for i in range(3):
        z = film.gamma[i] * (h - film.running_mean[i]) / torch.sqrt(film.running_var[i] + EPS) + film.beta[i]
        assert torch.allclose(logits[i], F.linear(torch.relu(z), out.weight, out.bias), atol=1e-5), i


def test_norm_inserted_after_every_hidden_layer_only():
    names = [n for n, _ in make(hidden=[16, 8]).net.named_children()]
    assert names == ["0", "1", "1_film", "2", "3", "3_film", "4", "5"]


@pytest.mark.parametrize("init", ["bernoulli", "xavier"])
def test_members_differ_at_init_because_of_gamma_beta(init: str):
    learner = make(members=4, init=init)
    x = torch.randn(32, *SHAPE)
    probs = learner.predict_proba(x)
    for i in range(4):
        for j in range(i):
            assert (probs[i] - probs[j]).abs().max() > 1e-3, (i, j)
    with torch.no_grad():  # give every member member 0's γ, β: the members become one network
        for norm in (m for m in learner.net.modules() if isinstance(m, FiLMNorm)):
            norm.gamma.copy_(norm.gamma[:1].expand_as(norm.gamma))
            norm.beta.copy_(norm.beta[:1].expand_as(norm.beta))
    probs = learner.predict_proba(x)
    assert torch.allclose(probs, probs[:1].expand_as(probs), atol=1e-6)


def test_init_scales():
    film = make(members=4, hidden=[128], init="xavier", gain=2.0).net.get_submodule("1_film")
    bound = 2.0 * np.sqrt(6 / (4 + 128))
    assert film.gamma.abs().max() <= bound and film.gamma.abs().max() > 0.8 * bound
    film = make(members=4, init="bernoulli", gain=0.5).net.get_submodule("1_film")
    assert set(film.beta.unique().tolist()) == {-0.5, 0.5}


def test_running_statistics_are_per_member_and_exported_per_member():
    learner = make(members=3, hidden=[16, 8])
    learner.fit(toy_data(), torch.Generator().manual_seed(0))
    second = learner.net.get_submodule("3_film")  # its inputs differ across members (first γ, β)
    assert second.running_mean.shape == (3, 8)
    for i in range(3):
        for j in range(i):
            assert (second.running_mean[i] - second.running_mean[j]).abs().max() > 1e-3
            assert (second.running_var[i] - second.running_var[j]).abs().max() > 1e-3
    arrays = learner.get_arrays()
    for k in range(3):
        assert np.array_equal(arrays[f"member.{k}.3_film.running_var"], second.running_var[k].numpy())
        assert arrays[f"member.{k}.1_film.gamma"].shape == (16,)
    assert {k for k in arrays if not k.startswith("member.")} == {f"{i}.{t}" for i in (1, 3, 5) for t in ("weight", "bias")}


def test_cnn_members_run_and_differ():
    torch.manual_seed(0)
    learner = FiLMEnsembleLearner(lambda **o: build_model("cnn", {"channels": [4, 8], "hidden": 16, **o}, SHAPE, 10),
                                  FiLMEnsembleOptions(members=2), TrainConfig(lr=0.1), torch.device("cpu"))
    assert [n for n, _ in learner.net.named_children() if n.endswith("_film")] == ["0_film", "3_film", "7_film"]
    learner.fit(toy_data(), torch.Generator().manual_seed(0))
    probs = learner.predict_proba(torch.randn(5, *SHAPE))
    assert probs.shape == (2, 5, 10) and (probs[0] - probs[1]).abs().max() > 1e-3
