"""Watch a trained policy act: roll it out in a simulator, print how well it does, film it.

    python eval_policy.py --checkpoint results/Exp0001/multimodal_robot/policy_best.pth --episodes 20
    python eval_policy.py --checkpoint results/Exp0001/multimodal_robot/policy_best.pth --episodes 10 --video best.gif

--checkpoint takes a policy file or a training checkpoint. The simulator is the one the run
evaluated in (recorded in its checkpoints), else the one its dataset's attributes name, else
--simulator. Episodes run on the seeds training evaluates on (1000000 + i), so --episodes 10
repeats progress.csv's row of the checkpoint's step: exactly for a training checkpoint; for a
policy file within the evaluation's noise, since its float16 weights can turn an episode
another way. The video (.gif, or .mp4 with PyAV installed) shows the three
camera views side by side, left wrist | right wrist | global, for the first --video_episodes
episodes, one after another.
"""
import argparse
import json
import os
import sys

import h5py
import numpy as np

from algos import algos_vae_multimodal as algos
from algos import outputs, simulator
from algos.experiment import UserError
from algos.hdf5_format import IMAGE_KEYS

PAUSE_FRAMES = 5   # the last frame of an episode is held this many frames


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="policy_best.pth, policy_final.pth or a training checkpoint")
    p.add_argument("--episodes", type=int, default=10, help="episodes to roll out (default: 10)")
    p.add_argument("--video", metavar="PATH", help="write a video of the first episodes: .gif, or .mp4 (needs PyAV)")
    p.add_argument("--video_episodes", type=int, default=2, help="episodes in the video (default: 2)")
    p.add_argument("--fps", type=int, default=10, help="video frames per second, one per step (default: 10)")
    p.add_argument("--simulator", help="a registered name or package.module:Class (default: the run's own)")
    p.add_argument("--simulator_config", type=json.loads, default=None, metavar="JSON",
                   help="its settings as JSON, e.g. '{\"image_size\": [32, 32]}' (default: the run's own for its "
                        "simulator, else none)")
    return p


def run_simulator(ckpt, args):
    """(name, config) of the simulator to roll out in: --simulator, the run's, or its dataset's."""
    recorded = ckpt["extra"].get("simulator")
    if recorded is None and ckpt["config"].hdf5_path and os.path.isfile(ckpt["config"].hdf5_path):
        with h5py.File(ckpt["config"].hdf5_path, "r") as f:
            found = simulator.simulator_from_attrs(dict(f.attrs))
        recorded = found and {"name": found[0], "config": found[1]}
    if args.simulator:
        same = recorded and recorded["name"] == args.simulator
        return args.simulator, args.simulator_config or (recorded["config"] if same else {})
    if recorded is None:
        raise UserError(f"{args.checkpoint}: the run evaluated in no simulator and its dataset names none; "
                        "give --simulator (and --simulator_config)")
    return recorded["name"], recorded["config"] if args.simulator_config is None else args.simulator_config


class Film:
    """``rollout``'s step hook: steps the envs and keeps the frames of the first ``n`` episodes."""

    def __init__(self, envs, n):
        self.envs = envs
        self.episodes = [[] for _ in range(min(n, len(envs)))]
        self.returns = np.zeros(len(self.episodes))

    def step(self, i, obs, action):
        result = self.envs[i].step(action)
        if i < len(self.episodes):
            frames = self.episodes[i]
            if not frames:
                frames.append(self.frame(i, obs, 0, ""))
            next_obs, reward, terminated, truncated, info = result
            self.returns[i] += reward
            end = ""
            if terminated or truncated:
                end = "  success" if info.get("success", terminated) else "  no success"
            frames.append(self.frame(i, next_obs, len(frames), end))
            if end:
                frames.extend([frames[-1]] * PAUSE_FRAMES)
        return result

    def frame(self, i, obs, t, end):
        caption = f"episode {i + 1}  step {t}  return {self.returns[i]:.2f}{end}"
        return outputs.views_side_by_side(obs, IMAGE_KEYS, caption)

    def frames(self):
        return [f for episode in self.episodes for f in episode]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.episodes < 1 or args.video_episodes < 0 or args.fps < 1:
            raise UserError("--episodes and --fps must be >= 1, --video_episodes >= 0")
        ckpt = algos.read_checkpoint(args.checkpoint)
        agent = algos.MultimodalAgent.from_checkpoint(args.checkpoint)
        name, config = run_simulator(ckpt, args)
        try:
            evaluator = simulator.RolloutEvaluator(name, config, args.episodes)
        except (ValueError, TypeError) as exc:
            raise UserError(f"simulator {name!r}: {exc}") from None
        film = Film(evaluator.envs, args.video_episodes if args.video else 0)
        try:
            scores = evaluator(agent, step=film.step)
        except ValueError as exc:   # e.g. the simulator renders images of another size
            raise UserError(f"{args.checkpoint} cannot act in {name} {config}: {exc}") from None
        if args.video and film.episodes:
            outputs.write_video(film.frames(), args.video, args.fps)
    except (UserError, algos.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = evaluator.seeds
    print(f"{args.checkpoint}: {agent.algo} policy at step {agent.total_it}, {args.episodes} episode(s) in {name} "
          f"on seeds {seeds[0]}..{seeds[-1]}")
    score = scores["NormalizedScore"]
    print(f"  score {'n/a (no reference operators)' if score is None else f'{score:.3f}'}"
          f" (0 = the noisy operator, 1 = the expert)")
    print(f"  success rate {scores['SuccessRate']:.2f}")
    print(f"  return {scores['AverageReturn']:.3f} ± {scores['StdReturn']:.3f} (mean ± std over episodes)")
    if args.video and film.episodes:
        print(f"Video: {args.video} ({len(film.frames())} frames at {args.fps} fps, episodes 1-{len(film.episodes)}; "
              "left wrist | right wrist | global)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
