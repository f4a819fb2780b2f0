"""``early_exit``: a dynamic network with an exit after every block and gates that decide where
each input leaves, trained jointly (JEI-DNN: Regol, Chataoui & Coates, "Jointly-Learned Exit and
Inference for a Dynamic Neural Network", ICLR 2024, arXiv 2310.09163; docs/methods.md#early-exit).

Structure. The scenario's model (a ``nn.Sequential``: ``mlp``, ``cnn``, ``cnn1d``) is cut into
L blocks after each activation (``split_blocks``); block l's output feeds an inference module
IM_l (a linear classifier on the flattened, or pooled, features) and the last block's output
feeds the model's own head, so exit L-1 *is* the plain network. Gate l < L-1 reads IM_l's
prediction through three uncertainty features (max probability, top-1 minus top-2 margin,
entropy / log C) and outputs g_l = sigmoid(a_l . u_l + b_l), the probability of exiting at l
once l is reached. The exit distribution of an input is

    q_l = g_l prod_{j<l} (1 - g_j)      (l < L-1),      q_{L-1} = prod_{j<L-1} (1 - g_j).

Training, per minibatch (both losses in one step; they touch disjoint parameters):
- IMs: sum_l q_l CE_l, with q detached, so each IM learns most on the inputs its gate will send
  it (the paper's weighted IM loss); for ``warmup_rounds`` rounds q is uniform, since gates on
  untrained IMs carry no information. ``im_loss: uniform`` keeps q uniform throughout.
- Blocks (``backbone: deepest``, the default): only the deepest held exit's CE, at full weight,
  reaches them; the IMs before it read detached features, as the authors' IMs sit on a frozen
  pretrained backbone. ``backbone: joint`` lets every IM's weighted loss train the blocks.
  Measured (benchmarks/early_exit.yaml, MNIST-1D, 5 seeds): joint training costs the network
  6.8 points of accuracy (the last exit starves: the gates send everything to exit 2, whose
  loss then shapes the features), deepest keeps the plain network's accuracy within 0.3 points.
- Gates: the best exit of an input is l* = argmin_l (CE_l + lambda c_l), with c_l the compute
  used up to exit l as a fraction of the whole (``exit_costs``, c_{L-1} = 1) and CE_l detached;
  gate l's target is 1 when l >= l* (exit at l*, and later gates would exit too) and 0 before,
  fitted by binary cross-entropy with the ones weighted by #zeros / #ones of the batch (the
  targets are unbalanced towards 0). This is the authors' "exit subsequent" gate objective.
Inference is deterministic: an input leaves at the first l with g_l >= 0.5, else at L-1; the
predictive is that exit's softmax, so every recorded metric is the deployed predictor's.
``extra_metrics`` adds the mean exit depth, the compute fraction, each exit's own accuracy, ECE
and share of inputs, and ``routing_gain``: the deployed accuracy minus the best accuracy of
routing inputs at random to fixed exits at the same mean compute (what the gates add over
input-blind exits, ``static_routing_accuracy``), and the early-exit literature's baseline at the
same mean compute: confidence-threshold exits (an input leaves at the first exit whose max
softmax probability reaches tau, with tau chosen on the evaluated set so that the mean compute
matches the gated predictor's, ``matched_threshold``): ``threshold_*`` and ``threshold_gain``.

Federated depth budgets. ``depth_budget`` gives each client the number of exits it holds
(fixed, per client, or drawn per client from ``probs`` with the run's seed): a client with
budget d trains blocks and IMs 0..d-1 and gates 0..d-2 (its last exit has no gate) and sends
only those; ``partial_avg`` averages each tensor over the clients that hold it (HeteroFL's rule).
The server's model has every exit. A budget of L everywhere is the plain FedAvg of the whole
network (tests/learners/test_early_exit.py).

Payload names: ``blocks.<l>.*``, ``heads.<l>.*`` (``heads.<L-1>`` is the model's head) and
``gates.<l>.*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from fedens.data import ArrayDataset
from fedens.learners import LEARNERS
from fedens.learners.base import Learner, load_module_arrays, make_optimizer, minibatches, module_arrays
from fedens.metrics import classification_metrics
from fedens.scenario import TrainConfig
from fedens.seeding import derive_seed

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU)
_TRAILING = (nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_BUDGET_TAG = 2**34  # the seed stream of drawn depth budgets, apart from rounds and evaluations


class DepthDistribution(BaseModel):
    """Budgets drawn per client: ``probs[d-1]`` is the chance of holding d exits."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    probs: list[float] = Field(min_length=1)

    def model_post_init(self, _: Any) -> None:
        if any(p < 0 for p in self.probs) or not math.isclose(sum(self.probs), 1.0, abs_tol=1e-6):
            raise ValueError("probs must be non-negative and sum to 1")


