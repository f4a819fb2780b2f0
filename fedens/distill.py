"""Knowledge distillation on the server's public split (docs/methods.md#distillation): the
training step FedBE distils with, and the ``distill:`` scenario section, which distils the
global ensemble or posterior of any federated run into one network (the student) at every
evaluation, evaluated as its own scopes (``global-test-student``, ``global-shift-student``).

The student is a ``single`` learner of the scenario's model. Its targets are the global
predictive on the public inputs (an ensemble's weighted mixture, a posterior's sampled mean),
``sharpen``-ed by ``temperature`` (1: the predictive itself); it minimises
``KL(targets || softmax(student(x)))`` with SGD and returns the average of its weights at the end
of each epoch (SWA, as FedBE). The labels of the public split are never read. The first student
starts from a network initialised from ``(seed, "student")``; every later one continues from the
previous student (warm start), so each evaluation costs ``epochs`` epochs of the public split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedens.algorithms.arrays import Arrays
from fedens.data import ArrayDataset
from fedens.learners.base import Learner, minibatches, module_arrays
from fedens.scenario import DistillConfig


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """FedBE's ``temp_sharpen``: ``p^(1/T)`` renormalised over the last axis (floored at 1e-8
    before renormalising). ``T = 1`` is the identity, ``T < 1`` sharpens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = probs.double().clamp_min(0) ** (1.0 / temperature)
    p = p.clamp_min(1e-8)
    return (p / p.sum(-1, keepdim=True)).to(probs.dtype)


def distill(
    learner: Learner,
    targets: torch.Tensor,
    data: ArrayDataset,
    *,
    epochs: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    generator: torch.Generator,
) -> tuple[Arrays, list[float]]:
    """Train ``learner.model`` (a ``single``-style learner, already at its start point) on
    KL(targets ‖ softmax(model(x))) over ``data.x`` (``targets`` ``(n, classes)``, rows aligned
    with ``data``; ``data.y`` is never read) with SGD, and return ``(swa_arrays, epoch_losses)``:
    the equal-weight average of the network's arrays at the end of each epoch, and the mean KL of
    each epoch. The learner is left at the last epoch's weights."""
    if epochs < 1:
        raise ValueError(f"distillation needs epochs >= 1, got {epochs}")
    model = learner.model
    index = ArrayDataset(np.ascontiguousarray(data.x), np.arange(len(data), dtype=np.int64))  # rows, not labels
    targets = targets.to(learner.device, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    swa: dict[str, np.ndarray] = {}
    losses = []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for x, rows in minibatches(index, batch_size, generator, learner.device):
            loss = F.kl_div(F.log_softmax(model(x), dim=-1), targets[rows], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(rows), count + len(rows)
        losses.append(total / max(count, 1))
        current = module_arrays(model)
        for name, value in current.items():  # running mean over epochs (SWA)
            if np.issubdtype(value.dtype, np.floating) and name in swa:
                swa[name] = (swa[name].astype(np.float64) * epoch + value.astype(np.float64)) / (epoch + 1)
            else:
                swa[name] = value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else value
    dtypes = {k: v.dtype for k, v in module_arrays(model).items()}
    return {k: np.asarray(v).astype(dtypes[k]) for k, v in swa.items()}, losses


def fit_student(student: Learner, teacher_probs: torch.Tensor, public: ArrayDataset, cfg: DistillConfig,
                generator: torch.Generator) -> list[float]:
    """Distil ``teacher_probs`` ``(n, classes)`` (rows aligned with ``public``) into ``student``
    (a ``single`` learner at its start point) by ``cfg``; the student ends at the SWA of its
    epochs. Returns each epoch's mean KL."""
    targets = sharpen(teacher_probs, cfg.temperature)
    swa, losses = distill(student, targets, public, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, generator=generator)
    student.set_arrays(swa)
    return losses
