"""Stream mode: train on a file whose images do not fit in memory (``--data_mode stream``).

Everything but the images (joints, actions, rewards, flags: about 150 bytes a row against
63 KB of images at 84x84) is read into memory as in memory mode, and the split, the n-step
returns, the normalisation and the form of a batch are ``MultimodalReplayBuffer``'s own:
``StreamReplayBuffer`` only changes where a row's images are.

The training rows are cut into **blocks**: runs of whole training episodes that lie back to
back in the file, about ``BLOCK_ROWS`` rows each, read by one slice per view (the file's
chunks should hold whole rows: see ``hdf5_format.CHUNK_ROWS`` and ``--rechunk``). A block
holds the next observations of all its rows, since an episode never bootstraps past its end.
A **shuffle buffer** of ``shuffle_rows`` rows (a few blocks) is resident on the storage
device; batches are drawn uniformly from its training rows (and the episode filter's
share from its kept episodes). Once the buffer has served about as many draws as it holds
rows divided by its number of blocks, the oldest block leaves and the next one of the
stream enters. The stream visits every block once per epoch, in an order drawn from the
seed (and the rank), so each row is drawn about once per epoch, as in memory mode.

Blocks are read ahead by ``torch.utils.data.DataLoader`` worker processes (PyTorch's own),
each opening the file itself; on CUDA the DataLoader pins them and the copy to the GPU runs
on a side stream one block ahead of use, so a training step does not wait for the host.

Rows the agent gathers outside batches stay resident for the whole run: the first usable
row of every episode (where the episode filter judges it) and the fixed held-out rows of
``eval_batches``, with their next observations.

Exact resume: the stream's position (the oldest resident block's place in the order) and
the draws since the last rotation are part of ``rng_state``; the resident blocks are read
again from that position, so a resumed run draws the same batches.
"""
import os
import signal
import weakref

import h5py
import numpy as np
import torch

from algos import config as config_lib
from algos.hdf5_format import IMAGE_KEYS, chunk_layout_problem
from algos.utils_multimodal import MultimodalReplayBuffer, episode_ranges, image_rows_view, transition_indices

BLOCK_ROWS = 1024          # rows a block aims at: one large contiguous read per view
MEMORY_SHARE = 0.5         # --data_mode auto: images may take this share of the available RAM
PREFETCH_BLOCKS = 2        # blocks each worker reads ahead


def available_memory_bytes():
    """RAM the kernel can give without swapping (MemAvailable), else the physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_data_mode(data_mode, image_bytes, memory_limit_gb=None, processes=1):
    """'memory' or 'stream': ``data_mode`` itself unless it is 'auto'; then memory when the
    images of every process on this machine (``processes`` copies) fit in ``memory_limit_gb``
    (default: ``MEMORY_SHARE`` of the available RAM)."""
    if data_mode != "auto":
        return data_mode
    limit = memory_limit_gb * 2 ** 30 if memory_limit_gb else MEMORY_SHARE * available_memory_bytes()
    return "memory" if image_bytes * processes <= limit else "stream"


def plan_blocks(episodes, train_ids, block_rows=BLOCK_ROWS):
    """[(start, stop)] row ranges of the blocks: runs of whole training episodes back to back
    in the file, each closed once it reaches ``block_rows`` (a longer episode is one block)."""
    blocks, start, stop = [], None, None
    for e in train_ids:
        a, b = episodes[e]
        if start is not None and (a != stop or stop - start >= block_rows):
            blocks.append((start, stop))
            start = None
        if start is None:
            start = a
        stop = b
    if start is not None:
        blocks.append((start, stop))
    return blocks


def read_images(f, rows):
    """uint8 images [len(rows), 3 views, H, W, 3] of an open file's rows: a slice, or
    increasing row numbers."""
    views = [f[f"observations/{view}"] for view in IMAGE_KEYS]
    n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
    out = np.empty((n, len(views)) + views[0].shape[1:], np.uint8)
    for v, dset in enumerate(views):
        if n:
            out[:, v] = dset[rows]
    return out


class BlockReader(torch.utils.data.Dataset):
    """Item i: the images of block i as a uint8 tensor. Each worker process opens the file
    itself on its first read (an h5py file handle must not cross a fork)."""

    def __init__(self, path, blocks):
        self.path, self.blocks = path, blocks
        self._file = None

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return torch.from_numpy(read_images(self._file, slice(*self.blocks[i])))


def _ignore_stop_signals(worker_id):
    """A reader leaves the signals to its training process: Ctrl-C and torchrun's SIGTERM reach
    the whole process group, and a reader killed by one would fail the run before it can save
    its checkpoint. Readers end with their training process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _end_readers(readers):
    for loader_iter in readers:
        loader_iter._shutdown_workers()
    readers.clear()


