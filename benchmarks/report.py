"""The report side of the benchmark suite: verdicts, readings, stamps and the staleness check.

Everything here reads what a comparison left in ``OUT/<name>/`` and never runs anything (no
Ray, no training; ``fedens.compare`` is imported only for the comparison file's variant names):

- ``runs.csv`` (one row per (variant, seed), written by ``fedens.compare``): the verdicts and
  every number of a section come from it. Columns that not every comparison has
  (``test_nll_ts``, ``test_ece_ts``, ``test_temperature``, ``rounds_used``, ``stopped_early``,
  ``test_threshold_gain``, ``student_*``) are used when present and skipped when absent;
- ``tuning.csv`` (optional; variant, trials, best_value, objective, ``best.<key>``): the chosen
  configuration per variant and the trial budget;
- ``stamp.json`` (written by ``benchmarks/run.py`` around each comparison, see ``new_stamp``):
  the commit and date it ran at and the blob hash of every file it depends on;
- the run folders ``<variant>/seed-<s>/`` only for the swarm's best client (``metrics.jsonl``),
  a conformal run's alpha and a run's rounds cap (``scenario.yaml``).

Verdicts (per metric per compared pair, from ``fedens.stats.paired`` over the seeds where both
runs are ``ok``): **holds** when the 95% interval of the mean paired difference lies on the
claimed side of 0 (``comparable``: inside +-MARGIN; ``not lower``: above -MARGIN; ``not
higher``: below +MARGIN), **does not hold** when it lies on the other side, **inconclusive**
otherwise. A pair holds when every measured check holds, does not hold when any does not, and is
inconclusive at this number of seeds otherwise. A run that is not ``ok`` (diverged, failed, ...)
is counted and named ("unstable at these settings in k of n seeds") next to the verdict and in
the reading, and is never folded into the verdict.

A reading is rendered from templates (``READING_*``) with the computed statistics; a claim's
own text (``Claim.setup``) states the claim and the setup and holds no number.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

MARGIN = 0.02  # "comparable", "not lower", "not higher": the interval within +-2 points (fractions)
ALL = "*"  # a pair's variant: every variant of the comparison
REFERENCE = "@reference"  # a pair's baseline: the comparison's reference at the variant's grid point
# "" as a pair's baseline: a within-run difference, against 0 (the claim's ``zero_label``)

NAMES = {"test_accuracy": "accuracy", "test_ece": "ECE", "test_nll": "NLL", "test_brier": "Brier",
         "test_ece_ts": "ECE after temperature scaling", "test_nll_ts": "NLL after temperature scaling",
         "test_temperature": "temperature", "test_brier_ts": "Brier after temperature scaling",
         "shift_ece_ts": "shift ECE after temperature scaling", "shift_nll_ts": "shift NLL after temperature scaling",
         "test_ood_auroc": "OOD AUROC", "shift_ece": "shift ECE",
         "shift_accuracy": "shift accuracy", "shift_nll": "shift NLL",
         "rounds_to_target": "rounds to target", "rounds_used": "rounds used",
         "best_client": "accuracy - best client's", "coverage_gap": "set coverage - (1 - alpha)",
         "shift_coverage_gap": "shift set coverage - (1 - alpha)",
         "test_conformal_coverage": "set coverage", "test_conformal_size": "set size",
         "shift_conformal_coverage": "shift set coverage",
         "test_routing_gain": "accuracy - static exits' at the same compute",
         "test_threshold_gain": "accuracy - confidence-threshold exits' at the same compute",
         "test_compute_fraction": "compute",
         "student_accuracy": "student accuracy", "student_ece": "student ECE",
         "student_vs_teacher_accuracy": "student accuracy - teacher's", "student_vs_teacher_ece": "student ECE - teacher's",
         "bytes_per_client_round": "kB/client/round", "wall_time_s": "wall s"}
TEMPERATURE_SCALED = {"test_ece": "test_ece_ts", "test_nll": "test_nll_ts", "test_brier": "test_brier_ts",
                      "shift_ece": "shift_ece_ts", "shift_nll": "shift_nll_ts"}  # a raw metric -> after temperature scaling
GAPS = {"coverage_gap": "test_conformal_coverage", "shift_coverage_gap": "shift_conformal_coverage"}
WITHIN_RUN = {"student_vs_teacher_accuracy": ("student_accuracy", "test_accuracy"),
              "student_vs_teacher_ece": ("student_ece", "test_ece")}  # metric -> (column, minus column) of one run
AGAINST_ZERO = {"best_client", "test_routing_gain", "test_threshold_gain", *GAPS, *WITHIN_RUN}
DIGITS = {"rounds_to_target": 1, "rounds_used": 1, "wall_time_s": 0, "bytes_per_client_round": 1}
DEFAULT_DIGITS = 3
PER_VARIANT = ("test_accuracy", "test_nll", "test_ece", "test_nll_ts", "test_ece_ts", "test_temperature", "test_brier",
               "test_ood_auroc", "shift_ece")
FACTS = ("rounds_used", "bytes_per_client_round", "wall_time_s")

# Readings: every number in them is filled in from the statistics.
READING_CHECK = "Δ {label} {mean:+.{p}f} [{lo:+.{p}f}, {hi:+.{p}f}] over {n} seeds: {verdict}"
READING_CHECK_ONE = "Δ {label} {mean:+.{p}f} over {n} seed (no interval): {verdict}"
READING_CHECK_NONE = "Δ {label}: no seed where both runs are ok: {verdict}"
READING_CHECK_UNMEASURED = "Δ {label}: not measured"
READING_PAIR = "{variant} vs {baseline}: {checks}. Verdict: {verdict}{unstable}."
READING_UNSTABLE = "{name} unstable at these settings in {k} of {n} seeds ({which})"
READING_MISSING = "{variant} vs {baseline}: not run yet ({names} not in runs.csv)."


@dataclass(frozen=True)
class Check:
    metric: str  # a runs.csv column, or a derived metric (best_client, coverage_gap, rounds_to_target, WITHIN_RUN)
    direction: str  # "higher", "lower", "not lower" (higher or within MARGIN), "not higher", "comparable"


@dataclass(frozen=True)
class Claim:
    key: str
    comparison: str  # benchmarks/<comparison>.yaml, run into OUT/<comparison>/
    title: str
    source: str
    setup: str  # the claim and its setup, in words: no numbers (they come from the data)
    pairs: list[tuple[str, str]]  # (variant, baseline); ALL, REFERENCE and "" (against 0) as above
    checks: list[Check]
    zero_label: str = "0"  # what a within-run difference is against, in words
    plot: str = "comparison.png"
    extra_plots: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading a comparison's folder


def parse_value(text: str | None) -> Any:
    """A runs.csv cell: "" -> None, true/false -> bool, a number -> float (nan/inf kept), else the text."""
    if text is None or text == "":
        return None
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(text)
    except ValueError:
        return text


TEXT_COLUMNS = ("variant", "status", "objective", "direction")  # names, kept as written (a variant may be called "1")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [{k: (v if k in TEXT_COLUMNS else parse_value(v)) for k, v in row.items()} for row in reader]
        return list(reader.fieldnames or []), rows


@dataclass
class Runs:
    """A comparison's runs.csv: its columns and one dict per run (seed an int, status a str)."""

    folder: Path
    columns: list[str]
    rows: list[dict[str, Any]]

    @classmethod
    def read(cls, folder: Path) -> Runs | None:
        got = read_csv(folder / "runs.csv")
        if got is None:
            return None
        columns, rows = got
        for r in rows:
            r["variant"] = str(r["variant"])
            r["seed"] = int(float(r["seed"]))
            r["status"] = str(r.get("status") or "ok")
        return cls(folder, columns, rows)

    def variants(self) -> list[str]:
        return list(dict.fromkeys(r["variant"] for r in self.rows))

    def of(self, variant: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["variant"] == variant]

    def has(self, column: str, variants: Iterable[str] | None = None) -> bool:
        """``column`` is in runs.csv with a value on some ok run (of ``variants``)."""
        names = None if variants is None else set(variants)
        return column in self.columns and any(
            r.get(column) is not None for r in self.rows if r["status"] == "ok" and (names is None or r["variant"] in names))


