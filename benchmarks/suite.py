"""The benchmark suite: LAPO against behaviour cloning on every named variant of a split.

    python benchmarks/suite.py --preset screen                       # dev reach variants, 2 seeds, 32x32, under 90 min on 2 cores
    python benchmarks/suite.py --preset screen --lapo_extra "--weight_temperature 0.1"   # screen a candidate
    python benchmarks/suite.py --preset full --variants reach_wrong40          # the full setting, in parts:
    python benchmarks/suite.py --preset full --variants reach_sparse_short reach_hesitant carry_dense
    python benchmarks/suite.py --preset full --skip_training                   # then the table of all dev variants
    python benchmarks/suite.py --preset full --split test                      # held back: to report, never to tune
    python benchmarks/suite.py --preset full --budget_multiplier 3             # the "3x the budget" check

What it does, per variant (algos/simulator.py's VARIANTS; `python create_dataset.py
--list_variants`): records one dataset (--n_samples rows of --image_size images, a data
seed fixed per variant, cached in --out/datasets), trains LAPO and BC on it through
main_multimodal.py with that script's DEFAULT flags (only the budget, the seed, the
paths, the device and the evaluation settings are set, plus --extra for both algorithms
and --lapo_extra for LAPO alone), saving a checkpoint every --score_every steps. Training
does no rollouts by default (--train_eval_episodes 0): model_best (policy_best.pth) is then chosen by
the algorithm's offline criterion on the held-out episodes (LAPO: test_weighted_action_mse,
the latest checkpoint within 5% of the best value so far; BC: test_action_mse, lower is
better), which is all a user with a real robot has.

Every checkpoint (model_{step}.pth, all of them kept: --keep_last 0; model_final.pth; model_best,
the run's policy_best.pth) is then rolled out on
--eval_episodes fresh seeds (2_000_000 + i: neither training's evaluation seeds,
1_000_000 + i, nor the data's) in the variant's simulator and normalised: 0 = the noisy
operator, 1 = the expert, on the same seeds. model_final and model_best hold the weights
of the step checkpoint saved at the same step (policy_best.pth in float16), so they take that checkpoint's score
rather than a second rollout. Scores are cached in each run folder (suite_scores.json), so
running again rolls nothing out twice; with --delete_scored (the default) each
model_{step}.pth is deleted once scored (about 0.5 GB each), model_best and model_final kept.

The report (printed, --out/suite.md, --out/suite.json, --out/suite_{split}.png), one
section per split, dev and test never mixed. Per variant and algorithm, over seeds:
  * the score of the checkpoint every --score_every steps (the learning curve);
  * final: model_final; model_best: the checkpoint training picked;
  * peak: the best scored checkpoint of each run; peak - final: what the run lost by the end;
  * spearman: the rank correlation, over a run's checkpoints, between the offline criterion
    at each checkpoint's step (progress.csv, sign flipped so that lower error counts as
    better) and the rollout score: +1 = the criterion ranks checkpoints as rollouts do
    (n/a for a run of fewer than 3 checkpoints);
  * picked - peak: model_best's score minus the peak (0 = the criterion picked the best one);
  * LAPO - BC: the difference of the two means, per variant.
"x ± s" is the mean and the standard deviation over seeds without Bessel's correction
(numpy's std, ddof=0); the PNG's bands are the min-max over seeds. "mean over variants"
averages each seed's runs over the variants first, then gives mean ± std over seeds.

Runs are done with --jobs at a time, each on --threads threads (OMP_NUM_THREADS); the
runs already finished in --out with the same config (params.json's) are reused, so the
suite can be run in parts and the table rebuilt at the end with --skip_training. The
run folders are named by algorithm, seed, budget and a hash of the extra flags, so
screening candidates in one --out retrains only the runs they change. Do not run two
suites on overlapping variants in one --out at the same time.

Presets (explicit flags override their values):
  screen  32x32 images, 6000 rows, 800 steps, a checkpoint every 200 steps, 40 rollout
          episodes per checkpoint, seeds 0 and 1, --jobs 2; on --split dev, the three dev reach
          variants (SCREEN_DEV_VARIANTS: carry_dense is left to the full preset): 6 runs.
          Not 16x16: there the policy imitates the kept expert poorly (test_kept_action_mse
          0.29 against 0.15 at 32x32 on reach_wrong40 with the same kept share) and today's
          defaults score 0.03-0.21, so a screen there compares what imitation cannot do.
          800 steps: on a screen of today's defaults reach_wrong40 was still climbing there,
          reach_sparse_short level from step 600, reach_hesitant not yet learning; the late decline
          is the full preset's (and --budget_multiplier's) to show. LAPO alone: it is the
          candidate being chosen, and BC, the reference, does not change with it
          (--algos lapo bc adds it, about half as long again). Measured on 2 otherwise idle
          cores: 82 min in all (recording the three datasets 4 min, then 6 runs of 23 to 25
          min at 0.52-0.61 steps/s each, two side by side, scoring included); on days when
          this kind of machine runs LAPO at 0.87 steps/s, about 60 min. A candidate screened
          in the same --out (--lapo_extra) reuses the datasets. --seeds 0 1 2 costs 1.5x.
  full    32x32 images, 20000 rows, 3000 steps, a checkpoint every 500 steps, 100 rollout
          episodes, seeds 0 1 2, LAPO and BC, --jobs 2 (the default preset). About 7 to 10 h
          per 3 variants on 2 cores (the start-up estimate at 0.87 and 0.6 LAPO steps/s; the
          dev split has 6): run it in parts (--variants), then --skip_training.
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
import warnings
import zlib

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from algos import config as config_lib  # noqa: E402
from algos import experiment, simulator  # noqa: E402

FRESH_SEED_BASE = 2_000_000   # training evaluates on 1_000_000+; the data uses other seeds
SCORES_FILE = "suite_scores.json"
PRESETS = {
    "screen": {"image_size": 32, "n_samples": 6000, "max_timesteps": 800, "score_every": 200, "eval_episodes": 40,
               "seeds": [0, 1], "algos": ["lapo"], "jobs": 2},
    "full": {"image_size": 32, "n_samples": 20000, "max_timesteps": 3000, "score_every": 500, "eval_episodes": 100,
             "seeds": [0, 1, 2], "algos": ["lapo", "bc"], "jobs": 2},
}
# The screen's dev split leaves out carry_dense: behaviour cloning of exactly its expert's
# episodes scores about 0.16 at 32x32 (docs/experiments/2026-12-06.md), so a screen there
# would choose on noise. --variants runs it (and the full preset always does).
SCREEN_DEV_VARIANTS = ("reach_wrong40", "reach_sparse_short", "reach_hesitant")
MIN_CHECKPOINTS_FOR_RANKS = 3
# Settings that do not change what a run computes, or name where it is: not compared.
NOT_COMPARED = ("ExpID", "log_dir", "device", "data_on_device", "overwrite", "resume", "load_model")
# Speeds the start-up estimate assumes (per job on its own core, two jobs side by side, batch
# 64): LAPO at 32x32 0.52-0.61 steps/s measured in the screen of docs/experiments/2026-12-06.md
# (twenty-first session) and 0.8-0.9 on other days on the same kind of machine: the lower
# figure, so the estimate errs long; about 32 / size times that at other sizes (2.0x measured
# at 16x16); BC 2x LAPO.
LAPO_STEPS_PER_S_32, BC_SPEEDUP = 0.6, 2.0


# --------------------------------------------------------------------------- statistics
def rankdata(values):
    """Ranks 1..n of ``values``, ties given the average of the ranks they span."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2   # mean of the ranks start+1 .. end
            start = end
    return ranks


