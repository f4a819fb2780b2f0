"""FedProx, FedDyn, FedLap, FedLap-Cov and FedADMM run 3 clients x 2 rounds from a scenario through Flower + Ray, with their
client-side terms and (FedDyn, FedLap, FedADMM) the clients' state kept in ``context.state`` across rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedens.checks import load_scenario
from fedens.scenario import ScenarioError

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name,params", [("fedprox", {"mu": 0.1}), ("feddyn", {"alpha": 0.1}), ("fedlap", {"delta": 1.0, "rho": 0.5}), ("fedadmm", {"rho": 0.01}), ("fedlap_cov", {"delta": 1.0, "rho": 1.0})])
def test_admm_family_runs(session, name: str, params: dict, tmp_path: Path):
    scenario = {
        "name": name, "rounds": 2,
        "data": {"dataset": "digits", "num_clients": 3},
        "model": {"kind": "mlp", "hidden": [32]},
        "strategy": {"name": name, "params": params},
    }
    result = session.run(scenario, out=tmp_path / "run")
    test = result.scope("global-test")
    assert [r["round"] for r in test] == [0, 1, 2]
    assert test[-1]["nll"] < test[0]["nll"] and test[-1]["accuracy"] > test[0]["accuracy"]
    assert all(r["failures"] == 0 for r in result.scope("train"))


def test_unsupported_learner_is_an_invalid_scenario():
    with pytest.raises(ScenarioError, match="strategy 'feddyn' does not support learner 'ivon'"):
        load_scenario({"learner": {"kind": "ivon"}, "strategy": {"name": "feddyn"}})
