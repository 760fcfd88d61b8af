"""Never lose a run: bad input, crashes, preemption and exact resume."""
import csv
import dataclasses
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

import main_multimodal
from algos import algos_vae_multimodal as algos
from algos import hdf5_format
from algos import utils_multimodal as utils
from conftest import ENV, ROOT, TINY_TRAIN, progress_steps, run_cli, write_dataset


def train_in_process(tmp_path, data, *extra, exp="bad"):
    """main_multimodal.main in this process: returns (exit code, stdout, stderr)."""
    return main_multimodal.main(["--hdf5_path", str(data), "--log_dir", str(tmp_path / "results"),
                                 "--ExpID", exp, *TINY_TRAIN, "--max_timesteps", "2", "--eval_freq", "2",
                                 *map(str, extra)])


def assert_refused(tmp_path, capsys, code, *needles, exp="bad"):
    out = capsys.readouterr()
    assert code == main_multimodal.EXIT_BAD_INPUT, out.err
    for needle in needles:
        assert needle in out.err, (needle, out.err)
    assert "Traceback" not in out.err + out.out
    # nothing half-written: no experiment folder, no model, no progress
    assert not os.path.exists(tmp_path / "results" / f"Exp{exp}"), os.listdir(tmp_path / "results")


# --------------------------------------------------------------------------- bad input matrix
def test_not_an_hdf5_file(tmp_path, capsys):
    data = tmp_path / "data.hdf5"
    data.write_text("hello")
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), "not an HDF5 file")


def test_truncated_hdf5_file(tmp_path, capsys):
    good = write_dataset(tmp_path / "good.hdf5", n_rows=300)
    data = tmp_path / "cut.hdf5"
    data.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), "truncated or corrupt")


@pytest.mark.parametrize("key", hdf5_format.REQUIRED_KEYS)
def test_each_required_key_missing(tmp_path, capsys, key):
    data = write_dataset(tmp_path / "d.hdf5", skip=(key,))
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), f"{key}: missing")


@pytest.mark.parametrize("override, needle", [
    ({"observations/left_image": np.zeros((60, 16, 16, 3), np.float32)}, "observations/left_image: dtype float32"),
    ({"observations/right_image": np.zeros((60, 16, 16), np.uint8)}, "observations/right_image: rank 3"),
    ({"observations/global_image": np.zeros((60, 16, 16, 1), np.uint8)}, "observations/global_image: 1 channels"),
    ({"observations/global_image": np.zeros((60, 8, 16, 3), np.uint8)}, "the three views differ in size"),
    ({"actions": np.zeros((59, 16), np.float32)}, "row counts disagree"),
])
def test_bad_images_and_row_counts(tmp_path, capsys, override, needle):
    data = write_dataset(tmp_path / "d.hdf5", override=override)
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), needle)


@pytest.mark.parametrize("key", ["observations/joint", "actions", "rewards"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_nan_or_inf_in_float_data(tmp_path, capsys, key, bad):
    data = write_dataset(tmp_path / "d.hdf5")
    with h5py.File(data, "r+") as f:
        values = f[key][:]
        values[11] = bad
        f[key][...] = values
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), f"{key}: contains NaN or Inf",
                   "row 11")


def test_empty_file(tmp_path, capsys):
    data = tmp_path / "empty.hdf5"
    h5py.File(data, "w").close()
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), "empty")


def test_last_row_ending_no_episode_is_fixed_up_and_said(tmp_path, capsys):
    terminals = np.zeros(60, bool)
    terminals[[9, 19, 29, 39]] = True
    data = write_dataset(tmp_path / "d.hdf5", timeouts=False, override={"terminals": terminals})
    code = train_in_process(tmp_path, data, exp="fix")
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "last row ends no episode" in out.out and "treated as a timeout" in out.out


def test_fewer_episodes_than_the_split_needs(tmp_path, capsys):
    data = write_dataset(tmp_path / "d.hdf5", n_rows=20, episode_len=20)
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, data), str(data), "1 episode(s)", "at least 2")


