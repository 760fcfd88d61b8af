"""What a run leaves for people: learning curves, TensorBoard events, bounded checkpoints,
policy files, an exported policy that runs without this repository, and videos."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import main_multimodal
from algos import algos_vae_multimodal as algos
from algos import experiment, outputs
from conftest import ENV, TINY_TRAIN, run_cli
from test_agent import SMALL, make_buffer, raw_observation

STEPS = ["--max_timesteps", "6", "--eval_freq", "2", "--save_freq", "2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sim_dataset):
    """One short run on simulator data, --keep_last 1 and --tensorboard; its folder."""
    root = tmp_path_factory.mktemp("run")
    res = run_cli("main_multimodal.py", "--hdf5_path", sim_dataset, "--log_dir", root / "results", "--ExpID", "o",
                  *TINY_TRAIN, *STEPS, "--keep_last", "1", "--tensorboard", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    yield root / "results" / "Expo" / "multimodal_robot"
    for name in os.listdir(root / "results" / "Expo" / "multimodal_robot"):
        if name.endswith(".pth"):   # about 0.7 GB in all
            os.remove(root / "results" / "Expo" / "multimodal_robot" / name)


def progress_rows(folder):
    with open(folder / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_leaves_one_training_checkpoint_two_policy_files_and_its_curves(finished_run):
    assert sorted(os.listdir(finished_run)) == ["model_6.pth", "model_final.pth", "params.json", "policy_best.pth",
                                                "policy_final.pth", "progress.csv", "progress.png", "tensorboard"]
    # model_final is the last step checkpoint under a second name, not a second copy on the disk
    assert os.path.samefile(finished_run / "model_6.pth", finished_run / "model_final.pth")
    training = os.path.getsize(finished_run / "model_final.pth")
    for name in ("policy_best.pth", "policy_final.pth"):
        assert os.path.getsize(finished_run / name) <= 0.25 * training, name
    assert (finished_run / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = algos.read_checkpoint(finished_run / "policy_final.pth")
    assert final["kind"] == algos.POLICY and final["total_it"] == 6
    assert final["extra"]["simulator"]["name"] == "dual_arm_reach"
    best = algos.read_checkpoint(finished_run / "policy_best.pth")["extra"]["best"]
    scores = {int(r["steps"]): float(r["NormalizedScore"]) for r in progress_rows(finished_run)}
    assert best["metric"] == "NormalizedScore" and best["value"] == pytest.approx(max(scores.values()), abs=1e-5)


def test_tensorboard_reads_the_progress_rows(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    rows = progress_rows(finished_run)
    for column, tag in (("NormalizedScore", "rollout/NormalizedScore"), ("critic_loss", "train/critic_loss"),
                        ("test_action_mse", "held_out/test_action_mse")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [int(r["steps"]) for r in rows]
        np.testing.assert_allclose([v for _, v in logged], [float(r[column]) for r in rows], rtol=1e-5)


def test_tensorboard_missing_is_a_clear_error_before_anything_is_written(tmp_path, tiny_dataset, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    code = main_multimodal.main(["--hdf5_path", str(tiny_dataset), "--log_dir", str(tmp_path / "r"), "--ExpID", "t",
                                 *TINY_TRAIN, "--max_timesteps", "2", "--tensorboard"])
    assert code == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_plot_shows_rollouts_only_when_the_run_has_a_simulator(tmp_path):
    offline = [{"steps": "2", "AverageReturn": "", "test_action_mse": "0.5", "critic_loss": "2.0"},
               {"steps": "4", "AverageReturn": "", "test_action_mse": "0.4", "critic_loss": "1.5"}]
    panels = outputs.write_progress_plot(offline, tmp_path / "a.png", "offline")
    assert not any("Rollouts" in p for p in panels) and len(panels) == 2
    online = [dict(r, AverageReturn="1.5", StdReturn="0.5", NormalizedScore="0.3", SuccessRate="0.2") for r in offline]
    panels = outputs.write_progress_plot(online, tmp_path / "b.png", "online", best={"step": 4})
    assert sum("Rollouts" in p for p in panels) == 2 and len(panels) == 4
    assert (tmp_path / "b.png").stat().st_size > 0


def test_keep_last_deletes_only_older_step_checkpoints_of_this_branch(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"model_{step}.pth").write_bytes(b"x")
    (tmp_path / "model_final.pth").write_bytes(b"x")
    # a run continued from step 6 has just saved model_6: model_8 and model_10 are another branch's
    experiment.prune_step_checkpoints(tmp_path, 2, 6)
    assert sorted(os.listdir(tmp_path)) == ["model_10.pth", "model_4.pth", "model_6.pth", "model_8.pth",
                                            "model_final.pth"]
    experiment.prune_step_checkpoints(tmp_path, 0, 10)   # 0: keep all
    assert len(os.listdir(tmp_path)) == 5


@pytest.mark.parametrize("algo, settings", [("lapo", {}), ("lapo", {"original_lapo": True}), ("bc", {})])
def test_a_policy_file_acts_like_its_training_agent_and_cannot_train(tiny_dataset, tmp_path, algo, settings):
    torch.manual_seed(0)
    agent = algos.make_agent(algo=algo, replay_buffer=make_buffer(tiny_dataset, **settings), **SMALL, **settings)
    agent.train(3, 8)
    with torch.no_grad():   # the policy file's float16, so that its actions must match exactly
        for module in agent._acting_modules().values():
            for p in module.parameters():
                p.copy_(p.to(algos.POLICY_WEIGHTS_DTYPE))
    path = agent.save("policy_final", str(tmp_path), policy_only=True)
    imgs, joint = raw_observation(np.random.default_rng(1), 4)
    loaded = algos.MultimodalAgent.from_checkpoint(path)
    np.testing.assert_allclose(loaded.select_action(*imgs, joint), agent.select_action(*imgs, joint), atol=1e-6)
    reloaded = type(agent)(**SMALL)
    reloaded.load("policy_final", str(tmp_path))
    np.testing.assert_allclose(reloaded.select_action(*imgs, joint), agent.select_action(*imgs, joint), atol=1e-6)
    assert loaded.total_it == 3
    loaded.replay_buffer = agent.replay_buffer
    with pytest.raises(RuntimeError, match="policy file"):
        loaded.train(1, 4)


def test_a_policy_file_cannot_be_trained_on(tmp_path, tiny_dataset, finished_run, capsys):
    code = main_multimodal.main(["--hdf5_path", str(tiny_dataset), "--log_dir", str(tmp_path / "r"), "--ExpID", "p",
                                 *TINY_TRAIN, "--max_timesteps", "8", "--load_model",
                                 str(finished_run / "policy_final.pth")])
    assert code == 2
    assert "is a policy file" in capsys.readouterr().err


def observations(agent, n, seed=3):
    imgs, joint = raw_observation(np.random.default_rng(seed), n, agent.image_shape, agent.joint_dim)
    return imgs, joint * 0.5


def test_the_exported_policy_acts_as_select_action_in_a_process_without_the_repository(finished_run, tmp_path):
    res = run_cli("export_policy.py", "--checkpoint", finished_run / "policy_best.pth", "--output",
                  tmp_path / "policy.pt2")
    assert res.returncode == 0, res.stderr
    agent = algos.MultimodalAgent.from_checkpoint(finished_run / "policy_best.pth")
    imgs, joint = observations(agent, 3)
    expected = agent.select_action(*imgs, joint)
    torch.save({"images": [torch.from_numpy(x) for x in imgs], "joint": torch.from_numpy(joint)}, tmp_path / "obs.pt")
    code = """
