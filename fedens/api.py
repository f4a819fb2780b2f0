"""The Python API: load a scenario, override keys, run it, get the results back as data."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedens.checks import check_references, load_scenario
from fedens.scenario import Scenario, ScenarioError, parse_scenario

if TYPE_CHECKING:
    from fedens.simulate import Engine


class RunFailed(RuntimeError):
    """A run that started but failed; ``run_dir`` holds the finished rounds and ``run.log``."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class RunDiverged(RunFailed):
    """A run stopped because its model became non-finite (status ``failed``, ``failure``
    ``diverged``): a result of the method and its settings, not a fault of the engine; the
    finished rounds are kept."""


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

    from fedens.cluster import cluster_address
    from fedens.data import build_federated_data

    cpus = scn.engine.ray_num_cpus or os.cpu_count() or 1
    local = cluster_address(scn) is None  # a cluster's nodes are checked by the engine, once connected
    if local and scn.resources.num_cpus > cpus:
        raise ScenarioError(f"{scn.source}: resources.num_cpus: {scn.resources.num_cpus} per client, but Ray has {cpus} CPUs")
    if local and scn.resources.num_gpus > 0 and torch.cuda.device_count() == 0:
        raise ScenarioError(f"{scn.source}: resources.num_gpus: {scn.resources.num_gpus} GPU per client, but no GPU is visible")
    if scn.output.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ScenarioError(f"{scn.source}: output.tensorboard: needs the tensorboard package: pip install 'fedens[tensorboard]'")
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


class Interrupted(BaseException):
    """A run stopped by a signal (SIGINT, SIGTERM); ``exit_code`` is 128 + the signal number.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum


def run(
    source: str | Path | Mapping[str, Any] | Scenario,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    out: str | Path | None = None,
    verbose: bool = False,
    on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    engine: Engine | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Run a scenario through the simulation engine (Flower apps on Ray actors) and return its
    results.

    out : the run folder; an existing non-empty one is refused (``ScenarioError``) unless
        ``overwrite`` (it is emptied first) or the run is continued with ``resume``.
    engine : a started ``fedens.simulate.Engine`` to run in (``Session`` keeps one for many
        runs); without one the run starts its own and stops it at the end. Ray starts once the
        scenario has passed every check, in the background, while this function builds the data
        and prepares.

    Raises ``ScenarioError`` for an invalid scenario or run folder (before anything starts),
    ``RunFailed`` when the run itself fails (the folder keeps every finished round, its summary
    says ``failed`` and why), and ``Interrupted`` / ``KeyboardInterrupt`` when stopped (status
    ``interrupted``).
    """
    scn = parse_scenario(source, overrides)  # the schema: fast, and most mistakes are found here
    return _run(scn, engine, verbose, on_round, out=out, overwrite=overwrite)


