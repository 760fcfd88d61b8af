"""How LAPO's episode filter judges each kind of operator, on training and held-out episodes.

    python benchmarks/episode_judgements.py --data D.hdf5 RUN/model_500.pth RUN/model_3000.pth ...

For each checkpoint, the episode judgement the filter uses (A_episode at an episode's first
row: its return against the bar, with --episode_judge return, or its n-step return against
the critic's value of its start, with critic) of every episode of the file, computed with
that checkpoint exactly as training computes it. Grouped by the
file's operator label (the per-row ``behaviour`` of --create_sample, or an import's
episodes/operator, e.g. robomimic's worse/okay/better) and by whether the
episode is in the training split (the episodes the critic has fitted) or held out (never
seen). A filter that generalises keeps the same operators on both; one that has fitted
its own training episodes drifts on those only. Prints one table per checkpoint: per
behaviour and split, episodes, share judged above 0, the share the run's filter kept at
that step (training episodes; what the CVAE imitated, which with --filter_band also
depends on earlier judgements), mean A_episode and the value the return is judged against
(V at the episodes' first rows, or the bar: mean, 10th and 90th percentile). Starts are drawn alike for
every operator, so V(start) should not depend on who recorded the episode; with
--by_filter_state, a V that is lower at the starts of the episodes the run imitates than at
the same operator's dropped and held-out ones has learnt them from training on them.
"""
import argparse
import json
import os
import sys

import h5py
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import hdf5_format  # noqa: E402
from algos import utils_multimodal as utils  # noqa: E402


def episode_first_rows(buffer, episode_ids):
    """The first usable row of each given episode (where the filter judges it)."""
    rows = torch.cat([buffer.train_rows, buffer.test_rows]).cpu().numpy()
    episode = buffer.episode_of_row[rows]
    first = {}
    for row, ep in sorted(zip(rows.tolist(), episode.tolist())):
        first.setdefault(ep, row)
    return np.array([first[e] for e in episode_ids if e in first]), [e for e in episode_ids if e in first]


@torch.no_grad()
def judge(agent, buffer, episode_ids):
    """A_episode of each episode through the agent's own ``_judge`` (with ``value_folds`` > 1,
    by a V head that never fitted the episode), and the value it is judged against: V at its
    first row from that same head (--episode_judge critic), or the bar (--episode_judge return)."""
    rows, kept_ids = episode_first_rows(buffer, episode_ids)
    if not len(rows):
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    out, values = [], []
    for start in range(0, len(rows), 256):
        first_rows = torch.from_numpy(rows[start:start + 256])
        episode, advantage = agent._judge(first_rows, buffer)
        out.append(advantage)
        if agent.config.episode_judge == "return":   # a bar fixed by the data: the same for every episode
            values.append(torch.full((len(first_rows),), agent._return_bar()))
        else:
            batch = buffer.gather(first_rows)
            feature = agent.encoder(batch.images, batch.joint)
            values.append(agent.critic.v(feature, agent._fold(episode, offset=1)).squeeze(1))
    return np.array(kept_ids), torch.cat(out).float().numpy(), torch.cat(values).numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the dataset the checkpoints were trained on")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--by_filter_state", action="store_true",
                   help="split the training episodes of each behaviour into those the run's filter keeps and "
                        "those it drops: a critic that judges the episodes it imitates differently from those "
                        "it does not (same starts, same operator) shows here")
    args = p.parse_args(argv)
    dataset = hdf5_format.load_dataset(args.data, progress=False)
    with h5py.File(args.data, "r") as f:
        labels = hdf5_format.read_episode_labels(f)
        recorded_order = json.loads(f.attrs.get("behaviour_names", "[]"))
    if "operator" not in labels:
        sys.exit(f"{args.data}: no operator labels (the per-row 'behaviour' key of create_dataset.py --create_sample, "
                 "or episodes/operator of an import)")
    episode_behaviour = np.array(labels["operator"])
    names = recorded_order or sorted(set(labels["operator"]))
    report = {}
    buffer = None
    for path in args.checkpoints:
        ckpt = algos.read_checkpoint(path)
        if buffer is None:
            buffer = utils.MultimodalReplayBuffer(dataset, ckpt["config"], device="cpu",
                                                  normalization=utils.Normalization.from_state_dict(ckpt["normalization"]))
        agent = algos.MultimodalAgent.from_checkpoint(path, device="cpu", replay_buffer=buffer)
        run_kept = (agent.episode_kept.cpu().numpy() if agent.episode_kept is not None
                    else np.ones(buffer.n_episodes, bool))
        train_ids = np.asarray(buffer.train_episode_ids)
        groups = [("train", train_ids)]
        if args.by_filter_state:
            groups = [("train, kept", train_ids[run_kept[train_ids]]),
                      ("train, dropped", train_ids[~run_kept[train_ids]])]
        judged = {split: judge(agent, buffer, list(ids))
                  for split, ids in groups + [("held out", buffer.test_episode_ids)]}
        print(f"\n{path} (step {agent.total_it})")
        print("| behaviour | split | episodes | A_episode > 0 | kept by the run | mean A_episode | mean V(start) "
              "| V(start) 10th / 90th percentile |")
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for split, (judged_ids, advantage, start_value) in judged.items():
            for name in names:
                mask = episode_behaviour[judged_ids] == name
                if not mask.any():
                    continue
                kept = float((advantage[mask] > 0).mean())
                by_run = (float(run_kept[judged_ids[mask]].mean()) if split.startswith("train")
                          else float("nan"))
                print(f"| {name} | {split} | {int(mask.sum())} | {kept:.2f} | {by_run:.2f} | "
                      f"{advantage[mask].mean():+.3f} | {start_value[mask].mean():+.3f} | "
                      f"{np.percentile(start_value[mask], 10):+.2f} / {np.percentile(start_value[mask], 90):+.2f} |")
                rows.append({"behaviour": name, "split": split, "episodes": int(mask.sum()), "kept": kept,
                             "kept_by_run": by_run,
                             "mean_advantage": float(advantage[mask].mean()),
                             "mean_start_value": float(start_value[mask].mean()),
                             "start_value_p10": float(np.percentile(start_value[mask], 10)),
                             "start_value_p90": float(np.percentile(start_value[mask], 90))})
        report[path] = {"step": agent.total_it, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
