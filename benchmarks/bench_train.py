"""Training speed against the ResNet18 compute floor, sampler throughput and peak memory.

    python benchmarks/bench_train.py --device cpu --steps 5
    python benchmarks/bench_train.py --device cuda --batch_size 64 --image_size 84 --steps 20

The floor is the least any correct design must do per step: one forward+backward of the
three ResNet18 trunks on a batch of observations, one forward without gradients on a batch
of next observations, and an Adam step. The real step is ``MultimodalLatent.train`` on the
same batch size and image size (sampling, uint8->float, all heads, optimisers, target
updates included). Floor and real step alternate, so machine noise hits both alike. The
same floor with torchvision's own convolutions runs in the same loop: how much
``OnePixelConv2d`` saves at this image size (nothing from 64x64 up). The last line is
``step/floor ratio: X.XX``.
"""
import argparse
import multiprocessing
import os
import queue as queue_lib
import resource
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos import algos_vae_multimodal as algos  # noqa: E402
from algos import hdf5_format  # noqa: E402
from algos import utils_multimodal as utils  # noqa: E402


def synthetic_dataset(n_rows, image_size, joint_dim=16, episode_len=50, seed=0):
    """An in-memory dataset of random uint8 images (no disk), episodes of ``episode_len``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_rows, 3, image_size, image_size, 3), dtype=np.uint8)
    terminals = np.zeros(n_rows, bool)
    terminals[episode_len - 1::episode_len] = True
    terminals[-1] = True
    return hdf5_format.OfflineDataset("synthetic", images, rng.normal(size=(n_rows, joint_dim)).astype(np.float32),
                                rng.normal(size=(n_rows, joint_dim)).astype(np.float32),
                                rng.random(n_rows).astype(np.float32), terminals, np.zeros(n_rows, bool), {}, [])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Floor:
    """Three trunks exactly as the encoder builds them, fed float images already on the device
    (``one_pixel_convs=False``: with torchvision's own convolutions instead, see
    ``algos.OnePixelConv2d``)."""

    def __init__(self, agent, batch_size, image_size, one_pixel_convs=True):
        device = agent.device
        self.device, self.amp = device, agent.amp
        self.trunks = torch.nn.ModuleList(algos.resnet18_trunk(agent.config.image_feature_dim, one_pixel_convs)
                                          for _ in range(3))
        self.trunks.to(device).to(memory_format=torch.channels_last)
        self.optimizer = algos.adam(self.trunks.parameters(), 1e-4, device)
        shape = (batch_size, 3, image_size, image_size)
        self.obs = [torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last) for _ in range(3)]
        self.next_obs = [torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
                         for _ in range(3)]

    def step(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = sum(trunk(x).float().pow(2).mean() for trunk, x in zip(self.trunks, self.obs))
            with torch.no_grad():
                for trunk, x in zip(self.trunks, self.next_obs):
                    trunk(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "max allocated (CUDA)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "peak RSS"


def _high_water_rss_gb():
    # VmHWM belongs to this process's own address space; ru_maxrss would carry the parent's
    # peak over into a child started by fork+exec
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2 ** 20


def _training_memory(n_rows, image_size, batch_size, steps, amp, queue):
    """Child process: only what a training run holds (dataset, buffer, agent, a few steps)."""
    baseline = _high_water_rss_gb()   # interpreter + torch imports
    buffer = utils.MultimodalReplayBuffer(synthetic_dataset(n_rows, image_size), train_test_split=0.9, seed=0, device="cpu")
    agent = algos.MultimodalLatent(replay_buffer=buffer, device="cpu", amp=amp)
    agent.train(steps, batch_size)
    queue.put((baseline, buffer.nbytes_images / 2 ** 30, _high_water_rss_gb()))


def training_memory(n_rows, image_size, batch_size, amp, steps=3):
    """Peak RSS of a CPU training process, measured in a fresh process so that the floor's
    model and this benchmark's own allocations do not count: (imports GB, dataset GB, peak GB)."""
    return in_fresh_process(_training_memory, n_rows, image_size, batch_size, steps, amp)


