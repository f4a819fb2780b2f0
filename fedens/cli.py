"""Command line: ``fedens run|validate|list`` (``python run_sim.py FILE`` is ``fedens run FILE``).

Exit codes: 0 success; 2 invalid scenario or usage (one line on stderr naming the file and the
key path, never a traceback); 1 a failure while running (message and where the log is).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedens.options import describe
from fedens.scenario import ScenarioError

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own usage errors: one line, exit 2
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)


def build_parser() -> argparse.ArgumentParser:
    from fedens import __version__

    parser = _Parser(prog="fedens", description="Uncertainty-aware federated learning on Flower + Ray.")
    parser.add_argument("--version", action="version", version=f"fedens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a scenario, or continue one with --resume")
    run.add_argument("scenario", nargs="?", help="scenario YAML file (not with --resume)")
    run.add_argument("--out", help="write the results into exactly this folder (refused if it holds files)")
    run.add_argument("--overwrite", action="store_true", help="empty the --out folder first")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key (dotted path, value parsed as YAML); repeatable")
    run.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    val = sub.add_parser("validate", help="check a scenario or a comparison file without running it")
    val.add_argument("scenario", help="scenario or comparison YAML file")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmp = sub.add_parser("compare", help="run every variant of a comparison file at every seed (resumable; a tune: block tunes every "
                         "variant first, with one budget); statistics, tables, plots")
    cmp.add_argument("comparison", help="comparison YAML (base scenario + variants)")
    cmp.add_argument("--out", required=True, help="folder for the variants' runs and the comparison files")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key in every variant; repeatable")
    cmp.add_argument("--verbose", action="store_true")
    exp = sub.add_parser("export-app", help="write a Flower App of a scenario for `flwr run` on Flower's deployment engine")
    exp.add_argument("scenario", help="scenario YAML file")
    exp.add_argument("dir", help="the app's folder (pyproject.toml, scenario, plug-in files)")
    exp.add_argument("--out", help="the run folder on the SuperLink's machine (default: output.dir/<name>-<timestamp> there)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lst = sub.add_parser("list", help="registered datasets, models, learners, strategies and gossip rules")
    lst.add_argument("--long", action="store_true", help="one line per entry: what it is and its parameters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID


def cmd_validate(args: argparse.Namespace) -> int:
    """A scenario, or a comparison file (every variant at every seed), checked as ``run`` and
    ``compare`` check them before Ray starts."""
    from fedens.api import load, preflight
    from fedens.compare import is_comparison, load_comparison
    from fedens.scenario import _read_yaml

    path = Path(args.scenario)
    if path.suffix in {".yaml", ".yml"} and path.is_file() and is_comparison(_read_yaml(path)):
        cmp, runs = load_comparison(path, args.overrides)
        for planned in {(r.variant.name, r.seed): r for r in runs}.values():
            preflight(planned.scenario)
        variants = len({r.variant.name for r in runs})
        print(f"{args.scenario}: ok (comparison {cmp.name}: {variants} variants x {len(runs) // max(variants, 1)} seeds = "
              f"{len(runs)} runs" + (f", reference {cmp.reference}" if cmp.reference else "")
              + (f"; tuned first: {cmp.tune.trials} trials per variant on seeds {cmp.tune.seeds}" if cmp.tune else "") + ")")
        return EXIT_OK
    scn = load(args.scenario, args.overrides)
    preflight(scn)
    how = (f"decentralized, {scn.topology.kind} graph, gossip rule {scn.gossip.rule}" if scn.mode == "decentralized"
           else f"strategy {scn.strategy.name}")
    print(f"{args.scenario}: ok ({scn.name}: {scn.data.num_clients} clients, {scn.rounds} rounds, "
          f"learner {scn.learner.kind}, {how})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from fedens.data import DATASETS
    from fedens.decentralized.rules import GOSSIP_RULES
    from fedens.learners import LEARNERS
    from fedens.models import MODELS
    from fedens.strategies import STRATEGIES

    registries = (("datasets", DATASETS), ("models", MODELS), ("learners", LEARNERS), ("strategies", STRATEGIES),
                  ("gossip rules", GOSSIP_RULES))
    for title, reg in registries:
        if not args.long:
            print(f"{title}: {', '.join(reg.names())}")
            continue
        print(f"{title}:")
        for name in reg.names():
            obj = reg.get(name)
            print(f"  {name:18s} {_summary_line(obj)}" + (f"  [{params}]" if (params := _parameters(obj)) else ""))
    return EXIT_OK


def _summary_line(obj: Any) -> str:
    """The first sentence of what documents an entry: its class's docstring; for a spec (a
    dataset or a model) its options' or its builder's; else its module's."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(obj) and not inspect.isclass(obj):
        sources = [getattr(obj, "Options", None), *(getattr(obj, f.name) for f in dataclasses.fields(obj))]
        sources = [x for x in sources if inspect.isclass(x) or inspect.isfunction(x)]
    else:
        sources = [obj]
    sources += [sys.modules.get(getattr(x, "__module__", ""), None) for x in list(sources)]
    for source in sources:
        doc = inspect.cleandoc(source.__dict__.get("__doc__") or "") if source is not None and \
            hasattr(source, "__dict__") else ""
        if doc:
            first = " ".join(doc.split("\n\n")[0].split())
            return first.split(". ")[0].rstrip(".")[:110]
    return ""


