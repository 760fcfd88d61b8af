"""Data path at scale: memory mode against stream mode (--data_mode), on a generated file.

    python benchmarks/bench_data.py                      # 80,000 rows at 84x84: a 5.1 GB file
    python benchmarks/bench_data.py --rows 20000 --train_steps 0 --keep /data/bench.hdf5

Writes a file of ``--rows`` rows of random 84x84 images (episodes of 100 rows, chunks of
``hdf5_format.CHUNK_ROWS`` rows as the importers write) and a small one of ``--small_rows``
rows, then prints:
  * sampler samples/s (batches of obs + next obs, 3 views, as training draws them) of memory
    mode on the small file and of stream mode on the large one;
  * the real ``MultimodalLatent.train`` step at ``--batch_size`` on each (CPU), and the
    slowdown of stream mode against memory mode;
  * the peak RSS of a stream-mode process (and of its reader processes) on a file of a
    quarter of ``--rows`` and on the large file, both larger than the shuffle buffer: it must
    not grow with the file.
Before each stream measurement the file's pages are dropped from the page cache with
posix_fadvise(DONTNEED) (this file's alone; no root, no effect on other processes' files),
so the first epoch of the stream reads from the disk. The files are deleted at the end
(``--keep PATH`` keeps the large one there instead).
"""
import argparse
import gc
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import config as config_lib  # noqa: E402
from algos import hdf5_format, streaming  # noqa: E402
from algos import utils_multimodal as utils  # noqa: E402
from bench_train import _high_water_rss_gb, in_fresh_process  # noqa: E402

EPISODE_ROWS = 100
DISTINCT_FRAMES = 997   # random frames cycled through the file: writing stays fast, rows differ


