"""The run folder's writers: TensorBoard events next to metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedens.checks import load_scenario
from fedens.results import RunRecorder


def test_tensorboard_gets_every_scopes_metrics_per_round_and_the_plots(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scn = load_scenario({"name": "tb", "output": {"tensorboard": True}})
    rec = RunRecorder(tmp_path, scn)
    rows = [{"round": r, "scope": s, "time_s": 0.1 * r, "accuracy": a, "ece": 0.1, "node_accuracy": [0.1, 0.2]}
            for r, a in ((0, 0.1), (1, 0.7)) for s in ("global-test", "global-shift")]
    rec.write_rows(rows + [{"round": 1, "scope": "gossip", "layer_variance": {"0.weight": 0.5}}])
    rec.finish("ok")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    acc = events.Scalars("global-test/accuracy")
    assert [(e.step, round(e.value, 6)) for e in acc] == [(0, 0.1), (1, 0.7)]
    assert "global-shift/ece" in events.Tags()["scalars"] and "gossip/layer_variance/0.weight" in events.Tags()["scalars"]
    assert not any("node_accuracy" in t for t in events.Tags()["scalars"])  # lists are not scalars
    assert "plots/convergence" in events.Tags()["images"]


def test_gossip_plots_draw_rows_with_null_values():
    """A node whose model blew up has null metrics (strict JSON); the plots show a gap."""
    from fedens import plots

    rows = [{"round": r, "scope": "global-test", "accuracy": 0.5, "accuracy_min": 0.4, "accuracy_max": None,
             "nll": None, "nll_min": None, "nll_max": None, "ece": 0.1, "ece_min": 0.0, "ece_max": 0.2} for r in (0, 1, 2)]
    rows += [{"round": r, "scope": "gossip", "layer_variance_mean": 1.0, "layer_variance": {"0.weight": None if r else 1.0}}
             for r in (0, 1, 2)]
    plots.nodes_figure(rows)
    plots.layer_variance_figure(rows)
