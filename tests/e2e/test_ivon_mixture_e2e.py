"""The IVON mixture through Flower + Ray: federated under posterior averaging (component k merged
with component k) and in gossip mode; the recorded predictive is the weighted mixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

SCN = {
    "name": "e2e-ivon-mixture", "seed": 4, "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "iid"}},
    "model": {"kind": "mlp", "hidden": [32]},
    "learner": {"kind": "ivon_mixture", "components": 2, "samples": 4, "temperature": 2.0, "anneal_rounds": 1},
    "train": {"local_epochs": 2},
}


def test_federated_mixture_under_posterior_averaging(session, tmp_path: Path):
    run = session.run({**SCN, "strategy": {"name": "posterior_avg"}}, out=tmp_path / "fed")
    rows = run.scope("global-test")
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["members"] == 8 for r in rows)
    assert rows[-1]["accuracy"] > 0.8
    final = dict(np.load(tmp_path / "fed" / "checkpoint.npz"))
    weights = final["member_weights"]
    assert weights.shape == (2,) and weights.sum() == pytest.approx(1.0, abs=1e-6) and (weights > 0).all()
    for role in ("mean", "precision"):
        assert {k.split(".")[2] for k in final if k.startswith(f"{role}.member.")} == {"0", "1"}


def test_gossip_mixture(session, tmp_path: Path):
    scn = {**SCN, "mode": "decentralized", "topology": {"kind": "ring"}, "gossip": {"rule": "average"}}
    run = session.run(scn, out=tmp_path / "gossip")
    rows = run.scope("global-test")
    assert rows[-1]["accuracy"] > 0.7
