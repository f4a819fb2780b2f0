"""Node rules of decentralized (gossip) learning, and measures of how far the nodes are apart.

A gossip node i holds its own model ``own`` and the latest models its neighbours sent,
``received`` (sender node id -> arrays; empty when every message was dropped). Before it trains
again it replaces its model by ``rule(own, received, ctx)``, which returns ``(new arrays, facts)``:
``facts`` are per-node numbers for the metrics (``received`` = how many models it used, plus
rule-specific ones). With nothing received every rule returns a copy of ``own`` unchanged.

Arrays are payloads (``fedens.payload``): plain names are shared tensors, ``member.{k}.<n>`` is
ensemble member k, ``mean.<n>`` / ``precision.<n>`` a diagonal Gaussian posterior (IVON). All
models of a neighbourhood run the same learner, so they have the same names; the output has the
names of ``own``. Math runs in float64 and is cast back to each array's dtype; non-float arrays
(ints, bools) keep the node's own value. Received models are used in sender-id order.

Rules (``GOSSIP_RULES``; each declares its parameters as a frozen pydantic ``Options`` model,
the vca and swarm ones shared with their strategies; ``make_rule(name, params)`` builds one and
turns a bad option into a one-line ``ValueError``):

``average``
    ``out = a own + (1 - a) mean_j W_j``, ``a = self_weight``; ``self_weight=None`` gives every
    member of the closed neighbourhood the same weight, ``a = 1 / (1 + |received|)``. Neighbours
    weigh equally: a gossip receiver does not know its neighbours' data sizes. With
    ``weighted=True`` the engine must pass them (``ctx.num_examples``, node id -> N) and the
    weights become ``N_j / sum N`` over the closed neighbourhood (``self_weight=None``) or
    ``(1 - a) N_j / sum_senders N`` (given ``a``). Normalisation statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``, as ``vca`` identifies them) are the node's own, as
    in the authors' plain averager (twoentartian/DFL_torch) and the ``vca`` rule, so that the
    two rules treat normalisation alike; ``mix_norm_stats=True`` mixes them with the weights too.

``vca``
    Variance-corrected model averaging as in docs/methods.md#gossip-vca (Tian et al., arXiv
    2404.04616; the authors' public code): per tensor l, ``avg = mean_j W_j,l`` over the
    received models, ``out = c W_own,l + (1 - c) avg`` (``c``, preset 0.5), then
    ``out = (out - mean(out)) sqrt((tgt + eps) / (Var(out) + eps)) + mean(out)`` (eps 1e-4, Var
    unbiased over all elements) with ``tgt`` = ``others``: ``mean_j Var(W_j,l)`` (default),
    ``self``: ``Var(W_own,l)``, ``conservative``: ``c Var(W_own,l) + (1 - c) others``.
    ``Var(W_own,l)`` is the variance of the node's model BEFORE mixing (the paper's equation;
    the same reading as the federated ``vca`` strategy; the reference code reads the already-mixed model).
    Normalisation statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) are the
    node's own, neither mixed nor rescaled (the authors' code). Other tensors
    ``fedens.algorithms.vca.is_corrected`` rejects (one-element tensors, ``precision.*``,
    ``*.filled`` flags, non-float) get the plain mix. Ensemble members
    are corrected member-wise (``member.{k}.<n>`` are distinct tensors).

Posteriors (both rules). A ``mean.<n>`` whose ``precision.<n>`` is in the payload is mixed in
natural parameters with the same weights w: ``precision_out = sum_k w_k P_k``, ``mean_out =
sum_k w_k P_k m_k / precision_out`` (where ``precision_out`` is 0, the plain mix of the means).
``vca`` then corrects the ``mean.<n>`` tensors (targets from the models' means), never precisions.

``swarm``
    Swarm consensus (docs/methods.md#gossip-swarm, as ``strategies/swarm.py`` adapts it) over the
    node's closed neighbourhood C_i = {i} + senders. Candidates: every member of every node in
    C_i (``member.{m}.*`` of a ``deep_ensemble``; a model without members is one candidate, the
    whole arrays), rows ordered by node id then member index. Scores: ``ctx.scores[v][c][m] =
    (score, confidence)`` that validator v measured for member m of candidate node c on its own
    validation split, higher score = better (``score: nll`` enters as ``-NLL``; the engine asks
    the validators for the rule's ``score`` and signs it with ``validator_scores``). Only validators and
    candidates in C_i are used (a node knows its neighbourhood only); a validator's score of its
    own candidate is ignored; everything missing is NaN (unscored) in the ``(N_cand, N_val)``
    matrices given to ``fedens.algorithms.swarm.swarm_consensus`` (k, T, tau, omega, phi1, phi2 as
    there). The agreed members fill the P slots of ``own`` (P = its member count) with
    ``allocate_slots`` (at most ``min(k, P)`` members); a model without members gets the single
    best candidate. Shared (non-member) tensors: the uniform mix (natural parameters for
    posteriors) of the shared tensors of the distinct nodes whose members were chosen, since
    they belong to those members (``deep_ensemble`` has none). No usable score -> ``own``
    unchanged. Facts: ``swarm_steps``, ``swarm_agreement``, ``swarm_own_share`` (share of the P
    slots now holding the node's own members).

Measures: ``consensus_distance`` and ``layer_variance`` (their docstrings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pydantic import BaseModel, Field, ValidationError

from fedens.algorithms.arrays import precision_weighted_average, split_members
from fedens.algorithms.swarm import SwarmOptions, allocate_slots, fill_slots, slot_weights, swarm_consensus
from fedens.algorithms.vca import VCAOptions, is_corrected, is_norm_statistic, target_variance, tensor_var, variance_correct
from fedens.options import Options as BaseOptions
from fedens.options import first_error
from fedens.payload import MEMBER_WEIGHTS
from fedens.registry import Registry

Arrays = dict[str, np.ndarray]
Facts = dict[str, float]
# validator node -> candidate node -> per member (score, confidence)
Scores = Mapping[int, Mapping[int, Sequence[tuple[float, float]]]]

@dataclass(frozen=True)
class GossipContext:
    """What a rule may know besides the models: the node's id, the swarm scores of its
    neighbourhood (``Scores``) and, for ``average(weighted=True)``, node id -> number of
    training examples."""

    node: int
    scores: Scores = field(default_factory=dict)
    num_examples: Mapping[int, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- mixing


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def _mix64(models: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """``sum_k w_k models[k]`` per name of ``models[0]``, float arrays in float64 (posteriors in
    natural parameters, see the module docstring); non-float arrays are ``models[0]``'s."""
    first = models[0]
    for k, m in enumerate(models[1:], 1):
        missing = [n for n in first if n not in m]
        if missing:
            raise ValueError(f"model {k} of the neighbourhood lacks {len(missing)} arrays, e.g. {missing[0]!r}")
    w = [float(x) for x in weights]

    def plain(name: str) -> np.ndarray:
        return sum(wk * np.asarray(m[name], dtype=np.float64) for m, wk in zip(models, w))

    out: Arrays = {}
    for name, a in first.items():
        if not _is_float(a):
            out[name] = np.array(a, copy=True)
        elif name.startswith("mean.") and f"precision.{name[5:]}" in first:
            p = f"precision.{name[5:]}"
            out[name], _ = precision_weighted_average([m[name] for m in models], [m[p] for m in models], w)
        else:
            out[name] = plain(name)
    return out


