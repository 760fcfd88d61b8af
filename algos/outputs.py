"""What people look at: the learning curves of a run (progress.png, TensorBoard events) and
videos of a policy acting in a simulator.

Optional packages are imported where they are used, so that a run without them never
needs them: tensorboard for ``--tensorboard``, PyAV for .mp4 videos. matplotlib (and the
PIL that comes with it) is in requirements.txt.
"""
import math
import os

import numpy as np

from algos.experiment import UserError, atomic_write

# progress.png: one panel per group of progress.csv columns; a panel with no values is left out
# (no simulator: no rollout panels). (title, columns, y scale)
PROGRESS_PANELS = (
    ("Rollouts: score and success", ("NormalizedScore", "SuccessRate"), "linear"),
    ("Rollouts: return (mean ± std)", ("AverageReturn",), "linear"),
    ("Held-out test episodes", ("test_weighted_action_mse", "test_kept_action_mse", "test_action_mse",
                                 "test_vae_recon_mse"), "log"),
    ("Training losses (mean since the previous row)", ("critic_loss", "vae_loss", "bc_loss"), "log"),
)
# TensorBoard tags: progress.csv's column names, grouped by what they measure.
ROLLOUT_COLUMNS = ("AverageReturn", "StdReturn", "SuccessRate", "NormalizedScore")
RUN_COLUMNS = ("steps_per_s", "wall_time_s")


def _number(value):
    """A progress.csv cell (text, or a number from a fresh row) as a float; None if empty."""
    if value is None or value == "":
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_progress_plot(rows, path, title, best=None):
    """Plot progress.csv's ``rows`` (dicts) into ``path`` (PNG, written atomically): rollout
    score and return when the run has a simulator, held-out errors and training losses.
    ``best`` ({"step", "metric"}) marks the step policy_best.pth comes from. Returns the
    titles of the panels drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # no pyplot: no global backend
    from matplotlib.figure import Figure

    steps = [_number(r.get("steps")) for r in rows]
    panels = []
    for panel_title, columns, scale in PROGRESS_PANELS:
        series = {}
        for column in columns:
            points = [(s, _number(r.get(column))) for s, r in zip(steps, rows)]
            points = [(s, v) for s, v in points if s is not None and v is not None]
            if points:
                series[column] = points
        if series:
            values = [v for points in series.values() for _, v in points]
            wide = min(values) > 0 and max(values) > 10 * min(values)   # a log axis only where it helps
            panels.append((panel_title, series, scale if wide else "linear"))
    n_cols = 2 if len(panels) > 1 else 1
    n_rows = max(1, math.ceil(len(panels) / n_cols))
    fig = Figure(figsize=(5.2 * n_cols, 3.0 * n_rows + 0.5), dpi=90)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    for i, (panel_title, series, scale) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        for column, points in series.items():
            x, y = (np.array(v) for v in zip(*points))
            ax.plot(x, y, marker="o", markersize=3, label=column)
            if column == "AverageReturn":
                std = {s: _number(r.get("StdReturn")) for s, r in zip(steps, rows)}
                spread = np.array([std.get(s) or 0.0 for s in x])
                ax.fill_between(x, y - spread, y + spread, alpha=0.2)
        if best and best.get("step") is not None:
            ax.axvline(best["step"], color="grey", linestyle=":", linewidth=1,
                       label=f"policy_best (step {best['step']})")
        ax.set_yscale(scale)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        fig.text(0.5, 0.5, "no values yet", ha="center")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    return [panel_title for panel_title, _, _ in panels]


# --------------------------------------------------------------------------- TensorBoard
def check_tensorboard():
    """Fail before a run starts, not at its first evaluation, when --tensorboard cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard (progress.csv and "
                        "progress.png hold the same numbers without it)") from None


class TensorBoardLog:
    """TensorBoard event files in ``log_dir`` through torch's own writer: every number of a
    progress row under its progress.csv name, grouped as rollout/, held_out/, train/, run/.
    ``purge_step``: on resume, events at or after it (written after the checkpoint) are dropped."""

    def __init__(self, log_dir, purge_step=None):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    @staticmethod
    def tag(column):
        if column in ROLLOUT_COLUMNS:
            return f"rollout/{column}"
        if column.startswith("test_"):
            return f"held_out/{column}"
        return f"run/{column}" if column in RUN_COLUMNS else f"train/{column}"

    def write(self, row):
        step = int(row["steps"])
        for column, value in row.items():
            value = _number(value)
            if column != "steps" and value is not None:
                self.writer.add_scalar(self.tag(column), value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


# --------------------------------------------------------------------------- videos
VIEW_GAP = 2          # pixels between the views of a frame
CAPTION_HEIGHT = 14   # pixels of the text line under the views
MIN_VIEW_HEIGHT = 96  # small training images are enlarged (nearest neighbour) to at least this


def views_side_by_side(observation, image_keys, caption=""):
    """One video frame: the observation's views left to right, enlarged to at least
    ``MIN_VIEW_HEIGHT`` pixels, on a dark background, with ``caption`` under them."""
    from PIL import Image, ImageDraw

    views = [np.asarray(observation[k]) for k in image_keys]
    h, w = views[0].shape[:2]
    scale = max(1, math.ceil(MIN_VIEW_HEIGHT / h))
    height, width = h * scale, len(views) * (w * scale + VIEW_GAP) - VIEW_GAP
    frame = np.full((height + CAPTION_HEIGHT, width, 3), 24, np.uint8)
    for i, view in enumerate(views):
        x = i * (w * scale + VIEW_GAP)
        frame[:height, x:x + w * scale] = view.repeat(scale, 0).repeat(scale, 1)
    if caption:
        image = Image.fromarray(frame)
        ImageDraw.Draw(image).text((3, height + 1), caption, fill=(235, 235, 235))
        frame = np.asarray(image)
    return frame


def write_video(frames, path, fps=10):
    """Write RGB uint8 frames as an animated .gif (PIL) or an .mp4 (PyAV, optional), atomically."""
    kind = os.path.splitext(path)[1].lower()
    if kind == ".gif":
        from PIL import Image
        images = [Image.fromarray(f) for f in frames]
        with atomic_write(path) as f:
            images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                           loop=0)
    elif kind == ".mp4":
        try:
            import av
        except ImportError:
            raise UserError(f"{path}: writing .mp4 needs PyAV (pip install av); or write a .gif") from None
        h, w = frames[0].shape[:2]
        even = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0))) for f in frames]   # yuv420p needs even sizes
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        with atomic_write(path) as f:
            container = av.open(f, mode="w", format="mp4")
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
            for frame in even:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
            container.close()
    else:
        raise UserError(f"--video {path}: give a .gif or .mp4 file name")
