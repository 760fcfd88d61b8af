"""Data path: HDF5 validation and loading, episode bookkeeping, the multimodal replay buffer.

File format (one HDF5 file, N transitions in time order, episodes back to back):

    observations/left_image    [N, H, W, 3] uint8     left wrist camera
    observations/right_image   [N, H, W, 3] uint8     right wrist camera
    observations/global_image  [N, H, W, 3] uint8     global camera
    observations/joint         [N, J]       float     joint vector (J = 16 on the reference robot)
    actions                    [N, A]       float     joint targets
    rewards                    [N]          float
    terminals                  [N]          bool      true task end: no bootstrapping
    timeouts (optional)        [N]          bool      cut off by time: not a terminal, no bootstrapping

Images stay uint8 (N x 3 views x H x W x 3 bytes) in one array; a batch becomes float only
on the training device, inside the encoder.
"""
import os
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
from tqdm import tqdm

IMAGE_KEYS = ("left_image", "right_image", "global_image")
JOINT_KEY = "joint"
REQUIRED_KEYS = tuple(f"observations/{k}" for k in IMAGE_KEYS + (JOINT_KEY,)) + ("actions", "rewards", "terminals")
OPTIONAL_KEYS = ("timeouts",)
FLOAT_KEYS = ("observations/joint", "actions", "rewards")
FLAG_KEYS = ("terminals", "timeouts")
READ_ROWS = 2048          # rows per HDF5 read: large slices, bounded temporary memory
STD_FLOOR = 1e-3          # constant joints/actions must not blow up the normalisation


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

    @property
    def ok(self):
        return not self.problems


def _describe(obj):
    if isinstance(obj, h5py.Dataset):
        dtype = "bool" if obj.dtype == np.bool_ else str(obj.dtype)
        extra = ""
        if obj.compression:
            extra = f", {obj.compression}"
        return f"{dtype}, shape={tuple(obj.shape)}{extra}"
    return None


