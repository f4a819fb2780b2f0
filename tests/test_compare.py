"""``fedens compare``: the target column (rounds to reach a level) and its validation."""

from __future__ import annotations

import pytest

from fedens.compare import Target, load_comparison, markdown_table, rounds_to
from fedens.scenario import ScenarioError

CURVE = [{"round": 0, "accuracy": 0.1, "nll": 2.3}, {"round": 1, "accuracy": 0.7, "nll": 1.0},
         {"round": 2, "accuracy": 0.86, "nll": 0.5}, {"round": 3, "accuracy": 0.80, "nll": 0.4}]


def test_rounds_to_a_level_higher_and_lower_is_better():
    assert rounds_to(CURVE, "accuracy", 0.85) == 2  # first round at or above, even if it drops later
    assert rounds_to(CURVE, "accuracy", 0.90) is None
    assert rounds_to(CURVE, "nll", 0.45) == 3  # lower is better: first round at or below
    assert rounds_to(CURVE, "accuracy", 0.70) == 1  # reaching the level exactly counts


def test_target_relative_to_a_variant():
    t = Target(fraction=0.9, of="fedavg")
    assert t.level({"fedavg": {"accuracy": 0.92}}) == pytest.approx(0.828)
    assert Target(value=0.85).level({}) == 0.85
    with pytest.raises(ValueError):
        Target(fraction=0.9)  # neither a value nor a complete relative target
    with pytest.raises(ValueError):
        Target(value=0.8, fraction=0.5)  # both kinds at once
    assert Target(metric="ood_auroc", fraction=0.9, of="a").level({"a": {"ood_auroc": None}}) is None


def test_target_must_name_a_variant(write_yaml):
    write_yaml("rounds: 1\n", "base.yaml")
    path = write_yaml("base: base.yaml\nvariants: {a: {}}\ntarget: {fraction: 0.9, of: fedavg}\n", "cmp.yaml")
    with pytest.raises(ScenarioError, match="target.of: 'fedavg' is not a variant"):
        load_comparison(path)


def test_table_has_the_target_column():
    row = {"variant": "a", "accuracy": 0.9, "nll": 0.3, "ece": 0.1, "brier": 0.1, "ood_auroc": 0.9, "shift_ece": 0.1,
           "client_bytes_per_round": 2000, "wall_time_s": 3.0, "rounds_to_target": 7, "target": "accuracy 0.85 = 0.8500"}
    table = markdown_table([row, {**row, "variant": "b", "rounds_to_target": None}])
    assert "| rounds to target |" in table and "| 7 |" in table and table.count("| - |") == 1
    assert "Target: accuracy 0.85 = 0.8500" in table


def test_bytes_per_client_or_node():
    from fedens.compare import node_bytes

    assert node_bytes({"client_bytes_down": 300, "client_bytes_up": 100}) == 400
    # a gossip round: 4 active nodes on a ring, 8 copies of 1000 bytes delivered: 2 in and 2 out each
    assert node_bytes({"bytes_sent": 9000, "bytes_received": 4000, "bytes_p2p": 8000, "nodes_active": 4}) == 4000
