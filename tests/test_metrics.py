"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedens.metrics import brier, classification_metrics, nll, reliability_bins

# Four examples, three classes. Top-1: 0.7 (right), 0.5 (wrong), 0.8 (right), 0.4 (wrong).
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 2, 1])


def test_accuracy_nll_brier_by_hand():
    m = classification_metrics(PROBS, LABELS)
    assert m["accuracy"] == pytest.approx(0.5)
    # NLL = -(ln .7 + ln .4 + ln .8 + ln .3) / 4
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.8) + math.log(0.3)) / 4)
    assert m["nll"] == pytest.approx(0.6750205, abs=1e-6)
    # Brier rows: .09+.04+.01, .36+.25+.01, .01+.01+.04, .09+.49+.16 -> mean 1.56/4
    assert m["brier"] == pytest.approx(0.39)
    assert nll(PROBS, LABELS) == m["nll"] and brier(PROBS, LABELS) == m["brier"]


def test_ece_ten_bins_by_hand():
    # each example alone in its bin: (|1-.7| + |0-.5| + |1-.8| + |0-.4|) / 4
    assert classification_metrics(PROBS, LABELS, n_bins=10)["ece"] == pytest.approx(0.35)


def test_ece_two_bins_by_hand():
    # bin [0, .5): conf .4, wrong -> gap .4 weight 1/4; bin [.5, 1]: confs .7 .5 .8 (mean 2/3), acc 2/3 -> gap 0
    assert classification_metrics(PROBS, LABELS, n_bins=2)["ece"] == pytest.approx(0.1)


def test_perfect_and_uniform_predictions():
    onehot = torch.eye(3, dtype=torch.float64)
    m = classification_metrics(onehot, torch.tensor([0, 1, 2]))
    assert m["accuracy"] == 1 and m["nll"] == pytest.approx(0, abs=1e-9) and m["ece"] == pytest.approx(0) and m["brier"] == 0
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    m = classification_metrics(uniform, torch.tensor([0, 1, 2, 3]))
    assert m["nll"] == pytest.approx(math.log(4))
    assert m["brier"] == pytest.approx(0.75)  # 3 * 0.25^2 + 0.75^2


def test_nll_of_certain_mistake_is_large_but_finite():
    assert nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))


def test_reliability_bins_give_the_same_ece():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (500,), generator=g)
    bins = reliability_bins(probs, labels, 10)
    n = sum(bins["count"])
    ece = sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]))
    assert n == 500
    assert ece == pytest.approx(classification_metrics(probs, labels, 10)["ece"], abs=1e-6)  # torchmetrics works in float32


def test_reliability_bins_by_hand():
    bins = reliability_bins(PROBS, LABELS, 2)
    assert bins["count"] == [1, 3]
    assert bins["accuracy"] == pytest.approx([0, 2 / 3])
    assert bins["confidence"] == pytest.approx([0.4, 2 / 3])


# Two members, two inputs, two classes; labels [0, 1].
#   member 0: [[.9, .1], [.6, .4]]  -> predicts 0, 0
#   member 1: [[.5, .5], [.2, .8]]  -> predicts 0 (tie goes to the first class), 1
#   mean:     [[.7, .3], [.4, .6]]  -> predicts 0, 1
MEMBERS = torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.2, 0.8]]], dtype=torch.float64)


def H(*p: float) -> float:
    return -sum(q * math.log(q) for q in p)


def test_ensemble_metrics_by_hand():
    from fedens.metrics import ensemble_metrics

    m = ensemble_metrics(MEMBERS, torch.tensor([0, 1]))
    assert m["member_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["disagreement"] == pytest.approx(1 / 4)  # member 0 on input 1 only
    total = (H(0.7, 0.3) + H(0.4, 0.6)) / 2
    assert m["entropy"] == pytest.approx(total)
    aleatoric = ((H(0.9, 0.1) + H(0.5, 0.5)) / 2 + (H(0.6, 0.4) + H(0.2, 0.8)) / 2) / 2
    assert m["mutual_information"] == pytest.approx(total - aleatoric)


def test_single_member_has_no_disagreement_or_mutual_information():
    from fedens.metrics import ensemble_metrics

    m = ensemble_metrics(MEMBERS[:1], torch.tensor([0, 1]))
    assert m["disagreement"] == 0 and m["mutual_information"] == pytest.approx(0, abs=1e-12)


def test_ood_auroc_by_hand():
    from fedens.metrics import ood_auroc

    # OOD scores all above in-distribution ones -> 1; all below -> 0; one swapped pair of 2x2 -> 3/4
    assert ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9])) == pytest.approx(1.0)
    assert ood_auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])) == pytest.approx(0.0)
    assert ood_auroc(torch.tensor([0.1, 0.6]), torch.tensor([0.5, 0.9])) == pytest.approx(0.75)


