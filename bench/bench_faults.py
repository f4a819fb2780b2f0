"""What each strategy and gossip rule does under each injected fault: the table of
``docs/reliability.md``.

    python bench/bench_faults.py                 # 5 seeds, about 8 minutes on 2 cores
    python bench/bench_faults.py --seeds 1 --only fedavg krum

Digits, 10 clients (Dirichlet 0.5), the MLP, 10 rounds of 1 local epoch, evaluated at round 10;
one warm session for every run. Per (method, fault) and over the seeds: how many runs ended ok
or diverged (status failed, "diverged at round r"), the mean final test accuracy of the runs that
finished, and the totals of failed, straggling and rejected replies the runs counted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedens  # noqa: E402

BASE: dict[str, Any] = {
    "name": "faults",
    "rounds": 10,
    "data": {"dataset": "digits", "num_clients": 10, "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "model": {"kind": "mlp", "hidden": [64]},
    "train": {"local_epochs": 1, "lr": 0.1},
    "fraction_evaluate": 0.0,
    "evaluate": {"every": 10},
    "output": {"checkpoint": False},
}
GOSSIP = {"mode": "decentralized", "topology": {"kind": "ring"}, "fraction_evaluate": 1.0}

METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedmedian": {"strategy": {"name": "fedmedian"}},
    "fedtrimmedavg": {"strategy": {"name": "fedtrimmedavg", "params": {"beta": 0.2}}},
    "krum": {"strategy": {"name": "krum", "params": {"num_malicious_nodes": 2}}},
    "posterior_avg": {"learner": {"kind": "ivon"}, "strategy": {"name": "posterior_avg"}},
    "swarm": {"learner": {"kind": "deep_ensemble", "members": 2}, "strategy": {"name": "swarm", "params": {"k": 2}}},
    "gossip-average": {**GOSSIP, "gossip": {"rule": "average"}},
    "gossip-vca": {**GOSSIP, "gossip": {"rule": "vca"}},
    "gossip-swarm": {**GOSSIP, "learner": {"kind": "deep_ensemble", "members": 2}, "gossip": {"rule": "swarm", "params": {"k": 2}}},
}
FAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "crash 0.2": {"faults": {"crash_prob": 0.2}},
    "straggler 0.2": {"faults": {"straggler_prob": 0.2, "straggler_delay_s": 30.0}, "round_timeout_s": 10.0},
    "nan 0.1": {"faults": {"nan_prob": 0.1}},
    "1 of 10 x1e6": {"faults": {"byzantine": {"fraction": 0.1, "kind": "scale", "scale": 1.0e6}}},
    "2 of 10 sign flip x5": {"faults": {"byzantine": {"fraction": 0.2, "kind": "sign_flip", "scale": 5.0}}},
    "2 of 10 gaussian 1": {"faults": {"byzantine": {"fraction": 0.2, "kind": "gaussian", "scale": 1.0}}},
    "3 of 10 label flip": {"faults": {"byzantine": {"fraction": 0.3, "kind": "label_flip"}}},
}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cell(session: fedens.Session, method: str, fault: str, seeds: int, tmp: Path) -> dict[str, Any]:
    acc, ok, diverged, failed, totals = [], 0, 0, 0, {"failures": 0, "stragglers": 0, "rejected": 0}
    for seed in range(seeds):
        scn = merge(merge(BASE, METHODS[method]), FAULTS[fault]) | {"seed": seed}
        out = tmp / method / fault.replace(" ", "_") / f"seed-{seed}"
        try:
            result = session.run(scn, out=out)
            ok += 1
            acc.append(result.final["global-test"]["accuracy"])
            summary = result.summary
        except fedens.RunDiverged:
            diverged += 1
            summary = _summary(out)
        except fedens.RunFailed:
            failed += 1
            summary = _summary(out)
        for key in totals:
            totals[key] += int(summary.get(key) or 0)
    return {"ok": ok, "diverged": diverged, "failed": failed, "accuracy": sum(acc) / len(acc) if acc else None, **totals}


def _summary(out: Path) -> dict[str, Any]:
    import json

    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=[], help="methods to run (default: all)")
    args = ap.parse_args()
    methods = [m for m in METHODS if not args.only or m in args.only]
    t0 = time.time()
    print(f"| method | fault | ok / diverged / failed (of {args.seeds}) | test accuracy | failed / straggling / rejected replies |")
    print("|---|---|---|---|---|")
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    with fedens.session() as session, tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for fault in FAULTS:
                c = cells[method, fault] = cell(session, method, fault, args.seeds, Path(tmp))
                acc = f"{c['accuracy']:.3f}" if c["accuracy"] is not None else "-"
                print(f"| {method} | {fault} | {c['ok']} / {c['diverged']} / {c['failed']} | {acc} | "
                      f"{c['failures']} / {c['stragglers']} / {c['rejected']} |", flush=True)
    print(f"\nwall time {time.time() - t0:.0f} s ({len(methods) * len(FAULTS) * args.seeds} runs)\n")
    print(matrix(cells, methods, args.seeds))


def matrix(cells: dict[tuple[str, str], dict[str, Any]], methods: list[str], seeds: int) -> str:
    """Methods by faults: the mean final accuracy of the runs that finished, and how many of
    the ``seeds`` runs diverged or failed."""
    lines = ["| method | " + " | ".join(FAULTS) + " |", "|---" * (len(FAULTS) + 1) + "|"]
    for method in methods:
        row = []
        for fault in FAULTS:
            c = cells[method, fault]
            text = f"{c['accuracy']:.2f}" if c["accuracy"] is not None else ""
            bad = [f"{c[k]}/{seeds} {k}" for k in ("diverged", "failed") if c[k]]
            row.append(" ".join([text, *(["(" + ", ".join(bad) + ")"] if text and bad else bad)]).strip())
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
