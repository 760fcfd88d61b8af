"""The built-in simulator, its sample data, and evaluation by real rollouts."""
import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from algos import algos_vae_multimodal as algos
from algos import simulator
from algos import hdf5_format
from algos import utils_multimodal as utils
from conftest import ROOT, TINY_TRAIN, run_cli


def test_interface_shapes_and_episode_end():
    env = simulator.DualArmReach(image_size=(24, 40), max_steps=5)
    obs = env.reset(seed=3)
    for key in hdf5_format.IMAGE_KEYS:
        assert obs[key].shape == (24, 40, 3) and obs[key].dtype == np.uint8
    assert obs["joint"].shape == (16,) and obs["joint"].dtype == np.float32
    for t in range(5):
        obs, reward, terminated, truncated, info = env.step(obs["joint"].copy())   # hold still
        assert np.isfinite(reward) and not terminated
    assert truncated and not info["success"]


def test_joints_move_toward_targets_at_bounded_speed():
    env = simulator.DualArmReach(image_size=16)
    obs = env.reset(seed=0)
    target = obs["joint"] + 1.0
    obs2, *_ = env.step(target)
    moved = obs2["joint"] - obs["joint"]
    assert np.allclose(moved[[0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14]], simulator.JOINT_SPEED, atol=1e-5)
    assert np.allclose(moved[[7, 15]], simulator.GRIPPER_SPEED, atol=1e-5)
    obs3, *_ = env.step(obs2["joint"] + 0.01)
    assert np.allclose(obs3["joint"] - obs2["joint"], 0.01, atol=1e-5)


def test_goal_is_visible_in_the_global_view_but_absent_from_the_joint_vector():
    a = simulator.DualArmReach(image_size=32)
    b = simulator.DualArmReach(image_size=32)
    a.reset(seed=1)
    b.reset(seed=2)
    b.q, b.gripper = a.q.copy(), a.gripper.copy()   # same robot state, other box positions
    b._update_kinematics()
    oa, ob = a.observation(), b.observation()
    np.testing.assert_array_equal(oa["joint"], ob["joint"])
    assert not np.array_equal(oa["global_image"], ob["global_image"])
    # the red goal box is drawn where it is: its centre pixel is red in the global view
    col = int((a.goal[0] + 1) / 2 * 32)
    row = int(32 - 1 - (a.goal[1] + 1) / 2 * 32)
    r, g, bl = oa["global_image"][row, col].astype(int)
    assert r > 150 and g < 100 and bl < 100


def test_scripted_behaviours_are_distinct_modes():
    seeds = list(range(8))
    refs = simulator.reference_returns("dual_arm_reach", {"image_size": [16, 16]}, seeds,
                                       behaviours=("expert", "wrong", "noisy"))
    # the expert solves the task; the wrong operator and noisy play both fall far short of it
    assert refs["expert"] > refs["wrong"] + 1.0 and refs["expert"] > refs["noisy"] + 1.0
    # same start, different intentions: after 20 steps the arms stand far apart
    final = {}
    for name in ("expert", "wrong"):
        env = simulator.DualArmReach(image_size=16)
        obs = env.reset(seed=5)
        act = env.reference_policy(name, 0)
        for _ in range(20):
            obs, *_ = env.step(act(env))
        final[name] = obs["joint"]
    assert np.abs(final["expert"] - final["wrong"])[:7].max() > 0.1


def test_expert_solves_and_wrong_operator_never_does():
    env = simulator.DualArmReach(image_size=16)
    for behaviour, expected in (("expert", True), ("wrong", False)):
        for seed in range(5):
            env.reset(seed=seed)
            op = env.reference_policy(behaviour, seed)
            done = False
            while not done:
                _, _, terminated, truncated, info = env.step(op(env))
                done = terminated or truncated
            assert info["success"] == expected, (behaviour, seed)


def test_sample_data_contains_its_modes_and_names_its_simulator(sim_dataset):
    with h5py.File(sim_dataset) as f:
        attrs = dict(f.attrs)
        behaviour = f["behaviour"][:]
        terminals, timeouts = f["terminals"][:], f["timeouts"][:]
    assert attrs["simulator"] == "dual_arm_reach"
    assert json.loads(attrs["simulator_config"])["image_size"] == [16, 16]
    names = json.loads(attrs["behaviour_names"])
    episodes = utils.episode_ranges(terminals, timeouts)
    by_behaviour = {}
    for start, stop in episodes:
        by_behaviour.setdefault(names[behaviour[start]], []).append((start, stop))
        assert len(set(behaviour[start:stop])) == 1
    assert set(by_behaviour) == {"expert", "wrong", "noisy"}
    counts = [len(v) for v in by_behaviour.values()]
    assert max(counts) - min(counts) <= 1   # the default mix: a third of the episodes each
    # expert episodes end in success (a terminal), the wrong operator's never do
    assert all(terminals[stop - 1] for start, stop in by_behaviour["expert"][:-1])
    assert not any(terminals[start:stop].any() for start, stop in by_behaviour["wrong"])


