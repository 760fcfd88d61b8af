"""Where a trained policy goes wrong in closed loop.

    python benchmarks/closed_loop.py --data results/sample_data.hdf5 results/Exp0001/multimodal_robot/model_final.pth

Rolls each checkpoint out on the simulator named in the data file's attributes and, at
every state the policy visits, asks the simulator's expert (``reference_policy``) what it
would do there, without acting on it. Prints how far the policy's action is from the
expert's, binned by the distance to the goal the simulator reports (``info["distance"]``)
and split into episodes that succeeded and episodes that failed:

  * for action dims learned as a change of their joint (the joint-target dims): the cosine
    between the policy's and the expert's joint step, and the ratio of their lengths;
  * for the other dims (grippers, 0 open to 1 closed): the fraction of steps where both are
    on the same side of 0.5.

Then it rolls out twice more, executing the expert's joint-target dims instead of the
policy's, and then its other dims: the success of each says which part of the action
the failures come from.

Held-out rows of the data only show how well the policy copies actions on states the
expert visited; a policy drifts into states of its own, and this shows what it does there.
"""
import argparse
import os
import sys

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import simulator  # noqa: E402

FRESH_SEED_BASE = 2_000_000   # as benchmarks/lapo_vs_bc.py: seeds neither training nor the data used
DISTANCE_BINS = (np.inf, 0.5, 0.25, 0.1, 0.0)


def compare_with_expert(agent, name, config, seeds, expert="expert", expert_dims=None):
    """Roll ``agent`` out on one env per seed; returns (per-step records, successes).

    Each record: distance before the step, episode index, cosine and length ratio of the
    policy's joint step against the expert's (nan without joint-target dims), and the
    fraction of the other dims on the expert's side of 0.5 (nan without any).
    ``expert_dims`` ("joint_targets" or "other"): those dims of the executed action are
    the expert's instead of the policy's.
    """
    if expert_dims not in (None, "joint_targets", "other"):
        raise ValueError(f"expert_dims must be None, 'joint_targets' or 'other', got {expert_dims!r}")
    envs = [simulator.make_simulator(name, config) for _ in seeds]
    experts = [env.reference_policy(expert, int(s)) for env, s in zip(envs, seeds)]
    relative = agent.normalization.action_relative.astype(bool)
    other = ~relative
    distance = np.full(len(envs), np.nan)
    records = []

    def step_and_compare(i, obs, action):
        expert_action = np.asarray(experts[i](envs[i]), np.float32)   # asked, never acted on
        policy_step, expert_step = (action - obs["joint"])[relative], (expert_action - obs["joint"])[relative]
        norms = np.linalg.norm(policy_step), np.linalg.norm(expert_step)
        cosine = policy_step @ expert_step / max(norms[0] * norms[1], 1e-12) if relative.any() else np.nan
        ratio = norms[0] / max(norms[1], 1e-12) if relative.any() else np.nan
        agree = np.mean((action[other] > 0.5) == (expert_action[other] > 0.5)) if other.any() else np.nan
        if expert_dims is not None:
            action = np.where(relative if expert_dims == "joint_targets" else other, expert_action, action)
        result = envs[i].step(action)
        info = result[4]
        # the distance before this step: the previous step's report (the first step's for t = 0)
        before = distance[i] if np.isfinite(distance[i]) else info.get("distance", np.nan)
        records.append((before, i, cosine, ratio, agree))
        distance[i] = info.get("distance", np.nan)
        return result

    _, successes, _ = simulator.rollout(envs, agent.act_on_observations, seeds, step=step_and_compare)
    return np.array(records, dtype=np.float64).reshape(-1, 5), successes


def episode_distances(records, n_episodes):
    """Each episode's distance to the goal before its first and before its last step (nan if unreported)."""
    start, end = np.full(n_episodes, np.nan), np.full(n_episodes, np.nan)
    for before, episode in records[:, :2]:
        i = int(episode)
        if np.isnan(start[i]):
            start[i] = before
        end[i] = before
    return start, end


def summary_rows(records, successes):
    """Median cosine and ratio, mean agreement per (distance bin, succeeded/failed)."""
    rows = []
    succeeded = successes[records[:, 1].astype(int)]
    reported = np.isfinite(records[:, 0])
    bins = list(zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:])) if reported.any() else [(None, None)]
    for hi, lo in bins:
        # a simulator that reports no distance gets one row per outcome
        in_bin = (records[:, 0] >= lo) & (records[:, 0] < hi) if hi is not None else ~reported
        for label, mask in (("succeeded", in_bin & succeeded), ("failed", in_bin & ~succeeded)):
            if mask.any():
                part = records[mask]
                bin_label = f"[{lo:g}, {hi:g})" if hi is not None else "not reported"
                rows.append((bin_label, label, int(mask.sum()), float(np.median(part[:, 2])),
                             float(np.median(part[:, 3])), float(np.mean(part[:, 4]))))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="model_*.pth files")
    p.add_argument("--data", required=True, help="the dataset file whose attributes name the simulator")
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        with h5py.File(args.data, "r") as f:
            found = simulator.simulator_from_attrs(dict(f.attrs))
    except OSError as exc:
        sys.exit(f"{args.data}: cannot open ({exc})")
    if found is None:
        sys.exit(f"{args.data}: no '{simulator.SIMULATOR_ATTR}' attribute names a simulator; nothing to roll out")
    name, config = found
    if not hasattr(simulator.make_simulator(name, config), "reference_policy"):
        sys.exit(f"simulator {name!r} has no reference_policy: there is no expert to compare with")
    seeds = list(range(FRESH_SEED_BASE, FRESH_SEED_BASE + args.episodes))
    for path in args.checkpoints:
        try:
            agent = algos.MultimodalAgent.from_checkpoint(path, device=args.device)
        except algos.CheckpointError as exc:
            sys.exit(str(exc))
        try:
            records, successes = compare_with_expert(agent, name, config, seeds)
        except ValueError as exc:   # e.g. images of another size than the checkpoint's
            sys.exit(f"{path}: cannot run on {args.data}'s simulator: {exc}")
        print(f"\n{path} (step {agent.total_it}): success {successes.mean():.2f} over {len(seeds)} episodes")
        print("| distance to goal | episodes | steps | cos(policy step, expert step) | step length ratio | other dims agree |")
        print("|---|---|---|---|---|---|")
        for bin_label, label, n, cosine, ratio, agree in summary_rows(records, successes):
            print(f"| {bin_label} | {label} | {n} | {cosine:.2f} | {ratio:.2f} | {agree:.2f} |")
        start, end = episode_distances(records, len(seeds))
        failed = ~successes & np.isfinite(end)
        if failed.any():
            print(f"failed episodes: median distance to the goal {np.median(start[failed]):.2f} at the start, "
                  f"{np.median(end[failed]):.2f} before the last step (stopped short, or wandered off)")
        with_expert = {dims: compare_with_expert(agent, name, config, seeds, expert_dims=dims)[1].mean()
                       for dims in ("joint_targets", "other")}
        print(f"success with the expert's joint-target dims executed instead of the policy's: "
              f"{with_expert['joint_targets']:.2f}; with its other dims: {with_expert['other']:.2f}")


if __name__ == "__main__":
    main()
