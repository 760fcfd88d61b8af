"""The data path: validation, episode boundaries, the split, normalisation, loading."""
import h5py
import numpy as np
import pytest
import torch

from algos import hdf5_format
from algos import utils_multimodal as utils
from conftest import run_cli, write_dataset


def problems_of(path):
    return hdf5_format.inspect_hdf5(path).problems


def test_valid_dataset_has_no_problems(tiny_dataset):
    summary = hdf5_format.inspect_hdf5(tiny_dataset)
    assert summary.ok, summary.problems
    assert summary.n_rows == 60 and summary.image_shape == (16, 16)
    assert summary.joint_dim == 16 and summary.action_dim == 16 and summary.has_timeouts


@pytest.mark.parametrize("key", hdf5_format.REQUIRED_KEYS)
def test_each_missing_key_is_named(tmp_path, key):
    path = write_dataset(tmp_path / "d.hdf5", skip=(key,))
    assert any(p.startswith(f"{key}: missing") for p in problems_of(path)), problems_of(path)


def test_every_problem_is_reported_at_once(tmp_path):
    n = 60
    path = write_dataset(tmp_path / "d.hdf5", skip=("actions",), override={
        "observations/left_image": np.zeros((n, 16, 16, 3), np.float32),
        "observations/right_image": np.zeros((n, 16, 16), np.uint8),
        "rewards": np.zeros(n - 1, np.float32)})
    found = problems_of(path)
    assert any("actions: missing" in p for p in found)
    assert any("left_image: dtype float32, expected uint8" in p for p in found)
    assert any("right_image: rank 3" in p for p in found)
    assert any("row counts disagree" in p and "rewards=59" in p for p in found)


@pytest.mark.parametrize("override, expected", [
    ({"observations/global_image": np.zeros((60, 16, 16, 4), np.uint8)}, "global_image: 4 channels"),
    ({"observations/global_image": np.zeros((60, 8, 8, 3), np.uint8)}, "the three views differ in size"),
    ({"observations/joint": np.zeros((60, 16), np.int32)}, "observations/joint: dtype int32, expected float32"),
    ({"actions": np.zeros(60, np.float32)}, "actions: shape (60,), expected [N, A]"),
    ({"terminals": np.zeros(60, np.float32)}, "terminals: dtype float32, expected bool"),
    ({"terminals": np.full(60, 2, np.int64)}, "terminals: integer flags must be 0 or 1"),
])
def test_wrong_dtype_rank_channels_and_sizes(tmp_path, override, expected):
    path = write_dataset(tmp_path / "d.hdf5", override=override)
    assert any(expected in p for p in problems_of(path)), problems_of(path)


