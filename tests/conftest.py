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
