"""The benchmark scripts: suite.py's statistics and tables and one tiny end-to-end run; bench_train.py and bench_data.py on tiny settings."""
import importlib.util
import json
import math
import os
import sys

import h5py
import numpy as np
import pytest

from conftest import ENV, ROOT, run_cli

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import suite  # noqa: E402
from algos import simulator  # noqa: E402
from algos import utils_multimodal as utils  # noqa: E402


def test_spearman_matches_a_hand_computed_example_with_ties():
    # x ranks 1, 2.5, 2.5, 4 (the tie shares ranks 2 and 3); y ranks 1, 3, 2, 4.
    # Centred: dx = (-1.5, 0, 0, 1.5), dy = (-1.5, 0.5, -0.5, 1.5): sum dx*dy = 4.5,
    # sum dx^2 = 4.5, sum dy^2 = 5, so rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert suite.rankdata([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert suite.rankdata([3, 1, 3, 3, 0]).tolist() == [4, 2, 4, 4, 1]
    assert suite.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert suite.spearman([10, 20, 30, 40], [1, 4, 9, 16]) == pytest.approx(1.0)    # monotone, not linear
    assert suite.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert suite.spearman([1, 2, np.nan, 4], [1, 2, 0, 3]) == pytest.approx(1.0)   # the NaN pair is dropped
    assert math.isnan(suite.spearman([1, 1, 1], [1, 2, 3]))                        # constant: undefined
    assert math.isnan(suite.spearman([1], [2]))


def _scores(returns_by_step, best_step):
    """A run's cached scores: step checkpoints, model_final at the last step, model_best."""
    out = {f"model_{s}": {"step": s, "return": r, "success": r} for s, r in returns_by_step.items()}
    last = max(returns_by_step)
    out["model_final"] = dict(out[f"model_{last}"])
    out["model_best"] = dict(out[f"model_{best_step}"])
    return out


def test_run_summary_and_tables():
    refs = {"expert": 1.0, "noisy": 0.0}   # normalised score = return
    crit = {10: 0.5, 20: 0.3, 30: 0.4}      # lower is better: ranks steps 20, 30, 10
    lapo0 = suite.summarize_run(_scores({10: 0.2, 20: 0.8, 30: 0.6}, best_step=20), crit, refs)
    assert lapo0["steps"] == [10, 20, 30] and lapo0["curve"] == pytest.approx([0.2, 0.8, 0.6])
    assert lapo0["final"] == pytest.approx(0.6) and lapo0["peak"] == pytest.approx(0.8)
    assert lapo0["peak_minus_final"] == pytest.approx(0.2) and lapo0["picked_minus_peak"] == pytest.approx(0.0)
    assert lapo0["spearman"] == pytest.approx(1.0)
    lapo1 = suite.summarize_run(_scores({10: 0.4, 20: 0.5, 30: 0.9}, best_step=10), crit, refs)
    assert lapo1["picked_minus_peak"] == pytest.approx(-0.5)
    assert lapo1["spearman"] == pytest.approx(0.5)    # -crit ranks (1, 3, 2) against scores (1, 2, 3)
    two = suite.summarize_run(_scores({10: 0.1, 20: 0.2}, best_step=20), crit, refs)
    assert two["spearman"] is None                    # two checkpoints always correlate +-1
    bc = {s: suite.summarize_run(_scores({10: 0.3, 20: 0.3, 30: 0.3 + 0.1 * s}, best_step=30), crit, refs)
          for s in (0, 1)}
    runs = {"reach_wrong40": {"lapo": {0: lapo0, 1: lapo1}, "bc": bc},
            "carry_dense": {"lapo": {0: lapo0, 1: lapo1}, "bc": bc}}
    summary, mean = suite.aggregate(runs, ["lapo", "bc"], ["reach_wrong40", "carry_dense"])
    final = summary["reach_wrong40"]["lapo"]["final"]
    assert final["mean"] == pytest.approx(0.75) and final["std"] == pytest.approx(0.15)   # ddof=0
    assert summary["reach_wrong40"]["gap"]["final"]["mean"] == pytest.approx(0.75 - 0.35)
    assert mean["lapo"]["final"]["mean"] == pytest.approx(0.75)
    lines = suite.markdown_tables("dev", ["reach_wrong40", "carry_dense"], ["lapo", "bc"], summary, mean)
    text = "\n".join(lines)
    assert lines[0].startswith("## dev split")
    assert ("| reach_wrong40 | LAPO | 2 | 0.75 ± 0.15 | 0.60 ± 0.20 | 0.85 ± 0.05 | +0.10 ± 0.10 | +0.75 ± 0.25 "
            "| -0.25 ± 0.25 |") in text
    # one BC seed's curve is constant: its rank correlation is undefined and left out
    assert ("| reach_wrong40 | BC | 2 | 0.35 ± 0.05 | 0.35 ± 0.05 | 0.35 ± 0.05 | +0.00 ± 0.00 | +0.00 (1 of 2) |"
            in text)
    assert "| reach_wrong40 | LAPO - BC | | +0.40 |" in text
    assert "| mean over variants | LAPO | 2 | 0.75 ± 0.15 |" in text
    assert "| mean over variants | LAPO - BC | | +0.40 |" in text
    assert "| variant | policy | 10 | 20 | 30 |" in text
    assert "| carry_dense | LAPO | 0.30 ± 0.10 | 0.65 ± 0.15 | 0.75 ± 0.15 |" in text


