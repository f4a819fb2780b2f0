"""``early_exit`` (JEI-DNN): the cut into blocks, the exit distribution, the gates' targets and
loss, the compute costs, the depth budgets, and the two facts the issue names: a gate that never
exits early gives the plain network's prediction, and what a client with a budget sends is
exactly the part it holds. Through the engine: tests/e2e/test_early_exit_e2e.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedens.checks import load_scenario
from fedens.data import ArrayDataset
from fedens.learners.early_exit import (
    DepthDistribution,
    EarlyExitLearner,
    EarlyExitOptions,
    budgets_differ,
    client_depth,
    exit_distribution,
    gate_loss,
    gate_targets,
    split_blocks,
)
from fedens.models import build_model
from fedens.scenario import ScenarioError, TrainConfig


def factory(kind: str, options: dict, shape: tuple[int, ...], classes: int = 10):
    def model_fn(**_):
        return build_model(kind, options, shape, classes)

    model_fn.input_shape, model_fn.num_classes = shape, classes
    return model_fn


def learner(kind="cnn1d", options=None, shape=(1, 40), **learner_options) -> EarlyExitLearner:
    torch.manual_seed(0)
    return EarlyExitLearner(factory(kind, options or {}, shape), EarlyExitOptions(**learner_options),
                            TrainConfig(lr=0.05, local_epochs=1), torch.device("cpu"))


def data(shape=(1, 40), n=64, seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, n))


@pytest.mark.parametrize(("kind", "options", "shape", "blocks"), [
    ("mlp", {"hidden": [16, 16, 16]}, (64,), 3),
    ("cnn", {}, (1, 8, 8), 3),  # two conv blocks and the hidden linear layer
    ("cnn1d", {}, (1, 40), 3),
])
def test_blocks_then_head_compute_the_model(kind, options, shape, blocks):
    torch.manual_seed(0)
    model = build_model(kind, options, shape, 10)
    parts, head = split_blocks(model)
    assert len(parts) == blocks
    x = torch.randn(5, *shape)
    h = x
    for p in parts:
        h = p(h)
    assert torch.equal(head(h), model(x))


def test_a_model_with_one_block_or_no_sequence_is_refused():
    with pytest.raises(ValueError, match="single block"):
        learner("mlp", {"hidden": [16]}, (64,))
    with pytest.raises(ValueError, match="sequential"):
        split_blocks(nn.Linear(3, 2))


def test_a_gate_that_never_exits_early_gives_the_plain_network():
    ee = learner()
    torch.manual_seed(0)
    plain = build_model("cnn1d", {}, (1, 40), 10)  # the same draws: the same weights
    with torch.no_grad():
        for gate in ee.net.gates:
            gate.bias.fill_(-1e4)
    x = torch.from_numpy(data().x)
    assert torch.equal(ee.predict_proba(x)[0], torch.softmax(plain(x), -1))
    metrics = ee.extra_metrics(data())
    assert metrics["mean_exit"] == 3 and metrics["compute_fraction"] == 1.0 and metrics["exit3_share"] == 1.0
    # every exit computed, against the plain network: (7500 + 33750 + 16875) / 50625 MACs
    assert metrics["compute_vs_plain"] == pytest.approx(58125 / 50625)


def test_a_gate_that_always_fires_takes_the_first_exit():
    ee = learner()
    with torch.no_grad():
        ee.net.gates[0].bias.fill_(1e4)
    x = torch.from_numpy(data().x)
    first = torch.softmax(ee.net.exits(x, 1)[0], -1)
    assert torch.equal(ee.predict_proba(x)[0], first)
    assert ee.extra_metrics(data())["compute_fraction"] == pytest.approx(float(ee.net.costs[0]))


def test_exit_distribution_by_hand():
    g = torch.tensor([[0.5, 0.5], [0.2, 0.0], [1.0, 0.3]])
    q = exit_distribution(g)
    assert torch.allclose(q, torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.0, 0.8], [1.0, 0.0, 0.0]]))
    assert torch.equal(exit_distribution(torch.zeros(2, 0)), torch.ones(2, 1))  # one exit: always taken


def test_gate_targets_exit_at_and_after_the_best_level():
    # level losses CE_l + lambda c_l of 3 inputs over 3 exits: best exits 0, 2 and 1
    level = torch.tensor([[0.1, 0.5, 0.9], [2.0, 1.5, 1.2], [1.0, 0.4, 0.6]])
    assert gate_targets(level).tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


def test_gate_loss_weighs_the_ones_by_the_zero_to_one_ratio():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # one 1, three 0s: ratio 3
    bce = math.log(2)  # at logit 0 for either target
    assert float(gate_loss(logits, targets)) == pytest.approx((3 * bce + 3 * bce) / 4)
    assert float(gate_loss(logits, torch.zeros(2, 2))) == pytest.approx(bce)  # no ones: weight 1
    many_zeros = torch.zeros(1, 20)
    many_zeros[0, 0] = 1  # ratio 19, capped at 5
    assert float(gate_loss(torch.zeros(1, 20), many_zeros)) == pytest.approx((5 * bce + 19 * bce) / 20)


def test_costs_count_the_blocks_and_ims_up_to_each_exit():
    # cnn1d (1, 40), 3 conv layers of 25 channels, kernel 5, stride 2: lengths 20, 10, 5.
    # block MACs 20*25*5 = 2500, 10*25*25*5 = 31250, 5*25*25*5 = 15625; IMs on the flattened
    # features 500*10, 250*10; the head 125*10.
    ee = learner()
    cum = np.cumsum([2500 + 5000, 31250 + 2500, 15625 + 1250])
    np.testing.assert_allclose(ee.net.costs.numpy(), cum / cum[-1], rtol=1e-6)
    assert ee.net.plain_macs == 2500 + 31250 + 15625 + 1250


def test_depth_budgets():
    assert client_depth(None, 3, 5, 0) == 3 and client_depth(2, 3, 5, 0) == 2
    assert client_depth([1, 3, 2], 3, 2, 0) == 2
    dist = DepthDistribution(probs=[0.5, 0.0, 0.5])
    draws = [client_depth(dist, 3, pid, 7) for pid in range(200)]
    assert set(draws) == {1, 3} and 70 < draws.count(1) < 130
    assert draws == [client_depth(dist, 3, pid, 7) for pid in range(200)]  # seeded: the same every time
    assert draws != [client_depth(dist, 3, pid, 8) for pid in range(200)]
    assert not budgets_differ(None, 3, 4) and not budgets_differ(3, 3, 4) and budgets_differ([3, 2], 3, 2)
    assert budgets_differ(dist, 3, 4) and not budgets_differ(DepthDistribution(probs=[0, 0, 1]), 3, 4)
    with pytest.raises(ValueError):
        DepthDistribution(probs=[0.5, 0.6])


def test_a_client_trains_and_sends_only_what_it_holds():
    ee = learner(depth_budget=2)
    ee.assign_client(0, 0, 4)
    before = {k: v.clone() for k, v in ee.net.state_dict().items()}
    ee.fit(data(), torch.Generator().manual_seed(0), server_round=1)
    sent = ee.get_arrays()
    assert sorted({".".join(k.split(".")[:2]) for k in sent}) == ["blocks.0", "blocks.1", "gates.0", "heads.0", "heads.1"]
    after = ee.net.state_dict()
    for k in before:  # blocks.2, heads.2 and gates.1 are not trained; everything held is
        held = k.startswith(("blocks.0", "blocks.1", "heads.0", "heads.1", "gates.0"))
        assert torch.equal(before[k], after[k]) != held, k


def test_the_im_loss_follows_the_gates_after_warm_up():
    # Gates that never exit early: after warm-up the IM loss is the last exit's CE only, so the
    # first IM gets no gradient; during warm-up every IM is weighted equally.
    for server_round, first_im_moves in ((1, True), (2, False)):
        ee = learner(warmup_rounds=1)
        with torch.no_grad():
            for gate in ee.net.gates:
                gate.bias.fill_(-1e4)
        w = ee.net.heads[0][1].weight.detach().clone()
        ee.fit(data(), torch.Generator().manual_seed(0), server_round=server_round)
        assert (not torch.equal(w, ee.net.heads[0][1].weight)) == first_im_moves


def scenario(**learner_options):
    return {"data": {"dataset": "mnist1d", "num_clients": 3}, "model": {"kind": "cnn1d"},
            "learner": {"kind": "early_exit", **learner_options}, "strategy": {"name": "partial_avg"}}


@pytest.mark.parametrize(("change", "message"), [
    ({"learner": {"kind": "early_exit", "depth_budget": 2}, "strategy": {"name": "fedavg"}}, "strategy.name: 'fedavg'"),
    ({"learner": {"kind": "early_exit", "depth_budget": 4}}, "depth_budget: budgets must be in 1..3"),
    ({"learner": {"kind": "early_exit", "depth_budget": [1, 2]}}, "one budget per client (3)"),
    ({"learner": {"kind": "early_exit", "depth_budget": {"probs": [0.5, 0.5]}}}, "one probability per depth 1..3"),
    ({"model": {"kind": "mlp"}}, "at least two blocks"),
    ({"learner": {"kind": "early_exit", "depth_budget": {"probs": [0.5, 0.6, 0.1]}}}, "depth_budget: probs must be non-negative and sum to 1"),
])
def test_bad_scenarios_are_refused_at_load(change, message):
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_scenario({**scenario(), **change})


def test_full_depth_runs_under_any_strategy():
    assert load_scenario({**scenario(), "strategy": {"name": "fedavg"}}).learner.kind == "early_exit"
    assert load_scenario(scenario(depth_budget=3) | {"strategy": {"name": "fedavg"}})


def test_deepest_backbone_trains_the_blocks_from_the_deepest_exit_only():
    ee = learner(backbone="deepest")
    x = torch.from_numpy(data().x)
    logits = ee.net.exits(x, 3, detach=True)
    w = ee.net.blocks[0][0].weight
    assert torch.autograd.grad(logits[0].sum(), w, allow_unused=True)[0] is None  # IM 1 reads detached features
    assert torch.autograd.grad(logits[-1].sum(), w)[0].abs().sum() > 0
    # and the IMs still learn: after a step with gates that never fire, IM 1 has moved
    with torch.no_grad():
        for gate in ee.net.gates:
            gate.bias.fill_(-1e4)
    before = ee.net.heads[0][1].weight.detach().clone()
    ee.fit(data(), torch.Generator().manual_seed(0), server_round=2)
    assert torch.equal(before, ee.net.heads[0][1].weight)  # gated weight q_1 = 0: no gradient
    ee.fit(data(), torch.Generator().manual_seed(0), server_round=1)  # warm-up: uniform weights
    assert not torch.equal(before, ee.net.heads[0][1].weight)


def test_static_routing_is_the_upper_concave_hull_of_the_fixed_exits():
    from fedens.learners.early_exit import static_routing_accuracy

    costs = torch.tensor([0.2, 0.5, 1.0])
    # exit 2 below the chord from exit 1 to exit 3: the best mix skips it
    acc = torch.tensor([0.5, 0.55, 0.9])
    assert static_routing_accuracy(costs, acc, 0.6) == pytest.approx(0.5 + 0.4 * (0.6 - 0.2) / 0.8)
    acc = torch.tensor([0.5, 0.8, 0.9])  # concave: the neighbours' chord
    assert static_routing_accuracy(costs, acc, 0.6) == pytest.approx(0.8 + 0.1 * 0.1 / 0.5)
    assert static_routing_accuracy(costs, acc, 1.2) == pytest.approx(0.9)


def test_a_fixed_exit_costs_its_blocks_and_its_own_im():
    ee = learner()  # cnn1d: blocks 2500, 31250, 15625; IMs 5000, 2500; head 1250; every exit 58125
    np.testing.assert_allclose(ee.net.static_costs.numpy(),
                               np.array([2500 + 5000, 33750 + 2500, 49375 + 1250]) / 58125, rtol=1e-6)


# Hand-made exits for the confidence-threshold baseline: 3 exits costing c = 0.25, 0.5, 1, two
# classes, four inputs (labels 0, 1, 0, 1); p(class 0) per exit:
#   A: 0.95 0.97 0.99   B: 0.80 0.30 0.10   C: 0.60 0.70 0.90   D: 0.55 0.40 0.20
# max probabilities: exit 1 .95 .80 .60 .55, exit 2 .97 .70 .70 .60. Mean cost by tau:
#   tau <= .55: all at exit 1, 0.25;  tau = .6: D at exit 2, 1.25/4 = 0.3125;
#   tau = .7: C at exit 2, D at exit 3, 2/4 = 0.5;  tau = .8: C and D at exit 3, 2.5/4 = 0.625.
HAND_P0 = [[0.95, 0.80, 0.60, 0.55], [0.97, 0.30, 0.70, 0.40], [0.99, 0.10, 0.90, 0.20]]
HAND_LABELS = [0, 1, 0, 1]
HAND_COSTS = [0.25, 0.5, 1.0]


def hand_probs() -> torch.Tensor:
    p0 = torch.tensor(HAND_P0)
    return torch.stack([p0, 1 - p0], dim=-1)  # (3 exits, 4 inputs, 2 classes)


def test_threshold_exits_leave_at_the_first_confident_exit():
    from fedens.learners.early_exit import threshold_exits

    maxp = hand_probs().max(-1).values
    assert threshold_exits(maxp, 0.5).tolist() == [0, 0, 0, 0]
    assert threshold_exits(maxp, 0.6).tolist() == [0, 0, 0, 1]
    assert threshold_exits(maxp, float(torch.tensor(0.7))).tolist() == [0, 0, 1, 2]  # >= : exactly .7 leaves
    assert threshold_exits(maxp, 0.99).tolist() == [2, 2, 2, 2]  # the last exit always takes the rest


def test_the_threshold_is_matched_to_the_gated_compute():
    from fedens.learners.early_exit import matched_threshold

    maxp, costs = hand_probs().max(-1).values, torch.tensor(HAND_COSTS)
    tau, taken = matched_threshold(maxp, costs, 0.5)  # reached exactly at tau = .7
    assert tau == pytest.approx(0.7) and taken.tolist() == [0, 0, 1, 2]
    tau, taken = matched_threshold(maxp, costs, 0.4)  # .3125 (tau .6) is nearer than .5 (tau .7)
    assert tau == pytest.approx(0.6) and taken.tolist() == [0, 0, 0, 1]
    tau, _ = matched_threshold(maxp, costs, 0.45)  # .5 is nearer than .3125
    assert tau == pytest.approx(0.7)
    tau, _ = matched_threshold(maxp, costs, (0.3125 + 0.5) / 2)  # a tie: the cheaper
    assert tau == pytest.approx(0.6)
    tau, taken = matched_threshold(maxp, costs, 0.2)  # below every threshold's cost: all at exit 1
    assert tau == pytest.approx(0.55) and taken.tolist() == [0, 0, 0, 0]
    tau, taken = matched_threshold(maxp, costs, 1.0)  # nothing leaves early: tau above every max prob
    assert tau > float(maxp[:-1].max()) and taken.tolist() == [2, 2, 2, 2]
    tau, taken = matched_threshold(maxp[:1], costs[:1], 0.7)  # one exit: it takes everything
    assert taken.tolist() == [0, 0, 0, 0]


def test_extra_metrics_report_the_threshold_baseline_at_matched_compute():
    ee = learner()
    probs = hand_probs()
    gated = torch.tensor([0, 1, 0, 2])  # the gates: A and C at exit 1, B at 2, D at 3; all correct
    ee.exit_probs = lambda x: (probs[:, : len(x)], gated[: len(x)])
    ee.net.costs = torch.tensor(HAND_COSTS)
    ee.net.static_costs = torch.tensor(HAND_COSTS)
    evaluated = ArrayDataset(np.zeros((4, 1, 40), np.float32), np.array(HAND_LABELS))
    m = ee.extra_metrics(evaluated)
    assert m["compute_fraction"] == pytest.approx(0.5)  # the gated: (.25 + .5 + .25 + 1) / 4
    assert m["threshold_tau"] == pytest.approx(0.7) and m["threshold_compute_fraction"] == pytest.approx(0.5)
    # tau .7 sends A, B to exit 1 (B: .8 on class 0, wrong), C to exit 2, D to exit 3: 3 of 4
    assert m["threshold_accuracy"] == pytest.approx(0.75) and m["threshold_gain"] == pytest.approx(1.0 - 0.75)
    # confidences .95 (right), .8 (wrong), .7 (right), .8 (right): bins [.9, 1), [.8, .9), [.6, .7)
    assert m["threshold_ece"] == pytest.approx(0.05 / 4 + 0.3 * 2 / 4 + 0.3 / 4, abs=1e-6)
    assert m["threshold_nll"] == pytest.approx(-(math.log(0.95) + math.log(0.2) + math.log(0.7) + math.log(0.8)) / 4, rel=1e-6)
