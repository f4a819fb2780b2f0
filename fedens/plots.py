"""Plots as pure functions: data in, ``(fig, axes)`` out. Nothing here reads or writes runs,
except ``save``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on simulation hosts; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

METRICS = (("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"))
SCOPE_STYLE = {"global-test": "-o", "global-shift": "--s", "clients": ":^"}


def convergence_figure(rows: Sequence[dict[str, Any]]) -> tuple[plt.Figure, Any]:
    """Accuracy, NLL and ECE against round, one line per evaluation scope."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), constrained_layout=True)
    for ax, (key, label) in zip(axes, METRICS):
        for scope, style in SCOPE_STYLE.items():
            pts = [(r["round"], r[key]) for r in rows if r["scope"] == scope and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, ms=3, label=scope)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig, axes


def comparison_figure(curves: dict[str, Sequence[dict[str, Any]]]) -> tuple[plt.Figure, Any]:
    """Accuracy, NLL and ECE on the test set against round, one line per variant."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), constrained_layout=True)
    for ax, (key, label) in zip(axes, METRICS):
        for name, rows in curves.items():
            ax.plot([r["round"] for r in rows], [r[key] for r in rows], "-", lw=1.4, label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig, axes


def reliability_figure(bins: dict[str, Any], title: str = "final global model, test set") -> tuple[plt.Figure, Any]:
    """Reliability diagram (accuracy per confidence bin against the diagonal) above a
    histogram of confidences; ``bins`` as returned by ``fedens.metrics.reliability_bins``."""
    edges = bins["edges"]
    width = [b - a for a, b in zip(edges[:-1], edges[1:])]
    left = edges[:-1]
    count = bins["count"]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.2, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    filled = [c > 0 for c in count]
    top.bar(left, [a if f else 0 for a, f in zip(bins["accuracy"], filled)], width, align="edge",
            edgecolor="k", color="tab:blue", label="accuracy")
    gap_lo = [min(a, c) for a, c in zip(bins["accuracy"], bins["confidence"])]
    gap_hi = [abs(a - c) for a, c in zip(bins["accuracy"], bins["confidence"])]
    top.bar(left, [g if f else 0 for g, f in zip(gap_hi, filled)], width, bottom=gap_lo, align="edge",
            color="tab:red", alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1)
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    ece = bins.get("ece")
    top.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""), fontsize=9)
    top.legend(fontsize=8, loc="upper left")
    total = max(sum(count), 1)
    bottom.bar(left, [c / total for c in count], width, align="edge", edgecolor="k", color="gray")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("fraction")
    bottom.set_xlim(0, 1)
    return fig, (top, bottom)


# --------------------------------------------------------------------------- decentralized mode
# Rows are metrics.jsonl rows of a gossip run (fedens.decentralized.engine): ``global-test`` rows
# carry per-node lists ``node_<metric>``, ``gossip`` rows ``layer_variance`` (name -> value).


def nodes_figure(rows: Sequence[dict[str, Any]], scope: str = "global-test") -> tuple[plt.Figure, Any]:
    """Per-node convergence: accuracy, NLL and ECE of the nodes' models against round, the mean
    over nodes as a line and the min-max over nodes as a band (rows of ``scope``)."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), constrained_layout=True)
    got = [r for r in rows if r["scope"] == scope]
    for ax, (key, label) in zip(axes, METRICS):
        pts = [r for r in got if key in r and f"{key}_min" in r]
        if pts:
            xs = [r["round"] for r in pts]
            ax.fill_between(xs, [r[f"{key}_min"] for r in pts], [r[f"{key}_max"] for r in pts],
                            alpha=0.25, color="tab:blue", label="min-max over nodes")
            ax.plot(xs, [r[key] for r in pts], "-o", ms=3, color="tab:blue", label="mean over nodes")
        ax.set_xlabel("round")
        ax.set_ylabel(f"{label} ({scope})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig, axes


def layer_variance_figure(rows: Sequence[dict[str, Any]]) -> tuple[plt.Figure, Any]:
    """Per-layer weight variance (mean over nodes of the within-tensor variance) against round,
    one line per tensor, from the ``gossip`` rows' ``layer_variance``; log scale."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    got = [r for r in rows if r["scope"] == "gossip" and r.get("layer_variance")]
    names = list(got[0]["layer_variance"]) if got else []
    for name in names:
        ax.plot([r["round"] for r in got], [r["layer_variance"][name] for r in got], "-", lw=1.3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("weight variance per layer")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=7)
    return fig, ax


def layer_variance_comparison_figure(
    runs: dict[str, Sequence[dict[str, Any]]], per_layer: bool = False
) -> tuple[plt.Figure, Any]:
    """Layer variance against round for several runs ``{label: rows}`` (e.g. ``average`` vs
    ``vca``: without and with variance correction). One line per run for
    ``layer_variance_mean`` (the mean over layers); with ``per_layer`` also a thin line per
    tensor in the run's colour. Log scale."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        got = [r for r in rows if r["scope"] == "gossip" and r.get("layer_variance_mean") is not None]
        xs = [r["round"] for r in got]
        ax.plot(xs, [r["layer_variance_mean"] for r in got], "-", lw=1.8, color=color, label=label)
        if per_layer and got:
            for name in got[0]["layer_variance"]:
                ax.plot(xs, [r["layer_variance"][name] for r in got], "-", lw=0.6, alpha=0.5, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("weight variance (mean over layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, ax


def save(fig: plt.Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
