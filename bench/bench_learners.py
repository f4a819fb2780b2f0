"""Benchmarks of the learners (not tests): what an ensemble costs a client, measured side by side.

Run from the repository root, with the venv active::

    python bench/bench_learners.py              # both parts
    python bench/bench_learners.py --repeats 9  # more repeats, steadier minima

Every measurement runs single-threaded (``torch.set_num_threads(1)``), as each client's Ray actor
does, on client 0's training split of digits (a scenario with one client, so about 1000
examples), batch 32, SGD with momentum.

(a) Deep-ensemble speed: wall time of ``fit`` for K=8 ``deep_ensemble`` members against the
    ``single`` learner (1 member), the same MLP 64-128-10 and data, a few local epochs; each
    variant is timed once per repeat, interleaved, and the best of the repeats is kept. Printed:
    the ratio K=8 / single (target <= 2.5x), and for reference the ratios of the generic vmap
    path and of the looped reference (a Python loop over 8 networks and 8 optimisers).

(b) One row per registered learner (``fedens.learners.LEARNERS``, so learners added later appear
    without touching this file). Options: the learner's defaults, except ``members`` = 4 and
    ``samples`` = 8 where the learner has those options; model: the MLP [128], or the ``vit``
    for ``lora_ensemble``; ``prepare`` runs through ``fedens.api.prepare_learner`` with
    ``data.server_fraction`` 0.2 (so LoRA-Ensemble pretrains its backbone first). Columns:
    - params: elements of the learner's parameters (``nn.Parameter``s and tensors that require
      grad, found in its attributes), and how many of them are trainable;
    - payload: bytes a client sends per round, the sum of ``nbytes`` of ``get_arrays()``;
    - peak: the peak of torch's CPU tensor allocations (torch profiler memory events) during
      what one client does for one train message: build the learner, ``set_arrays`` the global
      state, ``fit`` one epoch, ``get_arrays``. Tensors alive before (the dataset) are not
      counted; numpy and Python objects are not either (they are the payload copies);
    - train: milliseconds per local epoch (best of the repeats);
    - predict: milliseconds to predict the test set, all members / samples (best of a few).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fedens.api import prepare_learner
from fedens.checks import load_scenario
from fedens.data import load_client_data, load_server_data
from fedens.learners import LEARNERS, build_learner, resolve_learner
from fedens.learners.base import Learner, predict_dataset
from fedens.scenario import Scenario
from fedens.seeding import seeded_generator

MLP = {"kind": "mlp", "hidden": [128]}
MODEL_FOR = {"lora_ensemble": {"kind": "vit"}}  # learners that need another model
TRAIN = {"batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9}


def scenario(learner: dict[str, Any], model: dict[str, Any] = MLP, epochs: int = 1) -> Scenario:
    return load_scenario({
        "seed": 0,
        "data": {"dataset": "digits", "num_clients": 1, "server_fraction": 0.2},
        "model": model,
        "learner": learner,
        "train": {**TRAIN, "local_epochs": epochs},
    })


def build(scn: Scenario, seed: int = 0) -> Learner:
    facts = load_server_data(scn.data, scn.seed)
    torch.manual_seed(seed)
    return build_learner(scn, facts.input_shape, facts.num_classes, torch.device("cpu"))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- (a)


def bench_ensemble_speed(repeats: int, epochs: int) -> None:
    variants: dict[str, tuple[dict[str, Any], bool]] = {
        "single (1 net)": ({"kind": "single"}, True),
        "deep_ensemble K=8": ({"kind": "deep_ensemble", "members": 8}, True),
        "  vmap path K=8": ({"kind": "deep_ensemble", "members": 8}, False),
        "  looped K=8": ({"kind": "deep_ensemble", "members": 8, "vectorized": False}, True),
    }
    scns = {name: scenario(opts, epochs=epochs) for name, (opts, _) in variants.items()}
    data = load_client_data(scns["single (1 net)"].data, 0, 0).train
    best = dict.fromkeys(variants, float("inf"))
    for rep in range(repeats):
        for name, (_, grouped) in variants.items():
            learner = build(scns[name])
            if not grouped:
                learner.grouped = False  # force the generic vmap(functional_call) path
            best[name] = min(best[name], timed(lambda: learner.fit(data, seeded_generator(0, rep, 0), 1)))
    base = best["single (1 net)"]
    print(f"(a) fit time, MLP 64-128-10, {len(data)} examples, batch 32, {epochs} epochs, 1 thread, best of {repeats}")
    for name, t in best.items():
        print(f"    {name:<20} {t * 1e3:8.1f} ms   {t / base:5.2f}x")
    ratio = best["deep_ensemble K=8"] / base
    print(f"    K=8 / single = {ratio:.2f}x (target <= 2.5x: {'met' if ratio <= 2.5 else 'NOT met'})")


# --------------------------------------------------------------------------- (b)


def bench_options(kind: str) -> dict[str, Any]:
    fields = resolve_learner(kind).Options.model_fields
    return {k: v for k, v in {"members": 4, "samples": 8}.items() if k in fields}


def param_counts(learner: Learner) -> tuple[int, int]:
    """(all, trainable) elements of the parameters reachable from the learner's attributes."""
    seen: dict[int, torch.Tensor] = {}

    def visit(v: Any, depth: int = 0) -> None:
        if isinstance(v, nn.Module):
            for p in v.parameters():
                visit(p, depth)
        elif isinstance(v, torch.Tensor):
            if v.device.type != "meta" and (isinstance(v, nn.Parameter) or v.requires_grad):
                seen[id(v)] = v
        elif isinstance(v, dict) and depth < 3:
            for x in v.values():
                visit(x, depth + 1)
        elif isinstance(v, (list, tuple)) and depth < 3:
            for x in v:
                visit(x, depth + 1)

    for v in vars(learner).values():
        visit(v)
    return sum(t.numel() for t in seen.values()), sum(t.numel() for t in seen.values() if t.requires_grad)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: kineto prints profiler_start/stop lines there from C++."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak of torch's CPU tensor allocations while ``fn`` runs, counted from its start."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def bench_learner(kind: str, run_dir: Path, repeats: int) -> dict[str, Any]:
    scn = prepare_learner(scenario({"kind": kind, **bench_options(kind)}, MODEL_FOR.get(kind, MLP)), run_dir)
    client = load_client_data(scn.data, scn.seed, 0)
    test = load_server_data(scn.data, scn.seed).test
    learner = build(scn)
    global_state = learner.get_arrays()
    payload = sum(a.nbytes for a in global_state.values())

    def client_message() -> None:  # what the ClientApp does for one train message
        lrn = build(scn, seed=1)
        lrn.set_arrays(global_state)
        lrn.fit(client.train, seeded_generator(0, 1, 0), 1)
        lrn.get_arrays()

    peak = peak_tensor_bytes(client_message)
    train = min(timed(lambda: learner.fit(client.train, seeded_generator(0, r + 1, 0), r + 1)) for r in range(repeats))
    torch.manual_seed(0)
    predict = min(timed(lambda: predict_dataset(learner, test)) for _ in range(max(2, repeats // 2)))
    n_all, n_train = param_counts(learner)
    options = ", ".join(f"{k}={v}" for k, v in bench_options(kind).items()) or "-"
    return {"learner": kind, "model": scn.model.kind, "options": options, "params": n_all, "trainable": n_train,
            "payload": payload, "peak": peak, "train": train, "predict": predict}


def bench_all_learners(repeats: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in LEARNERS.names():
            try:
                rows.append(bench_learner(kind, Path(tmp) / kind, repeats))
            except Exception as err:  # a learner in flux must not hide the others
                rows.append({"learner": kind, "error": f"{type(err).__name__}: {err}"})
    print("\n(b) every registered learner: digits, 1 thread; payload = bytes a client sends per round;")
    print("    peak = torch CPU tensor allocations during one train message (build, load, 1 epoch, export)")
    head = (f"    {'learner':<15}{'model':<6}{'options':<28}{'params':>9}{'trainable':>10}{'payload KB':>11}{'peak MB':>9}"
            f"{'train ms/ep':>12}{'predict ms':>11}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"    {r['learner']:<15}failed: {r['error'][:100]}")
            continue
        print(f"    {r['learner']:<15}{r['model']:<6}{r['options'][:27]:<28}{r['params']:>9,}{r['trainable']:>10,}"
              f"{r['payload'] / 1024:>11.1f}{r['peak'] / 2**20:>9.2f}{r['train'] * 1e3:>12.1f}{r['predict'] * 1e3:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timings keep the best of this many runs")
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per fit in part (a)")
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each client actor does
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")  # float(loss) in some loops
    if args.part in ("a", "both"):
        bench_ensemble_speed(args.repeats, args.epochs)
    if args.part in ("b", "both"):
        bench_all_learners(args.repeats)


if __name__ == "__main__":
    main()
