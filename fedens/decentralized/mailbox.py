"""The message router of a gossip simulation: which payload reaches which node in which round.

One round r of the engine: the ``active(r)`` nodes ``collect(i, r)`` what their neighbours sent,
mix and train, then ``post(i, neighbours_r(i), r, payload)``. ``Asynchrony`` makes this
imperfect, reproducibly from its ``seed``:

- only a share ``active_fraction`` of the nodes wakes up each round (drawn per round);
- each copy of a message is lost with probability ``drop_prob`` (drawn per (round, sender,
  receiver), so the outcome does not depend on the order of ``post`` calls);
- node i's messages travel ``d_i`` extra rounds, ``d_i`` uniform in 0..delay drawn once per
  run: posted in round r, they can be collected from round ``r + 1 + d_i`` on.

A node uses the newest model of each neighbour, so a message is superseded by a newer one from
the same sender once that one has arrived as well; superseded messages are discarded (counted in
``superseded``), which bounds the box at ``delay + 2`` messages per (receiver, sender) however
long a node sleeps. Payloads are opaque and stored by reference: do not mutate them after posting.

Counters: every posted copy ends up in exactly one of ``dropped``, ``delivered``,
``superseded`` or still pending, i.e. ``sent == dropped + delivered + superseded + pending()``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

# stream tags: the active set, drops and delays draw from independent streams of one seed
_ACTIVE, _DROP, _DELAY = 1, 2, 3


@dataclass(frozen=True)
class Asynchrony:
    """How imperfect gossip communication is; the defaults are synchronous and lossless."""

    active_fraction: float = 1.0  # share of nodes that act each round, in (0, 1]
    drop_prob: float = 0.0  # each message copy lost independently, in [0, 1]
    delay: int = 0  # max extra rounds in transit; node i's fixed delay is uniform in 0..delay
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.active_fraction <= 1:
            raise ValueError(f"active_fraction must be in (0, 1], got {self.active_fraction}")
        if not 0 <= self.drop_prob <= 1:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")


class Mailbox:
    """Messages in transit between ``num_nodes`` gossip nodes. Rounds must not go backwards
    across ``post``/``collect`` calls (that is what lets old messages be discarded)."""

    def __init__(self, num_nodes: int, asynchrony: Asynchrony = Asynchrony()) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes = n = num_nodes
        self.asynchrony = a = asynchrony
        self.num_active = max(1, round(a.active_fraction * n))  # Python round: half to even
        rng = np.random.default_rng([a.seed, _DELAY])
        self.delays: np.ndarray = rng.integers(0, a.delay + 1, size=n)  # (n,) int, fixed per run
        # box[receiver][sender] = [(deliver_round, payload), ...] in posting order
        self._box: list[dict[int, list[tuple[int, Any]]]] = [defaultdict(list) for _ in range(n)]
        self._now = 0  # latest round seen by post/collect
        self.sent = self.dropped = self.delivered = self.superseded = 0

    def _check(self, node: int, what: str) -> None:
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"{what} {node} is not a node id in 0..{self.num_nodes - 1}")

    def _advance(self, round: int) -> None:
        if round < self._now:
            raise ValueError(f"round {round} is before round {self._now}, already seen")
        self._now = round

    def active(self, round: int) -> list[int]:
        """The ``num_active`` nodes that act in ``round``, ascending; a pure function of (seed, round)."""
        if self.num_active == self.num_nodes:
            return list(range(self.num_nodes))
        rng = np.random.default_rng([self.asynchrony.seed, _ACTIVE, round])
        return sorted(rng.choice(self.num_nodes, self.num_active, replace=False).tolist())

    def post(self, sender: int, receivers: list[int], round: int, payload: Any) -> list[int]:
        """``sender`` ends ``round`` by sending ``payload`` to each of ``receivers``.

        Returns the receivers whose copy was not dropped (in the given order); it can be
        collected from round ``round + 1 + delays[sender]`` on.
        """
        self._check(sender, "sender")
        for r in receivers:
            self._check(r, "receiver")
        if sender in receivers or len(set(receivers)) != len(receivers):
            raise ValueError(f"receivers of node {sender} must be distinct other nodes, got {receivers}")
        self._advance(round)
        self.sent += len(receivers)
        p = self.asynchrony.drop_prob
        if p > 0:
            # one uniform per possible receiver from a (seed, round, sender) stream: the fate of
            # copy (sender -> r) does not depend on which other receivers are listed or in what order
            u = np.random.default_rng([self.asynchrony.seed, _DROP, round, sender]).random(self.num_nodes)
            kept = [r for r in receivers if u[r] >= p]
        else:
            kept = list(receivers)
        self.dropped += len(receivers) - len(kept)
        deliver = round + 1 + int(self.delays[sender])
        for r in kept:
            queue = self._box[r][sender]
            queue.append((deliver, payload))
            self._prune(queue, round)
        return kept

    def _prune(self, queue: list[tuple[int, Any]], round: int) -> None:
        """Keep the newest message that has arrived by ``round`` and everything still in transit.

        Every later collect is at a round >= ``round``, where the newest arrived message
        supersedes the older ones; a sender's messages arrive in posting order (fixed delay).
        """
        arrived = sum(1 for d, _ in queue if d <= round)
        if arrived > 1:
            del queue[: arrived - 1]
            self.superseded += arrived - 1

    def collect(self, receiver: int, round: int) -> dict[int, Any]:
        """Take what has arrived for ``receiver`` by ``round``: sender -> newest payload, by sender id.

        Older arrived messages of the same sender are discarded; messages still in transit stay.
        """
        self._check(receiver, "receiver")
        self._advance(round)
        box = self._box[receiver]
        out: dict[int, Any] = {}
        for sender in sorted(box):
            queue = box[sender]
            arrived = sum(1 for d, _ in queue if d <= round)
            if arrived:
                out[sender] = queue[arrived - 1][1]
                self.delivered += 1
                self.superseded += arrived - 1
                del queue[:arrived]
            if not queue:
                del box[sender]
        return out

    def pending(self, receiver: int | None = None) -> int:
        """Messages waiting for ``receiver`` (arrived or in transit); all receivers if None."""
        if receiver is not None:
            self._check(receiver, "receiver")
        boxes = self._box if receiver is None else [self._box[receiver]]
        return sum(len(q) for box in boxes for q in box.values())

    def stats(self) -> dict[str, int]:
        """The counters, for the metrics log."""
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "delivered": self.delivered,
            "superseded": self.superseded,
            "pending": self.pending(),
        }
