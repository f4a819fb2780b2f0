"""Engine wiring that must hold without starting Ray: telemetry, resources, device, grid order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedens.api import engine_for, preflight
from fedens.checks import load_scenario
from fedens.client_app import select_device
from fedens.scenario import ScenarioError
from fedens.simulate import configure_engine


def test_importing_fedens_turns_flower_telemetry_off_before_flower_reads_it():
    code = "import fedens, flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "0", out.stderr


def test_scenario_can_turn_telemetry_on_and_off():
    import flwr.supercore.telemetry as t

    try:
        configure_engine(telemetry=load_scenario({"engine": {"telemetry": True}}).engine.telemetry, verbose=False)
        assert t.FLWR_TELEMETRY_ENABLED == "1" and os.environ["FLWR_TELEMETRY_ENABLED"] == "1"
    finally:
        configure_engine(telemetry=load_scenario({}).engine.telemetry, verbose=False)
    assert t.FLWR_TELEMETRY_ENABLED == "0" and os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_engine_carries_the_scenarios_engine_settings_and_client_resources():
    eng = engine_for(load_scenario({"resources": {"num_cpus": 2, "num_gpus": 0.25}, "engine": {"ray_num_cpus": 2, "telemetry": True}}))
    assert eng.ray_num_cpus == 2 and eng.telemetry is True and eng.verbose is False
    assert eng._first_resources == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert not eng.alive  # nothing starts until start() or the first run


def test_device_follows_the_gpu_share(monkeypatch):
    assert select_device(0.0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(0.5) == torch.device("cuda")
    assert select_device(0.0) == torch.device("cpu")


def test_preflight_rejects_resources_this_machine_cannot_give(monkeypatch):
    with pytest.raises(ScenarioError, match=r"resources.num_cpus: 3.0 per client, but Ray has 2 CPUs"):
        preflight(load_scenario({"resources": {"num_cpus": 3}, "engine": {"ray_num_cpus": 2}}))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ScenarioError, match="resources.num_gpus: 0.5 GPU per client, but no GPU is visible"):
        preflight(load_scenario({"resources": {"num_gpus": 0.5}}))


@pytest.mark.parametrize("n,fraction,expected", [
    (10, 1.0, 10), (100, 1.0, 100), (101, 1.0, 100), (3000, 1.0, 100), (30000, 1.0, 100), (99999, 1.0, 100),
    (100000, 0.001, 100), (100000, 0.0005, 50), (1000, 0.05, 50), (10, 0.0, 0),
])
def test_at_most_max_clients_evaluate(n: int, fraction: float, expected: int):
    """Flower's FedAvg samples int(N * fraction_evaluate) clients; the cap must hold exactly
    (floating-point rounding must not give 99), and a smaller request is left alone."""
    from fedens.server_app import evaluate_fraction

    scn = load_scenario({"data": {"dataset": "synthetic", "params": {"num_samples": 20 * n}, "num_clients": n},
                         "fraction_evaluate": fraction})
    assert int(n * evaluate_fraction(scn)) == expected
    uncapped = load_scenario({"data": {"num_clients": 10}, "evaluate": {"max_clients": None}})
    assert evaluate_fraction(uncapped) == 1.0
