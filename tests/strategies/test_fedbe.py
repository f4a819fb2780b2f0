"""FedBE's server math: the Gaussian fit and its samples, the pseudo-labels, the distillation,
and the server-side round, by hand and without Ray."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners.base import NoOptions, module_arrays
from fedens.learners.single import SingleLearner
from fedens.scenario import TrainConfig
from fedens.strategies import STRATEGIES, build_strategy
from fedens.strategies.base import ServerContext
from fedens.strategies.fedbe import FedBE, distill, fit_gaussian, sample_models, sharpen, teacher_probabilities

CPU = torch.device("cpu")


def linear_learner(seed: int = 0, d: int = 4, c: int = 3) -> SingleLearner:
    torch.manual_seed(seed)
    return SingleLearner(lambda: nn.Linear(d, c), NoOptions(), TrainConfig(), CPU)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of KL(p ‖ q)."""
    return float((p * (p.log() - q.log())).sum(-1).mean())


def test_fit_gaussian_by_hand_on_three_clients():
    a = {"w": np.array([1.0, 0.0]), "b": np.array([[2.0]])}
    b = {"w": np.array([3.0, 0.0]), "b": np.array([[2.0]])}
    c = {"w": np.array([5.0, 6.0]), "b": np.array([[-1.0]])}
    mean, var = fit_gaussian([a, b, c], np.array([5.0, 3.0, 2.0]))  # normalised to 0.5 / 0.3 / 0.2
    # w[0]: mu = 0.5 + 0.9 + 1.0 = 2.4; var = 0.5*1.96 + 0.3*0.36 + 0.2*6.76 = 2.44
    # w[1]: mu = 1.2; var = 0.5*1.44 + 0.3*1.44 + 0.2*23.04 = 5.76
    # b: mu = 1 + 0.6 - 0.2 = 1.4; var = 0.8*0.36 + 0.2*5.76 = 1.44
    assert np.allclose(mean["w"], [2.4, 1.2]) and np.allclose(var["w"], [2.44, 5.76])
    assert np.allclose(mean["b"], [[1.4]]) and np.allclose(var["b"], [[1.44]])
    # two equal clients: the biased (population) variance ((x1 - x2) / 2)^2
    _, v2 = fit_gaussian([{"w": np.array([1.0])}, {"w": np.array([3.0])}], np.array([0.5, 0.5]))
    assert np.allclose(v2["w"], [1.0])


def test_fit_gaussian_keeps_dtypes_and_rejects_bad_weights():
    arrays = [{"w": np.ones(3, np.float32), "n": np.array(4, np.int64)}, {"w": np.zeros(3, np.float32), "n": np.array(4, np.int64)}]
    mean, var = fit_gaussian(arrays, np.array([0.5, 0.5]))
    assert mean["w"].dtype == np.float32 and var["w"].dtype == np.float32 and mean["n"].dtype == np.int64
    samples = sample_models(mean, var, 0.1, 2, np.random.default_rng(0))
    assert all(s["w"].dtype == np.float32 and s["n"] == 4 and s["n"].dtype == np.int64 for s in samples)
    with pytest.raises(ValueError):
        fit_gaussian(arrays, np.array([1.0]))


def test_samples_have_the_fitted_mean_and_scaled_variance():
    rng = np.random.default_rng(1)
    clients = [{"w": rng.normal(size=(2, 3)), "b": rng.normal(size=(3,))} for _ in range(3)]
    mean, var = fit_gaussian(clients, np.array([0.2, 0.3, 0.5]))
    n, scale = 20000, 0.1
    samples = sample_models(mean, var, scale, n, np.random.default_rng(2))
    assert len(samples) == n
    for name in ("w", "b"):
        stack = np.stack([s[name] for s in samples])
        target = scale * var[name]
        assert np.all(np.abs(stack.mean(0) - mean[name]) < 5 * np.sqrt(target / n))
        assert np.allclose(stack.var(0), target, rtol=0.06)
    # the same generator seed gives the same samples; var_scale 0 gives the mean itself
    again = sample_models(mean, var, scale, 3, np.random.default_rng(2))
    assert all(np.array_equal(x["w"], y["w"]) for x, y in zip(again, samples[:3]))
    assert all(np.array_equal(s["w"], mean["w"]) for s in sample_models(mean, var, 0.0, 2, np.random.default_rng(3)))


