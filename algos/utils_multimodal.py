"""Data path: episode bookkeeping, normalisation and the multimodal replay buffer.

The file format itself (validation, loading, writing) is in ``algos/hdf5_format.py``.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from algos import config as config_lib

STD_FLOOR = 1e-3          # constant joints/actions must not blow up the normalisation


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


def expectile(values, tau, iterations=200):
    """The tau-expectile of ``values`` (numpy): the m where tau * E[(x - m)+] = (1 - tau) * E[(m - x)+]
    (0.5: the mean; towards 1: towards the largest)."""
    values = np.asarray(values, np.float64)
    m = values.mean()
    for _ in range(iterations):
        weight = np.where(values > m, tau, 1 - tau)
        m = (weight * values).sum() / weight.sum()
    return float(m)


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


# The settings the buffer is built from: an agent trained on the buffer records these.
BUFFER_SETTINGS = ("train_test_split", "seed", "discount", "n_step", "relative_actions", "original_lapo")


class MultimodalReplayBuffer:
    """The offline dataset split by episodes, normalised, and ready to sample on a device.

    Built from a ``TrainConfig`` (default: the defaults) with ``settings`` applied by name:
    ``train_test_split`` and ``seed`` choose the held-out episodes, ``discount`` and ``n_step``
    (one step with ``original_lapo``) the returns, ``relative_actions`` the action units. ``normalization`` given (a checkpoint's,
    when training goes on from one) replaces the statistics of this file, so that the
    networks keep the units they were trained in. Storage stays uint8; ``storage_device`` is
    where the images live (the training device when they fit there, else the CPU) and
    batches are moved to ``device``. ``rank`` (a process of a multi-process run) offsets the
    seed of the batches only, so that ranks draw different batches from the same split.

    The images are held whole here; ``algos.streaming.StreamReplayBuffer`` holds a shuffle
    buffer of them instead (the hooks ``_store_images``, ``slot_of_row`` and
    ``_sampleable_rows``) and shares everything else: split, returns, normalisation, batches.
    """

    def __init__(self, dataset, config=None, device="cpu", storage_device=None, normalization=None,
                 max_test_rows=1024, rank=0, **settings):
        config = config_lib.replace(config or config_lib.TrainConfig(), **settings)
        self.settings = {k: getattr(config, k) for k in BUFFER_SETTINGS}
        train_fraction, seed, discount = config.train_test_split, config.seed, config.discount
        relative_actions, n_step = config.relative_actions, config.backup_steps
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

        self.normalization = normalization or Normalization.from_data(
            dataset.joint[in_train], dataset.actions[in_train], dataset.rewards, discount, relative_actions)
        norm = self.normalization
        dev = self.storage_device
        self.image_row_shape = tuple(dataset.images.shape[1:])   # (3 views, H, W, 3)
        self.slot_of_row = None   # where a file row's images are in storage; None: at the row itself
        self._store_images(dataset.images)
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
        # per row: the discounted return to its episode's last row, cut off or not (the default
        # episode filter's judgement at a first row)
        self.return_to_end = torch.from_numpy(
            discounted_suffix_sums(rewards, dataset.terminals, dataset.timeouts, discount).astype(np.float32)).to(dev)
        self.next_index = torch.from_numpy(next_index).to(dev)
        self.episode_index = torch.from_numpy(episode_of_row).to(dev)
        # each episode's first usable row, where the episode's own advantage is judged
        _, first = np.unique(episode_of_row[train_rows], return_index=True)
        self.train_episode_first_rows = torch.from_numpy(train_rows[first].astype(np.int64)).to(dev)
        _, first = np.unique(episode_of_row[test_rows], return_index=True)
        self.test_episode_first_rows = torch.from_numpy(test_rows[first].astype(np.int64)).to(dev)
        self.train_rows = torch.from_numpy(train_rows).to(dev)
        self.train_row_episode = self.episode_index.index_select(0, self.train_rows)
        self.test_rows = torch.from_numpy(test_rows).to(dev)
        # A fixed, evenly spread subset of the test rows keeps held-out metrics comparable.
        pick = np.unique(np.linspace(0, len(test_rows) - 1, min(max_test_rows, len(test_rows))).astype(int))
        self.eval_rows = torch.from_numpy(test_rows[pick]).to(dev)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(int(seed) + int(rank))

    def _store_images(self, images):
        """Hold the whole uint8 image array on the storage device."""
        # torch.from_numpy shares memory: no second copy of the images on the CPU.
        self.images = torch.from_numpy(images).to(self.storage_device)
        self._image_rows = image_rows_view(self.images)

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
        slots = rows if self.slot_of_row is None else self.slot_of_row.index_select(0, rows)
        return self._image_rows.index_select(0, slots).view(torch.uint8).view(len(rows), *self.image_row_shape)

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
        rows, row_episode = self._sampleable_rows(batch_size)
        pick = torch.randint(len(rows), (batch_size - n_masked,), generator=self.generator, device=dev)
        if n_masked > 0:
            # On the storage device, with the buffer's generator, so that a resumed run draws
            # the same rows; when it is the training device this never waits for the host.
            in_mask = episode_mask.to(dev).index_select(0, row_episode).float()
            in_mask = in_mask + (in_mask.sum() == 0).float()
            pick = torch.cat([pick, torch.multinomial(in_mask, n_masked, replacement=True, generator=self.generator)])
        return self.gather(rows.index_select(0, pick), with_next)

    def _sampleable_rows(self, batch_size):
        """The training rows a batch of ``batch_size`` is drawn from, and their episodes: all of them."""
        return self.train_rows, self.train_row_episode

    def eval_batches(self, batch_size=256):
        """The fixed held-out rows, in batches, for offline metrics."""
        for start in range(0, len(self.eval_rows), batch_size):
            yield self.gather(self.eval_rows[start:start + batch_size])

    def rng_state(self):
        """What a checkpoint stores so that a resumed run draws the same batches."""
        return self.generator.get_state().cpu()

    def set_rng_state(self, state):
        self.generator.set_state(state.to(self.generator.get_state().device) if torch.is_tensor(state) else state)

    def facts(self):
        """Dataset facts for params.json."""
        return {"path": os.path.abspath(self.path), "rows": self.n_rows, "episodes": self.n_episodes,
                "image_shape": list(self.image_shape), "joint_dim": self.joint_dim, "action_dim": self.action_dim,
                "train_episodes": self.n_train_episodes, "test_episodes": self.n_test_episodes,
                "train_transitions": self.n_train, "test_transitions": self.n_test,
                "image_bytes": self.nbytes_images, "data_mode": "memory"}


def image_rows_view(images):
    """uint8 images [N, ...] seen as N rows of the widest integer that divides a row: a gather
    then copies whole rows instead of single bytes (about 30x faster on the CPU)."""
    row_bytes = images[0].numel()
    wide = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                if row_bytes % torch.empty((), dtype=t).element_size() == 0)
    return images.view(len(images), row_bytes).view(wide)
