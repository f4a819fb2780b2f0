"""Decentralized mode without Ray: scenario validation, the node step, the engine's pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

import fedens
from fedens.checks import load_scenario
from fedens.cli import main
from fedens.data import load_client_data, load_server_data
from fedens.decentralized.engine import initial_models, make_mailbox, summarise
from fedens.decentralized.node import gossip_step, pack_scores, unpack_gossip
from fedens.decentralized.rules import GossipContext, make_rule
from fedens.decentralized.topology import build_graph, neighbours
from fedens.learners import build_learner
from fedens.payload import to_record
from fedens.scenario import ScenarioError
from fedens.seeding import seeded_generator

BASE = {
    "name": "g",
    "seed": 1,
    "rounds": 2,
    "mode": "decentralized",
    "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "iid"}},
    "model": {"kind": "mlp", "hidden": [8]},
    "train": {"local_epochs": 1, "lr": 0.1},
}


def with_(**kw):  # noqa: ANN003,ANN201
    return {**BASE, **kw}


# --------------------------------------------------------------------------- scenario


def test_defaults_and_federated_mode_unchanged():
    scn = fedens.load(BASE)
    assert scn.topology.kind == "ring" and scn.gossip.rule == "average" and not scn.gossip.same_init
    assert fedens.load({}).mode == "federated"


@pytest.mark.parametrize("bad, needle", [
    ({"gossip": {"rule": "nope"}}, "gossip.rule: unknown gossip rule 'nope'"),
    ({"gossip": {"rule": "vca", "params": {"target": "x"}}}, "gossip.params.target: should be 'others', 'self' or 'conservative'"),
    ({"gossip": {"rule": "average", "params": {"bogus": 1}}}, "gossip.params.bogus: unknown key"),
    ({"gossip": {"drop_prob": 1.5}}, "gossip.drop_prob:"),
    ({"gossip": {"active_fraction": 0}}, "gossip.active_fraction:"),
    ({"gossip": {"typo": 1}}, "gossip.typo: unknown key"),
    ({"strategy": {"name": "fedprox", "params": {"mu": 0.1}}}, "strategy: not used in decentralized mode; use gossip.rule"),
    ({"topology": {"kind": "erdos_renyi", "p": 0.01}}, "topology: the erdos_renyi graph on 4 nodes is disconnected"),
    ({"topology": {"kind": "torus"}}, "topology: 4 nodes have no torus"),
    ({"topology": {"kind": "star"}}, "topology: unknown kind 'star'"),
    ({"gossip": {"rule": "swarm"}, "data": {**BASE["data"], "val_fraction": 0}}, "data.val_fraction:"),
])
def test_invalid_decentralized_scenarios(bad, needle):
    with pytest.raises(ScenarioError) as err:
        fedens.load(with_(**bad))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_allow_disconnected_is_accepted():
    scn = fedens.load(with_(topology={"kind": "erdos_renyi", "p": 0.01, "allow_disconnected": True}))
    assert scn.topology.allow_disconnected


def test_edges_file_relative_to_the_scenario_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "line.txt").write_text("0 1\n1 2\n2 3\n3 0\n")
    path = tmp_path / "s.yaml"
    path.write_text(fedens.load(with_(topology={"kind": "ring"})).to_yaml().replace(
        "kind: ring", "kind: edges\n  file: graphs/line.txt"))
    monkeypatch.chdir("/")
    scn = fedens.load(path)
    assert scn.topology.file == str((tmp_path / "graphs" / "line.txt").resolve())
    assert build_graph(scn.topology, 4, 0).sum() == 8
    # the resolved scenario is valid again (as written into a run folder)
    assert fedens.load(scn.model_dump(mode="json")).topology == scn.topology


def test_edges_file_that_breaks_the_graph_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "e.txt").write_text("0 1\n2 3\n")
    path = tmp_path / "s.yaml"
    path.write_text(fedens.load(BASE).to_yaml().replace("kind: ring", "kind: edges\n  file: e.txt"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml: topology: the edges graph on 4 nodes is disconnected" in err and "Traceback" not in err


def test_shipped_gossip_scenarios_validate():
    files = sorted(Path(__file__).resolve().parents[2].glob("scenarios/gossip_*.yaml"))
    assert len(files) == 6
    for f in files:
        scn = fedens.load(f)
        assert scn.mode == "decentralized" and scn.data.num_clients == 20


# --------------------------------------------------------------------------- engine pieces


def test_initial_models_independent_or_shared():
    scn = fedens.load(BASE)
    data = load_server_data(scn.data, scn.seed)
    own = initial_models(scn, data)
    assert len(own) == 4 and not np.array_equal(own[0]["1.weight"], own[1]["1.weight"])
    assert all(np.array_equal(a["1.weight"], b["1.weight"]) for a, b in zip(own, initial_models(scn, data)))
    same = initial_models(fedens.load(with_(gossip={"same_init": True})), data)
    assert all(np.array_equal(same[0][k], m[k]) for m in same for k in m)


def test_summarise_mean_min_max_and_lists():
    row = summarise({"accuracy": [0.5, 0.7, 0.6]})
    assert row["accuracy"] == pytest.approx(0.6) and row["accuracy_min"] == 0.5 and row["accuracy_max"] == 0.7
    assert row["node_accuracy"] == [0.5, 0.7, 0.6]


def test_scores_and_inbox_travel_through_a_message():
    scores = {1: {0: [(0.5, 0.9), (0.6, 0.8)], 2: [(0.1, 0.2)]}, 3: {0: [(0.7, 0.7)]}}
    content = RecordDict({"recv.2": to_record({"w": np.ones(3, np.float32)}), "gossip.scores": pack_scores(scores)})
    inp = unpack_gossip(content)
    assert inp.init is None and list(inp.received) == [2] and inp.scores == scores


# --------------------------------------------------------------------------- the node step


def _node_setup(scn, pid):  # noqa: ANN001,ANN202
    data = load_server_data(scn.data, scn.seed)
    learner = build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu"))
    return learner, load_client_data(scn.data, scn.seed, pid)


def test_full_drop_leaves_every_node_with_its_own_model():
    """drop_prob 1: nothing is delivered, so after 2 rounds of mailbox + node step each node's
    model is exactly what training alone from its own init gives."""
    scn = fedens.load(with_(gossip={"rule": "vca", "drop_prob": 1.0}))
    n = scn.data.num_clients
    init = initial_models(scn, load_server_data(scn.data, scn.seed))
    rule = make_rule(scn.gossip.rule, scn.gossip.params)
    mailbox = make_mailbox(scn)
    models = [dict(m) for m in init]
    for r in (1, 2):
        nbrs = neighbours(build_graph(scn.topology, n, scn.seed, r))
        for pid in mailbox.active(r):
            received = mailbox.collect(pid, r)
            assert received == {}
            learner, data = _node_setup(scn, pid)
            models[pid], metrics = gossip_step(learner, rule, models[pid], received, GossipContext(node=pid),
                                               data.train, data.val, scn.seed, r)
            assert metrics["rule_received"] == 0 and "val_accuracy" in metrics
            mailbox.post(pid, nbrs[pid], r, models[pid])
    assert mailbox.delivered == 0 and mailbox.dropped == mailbox.sent == 2 * 2 * n
    for pid in range(n):
        learner, data = _node_setup(scn, pid)
        learner.set_arrays(init[pid])
        for r in (1, 2):
            learner.fit(data.train, seeded_generator(scn.seed, r, pid), r)
        alone = learner.get_arrays()
        for k in alone:
            np.testing.assert_array_equal(models[pid][k], alone[k])
        assert not np.array_equal(models[pid]["1.weight"], init[pid]["1.weight"])


def test_node_step_mixes_before_training():
    """With a neighbour's model the node trains from the mix, not from its own model."""
    scn = fedens.load(BASE)
    init = initial_models(scn, load_server_data(scn.data, scn.seed))
    learner, data = _node_setup(scn, 0)
    rule = make_rule("average")
    mixed, _ = rule(init[0], {1: init[1]}, GossipContext(node=0))
    out, metrics = gossip_step(learner, rule, init[0], {1: init[1]}, GossipContext(node=0), data.train, data.val, 0, 1)
    assert metrics["rule_received"] == 1 and metrics["rule_self_weight"] == pytest.approx(0.5)
    learner.set_arrays(mixed)
    learner.fit(data.train, seeded_generator(0, 1, 0), 1)
    np.testing.assert_array_equal(out["1.weight"], learner.get_arrays()["1.weight"])


@pytest.mark.parametrize("section, message", [
    ({"topology": {"kind": "regular", "k": 4}}, "topology: only used in decentralized mode"),
    ({"gossip": {"rule": "vca"}}, "gossip: only used in decentralized mode"),
    ({"mode": "decentralized", "fraction_train": 0.5}, "fraction_train: not used in decentralized mode"),
    ({"mode": "decentralized", "fraction_evaluate": 0.5}, "fraction_evaluate: not used in decentralized mode"),
])
def test_sections_of_the_other_mode_are_errors(section: dict, message: str):
    with pytest.raises(ScenarioError, match=message):
        load_scenario(section)
