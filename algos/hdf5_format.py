"""The dataset file format: validation, loading and writing (numpy and h5py only, no torch).

One HDF5 file, N transitions in time order, episodes back to back:

    observations/left_image    [N, H, W, 3] uint8     left wrist camera
    observations/right_image   [N, H, W, 3] uint8     right wrist camera
    observations/global_image  [N, H, W, 3] uint8     global camera
    observations/joint         [N, J]       float     joint vector (J = 16 on the reference robot)
    actions                    [N, A]       float     joint targets
    rewards                    [N]          float
    terminals                  [N]          bool      true task end: no bootstrapping
    timeouts (optional)        [N]          bool      cut off by time: not a terminal, no bootstrapping
    episodes/ (optional)       [E] per episode, in file order: length (int), and labels such as
                               source, operator, success (strings or bools); written by the importers

Images stay uint8 (N x 3 views x H x W x 3 bytes) in one array; a batch becomes float only
on the training device, inside the encoder. The simulator and the dataset tools import
this module without torch.
"""
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np
from tqdm import tqdm

from algos.experiment import temporary_path

# The three camera views, in the order every part of the project stacks them.
IMAGE_KEYS = ("left_image", "right_image", "global_image")
JOINT_KEY = "joint"
REQUIRED_KEYS = tuple(f"observations/{k}" for k in IMAGE_KEYS + (JOINT_KEY,)) + ("actions", "rewards", "terminals")
OPTIONAL_KEYS = ("timeouts",)
EPISODES_GROUP = "episodes"   # per-episode table: length and labels (source, operator, success, ...)
COUNTED_LABELS = ("operator", "success", "filter_keys")   # labels --validate counts; a source is one per episode
FLOAT_KEYS = ("observations/joint", "actions", "rewards")
FLAG_KEYS = ("terminals", "timeouts")
READ_ROWS = 2048          # rows per HDF5 read: large slices, bounded temporary memory
# Chunk layout that stream mode (algos/streaming.py) reads well: whole rows, 64 of them a
# chunk (0.4 to 9.6 MB of images at 84x84 to 224x224), so that a block of whole episodes is
# one run of chunks read in a single slice. A contiguous (unchunked) dataset, as
# create_dataset.py --create_sample writes, reads as well. The importers and --rechunk write it.
CHUNK_ROWS = 64


class DatasetError(Exception):
    """A dataset that cannot be trained on; ``problems`` lists every problem found."""

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s) found:\n{lines}")


@dataclass
class DatasetSummary:
    """What validation found: the file's tree, its facts, problems and warnings."""

    path: str
    tree: list = field(default_factory=list)       # lines of the printed tree
    problems: list = field(default_factory=list)   # "key: problem" strings
    warnings: list = field(default_factory=list)
    n_rows: int = 0
    image_shape: tuple = None                      # (H, W)
    joint_dim: int = None
    action_dim: int = None
    has_timeouts: bool = False
    attrs: dict = field(default_factory=dict)
    n_episodes: int = None
    label_counts: dict = field(default_factory=dict)   # {label: {value: episodes}} from the episodes table

    @property
    def ok(self):
        return not self.problems


def _describe(obj):
    if isinstance(obj, h5py.Dataset):
        dtype = "bool" if obj.dtype == np.bool_ else "str" if h5py.check_string_dtype(obj.dtype) else str(obj.dtype)
        extra = ""
        if obj.compression:
            extra = f", {obj.compression}"
        return f"{dtype}, shape={tuple(obj.shape)}{extra}"
    return None


CANONICAL_ORDER = {"": ("observations", "actions", "rewards", "terminals", "timeouts", EPISODES_GROUP),
                   "observations": IMAGE_KEYS + (JOINT_KEY,)}


def _tree_lines(group, prefix="  ", path=""):
    """The guide's tree: known keys in the guide's order, then anything else (marked unused)."""
    lines = []
    known = CANONICAL_ORDER.get(path, ())
    names = [k for k in known if k in group] + sorted(k for k in group.keys() if k not in known)
    for i, name in enumerate(names):
        last = i == len(names) - 1
        branch, cont = ("└─ ", "   ") if last else ("├─ ", "│  ")
        obj = group.get(name, getclass=False)
        note = "" if name in known or path == EPISODES_GROUP else "  (not used for training)"
        if isinstance(obj, h5py.Group):
            lines.append(f"{prefix}{branch}{name}/{note}")
            lines.extend(_tree_lines(obj, prefix + cont, f"{path}/{name}".strip("/")))
        elif isinstance(obj, h5py.Dataset):
            lines.append(f"{prefix}{branch}{name}: {_describe(obj)}{note}")
        else:
            lines.append(f"{prefix}{branch}{name}{note}")
    return lines


