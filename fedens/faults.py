"""Injected faults (the scenario's ``faults:``), drawn per (seed, round, client) so that a run
with faults is as repeatable as one without.

Per train (or gossip) message of client ``k`` in round ``r``, from its own random stream
``derive_seed(seed, r, k, STREAM)``, three independent draws decide whether the client

- crashes: it raises before training, so the server gets an error reply (``failures``);
- straggles: its reply is ``straggler_delay_s`` late; when that is past ``round_timeout_s`` the
  grid drops it (``stragglers``). The delay is simulated: the reply carries it (``fedens.payload.DELAY_KEY``, set by ``corrupt``)
  instead of the actor sleeping, so a straggler does not hold up the clients queued behind it
  on the same actor (which a real deployment would not do) and the drop is deterministic. A
  client that is really slower than ``round_timeout_s`` is dropped by the wall clock as well;
- sends NaN: every floating-point array of its reply is NaN; the grid rejects such a reply
  before aggregation (``rejected``). In decentralized mode the copy sent to the neighbours is
  NaN while the node's own model stays as trained: a corrupted message, not a dead node.

Byzantine clients are a fixed set for the whole run: ``round(fraction * num_clients)`` clients,
the first of a permutation drawn from ``derive_seed(seed, STREAM)``. Every round, each of them
attacks with ``kind``, relative to the model it was sent ``w_g`` and its honest result ``w_k``
(``Δ = w_k - w_g``), on every floating-point array the server also sent:

- ``scale``: ``w_g + s Δ`` (a boosted update; ``s = scale``);
- ``sign_flip``: ``w_g - s Δ`` (the update reversed and boosted);
- ``gaussian``: ``w_g + s ε`` with ``ε ~ N(0, I)`` (noise instead of an update);
- ``label_flip``: trains honestly on labels ``C - 1 - y`` (a data-poisoning client).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedens.data.base import ArrayDataset
from fedens.payload import DELAY_KEY
from fedens.scenario import FaultsConfig
from fedens.seeding import derive_seed

STREAM = 0xFA17  # keeps the fault draws apart from training's streams of the same (seed, round, client)

Arrays = dict[str, np.ndarray]


class InjectedCrash(RuntimeError):
    """The client crash that ``faults.crash_prob`` asks for."""


@dataclass(frozen=True)
class Faults:
    """What happens to one client in one round."""

    crash: bool = False
    delay_s: float = 0.0
    nan: bool = False
    byzantine: str | None = None  # the attack's kind, for a Byzantine client
    scale: float = 1.0
    noise_seed: int = 0

    @property
    def any(self) -> bool:
        return self.crash or self.delay_s > 0 or self.nan or self.byzantine is not None


def byzantine_clients(cfg: FaultsConfig, seed: int, num_clients: int) -> frozenset[int]:
    """The partition ids of the run's Byzantine clients (the same in every round)."""
    count = int(round(cfg.byzantine.fraction * num_clients))
    if count == 0:
        return frozenset()
    order = np.random.default_rng(derive_seed(seed, STREAM)).permutation(num_clients)
    return frozenset(int(k) for k in order[:count])


def draw(cfg: FaultsConfig, seed: int, server_round: int, pid: int, num_clients: int) -> Faults:
    """The faults of client ``pid`` in ``server_round`` (all off when ``cfg`` injects none)."""
    if not cfg.active:
        return Faults()
    rng = np.random.default_rng(derive_seed(seed, server_round, pid, STREAM))
    crash, straggle, nan = rng.random(3)  # always three draws, so one probability does not shift another
    attack = cfg.byzantine.kind if pid in byzantine_clients(cfg, seed, num_clients) else None
    return Faults(crash=bool(crash < cfg.crash_prob), delay_s=cfg.straggler_delay_s if straggle < cfg.straggler_prob else 0.0,
                  nan=bool(nan < cfg.nan_prob), byzantine=attack, scale=cfg.byzantine.scale,
                  noise_seed=derive_seed(seed, server_round, pid, STREAM, 1))


def flip_labels(data: ArrayDataset, num_classes: int) -> ArrayDataset:
    """The same inputs with labels ``C - 1 - y``."""
    return ArrayDataset(data.x, (num_classes - 1 - data.y).astype(np.int64))


def attack(trained: Arrays, sent: Mapping[str, np.ndarray], f: Faults) -> Arrays:
    """The reply a Byzantine client sends instead of ``trained`` (module docstring). Arrays the
    server did not send (e.g. a strategy's extra reply arrays) and integer arrays stay honest."""
    if f.byzantine in (None, "label_flip"):
        return trained
    rng = np.random.default_rng(f.noise_seed)
    out = dict(trained)
    for key, w_k in trained.items():
        w_g = sent.get(key)
        if w_g is None or w_g.shape != w_k.shape or not np.issubdtype(w_k.dtype, np.floating):
            continue
        base = w_g.astype(np.float64)
        out[key] = ATTACKS[f.byzantine](base, w_k.astype(np.float64) - base, f.scale, rng).astype(w_k.dtype)
    return out


# kind -> (w_g, Δ, s, rng) -> the array sent; ``label_flip`` acts on the data instead
ATTACKS = {
    "scale": lambda w_g, delta, s, rng: w_g + s * delta,
    "sign_flip": lambda w_g, delta, s, rng: w_g - s * delta,
    "gaussian": lambda w_g, delta, s, rng: w_g + s * rng.standard_normal(delta.shape),
}


def poison(arrays: Arrays) -> Arrays:
    """Every floating-point array filled with NaN (``faults.nan_prob``)."""
    return {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}


def corrupt(trained: Arrays, sent: Mapping[str, np.ndarray], f: Faults, metrics: dict) -> Arrays:
    """What a client with faults ``f`` sends instead of ``trained``: the attack, then NaN; a
    straggler's delay goes into ``metrics`` (``DELAY_KEY``), where the grid reads it."""
    out = attack(trained, sent, f)
    out = poison(out) if f.nan else out
    if f.delay_s > 0:
        metrics[DELAY_KEY] = f.delay_s
    return out
