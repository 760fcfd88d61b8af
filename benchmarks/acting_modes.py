"""Which part of a LAPO policy carries its score: roll each checkpoint out acting three ways.

    python benchmarks/acting_modes.py --data D.hdf5 RUN/model_500.pth RUN/model_3000.pth ... [--episodes 20]

Modes, all on the same rollout seeds as training's evaluation (simulator.EVAL_SEED_BASE):
  deployed   the policy as trained runs act: averaged encoder, averaged latent actor, averaged decoder;
  cvae_mode  the averaged decoder at z = 0, the mode of the advantage-weighted CVAE alone
             (what the filtered, weighted imitation learned, without the latent actor's choice);
  online     the online encoder, latent actor and decoder (no Polyak averages).
If the deployed score falls with training while cvae_mode holds, the latent actor is what
leaves the good behaviour; if both fall, the weighted imitation itself does.
Prints normalised scores (0 = noisy operator, 1 = expert) per checkpoint and mode.
"""
import argparse
import os
import sys

import h5py
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import simulator  # noqa: E402


def acting_function(agent, mode):
    """``agent._act`` replacement for ``mode`` (see the module docstring)."""
    if mode == "deployed":
        return agent._act
    if mode == "cvae_mode":
        def act(images, joint):
            feature = agent.encoder_target(images, joint)
            z = torch.zeros(feature.shape[0], agent.actor_vae.latent_dim, device=feature.device)
            return agent.actor_vae_target.decode(feature, z)
        return act
    if mode == "online":
        def act(images, joint):
            feature = agent.encoder(images, joint)
            return agent.actor_vae.decode(feature, agent.actor(feature))
        return act
    raise ValueError(mode)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the dataset the checkpoints were trained on (names the simulator)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--modes", default="deployed,cvae_mode,online")
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    with h5py.File(args.data, "r") as f:
        attrs = dict(f.attrs)
    sim_name, sim_config = simulator.simulator_from_attrs(attrs)
    seeds = [simulator.EVAL_SEED_BASE + i for i in range(args.episodes)]
    references = simulator.reference_returns(sim_name, sim_config, seeds)
    envs = [simulator.make_simulator(sim_name, sim_config) for _ in seeds]
    modes = args.modes.split(",")
    print("| checkpoint | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for path in args.checkpoints:
        agent = algos.MultimodalAgent.from_checkpoint(path, device="cpu")
        cells = []
        for mode in modes:
            agent._act = acting_function(agent, mode)
            returns, _, _ = simulator.rollout(envs, agent.act_on_observations, seeds)
            cells.append(f"{simulator.normalized_score(float(returns.mean()), references):.2f}")
        print(f"| {os.path.basename(path)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
