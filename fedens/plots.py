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


def save(fig: plt.Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