@dataclass(frozen=True)
class Variant:
    name: str
    named: str
    point: str


@dataclass
class Layout:
    """A comparison's variants (name, named variant, grid point) and its reference."""

    variants: list[Variant]
    reference: str | None

    def names(self) -> set[str]:
        return {v.name for v in self.variants}

    def at_point(self, named: str, v: Variant) -> str:
        candidate = "-".join(p for p in (named, v.point) if p)
        return candidate if candidate in self.names() else named


def layout(yaml_path: Path, runs: Runs) -> Layout:
    """From the comparison file (only its variants, grid and reference: no scenario is loaded);
    without it, runs.csv's variants, each its own named variant."""
    raw = None
    if yaml_path.is_file():
        try:
            raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raw = None
    if isinstance(raw, dict):
        try:
            from fedens.compare import Comparison

            needed = {k: raw[k] for k in ("name", "base", "variants", "grid", "reference") if k in raw}  # names only
            if isinstance(needed.get("variants"), dict):  # a variant's own search space does not change its name
                needed["variants"] = {n: {k: v for k, v in (t or {}).items() if k != "tune"}
                                      for n, t in needed["variants"].items()}
            cmp = Comparison.model_validate(needed)
            return Layout([Variant(v.name, v.named or v.name, v.point) for v in cmp.expand()], cmp.reference)
        except Exception:  # noqa: BLE001  (an invalid file: fall back to the names that ran)
            pass
    return Layout([Variant(n, n, "") for n in runs.variants()], raw.get("reference") if isinstance(raw, dict) else None)


def resolve_pairs(pairs: list[tuple[str, str]], lay: Layout) -> list[tuple[str, str]]:
    """Concrete (variant, baseline) names; a named variant of a grid comparison at every grid
    point, its baseline at the same point."""
    out: list[tuple[str, str]] = []
    for v, b in pairs:
        if v == ALL:
            xs = lay.variants
        else:
            xs = [x for x in lay.variants if x.name == v] or [x for x in lay.variants if x.named == v] or [Variant(v, v, "")]
        for x in xs:
            if b == REFERENCE:
                if lay.reference is None:
                    continue
                base = lay.at_point(lay.reference, x)
                if base == x.name:
                    continue
            else:
                base = lay.at_point(b, x) if b else ""
            if (x.name, base) not in out:
                out.append((x.name, base))
    return out


def _run_folder(runs: Runs, row: dict[str, Any]) -> Path:
    return runs.folder / row["variant"] / f"seed-{row['seed']}"


