"""A throw-away plug-in of every kind, each one new file used by path from a scenario in
another folder: a dataset, a model, a learner, a strategy and a gossip rule. Validation
resolves them against the scenario's folder, and a run goes through the engine with them (the
Ray actors import them by their absolute paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import fedens
from fedens.results import read_metrics

pytestmark = pytest.mark.e2e

DATASET = '''
import numpy as np
from pydantic import BaseModel
from fedens.data.base import ArrayDataset, DatasetSpec

class Options(BaseModel):
    n: int = 300

def load(o, seed):
    rng = np.random.default_rng(7)
    y = np.arange(o.n) % 3
    x = (rng.normal(size=(o.n, 6)) + 3.0 * np.eye(3, 6)[y]).astype(np.float32)
    return ArrayDataset(x, y.astype(np.int64))

BLOBS = DatasetSpec(Options, load, lambda o: (6,), lambda o: 3)
'''
MODEL = '''
from pydantic import BaseModel
from torch import nn
from fedens.models import ModelSpec

class Options(BaseModel):
    width: int = 8

def build(o, input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], o.width), nn.ReLU(), nn.Linear(o.width, num_classes))

TINY = ModelSpec(Options=Options, build=build)
'''
LEARNER = '''
from fedens.learners.single import SingleLearner

class Plain(SingleLearner):
    """A single network under another name."""
'''
STRATEGY = '''
from fedens.strategies.base import FedensStrategy, weighted_average

class Average(FedensStrategy):
    """FedAvg written out."""

    def aggregate_arrays(self, server_round, arrays, weights):
        return weighted_average(arrays, weights)
'''
RULE = '''
from pydantic import Field
from fedens.decentralized.rules import Average, AverageOptions

class HalfOptions(AverageOptions):
    self_weight: float | None = Field(0.5, ge=0, le=1)

class Half(Average):
    Options = HalfOptions
'''


@pytest.fixture()
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "study"
    (folder / "plugins").mkdir(parents=True)
    for name, text in (("data.py", DATASET), ("model.py", MODEL), ("learner.py", LEARNER), ("strategy.py", STRATEGY),
                       ("rule.py", RULE)):
        (folder / "plugins" / name).write_text(text)
    monkeypatch.chdir(tmp_path)  # not the scenario's folder: paths must resolve against the scenario
    return folder


BASE = {"rounds": 2, "seed": 1, "data": {"dataset": "plugins/data.py:BLOBS", "num_clients": 3, "params": {"n": 240}},
        "model": {"kind": "plugins/model.py:TINY", "width": 12}, "learner": {"kind": "plugins/learner.py:Plain"},
        "train": {"lr": 0.2, "local_epochs": 2}}


def test_every_kind_of_plugin_runs_from_a_scenario(session, study: Path):
    path = study / "federated.yaml"
    path.write_text(yaml.safe_dump({**BASE, "name": "plugins", "strategy": {"name": "plugins/strategy.py:Average"}}))
    scn = fedens.load(path)
    assert Path(scn.data.dataset.split(":")[0]).is_absolute() and Path(scn.model.kind.split(":")[0]).is_absolute()
    result = session.run(path, out=study / "run-federated")
    assert result.summary["status"] == "ok" and result.final["global-test"]["accuracy"] > 0.8  # 3 separable blobs

    path = study / "gossip.yaml"
    path.write_text(yaml.safe_dump({**BASE, "name": "plugins-gossip", "mode": "decentralized",
                                    "gossip": {"rule": "plugins/rule.py:Half"}}))
    result = session.run(path, out=study / "run-gossip")
    assert result.summary["status"] == "ok"
    gossip = [r for r in read_metrics(result.run_dir) if r["scope"] == "gossip"]
    # round 1: nothing received yet (weight 1 on the own model); round 2: the plug-in's 0.5, not average's 1/3
    assert [(r["rule_received"], r["rule_self_weight"]) for r in gossip[1:]] == [(0.0, 1.0), (2.0, 0.5)]


def test_a_plugin_of_the_wrong_kind_is_refused(study: Path):
    path = study / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"kind": "plugins/data.py:BLOBS"}}))
    with pytest.raises(fedens.ScenarioError, match="model.kind: .* is not a fedens.models.ModelSpec"):
        fedens.load(path)