def _scan_finite(dset, key, problems):
    """Report NaN/Inf in a float dataset, reading it in slices."""
    bad, first = 0, None
    for start in range(0, dset.shape[0], READ_ROWS * 16):
        block = np.asarray(dset[start:start + READ_ROWS * 16])
        mask = ~np.isfinite(block)
        if mask.ndim > 1:
            mask = mask.reshape(mask.shape[0], -1).any(1)
        if mask.any():
            bad += int(mask.sum())
            if first is None:
                first = start + int(np.argmax(mask))
    if bad:
        problems.append(f"{key}: contains NaN or Inf in {bad} row(s) (first at row {first})")


def inspect_hdf5(path, check_values=True):
    """Validate a dataset file against the format above; never raises for a bad file.

    Returns a ``DatasetSummary`` whose ``problems`` lists every problem found, each
    naming the key, so a user can fix them all at once.
    """
    path = str(path)
    summary = DatasetSummary(path=path)
    problems = summary.problems
    if not os.path.exists(path):
        problems.append("file not found")
        return summary
    if os.path.isdir(path):
        problems.append("is a directory, not an HDF5 file")
        return summary
    if os.path.getsize(path) == 0:
        problems.append("file is empty (0 bytes), not an HDF5 file")
        return summary
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        problems.append(f"cannot be read: {exc}")
        return summary
    if not is_hdf5:
        problems.append("not an HDF5 file (no HDF5 signature)")
        return summary
    try:
        with h5py.File(path, "r") as f:
            _inspect_open_file(f, summary, check_values)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        problems.append(f"cannot be read as HDF5 (truncated or corrupt file?): {exc}")
    return summary


def _inspect_open_file(f, summary, check_values):
    problems = summary.problems
    summary.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    summary.tree = _tree_lines(f)
    if len(f.keys()) == 0:
        problems.append("file is empty: it holds no datasets")
        return
    present = {}
    for key in REQUIRED_KEYS + OPTIONAL_KEYS:
        obj = f.get(key, getclass=False) if _parent_exists(f, key) else None
        if obj is None:
            if key in REQUIRED_KEYS:
                problems.append(f"{key}: missing (required)")
            continue
        if not isinstance(obj, h5py.Dataset):
            problems.append(f"{key}: is a group, expected a dataset")
            continue
        present[key] = obj
    summary.has_timeouts = "timeouts" in present

    # dtype and rank
    image_shapes = {}
    for view in IMAGE_KEYS:
        key = f"observations/{view}"
        d = present.get(key)
        if d is None:
            continue
        if d.dtype != np.uint8:
            problems.append(f"{key}: dtype {d.dtype}, expected uint8 (0-255 RGB)")
        if d.ndim != 4:
            problems.append(f"{key}: rank {d.ndim} (shape {tuple(d.shape)}), expected [N, H, W, 3]")
        elif d.shape[3] != 3:
            problems.append(f"{key}: {d.shape[3]} channels (shape {tuple(d.shape)}), expected 3 (RGB, channels last)")
        else:
            image_shapes[key] = tuple(d.shape[1:3])
    if len(set(image_shapes.values())) > 1:
        sizes = ", ".join(f"{k.split('/')[-1]} {h}x{w}" for k, (h, w) in image_shapes.items())
        problems.append(f"observations: the three views differ in size ({sizes}); they must share one H x W")
    elif image_shapes:
        summary.image_shape = next(iter(image_shapes.values()))

    for key, rank_ok, want in (("observations/joint", (2,), "[N, J]"), ("actions", (2,), "[N, A]"),
                               ("rewards", (1, 2), "[N]")):
        d = present.get(key)
        if d is None:
            continue
        if not np.issubdtype(d.dtype, np.floating):
            problems.append(f"{key}: dtype {d.dtype}, expected float32")
        if d.ndim not in rank_ok or (key == "rewards" and d.ndim == 2 and d.shape[1] != 1):
            problems.append(f"{key}: shape {tuple(d.shape)}, expected {want}")
        elif d.ndim == 2 and d.shape[1] == 0:
            problems.append(f"{key}: shape {tuple(d.shape)} has zero width")
    if "observations/joint" in present and present["observations/joint"].ndim == 2:
        summary.joint_dim = int(present["observations/joint"].shape[1])
    if "actions" in present and present["actions"].ndim == 2:
        summary.action_dim = int(present["actions"].shape[1])
    for key in FLAG_KEYS:
        d = present.get(key)
        if d is None:
            continue
        if not (d.dtype == np.bool_ or np.issubdtype(d.dtype, np.integer)):
            problems.append(f"{key}: dtype {d.dtype}, expected bool")
        if d.ndim != 1:
            problems.append(f"{key}: shape {tuple(d.shape)}, expected [N]")

    # row counts
    rows = {k: int(d.shape[0]) for k, d in present.items() if d.ndim >= 1}
    if rows:
        counts = set(rows.values())
        if len(counts) > 1:
            listing = ", ".join(f"{k}={n}" for k, n in rows.items())
            problems.append(f"row counts disagree: {listing}")
        summary.n_rows = min(counts)
        if max(counts) == 0:
            problems.append("dataset is empty: 0 rows")
    if problems or not check_values:
        return

    for key in FLOAT_KEYS:
        _scan_finite(present[key], key, problems)
    for key in FLAG_KEYS:
        if key in present and present[key].dtype != np.bool_:
            values = np.asarray(present[key][:])
            if not np.isin(values, (0, 1)).all():
                problems.append(f"{key}: integer flags must be 0 or 1")
    if problems:
        return
    ends = np.asarray(present["terminals"][:]).astype(bool)
    if "timeouts" in present:
        ends |= np.asarray(present["timeouts"][:]).astype(bool)
    if not ends[-1]:
        summary.warnings.append("the last row ends no episode (terminals and timeouts are false there); "
                                "it is treated as a timeout")
    ends[-1] = True
    summary.n_episodes = int(ends.sum())
    if EPISODES_GROUP in f:
        _inspect_episode_table(f, ends, summary)


