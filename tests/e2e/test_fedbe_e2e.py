"""FedBE through Flower + Ray: 3 clients x 2 rounds of digits, distilling on the public split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedens
from fedens.results import read_metrics

pytestmark = pytest.mark.e2e

FEDBE = {
    "name": "e2e-fedbe",
    "seed": 3,
    "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "server_fraction": 0.2,
             "partition": {"kind": "dirichlet", "alpha": 1.0}},
    "model": {"kind": "mlp", "hidden": [32]},
    "train": {"local_epochs": 2, "lr": 0.1},
    "strategy": {"name": "fedbe", "params": {"num_samples": 4, "distill_epochs": 3}},
}


def test_fedbe_runs_through_the_engine(session, tmp_path: Path):
    result = session.run(FEDBE, out=tmp_path / "run")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rounds_done"] == 2
    assert read_metrics(result.run_dir) == result.rows
    for scope in ("global-test", "global-shift"):
        assert [r["round"] for r in result.scope(scope)] == [0, 1, 2]
    assert [r["round"] for r in result.scope("train")] == [1, 2]
    assert all(r["clients_trained"] == 3 and r["failures"] == 0 for r in result.scope("train"))
    test = result.scope("global-test")
    assert test[-1]["accuracy"] > test[0]["accuracy"] + 0.3
    assert test[-1]["nll"] < test[0]["nll"]


def test_fedbe_without_a_public_split_fails_with_the_fix(session, tmp_path: Path):
    """Validation (``FedBE.check_scenario``) refuses it before anything runs, naming the fix;
    no run folder is made."""
    no_public = {**FEDBE, "data": {**FEDBE["data"], "server_fraction": 0.0}}
    with pytest.raises(fedens.ScenarioError, match=r"data\.server_fraction: .*set data\.server_fraction > 0"):
        session.run(no_public, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
