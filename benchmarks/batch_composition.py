"""Diagnostic: which operators' rows the episode filter's training batches hold, before any training.

    python benchmarks/batch_composition.py --data runs/reach_hesitant.hdf5 [--seed 0] [--batches 50] \
        [--set kept_batch_frac=0.5 ...]

Builds a LAPO agent on the file with main_multimodal.py's defaults (and any --set
overrides, as the training flags would), draws --batches batches of --batch_size the way
training's first step does (the filter judges first), and prints per operator label the
kept training episodes and the share of the drawn rows. With the default return bar the
filter's judgement is fixed by the data, so this is what every step of a run draws from;
with --episode_judge critic it is only the first step's. The episode labels are
create_dataset.py's (or an import's) ``operator``.
"""
import argparse
import ast
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import config as config_lib, hdf5_format, utils_multimodal as utils  # noqa: E402


def setting(text):
    """key=value, the value read as a Python literal where it is one (0.5, True), else as text."""
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=0, help="the run's seed (its train/test split of episodes)")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting other than its default, e.g. kept_batch_frac=0.5")
    args = p.parse_args(argv)
    try:
        with h5py.File(args.data, "r") as f:
            operators = hdf5_format.read_episode_labels(f).get("operator")
    except OSError as exc:
        sys.exit(f"{args.data}: cannot read it as HDF5 ({exc})")
    if operators is None:
        sys.exit(f"{args.data}: no episodes/operator labels to group the rows by")
    operators = np.asarray(operators)
    settings = dict(args.set)
    try:   # one config for the buffer and the agent, as training builds them
        config = config_lib.replace(config_lib.TrainConfig(), **settings, seed=args.seed, device="cpu")
    except (TypeError, ValueError) as exc:
        sys.exit(f"--set: {exc}")
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(args.data, progress=False), config=config)
    torch.manual_seed(args.seed)
    agent = algos.MultimodalLatent(config=config, replay_buffer=buffer, device="cpu")
    drawn = np.concatenate([agent._sample_batch(args.batch_size).episode.numpy() for _ in range(args.batches)])
    train = np.asarray(buffer.train_episode_ids)
    kept = agent.episode_kept.numpy()[train]
    print(f"{args.data}: {args.batches} batches of {args.batch_size}, seed {args.seed}, "
          f"settings {settings or 'the defaults'}")
    print("| operator | training episodes | kept | share of the drawn rows |")
    print("|---|---|---|---|")
    for name in sorted(set(operators)):
        mine = operators[train] == name
        print(f"| {name} | {mine.sum()} | {(mine & kept).sum()} | {np.mean(operators[drawn] == name):.0%} |")


if __name__ == "__main__":
    main()