@pytest.mark.parametrize("flags, needle", [
    (["--expectile", "1.0"], "--expectile must be in (0, 1)"),
    (["--expectile", "0"], "--expectile must be in (0, 1)"),
    (["--value_expectile", "1"], "--value_expectile must be in (0, 1)"),
    (["--judge_expectile", "0"], "--judge_expectile must be in (0, 1)"),
    (["--weight_temperature", "-0.1"], "--weight_temperature must be >= 0"),
    (["--max_timesteps", "0"], "--max_timesteps must be > 0"),
    (["--max_timesteps", "-5"], "--max_timesteps must be > 0"),
    (["--eval_freq", "0"], "--eval_freq must be > 0"),
    (["--train_test_split", "1.5"], "--train_test_split must be in (0, 1)"),
    (["--batch_size", "5000"], "--batch_size 5000 is larger than the training split"),
    (["--load_model", "777"], "no checkpoint model_777.pth"),
])
def test_flags_out_of_range(tmp_path, capsys, tiny_dataset, flags, needle):
    assert_refused(tmp_path, capsys, train_in_process(tmp_path, tiny_dataset, *flags), needle)


def test_bad_input_exits_non_zero_without_traceback_in_a_real_process(tmp_path):
    data = write_dataset(tmp_path / "d.hdf5", skip=("observations/joint",))
    res = run_cli("main_multimodal.py", "--hdf5_path", data, "--log_dir", tmp_path / "results", "--ExpID", "p",
                  *TINY_TRAIN, cwd=tmp_path)
    assert res.returncode == 2
    assert f"{data}" in res.stderr and "observations/joint: missing" in res.stderr
    assert "Traceback" not in res.stderr


def test_resuming_with_a_dataset_of_another_width(tmp_path, capsys):
    data16 = write_dataset(tmp_path / "d16.hdf5")
    assert train_in_process(tmp_path, data16, "--save_freq", "2", exp="w16") == 0
    capsys.readouterr()
    data14 = write_dataset(tmp_path / "d14.hdf5", joint_dim=14, action_dim=14)
    code = train_in_process(tmp_path, data14, "--max_timesteps", "4", "--load_model", "w16:2", exp="w14")
    assert_refused(tmp_path, capsys, code, "model_2.pth does not fit", "joint_dim 16 in the checkpoint, 14 in the dataset",
                   exp="w14")


# --------------------------------------------------------------------------- atomic outputs
def test_a_failed_save_leaves_no_model_file(tmp_path, monkeypatch, tiny_dataset):
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu")

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(algos.CheckpointError, match=r"model_10.pth: cannot write the checkpoint \(No space left"):
        agent.save("model_10", str(tmp_path))
    assert os.listdir(tmp_path) == ["tiny.hdf5"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoints_raise_a_clear_error(tmp_path, tiny_dataset, damage, capsys):
    assert train_in_process(tmp_path, tiny_dataset, "--save_freq", "2", exp="c") == 0
    folder = tmp_path / "results" / "Expc" / "multimodal_robot"
    path = folder / "model_2.pth"
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": b"\x00" * 1000, "empty": b""}[damage])
    for call in (lambda: algos.MultimodalLatent.from_checkpoint(path),
                 lambda: algos.MultimodalLatent().load("model_2", str(folder))):
        with pytest.raises(algos.CheckpointError, match=str(path).replace(".", r"\.")):
            call()
    capsys.readouterr()
    code = train_in_process(tmp_path, tiny_dataset, "--max_timesteps", "4", "--load_model", "c:2", exp="c2")
    assert_refused(tmp_path, capsys, code, str(path), exp="c2")
    final = folder / "model_final.pth"   # --resume reads it to find the latest step
    final.write_bytes(b"\x00" * 10)
    code = train_in_process(tmp_path, tiny_dataset, "--max_timesteps", "4", "--resume", exp="c")
    err = capsys.readouterr().err
    assert code == main_multimodal.EXIT_BAD_INPUT and str(final) in err and "Traceback" not in err, err


def wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start_training(tmp_path, data, exp, *extra):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main_multimodal.py"), "--hdf5_path", str(data),
                             "--log_dir", str(tmp_path / "results"), "--ExpID", exp, *TINY_TRAIN, *map(str, extra)],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_repeated_sigkill_never_leaves_a_broken_checkpoint(tmp_path, tiny_dataset):
    folder = tmp_path / "results" / "Expk" / "multimodal_robot"
    rng = np.random.default_rng(0)
    for attempt in range(3):
        extra = ["--max_timesteps", 100000, "--save_freq", 2, "--eval_freq", 2, "--keep_last", 0]
        proc = start_training(tmp_path, tiny_dataset, "k", *extra, *(["--resume"] if attempt else []))
        n_before = len(glob.glob(str(folder / "model_*.pth")))
        assert wait_for(lambda: len(glob.glob(str(folder / "model_*.pth"))) >= n_before + 2), proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    paths = glob.glob(str(folder / "model_*.pth"))
    assert len(paths) >= 6
    for path in paths:
        algos.MultimodalLatent.from_checkpoint(path)   # raises if any is incomplete
    steps = progress_steps(folder)
    assert steps == sorted(set(steps)), steps   # resume dropped rows past its checkpoint: no repeats


