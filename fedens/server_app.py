"""The Flower ServerApp: runs the scenario's strategy and records every round.

The strategy is any Flower ``Strategy``; it is started with Flower's own ``Strategy.start``
loop over a ``FedensGrid`` (fixed reply order, byte counts, evaluation schedule) and with a
centralised ``evaluate_fn`` that, after every round, evaluates the global model on the test and
shifted sets and hands the round's rows to the recorder.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedens import calibration as temperature_scaling
from fedens import stopping
from fedens.checkpoint import ResumeState, restore_rng, rng_states
from fedens.conformal import qoq_threshold, set_metrics, split_quantile
from fedens.checkpoint import save as save_checkpoint
from fedens.data import ServerData, load_server_data
from fedens.distill import fit_student
from fedens.decentralized.engine import run_gossip
from fedens.grid import Diverged, FedensGrid, RoundTraffic, exploded, report_failures
from fedens.learners import build_learner
from fedens.learners.base import Learner, predict_dataset
from fedens.metrics import (
    METRIC_KEYS,
    classification_metrics,
    ensemble_metrics,
    ood_auroc,
    predictive,
    reliability_bins,
    uncertainty_scores,
)
from fedens.payload import from_record, to_record
from fedens.results import RunRecorder
from fedens.scenario import LearnerConfig, Scenario
from fedens.sealed import seal
from fedens.seeding import derive_seed, seeded_generator
from fedens.strategies import build_strategy, resolve_strategy
from fedens.strategies.base import REJECTED_KEY, round_facts

log = logging.getLogger("fedens")

RoundCallback = Callable[[int, list[dict[str, Any]]], None]
# For the worst client: lowest accuracy, highest NLL / ECE / Brier.
WORST = {"accuracy": min, "nll": max, "ece": max, "brier": max}


def evaluate_fraction(scn: Scenario) -> float:
    """``fraction_evaluate``, capped so that at most ``evaluate.max_clients`` clients evaluate.

    Federated evaluation is one message per client; for the quickstart's MLP it costs about half
    a training round (``bench/bench_engine.py``), so with 100,000 clients it would dwarf the
    training of a 0.1% sample. A sample of 100 clients estimates the mean client metrics well
    and still finds badly served clients. Flower samples ``int(N * fraction)`` clients; the
    half added here keeps that integer at the cap despite floating-point rounding."""
    n, cap = scn.data.num_clients, scn.evaluate.max_clients
    if cap is None or scn.fraction_evaluate * n <= cap:
        return scn.fraction_evaluate
    return min(scn.fraction_evaluate, (cap + 0.5) / n)


def make_server_app(scn: Scenario, recorder: RunRecorder, on_round: RoundCallback | None = None,
                    resume: ResumeState | None = None) -> ServerApp:
    """The ServerApp of ``scn``; ``resume`` continues a run from its checkpoint."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        (run_gossip if scn.mode == "decentralized" else run_strategy)(scn, grid, recorder, on_round, resume)

    return app


def run_strategy(scn: Scenario, grid: Grid, recorder: RunRecorder, on_round: RoundCallback | None = None,
                 resume: ResumeState | None = None) -> None:
    """Build (or restore) the strategy and the global model, and run the rounds."""
    server_data = load_server_data(scn.data, scn.seed)
    if not scn.evaluate.test_sets:  # e.g. a tuning trial: any read of a held-out set fails the run
        server_data = seal(server_data)
    torch.manual_seed(derive_seed(scn.seed, 0))  # the initial global model
    learner = build_learner(scn, server_data.input_shape, server_data.num_classes, torch.device("cpu"))

    fgrid = FedensGrid(grid, scn.seed, scn.evaluation_rounds, scn.round_timeout_s)
    fgrid.discover(scn.data.num_clients)
    has_val = scn.data.val_fraction > 0
    defaults = {
        "fraction_train": scn.fraction_train,
        "fraction_evaluate": evaluate_fraction(scn) if has_val else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if has_val and scn.fraction_evaluate > 0 else 0,
        "min_available_nodes": scn.data.num_clients,
    }
    if resume is not None:
        strategy, arrays, first = resume.strategy, to_record(resume.arrays), resume.round + 1
        restore_rng(resume.rng)
        recorder.reliability = resume.reliability
    else:
        strategy = build_strategy(resolve_strategy(scn.strategy.name, scn.base_dir), defaults, scn.strategy.params)
        arrays, first = to_record(learner.get_arrays()), 1
    if hasattr(strategy, "bind"):  # fedens strategies that compute on the server
        from fedens.strategies.base import ServerContext

        def new_learner() -> Learner:
            return build_learner(scn, server_data.input_shape, server_data.num_classes, torch.device("cpu"))

        strategy.bind(ServerContext(scn, server_data, new_learner, scn.seed))
    evaluator = RoundEvaluator(scn, learner, server_data, fgrid, recorder, on_round, strategy)
    if resume is not None and resume.student is not None:
        evaluator.restore_student(resume.student)
    if type(strategy).start is not Strategy.start and not hasattr(strategy, "begin"):
        # a user's strategy with a loop of its own runs it (without resume)
        if scn.stop is not None:
            raise ValueError(f"stop: {type(strategy).__name__} runs its own round loop (Strategy.start), which fedens "
                             "cannot end early; remove stop or let fedens run the rounds")
        strategy.start(grid=fgrid, initial_arrays=arrays, num_rounds=scn.rounds, train_config=ConfigRecord(),
                       evaluate_config=ConfigRecord(), evaluate_fn=evaluator)
        return
    run_rounds(strategy, fgrid, arrays, first, scn.rounds, evaluator)


