"""Gossip node rules and measures (fedens/decentralized/rules.py, docs/methods.md#gossip-vca and #gossip-swarm)."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.decentralized.rules import (
    GOSSIP_RULES,
    Average,
    GossipContext,
    Swarm,
    VarianceCorrected,
    consensus_distance,
    layer_variance,
    make_rule,
    mix,
)
from fedens.algorithms.swarm import allocate_slots, swarm_consensus
from fedens.algorithms.vca import tensor_var

CTX = GossipContext(node=0)


def arr(*values: float, dtype: type = np.float64) -> np.ndarray:
    return np.array(values, dtype=dtype)


def model(w: np.ndarray, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {"w": w, **extra}


# --------------------------------------------------------------------------- registry / options


def test_registry_and_options():
    assert GOSSIP_RULES.names() == ["average", "swarm", "vca"]
    assert make_rule("vca", {"c": 0.3}) == VarianceCorrected(c=0.3)
    with pytest.raises(ValueError, match="conservative: renamed to c"):
        make_rule("vca", {"conservative": 0.3})
    with pytest.raises(ValueError, match="gossip rule 'average'"):
        make_rule("average", {"alpha": 1})
    with pytest.raises(ValueError, match="target"):
        VarianceCorrected(target="mine")
    with pytest.raises(ValueError, match="self_weight"):
        Average(self_weight=1.5)
    with pytest.raises(ValueError, match="^k: should be greater than or equal to 1$"):
        Swarm(k=0)
    with pytest.raises(ValueError, match="^gossip rule 'swarm': score: should be 'accuracy' or 'nll'$"):
        make_rule("swarm", {"score": "f1"})


# --------------------------------------------------------------------------- average


def test_average_self_weight_half_two_neighbours():
    own = model(arr(1, 2, 3, 4), b=arr(1, dtype=np.float32), step=np.array(7))
    r = {1: model(arr(3, 3, 3, 3), b=arr(3, dtype=np.float32), step=np.array(1)),
         2: model(arr(5, 1, 5, 1), b=arr(7, dtype=np.float32), step=np.array(2))}
    out, facts = Average(self_weight=0.5)(own, r, CTX)
    np.testing.assert_allclose(out["w"], [0.5 + 2, 1 + 1, 1.5 + 2, 2 + 1])  # 0.5 own + 0.25 (r1 + r2)
    np.testing.assert_allclose(out["b"], [0.5 + 2.5])
    assert out["b"].dtype == np.float32
    assert out["step"] == 7  # non-float: the node's own value
    assert facts == {"received": 2.0, "self_weight": 0.5}


def bn_node(w: float, mean: tuple[float, float], var: tuple[float, float], tracked: int) -> dict[str, np.ndarray]:
    return {"0.weight": arr(w, w), "1.running_mean": arr(*mean, dtype=np.float32),
            "1.running_var": arr(*var, dtype=np.float32), "1.num_batches_tracked": np.array(tracked, dtype=np.int64)}


def test_average_keeps_each_nodes_own_norm_statistics_unless_mix_norm_stats():
    # The authors' plain averager (DFL_torch's StandardModelAverager skips running_mean,
    # running_var, num_batches_tracked) and fedens' vca rule keep the node's own statistics.
    own = bn_node(2.0, (2.0, 4.0), (1.0, 1.0), 5)
    r = {1: bn_node(6.0, (6.0, 0.0), (3.0, 5.0), 9), 2: bn_node(10.0, (2.0, 8.0), (1.0, 9.0), 3)}
    kept, facts = Average(self_weight=0.5)(own, r, CTX)
    np.testing.assert_allclose(kept["0.weight"], [0.5 * 2 + 0.25 * (6 + 10)] * 2)  # 5: weights are mixed
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        np.testing.assert_array_equal(kept[name], own[name])
        assert kept[name].dtype == own[name].dtype
    assert facts == {"received": 2.0, "self_weight": 0.5}
    mixed, _ = make_rule("average", {"self_weight": 0.5, "mix_norm_stats": True})(own, r, CTX)
    np.testing.assert_allclose(mixed["0.weight"], kept["0.weight"])
    # 0.5 [2, 4] + 0.25 ([6, 0] + [2, 8]) = [3, 4];  0.5 [1, 1] + 0.25 ([3, 5] + [1, 9]) = [1.5, 4]
    np.testing.assert_allclose(mixed["1.running_mean"], [3.0, 4.0])
    np.testing.assert_allclose(mixed["1.running_var"], [1.5, 4.0])
    assert mixed["1.running_var"].dtype == np.float32
    assert mixed["1.num_batches_tracked"] == 5  # an integer: the node's own either way
    kept_again, _ = Average(self_weight=0.5)(own, r, CTX)
    kept_again["1.running_mean"][0] = -1.0  # a copy, not the node's own array
    assert own["1.running_mean"][0] == 2.0


def test_average_default_weight_is_uniform_over_closed_neighbourhood():
    own = model(arr(4, 0))
    r = {3: model(arr(0, 4)), 5: model(arr(8, 8)), 9: model(arr(0, 0))}
    out, facts = Average()(own, r, CTX)
    np.testing.assert_allclose(out["w"], [3, 3])
    assert facts["self_weight"] == 0.25


def test_average_weighted_by_examples():
    own = model(arr(0.0, 0.0))
    r = {1: model(arr(4.0, 8.0)), 2: model(arr(8.0, 0.0))}
    ctx = GossipContext(node=0, num_examples={0: 2, 1: 1, 2: 1})
    out, _ = Average(weighted=True)(own, r, ctx)
    np.testing.assert_allclose(out["w"], [3, 2])  # weights 1/2, 1/4, 1/4
    out, _ = Average(self_weight=0.5, weighted=True)(own, r, GossipContext(node=0, num_examples={0: 1, 1: 3, 2: 1}))
    np.testing.assert_allclose(out["w"], [0.5 * (0.75 * 4 + 0.25 * 8), 0.5 * 0.75 * 8])
    with pytest.raises(ValueError, match="num_examples"):
        Average(weighted=True)(own, r, CTX)


@pytest.mark.parametrize("rule", [Average(), Average(self_weight=0.2), VarianceCorrected(), Swarm()])
def test_no_neighbours_returns_own_copy(rule):
    own = {"member.0.w": arr(1, 2, 3, dtype=np.float32), "member.1.w": arr(4, 5, 6, dtype=np.float32)}
    scores = {1: {0: [(0.9, 0.9), (0.8, 0.8)]}}
    out, facts = rule(own, {}, GossipContext(node=0, scores=scores))
    assert facts["received"] == 0
    assert out.keys() == own.keys()
    for name in own:
        np.testing.assert_array_equal(out[name], own[name])
        assert out[name] is not own[name] and not np.shares_memory(out[name], own[name])


# --------------------------------------------------------------------------- vca


def three_nodes() -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    own = model(arr(1, -1, 1, -1))  # Var 4/3
    r = {1: model(arr(2, -2, 2, -2)),  # Var 16/3
         2: model(arr(0, 0, 0, 3))}  # Var 9/4
    return own, r


def test_vca_targets_documented_values():
    own, r = three_nodes()
    others = (16 / 3 + 9 / 4) / 2
    received = [r[1]["w"], r[2]["w"]]
    assert VarianceCorrected().target_var(own["w"], received) == pytest.approx(others)
    assert VarianceCorrected(target="self").target_var(own["w"], received) == pytest.approx(4 / 3)
    cons = VarianceCorrected(target="conservative", c=0.3).target_var(own["w"], received)
    assert cons == pytest.approx(0.3 * 4 / 3 + 0.7 * others)


@pytest.mark.parametrize("target,expected", [("others", (16 / 3 + 9 / 4) / 2), ("self", 4 / 3),
                                             ("conservative", 0.5 * 4 / 3 + 0.5 * (16 / 3 + 9 / 4) / 2)])
def test_vca_eps0_reaches_target_and_keeps_layer_mean(target, expected):
    own, r = three_nodes()
    out, facts = VarianceCorrected(target=target, eps=0.0)(own, r, CTX)
    mixed = 0.5 * own["w"] + 0.25 * (r[1]["w"] + r[2]["w"])  # c own + (1 - c) mean_j W_j
    assert tensor_var(out["w"]) == pytest.approx(expected, abs=1e-6)
    assert out["w"].mean() == pytest.approx(mixed.mean(), abs=1e-12)
    assert facts["vca_scale"] == pytest.approx(np.sqrt(expected / tensor_var(mixed)))


def test_vca_default_eps_formula():
    own, r = three_nodes()
    out, _ = VarianceCorrected()(own, r, CTX)
    mixed = 0.5 * own["w"] + 0.25 * (r[1]["w"] + r[2]["w"])
    tgt, var, eps = (16 / 3 + 9 / 4) / 2, np.var(mixed, ddof=1), 1e-4
    expected = (mixed - mixed.mean()) * np.sqrt((tgt + eps) / (var + eps)) + mixed.mean()
    np.testing.assert_allclose(out["w"], expected, rtol=1e-12)
    assert out["w"].mean() == pytest.approx(mixed.mean(), abs=1e-12)


def test_vca_conservative_weight():
    own, r = three_nodes()
    out, _ = VarianceCorrected(c=0.0, eps=0.0)(own, r, CTX)  # pure average of the received
    mixed = (r[1]["w"] + r[2]["w"]) / 2
    assert out["w"].mean() == pytest.approx(mixed.mean())
    np.testing.assert_allclose(out["w"] - out["w"].mean(), (mixed - mixed.mean()) * np.sqrt(
        (16 / 3 + 9 / 4) / 2 / tensor_var(mixed)))


def test_vca_identical_models_unchanged():
    rng = np.random.default_rng(0)
    own = {"w": rng.normal(0, 0.3, (8, 4)).astype(np.float32), "b": rng.normal(0, 0.1, 8).astype(np.float32)}
    r = {j: {k: v.copy() for k, v in own.items()} for j in (1, 2, 3)}
    out, facts = VarianceCorrected()(own, r, CTX)
    for name in own:
        np.testing.assert_allclose(out[name], own[name], rtol=1e-6, atol=1e-7)
        assert out[name].dtype == np.float32
    assert facts["vca_scale"] == pytest.approx(1.0)


def test_vca_keeps_each_nodes_own_norm_statistics_and_mixes_flags_plainly():
    rng = np.random.default_rng(1)

    def node(i: int) -> dict[str, np.ndarray]:
        return {
            "0.weight": rng.normal(0, 1 + i, (6, 5)).astype(np.float32),
            "1.running_mean": rng.normal(0, 1, 6).astype(np.float32),
            "1.running_var": rng.uniform(0.5, 2, 6).astype(np.float32),
            "1.num_batches_tracked": np.array(10 + i, dtype=np.int64),
            "2.scale": rng.normal(0, 1, (1,)).astype(np.float32),
            "member.0.filled": np.array([1.0, 0.0], dtype=np.float32),
            "mask": rng.integers(0, 2, (3, 3)).astype(np.int32),
        }

    own, r = node(0), {1: node(1), 2: node(2)}
    out, _ = VarianceCorrected()(own, r, CTX)
    plain = mix([own, r[1], r[2]], [0.5, 0.25, 0.25])
    for name in ("2.scale", "member.0.filled"):
        np.testing.assert_array_equal(out[name], plain[name])
    # the authors' code: BatchNorm statistics are neither averaged nor rescaled, the node keeps its own
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        np.testing.assert_array_equal(out[name], own[name])
        assert out[name].dtype == own[name].dtype
    assert not np.allclose(own["1.running_mean"], plain["1.running_mean"])  # so keeping them is visible
    np.testing.assert_array_equal(out["mask"], own["mask"])
    assert not np.allclose(out["0.weight"], plain["0.weight"])  # the weight was corrected


def test_vca_restores_vanishing_variance_of_four_uncorrelated_layers():
    # docs/methods.md#vca: 4 uncorrelated 32x16 layers, plain average ~0.029 vs members' ~0.111 (1/4), corrected back.
    rng = np.random.default_rng(0)
    nodes = [{"w": rng.normal(0, 1 / 3, (32, 16)).astype(np.float32)} for _ in range(4)]
    own, r = nodes[0], {j: nodes[j] for j in (1, 2, 3)}
    members = np.mean([tensor_var(n["w"]) for n in nodes])
    plain, _ = Average()(own, r, CTX)  # the mean of the 4
    assert tensor_var(plain["w"]) / members == pytest.approx(0.25, abs=0.03)
    out, _ = VarianceCorrected(c=0.25)(own, r, CTX)  # the same mix, corrected
    np.testing.assert_allclose(out["w"].mean(), plain["w"].mean(), atol=1e-6)
    tgt, var, eps = np.mean([tensor_var(r[j]["w"]) for j in r]), tensor_var(plain["w"]), 1e-4
    assert tensor_var(out["w"]) == pytest.approx((tgt + eps) * var / (var + eps), rel=1e-5)  # ~tgt, eps aside
    assert tensor_var(out["w"]) / members == pytest.approx(1.0, abs=0.03)


def test_posterior_natural_parameter_mix():
    own = {"mean.w": arr(1.0, 2.0), "precision.w": arr(1.0, 3.0)}
    r = {1: {"mean.w": arr(3.0, 4.0), "precision.w": arr(3.0, 1.0)}}
    out, _ = Average(self_weight=0.5)(own, r, CTX)
    np.testing.assert_allclose(out["precision.w"], [2.0, 2.0])  # 0.5 (1 + 3), 0.5 (3 + 1)
    np.testing.assert_allclose(out["mean.w"], [2.5, 2.5])  # 0.5 (1*1 + 3*3) / 2, 0.5 (3*2 + 1*4) / 2

    own = {"mean.w": arr(1.0, 2.0, 4.0), "precision.w": arr(1.0, 3.0, 1.0)}
    r = {1: {"mean.w": arr(3.0, 4.0, 0.0), "precision.w": arr(3.0, 1.0, 1.0)}}
    out, _ = VarianceCorrected(eps=0.0)(own, r, CTX)  # c = 0.5: the same mix, then the mean corrected
    np.testing.assert_allclose(out["precision.w"], [2.0, 2.0, 1.0])  # precisions: the plain mix
    assert out["mean.w"].mean() == pytest.approx((2.5 + 2.5 + 2.0) / 3)  # natural-parameter mix (2.5, 2.5, 2)
    assert tensor_var(out["mean.w"]) == pytest.approx(tensor_var(r[1]["mean.w"]))  # target: others' means

    own = {"mean.w": arr(0.0, 0.0, 4.0), "precision.w": arr(1.0, 2.0, 1.0)}
    r = {1: {"mean.w": arr(6.0, 3.0, 0.0), "precision.w": arr(2.0, 1.0, 3.0)},
         2: {"mean.w": arr(3.0, 3.0, 3.0), "precision.w": arr(3.0, 3.0, 0.0)}}
    out, _ = Average()(own, r, CTX)
    np.testing.assert_allclose(out["precision.w"], [2.0, 2.0, 4 / 3])
    np.testing.assert_allclose(out["mean.w"], [(12 + 9) / 6, (3 + 9) / 6, 4 / 4])


def test_vca_ensemble_member_wise():
    rng = np.random.default_rng(2)

    def node() -> dict[str, np.ndarray]:
        return {"member.0.w": rng.normal(0, 0.1, (16, 8)), "member.1.w": rng.normal(0, 3.0, (16, 8))}

    own, r = node(), {1: node(), 2: node(), 3: node()}
    out, _ = VarianceCorrected(eps=0.0)(own, r, CTX)
    for m in (0, 1):
        name = f"member.{m}.w"
        assert tensor_var(out[name]) == pytest.approx(np.mean([tensor_var(r[j][name]) for j in r]), rel=1e-9)
    assert tensor_var(out["member.0.w"]) < 0.1 < tensor_var(out["member.1.w"])


# --------------------------------------------------------------------------- swarm


def ensemble(node: int, members: int = 2, **shared: np.ndarray) -> dict[str, np.ndarray]:
    """Member m of ``node`` filled with 10 * node + m, so the output tells where a slot came from."""
    out = {f"member.{m}.w": np.full((2, 3), 10.0 * node + m, dtype=np.float32) for m in range(members)}
    return {**out, **shared}


# validator -> candidate node -> per member (score, confidence); node 0 is the receiver.
SCORES = {
    0: {0: [(9.0, 1.0), (9.0, 1.0)],  # its own candidates: ignored
        1: [(0.9, 0.9), (0.2, 0.6)], 2: [(0.3, 0.6), (0.8, 0.9)]},
    1: {0: [(0.1, 0.5), (0.2, 0.5)], 2: [(0.3, 0.6), (0.8, 0.9)]},
    2: {0: [(0.1, 0.5), (0.2, 0.5)], 1: [(0.9, 0.9), (0.2, 0.6)]},
    7: {0: [(1.0, 1.0), (1.0, 1.0)]},  # not in the neighbourhood: ignored
}
LABELS = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_swarm_matrices_by_hand():
    s, c = Swarm.matrices(LABELS, [0, 1, 2], SCORES)
    nan = np.nan
    np.testing.assert_array_equal(s, [[nan, 0.1, 0.1], [nan, 0.2, 0.2], [0.9, nan, 0.9], [0.2, nan, 0.2],
                                      [0.3, 0.3, nan], [0.8, 0.8, nan]])
    np.testing.assert_array_equal(c, [[nan, 0.5, 0.5], [nan, 0.5, 0.5], [0.9, nan, 0.9], [0.6, nan, 0.6],
                                      [0.6, 0.6, nan], [0.9, 0.9, nan]])


def test_swarm_chooses_agreed_members_and_fills_slots():
    own, r = ensemble(0), {1: ensemble(1), 2: ensemble(2)}
    out, facts = Swarm(k=2)(own, r, GossipContext(node=0, scores=SCORES))
    assert sorted(out) == ["member.0.w", "member.1.w", "member_weights"]
    assert out["member.0.w"].dtype == np.float32 and out["member_weights"].sum() == pytest.approx(1.0)
    assert {float(out["member.0.w"][0, 0]), float(out["member.1.w"][0, 0])} == {10.0, 21.0}
    assert out["member.0.w"][0, 0] == 10.0  # (1, 0): best by every validator that saw it
    assert facts["swarm_agreement"] == 1.0 and facts["swarm_steps"] == 0 and facts["swarm_own_share"] == 0.0


def test_swarm_slots_follow_allocate_slots():
    own, r = ensemble(0, 4), {1: ensemble(1, 4), 2: ensemble(2, 4)}
    scores = {v: {c: list(per) + [(0.0, 0.5), (0.0, 0.5)] for c, per in cands.items()} for v, cands in SCORES.items()}
    ctx = GossipContext(node=0, scores=scores)
    labels = [(n, m) for n in (0, 1, 2) for m in range(4)]
    s, c = Swarm.matrices(labels, [0, 1, 2], scores)
    members, weights, _, _ = swarm_consensus(s, c, k=3)
    counts = allocate_slots(weights, 4)
    expected = [10 * labels[i][0] + labels[i][1] for i, n in zip(members, counts) for _ in range(n)]
    out, _ = Swarm(k=3)(own, r, ctx)
    assert sorted(out) == [f"member.{m}.w" for m in range(4)] + ["member_weights"]
    assert [float(out[f"member.{m}.w"][0, 0]) for m in range(4)] == expected
    # each slot carries its member's consensus weight split over the member's slots
    np.testing.assert_allclose(out["member_weights"], np.repeat(weights / counts, counts), rtol=1e-6)
    # and a node's next step recomputes them rather than mixing the received ones
    again, _ = Swarm(k=3)(out, {j: {**m, "member_weights": np.full(4, 0.25, np.float32)} for j, m in r.items()}, ctx)
    assert "member_weights" in again and again["member_weights"].sum() == pytest.approx(1.0)
    assert expected[0] == 10 and counts.sum() == 4 and len(members) == 3


def test_swarm_without_scores_keeps_own():
    own, r = ensemble(0), {1: ensemble(1), 2: ensemble(2)}
    for scores in ({}, {7: {1: [(1.0, 1.0), (1.0, 1.0)]}}, {1: {1: [(1.0, 1.0)]}}, {0: {5: [(1.0, 1.0)]}}):
        out, facts = Swarm()(own, r, GossipContext(node=0, scores=scores))
        for name in own:
            np.testing.assert_array_equal(out[name], own[name])
        assert facts["swarm_steps"] == 0 and facts["swarm_own_share"] == 1.0


def test_swarm_plain_model_takes_the_best_and_shared_tensors_average_chosen_nodes():
    own, r = {"w": arr(0.0, 0.0)}, {1: {"w": arr(1.0, 1.0)}, 2: {"w": arr(2.0, 2.0)}}
    scores = {0: {1: [(0.4, 0.9)], 2: [(0.9, 0.9)]}, 1: {2: [(0.8, 0.9)]}, 2: {1: [(0.7, 0.9)]}}
    out, facts = Swarm()(own, r, GossipContext(node=0, scores=scores))
    np.testing.assert_array_equal(out["w"], [2.0, 2.0])
    assert facts["swarm_own_share"] == 0.0

    own = ensemble(0, shared=arr(0.0, 0.0))
    r = {1: ensemble(1, shared=arr(4.0, 4.0)), 2: ensemble(2, shared=arr(8.0, 8.0))}
    scores = {0: {1: [(0.9, 0.9), (0.8, 0.9)], 2: [(0.1, 0.9), (0.1, 0.9)]},
              2: {1: [(0.9, 0.9), (0.8, 0.9)], 0: [(0.1, 0.9), (0.1, 0.9)]}}
    out, _ = Swarm(k=2)(own, r, GossipContext(node=0, scores=scores))
    assert [out["member.0.w"][0, 0], out["member.1.w"][0, 0]] == [10.0, 11.0]
    np.testing.assert_array_equal(out["shared"], [4.0, 4.0])  # only node 1's members were chosen


# --------------------------------------------------------------------------- measures


def test_consensus_distance():
    m = {"w": arr(1.0, 2.0), "precision.w": arr(1.0, 1.0), "n": np.array(3)}
    assert consensus_distance([m, {k: v.copy() for k, v in m.items()}, m]) == 0.0
    a = {"mean.w": arr(0.0, 0.0), "precision.w": arr(1.0, 1.0), "n": np.array(3)}
    b = {"mean.w": arr(3.0, 4.0), "precision.w": arr(9.0, 9.0), "n": np.array(5)}
    assert consensus_distance([a, b]) == pytest.approx(2.5)  # both 2.5 from the mean (1.5, 2)
    c = {"x": arr(0.0), "y": arr(0.0, 0.0)}
    d = {"x": arr(2.0), "y": arr(0.0, 0.0)}
    e = {"x": arr(4.0), "y": arr(0.0, 3.0)}  # mean (2, 0, 1): distances sqrt 5, 1, sqrt 8
    assert consensus_distance([c, d, e]) == pytest.approx((np.sqrt(5) + 1 + np.sqrt(8)) / 3)


def test_layer_variance():
    a = {"w": arr(1.0, -1.0, 1.0, -1.0), "b": arr(5.0), "1.running_var": arr(1.0, 9.0),
         "precision.w": arr(1.0, 7.0), "mean.w": arr(0.0, 2.0)}
    b = {"w": arr(2.0, -2.0, 2.0, -2.0), "b": arr(1.0), "1.running_var": arr(3.0, 9.0),
         "precision.w": arr(1.0, 9.0), "mean.w": arr(0.0, 4.0)}
    assert layer_variance([a, b]) == pytest.approx({"w": (4 / 3 + 16 / 3) / 2, "mean.w": (2.0 + 8.0) / 2})


def test_a_dataclass_plugin_rule_still_works():
    # Written before rules had Options: its fields are validated into the parent's Options.
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Half(Average):
        self_weight: float = 0.5

    assert Half().options.self_weight == 0.5 and Half(self_weight=0.25).weights(0, [1], GossipContext(0)).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="^self_weight: should be less than or equal to 1$"):
        Half(self_weight=2.0)


def test_measures_ignore_predictive_weights_that_only_some_nodes_carry():
    # after a swarm round an inactive node still has no member_weights: the measures must not care
    a = {"member.0.w": np.array([0.0, 2.0]), "member_weights": np.array([1.0], np.float32)}
    b = {"member.0.w": np.array([2.0, 4.0])}
    assert consensus_distance([a, b]) == pytest.approx(np.sqrt(2.0))  # ||(1, 1)|| for each node
    assert set(layer_variance([a, b])) == {"member.0.w"}
