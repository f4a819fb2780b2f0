"""One gossip node's step: mix what the neighbours sent by the node's rule, train, validate.

This is the node's own computation in decentralized mode; the server never aggregates. The
ClientApp's ``query.gossip`` handler (``fedens.client_app``) unpacks the message, calls
``gossip_step`` and keeps the trained arrays in ``context.state`` (``STATE_KEY``) for the next
round. Without Flower, tests call ``gossip_step`` directly with a learner and data.

Message format (built by ``fedens.decentralized.engine``, read by ``unpack_gossip``):

- ``recv.<sender>`` ArrayRecord: the newest model of each neighbour that reached the node;
- ``init`` ArrayRecord: the node's initial model, only in the first message it gets (a real
  node would initialise itself; the simulator does it on the server so that round 0 can be
  evaluated and ``same_init`` is possible);
- ``gossip.sizes`` ConfigRecord ``{"<sender>": N}``: each sender's number of training examples,
  travelling with its model (used by ``average(weighted=True)`` only);
- ``gossip.scores`` MetricRecord (swarm rule): ``"<validator>.<candidate>.score"`` and
  ``"<validator>.<candidate>.confidence"``, one value per member of the candidate, from the
  validators of the node's closed neighbourhood.

Seeds: training draws from ``seeded_generator(seed, round, node)`` (as a federated client does),
own-validation predictions from ``(seed, round, node, 1)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedens.calibration import fit_centralised
from fedens.conformal import split_quantile, true_scores
from fedens.data import ArrayDataset
from fedens.decentralized.rules import GossipContext, GossipRule, Scores
from fedens.learners.base import Learner, predict_dataset
from fedens.metrics import classification_metrics, predictive
from fedens.payload import from_record
from fedens.scenario import ConformalConfig
from fedens.seeding import derive_seed, seed_torch, seeded_generator

Arrays = dict[str, np.ndarray]

STATE_KEY = "fedens.gossip.model"  # the node's own model in context.state
INIT_KEY = "init"
RECV_PREFIX = "recv."
SIZES_KEY = "gossip.sizes"
SCORES_KEY = "gossip.scores"
VAL_KEYS = ("accuracy", "nll", "ece", "brier")


@dataclass(frozen=True)
class GossipInput:
    """What a node gets in one round: its init (first message only), the neighbours' models
    (sender -> arrays, by sender id), their training-set sizes and the swarm scores."""

    init: Arrays | None
    received: dict[int, Arrays]
    sizes: dict[int, int]
    scores: Scores


def unpack_gossip(content: RecordDict) -> GossipInput:
    """Parse a ``query.gossip`` message's content (module docstring)."""
    init = content.array_records.get(INIT_KEY)
    received = {int(k[len(RECV_PREFIX):]): from_record(rec) for k, rec in content.array_records.items()
                if k.startswith(RECV_PREFIX)}
    sizes_rec = content.config_records.get(SIZES_KEY, {})
    sizes = {int(k): int(v) for k, v in sizes_rec.items()}
    scores: dict[int, dict[int, list[tuple[float, float]]]] = {}
    rec = content.metric_records.get(SCORES_KEY, {})
    for key, values in rec.items():
        v, c, kind = key.split(".")
        if kind != "score":
            continue
        conf = rec[f"{v}.{c}.confidence"]
        scores.setdefault(int(v), {})[int(c)] = [(float(s), float(q)) for s, q in zip(values, conf)]
    return GossipInput(from_record(init) if init is not None else None, dict(sorted(received.items())), sizes, scores)


def pack_scores(scores: Mapping[int, Mapping[int, list[tuple[float, float]]]]) -> MetricRecord:
    """Inverse of the scores part of ``unpack_gossip``: validator -> candidate -> [(s, c)]."""
    out: dict[str, list[float]] = {}
    for v, per_cand in scores.items():
        for c, pairs in per_cand.items():
            out[f"{v}.{c}.score"] = [float(s) for s, _ in pairs]
            out[f"{v}.{c}.confidence"] = [float(q) for _, q in pairs]
    return MetricRecord(out)


def own_model(state: RecordDict, init: Arrays | None) -> Arrays:
    """The node's current model: its stored state, else the init it was sent."""
    rec = state.array_records.get(STATE_KEY)
    if rec is not None:
        return from_record(rec)
    if init is None:
        raise RuntimeError("gossip node has no model: no state and no init in the message")
    return init


def evaluate_own(learner: Learner, data: ArrayDataset, seed: int, server_round: int, node: int,
                 n_bins: int = 10, batch_size: int = 512, conformal: ConformalConfig | None = None,
                 temperature: bool = False) -> dict[str, float]:
    """``val_<metric>`` of the learner on the node's own validation split (empty if it has none);
    with ``conformal``, also ``val_conformal_quantile``: the split-conformal threshold of the
    node's own model calibrated on that split (+inf sent as 1e300); with ``temperature``, also
    ``val_temperature``: the temperature of the node's predictive fitted on that split
    (``fedens.calibration``), which the server applies to the node's test predictions."""
    if len(data) == 0:
        return {}
    seed_torch(derive_seed(seed, server_round, node, 1))  # predictions may sample
    probs = predictive(predict_dataset(learner, data, batch_size), learner.predictive_weights)  # (n, classes)
    labels = torch.from_numpy(data.y)
    metrics = classification_metrics(probs, labels, n_bins)
    out = {f"val_{k}": metrics[k] for k in VAL_KEYS}
    if conformal is not None:
        q = split_quantile(true_scores(probs, labels, conformal.score), conformal.alpha)
        out["val_conformal_quantile"] = min(q, 1e300)
    if temperature:
        out["val_temperature"] = fit_centralised(probs, labels)
    return out


def gossip_step(
    learner: Learner,
    rule: GossipRule,
    own: Arrays,
    received: Mapping[int, Arrays],
    ctx: GossipContext,
    train: ArrayDataset,
    val: ArrayDataset,
    seed: int,
    server_round: int,
    n_bins: int = 10,
    batch_size: int = 512,
    conformal: ConformalConfig | None = None,
    temperature: bool = False,
) -> tuple[Arrays, dict[str, float]]:
    """One round of node ``ctx.node``: ``rule(own, received)``, then local training on ``train``
    (seeded by ``(seed, round, node)``), then validation on ``val``.

    Returns the trained arrays and the reply's metrics: ``num-examples``, the learner's
    training metrics (``train_loss``), ``val_accuracy`` / ``val_nll`` / ``val_ece`` /
    ``val_brier`` and the rule's facts prefixed ``rule_`` (e.g. ``rule_received``)."""
    mixed, facts = rule(own, received, ctx)
    learner.set_arrays(mixed)
    metrics = learner.fit(train, seeded_generator(seed, server_round, ctx.node), server_round)
    trained = learner.get_arrays()
    metrics.update(evaluate_own(learner, val, seed, server_round, ctx.node, n_bins, batch_size, conformal, temperature))
    metrics.update({f"rule_{k}": float(v) for k, v in facts.items()})
    metrics["num-examples"] = len(train)
    return trained, {k: float(v) if not isinstance(v, int) else v for k, v in metrics.items()}


def store(state: RecordDict, record: ArrayRecord) -> None:
    """Keep the node's trained model for the next round."""
    state[STATE_KEY] = record


def sizes_record(sizes: Mapping[int, int]) -> ConfigRecord:
    return ConfigRecord({str(k): int(v) for k, v in sizes.items()})
