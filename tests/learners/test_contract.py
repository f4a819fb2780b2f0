"""The learner contract, checked on every registered learner with small options.

Every learner: predictive shape (members, batch, classes) with rows summing to 1; export/import
round-trip is exact; the same seed gives the same result; a short training lowers the loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedens.api import prepare_learner
from fedens.data import load_client_data, load_server_data
from fedens.learners import LEARNERS, build_learner
from fedens.learners.base import predict_dataset
from fedens.scenario import Scenario, load_scenario
from fedens.seeding import seeded_generator

# Small, fast settings per learner (keys of the scenario's ``learner:`` and ``model:``).
SMALL: dict[str, dict] = {
    "single": {},
    "deep_ensemble": {"learner": {"members": 3}},
    "batch_ensemble": {"learner": {"members": 3}},
    "film_ensemble": {"learner": {"members": 3}},
    "mc_dropout": {"learner": {"samples": 4}},
    "snapshot": {"learner": {"members": 3}},
    "low_precision": {"learner": {"members": 4}},
    "subnetwork": {"learner": {"members": 2}},
    "ivon": {"learner": {"samples": 4}},
    "lora_ensemble": {"learner": {"members": 3}, "model": {"kind": "vit"}},
}


def scenario_for(kind: str, tmp_path: Path) -> Scenario:
    extra = SMALL.get(kind, {})
    raw = {
        "seed": 1,
        "data": {"dataset": "digits", "num_clients": 3, "server_fraction": 0.2},
        "model": extra.get("model", {"kind": "mlp", "hidden": [32]}),
        "learner": {"kind": kind, **extra.get("learner", {})},
        "train": {"local_epochs": 2, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9},
    }
    return prepare_learner(load_scenario(raw), tmp_path)


def build(scn: Scenario, seed: int = 0):
    data = load_server_data(scn.data, scn.seed)
    torch.manual_seed(seed)
    return build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu"))


def nll(learner, ds) -> float:
    torch.manual_seed(123)
    probs = predict_dataset(learner, ds).mean(0)
    return float(-torch.log(probs[torch.arange(len(ds)), torch.from_numpy(ds.y)].clamp_min(1e-12)).mean())


@pytest.fixture(params=LEARNERS.names())
def kind(request) -> str:
    return request.param


def test_predictive_shape_and_rows_sum_to_one(kind: str, tmp_path: Path):
    scn = scenario_for(kind, tmp_path)
    learner = build(scn)
    x = torch.from_numpy(load_client_data(scn.data, scn.seed, 0).val.x[:7])
    probs = learner.predict_proba(x)
    assert probs.ndim == 3 and probs.shape[1:] == (7, 10)
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5)
    assert (probs >= 0).all()


def test_export_import_round_trip_is_exact(kind: str, tmp_path: Path):
    scn = scenario_for(kind, tmp_path)
    a, b = build(scn, seed=0), build(scn, seed=1)
    a.fit(load_client_data(scn.data, scn.seed, 0).train, seeded_generator(0, 1, 0), 1)
    arrays = a.get_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    b.set_arrays(arrays)
    again = b.get_arrays()
    assert again.keys() == arrays.keys()
    for k in arrays:
        assert np.array_equal(arrays[k], again[k]), k
    x = torch.from_numpy(load_client_data(scn.data, scn.seed, 0).val.x)
    torch.manual_seed(5)
    pa = a.predict_proba(x)
    torch.manual_seed(5)
    assert torch.allclose(pa, b.predict_proba(x), atol=1e-6)


def test_same_seed_same_result(kind: str, tmp_path: Path):
    scn = scenario_for(kind, tmp_path)
    train = load_client_data(scn.data, scn.seed, 0).train
    out = []
    for _ in range(2):
        learner = build(scn, seed=0)
        learner.fit(train, seeded_generator(0, 1, 0), 1)
        out.append(learner.get_arrays())
    for k in out[0]:
        assert np.array_equal(out[0][k], out[1][k]), k


def test_short_training_lowers_the_loss(kind: str, tmp_path: Path):
    scn = scenario_for(kind, tmp_path)
    client = load_client_data(scn.data, scn.seed, 0)
    learner = build(scn)
    before = nll(learner, client.train)
    for r in (1, 2):
        learner.fit(client.train, seeded_generator(0, r, 0), r)
    assert nll(learner, client.train) < before - 0.3
