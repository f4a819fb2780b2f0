"""Equal-budget tuning (fedens.tuning, fedens.compare's tune block) without Ray: the study loop
on synthetic objectives, resuming, the budget, and what a comparison file may say."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedens.compare import load_comparison, objective_value, trial_scenario
from fedens.data import load_server_data
from fedens.scenario import DataConfig, ScenarioError
from fedens.sealed import SealedSetError, seal
from fedens.tuning import TrialOutcome, TuneConfig, run_study
from tests.conftest import ROOT

SPACE = {"x": {"low": 0.003, "high": 0.5, "log": True}}


def _bowl(params: dict) -> float:
    """A known optimum: x = 0.05 (in log x, a parabola)."""
    return (math.log(params["x"]) - math.log(0.05)) ** 2


def _study(tmp_path: Path, name: str = "v", **cfg) -> tuple[str, TuneConfig]:
    return f"sqlite:///{tmp_path / 'tuning.db'}", TuneConfig(**{"seeds": [1000], "space": SPACE, "pruner": "none", **cfg})


def test_tpe_finds_the_known_optimum(tmp_path: Path) -> None:
    storage, cfg = _study(tmp_path, trials=30)
    st = run_study(storage, "v", cfg, cfg.space, "fp", lambda k, p, r: TrialOutcome(_bowl(p), "complete"))
    assert st.trials == st.complete == 30
    assert st.best_params["x"] == pytest.approx(0.05, rel=0.15)
    assert st.best_value == pytest.approx(min(h["value"] for h in st.history))


def test_an_interrupted_study_resumes_with_the_same_trials(tmp_path: Path) -> None:
    storage, cfg = _study(tmp_path, trials=8)
    whole = run_study(storage, "whole", cfg, cfg.space, "fp", lambda k, p, r: TrialOutcome(_bowl(p), "complete"))

    class Killed(BaseException):
        pass

    def dies_in_trial_5(k: int, p: dict, report) -> TrialOutcome:  # noqa: ANN001
        if k == 5:
            raise Killed  # the process stops in the middle of a trial: it stays RUNNING in the database
        return TrialOutcome(_bowl(p), "complete")

    with pytest.raises(Killed):
        run_study(storage, "cut", cfg, cfg.space, "fp", dies_in_trial_5)
    resumed = run_study(storage, "cut", cfg, cfg.space, "fp", lambda k, p, r: TrialOutcome(_bowl(p), "complete"))
    assert [h["params"] for h in resumed.history] == [h["params"] for h in whole.history]
    assert resumed.trials == 8 and resumed.best_params == whole.best_params


def test_pruned_and_diverged_trials_spend_budget(tmp_path: Path) -> None:
    storage, cfg = _study(tmp_path, trials=6, pruner="median", startup_trials=1)
    calls = []

    def evaluate(k: int, p: dict, report) -> TrialOutcome:  # noqa: ANN001
        calls.append(k)
        if k == 2:
            return TrialOutcome(None, "diverged")
        for step in range(5):  # a curve that ends at the objective
            if report(step, _bowl(p) + 5 - step):
                return TrialOutcome(None, "pruned")
        return TrialOutcome(_bowl(p), "complete")

    st = run_study(storage, "v", cfg, cfg.space, "fp", evaluate)
    assert calls == list(range(6)) and st.trials == 6
    assert st.diverged == 1 and st.complete + st.pruned == 5
    assert [h["index"] for h in st.history] == list(range(6))


def test_no_trial_is_pruned_before_its_warm_up_rounds(tmp_path: Path) -> None:
    # trial 0 sets the median; trial 1 is far worse at every step: with prune_after 3 it is
    # pruned at step 3 (the first step past the warm-up), not at step 0
    storage, cfg = _study(tmp_path, trials=2, pruner="median", startup_trials=1, prune_after=3)
    assert TuneConfig(trials=2, seeds=[1], rounds=30).warmup == 15 and TuneConfig(trials=2, seeds=[1]).warmup == 0
    stopped_at = {}

    def evaluate(k: int, p: dict, report) -> TrialOutcome:  # noqa: ANN001
        for step in range(6):
            if report(step, 1.0 if k == 0 else 100.0):
                stopped_at[k] = step
                return TrialOutcome(None, "pruned")
        return TrialOutcome(1.0 if k == 0 else 100.0, "complete")

    st = run_study(storage, "v", cfg, cfg.space, "fp", evaluate)
    assert stopped_at == {1: 3} and (st.complete, st.pruned) == (1, 1)


def test_a_study_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    storage, cfg = _study(tmp_path, trials=1)
    run_study(storage, "v", cfg, cfg.space, "fp-1", lambda k, p, r: TrialOutcome(1.0, "complete"))
    with pytest.raises(ValueError, match="other settings"):
        run_study(storage, "v", cfg, cfg.space, "fp-2", lambda k, p, r: TrialOutcome(1.0, "complete"))


def test_the_objective_is_the_last_finite_value_of_its_scope() -> None:
    rows = [{"round": 1, "scope": "clients", "nll": 0.9}, {"round": 1, "scope": "global-test", "nll": 0.1},
            {"round": 2, "scope": "clients", "nll": 0.7}, {"round": 3, "scope": "clients", "nll": float("nan")}]
    assert objective_value(rows, "clients", "nll") == 0.7
    assert objective_value(rows, "nodes-val", "nll") is None


# --------------------------------------------------------------------------- comparison files

BASE = {"name": "b", "rounds": 3, "data": {"dataset": "digits", "num_clients": 3}, "model": {"kind": "mlp", "hidden": [8]}}


def _comparison(tmp_path: Path, **body) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "seeds": [0, 1], **body}))
    return path


TUNE = {"trials": 4, "seeds": [1000], "space": {"train.lr": {"low": 0.01, "high": 0.5, "log": True}}}


def test_every_variant_gets_the_shared_space_and_its_own(tmp_path: Path) -> None:
    cmp, runs = load_comparison(_comparison(tmp_path, tune=TUNE, variants={
        "sgd": {}, "mom": {"train": {"momentum": 0.9}, "tune": {"space": {"train.momentum": {"low": 0, "high": 0.95}}}},
        "own_lr": {"tune": {"space": {"train.lr": None, "train.weight_decay": {"low": 0, "high": 0.1}}}}}))
    spaces = {v.name: sorted(v.space) for v in cmp.expand()}
    assert spaces == {"sgd": ["train.lr"], "mom": ["train.lr", "train.momentum"], "own_lr": ["train.weight_decay"]}
    assert cmp.tune.trials == 4  # one budget, for every variant
    trial = trial_scenario(runs[0].scenario, {"train.lr": 0.2}, 1000, cmp.tune)
    assert trial.seed == 1000 and trial.train.lr == 0.2 and not trial.evaluate.test_sets
    assert trial.evaluate.temperature == "off"


def test_a_variant_with_an_empty_space_is_a_fixed_control_and_spends_no_trials(tmp_path: Path) -> None:
    from fedens.compare import tune_variants, tuning_markdown

    cmp, runs = load_comparison(_comparison(tmp_path, tune=TUNE, variants={
        "fixed": {"train": {"lr": 0.05}, "tune": {"space": {"train.lr": None}}}}))

    class NeverRun:  # a fixed control must not start a single trial
        def finished(self, *a):
            pytest.fail("a trial was looked up for a fixed control")

        run = finished

    studies = tune_variants(cmp, runs, tmp_path, NeverRun())
    st = studies["fixed"]
    assert (st.trials, st.best_params, st.best_value, st.space) == (0, {}, None, {})
    assert not (tmp_path / "tuning.db").exists()
    text = tuning_markdown(cmp, studies)
    assert "| fixed | (none) | 0 (0 / 0 / 0) | n/a (a fixed control: not tuned) | (defaults) |" in text
    assert "Warning" not in text  # a fixed control is not a budget mismatch


@pytest.mark.parametrize("body,match", [
    ({"tune": TUNE, "variants": {"a": {"tune": {"trials": 9}}}}, "the same for every variant"),
    ({"variants": {"a": {"tune": {"space": {}}}}}, "needs the comparison's tune block"),
    ({"tune": {**TUNE, "seeds": [1]}, "variants": {"a": {}}}, "also an evaluation seed"),
    ({"tune": {**TUNE, "space": {"train.lr": {"low": -1, "high": 0.5}}}, "variants": {"a": {}}}, "train.lr"),
    ({"tune": {**TUNE, "space": {"train.lrr": {"low": 0.1, "high": 0.5}}}, "variants": {"a": {}}}, "tune.space.train.lrr"),
    ({"tune": {**TUNE, "space": {"train.lr": {"low": 0.0, "high": 0.5, "log": True}}}, "variants": {"a": {}}}, "log"),
    ({"tune": {**TUNE, "objective": {"scope": "nodes-val"}}, "variants": {"a": {}}}, "no rows in federated mode"),
])
def test_bad_tune_blocks_are_one_line_errors(tmp_path: Path, body: dict, match: str) -> None:
    with pytest.raises(ScenarioError, match=match) as err:
        load_comparison(_comparison(tmp_path, **body))
    assert "\n" not in str(err.value)


def test_a_sealed_set_cannot_be_read() -> None:
    data = seal(load_server_data(DataConfig(), 0))
    for use in (lambda: len(data.test), lambda: data.test.x, lambda: data.shift.y, lambda: data.ood.x):
        with pytest.raises(SealedSetError, match="sealed"):
            use()
    assert data.num_classes == 10 and len(data.public) == 0  # what a run needs besides stays


def test_the_benchmark_comparisons_with_a_tune_block_validate() -> None:
    for path in sorted((ROOT / "benchmarks").glob("*.yaml")):
        cmp, runs = load_comparison(path)
        if cmp.tune is not None:
            assert set(cmp.tune.seeds).isdisjoint({r.seed for r in runs}), path.name
            assert all(np.isfinite(r.scenario.rounds) for r in runs)
