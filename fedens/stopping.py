"""Early stopping on a validation metric, under the scenario's ``rounds`` cap (``stop:``).

A comparison can only say that every method was trained to its plateau if training ran until
the validation metric stopped improving, however many rounds that takes for each method. The
rule is the usual patience rule: stop at the first evaluated round ``r >= min_rounds`` whose best
value so far was reached at a round ``<= r - patience``. It reads the rows the run has written
(also after a resume), so it holds no state of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from fedens.metrics import higher_is_better
from fedens.scenario import StopConfig


def maximise(cfg: StopConfig) -> bool:
    return cfg.direction == "maximize" if cfg.direction is not None else higher_is_better(cfg.metric)


def history(rows: Iterable[dict[str, Any]], cfg: StopConfig) -> list[tuple[int, float]]:
    """``(round, value)`` of ``cfg.metric`` in the ``cfg.scope`` rows, in round order; rows
    without a finite value are left out."""
    out = []
    for r in rows:
        v = r.get(cfg.metric) if r.get("scope") == cfg.scope else None
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append((int(r["round"]), float(v)))
    return sorted(out)


def should_stop(values: Sequence[tuple[int, float]], current: int, cfg: StopConfig) -> bool:
    """Whether to stop at round ``current`` given the ``(round, value)`` history up to it."""
    if current < cfg.min_rounds or not values or values[-1][0] != current:
        return False  # only at a round that measured the metric
    return current - best(values, cfg)[0] >= cfg.patience


def best(values: Sequence[tuple[int, float]], cfg: StopConfig) -> tuple[int, float]:
    """The round and value the rule measures staleness from: the last one that improved on the
    best before it by more than ``min_delta`` (the first value to begin with)."""
    up = maximise(cfg)
    best_round, best_value = values[0]
    for r, v in values[1:]:
        if (v > best_value + cfg.min_delta) if up else (v < best_value - cfg.min_delta):
            best_round, best_value = r, v
    return best_round, best_value


def check(cfg: StopConfig | None, rows: Iterable[dict[str, Any]], current: int, cap: int) -> dict[str, Any] | None:
    """Where and why to stop at round ``current`` (for the run's summary), given every row so
    far; None to go on (no rule, the cap is this round anyway, or the metric still improves)."""
    if cfg is None or current >= cap:
        return None
    values = history(rows, cfg)
    if not should_stop(values, current, cfg):
        return None
    best_round, best_value = best(values, cfg)
    return {"round": current, "metric": cfg.metric, "scope": cfg.scope, "best_round": best_round,
            "best": best_value, "patience": cfg.patience}
