"""``swarm``: swarm-consensus ensembling, the fedens specification (docs/methods.md#swarm-consensus).

Built on the public facts of PoSw: Raza, Tran, Koehl, Li, "Proof of Swarm Based Ensemble
Learning for Federated Learning Applications", ACM SAC 2023 (arXiv 2212.14050): a consensus over
the *outputs* of locally trained models, inspired by particle swarm optimisation, that weighs
every peer's decision and confidence, breaks ties, and converges in a few steps. The paper's
exact rule and code are not public: the rule below is OURS (fedens), not the paper's.

Every round, after local training:

1. Candidates. Each participating node i offers the models it trained. fedens clients train the
   scenario's learner, here a ``deep_ensemble`` of P members (P = ``learner.members``, the
   pool), so node i offers P candidates, (i, 0) .. (i, P-1): candidate rows are ordered by
   partition id, then member.
2. Scoring. One extra message round through the Flower grid: every participating node j gets a
   ``query.validate`` message with the arrays of every OTHER node's candidates (one ArrayRecord
   ``cand.<partition id>`` per node; FedensGrid counts its bytes in the round's ``bytes_sent``)
   and replies, per candidate, s_ij = accuracy (``score="accuracy"``) or −NLL (``score="nll"``)
   and c_ij = mean max-probability on its own validation split (``fedens.client_app``'s
   ``validate`` handler).
3. Consensus (``swarm_consensus``, a pure function). Node j's belief b_j over all candidates
   starts at softmax(s_·j / ``tau``) over the candidates it scored. For t = 1..``T``: the swarm's
   best G = the top-k set of B(i) = Σ_j c_ij b_ij / Σ_j c_ij (the confidence-weighted mean
   belief); every node moves b_j ← normalise(``omega`` b_j + ``phi1`` u(P_j) + ``phi2`` u(G)),
   P_j the top-k set of node j's own scores (its personal best) and u(S) uniform over S. Stop as
   soon as every node's top-k set is the same (checked before each move, so ``steps`` = moves
   made, 0..T; own candidates: below). Ties, in every ranking (top-k, own best): higher
   belief/score, then higher cumulative confidence Σ_j c_ij, then the lower row (lower
   partition id, then lower member index).
4. Ensemble. The agreed top-``k`` (if the nodes did not agree within T steps: the top-k of the
   final confidence-weighted mean belief) with weights ∝ that mean belief, normalised to 1.
5. Metrics. ``client_test_accuracy`` (each client's trained model on the server's test set, a
   measurement the consensus never sees), its max ``best_client_test_accuracy`` and
   ``best_member_test_accuracy``, ``swarm_steps``, ``swarm_agreement`` (share of nodes whose final top-k set is the
   ensemble's), ``swarm_weights``, the members' partition ids and member indices, and the slot
   counts, in the MetricRecord of ``aggregate_train`` (the run log), in ``self.history``, and in the round's
   ``train`` row of metrics.jsonl (returned with ``aggregate_train``'s metrics, ``with_facts``).

Decisions
- Own candidates: a node never scores its own models (the server does not send them to it, so
  they cost no bytes). They enter the node's softmax with belief 0 and carry confidence 0, so
  they never count in the swarm mean; a node's belief in its own model can only grow through
  the social term (when the swarm's best is its model), never through its own judgement. For
  the consensus test (top-k sets, agreement) a node ranks its own candidates by the swarm's
  mean belief instead: it defers to the swarm about them. Without that a node could place
  another node's model but never its own in its top-k, and most sets could never be agreed.
- Why the pulls are toward top-k SETS with φ2 > φ1 (a change of this specification, measured):
  the first version pulled each node to the one-hot of its own best and of the swarm's single
  best. Every b_j then tends to φ1/(1−ω)·e_own + φ2/(1−ω)·e_g while all other entries decay
  alike and keep their initial order, so places 2..k of each node's top-k set stay its own
  ranking forever and the sets agree only when the nodes' own rankings already do: in real runs
  agreement was 0 to 5% with all T steps used. Pulling toward sets moves every place; with
  φ2 > φ1 the swarm's set outweighs a node's own (members of G get at least φ2/k, others at
  most φ1/k in the limit), so the nodes settle within a few steps. On simulated scores
  (``bench/bench_swarm_consensus.py``: 10 nodes × 3 members, true accuracies in [0.6, 0.9],
  validator noise 0.03, 200 draws) the old rule settled in 1% of draws (agreement 0.26, regret
  0.0031 to the true top-3's mean accuracy), the new one with φ1 = 0.2, φ2 = 0.3 in 100%
  (1.3 steps, agreement 1.0, regret 0.0016); docs/methods.md#swarm-consensus has the table.
- The returned global model is a P-slot ``deep_ensemble``: the k agreed members fill the P
  slots (``member.{slot}.*``), member m taking n_m slots with n_m ≥ 1, Σ n_m = P, n_m ∝ weight
  by largest remainder (``allocate_slots``), and ``member_weights`` (``fedens.payload``) gives
  each slot its member's consensus weight split over the member's slots (``slot_weights``). The
  server's predictive (and every client's, for validation) is that weighted mixture, so the
  recorded global metrics are those of the agreed members weighted by their beliefs, for any
  P ≥ k. Clients fine-tune every slot and carry the weights unchanged.
- What clients train from next round: that same P-slot ensemble. Every node fine-tunes every
  slot on its own data (as a ``deep_ensemble`` client does), and the fine-tuned slots are the
  next round's candidates. Nothing is averaged: the global model is always a selection of
  models some node trained.
- Validators are the nodes that trained this round (each peer both proposes and validates). A
  failed validator reply leaves its column unscored; a node without validation data
  (``data.val_fraction: 0``) cannot score, so bind refuses it. With no scores at all (one
  node), the first k candidates by cumulative confidence then partition id are taken
  uniformly, with steps 0 and agreement 0.
- Validator predictions are seeded per candidate (``seeded_generator(seed, round, pid, 2)``),
  like federated evaluation.

Shapes: ``scores`` and ``confidence`` ``(N_cand, N_val)``, NaN where a validator gave no score.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedens.algorithms.swarm import SwarmOptions, allocate_slots, fill_slots, slot_weights, swarm_consensus, validator_scores
from fedens.learners.base import predict_dataset
from fedens.metrics import predictive
from fedens.payload import MEMBER_WEIGHTS, from_record, to_record
from fedens.strategies import STRATEGIES
from fedens.strategies.base import Arrays, FedensStrategy, ServerContext, split_members, with_facts

log = logging.getLogger("fedens")


# --------------------------------------------------------------------------- the strategy


class SwarmStrategy(FedensStrategy):
    """Swarm-consensus ensembling (fedens's rule after PoSw; see the module docstring)."""

    supported_learners: ClassVar[tuple[str, ...] | None] = ("deep_ensemble",)

    Options = SwarmOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grid: Grid | None = None
        self.timeout: float | None = None
        self.slots = 0  # P, the learner's members
        self.history: list[dict[str, Any]] = []  # per round: steps, agreement, weights, members

    @classmethod
    def check_scenario(cls, scn: Any) -> str | None:
        """No validation data to score on, or more agreed members than the pool has slots."""
        from fedens.learners import resolve_learner

        if scn.data.val_fraction <= 0:
            return "data.val_fraction: strategy swarm scores models on the clients' validation splits: set it > 0"
        options = resolve_learner(scn.learner.kind, scn.base_dir).Options(**scn.learner.options)
        k = scn.strategy.params.get("k", SwarmOptions.model_fields["k"].default)
        members = getattr(options, "members", None)
        if isinstance(k, int) and members is not None and k > members:
            return f"strategy.params.k: {k} agreed members need learner.members >= {k} (it is {members})"
        return None

    def bind(self, ctx: ServerContext) -> None:
        super().bind(ctx)
        if ctx.scenario.data.val_fraction <= 0:
            raise ValueError("strategy swarm scores models on the clients' validation splits: set data.val_fraction > 0")

    def begin(self, grid: Grid, arrays: ArrayRecord, timeout: float | None) -> None:
        members, shared = split_members(from_record(arrays))
        shared.pop(MEMBER_WEIGHTS, None)  # a resumed run's global carries its predictive weights
        if shared or not members:
            raise ValueError("strategy swarm needs a learner whose arrays are all member.{k}.* (deep_ensemble)")
        if self.options.k > len(members):
            raise ValueError(f"strategy swarm: k={self.options.k} exceeds the learner's {len(members)} members (set learner.members >= k)")
        self.grid, self.timeout, self.slots = grid, timeout, len(members)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        nodes = [m.metadata.src_node_id for m in valid]
        # partition ids from the FedensGrid mapping the base keeps (node ids under a plain grid)
        pids = [self._partition_of.get(n, n) for n in nodes]
        self.reply_partitions = pids
        records = [next(iter(m.content.array_records.values())) for m in valid]
        candidates: list[Arrays] = []  # row (pid, member), partition then member order
        labels: list[tuple[int, int]] = []
        for pid, record in zip(pids, records):
            members, _ = split_members(from_record(record))
            for m in sorted(members):
                candidates.append(members[m])
                labels.append((pid, m))

        scores, confidence = self.score(nodes, pids, records, labels)
        members, weights, steps, agreement = swarm_consensus(
            scores, confidence, **self.options.model_dump(exclude={"score"}))
        counts = allocate_slots(weights, self.slots)
        ensemble = fill_slots(candidates, members, counts)
        # the predictive weighs member j by its consensus weight, split over its slots
        ensemble[MEMBER_WEIGHTS] = slot_weights(weights, counts).astype(np.float32)

        facts = {
            "swarm_steps": int(steps),
            "swarm_agreement": float(agreement),
            "swarm_weights": [float(w) for w in weights],
            "swarm_member_partitions": [int(labels[i][0]) for i in members],
            "swarm_member_index": [int(labels[i][1]) for i in members],
            "swarm_slots": [int(n) for n in counts],
        }
        if self.ctx is not None and self.ctx.scenario.evaluate.test_sets:  # measurement only: does the ensemble beat every client's own model?
            facts.update(self.client_test_accuracy(records))
        self.history.append({"round": server_round, **facts})
        log.info("swarm round %d: %s", server_round, facts)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return to_record(ensemble), with_facts(metrics, facts)  # the facts go into the round's train row

    def client_test_accuracy(self, records: list[ArrayRecord]) -> dict[str, Any]:
        """Test accuracy of every client's trained model (its whole P-member ensemble) and of its
        best single member, on the server's test set: the single-client models the agreed
        ensemble is to beat (docs/methods.md#swarm-consensus). A measurement; the consensus never sees the test set."""
        learner, test = self.ctx.new_learner(), self.ctx.data.test
        labels = torch.from_numpy(test.y)
        client, member = [], []
        for record in records:
            learner.set_arrays(from_record(record))
            probs = predict_dataset(learner, test)  # (P, n, classes)
            client.append(float((predictive(probs, learner.predictive_weights).argmax(1) == labels).double().mean()))
            member.append(float((probs.argmax(2) == labels).double().mean(1).max()))
        return {"client_test_accuracy": client, "best_client_test_accuracy": max(client),
                "best_member_test_accuracy": max(member)}

    def score(
        self, nodes: list[int], pids: list[int], records: list[ArrayRecord], labels: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Send every node the other nodes' candidates (``query.validate``) and collect
        ``(scores, confidence)`` ``(N_cand, N_val)``, NaN where no score came back."""
        messages = []
        for j, node in enumerate(nodes):
            others = {f"cand.{pid}": rec for i, (pid, rec) in enumerate(zip(pids, records)) if i != j}
            messages.append(Message(RecordDict(others), message_type="query.validate", dst_node_id=node))
        replies = self.grid.send_and_receive(messages, timeout=self.timeout) if self.grid is not None else []

        row = {label: r for r, label in enumerate(labels)}
        column = {node: j for j, node in enumerate(nodes)}
        scores = np.full((len(labels), len(nodes)), np.nan)
        confidence = np.full_like(scores, np.nan)
        for reply in replies:
            if reply.has_error():
                log.warning("swarm: a validator failed: %s", reply.error.reason)
                continue
            j = column[reply.metadata.src_node_id]
            values = {key: v for rec in reply.content.metric_records.values() for key, v in rec.items()}
            for pid in pids:
                for m, (s_m, c_m) in enumerate(validator_scores(values, f"cand.{pid}", self.options.score) or []):
                    if (pid, m) in row:
                        scores[row[pid, m], j], confidence[row[pid, m], j] = s_m, c_m
        return scores, confidence


STRATEGIES.add("swarm", SwarmStrategy)
