"""Variance correction, the pure part (docs/methods.md#vca): the unbiased per-tensor variance,
the rescaling of an averaged tensor to a target variance, which tensors are corrected, and the
three targets. Used by the ``vca`` strategy and the ``vca`` gossip rule alike, with one set of
parameter names (``target``, ``c``, ``eps``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TARGETS = ("others", "self", "conservative")
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


def is_corrected(name: str, array: np.ndarray) -> bool:
    """Whether ``vca`` rescales the tensor ``name`` (module docstring)."""
    return (
        np.issubdtype(array.dtype, np.floating)
        and array.size > 1
        and not name.startswith("precision.")
        and not name.endswith(".filled")
        and not any(s in name for s in _NORM_STATS)
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


def check_params(target: str, c: float, eps: float) -> None:
    """One-line ``ValueError`` for a bad option (the strategy's and the gossip rule's)."""
    if target not in TARGETS:
        raise ValueError(f"vca: target must be one of {', '.join(TARGETS)}, got {target!r}")
    if not (isinstance(eps, (int, float)) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"vca: eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(c, (int, float)) and 0 <= c <= 1):
        raise ValueError(f"vca: c must be in [0, 1], got {c!r}")
