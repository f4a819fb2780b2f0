"""End-to-end tests share one warm engine (one Ray session, one actor pool): a run in it gives
exactly the rows of the same run on its own (``test_warm_run_equals_cold_run``), and the suite
pays Ray's start-up once instead of once per run."""

from __future__ import annotations

import pytest

import fedens


@pytest.fixture(scope="session")
def session():
    with fedens.session() as s:
        yield s
