"""Client-side objective terms: what a server strategy adds to a client's training loss.

The ADMM family (FedProx, FedDyn, FedADMM, FedLap, ...) changes the *client's* objective: a
proximal term to the global model, a dual (Lagrangian) term, a prior. A strategy asks for one by
name in the train messages' config (``"objective": "prox"`` plus ``"objective.<param>"``
values); the ClientApp builds it with the client's persistent state (``context.state``) and the
global arrays of the message, hands it to the learner, and stores the state it returns after
training. The learner adds ``penalty(params)`` to its mean minibatch loss in its own loop, so
there is one training loop per learner, not one per algorithm.

State of a client that is not sampled for a while: it stays in ``context.state`` untouched (a
dual is not decayed while its client is away) and is used as it is when the client is next
sampled; this is what the papers' algorithms do under partial participation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedens.registry import Registry

Arrays = dict[str, np.ndarray]
PREFIX = "objective."


class Objective:
    """A term added to a client's loss. ``config`` holds the ``objective.*`` values the
    strategy sent (prefix removed); ``state`` the client's persistent arrays (empty at first);
    ``global_arrays`` the arrays the round started from, by payload name."""

    def __init__(self, config: Mapping[str, Any], state: Arrays, global_arrays: Arrays, device: torch.device) -> None:
        self.config = dict(config)
        self.state = dict(state)
        self.device = device
        self.global_arrays = global_arrays
        self._tensors: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, source: Mapping[str, np.ndarray]) -> torch.Tensor:
        """``source[name]`` as a float32 tensor on the device, converted once and cached."""
        key = f"{id(source)}:{name}"
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(np.asarray(source[name]), dtype=torch.float32, device=self.device)
        return self._tensors[key]

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The term for the current parameters (by payload name), added to the mean loss."""
        raise NotImplementedError

    def after_fit(self, trained: Arrays) -> Arrays:
        """The state to keep for the next time this client trains (default: unchanged)."""
        return self.state


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register("prox")
class Prox(Objective):
    """FedProx (Li et al. 2020): ``(mu / 2) * ||w - w_g||^2``, the squared norm of the paper
    (one reference implementation uses the unsquared ``torch.norm``; we do not)."""

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mu = float(self.config["mu"])
        sq = sum(((p - self.tensor(n, self.global_arrays)) ** 2).sum() for n, p in params.items())
        return 0.5 * mu * sq


@OBJECTIVES.register("dyn")
class Dyn(Objective):
    """FedDyn (Acar et al. 2021), client side: ``(alpha / 2) ||w - w_g||^2 - <w, g_k>``, where
    ``g_k`` is the client's accumulated linear term (the state ``grad.<name>``, zero at first).
    After training: ``g_k <- g_k - alpha (w_k - w_g)`` (the paper's first-order condition
    update, so that ``-<w, g_k>`` and the METHODS form ``+<w, lambda_k>`` agree with
    ``lambda_k = -g_k``)."""

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        alpha = float(self.config["alpha"])
        total = torch.zeros((), device=self.device)
        for n, p in params.items():
            total = total + 0.5 * alpha * ((p - self.tensor(n, self.global_arrays)) ** 2).sum()
            if f"grad.{n}" in self.state:
                total = total - (p * self.tensor(f"grad.{n}", self.state)).sum()
        return total

    def after_fit(self, trained: Arrays) -> Arrays:
        alpha = float(self.config["alpha"])
        out = dict(self.state)
        for n, w in trained.items():
            if n in self.global_arrays and np.issubdtype(w.dtype, np.floating):
                g = self.state.get(f"grad.{n}", np.zeros_like(w, dtype=np.float32))
                out[f"grad.{n}"] = (g - alpha * (w - self.global_arrays[n])).astype(np.float32)
        return out


def objective_from_config(config: Mapping[str, Any], state: Arrays, global_arrays: Arrays, device: torch.device) -> Objective | None:
    """The objective a train message asks for, or ``None``."""
    name = config.get("objective")
    if not name:
        return None
    params = {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}
    return OBJECTIVES.get(str(name))(params, state, global_arrays, device)
