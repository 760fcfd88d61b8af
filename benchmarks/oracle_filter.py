"""Diagnostic: LAPO as main_multimodal.py trains it, with an episode filter that knows the truth.

    python benchmarks/oracle_filter.py --keep expert -- --hdf5_path runs/reach_wrong40_8k.hdf5 --seed 0 ...

Everything after ``--`` goes to main_multimodal.py unchanged. The only change: each
training episode's judgement A_episode keeps its value but takes the sign the file's
operator label gives it (positive for the operators named by --keep, negative for the
others), so the CVAE imitates exactly the good operators' episodes, weighted within them
as usual. If a run with this filter still declines, the decline is not the filter's; if it
does not, the filter's judgements are what drifts. With ``--algo bc`` after ``--``, every
batch is drawn from the good operators' rows only: behaviour cloning of exactly the episodes
the oracle keeps, on the same file, split and normalisation (the imitation's ceiling for
LAPO on that file). Needs a file with operator labels
(create_dataset.py --create_sample records them). Not a training mode: a yardstick.
"""
import argparse
import os
import sys

import h5py
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main_multimodal  # noqa: E402
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import hdf5_format  # noqa: E402
from algos import utils_multimodal as utils  # noqa: E402


def main():
    argv = sys.argv[1:]
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", nargs="+", default=["expert"], help="operators whose episodes are kept (default: expert)")
    args = p.parse_args(ours)
    if "--hdf5_path" not in theirs[:-1]:
        sys.exit("oracle_filter.py needs main_multimodal.py's --hdf5_path FILE after '--' (a labelled dataset)")
    path = theirs[theirs.index("--hdf5_path") + 1]
    try:
        with h5py.File(path, "r") as f:
            operators = hdf5_format.read_episode_labels(f).get("operator")
    except OSError as exc:
        sys.exit(f"{path}: cannot read it as HDF5 ({exc})")
    if operators is None:
        sys.exit(f"{path}: no operator labels to build the oracle filter from")
    unknown = set(args.keep) - set(operators)
    if unknown:
        sys.exit(f"{path}: no episodes of operator(s) {sorted(unknown)}; the file has {sorted(set(operators))}")
    good = torch.tensor([name in args.keep for name in operators])
    judge = algos.MultimodalLatent._judge

    def oracle_judge(self, first_rows, buffer=None):
        episode, advantage = judge(self, first_rows, buffer)
        keep = good.to(episode.device)[episode]
        return episode, torch.where(keep, advantage.clamp(min=1e-3), advantage.clamp(max=-1e-3))

    def oracle_batch(self, batch_size):
        return self.replay_buffer.sample(batch_size, with_next=self.needs_next_obs, episode_mask=good,
                                         masked_frac=1.0)

    algos.MultimodalLatent._judge = oracle_judge
    algos.MultimodalBC._sample_batch = oracle_batch
    # the run's train/test split of episodes, drawn from main_multimodal.py's own flags (its
    # --help left for the run itself, which prints it after this line)
    split_args, _ = main_multimodal.build_parser().parse_known_args([a for a in theirs if a not in ("-h", "--help")])
    train_ids, _ = utils.split_episodes(len(good), split_args.train_test_split, split_args.seed)
    print(f"oracle filter: keeping {int(good.sum())} of {len(good)} episodes ({', '.join(args.keep)}); "
          f"{int(good[torch.as_tensor(train_ids)].sum())} of the {len(train_ids)} training episodes of seed "
          f"{split_args.seed}")
    sys.exit(main_multimodal.main(theirs))


if __name__ == "__main__":
    main()
