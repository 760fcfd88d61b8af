"""Dataset tool: record a mixed-quality sample dataset, import recordings, validate and preview a file.

    python create_dataset.py --create_sample --output sample_data.hdf5 --n_samples 5000
    python create_dataset.py --list_variants
    python create_dataset.py --create_sample --variant reach_wrong40 --output dev1.hdf5 --image_size 32
    python create_dataset.py --validate --hdf5_path your_data.hdf5
    python create_dataset.py --from_aloha aloha_episodes/ --output aloha.hdf5 --success_episodes all
    python create_dataset.py --from_robomimic image.hdf5 --output can.hdf5 --joint_keys robot0_eef_pos robot0_gripper_qpos
    python create_dataset.py --from_lerobot ~/lerobot_data/aloha_sim --output sim.hdf5
    python create_dataset.py --preview --hdf5_path aloha.hdf5 --out sheet.png
    python create_dataset.py --rechunk --hdf5_path badly_chunked.hdf5 --output data.hdf5

A variant (--variant) is a named benchmark recording: task, reward, episode length and
mix of operators. --task, --mix, --reward and --max_episode_steps given with it replace
the variant's own; the file's attributes name the variant and its split (dev or test).

Chunk layout: --create_sample writes contiguous datasets, the importers and --rechunk
chunks of 64 whole rows, uncompressed: the layouts that training's stream mode
(--data_mode stream) reads in large contiguous slices.
"""
import argparse
import os
import sys

from algos import importers, preview, simulator
from algos.experiment import UserError
from algos.hdf5_format import CHUNK_ROWS, DatasetError, format_validation_report, inspect_hdf5, rechunk

