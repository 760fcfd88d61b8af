"""The importers (ALOHA / ACT, robomimic, LeRobot v3.0) and --preview, as a user runs them."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

import create_dataset
import main_multimodal
from algos import hdf5_format
from conftest import ENV, ROOT, TINY_TRAIN, run_cli, write_dataset
from importer_inputs import (CAMERA_COLOURS, shade, write_aloha_episode, write_aloha_folder, write_lerobot,
                             write_robomimic)

VIEWS = ("left", "right", "global")


def convert(tmp_path, *flags, out="out.hdf5"):
    res = run_cli("create_dataset.py", *flags, "--output", tmp_path / out, "--image_size", 16, cwd=tmp_path)
    return res, tmp_path / out


def assert_views_show_frames(path, first_frames, tolerance=14):
    """Each view holds its camera's colour at the shade of the recording's frame, row by row."""
    with h5py.File(path) as f:
        for view, name in zip(VIEWS, hdf5_format.IMAGE_KEYS):
            images = f[f"observations/{name}"][:, 8:].astype(float)   # below the darker bar
            channel = int(np.argmax(CAMERA_COLOURS[view]))
            mean = images.mean(axis=(1, 2))
            assert (np.argmax(mean, axis=1) == channel).all(), (view, mean[:3])
            expected = [shade(t) for t in first_frames]
            assert np.abs(mean[:, channel] - expected).max() < tolerance, (view, mean[:, channel], expected)


def assert_refused(res, out, *needles):
    assert res.returncode == 2, res.stdout + res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".tmp-")]


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "jpeg"])
def test_aloha_episodes_convert_with_views_frames_rewards_and_labels(tmp_path, compress):
    folder = write_aloha_folder(tmp_path / "aloha", n_episodes=3, length=6, size=(48, 64), compress=compress)
    res, out = convert(tmp_path, "--from_aloha", folder, "--success_episodes", "0,episode_2.hdf5")
    assert res.returncode == 0, res.stderr
    assert "✓ Dataset format is valid" in res.stdout and "success labelled by --success_episodes" in res.stdout
    summary = hdf5_format.inspect_hdf5(out)
    assert summary.ok and summary.n_rows == 18 and summary.joint_dim == 14 and summary.action_dim == 14
    assert_views_show_frames(out, range(18))
    with h5py.File(out) as f:
        assert f["rewards"][:].nonzero()[0].tolist() == [5, 17]      # sparse: last row of episodes 0 and 2
        assert f["terminals"][:].nonzero()[0].tolist() == [5, 17]
        assert f["timeouts"][:].nonzero()[0].tolist() == [11]        # episode 1: no success
        assert [s.decode() for s in f["episodes/source"][:]] == ["episode_0.hdf5", "episode_1.hdf5", "episode_2.hdf5"]
        assert f["episodes/success"][:].tolist() == [True, False, True]


def test_aloha_480x640_is_resized_with_anti_aliasing(tmp_path):
    path = write_aloha_episode(tmp_path / "episode_0.hdf5", length=2)
    stripes = np.zeros((2, 480, 640, 3), np.uint8)
    stripes[:, :, ::2] = 255   # one-pixel stripes: their average is mid grey, any one sample is black or white
    with h5py.File(path, "r+") as f:
        f["observations/images/cam_high"][...] = stripes
    res, out = convert(tmp_path, "--from_aloha", path)
    assert res.returncode == 0, res.stderr
    with h5py.File(out) as f:
        grey = f["observations/global_image"][:].astype(float)
    assert np.abs(grey - 127.5).max() < 20


def test_aloha_channel_order_flag_swaps_red_and_blue(tmp_path):
    folder = write_aloha_folder(tmp_path / "aloha", n_episodes=1, length=3, size=(32, 32), compress=True)
    res, out = convert(tmp_path, "--from_aloha", folder, "--aloha_channel_order", "bgr")
    assert res.returncode == 0, res.stderr
    with h5py.File(out) as f:
        left = f["observations/left_image"][:, 8:].mean(axis=(0, 1, 2))
    assert np.argmax(left) == 2   # the red camera read as BGR comes out blue


def test_aloha_simulator_camera_mapping_and_joint_keys(tmp_path):
    folder = write_aloha_folder(tmp_path / "sim", n_episodes=2, length=4, size=(24, 32), cameras=("top",), sim=True)
    res, out = convert(tmp_path, "--from_aloha", folder)
    assert_refused(res, out, "episode_0.hdf5", "cam_left_wrist", "it has: top", "--cameras")
    res, out = convert(tmp_path, "--from_aloha", folder, "--cameras", "top", "top", "top",
                       "--joint_keys", "qpos", "qvel")
    assert res.returncode == 0, res.stderr
    summary = hdf5_format.inspect_hdf5(out)
    assert summary.ok and summary.joint_dim == 28 and summary.action_dim == 14
    res, out = convert(tmp_path, "--from_aloha", folder, "--cameras", "top", "top", "top", "--joint_keys", "effort",
                       out="no.hdf5")
    assert_refused(res, out, "observations/effort", "it has: observations/images, observations/qpos")


def test_robomimic_keeps_filter_keys_as_labels_and_its_own_rewards(tmp_path):
    data = write_robomimic(tmp_path / "image.hdf5")
    res, out = convert(tmp_path, "--from_robomimic", data)
    assert res.returncode == 0, res.stderr
    assert "episodes by operator: better 1, okay 2, worse 1" in res.stdout
    assert "the input's own rewards" in res.stdout
    summary = hdf5_format.inspect_hdf5(out)
    assert summary.ok and summary.n_rows == 33 and summary.joint_dim == 9 and summary.action_dim == 7
    assert_views_show_frames(out, range(33))
    with h5py.File(out) as f:
        assert [s.decode() for s in f["episodes/operator"][:]] == ["worse", "okay", "okay", "better"]
        assert f["episodes/filter_keys"][2].decode() == "okay,valid"
        assert f["terminals"][:].nonzero()[0].tolist() == [7, 17, 32]   # demo_2 never succeeds: a timeout
        assert f["timeouts"][:].nonzero()[0].tolist() == [23]
    validate = run_cli("create_dataset.py", "--validate", "--hdf5_path", out)
    assert validate.returncode == 0 and "episodes by operator: better 1, okay 2, worse 1" in validate.stdout
    # a labelling flag overrides the file's rewards
    res, out = convert(tmp_path, "--from_robomimic", data, "--success_episodes", "all", out="all.hdf5")
    with h5py.File(out) as f:
        assert f["terminals"][:].sum() == 4 and f["rewards"][:].sum() == 4
    listed = tmp_path / "successes.txt"
    listed.write_text("demo_1\n3\n")
    res, out = convert(tmp_path, "--from_robomimic", data, "--success_episodes", listed, out="listed.hdf5")
    with h5py.File(out) as f:
        assert f["episodes/success"][:].tolist() == [False, True, False, True]
        assert f["rewards"][:].nonzero()[0].tolist() == [17, 32]


def test_robomimic_bad_mapping_names_the_file_key_and_what_it_has(tmp_path):
    data = write_robomimic(tmp_path / "image.hdf5")
    res, out = convert(tmp_path, "--from_robomimic", data, "--cameras", "agentview_image", "wrist", "agentview_image")
    assert_refused(res, out, str(data), "data/demo_0/obs/wrist", "data/demo_0/obs/robot0_eef_pos")
    res, out = convert(tmp_path, "--from_robomimic", data, "--success_episodes", "demo_9")
    assert_refused(res, out, "--success_episodes: demo_9 name no episode")
    res, out = convert(tmp_path, "--from_robomimic", tmp_path / "missing.hdf5")
    assert_refused(res, out, "missing.hdf5: no such file")
    with h5py.File(data, "r+") as f:
        f["data/demo_1/obs/robot0_joint_pos"][3, 0] = np.nan
    res, out = convert(tmp_path, "--from_robomimic", data)
    assert_refused(res, out, "does not validate", "observations/joint: contains NaN or Inf in 1 row(s) (first at row 11)")


@pytest.mark.parametrize("image_cameras", [(), ("observation.images.cam_right_wrist",)], ids=["videos", "images"])
def test_lerobot_v3_episodes_are_found_in_shared_files_by_from_timestamp(tmp_path, image_cameras):
    pytest.importorskip("av")
    root = write_lerobot(tmp_path / "lerobot", lengths=(6, 9, 7), files=((0, 1), (2,)), image_cameras=image_cameras)
    res, out = convert(tmp_path, "--from_lerobot", root, "--cameras", "cam_left_wrist", "cam_right_wrist", "cam_high")
    assert res.returncode == 0, res.stderr
    summary = hdf5_format.inspect_hdf5(out)
    assert summary.ok and summary.n_rows == 22 and summary.joint_dim == 14
    assert_views_show_frames(out, range(22), tolerance=20)
    with h5py.File(out) as f:
        assert f["timeouts"][:].nonzero()[0].tolist() == [14]   # episode 1's reward stays 0
        assert [s.decode() for s in f["episodes/source"][:]] == ["episode_0", "episode_1", "episode_2"]


def test_lerobot_older_version_and_missing_packages_are_refused_clearly(tmp_path, monkeypatch, capsys):
    pytest.importorskip("av")
    root = write_lerobot(tmp_path / "old", lengths=(3,), files=((0,),), size=(16, 16), version="v2.1")
    res, out = convert(tmp_path, "--from_lerobot", root)
    assert_refused(res, out, "codebase_version v2.1", "convert_dataset_v21_to_v30")
    monkeypatch.setitem(sys.modules, "av", None)   # as if PyAV were not installed
    code = create_dataset.main(["--from_lerobot", str(root), "--output", str(tmp_path / "x.hdf5")])
    assert code == 2 and "pip install pyarrow av" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["aloha", "robomimic", "lerobot"])
def test_converted_files_train(tmp_path, fmt):
    if fmt == "aloha":
        source = ["--from_aloha", write_aloha_folder(tmp_path / "a", n_episodes=4, length=8, size=(24, 32),
                                                     compress=True), "--success_episodes", "0,1"]
    elif fmt == "robomimic":
        source = ["--from_robomimic", write_robomimic(tmp_path / "r.hdf5")]
    else:
        pytest.importorskip("av")
        source = ["--from_lerobot", write_lerobot(tmp_path / "l", lengths=(6, 9, 7, 8), files=((0, 1), (2, 3)))]
    res, out = convert(tmp_path, *source)
    assert res.returncode == 0, res.stderr
    code = main_multimodal.main(["--hdf5_path", str(out), "--log_dir", str(tmp_path / "results"), "--ExpID", fmt,
                                 *TINY_TRAIN, "--max_timesteps", "2", "--eval_freq", "2"])
    assert code == 0
    assert os.path.exists(tmp_path / "results" / f"Exp{fmt}" / "multimodal_robot" / "model_final.pth")


def test_preview_sheet_shows_the_three_views_and_statistics_per_label(tmp_path):
    data = write_robomimic(tmp_path / "image.hdf5", size=(32, 32))
    res, out = convert(tmp_path, "--from_robomimic", data)
    assert res.returncode == 0, res.stderr
    sheet = tmp_path / "sheet.png"
    shown = run_cli("create_dataset.py", "--preview", "--hdf5_path", out, "--out", sheet)
    assert shown.returncode == 0, shown.stderr
    assert "operator=okay" in shown.stdout and "  all " in shown.stdout
    lines = {line.split()[0]: line.split() for line in shown.stdout.splitlines() if line.startswith("  ")}
    assert lines["all"][1] == "4" and lines["operator=okay"][1] == "2" and lines["all"][-1] == "75%"
    pixels = np.asarray(Image.open(sheet).convert("RGB")).reshape(-1, 3).astype(int)
    for view in VIEWS:   # the sheet shows each camera's colour
        channel = int(np.argmax(CAMERA_COLOURS[view]))
        others = [c for c in range(3) if c != channel]
        assert ((pixels[:, channel] > 100) & (pixels[:, others] < 40).all(axis=1)).sum() > 200, view
    bad = write_dataset(tmp_path / "bad.hdf5", skip=("rewards",))
    refused = run_cli("create_dataset.py", "--preview", "--hdf5_path", bad)
    assert refused.returncode == 2 and "rewards: missing" in refused.stderr


def test_episode_table_that_disagrees_with_the_episode_ends_is_a_problem(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=60, episode_len=10)
    with h5py.File(path, "r+") as f:
        f["episodes/length"] = np.array([10, 10, 40])
    problems = hdf5_format.inspect_hdf5(path).problems
    assert any("episodes/length: 3 episode(s)" in p and "delimit 6 episode(s)" in p for p in problems), problems


def test_a_failed_or_interrupted_conversion_leaves_no_output(tmp_path):
    folder = write_aloha_folder(tmp_path / "aloha", n_episodes=3, length=4, size=(24, 32), compress=True)
    with h5py.File(folder / "episode_2.hdf5", "r+") as f:   # the last episode's frames are not JPEGs
        f["observations/images/cam_high"][...] = 7
    res, out = convert(tmp_path, "--from_aloha", folder)
    assert_refused(res, out, "episode_2.hdf5", "observations/images/cam_high", "not a JPEG")
    whole = (folder / "episode_1.hdf5").read_bytes()
    (folder / "episode_1.hdf5").write_bytes(whole[: len(whole) // 2])   # a copy cut short
    res, out = convert(tmp_path, "--from_aloha", folder)
    assert_refused(res, out, "episode_1.hdf5: not a readable HDF5 file")

    big = tmp_path / "big"   # one episode linked 300 times: a conversion of several seconds
    write_aloha_folder(big, n_episodes=1, length=25, size=(120, 160))
    for e in range(1, 300):
        os.link(big / "episode_0.hdf5", big / f"episode_{e}.hdf5")
    out = tmp_path / "killed.hdf5"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "create_dataset.py"), "--from_aloha", str(big),
                             "--output", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    deadline = time.time() + 60
    while not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)   # into the conversion
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: nothing was written" in err and "Traceback" not in err
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
