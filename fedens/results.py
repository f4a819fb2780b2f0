"""The run folder: ``scenario.yaml``, ``metrics.jsonl``, ``summary.json``, plots, checkpoints, log.

Never lose or misreport a run:

- A folder is never written over by accident (``prepare_run_dir``): a non-empty one is refused
  unless the run resumes it or is told to overwrite it (then it is emptied first, so nothing
  stale stays beside the new results).
- ``summary.json`` is written atomically (temporary file, then rename) when the run starts
  (``running``, with the process id) and when it ends (``ok``, ``failed`` with the reason,
  ``interrupted``). A folder whose summary says ``running`` while its process is gone (killed)
  is reported as interrupted by whatever meets it next (``run_status``).
- Rows are appended and flushed as each round finishes, before the round's checkpoint, so a
  failed checkpoint loses no computed round. Every JSON file is strict: a non-finite number is
  written as ``null`` and its key listed under ``nonfinite`` in the same row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedens.scenario import Scenario, ScenarioError

# Decentralized mode adds nodes-val (the nodes' own validation splits) and gossip (consensus
# distance, layer variance, mailbox counters); its global-test is the mean over the nodes' models.
EVAL_SCOPES = ("global-test", "global-shift", "clients", "nodes-val", "gossip")
TOTALS = ("failures", "stragglers", "rejected")  # counted per train row, totalled in the summary


def _not_repeated(record: logging.LogRecord) -> bool:
    """Leave out Flower's per-reply error lines: the grid logs each failure once, with its
    partition id ("round r: train partition p: reason")."""
    return not (record.name.startswith("flwr") and record.getMessage().lstrip().startswith("> Received error in reply"))


def strict(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity);
    the dotted paths of the replaced values are appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(path)
        return None
    if isinstance(value, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return strict(value.item(), path, found)
    return value


def strict_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row for JSON: non-finite values as null, their keys under ``nonfinite``."""
    found: list[str] = []
    clean = strict(row, "", found)
    if found:
        clean["nonfinite"] = found
    return clean


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON into ``path`` through a temporary file and a rename: a reader sees the old
    file or the new one, never a partial or empty one (e.g. when the disk is full)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(strict(data), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: Any, host: Any) -> bool:
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path) -> str | None:
    """The status of the run in ``run_dir`` (None: no run there): ``ok``, ``failed``,
    ``interrupted``, ``running`` (its process is alive), or ``interrupted`` for a summary that
    says running while its process is gone (killed with SIGKILL, or the machine went down)."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = summary.get("status")
    if status == "running" and not _alive(summary.get("pid"), summary.get("host")):
        return "interrupted"
    return status


def default_run_dir(scn: Scenario) -> Path:
    """``<output.dir>/<name>-<UTC timestamp>``; the name's pattern keeps it inside output.dir."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    root = Path(scn.output.dir).resolve()
    path = (root / f"{scn.name}-{stamp}").resolve()
    if path.parent != root:  # the schema forbids separators in names; keep it that way
        raise ScenarioError(f"{scn.source}: name: {scn.name!r} would write outside output.dir")
    return path