PLAIN_SAMPLE_MIX = "expert=0.333,wrong=0.333,noisy=0.334"   # without --variant or --mix
SAMPLE_OUTPUT = "sample_data.hdf5"                        # --create_sample without --output
IMPORT_FORMATS = ("aloha", "robomimic", "lerobot")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--create_sample", action="store_true",
                      help="record a mixed-quality dataset from a built-in dual-arm simulator")
    mode.add_argument("--validate", action="store_true", help="check a dataset file and print its structure")
    mode.add_argument("--list_variants", action="store_true",
                      help="print the named benchmark variants (split, task, reward, length, mix) and exit")
    mode.add_argument("--from_aloha", nargs="+", metavar="DIR_OR_FILE",
                      help="import ALOHA / ACT episode_*.hdf5 files (a folder of them, or the files)")
    mode.add_argument("--from_robomimic", metavar="FILE", help="import a robomimic HDF5 file (data/demo_*)")
    mode.add_argument("--from_lerobot", metavar="DIR",
                      help="import a local LeRobot v3.0 dataset folder (needs: pip install pyarrow av)")
    mode.add_argument("--preview", action="store_true",
                      help="write a PNG contact sheet of --hdf5_path and print per-episode statistics")
    mode.add_argument("--rechunk", action="store_true",
                      help=f"rewrite --hdf5_path as --output in chunks of {CHUNK_ROWS} whole rows, uncompressed, "
                           "the layout stream-mode training reads fast (a file chunked across images, or in "
                           "huge chunks, reads slowly)")
    p.add_argument("--hdf5_path", help="file to validate, preview or rechunk")
    p.add_argument("--output", default=None, help=f"file to create (--create_sample default: {SAMPLE_OUTPUT})")
    imp = p.add_argument_group("importing (--from_aloha, --from_robomimic, --from_lerobot)")
    imp.add_argument("--cameras", nargs=3, metavar=("LEFT", "RIGHT", "GLOBAL"),
                     help="input cameras for the left wrist, right wrist and global views (a name may repeat). "
                          "Defaults: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in importers.DEFAULT_CAMERAS.items())
                          + f" (ALOHA: the simulator's '{importers.ALOHA_SIM_GLOBAL_CAMERA}' when cam_high is absent)")
    imp.add_argument("--joint_keys", nargs="+", metavar="KEY",
                     help="low-dim keys concatenated, in this order, into the joint vector. Defaults: "
                          + "; ".join(f"{k}: {' '.join(v)}" for k, v in importers.DEFAULT_JOINT_KEYS.items()))
    imp.add_argument("--aloha_channel_order", choices=importers.CHANNEL_ORDERS, default="rgb",
                     help="channel order of ALOHA's stored camera arrays (what cv2.imdecode returns for JPEG "
                          "bytes): rgb, ALOHA's own (default), or bgr; check the colours with --preview")
    imp.add_argument("--success_episodes", metavar="LIST_OR_FILE",
                     help="successful episodes: all, none, indices and ranges (0,3,5-9), sources (episode_3.hdf5, "
                          "demo_12) or a file of them; reward 1 at their last row, terminal there, others end "
                          "in a timeout (default: the input's own rewards, else none)")
    look = p.add_argument_group("--preview")
    look.add_argument("--out", default=None, help="PNG to write (default: the dataset's name with .png)")
    look.add_argument("--preview_episodes", type=int, default=preview.DEFAULT_EPISODES,
                      help=f"episodes on the sheet, evenly spaced (default: {preview.DEFAULT_EPISODES})")
    look.add_argument("--preview_frames", type=int, default=preview.DEFAULT_FRAMES,
                      help=f"frames per episode, evenly spaced (default: {preview.DEFAULT_FRAMES})")
    p.add_argument("--n_samples", type=int, default=5000, help="transitions to record (default: 5000)")
    p.add_argument("--image_size", type=int, nargs="+", default=[84], metavar="N",
                   help="image size: N for N x N, or H W (default: 84)")
    p.add_argument("--variant", choices=list(simulator.VARIANTS),
                   help="record this named benchmark variant (see --list_variants)")
    p.add_argument("--task", choices=sorted(simulator.SIMULATORS),
                   help="simulator: dual_arm_reach (grasp the red box's handles; the default) or dual_arm_carry "
                        "(carry the red box into the teal zone)")
    p.add_argument("--mix", default=None,
                   help="share of episodes per operator, e.g. expert=0.4,wrong=0.4,noisy=0.2. Operators: "
                        + "; ".join(f"{k} ({v})" for k, v in simulator.OPERATOR_DESCRIPTIONS.items())
                        + f". Default: the variant's, else {PLAIN_SAMPLE_MIX}")
    p.add_argument("--max_episode_steps", type=int, default=None,
                   help="time limit of an episode (default: the variant's, else the task's: "
                        + ", ".join(f"{k} {v.default_max_steps}" for k, v in sorted(simulator.SIMULATORS.items()))
                        + ")")
    p.add_argument("--reward", choices=("dense", "sparse"), default=None,
                   help="dense: progress toward done + 1 on success; sparse: 1 on success only "
                        "(default: the variant's, else dense)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.image_size) not in (1, 2) or min(args.image_size) < 8:
        parser.error("--image_size takes N or H W, each at least 8")
    size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
    try:
        return run(parser, args, size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def run(parser, args, size):
    source = next(((fmt, getattr(args, f"from_{fmt}")) for fmt in IMPORT_FORMATS if getattr(args, f"from_{fmt}")), None)
    if source:
        if not args.output:
            parser.error(f"--from_{source[0]} needs --output FILE")
        reader = importers.make_reader(*source, cameras=args.cameras, joint_keys=args.joint_keys,
                                       channel_order=args.aloha_channel_order)
        summary, assumptions = importers.convert(reader, args.output, size, args.success_episodes)
        print(importers.report(summary, assumptions))
        return 0 if summary.ok else 1
    if args.preview:
        if not args.hdf5_path:
            parser.error("--preview needs --hdf5_path FILE")
        out = args.out or os.path.splitext(str(args.hdf5_path))[0] + ".png"
        print(preview.preview(args.hdf5_path, out, args.preview_episodes, args.preview_frames))
        return 0
    if args.rechunk:
        if not args.hdf5_path or not args.output:
            parser.error("--rechunk needs --hdf5_path FILE and --output FILE")
        if os.path.abspath(args.hdf5_path) == os.path.abspath(args.output):
            parser.error("--rechunk: --output must be another file than --hdf5_path")
        try:
            n = rechunk(args.hdf5_path, args.output)
        except DatasetError as exc:
            raise UserError(str(exc)) from None
        print(f"✓ Wrote {args.output}: {n} rows in chunks of {CHUNK_ROWS} rows")
        return 0
    if args.list_variants:
        print("\n".join(simulator.variants_table()))
        return 0
    if args.validate:
        if not args.hdf5_path:
            parser.error("--validate needs --hdf5_path FILE")
        summary = inspect_hdf5(args.hdf5_path)
        print(format_validation_report(summary))
        return 0 if summary.ok else 1

    if args.n_samples < 2:
        parser.error(f"--n_samples must be at least 2, got {args.n_samples}")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        parser.error("--max_episode_steps must be positive")
    try:
        mix = simulator.parse_mix(args.mix) if args.mix is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    args.output = args.output or SAMPLE_OUTPUT
    try:
        if args.variant:
            overrides = {k: v for k, v in (("simulator", args.task), ("mix", mix), ("reward", args.reward),
                                           ("max_steps", args.max_episode_steps)) if v is not None}
            info = simulator.create_variant_dataset(args.output, args.variant, args.n_samples, size, args.seed,
                                                    **overrides)
        else:
            mix = mix or simulator.parse_mix(PLAIN_SAMPLE_MIX)
            info = simulator.create_sample_dataset(args.output, args.n_samples, size, mix, args.seed,
                                                   args.max_episode_steps, args.reward or "dense",
                                                   task=args.task or simulator.DualArmReach.name)
    except ValueError as exc:
        parser.error(str(exc))
    per = ", ".join(f"{k}: {v}" for k, v in info["episodes_per_behaviour"].items())
    variant = f", variant '{args.variant}' ({simulator.VARIANTS[args.variant]['split']})" if args.variant else ""
    print(f"✓ Wrote {args.output}: {args.n_samples} transitions, {info['episodes']} episodes ({per}), "
          f"{size[0]}x{size[1]} images, simulator '{info['simulator']}'{variant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
