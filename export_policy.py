"""Export a trained policy to one file that a robot computer runs with torch alone.

    python export_policy.py --checkpoint results/Exp0001/multimodal_robot/policy_best.pth --output policy.pt2
    python export_policy.py --checkpoint results/Exp0001/multimodal_robot/model_final.pth --output policy.onnx

On the robot (torch installed, nothing of this repository):

    import torch
    policy = torch.export.load("policy.pt2").module()
    action = policy(left, right, global_, joint)   # H x W x 3 uint8 images, float32 joints [J] -> action [A]

The .pt2 file is a torch.export program: the networks the policy acts through, their
weights (float32) and the normalisation of joints and actions, one observation per call.
It gives select_action's action to within 1e-5 (tests/test_outputs.py checks it in a
process without this repository). .onnx writes the same graph as ONNX (needs onnx and
onnxscript; run it with onnxruntime). --checkpoint takes a policy file or a training
checkpoint of any kind of run (LAPO or BC).
"""
import argparse
import os
import sys

import numpy as np
import torch

from algos import algos_vae_multimodal as algos
from algos.experiment import UserError
from algos.export import export_policy, example_inputs


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="policy_best.pth, policy_final.pth or a training checkpoint")
    p.add_argument("--output", required=True, help="file to write: .pt2 (torch.export) or .onnx")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        agent = algos.MultimodalAgent.from_checkpoint(args.checkpoint, device="cpu")
        export_policy(agent, args.output)
    except (UserError, algos.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    h, w = agent.image_shape
    print(f"Wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB): the {agent.algo} policy of "
          f"{args.checkpoint} at step {agent.total_it}; inputs: three {h}x{w}x3 uint8 images and a float32 joint "
          f"vector [{agent.joint_dim}]; output: the action [{agent.action_dim}]")
    if args.output.endswith(".pt2"):
        # the file as the robot will read it, against select_action on one observation
        policy = torch.export.load(args.output).module()
        inputs = [x + 1 if x.dtype == torch.uint8 else x + 0.1 for x in example_inputs(agent)]
        exported = policy(*inputs).detach().numpy()
        expected = agent.select_action(*(x.numpy() for x in inputs))
        print(f"Check on one observation: max |exported - select_action| = {np.abs(exported - expected).max():.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