def test_a_checkpoint_that_cannot_be_written_is_an_error_naming_it(tmp_path, tiny_dataset, monkeypatch, capsys):
    """A full disk while saving (torch's zip writer then says only "unexpected pos"): exit
    status 4, one line naming the checkpoint and the free space, no traceback, no temporary
    file left behind."""
    def full_disk(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 161741504 vs 161741392")
    monkeypatch.setattr(algos.torch, "save", full_disk)
    code = train_in_process(tmp_path, tiny_dataset)
    err = capsys.readouterr().err
    assert code == main_multimodal.EXIT_WRITE_FAILED, err
    assert "cannot write the checkpoint (" in err and "unexpected pos" in err and "MiB free on its disk" in err
    assert ".pth" in err and "Traceback" not in err
    assert not list(tmp_path.rglob(".tmp-*")) and not list(tmp_path.rglob("model_*.pth"))


# --------------------------------------------------------------------------- interruption
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_continues_the_log(tmp_path, tiny_dataset, sig):
    folder = tmp_path / "results" / "Exps" / "multimodal_robot"
    proc = start_training(tmp_path, tiny_dataset, "s", "--max_timesteps", 100000, "--eval_freq", 3)
    assert wait_for(lambda: len(progress_steps(folder)) >= 2)
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == 128 + sig, err
    stopped_at = progress_steps(folder)[-1]
    assert os.path.exists(folder / f"model_{stopped_at}.pth")
    assert "--resume" in out and "Resume with" in out
    res = run_cli("main_multimodal.py", "--hdf5_path", tiny_dataset, "--log_dir", tmp_path / "results", "--ExpID", "s",
                  *TINY_TRAIN, "--max_timesteps", stopped_at + 7, "--eval_freq", 3, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    steps = progress_steps(folder)
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 7
    assert all(b - a <= 3 for a, b in zip(steps, steps[1:])), steps    # no gap
    assert algos.read_checkpoint(folder / "model_final.pth")["total_it"] == stopped_at + 7


# --------------------------------------------------------------------------- exact resume
def final_params(folder):
    return algos.read_checkpoint(os.path.join(folder, "model_final.pth"))["networks"]


@pytest.mark.parametrize("how", ["--resume", "--load_model"])
def test_exact_resume_is_bit_identical(tmp_path, sim_dataset, how):
    """A 12-step run killed right after its step-6 checkpoint and continued with the same
    command ends bit-identical to the run that was never stopped (learning-rate schedule,
    sampler, filter judgements and all)."""
    common = ["--seed", 7, "--eval_freq", 3, "--save_freq", 6, "--keep_last", 0]
    one = run_cli("main_multimodal.py", "--hdf5_path", sim_dataset, "--log_dir", tmp_path / "results", "--ExpID",
                  "one", *TINY_TRAIN, *common, "--max_timesteps", 12, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    one_folder, two_folder = (tmp_path / "results" / f"Exp{e}" / "multimodal_robot" for e in ("one", "two"))
    if how == "--resume":   # the folder as a kill after step 6 leaves it (later progress rows included)
        two_folder.mkdir(parents=True)
        for name in ("model_6.pth", "params.json", "progress.csv"):
            shutil.copy(one_folder / name, two_folder / name)
    resume = ["--resume"] if how == "--resume" else ["--load_model", "one:6"]
    second = run_cli("main_multimodal.py", "--hdf5_path", sim_dataset, "--log_dir", tmp_path / "results", "--ExpID",
                     "two", *TINY_TRAIN, *common, "--max_timesteps", 12, *resume, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    a = final_params(tmp_path / "results" / "Expone" / "multimodal_robot")
    b = final_params(tmp_path / "results" / "Exptwo" / "multimodal_robot")
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    # --resume goes on with the folder's log; --load_model starts a new one at the checkpoint
    expected_steps = [3, 6, 9, 12] if how == "--resume" else [9, 12]
    assert progress_steps(tmp_path / "results" / "Exptwo" / "multimodal_robot") == expected_steps


def test_evaluation_does_not_change_what_a_run_learns(tmp_path, sim_dataset):
    """Rollouts and offline metrics every 4 steps leave the trained networks bit-identical to
    a run evaluated only at its end: how often a user evaluates must not change the policy."""
    folders = {}
    for exp, eval_freq in (("rare", 12), ("often", 4)):
        res = run_cli("main_multimodal.py", "--hdf5_path", sim_dataset, "--log_dir", tmp_path / "results", "--ExpID",
                      exp, *TINY_TRAIN, "--seed", 7, "--max_timesteps", 12, "--eval_freq", eval_freq, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        folders[exp] = tmp_path / "results" / f"Exp{exp}" / "multimodal_robot"
    assert progress_steps(folders["often"]) == [4, 8, 12]
    a, b = final_params(folders["rare"]), final_params(folders["often"])
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)


# --------------------------------------------------------------------------- numerical faults
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset):
    res = run_cli("main_multimodal.py", "--hdf5_path", tiny_dataset, "--log_dir", tmp_path / "results", "--ExpID",
                  "nan", *TINY_TRAIN, "--max_timesteps", 400, "--eval_freq", 2, "--save_freq", 2,
                  "--critic_lr", 1e30, "--encoder_lr", 1e30, cwd=tmp_path)
    assert res.returncode == main_multimodal.EXIT_NONFINITE, res.stderr[-2000:]
    assert "became NaN/Inf at step" in res.stderr and "Traceback" not in res.stderr
    folder = tmp_path / "results" / "Expnan" / "multimodal_robot"
    assert not os.path.exists(folder / "model_final.pth")
    for path in glob.glob(str(folder / "model_*.pth")):
        ckpt = algos.read_checkpoint(path)
        for state in ckpt["networks"].values():
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_value_targets_are_clamped(tiny_dataset):
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu")
    with torch.no_grad():
        # target_Q bootstraps from the current critic's V, target_V from the target critic's Q
        for net in (agent.critic.v_net, agent.critic_target.q1_net, agent.critic_target.q2_net):
            net[-1].bias.fill_(1e6)
        feature = torch.zeros(5, 32)
        action = torch.zeros(5, agent.action_dim)
        target_Q, target_V = agent._critic_targets(feature, feature, torch.ones(5, 1), torch.ones(5, 1), action)
    assert (target_Q == agent.max_v).all() and (target_V == agent.max_v).all()


@pytest.mark.parametrize("return_bound", [True, False])
def test_observed_return_bounds_the_q_target_from_below(tiny_dataset, return_bound):
    """The default algorithm bounds target_Q below by the observed return; the original does not."""
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8,
                                          seed=0, original_lapo=not return_bound)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu")
    with torch.no_grad():
        agent.critic.v_net[-1].weight.zero_()
        agent.critic.v_net[-1].bias.fill_(0.0)   # V(s') = 0: the one-step target is r
        feature = torch.zeros(3, 32)
        reward = torch.zeros(3, 1)
        observed = torch.tensor([[0.5], [-0.5], [float("-inf")]])
        target_Q, _ = agent._critic_targets(feature, feature, reward, torch.ones(3, 1),
                                            torch.zeros(3, agent.action_dim), observed)
    expected = [0.5, 0.0, 0.0] if return_bound else [0.0, 0.0, 0.0]
    assert target_Q.squeeze(1).tolist() == pytest.approx(expected)


def test_value_fit_chooses_the_critic_whose_q_v_fits(tiny_dataset):
    """V's target is Q at the data's action: the target critic's by default, the online
    critic's with --value_fit q."""
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8,
                                          seed=0)
    for value_fit, expected in (("target_q", 0.25), ("q", 0.75)):
        agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                       value_fit=value_fit)
        agent.critic_target = lambda feature, action: (torch.full_like(action[:, :1], 0.25),) * 2
        agent.critic = lambda feature, action: (torch.full_like(action[:, :1], 0.75),) * 2
        agent.critic.v = lambda feature, fold=None: torch.zeros(len(feature), 1)
        feature = torch.zeros(2, 32)
        with torch.no_grad():
            _, target_V = agent._critic_targets(feature, feature, torch.zeros(2, 1), torch.ones(2, 1),
                                                torch.zeros(2, agent.action_dim))
        assert target_V.squeeze(1).tolist() == pytest.approx([expected, expected]), value_fit


