"""Conformal prediction sets through Flower + Ray: the clients' calibration messages, the
server's threshold (pooled and quantile of quantiles) checked against the same numbers computed
here from the run's final global model and the clients' validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedens
from fedens.conformal import qoq_threshold, set_metrics, split_quantile, true_scores
from fedens.data import build_federated_data, load_server_data
from fedens.learners import build_learner
from fedens.learners.base import predict_dataset
from fedens.metrics import predictive

pytestmark = pytest.mark.e2e

SCN = {
    "name": "e2e-conformal", "seed": 4, "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "dirichlet", "alpha": 1.0}, "val_fraction": 0.2},
    "model": {"kind": "mlp", "hidden": [32]}, "train": {"local_epochs": 1, "lr": 0.1},
    "evaluate": {"conformal": {"alpha": 0.1, "score": "aps"}},
}


@pytest.mark.parametrize("method", ["pooled", "quantile_of_quantiles"])
def test_conformal_threshold_and_sets_equal_an_offline_calibration(session, tmp_path: Path, method: str):
    scn_dict = {**SCN, "evaluate": {"conformal": {**SCN["evaluate"]["conformal"], "method": method}}}
    result = session.run(scn_dict, out=tmp_path / "run")
    test, shift = result.scope("global-test")[-1], result.scope("global-shift")[-1]
    assert test["conformal_clients"] == 4 and shift["conformal_coverage"] is not None

    scn = fedens.load(scn_dict)
    server = load_server_data(scn.data, scn.seed)
    learner = build_learner(scn, server.input_shape, server.num_classes, torch.device("cpu"))
    with np.load(result.run_dir / "checkpoint.npz") as saved:
        learner.set_arrays({k: saved[k] for k in saved.files if k != "__round__"})
    clients = build_federated_data(scn.data, scn.seed).clients
    scores = [true_scores(predictive(predict_dataset(learner, c.val)), torch.from_numpy(c.val.y), "aps") for c in clients]
    assert test["conformal_points"] == sum(len(s) for s in scores)
    if method == "pooled":
        q = split_quantile(np.concatenate(scores), 0.1)
    else:
        q, order = qoq_threshold([split_quantile(s, 0.1) for s in scores], [len(s) for s in scores], 0.1)
        assert test["conformal_order"] == order
    assert test["conformal_threshold"] == pytest.approx(q, abs=1e-6)
    probs = predictive(predict_dataset(learner, server.test))
    assert test["conformal_coverage"] == pytest.approx(set_metrics(probs, torch.from_numpy(server.test.y), q, "aps")["coverage"])
    assert test["conformal_worst_client_coverage"] == pytest.approx(min(float((s <= q + 1e-12).mean()) for s in scores))
    # exchangeable test data: coverage near 1 - alpha (a loose band: one draw of ~360 points)
    assert 0.8 <= test["conformal_coverage"] <= 1.0


def test_decentralized_nodes_calibrate_their_own_models(session, tmp_path: Path):
    scn_dict = {**SCN, "name": "e2e-conformal-gossip", "mode": "decentralized", "gossip": {"rule": "average"},
                "topology": {"kind": "ring"}, "evaluate": {"conformal": {"alpha": 0.1, "score": "lac"}}}
    result = session.run(scn_dict, out=tmp_path / "run")
    rows = result.scope("global-test")
    assert "conformal_coverage" not in rows[0]  # round 0: no node has calibrated yet
    scn = fedens.load(scn_dict)
    server = load_server_data(scn.data, scn.seed)
    learner = build_learner(scn, server.input_shape, server.num_classes, torch.device("cpu"))
    clients = build_federated_data(scn.data, scn.seed).clients
    coverage, size = [], []
    with np.load(result.run_dir / "checkpoint.npz") as saved:
        for pid, c in enumerate(clients):  # each node: its own model, its own split, its own threshold
            learner.set_arrays({k.split(".", 2)[2]: saved[k] for k in saved.files if k.startswith(f"node.{pid}.")})
            q = split_quantile(true_scores(predictive(predict_dataset(learner, c.val)), torch.from_numpy(c.val.y), "lac"), 0.1)
            sets = set_metrics(predictive(predict_dataset(learner, server.test)), torch.from_numpy(server.test.y), q, "lac")
            coverage.append(sets["coverage"])
            size.append(sets["size"])
    assert rows[-1]["conformal_coverage"] == pytest.approx(np.mean(coverage), abs=1e-6)
    assert rows[-1]["conformal_size"] == pytest.approx(np.mean(size), abs=1e-6)
    assert rows[-1]["conformal_worst_node_coverage"] == pytest.approx(min(coverage), abs=1e-6)
