"""The installed layout: ``strategies/`` installs as ``fedens.strategies``, every package is listed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_list_matches_the_folders() -> None:
    # A subpackage missing from pyproject's explicit list would be left out of a wheel.
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"fedens." + ".".join(p.parent.relative_to(ROOT / "fedens").parts) if p.parent != ROOT / "fedens" else "fedens"
             for p in (ROOT / "fedens").rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"fedens.strategies"}
    assert tool["package-dir"] == {"fedens.strategies": "strategies"}


def test_a_users_own_strategies_module_does_not_collide(tmp_path: Path) -> None:
    (tmp_path / "strategies.py").write_text("MINE = 1\n")
    code = ("import fedens.strategies as ours, strategies as mine; "
            "print(mine.MINE, 'fedavg' in ours.STRATEGIES, ours.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True", "fedens.strategies"]