class EarlyExitOptions(BaseModel):
    """Options of ``early_exit`` (the scenario's ``learner:`` keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cost_weight: float = Field(0.1, ge=0, description="lambda: the loss an input may give up to save all compute")
    warmup_rounds: int = Field(1, ge=0, description="rounds in which every IM weighs every input equally")
    backbone: Literal["joint", "deepest"] = Field("deepest",
                          description="what trains the blocks: every exit's loss, or only the deepest held exit's")
    im_loss: Literal["gated", "uniform"] = Field("gated",
                         description="IM loss weights: the exit distribution q (the paper), or 1/L (the authors' code in effect)")
    head: Literal["flatten", "pool"] = Field("flatten", description="IM input: flattened features, or pooled over space")
    threshold: float = Field(0.5, gt=0, lt=1, description="exit where the gate's probability reaches this")
    depth_budget: int | list[int] | DepthDistribution | None = Field(
        None, description="exits each client holds: one number, one per client, or {probs: [...]} over 1..L; None = all")

    @field_validator("depth_budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        """A mapping is a distribution: its own error, not the union's first branch's."""
        if isinstance(value, dict):
            try:
                return DepthDistribution.model_validate(value)
            except ValidationError as err:
                e = err.errors()[0]
                where = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"{where + ': ' if where else ''}{e['msg'].removeprefix('Value error, ')}") from None
        return value


def split_blocks(model: nn.Module) -> tuple[list[nn.Sequential], nn.Sequential]:
    """Cut a sequential network into blocks and its head: a block ends after an activation and
    any dropout or pooling right after it; what follows the last block is the head. The modules
    are the model's own (shared weights), so the blocks then the head compute the model."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"early_exit needs a sequential model (mlp, cnn, cnn1d), got {type(model).__name__}")
    segments: list[list[nn.Module]] = [[]]
    closed = False
    for layer in model:
        if closed and not isinstance(layer, _TRAILING):
            segments.append([])
            closed = False
        segments[-1].append(layer)
        closed = closed or isinstance(layer, _ACTIVATIONS)
    if closed:  # the model ends with an activation: nothing is left for a head
        raise ValueError("early_exit: the model ends with an activation, it has no head")
    return [nn.Sequential(*s) for s in segments[:-1]], nn.Sequential(*segments[-1])


