"""snapshot: the cyclic cosine schedule by hand, slots filled exactly at cycle ends (and kept
right under FedAvg), predictions over the filled slots only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedens.data import ArrayDataset
from fedens.learners.snapshot import SnapshotLearner, SnapshotOptions, cyclic_lr, fge_lr
from fedens.models import build_model
from fedens.scenario import TrainConfig

SHAPE = (1, 8, 8)


def make(seed: int = 0, train: TrainConfig | None = None, **opts) -> SnapshotLearner:
    torch.manual_seed(seed)
    return SnapshotLearner(lambda **o: build_model("mlp", {"hidden": [16], **o}, SHAPE, 10), SnapshotOptions(**opts),
                           train or TrainConfig(lr=0.1), torch.device("cpu"))


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    g = np.random.default_rng(0)
    return ArrayDataset(g.normal(size=(24, *SHAPE)).astype(np.float32), g.integers(0, 10, 24))


def test_cyclic_lr_by_hand():
    lr0 = 0.1
    expected = [lr0, lr0 * (1 + math.cos(math.pi / 4)) / 2, lr0 / 2, lr0 * (1 + math.cos(3 * math.pi / 4)) / 2]
    assert [cyclic_lr(t, lr0, 4) for t in range(1, 9)] == pytest.approx(expected * 2)
    assert cyclic_lr(1, lr0, 1) == cyclic_lr(7, lr0, 1) == pytest.approx(lr0)


def test_local_training_uses_the_rounds_learning_rate(data):
    # one plain SGD step on the whole data: the weight change scales exactly with the learning rate
    train = TrainConfig(lr=0.1, batch_size=64, local_epochs=1)
    deltas = {}
    for r in (1, 3, 4):
        learner = make(train=train, cycle_rounds=4)
        before = learner.get_arrays()["1.weight"]
        metrics = learner.fit(data, torch.Generator().manual_seed(0), r)
        after = learner.get_arrays()["1.weight"]
        deltas[r] = np.abs(after - before).sum()
        assert metrics["lr"] == pytest.approx(cyclic_lr(r, 0.1, 4))
    assert deltas[3] / deltas[1] == pytest.approx(0.5, rel=1e-4)
    assert deltas[4] / deltas[1] == pytest.approx((1 + math.cos(3 * math.pi / 4)) / 2, rel=1e-4)


def fedavg(replies: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {k: sum(wi * r[k] for wi, r in zip(w, replies)).astype(np.float32) for k in replies[0]}


def filled(arrays: dict[str, np.ndarray], members: int) -> list[float]:
    return [float(arrays[f"member.{k}.filled"][0]) for k in range(members)]


def test_slots_fill_exactly_at_cycle_ends_and_survive_fedavg(data):
    """Two clients, FedAvg, cycle of 2 rounds, 2 slots, 6 rounds."""
    server = make(members=2, cycle_rounds=2)
    glob = server.get_arrays()
    expected_filled = {1: [0, 0], 2: [1, 0], 3: [1, 0], 4: [1, 1], 5: [1, 1], 6: [1, 1]}
    snaps: dict[int, dict[str, np.ndarray]] = {}
    for r in range(1, 7):
        replies = []
        for client in range(2):
            learner = make(seed=10 + client, members=2, cycle_rounds=2)  # fresh per message, like the ClientApp
            learner.set_arrays(glob)
            learner.fit(data, torch.Generator().manual_seed(100 * r + client), r)
            replies.append(learner.get_arrays())
        new = fedavg(replies, [24, 12])
        assert filled(new, 2) == expected_filled[r], r
        names = [n for n in new if not n.startswith("member.")]
        slot = (r // 2 - 1) % 2
        if r % 2 == 0:  # the snapshot is the new global model
            for n in names:
                np.testing.assert_allclose(new[f"member.{slot}.{n}"], new[n], atol=1e-6)
            snaps[r] = {n: new[n] for n in names}
        else:  # slots unchanged, current model moved on
            for k in range(2):
                for n in names:
                    np.testing.assert_allclose(new[f"member.{k}.{n}"], glob[f"member.{k}.{n}"], atol=1e-6)
            assert not np.allclose(new[names[0]], glob[names[0]])
        glob = new
    # round 6 ended cycle 3, which overwrote slot 0 (cycle 1's snapshot from round 2)
    assert np.allclose(glob[f"member.0.{names[0]}"], snaps[6][names[0]], atol=1e-6)
    assert not np.allclose(glob[f"member.0.{names[0]}"], snaps[2][names[0]])
    assert np.allclose(glob[f"member.1.{names[0]}"], snaps[4][names[0]], atol=1e-6)


def test_predictions_average_only_filled_slots():
    learner = make(members=3)
    nets = [make(seed=s) for s in (1, 2, 3)]
    arrays = nets[0].get_arrays()  # current model = net 0
    for k, net in enumerate(nets):  # slot k = net k
        arrays.update({f"member.{k}.{n}": v for n, v in net.model.state_dict().items()})
        arrays[f"member.{k}.filled"] = np.zeros(1, np.float32)
    x = torch.randn(6, *SHAPE)
    expect = [n.predict_proba(x)[0] for n in nets]

    learner.set_arrays(arrays)  # nothing filled: the current model
    assert torch.allclose(learner.predict_proba(x), expect[0].unsqueeze(0))
    arrays["member.1.filled"] = np.ones(1, np.float32)  # only slot 1 (net 1), not the current net 0
    learner.set_arrays(arrays)
    assert torch.allclose(learner.predict_proba(x), expect[1].unsqueeze(0))
    arrays["member.2.filled"] = np.full(1, 0.9999999, np.float32)  # as FedAvg may leave a 1
    learner.set_arrays(arrays)
    assert torch.allclose(learner.predict_proba(x), torch.stack([expect[1], expect[2]]))


def test_export_names():
    learner = make(members=2)
    plain = set(learner.model.state_dict())
    expected = plain | {f"member.{k}.{n}" for k in range(2) for n in plain} | {"member.0.filled", "member.1.filled"}
    arrays = learner.get_arrays()
    assert set(arrays) == expected and all(v.dtype == np.float32 for v in arrays.values())


def test_bad_options_and_rounds_are_rejected(data):
    for bad in ({"members": 0}, {"cycle_rounds": 0}, {"cycle": 4}):
        with pytest.raises(ValidationError):
            SnapshotOptions(**bad)
    with pytest.raises(ValueError):
        make().fit(data, torch.Generator(), 0)


def test_fge_lr_by_hand():
    # cycle of 4: s = 1/4, 1/2, 3/4, 1 -> 0.5 lr1 + 0.5 lr2, lr2 (the snapshot), 0.5 lr2 + 0.5 lr1, lr1
    lr1, lr2 = 0.1, 0.001
    assert [fge_lr(t, lr1, lr2, 4) for t in range(1, 9)] == pytest.approx([0.0505, 0.001, 0.0505, 0.1] * 2)


def test_fge_snapshots_at_the_cycles_middle_after_warmup(data):
    learner = make(members=2, cycle_rounds=4, schedule="fge", lr_low=0.01, warmup_rounds=2)
    plans = [learner.round_plan(r) for r in range(1, 11)]
    assert [p[0] for p in plans] == pytest.approx([0.1, 0.1, 0.0505, 0.001, 0.0505, 0.1, 0.0505, 0.001, 0.0505, 0.1])
    assert [r for r, p in zip(range(1, 11), plans) if p[2]] == [4, 8]  # rounds 2 + 2 and 2 + 4 + 2
    with pytest.raises(ValidationError, match="must be even"):
        SnapshotOptions(schedule="fge", cycle_rounds=3)


def test_star_cycles_restart_from_the_model_at_the_end_of_warmup(data):
    """Two clients, FedAvg, 1 warm-up round, cycles of 2: rounds 2 and 4 start from the centre."""
    opts = {"members": 2, "cycle_rounds": 2, "start": "star", "warmup_rounds": 1}
    glob = make(**opts).get_arrays()
    names = [n for n in glob if not n.startswith(("member.", "center."))]
    seen_start = {}
    for r in range(1, 5):
        replies = []
        for client in range(2):
            learner = make(seed=10 + client, **opts)
            learner.set_arrays(glob)
            lr, restart, _ = learner.round_plan(r)
            if restart:  # what the client trains from this round
                learner.model.load_state_dict(learner.center)
                seen_start[r] = {n: learner.get_arrays()[n] for n in names}
                learner.set_arrays(glob)  # fit applies the restart itself
            learner.fit(data, torch.Generator().manual_seed(100 * r + client), r)
            replies.append(learner.get_arrays())
        new = fedavg(replies, [24, 12])
        if r == 1:  # the centre is the global model at the end of warm-up
            centre = {n: new[n] for n in names}
            for n in names:
                np.testing.assert_allclose(new[f"center.{n}"], new[n], atol=1e-6)
        glob = new
    assert sorted(seen_start) == [2, 4]
    for r in (2, 4):  # both cycles began at the same point, not where the previous one ended
        for n in names:
            np.testing.assert_allclose(seen_start[r][n], centre[n], atol=1e-6)
    assert not np.allclose(glob["member.0." + names[0]], glob["member.1." + names[0]])  # two different snapshots