CANONICAL_ORDER = {"": ("observations", "actions", "rewards", "terminals", "timeouts"),
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
        note = "" if name in known else "  (not used for training)"
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


def load_dataset(path, progress=True):
    """Validate then read a dataset into memory; raises ``DatasetError`` listing every problem.

    Images are read in large slices straight into one preallocated uint8 array, so peak
    memory is the dataset's uint8 size plus one slice.
    """
    summary = inspect_hdf5(path)
    if not summary.ok:
        raise DatasetError(path, summary.problems)
    n, (h, w) = summary.n_rows, summary.image_shape
    images = np.empty((n, len(IMAGE_KEYS), h, w, 3), np.uint8)
    key = None
    try:
        with h5py.File(path, "r") as f:
            bar = tqdm(total=n * len(IMAGE_KEYS), desc=f"Loading {os.path.basename(str(path))}", unit="img",
                       unit_scale=True, disable=not progress, leave=False)
            for v, view in enumerate(IMAGE_KEYS):
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


# --------------------------------------------------------------------------- episodes
def episode_ranges(terminals, timeouts):
    """[(start, stop)] row ranges of the episodes; an episode ends at a terminal or timeout row.

    The last row always ends an episode (``load_dataset`` fixes a file whose last row does not).
    """
    ends = np.flatnonzero(np.asarray(terminals, bool) | np.asarray(timeouts, bool))
    n = len(terminals)
    if len(ends) == 0 or ends[-1] != n - 1:
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return list(zip(starts.tolist(), (ends + 1).tolist()))


def transition_indices(terminals, timeouts):
    """Per row: the row of its next observation, not_done, and whether it is a usable transition.

    Inside an episode the next observation is the next row. A terminal row has
    not_done = 0 (its next observation is never used). A timeout row, like the file's
    last row, has no next observation in the file (the next row starts another episode),
    so it is not a valid transition: no bootstrapping across an episode end.
    """
    terminals = np.asarray(terminals, bool)
    timeouts = np.asarray(timeouts, bool)
    n = len(terminals)
    next_index = np.minimum(np.arange(n) + 1, n - 1)
    ends = terminals | timeouts
    ends[-1] = True
    next_index[ends] = np.flatnonzero(ends)          # never point into the next episode
    not_done = (~terminals).astype(np.float32)
    valid = ~(ends & ~terminals)                     # episode cut off by time or file end
    return next_index, not_done, valid


def _episode_rows(terminals, timeouts):
    """Per row: the stop (exclusive) of its episode and whether that episode ends in a terminal."""
    ranges = episode_ranges(terminals, timeouts)
    lengths = [stop - start for start, stop in ranges]
    stop = np.repeat([stop for _, stop in ranges], lengths)
    ends_in_terminal = np.repeat([bool(terminals[stop - 1]) for _, stop in ranges], lengths)
    return stop, ends_in_terminal


def discounted_suffix_sums(rewards, terminals, timeouts, discount):
    """Per row t: sum over the rest of its episode of discount^(i - t) * r_i (float64).

    One reverse pass over the rows: everything n-step and return-bound need is a
    difference of two of these sums, so no per-row loop over the next n rewards.
    """
    rewards = np.asarray(rewards, np.float64)
    ends = np.asarray(terminals, bool) | np.asarray(timeouts, bool)
    out = np.empty(len(rewards))
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + (0.0 if ends[i] else discount * running)
        out[i] = running
    return out


def observed_returns(rewards, terminals, timeouts, discount):
    """Per row: the discounted return observed from that row to the end of its episode, for
    episodes that end in a terminal; -inf for rows of episodes cut off by time or by the file.

    The return of what the data actually did from (s, a) on is a value that action can
    reach, so it bounds Q(s, a) from below (exactly in a deterministic world, on average in
    a noisy one). A cut-off episode's sum leaves out its unseen future, so it bounds nothing.
    """
    terminals = np.asarray(terminals, bool)
    suffix = discounted_suffix_sums(rewards, terminals, timeouts, discount)
    _, ends_in_terminal = _episode_rows(terminals, timeouts)
    return np.where(ends_in_terminal, suffix, -np.inf).astype(np.float32)


def n_step_transitions(rewards, terminals, timeouts, discount, n_step):
    """Per row: the discounted sum of the next ``k <= n_step`` rewards the data received from
    that row on, the row whose observation then bootstraps (s_{t+k}), and gamma^k (0 where
    the episode ended in a terminal within those k rewards).

    The sum stops at the episode's end: at a terminal (nothing to bootstrap), or one row
    before a time-out row, whose observation is the last one the episode has. ``n_step=1``
    is the one-step transition (r_t, s_{t+1}, gamma * not_done); an ``n_step`` longer than
    the episodes gives the Monte-Carlo return of a terminal episode.
    """
    rewards = np.asarray(rewards, np.float64)
    terminals = np.asarray(terminals, bool)
    n = len(rewards)
    rows = np.arange(n)
    stop, ends_in_terminal = _episode_rows(terminals, timeouts)
    # rewards a row can sum: to its terminal, or up to (not including) the cut-off row
    k = np.minimum(n_step, np.where(ends_in_terminal, stop - rows, stop - 1 - rows))
    has_transition = k > 0                       # a cut-off row has none (it is invalid anyway)
    k = np.maximum(k, 0)
    suffix = discounted_suffix_sums(rewards, terminals, timeouts, discount)
    # what lies beyond the k rewards; nothing where they reach the episode's end
    after = np.where(rows + k < stop, suffix[np.minimum(rows + k, n - 1)], 0.0)
    reward_sum = np.where(has_transition, suffix - discount ** k * after, rewards)
    reaches_terminal = ends_in_terminal & (rows + k == stop)
    bootstrap_index, _, _ = transition_indices(terminals, timeouts)
    bootstrap_index = np.where(has_transition, np.where(reaches_terminal, stop - 1, rows + k), bootstrap_index)
    bootstrap_discount = np.where(has_transition & ~reaches_terminal, discount ** k, 0.0)
    return reward_sum.astype(np.float32), bootstrap_index, bootstrap_discount.astype(np.float32)


def split_episodes(n_episodes, train_fraction, seed):
    """Shuffle whole episodes and split them; returns (train_ids, test_ids), test never empty."""
    if n_episodes < 2:
        raise ValueError(f"the dataset holds {n_episodes} episode(s); a train/test split needs at least 2")
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_train = int(round(train_fraction * n_episodes))
    n_train = min(max(n_train, 1), n_episodes - 1)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


RELATIVE_ACTION_RATIO = 0.5   # see Normalization.from_data


@dataclass
class Normalization:
    """Statistics that turn raw joints/actions/rewards into network units, and back.

    Saved in every checkpoint so inference needs no dataset.
    """

    joint_mean: np.ndarray
    joint_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray
    reward_scale: float
    min_v: float
    max_v: float
    # 1 where an action dimension is learned relative to the joint of the same index
    action_relative: np.ndarray = None

    def __post_init__(self):
        if self.action_relative is None:
            self.action_relative = np.zeros_like(self.action_mean)

    @classmethod
    def from_data(cls, joint, actions, rewards, discount, relative_actions="auto"):
        """Joint/action mean and std of the training rows; rewards divided by the dataset's max |r|.

        Joint-target actions: a robot moves a joint a little per step, so a target is its
        joint's current position plus a small change. Learned as absolute positions, that
        change drowns in the spread of the positions themselves (on the sample data the
        expert's step is 0.02 rad against a 0.9 rad spread), so every action dimension
        whose change from the joint of the same index varies less than
        ``RELATIVE_ACTION_RATIO`` times the action itself is learned as that change
        (``relative_actions='auto'``; 'all' or 'none' force it). ``select_action`` adds the
        joint back: actions in and out stay raw joint targets.

        Dividing rewards by max |r| (not max r, as the original LAPO code does) keeps the
        sign of all-negative rewards. min_v/max_v = min r/(1 - gamma) and max r/(1 - gamma)
        after scaling, widened to include 0: an episode can end after a single step, so
        with all-positive rewards min r/(1 - gamma) would clamp true returns.
        """
        relative = np.zeros(actions.shape[1], np.float32)
        if relative_actions not in ("auto", "all", "none"):
            raise ValueError(f"relative_actions must be auto, all or none, got {relative_actions!r}")
        if relative_actions != "none" and joint.shape[1] == actions.shape[1] and len(actions) > 1:
            if relative_actions == "all":
                relative[:] = 1
            else:
                relative[:] = (actions - joint).std(0) < RELATIVE_ACTION_RATIO * actions.std(0)
        target = actions - relative * joint if relative.any() else actions   # widths may differ
        reward_scale = float(np.max(np.abs(rewards))) if len(rewards) else 1.0
        reward_scale = reward_scale if reward_scale > 0 else 1.0
        scaled = rewards / reward_scale
        return cls(joint.mean(0), np.maximum(joint.std(0), STD_FLOOR),
                   target.mean(0), np.maximum(target.std(0), STD_FLOOR), reward_scale,
                   float(min(scaled.min(), 0.0)) / (1 - discount), float(max(scaled.max(), 0.0)) / (1 - discount),
                   relative)

    def normalize_joint(self, joint):
        return (joint - self.joint_mean) / self.joint_std

    def _relative_part(self, joint):
        # dims learned relative to the joint; none (and no broadcasting) when widths differ
        return self.action_relative * joint if self.action_relative.any() else 0.0

    def normalize_action(self, action, joint):
        """Raw action -> network units, given the raw joint vector it was taken at."""
        return (action - self._relative_part(joint) - self.action_mean) / self.action_std

    def unnormalize_action(self, action, joint):
        """Network units -> raw action, given the raw joint vector."""
        return action * self.action_std + self.action_mean + self._relative_part(joint)

    def state_dict(self):
        return {k: (torch.as_tensor(np.asarray(v, np.float32)) if isinstance(v, np.ndarray) else float(v))
                for k, v in self.__dict__.items()}

    @classmethod
    def from_state_dict(cls, state):
        # .cpu(): a checkpoint read with map_location="cuda" holds these on the GPU.
        return cls(**{k: (v.cpu().numpy().astype(np.float32) if torch.is_tensor(v) else float(v)) for k, v in state.items()})


@dataclass
class Batch:
    """One training batch on the device. Images are uint8 [B, 3 views, H, W, 3]."""

    images: torch.Tensor
    joint: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor       # [B, 1] discounted sum of the next k rewards (k = n_step, or less at an episode end)
    discount: torch.Tensor     # [B, 1] gamma^k, 0 where the episode ended in a terminal within them
    next_images: torch.Tensor = None   # the observation k steps on, which bootstraps
    next_joint: torch.Tensor = None
    observed_return: torch.Tensor = None   # [B, 1], -inf where the episode was cut off
    episode: torch.Tensor = None           # [B] index of each row's episode in the file


class MultimodalReplayBuffer:
    """The offline dataset split by episodes, normalised, and ready to sample on a device.

    Storage stays uint8; ``storage_device`` is where the images live (the training
    device when they fit there, else the CPU) and batches are moved to ``device``.
    """

    def __init__(self, dataset, train_fraction=0.8, seed=0, discount=0.99, device="cpu",
                 storage_device=None, max_test_rows=1024, relative_actions="auto", n_step=1):
        self.device = torch.device(device)
        self.storage_device = torch.device(storage_device) if storage_device is not None else torch.device("cpu")
        self.path = dataset.path
        self.n_rows = dataset.n_rows
        self.image_shape = tuple(dataset.images.shape[2:4])
        self.joint_dim = dataset.joint.shape[1]
        self.action_dim = dataset.actions.shape[1]
        self.attrs = dict(dataset.attrs)

        episodes = episode_ranges(dataset.terminals, dataset.timeouts)
        self.n_episodes = len(episodes)
        train_ids, test_ids = split_episodes(len(episodes), train_fraction, seed)
        episode_of_row = np.repeat(np.arange(len(episodes)), [b - a for a, b in episodes])
        _, _, valid = transition_indices(dataset.terminals, dataset.timeouts)
        in_train = np.isin(episode_of_row, train_ids)
        train_rows = np.flatnonzero(in_train & valid)
        test_rows = np.flatnonzero(~in_train & valid)
        if len(train_rows) == 0 or len(test_rows) == 0:
            raise ValueError("the train/test split leaves no usable transition in one half "
                             f"({len(train_rows)} train, {len(test_rows)} test rows)")
        self.n_train_episodes, self.n_test_episodes = len(train_ids), len(test_ids)
        self.train_episode_ids, self.test_episode_ids = train_ids, test_ids
        self.episode_of_row = episode_of_row

        self.normalization = Normalization.from_data(
            dataset.joint[in_train], dataset.actions[in_train], dataset.rewards, discount, relative_actions)
        norm = self.normalization
        dev = self.storage_device
        # torch.from_numpy shares memory: no second copy of the images on the CPU.
        self.images = torch.from_numpy(dataset.images).to(dev)
        # The same bytes seen as rows of wide integers: a gather then copies whole rows
        # instead of single bytes (about 30x faster on the CPU).
        row_bytes = self.images[0].numel()
        wide = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                    if row_bytes % torch.empty((), dtype=t).element_size() == 0)
        self._image_rows = self.images.view(len(self.images), row_bytes).view(wide)
        self.joint = torch.from_numpy(norm.normalize_joint(dataset.joint).astype(np.float32)).to(dev)
        self.actions = torch.from_numpy(norm.normalize_action(dataset.actions, dataset.joint).astype(np.float32)).to(dev)
        rewards = (dataset.rewards / norm.reward_scale).astype(np.float32)
        self.n_step = int(n_step)
        reward_sum, next_index, discounts = n_step_transitions(rewards, dataset.terminals, dataset.timeouts,
                                                               discount, self.n_step)
        self.rewards = torch.from_numpy(reward_sum).to(dev)
        self.discounts = torch.from_numpy(discounts).to(dev)
        self.observed_return = torch.from_numpy(
            observed_returns(rewards, dataset.terminals, dataset.timeouts, discount)).to(dev)
        self.next_index = torch.from_numpy(next_index).to(dev)
        self.episode_index = torch.from_numpy(episode_of_row).to(dev)
        # each training episode's first usable row, where the episode's own advantage is judged
        _, first = np.unique(episode_of_row[train_rows], return_index=True)
        self.train_episode_first_rows = torch.from_numpy(train_rows[first].astype(np.int64)).to(dev)
        self.train_rows = torch.from_numpy(train_rows).to(dev)
        self.train_row_episode = self.episode_index.index_select(0, self.train_rows)
        self.test_rows = torch.from_numpy(test_rows).to(dev)
        # A fixed, evenly spread subset of the test rows keeps held-out metrics comparable.
        pick = np.unique(np.linspace(0, len(test_rows) - 1, min(max_test_rows, len(test_rows))).astype(int))
        self.eval_rows = torch.from_numpy(test_rows[pick]).to(dev)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(int(seed))

    @property
    def n_train(self):
        return len(self.train_rows)

    @property
    def n_test(self):
        return len(self.test_rows)

    @property
    def nbytes_images(self):
        return self.images.numel() * self.images.element_size()

    def gather_images(self, rows):
        """uint8 images [len(rows), 3 views, H, W, 3] of the given rows."""
        return self._image_rows.index_select(0, rows).view(torch.uint8).view(len(rows), *self.images.shape[1:])

    def gather(self, rows, with_next=True):
        """The batch of the given row indices (a tensor on the storage device)."""
        non_blocking = self.device.type == "cuda"
        batch = Batch(
            images=self.gather_images(rows).to(self.device, non_blocking=non_blocking),
            joint=self.joint.index_select(0, rows).to(self.device, non_blocking=non_blocking),
            action=self.actions.index_select(0, rows).to(self.device, non_blocking=non_blocking),
            reward=self.rewards.index_select(0, rows).unsqueeze(1).to(self.device, non_blocking=non_blocking),
            discount=self.discounts.index_select(0, rows).unsqueeze(1).to(self.device, non_blocking=non_blocking),
            observed_return=self.observed_return.index_select(0, rows).unsqueeze(1).to(self.device,
                                                                                       non_blocking=non_blocking),
            episode=self.episode_index.index_select(0, rows).to(self.device, non_blocking=non_blocking),
        )
        if with_next:
            nxt = self.next_index.index_select(0, rows)
            batch.next_images = self.gather_images(nxt).to(self.device, non_blocking=non_blocking)
            batch.next_joint = self.joint.index_select(0, nxt).to(self.device, non_blocking=non_blocking)
        return batch

    def sample(self, batch_size, with_next=True, episode_mask=None, masked_frac=0.0):
        """A training batch (rows of training episodes only), uniform over their rows.

        With ``episode_mask`` (bool, one per episode of the file) the last
        ``round(masked_frac * batch_size)`` rows are drawn uniformly from the rows of the
        masked training episodes instead (from all of them where none is masked). Nothing
        is corrected for it: the caller wants those episodes' rows more often.
        """
        n_masked = int(round(masked_frac * batch_size)) if episode_mask is not None else 0
        dev = self.storage_device
        pick = torch.randint(len(self.train_rows), (batch_size - n_masked,), generator=self.generator, device=dev)
        if n_masked > 0:
            # On the storage device, with the buffer's generator, so that a resumed run draws
            # the same rows; when it is the training device this never waits for the host.
            in_mask = episode_mask.to(dev).index_select(0, self.train_row_episode).float()
            in_mask = in_mask + (in_mask.sum() == 0).float()
            pick = torch.cat([pick, torch.multinomial(in_mask, n_masked, replacement=True, generator=self.generator)])
        return self.gather(self.train_rows.index_select(0, pick), with_next)

    def eval_batches(self, batch_size=256):
        """The fixed held-out rows, in batches, for offline metrics."""
        for start in range(0, len(self.eval_rows), batch_size):
            yield self.gather(self.eval_rows[start:start + batch_size])

    def rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state):
        self.generator.set_state(state.to(self.generator.get_state().device) if torch.is_tensor(state) else state)

    def facts(self):
        """Dataset facts for params.json."""
        return {"path": os.path.abspath(self.path), "rows": self.n_rows, "episodes": self.n_episodes,
                "image_shape": list(self.image_shape), "joint_dim": self.joint_dim, "action_dim": self.action_dim,
                "train_episodes": self.n_train_episodes, "test_episodes": self.n_test_episodes,
                "train_transitions": self.n_train, "test_transitions": self.n_test,
                "image_bytes": self.nbytes_images}


