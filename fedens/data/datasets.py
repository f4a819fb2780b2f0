"""The built-in datasets: ``digits``, ``synthetic``, ``mnist1d``, ``image_folder`` and ``hf_disk``.

Every loader returns the whole dataset at raw scale (standardisation happens later, from the
training pool only) and never downloads anything. Images come out as float32 ``(n, C, H, W)``
in [0, 1]; vectors as float32 ``(n, F)``.

``digits``, ``mnist1d`` and ``synthetic`` declare their own OOD set (``OodSpec``, used by
``data.ood.kind: auto``), chosen because a trained network's predictive entropy tells it from the
test set (docs/methods.md#ood-sets): MNIST-1D signals as 8x8 images for ``digits``, MNIST-1D's
generator without a digit ("blank signals") for ``mnist1d``, a mixture of new classes for
``synthetic``. ``image_folder`` and ``hf_disk`` declare none (``auto`` gives the noise set).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from fedens.data.base import DATASETS, ArrayDataset, DatasetOptions, DatasetSpec, OodSpec, standardise_set


def _image_array(img: Image.Image, size: int, grayscale: bool) -> np.ndarray:
    """A PIL image as float32 ``(C, size, size)`` in [0, 1], C = 1 (grayscale) or 3 (RGB)."""
    img = img.convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[None] if grayscale else a.transpose(2, 0, 1)


def _image_shape(o: Any) -> tuple[int, ...]:
    return (1 if o.grayscale else 3, o.image_size, o.image_size)


def resample(x: np.ndarray, length: int) -> np.ndarray:
    """Rows of ``x`` ``(n, L)`` linearly interpolated to ``length`` points ``(n, length)``, the
    first and last points kept (``np.interp`` on ``linspace(0, L - 1, length)``), float32."""
    n, L = x.shape
    if L == 1:
        return np.repeat(x, length, axis=1).astype(np.float32)
    pos = np.linspace(0.0, L - 1, length)
    lo = np.minimum(np.floor(pos).astype(np.int64), L - 2)
    w = pos - lo
    return (x[:, lo] * (1 - w) + x[:, lo + 1] * w).astype(np.float32)


# --------------------------------------------------------------------------- digits


class DigitsOptions(DatasetOptions):
    """scikit-learn's bundled 8x8 digits: no options."""


def digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz`` (64 pixel counts, then the label, per row), found
    without importing scikit-learn: ``sklearn.datasets`` costs about 2 s of imports in every
    process (driver and each Ray actor), ``load_digits`` reads this same file."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def load_digits(o: DigitsOptions, seed: int) -> ArrayDataset:
    """1,797 images ``(1797, 1, 8, 8)`` in [0, 1] (pixel counts 0..16 divided by 16), 10 classes."""
    table = np.loadtxt(digits_file(), delimiter=",", dtype=np.float32)  # (1797, 65)
    x = (table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    return ArrayDataset(x, table[:, 64].astype(np.int64))


def ood_digits(o: DigitsOptions, n: int, seed: int) -> np.ndarray:
    """``n`` MNIST-1D signals (the generator's default options, generator seed ``seed``) as 8x8
    images ``(n, 1, 8, 8)``: each length-40 signal linearly resampled to 64 points, laid out row
    by row, and the set standardised (``standardise_set``). Another embedded dataset mapped to
    this one's input shape: a digit-classifier has seen nothing like it."""
    signals = load_mnist1d(Mnist1dOptions(num_samples=max(20, -(-n // 10) * 10), seed=seed), seed).x[:n, 0]
    return standardise_set(resample(signals, 64).reshape(n, 1, 8, 8))


DATASETS.add("digits", DatasetSpec(DigitsOptions, load_digits, lambda o: (1, 8, 8), lambda o: 10,
                                   ood=OodSpec("mnist1d-as-8x8", ood_digits)))


# --------------------------------------------------------------------------- synthetic


class SyntheticOptions(DatasetOptions):
    """A Gaussian mixture: class means ~ N(0, I) * separation, unit-variance noise around them."""

    num_samples: int = Field(2000, ge=10)
    num_classes: int = Field(10, ge=2)
    num_features: int = Field(32, ge=1)
    separation: float = Field(2.0, gt=0, description="scale of the class means; smaller = harder")
    as_image: bool = Field(False, description="shape x as (n, 1, s, s); num_features must be s*s")

    @field_validator("as_image")
    @classmethod
    def _square(cls, v: bool, info: ValidationInfo) -> bool:
        f = info.data.get("num_features")
        if v and f is not None and math.isqrt(f) ** 2 != f:
            raise PydanticCustomError("not_square", "needs num_features to be a perfect square, got {f}", {"f": f})
        return v


def _synthetic_shape(o: SyntheticOptions) -> tuple[int, ...]:
    s = math.isqrt(o.num_features)
    return (1, s, s) if o.as_image else (o.num_features,)


def load_synthetic(o: SyntheticOptions, seed: int) -> ArrayDataset:
    """``num_samples`` examples ``(n, F)`` (or ``(n, 1, s, s)``), classes balanced to within one."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((o.num_classes, o.num_features)) * o.separation
    y = rng.permutation(np.arange(o.num_samples) % o.num_classes)
    x = means[y] + rng.standard_normal((o.num_samples, o.num_features))
    return ArrayDataset(x.astype(np.float32).reshape(-1, *_synthetic_shape(o)), y.astype(np.int64))


def ood_synthetic(o: SyntheticOptions, n: int, seed: int) -> np.ndarray:
    """``n`` inputs of new classes: ``num_classes`` fresh class means drawn from the same prior
    (``N(0, I) * separation``), unit-variance noise around them, classes balanced to within one,
    the set standardised (``standardise_set``)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((o.num_classes, o.num_features)) * o.separation
    y = rng.permutation(np.arange(n) % o.num_classes)
    x = means[y] + rng.standard_normal((n, o.num_features))
    return standardise_set(x.astype(np.float32).reshape(-1, *_synthetic_shape(o)))


DATASETS.add("synthetic", DatasetSpec(SyntheticOptions, load_synthetic, _synthetic_shape, lambda o: o.num_classes,
                                      ood=OodSpec("new-classes", ood_synthetic)))


# --------------------------------------------------------------------------- mnist1d


class Mnist1dOptions(DatasetOptions):
    """MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024):
    ten 1-D digit templates, padded, scaled, sheared, translated and noised into signals of
    length 40, made by the ``mnist1d`` package's own generator (``make_dataset``), so nothing is
    downloaded. The defaults are the package's, which give the published dataset (5,000
    signals, generator seed 42). ``seed`` here is the generator's: fedens' scenario seed changes
    the splits, not the signals."""

    num_samples: int = Field(5000, ge=20, description="signals, balanced over the 10 classes")
    seed: int = Field(42, ge=0, description="the generator's seed; 42 gives the published dataset")
    iid_noise_scale: float = Field(2e-2, ge=0, description="white noise added to every signal")
    corr_noise_scale: float = Field(0.25, ge=0, description="smoothed (correlated) noise")
    shuffle_seq: bool = Field(False, description="permute the 40 positions (destroys locality)")


def _mnist1d_generate(o: Mnist1dOptions, num_samples: int, seed: int, template: dict | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The ``mnist1d`` package's ``make_dataset`` with ``o``'s noise and shuffle options:
    signals ``(num_samples, 40)`` float64 and labels, train and test parts together. The
    generator seeds NumPy's and Python's global random states; they are restored afterwards."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key in ("iid_noise_scale", "corr_noise_scale", "shuffle_seq"):
        setattr(args, key, getattr(o, key))
    args.num_samples, args.seed = num_samples, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args, template)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.concatenate([d["x"], d["x_test"]]), np.concatenate([d["y"], d["y_test"]])


def load_mnist1d(o: Mnist1dOptions, seed: int) -> ArrayDataset:
    """``(n, 1, 40)`` float32 signals (one channel, for 1-D convolutions) and labels 0..9; the
    package's train and test parts together (fedens makes its own stratified test split). The
    generator seeds NumPy's and Python's global random states; they are restored afterwards."""
    x, y = _mnist1d_generate(o, o.num_samples, o.seed)
    return ArrayDataset(x.astype(np.float32)[:, None, :], y.astype(np.int64))


def ood_mnist1d(o: Mnist1dOptions, n: int, seed: int) -> np.ndarray:
    """``n`` blank signals ``(n, 1, 40)``: MNIST-1D's own generator (padding, scaling,
    translation, correlated and white noise, shear, subsampling; ``o``'s noise and shuffle
    options, generator seed ``seed``) run on a flat template, i.e. MNIST-1D without a digit,
    the set standardised (``standardise_set``)."""
    from mnist1d.data import get_templates

    flat = {"x": np.zeros((1, 12)), "t": get_templates()["t"], "y": np.zeros(1, np.int64)}
    x, _ = _mnist1d_generate(o, n, seed, flat)
    return standardise_set(x.astype(np.float32)[:, None, :])


DATASETS.add("mnist1d", DatasetSpec(Mnist1dOptions, load_mnist1d, lambda o: (1, 40), lambda o: 10,
                                    ood=OodSpec("blank-signals", ood_mnist1d)))


# --------------------------------------------------------------------------- image_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class ImageFolderOptions(DatasetOptions):
    """A torchvision-style tree ``root/<class name>/**/*.png`` (also jpg, jpeg, bmp, gif)."""

    path_fields = ("root",)
    root: str
    image_size: int = Field(28, ge=1, description="images are resized to image_size x image_size")
    grayscale: bool = Field(True, description="1 channel; False gives 3 (RGB)")


def _classes(o: ImageFolderOptions) -> list[str]:
    """Class names = the sorted subfolders of ``root``, as torchvision's ``find_classes``."""
    if not Path(o.root).is_dir():
        raise ValueError(f"data.params.root: folder {o.root!r} not found")
    classes = sorted(e.name for e in os.scandir(o.root) if e.is_dir())
    if not classes:
        raise ValueError(f"data.params.root: folder {o.root!r} has no class subfolders")
    return classes


def load_image_folder(o: ImageFolderOptions, seed: int) -> ArrayDataset:
    """Every image below ``root/<class>/`` as ``(n, C, image_size, image_size)`` in [0, 1];
    label = index of the class in sorted order, files in sorted order as torchvision walks them."""
    xs, ys = [], []
    for label, name in enumerate(_classes(o)):
        files = [
            Path(dirpath, f)
            for dirpath, _, fnames in sorted(os.walk(Path(o.root, name), followlinks=True))
            for f in sorted(fnames)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not files:
            raise ValueError(f"data.params.root: class folder {name!r} in {o.root!r} has no images")
        for f in files:
            with Image.open(f) as img:
                xs.append(_image_array(img, o.image_size, o.grayscale))
        ys += [label] * len(files)
    return ArrayDataset(np.stack(xs), np.asarray(ys, dtype=np.int64))


DATASETS.add(
    "image_folder",
    DatasetSpec(ImageFolderOptions, load_image_folder, _image_shape, lambda o: len(_classes(o))),
)


# --------------------------------------------------------------------------- hf_disk


class HfDiskOptions(DatasetOptions):
    """A Hugging Face dataset saved with ``Dataset.save_to_disk`` (read locally, never the hub)."""

    path_fields = ("path",)
    path: str
    image_key: str = "image"
    label_key: str = "label"
    image_size: int = Field(28, ge=1)
    grayscale: bool = True
    split: str = Field("train", description="used only if a DatasetDict was saved")
    num_classes: int | None = Field(None, ge=2, description="required if the labels are not a ClassLabel")


def _open_hf(o: HfDiskOptions) -> Any:
    """The saved dataset, memory-mapped (opening it reads no rows)."""
    import datasets

    if not Path(o.path).is_dir():
        raise ValueError(f"data.params.path: folder {o.path!r} not found")
    try:
        ds = datasets.load_from_disk(o.path)
    except FileNotFoundError:
        raise ValueError(f"data.params.path: {o.path!r} is not a dataset saved with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if o.split not in ds:
            raise ValueError(f"data.params.split: {o.split!r} not in {o.path!r} (splits: {', '.join(ds)})")
        ds = ds[o.split]
    for key in ("image_key", "label_key"):
        if getattr(o, key) not in ds.column_names:
            raise ValueError(f"data.params.{key}: no column {getattr(o, key)!r} (columns: {', '.join(ds.column_names)})")
    return ds


def _hf_num_classes(o: HfDiskOptions) -> int:
    import datasets

    feature = _open_hf(o).features[o.label_key]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    if o.num_classes is None:
        raise ValueError(f"data.params.num_classes: required, column {o.label_key!r} is not a ClassLabel")
    return o.num_classes


def load_hf_disk(o: HfDiskOptions, seed: int) -> ArrayDataset:
    """All rows as ``(n, C, image_size, image_size)`` in [0, 1] and integer labels ``(n,)``."""
    ds = _open_hf(o)
    to_pil = lambda im: im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))  # noqa: E731
    x = np.stack([_image_array(to_pil(im), o.image_size, o.grayscale) for im in ds[o.image_key]])
    y = np.asarray(ds[o.label_key])
    k = _hf_num_classes(o)
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= k)):
        raise ValueError(f"data.params.label_key: labels of {o.label_key!r} must be integers in 0..{k - 1}")
    return ArrayDataset(x, y.astype(np.int64))


DATASETS.add("hf_disk", DatasetSpec(HfDiskOptions, load_hf_disk, _image_shape, _hf_num_classes))
