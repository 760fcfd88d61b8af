"""Latency of one action at batch 1: select_action (this repository) against the exported
policy (export_policy.py's .pt2, torch alone; and ONNX in onnxruntime when installed).

    python benchmarks/export_latency.py                      # a policy of the built-in run's sizes (32x32, 16 joints)
    python benchmarks/export_latency.py --checkpoint results/Exp0001/multimodal_robot/policy_best.pth --threads 2

Each is called --warmup times, then timed over --repeats calls on the same random raw
observation (numpy uint8 images and float32 joints in, an action out, conversions
included); prints the median and the 90th percentile in ms and the largest difference
from select_action's action. Weights do not change the time: without --checkpoint a
freshly built policy is timed.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos.export import INPUT_NAMES, export_policy  # noqa: E402


def timed(calls, warmup, repeats):
    """Median and 90th percentile (ms) of each call, the calls taking turns so that a shared
    machine's changing load falls on all of them alike."""
    for _ in range(warmup):
        for call in calls:
            call()
    times = np.zeros((repeats, len(calls)))
    for r in range(repeats):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            times[r, i] = time.perf_counter() - t
    return 1000 * np.median(times, 0), 1000 * np.percentile(times, 90, 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="policy or training checkpoint (default: a fresh policy, 32x32, 16 joints)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    agent = (algos.MultimodalAgent.from_checkpoint(args.checkpoint, device="cpu") if args.checkpoint
             else algos.MultimodalLatent(joint_dim=16, action_dim=16, image_shape=(32, 32), device="cpu"))
    rng = np.random.default_rng(0)
    h, w = agent.image_shape
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    joint = rng.normal(size=agent.joint_dim).astype(np.float32)

    reference = agent.select_action(*images, joint)
    rows = [("select_action (repository)", lambda: agent.select_action(*images, joint))]
    with tempfile.TemporaryDirectory() as tmp:
        export_policy(agent, os.path.join(tmp, "policy.pt2"))
        exported = torch.export.load(os.path.join(tmp, "policy.pt2")).module()

        @torch.no_grad()
        def run_exported():
            return exported(*(torch.from_numpy(x) for x in images), torch.from_numpy(joint)).numpy()
        rows.append(("exported .pt2 (torch alone)", run_exported))
        if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
            import onnxruntime
            export_policy(agent, os.path.join(tmp, "policy.onnx"))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = onnxruntime.InferenceSession(os.path.join(tmp, "policy.onnx"), options)
            feed = dict(zip(INPUT_NAMES, images + [joint]))
            rows.append(("ONNX (onnxruntime)", lambda: session.run(None, feed)[0]))
        medians, p90s = timed([call for _, call in rows], args.warmup, args.repeats)
        diffs = [np.abs(np.asarray(call()) - reference).max() for _, call in rows]
    print(f"{agent.algo} policy, {h}x{w} images, {agent.joint_dim} joints, batch 1, {args.threads} thread(s), "
          f"torch {torch.__version__}, {args.repeats} calls each (taking turns) after {args.warmup}")
    print(f"{'':30s} {'median ms':>10s} {'p90 ms':>8s} {'max |a - select_action|':>24s}")
    for (name, _), median, p90, diff in zip(rows, medians, p90s, diffs):
        print(f"{name:30s} {median:10.2f} {p90:8.2f} {diff:24.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