def _scenario(runs: Runs, row: dict[str, Any]) -> dict[str, Any]:
    try:
        return yaml.safe_load((_run_folder(runs, row) / "scenario.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _rounds_cap(runs: Runs, row: dict[str, Any]) -> int | None:
    rounds = _scenario(runs, row).get("rounds")
    if rounds is None:
        try:
            rounds = json.loads((_run_folder(runs, row) / "summary.json").read_text()).get("rounds")
        except (OSError, ValueError):
            return None
    return None if rounds is None else int(rounds)


def source_columns(metric: str) -> tuple[str, ...]:
    if metric == "best_client":
        return ("test_accuracy",)
    if metric in GAPS:
        return (GAPS[metric],)
    if metric in WITHIN_RUN:
        return WITHIN_RUN[metric]
    return (metric,)


def measured(runs: Runs, metric: str, variants: Iterable[str] | None = None) -> bool:
    names = None if variants is None else list(variants)
    if metric == "rounds_to_target":  # None is a result there (never reached: censored)
        return metric in runs.columns
    return all(runs.has(c, names) for c in source_columns(metric))


def values(runs: Runs, variant: str, metric: str) -> dict[int, float | None]:
    """seed -> value of ``metric`` for ``variant``, over its ok runs only: a runs.csv column, or
    a derived metric: ``best_client`` (the final agreed ensemble's accuracy minus the best single
    client's, from the run's metrics.jsonl), a coverage gap (coverage - (1 - alpha), alpha from
    the run's scenario.yaml), a WITHIN_RUN difference, or ``rounds_to_target`` (a run that never
    reaches the target counts as its rounds cap + 1: censored, not dropped)."""
    got: dict[int, float | None] = {}
    for r in runs.of(variant):
        if r["status"] != "ok":  # diverged, failed, ...: counted apart, never a value
            continue
        if metric == "best_client":
            best = None
            try:
                from fedens.results import read_metrics

                train = [x for x in read_metrics(_run_folder(runs, r)) if x.get("scope") == "train"]
                best = train[-1].get("best_client_test_accuracy") if train else None
            except OSError:
                pass
            got[r["seed"]] = None if best is None or r.get("test_accuracy") is None else r["test_accuracy"] - best
        elif metric in GAPS:
            alpha = ((_scenario(runs, r).get("evaluate") or {}).get("conformal") or {}).get("alpha")
            cov = r.get(GAPS[metric])
            got[r["seed"]] = None if cov is None or alpha is None else cov - (1 - alpha)
        elif metric in WITHIN_RUN:
            a, b = (r.get(c) for c in WITHIN_RUN[metric])
            got[r["seed"]] = None if a is None or b is None else a - b
        elif metric == "rounds_to_target":
            value = r.get(metric)
            if value is None:
                cap = _rounds_cap(runs, r)
                value = None if cap is None else cap + 1
            got[r["seed"]] = value
        else:
            value = r.get(metric)
            got[r["seed"]] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return got


# --------------------------------------------------------------------------- verdicts


def verdict(d: Any, direction: str) -> str:
    """One check's verdict from a ``fedens.stats.Paired``."""
    if d is None or d.ci_low is None:
        return "inconclusive"
    lo, hi = d.ci_low, d.ci_high
    if direction == "comparable":
        if -MARGIN <= lo and hi <= MARGIN:
            return "holds"
        return "does not hold" if lo > MARGIN or hi < -MARGIN else "inconclusive"
    if direction == "not lower":
        if lo > -MARGIN:
            return "holds"
        return "does not hold" if hi < -MARGIN else "inconclusive"
    if direction == "not higher":
        if hi < MARGIN:
            return "holds"
        return "does not hold" if lo > MARGIN else "inconclusive"
    if direction not in ("higher", "lower"):
        raise ValueError(f"unknown direction {direction!r}")
    above, below = lo > 0, hi < 0
    if (above and direction == "higher") or (below and direction == "lower"):
        return "holds"
    return "does not hold" if (above or below) else "inconclusive"


def combine(verdicts: list[str]) -> str:
    """A pair's verdict from its measured checks' verdicts."""
    if not verdicts:
        return "not measured"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "inconclusive at this number of seeds"


@dataclass
class CheckResult:
    check: Check
    label: str
    paired: Any  # fedens.stats.Paired, or None when not measured
    verdict: str  # holds | does not hold | inconclusive | not measured

    @property
    def digits(self) -> int:
        return DIGITS.get(self.check.metric, DEFAULT_DIGITS)


@dataclass
class Unstable:
    name: str
    bad: list[tuple[int, str]]  # (seed, status) of the runs that are not ok
    n: int  # the runs of this variant

    def text(self) -> str:
        which = ", ".join(f"seed {s} {status}" for s, status in self.bad)
        return READING_UNSTABLE.format(name=self.name, k=len(self.bad), n=self.n, which=which)


@dataclass
class PairResult:
    variant: str
    baseline: str  # "" : against 0
    baseline_label: str
    checks: list[CheckResult]
    verdict: str
    unstable: list[Unstable]
    missing: list[str]  # variants of the pair with no runs in runs.csv

    def reading(self) -> str:
        if self.missing:
            return READING_MISSING.format(variant=self.variant, baseline=self.baseline_label, names=", ".join(self.missing))
        unstable = "".join(f"; {u.text()}" for u in self.unstable)
        return READING_PAIR.format(variant=self.variant, baseline=self.baseline_label,
                                   checks="; ".join(check_reading(c) for c in self.checks), verdict=self.verdict,
                                   unstable=unstable)


def check_reading(c: CheckResult) -> str:
    d, p = c.paired, c.digits
    if d is None:
        return READING_CHECK_UNMEASURED.format(label=c.label)
    if d.n == 0 or d.mean is None:
        return READING_CHECK_NONE.format(label=c.label, verdict=c.verdict)
    if d.ci_low is None:
        return READING_CHECK_ONE.format(label=c.label, mean=d.mean, n=d.n, p=p, verdict=c.verdict)
    return READING_CHECK.format(label=c.label, mean=d.mean, lo=d.ci_low, hi=d.ci_high, n=d.n, p=p, verdict=c.verdict)


def check_cell(c: CheckResult) -> str:
    d, p = c.paired, c.digits
    if d is None:
        return "not measured"
    if d.mean is None:
        return f"n/a n=0: {c.verdict}"
    if d.ci_low is None:
        return f"{d.mean:+.{p}f} n={d.n}: {c.verdict}"
    return f"{d.mean:+.{p}f} [{d.ci_low:+.{p}f}, {d.ci_high:+.{p}f}] n={d.n}: {c.verdict}"


def expand_checks(checks: list[Check], runs: Runs) -> list[Check]:
    """Each calibration check ("lower" ECE or NLL) also after temperature scaling, when runs.csv
    has the temperature-scaled column."""
    out: list[Check] = []
    for c in checks:
        out.append(c)
        ts = TEMPERATURE_SCALED.get(c.metric)
        if ts and c.direction in ("lower", "not higher") and runs.has(ts) and Check(ts, c.direction) not in checks:
            out.append(Check(ts, c.direction))
    return out


def unstable(runs: Runs, name: str) -> Unstable | None:
    mine = runs.of(name)
    bad = sorted((r["seed"], r["status"]) for r in mine if r["status"] != "ok")
    return Unstable(name, bad, len(mine)) if bad else None


def evaluate_pair(runs: Runs, variant: str, baseline: str, checks: list[Check], zero_label: str) -> PairResult:
    from fedens import stats

    present = set(runs.variants())
    missing = [n for n in (variant, baseline) if n and n not in present]
    label = baseline or zero_label
    if missing:
        return PairResult(variant, baseline, label, [], "not run yet", [], missing)
    results = []
    for c in checks:
        name = NAMES.get(c.metric, c.metric)
        against_zero = c.metric in AGAINST_ZERO or not baseline
        involved = [variant] if against_zero else [variant, baseline]
        if not measured(runs, c.metric, involved):
            results.append(CheckResult(c, name, None, "not measured"))
            continue
        mine = values(runs, variant, c.metric)
        theirs = {s: 0.0 for s in mine} if against_zero else values(runs, baseline, c.metric)
        d = stats.paired(mine, theirs)
        results.append(CheckResult(c, name, d, verdict(d, c.direction)))
    bad = [u for u in (unstable(runs, n) for n in (variant, baseline) if n) if u]
    return PairResult(variant, baseline, label, results,
                      combine([r.verdict for r in results if r.verdict != "not measured"]), bad, [])


# --------------------------------------------------------------------------- per-claim facts


def claim_variants(pairs: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(n for pair in pairs for n in pair if n))


def training_length(runs: Runs, names: list[str]) -> str:
    """Whether every method trained to its plateau (``stopped_early`` true on every run), or
    how many runs hit the round cap."""
    mine = [r for r in runs.rows if r["variant"] in names and r["status"] == "ok"]
    if not mine:
        return ""
    if "stopped_early" not in runs.columns:
        return ("Training length: every run trained the comparison's fixed number of rounds "
                "(runs.csv records no early stopping).")
    used = [r.get("rounds_used") for r in mine if isinstance(r.get("rounds_used"), float)]
    span = ""
    if used:
        lo, hi = int(min(used)), int(max(used))
        span = f" (rounds used: {lo})" if lo == hi else f" (rounds used: {lo} to {hi})"
    capped = [r for r in mine if r.get("stopped_early") is not True]
    if not capped:
        return f"Training length: every method was trained to its plateau: all {len(mine)} runs stopped early{span}."
    per = Counter(r["variant"] for r in capped)
    detail = ", ".join(f"{v}: {k} of {len(runs.of(v)) - sum(1 for r in runs.of(v) if r['status'] != 'ok')}"
                       for v, k in per.items())
    return (f"Training length: {len(capped)} of {len(mine)} runs hit the round cap before early stopping "
            f"({detail}){span}; those methods may not have reached their plateau.")


def tuning_table(folder: Path, names: list[str], lay: Layout | None = None) -> list[str]:
    """The chosen configuration and the number of trials per variant (tuning.csv), flagging a
    variant whose trial count differs from the others'."""
    got = read_csv(folder / "tuning.csv")
    if got is None:
        return ["Tuning: none (no tuning.csv): every method ran with its fedens defaults and the comparison's settings."]
    columns, rows = got
    wanted = set(names)
    if lay is not None:
        wanted |= {v.named for v in lay.variants if v.name in names}
    rows = [r for r in rows if str(r.get("variant")) in wanted] or rows
    keys = [c for c in columns if c.startswith("best.")]
    fixed = {str(r.get("variant")) for r in rows if r.get("tuned") is False}  # fixed controls: no trials by design
    trials = Counter(r.get("trials") for r in rows if str(r.get("variant")) not in fixed)
    usual = trials.most_common(1)[0][0] if trials else None
    counts = [c for c in ("complete", "pruned", "diverged") if c in columns]
    lines = ["Tuning (tuning.csv): the configuration each variant chose and its number of trials.", "",
             "| variant | trials | " + "".join(f"{c} | " for c in counts) + "objective | best value | "
             + " | ".join(f"`{k[5:]}`" for k in keys) + " |",
             "|---" * (len(keys) + len(counts) + 4) + "|"]
    flagged = []
    for r in rows:
        n, is_fixed = r.get("trials"), str(r.get("variant")) in fixed
        odd = not is_fixed and len(trials) > 1 and n != usual
        if odd:
            flagged.append(str(r.get("variant")))
        cells = [_cell(r.get(k)) for k in keys]
        note = " **(unequal budget)**" if odd else " (fixed control, not tuned)" if is_fixed else ""
        lines.append(f"| {r.get('variant')} | {_cell(n)}{note} | "
                     + "".join(f"{_cell(r.get(c))} | " for c in counts) + f"{_cell(r.get('objective'))} | "
                     f"{_cell(r.get('best_value'))} | " + " | ".join(cells) + " |")
    lines.append("")
    if flagged:
        lines.append(f"**Unequal tuning budget**: {', '.join(flagged)} ran a different number of trials from the others "
                     f"({_cell(usual)}).")
    elif rows:
        lines.append(f"Every tuned variant had the same tuning budget: {_cell(usual)} trials"
                     + (f"; {', '.join(sorted(fixed))} ran at the settings of the comparison file." if fixed else "."))
    return lines


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def per_variant_table(runs: Runs, names: list[str], extra: Iterable[str] = ()) -> list[str]:
    """Per variant: runs ok of all, and mean ± half-width of the 95% interval over its ok runs."""
    from fedens import stats

    order = {n: i for i, n in enumerate(runs.variants())}
    names = sorted((n for n in names if runs.of(n)), key=order.__getitem__)  # runs.csv's order
    extra_cols = [c for c in extra if c in runs.columns and c not in PER_VARIANT]
    cols = [c for c in (*PER_VARIANT, *extra_cols, *FACTS) if runs.has(c, names)]
    if not names or not cols:
        return []
    lines = ["Per variant, mean ± half-width of the 95% interval over its ok runs:", "",
             "| variant | runs ok | " + " | ".join(NAMES.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for n in names:
        mine = runs.of(n)
        ok = [r for r in mine if r["status"] == "ok"]
        cells = []
        for c in cols:
            scale = 1000 if c == "bytes_per_client_round" else 1
            s = stats.summary([r[c] / scale if isinstance(r.get(c), float) else None for r in ok])
            p = DIGITS.get(c, DEFAULT_DIGITS)
            if s.mean is None:
                cells.append("n/a")
            elif s.ci_low is None:
                cells.append(f"{s.mean:.{p}f}")
            else:
                cells.append(f"{s.mean:.{p}f} ± {(s.ci_high - s.ci_low) / 2:.{p}f}")
        lines.append(f"| {n} | {len(ok)} of {len(mine)} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------- stamps and the staleness check

CODE_DIRS = ("fedens", "strategies")


def blob_hash(path: Path) -> str:
    """Git's blob hash of a file's content (``git hash-object``), without running git."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_files(root: Path) -> list[str]:
    """The Python sources under fedens/ and strategies/: git's tracked and untracked-but-not-
    ignored ``.py`` files (without git: every ``.py`` outside ``__pycache__``)."""
    listed = _git(root, "ls-files", "--cached", "--others", "--exclude-standard", "--", *CODE_DIRS)
    if listed is not None:
        files = {line for line in listed.splitlines() if line.endswith(".py")}
    else:
        files = {p.relative_to(root).as_posix() for d in CODE_DIRS for p in (root / d).rglob("*.py")
                 if "__pycache__" not in p.parts}
    return sorted(f for f in files if (root / f).is_file())


def _rel(root: Path, path: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return path.as_posix()


def comparison_files(root: Path, yaml_path: Path) -> list[str]:
    """The comparison file and its base scenario."""
    files = [_rel(root, yaml_path)]
    try:
        base = (yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}).get("base")
    except (OSError, yaml.YAMLError, AttributeError):
        base = None
    if isinstance(base, str):
        files.append(_rel(root, yaml_path.parent / base))
    return files


def code_hashes(root: Path, yaml_path: Path, hasher: Callable[[Path], str] = blob_hash,
                lister: Callable[[Path], list[str]] = code_files) -> dict[str, str]:
    """file (relative to ``root``) -> blob hash, for everything a section depends on; a file
    that does not exist maps to "missing"."""
    out = {}
    for rel in [*comparison_files(root, yaml_path), *lister(root)]:
        path = root / rel
        out[rel] = hasher(path) if path.is_file() else "missing"
    return dict(sorted(out.items()))


def git_commit(root: Path) -> str:
    """``git rev-parse HEAD``, plus "+dirty" when a tracked file has changes or an untracked,
    not ignored file lies in the code folders; "unknown" outside a git checkout."""
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return "unknown"
    tracked = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE_DIRS, "benchmarks", "scenarios") or ""
    return head.strip() + ("+dirty" if tracked.strip() or untracked.strip() else "")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def new_stamp(root: Path, yaml_path: Path, hasher: Callable[[Path], str] = blob_hash,
              lister: Callable[[Path], list[str]] = code_files) -> dict[str, Any]:
    """The code a comparison is about to run at: commit, date, files -> blob hashes."""
    return {"comparison": yaml_path.stem, "commit": git_commit(root), "date": now_iso(),
            "files": code_hashes(root, yaml_path, hasher, lister)}


def code_id(files: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]


RUN_GLOBS = ("*/seed-*/summary.json", "tuning/*/trial-*/seed-*/summary.json")  # evaluation runs, tuning trials


def run_keys(folder: Path) -> dict[str, int]:
    """``<variant>/seed-<s>`` (and ``tuning/<variant>/trial-<k>/seed-<s>``) -> the mtime (ns)
    of its summary.json, for every evaluation run and tuning trial in ``folder``."""
    return {p.parent.relative_to(folder).as_posix(): p.stat().st_mtime_ns for g in RUN_GLOBS for p in folder.glob(g)}


def read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((folder / "stamp.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) else None


def finish_stamp(folder: Path, stamp: dict[str, Any], before: dict[str, int], seconds: float,
                 end_files: dict[str, str] | None = None, machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``folder/stamp.json`` after an invocation ran a comparison (or stopped in it).

    The runs whose summary.json changed (against ``before``, from ``run_keys``) ran in this
    invocation, at ``stamp``'s code; the others keep the invocation the previous stamp recorded
    for them ("unknown" without one: they ran before stamps existed). The top level describes
    the latest invocation that ran something; ``elapsed_s`` sums the wall time of the
    invocations that produced the current runs."""
    prev = read_stamp(folder) or {}
    after = run_keys(folder)
    runs_csv = read_csv(folder / "runs.csv")
    current = {f"{r['variant']}/seed-{int(float(r['seed']))}" for r in runs_csv[1]} if runs_csv else set(after)
    keys = sorted(k for k in after if k in current or k.startswith("tuning/")) or sorted(after)
    ran = [k for k in keys if after[k] != before.get(k)]
    during = [] if end_files is None else sorted(k for k in set(end_files) | set(stamp["files"])
                                                  if end_files.get(k) != stamp["files"].get(k))
    mine = {"commit": stamp["commit"], "date": stamp["date"], "files": stamp["files"], "elapsed_s": round(seconds, 1),
            "ran": len(ran)}
    if during:  # the code changed while the comparison ran: its runs count as stale for these files
        mine["changed_during_run"] = during
    iid = code_id({**stamp["files"], "@date": stamp["date"], "@ns": str(time.time_ns())})  # one per invocation
    prev_runs = prev.get("runs") if isinstance(prev.get("runs"), dict) else {}
    prev_inv = prev.get("invocations") if isinstance(prev.get("invocations"), dict) else {}
    runs: dict[str, str] = {}
    invocations: dict[str, Any] = {}
    for k in keys:
        if k in ran:
            runs[k], invocations[iid] = iid, mine
        else:
            old = prev_runs.get(k, "unknown")
            runs[k] = old if old in prev_inv else "unknown"
            if runs[k] != "unknown":
                invocations[old] = prev_inv[old]
    if not keys:  # no run folder (yet): the invocation's time still counts
        invocations[iid] = mine
    if ran or not prev:
        top = {**stamp, "invocation": iid, **({"machine": machine} if machine else {})}
        if during:
            top["changed_during_run"] = during
    else:  # nothing ran: the previous stamp's latest invocation still describes the section
        top = prev
    runs_ran = sum(1 for k in keys if runs[k] == top.get("invocation"))
    out = {**top, "runs": runs, "invocations": invocations, "runs_ran": runs_ran, "runs_reused": len(keys) - runs_ran,
           "elapsed_s": round(sum(float(v.get("elapsed_s") or 0) for v in invocations.values()), 1)}
    (folder / "stamp.json").write_text(json.dumps(out, indent=1, sort_keys=True), encoding="utf-8")
    return out


def stale_files(stamp: dict[str, Any], now: dict[str, str]) -> tuple[list[str], int]:
    """The files whose hash differs from what the section's runs ran at (changed, added or
    removed), and the number of runs whose code is unknown (ran before stamps existed)."""
    runs = stamp.get("runs") or {}
    invocations = stamp.get("invocations") or {}
    versions: list[dict[str, Any]] = [stamp]  # a stamp without per-run records: its own files
    unknown = 0
    if runs:
        versions = [invocations[i] for i in dict.fromkeys(runs.values()) if i in invocations]
        unknown = sum(1 for i in runs.values() if i not in invocations)
    changed: set[str] = set()
    for v in versions:
        files = v.get("files") or {}
        changed |= set(v.get("changed_during_run") or [])
        changed |= {k for k in set(files) | set(now) if files.get(k) != now.get(k)}
    return sorted(changed), unknown


def check(out: Path, benchmarks: Path, root: Path = ROOT, claims: Iterable[Claim] = (),
          hasher: Callable[[Path], str] = blob_hash, lister: Callable[[Path], list[str]] = code_files) -> tuple[str, int]:
    """The sections whose code changed since they ran: (text, exit code 1 if any, else 0)."""
    titles: dict[str, list[str]] = {}
    for c in claims:
        titles.setdefault(c.comparison, []).append(c.key)
    names = sorted({p.stem for p in benchmarks.glob("*.yaml")} | set(titles)
                   | ({p.parent.name for p in out.glob("*/runs.csv")} | {p.parent.name for p in out.glob("*/stamp.json")}
                      if out.is_dir() else set()))
    lines, stale, ran_any = [], 0, False
    for name in names:
        folder, yaml_path = out / name, benchmarks / f"{name}.yaml"
        about = f"{name}" + (f" (claims: {', '.join(titles[name])})" if name in titles else "")
        stamp = read_stamp(folder)
        if stamp is None and not (folder / "runs.csv").is_file():
            lines.append(f"  not run yet: {about}" + ("" if yaml_path.is_file() else f" (no {yaml_path.name} yet)"))
            continue
        ran_any = True
        if stamp is None:
            stale += 1
            lines.append(f"  STALE {about}: no stamp.json (ran before stamps were recorded): rerun it")
            continue
        changed, unknown = stale_files(stamp, code_hashes(root, yaml_path, hasher, lister))
        when = f"ran at {stamp.get('commit')} on {stamp.get('date')}"
        if changed or unknown:
            stale += 1
            what = []
            if changed:
                what.append(f"{len(changed)} file(s) changed since: " + ", ".join(changed))
            if unknown:
                what.append(f"{unknown} run(s) reused from before stamps were recorded")
            lines.append(f"  STALE {about}: {when}; " + "; ".join(what))
        else:
            lines.append(f"  up to date: {about}: {when}")
    if not ran_any:
        return f"nothing has run under {out}: no section to check.\n" + "\n".join(lines) + "\n", 0
    head = (f"{stale} section(s) ran at code that changed since (rerun: python benchmarks/run.py --out {out} --only NAME "
            "--rerun):" if stale else "every section that ran is up to date with the code:")
    return head + "\n" + "\n".join(lines) + "\n", 1 if stale else 0


def stamp_line(stamp: dict[str, Any] | None, changed: list[str], unknown: int) -> str:
    """The heading area's line: when and at what code the section ran, and whether it still matches."""
    if stamp is None:
        return "*Not stamped: these runs predate stamps, so when and at what code they ran is unknown.*"
    date = str(stamp.get("date", "?")).replace("T", " ").replace("+00:00", " UTC")
    text = f"*Ran at commit `{stamp.get('commit', 'unknown')}` on {date}"
    if stamp.get("elapsed_s") is not None:
        text += f", {float(stamp['elapsed_s']) / 60:.1f} min of wall time"
    machine = stamp.get("machine") or {}
    if machine:
        text += f" ({machine.get('cpus', '?')} CPUs, {machine.get('gpus', 0)} GPUs)"
    reused = stamp.get("runs_reused") or 0
    if reused:
        older = sorted({(c.get("commit"), c.get("date")) for c in (stamp.get("invocations") or {}).values()
                        if c.get("commit") != stamp.get("commit") or c.get("date") != stamp.get("date")})
        text += f"; {reused} of {reused + (stamp.get('runs_ran') or 0)} runs reused from earlier invocations"
        if older:
            text += " (" + ", ".join(f"`{c}` on {d.split('T')[0]}" for c, d in older) + ")"
    text += ".*"
    if changed or unknown:
        shown = ", ".join(f"`{f}`" for f in changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        parts = [f"{len(changed)} file(s) it depends on changed since ({shown})"] if changed else []
        if unknown:
            parts.append(f"{unknown} run(s) ran before stamps were recorded")
        text += " **Stale: " + "; ".join(parts) + "** (`python benchmarks/run.py --check`)."
    else:
        text += " The code it depends on is unchanged since."
    return text


# --------------------------------------------------------------------------- the report


@dataclass
class ClaimResult:
    claim: Claim
    ran: bool
    pairs: list[PairResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    runs: Runs | None = None
    layout: Layout | None = None

    def overall(self) -> str:
        if not self.ran:
            return "not run yet"
        vs = [p.verdict for p in self.pairs]
        if not vs:
            return "not run yet"
        if len(set(vs)) == 1:
            return vs[0]
        return "mixed: " + ", ".join(f"{vs.count(v)} {v}" for v in dict.fromkeys(vs))

    def unstable_runs(self) -> tuple[int, int]:
        if self.runs is None:
            return 0, 0
        names = set(claim_variants([(p.variant, p.baseline) for p in self.pairs]))
        mine = [r for r in self.runs.rows if r["variant"] in names]
        return sum(1 for r in mine if r["status"] != "ok"), len(mine)


def evaluate_claim(claim: Claim, out: Path, benchmarks: Path) -> ClaimResult:
    folder = out / claim.comparison
    runs = Runs.read(folder)
    if runs is None or not runs.rows:
        return ClaimResult(claim, False)
    lay = layout(benchmarks / f"{claim.comparison}.yaml", runs)
    checks = expand_checks(claim.checks, runs)
    pairs = [evaluate_pair(runs, v, b, checks, claim.zero_label) for v, b in resolve_pairs(claim.pairs, lay)]
    return ClaimResult(claim, True, pairs, checks, runs, lay)


def render_claim(res: ClaimResult, out: Path, root: Path, benchmarks: Path, img: Path | None,
                 hasher: Callable[[Path], str] = blob_hash, lister: Callable[[Path], list[str]] = code_files) -> list[str]:
    claim = res.claim
    lines = [f"## {claim.title}", ""]
    if not res.ran:
        why = (f"no `{claim.comparison}/runs.csv` under `{out}`" if (benchmarks / f"{claim.comparison}.yaml").is_file()
               else f"no comparison file `benchmarks/{claim.comparison}.yaml` yet")
        return lines + [claim.setup, "", f"Source: {claim.source}.", "", f"Not run yet ({why}).", ""]
    folder = out / claim.comparison
    stamp = read_stamp(folder)
    changed, unknown = ([], 0) if stamp is None else stale_files(
        stamp, code_hashes(root, benchmarks / f"{claim.comparison}.yaml", hasher, lister))
    lines += [stamp_line(stamp, changed, unknown), "", claim.setup, "",
              f"Source: {claim.source}. Command: `fedens compare benchmarks/{claim.comparison}.yaml "
              f"--out benchmarks/results/{claim.comparison}`.", ""]
    checks = res.checks
    head = ("| variant | baseline | " + " | ".join(f"Δ {NAMES.get(c.metric, c.metric)} ({c.direction})" for c in checks)
            + " | verdict |")
    lines += [head, "|---" * (len(checks) + 3) + "|"]
    for p in res.pairs:
        if p.missing:
            cells = ["not run yet"] * len(checks)
        else:
            cells = [check_cell(c) for c in p.checks]
        note = "".join(f" ({u.text()})" for u in p.unstable)
        lines.append(f"| {p.variant} | {p.baseline_label} | " + " | ".join(cells) + f" | **{p.verdict}**{note} |")
    lines += ["", "Reading:", ""] + [f"- {p.reading()}" for p in res.pairs]
    facts = [training_length(res.runs, claim_variants([(p.variant, p.baseline) for p in res.pairs]))]
    lines += [""] + [f for f in facts if f]
    names = claim_variants([(p.variant, p.baseline) for p in res.pairs])
    lines += [""] + tuning_table(folder, names, res.layout)
    extra = [c for ch in checks for c in source_columns(ch.metric)]
    table = per_variant_table(res.runs, names, extra)
    if table:
        lines += [""] + table
    if img is not None:
        for name in [claim.plot, *claim.extra_plots]:
            if (folder / name).exists():
                img.mkdir(parents=True, exist_ok=True)
                target = img / f"{claim.comparison}-{name}"
                shutil.copyfile(folder / name, target)
                lines += ["", f"![{claim.comparison} {name}](img/results/{target.name})"]
    return lines + [""]


# The commit of the last docs/results.md from the earlier, untuned suite (for the "not run yet" note).
PREVIOUS_SUITE = "84c8ffc"


def report(out: Path, claims: list[Claim], benchmarks: Path, root: Path = ROOT, img: Path | None = None,
           hasher: Callable[[Path], str] = blob_hash, lister: Callable[[Path], list[str]] = code_files) -> str:
    """docs/results.md from ``out``'s comparison folders: a summary, then a section per claim."""
    from fedens.stats import LEVEL

    results = [evaluate_claim(c, out, benchmarks) for c in claims]
    lines = ["# Results: the papers' claims, checked with fedens", "",
             "Every claim below is one comparison file in `benchmarks/`, run over several seeds (a seed fixes the split, "
             "the initialisation and all client randomness, so variants on the same seed are paired; each line states "
             f"its number of seeds). Intervals are {LEVEL:.0%} Student-t intervals of the mean paired difference "
             "(variant - baseline) over the seeds where both runs finished ok. A check **holds** when the interval "
             "lies on the claimed side of zero, **does not hold** when it lies on the other side, and is "
             f"**inconclusive** otherwise; \"comparable\" means inside ±{MARGIN}, \"not lower\" means above "
             f"-{MARGIN} and \"not higher\" below +{MARGIN} (fractions). A pair holds when all its checks hold. "
             "A run that diverged or failed is not a value: it is counted as \"unstable at these settings\" next to "
             "its verdict, which is computed from the other seeds. Calibration checks are repeated after temperature "
             "scaling (fitted on the clients' validation splits) where the runs measured it. A run that never "
             "reaches a target counts as its rounds cap + 1. A comparison with a tuning budget shows each variant's "
             "chosen configuration and number of trials; otherwise every method runs with its fedens defaults and "
             "the comparison's shared settings. Every number on this page is computed from the runs' `runs.csv`; "
             "each section says the commit and date it ran at.", "",
             "Regenerate: `python benchmarks/run.py` (runs into `benchmarks/results`, resumes); `--report` rewrites this "
             "page only; `--check` lists the sections whose code changed since they ran.", ""]
    if any(not r.ran for r in results):
        lines += ["A claim marked \"not run yet\" has not run under this protocol (equal-budget tuning, early stopping, "
                  "temperature scaling; docs/comparisons.md). The verdicts of the earlier suite, untuned and at a fixed "
                  f"number of rounds, are in this page's history: `git show {PREVIOUS_SUITE}:docs/results.md`.", ""]
    rows = []
    for r in results:
        k, n = r.unstable_runs()
        stamp = read_stamp(out / r.claim.comparison) if r.ran else None
        when = "" if stamp is None else f"`{str(stamp.get('commit', ''))[:10]}` {str(stamp.get('date', '')).split('T')[0]}"
        rows.append(f"| {r.claim.title} | {r.overall()} | {f'{k} of {n}' if n else ''} | {when} |")
    lines += ["| claim | verdict (per compared pair) | unstable runs | ran at |", "|---|---|---|---|", *rows, ""]
    seen, n_runs, n_bad, run_s, wall_s = set(), 0, 0, 0.0, 0.0
    for r in results:
        if r.ran and r.claim.comparison not in seen:
            seen.add(r.claim.comparison)
            n_runs += len(r.runs.rows)
            n_bad += sum(1 for x in r.runs.rows if x["status"] != "ok")
            run_s += sum(x["wall_time_s"] for x in r.runs.rows if isinstance(x.get("wall_time_s"), float))
            stamp = read_stamp(out / r.claim.comparison)
            if stamp and stamp.get("elapsed_s") is not None:
                wall_s += float(stamp["elapsed_s"])
    elapsed = _read_json(out / "elapsed.json")
    if isinstance(elapsed, dict):  # the comparisons' wall times, as run.py recorded them
        wall_s = sum(float(v) for k, v in elapsed.items() if k in seen and isinstance(v, (int, float))) or wall_s
    if seen:
        lines += [f"The suite: {len(seen)} comparison(s), {n_runs} runs ({n_bad} not ok), {run_s / 60:.0f} minutes of summed "
                  f"run time; {wall_s / 60:.0f} minutes of wall time in total for the comparisons (elapsed.json).", ""]
    else:
        lines += [f"Nothing has run yet under `{out}`.", ""]
    for r in results:
        lines += render_claim(r, out, root, benchmarks, img, hasher, lister)
    return "\n".join(lines).rstrip("\n") + "\n"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


NUMBER = re.compile(r"(?<![\w.-])[+-]?\d+(?:\.\d+)?(?![\w.])")


def numbers_in(text: str) -> list[float]:
    """The numbers written in ``text`` (not those inside names such as MNIST-1D or lambda_0.1)."""
    return [float(m) for m in NUMBER.findall(text) if math.isfinite(float(m))]
