"""Client-side objective terms and the FedProx / FedDyn server math, with numbers by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedens.objectives import Dyn, Prox, objective_from_config
from strategies.feddyn import feddyn_server_step

CPU = torch.device("cpu")


def test_prox_is_the_squared_norm_of_the_paper():
    wg = {"w": np.array([1.0, 2.0], np.float32)}
    obj = Prox({"mu": 0.5}, {}, wg, CPU)
    w = torch.tensor([2.0, 0.0], requires_grad=True)
    pen = obj.penalty({"w": w})
    assert float(pen) == pytest.approx(0.25 * (1 + 4))  # (mu/2) * ||(1, -2)||^2
    pen.backward()
    assert torch.allclose(w.grad, torch.tensor([0.5, -1.0]))  # mu * (w - wg)


def test_dyn_penalty_and_state_update_by_hand():
    wg = {"w": np.array([1.0, 1.0], np.float32)}
    state = {"grad.w": np.array([0.5, -1.0], np.float32)}
    obj = Dyn({"alpha": 2.0}, state, wg, CPU)
    w = torch.tensor([2.0, 3.0])
    # (alpha/2)||w - wg||^2 - <g, w> = 1 * (1 + 4) - (1 - 3) = 7
    assert float(obj.penalty({"w": w})) == pytest.approx(7.0)
    new = obj.after_fit({"w": np.array([2.0, 3.0], np.float32)})
    # g <- g - alpha (w - wg) = (0.5, -1) - 2 * (1, 2) = (-1.5, -5)
    assert np.allclose(new["grad.w"], [-1.5, -5.0])
    first = Dyn({"alpha": 2.0}, {}, wg, CPU)  # no state yet: g = 0
    assert float(first.penalty({"w": w})) == pytest.approx(5.0)


def test_objective_from_config():
    assert objective_from_config({}, {}, {}, CPU) is None
    obj = objective_from_config({"objective": "prox", "objective.mu": 0.1, "server-round": 3}, {}, {}, CPU)
    assert isinstance(obj, Prox) and obj.config == {"mu": 0.1}


def test_feddyn_server_step_by_hand():
    wg = {"w": np.array([0.0], np.float32)}
    clients = [{"w": np.array([1.0], np.float32)}, {"w": np.array([3.0], np.float32)}]
    new, h = feddyn_server_step(wg, clients, {}, alpha=0.5, num_clients=4)
    # h = 0 - (0.5 / 4) * (1 + 3) = -0.5; w = mean(1, 3) - h / alpha = 2 + 1 = 3
    assert h["w"] == pytest.approx([-0.5]) and new["w"] == pytest.approx([3.0])
    new2, h2 = feddyn_server_step(new, clients, h, alpha=0.5, num_clients=4)
    # h = -0.5 - 0.125 * ((1 - 3) + (3 - 3)) = -0.25; w = 2 + 0.5 = 2.5
    assert h2["w"] == pytest.approx([-0.25]) and new2["w"] == pytest.approx([2.5])


def test_prox_keeps_a_single_learner_near_the_global_model():
    from fedens.data import load_client_data
    from fedens.learners import build_learner
    from fedens.scenario import load_scenario
    from fedens.seeding import seeded_generator

    scn = load_scenario({"data": {"num_clients": 2}, "model": {"kind": "mlp", "hidden": [16]}, "train": {"lr": 0.1}})
    data = load_client_data(scn.data, 0, 0).train
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        learner = build_learner(scn, (1, 8, 8), 10, CPU)
        start = learner.get_arrays()
        learner.objective = Prox({"mu": mu}, {}, start, CPU)
        learner.fit(data, seeded_generator(0, 1, 0), 1)
        drift[mu] = sum(float(((learner.get_arrays()[k] - v) ** 2).sum()) for k, v in start.items())
    assert drift[10.0] < 0.5 * drift[0.0]