def test_mix_flag_sets_the_share_of_episodes(tmp_path):
    path = tmp_path / "m.hdf5"
    info = simulator.create_sample_dataset(path, n_samples=400, image_size=(16, 16),
                                           mix=simulator.parse_mix("expert=0.75,noisy=0.25"), progress=False)
    counts = info["episodes_per_behaviour"]
    assert set(counts) == {"expert", "noisy"}
    assert abs(counts["expert"] / info["episodes"] - 0.75) < 0.1
    with pytest.raises(ValueError, match="bad --mix entry"):
        simulator.parse_mix("expert=0.5,robot=0.5")


def run_operator(env, behaviour, seed):
    """One episode of a scripted operator; returns (steps, success, the env at the end)."""
    env.reset(seed=seed)
    op = env.reference_policy(behaviour, seed + 1)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, info = env.step(op(env))
        steps += 1
        done = terminated or truncated
    return steps, info["success"], env


def test_stop_short_operator_heads_for_the_right_box_and_never_succeeds():
    reach = simulator.DualArmReach(image_size=16)
    for seed in range(5):
        _, success, env = run_operator(reach, "short", seed)
        distances = env.handle_distances()
        assert not success and np.all(distances > simulator.SUCCESS_RADIUS), seed
        assert np.all(distances < 0.35), seed                       # close to the red box's handles...
        assert np.all(env.handle_distances(env.distractor) > distances), seed   # ...not the blue one's
    carry = simulator.DualArmCarry(image_size=16)
    for seed in range(5):
        _, success, env = run_operator(carry, "short", seed)
        # carried toward the zone and set down short of it
        assert not success and simulator.PLACE_RADIUS < env.box_to_zone() < 0.35, seed


def test_hesitant_operator_is_slower_than_the_expert_or_runs_out_of_time():
    for env in (simulator.DualArmReach(image_size=16), simulator.DualArmCarry(image_size=16)):
        for seed in range(5):
            expert_steps, expert_success, _ = run_operator(env, "expert", seed)
            steps, success, _ = run_operator(env, "hesitant", seed)
            assert expert_success and (not success or steps > expert_steps), (env.name, seed)
    # it holds still now and then: some of its actions are the joints where they are
    env = simulator.DualArmReach(image_size=16)
    env.reset(seed=0)
    op = env.reference_policy("hesitant", 1)
    pauses = 0
    for _ in range(50):
        obs = env.observation()
        action = op(env)
        pauses += np.allclose(action, obs["joint"], atol=1e-6)
        env.step(action)
    assert pauses >= 3


def test_carry_expert_places_the_red_box_and_the_wrong_operator_the_blue_one():
    env = simulator.DualArmCarry(image_size=16)
    successes = 0
    for seed in range(5):
        env.reset(seed=seed)
        start = env.box_to_zone()
        steps, success, env = run_operator(env, "expert", seed)
        assert start >= env.min_zone_distance
        successes += success
        if success:
            assert env.box_to_zone() < simulator.PLACE_RADIUS and np.all(env.gripper < simulator.GRIPPER_OPEN)
    assert successes >= 4
    for seed in range(5):
        steps, success, env = run_operator(env, "wrong", seed)
        assert not success and steps == env.max_steps, seed
        # the same skill, confidently done on the wrong box
        assert np.linalg.norm(env.distractor - env.zone) < simulator.PLACE_RADIUS, seed


def test_carried_box_moves_only_while_both_grippers_hold_it():
    env = simulator.DualArmCarry(image_size=16)
    env.reset(seed=3)
    op = env.reference_policy("expert", 4)
    while env.held_box() != "goal":
        env.step(op(env))
    box, hands = env.goal.copy(), env.end_effectors.copy()
    env.step(op(env))                                           # carrying: the box follows the grippers
    assert np.allclose(env.goal - box, (env.end_effectors - hands).mean(0))
    assert np.linalg.norm(env.goal - box) > 0.01
    action = op(env)
    action[15] = 0.0                                            # the right gripper lets go
    box = env.goal.copy()
    env.step(action)
    assert env.held_box() is None and np.array_equal(env.goal, box)


