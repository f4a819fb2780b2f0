"""``vca``: variance-corrected model averaging (strategies/vca.py, docs/methods.md#vca)."""

from __future__ import annotations

import numpy as np
import pytest

from fedens.strategies import STRATEGIES
from fedens.strategies.base import weighted_average
from fedens.algorithms.vca import tensor_var, variance_correct
from fedens.strategies.vca import VarianceCorrectedAveraging

EQUAL3 = np.full(3, 1 / 3)


def clients(seed: int = 0, k: int = 3, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    """K uncorrelated clients of a small net, named as the learners name arrays."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        out.append({
            "0.weight": (rng.normal(0, scale * (1 + 0.3 * i), (32, 16))).astype(np.float32),
            "0.bias": rng.normal(0, 0.1, 32).astype(np.float32),
            "1.running_mean": rng.normal(0, 1, 32).astype(np.float32),
            "1.running_var": rng.uniform(0.5, 2, 32).astype(np.float32),
            "1.num_batches_tracked": np.array(10 + i, dtype=np.int64),
            "2.scale": rng.normal(0, 1, (1,)).astype(np.float32),
            "member.0.3.weight": rng.normal(0, 0.5, (8, 4)).astype(np.float32),
            "member.1.3.weight": rng.normal(0, 2.0, (8, 4)).astype(np.float32),
            "mean.4.weight": rng.normal(0, 1, (6, 5)).astype(np.float32),
            "precision.4.weight": rng.uniform(1, 9, (6, 5)).astype(np.float32),
            "member.0.filled": np.array([1.0, 0.0], dtype=np.float32),
            "mask": rng.integers(0, 2, (4, 4)).astype(np.int32),
        })
    return out


def global_model(seed: int = 9) -> dict[str, np.ndarray]:
    return {k: v * np.float32(1.7) if v.dtype.kind == "f" else v for k, v in clients(seed, k=1)[0].items()}


CORRECTED = ("0.weight", "0.bias", "member.0.3.weight", "member.1.3.weight", "mean.4.weight")
UNTOUCHED = ("1.running_mean", "1.running_var", "1.num_batches_tracked", "2.scale", "precision.4.weight", "member.0.filled", "mask")


def test_registered():
    assert STRATEGIES.get("vca") is VarianceCorrectedAveraging
    with pytest.raises(ValueError, match="target: should be 'others', 'self' or 'conservative'"):
        VarianceCorrectedAveraging(target="mine")


def test_tensor_var_is_unbiased_over_all_elements():
    x = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32)
    assert tensor_var(x) == pytest.approx(np.var(x.astype(np.float64), ddof=1), rel=1e-12)
    assert tensor_var(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(5 / 3)


def test_scale_factor_on_hand_made_tensor():
    avg = np.array([[1.0, 2.0], [3.0, 4.0]])  # mean 2.5, unbiased var 5/3
    for target, eps in ((4.0, 1e-4), (0.5, 1e-4), (2.0, 0.0)):
        out = variance_correct(avg, target, eps)
        scale = np.sqrt((target + eps) / (5 / 3 + eps))
        np.testing.assert_allclose(out, (avg - 2.5) * scale + 2.5, rtol=0, atol=1e-12)
        assert out.mean() == pytest.approx(2.5, abs=1e-12)
    np.testing.assert_array_equal(variance_correct(np.full(4, 3.0), 0.0, 0.0), np.full(4, 3.0))  # no spread


@pytest.mark.parametrize("target", ["others", "self", "conservative"])
def test_eps0_output_variance_is_target_and_mean_kept(target: str):
    arrays, glob, w = clients(), global_model(), np.array([0.2, 0.3, 0.5])
    strat = VarianceCorrectedAveraging(target=target, eps=0.0, c=0.3)
    strat.global_arrays = glob
    out = strat.aggregate_arrays(1, arrays, w)
    plain = weighted_average(arrays, w)
    for name in CORRECTED:
        others = np.mean([np.var(a[name].astype(np.float64), ddof=1) for a in arrays])
        own = np.var(glob[name].astype(np.float64), ddof=1)
        want = {"others": others, "self": own, "conservative": 0.3 * own + 0.7 * others}[target]
        got = np.var(out[name].astype(np.float64), ddof=1)
        assert abs(got - want) <= 1e-6 * max(1.0, want), (name, got, want)
        assert out[name].mean() == pytest.approx(plain[name].astype(np.float64).mean(), abs=1e-6)
        assert out[name].dtype == arrays[0][name].dtype and out[name].shape == arrays[0][name].shape
        assert not np.allclose(out[name], plain[name])  # it did correct something


def test_untouched_tensors_are_the_plain_average():
    arrays, w = clients(), np.array([0.2, 0.3, 0.5])
    strat = VarianceCorrectedAveraging(target="self")
    strat.global_arrays = global_model()
    out, plain = strat.aggregate_arrays(1, arrays, w), weighted_average(arrays, w)
    assert out.keys() == plain.keys()
    for name in UNTOUCHED:
        np.testing.assert_array_equal(out[name], plain[name])
        assert out[name].dtype == plain[name].dtype


def test_identical_clients_give_exactly_the_plain_average():
    one = clients(k=1)[0]
    arrays = [dict(one) for _ in range(3)]
    for target in ("others", "conservative"):
        strat = VarianceCorrectedAveraging(target=target, c=0.0)  # c = 0: the target is the members' variance
        strat.global_arrays = global_model()
        out = strat.aggregate_arrays(1, arrays, EQUAL3)
        plain = weighted_average(arrays, EQUAL3)
        for name in one:
            np.testing.assert_array_equal(out[name], plain[name])


def test_reference_measurement_vanishing_variance_is_undone():
    """docs/methods.md#vca: 4 uncorrelated 32x16 layers; the plain average has about a quarter of the
    members' variance (0.029 vs 0.111), the corrected average is back at 0.111."""
    rng = np.random.default_rng(2024)
    arrays = [{"fc.weight": rng.normal(0, 1 / 3, (32, 16)).astype(np.float32)} for _ in range(4)]
    w = np.full(4, 0.25)
    members = np.mean([tensor_var(a["fc.weight"]) for a in arrays])
    plain = tensor_var(weighted_average(arrays, w)["fc.weight"])
    corrected = tensor_var(VarianceCorrectedAveraging().aggregate_arrays(1, arrays, w)["fc.weight"])
    assert members == pytest.approx(0.111, abs=0.006)
    assert plain == pytest.approx(members / 4, rel=0.12) and plain == pytest.approx(0.029, abs=0.003)
    # back at the members' variance, up to eps's pull: Var(out) = Var(avg) (t + eps) / (Var(avg) + eps)
    assert corrected == pytest.approx(plain * (members + 1e-4) / (plain + 1e-4), rel=1e-6)
    assert corrected == pytest.approx(members, rel=5e-3)


def test_self_target_needs_the_global_model():
    with pytest.raises(ValueError, match="global"):
        VarianceCorrectedAveraging(target="self").aggregate_arrays(1, clients(), EQUAL3)


@pytest.mark.parametrize("kwargs, needle", [
    ({"target": "mine"}, "target: should be"), ({"eps": -1.0}, "eps: should be greater than or equal to 0"),
    ({"eps": float("nan")}, "eps: should be a finite number"), ({"c": 1.5}, "c: should be less than or equal to 1"),
    ({"c": -0.1}, "c: should be greater than or equal to 0"),
])
def test_bad_params_rejected(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        VarianceCorrectedAveraging(**kwargs)