def count_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-accumulates per input of ``module`` on a batch ``x`` (linear and convolution
    layers; activations and pooling are free next to them), and its output."""
    total = 0

    def hook(m: nn.Module, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out[0].numel() * m.in_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            total += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    return total, out


GATE_FEATURES = ("max_prob", "margin", "entropy", "sharpened_entropy")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / math.log(max(p.shape[-1], 2))


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """The uncertainty features a gate reads (as the authors' gates), ``(batch, 4)`` from IM
    logits ``(batch, C)``: max probability, top-1 minus top-2 probability, entropy of p and of
    p^2 / sum p^2, both divided by log C."""
    p = F.softmax(logits, dim=-1)
    top = p.topk(min(2, p.shape[-1]), dim=-1).values
    margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
    sharp = p.square() / p.square().sum(-1, keepdim=True)
    return torch.stack([top[:, 0], margin, _entropy(p), _entropy(sharp)], dim=-1)


def inference_module(features: torch.Tensor, num_classes: int, head: str) -> nn.Module:
    """IM for block outputs ``features (batch, ...)``: a linear classifier on the flattened
    features, or (``head: pool``) on their mean over space ``(batch, C)``."""
    if head == "pool" and features.dim() > 2:
        return nn.Sequential(_MeanOverSpace(), nn.Linear(features.shape[1], num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(features[0].numel(), num_classes))


def exit_distribution(g: torch.Tensor) -> torch.Tensor:
    """``q (batch, L)`` from gate probabilities ``g (batch, L-1)``: q_l = g_l prod_{j<l} (1 - g_j),
    the last exit takes what is left."""
    one = g.new_ones((g.shape[0], 1))
    survive = torch.cumprod(torch.cat([one, 1 - g], dim=1), dim=1)  # prod_{j<l} (1 - g_j), (batch, L)
    return torch.cat([g, one], dim=1) * survive


def gate_targets(level_loss: torch.Tensor) -> torch.Tensor:
    """Targets ``(batch, L-1)`` of the gates from ``level_loss (batch, L)`` = CE_l + lambda c_l:
    1 at and after the best exit l*, 0 before it (the last exit has no gate)."""
    best = level_loss.argmin(dim=1, keepdim=True)  # (batch, 1)
    return (torch.arange(level_loss.shape[1] - 1, device=level_loss.device) >= best).to(level_loss.dtype)


def gate_loss(gate_logits: torch.Tensor, targets: torch.Tensor, max_ratio: float = 5.0) -> torch.Tensor:
    """Binary cross-entropy of the gates ``(batch, L-1)``, the ones weighted by #zeros / #ones
    of the batch, at most ``max_ratio`` (1 when the batch has no ones): the authors balance the
    targets, which lean to 0, by this ratio and cap it at 5."""
    ones = targets.sum()
    ratio = ((targets.numel() - ones) / ones).clamp(max=max_ratio) if ones > 0 else torch.ones((), device=targets.device)
    weight = targets * ratio + (1 - targets)
    return (F.binary_cross_entropy_with_logits(gate_logits, targets, reduction="none") * weight).mean()


class EarlyExitNet(nn.Module):
    """Blocks, their inference modules and the gates; ``heads[L-1]`` is the model's head."""

    def __init__(self, model: nn.Module, sample: torch.Tensor, num_classes: int, head: str = "flatten") -> None:
        super().__init__()
        blocks, tail = split_blocks(model)
        if len(blocks) < 2:
            raise ValueError("early_exit: the model has a single block (one exit); it needs at least two")
        model.eval()  # counting runs the blocks once: no dropout draws, no normalisation statistics
        h, feats, macs = sample, [], []
        for block in blocks:  # the blocks' outputs (for the IMs' sizes) and their cost per input
            m, h = count_macs(block, h)
            feats.append(h)
            macs.append(m)
        heads: list[nn.Module] = [inference_module(f, num_classes, head) for f in feats[:-1]] + [tail]
        head_macs = [count_macs(im, f)[0] for im, f in zip(heads, feats)]
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.gates = nn.ModuleList(nn.Linear(len(GATE_FEATURES), 1) for _ in range(len(blocks) - 1))
        model.train()
        # c_l: the work of blocks and IMs 0..l (an input that leaves at l has computed them all),
        # as a fraction of an input that goes through every exit; the gates' 5 MACs are left out.
        cum = np.cumsum(np.add(macs, head_macs), dtype=np.float64)
        self.register_buffer("costs", torch.tensor(cum / cum[-1], dtype=torch.float32), persistent=False)
        # A fixed exit l (no gates) computes blocks 0..l and IM l only: the input-blind baseline's cost.
        static = np.cumsum(macs, dtype=np.float64) + np.asarray(head_macs, dtype=np.float64)
        self.register_buffer("static_costs", torch.tensor(static / cum[-1], dtype=torch.float32), persistent=False)
        self.total_macs = float(cum[-1])  # a pass through every block and IM
        self.plain_macs = int(static[-1])  # the plain network: every block and the model's head

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def exits(self, x: torch.Tensor, depth: int, detach: bool = False) -> list[torch.Tensor]:
        """Logits ``(batch, C)`` of exits 0..depth-1; with ``detach`` the IMs before the deepest
        read detached features (their losses train them, not the blocks)."""
        out = []
        for l, (block, head) in enumerate(zip(self.blocks[:depth], self.heads[:depth])):
            x = block(x)
            out.append(head(x.detach() if detach and l < depth - 1 else x))
        return out

    def gate_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Gate logits ``(batch, len(logits) - 1)`` from the exits' (detached) logits."""
        if len(logits) < 2:
            return logits[0].new_zeros((logits[0].shape[0], 0))
        return torch.cat([gate(gate_features(z.detach())) for gate, z in zip(self.gates, logits[:-1])], dim=1)


class _MeanOverSpace(nn.Module):
    """Global average over every axis after the channels: ``(b, C, ...) -> (b, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)


@LEARNERS.register("early_exit")
class EarlyExitLearner(Learner):
    """A JEI-DNN dynamic network; its predictive has one member (the exit each input takes)."""

    reusable = True  # set_arrays restores the whole state; the depth is set per message
    Options = EarlyExitOptions

    def __init__(self, model_fn: Callable[..., nn.Module], options: EarlyExitOptions, train: TrainConfig,
                 device: torch.device, sample: torch.Tensor | None = None, num_classes: int | None = None) -> None:
        super().__init__(model_fn, options, train, device)
        model = model_fn()
        shape, classes = getattr(model_fn, "input_shape", None), getattr(model_fn, "num_classes", None)
        if shape is not None and classes is not None:  # fedens.learners.build_learner gives them
            sample, num_classes = torch.zeros(2, *shape), classes
        elif sample is None or num_classes is None:
            sample, num_classes = _probe(model)
        self.net = EarlyExitNet(model, sample, num_classes, options.head).to(device)
        self.depth = self.net.num_exits  # the server's learner holds every exit

    # ------------------------------------------------------------------ budgets
    @classmethod
    def check_scenario(cls, options: EarlyExitOptions, scn: Any) -> str | None:
        from fedens.data import DATASETS
        from fedens.models import build_model
        from fedens.strategies import resolve_strategy

        ds = DATASETS.resolve(scn.data.dataset, scn.base_dir)
        ds_opts = ds.Options.model_validate(scn.data.params)
        try:
            model = build_model(scn.model.kind, scn.model.options, ds.input_shape(ds_opts), ds.num_classes(ds_opts))
            blocks, _ = split_blocks(model)
        except ValueError as err:
            return f"model.kind: {err}"
        exits = len(blocks)
        if exits < 2:
            return "model: early_exit needs at least two blocks (e.g. mlp hidden: [128, 128], or cnn1d)"
        budget = options.depth_budget
        if budget is None:
            return None
        if isinstance(budget, DepthDistribution) and len(budget.probs) != exits:
            return f"learner.depth_budget.probs: one probability per depth 1..{exits}, got {len(budget.probs)}"
        values = [budget] if isinstance(budget, int) else budget if isinstance(budget, list) else []
        if isinstance(budget, list) and len(budget) != scn.data.num_clients:
            return f"learner.depth_budget: one budget per client ({scn.data.num_clients}), got {len(budget)}"
        if any(not 1 <= v <= exits for v in values):
            return f"learner.depth_budget: budgets must be in 1..{exits} (the model's exits)"
        if scn.mode == "decentralized":
            return "learner.depth_budget: only in federated mode (gossip mixes whole models)"
        strategy = resolve_strategy(scn.strategy.name, scn.base_dir)
        if not vars(strategy).get("partial_replies", False) and budgets_differ(budget, exits, scn.data.num_clients):
            return (f"strategy.name: {scn.strategy.name!r} aggregates whole models; clients with depth budgets send "
                    "part of it: use partial_avg (each tensor averaged over the clients that hold it)")
        return None

    def assign_client(self, partition_id: int, seed: int, num_clients: int) -> None:
        self.depth = client_depth(self.options.depth_budget, self.net.num_exits, partition_id, seed)

    # ------------------------------------------------------------------ training
    def fit(self, data: ArrayDataset, generator: torch.Generator, server_round: int = 1) -> dict[str, float]:
        net, d = self.net, self.depth
        net.train()
        trained = [p for mods in (net.blocks[:d], net.heads[:d], net.gates[: d - 1]) for m in mods for p in m.parameters()]
        opt = make_optimizer(trained, self.train_cfg)
        lam = self.options.cost_weight
        uniform = self.options.im_loss == "uniform" or server_round <= self.options.warmup_rounds
        deepest = self.options.backbone == "deepest"
        costs = net.costs[:d]
        sums = {"train_loss": 0.0, "gate_loss": 0.0}
        count = 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in minibatches(data, self.train_cfg.batch_size, generator, self.device):
                logits = net.exits(x, d, detach=deepest)
                ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits], dim=1)  # (b, d)
                g_logits = net.gate_logits(logits)  # (b, d-1)
                q = torch.full_like(ce, 1.0 / d) if uniform else exit_distribution(torch.sigmoid(g_logits).detach())
                if deepest:  # the blocks learn from the deepest exit alone, at full weight
                    q = torch.cat([q[:, :-1], torch.ones_like(q[:, -1:])], dim=1)
                im_loss = (q * ce).sum(1).mean()
                loss = im_loss
                if d > 1:
                    g_loss = gate_loss(g_logits, gate_targets(ce.detach() + lam * costs))
                    loss = loss + g_loss
                    sums["gate_loss"] += g_loss.item() * len(y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["train_loss"] += im_loss.item() * len(y)
                count += len(y)
        return {k: v / max(count, 1) for k, v in sums.items()}

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def exit_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held exit's probabilities ``(d, batch, C)`` and the exit each input takes ``(batch,)``."""
        self.net.eval()
        logits = self.net.exits(x, self.depth)
        g = torch.sigmoid(self.net.gate_logits(logits))  # (batch, d-1)
        last = torch.ones((g.shape[0], 1), dtype=torch.bool, device=g.device)  # the last held exit always fires
        leave = torch.cat([g >= self.options.threshold, last], dim=1)
        return F.softmax(torch.stack(logits), dim=-1), leave.int().argmax(dim=1)  # the first exit that fires

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The taken exit's probabilities ``(1, batch, C)``."""
        probs, taken = self.exit_probs(x)
        return probs[taken, torch.arange(x.shape[0], device=x.device)].unsqueeze(0)

    @torch.no_grad()
    def extra_metrics(self, data: ArrayDataset, n_bins: int = 10, batch_size: int = 512) -> dict[str, float]:
        """``mean_exit`` (1-based), ``compute_fraction`` (mean c of the exits taken),
        ``routing_gain`` (over input-blind exits), the confidence-threshold baseline at matched
        compute (``threshold_tau``, ``threshold_accuracy``, ``threshold_nll``, ``threshold_ece``,
        ``threshold_compute_fraction`` and ``threshold_gain`` = the gated accuracy minus its) and,
        per exit l (1-based), ``exit<l>_accuracy``, ``exit<l>_ece`` (of that exit on every input)
        and ``exit<l>_share`` (of inputs that leave there)."""
        x = torch.from_numpy(data.x)
        parts = [self.exit_probs(x[i : i + batch_size].to(self.device)) for i in range(0, len(data), batch_size)]
        probs = torch.cat([p.cpu() for p, _ in parts], dim=1)  # (d, n, C)
        taken = torch.cat([t.cpu() for _, t in parts])
        labels = torch.from_numpy(data.y)
        costs = self.net.costs.cpu()[: probs.shape[0]].double()
        out = {"mean_exit": float(taken.double().mean() + 1), "compute_fraction": float(costs[taken].mean())}
        out["compute_vs_plain"] = out["compute_fraction"] * self.net.total_macs / self.net.plain_macs
        exit_acc = (probs.argmax(-1) == labels).double().mean(1)  # (d,)
        static = self.net.static_costs.cpu()[: probs.shape[0]].double()
        gated_acc = (probs[taken, torch.arange(len(taken))].argmax(-1) == labels).double().mean()
        out["routing_gain"] = float(gated_acc - static_routing_accuracy(static, exit_acc, out["compute_fraction"]))
        # The confidence-threshold baseline at the gated predictor's mean compute (same costs c_l).
        tau, by_threshold = matched_threshold(probs.max(-1).values, costs, out["compute_fraction"])
        chosen = probs[by_threshold, torch.arange(len(taken))]
        m = classification_metrics(chosen, labels, n_bins)
        out.update({"threshold_tau": tau, "threshold_accuracy": m["accuracy"], "threshold_nll": m["nll"],
                    "threshold_ece": m["ece"], "threshold_compute_fraction": float(costs[by_threshold].mean()),
                    "threshold_gain": float(gated_acc - (chosen.argmax(-1) == labels).double().mean())})
        for l in range(probs.shape[0]):
            m = classification_metrics(probs[l], labels, n_bins)
            out.update({f"exit{l + 1}_accuracy": m["accuracy"], f"exit{l + 1}_ece": m["ece"],
                        f"exit{l + 1}_share": float((taken == l).double().mean()),
                        f"exit{l + 1}_compute": float(self.net.costs[l])})
        return out

    # ------------------------------------------------------------------ payload
    def get_arrays(self) -> dict[str, np.ndarray]:
        d = self.depth
        out: dict[str, np.ndarray] = {}
        for name, mods in (("blocks", self.net.blocks[:d]), ("heads", self.net.heads[:d]), ("gates", self.net.gates[: d - 1])):
            for l, m in enumerate(mods):
                out.update(module_arrays(m, f"{name}.{l}."))
        return out

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        load_module_arrays(self.net, arrays)


def static_routing_accuracy(costs: torch.Tensor, accuracy: torch.Tensor, compute: float) -> float:
    """The best accuracy that routing inputs at random to fixed exits reaches at mean cost
    ``compute`` (the input-blind baseline): the upper concave hull of the exits' ``(cost,
    accuracy)`` points ``(d,)`` at ``compute`` (a random mixture of two exits lies on the segment
    between them; the hull is the best such segment). ``costs`` are a fixed exit's own
    (``static_costs``: no earlier IMs). Outside the points' range: the nearest end's accuracy."""
    pts = sorted(zip(costs.double().tolist(), accuracy.double().tolist()))
    hull: list[tuple[float, float]] = []
    for p in pts:  # Andrew's monotone chain, upper part
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) >= (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0]):
            hull.pop()
        hull.append(p)
    return float(np.interp(compute, [c for c, _ in hull], [a for _, a in hull]))


