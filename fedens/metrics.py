"""Classification and calibration metrics of a predictive distribution.

Conventions: ``probs`` is ``(batch, classes)`` (an ensemble's members already averaged, since
NLL and calibration are of the *averaged* predictive, as in bayes-admm's ``test_bayes``),
``labels`` is ``(batch,)`` of class indices.

- accuracy: top-1, the share of inputs whose most probable class is the label.
- ECE: L1 calibration error over ``n_bins`` equal-width bins of the top-1 confidence in [0, 1].
  fedens uses 10 bins by default, as the IVON and LoRA-Ensemble papers do.
- NLL: ``-mean log p(y|x)``, with probabilities clamped at 1e-12 so that one confident mistake
  gives a large but finite number.
- Brier: ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (the multi-class sum, range [0, 2]).

Accuracy, ECE and the OOD AUROC give exactly the numbers of torchmetrics'
``multiclass_accuracy`` (micro), ``multiclass_calibration_error`` (L1) and ``binary_auroc``, and
a test checks them against torchmetrics. They are written out here because importing
torchmetrics costs about 2 s in every process (it pulls in scipy.signal and matplotlib), paid
by the driver and by every Ray actor at start-up.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` under ``probs`` ``(batch, classes)``."""
    p = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-torch.log(p.clamp_min(EPS)).mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - onehot_ic)^2``."""
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


METRIC_KEYS = ("accuracy", "nll", "ece", "brier")  # what classification_metrics reports, in every scope
# Metrics where a larger value is better; every other one (losses, calibration errors) is minimised.
HIGHER_IS_BETTER = frozenset({"accuracy", "ood_auroc", "ood_auroc_mi", "member_accuracy", "accuracy_worst",
                              "val_accuracy", "routing_gain", "threshold_gain", "threshold_accuracy"})


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better (its name without a scope prefix or ``_min``/``_max``)."""
    return metric in HIGHER_IS_BETTER or metric.removesuffix("_min").removesuffix("_max") in HIGHER_IS_BETTER


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier of ``probs`` ``(batch, classes)`` against ``labels`` ``(batch,)``."""
    probs = probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "brier": brier(probs, labels),
    }


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``probs`` ``(batch, classes)``, in float32 as torchmetrics reports it."""
    correct = (probs.argmax(1) == labels.long()).sum()
    return float(correct.float() / max(len(labels), 1))


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error, L1, over ``n_bins`` equal-width bins of the top-1 confidence.

    ``sum_b |acc_b - conf_b| * n_b / n``. A confidence c falls in bin ``b`` with
    ``edges[b] <= c < edges[b+1]``, and the last bin is closed on the right: c = 1 exactly joins
    ``[1 - 1/n_bins, 1]``. torchmetrics (1.x) gives c = 1 an extra bin of its own, which splits
    the top bin and raises the ECE of an over-confident model (docs/methods.md#metrics has the
    case); otherwise the numbers are torchmetrics', computed as it does in float32."""
    conf, pred = probs.max(1)
    conf = conf.float()
    correct = (pred == labels.long()).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)  # (batch,)
    count = torch.zeros(n_bins).scatter_add_(0, idx, torch.ones_like(conf))
    conf_bin = torch.nan_to_num(torch.zeros(n_bins).scatter_add_(0, idx, conf) / count)
    acc_bin = torch.nan_to_num(torch.zeros(n_bins).scatter_add_(0, idx, correct) / count)
    return float(torch.sum(torch.abs(acc_bin - conf_bin) * (count / count.sum())))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, list[float]]:
    """Per-bin accuracy, mean confidence and count over equal-width confidence bins.

    A confidence c falls in bin ``b`` with ``edges[b] <= c < edges[b+1]``, the last bin closed on
    the right, as in ``ece``, so ``sum_b count_b/n |acc_b - conf_b|`` is the ECE above. Empty
    bins have accuracy and confidence 0.
    """
    probs = probs.detach().double().cpu()
    conf, pred = probs.max(1)
    correct = (pred == labels.long().cpu()).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / count.clamp_min(1)
    mean_conf = torch.bincount(idx, weights=conf, minlength=n_bins) / count.clamp_min(1)
    return {
        "edges": edges.tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "count": count.tolist(),
    }


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis: ``(..., classes) -> (...)``."""
    return -(probs * torch.log(probs.clamp_min(EPS))).sum(-1)


def predictive(member_probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ensemble's predictive ``(batch, classes)``: ``sum_m w_m p_m`` over members
    ``(members, batch, classes)``, with ``weights`` ``(members,)`` (summing to 1) or uniform."""
    if weights is None:
        return member_probs.mean(0)
    w = weights.to(member_probs)
    return (w.view(-1, *([1] * (member_probs.ndim - 1))) * member_probs).sum(0)


def ensemble_metrics(member_probs: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor | None = None) -> dict[str, float]:
    """Diversity and uncertainty of members' predictions ``(members, batch, classes)``, the
    ensemble's predictive weighted by ``weights`` ``(members,)`` (default uniform).

    - member_accuracy: mean over members of each member's own accuracy.
    - disagreement: mean over members of the fraction of inputs where the member's top-1 differs
      from the ensemble's (0 for a single network).
    - entropy: mean predictive entropy ``H[sum_m w_m p_m]`` (total uncertainty).
    - mutual_information: mean ``H[sum_m w_m p_m] - sum_m w_m H[p_m]`` (the epistemic part; 0
      for a single network).
    Member accuracy and disagreement are plain means over members.
    """
    member_probs = member_probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    mean = predictive(member_probs, weights)
    member_pred, ens_pred = member_probs.argmax(-1), mean.argmax(-1)
    total = entropy(mean)
    return {
        "member_accuracy": float((member_pred == labels).double().mean()),
        "disagreement": float((member_pred != ens_pred).double().mean()),
        "entropy": float(total.mean()),
        "mutual_information": float((total - predictive(entropy(member_probs)[..., None], weights)[..., 0]).mean()),
    }


def uncertainty_scores(member_probs: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-input scores ``(batch,)`` that should be higher out of distribution (the predictive
    weighted as in ``ensemble_metrics``)."""
    member_probs = member_probs.detach().double().cpu()
    mean = predictive(member_probs, weights)
    total = entropy(mean)
    expected = predictive(entropy(member_probs)[..., None], weights)[..., 0]  # sum_m w_m H[p_m]
    return {"entropy": total, "mutual_information": total - expected, "max_prob": -mean.max(-1).values}


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of telling out-of-distribution inputs (positives) from in-distribution ones by a
    score ``(n,)`` that is higher for OOD; 0.5 is chance.

    The Mann-Whitney form: the probability that a random OOD input scores higher than a random
    test input, ties counting one half, which is the area under the ROC curve exactly."""
    scores = torch.cat([score_in, score_out]).double()
    if len(score_in) == 0 or len(score_out) == 0:
        return 0.0
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # mid-ranks (1-based) of every distinct value, so tied scores share their average rank
    rank_of = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    ranks = rank_of[inverse]
    n_in, n_out = len(score_in), len(score_out)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))
