"""``fedens compare``: expanding variants x grid x seeds, validation of the whole file, the
statistics and tables over seeds (numbers by hand), targets, and resuming."""

from __future__ import annotations

import json
import math

import pytest

from fedens.compare import (
    PlannedRun,
    RunOutcome,
    Target,
    _finished,
    analyse,
    load_comparison,
    markdown_report,
    node_bytes,
    rounds_to,
)
from fedens.scenario import ScenarioError

CURVE = [{"round": 0, "accuracy": 0.1, "nll": 2.3}, {"round": 1, "accuracy": 0.7, "nll": 1.0},
         {"round": 2, "accuracy": 0.86, "nll": 0.5}, {"round": 3, "accuracy": 0.80, "nll": 0.4}]


def test_rounds_to_a_level_higher_and_lower_is_better():
    assert rounds_to(CURVE, "accuracy", 0.85) == 2  # first round at or above, even if it drops later
    assert rounds_to(CURVE, "accuracy", 0.90) is None
    assert rounds_to(CURVE, "nll", 0.45) == 3  # lower is better: first round at or below
    assert rounds_to(CURVE, "accuracy", 0.70) == 1  # reaching the level exactly counts


def test_target_relative_to_a_variant():
    t = Target(fraction=0.9, of="fedavg")
    assert t.level({"fedavg": {"accuracy": 0.92}}) == pytest.approx(0.828)
    assert Target(value=0.85).level({}) == 0.85
    with pytest.raises(ValueError):
        Target(fraction=0.9)  # neither a value nor a complete relative target
    with pytest.raises(ValueError):
        Target(value=0.8, fraction=0.5)  # both kinds at once


def test_bytes_per_client_or_node():
    assert node_bytes({"client_bytes_down": 300, "client_bytes_up": 100}) == 400
    # a gossip round: 4 active nodes on a ring, 8 copies of 1000 bytes delivered: 2 in and 2 out each
    assert node_bytes({"bytes_sent": 9000, "bytes_received": 4000, "bytes_p2p": 8000, "nodes_active": 4}) == 4000


def test_variants_cross_the_grid_and_run_per_seed(write_yaml):
    write_yaml("rounds: 2\nseed: 9\n", "base.yaml")
    path = write_yaml(
        "base: base.yaml\nseeds: 3\nreference: single\n"
        "variants: {single: {}, deep: {learner: {kind: deep_ensemble, members: 2}}}\n"
        "grid: {data.partition: [{kind: iid}, {kind: dirichlet, alpha: 0.5}], train.lr: [0.1]}\n", "cmp.yaml")
    cmp, runs = load_comparison(path)
    names = ["single-partition=iid,lr=0.1", "deep-partition=iid,lr=0.1",
             "single-partition=dirichlet,lr=0.1", "deep-partition=dirichlet,lr=0.1"]
    assert cmp.variant_names() == names
    assert len(runs) == 12 and [r.seed for r in runs[:3]] == [0, 1, 2]  # seeds 0..2, not the base's 9
    deep = [r for r in runs if r.variant.name == names[3]]
    assert all(r.scenario.learner.kind == "deep_ensemble" and r.scenario.data.partition.kind == "dirichlet" for r in deep)
    assert [r.scenario.seed for r in deep] == [0, 1, 2]
    # without seeds: the base's own seed; a grid alone names variants by its values
    path = write_yaml("base: base.yaml\ngrid: {train.lr: [0.1, 0.2]}\n", "grid.yaml")
    cmp, runs = load_comparison(path)
    assert cmp.variant_names() == ["lr=0.1", "lr=0.2"] and [r.seed for r in runs] == [9, 9]


