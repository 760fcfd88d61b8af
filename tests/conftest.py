"""Shared helpers: tiny datasets written by the tests themselves, and CLI runners."""
import csv
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests run the CLIs on one thread each: tiny models, and CI machines have few cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(autouse=True)
def _drop_checkpoints(tmp_path):
    """A checkpoint holds three ResNet18 trunks and their Adam state (about 0.4 GB): delete
    them after each test so that a test run never fills the disk."""
    yield
    for root, _, files in os.walk(tmp_path):
        for name in files:
            if name.endswith(".pth"):
                os.remove(os.path.join(root, name))


def write_dataset(path, n_rows=60, episode_len=10, joint_dim=16, action_dim=16, image_shape=(16, 16),
                  timeouts=True, seed=0, compression=None, chunks=None, skip=(), override=None, attrs=None):
    """Write a small valid dataset; ``skip`` drops keys, ``override`` replaces arrays by key.

    Episodes of ``episode_len`` rows alternate between ending in a terminal and (when
    ``timeouts``) a timeout; rewards depend on the image content so there is something
    to learn.
    """
    rng = np.random.default_rng(seed)
    h, w = image_shape
    images = {k: rng.integers(0, 256, (n_rows, h, w, 3), dtype=np.uint8)
              for k in ("left_image", "right_image", "global_image")}
    joint = rng.normal(size=(n_rows, joint_dim)).astype(np.float32)
    actions = rng.normal(size=(n_rows, action_dim)).astype(np.float32)
    rewards = (images["global_image"][:, 0, 0, 0] > 127).astype(np.float32)
    terminals = np.zeros(n_rows, bool)
    timeout_flags = np.zeros(n_rows, bool)
    for e, end in enumerate(range(episode_len - 1, n_rows, episode_len)):
        if timeouts and e % 2 == 1:
            timeout_flags[end] = True
        else:
            terminals[end] = True
    if n_rows and not (terminals[-1] or timeout_flags[-1]):
        terminals[-1] = True
    data = {"observations/left_image": images["left_image"], "observations/right_image": images["right_image"],
            "observations/global_image": images["global_image"], "observations/joint": joint,
            "actions": actions, "rewards": rewards, "terminals": terminals}
    if timeouts:
        data["timeouts"] = timeout_flags
    data.update(override or {})
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if key in skip:
                continue
            kw = {}
            if compression and np.ndim(value) >= 1:
                kw["compression"] = compression
            if chunks and np.ndim(value) >= 1:
                kw["chunks"] = (min(chunks, len(value)),) + np.shape(value)[1:]
            f.create_dataset(key, data=value, **kw)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def run_cli(script, *args, cwd=None, timeout=600, env=None):
    """Run one of the project's CLIs in a fresh process; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


TINY_TRAIN = ["--device", "cpu", "--batch_size", "4", "--obs_feature_dim", "32", "--image_feature_dim", "16",
              "--eval_episodes", "2"]


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_dataset(tmp_path / "tiny.hdf5")


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory):
    """A small dataset recorded from the built-in simulator (16 x 16 images)."""
    from algos import simulator
    path = tmp_path_factory.mktemp("sim") / "sim16.hdf5"
    simulator.create_sample_dataset(path, n_samples=300, image_size=(16, 16), seed=1, progress=False)
    return path


def progress_steps(folder):
    """The steps of the rows of a run's progress.csv (none before it exists)."""
    path = os.path.join(folder, "progress.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [int(r["steps"]) for r in csv.DictReader(f)]