# --------------------------------------------------------------------------- no clobbering
def test_two_exp_ids_never_share_files(tmp_path, tiny_dataset):
    for exp in ("p", "q"):
        assert train_in_process(tmp_path, tiny_dataset, exp=exp) == 0
    p = set(os.listdir(tmp_path / "results" / "Expp" / "multimodal_robot"))
    q = set(os.listdir(tmp_path / "results" / "Expq" / "multimodal_robot"))
    assert p == q and "progress.csv" in p
    assert sorted(os.listdir(tmp_path / "results")) == ["Expp", "Expq"]


def test_value_over_the_data_is_the_expectile_of_its_q(tiny_dataset):
    """value_target="data": V(s) is fitted to Q_target at the data's own action by the
    expectile loss, so with targets 0 and 1 equally often it settles at the expectile."""
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                   value_expectile=0.8)
    agent.critic_target = lambda feature, action: (action[:, :1], action[:, :1] + 1)   # Q_t(s, a) = a[0]
    feature, action = torch.zeros(4, 32), torch.zeros(4, agent.action_dim)
    action[:, 0] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        _, target_V = agent._critic_targets(feature, feature, torch.zeros(4, 1), torch.ones(4, 1), action)
    assert target_V.squeeze(1).tolist() == [0.0, 1.0, 0.0, 1.0]
    value = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([value], lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        agent._value_loss(value.expand(4, 1), target_V).backward()
        opt.step()
    assert value.item() == pytest.approx(0.8, abs=1e-3)


def test_episode_filter_drops_episodes_that_fall_short_and_lifts_the_rest(tiny_dataset):
    """exp(max(A, A_episode) / T) clipped, 0 on every row of an episode whose A_episode is
    at or below 0, and the plain exp(A / T) where the episode has not been judged yet (NaN)."""
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0)
    advantage = torch.tensor([[0.05], [0.05], [-0.3], [0.2], [-2.0], [0.1]])
    episode_advantage = torch.tensor([[float("nan")], [-0.15], [0.1], [-0.05], [1.0], [-0.01]])
    lifted = [float(np.exp(0.5)), float(np.exp(0.5)), float(np.exp(1.0)), float(np.exp(2.0)), algos.MAX_ADVANTAGE_WEIGHT,
              float(np.exp(1.0))]
    kept = [1, 0, 1, 0, 1, 0]
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16,
                                   device="cpu", weight_temperature=0.1)
    weight = agent._advantage_weight(advantage, episode_advantage).squeeze(1).tolist()
    assert weight == pytest.approx([w * k for w, k in zip(lifted, kept)])