def test_pseudo_labels_are_the_average_of_the_teachers_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    data = ArrayDataset(x, np.full(5, -1, np.int64))  # labels are never read
    teachers = [{"weight": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)} for _ in range(3)]

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    by_hand = np.mean([softmax(x @ t["weight"].T + t["bias"]) for t in teachers], axis=0)
    got = teacher_probabilities(linear_learner(), teachers, data, batch_size=2)
    assert got.shape == (5, 3)
    assert np.allclose(got.numpy(), by_hand, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(5))


def test_sharpen_is_fedbe_temp_sharpen():
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    assert torch.allclose(sharpen(p, 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]]))
    assert torch.allclose(sharpen(p, 1.0), p)
    with pytest.raises(ValueError):
        sharpen(p, 0.0)


def test_distillation_moves_the_student_toward_the_teacher():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    data = ArrayDataset(x, np.full(200, -1, np.int64))
    teacher = linear_learner(seed=1)
    with torch.no_grad():
        teacher.model.weight.mul_(3)
    targets = teacher.predict_proba(torch.from_numpy(x))[0]
    student = linear_learner(seed=2)
    before = kl(targets, student.predict_proba(torch.from_numpy(x))[0])
    swa, losses = distill(student, targets, data, epochs=10, lr=0.1, batch_size=32, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert set(swa) == set(module_arrays(student.model)) and all(v.dtype == np.float32 for v in swa.values())
    student.set_arrays(swa)
    after = kl(targets, student.predict_proba(torch.from_numpy(x))[0])
    assert after < 0.5 * before, (before, after)


def test_swa_is_the_mean_of_the_epoch_ends():
    """With one epoch the SWA model is the trained model; with lr ~ 0 it stays the start point."""
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    data = ArrayDataset(x, np.zeros(16, np.int64))
    targets = torch.full((16, 3), 1 / 3)
    one = linear_learner(seed=3)
    swa, _ = distill(one, targets, data, epochs=1, lr=0.5, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert all(np.allclose(swa[k], v) for k, v in module_arrays(one.model).items())
    still = linear_learner(seed=3)
    start = module_arrays(still.model)
    swa, _ = distill(still, targets, data, epochs=3, lr=1e-12, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert all(np.allclose(swa[k], v) for k, v in start.items())


def context(public: ArrayDataset, seed: int = 0) -> ServerContext:
    return ServerContext(scenario=None, data=SimpleNamespace(public=public), new_learner=linear_learner, seed=seed)


def test_bind_with_an_empty_public_split_raises():
    empty = ArrayDataset(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"set data\.server_fraction > 0"):
        FedBE().bind(context(empty))
    assert FedBE.check_scenario(SimpleNamespace(data=SimpleNamespace(server_fraction=0.0))) is not None
    assert FedBE.check_scenario(SimpleNamespace(data=SimpleNamespace(server_fraction=0.1))) is None


def test_registered_with_defaults_and_checked_params():
    assert STRATEGIES.get("fedbe") is FedBE and FedBE.supported_learners == ("single",)
    s = build_strategy(FedBE, {"fraction_train": 1.0, "min_available_nodes": 3}, {"distill_epochs": 2})
    o = s.options
    assert (o.num_samples, o.var_scale, o.temperature, o.distill_epochs, o.distill_lr) == (10, 0.1, 0.5, 2, 0.01)
    assert FedBE().options.distill_epochs == 20
    with pytest.raises(ValueError, match="var_scale"):
        FedBE(var_scale=-1)


def test_server_round_is_deterministic_and_distils_toward_the_ensemble():
    rng = np.random.default_rng(0)
    public = ArrayDataset(rng.normal(size=(64, 4)).astype(np.float32), np.zeros(64, np.int64))
    clients = [module_arrays(linear_learner(seed=s).model) for s in range(3)]
    weights = np.array([0.5, 0.25, 0.25])

    def round_once() -> tuple[FedBE, dict]:
        s = FedBE(num_samples=4, distill_epochs=5, distill_batch_size=16)
        s.bind(context(public, seed=7))
        return s, s.aggregate_arrays(1, clients, weights)

    s, new = round_once()
    _, again = round_once()
    assert set(new) == set(clients[0]) and all(new[k].dtype == np.float32 for k in new)
    assert all(np.array_equal(new[k], again[k]) for k in new)
    assert len(s.last_distill_losses) == 5 and s.last_distill_losses[-1] < s.last_distill_losses[0]
    fedavg = {k: sum(w * c[k] for c, w in zip(clients, weights)) for k in clients[0]}
    assert not all(np.allclose(new[k], fedavg[k]) for k in new)  # distillation moved it
