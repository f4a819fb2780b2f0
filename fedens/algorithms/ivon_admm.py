"""IVON-ADMM (``FedIVON``; Möllenhoff, Swaroop, Doshi-Velez, Khan, "Federated ADMM from Bayesian
Duality", ICLR 2026, arXiv 2506.13150; docs/methods.md#ivon-admm): the client's setup of IVON,
the dual step both sides take, and the server's step. The decisions are in the strategy's
docstring (``fedens.strategies.ivon_admm``).

- Client (``IvonAdmmTerm`` + the ``ivon`` learner): IVON with ess ``λ_k = (N_k/τ)/ρ_s``, prior =
  the global posterior ``N(m_g, 1/S_g)``, the Lagrangian terms ``ṽ = v_k/(N_k/τ)``,
  ``Ṽ = V_k/(N_k/τ)``; it returns its posterior ``(m_k, S_k)``.
- Dual (``ivon_admm_dual_update``): ``v_k += d ρ_s (S_g m_g − S_k m_k)``, ``V_k += d ρ_s (S_g − S_k)``.
- Server (``ivon_admm_server_step``), with ``α = 1/(1 + K ρ_s)``:
  ``S_g = (1 − α) mean_k S_k + α (S_0 − Σ_k V_k)``,
  ``m_g = [(1 − α) mean_k (S_k m_k) − α Σ_k v_k] / S_g``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from fedens.algorithms.arrays import Arrays
from fedens.objectives import IVONSetup, Objective, register
from fedens.options import Options

MEAN, PRECISION = "mean.", "precision."  # a posterior's arrays (fedens.payload's naming rule)
DUAL_MEAN = "dual_mean."  # state: v_k per parameter
DUAL_PREC = "dual_prec."  # state: V_k per parameter


class IvonAdmmOptions(Options):
    rho: float = Field(1.0, gt=0, allow_inf_nan=False, description="federated step size ρ_s")
    tau: float = Field(0.1, gt=0, allow_inf_nan=False, description="temperature τ of the clients' posteriors")
    damping: float = Field(0.1, gt=0, allow_inf_nan=False, description="damping d of the dual step")
    prior_precision: float = Field(0.1, gt=0, allow_inf_nan=False, description="prior precision S_0")
    rescale_lr: bool = Field(False, description="IVON's step scaled by hess_init + δ (off: the reference's)")
    min_precision: float = Field(1e-6, gt=0, allow_inf_nan=False, description="floor of the global precision")
    rounds: int | None = Field(None, ge=1, description="the run's rounds, T of the clients' cosine learning-rate "
                                                       "schedule (null: the scenario's, filled in by the strategy)")


@dataclass(frozen=True)
class IvonAdmmSetup(IVONSetup):
    """``IVONSetup`` plus the run's rounds, the T of the ``ivon`` learner's cosine schedule
    (``schedule_rounds: null``); ``None`` when the strategy did not know them."""

    rounds: int | None = None


@register
class IvonAdmmTerm(Objective):
    """The IVON setup of the module docstring: the posterior starts at the global one from round
    2 on (in round 1 the mean is the initial network and ``hess = hess_init``, as the reference
    code, whose clients only get the global posterior after the first round). After training
    the dual step ``ivon_admm_dual_update``. No loss penalty: ``penalty`` is 0. State:
    ``DUAL_MEAN<n>`` (v_k), ``DUAL_PREC<n>`` (V_k), float64."""

    name = "ivon_admm"
    Options = IvonAdmmOptions

    @classmethod
    def message_config(cls, options: BaseModel) -> dict[str, Any]:
        """As ``Objective.message_config``, without the options left at ``None`` (``rounds``
        when the strategy did not know them): a Flower ConfigRecord holds no ``None``."""
        return {k: v for k, v in super().message_config(options).items() if v is not None}

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def ivon_setup(self, names: list[str], num_examples: int) -> IVONSetup:
        scale = num_examples / self.options.tau  # N_k / τ

        def flat(prefix: str, source: Mapping[str, np.ndarray]) -> torch.Tensor:
            parts = [np.asarray(source.get(prefix + n, np.zeros_like(self.global_arrays[MEAN + n])),
                                dtype=np.float64).ravel() for n in names]
            return torch.as_tensor(np.concatenate(parts), dtype=torch.float32, device=self.device)

        return IvonAdmmSetup(
            ess=scale / self.options.rho,
            prior_mean=flat(MEAN, self.global_arrays),
            prior_precision=flat(PRECISION, self.global_arrays),
            v_tilde=flat(DUAL_MEAN, self.state) / scale,
            V_tilde=flat(DUAL_PREC, self.state) / scale,
            start_at_prior=self.server_round > 1,
            rescale_lr=self.options.rescale_lr,
            rounds=self.options.rounds,
        )

    def after_fit(self, trained: Arrays) -> Arrays:
        step = self.options.damping * self.options.rho
        return ivon_admm_dual_update(self.state, trained, self.global_arrays, step)


def ivon_admm_dual_update(state: Arrays, trained: Arrays, global_arrays: Arrays, step: float) -> Arrays:
    """The dual step, element-wise, ``step = d ρ_s``: ``v_k += step (S_g m_g − S_k m_k)``,
    ``V_k += step (S_g − S_k)``. ``trained`` / ``global_arrays`` hold ``MEAN<n>`` and
    ``PRECISION<n>``; ``state`` ``DUAL_MEAN<n>`` and ``DUAL_PREC<n>`` (missing = 0)."""
    out = {}
    for key, m_g in global_arrays.items():
        if not key.startswith(MEAN):
            continue
        n = key[len(MEAN):]
        s_g, m_g = global_arrays[PRECISION + n].astype(np.float64), m_g.astype(np.float64)
        s_k, m_k = trained[PRECISION + n].astype(np.float64), trained[key].astype(np.float64)
        out[DUAL_MEAN + n] = state.get(DUAL_MEAN + n, 0.0) + step * (s_g * m_g - s_k * m_k)
        out[DUAL_PREC + n] = state.get(DUAL_PREC + n, 0.0) + step * (s_g - s_k)
    return out


def ivon_admm_server_step(posteriors: list[Arrays], duals: list[Arrays], rho: float, prior_precision: float,
                          min_precision: float = 1e-6) -> tuple[Arrays, Arrays]:
    """``(m_g, S_g)`` by name (float64) from the K replying clients' ``MEAN<n>``/``PRECISION<n>``
    and every client's ``DUAL_MEAN<n>``/``DUAL_PREC<n>`` (module docstring). Where the raw
    ``S_g`` is at most ``min_precision`` it is floored there and the mean is the clients'
    precision-weighted mean: dividing by the floor would send the mean to +-1e6."""
    alpha = 1.0 / (1.0 + len(posteriors) * rho)
    means, precisions = {}, {}
    for key in posteriors[0]:
        if not key.startswith(MEAN):
            continue
        n = key[len(MEAN):]
        s_bar = np.mean([p[PRECISION + n].astype(np.float64) for p in posteriors], 0)
        sm_bar = np.mean([p[PRECISION + n].astype(np.float64) * p[key].astype(np.float64) for p in posteriors], 0)
        v_sum = sum((d[DUAL_MEAN + n] for d in duals if DUAL_MEAN + n in d), np.zeros_like(s_bar))
        V_sum = sum((d[DUAL_PREC + n] for d in duals if DUAL_PREC + n in d), np.zeros_like(s_bar))
        raw = (1 - alpha) * s_bar + alpha * (prior_precision - V_sum)
        floored = raw <= min_precision
        mean = np.where(floored, sm_bar / s_bar, ((1 - alpha) * sm_bar - alpha * v_sum) / np.where(floored, 1.0, raw))
        means[n], precisions[n] = mean, np.where(floored, min_precision, raw)
    return means, precisions