def test_accuracy_ece_auroc_equal_torchmetrics():
    """fedens computes these itself (torchmetrics costs ~2 s of imports per process); they must
    be torchmetrics' numbers: accuracy and ECE bit for bit, AUROC to float32 rounding."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    from fedens.metrics import accuracy, ece, ood_auroc

    g = torch.Generator().manual_seed(0)
    for t in range(60):
        n, c, bins = int(torch.randint(1, 400, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g)), 2 + t % 15
        probs = torch.softmax(8 * float(torch.rand(1, generator=g)) * torch.randn(n, c, generator=g, dtype=torch.float64), 1)
        if t % 4 == 0:  # confidences of exactly 1: torchmetrics gives them a bin of their own, fedens the top bin
            probs[: n // 3] = torch.nn.functional.one_hot(torch.randint(0, c, (n // 3,), generator=g), c).double()
        labels = torch.randint(0, c, (n,), generator=g)
        assert accuracy(probs, labels) == float(tm.multiclass_accuracy(probs, labels, num_classes=c, average="micro"))
        if t % 4:
            assert ece(probs, labels, bins) == pytest.approx(
                float(tm.multiclass_calibration_error(probs, labels, num_classes=c, n_bins=bins)), abs=1e-6)
        else:  # by hand: bin b = min(floor(conf * bins), bins - 1)
            conf, pred = probs.max(1)
            b = torch.clamp((conf * bins).floor().long(), max=bins - 1)
            want = sum(abs(float(((pred == labels) & (b == k)).double().sum() - conf[b == k].sum())) / n for k in range(bins))
            assert ece(probs, labels, bins) == pytest.approx(want, abs=1e-5)
        s_in = torch.rand(n, generator=g, dtype=torch.float64)
        s_out = torch.rand(max(n // 2, 1), generator=g, dtype=torch.float64) + 0.3
        if t % 3 == 0:  # ties
            s_in, s_out = (s_in * 4).round() / 4, (s_out * 4).round() / 4
        target = torch.cat([torch.zeros(len(s_in)), torch.ones(len(s_out))]).long()
        assert ood_auroc(s_in, s_out) == pytest.approx(float(tm.binary_auroc(torch.cat([s_in, s_out]), target)), abs=1e-6)


def test_auroc_by_hand():
    from fedens.metrics import ood_auroc

    # pairs (out, in): 3 > 1, 3 > 2, 2 == 2 (one half), 2 > 1 -> (1 + 1 + 0.5 + 1) / 4
    assert ood_auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])) == pytest.approx(0.875)
    assert ood_auroc(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 0.9])) == 1.0
    assert ood_auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.0, 0.1])) == 0.0


def test_ece_closes_the_last_bin_on_the_right():
    # 5 wrong predictions at confidence exactly 1.0 and 6 right ones at 0.95. One top bin
    # [0.9, 1]: accuracy 6/11, confidence (5 + 6 * 0.95)/11 = 10.7/11, so ECE = 4.7/11. With 1.0 in
    # a bin of its own (torchmetrics 1.x) the bins would be scored apart: (5 * 1 + 6 * 0.05)/11.
    probs = torch.tensor([[1.0, 0.0]] * 5 + [[0.95, 0.05]] * 6)
    labels = torch.tensor([1] * 5 + [0] * 6)
    assert classification_metrics(probs, labels, 10)["ece"] == pytest.approx(4.7 / 11, abs=1e-6)
    split = (5 * 1.0 + 6 * 0.05) / 11
    from torchmetrics.functional.classification import multiclass_calibration_error

    assert float(multiclass_calibration_error(probs, labels, num_classes=2, n_bins=10)) == pytest.approx(split, abs=1e-6)
    bins = reliability_bins(probs, labels, 10)
    assert bins["count"][-1] == 11 and bins["accuracy"][-1] == pytest.approx(6 / 11)


def test_weighted_predictive_and_its_uncertainty_by_hand():
    from fedens.metrics import ensemble_metrics, predictive

    # two members on one input: (1, 0) and (0.5, 0.5), weights (0.75, 0.25)
    probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]], dtype=torch.float64)
    w = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert predictive(probs, w).tolist() == [[0.875, 0.125]]
    assert predictive(probs).tolist() == [[0.75, 0.25]]  # uniform without weights
    h = -(0.875 * math.log(0.875) + 0.125 * math.log(0.125))
    m = ensemble_metrics(probs, torch.tensor([0]), w)
    assert m["entropy"] == pytest.approx(h)
    # sum_m w_m H[p_m] = 0.75 * 0 + 0.25 * log 2
    assert m["mutual_information"] == pytest.approx(h - 0.25 * math.log(2))
