"""Parameters of strategies and gossip rules: frozen pydantic ``Options``, one set per method,
validated when the scenario loads; the client half of an ADMM-family algorithm rebuilt from what
its strategy sends."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
import torch

from fedens.algorithms import fedadmm, feddyn, fedlap, fedlap_cov, fedprox, ivon_admm, objective_from_config
from fedens.algorithms.swarm import SwarmOptions, validator_scores
from fedens.algorithms.vca import VCAOptions
from fedens.checks import load_scenario
from fedens.decentralized import engine
from fedens.decentralized.engine import collect_scores
from fedens.decentralized.rules import GOSSIP_RULES, Swarm, VarianceCorrected
from fedens.options import Options
from fedens.payload import to_record
from fedens.scenario import ScenarioError
from fedens.strategies import STRATEGIES
from fedens.strategies.base import FedensStrategy
from fedens.strategies.swarm import SwarmStrategy
from fedens.strategies.vca import VarianceCorrectedAveraging

OURS = [name for name in STRATEGIES.names() if issubclass(STRATEGIES.get(name), FedensStrategy)]


@pytest.mark.parametrize("name", OURS + [f"gossip:{n}" for n in GOSSIP_RULES.names()])
def test_every_fedens_strategy_and_rule_declares_frozen_options(name: str) -> None:
    cls = GOSSIP_RULES.get(name[7:]) if name.startswith("gossip:") else STRATEGIES.get(name)
    assert issubclass(cls.Options, Options)
    built = cls()
    assert built.options == cls.Options()  # the defaults are the Options' own, nowhere else
    with pytest.raises(pydantic.ValidationError):
        built.options.__setattr__(next(iter(cls.Options.model_fields), "x"), 0)  # frozen
    with pytest.raises(pydantic.ValidationError, match="extra_forbidden"):
        cls.Options.model_validate({"no_such_option": 1})


def test_one_set_of_names_and_defaults_per_method() -> None:
    assert VarianceCorrectedAveraging.Options is VCAOptions is VarianceCorrected.Options
    assert SwarmStrategy.Options is SwarmOptions is Swarm.Options
    assert VCAOptions().model_dump() == {"target": "others", "c": 0.5, "eps": 1e-4}
    assert SwarmOptions().model_dump() == {"k": 3, "T": 10, "tau": 0.1, "omega": 0.5, "phi1": 0.2, "phi2": 0.3,
                                           "score": "accuracy"}


BASE = "rounds: 1\ndata: {num_clients: 3}\n"


@pytest.mark.parametrize("text, line", [
    ("strategy: {name: fedprox, params: {mu: -1}}\n", "strategy.params.mu: should be greater than or equal to 0"),
    ("strategy: {name: vca, params: {c: 2}}\n", "strategy.params.c: should be less than or equal to 1"),
    ("strategy: {name: fedlap, params: {rho: 0}}\n", "strategy.params.rho: should be greater than 0"),
    ("strategy: {name: ivon_admm, params: {tau: .inf}}\nlearner: {kind: ivon}\n", "strategy.params.tau: should be a finite number"),
    ("strategy: {name: fedbe, params: {include_clients: false, include_fedavg: false, num_samples: 0}}\n"
     "data: {num_clients: 3, server_fraction: 0.1}\n", "strategy.params.include_clients, include_fedavg, num_samples: the teacher ensemble is empty"),
    ("strategy: {name: fedprox, params: {mu: 0.1, fraction_train: 2}}\n", "strategy.params.fraction_train: should be less than or equal to 1"),
    ("strategy: {name: fedprox, params: {nu: 1}}\n", "strategy.params.nu: unknown parameter of FedProx (it takes: "),
    ("mode: decentralized\ngossip: {rule: swarm, params: {score: f1}}\ndata: {num_clients: 3, val_fraction: 0.2}\n",
     "gossip.params.score: should be 'accuracy' or 'nll'"),
    ("mode: decentralized\ngossip: {rule: vca, params: {conservative: 0.3}}\n",
     "gossip.params.conservative: renamed to c"),
])
def test_bad_options_are_one_line_at_load(write_yaml, text: str, line: str) -> None:
    path = write_yaml(BASE + text) if "data:" not in text else write_yaml("rounds: 1\n" + text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert line in str(err.value) and "\n" not in str(err.value), str(err.value)


PLUGIN = '''
from fedens.strategies.base import FedensStrategy

class Scaled(FedensStrategy):
    """A user's strategy without Options: its constructor's signature is checked."""

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
'''


def test_a_plugin_strategy_without_options_is_checked_by_its_signature(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(PLUGIN)
    path = tmp_path / "s.yaml"
    path.write_text(BASE + "strategy: {name: mine.py:Scaled, params: {scale: 2.5}}\n")
    assert load_scenario(path).strategy.params == {"scale": 2.5}
    for params, line in (("{scale: abc}", "strategy.params.scale: should be a valid number"),
                         ("{scael: 1}", "strategy.params.scael: unknown parameter of Scaled")):
        path.write_text(BASE + f"strategy: {{name: mine.py:Scaled, params: {params}}}\n")
        with pytest.raises(ScenarioError, match=line):
            load_scenario(path)


@pytest.mark.parametrize("term, options", [
    (fedprox.ProxTerm, fedprox.FedProxOptions(mu=0.3)),
    (feddyn.DynTerm, feddyn.FedDynOptions(alpha=0.2)),
    (fedadmm.AdmmTerm, fedadmm.FedADMMOptions(rho=0.4, eta=0.5)),
    (fedlap.LapTerm, fedlap.FedLapOptions(delta=2.0, rho=0.25)),
    (fedlap_cov.LapCovTerm, fedlap_cov.FedLapCovOptions(delta=3.0, rho=0.5)),
    (ivon_admm.IvonAdmmTerm, ivon_admm.IvonAdmmOptions(rho=0.5, tau=1.0, rescale_lr=True)),
])
def test_a_client_term_is_rebuilt_from_what_its_strategy_sends(term, options) -> None:
    strategy = next(STRATEGIES.get(n) for n in OURS if STRATEGIES.get(n).Options is type(options))
    sent = strategy(**options.model_dump()).train_config(3)
    assert sent == term.message_config(options) and sent["objective"] == term.name
    built = objective_from_config(sent, {}, {}, torch.device("cpu"), 10, server_round=3)
    assert type(built) is term and built.options == options and built.server_round == 3


def test_swarm_scores_are_signed_so_that_higher_is_better() -> None:
    values = {"cand.1.accuracy": [0.9, 0.8], "cand.1.nll": [0.2, 0.5], "cand.1.confidence": [0.7, 0.6]}
    assert validator_scores(values, "cand.1", "accuracy") == [(0.9, 0.7), (0.8, 0.6)]
    assert validator_scores(values, "cand.1", "nll") == [(-0.2, 0.7), (-0.5, 0.6)]
    assert validator_scores(values, "cand.2", "nll") is None


def test_gossip_engine_asks_the_validators_for_the_rules_score(monkeypatch) -> None:
    # Validator 0 scored node 1's two members; the engine reads the score the rule names.
    reply = SimpleNamespace(
        has_error=lambda: False, metadata=SimpleNamespace(src_node_id=100),
        content=SimpleNamespace(metric_records={"scores": {
            "cand.1.accuracy": [0.9, 0.8], "cand.1.nll": [0.2, 0.5], "cand.1.confidence": [0.7, 0.6]}}))
    sent = []
    grid = SimpleNamespace(partition_of={100: 0}, timeout=None,
                           send_and_receive=lambda msgs, timeout: sent.extend(msgs) or [reply])
    # a Flower Message needs a running simulation: record what would be sent instead
    monkeypatch.setattr(engine, "Message", lambda content, message_type, dst_node_id: SimpleNamespace(
        content=content, message_type=message_type, dst_node_id=dst_node_id))
    inbox = {0: {1: (to_record({"w": np.zeros(1, np.float32)}), 10)}}  # sender -> (record, size)
    assert collect_scores(grid, {0: 100}, inbox, "nll") == {0: {1: [(-0.2, 0.7), (-0.5, 0.6)]}}
    assert collect_scores(grid, {0: 100}, inbox, "accuracy") == {0: {1: [(0.9, 0.7), (0.8, 0.6)]}}
    assert (sent[0].message_type, sent[0].dst_node_id, list(sent[0].content.array_records)) == \
        ("query.validate", 100, ["cand.1"])


DATACLASS_RULE = '''
from dataclasses import dataclass
from fedens.decentralized.rules import GossipRule

@dataclass(frozen=True)
class KeepOwn(GossipRule):
    """A user's rule written as a dataclass: its fields are its options."""

    strength: float = 1.0

    def __call__(self, own, received, ctx):
        return dict(own), {"strength": self.strength}
'''


def test_a_dataclass_gossip_rule_with_its_own_fields_loads(tmp_path: Path) -> None:
    (tmp_path / "rule.py").write_text(DATACLASS_RULE)
    path = tmp_path / "s.yaml"
    path.write_text(BASE + "mode: decentralized\ngossip: {rule: rule.py:KeepOwn, params: {strength: 0.5}}\n")
    assert load_scenario(path).gossip.params == {"strength": 0.5}
    path.write_text(BASE + "mode: decentralized\ngossip: {rule: rule.py:KeepOwn, params: {strenght: 0.5}}\n")
    with pytest.raises(ScenarioError, match="gossip.params: gossip rule .*unexpected keyword argument 'strenght'"):
        load_scenario(path)


def test_conformal_needs_validation_data(write_yaml) -> None:
    with pytest.raises(ScenarioError, match="data.val_fraction: evaluate.conformal calibrates"):
        load_scenario(write_yaml("rounds: 1\ndata: {num_clients: 3, val_fraction: 0}\nevaluate: {conformal: {}}\n"))