@pytest.mark.parametrize("key", ["observations/joint", "actions", "rewards"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_found_with_their_row(tmp_path, key, bad):
    path = write_dataset(tmp_path / "d.hdf5")
    with h5py.File(path, "r+") as f:
        data = f[key][:]
        data[7] = bad
        f[key][...] = data
    found = problems_of(path)
    assert any(p.startswith(f"{key}: contains NaN or Inf in 1 row(s) (first at row 7)") for p in found), found


def test_not_hdf5_empty_and_truncated_files(tmp_path):
    text = tmp_path / "notes.hdf5"
    text.write_text("not a dataset")
    assert problems_of(text) == ["not an HDF5 file (no HDF5 signature)"]
    empty = tmp_path / "empty.hdf5"
    empty.write_bytes(b"")
    assert "empty" in problems_of(empty)[0]
    no_data = tmp_path / "nodata.hdf5"
    h5py.File(no_data, "w").close()
    assert problems_of(no_data) == ["file is empty: it holds no datasets"]
    good = write_dataset(tmp_path / "good.hdf5", n_rows=400)
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert any("truncated or corrupt" in p or "cannot be read" in p for p in problems_of(truncated))
    assert problems_of(tmp_path / "missing.hdf5") == ["file not found"]


def test_zero_rows_is_empty(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=0)
    assert any("0 rows" in p for p in problems_of(path))


def test_validate_cli_prints_tree_and_exit_codes(tmp_path, tiny_dataset):
    ok = run_cli("create_dataset.py", "--validate", "--hdf5_path", tiny_dataset)
    assert ok.returncode == 0, ok.stderr
    assert "├─ observations/" in ok.stdout
    assert "│  ├─ left_image: uint8, shape=(60, 16, 16, 3)" in ok.stdout
    assert "│  └─ joint: float32, shape=(60, 16)" in ok.stdout
    assert "✓" in ok.stdout
    bad = write_dataset(tmp_path / "bad.hdf5", skip=("rewards", "terminals"))
    res = run_cli("create_dataset.py", "--validate", "--hdf5_path", bad)
    assert res.returncode != 0
    assert f"{bad}: rewards: missing" in res.stdout and f"{bad}: terminals: missing" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr


def test_create_sample_cli_writes_a_valid_file(tmp_path):
    out = tmp_path / "s.hdf5"
    res = run_cli("create_dataset.py", "--create_sample", "--output", out, "--n_samples", 120, "--image_size", 24)
    assert res.returncode == 0, res.stderr
    summary = hdf5_format.inspect_hdf5(out)
    assert summary.ok and summary.n_rows == 120 and summary.image_shape == (24, 24)
    assert summary.attrs["simulator"] == "dual_arm_reach"


def test_episode_boundaries_and_timeouts_give_next_rows_and_not_done():
    terminals = np.array([0, 0, 1, 0, 0, 0, 0, 1], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)
    assert utils.episode_ranges(terminals, timeouts) == [(0, 3), (3, 5), (5, 8)]
    next_index, not_done, valid = utils.transition_indices(terminals, timeouts)
    # inside an episode: the next row; never across an episode end
    assert next_index.tolist() == [1, 2, 2, 4, 4, 6, 7, 7]
    assert not_done.tolist() == [1, 1, 0, 1, 1, 1, 1, 0]
    # a timeout row has no next observation in the file: no bootstrapping across it
    assert valid.tolist() == [True, True, True, True, False, True, True, True]


def test_observed_returns_run_to_a_terminal_and_skip_cut_off_episodes():
    rewards = np.array([1, 2, 3, 1, 1, 0, 0, 4], np.float32)
    terminals = np.array([0, 0, 1, 0, 0, 0, 0, 1], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)
    returns = utils.observed_returns(rewards, terminals, timeouts, discount=0.5)
    # episode 1 ends in a terminal: discounted sums to its end
    np.testing.assert_allclose(returns[:3], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3])
    # episode 2 was cut off by time: its unseen future is unknown, so no bound
    assert np.isneginf(returns[3:5]).all()
    np.testing.assert_allclose(returns[5:], [0.25 * 4, 0.5 * 4, 4])


def test_n_step_transitions_sum_rewards_up_to_the_episode_end():
    rewards = np.array([1, 2, 3, 1, 1, 0, 0, 4, 5], np.float32)
    terminals = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0], bool)
    # n_step=1 is the one-step transition: (r, next row, gamma * not_done)
    reward_sum, index, discount = utils.n_step_transitions(rewards, terminals, timeouts, 0.5, 1)
    next_index, not_done, valid = utils.transition_indices(terminals, timeouts)
    assert (index[valid] == next_index[valid]).all()
    np.testing.assert_allclose(reward_sum[valid], rewards[valid])
    np.testing.assert_allclose(discount[valid], 0.5 * not_done[valid])

    reward_sum, index, discount = utils.n_step_transitions(rewards, terminals, timeouts, 0.5, 2)
    # two rewards, then bootstrap from the observation two rows on with gamma^2
    assert reward_sum[0] == 1 + 0.5 * 2 and index[0] == 2 and discount[0] == 0.25
    # the terminal comes within the two rewards: no bootstrap
    assert reward_sum[1] == 2 + 0.5 * 3 and discount[1] == 0
    # a time-out episode: the sum stops before its last row, whose observation bootstraps
    assert reward_sum[3] == 1 and index[3] == 4 and discount[3] == 0.5
    # never past the episode: rows 5.. form one episode ending in a terminal at row 8
    assert reward_sum[7] == 4 + 0.5 * 5 and discount[7] == 0
    assert index[5] == 7 and discount[5] == 0.25


