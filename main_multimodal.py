"""Train Multimodal LAPO (or the behaviour-cloning baseline) on an HDF5 dataset.

    python main_multimodal.py                       # built-in default: sample data + a short run
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0001 --device cuda
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0001 --resume
    python main_multimodal.py --hdf5_path data.hdf5 --ExpID 0002 --load_model 25000 --max_timesteps 100000

Results go to {log_dir}/Exp{ExpID}/multimodal_robot/: progress.csv (one row per
evaluation), params.json, model_{step}.pth every save_freq, model_best.pth, model_final.pth.
"""
import argparse
import csv
import glob
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm import tqdm

from algos import algos_vae_multimodal as algos
from algos import hdf5_format, simulator
from algos import utils_multimodal as utils

# The built-in default (no --hdf5_path): a small sample recorded once, a short run.
DEMO = {"hdf5_path": os.path.join("results", "sample_data.hdf5"), "n_samples": 4000, "image_size": 32,
        "max_timesteps": 1000, "eval_freq": 250, "save_freq": 500}
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_WRITE_FAILED = 2, 3, 4


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--hdf5_path", default=None, help="dataset file (default: the built-in sample, created if absent)")
    a("--algo", default="lapo", choices=sorted(algos.AGENTS), help="lapo, or bc for the behaviour-cloning baseline")
    a("--device", default=algos.default_device(), help="cuda or cpu (default: cuda if available)")
    a("--ExpID", default=None, help="experiment id (default: the next free number, e.g. 0001)")
    a("--log_dir", default="results/", help="where experiment folders go (default: results/)")
    a("--seed", type=int, default=0)
    a("--batch_size", type=int, default=64)
    a("--max_timesteps", type=int, default=None, help="training steps (default: 50000; built-in default: 1000)")
    a("--eval_freq", type=int, default=None, help="steps between evaluations (default: 1000)")
    a("--save_freq", type=int, default=None, help="steps between model_{step}.pth checkpoints (default: 5000)")
    a("--eval_episodes", type=int, default=10, help="simulator rollouts per evaluation, fixed seeds (default: 10)")
    a("--discount", type=float, default=0.99)
    a("--tau", type=float, default=0.005, help="soft target update rate")
    a("--expectile", type=float, default=0.99,
      help="with --weight_temperature 0: CVAE weight of positive-advantage samples (the others get 1 - this), "
           "in (0, 1)")
    a("--kl_beta", type=float, default=1.0, help="KL weight of the CVAE loss")
    a("--obs_feature_dim", type=int, default=256, help="fused observation feature size")
    a("--image_feature_dim", type=int, default=128, help="feature size of each ResNet18 trunk")
    a("--train_test_split", type=float, default=0.8, help="fraction of episodes used for training, in (0, 1)")
    a("--vae_lr", type=float, default=2e-4, help="CVAE learning rate (also the BC head's)")
    a("--actor_lr", type=float, default=2e-4, help="latent actor learning rate")
    a("--critic_lr", type=float, default=1e-3, help="critic (Q1, Q2, V) learning rate")
    a("--encoder_lr", type=float, default=3e-4, help="image/joint encoder learning rate")
    a("--encoder_lr_decay", type=float, default=0.5,
      help="share of the run, at its end, over which the encoder's learning rate falls to 0 along a half "
           "cosine, in [0, 1]; 0: constant (default: 0.5, the second half of --max_timesteps)")
    a("--max_latent_action", type=float, default=0.5, help="bound of the latent policy (tanh x this)")
    a("--doubleq_min", type=float, default=1.0, help="weight of min(Q1, Q2) in the V target, in [0, 1]")
    a("--no_noise", action="store_true", help="no clipped noise on the target latent action")
    a("--no_return_bound", action="store_true",
      help="critic targets without the observed return to a terminal as their lower bound")
    a("--n_step", type=int, default=100,
      help="rewards summed along the recorded episode before bootstrapping, in the critic targets and the "
           "advantage (default: 100, the Monte-Carlo return of episodes up to 100 steps; 1: the original "
           "one-step backup)")
    a("--value_target", default="data", choices=("data", "policy"),
      help="what V(s) is fitted to: data = an upper expectile of Q_target at the data's own actions (IQL's; "
           "default); policy = Q_target at the latent policy's action (the original LAPO's)")
    a("--value_expectile", type=float, default=0.7,
      help="expectile of the data's Q that V fits with --value_target data, in (0, 1) (default: 0.7)")
    a("--weight_temperature", type=float, default=0.05,
      help="CVAE weights exp(A / this), clipped at 100 (default: 0.05, in units of the largest one-step "
           "reward; 0.1 before the eighteenth round); 0: the original LAPO's two weights, --expectile and "
           "1 - it")
    a("--no_episode_filter", action="store_true",
      help="imitate every episode; by default the CVAE skips the episodes whose return falls short of the "
           "value of their start (see --filter_margin), and weighs the others' rows by "
           "exp(max(A, A_episode) / T)")
    a("--filter_margin", type=float, default=0.0,
      help="with the episode filter, how far an episode's return may fall short of its start's value and "
           "still be imitated, in units of --weight_temperature (default: 0, keep only the episodes that "
           "did better than their start's value; 1 was the default before)")
    a("--kept_batch_frac", type=float, default=0.5,
      help="with the episode filter, the share of each batch drawn from the episodes it keeps (the rest "
           "uniform over the training rows); 0: uniform batches (default: 0.5)")
    a("--no_polyak_acting", action="store_true",
      help="act through the online encoder and latent actor; by default the policy acts through the "
           "Polyak averages (rate --tau) of the encoder, the latent actor and the decoder")
    a("--encoder_losses", default="critic+vae", choices=("critic", "critic+vae"),
      help="losses whose gradients train the shared encoder (default: critic+vae)")
    a("--image_shift", type=int, default=0, help="random-shift augmentation of training images, in pixels")
    a("--relative_actions", default="auto", choices=("auto", "all", "none"),
      help="learn joint-target action dims as the change from the current joint (auto: where the data "
           "says so, see README_MULTIMODAL.md)")
    a("--pretrained_weights", default=None, metavar="PATH",
      help="local torchvision ResNet18 ImageNet state dict for the image trunks (default: random init)")
    a("--load_model", default=None, metavar="STEP|PATH",
      help="continue from a checkpoint: a step of this experiment (or of the one experiment that has it), "
           "EXPID:STEP, or a checkpoint path")
    a("--resume", action="store_true", help="continue the latest checkpoint of --ExpID")
    a("--overwrite", action="store_true", help="replace an existing experiment folder")
    a("--simulator", default=None,
      help="simulator for rollout evaluation: a registered name or package.module:Class "
           "(default: the one named in the dataset's attributes; 'none' to disable)")
    a("--amp", default="off", choices=("off", "auto", "bf16"),
      help="bfloat16 autocast of the encoder. off: float32 (default; on an H200 at batch 64, 84x84, twice "
           "as fast as bf16); auto: bf16 on CUDA only (CPU stays float32, so resume is bit-exact); bf16: "
           "also on CPUs with native bf16 (about 1.5x faster there)")
    a("--data_on_device", default="auto", choices=("auto", "yes", "no"),
      help="CUDA: keep the uint8 dataset in GPU memory (auto: when it fits)")
    a("--compile", action="store_true", help="torch.compile the encoder")
    return p