def spearman(x, y):
    """Spearman's rank correlation of paired samples (pairs with a NaN dropped): the
    Pearson correlation of their ranks, ties averaged. NaN with fewer than 2 pairs or when
    either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator > 0 else float("nan")


def stats(values):
    """Mean, std (ddof=0), min and max of the finite values, and how many there were."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not len(arr):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max()),
            "n": int(len(arr))}


# --------------------------------------------------------------------------- one run's numbers
def summarize_run(scores, criterion_by_step, references, criterion_lower_is_better=True):
    """What the report says about one run.

    ``scores``: {checkpoint name: {"step", "return", "success"}} (model_{step}, model_final,
    model_best); ``criterion_by_step``: {step: offline criterion} from progress.csv;
    ``references``: reference returns (expert, noisy) of the same rollout seeds.
    """
    norm = {name: simulator.normalized_score(s["return"], references) for name, s in scores.items()}
    curve = {s["step"]: norm[name] for name, s in scores.items()
             if experiment.checkpoint_step(name + ".pth") is not None}
    final = scores.get("model_final")
    if final is not None and final["step"] not in curve:
        curve[final["step"]] = norm["model_final"]
    steps = sorted(curve)
    final_score, best_score = norm.get("model_final"), norm.get("model_best")
    candidates = [v for v in list(curve.values()) + [best_score] if v is not None]
    peak = max(candidates) if candidates else None
    peak_step = max(steps, key=lambda s: curve[s]) if steps else None
    sign = -1.0 if criterion_lower_is_better else 1.0
    pairs = [(sign * criterion_by_step[s], curve[s]) for s in steps
             if criterion_by_step.get(s) is not None and curve[s] is not None]
    # two checkpoints always correlate +-1: a correlation needs MIN_CHECKPOINTS_FOR_RANKS of them
    rho = spearman(*zip(*pairs)) if len(pairs) >= MIN_CHECKPOINTS_FOR_RANKS else float("nan")
    return {"steps": steps, "curve": [curve[s] for s in steps], "final": final_score,
            "final_success": final and final["success"], "model_best": best_score,
            "model_best_step": scores["model_best"]["step"] if "model_best" in scores else None,
            "peak": peak, "peak_step": peak_step,
            "peak_minus_final": None if peak is None or final_score is None else peak - final_score,
            "spearman": None if math.isnan(rho) else rho,
            "picked_minus_peak": None if peak is None or best_score is None else best_score - peak,
            "criterion_at_steps": [criterion_by_step.get(s) for s in steps]}