def test_carry_zone_is_visible_in_the_global_view_but_absent_from_the_joint_vector():
    a = simulator.DualArmCarry(image_size=32)
    b = simulator.DualArmCarry(image_size=32)
    a.reset(seed=1)
    b.reset(seed=1)
    b.zone = -a.zone * np.array([1.0, 0.5])            # same robot, same boxes, the zone elsewhere
    oa, ob = a.observation(), b.observation()
    np.testing.assert_array_equal(oa["joint"], ob["joint"])
    assert not np.array_equal(oa["global_image"], ob["global_image"])
    col = int((a.zone[0] + 1) / 2 * 32)
    row = int(32 - 1 - (a.zone[1] + 1) / 2 * 32)
    r, g, bl = oa["global_image"][row, col].astype(int)
    assert g > 150 and bl > 150 and r < 100               # teal


def test_variants_split_into_dev_and_test_covering_every_axis():
    dev, test = simulator.variant_names("dev"), simulator.variant_names("test")
    assert len(simulator.VARIANTS) >= 6 and dev and test
    assert not set(dev) & set(test) and set(dev) | set(test) == set(simulator.VARIANTS)

    def axes(name):
        spec = simulator.VARIANTS[name]
        factory = simulator.SIMULATORS[spec["simulator"]]
        config = dict(spec["config"])
        return {"task": spec["simulator"], "reward": config.get("reward", "dense"),
                "steps": config.get("max_steps", factory.default_max_steps),
                "joint_speed": config.get("joint_speed", simulator.JOINT_SPEED), "mix": spec["mix"]}
    for split in (dev, test):
        assert {axes(n)["reward"] for n in split} == {"dense", "sparse"}
        assert {axes(n)["task"] for n in split} == set(simulator.SIMULATORS)
    for name, spec in simulator.VARIANTS.items():
        assert spec["description"] and spec["split"] in simulator.SPLITS
        assert spec["mix"].get("wrong", 0) + spec["mix"].get("short", 0) > 0, name   # a clearly bad operator
        assert set(spec["mix"]) <= set(simulator.OPERATORS[spec["simulator"]]), name
    for t in test:
        assert all(axes(t) != axes(d) for d in dev), t
    assert any(axes(n)["steps"] >= 100 for n in simulator.VARIANTS)


@pytest.mark.parametrize("variant", list(simulator.VARIANTS))
def test_every_variant_records_a_valid_file_that_names_it(tmp_path, variant):
    spec = simulator.VARIANTS[variant]
    path = tmp_path / f"{variant}.hdf5"
    info = simulator.create_variant_dataset(path, variant, 200, 16, seed=2, progress=False)
    summary = hdf5_format.inspect_hdf5(path)
    assert summary.ok, summary.problems
    attrs = summary.attrs
    assert attrs["variant"] == variant and attrs["variant_split"] == spec["split"]
    assert attrs["simulator"] == spec["simulator"] == info["simulator"]
    config = json.loads(attrs["simulator_config"])
    assert config["image_size"] == [16, 16] and config["reward"] == attrs["reward_type"]
    assert {k: config[k] for k in spec["config"]} == spec["config"]
    assert json.loads(attrs["behaviour_mix"]) == spec["mix"] and json.loads(attrs["variant_overrides"]) == {}
    names = json.loads(attrs["behaviour_names"])
    assert set(names) == set(spec["mix"])
    with h5py.File(path) as f:
        behaviour, rewards = f["behaviour"][:], f["rewards"][:]
        terminals, timeouts = f["terminals"][:], f["timeouts"][:]
    episodes = utils.episode_ranges(terminals, timeouts)
    for start, stop in episodes:
        assert len(set(behaviour[start:stop])) == 1
        who = names[behaviour[start]]
        if who in ("wrong", "short", "noisy"):
            assert not terminals[start:stop].any(), (who, start)        # never succeeds
        if who == "expert" and stop < len(rewards):
            assert terminals[stop - 1], start                           # succeeds unless cut by the file's end
    if attrs["reward_type"] == "sparse":
        assert set(np.unique(rewards)) <= {0.0, 1.0}
        np.testing.assert_array_equal(rewards == 1, terminals)       # 1 exactly at the success rows
    if config["max_steps"] >= 100:
        assert max(stop - start for start, stop in episodes) > 100


