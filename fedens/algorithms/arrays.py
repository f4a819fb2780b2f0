"""Named arrays (``{name: ndarray}``, the payload of every message) and the operations every
aggregation rule, federated or gossip, builds on. Numpy only: a gossip actor imports this, not
the federated strategies."""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def weighted_average(arrays: list[Arrays], weights: np.ndarray) -> Arrays:
    """``sum_k w_k a_k`` for every name (float64 accumulation, cast back to the input dtype)."""
    out = {}
    for name, first in arrays[0].items():
        acc = sum(w * a[name].astype(np.float64) for a, w in zip(arrays, weights))
        out[name] = np.asarray(acc).astype(first.dtype)
    return out


def precision_weighted_average(means: list[np.ndarray], precisions: list[np.ndarray],
                               weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weighted mix of diagonal Gaussians in natural parameters, element-wise and float64:
    ``S = sum_k w_k s_k``, ``m = sum_k w_k s_k m_k / S`` (``weights`` ``(K,)``); where ``S`` is 0,
    ``m`` is the plain mix ``sum_k w_k m_k``. The ``posterior_avg`` strategy and the gossip rules'
    posterior mixing alike."""
    s = [np.asarray(p, dtype=np.float64) for p in precisions]
    ms = [np.asarray(m, dtype=np.float64) for m in means]
    total = sum(w * sk for w, sk in zip(weights, s))
    natural = sum(w * sk * mk for w, sk, mk in zip(weights, s, ms))
    plain = sum(w * mk for w, mk in zip(weights, ms))
    return np.where(total != 0, natural / np.where(total != 0, total, 1.0), plain), total


def split_posterior(arrays: Arrays) -> tuple[Arrays, Arrays, Arrays]:
    """``(means, precisions, rest)``: ``mean.<n>`` and ``precision.<n>`` keyed by ``<n>``."""
    means = {k[5:]: v for k, v in arrays.items() if k.startswith("mean.")}
    precs = {k[10:]: v for k, v in arrays.items() if k.startswith("precision.")}
    rest = {k: v for k, v in arrays.items() if not k.startswith(("mean.", "precision."))}
    return means, precs, rest


def join_posterior(means: Arrays, precisions: Arrays, rest: Arrays | None = None) -> Arrays:
    """Inverse of ``split_posterior``."""
    out = {f"mean.{k}": v for k, v in means.items()}
    out.update({f"precision.{k}": v for k, v in precisions.items()})
    out.update(rest or {})
    return out


def split_members(arrays: Arrays) -> tuple[dict[int, Arrays], Arrays]:
    """``({k: {name: array}}, shared)`` from ``member.{k}.<name>`` and plain names."""
    members: dict[int, Arrays] = {}
    shared: Arrays = {}
    for key, value in arrays.items():
        if key.startswith("member."):
            _, k, name = key.split(".", 2)
            members.setdefault(int(k), {})[name] = value
        else:
            shared[key] = value
    return members, shared