import importlib.util, torch
assert importlib.util.find_spec("algos") is None, "the repository is importable"
policy = torch.export.load("policy.pt2").module()
obs = torch.load("obs.pt")
left, right, global_ = obs["images"]
torch.save(torch.stack([policy(left[i], right[i], global_[i], obs["joint"][i]) for i in range(3)]), "actions.pt")
"""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True)   # -W error: the robot sees no warning either
    assert out.returncode == 0, out.stderr
    exported = torch.load(tmp_path / "actions.pt").numpy()
    assert exported.shape == expected.shape
    np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)


def test_the_onnx_policy_acts_as_select_action(finished_run, tmp_path):
    for module in ("onnx", "onnxscript"):
        pytest.importorskip(module)
    ort = pytest.importorskip("onnxruntime")
    res = run_cli("export_policy.py", "--checkpoint", finished_run / "policy_final.pth", "--output",
                  tmp_path / "policy.onnx")
    assert res.returncode == 0, res.stderr
    agent = algos.MultimodalAgent.from_checkpoint(finished_run / "policy_final.pth")
    imgs, joint = observations(agent, 2)
    session = ort.InferenceSession(str(tmp_path / "policy.onnx"))
    for i in range(2):
        feed = dict(zip(("left_image", "right_image", "global_image", "joint"), [x[i] for x in imgs] + [joint[i]]))
        np.testing.assert_allclose(session.run(None, feed)[0], agent.select_action(*(x[i] for x in imgs), joint[i]),
                                   rtol=0, atol=1e-5)


def test_export_refuses_an_unknown_format(finished_run, tmp_path):
    res = run_cli("export_policy.py", "--checkpoint", finished_run / "policy_final.pth", "--output", tmp_path / "p.zip")
    assert res.returncode == 2 and ".pt2 or .onnx" in res.stderr and not (tmp_path / "p.zip").exists()


@pytest.mark.parametrize("video", ["out.gif", "out.mp4"])
def test_eval_policy_repeats_the_runs_evaluation_and_films_the_three_views(finished_run, tmp_path, video):
    if video.endswith(".mp4"):
        pytest.importorskip("av")
    res = run_cli("eval_policy.py", "--checkpoint", finished_run / "model_final.pth", "--episodes", "2",
                  "--video", tmp_path / video, "--video_episodes", "1")
    assert res.returncode == 0, res.stderr
    last = progress_rows(finished_run)[-1]   # training evaluated on the same 2 seeds at the same step
    assert f"score {float(last['NormalizedScore']):.3f}" in res.stdout
    assert f"success rate {float(last['SuccessRate']):.2f}" in res.stdout
    assert f"return {float(last['AverageReturn']):.3f}" in res.stdout
    data = (tmp_path / video).read_bytes()
    if video.endswith(".gif"):
        from PIL import Image
        with Image.open(tmp_path / video) as gif:
            width, _ = gif.size
            assert gif.n_frames > 2
        view = 16 * 6   # 16 x 16 views, enlarged to 96 pixels, three side by side
        assert width == 3 * view + 2 * outputs.VIEW_GAP
    else:
        assert data[4:8] == b"ftyp"


def test_eval_policy_without_a_simulator_says_what_to_give(tmp_path, tiny_dataset):
    agent = algos.MultimodalLatent(replay_buffer=make_buffer(tiny_dataset), **SMALL)
    path = agent.save("policy_final", str(tmp_path), policy_only=True)
    res = run_cli("eval_policy.py", "--checkpoint", path, "--episodes", "1")
    assert res.returncode == 2 and "--simulator" in res.stderr and "Traceback" not in res.stderr
