"""Diagnostic: where an expectile bar over the episodes' returns would sit, next to each operator's returns.

    python benchmarks/return_expectiles.py --data runs/reach_hesitant.hdf5 [--discount 0.99]

The episode filter's default bar (`--episode_judge return`) is the `--judge_expectile` of
the training episodes' discounted returns from their first rows. This prints, from the file
alone, the discounted return of each episode grouped by operator label (mean, 10th and 90th
percentile, max) and the expectiles of all of them, so where a bar would fall can be read
against each operator's returns before training. The last column counts each operator's
episodes that clear the `--judge_expectile` bar over all of the file's episodes (training
computes it over the training episodes only, so its bar differs slightly).
"""
import argparse
import os
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos.hdf5_format import episode_ends, episode_first_rows, read_episode_labels  # noqa: E402
from algos.utils_multimodal import discounted_suffix_sums, expectile  # noqa: E402

EXPECTILES = (0.7, 0.9, 0.95, 0.97, 0.99)


def discounted_returns(f, discount):
    """The discounted return of each episode of an open file, from its first row (to its
    last row, as the default episode filter judges it)."""
    ends = episode_ends(f)
    suffix = discounted_suffix_sums(np.asarray(f["rewards"][:]).reshape(-1), ends, np.zeros_like(ends), discount)
    return suffix[episode_first_rows(ends)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--label", default="operator", help="the episode label to group by")
    p.add_argument("--judge_expectile", type=float, default=0.9,
                   help="the bar whose kept episodes the last column counts (training's default 0.9)")
    args = p.parse_args(argv)
    try:
        with h5py.File(args.data, "r") as f:
            if "rewards" not in f:
                sys.exit(f"{args.data}: no 'rewards' dataset, so no returns to compare")
            returns = discounted_returns(f, args.discount)
            labels = read_episode_labels(f).get(args.label)
    except OSError as exc:
        sys.exit(f"{args.data}: cannot read it as HDF5 ({exc})")
    print(f"{args.data}: {len(returns)} episodes, discounted returns (discount {args.discount})")
    bar = expectile(returns, args.judge_expectile)
    print(f"| operator | episodes | mean | 10th percentile | 90th percentile | max | kept at the {args.judge_expectile} bar |")
    print("|---|---|---|---|---|---|---|")
    groups = {"all": returns} if labels is None else {
        name: returns[np.asarray(labels) == name] for name in sorted(set(labels))}
    for name, values in groups.items():
        print(f"| {name} | {len(values)} | {values.mean():.2f} | {np.percentile(values, 10):.2f} | "
              f"{np.percentile(values, 90):.2f} | {values.max():.2f} | {int((values >= bar).sum())} |")
    print("expectiles of all episodes' returns: "
          + ", ".join(f"{tau}: {expectile(returns, tau):.2f}" for tau in EXPECTILES))


if __name__ == "__main__":
    main()
