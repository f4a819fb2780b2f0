"""End-to-end runs through Flower's real simulation engine with the Ray backend.

Each run starts Ray and its actors (about 15-25 s here), so the scenarios are tiny: 3 clients,
2 rounds of digits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedens
from fedens.results import read_metrics
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

TINY = {
    "name": "tiny",
    "seed": 3,
    "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "dirichlet", "alpha": 1.0}},
    "model": {"kind": "mlp", "hidden": [32]},
    "train": {"local_epochs": 2, "lr": 0.1},
}
EVAL_KEYS = {"round", "scope", "time_s", "accuracy", "nll", "ece", "brier"}


@pytest.fixture(scope="module")
def tiny_run(session, tmp_path_factory: pytest.TempPathFactory) -> fedens.RunResult:
    return session.run(TINY, out=tmp_path_factory.mktemp("tiny") / "run")


def test_run_folder_has_every_file(tiny_run: fedens.RunResult):
    for name in ("scenario.yaml", "metrics.jsonl", "summary.json", "convergence.png", "reliability.png", "checkpoint.npz", "run.log"):
        assert (tiny_run.run_dir / name).stat().st_size > 0, name
    # the resolved scenario is a valid scenario equal to what ran
    assert fedens.load(tiny_run.run_dir / "scenario.yaml").model_dump() == tiny_run.scenario.model_dump()
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rounds_done"] == 2 and summary["versions"]["flwr"].startswith("1.41")


def test_metrics_rows_for_rounds_0_to_2(tiny_run: fedens.RunResult):
    rows = read_metrics(tiny_run.run_dir)
    assert rows == tiny_run.rows
    for scope in ("global-test", "global-shift"):
        got = [r for r in rows if r["scope"] == scope]
        assert [r["round"] for r in got] == [0, 1, 2]
        for r in got:
            assert EVAL_KEYS <= r.keys()
            assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 <= r["brier"] <= 2
    clients = tiny_run.scope("clients")
    assert [r["round"] for r in clients] == [1, 2] and all(r["num_clients"] == 3 for r in clients)
    assert all(r["accuracy_worst"] <= r["accuracy"] and r["ece_worst"] >= r["ece"] for r in clients)
    train = tiny_run.scope("train")
    assert [r["round"] for r in train] == [1, 2]
    # MLP 64-32-10: (64*32 + 32 + 32*10 + 10) float32 = 9,736 bytes of weights per model copy;
    # each round sends it to 3 clients for training and 3 for evaluation, and gets 3 back
    # (plus the .npy header of each of the 4 arrays).
    weights = (64 * 32 + 32 + 32 * 10 + 10) * 4
    for r in train:
        assert r["clients_trained"] == 3 and r["failures"] == 0
        assert 3 * weights < r["bytes_received"] < 3 * (weights + 4 * 160)
        assert r["bytes_sent"] == 2 * r["bytes_received"]


def test_training_beats_round_zero(tiny_run: fedens.RunResult):
    test = tiny_run.scope("global-test")
    assert test[-1]["accuracy"] > test[0]["accuracy"] + 0.3
    assert test[-1]["nll"] < test[0]["nll"]


def test_same_seed_same_numbers(session, tiny_run: fedens.RunResult, tmp_path: Path):
    again = session.run(TINY, out=tmp_path / "again")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(again.rows) == strip(tiny_run.rows)


def test_warm_run_equals_cold_run(session, tiny_run: fedens.RunResult, tmp_path: Path):
    """A run in the warm session, after other runs have used its actors (other learners,
    strategies and data), gives exactly the rows of the same scenario run cold on its own
    (the CLI in a fresh process, which starts its own Ray). The scenario keeps client state
    (FedDyn's duals) and samples clients, so a stale context, learner or data build would show."""
    scn = {**TINY, "name": "warm-cold", "rounds": 3, "fraction_train": 0.67,
           "strategy": {"name": "feddyn", "params": {"alpha": 0.01}}, "data": {**TINY["data"], "num_clients": 4}}
    session.run({**TINY, "learner": {"kind": "deep_ensemble", "members": 2}}, out=tmp_path / "other")
    warm = session.run(scn, out=tmp_path / "warm")
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(scn))
    proc = subprocess.run([sys.executable, str(ROOT / "run_sim.py"), str(path), "--out", str(tmp_path / "cold"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    cold = read_metrics(tmp_path / "cold")
    assert len(cold) == len(warm.rows) > 0 and strip(cold) == strip(warm.rows)
    assert [r["clients_trained"] for r in warm.scope("train")] == [2, 2, 2]  # int(0.67 * 4): sampling is exercised


def test_plugin_strategy_by_path_and_failure_keeps_finished_rounds(tmp_path: Path):
    """The example plug-in runs from YAML by path; a strategy that fails in round 2 ends the
    CLI with exit 1, names the log, and keeps rounds 0 and 1."""
    (tmp_path / "failing.py").write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from examples.custom_strategy import DampedFedAvg\n"
        "class FailsInRound2(DampedFedAvg):\n"
        "    def aggregate_train(self, server_round, replies):\n"
        "        if server_round == 2:\n"
        "            raise RuntimeError('boom in round 2')\n"
        "        return super().aggregate_train(server_round, replies)\n",
        encoding="utf-8",
    )
    scenario = tmp_path / "s.yaml"
    scenario.write_text(json.dumps({**TINY, "rounds": 3, "strategy": {"name": "failing.py:FailsInRound2", "params": {"mix": 0.5}}}))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "run_sim.py"), str(scenario), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "boom in round 2" in proc.stderr and str(out / "run.log") in proc.stderr and "Traceback" not in proc.stderr
    rows = read_metrics(out)
    assert sorted({r["round"] for r in rows if r["scope"] == "global-test"}) == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom in round 2" in summary["error"] and summary["rounds_done"] == 1
    assert (out / "convergence.png").exists()


def _descendants_cmdlines(root: int) -> list[str]:
    import os

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except OSError:
                pass
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


def test_ray_starts_without_unused_services(session, tiny_run: fedens.RunResult):
    """The engine's Ray head has no dashboard API server, no autoscaler monitor and no log
    monitor (ray.init starts all three even with include_dashboard=False)."""
    import os

    cmdlines = _descendants_cmdlines(os.getpid())
    assert any("raylet" in c for c in cmdlines) and any("gcs_server" in c for c in cmdlines)
    for service in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "_private/log_monitor.py"):
        assert not any(service in c for c in cmdlines), service


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_share_puts_members_and_data_on_the_actors_gpu(session, tmp_path: Path):
    """With resources.num_gpus > 0 the actors get a GPU share (Ray sets CUDA_VISIBLE_DEVICES)
    and the learner trains on CUDA; the numbers are those of a CPU run up to float rounding."""
    gpu = session.run({**TINY, "resources": {"num_cpus": 1, "num_gpus": 0.5}}, out=tmp_path / "gpu")
    cpu = session.run(TINY, out=tmp_path / "cpu")
    assert gpu.summary["status"] == "ok"
    assert gpu.final["global-test"]["accuracy"] == pytest.approx(cpu.final["global-test"]["accuracy"], abs=0.03)


