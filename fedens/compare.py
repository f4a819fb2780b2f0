"""Comparisons: one base scenario, variants (named, from a grid, or both), several seeds,
statistics over the seeds, paired comparisons with a reference variant, tables and plots.

A comparison file::

    name: ensembles
    base: ../scenarios/mnist1d.yaml        # a scenario file, relative to this file
    overrides: {rounds: 30}                # applied to every variant (dotted keys)
    seeds: 5                               # 0..4, or a list [0, 3, 7]; default: the base's seed
    variants:                              # a mapping with a `kind` replaces the whole section
      single: {}
      deep: {learner: {kind: deep_ensemble, members: 5}}
    grid: {data.partition.alpha: [0.1, 0.5]}   # every variant at every grid point
    reference: single                      # what every other variant is compared with
    target: {metric: accuracy, value: 0.8} # adds "rounds to target"
    tune: {trials: 8, seeds: [1000], space: {train.lr: {low: 0.005, high: 0.5, log: true}}}

With ``tune``, every variant is first tuned with the same budget on the clients' validation
splits (``fedens.tuning``; studies in ``OUT/tuning.db``, trial runs in ``OUT/tuning/``, the
choices in ``tuning.md`` / ``tuning.csv`` / ``tuning.png``), and then runs on the evaluation seeds
with its chosen values (docs/comparisons.md).

Variants: the named ones, crossed with every point of the grid (names ``single-alpha=0.1``);
with a grid and no named variants, one variant per grid point. The reference is compared with
each variant at the same grid point, on the same seeds (paired).

Every run goes through one warm engine (``fedens.Session``) into ``OUT/<variant>/seed-<s>/``.
Running the same command again skips the runs whose summary says ``ok`` and whose scenario is
unchanged, and reruns the others (failed, interrupted, changed), so a long comparison survives
an interruption. ``OUT`` gets ``runs.csv`` (one row per run), ``comparison.md`` and ``.json``
(mean, standard deviation and 95% Student-t interval per variant and metric; the paired
difference with the reference, its interval and the paired t-test's p-value), and the plots
``comparison.png`` (mean curves with 95% bands), ``reliability.png`` (pooled over seeds),
``tradeoff.png`` (accuracy and ECE against bytes per client and round) and, for decentralized
variants, ``layer_variance.png``.

The whole file is validated before any run starts: every variant at every seed must be a valid
scenario; a plug-in path in a variant or the overrides resolves against this file's folder.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedens.checks import load_scenario
from fedens.metrics import higher_is_better
from fedens.results import strict
from fedens.scenario import Scenario, ScenarioError, _first_error, _read_yaml
from fedens.tuning import ParamSpace, TuneConfig, VariantTune

# The final metrics of a run in runs.csv and the statistics: (column, scope, metric).
FINAL = [
    *[(f"test_{m}", "global-test", m) for m in ("accuracy", "nll", "ece", "brier", "ood_auroc")],
    *[(f"shift_{m}", "global-shift", m) for m in ("accuracy", "nll", "ece", "brier")],
    # after temperature scaling fitted on the clients' validation splits (evaluate.temperature)
    *[(f"test_{m}", "global-test", m) for m in ("temperature", "nll_ts", "ece_ts", "brier_ts")],
    *[(f"shift_{m}", "global-shift", m) for m in ("nll_ts", "ece_ts")],
    *[(f"clients_{m}", "clients", m) for m in ("accuracy", "nll", "ece", "accuracy_worst")],
    *[(f"nodes_{m}", "nodes-val", m) for m in ("accuracy", "ece")],
    *[(f"{s}_conformal_{m}", f"global-{g}", f"conformal_{m}") for s, g in (("test", "test"), ("shift", "shift"))
      for m in ("coverage", "size")],
    *[(f"student_{m}", "global-test-student", m) for m in ("accuracy", "nll", "ece")],
    *[(f"test_{m}", "global-test", m) for m in ("compute_fraction", "compute_vs_plain", "mean_exit", "routing_gain",  # early exits
                                                 "threshold_gain", "threshold_accuracy", "threshold_ece", "threshold_compute_fraction")],
]
# tabled when a comparison measured them (evaluate.conformal, distill)
OPTIONAL = ("test_nll_ts", "test_ece_ts", "test_temperature", "test_conformal_coverage", "test_conformal_size", "shift_conformal_coverage", "student_accuracy", "student_ece",
            "test_compute_fraction", "test_compute_vs_plain", "test_routing_gain", "test_threshold_gain")
RUN_FACTS = ("rounds_to_target", "rounds_used", "bytes_per_client_round", "wall_time_s")
TABLE = ("test_accuracy", "test_nll", "test_ece", "test_brier", "test_ood_auroc", "shift_ece")
MARKER = "compare.json"  # in each run folder: the scenario it ran, to skip it on a rerun
DONE = ("ok", "diverged")  # finished runs (``outcome``); a diverged one is a result (counted), not a fault


class Target(BaseModel):
    """A level of a test metric to reach: ``value``, or ``fraction`` of variant ``of``'s mean
    final value (e.g. 90% of FedAvg's final accuracy; with a grid, of ``of`` at the same grid
    point). A run's "rounds to target" is the first evaluated round at which it reaches the level
    (a metric where lower is better must fall to it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: Literal["accuracy", "nll", "ece", "brier", "ood_auroc"] = "accuracy"
    value: float | None = None
    fraction: float | None = Field(None, gt=0)
    of: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        relative = (self.fraction is not None, self.of is not None)
        if (self.value is None) != (relative == (True, True)) or (self.value is not None and any(relative)):
            raise ValueError("give either value, or fraction and of (a variant)")
        return self

    def level(self, finals: dict[str, dict[str, Any]]) -> float | None:
        """The level to reach, from the variants' final test metrics (None: ``of`` has none)."""
        if self.value is not None:
            return float(self.value)
        reference = finals[self.of].get(self.metric)
        return None if reference is None else self.fraction * float(reference)

    def label(self) -> str:
        return f"{self.metric} {self.value}" if self.value is not None else f"{self.fraction:g} x {self.of}'s {self.metric}"


def rounds_to(rows: list[dict[str, Any]], metric: str, level: float) -> int | None:
    """The first round whose ``metric`` reaches ``level`` (>= if higher is better, else <=)."""
    better = (lambda v: v >= level) if higher_is_better(metric) else (lambda v: v <= level)  # noqa: E731
    return next((r["round"] for r in rows if r.get(metric) is not None and better(r[metric])), None)


def node_bytes(train_row: dict[str, Any]) -> float:
    """Bytes one client (federated: down + up) or one active node (decentralized) moved in a
    round. A gossip node's traffic is its neighbours' models: every delivered copy
    (``bytes_p2p``) is sent by one node and received by another, so it counts twice. Not
    counted: initial models (a real node initialises itself) and swarm's validation messages
    (a node scores the models it already holds)."""
    if "client_bytes_down" in train_row:
        return train_row["client_bytes_down"] + train_row["client_bytes_up"]
    return 2 * train_row.get("bytes_p2p", 0) / max(train_row.get("nodes_active", 1), 1)


class Comparison(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "comparison"
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: int | list[int] | None = None
    reference: str | None = None
    target: Target | None = None
    tune: TuneConfig | None = Field(None, description="equal-budget tuning of every variant on validation data (fedens.tuning)")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and not 1 <= v <= 1000:
            raise ValueError("an integer N means seeds 0..N-1: give 1 to 1000")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("a list of distinct seeds >= 0")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: give at least one value")
        return v

    @model_validator(mode="after")
    def _something_to_run(self) -> Comparison:
        if not self.variants and not self.grid:
            raise ValueError("variants: give named variants, a grid, or both")
        names = self.variant_names()
        if self.reference is not None and self.reference not in self.variants and self.reference not in names:
            raise ValueError(f"reference: {self.reference!r} is not a variant")
        if self.target is not None and self.target.of is not None and self.target.of not in self.variants \
                and self.target.of not in names:
            raise ValueError(f"target.of: {self.target.of!r} is not a variant")
        for name, tree in self.variants.items():
            if "tune" in tree and self.tune is None:
                raise ValueError(f"variants.{name}.tune: a variant's search needs the comparison's tune block "
                                 "(trials, seeds, objective)")
            if "tune" in tree:
                try:
                    VariantTune.model_validate(tree["tune"])
                except ValidationError as err:
                    raise ValueError(f"variants.{name}.tune: {_first_error(err, tree['tune'])}") from None
        return self

    def seed_list(self, default: int) -> list[int]:
        if self.seeds is None:
            return [default]
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def grid_points(self) -> list[tuple[str, dict[str, Any]]]:
        """``(label, {dotted key: value})`` per point of the cartesian product ("" without a grid)."""
        if not self.grid:
            return [("", {})]
        keys = list(self.grid)
        return [(",".join(f"{k.split('.')[-1]}={_label(v)}" for k, v in zip(keys, combo)), dict(zip(keys, combo)))
                for combo in itertools.product(*(self.grid[k] for k in keys))]

    def expand(self) -> list[Variant]:
        """Every variant: named x grid points (in file order)."""
        named = self.variants or {"": {}}
        out = []
        for (label, point), (name, tree) in itertools.product(self.grid_points(), named.items()):
            full = "-".join(p for p in (name, label) if p)
            tree = dict(tree)
            space = VariantTune.model_validate(tree.pop("tune", {})).merged(self.tune.space if self.tune is not None else {})
            out.append(Variant(full, name, label, {**_flatten(tree), **point}, space))
        return out

    def variant_names(self) -> list[str]:
        return [v.name for v in self.expand()]


@dataclass(frozen=True)
class Variant:
    name: str  # folder name under OUT
    named: str  # the named variant it comes from ("" for a grid-only comparison)
    point: str  # its grid point's label ("" without a grid)
    overrides: dict[str, Any]
    space: dict[str, ParamSpace] = field(default_factory=dict)  # what tuning searches for it (shared + its own)


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    seed: int
    scenario: Scenario

    def folder(self, out: Path) -> Path:
        return out / self.variant.name / f"seed-{self.seed}"


def _label(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("kind", json.dumps(v, sort_keys=True)))
    return str(v).replace("/", "_").replace(" ", "")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested overrides as dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``.

    A mapping with a ``kind`` (a model, learner or partition) or a ``params`` mapping replaces
    the whole section, because another kind has other options."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and "kind" not in value and not key.endswith("params"):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _localise(value: Any, here: Path, base_dir: Path) -> Any:
    """A plug-in reference (``file.py:Name``) or a path written in the comparison file, made
    absolute against the comparison file's folder when it exists there and not beside the base
    scenario (which is what a relative path in the base scenario would mean)."""
    if isinstance(value, dict):
        return {k: _localise(v, here, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_localise(v, here, base_dir) for v in value]
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    module, sep, attr = value.rpartition(":")
    path = module if sep and module.endswith(".py") else value
    if (here / path).exists() and not (base_dir / path).exists():
        absolute = str((here / path).resolve())
        return f"{absolute}:{attr}" if sep and module.endswith(".py") else absolute
    return value


def is_comparison(raw: Any) -> bool:
    return isinstance(raw, dict) and "base" in raw and ("variants" in raw or "grid" in raw)


def load_comparison(path: str | Path, extra: list[str] = (), seeds: int | list[int] | None = None
                    ) -> tuple[Comparison, list[PlannedRun]]:
    """The comparison and every run it plans (variant x seed), each a validated scenario;
    ``seeds`` replaces the file's evaluation seeds (e.g. more of them where an interval does not
    decide). Raises ``ScenarioError`` (one line naming the file and the key) for any invalid part."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a comparison must be a mapping")
    if seeds is not None:
        raw = {**raw, "seeds": seeds}
    try:
        cmp = Comparison.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(f"{path}: {_first_error(err, raw)}") from None
    base = path.parent / cmp.base
    if not base.is_file():
        raise ScenarioError(f"{path}: base: no such file {cmp.base!r}")
    here, base_dir = path.parent.resolve(), base.parent.resolve()
    runs: list[PlannedRun] = []
    first: Scenario | None = None
    for variant in cmp.expand():
        overrides = {k: _localise(v, here, base_dir) for k, v in {**_flatten(cmp.overrides), **variant.overrides}.items()}
        try:
            scn = load_scenario(load_scenario(base, overrides), extra)
        except ScenarioError as err:
            raise ScenarioError(f"{path}: variants.{variant.name}: {err}") from None
        first = first or scn
        if scn.engine != first.engine:
            raise ScenarioError(f"{path}: variants.{variant.name}: engine: all variants run in one engine, "
                                "so engine.ray_num_cpus, engine.address and engine.telemetry must be the same for all")
        if cmp.tune is not None:
            shared = sorted(set(cmp.tune.seeds) & set(cmp.seed_list(scn.seed)))
            if shared:
                raise ScenarioError(f"{path}: tune.seeds: seed {shared[0]} is also an evaluation seed; tuning seeds "
                                    "must be apart from the seeds that give the reported numbers")
            _check_space(path, variant, scn, cmp.tune)
        for seed in cmp.seed_list(scn.seed):
            runs.append(PlannedRun(variant, seed, scn if seed == scn.seed else scn.model_copy(update={"seed": seed})))
    return cmp, runs


def _check_space(path: Path, variant: Variant, scn: Scenario, cfg: TuneConfig) -> None:
    """Every trial must be a valid scenario: the variant with each searched key at the edges of
    its range (and with the trials' seeds and round cap) is checked before anything runs."""
    if cfg.objective.scope == "clients" and scn.mode == "decentralized" or \
            cfg.objective.scope == "nodes-val" and scn.mode == "federated":
        raise ScenarioError(f"{path}: tune.objective.scope: {cfg.objective.scope!r} has no rows in {scn.mode} mode "
                            f"(variant {variant.name}); use {'nodes-val' if scn.mode == 'decentralized' else 'clients'}")
    if scn.data.val_fraction == 0:
        raise ScenarioError(f"{path}: variants.{variant.name}: tune: the clients have no validation split "
                            "(data.val_fraction is 0), and tuning may read nothing else")
    for key, spec in variant.space.items():
        for value in spec.corners():
            try:
                trial_scenario(scn, {key: value}, cfg.seeds[0], cfg)
            except ScenarioError as err:
                raise ScenarioError(f"{path}: variants.{variant.name}: tune.space.{key}: at {value!r}: "
                                    f"{str(err).split(': ', 1)[-1]}") from None


def trial_scenario(scn: Scenario, params: dict[str, Any], seed: int, cfg: TuneConfig) -> Scenario:
    """A tuning trial's run: the variant with the sampled values, at a tuning seed, under the
    trials' round cap, sealed off from the held-out sets (``evaluate.test_sets: false``), without
    the temperature fit or model checkpoints (nothing reads them)."""
    overrides = {**params, "seed": seed, "evaluate.test_sets": False, "evaluate.temperature": "off",
                 "output.checkpoint": False}
    if cfg.rounds is not None:
        overrides["rounds"] = cfg.rounds
    return load_scenario(scn, overrides)


def tuned_scenario(scn: Scenario, params: dict[str, Any]) -> Scenario:
    """An evaluation run with the variant's chosen values."""
    return load_scenario(scn, params) if params else scn


# --------------------------------------------------------------------------- running


@dataclass
class RunOutcome:
    planned: PlannedRun
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    skipped: bool  # finished earlier, read back


def run_comparison(path: str | Path, out: str | Path, extra: list[str] = (), verbose: bool = False,
                   progress: bool | None = None, session: Any = None, seeds: int | list[int] | None = None
                   ) -> dict[str, Any]:
    """Run (or resume) every planned run into ``out`` and write the comparison files; returns
    the comparison's statistics (what ``comparison.json`` holds). ``session``: a
    ``fedens.Session`` to run in (default: one of its own, closed at the end); ``seeds``: in
    place of the file's evaluation seeds (finished runs of seeds the file had are kept).

    With a ``tune:`` block, every variant is tuned first (``tune_variants``: one Optuna study per
    variant in ``out/tuning.db``, trials in ``out/tuning/``), and the evaluation runs use each
    variant's chosen values."""
    cmp, runs = load_comparison(path, list(extra), seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    live = sys.stderr.isatty() if progress is None else progress
    outcomes: list[RunOutcome] = []
    runner = _Runner(runs[0].scenario, verbose, session)
    tuning: dict[str, Any] | None = None
    try:
        if cmp.tune is not None:
            studies = tune_variants(cmp, runs, out, runner)
            tuning = {name: st.as_dict() for name, st in studies.items()}
            write_tuning(cmp, studies, out)
            runs = [PlannedRun(p.variant, p.seed, tuned_scenario(p.scenario, studies[p.variant.name].best_params))
                    for p in runs]
        show = _Progress(len(runs), live)
        for i, planned in enumerate(runs, 1):
            done = runner.finished(planned.folder(out), planned.scenario)
            if done is not None:
                outcomes.append(RunOutcome(planned, *done, skipped=True))
                show.done(i, planned, done[1], skipped=True)
                continue
            show.start(i, planned)
            try:
                rows, summary, _ = runner.run(planned.scenario, planned.folder(out),
                                              lambda r, rows, p=planned, n=i: show.round(n, p, r))
            except BaseException:
                show.clear()
                raise
            outcomes.append(RunOutcome(planned, rows, summary, skipped=False))
            show.done(i, planned, summary, skipped=False)
    finally:
        runner.close()
    report = analyse(cmp, outcomes)
    if tuning is not None:
        report["tuning"] = tuning
    write_outputs(cmp, outcomes, report, out)
    return report


class _Runner:
    """Runs of a comparison (tuning trials and evaluation runs) in one warm engine, started at
    the first run that has to run; a finished run whose scenario is unchanged is read back."""

    def __init__(self, first: Scenario, verbose: bool, session: Any = None) -> None:
        self.first, self.verbose, self.session, self.own = first, verbose, session, session is None

    def finished(self, folder: Path, scn: Scenario) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """``(rows, summary)`` of a run done earlier with this very scenario, else None."""
        from fedens.results import read_metrics

        if not _finished(folder, _marker(scn)):
            return None
        return read_metrics(folder), json.loads((folder / "summary.json").read_text())

    def run(self, scn: Scenario, folder: Path, on_round: Any) -> tuple[list[dict[str, Any]], dict[str, Any], BaseException | None]:
        """Run ``scn`` into ``folder`` (a failed, interrupted or changed run there starts again,
        clean). Returns its rows, summary and, when ``on_round`` raised to stop it, that exception;
        a diverged run is a result (returned); any other failure raises ``RunFailed``."""
        from fedens.api import RunDiverged, RunFailed, Session, _root
        from fedens.cluster import cluster_address
        from fedens.results import read_metrics

        if folder.exists():
            shutil.rmtree(folder)
        if self.session is None:
            first = self.first
            self.session = Session(ray_num_cpus=first.engine.ray_num_cpus, verbose=self.verbose,
                                   telemetry=first.engine.telemetry, address=cluster_address(first),
                                   resources={"num_cpus": first.resources.num_cpus, "num_gpus": first.resources.num_gpus})
            self.session.engine.start()
        stopped: BaseException | None = None
        try:
            result = self.session.run(scn, out=folder, on_round=on_round)
            rows, summary = result.rows, result.summary
        except RunDiverged:  # a result of the method: recorded, counted, and the comparison goes on
            rows, summary = read_metrics(folder), json.loads((folder / "summary.json").read_text())
        except RunFailed as err:
            stopped = _root(err)
            if not isinstance(stopped, _StopTrial):
                raise
            rows, summary = read_metrics(folder), json.loads((folder / "summary.json").read_text())
        if stopped is None:
            (folder / MARKER).write_text(_marker(scn), encoding="utf-8")
        return rows, summary, stopped

    def close(self) -> None:
        if self.own and self.session is not None:
            self.session.close()


def _marker(scn: Scenario) -> str:
    return json.dumps(scn.model_dump(mode="json"), sort_keys=True)


# --------------------------------------------------------------------------- tuning


class _StopTrial(Exception):
    """Raised from a trial run's round callback when the pruner stops the trial."""


def objective_value(rows: list[dict[str, Any]], scope: str, metric: str) -> float | None:
    """The objective's metric in the last ``scope`` row that has a finite one."""
    values = [r[metric] for r in rows if r.get("scope") == scope and isinstance(r.get(metric), (int, float))
              and math.isfinite(r[metric])]
    return float(values[-1]) if values else None


def tune_variants(cmp: Comparison, runs: list[PlannedRun], out: Path, runner: _Runner) -> dict[str, Any]:
    """Tune every variant with the same budget (``fedens.tuning``); ``{variant: StudySummary}``."""
    from fedens.tuning import StudySummary, TrialOutcome, fingerprint, run_study

    cfg = cmp.tune
    storage = f"sqlite:///{(out / 'tuning.db').resolve()}"
    base = {}
    for p in runs:  # the variant's scenario at its first evaluation seed; trials replace the seed
        base.setdefault(p.variant.name, p)
    studies: dict[str, StudySummary] = {}
    for name, planned in base.items():
        variant, scn = planned.variant, planned.scenario
        if not variant.space:  # a fixed control (every shared key dropped): runs at its given settings, no trials
            studies[name] = StudySummary(name=name, space={}, objective=f"{cfg.objective.scope} {cfg.objective.metric}",
                                         direction=cfg.objective.optuna_direction, trials=0, complete=0, pruned=0,
                                         diverged=0, best_value=None, best_params={}, best_trial=None)
            print(f"tune {name}: not tuned (its space is empty: a fixed control)", file=sys.stderr, flush=True)
            continue
        probe = trial_scenario(scn, {}, cfg.seeds[0], cfg)
        steps = probe.rounds + 1  # pruning steps: (tuning seed index, round)

        def evaluate(k: int, params: dict[str, Any], report: Any, variant: Variant = variant, scn: Scenario = scn) -> TrialOutcome:
            values = []
            for j, seed in enumerate(cfg.seeds):
                trial = trial_scenario(scn, params, seed, cfg)
                folder = out / "tuning" / variant.name / f"trial-{k}" / f"seed-{seed}"

                def on_round(r: int, rows: list[dict[str, Any]], j: int = j) -> None:
                    value = objective_value(rows, cfg.objective.scope, cfg.objective.metric)
                    if value is not None and report(j * steps + r, value):
                        raise _StopTrial(f"pruned at round {r}")

                done = runner.finished(folder, trial)
                if done is not None:  # a seed finished before an interruption: replay its values for the pruner
                    rows, summary = done
                    try:
                        for r in sorted({row["round"] for row in rows}):
                            on_round(r, [row for row in rows if row["round"] == r])
                    except _StopTrial as stop:
                        return TrialOutcome(None, "pruned", str(stop))
                else:
                    rows, summary, stopped = runner.run(trial, folder, on_round)
                    if stopped is not None:
                        return TrialOutcome(None, "pruned", str(stopped))
                if outcome(summary) == "diverged":
                    return TrialOutcome(None, "diverged", f"seed {seed}: {summary.get('error')}")
                values.append(objective_value(rows, cfg.objective.scope, cfg.objective.metric))
            if any(v is None for v in values):
                return TrialOutcome(None, "diverged", f"no {cfg.objective.scope} {cfg.objective.metric} to read")
            return TrialOutcome(sum(values) / len(values), "complete")

        def log(line: str, name: str = name) -> None:
            print(f"tune {name}: {line}", file=sys.stderr, flush=True)

        try:
            studies[name] = run_study(storage, name, cfg, variant.space, fingerprint(cfg, variant.space, json.loads(_marker(scn))),
                                      evaluate, log)
        except ValueError as err:
            raise ScenarioError(f"{out}: tune: {err}") from None
    return studies


def write_tuning(cmp: Comparison, studies: dict[str, Any], out: Path) -> None:
    """``tuning.csv`` (one row per variant), ``tuning.md`` and ``tuning.png`` (every trial's
    value and the best so far, per variant)."""
    from fedens import plots

    keys = sorted({k for st in studies.values() for k in st.space})
    rows = []
    for name, st in studies.items():
        rows.append({"variant": name, "tuned": bool(st.space), "trials": st.trials, "complete": st.complete, "pruned": st.pruned,
                     "diverged": st.diverged, "objective": st.objective, "direction": st.direction,
                     "best_value": st.best_value, "best_trial": st.best_trial,
                     **{f"best.{k}": st.best_params.get(k) for k in keys}})
    with open(out / "tuning.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "tuning.md").write_text(tuning_markdown(cmp, studies), encoding="utf-8")
    plots.save(plots.tuning_figure({n: st.history for n, st in studies.items()}, st.direction,
                                   f"{cmp.name}: tuning trials ({cmp.tune.objective.scope} {cmp.tune.objective.metric})")[0],
               out / "tuning.png")


def tuning_markdown(cmp: Comparison, studies: dict[str, Any]) -> str:
    cfg = cmp.tune
    lines = [f"# {cmp.name}: tuning", "",
             f"Every variant: {cfg.trials} trials ({cfg.sampler}, {cfg.startup} random start-up trials, pruner "
             f"{cfg.pruner}), each on tuning seeds {', '.join(map(str, cfg.seeds))} "
             f"(evaluation seeds are apart), {'the scenario' + chr(39) + 's rounds' if cfg.rounds is None else f'at most {cfg.rounds} rounds'}; "
             f"objective: {cfg.objective.optuna_direction} the {cfg.objective.metric} of the "
             f"{'clients' + chr(39) + ' validation splits' if cfg.objective.scope == 'clients' else 'nodes' + chr(39) + ' own validation splits'} "
             "at the trial's last evaluation. The test and shifted sets are sealed in every trial. "
             "Studies: `tuning.db` (Optuna SQLite; `optuna-dashboard sqlite:///tuning.db`).", "",
             "| variant | space | trials (complete / pruned / diverged) | best value | chosen |", "|---|---|---|---|---|"]
    for name, st in studies.items():
        space = "; ".join(f"{k}: {_space_label(v)}" for k, v in st.space.items()) or "(none)"
        chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in st.best_params.items())
        best = ("n/a (a fixed control: not tuned)" if not st.space else "n/a (no trial finished: untuned settings)") \
            if st.best_value is None else f"{st.best_value:.4f}"
        lines.append(f"| {name} | {space} | {st.trials} ({st.complete} / {st.pruned} / {st.diverged}) | {best} | "
                     f"{chosen or '(defaults)'} |")
    counts = {st.trials for st in studies.values() if st.space}  # fixed controls spend no budget by design
    if len(counts) > 1:
        lines += ["", f"Warning: the variants' trial counts differ ({sorted(counts)}): the budgets are not equal."]
    return "\n".join(lines) + "\n"


def _space_label(spec: dict[str, Any]) -> str:
    if "choices" in spec:
        return "{" + ", ".join(map(str, spec["choices"])) + "}"
    kind = "log " if spec.get("log") else ""
    return f"{kind}[{spec['low']:g}, {spec['high']:g}]" + (" (int)" if spec.get("int") else "")


def _finished(folder: Path, marker: str) -> bool:
    try:
        summary = json.loads((folder / "summary.json").read_text())
        return outcome(summary) in DONE and (folder / MARKER).read_text(encoding="utf-8") == marker
    except (OSError, ValueError):
        return False


class _Progress:
    """One line on stderr: run i of N, variant, seed, round, and the time left (from the mean
    time per round of the runs done so far). Without a terminal: a line per finished run."""

    def __init__(self, total: int, live: bool) -> None:
        self.total, self.live = total, live
        self.started = time.time()
        self.rounds_done = 0.0  # rounds run (not skipped) so far, for the estimate
        self.rounds_left = 0
        self.run_rounds: dict[int, int] = {}

    def start(self, i: int, p: PlannedRun) -> None:
        self.run_rounds[i] = 0
        self._line(f"run {i}/{self.total} {p.variant.name} seed {p.seed}: starting")

    def round(self, i: int, p: PlannedRun, r: int) -> None:
        self.run_rounds[i] = r
        self._line(f"run {i}/{self.total} {p.variant.name} seed {p.seed}: round {r}/{p.scenario.rounds}{self._eta(i, p)}")

    def done(self, i: int, p: PlannedRun, summary: dict[str, Any], skipped: bool) -> None:
        if not skipped:
            self.rounds_done += p.scenario.rounds
        what = "done earlier" if skipped else f"{summary.get('wall_time_s', 0):.1f}s"
        if outcome(summary) != "ok":
            what += f", {outcome(summary)}: {summary.get('error')}"
        acc = (summary.get("final", {}).get("global-test") or {}).get("accuracy")
        text = f"run {i}/{self.total} {p.variant.name} seed {p.seed}: {what}" + (f", test accuracy {acc:.4f}" if acc is not None else "")
        if self.live:
            self._line(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _eta(self, i: int, p: PlannedRun) -> str:
        done = self.rounds_done + self.run_rounds.get(i, 0)
        if done <= 0:
            return ""
        per_round = (time.time() - self.started) / done
        left = (p.scenario.rounds - self.run_rounds.get(i, 0)) + p.scenario.rounds * (self.total - i)
        return f", about {per_round * left / 60:.1f} min left"

    def _line(self, text: str) -> None:
        if self.live:
            print("\r\x1b[2K" + text, end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.live:
            print(file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def outcome(summary: dict[str, Any]) -> str:
    """A run's status, with ``diverged`` for a run that failed because its model became
    non-finite (``summary.json``: status ``failed``, failure ``diverged``)."""
    status = str(summary.get("status"))
    return "diverged" if status == "failed" and summary.get("failure") == "diverged" else status


def run_row(o: RunOutcome, target_level: float | None, target: Target | None) -> dict[str, Any]:
    """One line of runs.csv: the run's final metrics per scope and its facts."""
    final = o.summary.get("final", {})
    row: dict[str, Any] = {"variant": o.planned.variant.name, "seed": o.planned.seed, "status": outcome(o.summary)}
    ok = row["status"] == "ok"  # a diverged run has no final model: its metrics stay empty
    for column, scope, metric in FINAL:
        row[column] = (final.get(scope) or {}).get(metric) if ok else None
    train = [r for r in o.rows if r["scope"] == "train"]
    row["rounds_to_target"] = (None if target is None or target_level is None or not ok
                               else rounds_to([r for r in o.rows if r["scope"] == "global-test"], target.metric, target_level))
    row["rounds_used"] = o.summary.get("rounds_done") if ok else None  # below the cap when stop: ended it
    row["stopped_early"] = o.summary.get("stopped") is not None
    row["bytes_per_client_round"] = sum(node_bytes(r) for r in train) / max(len(train), 1)
    row["wall_time_s"] = o.summary.get("wall_time_s")
    return row


def analyse(cmp: Comparison, outcomes: list[RunOutcome]) -> dict[str, Any]:
    """Per variant and metric the summary over seeds; per variant the paired difference with
    the reference at the same grid point; and every run's row."""
    from fedens import stats

    variants = cmp.expand()
    by_variant: dict[str, list[RunOutcome]] = {v.name: [] for v in variants}
    for o in outcomes:
        by_variant[o.planned.variant.name].append(o)
    # the target's level per grid point (relative targets: a fraction of a variant's mean)
    levels: dict[str, float | None] = {}
    for v in variants:
        if cmp.target is None:
            levels[v.name] = None
        elif cmp.target.value is not None:
            levels[v.name] = float(cmp.target.value)
        else:
            of = _at_point(cmp.target.of, v, variants)
            vals = [(o.summary.get("final", {}).get("global-test") or {}).get(cmp.target.metric) for o in by_variant.get(of, [])]
            mean = stats.summary(vals).mean
            levels[v.name] = None if mean is None else cmp.target.fraction * mean
    rows = [run_row(o, levels[o.planned.variant.name], cmp.target) for o in outcomes]
    columns = [c for c, _, _ in FINAL] + list(RUN_FACTS)
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v.name]
        table[v.name] = {"named": v.named, "grid_point": v.point, "seeds": sorted(r["seed"] for r in mine),
                         "statuses": dict(sorted(Counter(r["status"] for r in mine).items())),
                         "target_level": levels[v.name],
                         **{c: stats.summary([r[c] for r in mine]).as_dict() for c in columns}}
    versus: dict[str, dict[str, Any]] = {}
    if cmp.reference is not None:
        for v in variants:
            ref = _at_point(cmp.reference, v, variants)
            if ref == v.name:
                continue
            mine = {r["seed"]: r for r in rows if r["variant"] == v.name}
            theirs = {r["seed"]: r for r in rows if r["variant"] == ref}
            versus[v.name] = {"reference": ref, **{
                c: stats.paired({s: r[c] for s, r in mine.items()}, {s: r[c] for s, r in theirs.items()}).as_dict()
                for c in columns}}
    return {"name": cmp.name, "reference": cmp.reference,
            "target": None if cmp.target is None else cmp.target.label(),
            "variants": table, "versus_reference": versus, "runs": rows}


def _at_point(named: str, v: Variant, variants: list[Variant]) -> str:
    """The variant ``named`` at ``v``'s grid point (``named`` may already be a full name)."""
    names = {x.name for x in variants}
    candidate = "-".join(p for p in (named, v.point) if p)
    return candidate if candidate in names else named


# --------------------------------------------------------------------------- outputs


def fmt_interval(s: dict[str, Any], digits: int = 4) -> str:
    if s.get("mean") is None:
        return "n/a"
    if s.get("ci_low") is None:
        return f"{s['mean']:.{digits}f}"
    half = (s["ci_high"] - s["ci_low"]) / 2
    return f"{s['mean']:.{digits}f} ± {half:.{digits}f}"


def runs_cell(row: dict[str, Any]) -> str:
    """``5``, or ``3 (2 diverged)`` when not every run finished ok."""
    statuses = row.get("statuses") or {}
    ok = statuses.get("ok", len(row["seeds"]) if not statuses else 0)
    rest = ", ".join(f"{n} {status}" for status, n in statuses.items() if status != "ok")
    return f"{ok} ({rest})" if rest else str(ok)


def markdown_report(report: dict[str, Any]) -> str:
    """The comparison as Markdown: per variant mean ± 95% half-interval over seeds; then each
    variant against the reference: the paired mean difference ± its half-interval, and p."""
    labels = {"test_accuracy": "accuracy", "test_nll": "NLL", "test_ece": "ECE", "test_brier": "Brier",
              "test_ood_auroc": "OOD AUROC", "shift_ece": "shift ECE", "test_conformal_coverage": "set coverage",
              "test_conformal_size": "set size", "shift_conformal_coverage": "shift set coverage",
              "student_accuracy": "student accuracy", "student_ece": "student ECE",
              "test_compute_fraction": "compute", "test_compute_vs_plain": "compute vs plain",
              "test_routing_gain": "gain over static exits", "test_threshold_gain": "gain over threshold exits", "test_nll_ts": "NLL (TS)", "test_ece_ts": "ECE (TS)",
              "test_temperature": "T"}
    measured = [c for c in OPTIONAL if any((row.get(c) or {}).get("mean") is not None for row in report["variants"].values())]
    stopped = any(r.get("stopped_early") for r in report.get("runs", []))
    cols = list(TABLE) + measured + (["rounds_to_target"] if report.get("target") else []) \
        + (["rounds_used"] if stopped else []) + ["bytes_per_client_round", "wall_time_s"]
    names = {**labels, "rounds_to_target": "rounds to target", "rounds_used": "rounds used",
             "bytes_per_client_round": "kB/client/round", "wall_time_s": "wall s"}
    lines = [f"# {report['name']}", "",
             "Mean ± half-width of the 95% Student-t interval over the seeds (n seeds per variant).", ""]
    lines.append("| variant | n | " + " | ".join(names[c] for c in cols) + " |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for name, row in report["variants"].items():
        cells = []
        for c in cols:
            s = row[c]
            if c == "bytes_per_client_round" and s.get("mean") is not None:
                s = {k: (v / 1000 if isinstance(v, float) and k != "n" else v) for k, v in s.items()}
                cells.append(fmt_interval(s, 1))
            elif c in ("wall_time_s", "rounds_to_target", "rounds_used"):
                cells.append(fmt_interval(s, 1))
            else:
                cells.append(fmt_interval(s))
        lines.append(f"| {name} | {runs_cell(row)} | " + " | ".join(cells) + " |")
    if any(set(row.get("statuses", {})) - {"ok"} for row in report["variants"].values()):
        lines += ["", "n: the runs that finished; a run that diverged (its model became non-finite) has no "
                  "final metrics and is left out of the means, so read those means with its count."]
    if report.get("target"):
        lines += ["", f"Target: {report['target']} (first evaluated round that reaches it; runs that never do are left out)."]
    if report["versus_reference"]:
        lines += ["", f"## Against the reference ({report['reference']})", "",
                  "Paired over the same seeds: mean of (variant - reference) ± half-width of its 95% interval, "
                  "and the two-sided p-value of the paired t-test.", ""]
        diff_cols = [c for c in cols if c not in ("wall_time_s", "rounds_used")]
        lines.append("| variant | reference | n | " + " | ".join(f"Δ {names[c]} (p)" for c in diff_cols) + " |")
        lines.append("|---" * (len(diff_cols) + 3) + "|")
        for name, row in report["versus_reference"].items():
            cells = []
            for c in diff_cols:
                d = row[c]
                p = "" if d.get("p_value") is None else f" (p={d['p_value']:.3f})"
                scale = 1000 if c == "bytes_per_client_round" else 1
                dd = {k: (v / scale if isinstance(v, float) and k in ("mean", "ci_low", "ci_high") else v) for k, v in d.items()}
                cells.append(fmt_interval(dd, 1 if c in ("bytes_per_client_round", "rounds_to_target") else 4) + p)
            n = max((row[c]["n"] for c in diff_cols), default=0)
            lines.append(f"| {name} | {row['reference']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(cmp: Comparison, outcomes: list[RunOutcome], report: dict[str, Any], out: Path) -> None:
    from fedens import plots

    rows = report["runs"]
    if rows:
        with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / "comparison.json").write_text(json.dumps(strict(report), indent=2, allow_nan=False, default=_json_default),
                                         encoding="utf-8")
    (out / "comparison.md").write_text(markdown_report(report), encoding="utf-8")
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    reliability: dict[str, list[dict[str, Any]]] = {}
    gossip: dict[str, list[dict[str, Any]]] = {}
    for o in outcomes:
        name = o.planned.variant.name
        curves.setdefault(name, []).append([r for r in o.rows if r["scope"] == "global-test"])
        if o.summary.get("reliability"):
            reliability.setdefault(name, []).append(o.summary["reliability"])
        if name not in gossip and any(r["scope"] == "gossip" for r in o.rows):
            gossip[name] = o.rows  # the first seed's run, for the variance plot
    title = f"{cmp.name}: global test set, mean and 95% interval over seeds"
    plots.save(plots.comparison_figure(curves, title)[0], out / "comparison.png")
    if reliability:
        plots.save(plots.reliability_grid_figure(reliability, f"{cmp.name}: test set, pooled over seeds")[0],
                   out / "reliability.png")
    plots.save(plots.tradeoff_figure(report["variants"], f"{cmp.name}: final test metrics against traffic")[0],
               out / "tradeoff.png")
    finals = {name: [c[-1] for c in runs if c] for name, runs in curves.items()}
    if any(plots.has_exits(rows) for rows in finals.values()):  # early exits: accuracy and ECE against compute
        plots.save(plots.exits_figure(finals, f"{cmp.name}: final test set, mean and sd over seeds")[0], out / "exits.png")
    if gossip:  # decentralized variants: weight variance against round, with and without correction
        plots.save(plots.layer_variance_comparison_figure(gossip, per_layer=True, title=f"{cmp.name}: first seed")[0],
                   out / "layer_variance.png")


def _json_default(x: Any) -> Any:
    raise TypeError(f"not JSON: {type(x).__name__}")
