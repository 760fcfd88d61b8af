"""Every setting of a training run, with its default, in one place.

``TrainConfig`` is the only place a default lives: ``main_multimodal.py`` generates its
flags from it, the agents read their settings from it, and every checkpoint stores it
whole, so that ``from_checkpoint`` and ``--resume`` rebuild exactly what was trained.
Ranges are checked in ``problems``. numpy-free and torch-free, so that any tool can read it.

Fields are grouped by what they change:
  data       what is trained on (file, split, n-step returns, action units)
  model      the observation encoder
  algorithm  LAPO's (and the BC baseline's) learning rule
  run        bookkeeping that does not change what a step computes (folders, budget,
             evaluation, device); free to change when a run is resumed
"""
import argparse
import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Optional

ALGOS = ("lapo", "bc")

# The built-in default run (no --hdf5_path): a small sample recorded once, a short run.
DEMO_DATASET = {"hdf5_path": "results/sample_data.hdf5", "n_samples": 4000, "image_size": 32}
# Run lengths when a flag is left unset: on your own data / on the built-in default.
RUN_LENGTHS = {"max_timesteps": (50000, 1000), "eval_freq": (1000, 250), "save_freq": (5000, 500)}


def setting(default, help, group, choices=None, flag=True, positive=False, unit_interval=None, metavar=None):
    """A config field with what the CLI and the range check need to know about it."""
    return field(default=default, metadata=dict(help=help, group=group, choices=choices, flag=flag,
                                                positive=positive, unit_interval=unit_interval, metavar=metavar))