def test_comparison_over_seeds_resumes_and_reruns_what_changed(session, tmp_path: Path):
    """Two variants x two seeds through the engine: runs.csv, the statistics and the plots;
    the same command again runs nothing; a changed variant runs again, the other does not."""
    from fedens.compare import run_comparison

    (tmp_path / "base.yaml").write_text(json.dumps(TINY))
    cmp = tmp_path / "cmp.yaml"
    cmp.write_text("name: c\nbase: base.yaml\nseeds: 2\nreference: a\nvariants: {a: {}, b: {train: {lr: 0.05}}}\n")
    out = tmp_path / "out"
    report = run_comparison(cmp, out, session=session, progress=False)
    for name in ("runs.csv", "comparison.md", "comparison.json", "comparison.png", "reliability.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed-*")) == ["a/seed-0", "a/seed-1", "b/seed-0", "b/seed-1"]
    assert report["variants"]["a"]["test_accuracy"]["n"] == 2 and report["versus_reference"]["b"]["test_accuracy"]["n"] == 2
    lines = (out / "runs.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("variant,seed,status,test_accuracy")
    stamp = (out / "a" / "seed-0" / "summary.json").stat().st_mtime_ns
    again = run_comparison(cmp, out, session=session, progress=False)  # nothing to run
    assert again["variants"] == report["variants"]
    assert (out / "a" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp
    cmp.write_text("name: c\nbase: base.yaml\nseeds: 2\nreference: a\nvariants: {a: {}, b: {train: {lr: 0.2}}}\n")
    run_comparison(cmp, out, session=session, progress=False)
    assert (out / "a" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp
    assert "lr: 0.2" in (out / "b" / "seed-1" / "scenario.yaml").read_text()