def threshold_exits(max_prob: torch.Tensor, tau: float) -> torch.Tensor:
    """The exit ``(n,)`` each input takes under a confidence threshold: the first l whose max
    softmax probability ``max_prob[l]`` (``(d, n)``) is at least ``tau``, else the last."""
    fire = torch.cat([max_prob[:-1].double() >= tau, max_prob.new_ones((1, max_prob.shape[1]), dtype=torch.bool)])
    return fire.int().argmax(dim=0)


def matched_threshold(max_prob: torch.Tensor, costs: torch.Tensor, compute: float) -> tuple[float, torch.Tensor]:
    """The confidence threshold whose mean cost on these inputs is closest to ``compute`` (the
    gated predictor's), and the exits ``(n,)`` it sends them to. ``max_prob (d, n)`` are the exits'
    max softmax probabilities, ``costs (d,)`` the c_l of ``compute_fraction`` (an input that
    leaves at l has computed every IM before it).

    The mean cost is a non-decreasing step function of tau that changes only at the early exits'
    max probabilities, so the candidates are those values, in increasing order, and one above
    them all (nothing leaves early); a bisection over them finds the first whose cost reaches
    ``compute``; it or the one before it is the closest (on a tie, the cheaper)."""
    values = torch.unique(max_prob[:-1].double().flatten())  # sorted; empty with one exit
    top = float(values[-1]) if len(values) else 1.0
    candidates = values.tolist() + [math.nextafter(top, math.inf)]
    costs = costs.double()

    def mean_cost(i: int) -> float:
        return float(costs[threshold_exits(max_prob, candidates[i])].mean())

    lo, hi = 0, len(candidates) - 1  # the first i with mean_cost(i) >= compute, or the last
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_cost(mid) >= compute:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(mean_cost(lo - 1) - compute) <= abs(mean_cost(lo) - compute):
        best = lo - 1
    return candidates[best], threshold_exits(max_prob, candidates[best])


