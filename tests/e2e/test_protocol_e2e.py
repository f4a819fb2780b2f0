"""The fair-comparison protocol through the real engine: the temperature fitted on the clients'
validation splits equals a centralised fit on their pooled predictions, early stopping ends a run
where the rule says, and a tuned comparison gives every variant the same budget without ever
reading a held-out set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from scipy.optimize import minimize_scalar

from fedens.calibration import log_predictive
from fedens.compare import run_comparison
from fedens.data import build_federated_data, load_server_data
from fedens.learners import build_learner
from fedens.learners.base import predict_dataset
from fedens.metrics import predictive
from fedens.results import read_metrics
from fedens.scenario import parse_scenario
from fedens.tuning import counted

pytestmark = pytest.mark.e2e

TINY = {
    "name": "tiny", "seed": 3, "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "dirichlet", "alpha": 1.0}, "val_fraction": 0.3},
    "model": {"kind": "mlp", "hidden": [32]}, "train": {"local_epochs": 2, "lr": 0.1},
}


def test_the_federated_temperature_is_the_pooled_validation_fit(session, tmp_path: Path) -> None:
    result = session.run({**TINY, "evaluate": {"temperature": "every"}}, out=tmp_path / "run")
    final = result.scope("global-test")[-1]
    assert all("temperature" in r for r in result.scope("global-test"))  # "every": each evaluation
    # the final global model, rebuilt from its checkpoint, on every client's validation split, pooled
    scn = parse_scenario(result.run_dir / "scenario.yaml")
    facts = load_server_data(scn.data, scn.seed)
    learner = build_learner(scn, facts.input_shape, facts.num_classes, torch.device("cpu"))
    with np.load(result.run_dir / "checkpoint.npz") as ck:
        learner.set_arrays({k: ck[k] for k in ck.files if k != "__round__"})
    vals = [c.val for c in build_federated_data(scn.data, scn.seed).clients]
    z = torch.cat([log_predictive(predictive(predict_dataset(learner, v), learner.predictive_weights)) for v in vals])
    y = torch.cat([torch.from_numpy(v.y) for v in vals]).long()
    nll = lambda t: float(torch.nn.functional.cross_entropy(z / t, y, reduction="sum"))  # noqa: E731
    pooled = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-12}).x
    assert final["temperature"] == pytest.approx(pooled, rel=1e-6)
    assert final["nll_ts"] < final["nll"]  # fitted on validation data, it also helps on the test set here
    # its messages are measurement: the round's bytes are those of a run without it
    plain = session.run({**TINY, "evaluate": {"temperature": "off"}}, out=tmp_path / "plain")
    assert [r["bytes_sent"] for r in result.scope("train")] == [r["bytes_sent"] for r in plain.scope("train")]
    assert "temperature" not in plain.scope("global-test")[-1]


def test_early_stopping_ends_the_run_where_the_rule_says(session, tmp_path: Path) -> None:
    # no round can improve the clients' NLL by 10: the best stays round 1's, and patience 1 stops at 2
    stop = {"metric": "nll", "patience": 1, "min_delta": 10.0}
    result = session.run({**TINY, "rounds": 6, "stop": stop}, out=tmp_path / "run")
    summary = result.summary
    assert summary["status"] == "ok" and summary["rounds_done"] == 2
    assert summary["stopped"] == {"round": 2, "metric": "nll", "scope": "clients", "best_round": 1,
                                  "best": result.scope("clients")[0]["nll"], "patience": 1}
    assert [r["round"] for r in result.scope("train")] == [1, 2]
    final = result.scope("global-test")[-1]
    assert final["round"] == 2 and "temperature" in final  # the stop round is the final evaluation
    assert summary["final"]["global-test"]["round"] == 2


def test_a_tuned_comparison_gives_every_variant_the_same_budget_on_validation_data(session, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY))
    cmp = {
        "name": "tuned", "base": "base.yaml", "seeds": [3, 4], "reference": "sgd",
        "tune": {"trials": 3, "seeds": [1000], "objective": {"metric": "nll", "scope": "clients"},
                 "space": {"train.lr": {"low": 0.02, "high": 0.5, "log": True}}, "startup_trials": 1},
        "variants": {"sgd": {}, "mom": {"train": {"momentum": 0.5},
                                         "tune": {"space": {"train.momentum": {"low": 0.0, "high": 0.9}}}}},
    }
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(cmp))
    out = tmp_path / "out"
    report = run_comparison(tmp_path / "cmp.yaml", out, session=session, progress=False)

    studies = {s.study_name: s for s in optuna.get_all_study_summaries(f"sqlite:///{out / 'tuning.db'}")}
    assert set(studies) == {"sgd", "mom"}
    for name in ("sgd", "mom"):
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'tuning.db'}")
        assert len(counted(study.trials)) == 3  # the same budget
        assert report["tuning"][name]["trials"] == 3
    assert set(report["tuning"]["mom"]["best_params"]) == {"train.lr", "train.momentum"}
    # every trial ran sealed off the held-out sets: only training and validation rows
    trial_runs = sorted((out / "tuning").glob("*/trial-*/seed-1000"))
    assert len(trial_runs) == 6
    for folder in trial_runs:
        assert {r["scope"] for r in read_metrics(folder)} <= {"train", "clients"}
        assert yaml.safe_load((folder / "scenario.yaml").read_text())["evaluate"]["test_sets"] is False
    # the evaluation runs use each variant's chosen values, on the evaluation seeds
    for name in ("sgd", "mom"):
        for seed in (3, 4):
            ran = yaml.safe_load((out / name / f"seed-{seed}" / "scenario.yaml").read_text())
            assert ran["seed"] == seed
            assert ran["train"]["lr"] == pytest.approx(report["tuning"][name]["best_params"]["train.lr"])
    csv = (out / "tuning.csv").read_text().splitlines()
    assert csv[0].startswith("variant,tuned,trials") and len(csv) == 3
    assert (out / "tuning.png").stat().st_size > 0 and "| sgd |" in (out / "tuning.md").read_text()
    # the same command again: nothing runs, the same choice
    again = run_comparison(tmp_path / "cmp.yaml", out, session=session, progress=False)
    assert again["tuning"] == report["tuning"] and again["runs"] == report["runs"]
    assert json.loads((out / "comparison.json").read_text())["tuning"]["sgd"]["trials"] == 3
