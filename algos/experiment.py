"""Run bookkeeping: experiment folders, which checkpoint to continue, the progress log,
signals and atomic writes. No torch here: checkpoints are read and written by the agent.

A run's folder is ``{log_dir}/Exp{ExpID}/multimodal_robot/`` and holds progress.csv (one
row per evaluation) and its plot progress.png, params.json (the whole config and the run's
facts), model_{step}.pth every save_freq (the newest keep_last of them), model_final.pth,
and the policy files policy_best.pth and policy_final.pth. Every file appears complete or
not at all: it is written under a hidden temporary name and renamed.
"""
import collections
import contextlib
import csv
import io
import glob
import json
import os
import pickle
import re
import shutil
import signal
import sys
import zipfile

from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------- atomic files
def temporary_path(path):
    """A hidden name beside ``path`` that no glob of outputs ever matches (``.tmp-{pid}-name``)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".tmp-{os.getpid()}-{name}")


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """``with atomic_write(path) as f: ...`` writes a temporary file, flushes it to disk and
    renames it to ``path``; on any error the temporary file is removed and ``path`` is untouched."""
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def link_atomic(source, path):
    """Give the file ``source`` the second name ``path`` (a hard link: no second copy on the
    disk), replacing ``path`` atomically. False where the file system has no hard links."""
    tmp = temporary_path(path)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def clear_temporary_files(folder):
    """Temporary files of a killed run are never complete outputs."""
    for stale in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
        os.remove(stale)


# --------------------------------------------------------------------------- folders
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


def prune_step_checkpoints(folder, keep_last, step):
    """Delete the model_{s}.pth with s <= ``step`` but the ``keep_last`` newest (0: keep all).
    Files past ``step`` are another branch of a run continued from an earlier step: they are
    replaced as training reaches them, never counted or deleted here."""
    if keep_last <= 0:
        return []
    mine = sorted(s for s in step_checkpoints(folder) if s <= step)
    old = [os.path.join(folder, f"model_{s}.pth") for s in mine[:-keep_last]]
    for path in old:
        os.remove(path)
    return old


class _Stub:
    """Stands in for every class a checkpoint's pickle names (tensors, storages, torch.Size)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _SkeletonUnpickler(pickle.Unpickler):
    """Reads a checkpoint's structure (plain dicts, numbers, strings) and none of its tensor data."""

    def find_class(self, module, name):
        return collections.OrderedDict if (module, name) == ("collections", "OrderedDict") else _Stub

    def persistent_load(self, pid):
        return None


