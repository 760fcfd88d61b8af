"""The training CLI as a user runs it."""
import csv
import json
import os

import numpy as np
import pytest

from algos import algos_vae_multimodal as algos
from conftest import TINY_TRAIN, run_cli, write_dataset


def read_progress(folder):
    with open(os.path.join(folder, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


def train(tmp_path, data, exp, *extra):
    return run_cli("main_multimodal.py", "--hdf5_path", data, "--log_dir", tmp_path / "results", "--ExpID", exp,
                   *TINY_TRAIN, *extra, cwd=tmp_path)


def test_short_run_writes_every_output_with_finite_losses(tmp_path, tiny_dataset):
    res = train(tmp_path, tiny_dataset, "t1", "--max_timesteps", 12, "--eval_freq", 6, "--save_freq", 6)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "results" / "Expt1" / "multimodal_robot"
    files = set(os.listdir(folder))
    # --keep_last 1 (the default): the newest step checkpoint only, model_final the same file
    assert files == {"progress.csv", "progress.png", "params.json", "model_12.pth", "model_final.pth",
                     "policy_best.pth", "policy_final.pth"}
    rows = read_progress(folder)
    assert [int(r["steps"]) for r in rows] == [6, 12]
    for name in ("critic_loss", "vae_loss", "actor_loss", "test_action_mse", "test_q_mean", "test_v_mean",
                 "test_advantage_mean", "test_positive_advantage_frac", "steps_per_s"):
        assert all(np.isfinite(float(r[name])) for r in rows), name
    # no simulator named in this file: no returns are reported, none are invented
    assert all(r["AverageReturn"] == "" for r in rows)
    params = json.loads((folder / "params.json").read_text())
    assert params["config"]["batch_size"] == 4 and params["dataset"]["rows"] == 60
    assert params["best_model_criterion"]["metric"] == "test_weighted_action_mse"
    assert str(folder) in res.stdout


def test_next_best_replaces_the_pick_with_a_later_checkpoint_within_the_tolerance():
    """A new best always replaces the pick; a later checkpoint within the tolerance of the best
    so far does too, measured from the best value, so a slow drift upwards stops being picked."""
    from algos.experiment import next_best
    best = next_best(None, 0.50, 250, "m", "min", 0.02)
    best = next_best(best, 0.30, 500, "m", "min", 0.02)
    assert (best["step"], best["best_value"]) == (500, 0.30)
    best = next_best(best, 0.305, 750, "m", "min", 0.02) or best
    assert (best["step"], best["value"], best["best_value"]) == (750, 0.305, 0.30)
    best = next_best(best, 0.31, 1000, "m", "min", 0.02) or best   # 0.31 is 3.3% above 0.30
    assert best["step"] == 750
    assert next_best(best, 0.3, 1250, "m", "min", 0.0) is None      # tolerance 0: only a strict improvement
    assert next_best({"value": 2.0, "step": 1, "metric": "m"}, 1.99, 2, "m", "max", 0.01)["step"] == 2


def test_policy_best_is_the_pick_of_the_recorded_criterion(tmp_path, tiny_dataset):
    """policy_best.pth holds the step that the criterion's rule (params.json's metric and
    tolerance, experiment.next_best) picks from the values progress.csv recorded."""
    from algos.experiment import next_best
    res = train(tmp_path, tiny_dataset, "pick", "--max_timesteps", 12, "--eval_freq", 3, "--save_freq", 12)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "results" / "Exppick" / "multimodal_robot"
    rule = json.loads((folder / "params.json").read_text())["best_model_criterion"]
    assert rule["tolerance"] == algos.MultimodalLatent.offline_criterion_tolerance
    expected = None
    for row in read_progress(folder):
        expected = next_best(expected, float(row[rule["metric"]]), int(row["steps"]), rule["metric"], "min",
                             rule["tolerance"]) or expected
    recorded = algos.read_checkpoint(str(folder / "policy_best.pth"))["extra"]["best"]
    assert recorded["step"] == expected["step"]


def test_from_checkpoint_in_a_fresh_process_gives_an_action_of_the_files_width(tmp_path):
    data = write_dataset(tmp_path / "d.hdf5", joint_dim=14, action_dim=14, image_shape=(12, 20))
    res = train(tmp_path, data, "w", "--max_timesteps", 4, "--eval_freq", 4)
    assert res.returncode == 0, res.stderr
    code = ("from algos import algos_vae_multimodal as algos; import numpy as np, glob;"
            "p = algos.MultimodalLatent.from_checkpoint(glob.glob('results/Expw/multimodal_robot/model_final*')[0]);"
            "img = np.zeros((12, 20, 3), np.uint8); a = p.select_action(img, img, img, np.zeros(14));"
            "print(a.shape, a.dtype)")
    import subprocess
    import sys
    from conftest import ENV, ROOT
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(ENV, PYTHONPATH=ROOT),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(14,) float32"


def test_existing_experiment_is_not_overwritten(tmp_path, tiny_dataset):
    assert train(tmp_path, tiny_dataset, "x", "--max_timesteps", 2, "--eval_freq", 2).returncode == 0
    again = train(tmp_path, tiny_dataset, "x", "--max_timesteps", 2, "--eval_freq", 2)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr
    over = train(tmp_path, tiny_dataset, "x", "--max_timesteps", 2, "--eval_freq", 2, "--overwrite")
    assert over.returncode == 0, over.stderr


def test_default_exp_ids_never_collide(tmp_path, tiny_dataset):
    for _ in range(2):
        res = run_cli("main_multimodal.py", "--hdf5_path", tiny_dataset, "--log_dir", tmp_path / "r",
                      *TINY_TRAIN, "--max_timesteps", 2, "--eval_freq", 2, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "r")) == ["Exp0001", "Exp0002"]


def test_load_model_resumes_the_step_count_into_a_new_exp_id(tmp_path, tiny_dataset):
    assert train(tmp_path, tiny_dataset, "a", "--max_timesteps", 6, "--eval_freq", 3, "--save_freq", 3,
                 "--keep_last", 0).returncode == 0
    res = train(tmp_path, tiny_dataset, "b", "--max_timesteps", 9, "--eval_freq", 3, "--load_model", 3)
    assert res.returncode == 0, res.stderr
    assert "Expa/multimodal_robot/model_3.pth at step 3" in res.stdout
    rows = read_progress(tmp_path / "results" / "Expb" / "multimodal_robot")
    assert [int(r["steps"]) for r in rows] == [6, 9]
    final = algos.read_checkpoint(tmp_path / "results" / "Expb" / "multimodal_robot" / "model_final.pth")
    assert final["total_it"] == 9


def test_non_16d_non_square_dataset_trains(tmp_path):
    data = write_dataset(tmp_path / "aloha.hdf5", joint_dim=14, action_dim=14, image_shape=(12, 20),
                         compression="gzip", chunks=8)
    res = train(tmp_path, data, "aloha", "--max_timesteps", 4, "--eval_freq", 2)
    assert res.returncode == 0, res.stderr
    ckpt = algos.read_checkpoint(tmp_path / "results" / "Expaloha" / "multimodal_robot" / "model_final.pth")
    assert ckpt["shapes"]["joint_dim"] == 14 and ckpt["shapes"]["image_shape"] == [12, 20]


def test_bc_baseline_trains_through_the_same_cli(tmp_path, tiny_dataset):
    res = train(tmp_path, tiny_dataset, "bc", "--algo", "bc", "--max_timesteps", 4, "--eval_freq", 2)
    assert res.returncode == 0, res.stderr
    rows = read_progress(tmp_path / "results" / "Expbc" / "multimodal_robot")
    assert all(np.isfinite(float(r["bc_loss"])) for r in rows)


@pytest.mark.slow
def test_built_in_default_runs_with_no_arguments(tmp_path):
    res = run_cli("main_multimodal.py", "--device", "cpu", "--max_timesteps", 4, "--eval_freq", 2,
                  "--eval_episodes", 2, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    assert os.path.exists(tmp_path / "results" / "sample_data.hdf5")
    folder = tmp_path / "results" / "Exp0001" / "multimodal_robot"
    rows = read_progress(folder)
    assert all(float(r["AverageReturn"]) == float(r["AverageReturn"]) for r in rows)
    assert {"progress.png", "policy_best.pth", "policy_final.pth", "model_final.pth"} <= set(os.listdir(folder))


def test_help_formats_and_names_the_flags_and_the_judge_choices():
    """--help formats (a stray '%' in a setting's help used to crash it) and names the main
    flags and --episode_judge's choices."""
    import main_multimodal
    text = main_multimodal.build_parser().format_help()
    for name in ("hdf5_path", "max_timesteps", "episode_judge", "judge_expectile", "kept_batch_frac", "seed"):
        assert f"--{name}" in text
    assert "{return,critic}" in text
