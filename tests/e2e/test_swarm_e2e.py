"""Swarm-consensus ensembling through Flower + Ray: 3 clients x 2 rounds of digits, a 3-member
pool, k = 2 (so one agreed member fills two slots)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fedens
from fedens.algorithms.swarm import slot_weights
from fedens.data import load_server_data
from fedens.learners import build_learner
from fedens.learners.base import predict_dataset
from fedens.metrics import classification_metrics, predictive
from fedens.payload import MEMBER_WEIGHTS
from fedens.results import read_metrics

pytestmark = pytest.mark.e2e

SWARM = {
    "name": "e2e-swarm",
    "seed": 3,
    "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "dirichlet", "alpha": 1.0}},
    "model": {"kind": "mlp", "hidden": [32]},
    "learner": {"kind": "deep_ensemble", "members": 3},
    "train": {"local_epochs": 2, "lr": 0.1},
    "strategy": {"name": "swarm", "params": {"k": 2, "T": 10}},
}


def test_swarm_runs_through_the_engine(session, tmp_path: Path):
    result = session.run(SWARM, out=tmp_path / "run")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rounds_done"] == 2
    assert read_metrics(result.run_dir) == result.rows
    for scope in ("global-test", "global-shift"):
        assert [r["round"] for r in result.scope(scope)] == [0, 1, 2]
    assert all(r["members"] == 3 for r in result.scope("global-test"))
    train = result.scope("train")
    assert [r["round"] for r in train] == [1, 2]
    for r in train:
        assert r["clients_trained"] == 3 and r["failures"] == 0
        # Plain FedAvg sends each client's model size R down twice (train + evaluate), i.e.
        # bytes_sent == 2 * bytes_received. The validation round adds, for each of the 3
        # validators, the 2 other clients' models: another 2 * R.
        assert r["bytes_sent"] > 2 * r["bytes_received"]
    # round 2 exactly; in round 1 the 3 evaluation messages carry the new global, which (unlike
    # the clients' round-1 models) has the predictive weights, 3 floats more each
    assert train[1]["bytes_sent"] == 4 * train[1]["bytes_received"]
    assert 0 < train[0]["bytes_sent"] - 4 * train[0]["bytes_received"] <= 3 * 200
    test = result.scope("global-test")
    assert test[-1]["accuracy"] > test[0]["accuracy"] + 0.3

    # the consensus facts of every round are in the run's log and in its train rows
    facts = [ast.literal_eval(m) for m in re.findall(r"swarm round \d+: (\{.*\})", (result.run_dir / "run.log").read_text())]
    assert len(facts) == 2
    assert [{k: r[k] for k in f} for r, f in zip(train, facts)] == facts
    for f in facts:
        assert 0 <= f["swarm_steps"] <= 10 and 0 <= f["swarm_agreement"] <= 1
        assert len(f["swarm_weights"]) == 2 and sum(f["swarm_weights"]) == pytest.approx(1.0)
        assert sum(f["swarm_slots"]) == 3 and set(f["swarm_member_partitions"]) <= {0, 1, 2}
        # every client's own model measured on the test set, for "ensemble vs every client"
        assert len(f["client_test_accuracy"]) == 3 and f["best_client_test_accuracy"] == max(f["client_test_accuracy"])
        assert 0 < f["best_member_test_accuracy"] <= 1

    # the global predictive weighs the agreed members by their consensus weights: the final
    # global arrays carry them per slot, and the recorded test row is that weighted mixture's
    with np.load(result.run_dir / "checkpoint.npz") as saved:  # the global model after the last round
        assert int(saved["__round__"]) == 2
        arrays = {k: saved[k] for k in saved.files if k != "__round__"}
    slot_w = arrays[MEMBER_WEIGHTS]
    np.testing.assert_allclose(slot_w, slot_weights(np.array(facts[-1]["swarm_weights"]), np.array(facts[-1]["swarm_slots"])),
                               rtol=1e-6)
    scn = fedens.load(SWARM)
    data = load_server_data(scn.data, scn.seed)
    learner = build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu"))
    learner.set_arrays(arrays)
    probs = predict_dataset(learner, data.test)
    labels = torch.from_numpy(data.test.y)
    weighted = float((predictive(probs, learner.predictive_weights).argmax(1) == labels).double().mean())
    assert test[-1]["accuracy"] == pytest.approx(weighted, abs=1e-6)
    assert float(classification_metrics(predictive(probs, learner.predictive_weights), labels)["nll"]) == pytest.approx(
        test[-1]["nll"], rel=1e-5)
