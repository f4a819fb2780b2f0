"""Wall time of one scenario on the three engines, side by side in one run: the simulation
engine on a local Ray, the same on a two-node Ray cluster on this machine (``engine.address``,
one CPU per node, so the same two actors), and Flower's deployment engine (``fedens
export-app`` + ``flwr run``, a SuperLink and one SuperNode per client). Each is a fresh
``fedens`` process, start-up included; the cluster's and the deployment's own start-up (``ray
start``, the SuperLink and SuperNodes) is not.

    python bench/bench_cluster.py [--rounds 3] [--clients 3] [--no-deployment]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.flower_deployment import FlowerDeployment  # noqa: E402
from tests.e2e.ray_cluster import RayCluster  # noqa: E402


def fedens(*args: str) -> float:
    t = time.perf_counter()
    extra = ["--no-progress"] if args[0] == "run" else []
    done = subprocess.run([sys.executable, "-m", "fedens.cli", *args, *extra], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--no-deployment", action="store_true")
    args = ap.parse_args()
    sets = ["--set", f"rounds={args.rounds}", "--set", f"data.num_clients={args.clients}"]
    tmp = Path(tempfile.mkdtemp())
    times: dict[str, float] = {"simulation, local Ray": fedens("run", "scenarios/quickstart.yaml", *sets, "--out", str(tmp / "local"))}
    with RayCluster([1, 1]) as cluster:
        times["simulation, 2-node Ray cluster"] = fedens("run", "scenarios/quickstart.yaml", *sets, "--set",
                                                         f"engine.address={cluster.address}", "--out", str(tmp / "cluster"))
    if not args.no_deployment:
        out = tmp / "deployed"
        fedens("export-app", "scenarios/quickstart.yaml", str(tmp / "app"), *sets, "--out", str(out))
        with FlowerDeployment(args.clients) as flower:
            t = time.perf_counter()
            flower.run(tmp / "app")
            while not (out / "summary.json").is_file() or json.loads((out / "summary.json").read_text())["status"] == "running":
                time.sleep(0.5)
            times["Flower deployment engine (flwr run)"] = time.perf_counter() - t
    base = times["simulation, local Ray"]
    print(f"quickstart, {args.clients} clients, {args.rounds} rounds (wall time, start-up included)")
    for name, seconds in times.items():
        print(f"  {name:38s} {seconds:7.1f} s   x{seconds / base:.2f}")


if __name__ == "__main__":
    main()