@pytest.mark.parametrize("text,message", [
    ("base: base.yaml\nvariants: {a: {}}\nreference: b\n", "reference: 'b' is not a variant"),
    ("base: base.yaml\nvariants: {a: {}}\ntarget: {fraction: 0.9, of: fedavg}\n", "target.of: 'fedavg' is not a variant"),
    ("base: base.yaml\nvariants: {a: {}}\nseeds: 0\n", "seeds"),
    ("base: base.yaml\nvariants: {a: {}}\nseeds: [1, 1]\n", "seeds"),
    ("base: base.yaml\n", "variants: give named variants, a grid, or both"),
    ("base: base.yaml\ngrid: {train.lr: []}\n", "grid"),
    ("base: nope.yaml\nvariants: {a: {}}\n", "base: no such file"),
    ("base: base.yaml\nvariants: {a: {}, b: {train: {lr: -1}}}\n", "variants.b: .*train.lr"),
    ("base: base.yaml\nvariants: {a: {}}\nbogus: 1\n", "bogus: unknown key"),
])
def test_the_whole_file_is_validated_first(write_yaml, text, message):
    write_yaml("rounds: 2\n", "base.yaml")
    with pytest.raises(ScenarioError, match=message):
        load_comparison(write_yaml(text, "cmp.yaml"))


def test_plugin_paths_in_a_variant_resolve_against_the_comparison_folder(tmp_path):
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "base.yaml").write_text("rounds: 2\n")
    (tmp_path / "mine.py").write_text("from flwr.serverapp.strategy import FedAvg\nclass Mine(FedAvg):\n    pass\n")
    path = tmp_path / "cmp.yaml"
    path.write_text("base: scenarios/base.yaml\nvariants: {mine: {strategy: {name: mine.py:Mine}}}\n")
    _, runs = load_comparison(path)
    assert runs[0].scenario.strategy.name == f"{(tmp_path / 'mine.py').resolve()}:Mine"


def outcome(runs: list[PlannedRun], name: str, seed: int, acc: float, ece: float, curve=None) -> RunOutcome:
    planned = next(r for r in runs if r.variant.name == name and r.seed == seed)
    rows = curve or [{"round": 0, "scope": "global-test", "accuracy": 0.1}, {"round": 1, "scope": "global-test", "accuracy": acc}]
    rows = rows + [{"round": 1, "scope": "train", "client_bytes_down": 1000, "client_bytes_up": 500}]
    summary = {"status": "ok", "wall_time_s": 1.0, "final": {"global-test": {"accuracy": acc, "ece": ece}}}
    return RunOutcome(planned, rows, summary, skipped=False)


def test_statistics_and_paired_differences_by_hand(write_yaml):
    write_yaml("rounds: 1\n", "base.yaml")
    path = write_yaml("base: base.yaml\nseeds: 3\nreference: a\ntarget: {value: 0.8}\nvariants: {a: {}, b: {train: {lr: 0.2}}}\n",
                      "cmp.yaml")
    cmp, runs = load_comparison(path)
    acc = {"a": [0.80, 0.82, 0.84], "b": [0.85, 0.88, 0.88]}
    outs = [outcome(runs, v, s, acc[v][s], 0.1 * (s + 1)) for v in "ab" for s in range(3)]
    report = analyse(cmp, outs)
    a = report["variants"]["a"]["test_accuracy"]
    # mean 0.82, sd 0.02, half-width t(0.975, 2) * 0.02 / sqrt 3
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.82) and a["std"] == pytest.approx(0.02)
    assert a["ci_high"] - a["mean"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), abs=1e-6)
    d = report["versus_reference"]["b"]["test_accuracy"]
    # differences 0.05, 0.06, 0.04: mean 0.05, sd 0.01, t = 0.05 / (0.01 / sqrt 3) = 8.660 (2 dof)
    t = 0.05 / (0.01 / math.sqrt(3))
    assert d["mean"] == pytest.approx(0.05) and d["std"] == pytest.approx(0.01)
    assert d["p_value"] == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-7)
    assert "a" not in report["versus_reference"]  # the reference is not compared with itself
    assert report["variants"]["a"]["rounds_to_target"]["mean"] == 1.0  # every run reaches 0.8 in round 1
    assert report["variants"]["b"]["bytes_per_client_round"]["mean"] == 1500
    assert [r["seed"] for r in report["runs"]][:3] == [0, 1, 2]
    table = markdown_report(report)
    assert "| a | 3 | 0.8200 ± 0.0497 |" in table and "(p=0.013)" in table
    json.dumps(report, allow_nan=False)


