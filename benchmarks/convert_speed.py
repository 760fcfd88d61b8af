"""How fast --from_aloha converts 480x640 recordings to 84x84, and its peak memory, for two dataset sizes.

    python benchmarks/convert_speed.py [--frames 100] [--episodes 2 10]

Writes one synthetic ALOHA episode per layout (raw frames, and JPEG bytes as ALOHA's
record_episodes.py writes them: textured 480x640 images, 3 cameras, a few pixels of
motion per frame) into a temporary folder, hard-links it as episode_0 ... episode_{n-1},
and times ``create_dataset.py --from_aloha`` on each size in a fresh process with
OMP_NUM_THREADS=1. Prints rows per second (a row is one time step: 3 camera frames) and
the converter's peak RSS. The input is in the page cache after being written, so disk
reads cost nothing here.
"""
import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from importer_inputs import ALOHA_CAMERAS, write_aloha_episode  # noqa: E402

SIZE = (480, 640)


def textured_frames(camera, first_frame, length, size):
    """Smooth random texture (like a scene) drifting 3 pixels a frame."""
    rng = np.random.default_rng(ALOHA_CAMERAS.index(camera))
    h, w = size
    coarse = rng.integers(0, 232, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    base = np.kron(coarse, np.ones((16, 16, 1), np.uint8))[:h, :w]
    noise = rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * (first_frame + t), axis=1) + noise for t in range(length)])


def convert(folder, output):
    """Run the converter in a fresh process: (seconds, peak RSS in MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "create_dataset.py"), "--from_aloha", folder,
                             "--output", output, "--image_size", "84", "--success_episodes", "all"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(f"conversion failed: {proc.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100, help="time steps per episode (default: 100)")
    p.add_argument("--episodes", type=int, nargs="+", default=[2, 10], help="dataset sizes (default: 2 10)")
    args = p.parse_args(argv)
    print("| layout | episodes | rows | seconds | rows/s (3 frames each) | peak RSS |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layout, compress in (("raw", False), ("jpeg", True)):
            source = os.path.join(tmp, f"{layout}.hdf5")
            # written in another process: a child forked from a large parent would inherit its peak RSS
            writer = multiprocessing.get_context("spawn").Process(
                target=write_aloha_episode, args=(source, args.frames),
                kwargs=dict(size=SIZE, compress=compress, frames_of=textured_frames))
            writer.start()
            writer.join()
            for n in args.episodes:
                folder = os.path.join(tmp, f"{layout}{n}")
                os.makedirs(folder)
                for e in range(n):
                    os.link(source, os.path.join(folder, f"episode_{e}.hdf5"))
                seconds, rss = convert(folder, os.path.join(tmp, f"{layout}{n}.out.hdf5"))
                rows = n * args.frames
                print(f"| {layout} | {n} | {rows} | {seconds:.1f} | {rows / seconds:.0f} | {rss:.0f} MiB |")
                os.remove(os.path.join(tmp, f"{layout}{n}.out.hdf5"))


if __name__ == "__main__":
    main()
