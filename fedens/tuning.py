"""Equal-budget tuning of a comparison's variants on the clients' validation splits, with Optuna.

A comparison is only fair when every method got the same chance: the same number of trials over
the same kind of search, selected on validation data only, with seeds apart from the ones that
produce the reported numbers. A comparison file's ``tune:`` block says how::

    tune:
      trials: 12                 # per variant; the same for every variant
      seeds: [1000]              # tuning seeds, disjoint from the evaluation `seeds`
      objective: {metric: nll, scope: clients, direction: minimize}
      space: {train.lr: {low: 0.003, high: 0.5, log: true}}
      pruner: median             # or none
    variants:
      ivon: {learner: {kind: ivon}, tune: {space: {learner.hess_init: {low: 0.01, high: 3, log: true}}}}

Every variant gets one Optuna study (its name is the variant's) in ``OUT/tuning.db``, Optuna's own
SQLite storage, so an interrupted tuning resumes where it stopped and optuna-dashboard can open
the file. A trial runs the variant with the sampled values on every tuning seed with
``evaluate.test_sets: false``: the run never reads the test, shifted or OOD sets (they are sealed,
``fedens.sealed``), and its value is the mean over the tuning seeds of the objective's metric in
the last row of its scope (``clients``: the mean over the clients' validation splits; gossip:
``nodes-val``). The per-round values feed the pruner.

Determinism and resuming: the sampler of the k-th trial is seeded from ``(tune.seed, k)`` and sees
the finished trials only, so the k-th trial's values depend on nothing but the trials before it:
a study interrupted in the middle of a trial and resumed asks the same values again (the
interrupted trial is marked failed and not counted). Counted towards the budget: finished,
pruned and diverged trials (a diverged trial spent its budget like any other).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedens.metrics import higher_is_better
from fedens.seeding import derive_seed


class ParamSpace(BaseModel):
    """One searched key: a float (``log`` for a log-uniform search) or an integer range, or a
    list of ``choices``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = Field(False, description="an integer range")
    step: float | None = Field(None, gt=0, description="a grid step inside [low, high] (not with log)")
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamSpace:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either choices (a non-empty list) or low and high")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give low < high (or choices)")
        if self.log and self.low <= 0:
            raise ValueError("log: low must be > 0")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self

    def suggest(self, trial: Any, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if self.int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> list[Any]:
        """The values at the edges of the space, to validate the scenario with before running."""
        if self.choices is not None:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.int else [self.low, self.high]


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str = Field("nll", min_length=1)
    scope: Literal["clients", "nodes-val"] = Field("clients", description="validation rows only: never a test set")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="None: maximize accuracy-like metrics")

    @property
    def maximise(self) -> bool:
        return self.direction == "maximize" if self.direction is not None else higher_is_better(self.metric)

    @property
    def optuna_direction(self) -> str:
        return "maximize" if self.maximise else "minimize"


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    trials: int = Field(..., ge=1, le=10_000, description="per variant; the same for every variant")
    seeds: list[int] = Field(..., description="tuning seeds, disjoint from the evaluation seeds")
    objective: Objective = Field(default_factory=Objective)
    space: dict[str, ParamSpace] = Field(default_factory=dict, description="dotted scenario key -> its range")
    pruner: Literal["median", "none"] = "median"
    sampler: Literal["tpe", "random"] = "tpe"
    rounds: int | None = Field(None, ge=1, le=1_000_000, description="round cap per trial; None: the scenario's rounds")
    startup_trials: int | None = Field(
        None, ge=0, description="random trials before TPE models the history and before pruning starts; None: trials // 3")
    seed: int = Field(0, ge=0, description="seeds the sampler (trial k: derived from (seed, k))")
    prune_after: int | None = Field(
        None, ge=0, description="rounds a trial runs before the pruner may stop it (a slow start is not a bad "
        "plateau); None: half of `rounds` (0 when `rounds` is not given)")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("a list of distinct seeds >= 0")
        return v

    @property
    def startup(self) -> int:
        return self.trials // 3 if self.startup_trials is None else self.startup_trials

    @property
    def warmup(self) -> int:
        """Pruning steps before the pruner may stop a trial (steps are rounds of the first seed)."""
        if self.prune_after is not None:
            return self.prune_after
        return (self.rounds // 2) if self.rounds is not None else 0


class VariantTune(BaseModel):
    """A variant's own part of the search: keys added to (or replacing) the shared space. The
    budget (trials, seeds, rounds, objective) is the comparison's, the same for every variant."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    space: dict[str, ParamSpace | None] = Field(
        default_factory=dict, description="keys to search for this variant; null drops a shared key it does not use "
        "(e.g. train.lr for a learner with a learning rate of its own)")

    def merged(self, shared: dict[str, ParamSpace]) -> dict[str, ParamSpace]:
        """The variant's whole space: the shared one with this variant's keys added, replaced or dropped."""
        out = {**shared, **{k: v for k, v in self.space.items() if v is not None}}
        return {k: v for k, v in out.items() if self.space.get(k, v) is not None}

    @model_validator(mode="before")
    @classmethod
    def _budget_is_shared(cls, data: Any) -> Any:
        if isinstance(data, dict):
            shared = sorted(set(data) & set(TuneConfig.model_fields) - {"space"})
            if shared:
                raise ValueError(f"{shared[0]}: the tuning budget is the same for every variant: set it in the "
                                 "comparison's tune block (a variant may only add to the space)")
        return data


# --------------------------------------------------------------------------- the study loop


@dataclass(frozen=True)
class TrialOutcome:
    value: float | None
    state: Literal["complete", "pruned", "diverged"]
    note: str = ""


# report(step, value) -> whether the pruner says to stop this trial now
Reporter = Callable[[int, float], bool]
Evaluate = Callable[[int, dict[str, Any], Reporter], TrialOutcome]


@dataclass
class StudySummary:
    """What a variant's tuning found (``tuning.csv`` / ``tuning.md``)."""

    name: str
    space: dict[str, dict[str, Any]]
    objective: str
    direction: str
    trials: int  # counted towards the budget
    complete: int
    pruned: int
    diverged: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None  # its index (0-based, in the order asked)
    history: list[dict[str, Any]] = field(default_factory=list)  # per counted trial: index, state, value, params

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def counted(trials: list[Any]) -> list[Any]:
    """The trials that spent budget: finished, pruned or diverged (not ones an interruption cut)."""
    from optuna.trial import TrialState

    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.user_attrs.get("diverged"))]