@dataclass
class TrainConfig:
    # ---- data: what is trained on
    hdf5_path: Optional[str] = setting(None, "dataset file (default: the built-in sample, recorded if absent)", "data")
    train_test_split: float = setting(0.8, "share of whole episodes used for training; the rest is held out "
                                      "(the held-out episodes are what model_best's offline criterion is computed on)",
                                      "data", unit_interval="()")
    n_step: int = setting(100, "rewards summed along the recorded episode before bootstrapping, in the critic "
                               "targets and the advantage (100: the Monte-Carlo return of episodes up to 100 "
                               "steps; 1: the original one-step backup)", "data", positive=True)
    relative_actions: str = setting("auto", "learn joint-target action dims as the change from the current "
                                            "joint (auto: where the data says so)", "data",
                                    choices=("auto", "all", "none"))
    image_shift: int = setting(2, "random-shift augmentation of training images, up to this many pixels "
                                  "each way (DrQ; the few kept episodes are imitated without memorising "
                                  "exact pixels; DrQ uses 4 at 84x84; 0: off)", "data")
    joint_noise: float = setting(0.0, "std of Gaussian noise added to the normalised joint vector of training "
                                      "observations. Why: joints that barely move in an episode keep its "
                                      "start's random offset, a tag of the episode that the heads can imitate "
                                      "from instead of reading the task from the images (0: off)", "data")

    # ---- model: the observation encoder
    obs_feature_dim: int = setting(256, "fused observation feature size", "model", positive=True)
    image_feature_dim: int = setting(128, "feature size of each ResNet18 trunk", "model", positive=True)
    pretrained_weights: Optional[str] = setting(None, "local torchvision ResNet18 ImageNet state dict for the "
                                                      "image trunks (default: random init)", "model",
                                                metavar="PATH")
    feature_dropout: float = setting(0.0, "dropout on the fused observation feature in training steps (the "
                                          "heads cannot rest on a few feature units; never when acting; 0: off; "
                                          "0.2 did not stop late declines on dev screens)", "model",
                                     unit_interval="[)")
    encoder_lr: float = setting(3e-4, "image/joint encoder learning rate", "model", positive=True)
    encoder_lr_decay: float = setting(0.5, "share of the run, at its end, over which the encoder's learning rate "
                                           "falls to 0 along a half cosine, so the heads end the run fitted to "
                                           "the features the policy acts on; 0: constant", "model",
                                      unit_interval="[]")
    amp: str = setting("off", "bfloat16 autocast of the encoder. off: float32; auto: bf16 on CUDA only (the CPU "
                              "stays float32, so resume is bit-exact); bf16: also on CPUs with native bf16",
                       "model", choices=("off", "auto", "bf16"))
    compile: bool = setting(False, "torch.compile the encoder", "model")
    channels_last: bool = setting(True, "channels-last memory layout of the image trunks (faster convolutions)",
                                  "model", flag=False)

    # ---- algorithm
    algo: str = setting("lapo", "lapo, or bc for the behaviour-cloning baseline", "algorithm", choices=ALGOS)
    discount: float = setting(0.99, "discount factor gamma", "algorithm", unit_interval="(]")
    tau: float = setting(0.005, "soft target update rate (also the rate of the averages the policy acts "
                                "through)", "algorithm", unit_interval="(]")
    batch_size: int = setting(64, "transitions per gradient step", "algorithm", positive=True)
    vae_lr: float = setting(2e-4, "CVAE learning rate (also the BC head's)", "algorithm", positive=True)
    actor_lr: float = setting(2e-4, "latent actor learning rate", "algorithm", positive=True)
    critic_lr: float = setting(1e-3, "critic (Q1, Q2, V) learning rate", "algorithm", positive=True)
    kl_beta: float = setting(1.0, "KL weight of the CVAE loss", "algorithm")
    latent_dim: Optional[int] = setting(None, "CVAE latent size (default: 2 x the action width)", "algorithm",
                                        positive=True)
    max_latent_action: float = setting(0.5, "bound of the latent policy (tanh x this)", "algorithm",
                                       positive=True)
    doubleq_min: float = setting(1.0, "weight of min(Q1, Q2) in the V target (the rest on max)", "algorithm",
                                 unit_interval="[]")
    episode_judge: str = setting("return", "what an episode's return must clear for the filter to keep it. "
                                         "return: the --judge_expectile of every training episode's return from "
                                         "its first row, a bar the data fixes before training, so nothing the "
                                         "run learns can move the kept set (for data whose episodes start "
                                         "alike: one task from similar states); critic: the critic's V at the "
                                         "episode's start, by the fold head that never fitted it (V shares the "
                                         "encoder the kept episodes train, and drifts with it); see "
                                         "docs/design.md",
                                 "algorithm", choices=("return", "critic"))
    judge_expectile: float = setting(0.9, "with --episode_judge return, the expectile of the training "
                                          "episodes' returns that is the bar an episode's return must clear "
                                          "to be kept (0.5: the data's mean; towards 1: towards the best "
                                          "episode's)",
                                     "algorithm", unit_interval="()")
    value_fit: str = setting("target_q", "which critic's Q at the data's own actions V fits at --value_expectile: "
                                         "the target critic's (target_q, IQL's), or the online critic's (q: no "
                                         "Polyak lag between the returns Q fits and V, so V and the episode "
                                         "filter's judgements settle sooner)", "algorithm",
                             choices=("target_q", "q"))
    value_expectile: float = setting(0.7, "expectile of Q over the data's own actions that V fits (IQL's)",
                                     "algorithm", unit_interval="()")
    weight_temperature: float = setting(0.05, "CVAE weights exp(A / this), clipped at 100, in units of the "
                                              "largest one-step reward", "algorithm", positive=True)
    value_folds: int = setting(2, "V heads, each fitted on its own share of the training episodes; with 2 or "
                                  "more the episode filter judges each episode with a head that never fitted it, "
                                  "so its judgement does not drift to 0 as V fits the episode's own return "
                                  "(1: one V judges the episodes it fitted; --original_lapo uses one)",
                               "algorithm", positive=True)
    original_lapo: bool = setting(False, "the original LAPO algorithm on this encoder, for ablations: V fitted "
                                         "to Q at the latent policy's action (clipped noise unless --no_noise), "
                                         "CVAE weights --expectile and 1 - it by the sign of A, one-step backups "
                                         "without the observed return as a bound, every episode imitated, the "
                                         "online networks act", "algorithm")
    expectile: float = setting(0.9, "with --original_lapo: CVAE weight of positive-advantage samples (the others "
                                    "get 1 - this)", "algorithm", unit_interval="()")
    no_noise: bool = setting(False, "with --original_lapo: no clipped noise on the target latent action",
                             "algorithm")
    filter_band: float = setting(0.1, "a judgement within this distance of 0 leaves an episode kept or dropped as "
                                      "it was, in units of the largest one-step reward: the episode filter drops an "
                                      "episode judged below -band and takes it back only when judged above +band "
                                      "(its first judgement: its sign; 0: kept while judged above 0). Why: V fits "
                                      "each training episode's own return, so late judgements drift to 0 and a cut "
                                      "at 0 then keeps or drops episodes by chance", "algorithm")
    kept_batch_frac: float = setting(1.0, "with the episode filter, the share of each batch drawn from the "
                                          "episodes it keeps (the rest uniform over the training rows; 0: "
                                          "uniform batches)", "algorithm", unit_interval="[]")

    # ---- run: bookkeeping, free to change on resume
    seed: int = setting(0, "seed of the weights, the batches and the train/test split of episodes", "run")
    device: str = setting("auto", "cuda, cuda:N or cpu (auto: cuda if available)", "run")
    ExpID: Optional[str] = setting(None, "experiment id (default: the next free number, e.g. 0001)", "run")
    log_dir: str = setting("results/", "where experiment folders go", "run")
    max_timesteps: Optional[int] = setting(None, "training steps (default: 50000; built-in default: 1000)", "run",
                                           positive=True)
    eval_freq: Optional[int] = setting(None, "steps between evaluations (default: 1000; built-in default: 250)",
                                       "run", positive=True)
    save_freq: Optional[int] = setting(None, "steps between model_{step}.pth checkpoints (default: 5000; "
                                             "built-in default: 500)", "run", positive=True)
    keep_last: int = setting(1, "model_{step}.pth checkpoints kept: the newest N, older ones deleted as new ones are "
                                "written (0: keep all). model_final.pth and the acting files policy_best.pth and "
                                "policy_final.pth are always kept; with 1, the built-in default run leaves one "
                                "training checkpoint (about 0.57 GB) and two policy files (about 0.07 GB each)",
                         "run")
    tensorboard: bool = setting(False, "also write TensorBoard event files (the progress.csv scalars) to "
                                       "tensorboard/ in the run's folder; needs the tensorboard package", "run")
    eval_episodes: int = setting(10, "simulator rollouts per evaluation, on fixed seeds", "run")
    simulator: Optional[str] = setting(None, "simulator for rollout evaluation: a registered name or "
                                             "package.module:Class (default: the one named in the dataset's "
                                             "attributes; 'none' to disable)", "run")
    data_on_device: str = setting("auto", "CUDA: keep the uint8 dataset in GPU memory (auto: when it fits)", "run",
                                  choices=("auto", "yes", "no"))
    data_mode: str = setting("auto", "memory: read the whole file into RAM; stream: read it in large contiguous "
                                     "blocks of whole episodes through a shuffle buffer, with background "
                                     "prefetch, so memory stays bounded whatever the file's size (auto: memory "
                                     "when the uint8 images fit in --memory_limit_gb, else stream)", "run",
                             choices=("auto", "memory", "stream"))
    memory_limit_gb: Optional[float] = setting(None, "RAM the uint8 images may take for --data_mode auto to read "
                                                     "them into memory (default: half the available RAM)", "run",
                                               positive=True)
    shuffle_rows: int = setting(16384, "stream mode: rows held in the shuffle buffer that batches are drawn from "
                                       "(more: closer to uniform sampling over the file, more memory)", "run",
                                positive=True)
    stream_workers: int = setting(2, "stream mode: background processes that read blocks, each opening the "
                                     "file itself", "run", positive=True)
    load_model: Optional[str] = setting(None, "start from a checkpoint: a step of this experiment (or of the one "
                                              "experiment that has it), EXPID:STEP, or a checkpoint path", "run",
                                        metavar="STEP|PATH")
    resume: bool = setting(False, "continue the latest checkpoint of --ExpID", "run")
    overwrite: bool = setting(False, "replace an existing experiment folder", "run")

    # What --original_lapo turns back; each is on in the default algorithm (docs/design.md says why).
    @property
    def return_bound(self):
        """target_Q bounded below by the return the data observed to a terminal."""
        return not self.original_lapo

    @property
    def value_target(self):
        """V fitted to Q at the data's own actions ("data", IQL's) or at the policy's ("policy")."""
        return "policy" if self.original_lapo else "data"

    @property
    def episode_filter(self):
        """The CVAE imitates only the episodes that did better than their start's value."""
        return not self.original_lapo

    @property
    def value_heads(self):
        """V heads: one per fold of the training episodes (``value_folds``), or one for the original."""
        return 1 if self.original_lapo else self.value_folds

    @property
    def polyak_acting(self):
        """The policy acts through the Polyak averages of encoder, latent actor and decoder."""
        return not self.original_lapo

    @property
    def backup_steps(self):
        """Rewards summed before bootstrapping: ``n_step``, or one with --original_lapo."""
        return 1 if self.original_lapo else self.n_step


