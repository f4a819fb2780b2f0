"""Runs on an existing multi-node Ray cluster (``engine.address``): a head and a worker node
started by the test on this machine, each with one CPU, so a pool of two actors spans both.

The plug-ins (a learner, a model and a strategy) live in a folder that the cluster's processes
refuse to import from: every plug-in file raises ImportError when it is imported on a cluster
node from its own path, and the learner refuses a backbone read from the driver's run folder.
A run that loaded anything by the driver's paths on an actor would fail there; the run
succeeds only with the shipped copies (``fedens.cluster``). Its rows equal the same run's in a
local Ray, and its results land in the driver's run folder. A run whose cluster is stopped
mid-run fails with exit 1, one line, and keeps its finished rounds."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedens.results import read_metrics

from .ray_cluster import RayCluster

pytestmark = pytest.mark.e2e

GUARD = '''
import os
from pathlib import Path

HIDDEN = os.environ.get("FEDENS_TEST_HIDDEN")  # set only on the cluster's nodes


def hidden(path) -> bool:
    return bool(HIDDEN) and Path(path).resolve().is_relative_to(Path(HIDDEN).resolve())


if hidden(__file__):
    raise ImportError(f"{__file__} imported by the driver's path on a cluster node")
'''
LEARNER = GUARD + '''
from fedens.learners.lora_ensemble import LoRAEnsembleLearner


class Lora(LoRAEnsembleLearner):
    """LoRA-Ensemble that refuses a backbone it would read by the driver's path on a node."""

    def __init__(self, model_fn, options, train, device):
        if hidden(options.backbone):
            raise RuntimeError(f"backbone {options.backbone} read by the driver's path on a cluster node")
        super().__init__(model_fn, options, train, device)
'''
MODEL = GUARD + '''
from pydantic import BaseModel
from fedens.models import ModelSpec
from fedens.models.vit import ViT, ViTOptions


class Options(BaseModel):
    dim: int = 16


def build(o, input_shape, num_classes):
    return ViT(ViTOptions(patch=2, dim=o.dim, depth=1, heads=2), input_shape, num_classes)


TINY_VIT = ModelSpec(Options=Options, build=build)
'''
STRATEGY = GUARD + '''
from fedens.strategies.base import FedensStrategy, weighted_average


class Average(FedensStrategy):
    """FedAvg written out."""

    def aggregate_arrays(self, server_round, arrays, weights):
        return weighted_average(arrays, weights)
'''
SCENARIO = {
    "name": "cluster", "seed": 3, "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "dirichlet", "alpha": 0.5},
             "server_fraction": 0.2},
    "model": {"kind": "plugins/model.py:TINY_VIT"},
    "learner": {"kind": "plugins/learner.py:Lora", "members": 2, "rank": 2, "pretrain_epochs": 2},
    "train": {"local_epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 0.001},
    "strategy": {"name": "plugins/strategy.py:Average"},
}


def _study(folder: Path) -> Path:
    (folder / "plugins").mkdir(parents=True)
    for name, text in (("learner.py", LEARNER), ("model.py", MODEL), ("strategy.py", STRATEGY)):
        (folder / "plugins" / name).write_text(text)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    return path


def _fedens(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedens.cli", *args, "--no-progress"], capture_output=True, text=True,
                          timeout=timeout)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time_s", "train_time_s")} for r in rows]


@pytest.fixture(scope="module")
def hidden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hidden")


@pytest.fixture(scope="module")
def cluster(hidden: Path):
    with RayCluster([1, 1], env={"FEDENS_TEST_HIDDEN": str(hidden)}) as c:
        yield c


def test_run_on_a_cluster_equals_the_local_run(cluster: RayCluster, hidden: Path, session, tmp_path: Path) -> None:
    study = _study(hidden / "study")
    out = hidden / "runs" / "on-cluster"  # the driver's run folder, which the nodes must not read
    done = _fedens("run", str(study), "--set", f"engine.address={cluster.address}", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["engine"] == {"address": cluster.address, "nodes": 2, "actors": 2, "actor_nodes": 2}
    rows = read_metrics(out)
    assert [r["failures"] for r in rows if r["scope"] == "train"] == [0, 0]
    for name in ("metrics.jsonl", "summary.json", "scenario.yaml", "run.log", "backbone.pt", "convergence.png"):
        assert (out / name).is_file(), name

    local = session.run(study, out=tmp_path / "local")  # the same scenario on the suite's local Ray
    assert _comparable(rows) == _comparable(local.rows)

    # the cluster is left running
    socket.create_connection(("127.0.0.1", cluster.port), timeout=5).close()
    assert all(p.poll() is None for p in cluster.procs)


def test_a_run_whose_cluster_is_stopped_fails_with_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RayCluster([1, 1]) as c:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedens.cli", "run", "scenarios/quickstart.yaml", "--no-progress", "--set", "rounds=500",
             "--set", f"engine.address={c.address}", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and any(r["round"] >= 2 for r in read_metrics(out)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        c.stop()
        stopped = time.time()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert time.time() - stopped < 60  # before Ray's driver gives up on the cluster and ends the process
    # Clients on the stopped nodes may fail before the driver sees the head go: each such round
    # says so in one line first (a real failure, counted in its row); nothing else may come.
    lines = err.strip().splitlines()
    while lines and re.fullmatch(r"round \d+: clients: \d+ failed \(see run\.log\)", lines[0]):
        lines.pop(0)
    assert lines, err
    first, *rest = lines
    assert first.startswith("error: run failed: EngineError: the Ray cluster at") and "went away" in first, err
    assert len(rest) == 1 and rest[0].strip().startswith("see "), err  # the pointer to run.log, nothing else
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "went away" in summary["error"]
    assert summary["rounds_done"] >= 2  # the finished rounds are kept
    assert len([r for r in read_metrics(out) if r["scope"] == "global-test"]) >= 3
