import pytest

from fedens.decentralized.mailbox import Asynchrony, Mailbox


def conserved(box: Mailbox) -> bool:
    return box.sent == box.dropped + box.delivered + box.superseded + box.pending()


def test_synchronous_delivery_next_round():
    box = Mailbox(3)
    assert box.post(0, [1, 2], 0, "w0") == [1, 2]
    assert box.collect(1, 0) == {}  # not yet: sent at the end of round 0
    assert box.pending(1) == 1
    assert box.collect(1, 1) == {0: "w0"}
    assert box.collect(1, 1) == {}  # taken
    assert box.collect(2, 5) == {0: "w0"}  # waited while node 2 slept
    assert (box.sent, box.delivered, box.dropped, box.pending()) == (2, 2, 0, 0)


def test_sorted_by_sender_newest_wins():
    box = Mailbox(4)
    box.post(3, [0], 0, "a0")
    box.post(1, [0], 0, "b0")
    box.post(3, [0], 1, "a1")
    box.post(3, [0], 2, "a2")  # node 0 sleeps through rounds 1..2
    assert box.pending(0) == 3  # b0; a1 (a0 superseded once both arrived); a2 in transit
    out = box.collect(0, 3)
    assert list(out) == [1, 3] and out == {1: "b0", 3: "a2"}
    assert box.superseded == 2 and conserved(box)


def test_per_node_delay():
    box = Mailbox(20, Asynchrony(delay=3, seed=1))
    d = box.delays
    assert d.shape == (20,) and d.min() >= 0 and d.max() <= 3 and len(set(d.tolist())) > 1
    assert (Mailbox(20, Asynchrony(delay=3, seed=1)).delays == d).all()  # fixed by the seed
    for sender in range(1, 20):
        box.post(sender, [0], 5, sender)
    for r in range(6, 10):  # sender s arrives at 5 + 1 + d_s, exactly
        got = box.collect(0, r)
        assert sorted(got) == [s for s in range(1, 20) if 6 + d[s] == r]
    assert box.pending() == 0 and box.delivered == 19


def test_delay_keeps_older_message_until_newer_arrives():
    box = Mailbox(2, Asynchrony(delay=5, seed=0))
    box.delays[:] = [2, 0]  # pin node 0's delay for the test
    box.post(0, [1], 0, "old")  # arrives at 3
    box.post(0, [1], 1, "new")  # arrives at 4
    assert box.collect(1, 3) == {0: "old"}
    assert box.collect(1, 4) == {0: "new"}


def test_drop_all():
    box = Mailbox(5, Asynchrony(drop_prob=1.0))
    for r in range(3):
        for i in range(5):
            assert box.post(i, [j for j in range(5) if j != i], r, i) == []
    assert all(box.collect(i, 10) == {} for i in range(5))
    assert (box.sent, box.dropped, box.delivered) == (60, 60, 0)


def run_lossy(seed: int) -> tuple[list[list[int]], int]:
    box = Mailbox(50, Asynchrony(drop_prob=0.5, seed=seed))
    kept = [box.post(i, [j for j in range(50) if j != i], 0, i) for i in range(50)]
    got = sum(len(box.collect(i, 1)) for i in range(50))
    assert got == box.delivered == box.sent - box.dropped and conserved(box)
    return kept, box.dropped


def test_drop_half():
    kept, dropped = run_lossy(seed=0)
    assert 2450 * 0.45 < dropped < 2450 * 0.55  # 2450 copies, sd ~25
    assert run_lossy(seed=0) == (kept, dropped)
    assert run_lossy(seed=1)[0] != kept


def test_drops_do_not_depend_on_call_order():
    a, b = Mailbox(10, Asynchrony(drop_prob=0.5, seed=3)), Mailbox(10, Asynchrony(drop_prob=0.5, seed=3))
    ka = {i: a.post(i, [j for j in range(10) if j != i], 0, i) for i in range(10)}
    kb = {i: b.post(i, [j for j in reversed(range(10)) if j != i], 0, i) for i in reversed(range(10))}
    assert all(sorted(ka[i]) == sorted(kb[i]) for i in range(10))


@pytest.mark.parametrize("n, frac, k", [(10, 1.0, 10), (10, 0.3, 3), (10, 0.01, 1), (7, 0.5, 4), (100, 0.25, 25)])
def test_active(n, frac, k):
    box = Mailbox(n, Asynchrony(active_fraction=frac, seed=2))
    rounds = [box.active(r) for r in range(20)]
    assert all(len(a) == k and a == sorted(set(a)) and 0 <= a[0] and a[-1] < n for a in rounds)
    assert rounds == [Mailbox(n, Asynchrony(active_fraction=frac, seed=2)).active(r) for r in range(20)]
    if k < n:
        assert len({tuple(a) for a in rounds}) > 1  # a new draw each round


def test_validation():
    for bad in ({"active_fraction": 0}, {"active_fraction": 1.5}, {"drop_prob": -0.1}, {"delay": -1}):
        with pytest.raises(ValueError):
            Asynchrony(**bad)
    box = Mailbox(3)
    with pytest.raises(ValueError):
        box.post(0, [0, 1], 0, None)  # self
    with pytest.raises(ValueError):
        box.post(0, [3], 0, None)  # not a node
    box.post(0, [1], 2, None)
    with pytest.raises(ValueError, match="before round 2"):
        box.collect(1, 1)  # time runs forward


def test_gossip_simulation_is_deterministic():
    def run() -> list:
        box = Mailbox(8, Asynchrony(active_fraction=0.5, drop_prob=0.3, delay=2, seed=9))
        log = []
        for r in range(10):
            for i in box.active(r):
                log.append((r, i, box.collect(i, r)))
                box.post(i, [(i - 1) % 8, (i + 1) % 8], r, (r, i))
        assert conserved(box)
        return log + [box.stats()]

    assert run() == run()