GROUPS = {"data": "data (what is trained on)", "model": "model (the observation encoder)",
          "algorithm": "algorithm", "run": "run (bookkeeping; free to change on --resume)"}
# Settings that change what a training step computes. A resumed run must keep them: a flag
# that contradicts its checkpoint is an error. --load_model may start on another file.
TRAINED_GROUPS = ("data", "model", "algorithm")
SEED_FIELDS = ("seed",)   # the split of episodes depends on it: fixed on resume as well


# Settings of the algorithm added since --original_lapo replaced the separate on/off switches
# (2026-12-04; format-2 checkpoints older than that are refused, naming what they lack), with
# the value a run made before each was trained with (each was off until it existed). Settings
# of the "run" group (bookkeeping, free to change on resume) that a stored run lacks take this
# version's defaults.
SETTINGS_ADDED_SINCE_FORMAT = {"feature_dropout": 0.0, "filter_band": 0.0, "episode_judge": "critic",
                               "judge_expectile": 0.9, "value_fit": "target_q", "joint_noise": 0.0}
# Settings taken out since then because their measurements lost, with their "off" value: a
# run made with one off is a run of this version; one made with it on cannot be rebuilt.
SETTINGS_REMOVED_SINCE_FORMAT = {"filter_margin": 0.0, "kept_share": "positive",
                                 "encoder_bc_rows": 0, "image_coords": False, "value_return_bound": False,
                                 "critic_only_encoder": False}