class BlockOrder(torch.utils.data.Sampler):
    """The endless stream of block ids from ``position`` on: epoch after epoch, each a
    permutation of the blocks drawn from (seed, epoch)."""

    def __init__(self, n_blocks, seed, position=0):
        self.n_blocks, self.seed, self.position = n_blocks, seed, position

    def block_at(self, position):
        epoch, i = divmod(position, self.n_blocks)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)[i])

    def __iter__(self):
        position = self.position
        while True:
            yield self.block_at(position)
            position += 1


class StreamReplayBuffer(MultimodalReplayBuffer):
    """``MultimodalReplayBuffer`` whose images stream from the file through a shuffle buffer
    (see the module docstring). ``dataset`` is loaded with ``images=False``."""

    def __init__(self, dataset, config=None, device="cpu", storage_device=None, normalization=None,
                 max_test_rows=1024, rank=0, shuffle_rows=None, workers=None, block_rows=BLOCK_ROWS, **settings):
        self.rank = int(rank)
        super().__init__(dataset, config, device, storage_device, normalization, max_test_rows, rank, **settings)
        config = config or config_lib.TrainConfig()
        shuffle_rows = int(shuffle_rows or config.shuffle_rows)
        self.workers = int(workers or config.stream_workers)
        self.file_image_bytes = dataset.images.nbytes
        dev = self.storage_device
        episodes = episode_ranges(dataset.terminals, dataset.timeouts)
        self.blocks = plan_blocks(episodes, self.train_episode_ids, block_rows)
        block_size = max(b - a for a, b in self.blocks)
        # the blocks that serve batches, plus (when they are not all of them) a spare slot
        # where the next block is copied while they serve
        self.n_active = max(1, min(len(self.blocks), shuffle_rows // block_size))
        self.rotates = len(self.blocks) > self.n_active
        self.order = BlockOrder(len(self.blocks), self.sample_seed)
        train_rows = self.train_rows.cpu().numpy()
        block_of_row = np.full(self.n_rows, -1, np.int64)
        for b, (start, stop) in enumerate(self.blocks):
            block_of_row[start:stop] = b
        self._block_train_rows = [torch.from_numpy(r).to(dev) for r in
                                  np.split(train_rows, np.searchsorted(block_of_row[train_rows],
                                                                       np.arange(1, len(self.blocks))))]
        # rows gathered outside batches stay resident: every episode's first usable row
        # (the episode filter) and the held-out rows (eval_batches), with their next rows
        valid_rows = np.flatnonzero(transition_indices(dataset.terminals, dataset.timeouts)[2])
        _, first = np.unique(self.episode_of_row[valid_rows], return_index=True)
        fixed = np.concatenate([valid_rows[first], self.eval_rows.cpu().numpy()])
        fixed = np.unique(np.concatenate([fixed, self.next_index.cpu().numpy()[fixed]]))
        with h5py.File(self.path, "r") as f:
            problem = chunk_layout_problem(f)
            if problem:
                print(f"warning: {self.path}: {problem}; stream mode reads it slowly. Rewrite it with "
                      f"python create_dataset.py --rechunk --hdf5_path {self.path} --output NEW.hdf5")
            fixed_images = read_images(f, fixed)
        self.n_fixed = len(fixed)
        self.block_size = block_size
        n_slots = self.n_fixed + (self.n_active + self.rotates) * block_size
        pin = dev.type == "cuda"
        self.images = torch.empty((n_slots,) + self.image_row_shape, dtype=torch.uint8, device=dev)
        self._image_rows = image_rows_view(self.images)
        self.images[:self.n_fixed] = torch.from_numpy(fixed_images).to(dev)
        slot_of_row = torch.full((self.n_rows,), -1, dtype=torch.int64)
        slot_of_row[torch.from_numpy(fixed)] = torch.arange(self.n_fixed)
        self.slot_of_row = slot_of_row.to(dev)
        self._fixed_rows = torch.from_numpy(fixed).to(dev)
        self._reader = BlockReader(self.path, self.blocks)
        self._copy_stream = torch.cuda.Stream(dev) if pin else None
        self._pin = pin
        # the reader processes' DataLoader iterator, in a list that a finalizer holds: it ends
        # them when the buffer goes and at interpreter exit, before multiprocessing joins its
        # children (readers ignore SIGTERM, so its terminate() would leave that join waiting)
        self._readers = []
        weakref.finalize(self, _end_readers, self._readers)
        self._start_stream(position=0, draws=0)

    def _store_images(self, images):
        pass   # the shuffle buffer is built once the split is known (__init__)

    @property
    def sample_seed(self):
        """Seeds the order of the blocks, as seed + rank seeds the batches."""
        return int(self.settings["seed"]) + self.rank

    # ---- the stream
    def close(self):
        """End the reader processes (the buffer can no longer read ahead)."""
        _end_readers(self._readers)

    def _start_stream(self, position, draws):
        """Fill the shuffle buffer with the blocks at ``position`` .. ``position + n_active``
        of the order (the last one into the spare slot) and read ahead from there on."""
        self.close()   # ends the previous readers
        if self.rotates:
            self._start_readers(position)
        self.position, self._draws = position, draws
        self._active = []          # [(block, slot)], oldest first
        self._incoming = None      # (block, slot, copy-done event or None)
        self._fetched = position   # order position of the next block to stage
        for slot in range(self.n_active):
            self._stage(slot)
            self._activate_incoming()
        if self.rotates:
            self._stage(self.n_active)
        self._refresh_sampleable()

    def _start_readers(self, position):
        """Reader processes that read the blocks ahead, in stream order from ``position`` on.
        Started only when the blocks rotate: with every block resident they are read once, here
        (starting readers only to end them at once raced their start-up and aborted them)."""
        loader = torch.utils.data.DataLoader(
            self._reader, batch_size=None, sampler=BlockOrder(len(self.blocks), self.sample_seed, position),
            num_workers=self.workers, prefetch_factor=PREFETCH_BLOCKS, pin_memory=self._pin,
            worker_init_fn=_ignore_stop_signals,
            # spawned, not forked: a fork of a training process inherits its thread pools
            # (and aborts on exit) and HDF5's state; a spawned reader starts clean
            multiprocessing_context="spawn", persistent_workers=True,
            # its own seed for the workers: starting the stream must not draw from torch's
            # global generator, or a resumed run would draw other noise than the straight run
            generator=torch.Generator().manual_seed(self.sample_seed))
        self._readers.append(iter(loader))

    def _stage(self, slot):
        """Copy the next block of the stream into ``slot`` (on CUDA: on the side stream, after
        the work queued so far, which may still read that slot's previous block)."""
        block = self.order.block_at(self._fetched)
        if self._readers:
            images = next(self._readers[0])
        else:
            with h5py.File(self.path, "r") as f:
                images = torch.from_numpy(read_images(f, slice(*self.blocks[block])))
        self._fetched += 1
        start, stop = self.blocks[block]
        first = self.n_fixed + slot * self.block_size
        target = self.images[first:first + stop - start]
        event = None
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.storage_device))
            with torch.cuda.stream(self._copy_stream):
                target.copy_(images, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            self._staged_host = images   # the pinned block must outlive its copy
        else:
            target.copy_(images)
        self._incoming = (block, slot, event)

    def _activate_incoming(self):
        block, slot, event = self._incoming
        if event is not None:
            torch.cuda.current_stream(self.storage_device).wait_event(event)   # no host wait
        start, stop = self.blocks[block]
        first = self.n_fixed + slot * self.block_size
        rows = torch.arange(start, stop, device=self.storage_device)
        self.slot_of_row[rows] = torch.arange(first, first + stop - start, device=self.storage_device)
        self._active.append((block, slot))
        self._incoming = None

    def _rotate(self):
        """The oldest block leaves, the staged one serves, the next one is staged."""
        old_block, old_slot = self._active.pop(0)
        start, stop = self.blocks[old_block]
        if all(block != old_block for block, _ in self._active):   # across an epoch's end a block
            self.slot_of_row[start:stop] = -1                       # can serve twice at once
        self.slot_of_row[self._fixed_rows] = torch.arange(self.n_fixed, device=self.storage_device)
        self._activate_incoming()
        self._stage(old_slot)
        self.position += 1
        self._refresh_sampleable()

    def _refresh_sampleable(self):
        rows = torch.cat([self._block_train_rows[b] for b, _ in self._active])
        self._rows = torch.sort(rows).values   # file order: with every block resident, memory mode's rows
        self._row_episode = self.episode_index.index_select(0, self._rows)
        self._quota = max(1, len(self._rows) // len(self._active))

    def _sampleable_rows(self, batch_size):
        if self._draws >= self._quota and self.rotates:
            self._rotate()
            self._draws = 0
        self._draws += batch_size
        return self._rows, self._row_episode

    # ---- state and facts
    def rng_state(self):
        return {"generator": self.generator.get_state().cpu(), "position": self.position, "draws": self._draws}

    def set_rng_state(self, state):
        if isinstance(state, dict):
            super().set_rng_state(state["generator"])
            self._start_stream(int(state["position"]), int(state["draws"]))
        else:   # a memory-mode checkpoint: its batch generator, the stream from its start
            super().set_rng_state(state)

    @property
    def nbytes_images(self):
        return self.file_image_bytes

    @property
    def resident_image_bytes(self):
        return self.images.numel()

    def facts(self):
        return dict(super().facts(), data_mode="stream", resident_image_bytes=self.resident_image_bytes,
                    stream_blocks=len(self.blocks), resident_blocks=self.n_active)
