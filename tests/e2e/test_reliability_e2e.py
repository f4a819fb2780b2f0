"""Faults, divergence and resume end to end, through Flower's simulation engine with Ray.

Every expected count comes from ``fedens.faults.draw`` for the run's (seed, round, client): the
client app must inject exactly those faults and the grid count exactly those replies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedens
from fedens.faults import byzantine_clients, draw
from fedens.results import read_metrics
from fedens.scenario import FaultsConfig

pytestmark = pytest.mark.e2e

BASE = {
    "name": "faults",
    "seed": 5,
    "rounds": 3,
    "data": {"dataset": "digits", "num_clients": 5, "partition": {"kind": "dirichlet", "alpha": 1.0}},
    "model": {"kind": "mlp", "hidden": [32]},
    "train": {"local_epochs": 1, "lr": 0.1},
    "fraction_evaluate": 0.0,
}


def expected(faults: dict, what: str, seed: int = 5, rounds: int = 3, clients: int = 5) -> list[int]:
    cfg = FaultsConfig.model_validate(faults)
    return [sum(bool(getattr(draw(cfg, seed, r, k, clients), what)) for k in range(clients)) for r in range(1, rounds + 1)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_crashes_are_counted_per_round_and_totalled(session, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    faults = {"crash_prob": 0.3}
    want = expected(faults, "crash")
    assert sum(want) > 0 and max(want) < 5  # the draw has crashes, and no round where every client crashed
    capfd.readouterr()
    result = session.run({**BASE, "faults": faults}, out=tmp_path / "run")
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    # at most one line per round on stderr, a count; no traceback
    assert err == [f"round {r}: clients: {n} failed (see run.log)" for r, n in enumerate(want, 1) if n], err
    train = result.scope("train")
    assert [r["failures"] for r in train] == want
    assert [r["clients_trained"] for r in train] == [5 - w for w in want]
    s = summary(result.run_dir)
    assert s["status"] == "ok" and s["failures"] == sum(want)
    log = (result.run_dir / "run.log").read_text()
    assert log.count("injected crash") == sum(want) and "Traceback" not in log  # one line per failure


def test_nan_replies_are_rejected_before_aggregation(session, tmp_path: Path):
    faults = {"nan_prob": 0.3}
    want = expected(faults, "nan")
    assert sum(want) > 0 and max(want) < 5
    result = session.run({**BASE, "faults": faults}, out=tmp_path / "run")
    assert [r["rejected"] for r in result.scope("train")] == want
    final = result.final["global-test"]
    assert np.isfinite(final["nll"]) and final["accuracy"] > 0.5
    assert summary(result.run_dir)["rejected"] == sum(want)


def test_stragglers_past_the_deadline_are_dropped(session, tmp_path: Path):
    faults = {"straggler_prob": 0.3, "straggler_delay_s": 4.0}
    want = [sum(d > 0 for d in row) for row in
            [[draw(FaultsConfig.model_validate(faults), 5, r, k, 5).delay_s for k in range(5)] for r in (1, 2, 3)]]
    assert sum(want) > 0 and max(want) < 5
    result = session.run({**BASE, "faults": faults, "round_timeout_s": 2.0}, out=tmp_path / "run")
    train = result.scope("train")
    assert [r["stragglers"] for r in train] == want
    assert [r["clients_trained"] for r in train] == [5 - w for w in want]
    assert summary(result.run_dir)["stragglers"] == sum(want)


BYZANTINE = {"byzantine": {"fraction": 0.2, "kind": "scale", "scale": 1.0e6}}


def test_a_scaled_client_makes_fedavg_diverge_and_the_run_says_so(session, tmp_path: Path):
    assert len(byzantine_clients(FaultsConfig.model_validate(BYZANTINE), 5, 5)) == 1
    # the model stays finite (weights ~1e6), but round 2's training loss explodes (~1e8 > 100 log 10)
    with pytest.raises(fedens.RunDiverged, match="diverged at round 2: the clients' mean training loss"):
        session.run({**BASE, "rounds": 6, "faults": BYZANTINE}, out=tmp_path / "run")
    s = summary(tmp_path / "run")
    assert s["status"] == "failed" and s["failure"] == "diverged" and s["rounds_done"] == 2
    train = [r for r in read_metrics(tmp_path / "run") if r["scope"] == "train"]
    assert [r["round"] for r in train] == [1, 2] and train[1]["train_loss"] > 230  # the round's facts are kept
    # with the guard off, the run goes on, finite and useless, as it did before the guard
    off = session.run({**BASE, "rounds": 3, "faults": BYZANTINE, "evaluate": {"diverge_loss": None}}, out=tmp_path / "off")
    assert off.final["global-test"]["accuracy"] < 0.3


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_rules_stay_finite_under_a_scaled_client(session, tmp_path: Path, name: str):
    params = {"krum": {"num_malicious_nodes": 1}, "fedtrimmedavg": {"beta": 0.2}}.get(name, {})
    scn = {**BASE, "faults": BYZANTINE, "strategy": {"name": name, "params": params}}
    result = session.run(scn, out=tmp_path / "run")
    final = result.final["global-test"]
    # Krum keeps one client's model (non-IID: lower accuracy); the mean over five is about 0.69 here
    assert summary(result.run_dir)["status"] == "ok" and final["accuracy"] > (0.4 if name == "krum" else 0.6), final


def test_label_flip_and_sign_flip_change_the_model_but_not_the_status(session, tmp_path: Path):
    clean = session.run(BASE, out=tmp_path / "clean").final["global-test"]
    for kind in ("label_flip", "sign_flip", "gaussian"):
        scn = {**BASE, "faults": {"byzantine": {"fraction": 0.4, "kind": kind, "scale": 1.0}}}
        hit = session.run(scn, out=tmp_path / kind).final["global-test"]
        assert hit["accuracy"] != clean["accuracy"] or hit["nll"] != clean["nll"], kind


def test_gossip_nan_messages_do_not_poison_the_neighbours(session, tmp_path: Path):
    scn = {**BASE, "mode": "decentralized", "topology": {"kind": "ring"}, "faults": {"nan_prob": 0.3}}
    scn.pop("fraction_evaluate")
    result = session.run(scn, out=tmp_path / "run")
    rows = read_metrics(result.run_dir)
    assert summary(result.run_dir)["status"] == "ok"
    assert sum(r.get("rejected", 0) for r in result.scope("train")) == sum(expected({"nan_prob": 0.3}, "nan"))
    for r in rows:
        assert not r.get("nonfinite"), r


# ---------------------------------------------------------------------------- resume identity
class Stop(RuntimeError):
    pass


def stop_at(k: int):
    def on_round(server_round: int, rows: list) -> None:
        if server_round == k:
            raise Stop(f"stopped at round {k}")

    return on_round


RESUMABLE = {
    "fedavg": {},
    "feddyn": {"strategy": {"name": "feddyn", "params": {"alpha": 0.1}}},
    "ivon_admm": {"learner": {"kind": "ivon", "hess_init": 1.0}, "strategy": {"name": "ivon_admm"}},
    "swarm": {"learner": {"kind": "deep_ensemble", "members": 2}, "strategy": {"name": "swarm", "params": {"k": 2, "T": 5}}},
    "distill": {"data": {"server_fraction": 0.15}, "distill": {"epochs": 3}},
    "gossip": {"mode": "decentralized", "topology": {"kind": "ring"},
               "gossip": {"rule": "vca", "active_fraction": 0.6, "drop_prob": 0.3, "delay": 1}},
}


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_a_resumed_run_has_the_rows_of_an_uninterrupted_one(session, tmp_path: Path, name: str):
    extra = dict(RESUMABLE[name])
    scn = {**BASE, "rounds": 4, "fraction_evaluate": 1.0, **extra,
           "data": {**BASE["data"], "val_fraction": 0.2, **extra.get("data", {})}}
    if name == "gossip":
        scn.pop("fraction_evaluate")
    whole = session.run(scn, out=tmp_path / "whole")
    with pytest.raises(fedens.RunFailed, match="stopped at round 3"):
        session.run(scn, out=tmp_path / "cut", on_round=stop_at(3))
    s = summary(tmp_path / "cut")
    assert s["status"] == "failed" and s["rounds_done"] == 3  # round 3's rows were written, its checkpoint not
    resumed = session.resume(tmp_path / "cut")
    assert summary(tmp_path / "cut")["status"] == "ok"
    assert without_time(read_metrics(tmp_path / "cut")) == without_time(read_metrics(whole.run_dir))
    assert without_time(resumed.rows) == without_time(whole.rows)


def test_resume_refuses_a_finished_run(session, tmp_path: Path):
    result = session.run(BASE, out=tmp_path / "run")
    with pytest.raises(fedens.ScenarioError, match="nothing to resume"):
        session.resume(result.run_dir)
    with pytest.raises(fedens.ScenarioError, match="not empty|exists|--overwrite"):
        session.run(BASE, out=result.run_dir)


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_the_rows(session, tmp_path: Path):
    from fedens import checkpoint

    out = tmp_path / "run"

    def block_the_write(server_round: int, rows: list) -> None:
        if server_round == 2:  # round 2's rows are written; its checkpoint cannot be
            (out / f".{checkpoint.FILE}.tmp").mkdir()

    with pytest.raises(fedens.RunFailed) as err:
        session.run({**BASE, "rounds": 4}, out=out, on_round=block_the_write)
    message = str(err.value)
    assert "checkpoint of round 2 not written" in message and "\n" not in message
    assert checkpoint.load(out).round == 1  # the previous checkpoint, intact
    assert max(r["round"] for r in read_metrics(out)) == 2  # round 2's rows kept
    s = summary(out)
    assert s["status"] == "failed" and s["rounds_done"] == 2
    (out / f".{checkpoint.FILE}.tmp").rmdir()  # the disk has room again
    resumed = session.resume(out)  # and the run continues from round 1's checkpoint
    assert summary(out)["status"] == "ok" and max(r["round"] for r in resumed.rows) == 4


def test_posterior_averaging_rejects_a_sign_flipped_precision_instead_of_failing(session, tmp_path: Path):
    scn = {**BASE, "learner": {"kind": "ivon"}, "strategy": {"name": "posterior_avg"},
           "faults": {"byzantine": {"fraction": 0.2, "kind": "sign_flip", "scale": 5.0}}}
    result = session.run(scn, out=tmp_path / "run")
    rejected = [r["rejected"] for r in result.scope("train")]
    assert summary(result.run_dir)["status"] == "ok" and sum(rejected) > 0 and max(rejected) <= 1, rejected
    assert summary(result.run_dir)["rejected"] == sum(rejected)
    assert "precision." in (result.run_dir / "run.log").read_text()


def test_gossip_counts_nodes_whose_loss_exploded_and_diverges_when_all_have(session, tmp_path: Path):
    scn = {**BASE, "rounds": 8, "mode": "decentralized", "topology": {"kind": "ring"}, "faults": BYZANTINE}
    scn.pop("fraction_evaluate")
    with pytest.raises(fedens.RunDiverged, match="every node's training loss exceeds"):
        session.run(scn, out=tmp_path / "run")
    exploded = [r["nodes_exploded"] for r in read_metrics(tmp_path / "run") if r["scope"] == "train"]
    # the scaled model travels one hop per round from the Byzantine node around the ring of 5
    assert exploded[0] == 0 and exploded[-1] == 5 and all(a <= b for a, b in zip(exploded, exploded[1:])), exploded
    assert 0 < exploded[1] < 5, exploded
