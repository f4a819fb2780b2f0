"""The Python API: load a scenario, override keys, run it, get the results back as data."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedens.scenario import Scenario, ScenarioError, load_scenario


class RunFailed(RuntimeError):
    """A run that started but failed; ``run_dir`` holds the finished rounds and ``run.log``."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


@dataclass(frozen=True)
class RunResult:
    scenario: Scenario
    run_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def final(self) -> dict[str, dict[str, Any]]:
        """Last evaluation row of each scope (``global-test``, ``global-shift``, ``clients``)."""
        return self.summary["final"]

    def scope(self, name: str) -> list[dict[str, Any]]:
        """All rows of one scope, in round order."""
        return [r for r in self.rows if r["scope"] == name]


def load(
    source: str | Path | Mapping[str, Any] | Scenario,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Scenario:
    """A validated ``Scenario`` from a YAML path, a mapping or a Scenario, with overrides
    (``["rounds=5"]`` or ``{"rounds": 5}``). Raises ``ScenarioError``."""
    return load_scenario(source, overrides)


def preflight(scn: Scenario) -> None:
    """Checks that need this machine or the data, made before Ray starts.

    - Resources: Ray cannot place an actor that asks for more CPUs than it has, or for a GPU
      when none is visible; the engine would wait for ever, so this is an invalid scenario.
    - Data: the federated split is built once here (it is cached, and the server needs it
      anyway), so a split that cannot be made, e.g. more clients than examples or a Dirichlet
      draw that cannot meet ``min_partition_size``, is reported as an invalid scenario rather
      than as a failure inside every actor.
    """
    import os

    import torch

    from fedens.data import build_federated_data

    cpus = scn.engine.ray_num_cpus or os.cpu_count() or 1
    if scn.resources.num_cpus > cpus:
        raise ScenarioError(f"{scn.source}: resources.num_cpus: {scn.resources.num_cpus} per client, but Ray has {cpus} CPUs")
    if scn.resources.num_gpus > 0 and torch.cuda.device_count() == 0:
        raise ScenarioError(f"{scn.source}: resources.num_gpus: {scn.resources.num_gpus} GPU per client, but no GPU is visible")
    try:
        build_federated_data(scn.data, scn.seed)
    except ValueError as err:
        raise ScenarioError(f"{scn.source}: {err}") from None


def prepare_learner(scn: Scenario, run_dir: Path) -> Scenario:
    """Run the learner's one-off preparation (``Learner.prepare``) in this process and return
    the scenario with the options it returned (e.g. a pretrained backbone's path)."""
    import torch

    from fedens.data import load_server_data
    from fedens.learners import resolve_learner
    from fedens.learners.base import Learner, PrepareContext
    from fedens.models import build_model
    from fedens.scenario import LearnerConfig
    from fedens.seeding import derive_seed

    cls = resolve_learner(scn.learner.kind, scn.base_dir)
    if cls.prepare.__func__ is Learner.prepare.__func__:  # nothing to prepare
        return scn
    data = load_server_data(scn.data, scn.seed)

    def model_fn(**overrides: Any):  # noqa: ANN202
        return build_model(scn.model.kind, {**scn.model.options, **overrides}, data.input_shape, data.num_classes)

    torch.manual_seed(derive_seed(scn.seed, 0, 1))
    ctx = PrepareContext(model_fn, scn.train, data.public, run_dir, scn.seed, torch.device("cpu"))
    try:
        options = cls.prepare(cls.Options.model_validate(scn.learner.options), ctx)
    except ValueError as err:  # e.g. nothing to pretrain on: the scenario has to change
        raise ScenarioError(f"{scn.source}: learner: {err}") from None
    learner = LearnerConfig(kind=scn.learner.kind, **options.model_dump(mode="json"))
    return scn.model_copy(update={"learner": learner})


def run(
    source: str | Path | Mapping[str, Any] | Scenario,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    out: str | Path | None = None,
    verbose: bool = False,
    on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
) -> RunResult:
    """Run a scenario through Flower's simulation engine and return its results.

    Raises ``ScenarioError`` for an invalid scenario (before anything starts) and ``RunFailed``
    when the run itself fails (the folder keeps every finished round).
    """
    from fedens.client_app import make_client_app
    from fedens.results import RunRecorder, make_run_dir
    from fedens.server_app import make_server_app
    from fedens.simulate import run_engine

    scn = load(source, overrides)
    preflight(scn)
    run_dir = make_run_dir(scn, out)
    scn = prepare_learner(scn, run_dir)
    recorder = RunRecorder(run_dir, scn)
    try:
        with shared_data(scn):
            run_engine(make_server_app(scn, recorder, on_round), make_client_app(scn), scn, verbose)
    except BaseException as err:  # record the failure, keep the finished rounds, re-raise
        message = _root_message(err)
        recorder.finish("failed", message)
        if isinstance(err, Exception):
            raise RunFailed(message, run_dir) from err
        raise
    summary = recorder.finish("ok")
    return RunResult(scn, run_dir, recorder.rows, summary)


@contextlib.contextmanager
def shared_data(scn: Scenario) -> Iterator[None]:
    """For the run: the driver's data build in a temporary folder that the Ray actors (started
    inside, so they inherit ``SHARED_ENV``) read instead of building the same data again."""
    from fedens.data.federated import SHARED_ENV, share_data

    previous = os.environ.get(SHARED_ENV)
    with tempfile.TemporaryDirectory(prefix="fedens-data-") as folder:
        share_data(scn.data, scn.seed, folder)
        os.environ[SHARED_ENV] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(SHARED_ENV, None)
            else:
                os.environ[SHARED_ENV] = previous


def _root_message(err: BaseException) -> str:
    """The innermost cause: the engine wraps the ServerApp's exception in its own."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"