def _inspect_episode_table(f, ends, summary):
    """The per-episode table must describe the episodes the flags delimit, one row each."""
    table = f[EPISODES_GROUP]
    if not isinstance(table, h5py.Group):
        summary.problems.append(f"{EPISODES_GROUP}: is a dataset, expected a group of per-episode labels")
        return
    lengths = np.diff(np.concatenate([[0], np.flatnonzero(ends) + 1]))
    if "length" not in table:
        summary.problems.append(f"{EPISODES_GROUP}/length: missing (the table's rows cannot be matched to episodes)")
        return
    stored = np.asarray(table["length"][:])
    if not np.array_equal(stored, lengths):
        summary.problems.append(f"{EPISODES_GROUP}/length: {len(stored)} episode(s) summing to {int(stored.sum())} "
                                f"rows, but terminals/timeouts delimit {len(lengths)} episode(s) of "
                                f"{summary.n_rows} rows")
        return
    for name in table:
        if name == "length":
            continue
        if table[name].shape != (len(lengths),):
            summary.problems.append(f"{EPISODES_GROUP}/{name}: shape {table[name].shape}, expected ({len(lengths)},)")
            continue
        if name in COUNTED_LABELS:
            values = [_label_text(v) for v in table[name][:]]
            summary.label_counts[name] = {v: values.count(v) for v in sorted(set(values))}


def _label_text(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value)


def episode_ends(f):
    """Bool [N] of an open, valid file: true at the last row of each episode (the file's last row included)."""
    ends = np.asarray(f["terminals"][:]).astype(bool)
    if "timeouts" in f:
        ends |= np.asarray(f["timeouts"][:]).astype(bool)
    ends[-1] = True
    return ends


def episode_first_rows(ends):
    """Row index of each episode's first row, from ``episode_ends``' bool [N]."""
    return np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])


def read_episode_labels(f):
    """{label: list of strings, one per episode} of an open, valid file: the episodes table, else
    the simulator's per-row ``behaviour`` key (as ``operator``); {} when the file has neither."""
    if EPISODES_GROUP in f:
        table = f[EPISODES_GROUP]
        return {name: [_label_text(v) for v in table[name][:]] for name in table if name != "length"}
    if "behaviour" in f and "behaviour_names" in f.attrs:
        names = json.loads(f.attrs["behaviour_names"])
        starts = np.concatenate([[0], np.flatnonzero(episode_ends(f))[:-1] + 1])
        return {"operator": [names[int(b)] for b in np.asarray(f["behaviour"][:])[starts]]}
    return {}


def _parent_exists(f, key):
    parent = key.rsplit("/", 1)[0] if "/" in key else ""
    return parent == "" or isinstance(f.get(parent, getclass=False), h5py.Group)