def run_rounds(strategy: Strategy, grid: FedensGrid, arrays: ArrayRecord, first: int, num_rounds: int,
               evaluate_fn: RoundEvaluator) -> None:
    """Flower's ``Strategy.start`` loop (configure, send, aggregate; train then evaluate; the
    central evaluation after each round), from round ``first`` so that a run can resume. The
    same calls in the same order as ``Strategy.start``, without its console log and history."""
    train_config, evaluate_config = ConfigRecord(), ConfigRecord()
    if hasattr(strategy, "begin"):  # a fedens strategy's hook, also after a resume (e.g. swarm's grid)
        strategy.begin(grid, arrays, grid.timeout)
    if first == 1:
        evaluate_fn(0, arrays)
    else:
        grid.begin_round(first)
    for current in range(first, num_rounds + 1):
        replies = grid.send_and_receive(strategy.configure_train(current, arrays, train_config, grid), timeout=grid.timeout)
        new_arrays, train_metrics = strategy.aggregate_train(current, replies)
        if new_arrays is not None:
            arrays = new_arrays
        replies = grid.send_and_receive(strategy.configure_evaluate(current, arrays, evaluate_config, grid),
                                        timeout=grid.timeout)
        strategy.aggregate_evaluate(current, replies)
        evaluate_fn(current, arrays, round_facts(train_metrics))
        if evaluate_fn.stopped:  # ``stop:``: the validation metric has plateaued
            break