# Choices taken out of a setting that remains, for the same reason: a run made with one cannot
# be rebuilt either.
CHOICES_REMOVED_SINCE_FORMAT = {"episode_judge": ("thumbnail", "features")}


def settings_of_this_version(stored):
    """A stored run's settings (a checkpoint's or params.json's config) as this version names
    them: settings added since the format take their earlier value, settings taken out are
    dropped when they were off. ValueError naming a taken-out setting that was on."""
    on = [f"{name}={stored[name]!r}" for name, off in SETTINGS_REMOVED_SINCE_FORMAT.items()
          if name in stored and stored[name] != off]
    on += [f"{name}={stored[name]!r}" for name, removed in CHOICES_REMOVED_SINCE_FORMAT.items()
           if stored.get(name) in removed]
    if on:
        raise ValueError(f"trained with {', '.join(on)}, a setting this version no longer has "
                         f"(its measurements lost; see docs/experiments/)")
    kept = {k: v for k, v in stored.items() if k not in SETTINGS_REMOVED_SINCE_FORMAT}
    bookkeeping = {f.name: f.default for f in fields(TrainConfig)
                   if f.metadata["group"] == "run" and f.name not in SEED_FIELDS}
    return {**bookkeeping, **SETTINGS_ADDED_SINCE_FORMAT, **kept}


