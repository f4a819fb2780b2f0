"""benchmarks/report.py: verdicts, readings, stamps and --check from hand-made comparison folders
(no Ray, nothing runs). The expected numbers are worked out by hand: a paired interval is
``mean ± t_{0.975, n-1} · sd / sqrt(n)`` with t_{0.975,4} = 2.776445 and t_{0.975,3} = 3.182446."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import report as R
from benchmarks.report import ALL, REFERENCE, Check, Claim

BASE = [0.70, 0.72, 0.68, 0.71, 0.69]  # the baseline's accuracy per seed
DIFFS = {
    "holds": [0.01, 0.02, 0.03, 0.02, 0.02],  # mean 0.02, sd 0.0070711: [0.011220, 0.028780]
    "unsure": [0.01, -0.02, 0.03, -0.01, 0.00],  # mean 0.002, sd 0.019235: [-0.021884, 0.025884]
    "shaky": [0.01, 0.02, 0.03, 0.02, None],  # seed 4 diverged; over 4: mean 0.02, sd 0.0081650: [0.007008, 0.032992]
    "worse": [-0.03, -0.02, -0.04, -0.03, None],  # seed 4 diverged; the 4 others: [-0.042992, -0.017008]
    "shaky_unsure": [0.01, -0.02, 0.03, -0.01, None],  # seed 4 diverged; the 4 others straddle 0
}


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def layout(tmp: Path, extra_columns: bool = True) -> tuple[Path, Path]:
    """tmp/benchmarks/cmp.yaml (+ base.yaml) and tmp/out/cmp/runs.csv; returns (out, benchmarks)."""
    bench = tmp / "benchmarks"
    bench.mkdir()
    (bench / "base.yaml").write_text("rounds: 10\n")
    (bench / "cmp.yaml").write_text("name: cmp\nbase: base.yaml\nseeds: 5\nreference: base\n"
                                    "variants: {base: {}, holds: {}, unsure: {}, shaky: {}, worse: {}, shaky_unsure: {}}\n")
    rows = []
    for name in ["base", *DIFFS]:
        for seed in range(5):
            d = 0.0 if name == "base" else DIFFS[name][seed]
            ok = d is not None
            row = {"variant": name, "seed": seed, "status": "ok" if ok else "diverged",
                   "test_accuracy": round(BASE[seed] + d, 6) if ok else None,
                   # ECE: the variant lower than the baseline by the same differences
                   "test_ece": round(0.10 - d, 6) if ok else None,
                   "wall_time_s": 60.0 if ok else 12.0}
            if extra_columns:
                row.update({"test_ece_ts": round(0.05 - d / 2, 6) if ok else None,
                            "test_temperature": 1.5 if ok else None,
                            "rounds_used": (10 if seed == 0 else 7) if ok else None,
                            "stopped_early": (seed != 0) if ok else None})
            rows.append(row)
    write_csv(tmp / "out" / "cmp" / "runs.csv", rows, list(rows[0]))
    return tmp / "out", bench


def claim(**kw) -> Claim:
    args = dict(key="k", comparison="cmp", title="Variants beat the base", source="a paper",
                setup="The claim, in words.", pairs=[(ALL, REFERENCE)], checks=[Check("test_accuracy", "higher")])
    return Claim(**{**args, **kw})


def by_variant(res: R.ClaimResult) -> dict[str, R.PairResult]:
    return {p.variant: p for p in res.pairs}


def test_verdicts_means_and_intervals(tmp_path):
    out, bench = layout(tmp_path)
    res = R.evaluate_claim(claim(), out, bench)
    pairs = by_variant(res)
    assert list(pairs) == list(DIFFS)  # every variant against the reference, not the reference itself
    a = pairs["holds"].checks[0].paired
    assert (a.n, pairs["holds"].verdict) == (5, "holds")
    assert a.mean == pytest.approx(0.02, abs=1e-9)
    assert (a.ci_low, a.ci_high) == (pytest.approx(0.011220, abs=2e-6), pytest.approx(0.028780, abs=2e-6))
    u = pairs["unsure"].checks[0]
    assert u.paired.mean == pytest.approx(0.002, abs=1e-9)
    assert (u.paired.ci_low, u.paired.ci_high) == (pytest.approx(-0.021884, abs=2e-6), pytest.approx(0.025884, abs=2e-6))
    assert (u.verdict, pairs["unsure"].verdict) == ("inconclusive", "inconclusive at this number of seeds")
    assert all(not p.unstable for p in (pairs["holds"], pairs["unsure"]))


def test_a_diverged_seed_is_counted_and_never_the_verdict(tmp_path):
    out, bench = layout(tmp_path)
    pairs = by_variant(R.evaluate_claim(claim(), out, bench))
    shaky = pairs["shaky"]
    d = shaky.checks[0].paired
    assert (d.n, d.seeds) == (4, (0, 1, 2, 3))  # the seeds where both runs are ok
    assert d.mean == pytest.approx(0.02, abs=1e-9)
    assert (d.ci_low, d.ci_high) == (pytest.approx(0.007008, abs=2e-6), pytest.approx(0.032992, abs=2e-6))
    assert shaky.verdict == "holds"  # not "does not hold": the 4 paired seeds say it holds
    assert [u.text() for u in shaky.unstable] == ["shaky unstable at these settings in 1 of 5 seeds (seed 4 diverged)"]
    assert "unstable at these settings in 1 of 5 seeds" in shaky.reading()
    assert pairs["shaky_unsure"].verdict == "inconclusive at this number of seeds"
    assert pairs["worse"].verdict == "does not hold"  # because its 4 ok seeds say so
    d = pairs["worse"].checks[0].paired
    assert (d.n, d.ci_low, d.ci_high) == (4, pytest.approx(-0.042992, abs=2e-6), pytest.approx(-0.017008, abs=2e-6))
    text = R.report(out, [claim()], bench, root=tmp_path, lister=lambda root: [])
    row = next(line for line in text.splitlines() if line.startswith("| shaky | base |"))
    assert "**holds** (shaky unstable at these settings in 1 of 5 seeds (seed 4 diverged))" in row


def test_reading_numbers_are_the_computed_ones(tmp_path):
    out, bench = layout(tmp_path)
    res = R.evaluate_claim(claim(), out, bench)
    text = R.report(out, [claim()], bench, root=tmp_path, lister=lambda root: [])
    for p in res.pairs:
        reading = p.reading()
        assert f"- {reading}" in text
        d = p.checks[0].paired
        assert R.numbers_in(reading.split("Verdict:")[0]) == [round(d.mean, 3), round(d.ci_low, 3), round(d.ci_high, 3), d.n]
    holds = by_variant(res)["holds"].reading()
    assert holds == "holds vs base: Δ accuracy +0.020 [+0.011, +0.029] over 5 seeds: holds. Verdict: holds."
    shaky = by_variant(res)["shaky"].reading()
    assert shaky == ("shaky vs base: Δ accuracy +0.020 [+0.007, +0.033] over 4 seeds: holds. Verdict: holds; "
                     "shaky unstable at these settings in 1 of 5 seeds (seed 4 diverged).")


def test_calibration_checks_raw_and_temperature_scaled(tmp_path):
    out, bench = layout(tmp_path)
    c = claim(checks=[Check("test_ece", "lower")], pairs=[("holds", "base")])
    res = R.evaluate_claim(c, out, bench)
    (pair,) = res.pairs
    assert [x.check.metric for x in pair.checks] == ["test_ece", "test_ece_ts"]
    raw, ts = (x.paired for x in pair.checks)
    assert raw.mean == pytest.approx(-0.02, abs=1e-9) and ts.mean == pytest.approx(-0.01, abs=1e-9)
    assert [x.verdict for x in pair.checks] == ["holds", "holds"]
    text = R.report(out, [c], bench, root=tmp_path, lister=lambda root: [])
    assert "Δ ECE after temperature scaling (lower)" in text
    # runs that hit the round cap: seed 0 of each of the two variants (stopped_early false)
    assert "Training length: 2 of 10 runs hit the round cap" in text and "(rounds used: 7 to 10)" in text


def test_without_the_new_columns(tmp_path):
    out, bench = layout(tmp_path, extra_columns=False)
    c = claim(checks=[Check("test_ece", "lower"), Check("test_threshold_gain", "higher")], pairs=[("holds", "base")])
    (pair,) = R.evaluate_claim(c, out, bench).pairs
    assert [x.check.metric for x in pair.checks] == ["test_ece", "test_threshold_gain"]  # no ts check
    assert pair.checks[1].verdict == "not measured" and pair.verdict == "holds"  # over what was measured
    text = R.report(out, [c], bench, root=tmp_path, lister=lambda root: [])
    assert "runs.csv records no early stopping" in text and "Δ accuracy - confidence-threshold exits' at the same compute: not measured" in text


def test_plateau_and_tuning_table(tmp_path):
    out, bench = layout(tmp_path)
    path = out / "cmp" / "runs.csv"
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        if r["status"] == "ok":
            r["stopped_early"] = "True"
    write_csv(path, rows, list(rows[0]))
    write_csv(out / "cmp" / "tuning.csv",
              [{"variant": "base", "trials": 20, "best_value": 0.41, "objective": "val_nll", "best.train.lr": 0.05},
               {"variant": "holds", "trials": 20, "best_value": 0.39, "objective": "val_nll", "best.train.lr": 0.1},
               {"variant": "unsure", "trials": 12, "best_value": 0.45, "objective": "val_nll", "best.train.lr": 0.01}],
              ["variant", "trials", "best_value", "objective", "best.train.lr"])
    text = R.report(out, [claim(pairs=[("holds", "base"), ("unsure", "base")])], bench, root=tmp_path, lister=lambda r: [])
    assert "every method was trained to its plateau: all 15 runs stopped early" in text
    assert "| unsure | 12 **(unequal budget)** | val_nll | 0.45 | 0.01 |" in text
    assert "| holds | 20 | val_nll | 0.39 | 0.1 |" in text
    assert "**Unequal tuning budget**: unsure" in text
    # a fixed control (tuned: False, no trials by design) is labelled and not a budget mismatch
    write_csv(out / "cmp" / "tuning.csv",
              [{"variant": "base", "tuned": True, "trials": 20, "best_value": 0.41, "objective": "val_nll", "best.train.lr": 0.05},
               {"variant": "holds", "tuned": True, "trials": 20, "best_value": 0.39, "objective": "val_nll", "best.train.lr": 0.1},
               {"variant": "unsure", "tuned": False, "trials": 0, "best_value": None, "objective": "val_nll", "best.train.lr": None}],
              ["variant", "tuned", "trials", "best_value", "objective", "best.train.lr"])
    text = R.report(out, [claim(pairs=[("holds", "base"), ("unsure", "base")])], bench, root=tmp_path, lister=lambda r: [])
    assert "| unsure | 0 (fixed control, not tuned) | val_nll |" in text and "Unequal" not in text
    assert "Every tuned variant had the same tuning budget: 20 trials; unsure ran at the settings of the comparison file." in text


def test_within_run_and_missing_variants(tmp_path):
    out, bench = layout(tmp_path)
    path = out / "cmp" / "runs.csv"
    rows = list(csv.DictReader(open(path)))
    for r in rows:  # the student loses 0.01 accuracy on every seed: within the margin
        r["student_accuracy"] = "" if r["status"] != "ok" else round(float(r["test_accuracy"]) - 0.01, 6)
    write_csv(path, rows, list(rows[0]))
    c = claim(pairs=[("holds", ""), ("nowhere", "base")], checks=[Check("student_vs_teacher_accuracy", "not lower")],
              zero_label="its teacher")
    first, missing = R.evaluate_claim(c, out, bench).pairs
    assert first.baseline_label == "its teacher" and first.checks[0].paired.mean == pytest.approx(-0.01, abs=1e-9)
    assert first.verdict == "holds"
    assert (missing.verdict, missing.missing) == ("not run yet", ["nowhere"])


def test_grid_pairs_at_the_same_point(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "g.yaml").write_text("name: g\nbase: base.yaml\nreference: single\ngrid: {data.partition.alpha: [0.1, 0.5]}\n"
                                  "variants: {single: {}, fge: {tune: {space: {train.lr: {low: 0.1, high: 1}}}}, other: {}}\n"
                                  "tune: {trials: 3}\n")  # tune: read past
    runs = R.Runs(tmp_path, ["variant", "seed", "status"], [])
    lay = R.layout(bench / "g.yaml", runs)
    assert R.resolve_pairs([("fge", "single")], lay) == [("fge-alpha=0.1", "single-alpha=0.1"), ("fge-alpha=0.5", "single-alpha=0.5")]
    assert R.resolve_pairs([(ALL, REFERENCE)], lay) == [
        ("fge-alpha=0.1", "single-alpha=0.1"), ("other-alpha=0.1", "single-alpha=0.1"),
        ("fge-alpha=0.5", "single-alpha=0.5"), ("other-alpha=0.5", "single-alpha=0.5")]


def test_not_run_yet(tmp_path):
    from benchmarks.run import CLAIMS

    text = R.report(tmp_path / "nothing", CLAIMS, tmp_path / "benchmarks", root=tmp_path, lister=lambda r: [])
    assert text.count("Not run yet") == len(CLAIMS) and "Nothing has run yet" in text
    msg, code = R.check(tmp_path / "nothing", tmp_path / "benchmarks", tmp_path, CLAIMS, lister=lambda r: [])
    assert code == 0 and msg.startswith("nothing has run")


def test_claims_hold_no_hand_written_numbers():
    from benchmarks.run import CLAIMS

    keys = [c.key for c in CLAIMS]
    assert len(set(keys)) == len(keys)
    for key in ("early_exit_threshold", "mixture_vs_ensemble", "fge", "distill", "lora", "conformal"):
        assert key in keys
    for c in CLAIMS:
        assert c.setup and R.numbers_in(c.setup) == [], (c.key, c.setup)
        for check in c.checks:
            R.verdict(None, check.direction)  # a known direction
            assert check.direction in ("higher", "lower", "not lower", "not higher", "comparable")
    mix = next(c for c in CLAIMS if c.key == "mixture_vs_ensemble")
    assert (mix.comparison, mix.pairs) == ("mixture", [("mixture", "ivon_ensemble")])


# --------------------------------------------------------------------------- stamps and --check


def fake_run(out: Path, name: str, seed: int, t: int) -> None:
    folder = out / "cmp" / name / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text("{}")
    os.utime(folder / "summary.json", ns=(t, t))


def stamp_layout(tmp: Path) -> tuple[Path, Path, Path]:
    root = tmp / "repo"
    (root / "fedens").mkdir(parents=True)
    (root / "fedens" / "x.py").write_text("x = 1\n")
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "cmp.yaml").write_text("name: cmp\nbase: ../scenarios/s.yaml\nvariants: {a: {}}\n")
    (root / "scenarios").mkdir()
    (root / "scenarios" / "s.yaml").write_text("rounds: 3\n")
    return root, root / "out", root / "benchmarks"


def lister(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "fedens").rglob("*.py"))


def test_stamp_and_check(tmp_path):
    root, out, bench = stamp_layout(tmp_path)
    yaml_path = bench / "cmp.yaml"
    stamp = R.new_stamp(root, yaml_path, lister=lister)
    assert set(stamp["files"]) == {"benchmarks/cmp.yaml", "scenarios/s.yaml", "fedens/x.py"}
    assert stamp["commit"] == "unknown" or stamp["commit"]
    (out / "cmp").mkdir(parents=True)
    before = R.run_keys(out / "cmp")
    fake_run(out, "a", 0, 10**18)
    fake_run(out, "a", 1, 10**18)
    written = R.finish_stamp(out / "cmp", stamp, before, 42.0, machine={"cpus": 2, "gpus": 0})
    on_disk = json.loads((out / "cmp" / "stamp.json").read_text())
    assert on_disk == written
    assert {"commit", "date", "files", "runs", "invocations", "elapsed_s"} <= set(on_disk) and on_disk["elapsed_s"] == 42.0
    assert set(on_disk["runs"]) == {"a/seed-0", "a/seed-1"}

    msg, code = R.check(out, bench, root, lister=lister)
    assert code == 0 and "up to date: cmp" in msg

    (root / "fedens" / "x.py").write_text("x = 2\n")  # the code changed since the runs
    msg, code = R.check(out, bench, root, lister=lister)
    assert code == 1 and "STALE cmp" in msg and "fedens/x.py" in msg and "benchmarks/cmp.yaml" not in msg

    (root / "fedens" / "x.py").write_text("x = 1\n")  # changed back: the same blob again
    (root / "fedens" / "y.py").write_text("")  # a new source file counts too
    msg, code = R.check(out, bench, root, lister=lister)
    assert code == 1 and "fedens/y.py" in msg


def test_a_resumed_section_keeps_the_code_of_its_reused_runs(tmp_path):
    root, out, bench = stamp_layout(tmp_path)
    yaml_path = bench / "cmp.yaml"
    (out / "cmp").mkdir(parents=True)
    before = R.run_keys(out / "cmp")
    fake_run(out, "a", 0, 10**18)
    fake_run(out, "a", 1, 10**18)
    R.finish_stamp(out / "cmp", R.new_stamp(root, yaml_path, lister=lister), before, 10.0)
    (root / "fedens" / "x.py").write_text("x = 2\n")
    before = R.run_keys(out / "cmp")
    fake_run(out, "a", 1, 2 * 10**18)  # only seed 1 ran again, at the new code
    second = R.finish_stamp(out / "cmp", R.new_stamp(root, yaml_path, lister=lister), before, 5.0)
    assert (second["runs_ran"], second["runs_reused"], second["elapsed_s"]) == (1, 1, 15.0)
    changed, unknown = R.stale_files(second, R.code_hashes(root, yaml_path, lister=lister))
    assert changed == ["fedens/x.py"] and unknown == 0  # seed 0 still ran at the old x.py
    before = R.run_keys(out / "cmp")
    fake_run(out, "a", 0, 3 * 10**18)
    third = R.finish_stamp(out / "cmp", R.new_stamp(root, yaml_path, lister=lister), before, 7.0)
    assert R.stale_files(third, R.code_hashes(root, yaml_path, lister=lister)) == ([], 0)
    assert third["elapsed_s"] == 12.0  # the invocations that produced the current runs: the second and the third
    msg, code = R.check(out, bench, root, lister=lister)
    assert code == 0
    before = R.run_keys(out / "cmp")  # nothing ran: the stamp stays as it was
    fourth = R.finish_stamp(out / "cmp", R.new_stamp(root, yaml_path, lister=lister), before, 1.0)
    assert {k: fourth[k] for k in ("date", "runs", "elapsed_s")} == {k: third[k] for k in ("date", "runs", "elapsed_s")}


def test_unstamped_runs_are_stale(tmp_path):
    root, out, bench = stamp_layout(tmp_path)
    write_csv(out / "cmp" / "runs.csv", [{"variant": "a", "seed": 0, "status": "ok"}], ["variant", "seed", "status"])
    msg, code = R.check(out, bench, root, lister=lister)
    assert code == 1 and "no stamp.json" in msg
    text = R.report(out, [claim(pairs=[("a", "")])], bench, root=root, lister=lister)
    assert "Not stamped" in text


def test_stamp_is_printed_in_the_section(tmp_path):
    out, bench = layout(tmp_path)
    stamp = R.new_stamp(tmp_path, bench / "cmp.yaml", lister=lambda r: [])
    stamp["commit"] = "0123456789abcdef+dirty"
    (out / "cmp" / "stamp.json").write_text(json.dumps({**stamp, "elapsed_s": 120.0}))
    text = R.report(out, [claim()], bench, root=tmp_path, lister=lambda r: [])
    assert "*Ran at commit `0123456789abcdef+dirty` on " in text and "2.0 min of wall time" in text
    assert "The code it depends on is unchanged since." in text
    (bench / "base.yaml").write_text("rounds: 11\n")
    text = R.report(out, [claim()], bench, root=tmp_path, lister=lambda r: [])
    assert "**Stale: 1 file(s) it depends on changed since (`benchmarks/base.yaml`)**" in text


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_blob_hash_is_gits(tmp_path):
    path = tmp_path / "f.py"
    path.write_bytes(b"print('hi')\n\x00\xff")
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert R.blob_hash(path) == expected


def test_cli_check_starts_nothing():
    import sys

    code = ("import sys; sys.path.insert(0, '.'); import benchmarks.run as r; c = r.main(['--check', '--out', '/nonexistent']);"
            "print(c, 'ray' in sys.modules, 'torch' in sys.modules, 'fedens.api' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=R.ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "0 False False False"
    assert done.stdout.startswith("nothing has run under /nonexistent")


def test_censored_rounds_and_coverage_gaps(tmp_path):
    out, bench = layout(tmp_path)
    folder = out / "cmp"
    rows = [{"variant": v, "seed": s, "status": "ok", "rounds_to_target": rt, "test_conformal_coverage": cov}
            for v, rts, covs in (("base", [9, None, 8], [0.91, 0.92, 0.93]), ("holds", [6, 7, 5], [0.88, 0.89, 0.90]))
            for s, rt, cov in zip(range(3), rts, covs)]
    write_csv(folder / "runs.csv", rows, list(rows[0]))
    for r in rows:
        run = folder / r["variant"] / f"seed-{r['seed']}"
        run.mkdir(parents=True)
        (run / "scenario.yaml").write_text("rounds: 10\nevaluate: {conformal: {alpha: 0.1}}\n")
    runs = R.Runs.read(folder)
    assert R.values(runs, "base", "rounds_to_target") == {0: 9.0, 1: 11, 2: 8.0}  # never reached: the cap + 1
    gaps = R.values(runs, "holds", "coverage_gap")
    assert gaps == {0: pytest.approx(-0.02), 1: pytest.approx(-0.01), 2: pytest.approx(0.0)}
    c = claim(pairs=[("holds", "base")], checks=[Check("rounds_to_target", "lower")])
    (pair,) = R.evaluate_claim(c, out, bench).pairs
    d = pair.checks[0].paired  # differences [-3, -4, -3]: mean -3.333, sd 0.57735, t_{0.975,2} = 4.302653
    assert d.mean == pytest.approx(-10 / 3) and d.ci_high == pytest.approx(-10 / 3 + 4.302653 * 0.57735 / 3 ** 0.5, abs=1e-4)
    assert pair.verdict == "holds" and "Δ rounds to target -3.3 [-4.8, -1.9] over 3 seeds: holds" in pair.reading()


def test_tuning_trials_are_stamped_and_rerun_forgets_everything(tmp_path):
    from benchmarks.run import forget_runs
    from fedens.compare import MARKER

    root, out, bench = stamp_layout(tmp_path)
    yaml_path = bench / "cmp.yaml"
    folder = out / "cmp"
    (folder / "a" / "seed-0").mkdir(parents=True)
    (folder / "tuning" / "a" / "trial-0" / "seed-1000").mkdir(parents=True)
    for run in (folder / "a" / "seed-0", folder / "tuning" / "a" / "trial-0" / "seed-1000"):
        (run / "summary.json").write_text("{}")
        (run / MARKER).write_text("{}")
    (folder / "tuning.db").write_text("")
    stamp = R.finish_stamp(folder, R.new_stamp(root, yaml_path, lister=lister), {}, 1.0)
    assert set(stamp["runs"]) == {"a/seed-0", "tuning/a/trial-0/seed-1000"}
    assert forget_runs(folder) == 2
    assert not list(folder.rglob(MARKER)) and not (folder / "tuning.db").exists() and list(folder.glob("tuning.db.before-*"))


def test_run_all_stamps_and_times_each_comparison(tmp_path, monkeypatch):
    """The protocol's bookkeeping, with run_comparison and the session replaced (no Ray)."""
    import contextlib

    import fedens
    import fedens.compare
    from benchmarks import run

    calls = []

    def fake_run_comparison(path, out, session=None, progress=None):
        calls.append(Path(path).stem)
        out = Path(out)
        for seed in range(2):
            (out / "sgd" / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
            if not (out / "sgd" / f"seed-{seed}" / "summary.json").exists():  # resumable: a finished run stays
                (out / "sgd" / f"seed-{seed}" / "summary.json").write_text("{}")
        write_csv(out / "runs.csv", [{"variant": "sgd", "seed": s, "status": "ok"} for s in range(2)], ["variant", "seed", "status"])

    monkeypatch.setattr(fedens.compare, "run_comparison", fake_run_comparison)
    monkeypatch.setattr(fedens, "session", lambda: contextlib.nullcontext(None))
    elapsed = run.run_all(tmp_path, ["ivon"])
    assert calls == ["ivon"] and set(elapsed) == {"ivon"}
    assert json.loads((tmp_path / "elapsed.json").read_text()) == elapsed
    stamp = json.loads((tmp_path / "ivon" / "stamp.json").read_text())
    assert stamp["comparison"] == "ivon" and stamp["runs_ran"] == 2 and "benchmarks/ivon.yaml" in stamp["files"]
    assert "scenarios/mnist1d.yaml" in stamp["files"] and "fedens/compare.py" in stamp["files"]
    again = run.run_all(tmp_path, ["ivon"])  # resumed, nothing ran: the stamp stays
    assert json.loads((tmp_path / "ivon" / "stamp.json").read_text())["date"] == stamp["date"] and again == elapsed
    with pytest.raises(SystemExit):
        run.run_all(tmp_path, ["no_such_comparison"])


def test_a_comparison_whose_interval_does_not_decide_gets_more_seeds(tmp_path, monkeypatch):
    # "unsure" straddles zero over 5 seeds ([-0.0219, +0.0259]): the protocol asks for 10 seeds;
    # a claim over the decided pairs only asks for nothing
    import benchmarks.run as run

    out, bench = layout(tmp_path)
    monkeypatch.setattr(run, "BENCHMARKS", bench)
    monkeypatch.setattr(run, "CLAIMS", [claim(pairs=[("unsure", "base")])])
    assert run.undecided(out, "cmp") == 5 and run.MORE_SEEDS == 10
    monkeypatch.setattr(run, "CLAIMS", [claim(pairs=[("holds", "base"), ("worse", "base")])])
    assert run.undecided(out, "cmp") is None
    assert run.undecided(out, "other") is None  # no claim on that comparison