def format_validation_report(summary):
    """The human-readable report that ``create_dataset.py --validate`` prints."""
    lines = [f"Validating dataset / 验证数据集: {summary.path}", "=" * 60, ""]
    if summary.tree:
        lines += ["File structure / 文件结构:"] + summary.tree + [""]
    if summary.ok:
        h, w = summary.image_shape
        lines.append(f"  rows: {summary.n_rows}, images: {h}x{w}, joint width: {summary.joint_dim}, "
                     f"action width: {summary.action_dim}, timeouts: {'yes' if summary.has_timeouts else 'no'}")
        if summary.n_episodes is not None:
            lines.append(f"  episodes: {summary.n_episodes}")
        for label, counts in summary.label_counts.items():
            lines.append(f"  episodes by {label}: " + ", ".join(f"{v or '(none)'} {n}" for v, n in counts.items()))
        for warning in summary.warnings:
            lines.append(f"  ! warning: {warning}")
        lines += ["", "✓ Dataset format is valid! (数据格式验证成功!)"]
    else:
        lines.append(f"✗ {len(summary.problems)} problem(s) found (数据格式验证失败):")
        lines += [f"  - {summary.path}: {p}" for p in summary.problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading
@dataclass
class OfflineDataset:
    """A validated dataset in memory: uint8 images [N, 3 views, H, W, 3] and float32 arrays."""

    path: str
    images: np.ndarray
    joint: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    attrs: dict
    warnings: list

    @property
    def n_rows(self):
        return len(self.rewards)


@dataclass
class ImagesOnDisk:
    """Stands in for the image array of a dataset loaded without its images (stream mode):
    the shape and size of the uint8 array [N, 3 views, H, W, 3] that stays in the file."""

    path: str
    shape: tuple

    @property
    def nbytes(self):
        return int(np.prod(self.shape))


def load_dataset(path, progress=True, images=True):
    """Validate then read a dataset into memory; raises ``DatasetError`` listing every problem.

    Images are read in large slices straight into one preallocated uint8 array, so peak
    memory is the dataset's uint8 size plus one slice. ``images=False`` reads everything
    but the images, which an ``ImagesOnDisk`` stands for (stream mode reads them as it goes).
    """
    summary = inspect_hdf5(path)
    if not summary.ok:
        raise DatasetError(path, summary.problems)
    n, (h, w) = summary.n_rows, summary.image_shape
    shape = (n, len(IMAGE_KEYS), h, w, 3)
    images = np.empty(shape, np.uint8) if images else ImagesOnDisk(str(path), shape)
    key = None
    try:
        with h5py.File(path, "r") as f:
            bar = tqdm(total=n * len(IMAGE_KEYS), desc=f"Loading {os.path.basename(str(path))}", unit="img",
                       unit_scale=True, disable=not progress or isinstance(images, ImagesOnDisk), leave=False)
            for v, view in enumerate(IMAGE_KEYS if isinstance(images, np.ndarray) else ()):
                key = f"observations/{view}"
                dset = f[key]
                step = READ_ROWS
                if dset.chunks:   # read whole chunks: gzip chunks are decompressed once
                    step = max(dset.chunks[0], READ_ROWS // dset.chunks[0] * dset.chunks[0])
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    images[start:stop, v] = dset[start:stop]
                    bar.update(stop - start)
            bar.close()
            key = "observations/joint"
            joint = np.asarray(f[key][:], np.float32)
            key = "actions"
            actions = np.asarray(f[key][:], np.float32)
            key = "rewards"
            rewards = np.asarray(f[key][:], np.float32).reshape(-1)
            key = "terminals"
            terminals = np.asarray(f[key][:]).astype(bool)
            key = "timeouts"
            timeouts = np.asarray(f[key][:]).astype(bool) if summary.has_timeouts else np.zeros(n, bool)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DatasetError(path, [f"{key}: cannot be read (truncated or corrupt file?): {exc}"]) from None
    if not (terminals[-1] or timeouts[-1]):
        timeouts[-1] = True
    return OfflineDataset(str(path), images, joint, actions, rewards, terminals, timeouts,
                          summary.attrs, list(summary.warnings))



# --------------------------------------------------------------------------- writing
class DatasetWriter:
    """Write a dataset of known size in the file format above, block by block.

    The file is written under a temporary name and renamed when complete, so an
    interrupted write never leaves a half-written dataset at ``path``. With ``chunk_rows``
    every dataset is chunked by that many rows (the importers stream episode by episode);
    ``add_episode`` records one row of the per-episode table (length and labels).
    """

    def __init__(self, path, n_rows, image_shape, joint_dim, action_dim, attrs=None, extra_int_keys=(),
                 chunk_rows=None):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self.file = h5py.File(self.tmp, "w")
        h, w = image_shape

        def create(group, name, shape, dtype):
            chunks = (min(chunk_rows, n_rows),) + shape[1:] if chunk_rows and n_rows else None
            group.create_dataset(name, shape, dtype, chunks=chunks)

        obs = self.file.create_group("observations")
        for view in IMAGE_KEYS:
            create(obs, view, (n_rows, h, w, 3), np.uint8)
        create(obs, JOINT_KEY, (n_rows, joint_dim), np.float32)
        create(self.file, "actions", (n_rows, action_dim), np.float32)
        create(self.file, "rewards", (n_rows,), np.float32)
        create(self.file, "terminals", (n_rows,), bool)
        create(self.file, "timeouts", (n_rows,), bool)
        for key in extra_int_keys:
            create(self.file, key, (n_rows,), np.uint8)
        for k, v in (attrs or {}).items():
            self.file.attrs[k] = v
        self.n_rows, self.row = n_rows, 0
        self.episodes = []   # rows of the per-episode table

    def write(self, block):
        """Append a dict of arrays (keys as in the file, images by view name) of equal length."""
        n = len(block["rewards"])
        s = slice(self.row, self.row + n)
        for key, value in block.items():
            target = self.file[f"observations/{key}"] if key in IMAGE_KEYS + (JOINT_KEY,) else self.file[key]
            target[s] = value
        self.row += n

    def add_episode(self, length, **labels):
        """One row of the per-episode table: the episode's length and its labels (str or bool)."""
        self.episodes.append(dict(length=int(length), **labels))

    def close(self):
        """Finish the file and move it into place."""
        if self.row != self.n_rows:
            raise RuntimeError(f"wrote {self.row} of {self.n_rows} rows")
        if self.episodes:
            table = self.file.create_group(EPISODES_GROUP)
            for name in self.episodes[0]:
                values = [episode[name] for episode in self.episodes]
                if isinstance(values[0], str):
                    table.create_dataset(name, data=values, dtype=h5py.string_dtype())
                else:
                    table.create_dataset(name, data=np.asarray(values))
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        try:
            self.file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


# --------------------------------------------------------------------------- chunk layout
def chunk_layout_problem(f):
    """Why stream mode would read an open file's images slowly, or None: chunks that split a
    row (each block then reads many small pieces) or that hold more rows than a block."""
    for view in IMAGE_KEYS:
        dset = f[f"observations/{view}"]
        if dset.chunks is None:
            continue
        if tuple(dset.chunks[1:]) != tuple(dset.shape[1:]):
            return f"observations/{view} is chunked {dset.chunks}, which splits each image"
        if dset.chunks[0] > 16 * CHUNK_ROWS:
            return f"observations/{view} is chunked {dset.chunks}: {dset.chunks[0]} rows per chunk"
    return None


def rechunk(source, output, progress=True):
    """Rewrite ``source`` as ``output`` with every per-row dataset in chunks of ``CHUNK_ROWS``
    whole rows, uncompressed (the layout stream mode reads well); everything else (attributes,
    the episodes table, extra keys) is copied as it is. Written under a temporary name and
    renamed when complete. Returns the number of rows."""
    summary = inspect_hdf5(source, check_values=False)
    if not summary.ok:
        raise DatasetError(source, summary.problems)
    n = summary.n_rows
    tmp = temporary_path(output)
    try:
        with h5py.File(source, "r") as src, h5py.File(tmp, "w") as dst:
            per_row = []

            def copy(name, obj):
                if isinstance(obj, h5py.Group):
                    dst.require_group(name).attrs.update(obj.attrs)
                elif obj.ndim >= 1 and obj.shape[0] == n and not name.startswith(EPISODES_GROUP + "/"):
                    per_row.append(name)
                    dst.create_dataset(name, obj.shape, obj.dtype, chunks=(min(CHUNK_ROWS, n),) + obj.shape[1:])
                else:
                    src.copy(obj, dst, name)

            dst.attrs.update(src.attrs)
            src.visititems(copy)
            bar = tqdm(total=n * len(per_row), desc=f"Rechunking {os.path.basename(str(source))}", unit="row",
                       unit_scale=True, disable=not progress, leave=False)
            for name in per_row:
                for start in range(0, n, READ_ROWS):
                    stop = min(n, start + READ_ROWS)
                    dst[name][start:stop] = src[name][start:stop]
                    bar.update(stop - start)
            bar.close()
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n
