"""Train Multimodal LAPO (or the behaviour-cloning baseline) on an HDF5 dataset.

    python main_multimodal.py                       # built-in default: sample data + a short run
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0001 --device cuda
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0001 --resume
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0002 --load_model 0001:25000 --max_timesteps 100000

Results go to {log_dir}/Exp{ExpID}/multimodal_robot/: progress.csv (one row per
evaluation) and its plot progress.png, params.json, model_{step}.pth every save_freq (the
newest --keep_last of them), model_final.pth (training checkpoints: resume, --load_model),
policy_best.pth and policy_final.pth (acting only: deploy, export_policy.py, eval_policy.py).
Every flag is a field of algos/config.py's TrainConfig, where its default lives. --resume
and --load_model take the checkpoint's data, model and algorithm settings; a flag that
contradicts them is an error (--load_model may name another --hdf5_path, split and seed).
"""
import os
import random
import shutil
import signal
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm import tqdm

from algos import algos_vae_multimodal as algos
from algos import config as config_lib
from algos import experiment, hdf5_format, outputs, simulator
from algos import utils_multimodal as utils
from algos.experiment import UserError

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_WRITE_FAILED = 2, 3, 4
# Settings --load_model may change from its checkpoint's: which data it goes on with.
LOAD_MODEL_MAY_CHANGE = ("hdf5_path", "train_test_split", "seed")


class NonFiniteLoss(Exception):
    pass


def build_parser():
    return config_lib.build_parser(__doc__)


def parse_config(argv):
    """The run's TrainConfig from the command line, and the names of the flags given."""
    config = config_lib.TrainConfig(**vars(build_parser().parse_args(argv)))
    problems = config_lib.problems(config)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {config.device}: CUDA is not available on this machine (use --device cpu)")
    if problems:
        raise UserError("bad flags:\n" + "\n".join(f"  - {p}" for p in problems))
    return config, config_lib.explicit_flags(argv, __doc__)


