"""Signals end to end: ``fedens run`` in a child process, stopped mid-run as a user (Ctrl-C), a
scheduler (SIGTERM) or the kernel (``kill -9``) would stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedens.results import read_metrics, run_status
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

LONG = {
    "name": "long",
    "seed": 1,
    "rounds": 200,
    "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "dirichlet", "alpha": 1.0}},
    "model": {"kind": "mlp", "hidden": [32]},
    "train": {"local_epochs": 1, "lr": 0.1},
    "evaluate": {"every": 1},
}


def ray_processes() -> set[int]:
    """Pids of Ray's daemons and workers on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"raylet" in cmd or b"gcs_server" in cmd or b"ray::" in cmd or b"default_worker.py" in cmd:
            found.add(int(entry.name))
    return found


def start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    scn = tmp_path / "long.yaml"
    scn.write_text(yaml.safe_dump(LONG))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedens.cli", "run", str(scn), "--out", str(out), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # until round 2's rows are written: the run is in its rounds
        if (out / "metrics.jsonl").exists() and any(r["round"] >= 2 for r in read_metrics(out)):
            return proc, out
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no round 2 within 120 s")


def gone(pids: set[int], within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not (ray_processes() & pids):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_as_interrupted(tmp_path: Path, sig: int, code: int):
    before = ray_processes()
    temp_before = set(Path("/tmp").glob("fedens-data-*"))
    proc, out = start(tmp_path)
    ours = ray_processes() - before
    assert ours, "the child started no Ray processes?"
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    took = time.time() - t0
    assert proc.returncode == code and took < 10, (proc.returncode, took, err)
    assert "Traceback" not in err and "interrupted" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_done"] >= 2
    assert gone(ours, 10), "Ray processes left behind"
    assert set(Path("/tmp").glob("fedens-data-*")) <= temp_before
    rows = read_metrics(out)  # every row written is whole
    assert rows and all("round" in r for r in rows)


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path: Path):
    proc, out = start(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None


def test_after_kill_9_the_folder_says_interrupted_and_resumes(tmp_path: Path):
    before = ray_processes()
    proc, out = start(tmp_path)
    ours = ray_processes() - before
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # what kill -9 leaves
    assert run_status(out) == "interrupted"  # its process is gone
    refused = subprocess.run([sys.executable, "-m", "fedens.cli", "run", str(tmp_path / "long.yaml"), "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "interrupted" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert gone(ours, 60), "Ray processes orphaned by kill -9"
