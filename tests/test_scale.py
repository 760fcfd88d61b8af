"""Scale-out: stream mode against memory mode, the automatic choice, --rechunk, and
multi-process training under torchrun (gloo on the CPU)."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import ENV, ROOT, TINY_TRAIN, progress_steps, run_cli, write_dataset
from algos import algos_vae_multimodal as algos
from algos import hdf5_format, streaming
from algos import utils_multimodal as utils


def buffers(path, **stream_settings):
    """The memory-mode buffer of a file and its stream-mode buffer (``stream_settings``)."""
    memory = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), seed=3)
    stream = streaming.StreamReplayBuffer(hdf5_format.load_dataset(path, images=False), seed=3,
                                          **{"workers": 1, **stream_settings})
    return memory, stream


def assert_same_batch(a, b):
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


@pytest.fixture
def small_file(tmp_path):
    """400 rows, 20-row episodes, 8x8 images."""
    return write_dataset(tmp_path / "small.hdf5", n_rows=400, episode_len=20, image_shape=(8, 8))


def test_stream_with_the_whole_file_in_its_shuffle_buffer_draws_memory_modes_batches(small_file):
    memory, stream = buffers(small_file, shuffle_rows=10 ** 6)
    mask = torch.zeros(memory.n_episodes, dtype=torch.bool)
    mask[memory.train_episode_ids[::3]] = True   # as the episode filter asks: half the batch from these
    for _ in range(5):
        assert_same_batch(memory.sample(16), stream.sample(16))
        assert_same_batch(memory.sample(16, episode_mask=mask, masked_frac=0.5),
                          stream.sample(16, episode_mask=mask, masked_frac=0.5))
    for a, b in zip(memory.eval_batches(64), stream.eval_batches(64), strict=True):
        assert_same_batch(a, b)
    first = memory.train_episode_first_rows   # what the episode filter judges
    assert_same_batch(memory.gather(first), stream.gather(first))


def test_stream_serves_every_training_row_over_an_epoch_as_memory_mode_does(small_file):
    """A shuffle buffer of two blocks of 40 rows: over an epoch of the stream every training
    row is served, only training rows are, each as the same transition as in memory mode;
    and so on over more epochs (where a block can come round again while it still serves)."""
    memory, stream = buffers(small_file, shuffle_rows=80, block_rows=40)
    assert stream.rotates and stream.n_active == 2
    row_of_joint = {memory.joint[r].numpy().tobytes(): r for r in range(memory.n_rows)}
    served = set()
    n = len(stream.blocks)
    epochs = 30
    # the case that must hold up: a block that ends one epoch and starts the next
    assert any(stream.order.block_at(e * n - 1) == stream.order.block_at(e * n) for e in range(1, epochs))
    for epoch in range(epochs):
        for _ in range(n):
            batch = stream.sample(2000)   # far more draws than a block holds: each call rotates one block
            rows = torch.tensor([row_of_joint[j.numpy().tobytes()] for j in batch.joint])
            assert_same_batch(memory.gather(rows), batch)
            served |= set(rows.tolist())
        assert served == set(memory.train_rows.tolist()), epoch


def test_stream_resumes_with_the_same_batches(small_file):
    _, stream = buffers(small_file, shuffle_rows=80, block_rows=40)
    for _ in range(7):
        stream.sample(32)
    state = stream.rng_state()
    expected = [stream.sample(32) for _ in range(12)]
    _, resumed = buffers(small_file, shuffle_rows=80, block_rows=40)
    resumed.set_rng_state(state)
    for a in expected:
        assert_same_batch(a, resumed.sample(32))


def test_a_stream_mode_run_resumed_from_its_checkpoint_ends_bit_identical(tmp_path, small_file):
    """Killed after its step-3 checkpoint and resumed, a stream-mode run ends where the run that
    was never stopped does: the stream restarts at its position and takes no global randomness."""
    common = ["--hdf5_path", small_file, "--log_dir", tmp_path / "results", *TINY_TRAIN, "--max_timesteps", 6,
              "--eval_freq", 3, "--save_freq", 3, "--data_mode", "stream", "--shuffle_rows", 80, "--seed", 5, "--keep_last", 0]
    one = run_cli("main_multimodal.py", *common, "--ExpID", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    one_folder, two_folder = (tmp_path / "results" / f"Exp{e}" / "multimodal_robot" for e in ("one", "two"))
    two_folder.mkdir(parents=True)
    for name in ("model_3.pth", "params.json", "progress.csv"):
        shutil.copy(one_folder / name, two_folder / name)
    two = run_cli("main_multimodal.py", *common, "--ExpID", "two", "--resume", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert_same_networks(one_folder / "model_final.pth", two_folder / "model_final.pth")


def assert_same_networks(path_a, path_b):
    a, b = (algos.read_checkpoint(p)["networks"] for p in (path_a, path_b))
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)


def test_auto_chooses_memory_when_the_images_fit_and_stream_when_they_do_not():
    assert streaming.choose_data_mode("auto", 10 * 2 ** 30, memory_limit_gb=20) == "memory"
    assert streaming.choose_data_mode("auto", 10 * 2 ** 30, memory_limit_gb=5) == "stream"
    assert streaming.choose_data_mode("auto", 10 * 2 ** 30, memory_limit_gb=15, processes=2) == "stream"
    assert streaming.choose_data_mode("memory", 10 * 2 ** 30, memory_limit_gb=1) == "memory"


def run_params(tmp_path, exp):
    with open(tmp_path / "results" / f"Exp{exp}" / "multimodal_robot" / "params.json") as f:
        return json.load(f)


def test_a_small_memory_limit_trains_in_stream_mode(tmp_path, small_file):
    common = ["--hdf5_path", small_file, "--log_dir", tmp_path / "results", *TINY_TRAIN, "--max_timesteps", 2,
              "--eval_freq", 2, "--save_freq", 2]
    small = run_cli("main_multimodal.py", *common, "--ExpID", "small", "--memory_limit_gb", 1e-4, cwd=tmp_path)
    assert small.returncode == 0, small.stderr[-2000:]
    assert "Stream mode:" in small.stdout
    assert run_params(tmp_path, "small")["dataset"]["data_mode"] == "stream"
    large = run_cli("main_multimodal.py", *common, "--ExpID", "large", "--memory_limit_gb", 1, cwd=tmp_path)
    assert large.returncode == 0, large.stderr[-2000:]
    assert run_params(tmp_path, "large")["dataset"]["data_mode"] == "memory"


def test_rechunk_rewrites_a_file_chunked_across_images(tmp_path, small_file):
    bad = tmp_path / "bad.hdf5"
    with h5py.File(small_file) as src, h5py.File(bad, "w") as dst:
        for key in src:
            src.copy(src[key], dst, key)
        for view in hdf5_format.IMAGE_KEYS:
            data = dst[f"observations/{view}"][:]
            del dst[f"observations/{view}"]
            dst.create_dataset(f"observations/{view}", data=data, chunks=(400, 8, 2, 3), compression="gzip")
    with h5py.File(bad) as f:
        assert "splits each image" in hdf5_format.chunk_layout_problem(f)
    res = run_cli("create_dataset.py", "--rechunk", "--hdf5_path", bad, "--output", tmp_path / "good.hdf5")
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "good.hdf5") as f:
        assert hdf5_format.chunk_layout_problem(f) is None
        assert f["observations/left_image"].chunks == (hdf5_format.CHUNK_ROWS, 8, 8, 3)
    a, b = (hdf5_format.load_dataset(p, progress=False) for p in (bad, tmp_path / "good.hdf5"))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.actions, b.actions)
    same = run_cli("create_dataset.py", "--rechunk", "--hdf5_path", bad, "--output", bad)
    assert same.returncode != 0 and "another file" in same.stderr


# --------------------------------------------------------------------------- torchrun
def torchrun(tmp_path, data, exp, *extra, popen=False):
    """``torchrun --standalone --nproc_per_node=2 main_multimodal.py`` on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "main_multimodal.py"), "--hdf5_path", str(data), "--log_dir", str(tmp_path / "results"),
           "--ExpID", exp, *TINY_TRAIN, *map(str, extra)]
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)


