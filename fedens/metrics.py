"""Classification and calibration metrics of a predictive distribution.

Conventions: ``probs`` is ``(batch, classes)`` (an ensemble's members already averaged, since
NLL and calibration are of the *averaged* predictive, as in bayes-admm's ``test_bayes``),
``labels`` is ``(batch,)`` of class indices.

- accuracy: top-1 (torchmetrics ``MulticlassAccuracy``, micro average).
- ECE: L1 calibration error over ``n_bins`` equal-width bins of the top-1 confidence in [0, 1]
  (torchmetrics ``MulticlassCalibrationError``). fedens uses 10 bins by default, as the IVON
  and LoRA-Ensemble papers do (torchmetrics' own default is 15).
- NLL: ``-mean log p(y|x)``, with probabilities clamped at 1e-12 so that one confident mistake
  gives a large but finite number. torchmetrics has no NLL of probabilities.
- Brier: ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (the multi-class sum, range [0, 2]).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

EPS = 1e-12


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` under ``probs`` ``(batch, classes)``."""
    p = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-torch.log(p.clamp_min(EPS)).mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - onehot_ic)^2``."""
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier of ``probs`` ``(batch, classes)`` against ``labels`` ``(batch,)``."""
    probs = probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    c = probs.shape[1]
    return {
        "accuracy": float(multiclass_accuracy(probs, labels, num_classes=c, average="micro")),
        "nll": nll(probs, labels),
        "ece": float(multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins, norm="l1")),
        "brier": brier(probs, labels),
    }


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, list[float]]:
    """Per-bin accuracy, mean confidence and count over equal-width confidence bins.

    A confidence c falls in bin ``b`` with ``edges[b] <= c < edges[b+1]``, as in torchmetrics,
    so ``sum_b count_b/n |acc_b - conf_b|`` is the ECE above. One difference, for display only:
    torchmetrics puts c = 1 exactly in a bin of its own, here it joins the last bin. Empty
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


def ensemble_metrics(member_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Diversity and uncertainty of members' predictions ``(members, batch, classes)``.

    - member_accuracy: mean over members of each member's own accuracy.
    - disagreement: mean over members of the fraction of inputs where the member's top-1 differs
      from the ensemble's (0 for a single network).
    - entropy: mean predictive entropy ``H[mean_m p_m]`` (total uncertainty).
    - mutual_information: mean ``H[mean_m p_m] - mean_m H[p_m]`` (the epistemic part; 0 for a
      single network).
    """
    member_probs = member_probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    mean = member_probs.mean(0)
    member_pred, ens_pred = member_probs.argmax(-1), mean.argmax(-1)
    total = entropy(mean)
    return {
        "member_accuracy": float((member_pred == labels).double().mean()),
        "disagreement": float((member_pred != ens_pred).double().mean()),
        "entropy": float(total.mean()),
        "mutual_information": float((total - entropy(member_probs).mean(0)).mean()),
    }


def uncertainty_scores(member_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input scores ``(batch,)`` that should be higher out of distribution."""
    member_probs = member_probs.detach().double().cpu()
    mean = member_probs.mean(0)
    total = entropy(mean)
    return {"entropy": total, "mutual_information": total - entropy(member_probs).mean(0), "max_prob": -mean.max(-1).values}


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of telling out-of-distribution inputs (positives) from in-distribution ones by a
    score ``(n,)`` that is higher for OOD (torchmetrics ``binary_auroc``); 0.5 is chance."""
    from torchmetrics.functional.classification import binary_auroc

    scores = torch.cat([score_in, score_out]).double()
    target = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))]).long()
    return float(binary_auroc(scores, target))
