"""Diagnostic: how much of each joint's spread is its episode's start, not its motion.

    python benchmarks/joint_tags.py --data runs/reach_long_short.hdf5 [--observation joint]

For each dimension of the joint vector: its standard deviation over the episodes' first
rows, divided by its standard deviation over all rows (the scale training's normalisation
divides by). Near or above 1, the dimension moves within an episode by less than its start
differs between episodes: after normalisation it is mostly a tag of the episode, which
heads trained on few episodes can imitate from instead of reading the task from the images
(`--joint_noise`, docs/experiments/2026-12-08.md). 0 for a dimension that starts the same
everywhere.
"""
import argparse
import os
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos.hdf5_format import episode_ends, episode_first_rows  # noqa: E402


def start_spread(joint, ends):
    """Per dimension: std over the episodes' first rows / std over all rows (0 where constant)."""
    overall = joint.std(0)
    return np.divide(joint[episode_first_rows(ends)].std(0), overall, out=np.zeros_like(overall), where=overall > 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--observation", default="joint", help="the observations/ key of the joint vector")
    args = p.parse_args(argv)
    key = f"observations/{args.observation}"
    try:
        with h5py.File(args.data, "r") as f:
            if key not in f:
                sys.exit(f"{args.data}: no '{key}' dataset")
            joint = np.asarray(f[key][:], dtype=np.float64)
            ends = episode_ends(f)
    except OSError as exc:
        sys.exit(f"{args.data}: cannot read it as HDF5 ({exc})")
    spread = start_spread(joint, ends)
    print(f"{args.data}: {int(ends.sum())} episodes, {len(joint)} rows")
    print("| dimension | std over all rows | start spread / that std |")
    print("|---|---|---|")
    for d, (std, ratio) in enumerate(zip(joint.std(0), spread)):
        print(f"| {d} | {std:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
