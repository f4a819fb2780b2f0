"""How the engine hands messages to its actors (fedens.linkstate), without Ray: batches,
longest-processing-time-first plans, one message per node at a time, the end of a run."""

from __future__ import annotations

from types import SimpleNamespace

from flwr.app import Message, RecordDict

from fedens.linkstate import EngineGrid, SimulatedRun


def make_run(nodes: int) -> tuple[SimulatedRun, EngineGrid, dict[int, int]]:
    run = SimulatedRun(nodes, SimpleNamespace(actors=[None, None]), app=None)
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    factory.state_instance = run.state
    grid = EngineGrid(factory, run.partition_of, workers=2)
    grid.set_run(run.run)
    node_of = {pid: node for node, pid in run.partition_of.items()}
    return run, grid, node_of


def push(grid: EngineGrid, node_of: dict[int, int], pids: list[int], kind: str = "train") -> None:
    grid.push_messages([Message(RecordDict(), message_type=kind, dst_node_id=node_of[p]) for p in pids])


def pids(run: SimulatedRun, batch: list[Message]) -> list[int]:
    return [run.partition_of[m.metadata.dst_node_id] for m in batch]


def test_nodes_are_known_without_asking_them():
    run, grid, node_of = make_run(5)
    assert sorted(run.partition_of.values()) == [0, 1, 2, 3, 4]
    assert sorted(grid.get_node_ids()) == sorted(node_of.values())


def test_unknown_durations_give_shrinking_shares_and_busy_nodes_wait():
    run, grid, node_of = make_run(10)
    push(grid, node_of, list(range(10)))
    first = run.state.take(0, workers=2)
    assert pids(run, first) == [0, 1, 2]  # ceil(10 / (2 * 2)), in arrival order
    assert pids(run, run.state.take(1, workers=2)) == [3, 4]  # ceil(7 / 4)
    push(grid, node_of, [0])  # node 0 has a message at an actor: its next one waits
    rest = pids(run, run.state.take(0, workers=2))
    assert 0 not in rest
    run.state.release(first)
    while batch := run.state.take(1, workers=2):
        rest += pids(run, batch)
    assert sorted(rest) == [0, 5, 6, 7, 8, 9]


def test_known_durations_are_planned_longest_first_one_call_per_actor():
    run, grid, node_of = make_run(5)
    for pid, sec in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):  # what each node's last train took
        run.state.seconds[(node_of[pid], "train")] = sec
    push(grid, node_of, [0, 1, 2, 3, 4])
    # LPT: 5 -> A, 4 -> B, 3 -> B (4 < 5), 2 -> A (5 < 7), 1 -> A (7 = 7, first): A = 8, B = 7
    assert pids(run, run.state.take(0, workers=2)) == [4, 1, 0]
    assert pids(run, run.state.take(1, workers=2)) == [3, 2]
    assert run.state.take(0, workers=2) == [] and run.state.take(0, workers=2, steal=True) == []


def test_closed_state_ends_every_worker():
    run, grid, node_of = make_run(2)
    push(grid, node_of, [0, 1])
    run.state.close()
    assert run.state.take(0, workers=2) == [] and not run.state.queued and not run.state.wait_for_work()


def test_an_idle_actor_takes_another_actors_planned_messages_and_batches_are_capped(monkeypatch):
    import fedens.linkstate as L

    monkeypatch.setattr(L, "MAX_BATCH", 2)
    run, grid, node_of = make_run(6)
    for pid in range(6):
        run.state.seconds[(node_of[pid], "train")] = float(6 - pid)
    push(grid, node_of, list(range(6)))  # LPT: A = {0, 3, 4}, B = {1, 2, 5}
    assert pids(run, run.state.take(0, workers=2)) == [0, 3]  # capped at 2
    assert pids(run, run.state.take(0, workers=2)) == [4]
    assert run.state.take(0, workers=2) == []  # nothing of its own left ...
    assert pids(run, run.state.take(0, workers=2, steal=True)) == [1]  # ... so it helps B
    assert pids(run, run.state.take(1, workers=2)) == [2, 5]
