"""Engine speed, measured side by side in one run: ``python bench/bench_engine.py [--quick]``.

Prints every figure and ratio against its target (issue "Engine speed"):

1. Steady state. The quickstart's training (10 clients, 2 local epochs, FedAvg), evaluation
   every 20 rounds and no client evaluation, against a plain single-process loop over the
   same clients with fedens' own data build, learner, seeds and Flower's FedAvg arithmetic
   (``plain_loop``). Both must reach the same test accuracy. They run alternately, several
   times, and medians are compared (the machine is noisy). Target: fedens <= 1.25x.
2. Cold start-up: ``python run_sim.py`` in a fresh process, from the command to the first
   training round (round 1's train row, less one steady round). Target: <= 6 s.
3. Warm start-up: a further run in a ``fedens.session()``, from ``run()`` to the first training
   round. Target: <= 1 s.
4. Clients: start-up with 10,000 clients (synthetic, 1% sampled, 3 rounds) against 10 clients
   (target <= 1.5x), and 100,000 clients (0.1% sampled, 3 rounds) with the peak memory of the
   whole process tree (driver, Ray's processes, actors; PSS, so shared pages count once).
   Target: < 4 GiB.
5. A 10-variant ``fedens compare`` of the quickstart at 5 rounds against one cold run of one
   variant. Target: <= 3x.
6. What evaluation costs per round on the quickstart: none, central only (test, shifted and
   noise sets), central and every client's validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
NO_EVAL = ["fraction_evaluate=0", "evaluate.every=20"]


# --------------------------------------------------------------------------- the plain loop


def plain_loop(rounds: int) -> dict:
    """The quickstart's training in one process and one thread, without Flower or Ray: the
    same data build, learner, seeds per (seed, round, client) and FedAvg's float32 weighted sum
    in Flower's order. Returns the per-round times and the final test accuracy."""
    import numpy as np
    import torch

    import fedens
    from fedens.data import build_federated_data
    from fedens.learners import build_learner
    from fedens.learners.base import predict_dataset
    from fedens.metrics import accuracy
    from fedens.seeding import derive_seed, seeded_generator

    scn = fedens.load(QUICKSTART, NO_EVAL + [f"rounds={rounds}"])
    torch.set_num_threads(1)  # as each actor
    fd = build_federated_data(scn.data, scn.seed)
    torch.manual_seed(derive_seed(scn.seed, 0))
    learner = build_learner(scn, fd.server.input_shape, fd.server.num_classes, torch.device("cpu"))
    global_arrays = learner.get_arrays()
    times = []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        replies = []
        for pid in range(len(fd.clients)):
            learner.set_arrays(global_arrays)
            data = fd.clients[pid].train
            learner.fit(data, seeded_generator(scn.seed, r, pid), r)
            replies.append((learner.get_arrays(), len(data)))
        total = sum(n for _, n in replies)
        agg: dict = {}
        for arrays, n in replies:  # Flower's aggregate_arrayrecords
            for k, v in arrays.items():
                agg[k] = v * (n / total) if k not in agg else agg[k] + v * (n / total)
        global_arrays = {k: np.asarray(v) for k, v in agg.items()}
        times.append(time.perf_counter() - t)
    learner.set_arrays(global_arrays)
    probs = predict_dataset(learner, fd.server.test).mean(0)
    return {"round_s": times, "accuracy": accuracy(probs, torch.from_numpy(fd.server.test.y))}


def run_plain(rounds: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--plain-loop", str(rounds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- helpers


def steady_round(rows: list[dict]) -> float:
    """Seconds per round in the steady state: the median time between the train rows of
    consecutive rounds from round 2 on (round 1 includes start-up; the median, like the plain
    loop's, is robust to the spikes of a shared machine)."""
    t = [r["time_s"] for r in rows if r["scope"] == "train"]
    return statistics.median(b - a for a, b in zip(t, t[1:])) if len(t) > 2 else float("nan")


def cli_run(scenario: Path, overrides: list[str], out: Path, memory: bool = False) -> dict:
    """A cold run through the command line; start-up = command to round 1's train row, less
    one steady round (rows 2 and 3). With ``memory``, the process tree's peak PSS too."""
    cmd = [sys.executable, str(ROOT / "run_sim.py"), str(scenario), "--out", str(out), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while memory and proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.2)
    _, err = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["time_s"] for r in rows if r["scope"] == "train"]
    one = train[2] - train[1] if len(train) >= 3 else steady_round(rows)
    return {"startup_s": summary["started_at"] + train[0] - one - t0, "wall_s": wall, "peak_gib": peak / 2**30,
            "accuracy": summary["final"]["global-test"]["accuracy"], "rows": rows}


