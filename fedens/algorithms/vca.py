"""Variance correction, the pure part (docs/methods.md#vca): the unbiased per-tensor variance,
the rescaling of an averaged tensor to a target variance, which tensors are corrected, and the
three targets. Used by the ``vca`` strategy and the ``vca`` gossip rule alike, with one set of
parameter names (``target``, ``c``, ``eps``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fedens.options import Options

_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def tensor_var(x: np.ndarray) -> float:
    """Unbiased variance over all elements (``torch.var``'s default, ``np.var(ddof=1)``)."""
    return float(np.var(np.asarray(x, dtype=np.float64), ddof=1))


def variance_correct(avg: np.ndarray, target_var: float, eps: float = 1e-4) -> np.ndarray:
    """``(avg - mean) * sqrt((target_var + eps) / (Var(avg) + eps)) + mean`` in float64."""
    a = np.asarray(avg, dtype=np.float64)
    mean, var = a.mean(), tensor_var(a)
    if var + eps <= 0:  # eps = 0 and no spread: nothing to rescale
        return a.copy()
    return (a - mean) * np.sqrt((target_var + eps) / (var + eps)) + mean


def is_norm_statistic(name: str) -> bool:
    """A normalisation layer's running statistic (``running_mean``, ``running_var``,
    ``num_batches_tracked``): not a weight, so never rescaled; in gossip mode each node keeps
    its own, as the authors' code does (docs/methods.md#gossip-vca)."""
    return any(s in name for s in _NORM_STATS)


def is_corrected(name: str, array: np.ndarray) -> bool:
    """Whether ``vca`` rescales the tensor ``name`` (module docstring)."""
    return (
        np.issubdtype(array.dtype, np.floating)
        and array.size > 1
        and not name.startswith("precision.")
        and not name.endswith(".filled")
        and not is_norm_statistic(name)
    )


def target_variance(target: str, c: float, own: np.ndarray | None, others: Sequence[np.ndarray]) -> float:
    """The target variance of one tensor: ``others`` = mean of the others' variances, ``self``
    = the own (unmixed; the federated global) tensor's, ``conservative`` = ``c self + (1 - c)
    others``."""
    follow = float(np.mean([tensor_var(x) for x in others]))
    if target == "others":
        return follow
    if own is None:
        raise ValueError(f"vca: target {target!r} needs the own tensor")
    mine = tensor_var(own)
    return mine if target == "self" else c * mine + (1 - c) * follow


class VCAOptions(Options):
    """The parameters of the ``vca`` strategy and the ``vca`` gossip rule: one set of names and
    defaults (the reference code's preset)."""

    target: Literal["others", "self", "conservative"] = Field(
        "others", description="the variance to restore: the others' mean, the own model's, or c-weighted")
    c: float = Field(0.5, ge=0, le=1, description="own model's weight in the gossip mix and the conservative target")
    eps: float = Field(1e-4, ge=0, allow_inf_nan=False, description="added to both variances in the rescaling")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, dict) and "conservative" in values:  # the gossip rule's old name
            raise ValueError("conservative: renamed to c, the name the vca strategy and gossip rule share")
        return values
