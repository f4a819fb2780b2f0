"""Decentralized (gossip) mode through Flower + Ray: 4 nodes x 2 rounds on a ring for each rule,
and one run where every message is dropped, and a repeated run with asynchrony (same numbers).
Each run starts Ray (about 20 s here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedens.data import load_client_data, load_server_data
from fedens.decentralized.engine import initial_models
from fedens.learners import build_learner
from fedens.results import read_metrics
from fedens.seeding import seeded_generator

pytestmark = pytest.mark.e2e

GOSSIP = {
    "name": "e2e-gossip",
    "seed": 3,
    "rounds": 2,
    "mode": "decentralized",
    "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "dirichlet", "alpha": 1.0}},
    "model": {"kind": "mlp", "hidden": [32]},
    "train": {"local_epochs": 2, "lr": 0.1},
    "topology": {"kind": "ring"},
}
RULES = {
    "average": {"gossip": {"rule": "average"}},
    "vca": {"gossip": {"rule": "vca"}},
    "swarm": {"gossip": {"rule": "swarm", "params": {"k": 3, "score": "nll"}}, "learner": {"kind": "deep_ensemble", "members": 2}},
}


def finite(row: dict) -> bool:
    values = [v for v in row.values() if isinstance(v, float)]
    values += [x for v in row.values() if isinstance(v, list) for x in v if isinstance(x, float)]
    values += [x for v in row.values() if isinstance(v, dict) for x in v.values()]
    return all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_runs_through_the_engine(session, rule: str, tmp_path: Path):
    result = session.run({**GOSSIP, **RULES[rule]}, out=tmp_path / "run")
    rows = read_metrics(result.run_dir)
    assert rows == result.rows and all(finite(r) for r in rows)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rounds_done"] == 2
    for name in ("nodes.png", "layer_variance.png", "topology.png", "convergence.png", "reliability.png", "checkpoint.npz"):
        assert (result.run_dir / name).stat().st_size > 0, name

    for scope in ("global-test", "global-shift", "gossip"):
        assert [r["round"] for r in result.scope(scope)] == [0, 1, 2], scope
    assert [r["round"] for r in result.scope("nodes-val")] == [1, 2]
    assert [r["round"] for r in result.scope("train")] == [1, 2]
    for r in result.scope("global-test") + result.scope("nodes-val"):
        for m in ("accuracy", "nll", "ece", "brier"):
            assert len(r[f"node_{m}"]) == 4
            assert r[f"{m}_min"] <= r[m] <= r[f"{m}_max"]
            assert r[m] == pytest.approx(np.mean(r[f"node_{m}"]))
    for r in result.scope("train"):
        assert r["nodes_trained"] == 4 and r["failures"] == 0 and r["bytes_sent"] > 0 and r["bytes_received"] > 0
    gossip = result.scope("gossip")
    assert all(g["consensus_distance"] > 0 for g in gossip)  # independent inits: nodes differ
    assert all(g["layer_variance"] and g["layer_variance_mean"] > 0 for g in gossip)
    # ring of 4: round 1 sends 8 copies (2 per node); they arrive in round 2, where each node uses 2
    assert gossip[1]["sent"] == 8 and gossip[1]["delivered"] == 0 and gossip[1]["rule_received"] == 0
    assert gossip[2]["sent"] == 16 and gossip[2]["delivered"] == 8 and gossip[2]["rule_received"] == 2
    assert result.scope("train")[1]["bytes_p2p"] > 0
    test = result.scope("global-test")
    assert test[-1]["accuracy"] > test[0]["accuracy"] + 0.2
    if rule == "swarm":
        assert 0 <= gossip[2]["rule_swarm_agreement"] <= 1 and 0 <= gossip[2]["rule_swarm_own_share"] <= 1


def test_full_drop_leaves_every_node_with_its_own_trained_model(session, tmp_path: Path):
    result = session.run({**GOSSIP, "gossip": {"rule": "average", "drop_prob": 1.0}}, out=tmp_path / "run")
    last = result.scope("gossip")[-1]
    assert last["delivered"] == 0 and last["dropped"] == last["sent"] == 16
    assert all(r["rule_received"] == 0 for r in result.scope("gossip")[1:])
    assert all(r["bytes_p2p"] == 0 for r in result.scope("train"))

    scn = result.scenario
    data = load_server_data(scn.data, scn.seed)
    init = initial_models(scn, data)
    ckpt = np.load(result.run_dir / "checkpoint.npz")
    assert int(ckpt["__round__"]) == 2
    for pid in range(4):
        learner = build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu"))
        learner.set_arrays(init[pid])
        train = load_client_data(scn.data, scn.seed, pid).train
        for r in (1, 2):
            learner.fit(train, seeded_generator(scn.seed, r, pid), r)
        for name, alone in learner.get_arrays().items():
            np.testing.assert_allclose(ckpt[f"node.{pid}.{name}"], alone, rtol=1e-5, atol=1e-6)


def test_same_scenario_same_numbers_with_asynchrony(session, tmp_path: Path):
    """Half the nodes active, 30% of copies lost, delays up to one round: two runs of the same
    scenario and seed give the same rows (times aside)."""
    scn = {**GOSSIP, "rounds": 3, "gossip": {"rule": "vca", "active_fraction": 0.5, "drop_prob": 0.3, "delay": 1}}
    runs = [session.run(scn, out=tmp_path / f"run{i}") for i in range(2)]
    strip = [[{k: v for k, v in r.items() if k != "time_s"} for r in run.rows] for run in runs]
    assert strip[0] == strip[1]
    train, gossip = runs[0].scope("train"), runs[0].scope("gossip")
    assert all(r["nodes_active"] == 2 and r["nodes_trained"] == 2 for r in train)
    assert gossip[-1]["sent"] == 12 and 0 < gossip[-1]["dropped"] < 12  # 2 nodes x 2 neighbours x 3 rounds
