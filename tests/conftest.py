"""Shared fixtures. End-to-end tests (marked ``e2e``) start Flower's simulation engine with Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write a scenario file into tmp_path and return its path."""

    def _write(text: str, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def leaves_global_random_state(make):
    """``make()``'s result, asserting it left numpy's and Python's global random state as it
    found them (seeded generators only; a maker that reseeds globally must undo it)."""
    import random

    import numpy as np

    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    out = make()
    assert (np.random.random(), random.random()) == before
    return out
