"""The run folder: ``scenario.yaml``, ``metrics.jsonl``, ``summary.json``, plots, checkpoint, log.

Rows are appended and flushed as each round finishes and the checkpoint is replaced
atomically, so a run that dies mid-way keeps every finished round; ``finish`` (called on
success and on failure) writes the summary and the plots from whatever rounds exist.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedens.scenario import Scenario

# Decentralized mode adds nodes-val (the nodes' own validation splits) and gossip (consensus
# distance, layer variance, mailbox counters); its global-test is the mean over the nodes' models.
EVAL_SCOPES = ("global-test", "global-shift", "clients", "nodes-val", "gossip")


def make_run_dir(scn: Scenario, out: str | Path | None = None) -> Path:
    """``out`` exactly when given, else ``<output.dir>/<name>-<UTC timestamp>``."""
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        out = Path(scn.output.dir) / f"{scn.name}-{stamp}"
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunRecorder:
    """Writes one run's folder. Not thread-safe; the ServerApp thread is its only writer."""

    def __init__(self, run_dir: Path, scn: Scenario) -> None:
        self.dir = Path(run_dir)
        self.scn = scn
        self.rows: list[dict[str, Any]] = []
        self.reliability: dict[str, Any] | None = None
        self.started = time.time()
        (self.dir / "scenario.yaml").write_text(scn.to_yaml(), encoding="utf-8")
        self._metrics = open(self.dir / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self._log_handler = logging.FileHandler(self.dir / "run.log", encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._log_handler.setLevel(logging.DEBUG)
        for name in ("flwr", "fedens"):
            logging.getLogger(name).addHandler(self._log_handler)
        self._board = TensorBoard(self.dir / "tensorboard") if scn.output.tensorboard else None

    @property
    def log_path(self) -> Path:
        return self.dir / "run.log"

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        self.rows.extend(rows)
        if self._board is not None:
            self._board.rows(rows)

    def save_checkpoint(self, arrays: Mapping[str, np.ndarray], server_round: int) -> None:
        tmp = self.dir / "checkpoint.tmp.npz"
        np.savez(tmp, **{"__round__": np.array(server_round)}, **dict(arrays))
        os.replace(tmp, self.dir / "checkpoint.npz")

    def final_metrics(self) -> dict[str, dict[str, Any]]:
        """The last row of every evaluation scope."""
        last: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            if row["scope"] in EVAL_SCOPES:
                last[row["scope"]] = row
        return last

    def finish(self, status: str, error: str | None = None) -> dict[str, Any]:
        from fedens import plots

        summary = {
            "name": self.scn.name,
            "status": status,
            "error": error,
            "seed": self.scn.seed,
            "rounds": self.scn.rounds,
            "rounds_done": max((r["round"] for r in self.rows), default=-1),
            "started_at": self.started,  # Unix time of the run's start; rows' time_s count from it
            "wall_time_s": round(time.time() - self.started, 3),
            "final": self.final_metrics(),
            "reliability": self.reliability,  # the final bins, pooled over seeds by fedens compare
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in self.rows),
            "bytes_received": sum(r.get("bytes_received", 0) for r in self.rows),
            "versions": _versions(),
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        gossip = any(r["scope"] == "gossip" for r in self.rows)  # decentralized mode: no global model
        if any(r["scope"] == "global-test" for r in self.rows):
            what = "mean over the nodes' models" if gossip else "global model (test, shifted) and clients"
            plots.save(plots.convergence_figure(self.rows, f"{self.scn.name}: {what}")[0], self.dir / "convergence.png")
        if gossip:
            plots.save(plots.nodes_figure(self.rows, title=self.scn.name)[0], self.dir / "nodes.png")
            plots.save(plots.layer_variance_figure(self.rows, title=self.scn.name)[0], self.dir / "layer_variance.png")
        if self.reliability is not None:
            label = self.reliability.get("label", "test set")
            plots.save(plots.reliability_figure(self.reliability, f"{self.scn.name}: {label}")[0], self.dir / "reliability.png")
        if self._board is not None:
            self._board.images(sorted(self.dir.glob("*.png")))
        self.close()
        return summary

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()
        if self._board is not None:
            self._board.close()
            self._board = None
        for name in ("flwr", "fedens"):
            logging.getLogger(name).removeHandler(self._log_handler)
        self._log_handler.close()


class TensorBoard:
    """The run's rows as TensorBoard scalars (``<scope>/<metric>`` against round) and its final
    plots as images, in ``<run>/tensorboard`` (``output.tensorboard: true``). Lists (per-node
    values) and texts are not scalars and are left out; ``layer_variance`` becomes one scalar
    per tensor."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            scope, step = row["scope"], int(row["round"])
            for key, value in row.items():
                if key in ("round", "scope"):
                    continue
                if isinstance(value, dict):
                    for name, v in value.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.writer.add_scalar(f"{scope}/{key}/{name}", v, step)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{scope}/{key}", value, step)
        self.writer.flush()

    def images(self, paths: list[Path]) -> None:
        import matplotlib.image

        for path in paths:
            self.writer.add_image(f"plots/{path.stem}", matplotlib.image.imread(path)[..., :3], dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("fedens", "flwr", "ray", "torch", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