def _parameters(obj: Any) -> str:
    """``name=default`` of an entry's options: a pydantic ``Options`` model, a dataclass, or the
    constructor's own keyword arguments (a Flower strategy's inherited ones left out)."""
    import dataclasses
    import inspect

    options = getattr(obj, "Options", None)
    if options is not None and hasattr(options, "model_fields"):
        return describe(options)
    if dataclasses.is_dataclass(obj):
        return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING)
    if inspect.isclass(obj):
        try:
            sig = inspect.signature(obj.__init__)
        except (TypeError, ValueError):
            return ""
        own = [p for p in sig.parameters.values() if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        flower = {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
                  "weighted_by_key", "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn",
                  "evaluate_metrics_aggr_fn"}
        return ", ".join(f"{p.name}={p.default!r}" for p in own if p.name not in flower and p.default is not p.empty)
    return ""


@contextlib.contextmanager
def stop_on_signals() -> Any:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread (where the ServerApp runs),
    so the run ends as ``interrupted`` and Ray is stopped; a second signal exits at once,
    without a traceback."""
    import os
    import signal

    from fedens.api import Interrupted

    def now(signum: int, frame: Any) -> None:
        os._exit(128 + signum)

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, now)
        signal.signal(signal.SIGTERM, now)
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, first) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cmd_run(args: argparse.Namespace) -> int:
    from fedens.api import Interrupted, RunFailed, resume, run
    from fedens.scenario import parse_scenario

    if args.resume and (args.scenario or args.out or args.overrides or args.overwrite):
        raise ScenarioError("--resume RUN_DIR continues a run as it was: give no scenario, --out, --set or --overwrite")
    if not args.resume and not args.scenario:
        raise ScenarioError("run: give a scenario file, or --resume RUN_DIR")
    source = Path(args.resume) / "scenario.yaml" if args.resume else args.scenario
    scn = parse_scenario(source, args.overrides)  # the schema; run() makes the other checks, then starts Ray
    from fedens.cluster import cluster_address

    progress = None if args.no_progress else _Progress(scn.rounds, "connecting to the Ray cluster ..." if cluster_address(scn)
                                                       else "starting Ray ...")
    on_round = progress.update if progress else None
    try:
        with stop_on_signals(), progress or contextlib.nullcontext():
            if args.resume:
                result = resume(args.resume, verbose=args.verbose, on_round=on_round)
            else:
                result = run(scn, out=args.out, verbose=args.verbose, on_round=on_round, overwrite=args.overwrite)
    except RunFailed as err:
        print(f"error: run failed: {err}\n  see {err.run_dir / 'run.log'}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as err:
        print(f"interrupted (signal {err.signum}); finished rounds are kept, fedens run --resume continues", file=sys.stderr)
        # The run is finished (summary written, Ray stopped). Leave without interpreter shutdown:
        # after a signal Ray's C++ core worker sometimes aborts while Python finalises (exit -6
        # instead of 128 + signal, seen in 2 of 3 full test runs under load).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted; finished rounds are kept, fedens run --resume continues", file=sys.stderr)
        return 130
    test = result.final.get("global-test", {})
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{scn.name}: {result.summary['wall_time_s']:.1f}s, final test accuracy {fmt(test.get('accuracy'))} "
          f"NLL {fmt(test.get('nll'))} ECE {fmt(test.get('ece'))} Brier {fmt(test.get('brier'))}\nresults: {result.run_dir}")
    return EXIT_OK


class _Progress:
    """A rich progress bar over rounds showing the latest global accuracy and ECE."""

    def __init__(self, rounds: int, first: str = "starting Ray ...") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), transient=False)
        self.task = self.bar.add_task(first, total=rounds)

    def __enter__(self) -> _Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def update(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        test = next((r for r in rows if r["scope"] == "global-test"), None)
        desc = f"acc {test['accuracy']:.3f}  ECE {test['ece']:.3f}" if test else None
        self.bar.update(self.task, completed=server_round, **({"description": desc} if desc else {}))


def cmd_compare(args: argparse.Namespace) -> int:
    from fedens.api import Interrupted, RunFailed
    from fedens.compare import markdown_report, run_comparison

    try:
        with stop_on_signals():
            report = run_comparison(args.comparison, args.out, args.overrides, args.verbose)
    except RunFailed as err:
        print(f"error: run failed: {err}\n  see {err.run_dir / 'run.log'}", file=sys.stderr)
        return EXIT_FAILED
    except (Interrupted, KeyboardInterrupt) as err:
        print("interrupted; finished runs are kept, the same command continues", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    print(markdown_report(report) + f"\nresults: {args.out}")
    return EXIT_OK


def cmd_export_app(args: argparse.Namespace) -> int:
    from fedens.api import load
    from fedens.deploy import export_app

    scn = load(args.scenario, args.overrides)
    out = str(Path(args.out).resolve()) if args.out else None
    folder = export_app(scn, Path(args.dir), out=out, overwrite=args.overwrite)
    print(f"{folder}: a Flower App of {scn.name} for {scn.data.num_clients} SuperNodes (partition-id 0..{scn.data.num_clients - 1}); "
          f"run it with: flwr run {folder} <connection>  (docs/deployment.md)")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list, "compare": cmd_compare, "export-app": cmd_export_app}


if __name__ == "__main__":
    raise SystemExit(main())
