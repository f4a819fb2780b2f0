"""Distilling the global predictive into one network: the student learns the teacher's
predictions from the public inputs alone; the scenario checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedens
from fedens.data import ArrayDataset
from fedens.distill import fit_student
from fedens.learners import build_learner
from fedens.learners.base import predict_dataset
from fedens.scenario import DistillConfig, ScenarioError

SCN = {"rounds": 1, "data": {"dataset": "synthetic", "num_clients": 2}, "model": {"kind": "mlp", "hidden": [16]}}


def learner(seed: int):
    scn = fedens.load(SCN)
    torch.manual_seed(seed)
    return build_learner(scn, (20,), 4, torch.device("cpu"))


def test_the_student_learns_the_teachers_predictions_without_the_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 20)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(x @ rng.normal(size=(20, 4)).astype(np.float32)), 1)  # a linear teacher
    cfg = DistillConfig(epochs=60, lr=0.1, batch_size=32)
    results = []
    for labels in (np.zeros(256, np.int64), rng.integers(0, 4, 256)):  # the labels must not matter
        student = learner(2)
        before = float((predict_dataset(student, ArrayDataset(x, labels)).mean(0).argmax(1) == probs.argmax(1)).double().mean())
        losses = fit_student(student, probs, ArrayDataset(x, labels), cfg, torch.Generator().manual_seed(0))
        after = predict_dataset(student, ArrayDataset(x, labels)).mean(0)
        results.append(after)
        assert losses[-1] < 0.2 * losses[0]
        assert float((after.argmax(1) == probs.argmax(1)).double().mean()) > max(0.9, before)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("extra, line", [
    ({"distill": {"epochs": 2}}, "distill: needs data.server_fraction > 0"),
    ({"distill": {"epochs": 2}, "mode": "decentralized", "data": {"dataset": "synthetic", "num_clients": 3,
      "server_fraction": 0.1}}, "distill: only in federated mode"),
    ({"distill": {"temperature": 0}}, "distill.temperature: should be greater than 0"),
])
def test_bad_distill_sections_are_one_line(extra, line):
    with pytest.raises(ScenarioError, match=line):
        fedens.load({**SCN, **extra})