def test_simulator_and_dataset_tool_import_without_torch():
    code = "import sys, algos.simulator, create_dataset; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_dataset_cli_lists_and_records_variants(tmp_path):
    res = run_cli("create_dataset.py", "--list_variants")
    assert res.returncode == 0, res.stderr
    for name, spec in simulator.VARIANTS.items():
        assert f"| {name} | {spec['split']} | {spec['simulator']} |" in res.stdout
    out = tmp_path / "v.hdf5"
    res = run_cli("create_dataset.py", "--create_sample", "--variant", "reach_sparse_short", "--output", out,
                  "--n_samples", 120, "--image_size", 16, "--max_episode_steps", 30, "--task", "dual_arm_carry")
    assert res.returncode == 0, res.stderr
    assert "variant 'reach_sparse_short' (dev)" in res.stdout
    attrs = hdf5_format.inspect_hdf5(out).attrs
    assert attrs["variant"] == "reach_sparse_short" and attrs["variant_split"] == "dev"
    assert attrs["simulator"] == "dual_arm_carry" and attrs["reward_type"] == "sparse"   # flags override the variant
    assert json.loads(attrs["simulator_config"])["max_steps"] == 30
    assert json.loads(attrs["variant_overrides"]) == {"simulator": "dual_arm_carry", "max_steps": 30}
    plain = tmp_path / "p.hdf5"
    res = run_cli("create_dataset.py", "--create_sample", "--task", "dual_arm_carry", "--output", plain,
                  "--n_samples", 100, "--image_size", 16, "--mix", "expert=0.5,short=0.5")
    assert res.returncode == 0, res.stderr
    attrs = hdf5_format.inspect_hdf5(plain).attrs
    assert attrs["simulator"] == "dual_arm_carry" and "variant" not in attrs
    assert json.loads(attrs["simulator_config"])["max_steps"] == simulator.DualArmCarry.default_max_steps
    assert json.loads(attrs["behaviour_names"]) == ["expert", "short"]
    res = run_cli("create_dataset.py", "--create_sample", "--variant", "no_such_variant", "--output", plain)
    assert res.returncode != 0 and "no_such_variant" in res.stderr


def test_plug_in_simulator_by_import_path():
    env = simulator.make_simulator("algos.simulator:DualArmReach", {"image_size": [8, 8]})
    assert env.reset(seed=0)["global_image"].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="unknown simulator"):
        simulator.make_simulator("no_such_sim")


