"""The registry and the plug-in loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg, Strategy

from fedens.registry import PluginError, Registry, load_object
from fedens.strategies import STRATEGIES, build_strategy, resolve_strategy
from tests.conftest import ROOT


def test_register_get_and_unknown_name_lists_known():
    reg: Registry[int] = Registry("thing")
    reg.add("b", 2)

    @reg.register("a")
    def a() -> int:
        return 1

    assert reg.names() == ["a", "b"] and reg.get("b") == 2 and "a" in reg
    with pytest.raises(PluginError, match=r"unknown thing 'c' \(known: a, b\)"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("b", 3)


def test_load_object_from_module_and_file(tmp_path: Path):
    assert load_object("flwr.serverapp.strategy:FedAvg") is FedAvg
    (tmp_path / "plug.py").write_text("VALUE = 41 + 1\n", encoding="utf-8")
    assert load_object(f"{tmp_path / 'plug.py'}:VALUE") == 42
    assert load_object("plug.py:VALUE", base_dir=tmp_path) == 42
    # the same file gives the same module object (so classes compare equal)
    assert load_object("plug.py:VALUE", base_dir=tmp_path) == 42


@pytest.mark.parametrize(
    "ref,fragment",
    [
        ("no_colon", "is not of the form"),
        ("no.such.module:X", "cannot import module 'no.such.module'"),
        ("json:nope", "has no attribute 'nope'"),
        ("missing.py:X", "plug-in file 'missing.py' not found"),
    ],
)
def test_load_object_errors_are_one_line(ref: str, fragment: str):
    with pytest.raises(PluginError) as info:
        load_object(ref)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_plugin_file_with_an_error_is_one_line(tmp_path: Path):
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    with pytest.raises(PluginError, match="error while importing 'broken.py': ModuleNotFoundError"):
        load_object("broken.py:X", base_dir=tmp_path)


def test_resolve_strategy_by_name_module_and_path():
    assert resolve_strategy("fedavg") is FedAvg
    assert {"fedavg", "fedadam", "fedyogi", "fedmedian", "krum"} <= set(STRATEGIES.names())
    assert resolve_strategy("flwr.serverapp.strategy:FedAdam").__name__ == "FedAdam"
    cls = resolve_strategy("examples/custom_strategy.py:DampedFedAvg", ROOT)
    assert issubclass(cls, Strategy) and cls.__name__ == "DampedFedAvg"


def test_resolve_strategy_rejects_non_strategies(tmp_path: Path):
    (tmp_path / "s.py").write_text(
        "from flwr.serverapp.strategy import Strategy\nclass Half(Strategy):\n    pass\nclass NotOne:\n    pass\n",
        encoding="utf-8",
    )
    with pytest.raises(PluginError, match="is not a subclass"):
        resolve_strategy("s.py:NotOne", tmp_path)
    with pytest.raises(PluginError, match="is abstract"):
        resolve_strategy("s.py:Half", tmp_path)


def test_build_strategy_passes_defaults_it_accepts_and_params_win():
    s = build_strategy(FedAvg, {"fraction_train": 0.5, "min_available_nodes": 7, "not_a_kwarg": 1}, {"fraction_train": 0.3})
    assert s.fraction_train == 0.3 and s.min_available_nodes == 7


def test_learner_plugin_by_path_builds_and_uses_its_options():
    import torch

    from fedens.checks import load_scenario
    from fedens.learners import build_learner, resolve_learner

    scn = load_scenario({"learner": {"kind": "examples/custom_learner.py:TemperatureLearner", "temperature": 2.0}})
    assert scn.learner.kind == f"{ROOT / 'examples/custom_learner.py'}:TemperatureLearner"  # made absolute
    learner = build_learner(scn, (1, 8, 8), 10, torch.device("cpu"))
    x = torch.randn(4, 1, 8, 8)
    logits = learner.model(x)
    assert torch.allclose(learner.predict_proba(x)[0], torch.softmax(logits / 2.0, -1))
    with pytest.raises(PluginError, match="is not a concrete subclass"):
        resolve_learner("examples/custom_strategy.py:DampedFedAvg", ROOT)


def test_learner_plugin_options_are_validated():
    from fedens.checks import load_scenario
    from fedens.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="learner.temperature: should be greater than 0"):
        load_scenario({"learner": {"kind": "examples/custom_learner.py:TemperatureLearner", "temperature": 0}})


def test_fedens_list_long_describes_every_entry(capsys):
    from fedens import cli

    assert cli.main(["list", "--long"]) == 0
    out = capsys.readouterr().out
    assert "gossip rules:" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("fedprox "))
    assert "FedProx" in line and "[mu=0.01]" in line  # the module's first sentence, its own parameter only
    line = next(x for x in out.splitlines() if x.strip().startswith("deep_ensemble "))
    assert "members=5" in line and "PydanticUndefined" not in out
    line = next(x for x in out.splitlines() if x.strip().startswith("mlp "))
    assert "hidden=[128]" in line


def test_fedens_version(capsys):
    import fedens
    from fedens import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"fedens {fedens.__version__}"


def test_every_plugin_kind_resolves_a_file_against_the_scenario_folder(tmp_path, monkeypatch):
    """Learners, strategies and gossip rules by ``file.py:Class`` all resolve relative to the
    scenario's folder, not the working directory (gossip rules used to look in the latter)."""
    import fedens

    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "my_rule.py").write_text(
        "from dataclasses import dataclass\n"
        "from fedens.decentralized.rules import Average\n"
        "@dataclass(frozen=True)\n"
        "class Half(Average):\n"
        "    self_weight: float = 0.5\n")
    (folder / "s.yaml").write_text("rounds: 1\nmode: decentralized\ndata: {num_clients: 3}\n"
                                   "gossip: {rule: my_rule.py:Half}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert fedens.load(folder / "s.yaml").gossip.rule == "my_rule.py:Half"
    (folder / "s.yaml").write_text("rounds: 1\nmode: decentralized\ndata: {num_clients: 3}\ngossip: {rule: nope.py:Half}\n")
    with pytest.raises(fedens.ScenarioError, match="nope.py"):
        fedens.load(folder / "s.yaml")
