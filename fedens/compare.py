"""Comparisons: one base scenario, several named variants, one table and one plot.

A comparison file::

    name: compare_learners
    base: quickstart.yaml                 # a scenario file, relative to this file
    overrides: {rounds: 20}               # applied to every variant (dotted keys)
    variants:                             # a mapping with a `kind` replaces the whole section
      single: {}
      deep_ensemble: {learner: {kind: deep_ensemble, members: 5}}
      ivon: {learner.kind: ivon}

Each variant runs as its own scenario (``base`` + ``overrides`` + the variant's dotted-key
overrides) into ``OUT/<variant>/``, all of them in one warm engine (``fedens.Session``); ``OUT`` gets ``comparison.md`` (a table of final metrics,
bytes and wall time), ``comparison.json`` and ``comparison.png`` (accuracy, NLL and ECE against
round, one line per variant), and for decentralized variants ``layer_variance.png`` (the nodes'
weight variance against round). Every variant is validated before the first one runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedens.scenario import Scenario, ScenarioError, _first_error, _read_yaml, load_scenario

COLUMNS = ("accuracy", "nll", "ece", "brier", "ood_auroc")


HIGHER_IS_BETTER = {"accuracy", "ood_auroc"}


class Target(BaseModel):
    """A level of a test metric to reach: ``value``, or ``fraction`` of variant ``of``'s final
    value (e.g. 90% of FedAvg's final accuracy). The table gets the first evaluated round at
    which each variant reaches it (a metric where lower is better must fall to it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: Literal["accuracy", "nll", "ece", "brier", "ood_auroc"] = "accuracy"
    value: float | None = None
    fraction: float | None = Field(None, gt=0)
    of: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        relative = (self.fraction is not None, self.of is not None)
        if (self.value is None) != (relative == (True, True)) or (self.value is not None and any(relative)):
            raise ValueError("give either value, or fraction and of (a variant)")
        return self

    def level(self, finals: dict[str, dict[str, Any]]) -> float | None:
        """The level to reach, from the variants' final test metrics (None: ``of`` has none)."""
        if self.value is not None:
            return float(self.value)
        reference = finals[self.of].get(self.metric)
        return None if reference is None else self.fraction * float(reference)

    def label(self) -> str:
        return f"{self.metric} {self.value}" if self.value is not None else f"{self.fraction:g} x {self.of}'s {self.metric}"


def rounds_to(rows: list[dict[str, Any]], metric: str, level: float) -> int | None:
    """The first round whose ``metric`` reaches ``level`` (>= if higher is better, else <=)."""
    better = (lambda v: v >= level) if metric in HIGHER_IS_BETTER else (lambda v: v <= level)  # noqa: E731
    return next((r["round"] for r in rows if r.get(metric) is not None and better(r[metric])), None)


def node_bytes(train_row: dict[str, Any]) -> float:
    """Bytes one client (federated: down + up) or one active node (decentralized) moved in a
    round. A gossip node's traffic is its neighbours' models: every delivered copy
    (``bytes_p2p``) is sent by one node and received by another, so it counts twice. Not
    counted: initial models (a real node initialises itself) and swarm's validation messages
    (a node scores the models it already holds)."""
    if "client_bytes_down" in train_row:
        return train_row["client_bytes_down"] + train_row["client_bytes_up"]
    return 2 * train_row.get("bytes_p2p", 0) / max(train_row.get("nodes_active", 1), 1)


class Comparison(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "comparison"
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    target: Target | None = None

    @model_validator(mode="after")
    def _target_of_a_variant(self) -> Comparison:
        if self.target is not None and self.target.of is not None and self.target.of not in self.variants:
            raise ValueError(f"target.of: {self.target.of!r} is not a variant")
        return self


def load_comparison(path: str | Path, extra: list[str] = ()) -> tuple[Comparison, dict[str, Scenario]]:
    """The comparison and its validated variant scenarios, in file order."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a comparison must be a mapping")
    try:
        cmp = Comparison.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(f"{path}: {_first_error(err, raw)}") from None
    base = path.parent / cmp.base
    scenarios = {}
    for name, variant in cmp.variants.items():
        try:
            scn = load_scenario(base, {**cmp.overrides, **_flatten(variant)})
            scenarios[name] = load_scenario(scn, extra)
        except ScenarioError as err:
            raise ScenarioError(f"{path}: variants.{name}: {err}") from None
    return cmp, scenarios


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested overrides as dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``.

    A mapping with a ``kind`` (a model, learner or partition) or a ``params`` mapping replaces
    the whole section, because another kind has other options."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and "kind" not in value and not key.endswith("params"):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def run_comparison(path: str | Path, out: str | Path, extra: list[str] = (), verbose: bool = False) -> list[dict[str, Any]]:
    """Run every variant into ``out/<variant>`` and write the comparison files; returns the table."""
    from fedens import plots
    from fedens.api import Session

    cmp, scenarios = load_comparison(path, list(extra))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, curves, all_rows = [], {}, {}
    first = next(iter(scenarios.values()))
    # One warm engine for every variant: Ray, the actors and each data build start once.
    with Session(ray_num_cpus=first.engine.ray_num_cpus, verbose=verbose, telemetry=first.engine.telemetry,
                 resources={"num_cpus": first.resources.num_cpus, "num_gpus": first.resources.num_gpus}) as session:
        results = {name: session.run(scn, out=out / name) for name, scn in scenarios.items()}
    for name, result in results.items():
        test = result.final.get("global-test", {})
        train = result.scope("train")
        table.append({
            "variant": name,
            **{k: test.get(k) for k in COLUMNS},
            "shift_ece": result.final.get("global-shift", {}).get("ece"),
            "client_bytes_per_round": sum(node_bytes(r) for r in train) / max(len(train), 1),
            "wall_time_s": result.summary["wall_time_s"],
        })
        curves[name] = result.scope("global-test")
        all_rows[name] = result.rows
    if cmp.target is not None:
        level = cmp.target.level({r["variant"]: r for r in table})
        for row in table:
            row["rounds_to_target"] = None if level is None else rounds_to(curves[row["variant"]], cmp.target.metric, level)
            row["target"] = f"{cmp.target.label()} = " + ("n/a" if level is None else f"{level:.4f}")
    (out / "comparison.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    (out / "comparison.md").write_text(markdown_table(table), encoding="utf-8")
    plots.save(plots.comparison_figure(curves)[0], out / "comparison.png")
    gossip = {name: rows for name, rows in all_rows.items() if any(r["scope"] == "gossip" for r in rows)}
    if gossip:  # decentralized variants: weight variance against round, with and without correction
        plots.save(plots.layer_variance_comparison_figure(gossip, per_layer=True)[0], out / "layer_variance.png")
    return table


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Final metrics per variant as a Markdown table (bytes in kB per client and round); with a
    target, a column of rounds to reach it ("-": not reached) and a line naming the target."""
    target = rows[0].get("target") if rows else None
    head = "| variant | accuracy | NLL | ECE | Brier | OOD AUROC | shift ECE | kB/client/round | wall s |"
    head += " rounds to target |\n" if target else "\n"
    head += "|---" * (10 if target else 9) + "|\n"
    fmt = lambda v, p=4: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = []
    for r in rows:
        line = (f"| {r['variant']} | {fmt(r['accuracy'])} | {fmt(r['nll'])} | {fmt(r['ece'])} | {fmt(r['brier'])} | "
                f"{fmt(r['ood_auroc'], 3)} | {fmt(r['shift_ece'])} | {r['client_bytes_per_round'] / 1000:.1f} | {r['wall_time_s']:.1f} |")
        if target:
            line += f" {'-' if r['rounds_to_target'] is None else r['rounds_to_target']} |"
        lines.append(line + "\n")
    return head + "".join(lines) + (f"\nTarget: {target} (first evaluated round that reaches it).\n" if target else "")
