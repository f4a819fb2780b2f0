"""Swarm-consensus ensembling: the consensus on hand-made score matrices, slot allocation, and
the strategy's parameters. The run through the engine is in tests/e2e/test_swarm_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.strategies import STRATEGIES
from fedens.algorithms.swarm import allocate_slots, rank, swarm_consensus
from fedens.strategies.swarm import SwarmStrategy

nan = np.nan
# 4 nodes, one candidate each (row i = node i's model), columns = validators; a node does not
# score itself. Everyone but node 2 finds candidate 2 best; node 2 finds candidate 0 best.
PEERS = np.array([
    [nan, 0.90, 0.80, 0.70],
    [0.60, nan, 0.50, 0.60],
    [0.90, 0.95, nan, 0.90],
    [0.50, 0.40, 0.30, nan],
])


def test_consensus_on_the_best_model_within_T_steps():
    members, weights, steps, agreement = swarm_consensus(PEERS, PEERS, k=1, T=10)
    assert members == [2] and weights.tolist() == [1.0]
    # node 2 starts on candidate 0, but ranks its own model by the swarm's belief: one move
    assert steps == 1 and agreement == 1.0


def test_agreed_top_k_is_ordered_and_weighted_by_belief():
    members, weights, steps, agreement = swarm_consensus(PEERS, PEERS, k=2)
    assert members == [2, 0] and steps <= 10 and agreement == 1.0
    assert weights.sum() == pytest.approx(1.0) and weights[0] > weights[1] > 0


def test_clear_ranking_gives_the_top_k_at_once():
    scores = np.tile(np.array([[0.9], [0.8], [0.7], [0.6], [0.5]]), (1, 4))  # 5 candidates, 4 validators
    members, weights, steps, agreement = swarm_consensus(scores, np.full_like(scores, 0.8), k=3)
    assert members == [0, 1, 2] and steps == 0 and agreement == 1.0
    assert weights.sum() == pytest.approx(1.0) and np.all(np.diff(weights) < 0)


def test_ties_go_to_higher_cumulative_confidence_then_lower_id():
    scores = np.full((3, 3), 0.7)  # three equally good candidates, three validators
    conf = np.full((3, 3), 0.8)
    assert swarm_consensus(scores, conf, k=1)[0] == [0]  # all equal: lowest id
    conf[2] = 0.9
    assert swarm_consensus(scores, conf, k=1)[0] == [2]  # more confident: wins
    conf[1, 0] = 0.95  # Σ_j c_1j = 2.55 < Σ_j c_2j = 2.7
    assert swarm_consensus(scores, conf, k=2)[0] == [2, 1]
    members, weights, *_ = swarm_consensus(scores, np.full((3, 3), 0.8), k=3)
    assert members == [0, 1, 2] and np.allclose(weights, 1 / 3)


def test_rank_breaks_ties_by_confidence_then_index():
    assert rank(np.array([0.5, 0.9, 0.9, 0.9]), np.array([0.0, 1.0, 2.0, 2.0])).tolist() == [2, 3, 1, 0]


def test_disagreement_runs_T_steps_and_falls_back_to_the_swarm_mean():
    # two validators who each prefer a different candidate and never yield (φ1 > φ2)
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    conf = np.array([[0.7, 0.7], [0.8, 0.8]])
    members, weights, steps, agreement = swarm_consensus(scores, conf, k=1, T=7, phi1=0.3, phi2=0.2)
    assert steps == 7 and agreement == 0.5
    assert members == [1] and weights.tolist() == [1.0]  # equal mean belief: the more confident one


def test_social_weight_above_cognitive_reaches_consensus():
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    conf = np.array([[0.7, 0.7], [0.8, 0.8]])
    members, _, steps, agreement = swarm_consensus(scores, conf, k=1, T=10, phi1=0.1, phi2=0.4)
    assert members == [1] and 1 <= steps <= 10 and agreement == 1.0


# Everyone finds candidate 0 best; validators 0, 1 rank candidate 1 second, validators 2, 3
# candidate 2. The swarm's mean belief ties 1 and 2, and the tie goes to the lower row, 1.
SPLIT_SECOND = np.array([[0.9] * 4, [0.8, 0.8, 0.7, 0.7], [0.7, 0.7, 0.8, 0.8]])


def test_the_pull_to_the_swarms_top_k_settles_a_split_second_place():
    # Validators 2, 3 start at softmax([9, 7, 8]) = (0.665, 0.090, 0.245). Step 1: 0.5 b + phi1/2 on
    # their own top-2 {0, 2} + phi2/2 on the swarm's {0, 1}: b1 = 0.045 + 0.15 = 0.195 < b2 =
    # 0.1225 + 0.1 = 0.2225. Step 2: b1 = 0.0975 + 0.15 = 0.2475 > b2 = 0.111 + 0.1 = 0.211: agreed.
    members, weights, steps, agreement = swarm_consensus(SPLIT_SECOND, np.full((3, 4), 0.8), k=2)
    assert (members, steps, agreement) == ([0, 1], 2, 1.0)
    assert weights[0] > weights[1] > 0 and weights.sum() == pytest.approx(1.0)


def test_a_pull_to_the_own_top_k_above_the_swarms_never_settles_it():
    # phi1 > phi2: validators 2, 3 add 0.15 to candidate 2 and 0.1 to candidate 1 every step, so
    # their second place never moves (the old rule's behaviour in every real run: all T steps)
    members, _, steps, agreement = swarm_consensus(SPLIT_SECOND, np.full((3, 4), 0.8), k=2, T=10, phi1=0.3, phi2=0.2)
    assert (steps, agreement) == (10, 0.5) and members == [0, 1]


def test_nll_scores_and_unscored_validators():
    neg_nll = -np.array([[0.3, 0.4, nan], [0.2, 0.5, nan], [1.5, 1.2, nan]])  # validator 2 failed
    members, weights, steps, agreement = swarm_consensus(neg_nll, np.full((3, 3), 0.9), k=2)
    assert members == [1, 0] and agreement == 1.0 and weights.sum() == pytest.approx(1.0)


def test_no_scores_at_all_takes_the_first_k_uniformly():
    members, weights, steps, agreement = swarm_consensus(np.full((4, 1), nan), np.full((4, 1), nan), k=3)
    assert members == [0, 1, 2] and np.allclose(weights, 1 / 3) and steps == 0 and agreement == 0.0


def test_k_larger_than_candidates_takes_them_all():
    members, weights, *_ = swarm_consensus(PEERS, PEERS, k=9)
    assert sorted(members) == [0, 1, 2, 3] and weights.sum() == pytest.approx(1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        swarm_consensus(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        swarm_consensus(PEERS, PEERS, tau=0)
    with pytest.raises(ValueError):
        swarm_consensus(PEERS, PEERS, k=0)


@pytest.mark.parametrize(("weights", "slots", "expected"), [
    ([1 / 3] * 3, 3, [1, 1, 1]),
    ([0.6, 0.3, 0.1], 3, [1, 1, 1]),  # every member keeps a slot
    ([0.6, 0.3, 0.1], 6, [3, 2, 1]),
    ([0.5, 0.25, 0.25], 8, [4, 2, 2]),
    ([0.9, 0.1], 3, [2, 1]),
    ([0.5, 0.5], 3, [2, 1]),  # a tie: the better-ranked member gets the extra slot
])
def test_allocate_slots(weights, slots, expected):
    counts = allocate_slots(np.array(weights), slots)
    assert counts.tolist() == expected and counts.sum() == slots


def test_registered_with_defaults_and_checked_params():
    assert STRATEGIES.get("swarm") is SwarmStrategy
    assert SwarmStrategy.supported_learners == ("deep_ensemble",)
    s = SwarmStrategy()
    o = s.options
    assert (o.k, o.T, o.tau, o.omega, o.phi1, o.phi2, o.score) == (3, 10, 0.1, 0.5, 0.2, 0.3, "accuracy")
    with pytest.raises(ValueError, match="score: should be 'accuracy' or 'nll'"):
        SwarmStrategy(score="f1")
    with pytest.raises(ValueError, match="omega: should be greater than or equal to 0"):
        SwarmStrategy(omega=-1)
    with pytest.raises(ValueError, match="their sum must be > 0"):
        SwarmStrategy(omega=0, phi1=0, phi2=0)


def test_k_above_the_pool_and_no_validation_data_are_invalid_scenarios():
    from fedens.checks import load_scenario
    from fedens.scenario import ScenarioError

    base = {"learner": {"kind": "deep_ensemble", "members": 2}, "strategy": {"name": "swarm", "params": {"k": 3}}}
    with pytest.raises(ScenarioError, match="strategy.params.k: 3 agreed members need learner.members >= 3"):
        load_scenario(base)
    with pytest.raises(ScenarioError, match="data.val_fraction"):
        load_scenario({**base, "learner": {"kind": "deep_ensemble", "members": 3}, "data": {"val_fraction": 0.0}})
    assert load_scenario({**base, "learner": {"kind": "deep_ensemble", "members": 3}})


def test_slot_weights_split_a_members_weight_over_its_slots():
    from fedens.algorithms.swarm import slot_weights

    # members with weights 0.6, 0.4 in 3 slots (2 + 1): 0.3, 0.3, 0.4
    np.testing.assert_allclose(slot_weights(np.array([0.6, 0.4]), np.array([2, 1])), [0.3, 0.3, 0.4])
