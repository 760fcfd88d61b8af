"""Train Multimodal LAPO (or the behaviour-cloning baseline) on an HDF5 dataset.

    python main_multimodal.py                       # built-in default: sample data + a short run
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0001 --device cuda
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0001 --resume
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0002 --load_model 0001:25000 --max_timesteps 100000
    torchrun --nproc_per_node=2 main_multimodal.py --hdf5_path data.hdf5 --ExpID 0003   # two processes

Results go to {log_dir}/Exp{ExpID}/multimodal_robot/: progress.csv (one row per
evaluation) and its plot progress.png, params.json, model_{step}.pth every save_freq (the
newest --keep_last of them), model_final.pth (training checkpoints: resume, --load_model),
policy_best.pth and policy_final.pth (acting only: deploy, export_policy.py, eval_policy.py).
Every flag is a field of algos/config.py's TrainConfig, where its default lives. --resume
and --load_model take the checkpoint's data, model and algorithm settings; a flag that
contradicts them is an error (--load_model may name another --hdf5_path, split and seed).
Under torchrun, --batch_size is per process (the effective batch is N x --batch_size, the
learning rates are those of one process: gradients are averaged) and only rank 0 writes;
algos/distributed.py says how the ranks stay one run.
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
from algos import distributed, experiment, hdf5_format, outputs, simulator, streaming
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
    distributed.start(config.device)
    demo = config.hdf5_path is None
    if demo:
        config = config_lib.replace(config, hdf5_path=config_lib.DEMO_DATASET["hdf5_path"])
    for name, (full, short) in config_lib.RUN_LENGTHS.items():
        if getattr(config, name) is None:
            config = config_lib.replace(config, **{name: short if demo else full})

    def prepare(config):   # the folder is rank 0's to choose and create
        if config.ExpID is None:
            config = config_lib.replace(config, ExpID=experiment.next_free_exp_id(config.log_dir))
        created = not os.path.isdir(experiment.experiment_dir(config.log_dir, config.ExpID))
        return (config.ExpID, created) + experiment.prepare_experiment(config)

    exp_id, created_folder, folder, ckpt_path, continuing = distributed.run_on_main(lambda: prepare(config))
    config = config_lib.replace(config, ExpID=exp_id)
    try:
        ckpt = None
        if ckpt_path:
            ckpt = algos.read_checkpoint(ckpt_path)
            if ckpt["kind"] == algos.POLICY:
                raise UserError(f"{ckpt_path} is a policy file: it holds only what acting needs (no critic, "
                                "optimisers or random state); continue from a training checkpoint "
                                "(model_{step}.pth, model_final.pth)")
            config = with_checkpoint_settings(config, explicit, ckpt["config"], ckpt_path, continuing)
        if demo:
            distributed.run_on_main(lambda: record_demo_dataset(config.hdf5_path))
        return train(config, argv, folder, ckpt, ckpt_path, continuing)
    except BaseException:
        # A run that failed before writing anything leaves no empty experiment folder behind.
        if created_folder and distributed.is_main() and os.path.isdir(folder) and not os.listdir(folder):
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        raise


def record_demo_dataset(path):
    if not os.path.exists(path):
        d = config_lib.DEMO_DATASET
        print(f"No --hdf5_path given: recording the built-in sample dataset {path} "
              f"({d['n_samples']} transitions, {d['image_size']}x{d['image_size']} images)...")
        simulator.create_sample_dataset(path, d["n_samples"], (d["image_size"],) * 2)


def make_buffer(config, device, ckpt=None, ckpt_path=None):
    """Validate and load the dataset (its images too in memory mode, see --data_mode), then
    split and normalise it (with a checkpoint's statistics when going on from one, so the
    networks keep their units)."""
    seed_everything(config.seed)
    summary = hdf5_format.inspect_hdf5(config.hdf5_path, check_values=False)
    image_bytes = summary.n_rows * len(hdf5_format.IMAGE_KEYS) * 3 * int(np.prod(summary.image_shape or (0,)))
    mode = streaming.choose_data_mode(config.data_mode, image_bytes, config.memory_limit_gb,
                                      distributed.local_world_size())
    try:
        dataset = hdf5_format.load_dataset(config.hdf5_path, images=mode == "memory")
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
        # in stream mode only the shuffle buffer is stored: on the GPU, filled from pinned memory
        free, _ = torch.cuda.mem_get_info(device)
        if config.data_on_device == "yes" or mode == "stream" or dataset.images.nbytes < 0.5 * free:
            storage = device
    buffer_class = streaming.StreamReplayBuffer if mode == "stream" else utils.MultimodalReplayBuffer
    try:
        buffer = buffer_class(dataset, config, device=device, storage_device=storage,
                              normalization=normalization, rank=distributed.rank())
    except ValueError as exc:
        raise UserError(f"{config.hdf5_path}: {exc}") from None
    if config.batch_size > buffer.n_train:
        raise UserError(f"--batch_size {config.batch_size} is larger than the training split "
                        f"({buffer.n_train} transitions of {config.hdf5_path})")
    if mode == "stream":
        print(f"Stream mode: {image_bytes / 2**30:.2f} GB of images in {config.hdf5_path}, "
              f"{buffer.resident_image_bytes / 2**30:.2f} GB of them resident ({buffer.n_active} of "
              f"{len(buffer.blocks)} blocks in the shuffle buffer, the held-out and first rows)")
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
    if evaluator is not None:   # (metric, direction, relative tolerance: experiment.next_best)
        criterion = ("NormalizedScore", "max", 0.0) if evaluator.references else ("AverageReturn", "max", 0.0)
    else:
        criterion = (*agent.offline_criterion, agent.offline_criterion_tolerance)
    return evaluator, criterion


def train(config, argv, folder, ckpt, ckpt_path, continuing):
    device = distributed.start(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    buffer = make_buffer(config, device, ckpt, ckpt_path)
    agent = algos.make_agent(config, replay_buffer=buffer, device=device)
    if distributed.world_size() > 1:
        distributed.broadcast_modules(agent._modules().values())
        distributed.average_gradients(agent._optimizers().values())
        seed_everything(config.seed + distributed.rank())   # each rank its own noise and augmentation
    progress = experiment.ProgressLog(os.path.join(folder, "progress.csv"))
    best = None   # {"value", "step", "metric"} of policy_best
    evaluator, criterion = make_evaluator(config, buffer, agent)
    if ckpt:
        if ckpt["algo"] != config.algo:
            raise UserError(f"{ckpt_path}: checkpoint holds a '{ckpt['algo']}' agent; run with --algo {ckpt['algo']}")
        agent.apply_checkpoint(ckpt, ckpt_path, restore_rng=True)
        restore_rank_rng(ckpt, agent)
        dropped = progress.truncate_after(agent.total_it) if continuing and distributed.is_main() else 0
        # only this folder's own record: another experiment's best was judged on other rows or by another metric
        recorded = ckpt.get("extra", {}).get("best")
        if continuing and recorded and recorded.get("metric") == criterion[0]:
            best = recorded
        print(f"Continuing from {ckpt_path} at step {agent.total_it}"
              + (f" (dropped {dropped} progress row(s) written after it)" if dropped else ""))
    if agent.total_it >= config.max_timesteps:
        raise UserError(f"the checkpoint is at step {agent.total_it}, not below --max_timesteps "
                        f"{config.max_timesteps}; raise --max_timesteps to train further")

    distributed.run_on_main(lambda: experiment.write_json_atomic({
        "config": config_lib.to_dict(config), "command": " ".join(["python", "main_multimodal.py"] + list(argv)),
        "dataset": buffer.facts(), "shapes": agent.shapes, "algo": config.algo,
        "best_model_criterion": {"metric": criterion[0], "better": "higher" if criterion[1] == "max" else "lower",
                                 "tolerance": criterion[2],
                                 "source": "simulator rollouts" if evaluator else "held-out test split"},
        "offline_criterion": {"metric": agent.offline_criterion[0],
                              "better": "higher" if agent.offline_criterion[1] == "max" else "lower",
                              "tolerance": agent.offline_criterion_tolerance},
        "simulator": ({"name": evaluator.name, "config": evaluator.config, "eval_seeds": evaluator.seeds,
                       "reference_returns": evaluator.references} if evaluator else None),
        "torch": torch.__version__, "device": str(device), "data_storage": str(buffer.storage_device),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": os.path.abspath(ckpt_path) if ckpt_path else None,
        "processes": distributed.world_size(), "effective_batch_size": config.batch_size * distributed.world_size(),
    }, os.path.join(folder, "params.json")))
    print(f"Experiment {config.ExpID} [{config.algo}] on {device}: {buffer.n_rows} transitions "
          f"({buffer.n_train_episodes} train / {buffer.n_test_episodes} test episodes), images "
          f"{buffer.image_shape[0]}x{buffer.image_shape[1]}, joint {buffer.joint_dim}, action {buffer.action_dim}; "
          f"policy_best by {criterion[0]} ({'rollouts in ' + evaluator.name if evaluator else 'held-out split'})")
    print(f"Results: {folder}")

    # on resume, events after the checkpoint's step go, as progress.csv's rows did
    tensorboard = (outputs.TensorBoardLog(os.path.join(folder, "tensorboard"),
                                          purge_step=agent.total_it + 1 if continuing else None)
                   if config.tensorboard and distributed.is_main() else None)
    start_step, t_run = agent.total_it, time.time()
    try:
        with experiment.StopFlag() as flag:
            stop = distributed.agreed_stop(flag, device)
            last_row, best, last_saved = train_loop(agent, config, folder, progress, evaluator, criterion, best,
                                                    stop, tensorboard)
    finally:
        if tensorboard is not None:
            tensorboard.close()
    elapsed, steps_done = time.time() - t_run, agent.total_it - start_step
    if distributed.world_size() > 1:   # the promise of algos/distributed.py, checked
        same, digest = distributed.parameters_agree(agent._modules().values())
        if not same:
            raise RuntimeError(f"the {distributed.world_size()} ranks' parameters differ at step {agent.total_it}")
        print(f"Parameters identical on all {distributed.world_size()} ranks at step {agent.total_it} "
              f"(sha256 {digest[:16]})")
    if stop():
        print(f"\nStopped at step {agent.total_it} ({signal.Signals(stop.signum).name}). "
              f"Checkpoint: {os.path.join(folder, f'model_{agent.total_it}.pth')}\n"
              f"Resume with:\n  {experiment.resume_command(argv, config.ExpID).replace('python', distributed.launcher(), 1)}")
        return 128 + stop.signum
    extra = checkpoint_extra(best, evaluator)
    # the model_{step}.pth this run saved at its last step holds the same: a second name, not a second copy
    same = last_saved if last_saved and experiment.checkpoint_step(last_saved) == agent.total_it else None
    if not (same and distributed.world_size() == 1 and experiment.link_atomic(same, os.path.join(folder, "model_final.pth"))):
        save_checkpoint(agent, "model_final", folder, extra)
    if distributed.is_main():
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
                unit="step", dynamic_ncols=True, disable=not distributed.is_main())
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
            due = step % config.eval_freq == 0 or step >= config.max_timesteps or interrupted
            if due and not already_logged and distributed.is_main():   # the other ranks go on to the next step
                now = time.time()
                row = {"steps": step, "AverageReturn": None, "StdReturn": None, "SuccessRate": None,
                       "NormalizedScore": None, "steps_per_s": (step - steps_row) / max(now - t_row, 1e-9)}
                row.update({k: v / max(loss_steps, 1) for k, v in loss_sums.items()})
                # Evaluation draws nothing from training's random streams: a run trains the
                # same whatever --eval_freq and --eval_episodes are.
                rng = algos.capture_rng_state(agent.replay_buffer)
                row.update(agent.offline_metrics())
                if evaluator is not None and not interrupted:
                    row.update(evaluator(agent))
                algos.restore_rng_state(rng, agent.replay_buffer)
                row["wall_time_s"] = now - t_start
                progress.write(row)
                last_row, loss_sums, loss_steps = row, {}, 0
                value = row.get(criterion[0])
                picked = (experiment.next_best(best, value, step, *criterion)
                          if value is not None and np.isfinite(value) else None)
                if picked is not None:
                    best = picked
                    agent.save("policy_best", folder, extra=checkpoint_extra(best, evaluator), policy_only=True)
                outputs.write_progress_plot(progress.rows(), os.path.join(folder, "progress.png"), title, best)
                if tensorboard is not None:
                    tensorboard.write(row)
                pbar.write(_row_summary(row, criterion[0]))
                t_row, steps_row = time.time(), step
            if step % config.save_freq == 0 or interrupted:
                last_saved = save_checkpoint(agent, f"model_{step}", folder, checkpoint_extra(best, evaluator))
                if distributed.is_main():
                    experiment.prune_step_checkpoints(folder, config.keep_last, step)
            if interrupted:
                break
    return last_row, best, last_saved


def save_checkpoint(agent, name, folder, extra):
    """A checkpoint to continue from, written by rank 0 (its path; None on the other ranks);
    every rank calls it at the same step. With several processes it also holds each rank's
    random state, for an exact resume."""
    extra = dict(extra)
    if distributed.world_size() > 1:
        extra["rng_by_rank"] = distributed.gather_objects(algos.capture_rng_state(agent.replay_buffer))
    if distributed.is_main():
        return agent.save(name, folder, extra=extra)
    return None


def restore_rank_rng(ckpt, agent):
    """Under torchrun, this rank's own random state from the checkpoint (``apply_checkpoint``
    restored rank 0's); from a checkpoint of another number of processes, fresh per-rank
    streams, and the resume is not exact."""
    if distributed.world_size() == 1:
        return
    states = ckpt.get("extra", {}).get("rng_by_rank")
    if states and len(states) == distributed.world_size():
        algos.restore_rng_state(states[distributed.rank()], agent.replay_buffer)
    elif distributed.rank() > 0:
        seed_everything(agent.config.seed + distributed.rank())
        agent.replay_buffer.generator.manual_seed(agent.config.seed + distributed.rank())
        print(f"warning: the checkpoint was written by another number of processes; rank {distributed.rank()} "
              "draws fresh batches (the resume is not exact)", file=sys.stderr)


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
    except distributed.MainRankFailed:   # rank 0 printed why
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nAborted by a second interrupt; the last complete checkpoint is kept.", file=sys.stderr)
        return 130
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(main())
