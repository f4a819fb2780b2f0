"""End-to-end runs of ``vca`` (single learner) and the posterior strategies (ivon learner) through Flower's
simulation engine with Ray: 3 clients x 2 rounds of digits each. Also: a learner/strategy pair
``posterior_avg`` does not support is an invalid scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedens
from fedens.checks import load_scenario
from fedens.scenario import ScenarioError
from tests.e2e.test_federated_run import (
    TINY,  # the same tiny scenario as the FedAvg run
)

pytestmark = pytest.mark.e2e


def check_run(result: fedens.RunResult) -> None:
    for scope in ("global-test", "global-shift"):
        assert [r["round"] for r in result.scope(scope)] == [0, 1, 2], scope
    assert [r["round"] for r in result.scope("train")] == [1, 2]
    assert all(r["clients_trained"] == 3 and r["failures"] == 0 for r in result.scope("train"))
    test = result.scope("global-test")
    assert test[-1]["nll"] < test[0]["nll"]


@pytest.mark.parametrize("strategy, learner", [
    ({"name": "vca", "params": {"target": "others"}}, {"kind": "single"}),
    ({"name": "posterior_avg", "params": {}}, {"kind": "ivon", "samples": 4}),
    ({"name": "posterior_product", "params": {}}, {"kind": "ivon", "samples": 4}),
    ({"name": "uncertainty_merge", "params": {}}, {"kind": "ivon", "samples": 4}),
    ({"name": "ivon_admm", "params": {}}, {"kind": "ivon", "samples": 4, "hess_init": 1.0}),
], ids=["vca-single", "posterior_avg-ivon", "posterior_product-ivon", "uncertainty_merge-ivon", "ivon_admm-ivon"])
def test_strategy_runs_end_to_end(session, strategy: dict, learner: dict, tmp_path: Path):
    result = session.run({**TINY, "name": strategy["name"], "strategy": strategy, "learner": learner}, out=tmp_path / "run")
    check_run(result)


def test_posterior_avg_rejects_the_single_learner():
    with pytest.raises(ScenarioError, match="does not support learner 'single'"):
        load_scenario({**TINY, "strategy": {"name": "posterior_avg"}, "learner": {"kind": "single"}})