def write_file(path, n_rows, image_size, seed=0):
    """A valid dataset of ``n_rows`` rows written block by block (bounded memory)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (DISTINCT_FRAMES, image_size, image_size, 3), dtype=np.uint8)
    writer = hdf5_format.DatasetWriter(path, n_rows, (image_size, image_size), 16, 16,
                                       chunk_rows=hdf5_format.CHUNK_ROWS)
    for start in range(0, n_rows, hdf5_format.READ_ROWS):
        rows = np.arange(start, min(n_rows, start + hdf5_format.READ_ROWS))
        ends = (rows % EPISODE_ROWS == EPISODE_ROWS - 1) | (rows == n_rows - 1)
        block = {view: frames[(rows * (v + 1)) % DISTINCT_FRAMES] for v, view in enumerate(hdf5_format.IMAGE_KEYS)}
        block.update(joint=rng.normal(size=(len(rows), 16)).astype(np.float32),
                     actions=rng.normal(size=(len(rows), 16)).astype(np.float32),
                     rewards=rng.random(len(rows)).astype(np.float32), terminals=ends, timeouts=np.zeros(len(rows), bool))
        writer.write(block)
    writer.close()
    evict_from_page_cache(path)


def evict_from_page_cache(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def make_buffer(path, mode, workers, device="cpu"):
    """As main_multimodal.py builds it: on CUDA the images (memory mode) or the shuffle
    buffer (stream mode) are stored on the GPU."""
    device = torch.device(device)
    if mode == "memory":
        return utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), seed=0,
                                            device=device, storage_device=device)
    evict_from_page_cache(path)
    return streaming.StreamReplayBuffer(hdf5_format.load_dataset(path, images=False), seed=0, workers=workers,
                                        device=device, storage_device=device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sampler_rate(buffer, batch_size, seconds):
    """Samples/s of ``buffer.sample`` over ``seconds`` (after a few warm-up batches)."""
    for _ in range(3):
        buffer.sample(batch_size)
    sync(buffer.device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        buffer.sample(batch_size)
        n += batch_size
    sync(buffer.device)
    return n / (time.perf_counter() - t0)


def _stream_memory(path, batch_size, batches, workers, queue):
    """Child process: a stream buffer and ``batches`` batches; the peak RSS of this process
    and of its reader processes (they have ended when this returns)."""
    buffer = make_buffer(path, "stream", workers)
    for _ in range(batches):
        buffer.sample(batch_size)
    rotations = buffer.position
    del buffer   # ends the readers, so that their peak counts in RUSAGE_CHILDREN
    gc.collect()
    readers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    queue.put((_high_water_rss_gb(), readers, rotations))


def stream_memory(path, batch_size, batches, workers):
    return in_fresh_process(_stream_memory, path, batch_size, batches, workers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=80000, help="rows of the large file (84x84: 63.5 KB of images each)")
    p.add_argument("--small_rows", type=int, default=5000, help="rows of the small file (memory mode)")
    p.add_argument("--image_size", type=int, default=84)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20, help="time each sampler runs")
    p.add_argument("--train_steps", type=int, default=4, help="timed training steps per mode (0: none)")
    p.add_argument("--memory_batches", type=int, default=2000, help="batches drawn in each peak-RSS process (0: skip)")
    p.add_argument("--workers", type=int, default=config_lib.TrainConfig.stream_workers,
                   help="stream readers (as main_multimodal.py --stream_workers)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: buffers and training step on the GPU")
    p.add_argument("--dir", default=os.path.join(ROOT, "results"), help="where the files are written")
    p.add_argument("--keep", metavar="PATH", help="keep the large file at PATH instead of deleting it")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    large = args.keep or os.path.join(args.dir, f"bench_data_{args.rows}.hdf5")
    small = os.path.join(args.dir, f"bench_data_{args.small_rows}.hdf5")
    quarter = os.path.join(args.dir, f"bench_data_{args.rows // 4}.hdf5")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        t = time.perf_counter()
        for path, rows in ((large, args.rows), (small, args.small_rows), (quarter, args.rows // 4)):
            if not os.path.exists(path):
                write_file(path, rows, args.image_size)
        print(f"files: {os.path.getsize(large) / 2**30:.2f} GB ({args.rows} rows) and "
              f"{os.path.getsize(small) / 2**30:.2f} GB ({args.small_rows} rows), {args.image_size}x{args.image_size}; "
              f"RAM {ram / 2**30:.1f} GiB, available {streaming.available_memory_bytes() / 2**30:.1f} GiB; "
              f"written in {time.perf_counter() - t:.0f} s", flush=True)

        memory = make_buffer(small, "memory", args.workers, args.device)
        stream = make_buffer(large, "stream", args.workers, args.device)
        rate_memory = sampler_rate(memory, args.batch_size, args.seconds)
        print(f"sampler, memory mode (small file):  {rate_memory:,.0f} samples/s", flush=True)
        rate_stream = sampler_rate(stream, args.batch_size, args.seconds)
        print(f"sampler, stream mode (large file):  {rate_stream:,.0f} samples/s   ({stream.position} blocks "
              f"rotated; {stream.n_active} of {len(stream.blocks)} blocks resident, "
              f"{stream.resident_image_bytes / 2**30:.2f} GB)", flush=True)

        agents = {}
        if args.train_steps:
            for mode, buffer in (("memory", memory), ("stream", stream)):
                torch.manual_seed(0)
                agents[mode] = algos.MultimodalLatent(replay_buffer=buffer, device=args.device)
            times = {"memory": [], "stream": []}
            # alternate, so machine noise hits both alike; on CUDA a few steps per timing
            per_timing = 1 if args.device == "cpu" else 10
            for i in range(args.train_steps + 1):
                for mode, agent in agents.items():
                    sync(args.device)
                    t = time.perf_counter()
                    agent.train(per_timing, args.batch_size)
                    sync(args.device)
                    if i:
                        times[mode].append((time.perf_counter() - t) / per_timing)
            step = {mode: statistics.median(v) for mode, v in times.items()}
            where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                     else f"CPU ({torch.get_num_threads()} threads)")
            print(f"training step, batch {args.batch_size}, {where}, median of "
                  f"{args.train_steps}: memory {step['memory'] * 1e3:.0f} ms, stream {step['stream'] * 1e3:.0f} ms, "
                  f"stream/memory {step['stream'] / step['memory']:.3f}", flush=True)
        del memory, stream, agents

        for path in (quarter, large) if args.memory_batches else ():
            peak, readers, rotations = stream_memory(path, args.batch_size, args.memory_batches, args.workers)
            print(f"stream mode peak RSS, {os.path.getsize(path) / 2**30:.2f} GB file: {peak:.2f} GB "
                  f"(readers: {readers:.2f} GB each at most; {args.memory_batches} batches, {rotations} rotations)",
                  flush=True)
    finally:
        for path in (small, quarter) if args.keep else (small, quarter, large):
            if os.path.exists(path):
                os.remove(path)


if __name__ == "__main__":
    main()
