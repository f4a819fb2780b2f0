"""The server side of decentralized (gossip) mode: a message router and a measuring instrument.

There is NO global model and NO server aggregation here. Every node keeps its own model in its
``context.state`` across rounds, and every mix of models is computed by the node itself
(``fedens.decentralized.node``, by the rule of ``gossip.rule``). Flower's simulation needs a
ServerApp to move messages between the simulated nodes; this one only delivers node i's model to
node i's neighbours along the round's graph (``fedens.decentralized.mailbox``), and, as the
instrument of the simulation, evaluates copies of the nodes' models on the global test set.

One round r (``run_gossip``):

1. ``graph_r = build_graph(topology, n, seed, r)``; ``active = mailbox.active(r)``.
2. For each active node (partition-id order) its inbox ``mailbox.collect(i, r)``: the newest
   model of each neighbour that arrived (asynchrony: drops, per-node delays). Collected ONCE
   and used for both messages below.
3. Swarm rule only: every active node with a non-empty inbox validates the models in its inbox
   (``query.validate``, the ClientApp handler the swarm strategy also uses; score = the rule's
   ``score``, accuracy or -NLL, on its own validation split, confidence = mean max-probability).
   Node j's gossip message then carries the scores of the validators in its closed neighbourhood {j} + senders(j), for the
   candidates in that neighbourhood. A validator scores the copy of a model that is in ITS inbox
   (with delays that can be an older version than the one node j holds).
4. One ``query.gossip`` message per active node with its inbox (``recv.<sender>``), its init
   (first message only) and the scores; the node mixes, trains, validates and replies with its
   trained model.
5. Each reply (partition-id order) is posted to the node's neighbours in ``graph_r``; the
   server keeps a copy (``latest``) to measure. Inactive or failed nodes keep their model.

Initial models. Built here so that round 0 can be evaluated: node i's from
``torch.manual_seed(derive_seed(seed, 0, i, 3))`` (independent inits, the uncorrelated setting
of the Vanishing Variance paper), or with ``gossip.same_init`` one model for all, seeded like
the federated initial model (``derive_seed(seed, 0)``). Its bytes are reported apart
(``bytes_init``) since a real node would initialise itself.

Rows written to ``metrics.jsonl`` (``docs/decentralized.md``):

- ``global-test`` / ``global-shift`` (evaluation rounds, round 0 too): every node's model on the
  global test / shifted set; ``accuracy``, ``nll``, ``ece``, ``brier`` are the MEAN over nodes
  (not a global model's metrics: there is none), with ``<m>_min``, ``<m>_max`` and the per-node
  list ``node_<m>`` (partition-id order).
- ``nodes-val`` (evaluation rounds >= 1): the same summary of each node's last own-validation
  metrics (from its latest reply; ``nodes`` lists which nodes have one).
- ``gossip`` (every round, round 0 too): ``consensus_distance``, ``layer_variance`` (name ->
  mean over nodes of the within-tensor variance), ``layer_variance_mean``, ``edges``,
  ``active``, the mailbox counters (cumulative: ``sent``, ``dropped``, ``delivered``,
  ``superseded``, ``pending``) and the rule's facts averaged over the round's replies
  (``rule_received``, ``rule_self_weight`` / ``rule_vca_scale`` / ``rule_swarm_*``).
- ``train`` (every round >= 1): example-weighted ``train_loss``, ``nodes_trained``,
  ``nodes_active``, ``failures``, ``bytes_sent`` / ``bytes_received`` through the router,
  ``bytes_p2p`` (model bytes delivered to nodes: the peer-to-peer traffic) and ``bytes_init``.

Determinism: every random draw is seeded from (seed, round, node); replies are handled in
partition-id order (``FedensGrid``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedens import calibration, stopping
from fedens.checkpoint import ResumeState, restore_rng, rng_states
from fedens.conformal import set_metrics
from fedens.checkpoint import save as save_checkpoint
from fedens.data import ArrayDataset, ServerData, load_server_data
from fedens.algorithms.swarm import validator_scores
from fedens.decentralized.mailbox import Asynchrony, Mailbox
from fedens.decentralized.node import INIT_KEY, RECV_PREFIX, SCORES_KEY, SIZES_KEY, pack_scores, sizes_record
from fedens.decentralized.rules import Swarm, consensus_distance, layer_variance, make_rule
from fedens.decentralized.topology import build_graph, neighbours, num_edges, plot_topology
from fedens.grid import Diverged, FedensGrid, exploded, report_failures
from fedens.learners import build_learner
from fedens.learners.base import Learner, predict_dataset
from fedens.metrics import METRIC_KEYS, classification_metrics, predictive, reliability_bins
from fedens.payload import from_record, record_nbytes, to_record
from fedens.results import RunRecorder
from fedens.scenario import Scenario
from fedens.sealed import seal
from fedens.seeding import derive_seed

log = logging.getLogger("fedens")

Arrays = dict[str, np.ndarray]
RoundCallback = Callable[[int, list[dict[str, Any]]], None]
_INIT_TAG, _MAILBOX_TAG, _EVAL_TAG = 3, 4, 2**32


def initial_models(scn: Scenario, data: ServerData) -> list[Arrays]:
    """Every node's initial arrays, in partition-id order (module docstring)."""
    def build(seed: int) -> Arrays:
        torch.manual_seed(seed)
        return build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu")).get_arrays()

    n = scn.data.num_clients
    if scn.gossip.same_init:
        shared = build(derive_seed(scn.seed, 0))
        return [{k: v.copy() for k, v in shared.items()} for _ in range(n)]
    return [build(derive_seed(scn.seed, 0, pid, _INIT_TAG)) for pid in range(n)]


