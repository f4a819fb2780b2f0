"""The OOD sets of the OOD AUROC (``data.ood``): each dataset's own set, the noise set, the option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedens.data import DATASETS, DatasetSpec, build_federated_data, federated
from fedens.data.base import OodSpec, standardise_set
from fedens.data.datasets import ood_digits, ood_mnist1d, resample
from fedens.metrics import entropy, ood_auroc
from fedens.scenario import DataConfig, OodConfig, ScenarioError, parse_scenario
from tests.conftest import leaves_global_random_state

SYN = {"num_samples": 500, "num_features": 8}
CONFIGS = {
    "digits": DataConfig(dataset="digits"),
    "mnist1d": DataConfig(dataset="mnist1d", params={"num_samples": 1000}),
    "synthetic": DataConfig(dataset="synthetic", params=SYN, num_clients=5),
    "synthetic-image": DataConfig(dataset="synthetic", params={**SYN, "num_features": 16, "as_image": True}, num_clients=5),
}
NAMES = {"digits": "mnist1d-as-8x8", "mnist1d": "blank-signals", "synthetic": "new-classes", "synthetic-image": "new-classes"}


def with_ood(cfg: DataConfig, kind: str) -> DataConfig:
    return cfg.model_copy(update={"ood": OodConfig(kind=kind)})


def todays_noise(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The OOD set fedens had before ``data.ood``, written out as it was."""
    return np.random.default_rng([seed, 3]).standard_normal((n, *shape)).astype(np.float32)


# --------------------------------------------------------------------------- the option


def test_default_is_auto_and_bad_options_are_scenario_errors():
    assert DataConfig().ood.kind == "auto" and parse_scenario({}).data.ood.kind == "auto"
    assert parse_scenario({"data": {"ood": {"kind": "noise"}}}).data.ood.kind == "noise"
    assert parse_scenario({}, ["data.ood.kind=dataset"]).data.ood.kind == "dataset"
    for bad in ({"kind": "gaussian"}, {"kind": None}, {"kind": "auto", "size": 10}, "noise"):
        with pytest.raises(ScenarioError, match=r"^<scenario>: data\.ood") as err:
            parse_scenario({"data": {"ood": bad}})
        assert "\n" not in str(err.value)


def test_the_option_is_part_of_the_cache_key():
    auto, noise = build_federated_data(DataConfig(), 0), build_federated_data(with_ood(DataConfig(), "noise"), 0)
    assert auto is not noise and auto.server.ood_kind == "mnist1d-as-8x8" and noise.server.ood_kind == "noise"
    assert federated._cfg_json(DataConfig()) != federated._cfg_json(with_ood(DataConfig(), "noise"))
    assert build_federated_data(DataConfig(ood={"kind": "auto"}), 0) is auto


# --------------------------------------------------------------------------- the sets


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_dataset_has_its_own_set_shaped_as_the_test_set(name):
    cfg = CONFIGS[name]
    server = federated._build(cfg, 0).server
    assert server.ood_kind == NAMES[name] and DATASETS.get(cfg.dataset).ood.name == NAMES[name]
    assert server.ood.x.shape == server.test.x.shape and server.ood.x.dtype == server.test.x.dtype == np.float32
    assert server.ood.y.dtype == np.int64 and not server.ood.y.any()
    assert np.isfinite(server.ood.x).all()
    # standardised over the set, per channel (vectors: per feature): mean and scale give nothing away
    axes = (0, *range(2, server.ood.x.ndim))
    np.testing.assert_allclose(server.ood.x.mean(axis=axes), 0, atol=1e-5)
    np.testing.assert_allclose(server.ood.x.std(axis=axes), 1, atol=1e-4)
    # "dataset" is the same set as "auto" for a dataset that declares one
    np.testing.assert_array_equal(federated._build(with_ood(cfg, "dataset"), 0).server.ood.x, server.ood.x)


@pytest.mark.parametrize("name", ["digits", "mnist1d", "synthetic"])
def test_deterministic_per_seed_and_not_noise(name):
    cfg = CONFIGS[name]
    a, b, c = (federated._build(cfg, s).server for s in (0, 0, 1))  # _build bypasses the cache
    assert a.ood.x.tobytes() == b.ood.x.tobytes()
    assert not np.array_equal(a.ood.x[: len(c.ood.x)], c.ood.x[: len(a.ood.x)])  # another seed, another set
    noise = federated._build(with_ood(cfg, "noise"), 0).server
    assert not np.allclose(a.ood.x, noise.ood.x, atol=0.5)
    # only the OOD set depends on the option: test, shift and clients are the same arrays
    assert a.test.x.tobytes() == noise.test.x.tobytes() and a.shift.x.tobytes() == noise.shift.x.tobytes()