# --------------------------------------------------------------------------- writing
class DatasetWriter:
    """Write a dataset of known size in the file format above, block by block.

    The file is written under a temporary name and renamed when complete, so an
    interrupted write never leaves a half-written dataset at ``path``.
    """

    def __init__(self, path, n_rows, image_shape, joint_dim, action_dim, attrs=None, extra_int_keys=()):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self.tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(self.path)}")
        self.file = h5py.File(self.tmp, "w")
        h, w = image_shape
        obs = self.file.create_group("observations")
        for view in IMAGE_KEYS:
            obs.create_dataset(view, (n_rows, h, w, 3), np.uint8)
        obs.create_dataset(JOINT_KEY, (n_rows, joint_dim), np.float32)
        self.file.create_dataset("actions", (n_rows, action_dim), np.float32)
        self.file.create_dataset("rewards", (n_rows,), np.float32)
        self.file.create_dataset("terminals", (n_rows,), bool)
        self.file.create_dataset("timeouts", (n_rows,), bool)
        for key in extra_int_keys:
            self.file.create_dataset(key, (n_rows,), np.uint8)
        for k, v in (attrs or {}).items():
            self.file.attrs[k] = v
        self.n_rows, self.row = n_rows, 0

    def write(self, block):
        """Append a dict of arrays (keys as in the file, images by view name) of equal length."""
        n = len(block["rewards"])
        s = slice(self.row, self.row + n)
        for key, value in block.items():
            target = self.file[f"observations/{key}"] if key in IMAGE_KEYS + (JOINT_KEY,) else self.file[key]
            target[s] = value
        self.row += n

    def close(self):
        """Finish the file and move it into place."""
        if self.row != self.n_rows:
            raise RuntimeError(f"wrote {self.row} of {self.n_rows} rows")
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        try:
            self.file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