def test_n_step_transitions_match_their_definition_on_random_episodes():
    # the vectorised sums against the definition, row by row, for episodes of every kind
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        rewards = rng.normal(size=n).astype(np.float32)
        ends = rng.random(n) < 0.2
        terminals = ends & (rng.random(n) < 0.5)
        timeouts = ends & ~terminals
        timeouts[-1] |= not terminals[-1]
        for n_step in (1, 3, 100):
            reward_sum, index, discount = utils.n_step_transitions(rewards, terminals, timeouts, 0.9, n_step)
            for start, stop in utils.episode_ranges(terminals, timeouts):
                for t in range(start, stop):
                    k = min(n_step, stop - t if terminals[stop - 1] else stop - 1 - t)
                    if k <= 0:
                        continue
                    expected = sum(0.9 ** i * rewards[t + i] for i in range(k))
                    assert abs(reward_sum[t] - expected) < 1e-4
                    ends_here = terminals[stop - 1] and t + k == stop
                    assert index[t] == (stop - 1 if ends_here else t + k)
                    assert abs(discount[t] - (0.0 if ends_here else 0.9 ** k)) < 1e-6


def test_n_step_buffer_bootstraps_from_k_rows_on(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=40, episode_len=10)
    data = hdf5_format.load_dataset(path, progress=False)
    one = utils.MultimodalReplayBuffer(data, train_test_split=0.5, seed=0, discount=0.9, n_step=1)
    three = utils.MultimodalReplayBuffer(data, train_test_split=0.5, seed=0, discount=0.9, n_step=3)
    row = int(one.train_rows[0])   # the first row of an episode of 10: three rewards fit
    b1, b3 = one.gather(torch.tensor([row, row + 1, row + 2])), three.gather(torch.tensor([row]))
    assert (b3.next_images[0] == one.images[row + 3]).all()
    assert b3.reward.item() == pytest.approx(float(b1.reward[0] + 0.9 * b1.reward[1] + 0.81 * b1.reward[2]))
    assert b3.discount.item() == pytest.approx(0.9 ** 3)


def test_last_row_ending_no_episode_is_fixed_up_and_reported(tmp_path):
    n = 30
    terminals = np.zeros(n, bool)
    terminals[9] = True
    path = write_dataset(tmp_path / "d.hdf5", n_rows=n, timeouts=False, override={"terminals": terminals})
    summary = hdf5_format.inspect_hdf5(path)
    assert summary.ok and any("last row ends no episode" in w for w in summary.warnings)
    data = hdf5_format.load_dataset(path, progress=False)
    assert data.timeouts[-1] and not data.terminals[-1]
    assert utils.episode_ranges(data.terminals, data.timeouts) == [(0, 10), (10, 30)]


def test_split_is_by_whole_episodes(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=200, episode_len=10)
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), train_test_split=0.8, seed=3)
    train_eps = set(buffer.episode_of_row[buffer.train_rows.numpy()])
    test_eps = set(buffer.episode_of_row[buffer.test_rows.numpy()])
    assert train_eps and test_eps and not train_eps & test_eps
    assert len(train_eps) == 16 and len(test_eps) == 4
    assert set(buffer.eval_rows.numpy()) <= set(buffer.test_rows.numpy())


def test_masked_share_of_a_batch_comes_only_from_the_masked_episodes(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=200, episode_len=10)
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), train_test_split=0.8, seed=3)
    train_eps = sorted(set(buffer.train_episode_ids.tolist()))
    mask = torch.zeros(buffer.n_episodes, dtype=torch.bool)
    mask[train_eps[:2]] = True
    mask[buffer.test_episode_ids] = True   # a test episode is never drawn, masked or not
    seen_uniform = set()
    for _ in range(20):
        batch = buffer.sample(16, episode_mask=mask, masked_frac=0.75)
        assert set(batch.episode[4:].tolist()) <= set(train_eps[:2])
        seen_uniform |= set(batch.episode[:4].tolist())
    assert seen_uniform <= set(train_eps) and len(seen_uniform) > 2
    nothing = torch.zeros(buffer.n_episodes, dtype=torch.bool)   # none masked: uniform, not an error
    assert set(buffer.sample(64, episode_mask=nothing, masked_frac=1.0).episode.tolist()) <= set(train_eps)


def test_fewer_episodes_than_the_split_needs(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=10, episode_len=10)
    with pytest.raises(ValueError, match="at least 2"):
        utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False))


