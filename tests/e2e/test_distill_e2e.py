"""Distillation of the global ensemble into one network through Flower + Ray: the student's
scopes at every evaluation, seeded (a second run gives the same rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCN = {
    "name": "e2e-distill", "seed": 2, "rounds": 2,
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "iid"}, "server_fraction": 0.15},
    "model": {"kind": "mlp", "hidden": [32]}, "learner": {"kind": "deep_ensemble", "members": 2},
    "train": {"local_epochs": 2, "lr": 0.1}, "distill": {"epochs": 15},
}


def test_the_student_is_its_own_scope_and_keeps_most_of_the_ensembles_accuracy(session, tmp_path: Path):
    first = session.run(SCN, out=tmp_path / "a")
    again = session.run(SCN, out=tmp_path / "b")
    for scope in ("global-test-student", "global-shift-student"):
        rows = first.scope(scope)
        assert [r["round"] for r in rows] == [0, 1, 2] and all(r["members"] == 1 for r in rows)
        strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
        assert strip(rows) == strip(again.scope(scope))  # seeded: the same student
    ensemble, student = first.scope("global-test")[-1], first.scope("global-test-student")[-1]
    assert 0 <= student["distill_loss"] < 1.0  # the mean KL to the ensemble's predictive, last epoch
    assert ensemble["accuracy"] > 0.8 and student["accuracy"] > 0.8 * ensemble["accuracy"]