def flag_problems(args):
    """Every out-of-range flag, as messages naming the flag."""
    problems = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)
    need(0 < args.expectile < 1, f"--expectile must be in (0, 1), got {args.expectile}")
    need(0 < args.train_test_split < 1, f"--train_test_split must be in (0, 1), got {args.train_test_split}")
    need(0 < args.discount <= 1, f"--discount must be in (0, 1], got {args.discount}")
    need(0 < args.tau <= 1, f"--tau must be in (0, 1], got {args.tau}")
    need(0 <= args.doubleq_min <= 1, f"--doubleq_min must be in [0, 1], got {args.doubleq_min}")
    need(0 < args.value_expectile < 1, f"--value_expectile must be in (0, 1), got {args.value_expectile}")
    need(args.weight_temperature >= 0, f"--weight_temperature must be >= 0, got {args.weight_temperature}")
    need(0 <= args.kept_batch_frac <= 1, f"--kept_batch_frac must be in [0, 1], got {args.kept_batch_frac}")
    need(args.filter_margin >= 0, f"--filter_margin must be >= 0, got {args.filter_margin}")
    need(0 <= args.encoder_lr_decay <= 1, f"--encoder_lr_decay must be in [0, 1], got {args.encoder_lr_decay}")
    need(args.kl_beta >= 0, f"--kl_beta must be >= 0, got {args.kl_beta}")
    need(args.max_latent_action > 0, f"--max_latent_action must be > 0, got {args.max_latent_action}")
    for name in ("n_step", "batch_size", "max_timesteps", "eval_freq", "save_freq", "obs_feature_dim", "image_feature_dim"):
        value = getattr(args, name)
        need(value is None or value > 0, f"--{name} must be a positive integer, got {value}")
    for name in ("vae_lr", "actor_lr", "critic_lr", "encoder_lr"):
        need(getattr(args, name) > 0, f"--{name} must be > 0, got {getattr(args, name)}")
    need(args.eval_episodes >= 0, f"--eval_episodes must be >= 0, got {args.eval_episodes}")
    need(not (args.resume and args.load_model), "--resume and --load_model are exclusive")
    need(not (args.overwrite and (args.resume or args.load_model)), "--overwrite cannot be combined with --resume/--load_model")
    need(not (args.resume and args.ExpID is None), "--resume needs the --ExpID of the run to continue")
    if args.ExpID is not None:
        need(re.fullmatch(r"[A-Za-z0-9_.-]+", args.ExpID) is not None,
             f"--ExpID may hold letters, digits, '_', '-' and '.', got {args.ExpID!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    elif not re.fullmatch(r"(cpu|cuda(:\d+)?|mps)", args.device):
        problems.append(f"--device must be cpu or cuda, got {args.device!r}")
    return problems


# --------------------------------------------------------------------------- experiment folder
def experiment_dir(log_dir, exp_id):
    return os.path.join(log_dir, f"Exp{exp_id}", "multimodal_robot")


def next_free_exp_id(log_dir):
    used = {int(m.group(1)) for d in glob.glob(os.path.join(log_dir, "Exp*"))
            if (m := re.fullmatch(r"Exp(\d+)", os.path.basename(d)))}
    return f"{max(used, default=0) + 1:04d}"


def checkpoint_step(path):
    m = re.fullmatch(r"model_(\d+)\.pth", os.path.basename(path))
    return int(m.group(1)) if m else None


def step_checkpoints(folder):
    """{step: path} of the model_{step}.pth checkpoints in a folder."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "model_*.pth")):
        step = checkpoint_step(path)
        if step is not None:
            found[step] = path
    return found


def resolve_load_model(spec, folder, log_dir):
    """--load_model STEP | EXPID:STEP | PATH -> checkpoint path."""
    if os.path.isfile(spec) or spec.endswith(".pth"):
        if not os.path.isfile(spec):
            raise UserError(f"--load_model {spec}: checkpoint file not found")
        return spec
    exp, _, step_text = spec.rpartition(":")
    try:
        step = int(float(step_text))
    except ValueError:
        raise UserError(f"--load_model {spec!r}: give a step number, EXPID:STEP or a checkpoint path") from None
    if exp:
        path = os.path.join(experiment_dir(log_dir, exp), f"model_{step}.pth")
        if not os.path.isfile(path):
            raise UserError(f"--load_model {spec}: {path} does not exist")
        return path
    own = os.path.join(folder, f"model_{step}.pth")
    if os.path.isfile(own):
        return own
    matches = sorted(glob.glob(os.path.join(glob.escape(log_dir), "Exp*", "multimodal_robot", f"model_{step}.pth")))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        have = sorted(step_checkpoints(folder)) if os.path.isdir(folder) else []
        hint = f" (this experiment has steps {have})" if have else ""
        raise UserError(f"--load_model {step}: no checkpoint model_{step}.pth in {folder} or any experiment "
                        f"of {log_dir}{hint}")
    raise UserError(f"--load_model {step}: several experiments have it ({', '.join(matches)}); "
                    "give EXPID:STEP or the path")


def latest_checkpoint(folder):
    """The checkpoint with the most training steps in a folder (model_final.pth included)."""
    candidates = [(step, path) for step, path in step_checkpoints(folder).items()]
    final = os.path.join(folder, "model_final.pth")
    if os.path.isfile(final):
        candidates.append((int(algos.read_checkpoint(final)["total_it"]), final))
    if not candidates:
        return None
    return max(candidates)[1]


def prepare_experiment(args):
    """Create or reuse the experiment folder as the flags ask; returns (folder, checkpoint to load)."""
    folder = experiment_dir(args.log_dir, args.ExpID)
    # temporary files of a killed run are never complete outputs: clear them
    for stale in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
        os.remove(stale)
    has_run = os.path.isdir(folder) and any(
        os.path.exists(os.path.join(folder, n)) for n in ("progress.csv", "params.json")) or bool(
        os.path.isdir(folder) and glob.glob(os.path.join(glob.escape(folder), "model_*.pth")))
    if args.resume:
        if not has_run:
            raise UserError(f"--resume: {folder} holds no run to continue")
        ckpt = latest_checkpoint(folder)
        if ckpt is None:
            raise UserError(f"--resume: {folder} has no checkpoint yet; start again with --overwrite")
        return folder, ckpt
    if args.load_model:
        ckpt = resolve_load_model(args.load_model, folder, args.log_dir)
        if has_run and os.path.dirname(os.path.abspath(ckpt)) != os.path.abspath(folder):
            raise UserError(f"{folder} already holds another run; load into a new --ExpID or add nothing "
                            "of this folder's own (use --resume to continue it)")
        os.makedirs(folder, exist_ok=True)
        return folder, ckpt
    if has_run:
        if not args.overwrite:
            raise UserError(f"{folder} already holds a run. Use --resume to continue it, --overwrite to "
                            "replace it, or another --ExpID.")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    return folder, None


def write_json_atomic(obj, path):
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ProgressLog:
    """progress.csv: a row per evaluation, appended and flushed row by row."""

    def __init__(self, path):
        self.path = path
        self.fields = None
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)

    def truncate_after(self, step):
        """Drop rows past ``step`` (written after the checkpoint a run resumes from)."""
        if not self.fields:
            return 0
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if r.get("steps", "").isdigit() and int(r["steps"]) <= step]
        if len(keep) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.fields)
                w.writeheader()
                w.writerows(keep)
            os.replace(tmp, self.path)
        return len(rows) - len(keep)

    def write(self, row):
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in self.fields})
            f.flush()
            os.fsync(f.fileno())


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class StopFlag:
    """SIGINT/SIGTERM ask training to stop after the current step; a second signal stops at once."""

    def __init__(self):
        self.signum = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"\n{signal.Signals(signum).name} received: stopping after the current step and saving a "
                   "checkpoint (send it again to abort without saving)...")

    def __call__(self):
        return self.signum is not None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def human_time(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def resume_command(argv):
    """The command that continues this run: the same flags plus --resume."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in ("--overwrite", "--resume"):
            continue
        if tok == "--load_model":
            skip = True
            continue
        if tok.startswith("--load_model="):
            continue
        out.append(tok)
    return " ".join(["python", os.path.basename(sys.argv[0] or "main_multimodal.py")] + out + ["--resume"])


# --------------------------------------------------------------------------- main
def run(argv):
    args = build_parser().parse_args(argv)
    problems = flag_problems(args)
    if problems:
        raise UserError("bad flags:\n" + "\n".join(f"  - {p}" for p in problems))
    demo = args.hdf5_path is None
    if demo:
        args.hdf5_path = DEMO["hdf5_path"]
        if not os.path.exists(args.hdf5_path):
            print(f"No --hdf5_path given: recording the built-in sample dataset {args.hdf5_path} "
                  f"({DEMO['n_samples']} transitions, {DEMO['image_size']}x{DEMO['image_size']} images)...")
            simulator.create_sample_dataset(args.hdf5_path, DEMO["n_samples"], (DEMO["image_size"],) * 2)
    for name, full, short in (("max_timesteps", 50000, DEMO["max_timesteps"]), ("eval_freq", 1000, DEMO["eval_freq"]),
                              ("save_freq", 5000, DEMO["save_freq"])):
        if getattr(args, name) is None:
            setattr(args, name, short if demo else full)
    if args.ExpID is None:
        args.ExpID = next_free_exp_id(args.log_dir)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    created_folder = not os.path.isdir(experiment_dir(args.log_dir, args.ExpID))
    folder, ckpt_path = prepare_experiment(args)
    try:
        return train(args, argv, folder, ckpt_path, device)
    except BaseException:
        # A run that failed before writing anything leaves no empty experiment folder behind.
        if created_folder and os.path.isdir(folder) and not os.listdir(folder):
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        raise


def train(args, argv, folder, ckpt_path, device):
    seed_everything(args.seed)
    try:
        dataset = hdf5_format.load_dataset(args.hdf5_path)
    except hdf5_format.DatasetError as exc:
        raise UserError(str(exc)) from None
    for warning in dataset.warnings:
        print(f"warning: {args.hdf5_path}: {warning}")

    storage = "cpu"
    if device.type == "cuda" and args.data_on_device != "no":
        free, _ = torch.cuda.mem_get_info(device)
        fits = dataset.images.nbytes < 0.5 * free
        if args.data_on_device == "yes" or fits:
            storage = device
    try:
        buffer = utils.MultimodalReplayBuffer(dataset, args.train_test_split, args.seed, args.discount,
                                              device=device, storage_device=storage,
                                              relative_actions=args.relative_actions, n_step=args.n_step)
    except ValueError as exc:
        raise UserError(f"{args.hdf5_path}: {exc}") from None
    del dataset
    if args.batch_size > buffer.n_train:
        raise UserError(f"--batch_size {args.batch_size} is larger than the training split "
                        f"({buffer.n_train} transitions of {args.hdf5_path})")

    agent_kwargs = dict(replay_buffer=buffer, device=device, obs_feature_dim=args.obs_feature_dim,
                        image_feature_dim=args.image_feature_dim, encoder_lr=args.encoder_lr,
                        pretrained_weights=args.pretrained_weights, amp=args.amp, compile=args.compile,
                        discount=args.discount, tau=args.tau, vae_lr=args.vae_lr, actor_lr=args.actor_lr,
                        critic_lr=args.critic_lr, max_latent_action=args.max_latent_action,
                        expectile=args.expectile, kl_beta=args.kl_beta, no_noise=args.no_noise,
                        doubleq_min=args.doubleq_min, encoder_losses=args.encoder_losses,
                        image_shift=args.image_shift, return_bound=not args.no_return_bound,
                        value_target=args.value_target, value_expectile=args.value_expectile,
                        weight_temperature=args.weight_temperature, episode_filter=not args.no_episode_filter,
                        kept_batch_frac=args.kept_batch_frac, polyak_acting=not args.no_polyak_acting,
                        encoder_lr_decay=args.encoder_lr_decay, filter_margin=args.filter_margin)
    agent = algos.make_agent(args.algo, **agent_kwargs)

    extra = {}
    progress = ProgressLog(os.path.join(folder, "progress.csv"))
    if ckpt_path:
        ckpt = algos.read_checkpoint(ckpt_path)
        cfg = ckpt["config"]
        if ckpt["algo"] != args.algo:
            raise UserError(f"{ckpt_path}: checkpoint holds a '{ckpt['algo']}' agent; run with --algo {ckpt['algo']}")
        mismatch = [f"{k} {cfg[k]} in the checkpoint, {v} in the dataset" for k, v in
                    (("joint_dim", buffer.joint_dim), ("action_dim", buffer.action_dim),
                     ("image_shape", list(buffer.image_shape))) if cfg[k] != v]
        if mismatch:
            raise UserError(f"{ckpt_path} does not fit {args.hdf5_path}: " + "; ".join(mismatch))
        extra = agent.load(ckpt_path, restore_rng=True)
        dropped = progress.truncate_after(agent.total_it) if os.path.dirname(
            os.path.abspath(ckpt_path)) == os.path.abspath(folder) else 0
        print(f"Continuing from {ckpt_path} at step {agent.total_it}"
              + (f" (dropped {dropped} progress row(s) written after it)" if dropped else ""))
    if agent.total_it >= args.max_timesteps:
        raise UserError(f"the checkpoint is at step {agent.total_it}, not below --max_timesteps "
                        f"{args.max_timesteps}; raise --max_timesteps to train further")

    sim_spec = None
    if args.simulator and args.simulator.lower() != "none":
        sim_spec = (args.simulator, {})
    elif args.simulator is None:
        sim_spec = simulator.simulator_from_attrs(buffer.attrs)
    evaluator = None
    if sim_spec and args.eval_episodes > 0:
        try:
            evaluator = simulator.RolloutEvaluator(sim_spec[0], sim_spec[1], args.eval_episodes)
        except (ValueError, TypeError) as exc:
            raise UserError(f"simulator {sim_spec[0]!r}: {exc}") from None
    if evaluator is not None and evaluator.references:
        criterion = ("NormalizedScore", "max")
    elif evaluator is not None:
        criterion = ("AverageReturn", "max")
    else:
        criterion = agent.offline_criterion

    params = {
        "flags": vars(args), "command": " ".join(["python", "main_multimodal.py"] + list(argv)),
        "dataset": buffer.facts(), "model": agent.config, "algo": args.algo,
        "best_model_criterion": {"metric": criterion[0], "better": "higher" if criterion[1] == "max" else "lower",
                                 "source": "simulator rollouts" if evaluator else "held-out test split"},
        "simulator": ({"name": sim_spec[0], "config": sim_spec[1], "eval_seeds": evaluator.seeds,
                       "reference_returns": evaluator.references} if evaluator else None),
        "torch": torch.__version__, "device": str(device), "data_storage": str(storage),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": os.path.abspath(ckpt_path) if ckpt_path else None,
    }
    write_json_atomic(params, os.path.join(folder, "params.json"))

    start_step = agent.total_it
    print(f"Experiment {args.ExpID} [{args.algo}] on {device}: {buffer.n_rows} transitions "
          f"({buffer.n_train_episodes} train / {buffer.n_test_episodes} test episodes), images "
          f"{buffer.image_shape[0]}x{buffer.image_shape[1]}, joint {buffer.joint_dim}, action {buffer.action_dim}; "
          f"model_best by {criterion[0]} ({'rollouts in ' + sim_spec[0] if evaluator else 'held-out split'})")
    print(f"Results: {folder}")

    stop = StopFlag()
    stop.install()
    best = extra.get("best")   # {"value", "step"} of model_best, carried across resumes
    loss_sums, loss_steps = {}, 0
    t_run = time.time()
    t_row, steps_row = time.time(), agent.total_it
    pbar = tqdm(total=args.max_timesteps, initial=agent.total_it, desc=f"Exp{args.ExpID} {args.algo}",
                unit="step", dynamic_ncols=True)
    last_row = None
    interrupted = False
    while agent.total_it < args.max_timesteps:
        step = agent.total_it
        chunk_end = min((step // args.eval_freq + 1) * args.eval_freq,
                        (step // args.save_freq + 1) * args.save_freq, args.max_timesteps)
        out = agent.train(chunk_end - step, args.batch_size, progress=pbar.update, should_stop=stop,
                          run_steps=args.max_timesteps)
        step = agent.total_it
        if out["nonfinite"]:
            pbar.close()
            name, bad_step = out["nonfinite"]
            kept = latest_checkpoint(folder)
            raise NonFiniteLoss(f"{name} became NaN/Inf at step {bad_step}; training stopped and no model was "
                                f"written after it. Last good checkpoint: {kept or 'none yet'}. Try lower learning "
                                "rates (--critic_lr, --encoder_lr) or check the dataset's reward scale.")
        for k in agent.loss_names:
            if k in out:
                loss_sums[k] = loss_sums.get(k, 0.0) + out[k] * out["iterations"]
        loss_steps += out["iterations"]
        interrupted = stop()
        already_logged = last_row is not None and last_row["steps"] == step   # a stop right after a row
        if (step % args.eval_freq == 0 or step >= args.max_timesteps or interrupted) and not already_logged:
            now = time.time()
            row = {"steps": step}
            row["steps_per_s"] = (step - steps_row) / max(now - t_row, 1e-9)
            row.update({k: v / max(loss_steps, 1) for k, v in loss_sums.items()})
            row.update(agent.offline_metrics())
            if evaluator is not None and not interrupted:
                row.update(evaluator(agent))
            row["wall_time_s"] = now - t_run
            ordered = {k: row.get(k) for k in ["steps", "AverageReturn", "StdReturn", "SuccessRate", "NormalizedScore"]}
            ordered.update(row)
            progress.write(ordered)
            last_row = ordered
            loss_sums, loss_steps = {}, 0
            value = row.get(criterion[0])
            if value is not None and np.isfinite(value) and (
                    best is None or (value > best["value"] if criterion[1] == "max" else value < best["value"])):
                best = {"value": float(value), "step": step, "metric": criterion[0]}
                agent.save("model_best", folder, extra={"best": best})
            pbar.write(_row_summary(row, criterion[0]))
            t_row, steps_row = time.time(), step
        if step % args.save_freq == 0 or interrupted:
            agent.save(f"model_{step}", folder, extra={"best": best})
        if interrupted:
            break
    pbar.close()
    elapsed = time.time() - t_run
    steps_done = agent.total_it - start_step
    if interrupted:
        print(f"\nStopped at step {agent.total_it} ({signal.Signals(stop.signum).name}). "
              f"Checkpoint: {os.path.join(folder, f'model_{agent.total_it}.pth')}\n"
              f"Resume with:\n  {resume_command(argv)}")
        return 128 + stop.signum
    agent.save("model_final", folder, extra={"best": best})
    print(f"\nDone: {steps_done} steps in {human_time(elapsed)} ({steps_done / max(elapsed, 1e-9):.2f} steps/s).")
    if last_row is not None:
        print("Last evaluation: " + _row_summary(last_row, criterion[0]))
    if best is not None:
        print(f"Best {best['metric']}: {best['value']:.4g} at step {best['step']} -> {os.path.join(folder, 'model_best.pth')}")
    print(f"Results in {folder}/ (progress.csv, params.json, model_*.pth)")
    return 0


def _row_summary(row, criterion):
    parts = [f"step {row['steps']}"]
    for k in ("AverageReturn", "SuccessRate", "NormalizedScore", criterion, "test_action_mse", "critic_loss",
              "vae_loss", "bc_loss", "positive_advantage_frac", "steps_per_s"):
        v = row.get(k)
        if v is not None and f"{k}=" not in " ".join(parts):
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


class NonFiniteLoss(Exception):
    pass


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