def test_every_training_episode_is_judged_at_its_first_row(tiny_dataset):
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0, n_step=100)
    first_rows = buffer.train_episode_first_rows
    episodes = buffer.episode_index[first_rows]
    assert sorted(episodes.tolist()) == sorted(buffer.train_episode_ids.tolist())
    for row, episode in zip(first_rows.tolist(), episodes.tolist()):   # no earlier row of that episode
        assert row == 0 or buffer.episode_index[row - 1] != episode or row - 1 not in set(buffer.train_rows.tolist())
    torch.manual_seed(0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                   episode_judge="critic")
    steps = -(-len(first_rows) // algos.EPISODES_JUDGED_PER_STEP)
    for _ in range(steps):
        agent._refresh_episode_advantage()
        agent.total_it += 1
    judged = agent.episode_advantage
    assert torch.isnan(judged).sum() == buffer.n_episodes - len(first_rows)   # test episodes are never judged
    batch = buffer.gather(first_rows)
    with torch.no_grad():   # each by the V head of the other fold of episodes
        expected = agent._advantage(agent.encoder(batch.images, batch.joint),
                                    agent.encoder(batch.next_images, batch.next_joint), batch.reward, batch.discount,
                                    agent._fold(batch.episode, offset=1))
    torch.testing.assert_close(judged[episodes], expected.squeeze(1))
    agent.train(3, 8)
    assert agent.train(1, 8)["imitated_episode_frac"] == pytest.approx(
        (agent.episode_advantage[episodes] > 0).float().mean().item())


def test_judge_return_keeps_the_episodes_whose_return_clears_the_expectile_of_the_training_returns(tiny_dataset):
    """--episode_judge return: no V; A_episode is the episode's discounted return from its
    first row less the --judge_expectile of the training episodes' returns, for training and
    held-out episodes alike, and the filter keeps those above the bar."""
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8,
                                          seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                   episode_judge="return", judge_expectile=0.7, filter_band=0.0)
    returns = buffer.return_to_end[buffer.train_episode_first_rows].numpy().astype(np.float64)
    bar = utils.expectile(returns, 0.7)
    assert 0.7 * np.clip(returns - bar, 0, None).sum() == pytest.approx(0.3 * np.clip(bar - returns, 0, None).sum())
    bar -= algos.RETURN_BAR_TOLERANCE
    assert returns.mean() < bar < returns.max()
    for first_rows in (buffer.train_episode_first_rows, buffer.test_episode_first_rows):
        episode, advantage = agent._judge(first_rows)
        torch.testing.assert_close(advantage, buffer.return_to_end[first_rows] - torch.tensor(bar, dtype=torch.float32))
    drawn = []   # every training episode is judged before the first batch is drawn from the kept ones
    train_step = agent._train_step
    agent._train_step = lambda batch: drawn.append(batch.episode) or train_step(batch)
    agent.train(1, 8)
    expected_kept = (buffer.return_to_end[buffer.train_episode_first_rows] > bar)
    episodes = buffer.episode_index[buffer.train_episode_first_rows]
    assert not torch.isnan(agent.episode_advantage[episodes]).any()
    assert torch.equal(agent.episode_kept[episodes], expected_kept)
    assert 0 < expected_kept.sum() < len(episodes)
    assert set(drawn[0].tolist()) <= set(episodes[expected_kept].tolist())
    # returns that are all alike (no reward signal) clear the bar: every episode is imitated
    flat = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                  episode_judge="return")
    buffer.return_to_end = torch.full_like(buffer.return_to_end, 0.3)
    flat._refresh_episode_advantage(n_episodes=len(episodes))
    assert flat.episode_kept[episodes].all()


