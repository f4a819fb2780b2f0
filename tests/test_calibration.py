"""Temperature scaling (fedens.calibration): the sums, the fit, and the federated fit equal to
the centralised one on the pooled validation predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from fedens.calibration import fit_centralised, fit_temperature, log_predictive, scale, scaled_metrics, temperature_sums
from fedens.metrics import classification_metrics


def _overconfident(n: int = 400, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits scaled by 4 whose argmax is right on 60% of the points: an overconfident net."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.6
    labels[right] = logits[right].argmax(1)
    return torch.softmax(4 * logits, 1), labels


def _scipy_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """An independent centralised fit: bounded Brent on T of the pooled NLL."""
    z = log_predictive(probs)
    nll = lambda t: float(torch.nn.functional.cross_entropy(z / t, labels, reduction="sum"))  # noqa: E731
    return float(minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-12}).x)


def test_sums_are_the_nll_and_its_derivatives_in_beta() -> None:
    probs, labels = _overconfident(50)
    z = log_predictive(probs)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(beta * z, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, beta, create_graph=True)
    (hess,) = torch.autograd.grad(grad, beta)
    L, g, h = temperature_sums(z, labels, np.array([0.7]))
    assert L[0] == pytest.approx(loss.item(), rel=1e-12)
    assert g[0] == pytest.approx(grad.item(), rel=1e-10)
    assert h[0] == pytest.approx(hess.item(), rel=1e-10)


def test_two_points_by_hand() -> None:
    # z = log p of two points over two classes; at beta = 1 the NLL is -log p_y summed
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    L, g, h = temperature_sums(log_predictive(probs), labels, np.array([1.0]))
    assert L[0] == pytest.approx(-np.log(0.8) - np.log(0.3), rel=1e-12)
    # L'(1) = sum_i E_p[z_i] - z_iy, with q = p at beta 1
    e1 = 0.8 * np.log(0.8) + 0.2 * np.log(0.2)
    e2 = 0.3 * np.log(0.3) + 0.7 * np.log(0.7)
    assert g[0] == pytest.approx((e1 - np.log(0.8)) + (e2 - np.log(0.3)), rel=1e-12)
    v1 = 0.8 * np.log(0.8) ** 2 + 0.2 * np.log(0.2) ** 2 - e1**2
    v2 = 0.3 * np.log(0.3) ** 2 + 0.7 * np.log(0.7) ** 2 - e2**2
    assert h[0] == pytest.approx(v1 + v2, rel=1e-12)


def test_fit_equals_an_independent_centralised_fit() -> None:
    probs, labels = _overconfident()
    t = fit_centralised(probs, labels)
    assert t > 1.5  # overconfident: it softens
    assert t == pytest.approx(_scipy_temperature(probs, labels), rel=1e-6)


def test_federated_sums_give_the_pooled_fit_to_1e_6() -> None:
    probs, labels = _overconfident(600, seed=3)
    z = log_predictive(probs)
    clients = np.array_split(np.random.default_rng(0).permutation(600), 7)  # uneven clients, one empty
    clients.append(np.array([], dtype=np.int64))

    def federated(betas: np.ndarray):  # noqa: ANN202
        parts = [temperature_sums(z[idx], labels[idx], betas) for idx in clients]
        return tuple(np.sum([p[k] for p in parts], axis=0) for k in range(3))

    t_fed, calls = fit_temperature(federated)
    assert t_fed == pytest.approx(_scipy_temperature(probs, labels), rel=1e-6)
    assert calls <= 8  # one grid query and a few Newton steps: message rounds stay few


def test_an_underconfident_predictive_gets_sharpened() -> None:
    probs, labels = _overconfident()
    soft = torch.softmax(torch.log(probs) / 3.0, 1)  # the same predictive, 3x too soft
    t = fit_centralised(soft, labels)
    assert t == pytest.approx(fit_centralised(probs, labels) / 3.0, rel=1e-6)


def test_a_minimum_beyond_the_grid_stays_at_its_end() -> None:
    probs = torch.tensor([[0.6, 0.4]] * 10, dtype=torch.float64)
    labels = torch.zeros(10, dtype=torch.long)  # always right: the NLL falls as T -> 0
    assert fit_centralised(probs, labels) == pytest.approx(0.05)


def test_scaling_a_softmax_divides_its_logits() -> None:
    logits = torch.randn(20, 5, dtype=torch.float64)
    scaled = scale(torch.softmax(logits, 1), 2.5)
    assert torch.allclose(scaled, torch.softmax(logits / 2.5, 1), atol=1e-12)


def test_scaled_metrics_at_t_1_are_the_raw_ones() -> None:
    probs, labels = _overconfident(200)
    raw = classification_metrics(probs, labels)
    ts = scaled_metrics(probs, labels, 1.0, 10)
    assert ts["nll_ts"] == pytest.approx(raw["nll"], rel=1e-6)  # p is clamped at 1e-12 and renormalised
    assert ts["ece_ts"] == pytest.approx(raw["ece"], abs=1e-6)
    fitted = scaled_metrics(probs, labels, fit_centralised(probs, labels), 10)
    assert fitted["nll_ts"] < raw["nll"]


def test_it_recovers_the_temperature_that_made_a_predictive_overconfident() -> None:
    # labels drawn from softmax(logits); the model reports softmax(3 logits): the right T is 3
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20_000, 10, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    probs = torch.softmax(3 * logits, 1)
    t = fit_centralised(probs, labels)
    assert t == pytest.approx(3.0, rel=0.03)
    raw, ts = classification_metrics(probs, labels), scaled_metrics(probs, labels, t, 10)
    assert ts["ece_ts"] < 0.02 < raw["ece"]
