"""Dataset tool: record a mixed-quality sample dataset, or validate your own HDF5 file.

    python create_dataset.py --create_sample --output sample_data.hdf5 --n_samples 5000
    python create_dataset.py --validate --hdf5_path your_data.hdf5
"""
import argparse
import sys

from algos import simulator
from algos.hdf5_format import format_validation_report, inspect_hdf5


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--create_sample", action="store_true",
                      help="record a mixed-quality dataset from the built-in dual-arm simulator")
    mode.add_argument("--validate", action="store_true", help="check a dataset file and print its structure")
    p.add_argument("--hdf5_path", help="file to validate")
    p.add_argument("--output", default="sample_data.hdf5", help="file to create (default: sample_data.hdf5)")
    p.add_argument("--n_samples", type=int, default=5000, help="transitions to record (default: 5000)")
    p.add_argument("--image_size", type=int, nargs="+", default=[84], metavar="N",
                   help="image size: N for N x N, or H W (default: 84)")
    p.add_argument("--mix", default="expert=0.333,wrong=0.333,noisy=0.334",
                   help="share of episodes per behaviour: expert (reaches the red box), wrong (a confident "
                        "operator who reaches the blue box) and noisy (random play)")
    p.add_argument("--max_episode_steps", type=int, default=50, help="time limit of an episode (default: 50)")
    p.add_argument("--reward", choices=("dense", "sparse"), default="dense",
                   help="dense: progress toward the handles + 1 on success; sparse: 1 on success only")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.validate:
        if not args.hdf5_path:
            parser.error("--validate needs --hdf5_path FILE")
        summary = inspect_hdf5(args.hdf5_path)
        print(format_validation_report(summary))
        return 0 if summary.ok else 1

    if args.n_samples < 2:
        parser.error(f"--n_samples must be at least 2, got {args.n_samples}")
    if len(args.image_size) not in (1, 2) or min(args.image_size) < 8:
        parser.error("--image_size takes N or H W, each at least 8")
    if args.max_episode_steps < 1:
        parser.error("--max_episode_steps must be positive")
    try:
        mix = simulator.parse_mix(args.mix)
    except ValueError as exc:
        parser.error(str(exc))
    size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
    info = simulator.create_sample_dataset(args.output, args.n_samples, tuple(size), mix, args.seed,
                                           args.max_episode_steps, args.reward)
    per = ", ".join(f"{k}: {v}" for k, v in info["episodes_per_behaviour"].items())
    print(f"✓ Wrote {args.output}: {args.n_samples} transitions, {info['episodes']} episodes ({per}), "
          f"{size[0]}x{size[1]} images, simulator '{simulator.DualArmReach.name}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
