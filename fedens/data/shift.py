"""A covariate-shifted copy of a dataset: rotation (images) plus Gaussian noise."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedens.data.base import ArrayDataset


def rotate(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotate images ``(n, C, H, W)`` by ``degrees`` ``(n,)`` about their centres (bilinear);
    positive is counter-clockwise as displayed (row 0 on top), the direction of ``np.rot90``.

    Pixels that come from outside the image repeat the border, so a rotated image keeps its
    background instead of gaining corners of a foreign value.
    """
    n, _, h, w = x.shape
    t = torch.as_tensor(np.deg2rad(degrees), dtype=torch.float32)
    cos, sin = torch.cos(t), torch.sin(t)
    # affine_grid works in [-1, 1] coordinates per axis; h/w and w/h keep non-square images
    # rotating rigidly in pixel space.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(x)), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.numpy()


def shift_dataset(ds: ArrayDataset, severity: int, seed: int) -> ArrayDataset:
    """``ds`` shifted at ``severity``: images ``(n, C, H, W)`` rotated by ``±6 * severity``
    degrees (sign drawn per image), then Gaussian noise of std ``0.1 * severity`` added to every
    input (images and vectors ``(n, F)``). Inputs are expected standardised. Labels unchanged;
    deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    x = ds.x
    if x.ndim == 4 and len(x):
        signs = rng.choice([-1.0, 1.0], size=len(x))
        x = rotate(x, signs * 6.0 * severity)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.1 * severity)
    return ArrayDataset(x.astype(np.float32, copy=False), ds.y.copy())

