"""The documentation's custom strategy (docs/writing-a-strategy.md) runs from YAML by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_clipped_fedavg_math():
    from examples.clipped_fedavg import ClippedFedAvg

    s = ClippedFedAvg(clip=1.0)
    s.global_arrays = {"w": np.zeros(2, np.float32)}
    # updates (3, 4) (norm 5 -> scaled by 1/5) and (0.6, 0) (norm 0.6, kept); equal weights
    new = s.aggregate_arrays(1, [{"w": np.array([3.0, 4.0], np.float32)}, {"w": np.array([0.6, 0.0], np.float32)}],
                             np.array([0.5, 0.5]))
    assert s.clipped == pytest.approx([0.2, 1.0])
    assert new["w"] == pytest.approx([0.5 * 0.6 + 0.5 * 0.6, 0.5 * 0.8])


def test_clipped_fedavg_runs_from_yaml_by_path(session, tmp_path: Path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: clipped\nrounds: 2\n"
        "data: {dataset: digits, num_clients: 3}\n"
        "model: {kind: mlp, hidden: [32]}\n"
        f"strategy: {{name: {ROOT / 'examples/clipped_fedavg.py'}:ClippedFedAvg, params: {{clip: 5.0}}}}\n",
        encoding="utf-8",
    )
    result = session.run(scenario, out=tmp_path / "run")
    test = result.scope("global-test")
    assert [r["round"] for r in test] == [0, 1, 2] and test[-1]["accuracy"] > test[0]["accuracy"]