def in_fresh_process(target, *args):
    """What ``target(*args, queue)`` puts on its queue, run in a spawned process (so that its
    peak RSS is its own)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:   # a child that died without an answer is an error, not a wait forever
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_lib.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__} ended with exit code {proc.exitcode} before it "
                                   "reported its figures (its error is printed above)") from None
    proc.join()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=algos.default_device())
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=84)
    p.add_argument("--steps", type=int, default=5, help="timed floor/real-step pairs (after 2 warm-up pairs)")
    p.add_argument("--n_rows", type=int, default=5000, help="rows of the synthetic in-memory dataset")
    p.add_argument("--sampler_batches", type=int, default=200)
    p.add_argument("--amp", default="off", choices=("auto", "bf16", "off"), help="as main_multimodal.py --amp")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)

    dataset = synthetic_dataset(args.n_rows, args.image_size)
    storage = device if device.type == "cuda" else "cpu"
    buffer = utils.MultimodalReplayBuffer(dataset, train_test_split=0.9, seed=0, device=device, storage_device=storage)
    del dataset
    agent = algos.MultimodalLatent(replay_buffer=buffer, device=device, amp=args.amp, compile=args.compile)
    floor = Floor(agent, args.batch_size, args.image_size)
    stock_floor = Floor(agent, args.batch_size, args.image_size, one_pixel_convs=False)

    # sampler alone: obs and next obs, all three views, on the device, no model
    for _ in range(5):
        buffer.sample(args.batch_size)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.sampler_batches):
        batch = buffer.sample(args.batch_size)
    sync(device)
    sampler_rate = args.sampler_batches * args.batch_size / (time.perf_counter() - t)
    del batch

    floor_times, step_times, stock_times = [], [], []
    for i in range(args.steps + 2):
        f = timed(floor.step, device)
        s = timed(lambda: agent.train(1, args.batch_size), device)
        o = timed(stock_floor.step, device)
        if i >= 2:
            floor_times.append(f)
            step_times.append(s)
            stock_times.append(o)
        print(f"  pair {i + 1}/{args.steps + 2}: floor {f * 1e3:8.1f} ms   step {s * 1e3:8.1f} ms   "
              f"(floor, torchvision's convolutions {o * 1e3:8.1f} ms)" + ("   (warm-up)" if i < 2 else ""), flush=True)
    floor_ms = statistics.median(floor_times) * 1e3
    step_ms = statistics.median(step_times) * 1e3
    stock_ms = statistics.median(stock_times) * 1e3
    peak, kind = peak_memory_gb(device)
    data_gb = buffer.nbytes_images / 2 ** 30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print()
    print(f"device: {name}   batch {args.batch_size}   image {args.image_size}x{args.image_size}   "
          f"amp {'bf16' if agent.amp else 'off'}   rows {args.n_rows}")
    print(f"floor (3x ResNet18 fwd+bwd, next-obs fwd, Adam): {floor_ms:.1f} ms   (median of {args.steps})")
    print(f"real MultimodalLatent.train step:                {step_ms:.1f} ms")
    print(f"floor with torchvision's own convolutions:        {stock_ms:.1f} ms   "
          f"(one-pixel convolutions: {stock_ms / floor_ms:.2f}x faster)")
    print(f"training throughput:                             {args.batch_size / step_ms * 1e3:.0f} samples/s")
    print(f"sampler alone (obs + next obs, 3 views):         {sampler_rate:,.0f} samples/s")
    print(f"dataset uint8 size:                              {data_gb:.3f} GB")
    print(f"{kind} (this benchmark, both floors included): {peak:.3f} GB")
    if device.type == "cpu":
        # a training process alone, at two dataset sizes: the overhead must not grow with the data
        for rows in (args.n_rows, 2 * args.n_rows):
            imports, data, peak_train = training_memory(rows, args.image_size, args.batch_size, args.amp)
            print(f"training process, {rows} rows: peak RSS {peak_train:.3f} GB = dataset {data:.3f} GB + "
                  f"{peak_train - data:.3f} GB ({imports:.3f} GB of it is Python + torch imports)")
    print(f"step/floor ratio: {step_ms / floor_ms:.2f}")


if __name__ == "__main__":
    main()
