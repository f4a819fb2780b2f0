"""Datasets, shift and the federated build."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from fedens.data import (
    DATASETS,
    ArrayDataset,
    build_federated_data,
    load_client_data,
    load_server_data,
    shift_dataset,
)
from fedens.data import federated
from fedens.data.shift import rotate
from fedens.scenario import DataConfig, PathologicalPartition
from tests.conftest import leaves_global_random_state


def load(name: str, seed: int = 0, **params) -> ArrayDataset:
    spec = DATASETS.get(name)
    return spec.load(spec.Options.model_validate(params), seed)


def rows(ds: ArrayDataset) -> set[bytes]:
    return {r.tobytes() for r in ds.x.reshape(len(ds), -1)}


# --------------------------------------------------------------------------- datasets


def test_registered():
    assert DATASETS.names() == ["digits", "hf_disk", "image_folder", "mnist1d", "synthetic"]


def test_digits():
    spec = DATASETS.get("digits")
    ds = load("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert spec.input_shape(spec.Options()) == (1, 8, 8) and spec.num_classes(spec.Options()) == 10
    np.testing.assert_array_equal(np.unique(ds.y), np.arange(10))
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0  # pixel counts 0..16, divided by 16
    from sklearn.datasets import load_digits  # read from the file directly: the same arrays

    ref = load_digits()
    np.testing.assert_array_equal(ds.x[:, 0] * 16, ref.images)
    np.testing.assert_array_equal(ds.y, ref.target)
    with pytest.raises(ValidationError):
        spec.Options.model_validate({"scale": 2})  # no options: unknown keys are errors


def test_synthetic_shapes_and_determinism():
    a = load("synthetic", seed=1, num_samples=100, num_classes=4, num_features=9)
    assert a.x.shape == (100, 9) and a.x.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(a.y), [25, 25, 25, 25])
    b = load("synthetic", seed=1, num_samples=100, num_classes=4, num_features=9)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, load("synthetic", seed=2, num_samples=100, num_classes=4, num_features=9).x)
    img = load("synthetic", seed=1, num_samples=100, num_classes=4, num_features=9, as_image=True)
    assert img.x.shape == (100, 1, 3, 3)
    np.testing.assert_array_equal(img.x.reshape(100, 9), a.x)
    spec = DATASETS.get("synthetic")
    assert spec.input_shape(spec.Options(num_features=16, as_image=True)) == (1, 4, 4)
    with pytest.raises(ValidationError, match="perfect square"):
        spec.Options(num_features=10, as_image=True)
    with pytest.raises(ValidationError):
        spec.Options(separation=0)


def test_synthetic_separation_controls_difficulty():
    def nearest_mean_accuracy(separation: float) -> float:
        ds = load("synthetic", seed=0, num_samples=2000, num_features=8, separation=separation)
        tr, te = slice(0, 1000), slice(1000, None)
        means = np.stack([ds.x[tr][ds.y[tr] == c].mean(0) for c in range(10)])
        pred = np.argmin(((ds.x[te, None] - means) ** 2).sum(-1), axis=1)
        return float((pred == ds.y[te]).mean())

    # Means sit about separation * sqrt(2 * 8) = 4 * separation apart, in unit-variance noise.
    easy, hard = nearest_mean_accuracy(4.0), nearest_mean_accuracy(0.5)
    assert easy > 0.95 and 0.15 < hard < 0.7  # chance is 0.1


COLOURS = {"cat": (0, 0, 255), "ant": (255, 0, 0), "bee": (0, 255, 0)}  # created out of order


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i, ext in enumerate(["png", "png", "bmp", "jpg"]):
            Image.new("RGB", (10, 12), colour).save(root / name / f"{i}.{ext}")
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_image_folder(image_tree):
    spec = DATASETS.get("image_folder")
    rgb = load("image_folder", root=str(image_tree), image_size=6, grayscale=False)
    assert rgb.x.shape == (12, 3, 6, 6) and rgb.x.dtype == np.float32
    np.testing.assert_array_equal(rgb.y, [0] * 4 + [1] * 4 + [2] * 4)  # ant, bee, cat
    # ant is red: channel 0 is 1, the others 0 (jpg is lossy, hence the tolerance)
    np.testing.assert_allclose(rgb.x[:4].mean(axis=(0, 2, 3)), [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(rgb.x[8:].mean(axis=(0, 2, 3)), [0, 0, 1], atol=0.02)  # cat: blue
    gray = load("image_folder", root=str(image_tree), image_size=6)
    assert gray.x.shape == (12, 1, 6, 6)
    # PIL's L = (19595 R + 38470 G + 7471 B + 2^15) >> 16: red 76, green 150, blue 29.
    np.testing.assert_allclose(gray.x[[0, 4, 8]].mean(axis=(1, 2, 3)), np.array([76, 150, 29]) / 255, atol=1e-6)
    opts = spec.Options(root=str(image_tree), image_size=6, grayscale=False)
    assert spec.num_classes(opts) == 3 and spec.input_shape(opts) == (3, 6, 6)


def test_image_folder_missing_root(tmp_path):
    spec = DATASETS.get("image_folder")
    opts = spec.Options(root=str(tmp_path / "nope"))
    for fn in (spec.num_classes, lambda o: spec.load(o, 0)):
        with pytest.raises(ValueError, match="^data.params.root: folder .*nope.* not found$"):
            fn(opts)
    with pytest.raises(ValidationError):
        spec.Options()  # root is required


def test_hf_disk(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])})
    images = [Image.new("RGB", (10, 12), (255, 0, 0) if i % 3 == 0 else (0, 0, 255)) for i in range(6)]
    datasets.Dataset.from_dict({"img": images, "y": [i % 3 for i in range(6)]}, features=features).save_to_disk(tmp_path / "ds")

    spec = DATASETS.get("hf_disk")
    opts = spec.Options(path=str(tmp_path / "ds"), image_key="img", label_key="y", image_size=5, grayscale=False)
    assert spec.num_classes(opts) == 3 and spec.input_shape(opts) == (3, 5, 5)
    ds = spec.load(opts, 0)
    assert ds.x.shape == (6, 3, 5, 5) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.y, [0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(ds.x[0, :, 0, 0], [1, 0, 0])  # red
    np.testing.assert_allclose(ds.x[1, :, 0, 0], [0, 0, 1])  # blue

    # Plain integer labels need num_classes.
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 0, 1, 0]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
                               ).save_to_disk(tmp_path / "plain")
    with pytest.raises(ValueError, match="^data.params.num_classes: required"):
        spec.num_classes(spec.Options(path=str(tmp_path / "plain")))
    plain = spec.Options(path=str(tmp_path / "plain"), num_classes=2)
    assert spec.num_classes(plain) == 2 and spec.load(plain, 0).x.shape == (6, 1, 28, 28)
    with pytest.raises(ValueError, match="^data.params.path: folder .* not found$"):
        spec.num_classes(spec.Options(path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="^data.params.image_key: no column 'pixels'"):
        spec.load(spec.Options(path=str(tmp_path / "ds"), image_key="pixels", label_key="y"), 0)


# --------------------------------------------------------------------------- shift


def test_rotate_by_hand():
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    np.testing.assert_allclose(rotate(x, np.array([0.0])), x, atol=1e-5)
    np.testing.assert_allclose(rotate(x, np.array([90.0]))[0, 0], np.rot90(x[0, 0]), atol=1e-4)
    np.testing.assert_allclose(rotate(x, np.array([-90.0]))[0, 0], np.rot90(x[0, 0], -1), atol=1e-4)


def test_shift_vectors_add_noise_of_std_0_1_times_severity():
    ds = ArrayDataset(np.zeros((2000, 8), np.float32), np.zeros(2000, np.int64))
    for severity in (1, 3, 5):
        out = shift_dataset(ds, severity, seed=0)
        assert out.x.shape == (2000, 8) and out.x.dtype == np.float32
        assert abs(out.x.std() - 0.1 * severity) < 0.01 * severity
    np.testing.assert_array_equal(shift_dataset(ds, 3, seed=5).x, shift_dataset(ds, 3, seed=5).x)
    assert not np.array_equal(shift_dataset(ds, 3, seed=5).x, shift_dataset(ds, 3, seed=6).x)


def test_shift_images_rotate_then_noise():
    # A constant image is unchanged by rotation: only the noise remains.
    flat = ArrayDataset(np.full((500, 1, 8, 8), 2.0, np.float32), np.zeros(500, np.int64))
    assert abs((shift_dataset(flat, 2, seed=0).x - 2.0).std() - 0.2) < 0.01
    # A vertical bar rotated by 30 degrees moves far more than noise of std 0.5 explains.
    bar = np.zeros((500, 1, 8, 8), np.float32)
    bar[:, :, :, 3:5] = 5.0
    out = shift_dataset(ArrayDataset(bar, np.zeros(500, np.int64)), 5, seed=0)
    assert (out.x - bar).std() > 1.0
    # Both directions occur: +30 and -30 degrees differ, so the per-image residuals form two groups.
    r = rotate(bar[:2], np.array([30.0, -30.0]))
    signs = np.array([np.argmin([np.abs(o - r[0]).mean(), np.abs(o - r[1]).mean()]) for o in out.x])
    assert 150 < signs.sum() < 350


# --------------------------------------------------------------------------- federated

SYN = DataConfig(dataset="synthetic", params={"num_samples": 500, "num_features": 8}, num_clients=5,
                 test_fraction=0.2, val_fraction=0.1)


def test_federated_sizes_by_hand():
    fd = build_federated_data(SYN, 0)
    # 500 -> test 100 (10 of each of the 10 classes), pool 400 -> 5 x 80 -> val 8, train 72.
    assert len(fd.server.test) == 100 and len(fd.server.shift) == 100
    np.testing.assert_array_equal(np.bincount(fd.server.test.y), [10] * 10)
    assert [(len(c.train), len(c.val)) for c in fd.clients] == [(72, 8)] * 5
    assert fd.server.num_classes == 10 and fd.server.input_shape == (8,)


def test_federated_disjoint_and_covering():
    fd = build_federated_data(SYN, 0)
    test = rows(fd.server.test)
    seen = set(test)
    for c in fd.clients:
        tr, va = rows(c.train), rows(c.val)
        assert len(tr) == len(c.train) and len(va) == len(c.val)
        assert not tr & va and not (tr | va) & test and not (tr | va) & seen
        seen |= tr | va
    assert len(seen) == 500  # every example is somewhere, exactly once


def test_federated_standardised_on_pool():
    fd = build_federated_data(SYN, 0)
    pool = np.concatenate([np.concatenate([c.train.x, c.val.x]) for c in fd.clients])
    np.testing.assert_allclose(pool.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(pool.std(0), 1, atol=1e-3)
    assert abs(fd.server.test.x.mean()) > 1e-4  # test set is scaled with the pool's statistics, not its own

    digits = build_federated_data(DataConfig(), 0)
    pool = np.concatenate([np.concatenate([c.train.x, c.val.x]) for c in digits.clients])
    assert pool.shape[1:] == (1, 8, 8) and abs(pool.mean()) < 1e-4 and abs(pool.std() - 1) < 1e-3


def test_federated_shift():
    fd = build_federated_data(DataConfig(), 0)
    np.testing.assert_array_equal(fd.server.shift.y, fd.server.test.y)
    assert not np.allclose(fd.server.shift.x, fd.server.test.x)
    mild = build_federated_data(DataConfig(shift={"severity": 1}), 0).server
    assert np.abs(mild.shift.x - mild.test.x).mean() < np.abs(fd.server.shift.x - fd.server.test.x).mean()
    fresh = federated._build(DataConfig(), 0)  # bypasses the cache
    np.testing.assert_array_equal(fresh.server.shift.x, fd.server.shift.x)


def test_federated_val_fraction():
    fd = build_federated_data(DataConfig(val_fraction=0.25), 1)
    for c in fd.clients:
        n = len(c.train) + len(c.val)
        assert len(c.val) == round(0.25 * n) and len(c.train) >= 1
    none = build_federated_data(DataConfig(val_fraction=0.0), 1)
    assert all(len(c.val) == 0 and c.val.x.shape == (0, 1, 8, 8) for c in none.clients)
    assert sum(len(c.train) for c in none.clients) == sum(len(c.train) + len(c.val) for c in fd.clients)


def test_federated_pathological():
    fd = build_federated_data(DataConfig(partition=PathologicalPartition(kind="pathological")), 0)
    assert all(len(np.unique(np.concatenate([c.train.y, c.val.y]))) == 2 for c in fd.clients)


def test_federated_image_folder(image_tree):
    cfg = DataConfig(dataset="image_folder", params={"root": str(image_tree), "image_size": 4},
                     num_clients=2, test_fraction=0.25, val_fraction=0.0)
    server = load_server_data(cfg, 0)
    # 12 images, 4 per class: the stratified test set takes exactly one of each class.
    assert sorted(server.test.y) == [0, 1, 2] and server.input_shape == (1, 4, 4)
    assert sum(len(load_client_data(cfg, 0, i).train) for i in range(2)) == 9


def test_cache_and_seeds():
    a = build_federated_data(SYN, 0)
    assert build_federated_data(SYN, 0) is a
    assert build_federated_data(DataConfig.model_validate(SYN.model_dump()), 0) is a  # equal config, same entry
    assert load_client_data(SYN, 0, 3) is a.clients[3] and load_server_data(SYN, 0) is a.server
    fresh = federated._build(SYN, 0)  # same seed without the cache: identical arrays
    for c, d in zip(a.clients, fresh.clients):
        np.testing.assert_array_equal(c.train.x, d.train.x)
    # digits do not depend on the seed, so a difference here is the split and partition.
    d0, d1 = build_federated_data(DataConfig(), 0), build_federated_data(DataConfig(), 1)
    assert d1 is not d0 and rows(d0.clients[0].train) != rows(d1.clients[0].train)
    assert rows(d0.server.test) != rows(d1.server.test)
    with pytest.raises(ValueError, match="partition id 5"):
        load_client_data(SYN, 0, 5)


def test_too_small_client_is_a_value_error():
    cfg = DataConfig(dataset="synthetic", params={"num_samples": 20}, num_clients=15, val_fraction=0.1)
    with pytest.raises(ValueError, match="^data.partition: client"):
        build_federated_data(cfg, 0)


def test_installed_build_is_used_instead_of_rebuilt(monkeypatch):
    """The engine installs the driver's build in each actor (shipped through Ray's object
    store); a process with an installed build does not build again."""
    from fedens.data import federated

    cfg = DataConfig(num_clients=3)
    own = federated._build(cfg, 5)
    federated.install(cfg, 5, own)
    monkeypatch.setattr(federated, "_build", lambda *a: pytest.fail("rebuilt although a build is installed"))
    assert federated.build_federated_data(cfg, 5) is own and federated.is_installed(cfg, 5)


def test_client_splits_pickle_small_and_equal():
    """Clients are index arrays into one pool: pickling 1,000 clients costs a few arrays, and
    the unpickled splits give the same examples (writable copies)."""
    import pickle

    cfg = DataConfig(dataset="synthetic", params={"num_samples": 20000, "num_features": 4}, num_clients=1000)
    fd = federated._build(cfg, 0)
    blob = pickle.dumps(fd, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(blob) < 20000 * 4 * 4 * 1.5 + 20000 * 8 * 3  # x, y and the two index arrays, no per-client overhead
    back = pickle.loads(blob)
    assert len(back.clients) == 1000
    for i in (0, 417, 999):
        np.testing.assert_array_equal(back.clients[i].train.x, fd.clients[i].train.x)
        np.testing.assert_array_equal(back.clients[i].val.y, fd.clients[i].val.y)
        assert back.clients[i].train.x.flags.writeable
    with pytest.raises(IndexError):
        fd.clients[1000]


def _reference_stratified_split(y, fraction, rng):
    """stratified_split as first written (np.unique, flatnonzero per class, setdiff1d): the
    faster one must give the very same splits, or every seeded result would change."""
    n = len(y)
    k = min(max(round(fraction * n), 1 if fraction > 0 else 0), n - 1)
    classes, counts = np.unique(y, return_counts=True)
    quota = k * counts / n
    take = np.floor(quota).astype(int)
    perm = rng.permutation(len(classes))
    best = perm[np.argsort(-(quota - take)[perm], kind="stable")]
    take[best[: k - take.sum()]] += 1
    held = np.concatenate([rng.choice(np.flatnonzero(y == c), t, replace=False) for c, t in zip(classes, take)])
    return np.setdiff1d(np.arange(n), held), np.sort(held)


def test_stratified_split_equals_the_reference_implementation():
    gen = np.random.default_rng(0)
    for trial in range(400):
        n = int(gen.integers(2, 300))
        y = gen.integers(0, int(gen.integers(1, 12)), n).astype(np.int64)
        fraction = float(gen.choice([0.0, 0.05, 0.1, 0.2, 0.5, 0.9]))
        a = federated.stratified_split(y, fraction, np.random.default_rng([trial, 1]))
        b = _reference_stratified_split(y, fraction, np.random.default_rng([trial, 1]))
        for x, z in zip(a, b):
            np.testing.assert_array_equal(x, z)
            assert x.dtype == z.dtype


def test_mnist1d_is_the_packages_generator_without_touching_global_random_state():
    from mnist1d.data import get_dataset_args, make_dataset

    from fedens.data.datasets import Mnist1dOptions, load_mnist1d

    ds = leaves_global_random_state(lambda: load_mnist1d(Mnist1dOptions(num_samples=500), 0))  # its global seeding undone
    assert ds.x.shape == (500, 1, 40) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(ds.y), [50] * 10)
    args = get_dataset_args()
    args.num_samples = 500
    ref = make_dataset(args)
    np.testing.assert_array_equal(ds.x[:, 0], np.concatenate([ref["x"], ref["x_test"]]).astype(np.float32))
    np.testing.assert_array_equal(ds.y, np.concatenate([ref["y"], ref["y_test"]]))
    # the scenario seed does not change the signals; the generator's does
    np.testing.assert_array_equal(load_mnist1d(Mnist1dOptions(num_samples=500), 7).x, ds.x)
    assert not np.array_equal(load_mnist1d(Mnist1dOptions(num_samples=500, seed=1), 0).x, ds.x)