def prepare_run_dir(scn: Scenario, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """The run folder: ``out`` exactly when given, else ``default_run_dir``. An existing
    non-empty folder is an invalid request (``ScenarioError``) unless ``overwrite``, which
    empties it first; a folder that cannot be made is one too."""
    path = default_run_dir(scn) if out is None else Path(out)
    if path.exists() and not path.is_dir():
        raise ScenarioError(f"--out {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            status = run_status(path)
            what = f"holds a run (status {status})" if status else "is not empty"
            hint = "--resume to continue it or --overwrite to replace it" if status in ("failed", "interrupted") \
                else "--overwrite to replace it"
            raise ScenarioError(f"--out {path}: {what}; use {hint}")
        if run_status(path) == "running":
            raise ScenarioError(f"--out {path}: a live run is writing there")
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fedens-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ScenarioError(f"--out {path}: cannot write there: {err.strerror or err}") from None
    return path


def make_run_dir(scn: Scenario, out: str | Path | None = None) -> Path:
    """``prepare_run_dir`` without overwriting (kept for callers of the first API)."""
    return prepare_run_dir(scn, out)


class RunRecorder:
    """Writes one run's folder. Not thread-safe; the ServerApp thread is its only writer.

    ``resume_rows``: continue a run whose first rows these are (``metrics.jsonl`` is cut to
    them and appended to)."""

    def __init__(self, run_dir: Path, scn: Scenario, resume_rows: list[dict[str, Any]] | None = None) -> None:
        self.dir = Path(run_dir)
        self.scn = scn
        self.rows: list[dict[str, Any]] = list(resume_rows or [])
        self.reliability: dict[str, Any] | None = None  # set by record_reliability (or a resumed run's)
        self.started = time.time()
        self.resumed = resume_rows is not None
        (self.dir / "scenario.yaml").write_text(scn.to_yaml(), encoding="utf-8")
        if self.resumed:
            with open(self.dir / "metrics.jsonl", "w", encoding="utf-8") as f:  # only the kept rows
                f.writelines(json.dumps(strict_row(r), allow_nan=False) + "\n" for r in self.rows)
        self._metrics = open(self.dir / "metrics.jsonl", "a" if self.resumed else "w", encoding="utf-8")  # noqa: SIM115
        self._log_handler = logging.FileHandler(self.dir / "run.log", encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._log_handler.setLevel(logging.DEBUG)
        self._log_handler.addFilter(_not_repeated)
        for name in ("flwr", "fedens"):
            logging.getLogger(name).addHandler(self._log_handler)
        self._board = TensorBoard(self.dir / "tensorboard") if scn.output.tensorboard else None
        self.engine: dict[str, Any] | None = None  # set by the run: fedens.simulate.Engine.describe()
        self.stopped: dict[str, Any] | None = None  # set when ``stop:`` ended the run early (round, metric, why)
        self.write_summary("running")

    def record_reliability(self, bins: Mapping[str, Any], label: str) -> None:
        """The final reliability diagram of the run (``summary.json`` and ``reliability.png``):
        ``fedens.metrics.reliability_bins`` of the final predictions, and what they are of. Called
        once, by the run's evaluator (federated: the final global model; gossip: every node's,
        pooled)."""
        self.reliability = {**bins, "label": label}

    @property
    def log_path(self) -> Path:
        return self.dir / "run.log"

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        rows = [strict_row(r) for r in rows]
        for row in rows:
            self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        self.rows.extend(rows)
        if self._board is not None:
            self._board.rows(rows)

    def save_checkpoint(self, arrays: Mapping[str, np.ndarray], server_round: int) -> None:
        """The global model's arrays (``checkpoint.npz``, ``__round__`` the round), replaced
        atomically."""
        tmp = self.dir / "checkpoint.tmp.npz"
        try:
            np.savez(tmp, **{"__round__": np.array(server_round)}, **dict(arrays))
            os.replace(tmp, self.dir / "checkpoint.npz")
        finally:
            tmp.unlink(missing_ok=True)

    def final_metrics(self) -> dict[str, dict[str, Any]]:
        """The last row of every evaluation scope."""
        last: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            if row["scope"] in EVAL_SCOPES:
                last[row["scope"]] = row
        return last

    def summary(self, status: str, error: str | None = None, failure: str | None = None) -> dict[str, Any]:
        train = [r for r in self.rows if r["scope"] == "train"]
        return {
            "name": self.scn.name,
            "status": status,
            "error": error,
            "failure": failure,  # with status failed: "diverged" (the model became non-finite) or "error"
            "seed": self.scn.seed,
            "rounds": self.scn.rounds,
            "rounds_done": max((r["round"] for r in self.rows), default=-1),
            # early stopping (``stop:``): where and why the run ended before the rounds cap; None: it did not
            "stopped": self.stopped,
            "resumed": self.resumed,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started,  # Unix time of the run's start; rows' time_s count from it
            "wall_time_s": round(time.time() - self.started, 3),
            "final": self.final_metrics(),
            "reliability": self.reliability,  # the final bins, pooled over seeds by fedens compare
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in self.rows),
            "bytes_received": sum(r.get("bytes_received", 0) for r in self.rows),
            **{key: sum(r.get(key) or 0 for r in train) for key in TOTALS},
            "nonfinite_rows": sum(1 for r in self.rows if r.get("nonfinite")),
            "versions": _versions(),
            "engine": self.engine,  # the Ray cluster's address (None: local) and where the actors ran
        }

    def write_summary(self, status: str, error: str | None = None, failure: str | None = None) -> dict[str, Any]:
        summary = self.summary(status, error, failure)
        write_json_atomic(self.dir / "summary.json", summary)
        return summary

    def finish(self, status: str, error: str | None = None, failure: str | None = None) -> dict[str, Any]:
        """The final summary (written first, so the status is true even if a plot fails), then
        the plots from whatever rounds exist."""
        from fedens import plots

        summary = self.write_summary(status, error, failure)
        try:
            gossip = any(r["scope"] == "gossip" for r in self.rows)  # decentralized mode: no global model
            if any(r["scope"] == "global-test" for r in self.rows):
                what = "mean over the nodes' models" if gossip else "global model (test, shifted) and clients"
                plots.save(plots.convergence_figure(self.rows, f"{self.scn.name}: {what}")[0], self.dir / "convergence.png")
            if plots.has_exits(self.rows):
                final = [r for r in self.rows if r["scope"] == "global-test"][-1:]
                plots.save(plots.exits_figure({self.scn.name: final}, f"{self.scn.name}: final global model, test set")[0],
                           self.dir / "exits.png")
            if gossip:
                plots.save(plots.nodes_figure(self.rows, title=self.scn.name)[0], self.dir / "nodes.png")
                plots.save(plots.layer_variance_figure(self.rows, title=self.scn.name)[0], self.dir / "layer_variance.png")
            if self.reliability is not None:
                label = self.reliability.get("label", "test set")
                plots.save(plots.reliability_figure(self.reliability, f"{self.scn.name}: {label}")[0],
                           self.dir / "reliability.png")
            if self._board is not None:
                self._board.images(sorted(self.dir.glob("*.png")))
        except Exception as err:  # a plot must not turn a finished run into a crash
            logging.getLogger("fedens").warning("plots not written: %s: %s", type(err).__name__, err, exc_info=True)
            print(f"warning: plots not written ({type(err).__name__}: {err}); see run.log", file=sys.stderr)
        finally:
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
