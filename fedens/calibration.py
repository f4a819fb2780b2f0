"""Temperature scaling of a predictive, fitted on the clients' validation splits without moving them.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one scalar ``T`` chosen to
minimise the validation NLL. Ashukha et al. (ICLR 2020, "Pitfalls of in-domain uncertainty
estimation") show that in-domain calibration metrics of different methods should only be
compared after it, since a method's raw ECE is mostly how far its temperature happens to be from 1.
fedens scales the *predictive* of every learner: with ``z = log p`` of the (member-averaged)
predictive, ``p_T = softmax(z / T)``; for a single network this is exactly ``softmax(logits / T)``.

The fit is over ``beta = 1 / T``. The NLL of a set of points,

    L(beta) = sum_i [ logsumexp_c(beta z_ic) - beta z_iy ],

is convex in ``beta`` (a log-sum-exp of functions linear in beta), with

    L'(beta)  = sum_i [ E_q[z_i] - z_iy ],      L''(beta) = sum_i Var_q[z_i],   q = softmax(beta z_i).

These are sums over points, so every client returns its own three sums for the betas the server
asks about (``temperature_sums``), and the server adds them in partition-id order: the fitted
``T`` is the one a centralised fit on the pooled validation predictions would give. The server
first asks for a grid of betas (one message round), brackets the minimum, then takes safeguarded
Newton steps inside the bracket (one message round each; 3 to 6 in practice) until the step is
below ``1e-10`` relative (``fit_temperature``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedens.metrics import classification_metrics

EPS = 1e-12  # as fedens.metrics: p is clamped before the log, so one zero gives a finite NLL
# T from 0.05 to 20 (beta 20 .. 0.05), log-spaced: the bracket for the Newton steps.
GRID = np.geomspace(0.05, 20.0, 25)
MAX_STEPS = 30

Sums = tuple[np.ndarray, np.ndarray, np.ndarray]  # (L, L', L'') per asked beta, each (k,)


def log_predictive(probs: torch.Tensor) -> torch.Tensor:
    """``z = log p`` ``(n, classes)`` in float64 of a predictive ``probs`` ``(n, classes)``."""
    return torch.log(probs.detach().double().cpu().clamp_min(EPS))


def temperature_sums(z: torch.Tensor, labels: torch.Tensor, betas: np.ndarray) -> Sums:
    """``(L, L', L'')`` summed over the points of ``z`` ``(n, classes)`` for each beta in
    ``betas`` ``(k,)`` (module docstring); zeros for an empty set."""
    b = torch.as_tensor(np.asarray(betas, dtype=np.float64))[:, None, None]  # (k, 1, 1)
    if len(z) == 0:
        zero = np.zeros(len(betas))
        return zero, zero.copy(), zero.copy()
    scaled = b * z.unsqueeze(0)  # (k, n, C)
    q = torch.softmax(scaled, dim=2)
    z_true = z.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # (n,)
    loss = (torch.logsumexp(scaled, dim=2) - b[:, :, 0] * z_true).sum(1)
    mean = (q * z).sum(2)  # E_q[z], (k, n)
    grad = (mean - z_true).sum(1)
    hess = ((q * z * z).sum(2) - mean**2).clamp_min(0).sum(1)
    return loss.numpy(), grad.numpy(), hess.numpy()


def fit_temperature(sums: Callable[[np.ndarray], Sums], grid: np.ndarray = GRID) -> tuple[float, int]:
    """The temperature minimising the summed NLL, and the number of ``sums`` calls it took.

    ``sums(betas)`` returns ``(L, L', L'')`` summed over every point (e.g. over all clients).
    The grid's best beta and its neighbours bracket the minimum (``L`` is convex); Newton steps
    that leave the bracket are replaced by bisection, and the bracket shrinks by the sign of
    ``L'``. A minimum beyond the grid's end stays at that end (T = 0.05 or 20)."""
    betas = np.sort(1.0 / np.asarray(grid, dtype=np.float64))
    loss, grad, hess = sums(betas)
    calls = 1
    k = int(np.argmin(loss))
    if (k == 0 and grad[0] >= 0) or (k == len(betas) - 1 and grad[-1] <= 0):
        return float(1.0 / betas[k]), calls
    lo, hi = betas[max(k - 1, 0)], betas[min(k + 1, len(betas) - 1)]
    beta, g, h = betas[k], grad[k], hess[k]
    for _ in range(MAX_STEPS):
        if g == 0:
            break
        if g > 0:
            hi = beta
        else:
            lo = beta
        step = beta - g / h if h > 0 else np.nan
        new = step if lo < step < hi else 0.5 * (lo + hi)  # safeguard: stay inside the bracket
        converged = abs(new - beta) <= 1e-10 * beta  # far below what any metric resolves; float noise in L' is ~1e-12
        beta = new
        if converged:
            break
        _, gs, hs = sums(np.array([beta]))
        calls += 1
        g, h = gs[0], hs[0]
    return float(1.0 / beta), calls


def fit_centralised(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature of ``probs`` ``(n, classes)`` fitted on these points alone (a node's own
    validation split in gossip mode; the reference the federated fit is tested against)."""
    z = log_predictive(probs)
    return fit_temperature(lambda b: temperature_sums(z, labels, b))[0]


def scale(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` ``(n, classes)`` in float64."""
    return torch.softmax(log_predictive(probs) / temperature, dim=1)


def scaled_metrics(probs: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int) -> dict[str, float]:
    """``temperature`` and the NLL, ECE and Brier score of ``softmax(log p / T)`` for ``probs``
    ``(n, classes)`` (accuracy does not change with T)."""
    m = classification_metrics(scale(probs, temperature), labels, n_bins)
    return {"temperature": temperature, "nll_ts": m["nll"], "ece_ts": m["ece"], "brier_ts": m["brier"]}