# --------------------------------------------------------------------------- the report
METRICS = (("final", "final"), ("model_best", "model_best"), ("peak", "peak"), ("peak_minus_final", "peak - final"),
           ("spearman", "spearman (offline, score)"), ("picked_minus_peak", "picked - peak"))
GAP_METRICS = ("final", "model_best", "peak")


def fmt(st, signed=False, of=None):
    """'mean ± std' of a stats dict; '(n of N)' when only n of the N seeds had a value."""
    if st is None or st["mean"] is None:
        return "n/a"
    text = f"{st['mean']:+.2f}" if signed else f"{st['mean']:.2f}"
    text += f" ± {st['std']:.2f}" if st["n"] > 1 and st.get("std") is not None else ""
    return text + (f" ({st['n']} of {of})" if of and st["n"] < of else "")


def aggregate(runs, algos, variants):
    """{variant: {algo: {metric: stats over seeds, "curve": {step: stats}, "seeds": [...]}}},
    the LAPO - BC gaps per variant, and a "mean over variants" entry (each seed's runs
    averaged over the variants that all have that seed, then stats over seeds)."""
    out = {}
    for variant in variants:
        out[variant] = {}
        for algo in algos:
            per_seed = runs.get(variant, {}).get(algo, {})
            if not per_seed:
                continue
            entry = {m: stats([r[m] for r in per_seed.values()]) for m, _ in METRICS}
            all_steps = sorted({s for r in per_seed.values() for s in r["steps"]})
            entry["curve"] = {s: stats([dict(zip(r["steps"], r["curve"])).get(s) for r in per_seed.values()])
                              for s in all_steps}
            entry["seeds"] = sorted(per_seed)
            out[variant][algo] = entry
        if "lapo" in out[variant] and "bc" in out[variant]:
            out[variant]["gap"] = {m: _difference(out[variant]["lapo"][m], out[variant]["bc"][m]) for m in GAP_METRICS}
    mean = {}
    for algo in algos:
        have = [v for v in variants if algo in out[v]]
        if not have:
            continue
        seeds = sorted(set.intersection(*(set(runs[v][algo]) for v in have)))
        mean[algo] = {}
        for m, _ in METRICS:
            if seeds:
                per_seed = [_nanmean([runs[v][algo][s][m] for v in have]) for s in seeds]
                mean[algo][m] = stats(per_seed)
            else:   # no seed common to all variants: the mean of the variants' means, no spread
                mean[algo][m] = stats([_nanmean([out[v][algo][m]["mean"] for v in have])])
                mean[algo][m]["n"] = 1
    if "lapo" in mean and "bc" in mean:
        mean["gap"] = {m: _difference(mean["lapo"][m], mean["bc"][m]) for m in GAP_METRICS}
    return out, mean


def _num(x):
    return float("nan") if x is None else float(x)


def _nanmean(values):
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _difference(a, b):
    if a["mean"] is None or b["mean"] is None:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": a["mean"] - b["mean"], "std": None, "min": None, "max": None, "n": 1}


