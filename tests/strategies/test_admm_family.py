"""Client-side objective terms and the FedProx / FedDyn server math, with numbers by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedens.algorithms import objective_from_config
from fedens.algorithms.feddyn import DynTerm as Dyn
from fedens.algorithms.fedprox import ProxTerm as Prox
from fedens.algorithms.feddyn import feddyn_server_step

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
    assert isinstance(obj, Prox) and obj.options.mu == 0.1 and obj.server_round == 0
    # what the strategy sends is what the client rebuilds: the same Options, the round passed on
    sent = Prox.message_config(Prox.Options(mu=0.25))
    assert sent == {"objective": "prox", "objective.mu": 0.25}
    again = objective_from_config(sent, {}, {}, CPU, server_round=4)
    assert again.options == Prox.Options(mu=0.25) and again.server_round == 4


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
    from fedens.checks import load_scenario
    from fedens.data import load_client_data
    from fedens.learners import build_learner
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


def ridge_rounds(dual_against: str, rho: float, rounds: int, check_duals: bool = True) -> tuple:
    """Ridge regression split over 3 clients: N_k l_k(w) = 1/2 ||X_k w - y_k||^2, solved exactly
    by each client with its FedLap term, for ``rounds`` rounds of full participation. Returns the
    max error to the pooled MAP per round, the final global and the MAP."""
    from fedens.algorithms.fedlap import LapTerm as Lap
    from fedens.algorithms.fedlap import fedlap_server_step

    rng = np.random.default_rng(0)
    d, delta = 4, 2.0
    X = [rng.normal(size=(n, d)) for n in (20, 30, 10)]
    y = [x @ rng.normal(size=d) + 0.1 * rng.normal(size=len(x)) for x in X]
    ridge = np.linalg.solve(sum(x.T @ x for x in X) + delta * np.eye(d), sum(x.T @ t for x, t in zip(X, y)))
    wg = {"w": np.zeros(d)}
    server_duals: dict = {}
    client_state = [{} for _ in X]
    errors = []
    options = {"delta": delta, "rho": rho, "dual_against": dual_against}
    for _ in range(rounds):
        trained = {}
        for k, (x, t) in enumerate(zip(X, y)):
            obj = Lap(options, client_state[k], wg, CPU, num_examples=len(t))
            v = obj.state.get("dual.w", np.zeros(d))
            if k in server_duals and check_duals:
                assert np.allclose(v, server_duals[k]["dual.w"])  # client and server agree
            # argmin 1/2||Xw - y||^2 + delta v^T w + delta/2 ||w - w_g||^2
            trained[k] = {"w": np.linalg.solve(x.T @ x + delta * np.eye(d), x.T @ t - delta * v + delta * wg["w"])}
            client_state[k] = obj.after_fit(trained[k])
        wg, server_duals = fedlap_server_step(server_duals, trained, wg, rho, dual_against)
        assert np.allclose(wg["w"], sum(dv["dual.w"] for dv in server_duals.values()))  # w_g = sum_k v_k
        if dual_against == "trained_from" and check_duals:  # the client stepped its dual as the server did
            assert all(np.allclose(client_state[k]["dual.w"], server_duals[k]["dual.w"]) for k in server_duals)
        errors.append(float(np.abs(wg["w"] - ridge).max()))
    return errors, wg, ridge, X, y, delta


@pytest.mark.parametrize("dual_against, rho, rounds", [("new_global", 1.0, 100), ("trained_from", 0.5, 500)])
def test_fedlap_reaches_the_ridge_fixed_point_with_client_and_server_duals_in_step(dual_against, rho, rounds):
    """The global model reaches the pooled MAP (sum_k X_k^T X_k + delta I)^-1 sum_k X_k^T y_k,
    i.e. sum_k N_k grad l_k(w) + delta w = 0, and the clients' own duals equal the server's
    copies (full participation), in both orders of the dual step."""
    errors, wg, ridge, X, y, delta = ridge_rounds(dual_against, rho, rounds)
    assert errors[-1] < 1e-3
    # isotropic delta is not the Hessian: no one-step convergence, but geometric decrease
    assert errors[0] > 0.1 and errors[49] < errors[9] < errors[0]
    grad = sum(x.T @ (x @ wg["w"] - t) for x, t in zip(X, y)) + delta * wg["w"]
    assert np.abs(grad).max() < 1e-2  # the fixed point sum_k N_k grad l_k(w) + delta w = 0


def test_fedlap_authors_order_diverges_where_rho_times_clients_is_large():
    # the stability documented in docs/methods.md#fedlap: 3 clients, rho 1 (rho K = 3)
    errors, *_ = ridge_rounds("trained_from", 1.0, 60, check_duals=False)
    assert errors[-1] > 1e3 * errors[0] or not np.isfinite(errors[-1])
    errors, *_ = ridge_rounds("new_global", 1.0, 100)
    assert errors[-1] < 1e-3


def test_lap_penalty_gradient_is_the_scaled_admm_term():
    from fedens.algorithms.fedlap import LapTerm as Lap

    wg = {"w": np.array([1.0, -1.0])}
    state = {"dual.w": np.array([0.5, 0.0]), "last.w": np.array([1.0, -1.0])}  # last == w_g: no dual step
    obj = Lap({"delta": 4.0, "rho": 1.0}, state, wg, CPU, num_examples=2)
    w = torch.tensor([2.0, 1.0], requires_grad=True)
    obj.penalty({"w": w}).backward()
    # d/dw of (delta/N)(v^T w + 1/2 ||w - w_g||^2) = 2 * (v + w - w_g) = 2 * (1.5, 2)
    assert torch.allclose(w.grad, torch.tensor([3.0, 4.0]))


def test_fedadmm_client_dual_and_server_step_by_hand():
    from fedens.algorithms.fedadmm import AdmmTerm as Admm
    from fedens.strategies.fedadmm import fedadmm_server_step

    wg = {"w": np.array([1.0])}
    obj = Admm({"rho": 0.5}, {"dual.w": np.array([2.0])}, wg, CPU)
    w = torch.tensor([3.0], requires_grad=True)
    pen = obj.penalty({"w": w})
    assert float(pen) == pytest.approx(0.25 * 4 + 2 * 2)  # rho/2 (w-wg)^2 + y (w - wg)
    pen.backward()
    assert float(w.grad) == pytest.approx(0.5 * 2 + 2)  # rho (w - wg) + y
    assert obj.after_fit({"w": np.array([3.0])})["dual.w"] == pytest.approx([3.0])  # 2 + 0.5 * 2
    # server: w_g + eta/K * sum_k (2 w_k^new - w_g - w_k^old) = 1 + 1/4 * ((6-1-1) + (4-1-2)) = 2.25
    new = fedadmm_server_step(wg, {0: {"w": np.array([3.0])}, 1: {"w": np.array([2.0])}},
                              {0: {"w": np.array([1.0])}, 1: {"w": np.array([2.0])}}, eta=1.0, num_clients=4)
    assert new["w"] == pytest.approx([2.25])


def test_diag_ggn_matches_the_explicit_formula():
    from fedens.algorithms.fedlap_cov import diag_ggn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(5, 3)
    got = diag_ggn(model, x.numpy(), batch_size=2)
    params = dict(model.named_parameters())
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for xi in x:  # J^T (diag p - p p^T) J, one input at a time, from autograd Jacobian rows
        logits = model(xi)
        p = torch.softmax(logits, -1).detach()
        rows = [torch.autograd.grad(logits[c], list(params.values()), retain_graph=True) for c in range(3)]
        lam = torch.diag(p) - torch.outer(p, p)
        for j, k in enumerate(params):
            J = torch.stack([r[j].flatten() for r in rows])  # (C, P)
            want[k] += torch.diagonal(J.T @ lam @ J).view_as(params[k])
    for k in params:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_fedlap_cov_converges_in_one_step_on_a_diagonal_quadratic():
    """Ridge regression with orthogonal features (diagonal Hessian X_k^T X_k), exact client
    solves, exact curvature and rho = 1: the first server step is the pooled MAP."""
    from fedens.algorithms.fedlap_cov import lapcov_dual_update
    from fedens.strategies.fedlap_cov import fedlap_cov_server_step

    rng = np.random.default_rng(1)
    d, delta = 3, 0.5
    X = [np.diag(rng.uniform(1, 3, d)) for _ in range(3)]  # orthogonal design: diagonal X^T X
    y = [rng.normal(size=d) for _ in X]
    ridge = np.linalg.solve(sum(x.T @ x for x in X) + delta * np.eye(d), sum(x.T @ t for x, t in zip(X, y)))
    wg, precision = {"w": np.zeros(d)}, {"w": np.full(d, delta)}
    sites = {}
    for k, (x, t) in enumerate(zip(X, y)):
        # argmin 1/2||Xw - y||^2 + 1/2 (w - w_g)^T S_g (w - w_g)  (v = V = 0 in round 1)
        w = np.linalg.solve(x.T @ x + np.diag(precision["w"]), x.T @ t + precision["w"] * wg["w"])
        sites[k] = lapcov_dual_update({}, {"w": w}, {"w": np.diag(x.T @ x)}, wg, precision, rho=1.0)
    new = fedlap_cov_server_step(sites, {"w": wg["w"]}, delta)
    assert np.allclose(new["w"], ridge, atol=1e-10)
    assert np.allclose(new["precision.w"], delta + sum(np.diag(x.T @ x) for x in X))


def test_fedlap_warns_where_the_authors_order_is_known_to_diverge(caplog):
    from types import SimpleNamespace

    from fedens.strategies.fedlap import FedLap
    from fedens.strategies.base import ServerContext

    def ctx(num_clients: int, fraction: float = 1.0) -> ServerContext:
        scn = SimpleNamespace(fraction_train=fraction, data=SimpleNamespace(num_clients=num_clients))
        return ServerContext(scenario=scn, data=None, new_learner=lambda: None, seed=0)

    with caplog.at_level("WARNING", logger="fedens"):
        FedLap().bind(ctx(10))  # rho 0.1 x 10 = 1: fine
        assert not caplog.records
        FedLap().bind(ctx(40, 0.5))  # 0.1 x 20 = 2
        assert "rho x sampled clients = 2" in caplog.text
        caplog.clear()
        FedLap(dual_against="new_global").bind(ctx(40))  # the other order tolerates any rho
        assert not caplog.records