def resume(
    run_dir: str | Path,
    verbose: bool = False,
    on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    engine: Engine | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint (``state.pkl``), with the
    scenario it ran (its ``scenario.yaml``). The rows after the checkpoint are computed again;
    the result equals the uninterrupted run's rows apart from their ``time_s``."""
    from fedens.results import run_status

    run_dir = Path(run_dir)
    status = run_status(run_dir)
    if status is None:
        raise ScenarioError(f"--resume {run_dir}: no run there (no summary.json)")
    if status == "running":
        raise ScenarioError(f"--resume {run_dir}: a live process is still running it")
    if status == "ok":
        raise ScenarioError(f"--resume {run_dir}: the run finished (status ok); nothing to resume")
    scn = parse_scenario(run_dir / "scenario.yaml")
    return _run(scn, engine, verbose, on_round, resume_dir=run_dir)


def _run(scn: Scenario, engine: Engine | None, verbose: bool, on_round: Any, out: str | Path | None = None,
         overwrite: bool = False, resume_dir: Path | None = None) -> RunResult:
    from fedens.cluster import cluster_address, portable

    own_engine = engine is None
    if engine is None:
        engine = engine_for(scn, verbose)  # started once the scenario has passed every check
    elif engine.ray_num_cpus != scn.engine.ray_num_cpus:
        raise ScenarioError(f"{scn.source}: engine.ray_num_cpus: {scn.engine.ray_num_cpus}, but the session's "
                            f"engine was started with {engine.ray_num_cpus}")
    elif engine.address != cluster_address(scn):
        raise ScenarioError(f"{scn.source}: engine.address: {cluster_address(scn)}, but the session's engine "
                            f"runs on {engine.address or 'a local Ray'}")
    try:
        from fedens import checkpoint
        from fedens.client_app import make_client_app  # torch and Flower: imported while Ray starts
        from fedens.data import build_federated_data
        from fedens.data.federated import _cfg_json
        from fedens.results import RunRecorder, prepare_run_dir, read_metrics
        from fedens.server_app import make_server_app

        scn = check_references(scn)
        preflight(scn)  # every check before Ray starts: bad input costs no Ray start and stop
        engine.start()  # Ray starts in the background while the driver builds the data and prepares
        state = None
        if resume_dir is not None:
            try:
                state = checkpoint.load(resume_dir)
            except checkpoint.CheckpointError as err:
                raise ScenarioError(f"--resume {err}") from None
            run_dir = resume_dir
            recorder = RunRecorder(run_dir, scn, resume_rows=read_metrics(run_dir)[: state.rows])
        else:
            run_dir = prepare_run_dir(scn, out, overwrite=overwrite)
            scn = prepare_learner(scn, run_dir)
            recorder = RunRecorder(run_dir, scn)
        try:
            data = engine.share(("data", _cfg_json(scn.data), scn.seed), lambda: build_federated_data(scn.data, scn.seed))
            resources = {"num_cpus": scn.resources.num_cpus, "num_gpus": scn.resources.num_gpus}
            # On a cluster the ClientApp takes a copy of the scenario whose files travel with it.
            client_scn, shipment = portable(scn) if engine.address is not None else (scn, None)
            recorder.engine = {"address": engine.address}
            engine.run(make_server_app(scn, recorder, on_round, state), make_client_app(client_scn, data),
                       scn.data.num_clients, resources, node_states=state.node_states if state is not None else None,
                       shipment=shipment)
            recorder.engine = engine.describe()
        except (KeyboardInterrupt, Interrupted) as err:
            recorder.finish("interrupted", str(err) or "interrupted (SIGINT)")
            raise
        except BaseException as err:  # record the failure, keep the finished rounds, re-raise
            from fedens.grid import Diverged

            message = _root_message(err)
            diverged = isinstance(_root(err), Diverged)
            recorder.finish("failed", message, failure="diverged" if diverged else "error")
            if isinstance(err, Exception):
                raise (RunDiverged if diverged else RunFailed)(message, run_dir) from err
            raise
        summary = recorder.finish("ok")
    finally:
        if own_engine:
            engine.close()
    return RunResult(scn, run_dir, recorder.rows, summary)


def engine_for(scn: Scenario, verbose: bool = False) -> Engine:
    """An engine (not started) with the scenario's engine settings and per-client resources."""
    from fedens.cluster import cluster_address
    from fedens.simulate import Engine

    return Engine(ray_num_cpus=scn.engine.ray_num_cpus, verbose=verbose, telemetry=scn.engine.telemetry,
                  address=cluster_address(scn), resources={"num_cpus": scn.resources.num_cpus, "num_gpus": scn.resources.num_gpus})


class Session:
    """A warm engine for many runs: one Ray session and one actor pool, with the data of each
    (data config, seed) shipped to the actors once.

    >>> with fedens.session() as s:                              # doctest: +SKIP
    ...     for seed in range(5):
    ...         s.run("scenarios/quickstart.yaml", {"seed": seed}, out=f"runs/q/seed-{seed}")

    A run in a session gives exactly the rows of the same run on its own (tested); only its
    start-up is shorter. ``ray_num_cpus`` is the session's; a scenario that asks for another
    value is an invalid scenario here.
    """

    def __init__(self, ray_num_cpus: int | None = None, verbose: bool = False, telemetry: bool = False,
                 resources: Mapping[str, float] | None = None, address: str | None = None) -> None:
        from fedens.simulate import Engine

        self.verbose = verbose
        self.engine = Engine(ray_num_cpus=ray_num_cpus, verbose=verbose, telemetry=telemetry, address=address,
                             resources=dict(resources) if resources else None)

    def run(self, source: str | Path | Mapping[str, Any] | Scenario, overrides: Iterable[str] | Mapping[str, Any] = (),
            out: str | Path | None = None, on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
            overwrite: bool = False) -> RunResult:
        return run(source, overrides, out=out, verbose=self.verbose, on_round=on_round, engine=self.engine.start(),
                   overwrite=overwrite)

    def resume(self, run_dir: str | Path, on_round: Callable[[int, list[dict[str, Any]]], None] | None = None) -> RunResult:
        return resume(run_dir, verbose=self.verbose, on_round=on_round, engine=self.engine.start())

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Session:
        self.engine.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def session(ray_num_cpus: int | None = None, verbose: bool = False, telemetry: bool = False,
            address: str | None = None) -> Session:
    """A ``Session`` (use it with ``with``); ``address``: a running Ray cluster to run on."""
    return Session(ray_num_cpus=ray_num_cpus, verbose=verbose, telemetry=telemetry, address=address)


def _root(err: BaseException) -> BaseException:
    """The innermost cause: the engine wraps the ServerApp's exception in its own."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _root_message(err: BaseException) -> str:
    root = _root(err)
    return f"{type(root).__name__}: {root}"