def test_noise_is_exactly_todays_set():
    for cfg in (*CONFIGS.values(), DataConfig(num_clients=3, test_fraction=0.3)):
        for seed in (0, 3):
            server = federated._build(with_ood(cfg, "noise"), seed).server
            assert server.ood_kind == "noise"
            assert server.ood.x.tobytes() == todays_noise(len(server.test), server.input_shape, seed).tobytes()
            np.testing.assert_array_equal(server.ood.y, np.zeros(len(server.test), np.int64))


def test_structure_that_noise_lacks():
    """Blank MNIST-1D signals are smooth (correlated noise, a shear ramp): neighbouring positions
    correlate strongly, white noise's do not. The digits set is MNIST-1D signals laid out row by
    row: pixel j and j + 1 within a row are neighbours of a resampled signal."""
    def lag1(x):  # correlation of neighbouring positions along the last axis
        a, b = x[..., :-1].ravel(), x[..., 1:].ravel()
        return np.corrcoef(a, b)[0, 1]

    m1d = federated._build(CONFIGS["mnist1d"], 0).server
    assert lag1(m1d.ood.x) > 0.8 and abs(lag1(todays_noise(len(m1d.test), (1, 40), 0))) < 0.05
    dig = federated._build(CONFIGS["digits"], 0).server
    assert lag1(dig.ood.x) > 0.8 and abs(lag1(todays_noise(len(dig.test), (1, 8, 8), 0))) < 0.05


def test_makers_leave_global_random_state_alone():
    from fedens.data.datasets import DigitsOptions, Mnist1dOptions

    a = leaves_global_random_state(lambda: ood_mnist1d(Mnist1dOptions(), 33, 9))
    d = leaves_global_random_state(lambda: ood_digits(DigitsOptions(), 7, 9))
    assert a.shape == (33, 1, 40) and d.shape == (7, 1, 8, 8)
    np.testing.assert_array_equal(ood_mnist1d(Mnist1dOptions(), 33, 9), a)


def test_mnist1d_blank_signals_follow_the_datasets_noise_options():
    from fedens.data.datasets import Mnist1dOptions

    default = ood_mnist1d(Mnist1dOptions(), 50, 1)
    assert not np.array_equal(ood_mnist1d(Mnist1dOptions(corr_noise_scale=0.5), 50, 1), default)


def test_resample_by_hand():
    x = np.array([[0.0, 1.0, 3.0]], np.float32)
    np.testing.assert_allclose(resample(x, 5), [[0.0, 0.5, 1.0, 2.0, 3.0]])
    np.testing.assert_allclose(resample(x, 3), x)
    np.testing.assert_allclose(resample(np.array([[2.0]], np.float32), 3), [[2.0, 2.0, 2.0]])
    sig = np.random.default_rng(0).standard_normal((4, 40))
    ref = np.stack([np.interp(np.linspace(0, 39, 64), np.arange(40), r) for r in sig])
    np.testing.assert_allclose(resample(sig, 64), ref, atol=1e-6)


def test_standardise_set_by_hand():
    x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]], np.float32)  # (2, 1, 2): one channel, mean 4, std sqrt 5
    np.testing.assert_allclose(standardise_set(x), (x - 4) / np.sqrt(5), rtol=1e-6)
    const = standardise_set(np.full((3, 2), 2.0, np.float32))  # constant features are only centred
    np.testing.assert_array_equal(const, np.zeros((3, 2), np.float32))


# --------------------------------------------------------------------------- fallback and errors


def test_a_dataset_without_a_set_falls_back_to_noise(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((5, 5), 60 * i + (c == "b") * 30, np.uint8)).save(tmp_path / c / f"{i}.png")
    cfg = DataConfig(dataset="image_folder", params={"root": str(tmp_path), "image_size": 4},
                     num_clients=2, test_fraction=0.25, val_fraction=0.0)
    assert DATASETS.get("image_folder").ood is None and DATASETS.get("hf_disk").ood is None
    server = federated._build(cfg, 0).server
    assert server.ood_kind == "noise"
    assert server.ood.x.tobytes() == todays_noise(len(server.test), (1, 4, 4), 0).tobytes()
    with pytest.raises(ValueError, match=r"^data\.ood\.kind: dataset 'image_folder' declares no OOD set"):
        federated._build(with_ood(cfg, "dataset"), 0)


