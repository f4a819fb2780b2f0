"""Run the benchmark suite and write ``docs/results.md``: one comparison file per claim.

    python benchmarks/run.py --out benchmarks/results                 # run (or resume) every comparison, then report
    python benchmarks/run.py --out benchmarks/results --only ivon gossip
    python benchmarks/run.py --out benchmarks/results --only ivon --rerun   # run ivon's runs again from scratch
    python benchmarks/run.py --out benchmarks/results --report        # only the report, from finished runs
    python benchmarks/run.py --out benchmarks/results --check         # sections whose code changed since they ran: exit 1

The runs go to ``benchmarks/results`` by default, which is committed without the bulky files
(checkpoints, logs, figures: ``benchmarks/results/.gitignore``): a finished run needs only its
summary and marker to be skipped, so the suite picks up in a later sitting where it stopped.
Every comparison runs through one warm engine and is resumable (a finished run is not run
again); a comparison file with a ``tune:`` block is tuned first by ``run_comparison`` itself.
Around each comparison this script writes ``OUT/<name>/stamp.json`` (the commit, the date and
the blob hash of every file the section depends on: the comparison file, its base scenario and
the Python sources under fedens/ and strategies/; per run, which of those code versions it ran
at) and ``OUT/elapsed.json`` (wall seconds per comparison).

The report (``benchmarks/report.py``) is computed from each comparison's ``runs.csv``: a
verdict per metric per compared pair from the paired differences over the seeds where both runs
are ok (``fedens.stats.paired``, 95% Student-t interval), readings rendered from the statistics,
and a diverged or failed run counted as "unstable at these settings in k of n seeds" next to
the verdict, never folded into it. ``--check`` reads only stamps and files: it starts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import ALL, MARGIN, REFERENCE, RUN_GLOBS, Check, Claim, check, code_hashes, evaluate_claim, \
    finish_stamp, new_stamp, report, run_keys  # noqa: E402

BENCHMARKS = ROOT / "benchmarks"
__all__ = ["CLAIMS", "MARGIN", "main", "run_all"]

# The protocol (docs/comparisons.md): 5 evaluation seeds, and 10 where an interval still does
# not decide a check; the runs of the first 5 are kept, only seeds 5-9 run.
MORE_SEEDS = 10

EXITS = ("lambda_0.03", "lambda_0.1", "lambda_0.3", "joint_0.1", "budgets")
CONFORMAL = ("pooled_lac", "pooled_aps", "qoq_lac", "qoq_aps")

# A claim's ``setup`` states the claim and its setup in words and holds no number: every number
# of a section (differences, intervals, seeds, rounds, counts) is rendered from runs.csv.
CLAIMS = [
    Claim("ensembles", "ensembles", "Ensembles are better calibrated than a single network",
          "deep ensembles (Lakshminarayanan et al. 2017), BatchEnsemble (Wen et al. 2020), FiLM-Ensemble (Turkoglu et al. "
          "2022), subnetworks (Zhang et al. 2021), MC dropout (Gal & Ghahramani 2016), snapshots (Huang et al. 2017), "
          "low-precision ensembles (Nam & Lee 2024), FGE (Garipov et al. 2018), StarSSE (Sadrtdinov et al. 2023)",
          "The ensemble papers claim that an ensemble, explicit or implicit, has a lower ECE and NLL than a single "
          "network. Every ensemble learner is trained federatedly on MNIST-1D at two levels of label skew and compared "
          "with the single network at the same skew, on the same seeds, with the same training settings.",
          [(ALL, REFERENCE)], [Check("test_ece", "lower"), Check("test_nll", "lower")], extra_plots=["reliability.png"]),
    Claim("fge", "ensembles", "FGE and StarSSE: an ensemble from one training run beats the single network",
          "FGE (Garipov et al. 2018), StarSSE (Sadrtdinov et al. 2023)",
          "Fast geometric ensembling collects snapshots along one run's cyclic learning-rate schedule after a warm-up; "
          "StarSSE starts every cycle from the warmed-up model instead of the previous snapshot. The claim: the "
          "snapshot ensemble is more accurate and has a lower NLL than the single network, at the same number of "
          "rounds. Both are compared with the single network of the ensembles comparison at each level of label skew.",
          [("snapshot_fge", "single"), ("snapshot_star", "single")],
          [Check("test_accuracy", "higher"), Check("test_nll", "lower")]),
    Claim("lora", "lora", "LoRA-Ensemble is as accurate as an explicit ensemble and better calibrated",
          "Halbheer et al. 2024",
          "LoRA-Ensemble's members are low-rank adapters on one frozen pretrained transformer. The claim: it is as "
          "accurate as an explicit ensemble of the same transformer from the same pretrained backbone (comparable "
          "accuracy) and better calibrated (lower ECE). Here the tiny ViT on MNIST-1D, with the backbone pretrained "
          "on the server's public split.",
          [("lora_ensemble", "deep_ensemble")], [Check("test_accuracy", "comparable"), Check("test_ece", "lower")],
          extra_plots=["tradeoff.png"]),
    Claim("ivon", "ivon", "IVON matches SGD's accuracy at the same cost and is better calibrated", "Shen et al. 2024",
          "The claim: IVON, at the cost of SGD, is at least as accurate as SGD and has a lower ECE. Two pairs: IVON and "
          "SGD, each with its learning rate tuned over the same range of steps; and, not tuned, IVON at its fedens "
          "preset against SGD taking the same step (heavy-ball momentum, its learning rate IVON's times one minus the momentum), so that a "
          "difference is the posterior, not the step size.",
          [("ivon", "sgd"), ("ivon_default", "sgd_same_step")],
          [Check("test_accuracy", "not lower"), Check("test_ece", "lower")]),
    Claim("ivon_admm", "admm", "IVON-ADMM reaches at least the accuracy of FedAvg, FedProx, FedDyn and FedLap under "
          "strong heterogeneity", "Möllenhoff et al. 2025",
          "The claim: under strong label skew, IVON-ADMM is at least as accurate as FedAvg, FedProx, FedDyn and FedLap. "
          "Every method has its learning rate (IVON-ADMM: its IVON learning rate and initial Hessian, from the authors' "
          "settings) and its own penalty tuned with the same budget, and the same local training on MNIST-1D.",
          [("ivon_admm", b) for b in ("fedavg", "fedprox", "feddyn", "fedlap")], [Check("test_accuracy", "not lower")]),
    Claim("fedlap_cov", "admm", "FedLap-Cov improves on FedLap", "Swaroop et al. 2025",
          "The claim: sending the clients' diagonal precision with their models (FedLap-Cov) gives a more accurate "
          "global model than FedLap, in the same comparison as IVON-ADMM.",
          [("fedlap_cov", "fedlap")], [Check("test_accuracy", "higher")]),
    Claim("posteriors", "posteriors", "Posterior merging and FedBE give a better calibrated global model than FedAvg",
          "Daheim et al. 2024 (posterior merging), Chen & Chao 2021 (FedBE)",
          "The claim: combining the clients as Bayesian posteriors (averaging, product, uncertainty-weighted merging) "
          "or as a distribution over their weights (FedBE) gives a lower ECE and NLL than FedAvg of one network. The "
          "posterior strategies take the IVON learner; IVON clients under plain FedAvg separate the learner from the "
          "merging rule.",
          [(v, "fedavg") for v in ("posterior_avg", "posterior_product", "uncertainty_merge", "fedbe", "ivon_fedavg")],
          [Check("test_ece", "lower"), Check("test_nll", "lower")], extra_plots=["reliability.png"]),
    Claim("swarm", "swarm", "The swarm's agreed ensemble beats every single client's model",
          "the swarm-consensus seed paper (PoSw)",
          "The claim: the ensemble the clients agree on is more accurate than the best single client's own model of "
          "the same run (a measurement the consensus never sees).",
          [("swarm", "")], [Check("best_client", "higher")], zero_label="its best client"),
    Claim("conformal", "conformal", "Conformal sets from the federated predictive cover 1 - alpha on exchangeable test data",
          "Vovk et al. 2005, Lei et al. 2018 (split conformal), Humbert et al. 2023 (quantile of quantiles)",
          "The claim: prediction sets calibrated on the clients' validation splits cover the true label with "
          "probability at least one minus alpha on exchangeable test data. The pooled threshold and the quantile of "
          "quantiles, each with the LAC and APS scores; the check is the coverage minus its guarantee, per run.",
          [(v, "") for v in CONFORMAL], [Check("coverage_gap", "not lower")], zero_label="1 - alpha"),
    Claim("conformal_shift", "conformal", "... and lose that coverage under shift", "the same, with the shifted test set",
          "The same sets on the shifted test set, where the exchangeability the guarantee needs does not hold: the "
          "claim is that their coverage falls below the guarantee.",
          [(v, "") for v in CONFORMAL], [Check("shift_coverage_gap", "lower")], zero_label="1 - alpha"),
    Claim("mixture", "mixture", "A mixture of IVON posteriors gives a better predictive than one", "Le-Minh et al. 2025 (NVA)",
          "The claim: a mixture of Gaussian posteriors trained with annealing captures more than one mode and so has a "
          "lower NLL and ECE than a single IVON posterior; with and without the annealing, under posterior averaging "
          "on digits.",
          [("mixture", "ivon"), ("mixture_no_annealing", "ivon")], [Check("test_nll", "lower"), Check("test_ece", "lower")]),
    Claim("mixture_vs_ensemble", "mixture", "The IVON mixture beats an ensemble of K IVON posteriors at equal compute",
          "Le-Minh et al. 2025 (NVA)",
          "The stronger baseline: an ensemble of K independently trained IVON posteriors costs what the mixture of K "
          "components costs. The claim: the mixture still has a lower NLL and ECE.",
          [("mixture", "ivon_ensemble")], [Check("test_nll", "lower"), Check("test_ece", "lower")]),
    Claim("early_exit", "early_exit", "Jointly trained gates beat input-blind exits at the same compute",
          "Regol, Chataoui & Coates 2024 (JEI-DNN)",
          "The claim: gates trained jointly with the exits are more accurate than sending inputs at random to fixed "
          "exits at the same mean compute (the upper concave hull of the fixed exits' cost and accuracy), per run; at "
          "several cost weights, with the blocks trained by every exit, and with depth budgets.",
          [(v, "") for v in EXITS], [Check("test_routing_gain", "higher")], zero_label="static exits", plot="exits.png"),
    Claim("early_exit_threshold", "early_exit", "Learned gates beat confidence-threshold exits at matched compute",
          "Regol, Chataoui & Coates 2024 (JEI-DNN); confidence-threshold exits (e.g. BranchyNet, Teerapittayanon et al. "
          "2016) as the baseline",
          "The usual baseline exits an input at the first exit whose confidence passes a threshold, with the threshold "
          "set so that the mean compute matches the gates'. The claim: the learned gates are more accurate at that "
          "compute, per run.",
          [(v, "") for v in EXITS], [Check("test_threshold_gain", "higher")],
          zero_label="confidence-threshold exits at the same compute", plot="exits.png"),
    Claim("early_exit_calibration", "early_exit", "... and are better calibrated than the plain network", "the same",
          "The claim: the gated network has a lower ECE than the plain network of the same architecture.",
          [(v, "single") for v in EXITS], [Check("test_ece", "lower")]),
    Claim("distill", "distill", "A distilled student keeps its teacher's accuracy and calibration",
          "Hinton et al. 2015 (distillation); Chen & Chao 2021 (FedBE: distilling the global predictive on the server)",
          "Each federated run distils its global ensemble or posterior (the teacher) into one network on the server's "
          "public split, without its labels. The claim: the student's accuracy is within the margin of the "
          "teacher's (not lower) and its ECE is not higher than the teacher's by more than the margin, per run.",
          [(ALL, "")], [Check("student_vs_teacher_accuracy", "not lower"), Check("student_vs_teacher_ece", "not higher")],
          zero_label="its teacher"),
    Claim("gossip", "gossip", "Variance-corrected gossip reaches a target accuracy in fewer rounds than plain gossip",
          "the Vanishing Variance paper (variance-corrected model averaging)",
          "The claim: correcting the variance of averaged models lets decentralized training from independent "
          "initialisations reach a target mean node accuracy in fewer rounds than plain gossip averaging; on a ring "
          "and a random regular graph. A run that never reaches the target counts as its rounds cap plus one.",
          [("vca-topology=ring", "average-topology=ring"), ("vca-topology=regular", "average-topology=regular")],
          [Check("rounds_to_target", "lower")], extra_plots=["layer_variance.png"]),
]


def machine() -> dict[str, int]:
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        pass
    return {"cpus": os.cpu_count() or 0, "gpus": gpus}


def forget_runs(folder: Path) -> int:
    """Make ``run_comparison`` run a comparison again from scratch: remove the resume markers of
    its evaluation runs and tuning trials, and set its Optuna storage aside (renamed, not deleted)."""
    from fedens.compare import MARKER

    markers = [m for g in RUN_GLOBS for m in folder.glob(g.replace("summary.json", MARKER))]
    for m in markers:
        m.unlink()
    db = folder / "tuning.db"
    if db.exists():
        db.rename(folder / f"tuning.db.before-{time.strftime('%Y%m%dT%H%M%S')}")
    return len(markers)


def undecided(out: Path, name: str) -> int | None:
    """The number of evaluation seeds of comparison ``name`` when a check of one of its claims
    is inconclusive there (its interval does not decide), else None."""
    for claim in CLAIMS:
        if claim.comparison != name:
            continue
        res = evaluate_claim(claim, out, BENCHMARKS)
        if res.runs is not None and any(c.verdict == "inconclusive" for p in res.pairs for c in p.checks):
            return len({r["seed"] for r in res.runs.rows})
    return None


def run_all(out: Path, only: list[str], rerun: bool = False) -> dict[str, float]:
    """Every comparison (tuning first where the file has a ``tune:`` block, then the runs) into
    ``out/<name>``, in one session; stamps each; seconds per comparison (``elapsed.json``)."""
    import fedens
    from fedens.compare import run_comparison

    files = sorted(BENCHMARKS.glob("*.yaml"))
    unknown = sorted(set(only) - {p.stem for p in files})
    if unknown:
        raise SystemExit(f"--only: no comparison file benchmarks/<name>.yaml for {', '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        elapsed = json.loads((out / "elapsed.json").read_text())
    except (OSError, ValueError):
        elapsed = {}
    host = machine()
    with fedens.session() as session:
        for path in files:
            if only and path.stem not in only:
                continue
            folder = out / path.stem
            folder.mkdir(parents=True, exist_ok=True)
            if rerun:
                print(f"== {path.stem}: {forget_runs(folder)} finished runs will run again", flush=True)
            before = run_keys(folder)
            stamp = new_stamp(ROOT, path)  # the code as the comparison starts
            print(f"== {path.stem} (commit {stamp['commit']})", flush=True)
            t = time.time()
            try:
                run_comparison(path, folder, session=session, progress=False)
                seeds = undecided(out, path.stem)
                if seeds is not None and seeds < MORE_SEEDS:
                    print(f"== {path.stem}: an interval does not decide at {seeds} seeds: {MORE_SEEDS} seeds", flush=True)
                    run_comparison(path, folder, session=session, progress=False, seeds=MORE_SEEDS)
            finally:  # also when a run fails or the suite is interrupted: the runs that finished are stamped
                final = finish_stamp(folder, stamp, before, time.time() - t, end_files=code_hashes(ROOT, path),
                                     machine=host)
                elapsed[path.stem] = final.get("elapsed_s", elapsed.get(path.stem, round(time.time() - t, 1)))
                (out / "elapsed.json").write_text(json.dumps(elapsed, indent=1, sort_keys=True))
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    parser.add_argument("--only", nargs="*", default=[], help="only these comparisons (benchmarks/<name>.yaml)")
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    parser.add_argument("--check", action="store_true",
                        help="list the sections whose code changed since they ran; exit 1 if any (runs nothing)")
    parser.add_argument("--rerun", action="store_true", help="with --only: run those comparisons' runs again from scratch")
    parser.add_argument("--to", type=Path, default=ROOT / "docs" / "results.md", help="where the report goes")
    args = parser.parse_args(argv)
    if args.check:
        text, code = check(args.out, BENCHMARKS, ROOT, CLAIMS)
        print(text, end="")
        return code
    if args.rerun and not args.only:
        parser.error("--rerun needs --only NAME ...: it runs those comparisons again from scratch")
    if not args.report:
        run_all(args.out, args.only, rerun=args.rerun)
    img = args.to.parent / "img" / "results"
    args.to.write_text(report(args.out, CLAIMS, BENCHMARKS, ROOT, img), encoding="utf-8")
    try:
        wall = sum(json.loads((args.out / "elapsed.json").read_text()).values())
    except (OSError, ValueError, TypeError, AttributeError):
        wall = None
    print(f"wrote {args.to}" + (f"; {wall / 60:.1f} min of wall time in total" if wall else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