def test_normalisation_round_trips_and_uses_training_rows_only(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=100)
    data = hdf5_format.load_dataset(path, progress=False)
    buffer = utils.MultimodalReplayBuffer(data, train_test_split=0.8, seed=0)
    norm = buffer.normalization
    train_rows = np.isin(buffer.episode_of_row, buffer.train_episode_ids)
    assert np.allclose(norm.joint_mean, data.joint[train_rows].mean(0), atol=1e-5)
    action, joint = data.actions[:5], data.joint[:5]
    assert np.allclose(norm.unnormalize_action(norm.normalize_action(action, joint), joint), action, atol=1e-5)
    restored = utils.Normalization.from_state_dict(norm.state_dict())
    assert np.allclose(restored.action_std, norm.action_std) and restored.reward_scale == norm.reward_scale


def test_reward_scaling_keeps_the_sign_of_negative_rewards(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", override={"rewards": -np.linspace(1, 4, 60).astype(np.float32)})
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), train_test_split=0.8, seed=0, discount=0.99, n_step=1)
    assert buffer.rewards.max() < 0 and buffer.rewards.min() >= -1
    assert buffer.normalization.min_v == pytest.approx(buffer.rewards.min().item() / 0.01, rel=1e-4)
    assert buffer.normalization.max_v == 0


def test_images_stay_uint8_and_batches_hold_next_observations(tmp_path):
    path = write_dataset(tmp_path / "d.hdf5", n_rows=40, episode_len=10)
    data = hdf5_format.load_dataset(path, progress=False)
    assert data.images.dtype == np.uint8 and data.images.shape == (40, 3, 16, 16, 3)
    buffer = utils.MultimodalReplayBuffer(data, train_test_split=0.5, seed=0)
    batch = buffer.sample(16)
    assert batch.images.dtype == batch.next_images.dtype == torch.uint8
    assert batch.images.shape == (16, 3, 16, 16, 3) and batch.joint.dtype == torch.float32
    rows = buffer.train_rows[:8]
    b = buffer.gather(rows)
    nxt = buffer.next_index[rows]
    assert (b.next_images == buffer.images[nxt]).all()


def test_chunked_gzip_aloha_shaped_dataset_loads(tmp_path):
    path = write_dataset(tmp_path / "aloha.hdf5", n_rows=50, joint_dim=14, action_dim=14, image_shape=(48, 64),
                         compression="gzip", chunks=16)
    data = hdf5_format.load_dataset(path, progress=False)
    assert data.images.shape == (50, 3, 48, 64, 3) and data.joint.shape == (50, 14)
    with h5py.File(path) as f:
        assert np.array_equal(data.images[:, 2], f["observations/global_image"][:])


def test_joint_target_actions_are_learned_relative_to_the_joints(tmp_path):
    """Targets that track the joints are learned as the change; other dimensions stay absolute."""
    rng = np.random.default_rng(0)
    joint = rng.normal(0, 1.0, size=(100, 4)).astype(np.float32)
    actions = joint + rng.normal(0, 0.05, size=joint.shape).astype(np.float32)
    actions[:, 3] = rng.integers(0, 2, 100)        # a gripper command: not a joint target
    path = write_dataset(tmp_path / "d.hdf5", n_rows=100, joint_dim=4, action_dim=4,
                         override={"observations/joint": joint, "actions": actions})
    data = hdf5_format.load_dataset(path, progress=False)
    auto = utils.MultimodalReplayBuffer(data, train_test_split=0.8, seed=0).normalization
    assert auto.action_relative.tolist() == [1, 1, 1, 0]
    assert (auto.action_std[:3] < 0.1).all()
    none = utils.MultimodalReplayBuffer(data, train_test_split=0.8, seed=0, relative_actions="none").normalization
    assert none.action_relative.tolist() == [0, 0, 0, 0]
    assert np.allclose(auto.unnormalize_action(auto.normalize_action(actions, joint), joint), actions, atol=1e-5)
    # widths that differ cannot be relative
    path2 = write_dataset(tmp_path / "e.hdf5", joint_dim=6, action_dim=4)
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path2, progress=False), train_test_split=0.8, seed=0)
    assert not buffer.normalization.action_relative.any()