def stored_step(path):
    """The step count a training checkpoint was saved at, read from the small pickle inside
    its zip archive alone: no torch, and none of its hundreds of MB of weights are read.
    None when the file is not a readable checkpoint."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            skeleton = _SkeletonUnpickler(io.BytesIO(z.read(name))).load()
        return int(skeleton["total_it"])
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, KeyError, TypeError,
            ValueError, AttributeError):
        return None


def latest_checkpoint(folder):
    """The checkpoint with the most training steps in a folder (model_final.pth included)."""
    candidates = list(step_checkpoints(folder).items())
    final = os.path.join(folder, "model_final.pth")
    if os.path.isfile(final):
        step = stored_step(final)
        if step is None:
            raise UserError(f"{final}: not a readable checkpoint (truncated or corrupt?); move it away to go on "
                            "from the newest model_{step}.pth")
        candidates.append((step, final))
    if not candidates:
        return None
    return max(candidates)[1]


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


def prepare_experiment(config):
    """Create or reuse the experiment folder as the settings ask; returns (folder, checkpoint
    to start from or None, whether that checkpoint continues this folder's own run)."""
    folder = experiment_dir(config.log_dir, config.ExpID)
    clear_temporary_files(folder)
    has_run = os.path.isdir(folder) and (
        any(os.path.exists(os.path.join(folder, n)) for n in ("progress.csv", "params.json"))
        or bool(glob.glob(os.path.join(glob.escape(folder), "model_*.pth"))))
    if config.resume:
        if not has_run:
            raise UserError(f"--resume: {folder} holds no run to continue")
        ckpt = latest_checkpoint(folder)
        if ckpt is None:
            raise UserError(f"--resume: {folder} has no checkpoint yet; start again with --overwrite")
        return folder, ckpt, True
    if config.load_model:
        ckpt = resolve_load_model(config.load_model, folder, config.log_dir)
        own = os.path.dirname(os.path.abspath(ckpt)) == os.path.abspath(folder)
        if has_run and not own:
            raise UserError(f"{folder} already holds another run; load into a new --ExpID or add nothing "
                            "of this folder's own (use --resume to continue it)")
        os.makedirs(folder, exist_ok=True)
        return folder, ckpt, own
    if has_run:
        if not config.overwrite:
            raise UserError(f"{folder} already holds a run. Use --resume to continue it, --overwrite to "
                            "replace it, or another --ExpID.")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    return folder, None, False


def resume_command(argv, exp_id):
    """The command that continues this run: the same flags, its --ExpID, plus --resume."""
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
    if not any(tok == "--ExpID" or tok.startswith("--ExpID=") for tok in out):
        out += ["--ExpID", exp_id]   # assigned automatically: the resume must name it
    return " ".join(["python", os.path.basename(sys.argv[0] or "main_multimodal.py")] + out + ["--resume"])


# --------------------------------------------------------------------------- progress log
def next_best(best, value, step, metric, direction="min", tolerance=0.0):
    """policy_best's record after an evaluation at ``step`` whose criterion is ``value``, or
    None if this checkpoint does not replace the pick. It does when its value is the best so
    far, or within ``tolerance`` (relative) of the best so far: of the checkpoints a criterion
    cannot tell apart, the later one, trained longer (see docs/design.md, "Which checkpoint is
    model_best"). The record: {"value" (this checkpoint's), "step", "metric", "best_value"
    (the best so far, the reference of the tolerance)}."""
    sign = 1.0 if direction == "min" else -1.0
    best_value = None if best is None else best.get("best_value", best["value"])
    if best_value is None or sign * value < sign * best_value:
        best_value = value
    elif not sign * value < sign * best_value + tolerance * abs(best_value):   # tolerance 0: strictly better only
        return None
    return {"value": float(value), "step": step, "metric": metric, "best_value": float(best_value)}


class ProgressLog:
    """progress.csv: a row per evaluation, appended and flushed row by row.

    A row with a column the file does not have yet (a metric that first appears later,
    e.g. rollout scores once a simulator is attached on resume) rewrites the file with the
    wider header, so no column is ever dropped.
    """

    def __init__(self, path):
        self.path = path
        self.fields = None
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)

    def rows(self):
        if not self.fields:
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows):
        with atomic_write(self.path, "w") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def truncate_after(self, step):
        """Drop rows past ``step`` (written after the checkpoint a run resumes from)."""
        rows = self.rows()
        keep = [r for r in rows if r.get("steps", "").isdigit() and int(r["steps"]) <= step]
        if len(keep) != len(rows):
            self._rewrite(keep)
        return len(rows) - len(keep)

    def write(self, row):
        if self.fields is not None and any(k not in self.fields for k in row):
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite(self.rows_with_blanks())
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

    def rows_with_blanks(self):
        return [{k: r.get(k) or "" for k in self.fields} for r in self.rows()]


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# --------------------------------------------------------------------------- signals
class StopFlag:
    """SIGINT/SIGTERM ask training to stop after the current step; a second signal stops at once.

    ``with StopFlag() as stop:`` installs the handlers and restores the previous ones on
    leaving, so a run started from a notebook or a test leaves Ctrl-C as it found it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    TRAINING = "stopping after the current step and saving a checkpoint (send it again to abort without saving)"

    def __init__(self, what=TRAINING):
        self.signum = None
        self.what = what   # what happens now, as the message after "SIGINT received: " says
        self._previous = {}

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"\n{signal.Signals(signum).name} received: {self.what}...")

    def __call__(self):
        return self.signum is not None
