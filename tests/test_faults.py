"""Fault injection: draws fixed by (seed, round, client), the Byzantine set, and each attack's
arithmetic by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.data.base import ArrayDataset
from fedens.faults import attack, byzantine_clients, draw, flip_labels, poison
from fedens.scenario import FaultsConfig


def test_draws_are_fixed_per_seed_round_client_and_match_the_rates():
    cfg = FaultsConfig(crash_prob=0.2, straggler_prob=0.1, straggler_delay_s=3.0, nan_prob=0.05)
    a = [draw(cfg, 7, r, k, 10) for r in range(1, 201) for k in range(10)]
    b = [draw(cfg, 7, r, k, 10) for r in range(1, 201) for k in range(10)]
    assert a == b  # the same run, the same faults
    assert a != [draw(cfg, 8, r, k, 10) for r in range(1, 201) for k in range(10)]
    n = len(a)  # 2,000 draws: the rates within 4 standard errors
    for rate, got in ((0.2, sum(f.crash for f in a)), (0.1, sum(f.delay_s == 3.0 for f in a)), (0.05, sum(f.nan for f in a))):
        assert abs(got / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    # one probability does not move another's draws: raising crash_prob keeps the same stragglers
    more = FaultsConfig(crash_prob=0.9, straggler_prob=0.1, straggler_delay_s=3.0, nan_prob=0.05)
    assert [f.delay_s for f in a] == [draw(more, 7, r, k, 10).delay_s for r in range(1, 201) for k in range(10)]
    assert not draw(FaultsConfig(), 7, 1, 0, 10).any


def test_byzantine_clients_are_a_fixed_set_of_the_asked_size():
    cfg = FaultsConfig(byzantine={"fraction": 0.3, "kind": "sign_flip"})
    bad = byzantine_clients(cfg, 0, 10)
    assert len(bad) == 3 and bad == byzantine_clients(cfg, 0, 10) and bad <= set(range(10))
    assert all(draw(cfg, 0, r, k, 10).byzantine == ("sign_flip" if k in bad else None) for r in (1, 5) for k in range(10))
    assert byzantine_clients(FaultsConfig(byzantine={"fraction": 0.04}), 0, 10) == frozenset()  # round(0.4) = 0


def test_attacks_by_hand():
    sent = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array([3], np.int64)}
    honest = {"w": np.array([1.5, 1.0], np.float32), "steps": np.array([4], np.int64), "extra": np.ones(2, np.float32)}
    f = draw(FaultsConfig(byzantine={"fraction": 1.0, "kind": "scale", "scale": 10.0}), 0, 1, 0, 1)
    out = attack(honest, sent, f)  # w_g + 10 (w_k - w_g) = (1 + 5, 2 - 10)
    np.testing.assert_allclose(out["w"], [6.0, -8.0])
    assert out["steps"][0] == 4 and out["extra"] is honest["extra"]  # integers and unsent arrays stay honest
    f = draw(FaultsConfig(byzantine={"fraction": 1.0, "kind": "sign_flip", "scale": 1.0}), 0, 1, 0, 1)
    np.testing.assert_allclose(attack(honest, sent, f)["w"], [0.5, 3.0])  # w_g - (w_k - w_g)
    f = draw(FaultsConfig(byzantine={"fraction": 1.0, "kind": "gaussian", "scale": 2.0}), 0, 1, 0, 1)
    noisy = attack(honest, sent, f)["w"]
    expected = sent["w"] + 2.0 * np.random.default_rng(f.noise_seed).standard_normal(2)
    np.testing.assert_allclose(noisy, expected, rtol=1e-6)
    assert not np.allclose(noisy, honest["w"])
    f = draw(FaultsConfig(byzantine={"fraction": 1.0, "kind": "label_flip"}), 0, 1, 0, 1)
    assert attack(honest, sent, f) is honest  # label flipping acts on the data


def test_label_flip_and_nan():
    data = ArrayDataset(np.zeros((4, 2), np.float32), np.array([0, 1, 2, 9], np.int64))
    assert flip_labels(data, 10).y.tolist() == [9, 8, 7, 0]
    bad = poison({"w": np.ones(3, np.float32), "n": np.array([2], np.int64)})
    assert np.isnan(bad["w"]).all() and bad["n"][0] == 2


@pytest.mark.parametrize("text, key", [("crash_prob: 1.5", "crash_prob"), ("byzantine: {kind: flip}", "kind"),
                                       ("nan_prob: -0.1", "nan_prob"), ("straggler_delay_s: .inf", "straggler_delay_s")])
def test_bad_fault_settings_are_refused(text, key):
    import yaml

    with pytest.raises(Exception, match=key):
        FaultsConfig.model_validate(yaml.safe_load("{" + text + "}"))


def test_an_exploded_training_loss_is_divergence():
    from fedens.grid import Diverged, exploded

    limit = 100 * np.log(10)  # 230.3
    assert exploded(3, 2.1, 10, 100.0) is None and exploded(3, None, 10, 100.0) is None
    assert exploded(3, 230.0, 10, 100.0) is None
    err = exploded(3, 231.0, 10, 100.0)
    assert isinstance(err, Diverged) and "diverged at round 3" in str(err) and f"{limit:.3g}" in str(err)
    assert isinstance(exploded(2, float("nan"), 10, 100.0), Diverged)
    assert isinstance(exploded(2, float("inf"), 2, 1.0), Diverged)
    assert exploded(2, 5e8, 10, None) is None  # turned off
    assert exploded(2, 0.69, 2, 1.0) is None and isinstance(exploded(2, 0.7, 2, 1.0), Diverged)  # log 2 = 0.693
