"""``FedensGrid``: the Flower Grid every strategy talks to in fedens.

It wraps the engine's grid and adds what a reproducible, measured simulation needs, without any
strategy having to know:

- **Fixed order.** It lists nodes and returns replies in partition-id order, so aggregation
  sums in the same order on every run. Each node's partition id comes from the engine's grid
  (``partition_of``, known without a message); under another grid (Flower's deployment engine)
  it asks every node once (a ``query.info`` message). Flower's ``sample_nodes`` draws from Python's ``random``
  module; it is reseeded from ``(seed, round)`` before each round.
- **Round stamp.** Every message gets a ``fedens`` ConfigRecord ``{"round": r}``, from which
  clients derive their seeds (strategies need not inject ``server-round``).
- **Measurement.** Bytes of array payload sent and received, replies and failures per round,
  and the replies' metrics, collected for the recorder.
- **Evaluation schedule.** Federated evaluation messages are only sent in the rounds that
  ``evaluate.every`` selects.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from fedens.payload import DELAY_KEY, ROUND_KEY, NpyArray, record_nbytes, records_of
from fedens.seeding import derive_seed

log = logging.getLogger("fedens")


class AllClientsFailed(RuntimeError):
    """Every reply of a training round was an error; the run cannot go on."""


class Diverged(RuntimeError):
    """The global model (or every node's) has non-finite values, or training's loss exploded:
    the run cannot go on."""


def exploded(server_round: int, train_loss: float | None, num_classes: int, factor: float | None) -> Diverged | None:
    """A ``Diverged`` when a round's mean training loss is non-finite or above ``factor x log C``
    (``evaluate.diverge_loss``), else None. A uniform prediction has cross-entropy ``log C``;
    100 times that means the true class gets probability ``C^-100`` on average: the weights
    have blown up (e.g. one client's update scaled by 1e6), though they are still finite."""
    if factor is None or train_loss is None:
        return None
    limit = factor * math.log(num_classes)
    if math.isfinite(train_loss) and train_loss <= limit:
        return None
    return Diverged(f"diverged at round {server_round}: the clients' mean training loss {train_loss:.3g} exceeds "
                    f"evaluate.diverge_loss x log C = {limit:.3g}")


@dataclass
class RoundTraffic:
    """What crossed the grid in one round. ``train``/``evaluate`` map partition id -> metrics."""

    bytes_sent: int = 0
    bytes_received: int = 0
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stragglers: int = 0  # messages without a reply by the round's deadline
    rejected: int = 0  # replies with non-finite arrays, not handed to the strategy
    notes: list[str] = field(default_factory=list)  # why replies were rejected (for run.log)
    per_client: dict[int, list[int]] = field(default_factory=dict)  # partition -> [bytes down, bytes up]


class FedensGrid(Grid):
    def __init__(self, inner: Grid, seed: int, evaluate_rounds: set[int] | frozenset[int], timeout: float | None = None) -> None:
        self.inner = inner
        self.seed = seed
        self.evaluate_rounds = evaluate_rounds
        self.timeout = 3600.0 if timeout is None else float(timeout)  # per message round (Flower's default)
        self.timeout_set = timeout is not None  # round_timeout_s: injected delays count against it
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.round = 0
        self.traffic = RoundTraffic()
        self._sorted: list[int] | None = None  # node ids in partition order, when membership is fixed

    # ---------------------------------------------------------------- Grid interface (delegated)
    def set_run(self, run: Run) -> None:  # the engine sets the run on the inner grid
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002,ANN003
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        if self._sorted is not None:
            return list(self._sorted)
        nodes = list(self.inner.get_node_ids())
        return sorted(nodes, key=lambda n: (self.partition_of.get(n, len(self.partition_of)), n))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._outgoing(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._incoming(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = self._outgoing(messages)
        if not out:
            return []
        replies = list(self.inner.send_and_receive(out, timeout=timeout))
        answered = {m.metadata.reply_to_message_id for m in replies}
        self.traffic.stragglers += sum(1 for m in out if m.metadata.message_id not in answered)
        return self._incoming(replies)

    def node_states(self) -> dict[int, RecordDict]:
        """Every node's ``context.state`` by partition id, where the engine's grid can give them
        (for checkpoints); empty elsewhere."""
        get = getattr(self.inner, "node_states", None)
        return get() if get is not None else {}

    # ---------------------------------------------------------------- fedens additions
    def discover(self, num_nodes: int, timeout: float = 600.0) -> dict[int, int]:
        """Wait for ``num_nodes`` nodes and learn each one's partition id."""
        known = getattr(self.inner, "partition_of", None)
        if isinstance(known, dict) and len(known) == num_nodes:  # the simulation engine's grid
            self.partition_of = dict(known)
            self._sorted = sorted(known, key=lambda n: (known[n], n))  # simulated nodes never leave
            self.begin_round(1)
            return self.partition_of
        deadline = time.time() + timeout
        while len(nodes := list(self.inner.get_node_ids())) < num_nodes:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {num_nodes} simulated nodes came up")
            time.sleep(0.1)
        queries = [Message(RecordDict(), message_type="query.info", dst_node_id=n) for n in nodes]
        replies = list(self.inner.send_and_receive(queries, timeout=timeout))
        errors = [r.error.reason for r in replies if r.has_error()]
        if errors or len(replies) != len(nodes):
            raise RuntimeError(f"client start-up failed: {errors[0] if errors else 'no reply'}")
        self.partition_of = {r.metadata.src_node_id: int(r.content["info"]["partition-id"]) for r in replies}
        self.begin_round(1)
        return self.partition_of

    def begin_round(self, server_round: int) -> None:
        """Start collecting a new round's traffic and reseed node sampling for it."""
        self.round = server_round
        self.traffic = RoundTraffic()
        random.seed(derive_seed(self.seed, server_round, 2**31))

    def take_traffic(self) -> RoundTraffic:
        return self.traffic

    @contextmanager
    def off_the_books(self) -> Iterator[RoundTraffic]:
        """Messages sent inside are measurement (e.g. fitting a temperature), not the method's
        traffic: counted apart (the yielded record) and left out of the round's."""
        saved, self.traffic = self.traffic, RoundTraffic()
        try:
            yield self.traffic
        finally:
            self.traffic = saved

    def _outgoing(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for msg in messages:
            kind = msg.metadata.message_type.split(".")[0]
            if kind == "evaluate" and self.round not in self.evaluate_rounds:
                continue
            msg.content[ROUND_KEY] = ConfigRecord({"round": self.round})
            nbytes = record_nbytes(msg.content)
            self.traffic.bytes_sent += nbytes
            self._client(msg.metadata.dst_node_id)[0] += nbytes
            out.append(msg)
        return out

    def _client(self, node_id: int) -> list[int]:
        return self.traffic.per_client.setdefault(self.partition_of.get(node_id, -1), [0, 0])

    def _incoming(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in partition-id order, counted; error replies are kept (strategies drop
        them, as Flower's do), replies with non-finite arrays are rejected here."""
        replies = sorted(replies, key=lambda m: (self.partition_of.get(m.metadata.src_node_id, -1), m.metadata.src_node_id))
        kept: list[Message] = []
        usable = rejected = 0
        reasons: list[str] = []  # this call's
        for msg in replies:
            pid = self.partition_of.get(msg.metadata.src_node_id, -1)
            kind = msg.metadata.message_type.split(".")[0]
            if msg.has_error():
                reasons.append(f"{kind} partition {pid}: {msg.error.reason}")
                self.traffic.failures.append(reasons[-1])
                kept.append(msg)
                continue
            nbytes = record_nbytes(msg.content)
            self.traffic.bytes_received += nbytes
            self._client(msg.metadata.src_node_id)[1] += nbytes
            if not finite(msg.content):  # one NaN or infinity would poison the aggregate
                self.traffic.rejected += 1
                rejected += 1
                reasons.append(f"{kind} partition {pid}: rejected, its arrays have non-finite values")
                self.traffic.notes.append(reasons[-1])
                continue
            metrics = {k: v for rec in records_of(msg.content, MetricRecord).values() for k, v in rec.items()}
            if DELAY_KEY in metrics:  # an injected straggler: late in simulated time
                for rec in records_of(msg.content, MetricRecord).values():
                    rec.pop(DELAY_KEY, None)  # not a metric to aggregate
                if self.timeout_set and float(metrics.pop(DELAY_KEY)) > self.timeout:
                    self.traffic.stragglers += 1
                    reasons.append(f"{kind} partition {pid}: missed round_timeout_s (injected straggler)")
                    self.traffic.notes.append(reasons[-1])
                    continue
            if kind in ("train", "evaluate"):
                getattr(self.traffic, kind)[pid] = metrics
            kept.append(msg)
            usable += 1
        if replies and not usable and all(m.metadata.message_type.startswith("train") for m in replies):
            if rejected == len(replies):  # every client's model blew up: the method diverged
                raise Diverged(f"diverged at round {self.round}: every client's update has non-finite values")
            raise AllClientsFailed(f"round {self.round}: every client failed; first error: {reasons[0]}")
        return kept


def finite(content: RecordDict) -> bool:
    """Whether every floating-point array in a message's ArrayRecords is finite."""
    for record in records_of(content, ArrayRecord).values():
        for array in record.values():
            a = NpyArray.numpy(array)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                return False
    return True


def report_failures(server_round: int, traffic: RoundTraffic) -> None:
    """At most one line per round on stderr for clients that failed, straggled or were
    rejected; every reason is in ``run.log``."""
    for reason in traffic.failures + traffic.notes:
        log.info("round %d: %s", server_round, reason)
    counts = [(len(traffic.failures), "failed"), (traffic.stragglers, "missed the deadline"),
              (traffic.rejected, "sent non-finite arrays (rejected)")]
    said = [f"{n} {what}" for n, what in counts if n]
    if said:
        print(f"round {server_round}: clients: " + ", ".join(said) + " (see run.log)", file=sys.stderr, flush=True)
