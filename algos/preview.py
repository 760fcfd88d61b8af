"""A look at a dataset: a PNG contact sheet of its cameras and per-episode statistics.

    python create_dataset.py --preview --hdf5_path data.hdf5 [--out sheet.png]

The sheet has one row per episode (evenly spaced through the file) and one panel per
frame (evenly spaced through the episode, the last row included); a panel shows the
left wrist, right wrist and global views side by side, titled with the step and reward,
and the last row of an episode says how it ended. Only the frames shown are read.
"""
import os

import h5py
import numpy as np

from algos.experiment import UserError, atomic_write
from algos.hdf5_format import IMAGE_KEYS, episode_ends, inspect_hdf5, read_episode_labels

DEFAULT_EPISODES = 4
DEFAULT_FRAMES = 5
PANEL_INCHES = 1.1   # height of a panel on the sheet


def episode_table(f):
    """One dict per episode: start, length, return, end ('terminal' or 'timeout'), success, labels."""
    terminals = np.asarray(f["terminals"][:]).astype(bool)
    stops = np.flatnonzero(episode_ends(f)) + 1
    starts = np.concatenate([[0], stops[:-1]])
    rewards = np.asarray(f["rewards"][:], np.float64).reshape(-1)
    returns = np.add.reduceat(rewards, starts)
    labels = read_episode_labels(f)
    table = []
    for i, (start, stop) in enumerate(zip(starts, stops)):
        episode_labels = {name: values[i] for name, values in labels.items()}
        success = episode_labels.pop("success", "yes" if terminals[stop - 1] else "no") == "yes"
        table.append({"index": i, "start": int(start), "length": int(stop - start), "return": float(returns[i]),
                      "end": "terminal" if terminals[stop - 1] else "timeout", "success": success,
                      "labels": episode_labels})
    return table


def statistics_lines(table, success_source):
    """Count, lengths, returns and success rate, overall and per value of each grouping label."""
    def summary(name, episodes):
        lengths = np.array([e["length"] for e in episodes])
        returns = np.array([e["return"] for e in episodes])
        wins = sum(e["success"] for e in episodes)
        return (f"  {name:<24} {len(episodes):>5}  {lengths.min():>4}/{lengths.mean():>7.1f}/{lengths.max():<5}"
                f"  {returns.min():>8.3f}/{returns.mean():>8.3f}/{returns.max():<8.3f}  {wins / len(episodes):>6.0%}")

    lines = [f"Episodes / 回合统计 (success: {success_source})",
             f"  {'':<24} {'count':>5}  {'length min/mean/max':<20} {'return min/mean/max':<28} success",
             summary("all", table)]
    groupings = [name for name in table[0]["labels"] if name != "source"]
    for name in groupings:
        for value in sorted({e["labels"][name] for e in table}):
            lines.append(summary(f"{name}={value or '(none)'}", [e for e in table if e["labels"][name] == value]))
    return lines


def evenly_spaced(n, k):
    """At most k of range(n), evenly spaced, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def contact_sheet(f, table, out, n_episodes, n_frames):
    """Write the PNG: evenly spaced episodes as rows, evenly spaced frames as panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [table[i] for i in evenly_spaced(len(table), n_episodes)]
    h, w = f[f"observations/{IMAGE_KEYS[0]}"].shape[1:3]
    rewards = f["rewards"]
    fig, axes = plt.subplots(len(shown), n_frames, squeeze=False,
                             figsize=(n_frames * PANEL_INCHES * 3 * w / h, len(shown) * (PANEL_INCHES + 0.45)))
    for row, episode in zip(axes, shown):
        steps = evenly_spaced(episode["length"], n_frames)
        for ax in row:
            ax.axis("off")
        for ax, step in zip(row, steps):
            i = episode["start"] + int(step)
            views = [f[f"observations/{view}"][i] for view in IMAGE_KEYS]
            gap = np.full((h, max(1, w // 32), 3), 255, np.uint8)
            ax.imshow(np.concatenate([views[0], gap, views[1], gap, views[2]], axis=1))
            last = step == episode["length"] - 1
            ax.set_title(f"t={step} r={float(rewards[i]):.2f}" + (f"\nend: {episode['end']}" if last else ""),
                         fontsize=7, color="firebrick" if last else "black")
        labels = ", ".join(f"{k}={v}" for k, v in episode["labels"].items() if v)
        row[0].text(-0.04, 0.5, f"ep {episode['index']}\n{episode['length']} rows\nreturn {episode['return']:.2f}"
                    + (f"\n{labels}" if labels else ""), transform=row[0].transAxes, ha="right", va="center",
                    fontsize=7)
    fig.suptitle(f"{os.path.basename(f.filename)}: views left wrist | right wrist | global", fontsize=8)
    fig.tight_layout(rect=(0.08, 0, 1, 0.97))
    with atomic_write(out) as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)
    return len(shown)


def preview(path, out, n_episodes=DEFAULT_EPISODES, n_frames=DEFAULT_FRAMES):
    """Write the contact sheet of ``path`` to ``out``; returns the statistics text."""
    summary = inspect_hdf5(path, check_values=False)
    if not summary.ok:
        raise UserError(f"{path}: cannot preview a file that does not validate: " + "; ".join(summary.problems))
    if n_episodes < 1 or n_frames < 1:
        raise UserError("--preview_episodes and --preview_frames must be at least 1")
    with h5py.File(path, "r") as f:
        table = episode_table(f)
        source = "the file's success labels" if "success" in read_episode_labels(f) else \
            "episodes ending in a terminal"
        shown = contact_sheet(f, table, out, n_episodes, n_frames)
    lines = statistics_lines(table, source)
    lines.append(f"✓ Wrote {out}: {shown} episode(s) x {n_frames} frame(s), views left wrist | right wrist | global")
    return "\n".join(lines)