def test_filter_band_holds_each_episode_kept_or_dropped_until_judged_beyond_it(tiny_dataset):
    """With --filter_band b an episode is dropped when judged below -b, taken back only
    when judged above +b, and left as it was in between (a first judgement: its sign); the
    CVAE's weights follow that state, and a checkpoint carries it. With 0 it is the sign of
    the last judgement."""
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                   filter_band=0.1)
    agent.episode_advantage = torch.full((buffer.n_episodes,), float("nan"))
    agent.episode_kept = torch.ones(buffer.n_episodes, dtype=torch.bool)
    episode = torch.tensor(sorted(buffer.train_episode_ids.tolist())[:2])
    states = []
    for a in ([-0.05, 0.5], [0.05, -0.05], [0.15, -0.2], [0.05, 0.05]):
        agent._record_judgement(episode, torch.tensor(a))
        states.append(agent.episode_kept[episode].tolist())
    # a first judgement sets the state by its sign; within the band nothing changes
    assert states == [[False, True], [False, True], [True, False], [True, False]]
    assert agent.episode_advantage[episode].tolist() == pytest.approx([0.05, 0.05])
    advantage = torch.zeros(2, 1)
    weight = agent._advantage_weight(advantage, torch.tensor([[0.15], [0.05]]), agent.episode_kept[episode].unsqueeze(1))
    assert weight.squeeze(1).tolist() == pytest.approx([float(np.exp(0.15 / agent.config.weight_temperature)), 0.0])
    saved = agent._training_state()
    agent._set_training_state({k: v.clone() for k, v in saved.items()})
    assert torch.equal(agent.episode_kept, saved["episode_kept"])
    plain = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu",
                                   filter_band=0.0)
    plain._episode_state(buffer)
    for a in ([-0.05, 0.5], [0.01, -0.01]):
        plain._record_judgement(episode, torch.tensor(a))
        assert plain.episode_kept[episode].tolist() == plain._kept(torch.tensor(a)).tolist()