def _cast(arrays: Arrays, like: Arrays) -> Arrays:
    return {n: np.asarray(a).astype(like[n].dtype) for n, a in arrays.items()}


def mix(models: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """The weighted mix ``sum_k w_k models[k]`` (``weights`` ``(K,)``, summing to 1) with the
    names and dtypes of ``models[0]``; posteriors in natural parameters; non-float arrays are
    ``models[0]``'s."""
    return _cast(_mix64(models, weights), models[0])


def _copy(arrays: Arrays) -> Arrays:
    return {n: np.array(a, copy=True) for n, a in arrays.items()}


def _senders(received: Mapping[int, Arrays]) -> list[int]:
    return sorted(received)


# --------------------------------------------------------------------------- rules


class GossipRule:
    """A node rule: ``rule(own, received, ctx) -> (new arrays, facts)``. Its parameters (the
    scenario's ``gossip.params``) are a frozen pydantic ``Options`` model, validated when the
    scenario loads and read as ``self.options.<key>``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = BaseOptions

    def __init__(self, **params: Any) -> None:
        try:
            self.options: Any = self.Options.model_validate(params)
        except ValidationError as err:  # one line, not pydantic's block
            raise ValueError(first_error(err, params)) from None

    def __post_init__(self) -> None:
        """A plug-in written as a dataclass (its fields are its options, its generated
        ``__init__`` skips ours): the fields its ``Options`` knows are validated into it, so a
        dataclass subclass of a built-in rule keeps working."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        try:
            options = self.Options.model_validate({k: v for k, v in own.items() if k in self.Options.model_fields})
        except ValidationError as err:
            raise ValueError(first_error(err, own)) from None
        object.__setattr__(self, "options", options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def __call__(self, own: Arrays, received: Mapping[int, Arrays], ctx: GossipContext) -> tuple[Arrays, Facts]:
        raise NotImplementedError


GOSSIP_RULES: Registry[type[GossipRule]] = Registry("gossip rule")


def make_rule(name: str, params: Mapping[str, Any] | None = None, base_dir: Path | None = None) -> GossipRule:
    """``GOSSIP_RULES.resolve(name, base_dir)(**params)`` (a plug-in file relative to the
    scenario's folder, as for learners and strategies); a wrong option is a one-line ``ValueError``."""
    cls = GOSSIP_RULES.resolve(name, base_dir)
    try:
        return cls(**dict(params or {}))
    except (TypeError, ValueError) as err:  # a bad option, or a plug-in's constructor's complaint
        raise ValueError(f"gossip rule {name!r}: {err}") from None


class AverageOptions(BaseOptions):
    self_weight: float | None = Field(None, ge=0, le=1, description="own model's weight (None: 1/(1 + senders))")
    weighted: bool = Field(False, description="weigh the senders by their training-set sizes")
    mix_norm_stats: bool = Field(False, description="mix the normalisation statistics too (default: each node keeps its own)")


@GOSSIP_RULES.register("average")
class Average(GossipRule):
    """Plain gossip averaging with a self weight (module docstring)."""

    Options = AverageOptions

    def weights(self, node: int, senders: list[int], ctx: GossipContext) -> np.ndarray:
        """Weights ``(1 + n,)`` of own, then the senders in order; they sum to 1."""
        n, self_weight = len(senders), self.options.self_weight
        if not self.options.weighted:
            a = 1.0 / (1 + n) if self_weight is None else float(self_weight)
            return np.array([a] + [(1 - a) / n] * n)
        missing = [j for j in [node, *senders] if j not in ctx.num_examples]
        if missing:
            raise ValueError(f"average(weighted=True) needs ctx.num_examples of nodes {missing}")
        sizes = np.array([ctx.num_examples[j] for j in senders], dtype=np.float64)
        if self_weight is None:
            allsizes = np.concatenate([[float(ctx.num_examples[node])], sizes])
            return allsizes / allsizes.sum()
        a = float(self_weight)
        return np.concatenate([[a], (1 - a) * sizes / sizes.sum()])

    def __call__(self, own: Arrays, received: Mapping[int, Arrays], ctx: GossipContext) -> tuple[Arrays, Facts]:
        senders = _senders(received)
        if not senders:
            return _copy(own), {"received": 0.0, "self_weight": 1.0}
        w = self.weights(ctx.node, senders, ctx)
        out = mix([own, *(received[j] for j in senders)], w)
        if not self.options.mix_norm_stats:  # each node keeps its own running statistics
            out.update({n: np.array(a, copy=True) for n, a in own.items() if is_norm_statistic(n)})
        return out, {"received": float(len(senders)), "self_weight": float(w[0])}


@GOSSIP_RULES.register("vca")
class VarianceCorrected(GossipRule):
    """VCMA per node (module docstring; docs/methods.md#gossip-vca)."""

    Options = VCAOptions  # c: the own model's weight in the mix, and in the "conservative" target

    def target_var(self, own: np.ndarray, others: Sequence[np.ndarray]) -> float:
        """The target variance of one tensor from the UNMIXED own tensor and the received ones."""
        return target_variance(self.options.target, self.options.c, own, others)

    def __call__(self, own: Arrays, received: Mapping[int, Arrays], ctx: GossipContext) -> tuple[Arrays, Facts]:
        senders = _senders(received)
        if not senders:
            return _copy(own), {"received": 0.0, "vca_scale": 1.0}
        c, n, eps = self.options.c, len(senders), self.options.eps
        models = [own, *(received[j] for j in senders)]
        out = _mix64(models, [c] + [(1 - c) / n] * n)
        for name in out:
            if is_norm_statistic(name):  # each node keeps its own running statistics
                out[name] = np.asarray(own[name], dtype=np.float64)
        scales = []
        for name, a in own.items():
            if not is_corrected(name, a):
                continue
            tgt = self.target_var(a, [received[j][name] for j in senders])
            var = tensor_var(out[name])
            if var + eps > 0:
                scales.append(np.sqrt((tgt + eps) / (var + eps)))
            out[name] = variance_correct(out[name], tgt, eps)
        facts = {"received": float(n), "vca_scale": float(np.mean(scales)) if scales else 1.0}
        return _cast(out, own), facts


@GOSSIP_RULES.register("swarm")
class Swarm(GossipRule):
    """Swarm consensus over the closed neighbourhood (module docstring; docs/methods.md#gossip-swarm)."""

    Options = SwarmOptions  # score: what the engine asks the validators for (accuracy or -NLL)

    @staticmethod
    def candidates(models: Mapping[int, Arrays]) -> tuple[list[tuple[int, int]], list[Arrays], dict[int, Arrays]]:
        """``(labels, member arrays, shared per node)``: rows ``(node, member)`` by node id then
        member; a model without members is one candidate ``(node, 0)`` holding all its arrays."""
        labels, arrays, shared = [], [], {}
        for node in sorted(models):
            members, rest = split_members(models[node])
            rest.pop(MEMBER_WEIGHTS, None)  # the node's predictive weights are recomputed, not mixed
            if not members:
                members, rest = {0: models[node]}, {}
            shared[node] = rest
            for m in sorted(members):
                labels.append((node, m))
                arrays.append(members[m])
        return labels, arrays, shared

    @staticmethod
    def matrices(labels: list[tuple[int, int]], validators: list[int], scores: Scores) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, confidence)`` ``(N_cand, N_val)`` from ``ctx.scores``, NaN where missing."""
        row = {label: r for r, label in enumerate(labels)}
        s = np.full((len(labels), len(validators)), np.nan)
        conf = np.full_like(s, np.nan)
        for col, v in enumerate(validators):
            for c, per_member in scores.get(v, {}).items():
                if c == v:  # a validator never scores its own candidate
                    continue
                for m, (sm, cm) in enumerate(per_member):
                    if (c, m) in row:
                        s[row[c, m], col], conf[row[c, m], col] = float(sm), float(cm)
        return s, conf

    def __call__(self, own: Arrays, received: Mapping[int, Arrays], ctx: GossipContext) -> tuple[Arrays, Facts]:
        unchanged = {"received": float(len(received)), "swarm_steps": 0.0, "swarm_agreement": 0.0, "swarm_own_share": 1.0}
        if not received:
            return _copy(own), unchanged
        if ctx.node in received:
            raise ValueError(f"swarm: node {ctx.node} received its own model")
        nodes = {ctx.node: own, **received}
        labels, cand, shared = self.candidates(nodes)
        validators = sorted(v for v in ctx.scores if v in nodes)
        s, conf = self.matrices(labels, validators, ctx.scores)
        if np.isnan(s).all():
            return _copy(own), unchanged
        own_members, _ = split_members(own)
        slots = len(own_members)
        members, weights, steps, agreement = swarm_consensus(
            s, conf, **{**self.options.model_dump(exclude={"score"}), "k": min(self.options.k, max(slots, 1))}
        )
        facts = {"received": float(len(received)), "swarm_steps": float(steps), "swarm_agreement": float(agreement)}
        if slots == 0:  # a plain model: the best candidate, whole
            best = members[0]
            facts["swarm_own_share"] = float(labels[best][0] == ctx.node)
            return _cast(_copy(cand[best]), own), facts
        counts = allocate_slots(weights, slots)
        out = {k: np.array(a, copy=True) for k, a in fill_slots(cand, members, counts).items()}
        out[MEMBER_WEIGHTS] = slot_weights(weights, counts)  # the predictive weighs members by belief
        chosen_nodes = sorted({labels[i][0] for i in members})
        if shared[ctx.node]:
            parts = [shared[j] for j in chosen_nodes]
            out.update(mix(parts, [1.0 / len(parts)] * len(parts)))
        facts["swarm_own_share"] = float(sum(n for i, n in zip(members, counts) if labels[i][0] == ctx.node) / slots)
        missing = [n for n in own if n not in out]
        if missing:
            raise ValueError(f"swarm: the chosen members lack {len(missing)} of the node's arrays, e.g. {missing[0]!r}")
        result = _cast({n: out[n] for n in own if n != MEMBER_WEIGHTS}, own)
        result[MEMBER_WEIGHTS] = out[MEMBER_WEIGHTS].astype(np.float32)
        return result, facts


# --------------------------------------------------------------------------- measures


def _flat_params(model: Arrays) -> np.ndarray:
    """All float tensors but ``precision.*`` and an ensemble's predictive weights (not
    parameters; a node that has not yet run the swarm rule has none), flattened and
    concatenated in name order."""
    parts = [np.asarray(a, dtype=np.float64).ravel() for n, a in sorted(model.items())
             if _is_float(a) and not n.startswith("precision.") and n != MEMBER_WEIGHTS]
    return np.concatenate(parts) if parts else np.zeros(0)


def consensus_distance(models: Sequence[Arrays]) -> float:
    """``mean_i ||theta_i - theta_bar||_2`` with ``theta_bar = mean_i theta_i``; ``theta_i`` is
    node i's float tensors concatenated (a posterior's ``mean.*``; ``precision.*`` and non-float
    arrays skipped; normalisation buffers included). ``models``: one payload per node, same names."""
    if not models:
        raise ValueError("consensus_distance needs at least one model")
    theta = np.stack([_flat_params(m) for m in models])  # (nodes, params)
    return float(np.linalg.norm(theta - theta.mean(0), axis=1).mean())


def layer_variance(models: Sequence[Arrays]) -> dict[str, float]:
    """Per tensor name that ``is_corrected`` accepts: ``mean_i Var(W_i,l)``, the unbiased
    within-tensor variance averaged over the nodes (what the Vanishing Variance paper tracks)."""
    if not models:
        raise ValueError("layer_variance needs at least one model")
    return {name: float(np.mean([tensor_var(m[name]) for m in models]))
            for name, a in models[0].items() if is_corrected(name, a) and name != MEMBER_WEIGHTS}
