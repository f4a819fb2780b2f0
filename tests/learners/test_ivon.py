"""``ivon``: the exported posterior is IVON's own state, imports invert exports, the predictive
spread follows the precision, and training works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedens.checks import load_scenario
from fedens.data import load_client_data
from fedens.learners import build_learner
from fedens.learners.base import predict_dataset
from fedens.learners.ivon import PRESETS, IVONOptions, lr_factor
from fedens.metrics import ensemble_metrics
from fedens.seeding import seeded_generator


def make(seed: int = 0, **options):
    scn = load_scenario({"seed": 1, "data": {"num_clients": 3}, "model": {"kind": "mlp", "hidden": [32]},
                         "learner": {"kind": "ivon", "samples": 8, **options}, "train": {"local_epochs": 2}})
    torch.manual_seed(seed)
    return build_learner(scn, (1, 8, 8), 10, torch.device("cpu")), load_client_data(scn.data, scn.seed, 0)


def trained(**options):
    learner, data = make(**options)
    learner.fit(data.train, seeded_generator(0, 1, 0), 1)
    return learner, data


def precisions(arrays):
    return np.concatenate([v.ravel() for k, v in arrays.items() if k.startswith("precision.")])


def test_arrays_are_mean_and_precision_of_every_parameter():
    learner, _ = make()
    arrays = learner.get_arrays()
    names = [k for k, _ in learner.model.named_parameters()]
    assert sorted(arrays) == sorted([f"mean.{k}" for k in names] + [f"precision.{k}" for k in names])
    for k, p in learner.model.named_parameters():
        assert np.array_equal(arrays[f"mean.{k}"], p.detach().numpy())
        assert arrays[f"precision.{k}"].shape == tuple(p.shape) and arrays[f"precision.{k}"].dtype == np.float32


def test_exported_precision_is_ess_times_hess_plus_weight_decay():
    learner, data = trained(weight_decay=1e-3)
    group = learner.opt.param_groups[0]
    assert group["ess"] == len(data.train)  # ess=None: the client's number of training examples
    assert not torch.allclose(group["hess"], torch.full_like(group["hess"], learner.options.resolve().hess_init))  # learnt
    expected = (len(data.train) * (group["hess"] + 1e-3)).numpy()
    assert np.array_equal(precisions(learner.get_arrays()), expected)


def test_import_then_export_round_trips_the_precision_and_sets_hess():
    a, _ = trained()
    arrays = a.get_arrays()
    # A client with its own ess: hess = precision / ess - weight_decay (ivonwithprior._set_posterior).
    b, _ = make(seed=1, ess=500.0)
    b.set_arrays(arrays)
    hess = b.opt.param_groups[0]["hess"]
    assert torch.allclose(hess, torch.from_numpy(precisions(arrays)) / 500.0 - 1e-4, rtol=1e-5, atol=1e-7)
    assert np.allclose((500.0 * (hess + 1e-4)).numpy(), precisions(arrays), rtol=1e-5)  # what sampling uses
    assert np.array_equal(precisions(b.get_arrays()), precisions(arrays))
    for k, p in b.model.named_parameters():
        assert np.array_equal(p.detach().numpy(), arrays[f"mean.{k}"])


def test_import_clamps_hess_at_zero():
    a, _ = trained()
    arrays = {k: (v * 0 + 1e-3 if k.startswith("precision.") else v) for k, v in a.get_arrays().items()}
    b, _ = make(ess=100.0)  # 1e-3 / 100 - 1e-4 < 0
    b.set_arrays(arrays)
    assert torch.equal(b.opt.param_groups[0]["hess"], torch.zeros_like(b.opt.param_groups[0]["hess"]))
    assert np.allclose(precisions(b.get_arrays()), 100.0 * 1e-4)  # the prior precision, not less


def test_samples_differ_and_shrink_with_precision():
    a, data = trained()
    x = torch.from_numpy(data.val.x)
    y = torch.from_numpy(data.val.y)
    torch.manual_seed(0)
    probs = a.predict_proba(x)
    assert probs.shape == (8, len(x), 10)
    assert not torch.allclose(probs[0], probs[1])
    arrays = a.get_arrays()
    sharp = {k: v * 100 if k.startswith("precision.") else v for k, v in arrays.items()}
    server, _ = make(seed=3)  # a learner that never trains predicts from imported arrays
    spread = []
    for arr in (arrays, sharp):
        server.set_arrays(arr)
        torch.manual_seed(0)
        p = predict_dataset(server, data.val)
        spread.append((p.var(0).sum(-1).mean().item(), ensemble_metrics(p, y)["mutual_information"]))
    assert spread[1][0] < spread[0][0] / 5 and spread[1][1] < spread[0][1] / 5


def test_round_one_starts_from_hess_init_later_rounds_import(monkeypatch):
    a, data = trained()
    arrays = a.get_arrays()
    n = len(data.train)
    for server_round in (1, 2):
        b, _ = make(seed=1)
        b.set_arrays(arrays)
        seen = []
        build = b._optimizer
        monkeypatch.setattr(b, "_optimizer", lambda ess, hess=None, server_round=None: seen.append((ess, hess)) or build(ess, hess))
        b.fit(data.train, seeded_generator(0, server_round, 0), server_round)
        ess, hess = seen[0]
        assert ess == n
        if server_round == 1:  # the server's fresh placeholder is dropped: IVON starts at hess_init
            assert hess is None
        else:  # the global posterior carries over, rescaled to this client's ess
            assert torch.allclose(hess, (torch.from_numpy(precisions(arrays)) / n - 1e-4).clamp_min(0), rtol=1e-5, atol=1e-6)


def test_short_training_lowers_the_loss():
    learner, data = make()
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)

    def loss() -> float:
        torch.manual_seed(0)
        p = learner.predict_proba(x).mean(0)
        return float(-torch.log(p[torch.arange(len(y)), y]).mean())

    before = loss()
    losses = [learner.fit(data.train, seeded_generator(0, r, 0), r)["train_loss"] for r in (1, 2, 3)]
    assert loss() < before - 0.5 and losses[-1] < losses[0]


def test_weight_decay_must_be_positive():
    with pytest.raises(ValueError):
        make(weight_decay=0.0)


def test_presets_fill_what_is_not_given():
    # fedens: beta2 is the authors' (ivon-experiments CIFAR, momentum_hess=0.99999); bayes-admm's
    # configs/mnist_heterog/fedivon.yaml: learning_rate_local 0.02, h0_local 0.005, beta2_local 0.9998.
    plain = IVONOptions().resolve()
    assert (plain.preset, plain.lr, plain.hess_init, plain.beta2, plain.lr_schedule) == ("fedens", 0.5, 3.0, 0.99999, "constant")
    admm = IVONOptions(preset="bayes_admm").resolve()  # the IVON-ADMM authors' local IVON
    assert (admm.preset, admm.lr, admm.hess_init, admm.beta2, admm.lr_schedule) == ("bayes_admm", 0.02, 0.005, 0.9998, "cosine")
    mine = IVONOptions(preset="bayes_admm", hess_init=1.0).resolve()  # a given value wins over the preset
    assert (mine.lr, mine.hess_init, mine.beta2, mine.lr_schedule) == (0.02, 1.0, 0.9998, "cosine")
    assert IVONOptions(preset="bayes_admm", beta2=0.999).resolve().beta2 == 0.999
    assert set(PRESETS["fedens"]) == set(PRESETS["bayes_admm"])
    with pytest.raises(ValueError):
        IVONOptions(preset="cifar")


def test_cosine_factor_by_hand_and_as_torchs_cosine_annealing():
    # T = 4: (1 + cos(pi (r-1)/4)) / 2 = 1, (1 + 1/sqrt 2)/2, 1/2, (1 - 1/sqrt 2)/2, 0, and 0 after T.
    expected = [1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2, 0.0, 0.0]
    assert [lr_factor("cosine", r, 4) for r in range(1, 7)] == pytest.approx(expected, abs=1e-12)
    assert lr_factor("constant", 7, None) == 1.0
    # bayes-admm: CosineAnnealingLR(T_max=num_comm_rounds, eta_min=0), stepped once after each round
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.0)
    torch_lrs = []
    for _ in range(5):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert torch_lrs == pytest.approx(expected[:5], abs=1e-12)
    with pytest.raises(ValueError, match="schedule_rounds"):
        lr_factor("cosine", 1, None)


def test_cosine_schedule_sets_the_rounds_learning_rate_and_stops_the_mean_after_T():
    learner, data = make(lr_schedule="cosine", schedule_rounds=2, lr=0.4)
    learner.fit(data.train, seeded_generator(0, 2, 0), 2)
    assert learner.opt.param_groups[0]["lr"] == pytest.approx(0.4 * 0.5)  # (1 + cos(pi/2))/2
    before = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    learner.fit(data.train, seeded_generator(0, 3, 0), 3)  # r - 1 = T: factor 0, the mean stays
    assert learner.opt.param_groups[0]["lr"] == 0.0
    for k, p in learner.model.named_parameters():
        assert torch.equal(p.detach(), before[k])
    constant, data = make()
    constant.fit(data.train, seeded_generator(0, 9, 0), 9)
    assert constant.opt.param_groups[0]["lr"] == 0.5 and constant.opt.param_groups[0]["beta2"] == 0.99999


def test_cosine_without_rounds_outside_ivon_admm_is_refused():
    learner, data = make(lr_schedule="cosine")
    with pytest.raises(ValueError, match="schedule_rounds"):
        learner.fit(data.train, seeded_generator(0, 1, 0), 1)
