"""Early stopping (fedens.stopping): where a hand-made sequence of validation values stops."""

from __future__ import annotations

import pytest

from fedens.scenario import ScenarioError, StopConfig, parse_scenario
from fedens.stopping import check, history, should_stop


def _rows(values: dict[int, float], scope: str = "clients", metric: str = "nll") -> list[dict]:
    return [{"round": r, "scope": scope, metric: v} for r, v in values.items()]


def _first_stop(values: dict[int, float], cfg: StopConfig, cap: int = 100) -> int | None:
    rows = []
    for r, v in values.items():
        rows.append({"round": r, "scope": cfg.scope, cfg.metric: v})
        if check(cfg, rows, r, cap) is not None:
            return r
    return None


def test_patience_counts_rounds_since_the_best() -> None:
    # best 0.5 at round 4; rounds 6, 8 do not improve; patience 4: stop at 8 (8 - 4 >= 4)
    nll = {2: 0.9, 4: 0.5, 6: 0.55, 8: 0.51, 10: 0.3}
    assert _first_stop(nll, StopConfig(patience=4)) == 8
    assert _first_stop(nll, StopConfig(patience=5)) is None  # round 10 improves before 4 + 5 = 9 ... 10 is not stale


def test_min_rounds_and_min_delta() -> None:
    nll = {1: 1.0, 2: 0.9, 3: 0.89, 4: 0.885, 5: 0.884, 6: 0.883}
    # with min_delta 0.05 only round 2 improves: stale from round 2 on; patience 2 -> stop at 4
    assert _first_stop(nll, StopConfig(patience=2, min_delta=0.05)) == 4
    assert _first_stop(nll, StopConfig(patience=2, min_delta=0.05, min_rounds=6)) == 6
    assert _first_stop(nll, StopConfig(patience=2)) is None  # every round improves a little


def test_accuracy_is_maximised_unless_told() -> None:
    acc = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65}
    assert _first_stop(acc, StopConfig(metric="accuracy", patience=2)) == 4
    # told to minimise, the best is round 1's 0.5: stale from 1, stop at 3
    assert _first_stop(acc, StopConfig(metric="accuracy", patience=2, direction="minimize")) == 3


def test_the_cap_round_never_counts_as_a_stop() -> None:
    cfg = StopConfig(patience=1)
    rows = _rows({1: 0.5, 2: 0.6})
    assert check(cfg, rows, 2, cap=2) is None
    stop = check(cfg, rows, 2, cap=3)
    assert stop == {"round": 2, "metric": "nll", "scope": "clients", "best_round": 1, "best": 0.5, "patience": 1}


def test_only_a_round_that_measured_the_metric_can_stop() -> None:
    cfg = StopConfig(patience=1)
    values = history(_rows({1: 0.5, 2: 0.6}) + [{"round": 3, "scope": "train", "train_loss": 0.1}], cfg)
    assert values == [(1, 0.5), (2, 0.6)]
    assert not should_stop(values, 3, cfg)  # round 3 has no clients row
    assert should_stop(values, 2, cfg)


def test_non_finite_values_are_skipped() -> None:
    cfg = StopConfig(patience=2)
    assert history(_rows({1: 0.5, 2: float("nan"), 3: float("inf"), 4: 0.6}), cfg) == [(1, 0.5), (4, 0.6)]


@pytest.mark.parametrize("mode,scope", [("federated", "nodes-val"), ("decentralized", "clients")])
def test_a_scope_without_rows_in_the_mode_is_refused(mode: str, scope: str) -> None:
    with pytest.raises(ScenarioError, match="stop.scope"):
        parse_scenario({"mode": mode, "stop": {"scope": scope}})


def test_validation_scopes_need_a_validation_split() -> None:
    with pytest.raises(ScenarioError, match="val_fraction"):
        parse_scenario({"data": {"val_fraction": 0}, "stop": {"metric": "nll"}})
    parse_scenario({"data": {"val_fraction": 0}, "stop": {"metric": "train_loss", "scope": "train"}})