def test_batches_come_from_the_episodes_the_filter_keeps(tiny_dataset):
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(tiny_dataset, progress=False), train_test_split=0.8, seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16, device="cpu")
    train_eps = sorted(buffer.train_episode_ids.tolist())
    agent.episode_advantage = torch.full((buffer.n_episodes,), -1.0)
    agent.episode_advantage[train_eps[0]] = 0.3
    agent.episode_kept = agent._kept(agent.episode_advantage)
    agent._refresh_episode_advantage = lambda: None   # the filter's state as set above
    for _ in range(10):   # by default the whole batch
        assert agent._sample_batch(8).episode.tolist() == [train_eps[0]] * 8
    agent.config = dataclasses.replace(agent.config, kept_batch_frac=0.5)   # the last half of it
    halves = [agent._sample_batch(8).episode for _ in range(10)]
    assert all(batch[4:].tolist() == [train_eps[0]] * 4 for batch in halves)
    assert len(set(torch.cat([batch[:4] for batch in halves]).tolist())) > 1
    agent.config = dataclasses.replace(agent.config, kept_batch_frac=0.0)   # uniform batches
    assert len(set(torch.cat([agent._sample_batch(8).episode for _ in range(10)]).tolist())) > 1


def test_advantage_weights_exponential_or_two_valued(tiny_dataset):
    data = hdf5_format.load_dataset(tiny_dataset, progress=False)
    buffer = utils.MultimodalReplayBuffer(data, train_test_split=0.8, seed=0)
    advantage = torch.tensor([[-1.0], [0.0], [0.05], [1.0]])
    original = utils.MultimodalReplayBuffer(data, train_test_split=0.8, seed=0, original_lapo=True)
    two_valued = algos.MultimodalLatent(replay_buffer=original, obs_feature_dim=32, image_feature_dim=16,
                                        device="cpu", expectile=0.9)
    assert two_valued._advantage_weight(advantage).squeeze(1).tolist() == pytest.approx([0.1, 0.1, 0.9, 0.9])
    exponential = algos.MultimodalLatent(replay_buffer=buffer, obs_feature_dim=32, image_feature_dim=16,
                                         device="cpu", weight_temperature=0.1)
    expected = [float(np.exp(-10)), 1.0, float(np.exp(0.5)), algos.MAX_ADVANTAGE_WEIGHT]
    assert exponential._advantage_weight(advantage).squeeze(1).tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------- run bookkeeping
def test_resume_command_names_an_automatically_assigned_expid():
    from algos import experiment
    cmd = experiment.resume_command(["--hdf5_path", "d.hdf5", "--overwrite"], "0007")
    assert "--ExpID 0007" in cmd and cmd.endswith("--resume") and "--overwrite" not in cmd
    given = experiment.resume_command(["--ExpID", "mine", "--load_model", "3"], "mine")
    assert given.count("--ExpID") == 1 and "--load_model" not in given


def test_resume_takes_the_checkpoint_settings_and_refuses_contradicting_flags(tmp_path, tiny_dataset, capsys):
    assert train_in_process(tmp_path, tiny_dataset, "--image_shift", "1", "--kl_beta", "0.5", "--n_step", "3",
                            exp="r") == 0
    capsys.readouterr()
    code = train_in_process(tmp_path, tiny_dataset, "--max_timesteps", "4", "--resume", "--kl_beta", "0.7",
                            exp="r")
    err = capsys.readouterr().err
    assert code == main_multimodal.EXIT_BAD_INPUT and "--kl_beta 0.7 given" in err and "trained with 0.5" in err, err
    # flags left out take the checkpoint's values, not the defaults
    assert main_multimodal.main(["--hdf5_path", str(tiny_dataset), "--log_dir", str(tmp_path / "results"),
                                 "--ExpID", "r", "--device", "cpu", "--batch_size", "4", "--eval_episodes", "0",
                                 "--max_timesteps", "4", "--eval_freq", "2", "--resume"]) == 0
    params = json.loads((tmp_path / "results" / "Expr" / "multimodal_robot" / "params.json").read_text())
    config = params["config"]
    assert (config["image_shift"], config["kl_beta"], config["n_step"], config["obs_feature_dim"]) == (1, 0.5, 3, 32)
    ckpt = algos.read_checkpoint(tmp_path / "results" / "Expr" / "multimodal_robot" / "model_final.pth")
    assert ckpt["config"].n_step == 3 and ckpt["total_it"] == 4


