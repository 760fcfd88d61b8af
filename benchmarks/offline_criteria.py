"""How well offline metrics rank a run's checkpoints against their rollout scores.

    python benchmarks/offline_criteria.py --data D.hdf5 RUN_FOLDER [RUN_FOLDER ...]
    python benchmarks/offline_criteria.py --from_progress RUN_FOLDER [RUN_FOLDER ...]

For every step checkpoint of each run (model_<step>.pth), recomputes the held-out metrics
with this code (``offline_metrics`` on the run's own held-out split) and pairs them with the
rollout score progress.csv recorded at that step (or, for a run scored by
benchmarks/suite.py, its normalised score from the suite's suite.json above the run folder,
else its rollout return in suite_scores.json). Prints, per run and metric,
Spearman's rank correlation between the metric and the score (sign turned so that +1 is a
perfect ranking) and the score of the checkpoint the metric would pick against the best
checkpoint's. A metric worth choosing model_best by ranks well on every run, not on one.
With ``--from_progress`` the metrics are the ones progress.csv recorded at each evaluation
(no checkpoints needed: runs that kept only their last one can still be ranked).

``--tolerances R,R,...`` adds a table of what LAPO's criterion would pick if a checkpoint
within a relative tolerance R of the best value so far replaced the pick (``pick_within``:
the latest of the checkpoints the criterion cannot tell apart; R = 0 is the plain minimum),
with the picked checkpoint's score per run and the mean over runs.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import experiment, hdf5_format  # noqa: E402
from algos import utils_multimodal as utils  # noqa: E402
from benchmarks.suite import SCORES_FILE, spearman  # noqa: E402

METRICS = {"test_good_action_mse": "min", "test_kept_action_mse": "min", "test_weighted_action_mse": "min",
           "test_action_mse": "min", "test_policy_q_mean": "max"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the dataset the runs were trained on (to recompute the metrics)")
    p.add_argument("--from_progress", action="store_true",
                   help="rank by the metrics progress.csv recorded instead of recomputing them")
    p.add_argument("--tolerances", type=lambda text: [float(r) for r in text.split(",")], metavar="R,R,...",
                   help="also print LAPO's criterion's pick at these relative tolerances (pick_within), "
                        "e.g. 0,0.01,0.05")
    p.add_argument("runs", nargs="+", help="run folders holding progress.csv (and model_<step>.pth)")
    args = p.parse_args(argv)
    if not args.from_progress and not args.data:
        p.error("--data is needed unless --from_progress is given")
    dataset = None if args.from_progress else hdf5_format.load_dataset(args.data, progress=False)
    print("| run | metric | Spearman with score | picked step: score | best step: score |")
    print("|---|---|---|---|---|")
    labels = run_labels(args.runs)
    criterion, criterion_direction = algos.MultimodalLatent.offline_criterion
    tolerance_picks = {}   # {run label: [(tolerance, step, score)]}
    for folder in args.runs:
        rows = list(experiment.ProgressLog(os.path.join(folder, "progress.csv")).rows())
        score = ({int(r["steps"]): float(r["NormalizedScore"]) for r in rows if r.get("NormalizedScore")}
                 or suite_normalised(folder) or suite_scores(folder))
        if args.from_progress:
            metrics = {int(r["steps"]): {k: float(v) for k, v in r.items() if k in METRICS and v} for r in rows}
            steps = sorted(s for s in score if s in metrics)
        else:
            steps = sorted(s for s in experiment.step_checkpoints(folder) if s in score)
            metrics = recompute(folder, steps, dataset)
        if not steps:
            print(f"{folder}: no evaluated steps to rank", file=sys.stderr)
            continue
        scores = [score[s] for s in steps]
        best = steps[int(np.argmax(scores))]
        for name, direction in METRICS.items():
            values = [metrics[s].get(name, float("nan")) for s in steps]
            if not np.isfinite(values).any():
                continue
            sign = -1 if direction == "min" else 1
            rho = spearman([sign * v for v in values], scores)
            picked = steps[int(np.nanargmax([sign * v for v in values]))]
            print(f"| {labels[folder]} | {name} | {rho:+.2f} | "
                  f"{picked}: {score[picked]:.2f} | {best}: {score[best]:.2f} |", flush=True)
        values = [metrics[s].get(criterion, float("nan")) for s in steps]
        if args.tolerances and np.isfinite(values).all():
            tolerance_picks[labels[folder]] = [(r, step, score[step]) for r in args.tolerances
                                               for step in [pick_within(steps, values, r, criterion_direction)]]
    if tolerance_picks:
        print(f"\n{criterion}: the latest checkpoint within R of the best value so far (picked step: score)\n")
        print("| run | " + " | ".join(f"R = {r:g}" for r in args.tolerances) + " |")
        print("|---|" + "---|" * len(args.tolerances))
        for label, picks in tolerance_picks.items():
            print(f"| {label} | " + " | ".join(f"{step}: {value:.2f}" for _, step, value in picks) + " |")
        means = np.mean([[value for _, _, value in picks] for picks in tolerance_picks.values()], axis=0)
        print("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")


def pick_within(steps, values, tolerance, direction="min"):
    """The step a criterion picks when, going through the checkpoints in order, one within
    ``tolerance`` (relative) of the best value so far replaces the pick, as in training
    (``experiment.next_best``): the latest of the checkpoints the criterion cannot tell
    apart, and the plain best at tolerance 0."""
    best = None
    for step, value in zip(steps, values):
        best = experiment.next_best(best, value, step, "criterion", direction, tolerance) or best
    return best["step"]


def run_labels(folders):
    """{folder: what tells it apart from the others}: the path below the folders' common
    parent (at least the last part; the results layout's trailing multimodal_robot left
    out), so that the runs of several variants in one table are named by their variant."""
    paths = [os.path.normpath(os.path.abspath(f)) for f in folders]
    paths = [os.path.dirname(p) if os.path.basename(p) == "multimodal_robot" else p for p in paths]
    parent = os.path.commonpath([os.path.dirname(p) for p in paths])
    return {f: os.path.relpath(p, parent) for f, p in zip(folders, paths)}


def suite_scores(folder):
    """{step: rollout return} of a run scored by benchmarks/suite.py (its suite_scores.json),
    for runs that did no rollouts in training: the return ranks the checkpoints as the
    normalised score does (same seeds, one affine map)."""
    try:
        with open(os.path.join(folder, SCORES_FILE)) as f:
            cached = json.load(f)["scores"]
    except (OSError, ValueError, KeyError):
        return {}
    scores = next(iter(cached.values()), {})
    return {s["step"]: s["return"] for name, s in scores.items()
            if experiment.checkpoint_step(name + ".pth") is not None}


def suite_normalised(folder):
    """{step: normalised score} of a run that benchmarks/suite.py reported on: the curve its
    suite.json (in a folder above the run) holds for this run folder; {} if there is none.
    Normalised scores compare across variants, so the tolerance table's mean means something."""
    here = parent = os.path.realpath(folder)
    while parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        try:
            with open(os.path.join(parent, "suite.json")) as f:
                runs = json.load(f)["runs"]
        except (OSError, ValueError, KeyError):
            continue
        reported = [run for by_algo in runs.values() for by_seed in by_algo.values() for run in by_seed.values()]
        return next((dict(zip(run["steps"], run["curve"])) for run in reported
                     if os.path.realpath(run.get("folder", "")) == here and None not in run["curve"]), {})
    return {}


@torch.no_grad()
def recompute(folder, steps, dataset):
    """{step: offline metrics} of the run's step checkpoints, on its own held-out split."""
    metrics, buffer = {}, None
    for step in steps:
        path = os.path.join(folder, f"model_{step}.pth")
        if buffer is None:
            ckpt = algos.read_checkpoint(path)
            buffer = utils.MultimodalReplayBuffer(dataset, ckpt["config"], device="cpu",
                                                  normalization=utils.Normalization.from_state_dict(ckpt["normalization"]))
        agent = algos.MultimodalAgent.from_checkpoint(path, device="cpu", replay_buffer=buffer)
        metrics[step] = agent.offline_metrics(buffer)
    return metrics


if __name__ == "__main__":
    main()