def test_eval_run_writes_real_returns(tmp_path, sim_dataset):
    res = run_cli("main_multimodal.py", "--hdf5_path", sim_dataset, "--log_dir", tmp_path / "results",
                  "--ExpID", "sim", *TINY_TRAIN, "--max_timesteps", 4, "--eval_freq", 2, "--eval_episodes", 3,
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "results" / "Expsim" / "multimodal_robot"
    with open(folder / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    params = json.loads((folder / "params.json").read_text())
    assert params["best_model_criterion"]["metric"] == "NormalizedScore"
    refs = params["simulator"]["reference_returns"]
    assert refs["expert"] > refs["noisy"]
    # the last row's return is what model_final really does on the evaluation seeds
    agent = algos.MultimodalLatent.from_checkpoint(folder / "model_final.pth")
    seeds = params["simulator"]["eval_seeds"]
    envs = [simulator.make_simulator("dual_arm_reach", params["simulator"]["config"]) for _ in seeds]
    returns, _, _ = simulator.rollout(envs, lambda obs: agent.select_action(
        *(np.stack([o[k] for o in obs]) for k in hdf5_format.IMAGE_KEYS), np.stack([o["joint"] for o in obs])), seeds)
    last = rows[-1]
    assert float(last["AverageReturn"]) == pytest.approx(returns.mean(), rel=1e-4, abs=1e-4)
    assert float(last["StdReturn"]) == pytest.approx(returns.std(), rel=1e-4, abs=1e-4)
    expected_score = (returns.mean() - refs["noisy"]) / (refs["expert"] - refs["noisy"])
    assert float(last["NormalizedScore"]) == pytest.approx(expected_score, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_short_lapo_run_improves_over_its_untrained_self(tmp_path):
    """LAPO on a tiny expert-heavy task: after a few hundred steps it beats its initial policy."""
    path = tmp_path / "easy.hdf5"
    simulator.create_sample_dataset(path, n_samples=3000, image_size=(16, 16), seed=3,
                                    mix={"expert": 0.8, "noisy": 0.2}, progress=False)
    torch.manual_seed(0)
    buffer = utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), train_test_split=0.9, seed=0)
    agent = algos.MultimodalLatent(replay_buffer=buffer, device="cpu")
    seeds = list(range(100, 110))
    envs = [simulator.DualArmReach(image_size=16) for _ in seeds]

    def score():
        returns, _, _ = simulator.rollout(envs, lambda obs: agent.select_action(
            *(np.stack([o[k] for o in obs]) for k in hdf5_format.IMAGE_KEYS), np.stack([o["joint"] for o in obs])), seeds)
        return returns.mean()
    before = score()
    agent.train(400, 32)
    after = score()
    assert after > before + 0.3, (before, after)


def test_closed_loop_diagnostic_compares_each_visited_state_with_the_expert(tmp_path, sim_dataset):
    """benchmarks/closed_loop.py: a policy that holds still is reported as moving 0 of the
    expert's step at every state it visits, binned by the distance the simulator reports;
    executing the expert's joint targets instead moves the arms, its grippers alone do not;
    the CLI prints the table for a real checkpoint and names a file without a simulator."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("closed_loop", os.path.join(ROOT, "benchmarks", "closed_loop.py"))
    closed_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(closed_loop)

    class HoldStill:
        normalization = utils.Normalization.from_data(np.zeros((2, 16), np.float32), np.ones((2, 16), np.float32),
                                                      np.ones(2, np.float32), 0.99, relative_actions="all")
        normalization.action_relative[[7, 15]] = 0   # grippers: absolute

        def act_on_observations(self, observations):
            return np.stack([o["joint"] for o in observations])

    with h5py.File(sim_dataset) as f:
        name, config = simulator.simulator_from_attrs(dict(f.attrs))
    config = dict(config, max_steps=6)
    records, successes = closed_loop.compare_with_expert(HoldStill(), name, config, seeds=[5, 6])
    assert len(records) == 12 and not successes.any()          # 2 episodes x 6 steps, none solved
    assert np.all(records[:, 3] == 0) and np.all(np.isfinite(records[:, 0]))
    rows = closed_loop.summary_rows(records, successes)
    assert sum(row[2] for row in rows) == 12
    assert all(label == "failed" for _, label, *_ in rows)
    no_distance = records.copy()
    no_distance[:, 0] = np.nan   # a plug-in simulator whose info has no "distance"
    assert [row[:3] for row in closed_loop.summary_rows(no_distance, successes)] == [("not reported", "failed", 12)]
    # executing the expert's joint targets moves the arms to the goal; the records still judge
    # the policy's own (hold-still) step
    moved, _ = closed_loop.compare_with_expert(HoldStill(), name, config, seeds=[5, 6], expert_dims="joint_targets")
    for episode in (0, 1):
        distance = moved[moved[:, 1] == episode, 0]
        assert distance[-1] < distance[0] - 0.1
        assert np.all(records[records[:, 1] == episode, 0] == records[records[:, 1] == episode, 0][0])
    start, end = closed_loop.episode_distances(moved, 2)        # the expert's arms close in, episode by episode
    assert np.all(end < start - 0.1) and start[0] == moved[moved[:, 1] == 0, 0][0]
    assert np.all(moved[:, 3] == 0)
    # the expert's grippers alone leave the hold-still arms where they are
    gripped, _ = closed_loop.compare_with_expert(HoldStill(), name, config, seeds=[5, 6], expert_dims="other")
    assert np.array_equal(gripped[:, 0], records[:, 0])

    agent = algos.MultimodalLatent(image_shape=(16, 16), obs_feature_dim=32, image_feature_dim=16, device="cpu")
    agent.save("model_0", str(tmp_path))
    res = run_cli("benchmarks/closed_loop.py", "--data", sim_dataset, "--episodes", 2, tmp_path / "model_0.pth")
    assert res.returncode == 0, res.stderr
    assert "| distance to goal |" in res.stdout and "over 2 episodes" in res.stdout
    assert "success with the expert's joint-target dims" in res.stdout
    no_sim = tmp_path / "plain.hdf5"
    h5py.File(no_sim, "w").close()
    res = run_cli("benchmarks/closed_loop.py", "--data", no_sim, tmp_path / "model_0.pth")
    assert res.returncode != 0 and "plain.hdf5" in res.stderr and "names a simulator" in res.stderr
