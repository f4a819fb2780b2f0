"""Every registered learner runs 3 clients x 2 rounds from a scenario through Flower + Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedens.learners import LEARNERS
from tests.learners.test_contract import SMALL

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("kind", [k for k in LEARNERS.names() if k != "single"])  # single: test_federated_run
def test_learner_runs_through_the_engine(session, kind: str, tmp_path: Path):
    extra = SMALL.get(kind, {})
    scenario = {
        "name": f"e2e-{kind}",
        "rounds": 2,
        "data": {"dataset": "digits", "num_clients": 3, "server_fraction": 0.2},
        "model": extra.get("model", {"kind": "mlp", "hidden": [32]}),
        "learner": {"kind": kind, **extra.get("learner", {})},
        "train": {"local_epochs": 1},
    }
    result = session.run(scenario, out=tmp_path / "run")
    test = result.scope("global-test")
    assert [r["round"] for r in test] == [0, 1, 2]
    for key in ("accuracy", "nll", "ece", "brier", "member_accuracy", "disagreement", "entropy",
                "mutual_information", "ood_auroc", "ood_auroc_mi", "members"):
        assert key in test[-1], key
    assert test[-1]["members"] >= 1
    train = result.scope("train")
    assert all(r["clients_trained"] == 3 and r["failures"] == 0 and r["client_bytes_up"] > 0 for r in train)
    assert test[-1]["nll"] < test[0]["nll"]
