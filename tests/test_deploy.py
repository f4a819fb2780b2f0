"""``fedens export-app``: the Flower App it writes, checked without a SuperLink (the run
through Flower's deployment engine is tests/e2e/test_deployment.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

import fedens
from fedens.checks import load_scenario
from fedens.deploy import PLUGINS, export_app
from fedens.payload import to_array
from fedens.scenario import ScenarioError

STRATEGY = "from fedens.strategies.base import FedensStrategy\n\nclass Mine(FedensStrategy):\n    pass\n"


def test_the_app_names_fedens_apps_and_carries_the_scenario_and_its_plugins(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plug.py").write_text(STRATEGY)
    (tmp_path / "plan.yaml").write_text("name: My_Plan.v2\nrounds: 2\ndata: {dataset: digits, num_clients: 3}\n"
                                        "strategy: {name: plug.py:Mine}\n")
    scn = fedens.load(tmp_path / "plan.yaml")
    app = export_app(scn, tmp_path / "app", out="/somewhere/run")
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedens.deploy:server_app",
                                                          "clientapp": "fedens.deploy:client_app"}
    assert project["project"]["name"] == "fedens-my-plan-v2"
    config = project["tool"]["flwr"]["app"]["config"]
    assert config["out"] == "/somewhere/run" and config["overwrite"] is False

    raw = json.loads(config["scenario"])
    module, name = raw["strategy"]["name"].split(":")
    assert module.startswith(f"{PLUGINS}.plug_") and name == "Mine"
    assert (app / PLUGINS / f"{module.split('.')[1]}.py").read_text() == STRATEGY
    # on a SuperLink the app's folder is first on sys.path, and the driver's file is not there
    (tmp_path / "plug.py").unlink()
    monkeypatch.syspath_prepend(str(app))
    shipped = load_scenario(raw)
    assert shipped.model_dump(exclude={"strategy"}) == scn.model_dump(exclude={"strategy"})
    from fedens.strategies import resolve_strategy

    assert resolve_strategy(shipped.strategy.name).__name__ == "Mine"


def test_bad_exports_are_refused(tmp_path: Path) -> None:
    scn = fedens.load({"name": "t", "data": {"dataset": "digits", "num_clients": 2, "server_fraction": 0.2},
                       "model": {"kind": "vit"}, "learner": {"kind": "lora_ensemble"}})
    with pytest.raises(ScenarioError, match="prepares files before the run"):
        export_app(scn, tmp_path / "lora")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "fedens.cli", "export-app", "scenarios/quickstart.yaml", str(tmp_path / "full")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: export-app {tmp_path / 'full'}: is not empty; use --overwrite to replace it"]
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"


def test_only_options_that_make_a_file_are_refused(tmp_path: Path) -> None:
    base = {"name": "t", "data": {"dataset": "digits", "num_clients": 2, "server_fraction": 0.2}}
    plain = fedens.load({**base, "learner": {"kind": "deep_ensemble", "members": 2}})
    assert (export_app(plain, tmp_path / "plain") / "pyproject.toml").is_file()  # nothing to prepare
    pretrained = fedens.load({**base, "model": {"kind": "vit"},
                              "learner": {"kind": "deep_ensemble", "members": 2, "backbone": "pretrained"}})
    with pytest.raises(ScenarioError, match="prepares files before the run"):
        export_app(pretrained, tmp_path / "pretrained")


def test_arrays_travel_as_flowers_own_array() -> None:
    """A SuperLink inflates only Flower's classes: fedens' fast Array must deflate as ``Array``."""
    a = to_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    plain = Array(a.dtype, a.shape, a.stype, a.data)
    assert a.deflate() == plain.deflate() and a.object_id == plain.object_id
    assert a.deflate().startswith(b"Array ")
