"""What travels to a Ray cluster (``fedens.cluster``): the ClientApp's copy of the scenario and
the files it names, fedens' own code, and the address convention."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import fedens
from fedens.cluster import FILES, cluster_address, portable, stage_fedens
from fedens.learners import resolve_learner
from fedens.scenario import ScenarioError

LEARNER = """from fedens.learners.base import NoOptions
from fedens.learners.single import SingleLearner

class Options(NoOptions):
    backbone: str | None = None  # a prepared file, as lora_ensemble's

class Mine(SingleLearner):
    Options = Options
"""
STRATEGY = "from fedens.strategies.base import FedensStrategy\n\nclass Mine(FedensStrategy):\n    pass\n"


def _scenario(tmp_path: Path, **learner: object) -> fedens.Scenario:
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "learner.py").write_text(LEARNER)
    (tmp_path / "plug" / "strategy.py").write_text(STRATEGY)
    (tmp_path / "plan.yaml").write_text(
        "name: t\nrounds: 1\ndata: {dataset: digits, num_clients: 2}\n"
        "learner: {kind: plug/learner.py:Mine}\nstrategy: {name: plug/strategy.py:Mine}\n")
    return fedens.load(tmp_path / "plan.yaml", learner)


def test_plugin_files_and_prepared_files_travel_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scn = _scenario(tmp_path)
    backbone = tmp_path / "run" / "backbone.pt"
    backbone.parent.mkdir()
    backbone.write_bytes(b"weights")
    raw = scn.model_dump(mode="json")
    raw["learner"]["backbone"] = str(backbone)  # as lora_ensemble's prepare leaves it: an absolute path
    scn = fedens.load(raw)

    moved, shipment = portable(scn)
    file, name = moved.learner.kind.rsplit(":", 1)
    assert name == "Mine" and file.startswith(f"{FILES}/") and file.endswith("/learner.py")
    assert moved.learner.options["backbone"].startswith(f"{FILES}/") and moved.learner.options["backbone"].endswith("/backbone.pt")
    assert moved.strategy.name == scn.strategy.name  # the strategy runs on the driver: it stays
    assert moved.base_dir is None  # relative paths resolve against the actor's working directory
    assert set(shipment.files) == {file, moved.learner.options["backbone"]}

    root = tmp_path / "stage"
    root.mkdir()
    folder = shipment.stage(root)
    assert (folder / file).read_text() == LEARNER and (folder / moved.learner.options["backbone"]).read_bytes() == b"weights"
    assert shipment.stage(root) == folder  # same content: same folder, uploaded once

    # on an actor: the working directory is the shipped folder, and the driver's files are gone
    (tmp_path / "plug" / "learner.py").unlink()
    backbone.unlink()
    monkeypatch.chdir(folder)
    cls = resolve_learner(moved.learner.kind, moved.base_dir)
    assert cls.__name__ == "Mine" and Path(sys.modules[cls.__module__].__file__).is_relative_to(folder)

    # another file's content: another folder
    other = tmp_path / "other.pt"
    other.write_bytes(b"other weights")
    raw["learner"]["backbone"] = str(other)
    raw["learner"]["kind"] = moved.learner.kind  # (already relative: not shipped again)
    assert portable(fedens.load(raw))[1].stage(root) != folder


def test_the_address_comes_from_the_scenario_or_ray_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plain = fedens.load({"name": "t", "data": {"dataset": "digits", "num_clients": 2}})
    assert cluster_address(plain) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(plain) == "10.0.0.1:6379"
    assert cluster_address(fedens.load(plain, ["engine.address=head:6380"])) == "head:6380"
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own spelling of "start one here"
    assert cluster_address(plain) is None
    with pytest.raises(ScenarioError, match="ray_num_cpus sizes a local Ray"):
        fedens.load(plain, ["engine.address=head:6380", "engine.ray_num_cpus=2"])


def test_fedens_code_travels_with_its_strategies(tmp_path: Path) -> None:
    import fedens.strategies.posterior_avg as module

    folder = stage_fedens(tmp_path)
    assert folder.name == "fedens" and (folder / "cluster.py").is_file()
    assert (folder / "strategies" / "posterior_avg.py").read_text() == Path(module.__file__).read_text()
    assert not list(folder.rglob("__pycache__"))
    assert stage_fedens(tmp_path) == folder and len(os.listdir(tmp_path)) == 1  # named by content: staged once