@pytest.mark.slow
def test_suite_end_to_end_on_a_tiny_setting(tmp_path):
    out = tmp_path / "suite"
    args = ["--variants", "reach_wrong40", "--seeds", "0", "--image_size", "16", "--n_samples", "300",
            "--max_timesteps", "30", "--score_every", "10", "--eval_episodes", "2", "--jobs", "2",
            "--extra", "--batch_size 8", "--out", out]
    res = run_cli("benchmarks/suite.py", *args, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (out / "suite.md").read_text()
    assert "## dev split: reach_wrong40" in table
    for row in ("| reach_wrong40 | LAPO | 1 |", "| reach_wrong40 | BC | 1 |", "| reach_wrong40 | LAPO - BC |",
                "| variant | policy | 10 | 20 | 30 |"):
        assert row in table
    report = json.loads((out / "suite.json").read_text())
    for algo, criterion in (("lapo", "test_weighted_action_mse"), ("bc", "test_action_mse")):
        run = report["runs"]["reach_wrong40"][algo]["0"]
        assert run["steps"] == [10, 20, 30] and run["criterion"] == criterion
        assert len(run["criterion_at_steps"]) == 3 and None not in run["criterion_at_steps"]
        assert run["spearman"] is None or -1 <= run["spearman"] <= 1
        assert run["checkpoints"]["model_final"]["same_as"] == "model_30"
        folder = run["folder"]
        assert sorted(f for f in os.listdir(folder) if f.endswith(".pth")) == ["model_final.pth", "policy_best.pth",
                                                                               "policy_final.pth"]
        assert os.path.exists(os.path.join(folder, suite.SCORES_FILE))
    assert set(report["splits"]) == {"dev"}
    assert set(report["reference_returns"]["reach_wrong40"]) == {"expert", "wrong", "noisy"}
    if importlib.util.find_spec("matplotlib"):
        assert (out / "suite_dev.png").stat().st_size > 0

    # again, report only: the runs are reused and nothing is rolled out twice
    again = run_cli("benchmarks/suite.py", *args, "--skip_training", env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing 2 finished run(s)" in again.stdout and ".pth: return" not in again.stdout
    assert json.loads((out / "suite.json").read_text())["runs"] == report["runs"]


def test_bench_train_prints_its_figures_on_a_tiny_setting(capsys):
    """The speed benchmark must run as documented (it had silently broken once)."""
    import bench_train
    bench_train.main(["--device", "cpu", "--image_size", "16", "--batch_size", "8", "--steps", "1",
                      "--n_rows", "300", "--sampler_batches", "5"])
    out = capsys.readouterr().out
    assert "training throughput:" in out and out.strip().splitlines()[-1].startswith("step/floor ratio:")
    assert "floor with torchvision's own convolutions:" in out


def test_bench_data_prints_its_figures_on_a_tiny_setting(tmp_path, capsys):
    import bench_data
    bench_data.main(["--rows", "1200", "--small_rows", "400", "--image_size", "16", "--seconds", "0.5",
                     "--train_steps", "1", "--memory_batches", "20", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    for figure in ("sampler, memory mode", "sampler, stream mode", "stream/memory", "stream mode peak RSS"):
        assert figure in out
    assert not list(tmp_path.glob("*.hdf5"))   # its files are deleted


def test_offline_criteria_ranks_the_recorded_metrics_of_a_run(tmp_path, capsys):
    """--from_progress ranks checkpoints by what progress.csv recorded: a metric that falls as
    the score rises ranks perfectly and picks the best step; one that rises, the worst."""
    import offline_criteria
    run = tmp_path / "Exp1" / "multimodal_robot"
    run.mkdir(parents=True)
    lines = ["steps,NormalizedScore,test_kept_action_mse,test_action_mse",
             "500,0.2,0.30,0.10", "1000,0.9,0.10,0.30", "1500,0.5,0.20,0.20"]
    (run / "progress.csv").write_text("\n".join(lines) + "\n")
    offline_criteria.main(["--from_progress", str(run)])
    rows = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines() if "Exp1" in line}
    assert "+1.00" in rows["test_kept_action_mse"] and "1000: 0.90 | 1000: 0.90" in rows["test_kept_action_mse"]
    assert "-1.00" in rows["test_action_mse"] and "500: 0.20 | 1000: 0.90" in rows["test_action_mse"]

    # a run scored by benchmarks/suite.py: no rollouts in training, its returns in suite_scores.json
    lines = ["steps,NormalizedScore,test_kept_action_mse", "500,,0.30", "1000,,0.10", "1500,,0.20"]
    (run / "progress.csv").write_text("\n".join(lines) + "\n")
    scores = {f"model_{step}": {"step": step, "return": ret} for step, ret in ((500, 2.0), (1000, 9.0), (1500, 5.0))}
    (run / "suite_scores.json").write_text(json.dumps({"scores": {"100 episodes from seed 2000000": scores}}))
    offline_criteria.main(["--from_progress", str(run)])
    rows = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines() if "Exp1" in line}
    assert "+1.00" in rows["test_kept_action_mse"] and "1000: 9.00 | 1000: 9.00" in rows["test_kept_action_mse"]

    # the runs of several variants in one table are named by their variant
    for variant in ("reach_a", "reach_b"):
        other = tmp_path / "runs" / variant / "Exp1" / "multimodal_robot"
        other.mkdir(parents=True)
        (other / "progress.csv").write_text((run / "progress.csv").read_text())
        (other / "suite_scores.json").write_text((run / "suite_scores.json").read_text())
    offline_criteria.main(["--from_progress", *(str(p) for p in sorted((tmp_path / "runs").glob("*/Exp1/multimodal_robot")))])
    named = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if "test_kept_action_mse" in line]
    assert named == ["| reach_a/Exp1", "| reach_b/Exp1"]


def test_pick_within_takes_the_latest_checkpoint_the_criterion_cannot_tell_apart():
    """At tolerance 0 the plain minimum; with a tolerance, a later checkpoint within it of the
    best so far replaces the pick, and a new best always does; 'max' criteria mirror it."""
    from offline_criteria import pick_within
    steps, values = [250, 500, 750, 1000], [0.50, 0.30, 0.305, 0.40]
    assert pick_within(steps, values, 0.0) == 500
    assert pick_within(steps, values, 0.02) == 750
    assert pick_within(steps, values, 0.5) == 1000
    assert pick_within(steps, [0.3, 0.305, 0.2, 0.201], 0.02) == 1000   # a new best resets the bar
    assert pick_within(steps, [1.0, 2.0, 1.99, 1.0], 0.01, "max") == 750


def test_offline_criteria_scores_tolerances_on_the_suites_normalised_curves(tmp_path, capsys):
    """--tolerances prints, per run, the checkpoint LAPO's criterion picks at each tolerance
    with its normalised score from the suite.json above the run folder, and their mean."""
    import offline_criteria
    out = tmp_path / "suite_out"
    runs = {}
    for variant, curve in (("reach_a", [0.2, 0.6, 0.8]), ("reach_b", [0.4, 0.5, 0.7])):
        run = out / "runs" / variant / "Exp1" / "multimodal_robot"
        run.mkdir(parents=True)
        lines = ["steps,NormalizedScore,test_weighted_action_mse", "500,,0.30", "1000,,0.10", "1500,,0.101"]
        (run / "progress.csv").write_text("\n".join(lines) + "\n")
        runs[variant] = {"lapo": {"1": {"folder": str(run), "steps": [500, 1000, 1500], "curve": curve}}}
    (out / "suite.json").write_text(json.dumps({"runs": runs}))
    offline_criteria.main(["--from_progress", "--tolerances", "0,0.02",
                           *(str(out / "runs" / v / "Exp1" / "multimodal_robot") for v in runs)])
    text = capsys.readouterr().out
    assert "| reach_a/Exp1 | 1000: 0.60 | 1500: 0.80 |" in text
    assert "| reach_b/Exp1 | 1000: 0.50 | 1500: 0.70 |" in text
    assert "| mean | 0.550 | 0.750 |" in text


def test_suite_presets_fill_only_what_the_command_line_leaves_out():
    """The screen is LAPO alone, two seeds at 32x32 (at 16x16 the policy cannot imitate the
    kept expert well enough to screen anything); the full preset LAPO and BC, three seeds;
    explicit flags win."""
    parse = suite.build_parser().parse_args
    screen = suite.apply_preset(parse(["--preset", "screen"]))
    assert (screen.seeds, screen.image_size, screen.algos) == ([0, 1], 32, ["lapo"])
    full = suite.apply_preset(parse([]))
    assert (full.preset, full.seeds, full.max_timesteps, full.algos) == ("full", [0, 1, 2], 3000, ["lapo", "bc"])
    mine = suite.apply_preset(parse(["--preset", "screen", "--seeds", "4", "--image_size", "16"]))
    assert (mine.seeds, mine.image_size, mine.max_timesteps) == ([4], 16, screen.max_timesteps)


def test_suite_screen_runs_the_dev_reach_variants_and_full_runs_every_dev_variant():
    parse = suite.build_parser().parse_args
    assert suite.selected_variants(parse(["--preset", "screen"])) == list(suite.SCREEN_DEV_VARIANTS)
    assert set(suite.SCREEN_DEV_VARIANTS) < set(simulator.variant_names("dev"))
    assert suite.selected_variants(parse([])) == simulator.variant_names("dev")
    assert suite.selected_variants(parse(["--preset", "screen", "--split", "test"])) == simulator.variant_names("test")
    assert suite.selected_variants(parse(["--preset", "screen", "--variants", "carry_dense"])) == ["carry_dense"]


def test_batch_composition_counts_the_kept_operators_rows(sim_dataset, capsys):
    """batch_composition.py: the rows the filter's first batches hold, per operator; the
    operators whose episodes the return bar drops get none."""
    import batch_composition
    batch_composition.main(["--data", str(sim_dataset), "--batches", "5", "--batch_size", "16",
                            "--set", "obs_feature_dim=32", "--set", "image_feature_dim=16"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| operator")]
    shares = {name.strip(): (int(kept), float(share.strip(" %")) / 100) for name, _, kept, share in rows}
    assert sum(share for _, share in shares.values()) == pytest.approx(1.0, abs=0.02)
    assert all(share == 0 for kept, share in shares.values() if kept == 0)
    assert any(kept == 0 for kept, _ in shares.values())
    # a setting the replay buffer is built from reaches it too; a misspelt one is named, no traceback
    batch_composition.main(["--data", str(sim_dataset), "--batches", "1", "--batch_size", "16", "--set", "discount=0.95",
                            "--set", "obs_feature_dim=32", "--set", "image_feature_dim=16"])
    assert "'discount': 0.95" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown setting.*kept_frac"):
        batch_composition.main(["--data", str(sim_dataset), "--set", "kept_frac=0.5"])


def test_return_expectiles_counts_each_operators_episodes_above_the_bar(sim_dataset, capsys):
    """return_expectiles.py: per operator, the episodes' discounted returns and how many clear
    the --judge_expectile bar over all episodes; a higher bar keeps no more of any operator."""
    import return_expectiles
    kept = {}
    for tau in ("0.5", "0.9"):
        return_expectiles.main(["--data", str(sim_dataset), "--judge_expectile", tau])
        rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("| ") and not line.startswith("| operator")]
        kept[tau] = {cells[0].strip(): (int(cells[1]), int(cells[-1])) for cells in rows}
    with h5py.File(sim_dataset) as f:
        returns = return_expectiles.discounted_returns(f, 0.99)
    assert sum(n for n, _ in kept["0.9"].values()) == len(returns)
    assert sum(k for _, k in kept["0.9"].values()) == int((returns >= utils.expectile(returns, 0.9)).sum())
    assert all(kept["0.9"][op][1] <= kept["0.5"][op][1] <= kept["0.5"][op][0] for op in kept["0.9"])
    assert kept["0.9"]["expert"][1] > 0 and kept["0.9"]["noisy"][1] < kept["0.9"]["noisy"][0]
    not_hdf5 = sim_dataset.parent / "notes.txt"
    not_hdf5.write_text("not a recording")
    with pytest.raises(SystemExit, match="notes.txt: cannot read it as HDF5"):
        return_expectiles.main(["--data", str(not_hdf5)])


def test_joint_tags_reports_the_start_spread_of_each_joint(sim_dataset, capsys):
    """joint_tags.py: per joint dimension, the spread of the episodes' first rows over the
    spread of all rows; a dimension that never moves within an episode scores above 1, one
    that starts alike everywhere (the grippers) 0."""
    import joint_tags
    joint_tags.main(["--data", str(sim_dataset)])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| dimension")]
    ratios = [float(cells[2]) for cells in rows]
    assert len(ratios) == 16 and ratios[7] == ratios[15] == 0.0   # grippers start open
    assert all(r > 0 for r in ratios[:7] + ratios[8:15])
    ends = np.array([False, False, True, False, False, True])
    tagged = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    spread = joint_tags.start_spread(tagged, ends)   # dim 0 moves, dim 1 is the episode's tag
    assert spread[0] == 0.0 and spread[1] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="no 'observations/wrist'"):
        joint_tags.main(["--data", str(sim_dataset), "--observation", "wrist"])