def test_two_processes_under_torchrun_train_one_run_with_identical_parameters(tmp_path, small_file):
    res = torchrun(tmp_path, small_file, "dd", "--max_timesteps", 4, "--eval_freq", 2, "--save_freq", 2,
                   "--data_mode", "stream", "--shuffle_rows", 80)
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.listdir(tmp_path / "results") == ["Expdd"]
    folder = tmp_path / "results" / "Expdd" / "multimodal_robot"
    assert sorted(os.listdir(folder)) == ["model_4.pth", "model_final.pth", "params.json", "policy_best.pth",
                                          "policy_final.pth", "progress.csv", "progress.png"]
    assert progress_steps(folder) == [2, 4]   # one writer: no row twice
    params = run_params(tmp_path, "dd")
    assert params["processes"] == 2 and params["effective_batch_size"] == 8
    assert "Parameters identical on all 2 ranks at step 4" in res.stdout
    assert len(algos.read_checkpoint(folder / "model_final.pth")["extra"]["rng_by_rank"]) == 2


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_once_and_the_resume_is_exact(tmp_path, small_file):
    """SIGTERM to the torchrun job: both ranks stop at the same step, one checkpoint is written
    there, and a resumed run ends bit-identical to a run that was never stopped."""
    # a constant encoder learning rate: the stopped run and the straight one differ in --max_timesteps;
    # an evaluation every step: the stop evaluates, and offline_metrics draws the CVAE's noise
    common = ["--seed", 5, "--eval_freq", 1, "--save_freq", 1000, "--data_mode", "stream", "--shuffle_rows", 80,
              "--encoder_lr_decay", 0]
    folder = tmp_path / "results" / "Expsig" / "multimodal_robot"
    proc = torchrun(tmp_path, small_file, "sig", *common, "--max_timesteps", 1000, popen=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(progress_steps(folder)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert len(progress_steps(folder)) >= 2, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)   # to torchrun, which forwards it to both ranks
    out, err = proc.communicate(timeout=120)
    checkpoints = glob.glob(str(folder / "model_[0-9]*.pth"))
    assert len(checkpoints) == 1, (checkpoints, err[-3000:])
    stopped_at = algos.read_checkpoint(checkpoints[0])["total_it"]
    assert "Parameters identical on all 2 ranks" in out
    end = stopped_at + 3
    resumed = torchrun(tmp_path, small_file, "sig", *common, "--max_timesteps", end, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun(tmp_path, small_file, "straight", *common, "--max_timesteps", end)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_networks(folder / "model_final.pth",
                         tmp_path / "results" / "Expstraight" / "multimodal_robot" / "model_final.pth")