class RoundEvaluator:
    """``evaluate_fn`` for the round loop: called with round 0 before training and after every
    round; checks that the global model is finite, evaluates it when scheduled, writes the
    round's rows and, every ``output.checkpoint_every`` rounds, the checkpoint."""

    def __init__(
        self,
        scn: Scenario,
        learner: Learner,
        data: ServerData,
        grid: FedensGrid,
        recorder: RunRecorder,
        on_round: RoundCallback | None,
        strategy: object | None = None,
    ) -> None:
        self.scn, self.learner, self.data, self.grid = scn, learner, data, grid
        self.recorder, self.on_round, self.strategy = recorder, on_round, strategy
        self.rounds = scn.evaluation_rounds
        self.student: Learner | None = None  # ``distill``: the single network the global model is distilled into
        self.stopped = False  # ``stop:`` ended the run at this round

    def __call__(self, server_round: int, arrays: ArrayRecord, facts: dict[str, Any] | None = None) -> MetricRecord | None:
        """``facts``: what the strategy returned about the round (``fedens.strategies.base.with_facts``),
        for the train row; none under a strategy's own loop (Flower's ``evaluate_fn(round, arrays)``)."""
        named = from_record(arrays)
        bad = [k for k, a in named.items() if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
        # calibration first, so that its messages count in this round's bytes
        calibration = self.calibrate(server_round, arrays) if server_round in self.rounds and not bad else None
        traffic = self.grid.take_traffic()
        now = round(time.time() - self.recorder.started, 3)
        rows: list[dict[str, Any]] = []
        if server_round > 0:
            # a fedens strategy's own facts of the round (e.g. consensus steps) join the train row
            row = {"round": server_round, "scope": "train", "time_s": now, **train_row(traffic), **(facts or {})}
            row["rejected"] += row.pop(REJECTED_KEY, 0)  # the strategy's own rejections count as rejected too
            rows.append(row)
            if traffic.evaluate:
                rows.append({"round": server_round, "scope": "clients", "time_s": now, **clients_row(traffic)})
            report_failures(server_round, traffic)
        if bad:  # never evaluate, report or continue with a model that is not numbers
            self.recorder.write_rows(rows)
            raise Diverged(f"diverged at round {server_round}: the global model has non-finite values in "
                           f"{len(bad)} tensors (e.g. {bad[0]})")
        blown = exploded(server_round, rows[0]["train_loss"], self.data.num_classes, self.scn.evaluate.diverge_loss) \
            if rows else None
        if blown is not None:
            self.recorder.write_rows(rows)
            raise blown
        # ``stop:``: has the validation metric plateaued? (fedens.stopping; recorded in the summary)
        if server_round > 0:
            self.recorder.stopped = stopping.check(self.scn.stop, [*self.recorder.rows, *rows], server_round, self.scn.rounds)
        self.stopped = self.recorder.stopped is not None
        final = server_round == self.scn.rounds or self.stopped
        result = None
        if server_round in self.rounds or self.stopped:
            self.learner.set_arrays(named)
            try:
                if self.scn.evaluate.test_sets:
                    temperature = self.fit_temperature(server_round, arrays, final)
                    test = self.evaluate_set("global-test", server_round, now, final=final, calibration=calibration,
                                             temperature=temperature)
                    rows += [test, self.evaluate_set("global-shift", server_round, now, calibration=calibration,
                                                     temperature=temperature)]
                    result = MetricRecord({k: test[k] for k in METRIC_KEYS if test.get(k) is not None})
                if self.scn.distill is not None:
                    rows += self.distil(server_round, now)
            except Diverged:
                self.recorder.write_rows(rows)  # the round's training facts are kept
                raise
            if self.scn.output.checkpoint:
                self.recorder.save_checkpoint(named, server_round)
        self.recorder.write_rows(rows)
        log.info("round %d: %s", server_round, rows)
        if self.on_round is not None:
            self.on_round(server_round, rows)
        every = self.scn.output.checkpoint_every
        if server_round > 0 and every and server_round % every == 0 and not final:
            save_checkpoint(self.recorder.dir, ResumeState(
                round=server_round, rows=len(self.recorder.rows), arrays=named, strategy=self.strategy,
                node_states=self.grid.node_states(), rng=rng_states(), reliability=self.recorder.reliability,
                student=None if self.student is None else self.student.get_arrays()))
        self.grid.begin_round(server_round + 1)
        return result

    def fit_temperature(self, server_round: int, arrays: ArrayRecord, final: bool) -> float | None:
        """``evaluate.temperature``: the temperature of the global predictive that minimises the
        NLL summed over the clients' validation splits (``fedens.calibration``): each client
        returns three sums per asked temperature (``query.temperature``), never its data. The
        clients are all of them, or a seeded sample of ``evaluate.max_clients``. Its messages
        are measurement, not the method's traffic: their bytes are not counted. None when off
        at this round or no client has validation data."""
        mode = self.scn.evaluate.temperature
        if mode == "off" or (mode == "final" and not final) or self.scn.data.val_fraction == 0:
            return None
        nodes = self.grid.get_node_ids()
        cap = self.scn.evaluate.max_clients
        if cap is not None and len(nodes) > cap:
            rng = np.random.default_rng(derive_seed(self.scn.seed, server_round, _TEMPERATURE_TAG))
            nodes = [nodes[i] for i in sorted(rng.choice(len(nodes), cap, replace=False))]

        def sums(betas: np.ndarray) -> temperature_scaling.Sums:
            messages = [Message(RecordDict({"arrays": arrays, "temperature": ConfigRecord({"betas": [float(b) for b in betas]})}),
                                message_type="query.temperature", dst_node_id=node) for node in nodes]
            replies = [r.content["temperature"] for r in self.grid.send_and_receive(messages, timeout=self.grid.timeout)
                       if not r.has_error()]
            replies = [c for c in replies if int(c["n"]) > 0]  # partition-id order (the grid sorts): a fixed sum
            if not replies:
                raise _NoValidation
            return tuple(np.sum([np.asarray(c[k], dtype=np.float64) for c in replies], axis=0)
                         for k in ("loss", "grad", "hess"))  # type: ignore[return-value]

        with self.grid.off_the_books():
            try:
                temperature, _ = temperature_scaling.fit_temperature(sums)
            except _NoValidation:
                return None
        return temperature

    def calibrate(self, server_round: int, arrays: ArrayRecord) -> Calibration | None:
        """``evaluate.conformal``: every client scores the global predictive on its validation
        split (``query.conformal``); the threshold comes from the pooled scores or from the
        clients' local quantiles (``method``). None when conformal prediction is off or no
        client has validation data."""
        cfg = self.scn.evaluate.conformal
        if cfg is None:
            return None
        messages = [Message(RecordDict({"arrays": arrays}), message_type="query.conformal", dst_node_id=node)
                    for node in self.grid.get_node_ids()]
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.grid.timeout) if not r.has_error()]
        per_client = [r.content["conformal"] for r in replies]  # partition-id order (the grid sorts)
        per_client = [c for c in per_client if int(c["n"]) > 0]
        if not per_client:
            return None
        scores = [np.asarray(c["scores"], dtype=np.float64) for c in per_client]
        if cfg.method == "pooled":
            q, order = split_quantile(np.concatenate(scores), cfg.alpha), 0
        else:
            local = [float(c["local_quantile"]) for c in per_client]  # +inf travels as 1e300
            q, order = qoq_threshold([math.inf if v >= 1e300 else v for v in local], [len(s) for s in scores], cfg.alpha)
        coverage = [float((s <= q + 1e-12).mean()) for s in scores]  # each client's own split, a measurement
        return Calibration(q, order, len(per_client), int(sum(len(s) for s in scores)), min(coverage))

    def distil(self, server_round: int, now: float) -> list[dict[str, Any]]:
        """``distill``: fit the student to the global predictive on the public split (the
        learner holds the global arrays) and evaluate it as ``global-test-student`` and
        ``global-shift-student`` (fedens.distill)."""
        cfg, public = self.scn.distill, self.data.public
        torch.manual_seed(derive_seed(self.scn.seed, server_round, _STUDENT_TAG))  # predictions may sample
        teacher = predictive(predict_dataset(self.learner, public, self.scn.evaluate.batch_size),
                             self.learner.predictive_weights)
        if self.student is None:  # the first student: a fresh network, seeded apart from everything else
            self.student = self.new_student()
        losses = fit_student(self.student, teacher, public, cfg, seeded_generator(self.scn.seed, server_round, _STUDENT_TAG))
        rows = [self.evaluate_set(f"{scope}-student", server_round, now, learner=self.student)
                for scope in ("global-test", "global-shift")]
        rows[0]["distill_loss"] = losses[-1]
        return rows

    def new_student(self) -> Learner:
        with torch.random.fork_rng():  # the student's initialisation draws from a stream of its own
            torch.manual_seed(derive_seed(self.scn.seed, _STUDENT_TAG))
            single = self.scn.model_copy(update={"learner": LearnerConfig(kind="single")})
            return build_learner(single, self.data.input_shape, self.data.num_classes, torch.device("cpu"))

    def restore_student(self, arrays: dict[str, np.ndarray]) -> None:
        """A resumed run continues from the student it had (the checkpoint's)."""
        self.student = self.new_student()
        self.student.set_arrays(arrays)

    def evaluate_set(self, scope: str, server_round: int, now: float, final: bool = False,
                     calibration: Calibration | None = None, learner: Learner | None = None,
                     temperature: float | None = None) -> dict[str, Any]:
        """Metrics of the global model on the test or the shifted set; on the test set also the
        OOD AUROC, by predictive entropy and by mutual information; with a calibration, the
        conformal sets' coverage and mean size; with a temperature (fitted on the clients'
        validation splits), ``temperature``, ``nll_ts``, ``ece_ts`` and ``brier_ts``."""
        learner = self.learner if learner is None else learner
        on_test = scope.startswith("global-test")
        ds = self.data.test if on_test else self.data.shift
        # Predictions may sample (MC dropout, posterior samples, roundings): seed them per round.
        torch.manual_seed(derive_seed(self.scn.seed, server_round, 2**32 + (not on_test)))
        member_probs = predict_dataset(learner, ds, self.scn.evaluate.batch_size)  # (members, n, classes)
        if not torch.isfinite(member_probs).all():  # finite weights, yet e.g. a posterior sample overflowed
            raise Diverged(f"diverged at round {server_round}: the global model's predictions on the "
                           f"{scope.split('-')[1]} set have non-finite values")
        weights = learner.predictive_weights  # the predictive's weights over members (None: uniform)
        probs, labels = predictive(member_probs, weights), torch.from_numpy(ds.y)
        metrics = classification_metrics(probs, labels, self.scn.evaluate.n_bins)
        metrics.update(ensemble_metrics(member_probs, labels, weights))
        metrics.update(learner.extra_metrics(ds, self.scn.evaluate.n_bins, self.scn.evaluate.batch_size))
        if on_test:
            scores_in = uncertainty_scores(member_probs, weights)
            scores_out = uncertainty_scores(predict_dataset(learner, self.data.ood, self.scn.evaluate.batch_size), weights)
            metrics["ood_auroc"] = ood_auroc(scores_in["entropy"], scores_out["entropy"])
            metrics["ood_auroc_mi"] = ood_auroc(scores_in["mutual_information"], scores_out["mutual_information"])
            metrics["ood_set"] = self.data.ood_kind  # which inputs (data.ood): the dataset's own set or noise
        if calibration is not None:
            metrics.update(calibration.row(probs, labels, self.scn.evaluate.conformal.score, scope == "global-test"))
        if temperature is not None:
            metrics.update(temperature_scaling.scaled_metrics(probs, labels, temperature, self.scn.evaluate.n_bins))
        if final:
            self.recorder.record_reliability(reliability_bins(probs, labels, self.scn.evaluate.n_bins),
                                             "final global model, test set")
        return {"round": server_round, "scope": scope, "time_s": now, **metrics, "num_examples": len(ds),
                "members": member_probs.shape[0]}


