"""Plots as pure functions: data in, ``(fig, axes)`` out. Nothing here reads or writes runs,
except ``save``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import matplotlib

matplotlib.use("Agg")  # no screen on simulation hosts; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

METRICS = (("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"))
SCOPE_STYLE = {"global-test": "-o", "global-shift": "--s", "clients": ":^"}
SCOPE_LABEL = {"global-test": "test set", "global-shift": "shifted test set", "clients": "clients' validation splits"}


def rounds_axis(ax: Any) -> None:
    """Rounds are integers: ticks on whole rounds only."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def convergence_figure(rows: Sequence[dict[str, Any]], title: str = "") -> tuple[plt.Figure, Any]:
    """Accuracy, NLL and ECE against round, one line per evaluation scope (the global model on
    the test and shifted sets, and the mean over clients on their own validation splits)."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.3), constrained_layout=True)
    for ax, (key, label) in zip(axes, METRICS):
        for scope, style in SCOPE_STYLE.items():
            pts = [(r["round"], r[key]) for r in rows if r["scope"] == scope and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, ms=3, label=SCOPE_LABEL[scope])
        rounds_axis(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def comparison_figure(curves: dict[str, Sequence[Sequence[dict[str, Any]]]], title: str = "") -> tuple[plt.Figure, Any]:
    """Accuracy, NLL and ECE on the test set against round: per variant the mean over its runs
    (seeds) as a line and the 95% Student-t interval of the mean as a band. ``curves`` maps a
    variant to its runs' ``global-test`` rows."""
    from fedens.stats import curve_band

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5), constrained_layout=True)
    for ax, (key, label) in zip(axes, METRICS):
        for i, (name, runs) in enumerate(curves.items()):
            band = curve_band([[(r["round"], r.get(key)) for r in rows] for rows in runs])
            if not band:
                continue
            xs, mean, lo, hi = zip(*band)
            ax.plot(xs, mean, "-", lw=1.4, color=f"C{i % 10}", label=f"{name} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=f"C{i % 10}", alpha=0.18, lw=0)
        rounds_axis(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def pool_bins(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Reliability bins of several runs pooled: counts added, accuracy and confidence averaged
    with the counts as weights; the ECE of the pooled bins (``sum_b n_b/n |acc_b - conf_b|``)."""
    edges = runs[0]["edges"]
    count = [sum(r["count"][b] for r in runs) for b in range(len(edges) - 1)]
    acc = [sum(r["count"][b] * r["accuracy"][b] for r in runs) / count[b] if count[b] else 0.0 for b in range(len(count))]
    conf = [sum(r["count"][b] * r["confidence"][b] for r in runs) / count[b] if count[b] else 0.0 for b in range(len(count))]
    return {"edges": edges, "count": count, "accuracy": acc, "confidence": conf, "ece": bins_ece(count, acc, conf)}


def bins_ece(count: Sequence[float], acc: Sequence[float], conf: Sequence[float]) -> float:
    total = sum(count)
    return sum(n / total * abs(a - c) for n, a, c in zip(count, acc, conf)) if total else 0.0


def _reliability_axes(top: Any, bottom: Any, bins: dict[str, Any], title: str) -> None:
    edges = bins["edges"]
    width = [b - a for a, b in zip(edges[:-1], edges[1:])]
    left = edges[:-1]
    count = bins["count"]
    filled = [c > 0 for c in count]
    acc = [a if f else 0.0 for a, f in zip(bins["accuracy"], filled)]
    conf = [c if f else 0.0 for c, f in zip(bins["confidence"], filled)]
    top.bar(left, acc, width, align="edge", edgecolor="k", color="tab:blue", label="accuracy")
    # the gap between accuracy and mean confidence, drawn beside the accuracy bar (not over it),
    # so its colour is the legend's
    lo, hi = [min(a, c) for a, c in zip(acc, conf)], [max(a, c) for a, c in zip(acc, conf)]
    top.bar(left, [h - lo_ for h, lo_ in zip(hi, lo)], width, bottom=lo, align="edge", color="none", edgecolor="tab:red", hatch="////", lw=0.8, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1)
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title + f" (ECE {bins_ece(count, bins['accuracy'], bins['confidence']):.3f})", fontsize=9)
    top.legend(fontsize=7, loc="lower right")
    total = max(sum(count), 1)
    bottom.bar(left, [c / total for c in count], width, align="edge", edgecolor="k", color="gray")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("fraction")
    bottom.set_xlim(0, 1)


def reliability_figure(bins: dict[str, Any], title: str = "final global model, test set") -> tuple[plt.Figure, Any]:
    """Reliability diagram (accuracy per confidence bin against the diagonal, with the gap to
    the bin's mean confidence hatched) above a histogram of confidences; ``bins`` as returned by
    ``fedens.metrics.reliability_bins``. The ECE in the title is that of these bins."""
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.2, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    _reliability_axes(top, bottom, bins, title)
    return fig, (top, bottom)


def reliability_grid_figure(runs: dict[str, Sequence[dict[str, Any]]], title: str = "") -> tuple[plt.Figure, Any]:
    """One reliability diagram per variant, its runs' final bins pooled (``pool_bins``)."""
    names = list(runs)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.6 * cols, 4.4 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * rows}, constrained_layout=True)
    for i in range(rows * cols):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if i < len(names):
            _reliability_axes(top, bottom, pool_bins(runs[names[i]]), f"{names[i]} (n={len(runs[names[i]])})")
        else:
            top.axis("off")
            bottom.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def tradeoff_figure(variants: dict[str, dict[str, Any]], title: str = "") -> tuple[plt.Figure, Any]:
    """Final test accuracy and ECE against kB per client and round, a point per variant with
    95% intervals over seeds as error bars (``variants`` as in ``comparison.json``)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), constrained_layout=True)
    for ax, (key, label) in zip(axes, (("test_accuracy", "final test accuracy"), ("test_ece", "final test ECE"))):
        for i, (name, row) in enumerate(variants.items()):
            x, y = row["bytes_per_client_round"], row[key]
            if x.get("mean") is None or y.get("mean") is None:
                continue
            err = None if y.get("ci_low") is None else [[y["mean"] - y["ci_low"]], [y["ci_high"] - y["mean"]]]
            ax.errorbar([x["mean"] / 1000], [y["mean"]], yerr=err, fmt="o", color=f"C{i % 10}", capsize=3, label=name)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("kB per client and round (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def tuning_figure(histories: dict[str, Sequence[dict[str, Any]]], direction: str, title: str = "") -> tuple[plt.Figure, Any]:
    """Every variant's tuning trials (``fedens.tuning.StudySummary.history``): the value of each
    finished trial (dots), the last reported value of a pruned one (crosses), and the best value
    so far (line), against the trial's index."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    better = min if direction == "minimize" else max
    for i, (name, history) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        done = [(h["index"] + 1, h["value"]) for h in history if h["state"] == "complete" and h["value"] is not None]
        pruned = [(h["index"] + 1, h["value"]) for h in history if h["state"] == "pruned" and h["value"] is not None]
        if done:
            ax.plot(*zip(*done), "o", color=colour, ms=4, alpha=0.7)
            best, line = None, []
            for x, v in sorted(done):
                best = v if best is None else better(best, v)
                line.append((x, best))
            ax.step(*zip(*line), where="post", color=colour, label=name)
        if pruned:
            ax.plot(*zip(*pruned), "x", color=colour, ms=5, alpha=0.6)
    ax.set_xlabel("trial (dots: finished, crosses: pruned, at their last reported value)")
    ax.set_ylabel("objective (line: best so far)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    if histories:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig, ax


def has_exits(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether the rows are an early-exit run's (they carry ``compute_fraction``)."""
    return any(r.get("scope") == "global-test" and "compute_fraction" in r for r in rows)


def exits_figure(runs: dict[str, Sequence[dict[str, Any]]], title: str = "") -> tuple[plt.Figure, Any]:
    """Accuracy and ECE against the compute used (fraction of a pass through every exit), per
    variant: each exit on its own (a dashed line over exits 1..L) and the deployed predictor,
    where the gates send each input (a star). ``runs`` maps a name to the final ``global-test``
    row of each seed; points are means over seeds, error bars their standard deviation."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), constrained_layout=True)
    for i, (name, finals) in enumerate(runs.items()):
        finals = [r for r in finals if "compute_fraction" in r]
        if not finals:
            continue
        exits = sorted({int(k[4:-8]) for r in finals for k in r if k.startswith("exit") and k.endswith("_compute")})
        color = f"C{i % 10}"
        for ax, metric in zip(axes, ("accuracy", "ece")):
            xs = [float(np.mean([r[f"exit{l}_compute"] for r in finals])) for l in exits]
            ys = [float(np.mean([r[f"exit{l}_{metric}"] for r in finals])) for l in exits]
            ax.plot(xs, ys, "--o", color=color, alpha=0.5, markersize=4)
            for l, x, y in zip(exits, xs, ys):
                ax.annotate(str(l), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points", color=color)
            cx = [r["compute_fraction"] for r in finals]
            cy = [r[metric] for r in finals]
            ax.errorbar([np.mean(cx)], [np.mean(cy)], xerr=[np.std(cx)], yerr=[np.std(cy)], fmt="*", markersize=11,
                        color=color, capsize=3, label=f"{name} (gated)")
    for ax, label in zip(axes, ("test accuracy", "test ECE")):
        ax.set_xlabel("compute used (fraction of every exit; dashed: exit l alone)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


# --------------------------------------------------------------------------- decentralized mode
# Rows are metrics.jsonl rows of a gossip run (fedens.decentralized.engine): ``global-test`` rows
# carry per-node lists ``node_<metric>``, ``gossip`` rows ``layer_variance`` (name -> value).


def _num(values: Iterable[Any]) -> list[float]:
    """Values for matplotlib: a missing (null, non-finite) value as NaN, a gap in the line."""
    return [float("nan") if v is None else float(v) for v in values]


def nodes_figure(rows: Sequence[dict[str, Any]], scope: str = "global-test", title: str = "") -> tuple[plt.Figure, Any]:
    """Per-node convergence: accuracy, NLL and ECE of the nodes' models against round, the mean
    over nodes as a line and the min-max over nodes as a band (rows of ``scope``)."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.3), constrained_layout=True)
    got = [r for r in rows if r["scope"] == scope]
    for ax, (key, label) in zip(axes, METRICS):
        pts = [r for r in got if key in r and f"{key}_min" in r]
        if pts:
            xs = [r["round"] for r in pts]
            ax.fill_between(xs, _num(r[f"{key}_min"] for r in pts), _num(r[f"{key}_max"] for r in pts),
                            alpha=0.25, color="tab:blue", label="min-max over nodes")
            ax.plot(xs, _num(r[key] for r in pts), "-o", ms=3, color="tab:blue", label="mean over nodes")
        rounds_axis(ax)
        ax.set_ylabel(f"{label}, each node's model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle((title + ": " if title else "") + f"nodes' own models on the {SCOPE_LABEL.get(scope, scope)}", fontsize=10)
    return fig, axes


def readable_tensor(name: str) -> str:
    """A payload name as words: ``0.weight`` -> ``layer 0 weights``, ``member.2.3.bias`` ->
    ``member 2, layer 3 bias``, ``mean.0.weight`` -> ``posterior mean, layer 0 weights``."""
    prefix = ""
    parts = name.split(".")
    if parts[0] == "member" and len(parts) > 2:
        prefix, parts = f"member {parts[1]}, ", parts[2:]
    elif parts[0] in ("mean", "precision"):
        prefix, parts = f"posterior {parts[0]}, ", parts[1:]
    *where, what = parts
    what = {"weight": "weights", "bias": "bias"}.get(what, what)
    return prefix + (f"layer {'.'.join(where)} {what}" if where else what)


def layer_variance_figure(rows: Sequence[dict[str, Any]], title: str = "") -> tuple[plt.Figure, Any]:
    """Per-layer weight variance (mean over nodes of the within-tensor variance) against round,
    one line per tensor, from the ``gossip`` rows' ``layer_variance``; log scale."""
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    got = [r for r in rows if r["scope"] == "gossip" and r.get("layer_variance")]
    names = list(got[0]["layer_variance"]) if got else []
    for name in names:
        ax.plot([r["round"] for r in got], _num(r["layer_variance"].get(name) for r in got), "-", lw=1.3,
                label=readable_tensor(name))
    ax.set_yscale("log")
    rounds_axis(ax)
    ax.set_ylabel("weight variance per tensor")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=7)
    ax.set_title((title + ": " if title else "") + "variance of the nodes' weights", fontsize=9)
    return fig, ax


def layer_variance_comparison_figure(
    runs: dict[str, Sequence[dict[str, Any]]], per_layer: bool = False, title: str = ""
) -> tuple[plt.Figure, Any]:
    """Layer variance against round for several runs ``{label: rows}`` (e.g. ``average`` vs
    ``vca``: without and with variance correction). One line per run for
    ``layer_variance_mean`` (the mean over layers); with ``per_layer`` also a thin line per
    tensor in the run's colour. Log scale."""
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        got = [r for r in rows if r["scope"] == "gossip" and r.get("layer_variance_mean") is not None]
        xs = [r["round"] for r in got]
        ax.plot(xs, [r["layer_variance_mean"] for r in got], "-", lw=1.8, color=color, label=label)
        if per_layer and got:
            for name in got[0]["layer_variance"]:
                ax.plot(xs, _num(r["layer_variance"].get(name) for r in got), "-", lw=0.6, alpha=0.5, color=color)
    ax.set_yscale("log")
    rounds_axis(ax)
    ax.set_ylabel("weight variance (mean over tensors)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title + (" (thin lines: each tensor)" if per_layer else ""), fontsize=9)
    return fig, ax


def save(fig: plt.Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