def markdown_tables(split, variants, algos, summary, mean, data_lines=()):
    """The markdown lines of one split's section: the summary table, the learning curves and
    the data's behaviours."""
    lines = [f"## {split} split: {', '.join(variants)}", "",
             "| variant | policy | seeds | " + " | ".join(title for _, title in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    rows = [(v, summary[v]) for v in variants] + [("mean over variants", mean)]
    for name, entry in rows:
        for algo in algos:
            if algo not in entry:
                continue
            n_seeds = len(entry[algo].get("seeds", [])) or entry[algo]["final"]["n"]
            signed = ("peak_minus_final", "spearman", "picked_minus_peak")
            lines.append(f"| {name} | {algo.upper()} | {n_seeds} | "
                         + " | ".join(fmt(entry[algo][m], m in signed, n_seeds) for m, _ in METRICS) + " |")
        if "gap" in entry:
            gap = entry["gap"]
            lines.append(f"| {name} | LAPO - BC | | " + " | ".join(
                fmt(gap[m], signed=True) if m in gap else "" for m, _ in METRICS) + " |")
    steps = sorted({s for v in variants for a in algos if a in summary[v] for s in summary[v][a]["curve"]})
    if steps:
        lines += ["", f"Normalised score of the checkpoint at each step ({split} split, mean ± std over seeds):", "",
                  "| variant | policy | " + " | ".join(str(s) for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for v in variants:
            for algo in algos:
                if algo in summary[v]:
                    curve = summary[v][algo]["curve"]
                    lines.append(f"| {v} | {algo.upper()} | "
                                 + " | ".join(fmt(curve[s], of=len(summary[v][algo]["seeds"])) if s in curve else ""
                                              for s in steps) + " |")
    if data_lines:
        lines += ["", *data_lines]
    return lines


def data_table(variants, references):
    """The variants' recordings: task, reward, length, mix, and each behaviour's score."""
    lines = ["| variant | task | reward | steps | mix | behaviours in the data, normalised score |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        spec = simulator.VARIANTS[v]
        refs = references.get(v, {})
        scored = ", ".join(f"{k} {simulator.normalized_score(r, refs):.2f}" for k, r in refs.items()
                           if simulator.normalized_score(r, refs) is not None)
        lines.append(f"| {v} | {spec['simulator']} | {spec['config'].get('reward', 'dense')} | "
                     f"{spec['config'].get('max_steps', '')} | {simulator.describe_mix(spec['mix'])} | {scored} |")
    return lines


def plot_curves(runs, variants, algos, path, title=""):
    """One subplot per variant: each algorithm's mean score over seeds against the step,
    with the min-max band over seeds. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"  no plot: matplotlib is not installed (pip install matplotlib); {path} not written")
        return None
    cols = min(3, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.5 * cols), 3.6 * rows), squeeze=False)
    for ax, v in zip(axes.flat, variants):
        for algo, color in zip(algos, ("tab:blue", "tab:orange", "tab:green")):
            per_seed = runs.get(v, {}).get(algo, {})
            steps = sorted({s for r in per_seed.values() for s in r["steps"]})
            if not steps:
                continue
            table = np.array([[_num(dict(zip(r["steps"], r["curve"])).get(s)) for s in steps]
                              for r in per_seed.values()])
            with warnings.catch_warnings():   # a step no seed has: an empty slice
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(steps, np.nanmean(table, 0), color=color, marker="o", ms=3,
                        label=f"{algo.upper()} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
                ax.fill_between(steps, np.nanmin(table, 0), np.nanmax(table, 0), color=color, alpha=0.2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_title(v)
        ax.set_xlabel("training steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    fig.suptitle(f"{title}\nmean over seeds, band: min-max over seeds; 1 = expert, 0 = noisy operator", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- data, runs, jobs
def variant_data_seed(variant):
    """The data seed of a variant: fixed, and different between variants."""
    return zlib.crc32(variant.encode()) % 10_000


def ensure_dataset(out, variant, n_samples, image_size, record=True):
    """The variant's dataset in out/datasets, recorded when absent (to a temporary name,
    renamed) if ``record``."""
    seed = variant_data_seed(variant)
    path = os.path.join(out, "datasets", f"{variant}_{image_size}px_{n_samples}rows_seed{seed}.hdf5")
    if record and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = experiment.temporary_path(path)
        print(f"  recording {os.path.basename(path)}")
        simulator.create_variant_dataset(tmp, variant, n_samples, image_size, seed=seed, progress=False)
        os.replace(tmp, path)
    return path


def run_id(algo, seed, steps, flags):
    """The run's ExpID: algorithm, seed, budget, and a hash of its extra flags if any."""
    tag = f"{algo}_s{seed}_t{steps}"
    return tag + ("_" + hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8] if flags else "")


def expected_config(train_args):
    """The params.json config main_multimodal.py will write for these flags (its defaults filled)."""
    try:
        parsed = config_lib.build_parser().parse_args(train_args)
    except SystemExit:
        sys.exit(f"main_multimodal.py does not take these flags (see --extra, --lapo_extra): {shlex.join(train_args)}")
    return config_lib.to_dict(config_lib.TrainConfig(**vars(parsed)))


def config_differences(folder, expected):
    """[] when ``folder`` holds a finished run (model_final.pth) trained with ``expected``'s
    settings, else what differs. The data file is compared by name, so --out may move."""
    try:
        with open(os.path.join(folder, "params.json")) as f:
            stored = json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return ["no params.json"]
    try:
        found = config_lib.settings_of_this_version(stored)
    except ValueError as exc:
        return [str(exc)]
    if not os.path.exists(os.path.join(folder, "model_final.pth")):
        return ["not finished (no model_final.pth)"]
    diffs = []
    for key in sorted(set(expected) | set(found)):
        if key in NOT_COMPARED:
            continue
        a, b = found.get(key, "<absent>"), expected.get(key, "<absent>")
        if key == "hdf5_path":
            a, b = os.path.basename(str(a)), os.path.basename(str(b))
        if a != b:
            diffs.append(f"{key}: {a} in the run, {b} now")
    return diffs


def run_jobs(commands, jobs, threads, log_dir, on_done=None):
    """Run shell-free commands, ``jobs`` at a time, each on ``threads`` threads; call
    ``on_done(name)`` in this process as each succeeds (its slot stays taken meanwhile)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    pending, running, failed = list(commands), [], []
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            log = open(os.path.join(log_dir, f"{name}.log"), "w")
            print(f"  start {name}: {shlex.join(cmd)}", flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
        time.sleep(1)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"  done  {name} (exit {proc.returncode})", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
                elif on_done is not None:
                    on_done(name)
    return failed


# --------------------------------------------------------------------------- scoring
def rollout_checkpoint(path, sim_name, sim_config, seeds):
    from algos import algos_vae_multimodal as algos   # torch: only where checkpoints are rolled out
    agent = algos.MultimodalAgent.from_checkpoint(path, device="cpu")
    envs = [simulator.make_simulator(sim_name, sim_config) for _ in seeds]
    returns, successes, _ = simulator.rollout(envs, agent.act_on_observations, seeds)
    return float(returns.mean()), float(successes.mean())


def score_run(folder, sim_name, sim_config, seeds, delete_scored):
    """Roll out every checkpoint of a finished run not scored yet on ``seeds``; returns
    {checkpoint name: {"step", "return", "success"}}, cached in the run's suite_scores.json.
    model_final and model_best take the score of the step checkpoint of the same step."""
    with open(os.path.join(folder, "params.json")) as f:
        started = json.load(f).get("started")
    cache_path = os.path.join(folder, SCORES_FILE)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if cache.get("run_started") != started:   # a retrained run: its old scores are gone with it
        cache = {"run_started": started, "scores": {}}
    key = f"{len(seeds)} episodes from seed {seeds[0]}"
    scores = cache["scores"].setdefault(key, {})
    by_step = {}
    for name, s in scores.items():
        if experiment.checkpoint_step(name + ".pth") is not None:
            by_step[s["step"]] = s

    def score(name, path, step):
        if name not in scores:
            if step in by_step and name in ("model_final", "model_best"):
                scores[name] = dict(by_step[step], same_as=f"model_{step}")
            else:
                t = time.time()
                ret, success = rollout_checkpoint(path, sim_name, sim_config, seeds)
                scores[name] = {"step": step, "return": ret, "success": success}
                print(f"    {os.path.basename(path)}: return {ret:.3f}, success {success:.2f} "
                      f"({time.time() - t:.0f} s)", flush=True)
            experiment.write_json_atomic(cache, cache_path)
        if experiment.checkpoint_step(name + ".pth") is not None:
            by_step[step] = scores[name]

    for step, path in sorted(experiment.step_checkpoints(folder).items()):
        score(f"model_{step}", path, step)
        if delete_scored:
            os.remove(path)
    for name, filename in (("model_final", "model_final.pth"), ("model_best", "policy_best.pth")):
        path = os.path.join(folder, filename)
        if os.path.exists(path):
            score(name, path, experiment.stored_step(path))
    return scores


def criterion_by_step(folder):
    """{step: offline criterion} from progress.csv, the criterion's name and whether lower
    is better: the agent's offline criterion as params.json records it (what model_best is
    chosen by where no simulator exists, as on a robot)."""
    with open(os.path.join(folder, "params.json")) as f:
        criterion = json.load(f)["offline_criterion"]
    name = criterion["metric"]
    out = {}
    for row in experiment.ProgressLog(os.path.join(folder, "progress.csv")).rows():
        try:
            out[int(row["steps"])] = float(row[name])
        except (KeyError, ValueError, TypeError):
            pass
    return out, name, criterion["better"] == "lower"


def estimate_minutes(n_lapo, n_bc, steps, image_size, jobs, n_checkpoints, threads, episodes=50):
    """Wall minutes to train and score this many runs (see LAPO_STEPS_PER_S_32)."""
    lapo = LAPO_STEPS_PER_S_32 * (32 / image_size) * threads ** 0.5
    startup = 30   # seconds per run: start-up, offline evaluations, checkpoint writes
    train = n_lapo * (steps / lapo + startup) + n_bc * (steps / (BC_SPEEDUP * lapo) + startup)
    scoring = (n_lapo + n_bc) * n_checkpoints * 8 * (image_size / 16) ** 1.5 * episodes / 50
    return (train + scoring) / 60 / jobs


# --------------------------------------------------------------------------- main
def preset_values(key):
    """'screen X, full Y': each preset's value of a setting, for --help."""
    def text(value):
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return ", ".join(f"{name} {text(values[key])}" for name, values in PRESETS.items())


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="full",
      help="named setting (default: full); explicit flags override its values")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", choices=("dev", "test", "all"), default="dev", help="variants to run (default: dev)")
    which.add_argument("--variants", nargs="+", choices=list(simulator.VARIANTS), metavar="NAME",
                       help="these variants instead (any split; see create_dataset.py --list_variants)")
    a("--algos", nargs="+", choices=config_lib.ALGOS,
      help=f"algorithms to train ({preset_values('algos')}; the screen's is the candidate being chosen)")
    a("--seeds", type=int, nargs="+", help=f"training seeds ({preset_values('seeds')})")
    a("--n_samples", type=int, help=f"rows recorded per variant ({preset_values('n_samples')})")
    a("--image_size", type=int, help=f"image side in pixels ({preset_values('image_size')})")
    a("--max_timesteps", type=int,
      help=f"training steps per run before --budget_multiplier ({preset_values('max_timesteps')})")
    a("--budget_multiplier", type=float, default=1.0, help="multiplies --max_timesteps, e.g. 3 (default: 1)")
    a("--score_every", type=int, help="steps between scored checkpoints (--save_freq and --eval_freq of "
                                     f"training; {preset_values('score_every')})")
    a("--eval_episodes", type=int, help=f"fresh rollout episodes per checkpoint ({preset_values('eval_episodes')})")
    a("--train_eval_episodes", type=int, default=0,
      help="rollouts at each evaluation during training (default: 0, model_best by the offline criterion)")
    a("--jobs", type=int, help=f"training runs at a time ({preset_values('jobs')})")
    a("--threads", type=int, default=1, help="threads per run, OMP_NUM_THREADS (default: 1)")
    a("--device", default="cpu", help="--device of the training runs (default: cpu); rollouts run on the cpu")
    a("--extra", default="", help="extra flags for main_multimodal.py, both algorithms, in quotes "
                                  "(one flag alone as --extra=--no_noise)")
    a("--lapo_extra", default="", help="extra flags for main_multimodal.py, LAPO only, in quotes")
    a("--out", help="results folder (default: bench_out/suite_{preset})")
    a("--delete_scored", action=argparse.BooleanOptionalAction, default=True,
      help="delete each model_{step}.pth once scored (default: on); model_best and model_final are kept")
    a("--skip_training", action="store_true", help="train nothing: score and report the finished runs in --out")
    a("--retrain", action="store_true", help="train every run again, even one already finished with the same config")
    return p


def plan_runs(args, steps, variants):
    """Every run's folder and command, and which are finished with the config they would get
    now (reused), to train, or (with --skip_training) left out. A bad extra flag fails here."""
    runs, commands, reused, not_ready = {}, [], [], []
    for variant in variants:
        data = ensure_dataset(args.out, variant, args.n_samples, args.image_size, record=not args.skip_training)
        log_dir = os.path.join(args.out, "runs", variant)
        for algo in args.algos:
            flags = shlex.split(args.extra) + (shlex.split(args.lapo_extra) if algo == "lapo" else [])
            for seed in args.seeds:
                exp = run_id(algo, seed, steps, flags)
                train_args = ["--hdf5_path", data, "--algo", algo, "--device", args.device, "--seed", str(seed),
                              "--ExpID", exp, "--log_dir", log_dir, "--max_timesteps", str(steps),
                              "--eval_freq", str(args.score_every), "--save_freq", str(args.score_every),
                              "--eval_episodes", str(args.train_eval_episodes), "--keep_last", "0", "--overwrite",
                              *flags]
                name = f"{variant}_{exp}"
                folder = experiment.experiment_dir(log_dir, exp)
                runs[name] = {"variant": variant, "algo": algo, "seed": seed, "folder": folder, "data": data}
                diffs = config_differences(folder, expected_config(train_args))
                why = "; ".join(diffs[:3]) or "--retrain"
                if not diffs and not args.retrain:
                    reused.append(name)
                elif args.skip_training:
                    not_ready.append((name, why))
                else:
                    if os.path.isdir(folder):
                        print(f"  {name}: training again ({why})")
                    commands.append((name, [sys.executable, os.path.join(ROOT, "main_multimodal.py"), *train_args]))
    for name, _ in not_ready:
        runs.pop(name)
    return runs, commands, reused, not_ready


def selected_variants(args):
    """--variants as given, else the split's variants (the screen's dev split: SCREEN_DEV_VARIANTS)."""
    if args.variants:
        return list(args.variants)
    if args.preset == "screen" and args.split == "dev":
        return list(SCREEN_DEV_VARIANTS)
    return simulator.variant_names(None if args.split == "all" else args.split)


def apply_preset(args):
    """Fill every setting not given on the command line from the named preset."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = apply_preset(build_parser().parse_args(argv))
    args.out = os.path.abspath(args.out or os.path.join(ROOT, "bench_out", f"suite_{args.preset}"))
    steps = max(1, int(round(args.max_timesteps * args.budget_multiplier)))
    variants = selected_variants(args)
    t0 = time.time()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    runs, commands, reused, not_ready = plan_runs(args, steps, variants)
    if reused:
        print(f"  reusing {len(reused)} finished run(s) with the same config; --retrain trains them again")
    if not_ready:
        print("  --skip_training: left out of the report, not finished with this config:\n    "
              + "\n    ".join(f"{name} ({why})" for name, why in not_ready))

    # rollouts: fresh seeds, each variant's references on the same seeds
    seeds = [FRESH_SEED_BASE + i for i in range(args.eval_episodes)]
    sims, references = {}, {}
    for variant in variants:
        data = next((r["data"] for r in runs.values() if r["variant"] == variant), None)
        if data is None:
            continue
        with h5py.File(data) as f:
            sims[variant] = simulator.simulator_from_attrs(dict(f.attrs))
            behaviours = json.loads(f.attrs.get("behaviour_names", "[]"))
        order = ["expert"] + [b for b in behaviours if b not in ("expert", "noisy")] + ["noisy"]
        references[variant] = simulator.reference_returns(*sims[variant], seeds, behaviours=order)

    import torch
    torch.set_num_threads(args.threads)
    scored, failed = {}, []

    def score(name):
        run = runs[name]
        print(f"  scoring {name} on {len(seeds)} episodes", flush=True)
        try:
            scored[name] = score_run(run["folder"], *sims[run["variant"]], seeds, args.delete_scored)
        except Exception as exc:   # one unreadable checkpoint leaves the other runs' report intact
            print(f"  FAILED to score {name}: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)

    train_wall = 0.0
    if commands:
        commands.sort(key=lambda c: runs[c[0]]["algo"] != "lapo")   # the longest runs first
        n_lapo = sum(runs[n]["algo"] == "lapo" for n, _ in commands)
        estimate = estimate_minutes(n_lapo, len(commands) - n_lapo, steps, args.image_size, args.jobs,
                                    steps // args.score_every, args.threads, args.eval_episodes)
        print(f"Training {len(commands)} run(s), {args.jobs} at a time, {steps} steps each: about "
              f"{estimate:.0f} min with scoring (logs in {os.path.join(args.out, 'logs')})", flush=True)
        t_train = time.time()
        for name in run_jobs(commands, args.jobs, args.threads, os.path.join(args.out, "logs"), on_done=score):
            print(f"  FAILED {name}: see {os.path.join(args.out, 'logs', name + '.log')}")
            failed.append(name)
        train_wall = time.time() - t_train
    for name in reused:
        if name not in scored:
            score(name)

    per_run = {}
    for name in scored:
        run = runs[name]
        crit, crit_name, lower_is_better = criterion_by_step(run["folder"])
        summary = summarize_run(scored[name], crit, references[run["variant"]], lower_is_better)
        summary.update(criterion=crit_name, folder=run["folder"], checkpoints=scored[name])
        per_run.setdefault(run["variant"], {}).setdefault(run["algo"], {})[run["seed"]] = summary
    timing = (f"Wall time: {(time.time() - t0) / 60:.1f} min ({len(commands)} run(s) trained in "
              f"{train_wall / 60:.1f} min, {len(reused)} reused).")
    text, report = write_report(args, argv, steps, variants, per_run, references, failed, timing)
    print()
    print(text)
    print(f"\nWrote {os.path.join(args.out, 'suite.md')} and suite.json")
    return 1 if failed else 0


def write_report(args, argv, steps, variants, per_run, references, failed, timing):
    """suite.md (one section per split), suite.json and suite_{split}.png in --out."""
    command = shlex.join(["python", "benchmarks/suite.py", *argv])
    extra_text = (f"; --extra {args.extra!r}" if args.extra else "") + (
        f"; --lapo_extra {args.lapo_extra!r}" if args.lapo_extra else "")
    from algos.algos_vae_multimodal import MultimodalLatent   # torch: imported by now for the rollouts
    selection = (f"the offline criterion (LAPO {MultimodalLatent.offline_criterion[0]}, the latest checkpoint within "
                 f"{MultimodalLatent.offline_criterion_tolerance:.0%} of the best value so far; BC test_action_mse)"
                 if args.train_eval_episodes == 0 else f"{args.train_eval_episodes} rollouts at each evaluation")
    lines = ["# LAPO and BC on the benchmark variants", "",
             f"Command: `{command}`", "",
             f"Setting: preset {args.preset}; {args.n_samples} rows per variant, {args.image_size}x{args.image_size} "
             f"images; {steps} steps per run (main_multimodal.py's defaults otherwise{extra_text}); seeds "
             f"{args.seeds}; a checkpoint every {args.score_every} steps, each rolled out on {args.eval_episodes} "
             f"fresh seeds; model_best chosen in training by {selection}.",
             timing, "",
             "Scores are normalised (0 = noisy operator, 1 = expert, on the same seeds); x ± s = mean ± std over "
             "seeds (ddof=0). peak: each run's best scored checkpoint; spearman: rank correlation over a run's "
             f"checkpoints (n/a below {MIN_CHECKPOINTS_FOR_RANKS}) of the offline criterion (lower error = better) "
             "with the score; picked - peak: model_best's score minus the peak; LAPO - BC: difference of the means.",
             ""]
    report = {"command": command, "settings": {**vars(args), "max_timesteps_run": steps, "variants": variants},
              "eval_seeds": f"{FRESH_SEED_BASE} + i for i < {args.eval_episodes}",
              "spread": "std over seeds, ddof=0; min and max also given",
              "reference_returns": references, "runs": per_run, "splits": {}, "failed": failed}
    for split in simulator.SPLITS:
        in_split = [v for v in variants if simulator.VARIANTS[v]["split"] == split]
        split_variants = [v for v in in_split if v in per_run]
        missing = [v for v in in_split if v not in per_run]
        if missing:
            lines += [f"No finished run of {', '.join(missing)} ({split} split) in {args.out}.", ""]
        if not split_variants:
            continue
        summary, mean = aggregate(per_run, args.algos, split_variants)
        lines += markdown_tables(split, split_variants, args.algos, summary, mean,
                                 data_table(split_variants, references)) + [""]
        png = plot_curves(per_run, split_variants, args.algos, os.path.join(args.out, f"suite_{split}.png"),
                          title=f"{split} split, {steps} steps")
        report["splits"][split] = {"variants": split_variants, "summary": summary, "mean_over_variants": mean,
                                   "plot": png}
    if failed:
        lines.append(f"Failed runs, left out: {', '.join(failed)} (logs in {os.path.join(args.out, 'logs')})")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(text + "\n")
    experiment.write_json_atomic(report, os.path.join(args.out, "suite.json"))
    return text, report


if __name__ == "__main__":
    sys.exit(main())