@dataclass(frozen=True)
class Calibration:
    """A round's conformal threshold and how it was set (``RoundEvaluator.calibrate``)."""

    threshold: float  # q: the set of x is {y : s(x, y) <= q}; inf = every label
    order: int  # quantile of quantiles: which local quantile (l); 0 for pooled
    clients: int  # clients whose validation scores calibrated it
    points: int  # calibration scores in all
    worst_client_coverage: float  # the lowest share of a client's own scores under q

    def row(self, probs: torch.Tensor, labels: torch.Tensor, score: str, details: bool) -> dict[str, Any]:
        """``conformal_coverage`` and ``conformal_size`` of the sets on ``probs`` ``(n, classes)``;
        on the test row also the threshold and the calibration facts."""
        sets = set_metrics(probs, labels, self.threshold, score)
        out: dict[str, Any] = {"conformal_coverage": sets["coverage"], "conformal_size": sets["size"]}
        if details:
            out.update({"conformal_threshold": self.threshold if np.isfinite(self.threshold) else None,
                        "conformal_order": self.order, "conformal_clients": self.clients,
                        "conformal_points": self.points,
                        "conformal_worst_client_coverage": self.worst_client_coverage})
        return out


_STUDENT_TAG = 2**33  # the student's seed stream, apart from clients (partition ids) and evaluation
_TEMPERATURE_TAG = 2**33 + 1  # the sample of clients that fit the temperature