def test_a_plug_in_set_of_the_wrong_shape_is_a_value_error():
    spec = DATASETS.get("synthetic")
    opts = spec.Options.model_validate(SYN)
    cfg = CONFIGS["synthetic"]
    for bad in (lambda o, n, s: np.zeros((n, 9), np.float32), lambda o, n, s: np.zeros((n, 8)),
                lambda o, n, s: np.full((n, 8), np.nan, np.float32), lambda o, n, s: [[0.0] * 8] * n):
        plug = DatasetSpec(spec.Options, spec.load, spec.input_shape, spec.num_classes, OodSpec("bad", bad))
        with pytest.raises(ValueError, match=r"^data\.ood: dataset 'synthetic'.s OOD set 'bad' gave"):
            federated.ood_inputs(cfg, plug, opts, 10, (8,), 0)
    good = DatasetSpec(spec.Options, spec.load, spec.input_shape, spec.num_classes,
                       OodSpec("ones", lambda o, n, s: np.ones((n, 8), np.float32)))
    assert federated.ood_inputs(cfg, good, opts, 10, (8,), 0)[0] == "ones"
    assert federated.ood_inputs(with_ood(cfg, "noise"), good, opts, 10, (8,), 0)[0] == "noise"


# --------------------------------------------------------------------------- signal


def _train_and_score(cfg: DataConfig, net: torch.nn.Module, epochs: int, lr: float, momentum: float, seed: int = 0):
    """Entropy AUROC (test set in, OOD set out) of ``net`` trained centrally with SGD on every
    client's training split, for the dataset's own set and for the noise set."""
    fd = federated._build(cfg, seed)
    x = torch.from_numpy(np.concatenate([c.train.x for c in fd.clients]))
    y = torch.from_numpy(np.concatenate([c.train.y for c in fd.clients]))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            b = perm[i : i + 32]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        h = lambda a: entropy(torch.softmax(net(torch.from_numpy(a)).double(), -1))  # noqa: E731
        accuracy = (net(torch.from_numpy(fd.server.test.x)).argmax(-1).numpy() == fd.server.test.y).mean()
        noise = todays_noise(len(fd.server.test), fd.server.input_shape, seed)
        return accuracy, ood_auroc(h(fd.server.test.x), h(fd.server.ood.x)), ood_auroc(h(fd.server.test.x), h(noise))


def test_a_trained_mlp_tells_the_digits_set_from_the_test_set():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    accuracy, auroc, auroc_noise = _train_and_score(CONFIGS["digits"], net, epochs=15, lr=0.1, momentum=0.0)
    print(f"accuracy {accuracy:.3f}, entropy AUROC mnist1d-as-8x8 {auroc:.3f}, noise {auroc_noise:.3f}")
    assert accuracy > 0.9 and auroc > 0.75


def test_a_trained_cnn1d_tells_blank_signals_from_the_test_set_where_noise_fails():
    from fedens.models import build_model

    torch.manual_seed(0)
    net = build_model("cnn1d", {}, (1, 40), 10)
    # the published 5,000 signals: with CONFIGS' 1,000 the network learns too little in a few epochs
    accuracy, auroc, auroc_noise = _train_and_score(DataConfig(dataset="mnist1d"), net, epochs=8, lr=0.05, momentum=0.9)
    print(f"accuracy {accuracy:.3f}, entropy AUROC blank signals {auroc:.3f}, noise {auroc_noise:.3f}")
    assert accuracy > 0.7 and auroc > 0.75 and auroc > auroc_noise + 0.15


def test_the_probe_runs_a_scenario(capsys):
    from fedens.data.ood_probe import main, probe

    scn = {"rounds": 2, "data": {"dataset": "synthetic", "params": SYN, "num_clients": 2},
           "model": {"kind": "mlp", "hidden": [8]}, "train": {"optimizer": "adam", "lr": 0.01}}
    r = probe(scn, 0)
    assert r["ood"] == "new-classes" and r["epochs"] == 2 and 0 <= r["auroc"] <= 1 and 0 <= r["auroc_noise"] <= 1
    assert probe(scn, 0) == r  # seeded
    main([str(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"), "--seeds", "0", "1", "--epochs", "1", "--set", "model.hidden=[8]"])
    out = capsys.readouterr().out
    assert "seed 1: 1 epochs" in out and "entropy AUROC mnist1d-as-8x8" in out and "mean of 2 seeds" in out