def client_depth(budget: int | list[int] | DepthDistribution | None, exits: int, partition_id: int, seed: int) -> int:
    """The number of exits client ``partition_id`` holds: all, the fixed number, its entry of the
    list, or a draw from ``probs`` seeded by (seed, partition id) (a device's capacity does not
    change between rounds)."""
    if budget is None:
        return exits
    if isinstance(budget, int):
        return budget
    if isinstance(budget, list):
        return budget[partition_id]
    rng = np.random.default_rng(derive_seed(seed, 0, _BUDGET_TAG + partition_id))
    return int(rng.choice(len(budget.probs), p=np.asarray(budget.probs) / sum(budget.probs))) + 1


def budgets_differ(budget: int | list[int] | DepthDistribution | None, exits: int, num_clients: int) -> bool:
    """Whether some client may hold fewer than all exits."""
    if budget is None:
        return False
    if isinstance(budget, int):
        return budget < exits
    if isinstance(budget, list):
        return min(budget) < exits
    return budget.probs[-1] < 1.0


def _probe(model: nn.Module) -> tuple[torch.Tensor, int]:
    """A sample input and the class count of a model built without them (tests): from its first
    layer's input size and its last layer's output size."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    first, last = layers[0], layers[-1]
    if isinstance(first, nn.Linear):
        sample = torch.zeros(2, first.in_features)
    else:
        raise ValueError("early_exit: give the learner a sample input for a convolutional model")
    return sample, last.out_features
