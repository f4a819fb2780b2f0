"""The Flower ClientApp: train and evaluate handlers that delegate to the scenario's learner.

Every message loads the arrays the server sent into the learner and works on the partition this
node simulates (``context.node_config["partition-id"]``). Randomness is seeded from
``(seed, round, partition id)``, so results do not depend on which actor runs which client.

Built once per actor and run, not per message:
- the data: the driver's build, installed from Ray's object store (``data_source``) or, without
  one, built by the actor itself; cached per process (``fedens.data``);
- the learner, when its class declares ``reusable`` (``set_arrays`` restores its whole state,
  so a reused learner computes exactly what a fresh one would; every built-in learner is, and a
  test checks each); a plug-in learner that does not say so is built for every message;
- the gossip rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedens.algorithms import objective_from_config
from fedens.calibration import log_predictive, temperature_sums
from fedens.conformal import split_quantile, true_scores
from fedens.data import ClientData, build_federated_data, load_server_data
from fedens.data.federated import FederatedData, install, is_installed
from fedens.faults import Faults, InjectedCrash, corrupt, draw, flip_labels
from fedens.learners import build_learner
from fedens.learners.base import Learner, is_reusable, predict_dataset
from fedens.metrics import classification_metrics, ensemble_metrics, predictive
from fedens.payload import ROUND_KEY, from_record, records_of, single_arrayrecord, to_record
from fedens.scenario import Scenario
from fedens.seeding import derive_seed, seed_torch, seeded_generator

OBJECTIVE_STATE = "fedens.objective"  # the client's objective state (duals, ...) in context.state


CLIENT_EXTRA_METRICS = ("mean_exit", "compute_fraction")  # learners' own metrics that every client reports


def select_device(num_gpus: float) -> torch.device:
    """CUDA when the client was given a GPU share and one is present, else CPU."""
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def message_round(msg: Message) -> int:
    """The server round a message belongs to (stamped by the fedens grid)."""
    rec = msg.content.get(ROUND_KEY)
    return int(rec["round"]) if isinstance(rec, ConfigRecord) and "round" in rec else 0


def make_client_app(scn: Scenario, data_source: Callable[[], FederatedData] | None = None) -> ClientApp:
    """A ClientApp for ``scn``; the scenario travels to the Ray actors inside the app.

    data_source : gives the driver's data build (e.g. from Ray's object store); called once
        per actor process, and not at all where the build is already installed."""
    app = ClientApp()
    reusable: dict[str, Any] = {}  # this actor's learner and rule for the run (see module docstring)

    def device() -> torch.device:  # the actor's, not the driver's (on a cluster only the nodes may have GPUs)
        if "device" not in reusable:
            reusable["device"] = select_device(scn.resources.num_gpus)
        return reusable["device"]

    def prepare(context: Context) -> int:
        # One actor per CPU share: keep torch from oversubscribing the cores.
        torch.set_num_threads(max(1, int(scn.resources.num_cpus)))
        if data_source is not None and not is_installed(scn.data, scn.seed):
            install(scn.data, scn.seed, data_source())
        return int(context.node_config["partition-id"])

    def client_data(pid: int) -> ClientData:
        if "data" not in reusable:  # looked up once: the cache key is the config's canonical JSON
            reusable["data"] = build_federated_data(scn.data, scn.seed)
        clients = reusable["data"].clients
        if not 0 <= pid < len(clients):
            raise ValueError(f"partition id {pid} out of range 0..{len(clients) - 1}")
        return clients[pid]

    def new_learner(pid: int) -> Learner:
        """This actor's learner (built once if reusable), assigned to client ``pid``."""
        if "learner" in reusable:
            learner = reusable["learner"]
            learner.objective = None
        else:
            facts = load_server_data(scn.data, scn.seed)
            learner = build_learner(scn, facts.input_shape, facts.num_classes, device())
            if is_reusable(type(learner)):
                reusable["learner"] = learner
        learner.assign_client(pid, scn.seed, scn.data.num_clients)
        return learner

    def setup(msg: Message, context: Context) -> tuple[int, ClientData, Learner, dict[str, np.ndarray]]:
        pid = prepare(context)
        data = client_data(pid)  # installed or built once per actor
        learner = new_learner(pid)
        arrays = from_record(single_arrayrecord(msg.content))
        learner.set_arrays(arrays)
        return pid, data, learner, arrays

    def faults_of(pid: int, server_round: int) -> Faults:
        f = draw(scn.faults, scn.seed, server_round, pid, scn.data.num_clients)
        if f.crash:
            raise InjectedCrash(f"injected crash (faults.crash_prob), round {server_round}")
        return f

    def poisoned(data: ClientData, f: Faults) -> ClientData:
        if f.byzantine != "label_flip":
            return data
        return ClientData(train=flip_labels(data.train, load_server_data(scn.data, scn.seed).num_classes), val=data.val)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid, client_data, learner, global_arrays = setup(msg, context)
        server_round = message_round(msg)
        f = faults_of(pid, server_round)
        data = poisoned(client_data, f).train
        generator = seeded_generator(scn.seed, server_round, pid)
        # A strategy's client-side term (prox, duals, ...) with this client's persistent state.
        config = records_of(msg.content, ConfigRecord).get("config", {})
        state = records_of(context.state, ArrayRecord).get(OBJECTIVE_STATE)
        learner.objective = objective_from_config(
            config, from_record(state) if state is not None else {}, global_arrays, device(), len(data), server_round
        )
        t0 = time.perf_counter()
        metrics = learner.fit(data, generator, server_round)
        trained = learner.get_arrays()
        if learner.objective is not None:
            learner.objective.measure(learner, data)
            context.state[OBJECTIVE_STATE] = to_record(learner.objective.after_fit(trained))
            trained.update(learner.objective.reply_arrays())
        metrics.update({"num-examples": len(data), "train_time_s": time.perf_counter() - t0})
        if f.any:  # injected faults change only what is sent: the client's own state stays honest
            trained = corrupt(trained, global_arrays, f, metrics)
        content = RecordDict({"arrays": to_record(trained), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid, client_data, learner, _ = setup(msg, context)
        data = client_data.val
        seed_torch(derive_seed(scn.seed, message_round(msg), pid, 1))  # predictions may sample
        member_probs = predict_dataset(learner, data, scn.evaluate.batch_size)  # (members, n, classes)
        labels = torch.from_numpy(data.y)
        weights = learner.predictive_weights
        metrics = classification_metrics(predictive(member_probs, weights), labels, scn.evaluate.n_bins)
        metrics.update(ensemble_metrics(member_probs, labels, weights))
        if len(data):  # only the keys every client has: Flower's aggregation needs the same keys in every reply
            extra = learner.extra_metrics(data, scn.evaluate.n_bins, scn.evaluate.batch_size)
            metrics.update({k: v for k, v in extra.items() if k in CLIENT_EXTRA_METRICS})
        metrics["num-examples"] = len(data)
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        pid = prepare(context)
        data = client_data(pid)
        facts = {"partition-id": pid, "num-train": len(data.train), "num-val": len(data.val)}
        return Message(content=RecordDict({"info": ConfigRecord(facts)}), reply_to=msg)

    @app.query("validate")
    def validate(msg: Message, context: Context) -> Message:
        """Score other nodes' models on this node's validation split (the swarm strategy's
        scoring step). The message holds one ArrayRecord per candidate (e.g. ``cand.3``); the
        reply lists, per member of each candidate, ``<key>.accuracy``, ``<key>.nll`` and
        ``<key>.confidence`` (mean max-probability). An empty split scores nothing."""
        pid = prepare(context)
        data = client_data(pid).val
        learner = new_learner(pid)
        labels = torch.from_numpy(data.y).long()
        scores: dict[str, list[float]] = {}
        for key, record in msg.content.array_records.items() if len(data) else []:
            learner.set_arrays(from_record(record))
            seed_torch(derive_seed(scn.seed, message_round(msg), pid, 2))  # predictions may sample
            probs = predict_dataset(learner, data, scn.evaluate.batch_size)  # (members, n, classes)
            p_true = probs.gather(2, labels.expand(probs.shape[0], -1).unsqueeze(2)).squeeze(2)  # (members, n)
            scores[f"{key}.accuracy"] = (probs.argmax(2) == labels).double().mean(1).tolist()
            scores[f"{key}.nll"] = (-torch.log(p_true.double().clamp_min(1e-12))).mean(1).tolist()
            scores[f"{key}.confidence"] = probs.max(2).values.double().mean(1).tolist()
        return Message(content=RecordDict({"scores": MetricRecord(scores)}), reply_to=msg)

    @app.query("conformal")
    def conformal(msg: Message, context: Context) -> Message:
        """Calibration scores of the global predictive (the message's arrays) on this client's
        validation split: the true labels' non-conformity scores (``scores``, for the pooled
        threshold and for measuring this client's coverage), their number ``n`` and the local
        split-conformal quantile (``local_quantile``, all that the quantile-of-quantiles
        method uses). ``evaluate.conformal`` gives alpha and the score."""
        cfg = scn.evaluate.conformal
        pid, client_data, learner, _ = setup(msg, context)
        data = client_data.val
        seed_torch(derive_seed(scn.seed, message_round(msg), pid, 3))  # predictions may sample
        if len(data) == 0 or cfg is None:
            return Message(content=RecordDict({"conformal": MetricRecord({"n": 0})}), reply_to=msg)
        probs = predictive(predict_dataset(learner, data, scn.evaluate.batch_size), learner.predictive_weights)
        scores = true_scores(probs, torch.from_numpy(data.y), cfg.score)
        reply = {"n": len(data), "scores": [float(s) for s in scores],
                 "local_quantile": min(split_quantile(scores, cfg.alpha), 1e300)}  # +inf is not a metric: 1e300
        return Message(content=RecordDict({"conformal": MetricRecord(reply)}), reply_to=msg)

    @app.query("temperature")
    def temperature(msg: Message, context: Context) -> Message:
        """Temperature scaling's sums of the global predictive on this client's validation split
        (``fedens.calibration.temperature_sums``): for each asked ``beta = 1/T``, the summed NLL
        ``loss`` and its first two derivatives ``grad``, ``hess``, and the number of points
        ``n``. Seeded per (seed, round, client), so every call of one fit sees the same
        predictions (MC dropout, posterior samples)."""
        pid, client_data, learner, _ = setup(msg, context)
        data = client_data.val
        betas = np.asarray(msg.content["temperature"]["betas"], dtype=np.float64)
        seed_torch(derive_seed(scn.seed, message_round(msg), pid, 4))  # predictions may sample
        if len(data) == 0:
            return Message(content=RecordDict({"temperature": MetricRecord({"n": 0})}), reply_to=msg)
        z = log_predictive(predictive(predict_dataset(learner, data, scn.evaluate.batch_size), learner.predictive_weights))
        loss, grad, hess = temperature_sums(z, torch.from_numpy(data.y), betas)
        reply = {"n": len(data), "loss": loss.tolist(), "grad": grad.tolist(), "hess": hess.tolist()}
        return Message(content=RecordDict({"temperature": MetricRecord(reply)}), reply_to=msg)

    @app.query("gossip")
    def gossip(msg: Message, context: Context) -> Message:
        """Decentralized mode: one round of this node (``fedens.decentralized.node``). The node
        mixes the neighbours' models by its own rule, trains, keeps the result in
        ``context.state`` and replies with it (which the server only forwards and measures)."""
        from fedens.decentralized import node as gossip_node
        from fedens.decentralized.rules import GossipContext, make_rule

        pid = prepare(context)
        f = faults_of(pid, message_round(msg))
        data = poisoned(client_data(pid), f)
        learner = new_learner(pid)
        inp = gossip_node.unpack_gossip(msg.content)
        own = gossip_node.own_model(context.state, inp.init)
        ctx = GossipContext(node=pid, scores=inp.scores, num_examples={**inp.sizes, pid: len(data.train)})
        if "rule" not in reusable:  # rules are frozen dataclasses: no state between calls
            reusable["rule"] = make_rule(scn.gossip.rule, scn.gossip.params, scn.base_dir)
        rule = reusable["rule"]
        trained, metrics = gossip_node.gossip_step(
            learner, rule, own, inp.received, ctx, data.train, data.val, scn.seed, message_round(msg),
            scn.evaluate.n_bins, scn.evaluate.batch_size, scn.evaluate.conformal, scn.evaluate.temperature != "off",
        )
        gossip_node.store(context.state, to_record(trained))  # its own copy: the reply is sent away
        if f.any:  # what the neighbours get: attacked relative to the node's model before the step
            trained = corrupt(trained, own, f, metrics)
        record = to_record(trained)
        return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
