"""A trained policy as a file that runs with torch alone: no copy of this repository, no flags.

    policy = torch.export.load("policy.pt2").module()
    action = policy(left, right, global_, joint)

``left``, ``right``, ``global_``: one observation's raw uint8 camera images, H x W x 3 torch
tensors as recorded; ``joint``: its raw float32 joint vector [J]; ``action``: the raw action
[A], in the robot's units, as ``select_action`` returns it. The file is a torch.export
program (``.pt2``): the graph of the networks the policy acts through, their weights in
float32, and the normalisation of joints and actions as constants, so the robot computer
needs neither this code nor the training checkpoint. With ``.onnx`` the same graph is
written as ONNX (needs the onnx and onnxscript packages; runs with onnxruntime).
"""
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from algos.experiment import UserError, atomic_write
from algos.hdf5_format import IMAGE_KEYS

INPUT_NAMES = ("left_image", "right_image", "global_image", "joint")
FORMATS = (".pt2", ".onnx")


class DeployedPolicy(nn.Module):
    """Raw observation -> raw action through the agent's own ``_act`` (the networks a policy
    file holds), with the joint and action normalisation of ``select_action`` in torch."""

    def __init__(self, agent):
        super().__init__()
        # registered here, so export sees the parameters ``_act`` reads as this module's own
        self.acting = nn.ModuleList(agent._acting_modules().values())
        self.act = agent._act
        normalization = agent.normalization
        for name in ("joint_mean", "joint_std", "action_mean", "action_std", "action_relative"):
            self.register_buffer(name, torch.as_tensor(np.asarray(getattr(normalization, name), np.float32)))
        self.relative = bool(normalization.action_relative.any())   # else widths may differ

    def forward(self, left_image, right_image, global_image, joint):
        images = torch.stack([left_image, right_image, global_image]).unsqueeze(0)   # [1, 3 views, H, W, 3]
        joint = joint.float().unsqueeze(0)
        action = self.act(images, (joint - self.joint_mean) / self.joint_std).float()
        action = action * self.action_std + self.action_mean
        if self.relative:
            action = action + self.action_relative * joint
        return action[0]


def example_inputs(agent):
    """One observation of the shapes the agent was trained on (zeros)."""
    h, w = agent.image_shape
    image = torch.zeros(h, w, 3, dtype=torch.uint8)
    return image, image.clone(), image.clone(), torch.zeros(agent.joint_dim)


def export_policy(agent, path):
    """Write the agent's policy to ``path`` (.pt2: torch.export; .onnx: ONNX), atomically."""
    kind = os.path.splitext(path)[1].lower()
    if kind not in FORMATS:
        raise UserError(f"--output {path}: give a file name ending in {' or '.join(FORMATS)}")
    policy = DeployedPolicy(agent).to("cpu").eval()
    inputs = example_inputs(agent)
    with torch.no_grad():
        if kind == ".pt2":
            program = torch.export.export(policy, inputs)
            with atomic_write(path) as f, warnings.catch_warnings():
                # the trunks' weights stay channels_last (about twice as fast on a CPU at batch 1);
                # saving them warns about "slices" of storage, harmless on a CPU; loading is silent
                warnings.filterwarnings("ignore", message="No complete tensor found in the group")
                torch.export.save(program, f)
        else:
            missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
            if missing:
                raise UserError(f"--output {path}: ONNX export needs {' and '.join(missing)} "
                                f"(pip install {' '.join(missing)}); a .pt2 file needs torch alone")
            program = torch.onnx.export(policy, inputs, dynamo=True, input_names=list(INPUT_NAMES),
                                        output_names=["action"], verbose=False)
            with atomic_write(path) as f:
                f.write(program.model_proto.SerializeToString())
    return path


def _importable(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


assert len(INPUT_NAMES) == len(IMAGE_KEYS) + 1