def tree_pss(root: int) -> int:
    """Bytes of proportional set size of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except OSError:
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def line(label: str, value: str, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
    print(f"  {label:58s} {value:>22s}  {target}{verdict}", flush=True)


# --------------------------------------------------------------------------- the bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no 100,000-client run")
    parser.add_argument("--plain-loop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        print(json.dumps(plain_loop(args.plain_loop)))
        return

    import fedens

    reps = 2 if args.quick else 7
    tmp = Path(tempfile.mkdtemp(prefix="fedens-bench-"))
    print(f"fedens engine bench ({os.cpu_count()} CPUs); results under {tmp}\n")

    # 1 + 3 + 6: in one warm session, alternating with the plain loop in its own process
    print("1. steady state: quickstart training, evaluation every 20 rounds, no client evaluation")
    rounds = 40
    fed, plain, warm_start, acc = [], [], [], {}
    with fedens.session() as s:
        s.run(QUICKSTART, ["rounds=2"], out=tmp / "warmup")
        for i in range(reps):
            p = run_plain(rounds)
            plain.append(statistics.median(p["round_s"][1:]))
            acc["plain"] = p["accuracy"]
            marks: dict[int, float] = {}
            t0 = time.perf_counter()
            res = s.run(QUICKSTART, NO_EVAL + [f"rounds={rounds}"], out=tmp / f"steady{i}",
                        on_round=lambda r, rows: marks.setdefault(r, time.perf_counter()))
            per_round = steady_round(res.rows)
            fed.append(per_round)
            warm_start.append(marks[1] - t0 - per_round)
            acc["fedens"] = res.final["global-test"]["accuracy"]
        ratio = statistics.median(fed) / statistics.median(plain)
        line("plain loop, per round (median of runs)", f"{1000 * statistics.median(plain):.1f} ms")
        line("fedens (Flower + Ray, 2 actors), per round", f"{1000 * statistics.median(fed):.1f} ms")
        line("ratio fedens / plain", f"{ratio:.2f}x", "target <= 1.25x", ratio <= 1.25)
        line("final test accuracy, plain / fedens", f"{acc['plain']:.4f} / {acc['fedens']:.4f}", "must be equal",
             abs(acc["plain"] - acc["fedens"]) < 1e-9)

        print("\n3. warm start-up: a further run in a session, run() to the first training round")
        line("warm start-up (median)", f"{statistics.median(warm_start):.2f} s", "target <= 1 s",
             statistics.median(warm_start) <= 1.0)

        print("\n6. evaluation cost per round (quickstart, 40 rounds, warm session)")
        costs = {}
        for name, ov in (("none", ["fraction_evaluate=0", "evaluate.every=40"]), ("central", ["fraction_evaluate=0"]),
                         ("central + clients", [])):
            costs[name] = statistics.median(steady_round(s.run(QUICKSTART, ov + ["rounds=40"], out=tmp / f"eval-{name.replace(' ', '')}-{i}").rows)
                                            for i in range(reps))
        line("training only", f"{1000 * costs['none']:.1f} ms")
        line("+ central evaluation (test, shifted, noise sets)", f"+{1000 * (costs['central'] - costs['none']):.1f} ms")
        line("+ 10 clients' validation splits", f"+{1000 * (costs['central + clients'] - costs['central']):.1f} ms")

    print("\n2. cold start-up: python run_sim.py quickstart, command to the first training round")
    cold = [cli_run(QUICKSTART, NO_EVAL, tmp / f"cold{i}") for i in range(reps)]
    c = statistics.median(r["startup_s"] for r in cold)
    line("cold start-up (median)", f"{c:.2f} s", "target <= 6 s", c <= 6.0)
    line("cold run, whole command (median)", f"{statistics.median(r['wall_s'] for r in cold):.2f} s")

    print("\n4. start-up against the number of clients (synthetic, 3 rounds)")
    big = tmp / "synthetic.yaml"
    big.write_text("name: clients\nrounds: 3\ndata: {dataset: synthetic, partition: {kind: iid}}\n"
                   "model: {kind: mlp, hidden: [64]}\ntrain: {local_epochs: 1, lr: 0.1}\n")

    def clients(n: int, fraction: float, memory: bool = False) -> dict:
        ov = [f"data.num_clients={n}", f"data.params.num_samples={max(20 * n, 2000)}", f"fraction_train={fraction}"]
        return cli_run(big, ov, tmp / f"clients{n}", memory=memory)

    small, large = clients(10, 0.01, memory=True), clients(10_000, 0.01, memory=True)
    line("10 clients: command to first round", f"{small['startup_s']:.2f} s")
    line("10,000 clients (1% sampled): command to first round", f"{large['startup_s']:.2f} s")
    line("ratio 10,000 / 10 clients", f"{large['startup_s'] / small['startup_s']:.2f}x", "target <= 1.5x",
         large["startup_s"] / small["startup_s"] <= 1.5)
    line("peak memory of the process tree, 10 / 10,000 clients", f"{small['peak_gib']:.2f} / {large['peak_gib']:.2f} GiB")
    if not args.quick:
        huge = clients(100_000, 0.001, memory=True)
        line("100,000 clients (0.1% sampled): whole run", f"{huge['wall_s']:.1f} s")
        line("100,000 clients: peak memory of the process tree", f"{huge['peak_gib']:.2f} GiB", "target < 4 GiB",
             huge["peak_gib"] < 4.0)

    print("\n5. a 10-variant fedens compare of the quickstart at 5 rounds")
    cmp = tmp / "compare10.yaml"
    variants = {f"lr{lr}": {"train.lr": lr} for lr in (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2)}
    cmp.write_text(json.dumps({"name": "ten", "base": str(QUICKSTART), "overrides": {"rounds": 5}, "variants": variants}))
    one = cli_run(QUICKSTART, ["rounds=5", "train.lr=0.02"], tmp / "one-variant")["wall_s"]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fedens.cli", "compare", str(cmp), "--out", str(tmp / "compare10")],
                   check=True, capture_output=True)
    ten = time.time() - t0
    line("one cold run of one variant", f"{one:.1f} s")
    line("10-variant compare", f"{ten:.1f} s")
    line("ratio compare / one run", f"{ten / one:.2f}x", "target <= 3x", ten / one <= 3.0)


if __name__ == "__main__":
    main()