def make_mailbox(scn: Scenario) -> Mailbox:
    g = scn.gossip
    return Mailbox(scn.data.num_clients, Asynchrony(g.active_fraction, g.drop_prob, g.delay, seed=derive_seed(scn.seed, _MAILBOX_TAG)))


def summarise(per_node: dict[str, list[float]]) -> dict[str, Any]:
    """``{m: [per node]}`` -> ``m`` (mean), ``m_min``, ``m_max``, ``node_m`` (the list)."""
    row: dict[str, Any] = {}
    for key, values in per_node.items():
        row[key] = float(np.mean(values))
        row[f"{key}_min"] = float(np.min(values))
        row[f"{key}_max"] = float(np.max(values))
        row[f"node_{key}"] = [float(v) for v in values]
    return row


def evaluate_nodes(
    learner: Learner, models: list[Arrays], ds: ArrayDataset, seed: int, server_round: int, tag: int,
    n_bins: int = 10, batch_size: int = 512,
) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Metrics of each node's model on ``ds``: ``{metric: [per node]}``, and the nodes'
    predictive probabilities ``(nodes, n, classes)`` (members mixed by the predictive weights)."""
    per_node: dict[str, list[float]] = {k: [] for k in METRIC_KEYS}
    labels = torch.from_numpy(ds.y)
    all_probs = []
    for pid, arrays in enumerate(models):
        learner.set_arrays(arrays)
        torch.manual_seed(derive_seed(seed, server_round, _EVAL_TAG + tag, pid))  # predictions may sample
        probs = predictive(predict_dataset(learner, ds, batch_size), learner.predictive_weights)  # (n, classes)
        metrics = classification_metrics(probs, labels, n_bins)
        for k in METRIC_KEYS:
            per_node[k].append(metrics[k])
        all_probs.append(probs)
    return per_node, torch.stack(all_probs)


def gossip_row(server_round: int, now: float, models: list[Arrays], adj: np.ndarray, active: int,
               mailbox: Mailbox, facts: list[dict[str, float]]) -> dict[str, Any]:
    """The ``gossip`` row: how far apart the nodes are, the graph, the mailbox and the rule."""
    lv = layer_variance(models)
    row: dict[str, Any] = {
        "round": server_round, "scope": "gossip", "time_s": now,
        "consensus_distance": consensus_distance(models),
        "layer_variance": lv,
        "layer_variance_mean": float(np.mean(list(lv.values()))) if lv else None,
        "edges": num_edges(adj), "active": active, **mailbox.stats(),
    }
    keys = sorted({k for f in facts for k in f})
    for k in keys:
        row[k] = float(np.mean([f[k] for f in facts if k in f]))
    return row


def collect_scores(fgrid: FedensGrid, node_of: dict[int, int], inbox: dict[int, dict[int, Any]],
                   score: str) -> dict[int, dict[int, list[tuple[float, float]]]]:
    """Swarm: each active node with a non-empty inbox scores the models in it on its own
    validation split. Returns validator -> candidate -> [(score, confidence)] per member, the
    score the rule asks for (``accuracy``, or ``nll`` negated: higher is better)."""
    messages = [
        Message(RecordDict({f"cand.{c}": rec for c, (rec, _) in box.items()}), message_type="query.validate",
                dst_node_id=node_of[v])
        for v, box in inbox.items() if box
    ]
    scores: dict[int, dict[int, list[tuple[float, float]]]] = {}
    for reply in fgrid.send_and_receive(messages, timeout=fgrid.timeout):
        if reply.has_error():
            continue
        v = fgrid.partition_of[reply.metadata.src_node_id]
        values = reply.content.metric_records["scores"]
        for c in inbox[v]:
            per_member = validator_scores(values, f"cand.{c}", score)
            if per_member is not None:
                scores.setdefault(v, {})[c] = per_member
    return scores


class GossipMeter:
    """The measuring instrument: evaluates the nodes' models and writes the rows of a round."""

    def __init__(self, scn: Scenario, data: ServerData, recorder: RunRecorder, on_round: RoundCallback | None) -> None:
        self.scn, self.data, self.recorder, self.on_round = scn, data, recorder, on_round
        torch.manual_seed(derive_seed(scn.seed, 0))
        self.learner = build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu"))
        self.rounds = scn.evaluation_rounds
        self.last_accuracy: list[float] | None = None

    def now(self) -> float:
        return round(time.time() - self.recorder.started, 3)

    def evaluation_rows(self, server_round: int, models: list[Arrays], val: dict[int, dict[str, float]],
                        final: bool = False) -> list[dict[str, Any]]:
        scn, now = self.scn, self.now()
        rows = []
        held_out = (("global-test", self.data.test), ("global-shift", self.data.shift)) if scn.evaluate.test_sets else ()
        for tag, (scope, ds) in enumerate(held_out):
            per_node, probs = evaluate_nodes(self.learner, models, ds, scn.seed, server_round, tag,
                                             scn.evaluate.n_bins, scn.evaluate.batch_size)
            per_node.update(self.scaled(probs, ds, val, final))
            rows.append({"round": server_round, "scope": scope, "time_s": now, **summarise(per_node),
                         "num_examples": len(ds), "nodes": len(models), **self.conformal(probs, ds, val)})
            if scope == "global-test":
                self.last_accuracy = per_node["accuracy"]
                if final:  # a random node's calibration: all nodes' predictions pooled
                    labels = torch.from_numpy(ds.y).repeat(len(models))
                    pooled = probs.reshape(-1, probs.shape[-1])
                    self.recorder.record_reliability(reliability_bins(pooled, labels, scn.evaluate.n_bins),
                                                     "every node's final model, test set, pooled")
        if val:
            rows.append(nodes_val_row(server_round, now, val))
        if scn.output.checkpoint:
            self.recorder.save_checkpoint(
                {f"node.{pid}.{name}": a for pid, m in enumerate(models) for name, a in m.items()}, server_round)
        return rows

    def scaled(self, probs: torch.Tensor, ds: ArrayDataset, val: dict[int, dict[str, float]], final: bool) -> dict[str, list[float]]:
        """``evaluate.temperature`` per node: node i's predictive ``probs[i]`` ``(n, classes)``
        scaled by the temperature it fitted on its own validation split (``val_temperature``
        of its reply); ``{temperature, nll_ts, ece_ts, brier_ts: [per node]}``. Empty when off
        at this round or before every node has replied once."""
        mode = self.scn.evaluate.temperature
        if mode == "off" or (mode == "final" and not final) or any("val_temperature" not in val.get(p, {}) for p in range(len(probs))):
            return {}
        labels = torch.from_numpy(ds.y)
        per_node = [calibration.scaled_metrics(probs[p], labels, float(val[p]["val_temperature"]), self.scn.evaluate.n_bins)
                    for p in range(len(probs))]
        return {k: [m[k] for m in per_node] for k in per_node[0]}

    def conformal(self, probs: torch.Tensor, ds: ArrayDataset, val: dict[int, dict[str, float]]) -> dict[str, Any]:
        """``evaluate.conformal`` per node: node i's sets use the threshold it calibrated on its
        own validation split (``val_conformal_quantile`` of its reply) with its own model's
        predictive ``probs[i]`` ``(n, classes)``; the row has the mean coverage and set size over
        nodes and the worst node's coverage. Empty before the nodes first replied (round 0)."""
        cfg = self.scn.evaluate.conformal
        if cfg is None or not val or any("val_conformal_quantile" not in val.get(p, {}) for p in range(len(probs))):
            return {}
        labels = torch.from_numpy(ds.y)
        sets = [set_metrics(probs[p], labels, float(val[p]["val_conformal_quantile"]), cfg.score) for p in range(len(probs))]
        coverage = [s["coverage"] for s in sets]
        return {"conformal_coverage": float(np.mean(coverage)), "conformal_size": float(np.mean([s["size"] for s in sets])),
                "conformal_worst_node_coverage": float(min(coverage))}

    def write(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        self.recorder.write_rows(rows)
        log.info("round %d: %s", server_round, [{k: v for k, v in r.items() if not k.startswith("node_")} for r in rows])
        if self.on_round is not None:
            self.on_round(server_round, rows)


def nodes_val_row(server_round: int, now: float, val: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The ``nodes-val`` row: the summary of each node's last own-validation metrics."""
    pids = sorted(val)
    keys = [k for k in METRIC_KEYS if all(f"val_{k}" in val[p] for p in pids)]
    per_node = {k: [val[p][f"val_{k}"] for p in pids] for k in keys}
    return {"round": server_round, "scope": "nodes-val", "time_s": now, **summarise(per_node), "nodes": pids}


def save_topology(path: Any, adj: np.ndarray, values: list[float] | None, title: str) -> None:
    from fedens import plots

    fig, _ = plot_topology(adj, None if values is None else np.asarray(values), title)
    plots.save(fig, path)


@dataclass
class RouterState:
    """What the router carries from round to round (and a checkpoint holds): the mailbox with
    the messages still in flight, the server's copies of every node's latest model, the initial
    models not delivered yet, and each node's last own-validation metrics."""

    mailbox: Mailbox
    latest: list[Arrays]
    init_records: dict[int, ArrayRecord]
    val: dict[int, dict[str, float]]


def run_gossip(scn: Scenario, grid: Grid, recorder: RunRecorder, on_round: RoundCallback | None = None,
               resume: ResumeState | None = None) -> None:
    """Run ``scn.rounds`` gossip rounds over the simulated nodes (module docstring); ``resume``
    continues from a checkpoint."""
    data = load_server_data(scn.data, scn.seed)
    if not scn.evaluate.test_sets:  # e.g. a tuning trial: any read of a held-out set fails the run
        data = seal(data)
    n = scn.data.num_clients
    meter = GossipMeter(scn, data, recorder, on_round)
    fgrid = FedensGrid(grid, scn.seed, meter.rounds, scn.round_timeout_s)
    node_of = {pid: node for node, pid in fgrid.discover(n).items()}
    rule = make_rule(scn.gossip.rule, scn.gossip.params, scn.base_dir)
    swarm = isinstance(rule, Swarm)
    adj0 = build_graph(scn.topology, n, scn.seed, 0)
    title = f"{scn.topology.kind}, {n} nodes, {num_edges(adj0)} edges" + (" (round 0; resampled every round)" if scn.topology.resample else "")

    if resume is not None:
        router: RouterState = resume.gossip
        first = resume.round + 1
        restore_rng(resume.rng)
        recorder.reliability = resume.reliability
    else:
        latest = initial_models(scn, data)  # the server's copies, for measurement only
        router = RouterState(make_mailbox(scn), latest, {pid: to_record(m) for pid, m in enumerate(latest)}, {})
        first = 1
        save_topology(recorder.dir / "topology.png", adj0, None, title)
        meter.write(0, meter.evaluation_rows(0, router.latest, router.val)
                    + [gossip_row(0, meter.now(), router.latest, adj0, 0, router.mailbox, [])])
    mailbox, latest, init_records, val = router.mailbox, router.latest, router.init_records, router.val
    for r in range(first, scn.rounds + 1):
        fgrid.begin_round(r)
        adj = build_graph(scn.topology, n, scn.seed, r)
        nbrs = neighbours(adj)
        active = mailbox.active(r)
        inbox = {pid: mailbox.collect(pid, r) for pid in active}  # sender -> (ArrayRecord, num train examples)
        scores = collect_scores(fgrid, node_of, inbox, rule.options.score) if swarm else {}

        messages, bytes_init, bytes_p2p = [], 0, 0
        for pid in active:
            content = RecordDict()
            for sender, (rec, _) in inbox[pid].items():
                content[f"{RECV_PREFIX}{sender}"] = rec
                bytes_p2p += record_nbytes(RecordDict({"m": rec}))
            content[SIZES_KEY] = sizes_record({s: size for s, (_, size) in inbox[pid].items()})
            if pid in init_records:
                content[INIT_KEY] = init_records[pid]
                bytes_init += record_nbytes(RecordDict({"m": init_records[pid]}))
            if swarm:
                closed = {pid, *inbox[pid]}
                content[SCORES_KEY] = pack_scores(
                    {v: {c: s for c, s in scores[v].items() if c in closed} for v in sorted(closed) if v in scores})
            messages.append(Message(content, message_type="query.gossip", dst_node_id=node_of[pid]))
        replies = fgrid.send_and_receive(messages, timeout=fgrid.timeout)

        facts: list[dict[str, float]] = []
        trained: list[tuple[int, float]] = []  # (num examples, train loss)
        errors = []
        for reply in replies:  # partition-id order; replies with non-finite arrays never get here
            if reply.has_error():
                errors.append(reply.error.reason)
                continue
            pid = fgrid.partition_of[reply.metadata.src_node_id]
            record = reply.content.array_records["arrays"]
            metrics = dict(reply.content.metric_records["metrics"])
            init_records.pop(pid, None)
            latest[pid] = from_record(record)
            mailbox.post(pid, nbrs[pid], r, (record, int(metrics["num-examples"])))
            val[pid] = {k: float(v) for k, v in metrics.items() if k.startswith("val_")}
            facts.append({k: float(v) for k, v in metrics.items() if k.startswith("rule_")})
            trained.append((int(metrics["num-examples"]), float(metrics.get("train_loss", np.nan))))
        traffic = fgrid.take_traffic()
        if active and not trained:
            if traffic.rejected:
                raise Diverged(f"diverged at round {r}: every active node's model has non-finite values")
            raise RuntimeError(f"round {r}: every node failed; first error: {errors[0] if errors else 'no reply'}")

        now = meter.now()
        total = sum(k for k, _ in trained)
        rows = [{
            "round": r, "scope": "train", "time_s": now,
            "train_loss": float(sum(k * loss for k, loss in trained) / total) if total else None,
            "nodes_trained": len(trained), "nodes_active": len(active), "failures": len(traffic.failures),
            "stragglers": traffic.stragglers, "rejected": traffic.rejected,
            "bytes_sent": traffic.bytes_sent, "bytes_received": traffic.bytes_received,
            "bytes_p2p": bytes_p2p, "bytes_init": bytes_init,
        }, gossip_row(r, now, latest, adj, len(active), mailbox, facts)]
        report_failures(r, traffic)
        # per node: one node whose loss exploded (e.g. it took a Byzantine neighbour's model) is
        # counted; the run has diverged when every node that trained has
        blown = [e for _, loss in trained if (e := exploded(r, loss, data.num_classes, scn.evaluate.diverge_loss))]
        rows[0]["nodes_exploded"] = len(blown)
        if trained and len(blown) == len(trained):
            recorder.write_rows(rows)  # the round's facts are kept
            raise Diverged(f"diverged at round {r}: every node's training loss exceeds evaluate.diverge_loss x log C "
                           f"(the mean is {rows[0]['train_loss']:.3g})")
        # ``stop:`` reads this round's nodes-val row, which the evaluation below writes
        recorder.stopped = stopping.check(scn.stop, [*recorder.rows, *rows, *([nodes_val_row(r, now, val)] if val and r in meter.rounds else [])],
                                          r, scn.rounds)
        stop = recorder.stopped is not None
        final = r == scn.rounds or stop
        if r in meter.rounds or stop:
            rows += meter.evaluation_rows(r, latest, val, final)
        meter.write(r, rows)
        if stop:  # ``stop:``: the nodes' validation metric has plateaued
            break
        every = scn.output.checkpoint_every
        if every and r % every == 0 and r < scn.rounds:
            save_checkpoint(recorder.dir, ResumeState(
                round=r, rows=len(recorder.rows), gossip=router, node_states=fgrid.node_states(), rng=rng_states(),
                reliability=recorder.reliability))

    save_topology(recorder.dir / "topology.png", adj0, meter.last_accuracy,
                  title + "\ncolour: final test accuracy of each node")