class _NoValidation(Exception):
    """No client that answered has validation data."""


def train_row(traffic: RoundTraffic) -> dict[str, Any]:
    """Example-weighted mean training loss, participation and bytes of one round."""
    replies = list(traffic.train.values())
    n = [float(m.get("num-examples", 0)) for m in replies]
    loss = [float(m.get("train_loss", np.nan)) for m in replies]
    total = sum(n)
    clients = max(len(traffic.per_client), 1)
    return {
        "train_loss": float(np.dot(n, loss) / total) if total > 0 else None,
        "clients_trained": len(replies),
        "failures": len(traffic.failures),  # error replies (a client raised, crashed or its actor died)
        "stragglers": traffic.stragglers,  # no reply before round_timeout_s
        "rejected": traffic.rejected,  # replies with non-finite arrays, left out of the aggregate
        "bytes_sent": traffic.bytes_sent,
        "bytes_received": traffic.bytes_received,
        # per client that took part in the round: mean bytes it received from / sent to the server
        "client_bytes_down": sum(d for d, _ in traffic.per_client.values()) / clients,
        "client_bytes_up": sum(u for _, u in traffic.per_client.values()) / clients,
    }


def clients_row(traffic: RoundTraffic) -> dict[str, Any]:
    """Federated evaluation on the clients' own validation splits: the plain mean over clients
    (each client counts once, however much data it holds) and the worst client."""
    replies = [m for m in traffic.evaluate.values() if m.get("num-examples", 0) > 0]
    row: dict[str, Any] = {"num_clients": len(replies)}
    for key in ("member_accuracy", "disagreement", "entropy", "mutual_information"):
        values = [float(m[key]) for m in replies if key in m]
        row[key] = float(np.mean(values)) if values else None
    for key in METRIC_KEYS:
        values = [float(m[key]) for m in replies]
        row[key] = float(np.mean(values)) if values else None
        row[f"{key}_worst"] = WORST[key](values) if values else None
    return row