def run_study(storage: str, name: str, cfg: TuneConfig, space: dict[str, ParamSpace], fingerprint: str,
              evaluate: Evaluate, log: Callable[[str], None] = lambda _: None) -> StudySummary:
    """Run (or resume) the study ``name`` in ``storage`` until ``cfg.trials`` trials are counted.

    fingerprint : what the study's trials were made with (space, objective, rounds, seeds, the
        variant's scenario); a stored study with another one is refused (``ValueError``), since its
        trials would not be trials of this search."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction=cfg.objective.optuna_direction,
                                load_if_exists=True)
    stored = study.user_attrs.get("fedens")
    if stored is None:
        study.set_user_attr("fedens", fingerprint)
    elif stored != fingerprint:
        raise ValueError(f"the study {name!r} in {storage} was made with other settings (space, objective, rounds, "
                         "seeds or the variant's scenario); use another --out to tune again")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # cut by an interruption
        study.tell(t.number, state=TrialState.FAIL)
    while (k := len(counted(study.get_trials(deepcopy=False)))) < cfg.trials:
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(cfg, k), pruner=_pruner(cfg))
        trial = study.ask()
        params = {key: spec.suggest(trial, key) for key, spec in space.items()}
        trial.set_user_attr("index", k)

        def report(step: int, value: float, trial: Any = trial) -> bool:
            trial.report(value, step)
            return cfg.pruner != "none" and trial.should_prune()

        outcome = evaluate(k, params, report)
        if outcome.state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif outcome.state == "diverged" or outcome.value is None or not math.isfinite(outcome.value):
            trial.set_user_attr("diverged", True)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, outcome.value)
        log(f"trial {k + 1}/{cfg.trials} {_fmt_params(params)}: "
            + (f"{cfg.objective.metric} {outcome.value:.4f}" if outcome.state == "complete" else outcome.state)
            + (f" ({outcome.note})" if outcome.note else ""))
    return summarise(study, name, cfg, space)


def summarise(study: Any, name: str, cfg: TuneConfig, space: dict[str, ParamSpace]) -> StudySummary:
    from optuna.trial import TrialState

    trials = sorted(counted(study.get_trials(deepcopy=False)), key=lambda t: t.user_attrs.get("index", t.number))
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "diverged"}
    history = [{"index": t.user_attrs.get("index", t.number), "state": states[t.state],
                "value": t.value if t.state == TrialState.COMPLETE else
                (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                "params": dict(t.params)} for t in trials]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = (max if cfg.objective.maximise else min)(done, key=lambda t: t.value) if done else None
    return StudySummary(
        name=name, space={k: v.model_dump(exclude_defaults=True) for k, v in space.items()},
        objective=f"{cfg.objective.scope} {cfg.objective.metric}", direction=cfg.objective.optuna_direction,
        trials=len(trials), complete=len(done), pruned=sum(h["state"] == "pruned" for h in history),
        diverged=sum(h["state"] == "diverged" for h in history),
        best_value=None if best is None else float(best.value), best_params={} if best is None else dict(best.params),
        best_trial=None if best is None else best.user_attrs.get("index", best.number), history=history)


def _sampler(cfg: TuneConfig, k: int) -> Any:
    import optuna

    seed = derive_seed(cfg.seed, k) % 2**32
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup)


def _pruner(cfg: TuneConfig) -> Any:
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    # compared at the same (seed, round) step; no pruning before `startup` trials have finished,
    # nor before a trial's `warmup` rounds: an early median favours fast starters over the best plateau
    return optuna.pruners.MedianPruner(n_startup_trials=max(cfg.startup, 1), n_warmup_steps=cfg.warmup)


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "(no space)"


def fingerprint(cfg: TuneConfig, space: dict[str, ParamSpace], scenario: dict[str, Any]) -> str:
    """The settings a study's trials depend on, canonical JSON."""
    return json.dumps({"space": {k: v.model_dump() for k, v in sorted(space.items())},
                       "objective": cfg.objective.model_dump(), "seeds": cfg.seeds, "rounds": cfg.rounds,
                       "sampler": cfg.sampler, "pruner": cfg.pruner, "startup": cfg.startup, "seed": cfg.seed,
                       "scenario": scenario}, sort_keys=True)
