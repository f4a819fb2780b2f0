"""A throw-away multi-node Ray cluster on this machine, for the cluster tests.

Each node is a ``ray start --block`` process in a process group of its own (so stopping the
cluster kills exactly its processes and never another Ray on the machine, such as the suite's
warm engine), with every port chosen free and a temp folder of its own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to each process's group (the last started first), up to ``grace`` seconds for
    each to exit, then SIGKILL to every group, for what a process left behind in it."""
    for proc in reversed(procs):
        _kill_group(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _kill_group(proc, signal.SIGKILL)


def _ports() -> list[str]:
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


class RayCluster:
    """``RayCluster(cpus=[1, 1], env={...})``: a head with ``cpus[0]`` CPUs and one worker node
    per further entry; ``env`` is added to every node's environment (its Ray workers inherit
    it). ``address`` is the head's ``host:port``; ``stop()`` ends every node."""

    def __init__(self, cpus: list[int], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        try:
            self._node(["--head", "--port", str(self.port), "--ray-client-server-port", str(free_port()),
                        "--include-dashboard=false", "--temp-dir", str(self.temp)], cpus[0])
            self.wait_nodes(1)
            for n in cpus[1:]:
                self._node(["--address", self.address], n)
            self.wait_nodes(len(cpus))
        except BaseException:
            self.stop()
            raise

    def _node(self, args: list[str], cpus: int) -> None:
        log = open(self.temp / f"node-{len(self.procs)}.log", "w")  # noqa: SIM115
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus", str(cpus), "--num-gpus", "0", *_ports(), *args]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait_nodes(self, n: int, timeout: float = 120.0) -> None:
        """Until the first ``n`` nodes say they are up (``ray start`` prints "Ray runtime
        started" once its node has registered with the head)."""
        deadline = time.time() + timeout
        logs = [self.temp / f"node-{i}.log" for i in range(n)]
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Ray node exited: {self.log()}")
            if all(log.is_file() and "Ray runtime started" in log.read_text() for log in logs):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes: {self.log()}")

    def log(self) -> str:
        return " | ".join(p.read_text()[-800:] for p in sorted(self.temp.glob("node-*.log")))

    def stop(self) -> None:
        stop_groups(self.procs, grace=30.0)
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
