"""A throw-away Flower deployment on this machine, for the deployment tests: a SuperLink and
one SuperNode per partition, each in a process group and a ``FLWR_HOME`` of its own (so no
two processes install the same app into one folder, and the user's ``~/.flwr`` is untouched),
and a ``flwr`` CLI configured to reach the SuperLink as the connection ``test``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .ray_cluster import free_port, stop_groups

BIN = Path(sys.executable).parent


class FlowerDeployment:
    def __init__(self, num_nodes: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flwr-"))
        self.port = free_port()
        self.env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the daemons start flower-superexec by name
        self.procs: list[subprocess.Popen] = []
        try:
            self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--disable-runtime-dependency-installation"])
            self._wait(lambda: self._healthy(self.port), "the SuperLink")
            for i in range(num_nodes):
                self._start(f"node-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                          "--host", "127.0.0.1", "--port", str(free_port()),
                                          "--node-config", f"partition-id={i} num-partitions={num_nodes}"])
            self._wait(lambda: all("SuperNode ID" in (self.root / f"node-{i}.log").read_text() for i in range(num_nodes)),
                       "the SuperNodes")
            cli = self.root / "cli"
            cli.mkdir()
            (cli / "config.toml").write_text(
                f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
            self.cli_env = {**self.env, "FLWR_HOME": str(cli)}
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, cmd: list[str]) -> None:
        home = self.root / f"{name}-home"
        home.mkdir()
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115
        self.procs.append(subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env={**self.env, "FLWR_HOME": str(home)},
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root))

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, ready, what: str, timeout: float = 120.0) -> None:  # noqa: ANN001
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Flower process exited while waiting for {what}: {self.log()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up: {self.log()}")

    def log(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.cli_env, capture_output=True, text=True, timeout=timeout)

    def run(self, app: Path) -> str:
        """Submit ``app`` (``flwr run APP test``); returns the run id."""
        done = self.flwr("run", str(app), "test", "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return str(json.loads(done.stdout)["run-id"])

    def stop(self) -> None:
        stop_groups(self.procs, grace=20.0)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