def field_names():
    return [f.name for f in fields(TrainConfig)]


def trained_settings(config):
    """{name: value} of the settings a resumed run must keep."""
    return {f.name: getattr(config, f.name) for f in fields(TrainConfig)
            if f.metadata["group"] in TRAINED_GROUPS or f.name in SEED_FIELDS}


def build_parser(description=None):
    """The CLI's flags, one per config field (those with flag=True), grouped as in the config."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
    for f in fields(TrainConfig):
        meta = f.metadata
        if not meta["flag"]:
            continue
        g = groups[meta["group"]]
        default_text = "" if f.default is None or isinstance(f.default, bool) else f" (default: {f.default})"
        if f.type is bool:
            g.add_argument(f"--{f.name}", action="store_true", default=f.default, help=meta["help"])
            continue
        kind = {int: int, float: float}.get(_base_type(f), str)
        g.add_argument(f"--{f.name}", type=kind, default=f.default, choices=meta["choices"], metavar=meta["metavar"],
                       help=meta["help"] + ("" if "default" in meta["help"] else default_text))
    return p


def _base_type(f):
    """int for ``int`` and ``Optional[int]``, and so on."""
    args = getattr(f.type, "__args__", None)
    return args[0] if args else f.type


def explicit_flags(argv, description=None):
    """Names of the settings the command line gives explicitly (as opposed to defaults)."""
    p = build_parser(description)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def problems(config):
    """Every out-of-range setting, as messages naming the flag."""
    out = []
    for f in fields(TrainConfig):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if meta["positive"] and not value > 0:
            out.append(f"--{f.name} must be > 0, got {value}")
        interval = meta["unit_interval"]
        if interval:
            lo_ok = value >= 0 if interval[0] == "[" else value > 0
            hi_ok = value <= 1 if interval[1] == "]" else value < 1
            if not (lo_ok and hi_ok):
                out.append(f"--{f.name} must be in {interval[0]}0, 1{interval[1]}, got {value}")
        if meta["choices"] and value not in meta["choices"]:
            out.append(f"--{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    for name in ("weight_temperature", "kl_beta", "filter_band", "eval_episodes", "image_shift", "joint_noise",
                 "keep_last"):
        if getattr(config, name) < 0:
            out.append(f"--{name} must be >= 0, got {getattr(config, name)}")
    if config.resume and config.load_model:
        out.append("--resume and --load_model are exclusive")
    if config.overwrite and (config.resume or config.load_model):
        out.append("--overwrite cannot be combined with --resume/--load_model")
    if config.resume and config.ExpID is None:
        out.append("--resume needs the --ExpID of the run to continue")
    if config.ExpID is not None and re.fullmatch(r"[A-Za-z0-9_.-]+", config.ExpID) is None:
        out.append(f"--ExpID may hold letters, digits, '_', '-' and '.', got {config.ExpID!r}")
    if not re.fullmatch(r"(auto|cpu|cuda(:\d+)?|mps)", config.device):
        out.append(f"--device must be auto, cpu or cuda, got {config.device!r}")
    return out


def make_config(**settings):
    """A ``TrainConfig`` from keyword settings; an unknown name is a TypeError naming it
    (a typo never passes silently) and an out-of-range value a ValueError listing them all."""
    unknown = sorted(set(settings) - set(field_names()))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; known: {field_names()}")
    config = TrainConfig(**settings)
    found = problems(config)
    if found:
        raise ValueError("; ".join(found))
    return config


def replace(config, **settings):
    return make_config(**{**dataclasses.asdict(config), **settings})


def to_dict(config):
    return dataclasses.asdict(config)
