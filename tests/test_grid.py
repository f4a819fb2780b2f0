"""FedensGrid on a fake engine grid: fixed order, round stamps, byte counts, evaluation schedule."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedens.client_app import message_round
from fedens.grid import AllClientsFailed, FedensGrid
from fedens.payload import to_record


class FakeGrid:
    """Nodes 900, 500, 700 simulate partitions 0, 1, 2; replies come back in reverse order."""

    partitions = {900: 0, 500: 1, 700: 2}

    def __init__(self, fail: set[int] = frozenset()) -> None:
        self.sent: list[Message] = []
        self.fail = fail

    def get_node_ids(self) -> list[int]:
        return [500, 700, 900]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001,ANN201
        messages = list(messages)
        self.sent += messages
        replies = []
        for m in messages:
            pid = self.partitions[m.metadata.dst_node_id]
            if pid in self.fail:
                replies.append(Message(Error(code=0, reason=f"client {pid} crashed"), reply_to=m))
                continue
            if m.metadata.message_type == "query.info":
                content = RecordDict({"info": ConfigRecord({"partition-id": pid})})
            else:
                content = RecordDict({"arrays": to_record({"w": np.full(3, pid, np.float32)}),
                                      "metrics": MetricRecord({"num-examples": 10, "train_loss": float(pid)})})
            replies.append(Message(content, reply_to=m))
        return list(reversed(replies))


@pytest.fixture(autouse=True)
def task_identity():
    """Messages take their run id from the task identity the engine sets."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def make(fail: set[int] = frozenset()) -> FedensGrid:
    grid = FedensGrid(FakeGrid(fail), seed=0, evaluate_rounds={0, 2})
    assert grid.discover(3) == {900: 0, 500: 1, 700: 2}
    return grid


def train_messages(grid: FedensGrid, nodes: list[int], kind: str = "train") -> list[Message]:
    content = RecordDict({"arrays": to_record({"w": np.zeros(3, np.float32)}), "config": ConfigRecord()})
    return [Message(content, message_type=kind, dst_node_id=n) for n in nodes]


def test_nodes_and_replies_in_partition_order():
    grid = make()
    assert grid.get_node_ids() == [900, 500, 700]
    replies = grid.send_and_receive(train_messages(grid, [700, 500, 900]))
    assert [r.metadata.src_node_id for r in replies] == [900, 500, 700]
    assert grid.take_traffic().train == {p: {"num-examples": 10, "train_loss": float(p)} for p in (0, 1, 2)}


def test_round_stamp_and_bytes():
    grid = make()
    msgs = train_messages(grid, [900, 500])
    replies = grid.send_and_receive(msgs)
    assert all(message_round(m) == 1 for m in msgs)
    per_message = sum(len(a.data) for a in msgs[0].content["arrays"].values())
    assert per_message > 12  # three float32 plus the .npy header
    traffic = grid.take_traffic()
    assert traffic.bytes_sent == 2 * per_message
    assert traffic.bytes_received == sum(len(a.data) for r in replies for a in r.content["arrays"].values())


def test_evaluation_only_in_scheduled_rounds():
    grid = make()  # evaluate_rounds = {0, 2}; discover() began round 1
    assert grid.send_and_receive(train_messages(grid, [900], "evaluate")) == []
    grid.begin_round(2)
    assert len(grid.send_and_receive(train_messages(grid, [900], "evaluate"))) == 1


def test_sampling_is_reseeded_per_round():
    grid = make()
    grid.begin_round(5)
    a = random.sample(grid.get_node_ids(), 2)
    grid.begin_round(5)
    assert random.sample(grid.get_node_ids(), 2) == a


def test_failures_are_counted_and_a_round_where_all_fail_stops_the_run():
    grid = make()
    grid.inner.fail = {1}
    replies = grid.send_and_receive(train_messages(grid, [900, 500, 700]))
    assert len(replies) == 3 and grid.take_traffic().failures == ["train partition 1: client 1 crashed"]
    grid.inner.fail = {0, 1, 2}
    with pytest.raises(AllClientsFailed, match="every client failed; first error: train partition 0: client 0 crashed"):
        grid.send_and_receive(train_messages(grid, [900, 500, 700]))
