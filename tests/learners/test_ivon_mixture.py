"""``ivon_mixture`` (Natural Variational Annealing): the temperature schedule, the
responsibilities and the coupling gradient against autograd, the weights' step, that one
component is the ``ivon`` learner exactly, the payload names, and that a posterior strategy
merges component k with component k."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedens.checks import load_scenario
from fedens.data import load_client_data
from fedens.learners import build_learner
from fedens.learners.ivon_mixture import (
    IVONMixtureOptions,
    coupling_gradient,
    gaussian_entropy,
    log_gaussians,
    responsibilities,
    temperature_at,
)
from fedens.payload import MEMBER_WEIGHTS
from fedens.seeding import seeded_generator
from fedens.strategies.posterior_avg import PosteriorAveraging


def make(kind: str = "ivon_mixture", seed: int = 0, **options):
    scn = load_scenario({"seed": 1, "data": {"num_clients": 3}, "model": {"kind": "mlp", "hidden": [16]},
                         "learner": {"kind": kind, "samples": 4, **options}, "train": {"local_epochs": 1}})
    torch.manual_seed(seed)
    return build_learner(scn, (1, 8, 8), 10, torch.device("cpu")), load_client_data(scn.data, scn.seed, 0)


def test_temperature_falls_geometrically_to_one():
    o = IVONMixtureOptions(temperature=4.0, anneal_rounds=2)
    assert [temperature_at(o, r) for r in (1, 2, 3, 4)] == [4.0, 2.0, 1.0, 1.0]
    assert temperature_at(IVONMixtureOptions(temperature=4.0, anneal_rounds=0), 1) == 1.0


def test_responsibilities_and_coupling_by_hand_and_by_autograd():
    # 1-D, components at 0 and 2 with unit precision and equal weights: at θ = 1 each has r = 1/2,
    # and ∇ log r_0 = −(1 − 0) + (½·(1 − 0) + ½·(1 − 2)) = −1.
    means, precs, log_pi = torch.tensor([[0.0], [2.0]]), torch.ones(2, 1), torch.log(torch.tensor([0.5, 0.5]))
    theta = torch.tensor([1.0])
    assert torch.allclose(responsibilities(theta, means, precs, log_pi), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert float(coupling_gradient(theta, 0, means, precs, log_pi)) == pytest.approx(-1.0)
    assert float(log_gaussians(theta, means, precs)[0]) == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi))
    # random 5-D case against autograd of log r_k = log π_k + log q_k − log Σ_j π_j q_j
    g = torch.Generator().manual_seed(0)
    means, precs = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5
    log_pi = torch.log_softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    for k in range(3):
        log_q = log_gaussians(theta, means, precs)
        log_r = log_pi[k] + log_q[k] - torch.logsumexp(log_pi + log_q, 0)
        (grad,) = torch.autograd.grad(log_r, theta)
        assert torch.allclose(coupling_gradient(theta.detach(), k, means, precs, log_pi), grad)


def test_coupling_vanishes_between_separated_components():
    means, precs = torch.tensor([[0.0, 0.0], [50.0, 50.0]]), torch.ones(2, 2)
    grad = coupling_gradient(torch.tensor([0.3, -0.2]), 0, means, precs, torch.log(torch.tensor([0.5, 0.5])))
    assert torch.allclose(grad, torch.zeros(2), atol=1e-12)


def test_gaussian_entropy():
    assert gaussian_entropy(torch.tensor([1.0, 4.0])) == pytest.approx(math.log(2 * math.pi * math.e) - 0.5 * math.log(4))


def test_one_component_at_temperature_one_is_the_ivon_learner():
    mix, data = make(components=1, temperature=1.0, anneal_rounds=0)
    ivon, _ = make("ivon")
    for learner in (mix, ivon):
        torch.manual_seed(7)
        learner.fit(data.train, seeded_generator(0, 1, 0), 1)
        torch.manual_seed(7)
        learner.fit(data.train, seeded_generator(0, 2, 0), 2)
    a, b = mix.get_arrays(), ivon.get_arrays()
    assert a.pop(MEMBER_WEIGHTS).tolist() == [1.0]
    assert sorted(a) == sorted(k.replace("mean.", "mean.member.0.").replace("precision.", "precision.member.0.") for k in b)
    for k, v in b.items():
        assert np.array_equal(a[k.replace("mean.", "mean.member.0.").replace("precision.", "precision.member.0.")], v), k


def test_annealing_tempers_the_sample_size():
    mix, data = make(components=2, temperature=4.0, anneal_rounds=2)
    mix.fit(data.train, seeded_generator(0, 1, 0), 1)
    assert all(c.opt.param_groups[0]["ess"] == pytest.approx(len(data.train) / 4) for c in mix.components)
    mix.fit(data.train, seeded_generator(0, 3, 0), 3)
    assert all(c.opt.param_groups[0]["ess"] == pytest.approx(len(data.train)) for c in mix.components)


def test_the_weights_move_to_the_component_that_fits_better():
    mix, data = make(components=2, temperature=1.0, anneal_rounds=0, weight_lr=1.0, coupling=False)
    trained = mix.components[0]
    trained.fit(data.train, seeded_generator(0, 1, 0), 1)  # only component 0 learns
    precision = trained.precision.clone()
    mix.components[1].opt.param_groups[0]["hess"] = trained.opt.param_groups[0]["hess"].clone()  # equal entropies
    mix.components[1].opt.param_groups[0]["ess"] = trained.opt.param_groups[0]["ess"]
    assert torch.equal(mix.components[1].precision, precision)
    mix._update_weights(data.train, float(len(data.train)))
    assert mix.pi[0] > 0.99  # e^{-N (loss gap)}: the untrained component keeps almost nothing


def test_payload_round_trip_and_names():
    mix, data = make(components=2)
    mix.fit(data.train, seeded_generator(0, 1, 0), 1)
    arrays = mix.get_arrays()
    assert {k.split(".")[0] for k in arrays} == {"mean", "precision", MEMBER_WEIGHTS}
    assert {k.split(".")[2] for k in arrays if k != MEMBER_WEIGHTS} == {"0", "1"}
    other, _ = make(components=2, seed=1)
    other.set_arrays(arrays)
    again = other.get_arrays()
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert torch.allclose(other.predictive_weights.sum(), torch.tensor(1.0))


def test_posterior_averaging_merges_component_k_with_component_k():
    a, data = make(components=2)
    b, _ = make(components=2, seed=1)
    a.fit(data.train, seeded_generator(0, 1, 0), 1)
    b.fit(data.train, seeded_generator(0, 1, 1), 1)
    arrays = [a.get_arrays(), b.get_arrays()]
    merged = PosteriorAveraging().aggregate_arrays(1, arrays, np.array([0.25, 0.75]))
    for k in (0, 1):
        name = next(n for n in arrays[0] if n.startswith(f"mean.member.{k}."))
        prec = name.replace("mean.", "precision.", 1)
        s = [x[prec].astype(np.float64) for x in arrays]
        expected = (0.25 * s[0] * arrays[0][name] + 0.75 * s[1] * arrays[1][name]) / (0.25 * s[0] + 0.75 * s[1])
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5)
    np.testing.assert_allclose(merged[MEMBER_WEIGHTS], 0.25 * arrays[0][MEMBER_WEIGHTS] + 0.75 * arrays[1][MEMBER_WEIGHTS], rtol=1e-6)


def test_independent_components_are_ivon_learners_averaged_uniformly():
    from fedens.learners.ivon_mixture import component_seeds
    from fedens.seeding import seed_torch

    K = 3
    mix, data = make(components=K, independent=True)  # the defaults' coupling, annealing, weight steps: unused
    assert mix.options.coupling and mix.options.temperature == 2.0 and mix.options.weight_lr > 0
    start = mix.get_arrays()
    start[MEMBER_WEIGHTS] = np.array([0.5, 0.3, 0.2], np.float32)  # what a strategy sent: ignored
    mix.set_arrays(start)
    singles = []
    for k in range(K):  # component k's initial posterior in a single ivon learner
        single, _ = make("ivon", seed=10 + k)
        single.set_arrays({n.replace(f"member.{k}.", "", 1): v for n, v in start.items() if f"member.{k}." in n})
        singles.append(single)
    for r in (1, 2):  # round 1 starts at hess_init (ess = N), round 2 from the imported precision
        seeds = component_seeds(seeded_generator(0, r, 0), K)
        assert len(set(seeds)) == K
        torch.manual_seed(123)
        out = mix.fit(data.train, seeded_generator(0, r, 0), r)
        assert out["temperature"] == 1.0 and [out[f"weight{k}"] for k in range(K)] == pytest.approx([1 / K] * K)
        for single, seed in zip(singles, seeds):
            seed_torch(seed)
            single.fit(data.train, torch.Generator().manual_seed(seed), r)
        assert all(c.opt.param_groups[0]["ess"] == len(data.train) for c in mix.components)  # the full sample size
    arrays = mix.get_arrays()
    for k, single in enumerate(singles):
        for n, v in single.get_arrays().items():
            name = n.replace("mean.", f"mean.member.{k}.").replace("precision.", f"precision.member.{k}.")
            np.testing.assert_allclose(arrays[name], v, rtol=1e-6, atol=1e-6, err_msg=name)
    # the components differ (own initialisation, data order and noise); the predictive is the uniform average
    first = next(n for n in arrays if n.startswith("mean.member.0."))
    assert not np.array_equal(arrays[first], arrays[first.replace("member.0.", "member.1.")])
    assert torch.equal(mix.predictive_weights, torch.full((K * 4,), 1 / (K * 4)))
    x = torch.from_numpy(data.train.x[:16])
    torch.manual_seed(5)
    draws = mix.predict_proba(x)  # (K * samples, batch, classes)
    torch.manual_seed(5)
    each = [single.predict_proba(x) for single in singles]  # the same draws, component by component
    assert draws.shape[0] == K * 4
    torch.testing.assert_close((mix.predictive_weights[:, None, None] * draws).sum(0),
                               torch.stack([p.mean(0) for p in each]).mean(0), rtol=1e-5, atol=1e-6)
    assert arrays[MEMBER_WEIGHTS].tolist() == pytest.approx([1 / K] * K)


def test_independent_scenario_loads():
    scn = load_scenario({"data": {"num_clients": 2}, "model": {"kind": "mlp", "hidden": [8]},
                         "learner": {"kind": "ivon_mixture", "components": 2, "independent": True},
                         "strategy": {"name": "posterior_avg"}})
    assert scn.learner.options["independent"] is True