def test_reference_and_relative_target_per_grid_point(write_yaml):
    write_yaml("rounds: 1\n", "base.yaml")
    path = write_yaml("base: base.yaml\nseeds: 2\nreference: a\ntarget: {fraction: 0.5, of: a}\n"
                      "variants: {a: {}, b: {}}\ngrid: {train.lr: [0.1, 0.2]}\n", "cmp.yaml")
    cmp, runs = load_comparison(path)
    accs = {"a-lr=0.1": 0.6, "b-lr=0.1": 0.5, "a-lr=0.2": 0.9, "b-lr=0.2": 0.7}
    curve = lambda v: [{"round": 0, "scope": "global-test", "accuracy": 0.1}, {"round": 1, "scope": "global-test", "accuracy": 0.35},  # noqa: E731
                       {"round": 2, "scope": "global-test", "accuracy": accs[v]}]
    outs = [outcome(runs, v, s, accs[v], 0.1, curve(v)) for v in accs for s in range(2)]
    report = analyse(cmp, outs)
    assert report["versus_reference"]["b-lr=0.2"]["reference"] == "a-lr=0.2"
    assert report["versus_reference"]["b-lr=0.1"]["test_accuracy"]["mean"] == pytest.approx(-0.1)
    # level = 0.5 x a's mean at the same grid point: 0.30 (reached in round 1), 0.45 (round 2)
    assert report["variants"]["b-lr=0.1"]["target_level"] == pytest.approx(0.3)
    assert report["variants"]["b-lr=0.1"]["rounds_to_target"]["mean"] == 1.0
    assert report["variants"]["b-lr=0.2"]["rounds_to_target"]["mean"] == 2.0


def test_a_run_counts_as_finished_only_when_ok_and_unchanged(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "ok"}))
    (tmp_path / "compare.json").write_text("scenario A")
    assert _finished(tmp_path, "scenario A")
    assert not _finished(tmp_path, "scenario B")  # the variant changed: run it again
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert not _finished(tmp_path, "scenario A")
    assert not _finished(tmp_path / "missing", "scenario A")


def test_a_diverged_run_is_counted_not_averaged_and_the_report_stays_strict_json(write_yaml, tmp_path):
    write_yaml("rounds: 1\n", "base.yaml")
    path = write_yaml("base: base.yaml\nseeds: 3\nreference: a\nvariants: {a: {}, b: {}}\n", "cmp.yaml")
    cmp, runs = load_comparison(path)
    outs = [outcome(runs, v, s, 0.8 + 0.01 * s, 0.1) for v in "ab" for s in range(3)]
    broken = outs[5]  # b, seed 2: diverged after an evaluation with NaN metrics
    broken.summary.update(status="failed", failure="diverged", final={"global-test": {"accuracy": 0.1, "ece": float("nan")}})
    report = analyse(cmp, outs)
    b = report["variants"]["b"]
    assert b["statuses"] == {"diverged": 1, "ok": 2}
    assert b["test_accuracy"]["n"] == 2 and b["test_accuracy"]["mean"] == pytest.approx(0.805)  # not 0.1
    assert report["runs"][5]["test_accuracy"] is None and report["runs"][5]["status"] == "diverged"
    assert report["versus_reference"]["b"]["test_accuracy"]["seeds"] == [0, 1]
    assert "| b | 2 (1 diverged) |" in markdown_report(report)
    from fedens.compare import write_outputs

    report["runs"][4]["test_nll"] = float("nan")  # a NaN anywhere: null in the JSON, never an error
    write_outputs(cmp, outs, report, tmp_path)
    assert json.loads((tmp_path / "comparison.json").read_text())["runs"][4]["test_nll"] is None


def test_a_diverged_run_counts_as_finished(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "failure": "diverged"}))
    (tmp_path / "compare.json").write_text("scenario A")
    assert _finished(tmp_path, "scenario A")  # a result: the same scenario would diverge again
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "failure": "error"}))
    assert not _finished(tmp_path, "scenario A")