def test_load_model_from_another_experiment_starts_its_own_best_record(tmp_path, tiny_dataset, capsys):
    """Another experiment's best (judged on its own rows, maybe by another metric) is not
    carried over: the new folder writes its own policy_best."""
    assert train_in_process(tmp_path, tiny_dataset, "--save_freq", "2", exp="a") == 0
    path = tmp_path / "results" / "Expa" / "multimodal_robot" / "model_2.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"]["best"] = {"value": -1.0, "step": 2, "metric": "test_kept_action_mse"}   # unbeatable
    torch.save(ckpt, path)
    assert train_in_process(tmp_path, tiny_dataset, "--max_timesteps", "4", "--load_model", "a:2", exp="b") == 0
    assert (tmp_path / "results" / "Expb" / "multimodal_robot" / "policy_best.pth").exists()


def test_load_model_on_another_file_trains_in_the_checkpoint_units(tmp_path, tiny_dataset):
    """The buffer normalises with the checkpoint's statistics, the ones the agent acts with."""
    assert train_in_process(tmp_path, tiny_dataset, "--save_freq", "2", exp="u") == 0
    shifted = write_dataset(tmp_path / "shifted.hdf5", override={"actions": np.full((60, 16), 10.0, np.float32)})
    path = tmp_path / "results" / "Expu" / "multimodal_robot" / "model_2.pth"
    ckpt = algos.read_checkpoint(path)
    config = main_multimodal.config_lib.replace(ckpt["config"], hdf5_path=str(shifted))
    buffer = main_multimodal.make_buffer(config, torch.device("cpu"), ckpt, path)
    expected = utils.Normalization.from_state_dict(ckpt["normalization"])
    np.testing.assert_array_equal(buffer.normalization.action_mean, expected.action_mean)
    assert buffer.actions.mean() > 5   # 10 in the checkpoint's units, not 0 in the file's own


def test_a_run_in_process_restores_the_signal_handlers(tmp_path, tiny_dataset):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert train_in_process(tmp_path, tiny_dataset, exp="s") == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_progress_log_keeps_columns_that_first_appear_later(tmp_path):
    from algos import experiment
    log = experiment.ProgressLog(str(tmp_path / "progress.csv"))
    log.write({"steps": 1, "loss": 0.5})
    log.write({"steps": 2, "loss": 0.4, "NormalizedScore": 0.9})
    again = experiment.ProgressLog(str(tmp_path / "progress.csv"))   # as a resumed run opens it
    again.write({"steps": 3, "loss": 0.3, "SuccessRate": 1.0})
    with open(tmp_path / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["steps"] for r in rows] == ["1", "2", "3"]
    assert (rows[0]["NormalizedScore"], rows[1]["NormalizedScore"], rows[2]["SuccessRate"]) == ("", "0.9", "1")


def test_latest_checkpoint_reads_the_step_without_loading_the_weights(tmp_path, tiny_dataset, monkeypatch):
    from algos import experiment
    assert train_in_process(tmp_path, tiny_dataset, "--max_timesteps", "3", "--save_freq", "2", exp="l") == 0
    folder = str(tmp_path / "results" / "Expl" / "multimodal_robot")
    assert experiment.stored_step(os.path.join(folder, "model_final.pth")) == 3

    def no_torch_load(*args, **kwargs):
        raise AssertionError("latest_checkpoint must not torch.load a checkpoint")
    monkeypatch.setattr(torch, "load", no_torch_load)
    assert experiment.latest_checkpoint(folder) == os.path.join(folder, "model_final.pth")
