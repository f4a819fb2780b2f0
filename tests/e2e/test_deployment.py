"""Flower's deployment engine: ``fedens export-app`` writes a Flower App, and ``flwr run``
runs it against a SuperLink with three SuperNodes on this machine (each SuperNode simulates the
partition of its node config). The deployed run computes what the simulated run computes: its
rows are identical but for wall times."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedens.results import read_metrics

from .flower_deployment import FlowerDeployment

pytestmark = pytest.mark.e2e
REPO = Path(__file__).parents[2]
SETTINGS = ["rounds=3", "data.num_clients=3"]


def test_quickstart_through_flwr_run_equals_the_simulation(session, tmp_path: Path) -> None:
    app, out = tmp_path / "app", tmp_path / "deployed"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "fedens.cli", "export-app", str(REPO / "scenarios/quickstart.yaml"), str(app),
                           "--out", str(out), *sets], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (app / "pyproject.toml").is_file() and (app / "scenario.yaml").is_file()

    with FlowerDeployment(3) as flower:
        run_id = flower.run(app)
        deadline = time.time() + 600
        status = "running"
        while time.time() < deadline and status == "running":
            time.sleep(1.0)
            if (out / "summary.json").is_file():
                status = json.loads((out / "summary.json").read_text())["status"]
        for _ in range(60):  # Flower marks the run finished a moment after the ServerApp returns
            listed = json.loads(flower.flwr("ls", "test", "--run-id", run_id, "--format", "json").stdout)
            if listed["runs"][0]["status"].startswith("finished"):
                break
            time.sleep(1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert status == "ok", (summary["error"], flower.log())
    assert listed["runs"][0]["status"] == "finished:completed"
    assert summary["engine"]["deployment"] is True

    simulated = session.run(REPO / "scenarios/quickstart.yaml", SETTINGS, out=tmp_path / "simulated")
    comparable = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "train_time_s")} for r in rows]  # noqa: E731
    assert comparable(read_metrics(out)) == comparable(simulated.rows)
