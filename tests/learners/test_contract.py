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
from fedens.checks import load_scenario
from fedens.data import load_client_data, load_server_data
from fedens.learners import LEARNERS, build_learner
from fedens.learners.base import is_reusable, predict_dataset
from fedens.scenario import Scenario
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
    "early_exit": {"model": {"kind": "mlp", "hidden": [32, 32]}},
    "ivon_mixture": {"learner": {"components": 2, "samples": 2}},
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


def test_reused_learner_computes_what_a_fresh_one_does(kind: str, tmp_path: Path):
    """The ClientApp keeps one learner per actor and run when its class declares ``reusable``:
    after ``set_arrays`` it must train and predict exactly as a freshly built learner would,
    whatever it did before (another client's data, other arrays, other rounds, predictions)."""
    scn = scenario_for(kind, tmp_path)
    cls = type(build(scn))
    assert is_reusable(cls), f"{kind} should be reusable (a built-in learner)"
    c0, c1 = load_client_data(scn.data, scn.seed, 0), load_client_data(scn.data, scn.seed, 1)
    start = build(scn, seed=7)
    start.fit(c1.train, seeded_generator(0, 1, 1), 1)  # a trained state with every part filled
    arrays = start.get_arrays()

    def run(learner) -> tuple[dict, torch.Tensor, torch.Tensor]:
        learner.set_arrays(arrays)
        torch.manual_seed(11)
        before = predict_dataset(learner, c0.val)  # evaluate handler: predict right after import
        learner.set_arrays(arrays)
        learner.fit(c0.train, seeded_generator(0, 4, 0), 4)
        torch.manual_seed(12)
        return learner.get_arrays(), before, predict_dataset(learner, c0.val)

    fresh = run(build(scn, seed=0))
    used = build(scn, seed=3)
    used.set_arrays(build(scn, seed=5).get_arrays())
    used.fit(c1.train, seeded_generator(0, 2, 1), 2)  # another client, another round
    torch.manual_seed(1)
    predict_dataset(used, c1.val)
    again = run(used)
    assert fresh[0].keys() == again[0].keys()
    for k in fresh[0]:
        assert np.array_equal(fresh[0][k], again[0][k]), k
    assert torch.equal(fresh[1], again[1]) and torch.equal(fresh[2], again[2])


@pytest.mark.parametrize("kind", LEARNERS.names())
def test_every_learner_trains_on_signals(kind: str, tmp_path: Path):
    """MNIST-1D signals (1, 40) with the 1-D CNN (or the ViT on 1-D patches for LoRA-Ensemble):
    every learner builds, trains and predicts a distribution."""
    model = {"kind": "vit", "patch": 4, "dim": 32} if kind == "lora_ensemble" else {"kind": "cnn1d", "channels": [8, 8]}
    extra = {k: v for k, v in SMALL.get(kind, {}).get("learner", {}).items()}
    raw = {"seed": 1, "data": {"dataset": "mnist1d", "params": {"num_samples": 400}, "num_clients": 2, "server_fraction": 0.2},
           "model": model, "learner": {"kind": kind, **extra, **({"pretrain_epochs": 1} if kind == "lora_ensemble" else {})},
           "train": {"local_epochs": 1, "lr": 0.05}}
    scn = prepare_learner(load_scenario(raw), tmp_path)
    learner = build(scn)
    client = load_client_data(scn.data, scn.seed, 0)
    metrics = learner.fit(client.train, seeded_generator(0, 1, 0), 1)
    probs = predict_dataset(learner, client.val)
    assert probs.shape[1:] == (len(client.val), 10) and np.isfinite(metrics["train_loss"])
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5)