def with_checkpoint_settings(config, explicit, ckpt_config, ckpt_path, continuing):
    """The config a run from a checkpoint trains with: the checkpoint's data, model and
    algorithm settings (and seed), with the run settings of this command. A flag given
    explicitly that contradicts the checkpoint is an error naming both values."""
    may_change = () if continuing else LOAD_MODEL_MAY_CHANGE
    kept = config_lib.trained_settings(ckpt_config)
    conflicts = []
    for name, value in kept.items():
        mine = getattr(config, name)
        same = (os.path.realpath(mine) == os.path.realpath(value) if name == "hdf5_path" and mine and value
                else mine == value)
        if name in explicit and not same and name not in may_change:
            conflicts.append(f"--{name} {mine} given, but {ckpt_path} was trained with {value}")
    if conflicts:
        how = "--resume" if continuing else "--load_model"
        raise UserError(f"{how}: flags contradict the checkpoint's settings (leave them out to go on with the "
                        "checkpoint's, or start a new run):\n" + "\n".join(f"  - {c}" for c in conflicts))
    return config_lib.replace(config, **{k: v for k, v in kept.items() if not (k in may_change and k in explicit)})


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def human_time(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------- main
def run(argv):
    config, explicit = parse_config(argv)
    if config.tensorboard:
        outputs.check_tensorboard()
    demo = config.hdf5_path is None
    if demo:
        config = config_lib.replace(config, hdf5_path=config_lib.DEMO_DATASET["hdf5_path"])
    for name, (full, short) in config_lib.RUN_LENGTHS.items():
        if getattr(config, name) is None:
            config = config_lib.replace(config, **{name: short if demo else full})
    if config.ExpID is None:
        config = config_lib.replace(config, ExpID=experiment.next_free_exp_id(config.log_dir))

    created_folder = not os.path.isdir(experiment.experiment_dir(config.log_dir, config.ExpID))
    folder, ckpt_path, continuing = experiment.prepare_experiment(config)
    try:
        ckpt = None
        if ckpt_path:
            ckpt = algos.read_checkpoint(ckpt_path)
            if ckpt["kind"] == algos.POLICY:
                raise UserError(f"{ckpt_path} is a policy file: it holds only what acting needs (no critic, "
                                "optimisers or random state); continue from a training checkpoint "
                                "(model_{step}.pth, model_final.pth)")
            config = with_checkpoint_settings(config, explicit, ckpt["config"], ckpt_path, continuing)
        if demo and not os.path.exists(config.hdf5_path):
            d = config_lib.DEMO_DATASET
            print(f"No --hdf5_path given: recording the built-in sample dataset {config.hdf5_path} "
                  f"({d['n_samples']} transitions, {d['image_size']}x{d['image_size']} images)...")
            simulator.create_sample_dataset(config.hdf5_path, d["n_samples"], (d["image_size"],) * 2)
        return train(config, argv, folder, ckpt, ckpt_path, continuing)
    except BaseException:
        # A run that failed before writing anything leaves no empty experiment folder behind.
        if created_folder and os.path.isdir(folder) and not os.listdir(folder):
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        raise


def make_buffer(config, device, ckpt=None, ckpt_path=None):
    """Validate and load the dataset, then split and normalise it (with a checkpoint's
    statistics when going on from one, so the networks keep their units)."""
    seed_everything(config.seed)
    try:
        dataset = hdf5_format.load_dataset(config.hdf5_path)
    except hdf5_format.DatasetError as exc:
        raise UserError(str(exc)) from None
    for warning in dataset.warnings:
        print(f"warning: {config.hdf5_path}: {warning}")
    normalization = None
    if ckpt is not None:
        shapes = {"joint_dim": dataset.joint.shape[1], "action_dim": dataset.actions.shape[1],
                  "image_shape": list(dataset.images.shape[2:4])}
        mismatch = [f"{k} {ckpt['shapes'][k]} in the checkpoint, {v} in the dataset"
                    for k, v in shapes.items() if ckpt["shapes"][k] != v]
        if mismatch:
            raise UserError(f"{ckpt_path} does not fit {config.hdf5_path}: " + "; ".join(mismatch))
        normalization = utils.Normalization.from_state_dict(ckpt["normalization"])
    storage = "cpu"
    if device.type == "cuda" and config.data_on_device != "no":
        free, _ = torch.cuda.mem_get_info(device)
        if config.data_on_device == "yes" or dataset.images.nbytes < 0.5 * free:
            storage = device
    try:
        buffer = utils.MultimodalReplayBuffer(dataset, config, device=device, storage_device=storage,
                                              normalization=normalization)
    except ValueError as exc:
        raise UserError(f"{config.hdf5_path}: {exc}") from None
    if config.batch_size > buffer.n_train:
        raise UserError(f"--batch_size {config.batch_size} is larger than the training split "
                        f"({buffer.n_train} transitions of {config.hdf5_path})")
    return buffer


def make_evaluator(config, buffer, agent):
    """Rollouts in the dataset's simulator when there is one, and what policy_best is chosen by."""
    sim_spec = None
    if config.simulator and config.simulator.lower() != "none":
        sim_spec = (config.simulator, {})
    elif config.simulator is None:
        sim_spec = simulator.simulator_from_attrs(buffer.attrs)
    evaluator = None
    if sim_spec and config.eval_episodes > 0:
        try:
            evaluator = simulator.RolloutEvaluator(sim_spec[0], sim_spec[1], config.eval_episodes)
        except (ValueError, TypeError) as exc:
            raise UserError(f"simulator {sim_spec[0]!r}: {exc}") from None
    if evaluator is not None:
        criterion = ("NormalizedScore", "max") if evaluator.references else ("AverageReturn", "max")
    else:
        criterion = agent.offline_criterion
    return evaluator, criterion


def train(config, argv, folder, ckpt, ckpt_path, continuing):
    device = torch.device(algos.default_device(config.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    buffer = make_buffer(config, device, ckpt, ckpt_path)
    agent = algos.make_agent(config, replay_buffer=buffer, device=device)
    progress = experiment.ProgressLog(os.path.join(folder, "progress.csv"))
    best = None   # {"value", "step", "metric"} of policy_best
    evaluator, criterion = make_evaluator(config, buffer, agent)
    if ckpt:
        if ckpt["algo"] != config.algo:
            raise UserError(f"{ckpt_path}: checkpoint holds a '{ckpt['algo']}' agent; run with --algo {ckpt['algo']}")
        agent.apply_checkpoint(ckpt, ckpt_path, restore_rng=True)
        dropped = progress.truncate_after(agent.total_it) if continuing else 0
        # only this folder's own record: another experiment's best was judged on other rows or by another metric
        recorded = ckpt.get("extra", {}).get("best")
        if continuing and recorded and recorded.get("metric") == criterion[0]:
            best = recorded
        print(f"Continuing from {ckpt_path} at step {agent.total_it}"
              + (f" (dropped {dropped} progress row(s) written after it)" if dropped else ""))
    if agent.total_it >= config.max_timesteps:
        raise UserError(f"the checkpoint is at step {agent.total_it}, not below --max_timesteps "
                        f"{config.max_timesteps}; raise --max_timesteps to train further")

    experiment.write_json_atomic({
        "config": config_lib.to_dict(config), "command": " ".join(["python", "main_multimodal.py"] + list(argv)),
        "dataset": buffer.facts(), "shapes": agent.shapes, "algo": config.algo,
        "best_model_criterion": {"metric": criterion[0], "better": "higher" if criterion[1] == "max" else "lower",
                                 "source": "simulator rollouts" if evaluator else "held-out test split"},
        "offline_criterion": {"metric": agent.offline_criterion[0],
                              "better": "higher" if agent.offline_criterion[1] == "max" else "lower"},
        "simulator": ({"name": evaluator.name, "config": evaluator.config, "eval_seeds": evaluator.seeds,
                       "reference_returns": evaluator.references} if evaluator else None),
        "torch": torch.__version__, "device": str(device), "data_storage": str(buffer.storage_device),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": os.path.abspath(ckpt_path) if ckpt_path else None,
    }, os.path.join(folder, "params.json"))
    print(f"Experiment {config.ExpID} [{config.algo}] on {device}: {buffer.n_rows} transitions "
          f"({buffer.n_train_episodes} train / {buffer.n_test_episodes} test episodes), images "
          f"{buffer.image_shape[0]}x{buffer.image_shape[1]}, joint {buffer.joint_dim}, action {buffer.action_dim}; "
          f"policy_best by {criterion[0]} ({'rollouts in ' + evaluator.name if evaluator else 'held-out split'})")
    print(f"Results: {folder}")

    # on resume, events after the checkpoint's step go, as progress.csv's rows did
    tensorboard = (outputs.TensorBoardLog(os.path.join(folder, "tensorboard"),
                                          purge_step=agent.total_it + 1 if continuing else None)
                   if config.tensorboard else None)
    start_step, t_run = agent.total_it, time.time()
    try:
        with experiment.StopFlag() as stop:
            last_row, best, last_saved = train_loop(agent, config, folder, progress, evaluator, criterion, best,
                                                    stop, tensorboard)
    finally:
        if tensorboard is not None:
            tensorboard.close()
    elapsed, steps_done = time.time() - t_run, agent.total_it - start_step
    if stop():
        print(f"\nStopped at step {agent.total_it} ({signal.Signals(stop.signum).name}). "
              f"Checkpoint: {os.path.join(folder, f'model_{agent.total_it}.pth')}\n"
              f"Resume with:\n  {experiment.resume_command(argv, config.ExpID)}")
        return 128 + stop.signum
    extra = checkpoint_extra(best, evaluator)
    # the model_{step}.pth this run saved at its last step holds the same: a second name, not a second copy
    same = last_saved if last_saved and experiment.checkpoint_step(last_saved) == agent.total_it else None
    if not (same and experiment.link_atomic(same, os.path.join(folder, "model_final.pth"))):
        agent.save("model_final", folder, extra=extra)
    agent.save("policy_final", folder, extra=extra, policy_only=True)
    print(f"\nDone: {steps_done} steps in {human_time(elapsed)} ({steps_done / max(elapsed, 1e-9):.2f} steps/s).")
    if last_row is not None:
        print("Last evaluation: " + _row_summary(last_row, criterion[0]))
    if best is not None:
        print(f"Best {best['metric']}: {best['value']:.4g} at step {best['step']} -> "
              f"{os.path.join(folder, 'policy_best.pth')}")
    print(f"Results in {folder}/ (progress.csv, progress.png, params.json, model_final.pth to resume, "
          "policy_best.pth and policy_final.pth to deploy)")
    return 0


def checkpoint_extra(best, evaluator):
    """What a checkpoint records besides the networks: the best record (resume goes on with
    it) and the simulator the run evaluated in (eval_policy.py rolls out in it)."""
    return {"best": best, "simulator": {"name": evaluator.name, "config": evaluator.config} if evaluator else None}


def train_loop(agent, config, folder, progress, evaluator, criterion, best, stop, tensorboard=None):
    """Train in chunks up to the next evaluation or checkpoint; evaluate, log, plot, save.
    Returns the last progress row, the best record and the last model_{step}.pth written."""
    loss_sums, loss_steps, last_row, last_saved = {}, 0, None, None
    title = f"Exp{config.ExpID} {config.algo} on {os.path.basename(config.hdf5_path)}"
    t_start = t_row = time.time()
    steps_row = agent.total_it
    pbar = tqdm(total=config.max_timesteps, initial=agent.total_it, desc=f"Exp{config.ExpID} {config.algo}",
                unit="step", dynamic_ncols=True)
    with pbar:
        while agent.total_it < config.max_timesteps:
            step = agent.total_it
            chunk_end = min((step // config.eval_freq + 1) * config.eval_freq,
                            (step // config.save_freq + 1) * config.save_freq, config.max_timesteps)
            out = agent.train(chunk_end - step, config.batch_size, progress=pbar.update, should_stop=stop,
                              run_steps=config.max_timesteps)
            step = agent.total_it
            if out["nonfinite"]:
                name, bad_step = out["nonfinite"]
                raise NonFiniteLoss(f"{name} became NaN/Inf at step {bad_step}; training stopped and no model was "
                                    f"written after it. Last good checkpoint: "
                                    f"{experiment.latest_checkpoint(folder) or 'none yet'}. Try lower learning "
                                    "rates (--critic_lr, --encoder_lr) or check the dataset's reward scale.")
            for k in agent.loss_names:
                if k in out:
                    loss_sums[k] = loss_sums.get(k, 0.0) + out[k] * out["iterations"]
            loss_steps += out["iterations"]
            interrupted = stop()
            already_logged = last_row is not None and last_row["steps"] == step   # a stop right after a row
            if (step % config.eval_freq == 0 or step >= config.max_timesteps or interrupted) and not already_logged:
                now = time.time()
                row = {"steps": step, "AverageReturn": None, "StdReturn": None, "SuccessRate": None,
                       "NormalizedScore": None, "steps_per_s": (step - steps_row) / max(now - t_row, 1e-9)}
                row.update({k: v / max(loss_steps, 1) for k, v in loss_sums.items()})
                row.update(agent.offline_metrics())
                if evaluator is not None and not interrupted:
                    row.update(evaluator(agent))
                row["wall_time_s"] = now - t_start
                progress.write(row)
                last_row, loss_sums, loss_steps = row, {}, 0
                value = row.get(criterion[0])
                if value is not None and np.isfinite(value) and (
                        best is None or (value > best["value"] if criterion[1] == "max" else value < best["value"])):
                    best = {"value": float(value), "step": step, "metric": criterion[0]}
                    agent.save("policy_best", folder, extra=checkpoint_extra(best, evaluator), policy_only=True)
                outputs.write_progress_plot(progress.rows(), os.path.join(folder, "progress.png"), title, best)
                if tensorboard is not None:
                    tensorboard.write(row)
                pbar.write(_row_summary(row, criterion[0]))
                t_row, steps_row = time.time(), step
            if step % config.save_freq == 0 or interrupted:
                last_saved = agent.save(f"model_{step}", folder, extra=checkpoint_extra(best, evaluator))
                experiment.prune_step_checkpoints(folder, config.keep_last, step)
            if interrupted:
                break
    return last_row, best, last_saved


def _row_summary(row, criterion):
    parts = [f"step {row['steps']}"]
    for k in ("AverageReturn", "SuccessRate", "NormalizedScore", criterion, "test_action_mse", "critic_loss",
              "vae_loss", "bc_loss", "positive_advantage_frac", "steps_per_s"):
        v = row.get(k)
        if v is not None and f"{k}=" not in " ".join(parts):
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except algos.CheckpointWriteError as exc:   # e.g. a full disk; earlier checkpoints are intact
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except algos.CheckpointError as exc:   # a checkpoint given to read that cannot be used: bad input
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nAborted by a second interrupt; the last complete checkpoint is kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
