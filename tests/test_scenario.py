"""The scenario schema: defaults, overrides, and one clear line with exit code 2 for every kind
of bad input (through the real command line, in a subprocess, so a traceback would show)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedens.checks import load_scenario
from fedens.scenario import DirichletPartition, Scenario, ScenarioError
from tests.conftest import ROOT

GOOD = """
name: t
data: {dataset: digits, num_clients: 3, partition: {kind: dirichlet, alpha: 0.5}}
rounds: 2
"""


def test_defaults_are_documented_values():
    scn = load_scenario({})
    assert scn.rounds == 20 and scn.seed == 0 and scn.data.dataset == "digits"
    assert scn.data.num_clients == 10 and scn.data.partition.kind == "iid"
    assert scn.model.kind == "mlp" and scn.learner.kind == "single" and scn.strategy.name == "fedavg"
    assert scn.evaluate.n_bins == 10 and scn.engine.telemetry is False
    assert scn.resources.num_cpus == 1.0 and scn.resources.num_gpus == 0.0


def test_file_and_overrides(write_yaml):
    path = write_yaml(GOOD)
    scn = load_scenario(path, ["data.num_clients=7", "data.partition.alpha=0.1", "model.hidden=[32, 16]"])
    assert scn.data.num_clients == 7
    assert isinstance(scn.data.partition, DirichletPartition) and scn.data.partition.alpha == 0.1
    assert scn.model.options == {"hidden": [32, 16]}
    # the mapping form of overrides (Python API) does the same
    assert load_scenario(path, {"rounds": 9}).rounds == 9


def test_resolved_yaml_round_trips(write_yaml):
    scn = load_scenario(write_yaml(GOOD), ["model.hidden=[8]"])
    again = load_scenario(write_yaml(scn.to_yaml(), "resolved.yaml"))
    assert again.model_dump() == scn.model_dump()


def test_scenario_is_frozen():
    scn = load_scenario({})
    with pytest.raises(Exception):
        scn.rounds = 3  # type: ignore[misc]


BAD = [
    # (yaml text, overrides, expected fragment of the one-line message)
    ("rounds: [1, 2\n", [], "invalid YAML"),
    ("rounds: many\n", [], "rounds: should be a valid integer"),
    ("rounds: 0\n", [], "rounds: should be greater than or equal to 1"),
    ("data: {partition: {kind: dirichlet, alpha: -1}}\n", [], "data.partition.alpha: should be greater than 0"),
    ("data: {partition: {kind: zipf}}\n", [], "data.partition: unknown kind 'zipf'"),
    ("data: {num_clinets: 3}\n", [], "data.num_clinets: unknown key"),
    ("trian: {lr: 0.1}\n", [], "trian: unknown key"),
    ("data: {dataset: imagenet}\n", [], "data.dataset: unknown dataset 'imagenet'"),
    ("model: {kind: resnet}\n", [], "model.kind: unknown model 'resnet'"),
    ("model: {kind: mlp, hiden: [3]}\n", [], "model.hiden: unknown key"),
    ("model: {kind: cnn}\ndata: {dataset: synthetic}\n", [], "model.kind: cnn needs image inputs"),
    ("learner: {kind: bayes_magic}\n", [], "learner.kind: unknown learner"),
    ("strategy: {name: fedmagic}\n", [], "strategy.name: unknown strategy 'fedmagic'"),
    ("strategy: {name: fedavg, params: {alpha: 1}}\n", [], "strategy.params.alpha: unknown parameter of FedAvg (it takes: "),
    ("strategy: {name: nowhere.py:Cls}\n", [], "strategy.name: plug-in file 'nowhere.py' not found"),
    ("strategy: {name: 'json:dumps'}\n", [], "strategy.name: 'json:dumps' is not a subclass"),
    ("strategy: {name: 'flwr.serverapp.strategy:NoSuch'}\n", [], "has no attribute 'NoSuch'"),
    ("data: {partition: {kind: pathological, classes_per_client: 11}}\n", [], "classes_per_client: must be <= the 10 classes"),
    ("- 1\n- 2\n", [], "must be a mapping"),
    ("rounds: 2\n", ["rounds"], "expected KEY=VALUE"),
    ("rounds: 2\n", ["rounds.x=3"], "rounds.x: rounds is not a mapping"),
    ("rounds: 2\n", ["data.num_clients=0"], "data.num_clients: should be greater than or equal to 1"),
    ("data: {dataset: image_folder, params: {root: /no/such/folder}}\n", [], "data.params"),
]


@pytest.mark.parametrize("text,overrides,fragment", BAD)
def test_bad_input_is_one_line_naming_file_and_key(write_yaml, text, overrides, fragment):
    path = write_yaml(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    assert fragment in msg, msg
    assert (str(path) in msg) or msg.startswith("--set")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_sim.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_invalid_scenario_exit_2_one_line_no_traceback(write_yaml):
    path = write_yaml("data: {partition: {kind: dirichlet, alpha: 0}}\n")
    proc = run_cli(str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{path}: data.partition.alpha: should be greater than 0" in proc.stderr


def test_cli_missing_file_and_bad_usage_exit_2():
    proc = run_cli("no/such/scenario.yaml")
    assert proc.returncode == 2 and "no/such/scenario.yaml: no such file" in proc.stderr
    proc = run_cli("scenarios/quickstart.yaml", "--bogus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_cli_validate(write_yaml):
    proc = subprocess.run([sys.executable, "-m", "fedens.cli", "validate", str(ROOT / "scenarios/quickstart.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout
    bad = write_yaml("seed: -1\n")
    proc = subprocess.run([sys.executable, "-m", "fedens.cli", "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "seed: should be greater than or equal to 0" in proc.stderr


def test_impossible_split_is_invalid_before_anything_runs(write_yaml):
    path = write_yaml("data: {num_clients: 2000}\n")
    proc = subprocess.run([sys.executable, "-m", "fedens.cli", "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"{path}: data.num_clients: 2000 clients but only" in proc.stderr


def test_every_shipped_scenario_validates():
    import yaml

    from fedens.compare import load_comparison

    files = sorted((ROOT / "scenarios").glob("*.yaml"))
    assert files, "no scenarios shipped"
    for f in files:
        if "variants" in yaml.safe_load(f.read_text()):
            assert load_comparison(f)[1], f
        else:
            assert isinstance(load_scenario(f), Scenario), f


def test_plugin_strategy_resolves_relative_to_scenario(tmp_path: Path):
    (tmp_path / "my.py").write_text(
        "from flwr.serverapp.strategy import FedAvg\nclass Mine(FedAvg):\n    pass\n", encoding="utf-8"
    )
    path = tmp_path / "s.yaml"
    path.write_text("strategy: {name: my.py:Mine}\n", encoding="utf-8")
    # made absolute, so the resolved scenario.yaml in a run folder still finds it
    assert load_scenario(path).strategy.name == f"{(tmp_path / 'my.py').resolve()}:Mine"


def test_relative_dataset_folder_is_made_absolute(tmp_path: Path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / cls / "0.png")
    path = tmp_path / "s.yaml"
    path.write_text("data: {dataset: image_folder, num_clients: 1, params: {root: imgs, image_size: 8}}\n", encoding="utf-8")
    assert load_scenario(path).data.params["root"] == str((tmp_path / "imgs").resolve())


def test_evaluation_rounds():
    scn = load_scenario({"rounds": 7, "evaluate": {"every": 3}})
    assert scn.evaluation_rounds == {0, 3, 6, 7}
    assert load_scenario({"rounds": 2}).evaluation_rounds == {0, 1, 2}
