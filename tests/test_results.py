"""The run folder's writers: TensorBoard events next to metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedens.results import RunRecorder
from fedens.scenario import load_scenario


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
